use fedge_proto::msg::{Loss, TrainingPlan};
use fedge_runtime::data;
use fedge_runtime::train::compile::{CompileOptions, OptimizerSpec};
use fedge_runtime::train::exec::{Executor, TractExecutor, TractInference};
use fedge_runtime::train::import::{ModelGraph, import_onnx};
use fedge_runtime::train::local;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or("mlp".into());
    let proto = match which.as_str() {
        "mlp" => fedge_runtime::zoo::mlp(1),
        "cnn" => fedge_runtime::zoo::cnn(2),
        _ => fedge_runtime::zoo::small_cnn(3),
    };
    let blob = import_onnx(&proto.encode_to_vec())?;
    let g = ModelGraph::from_blob(&blob)?;
    let d = data::load_mnist(&data::shipped_data_dir())?;
    let train = d.slice(0..8000);
    let test = d.slice(8000..10000);
    let t = std::time::Instant::now();
    let mut ex = TractExecutor::new(
        &g,
        CompileOptions {
            batch: 32,
            loss: Loss::SoftmaxCrossEntropy,
            optimizer: OptimizerSpec {
                momentum: 0.9,
                ..Default::default()
            },
            ..Default::default()
        },
    )?;
    println!("compiled in {:?}", t.elapsed());
    ex.load(&blob.params.values)?;
    let mut inf = TractInference::new(&g, 250)?;
    for epoch in 0..3 {
        let t = std::time::Instant::now();
        let plan = TrainingPlan {
            local_epochs: 1,
            learning_rate: 0.02,
            ..Default::default()
        };
        let s = local::train(&mut ex, &train, &plan, epoch, |_, _, _| {})?;
        inf.load(&ex.params()?)?;
        let e = local::evaluate(&inf, &test)?;
        println!(
            "epoch {epoch} loss {:.4} acc {:.4} in {:?}",
            s.mean_loss,
            e.accuracy,
            t.elapsed()
        );
    }
    Ok(())
}
