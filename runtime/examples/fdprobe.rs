use fedge_proto::msg::Loss;
use fedge_runtime::data;
use fedge_runtime::train::compile::{CompileOptions, Mode};
use fedge_runtime::train::exec::{Batch, Executor, Labels, TractExecutor, TractInference};
use fedge_runtime::train::import::{ModelGraph, import_onnx};
use prost::Message;

fn main() {
    let blob = import_onnx(&fedge_runtime::zoo::mlp(1).encode_to_vec()).unwrap();
    let g = ModelGraph::from_blob(&blob).unwrap();
    let d = data::load_mnist(&data::shipped_data_dir())
        .unwrap()
        .slice(0..4);
    let data::Features::F32(x) = &d.features else {
        panic!()
    };
    let mut ex = TractExecutor::new(
        &g,
        CompileOptions {
            batch: 4,
            mode: Mode::Gradients,
            loss: Loss::SoftmaxCrossEntropy,
            ..Default::default()
        },
    )
    .unwrap();
    ex.load(&blob.params.values).unwrap();
    let (loss_g, grads) = ex
        .gradients(Batch::F32(x), Labels::Classes(&d.labels))
        .unwrap();
    let mut inf = TractInference::new(&g, 4).unwrap();
    let lossf = |inf: &mut TractInference, v: &[f32]| -> f64 {
        inf.load(v).unwrap();
        let out = inf.run(Batch::F32(x)).unwrap();
        out.chunks(10)
            .zip(&d.labels)
            .map(|(row, &l)| {
                let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
                    - row[l as usize] as f64
            })
            .sum::<f64>()
            / 4.0
    };
    println!(
        "graph loss {loss_g} host loss {}",
        lossf(&mut inf, &blob.params.values)
    );
    let layout = &blob.params.layout;
    let i = layout.index_of("fc1.bias").unwrap();
    let r = layout.range(i);
    for j in [16usize, 0, 1, 2] {
        let mut v = blob.params.values.clone();
        let o = v[r.start + j] as f64;
        for h in [1e-2, 1e-3, 1e-4] {
            v[r.start + j] = (o + h) as f32;
            let up = lossf(&mut inf, &v);
            v[r.start + j] = (o - h) as f32;
            let dn = lossf(&mut inf, &v);
            v[r.start + j] = o as f32;
            println!(
                "j {j} h {h:e}: numeric {:e} analytic {:e}",
                (up - dn) / (2.0 * h),
                grads[i][j]
            );
        }
    }
}
