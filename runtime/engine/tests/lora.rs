//! LoRA (`train::lora`) end to end on the zoo's character model: a round
//! of local training on the adapted model lowers its loss and changes
//! only the adapters (the backbone is bit-identical), and its update
//! carries only adapter bytes; the un-merged and the merged exports are
//! plain ONNX that tract loads and that give the adapted model's outputs.
//! The adapted layer's gradients are checked against finite differences
//! in `grad_check.rs` (`lora_adapted_layer`).

use fedge_engine::data::{self, Dataset, Features};
use fedge_engine::train::exec::{Batch, TractInference};
use fedge_engine::train::import::{ModelGraph, export_onnx, import_onnx};
use fedge_engine::train::local;
use fedge_engine::train::lora::{self, LoraError};
use fedge_engine::train::onnx::{self, F32};
use fedge_engine::trainer::OnnxTrainer;
use fedge_proto::msg::{LoraSpec, Optimizer, TrainingPlan};
use fedge_proto::{ModelBlob, Params};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};

fn char_model() -> ModelBlob {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/char_model.onnx");
    import_onnx(&std::fs::read(path).unwrap()).unwrap()
}

/// `n` next-character windows from the start of the shipped text.
fn shakespeare(n: usize) -> Dataset {
    let text =
        data::load_text(&data::shipped_data_dir().join("tinyshakespeare/input.txt")).unwrap();
    let vocab = data::Vocab::of(&text);
    let head: String = text.chars().take(n * 7 + 64).collect();
    data::char_windows(&head, &vocab, fedge_engine::zoo::CHAR_CONTEXT, 7)
        .unwrap()
        .slice(0..n)
}

fn spec() -> LoraSpec {
    LoraSpec {
        rank: 8,
        alpha: 16.0,
        targets: vec!["fc*".into()],
    }
}

fn outputs(blob: &ModelBlob, d: &Dataset) -> Vec<f32> {
    let g = ModelGraph::from_blob(blob).unwrap();
    let mut inf = TractInference::new(&g, d.len()).unwrap();
    inf.load(&blob.params.values).unwrap();
    match &d.features {
        Features::I64(x) => inf.run(Batch::I64(x)).unwrap(),
        Features::F32(x) => inf.run(Batch::F32(x)).unwrap(),
    }
}

fn loss(blob: &ModelBlob, d: &Dataset) -> f64 {
    let g = ModelGraph::from_blob(blob).unwrap();
    let mut inf = TractInference::new(&g, 64).unwrap();
    inf.load(&blob.params.values).unwrap();
    local::evaluate(&inf, d).unwrap().loss
}

fn with_values(blob: &ModelBlob, values: Vec<f32>) -> ModelBlob {
    ModelBlob {
        onnx_graph: blob.onnx_graph.clone(),
        params: Params::new(blob.params.layout.clone(), values).unwrap(),
    }
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + x.abs().max(y.abs())))
        .fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: worst difference {worst:e}");
}

#[test]
fn a_lora_round_lowers_the_loss_and_moves_only_the_adapters() {
    let base = char_model();
    let adapted = lora::apply(&base, &spec(), 1).unwrap();
    let names: Vec<&str> = adapted
        .params
        .layout
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "fc1.weight.lora_A",
            "fc1.weight.lora_B",
            "fc2.weight.lora_A",
            "fc2.weight.lora_B"
        ]
    );
    let d = shakespeare(1024);
    // Adapters start with B = 0: the adapted model is the model.
    assert_close(
        &outputs(&adapted, &d.slice(0..16)),
        &outputs(&base, &d.slice(0..16)),
        1e-6,
        "fresh adapters",
    );
    let plan = TrainingPlan {
        local_epochs: 1,
        batch_size: 32,
        learning_rate: 0.01,
        optimizer: Optimizer::Adam,
        lora: Some(spec()),
        ..TrainingPlan::default()
    };
    let mut trainer = OnnxTrainer::new(d.clone(), 3);
    let update = trainer.train_round(1, &adapted, &plan).unwrap();
    // Trainers sharing one compiled step (a simulation's devices) train
    // exactly as one that compiles its own; the second compiles nothing.
    let steps = fedge_engine::trainer::SharedSteps::default();
    for _ in 0..2 {
        let mut shared = OnnxTrainer::new(d.clone(), 3).with_shared_steps(steps.clone());
        assert_eq!(shared.train_round(1, &adapted, &plan).unwrap(), update);
    }

    // The update is the adapters' and nothing else.
    let dimension = adapted.params.layout.dimension();
    assert_eq!(update.delta.len(), dimension);
    assert_eq!(dimension, 512 * 8 + 8 * 256 + 256 * 8 + 8 * 65);
    let fraction = (4 * dimension) as f64 / (4 * base.params.layout.dimension()) as f64;
    let of_blob = (4 * dimension) as f64 / adapted.encode().len() as f64;
    eprintln!(
        "LoRA rank 8 on fc1, fc2: {dimension} of {} parameters; a dense f32 update is {:.2}% of the model's parameter bytes, {:.2}% of the adapted model blob",
        base.params.layout.dimension(),
        100.0 * fraction,
        100.0 * of_blob
    );
    assert!(fraction < 0.06, "{fraction}");
    assert!(update.delta.iter().any(|&v| v != 0.0));

    let trained = with_values(
        &adapted,
        adapted
            .params
            .values
            .iter()
            .zip(&update.delta)
            .map(|(p, d)| p + d)
            .collect(),
    );
    let (before, after) = (loss(&adapted, &d), loss(&trained, &d));
    eprintln!("training loss {before:.4} -> {after:.4}");
    assert!(after < before - 0.05, "{before} -> {after}");

    // The backbone did not move: the graph (which holds it) is the one
    // the device was given, and merging changes the targets only.
    assert_eq!(trained.onnx_graph, adapted.onnx_graph);
    let merged = import_onnx(&lora::merge(&trained).unwrap()).unwrap();
    assert_eq!(merged.params.layout, base.params.layout);
    for (i, t) in base.params.layout.tensors().iter().enumerate() {
        let (was, now) = (
            &base.params.values[base.params.layout.range(i)],
            &merged.params.values[merged.params.layout.range(i)],
        );
        if t.name.ends_with(".weight") && t.name.starts_with("fc") {
            assert_ne!(was, now, "`{}` is adapted", t.name);
        } else {
            assert_eq!(was, now, "`{}` is frozen: bit-identical", t.name);
        }
    }
    assert!((loss(&merged, &d) - after).abs() < 1e-4);

    // A plan naming other adapters is refused before training.
    let other = TrainingPlan {
        lora: Some(LoraSpec { rank: 4, ..spec() }),
        ..plan
    };
    let e = trainer.train_round(2, &adapted, &other).unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<LoraError>(),
            Some(LoraError::Mismatch { .. })
        ),
        "{e}"
    );
}

/// Adapters with random values (as after training), on the character
/// model (Gemm with transB) and on a MatMul model.
fn random_adapters(blob: &ModelBlob, seed: u64) -> ModelBlob {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v = (0..blob.params.values.len())
        .map(|_| rng.random_range(-0.2..0.2))
        .collect();
    with_values(blob, v)
}

fn check_exports(base: &ModelBlob, adapted: &ModelBlob, d: &Dataset) {
    let want = outputs(adapted, d);
    // Without merging: adapters as initializers beside the frozen weights.
    let plain = import_onnx(&export_onnx(adapted).unwrap()).unwrap();
    assert_close(&outputs(&plain, d), &want, 1e-6, "un-merged export");
    // Merged: the original graph, adapted weights.
    let merged_bytes = lora::merge(adapted).unwrap();
    let merged = import_onnx(&merged_bytes).unwrap();
    assert_eq!(merged.params.layout, base.params.layout);
    let nodes = |b: &ModelBlob| {
        ModelProto::decode(&b.onnx_graph[..])
            .unwrap()
            .graph
            .unwrap()
            .node
    };
    assert_eq!(nodes(&merged), nodes(base), "no adapter nodes left");
    assert_close(&outputs(&merged, d), &want, 1e-4, "merged export");
    // The un-merged file merges to the same model.
    assert_eq!(lora::merge(&plain).unwrap(), merged_bytes);
}

#[test]
fn merged_and_unmerged_exports_give_the_adapted_outputs() {
    let base = char_model();
    let adapted = random_adapters(&lora::apply(&base, &spec(), 2).unwrap(), 5);
    check_exports(&base, &adapted, &shakespeare(16));

    // x [N, 6] -> MatMul w1 [6, 5] -> Relu -> MatMul w2 [5, 4].
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut t = |name: &str, shape: &[usize]| {
        let v: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        onnx::tensor_f32(name, shape, &v)
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: vec![
                onnx::node("MatMul", "l1", &["x", "w1"], &["h"], vec![]),
                onnx::node("Relu", "act", &["h"], &["r"], vec![]),
                onnx::node("MatMul", "l2", &["r", "w2"], &["y"], vec![]),
            ],
            initializer: vec![t("w1", &[6, 5]), t("w2", &[5, 4])],
            input: vec![onnx::value_info("x", F32, &[3, 6])],
            output: vec![onnx::value_info("y", F32, &[3, 4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let base = import_onnx(&model.encode_to_vec()).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 3.0,
        targets: vec!["w1".into(), "w2".into()],
    };
    let adapted = random_adapters(&lora::apply(&base, &spec, 4).unwrap(), 6);
    let x: Vec<f32> = (0..18).map(|i| (i as f32 * 0.37).sin()).collect();
    let d = Dataset {
        features: Features::F32(x),
        sample_shape: vec![6],
        labels: vec![0, 1, 2],
        classes: 4,
    };
    check_exports(&base, &adapted, &d);
}
