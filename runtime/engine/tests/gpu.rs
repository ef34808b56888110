//! The wgpu executor against tract, on a real adapter (in CI Mesa's
//! software Vulkan driver, lavapipe, which ci/setup.sh installs; nothing is
//! mocked).
//!
//! **Tolerance:** from the same initial weights on the same seeded
//! batches, for 20 steps, every step's loss agrees within a relative
//! 1e-3, and afterwards every parameter tensor agrees within 1e-3 of
//! that tensor's largest magnitude (max |gpu - cpu| <= 1e-3 * max |cpu|).
//!
//! A machine without any adapter fails these tests with a message
//! pointing at ci/setup.sh; there is no opt-out.

use fedge_engine::data::{self, Dataset, Features};
use fedge_engine::train::TrainError;
use fedge_engine::train::compile::{CompileOptions, OptimizerSpec};
use fedge_engine::train::exec::{Batch, Executor, Labels, TractExecutor};
use fedge_engine::train::gpu::{
    self, ExecutorKind, GpuError, GpuExecutor, Resolved, resolve, select_executor,
};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_engine::train::onnx::{self, F32};
use fedge_engine::zoo;
use fedge_proto::ModelBlob;
use fedge_proto::msg::{Loss, Optimizer};
use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};

const STEPS: usize = 20;
const REL_TOL: f32 = 1e-3;

/// The adapter, or a failure that says how to get one.
fn require_adapter() -> gpu::AdapterSummary {
    match gpu::adapter() {
        Ok(a) => a,
        Err(e) => panic!(
            "the GPU executor tests need a wgpu adapter and found none: {e}\n\
             run ci/setup.sh (it installs Mesa's software Vulkan driver, lavapipe: \
             mesa-vulkan-drivers libvulkan1); `vulkaninfo --summary` should list llvmpipe"
        ),
    }
}

fn mnist(n: usize) -> Dataset {
    data::load_mnist(&data::shipped_data_dir())
        .unwrap()
        .slice(0..n)
}

fn shakespeare(n: usize) -> Dataset {
    let path = data::shipped_data_dir().join("tinyshakespeare/input.txt");
    let text = data::load_text(&path).unwrap();
    let vocab = data::Vocab::of(&text);
    let head: String = text.chars().take(n * 7 + zoo::CHAR_CONTEXT + 1).collect();
    data::char_windows(&head, &vocab, zoo::CHAR_CONTEXT, 7)
        .unwrap()
        .slice(0..n)
}

fn blob(proto: &ModelProto) -> ModelBlob {
    import_onnx(&proto.encode_to_vec()).unwrap()
}

fn optimizer(kind: Optimizer, momentum: f32, weight_decay: f32) -> OptimizerSpec {
    OptimizerSpec {
        kind,
        momentum,
        weight_decay,
        ..OptimizerSpec::default()
    }
}

/// Largest |a - b| over the largest |b|, per tensor, and the worst tensor.
fn worst_param_gap(blob: &ModelBlob, gpu: &[f32], cpu: &[f32]) -> (f32, String) {
    let layout = &blob.params.layout;
    let mut worst = (0.0f32, String::new());
    for (i, t) in layout.tensors().iter().enumerate() {
        let r = layout.range(i);
        let scale = cpu[r.clone()]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = gpu[r.clone()]
            .iter()
            .zip(&cpu[r])
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if diff / scale > worst.0 || worst.1.is_empty() {
            worst = (diff / scale, t.name.clone());
        }
    }
    worst
}

/// 20 steps on both executors; losses and parameters must agree.
fn agree(proto: ModelProto, data: &Dataset, batch: usize, spec: OptimizerSpec, lr: f32) {
    agree_blob(&blob(&proto), data, batch, spec, lr);
}

/// [`agree`] on an imported (or rewritten) model.
fn agree_blob(blob: &ModelBlob, data: &Dataset, batch: usize, spec: OptimizerSpec, lr: f32) {
    require_adapter();
    let blob = blob.clone();
    let graph = ModelGraph::from_blob(&blob).unwrap();
    let opts = CompileOptions {
        batch,
        loss: Loss::SoftmaxCrossEntropy,
        optimizer: spec,
        ..CompileOptions::default()
    };
    let mut cpu = TractExecutor::new(&graph, opts.clone()).unwrap();
    let mut gpu = GpuExecutor::new(&graph, opts).unwrap();
    cpu.load(&blob.params.values).unwrap();
    gpu.load(&blob.params.values).unwrap();
    assert_eq!(
        gpu.params().unwrap(),
        blob.params.values,
        "load/params round trip"
    );
    let batches = data.epoch_batches(batch, 7);
    assert!(batches.len() >= STEPS, "need {STEPS} batches");
    let (mut xf, mut xi, mut y) = (Vec::new(), Vec::new(), Vec::new());
    for (step, idx) in batches.iter().take(STEPS).enumerate() {
        data.gather(idx, &mut xf, &mut xi, &mut y);
        let x = match data.features {
            Features::F32(_) => Batch::F32(&xf),
            Features::I64(_) => Batch::I64(&xi),
        };
        let lc = cpu.step(x, Labels::Classes(&y), lr).unwrap();
        let lg = gpu.step(x, Labels::Classes(&y), lr).unwrap();
        assert!(lc.is_finite(), "step {step}: tract loss {lc}");
        assert!(
            (lg - lc).abs() <= REL_TOL * lc.abs(),
            "step {step}: wgpu loss {lg} vs tract {lc} (relative {:.2e}, tolerance {REL_TOL:.0e})",
            (lg - lc).abs() / lc.abs()
        );
    }
    let (pc, pg) = (cpu.params().unwrap(), gpu.params().unwrap());
    let moved = pc
        .iter()
        .zip(&blob.params.values)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 0.0, "training did not change the parameters");
    let (gap, tensor) = worst_param_gap(&blob, &pg, &pc);
    eprintln!(
        "{} on {}: worst parameter gap {gap:.2e} ({tensor})",
        gpu.name(),
        graph.output
    );
    assert!(
        gap <= REL_TOL,
        "parameters of `{tensor}` differ by {gap:.2e} of its magnitude after {STEPS} steps (tolerance {REL_TOL:.0e})"
    );
}

#[test]
fn mlp_sgd_momentum_agrees_with_tract() {
    let data = mnist(16 * STEPS);
    agree(
        zoo::mlp(1),
        &data,
        16,
        optimizer(Optimizer::Sgd, 0.9, 0.0),
        0.05,
    );
}

#[test]
fn mlp_adamw_agrees_with_tract() {
    let data = mnist(16 * STEPS);
    agree(
        zoo::mlp(1),
        &data,
        16,
        optimizer(Optimizer::AdamW, 0.0, 0.01),
        1e-3,
    );
}

/// Batch 4: the McMahan CNN is the slowest model on lavapipe (about two
/// seconds per step at batch 8 on 2 cores).
#[test]
fn cnn_sgd_weight_decay_agrees_with_tract() {
    let data = mnist(4 * STEPS);
    agree(
        zoo::cnn(2),
        &data,
        4,
        optimizer(Optimizer::Sgd, 0.0, 1e-4),
        0.05,
    );
}

#[test]
fn small_cnn_adam_agrees_with_tract() {
    let data = mnist(16 * STEPS);
    agree(
        zoo::small_cnn(3),
        &data,
        16,
        optimizer(Optimizer::Adam, 0.0, 0.0),
        3e-3,
    );
}

#[test]
fn char_model_sgd_momentum_agrees_with_tract() {
    let data = shakespeare(16 * STEPS);
    agree(
        zoo::char_model(4, 65),
        &data,
        16,
        optimizer(Optimizer::Sgd, 0.9, 0.0),
        0.1,
    );
}

/// The zoo's causal transformer, narrowed (the committed one's shape
/// otherwise), with its next-character loss at every position.
#[test]
fn char_transformer_adam_agrees_with_tract() {
    let data = shakespeare(8 * STEPS);
    let c = zoo::TransformerConfig {
        d_model: 16,
        heads: 2,
        layers: 2,
        d_mlp: 32,
        ..zoo::TransformerConfig::zoo(65)
    };
    agree(
        zoo::char_transformer(5, &c),
        &data,
        8,
        optimizer(Optimizer::Adam, 0.0, 0.0),
        0.003,
    );
}

/// LoRA adapters on the character model's FC weights (`train::lora`):
/// the frozen backbone as graph constants, the adapters the parameters.
#[test]
fn lora_char_model_agrees_with_tract() {
    let data = shakespeare(16 * STEPS);
    let spec = fedge_proto::msg::LoraSpec {
        rank: 8,
        alpha: 16.0,
        targets: vec!["fc*".into()],
    };
    let adapted =
        fedge_engine::train::lora::apply(&blob(&zoo::char_model(4, 65)), &spec, 1).unwrap();
    agree_blob(
        &adapted,
        &data,
        16,
        optimizer(Optimizer::Adam, 0.0, 0.0),
        0.01,
    );
}

/// y = w under MSE, `frozen` kept frozen, FedProx on: the optimizer tail
/// (AdamW's decoupled decay, the proximal term, float targets) on both.
#[test]
fn optimizer_tail_with_fedprox_and_frozen_parameters_agrees() {
    require_adapter();
    let n = 4;
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: vec![
                onnx::node("Mul", "scale", &["w", "frozen"], &["y"], vec![]),
                onnx::node("Identity", "id", &["x"], &["unused"], vec![]),
            ],
            initializer: vec![
                onnx::tensor_f32("w", &[n], &[0.3, 0.1, -0.7, 2.0]),
                onnx::tensor_f32("frozen", &[1], &[1.5]),
            ],
            input: vec![onnx::value_info("x", F32, &[1, 1])],
            output: vec![onnx::value_info("y", F32, &[n])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let blob = blob(&m);
    let graph = ModelGraph::from_blob(&blob).unwrap();
    for kind in [Optimizer::Sgd, Optimizer::Adam, Optimizer::AdamW] {
        let opts = CompileOptions {
            batch: 1,
            loss: Loss::Mse,
            optimizer: optimizer(kind, 0.5, 0.1),
            freeze: vec!["froz*".into()],
            fedprox_mu: 0.2,
            ..CompileOptions::default()
        };
        let mut cpu = TractExecutor::new(&graph, opts.clone()).unwrap();
        let mut gpu = GpuExecutor::new(&graph, opts).unwrap();
        cpu.load(&blob.params.values).unwrap();
        gpu.load(&blob.params.values).unwrap();
        let target = [1.0f32, -2.0, 0.5, 3.0];
        for step in 0..STEPS {
            let lc = cpu
                .step(Batch::F32(&[0.0]), Labels::Targets(&target), 0.05)
                .unwrap();
            let lg = gpu
                .step(Batch::F32(&[0.0]), Labels::Targets(&target), 0.05)
                .unwrap();
            assert!(
                (lg - lc).abs() <= REL_TOL * lc.abs(),
                "{kind:?} step {step}: loss {lg} vs {lc}"
            );
        }
        let (pc, pg) = (cpu.params().unwrap(), gpu.params().unwrap());
        assert_eq!(pg[n], 1.5, "the frozen parameter moved");
        let (gap, tensor) = worst_param_gap(&blob, &pg, &pc);
        assert!(gap <= REL_TOL, "{kind:?}: `{tensor}` differs by {gap:.2e}");
    }
}

/// Sin(input) -> Flatten -> Gemm: Sin is a frozen prefix (no gradient
/// rule needed) that the GPU executor has no kernel for.
fn model_with_sin() -> ModelBlob {
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: vec![
                onnx::node("Sin", "the_sine", &["x"], &["s"], vec![]),
                onnx::node(
                    "Flatten",
                    "flat",
                    &["s"],
                    &["f"],
                    vec![onnx::int("axis", 1)],
                ),
                onnx::node(
                    "Gemm",
                    "fc",
                    &["f", "w", "b"],
                    &["y"],
                    vec![onnx::int("transB", 1)],
                ),
            ],
            initializer: vec![
                onnx::tensor_f32("w", &[3, 4], &[0.1; 12]),
                onnx::tensor_f32("b", &[3], &[0.0; 3]),
            ],
            input: vec![onnx::value_info("x", F32, &[1, 4])],
            output: vec![onnx::value_info("y", F32, &[1, 3])],
            ..Default::default()
        }),
        ..Default::default()
    };
    blob(&m)
}

#[test]
fn an_op_without_a_kernel_is_a_typed_error_naming_it() {
    let graph = ModelGraph::from_blob(&model_with_sin()).unwrap();
    let opts = CompileOptions {
        batch: 2,
        ..CompileOptions::default()
    };
    match GpuExecutor::new(&graph, opts.clone()) {
        Err(TrainError::Gpu(GpuError::UnsupportedOp { op, node })) => {
            assert_eq!((op.as_str(), node.as_str()), ("Sin", "the_sine"));
        }
        Err(e) => panic!("expected UnsupportedOp, got {e}"),
        Ok(_) => panic!("Sin has no GPU kernel, yet the executor was built"),
    }
    // Asked for explicitly: the same error. Automatic: tract runs it.
    let err = select_executor(ExecutorKind::Gpu, &graph, opts.clone())
        .err()
        .expect("gpu was demanded");
    assert!(err.to_string().contains("`Sin`"), "{err}");
    let auto = resolve(ExecutorKind::Auto, || {
        gpu::gpu_executor(&graph, opts.clone())
    });
    assert!(
        matches!(
            auto,
            Ok(Resolved::Cpu {
                fallback: Some(TrainError::Gpu(GpuError::UnsupportedOp { .. }))
            })
        ),
        "auto with an op without a kernel must fall back to tract"
    );
    let ex = select_executor(ExecutorKind::Auto, &graph, opts).unwrap();
    assert_eq!(ex.name(), "tract-cpu");
}

#[test]
fn without_an_adapter_auto_falls_back_and_gpu_is_an_error() {
    let no_adapter = || -> Result<(), TrainError> {
        Err(GpuError::NoAdapter {
            reason: "no Vulkan, Metal or DX12 device".into(),
        }
        .into())
    };
    match resolve(ExecutorKind::Auto, no_adapter).unwrap() {
        Resolved::Cpu {
            fallback: Some(TrainError::Gpu(GpuError::NoAdapter { .. })),
        } => {}
        other => panic!("auto without an adapter: {other:?}"),
    }
    match resolve(ExecutorKind::Gpu, no_adapter) {
        Err(e @ TrainError::Gpu(GpuError::NoAdapter { .. })) => {
            assert!(e.to_string().contains("ci/setup.sh"), "{e}");
        }
        other => panic!("gpu without an adapter: {other:?}"),
    }
    // The CPU never looks for a GPU.
    let cpu = resolve(ExecutorKind::Cpu, || -> Result<(), TrainError> {
        panic!("looked for a GPU")
    });
    assert!(matches!(cpu, Ok(Resolved::Cpu { fallback: None })));
    // A model error is not a reason to fall back: tract would fail too.
    let bad = resolve(ExecutorKind::Auto, || -> Result<(), TrainError> {
        Err(TrainError::BadModel("broken".into()))
    });
    assert!(matches!(bad, Err(TrainError::BadModel(_))));
    assert_eq!("auto".parse::<ExecutorKind>(), Ok(ExecutorKind::Auto));
    assert!("tpu".parse::<ExecutorKind>().is_err());
}

#[test]
fn selection_uses_the_adapter_and_bad_batches_are_rejected() {
    let adapter = require_adapter();
    let blob = blob(&zoo::mlp(1));
    let graph = ModelGraph::from_blob(&blob).unwrap();
    let opts = CompileOptions {
        batch: 2,
        ..CompileOptions::default()
    };
    // `auto` takes a hardware GPU, but not a software renderer over tract.
    let auto = select_executor(ExecutorKind::Auto, &graph, opts.clone()).unwrap();
    if adapter.software {
        assert_eq!(auto.name(), "tract-cpu");
    } else {
        assert!(auto.name().contains(&adapter.name), "{}", auto.name());
    }
    let mut ex = select_executor(ExecutorKind::Gpu, &graph, opts.clone()).unwrap();
    assert!(ex.name().contains(&adapter.name), "{}", ex.name());
    let err = ex
        .step(Batch::F32(&[0.0; 10]), Labels::Classes(&[0, 1]), 0.1)
        .unwrap_err();
    assert!(matches!(err, TrainError::BadInput(_)), "{err}");
    let cpu = select_executor(ExecutorKind::Cpu, &graph, opts).unwrap();
    assert_eq!(cpu.name(), "tract-cpu");
}

#[test]
fn embedding_indices_outside_the_vocabulary_are_rejected() {
    require_adapter();
    let graph = ModelGraph::from_blob(&blob(&zoo::char_model(4, 65))).unwrap();
    let opts = CompileOptions {
        batch: 1,
        ..CompileOptions::default()
    };
    let mut ex = GpuExecutor::new(&graph, opts).unwrap();
    let mut x = vec![0i64; zoo::CHAR_CONTEXT];
    x[3] = 65;
    let err = ex
        .step(Batch::I64(&x), Labels::Classes(&[1]), 0.1)
        .unwrap_err();
    assert!(matches!(err, TrainError::BadInput(_)), "{err}");
}

/// Five SGD steps (momentum 0.9) of a PyTorch-exported fixture
/// (`tests/fixtures/torch/`, see `torch_fixtures.rs`) on both executors,
/// on a seeded random batch: image batches for the CNNs, token ids below
/// `vocab` for the transformers. Losses and parameters must agree.
fn fixture_agrees(name: &str, vocab: Option<usize>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(format!("{name}.onnx"));
    let blob = import_onnx(&std::fs::read(&path).unwrap()).unwrap();
    agree_on_random_batches(name, &blob, vocab);
}

/// [`fixture_agrees`] for any model with 10 classes.
fn agree_on_random_batches(name: &str, blob: &ModelBlob, vocab: Option<usize>) {
    use rand::{Rng, SeedableRng};
    require_adapter();
    let graph = ModelGraph::from_blob(blob).unwrap();
    let batch = 4;
    let opts = CompileOptions {
        batch,
        loss: Loss::SoftmaxCrossEntropy,
        optimizer: optimizer(Optimizer::Sgd, 0.9, 0.0),
        ..CompileOptions::default()
    };
    let mut cpu = TractExecutor::new(&graph, opts.clone()).unwrap();
    let mut gpu = GpuExecutor::new(&graph, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let blob = blob.clone();
    cpu.load(&blob.params.values).unwrap();
    gpu.load(&blob.params.values).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    let sample: usize = graph.sample_shape().iter().product();
    for step in 0..5 {
        let y: Vec<i64> = (0..batch).map(|_| rng.random_range(0..10)).collect();
        let (xf, xi): (Vec<f32>, Vec<i64>) = match vocab {
            None => (
                (0..batch * sample)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect(),
                vec![],
            ),
            Some(v) => (
                vec![],
                (0..batch * sample)
                    .map(|_| rng.random_range(0..v as i64))
                    .collect(),
            ),
        };
        let x = if vocab.is_some() {
            Batch::I64(&xi)
        } else {
            Batch::F32(&xf)
        };
        let lc = cpu.step(x, Labels::Classes(&y), 0.05).unwrap();
        let lg = gpu.step(x, Labels::Classes(&y), 0.05).unwrap();
        assert!(
            (lg - lc).abs() <= REL_TOL * lc.abs(),
            "{name} step {step}: wgpu loss {lg} vs tract {lc}"
        );
    }
    let (pc, pg) = (cpu.params().unwrap(), gpu.params().unwrap());
    let (gap, tensor) = worst_param_gap(&blob, &pg, &pc);
    eprintln!("{name}: worst parameter gap {gap:.2e} ({tensor})");
    assert!(
        gap <= REL_TOL,
        "{name}: parameters of `{tensor}` differ by {gap:.2e} of its magnitude"
    );
}

/// Depthwise and grouped convolutions, Clip (ReLU6), HardSwish and
/// HardSigmoid, BatchNorm, ReduceMean over H and W; ResNet's overlapping
/// 3x3 stride-2 max pool.
#[test]
fn cnn_fixtures_agree_with_tract() {
    for name in [
        "mobilenet_legacy",
        "mobilenet_dynamo",
        "resnet_legacy",
        "resnet_dynamo",
    ] {
        fixture_agrees(name, None);
    }
}

/// Embeddings, 4-D MatMul, Split, Softmax with -inf masks (bool and
/// additive), LayerNorm, Erf and Gelu, Pow, Gather on the last position.
#[test]
fn transformer_fixtures_agree_with_tract() {
    for name in [
        "transformer_hand_legacy",
        "transformer_hand_dynamo",
        "transformer_layer_legacy",
        "transformer_layer_dynamo",
    ] {
        fixture_agrees(name, Some(16));
    }
}

/// LSTM and GRU, unrolled at load (ConstantOfShape and Expand for the
/// initial state, Split into gates).
#[test]
fn recurrent_fixtures_agree_with_tract() {
    for name in [
        "lstm_legacy",
        "lstm_dynamo",
        "gru_legacy",
        "gru_dynamo",
        "bilstm_legacy",
        "bilstm_dynamo",
    ] {
        fixture_agrees(name, Some(16));
    }
}

/// The new element-wise and copy kernels beside the fixtures': Trilu with
/// k, Erf, Pow, PRelu, Split by `num_outputs`, Slice with a step, Gelu's
/// tanh form, Clip with one bound, Where on a constant bool mask (opset
/// 20).
#[test]
fn new_op_kernels_agree_with_tract() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let mut w = |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
        onnx::tensor_f32(name, shape, &v)
    };
    let inits = vec![
        w("w1", &[16, 12]),
        w("w2", &[10, 16]),
        w("slope", &[16]),
        w("b2", &[10]),
        onnx::tensor_i64("cube", &[3], &[4, 4, 4]),
        onnx::tensor_i64("flat", &[2], &[4, 16]),
        onnx::tensor_i64("k", &[], &[-1]),
        onnx::tensor_i64("one", &[1], &[1]),
        onnx::tensor_i64("end", &[1], &[i64::MAX]),
        onnx::tensor_i64("two_i", &[1], &[2]),
        onnx::tensor_f32("two", &[], &[2.0]),
        onnx::tensor_f32("lo", &[], &[-0.3]),
        onnx::tensor_f32("zero", &[], &[0.0]),
        onnx::tensor_bool(
            "keep",
            &[1, 8],
            &[true, false, true, true, false, true, true, true],
        ),
    ];
    let node = |op: &str, ins: &[&str], outs: &[&str], attrs| {
        onnx::node(op, &format!("/{}", outs[0]), ins, outs, attrs)
    };
    let nodes = vec![
        node("Gemm", &["x", "w1"], &["h"], vec![onnx::int("transB", 1)]),
        node("Erf", &["h"], &["e"], vec![]),
        node("Reshape", &["e", "cube"], &["e3"], vec![]),
        node("Trilu", &["e3", "k"], &["tri"], vec![onnx::int("upper", 0)]),
        node("Reshape", &["tri", "flat"], &["t2"], vec![]),
        node("Pow", &["t2", "two"], &["sq"], vec![]),
        node("Add", &["sq", "h"], &["s0"], vec![]),
        node("PRelu", &["s0", "slope"], &["s"], vec![]),
        node(
            "Split",
            &["s"],
            &["a", "b"],
            vec![onnx::int("axis", 1), onnx::int("num_outputs", 2)],
        ),
        node(
            "Slice",
            &["s", "one", "end", "one", "two_i"],
            &["odd"],
            vec![],
        ),
        node("Add", &["a", "odd"], &["a2"], vec![]),
        node(
            "Gelu",
            &["a2"],
            &["ga"],
            vec![onnx::string("approximate", "tanh")],
        ),
        node("Clip", &["b", "lo"], &["cb"], vec![]),
        node("Where", &["keep", "cb", "zero"], &["mb"], vec![]),
        node("Concat", &["ga", "mb"], &["c"], vec![onnx::int("axis", 1)]),
        node(
            "Gemm",
            &["c", "w2", "b2"],
            &["logits"],
            vec![onnx::int("transB", 1)],
        ),
    ];
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 20,
        }],
        graph: Some(GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![onnx::value_info("x", F32, &[4, 12])],
            output: vec![onnx::value_info("logits", F32, &[4, 10])],
            ..Default::default()
        }),
        ..Default::default()
    };
    agree_on_random_batches("new ops", &blob(&proto), None);
}

/// A dilated convolution and pooling over overlapping, padded windows
/// (their gradients go through one-hot Conv and ConvTranspose).
#[test]
fn dilated_conv_and_padded_pools_agree_with_tract() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let mut w = |name: &str, shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        onnx::tensor_f32(name, shape, &v)
    };
    let inits = vec![
        w("conv.w", &[4, 2, 3, 3], 0.4),
        w("conv.b", &[4], 0.1),
        w("fc.w", &[10, 100], 0.1),
        w("fc.b", &[10], 0.1),
        onnx::tensor_i64("flat", &[2], &[4, 100]),
    ];
    let window = |k: i64, s: i64, p: i64| {
        vec![
            onnx::ints("kernel_shape", &[k, k]),
            onnx::ints("strides", &[s, s]),
            onnx::ints("pads", &[p, p, p, p]),
        ]
    };
    let mut conv = window(3, 1, 2);
    conv.push(onnx::ints("dilations", &[2, 2]));
    let mut avg = window(3, 1, 1);
    avg.push(onnx::int("count_include_pad", 0));
    let node = |op: &str, ins: &[&str], out: &str, attrs| {
        onnx::node(op, &format!("/{out}"), ins, &[out], attrs)
    };
    let nodes = vec![
        node("Conv", &["x", "conv.w", "conv.b"], "c", conv),
        node("Relu", &["c"], "r", vec![]),
        node("MaxPool", &["r"], "m", window(3, 2, 1)),
        node("AveragePool", &["m"], "a", avg),
        node("Reshape", &["a", "flat"], "f", vec![]),
        node(
            "Gemm",
            &["f", "fc.w", "fc.b"],
            "logits",
            vec![onnx::int("transB", 1)],
        ),
    ];
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![onnx::value_info("x", F32, &[4, 2, 9, 9])],
            output: vec![onnx::value_info("logits", F32, &[4, 10])],
            ..Default::default()
        }),
        ..Default::default()
    };
    agree_on_random_batches("dilated conv and padded pools", &blob(&proto), None);
}
