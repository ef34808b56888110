//! Models exported by PyTorch train in fedge as they do in PyTorch.
//!
//! `tests/fixtures/torch/` holds a MobileNet-style CNN (depthwise
//! convolutions, ReLU6, HardSwish, a HardSigmoid squeeze-excite), a
//! ResNet-style CNN (BatchNorm, residual blocks), a character transformer
//! written by hand and one of `nn.TransformerEncoderLayer`, a 2-layer LSTM,
//! a GRU and a bidirectional LSTM character model, each exported by PyTorch's legacy exporter
//! (opset 17, BatchNorm kept) and by its default dynamo exporter (opset 20,
//! BatchNorm folded into the convolutions), and
//! for each file what PyTorch computed on a fixed batch
//! (`make_fixtures.py` made them all; nothing is downloaded here).
//!
//! For each file, with both lowerings: the first step's gradient of every
//! parameter agrees with PyTorch's within 1e-3 of that tensor's largest
//! magnitude (max |fedge - torch| <= 1e-3 * max |torch|), and five plain
//! SGD steps give PyTorch's losses within a relative 1e-3, falling; and
//! the model, exported with a symbolic batch, also trains on a batch of 3.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedge_engine::train::compile::{CompileOptions, Lowering, Mode};
use fedge_engine::train::exec::{Batch, Executor, Labels, TractExecutor};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_proto::msg::Loss;

const REL_TOL: f32 = 1e-3;
const LR: f32 = 0.05;

/// What PyTorch computed (see `make_fixtures.py` for the format).
#[derive(Default)]
struct Reference {
    input: Vec<f32>,
    /// Token ids (the transformers' input) instead of `input`.
    tokens: Vec<i64>,
    input_shape: Vec<usize>,
    labels: Vec<i64>,
    grads: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    losses: Vec<f32>,
    /// Literals the dynamo exporter lifted to `[1]` initializers: fedge
    /// cannot tell them from parameters; frozen here, as in PyTorch.
    literals: Vec<String>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

fn read_reference(name: &str) -> Reference {
    let path = dir().join(format!("{name}.ref"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let mut r = Reference::default();
    while let Some(header) = lines.next() {
        let values = lines.next().expect("a values line after each header");
        let mut h = header.split(' ');
        let (kind, tensor) = (h.next().unwrap(), h.next().unwrap().to_string());
        let dims: Vec<usize> = h.map(|d| d.parse().unwrap()).collect();
        let floats = || -> Vec<f32> { values.split(' ').map(|v| v.parse().unwrap()).collect() };
        match kind {
            "input" => {
                r.input = floats();
                r.input_shape = dims;
            }
            "tokens" => {
                r.tokens = values.split(' ').map(|v| v.parse().unwrap()).collect();
                r.input_shape = dims;
            }
            "labels" => r.labels = values.split(' ').map(|v| v.parse().unwrap()).collect(),
            "grad" => {
                r.grads.insert(tensor, (dims, floats()));
            }
            "losses" => r.losses = floats(),
            "literal" => r.literals.push(tensor),
            other => panic!("{}: unknown record `{other}`", path.display()),
        }
    }
    assert_eq!(
        r.input.len().max(r.tokens.len()),
        r.input_shape.iter().product::<usize>()
    );
    r
}

fn check_fixture(name: &str) {
    let r = read_reference(name);
    let bytes = std::fs::read(dir().join(format!("{name}.onnx"))).unwrap();
    let blob = import_onnx(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let g = ModelGraph::from_blob(&blob).unwrap_or_else(|e| panic!("{name}: {e}"));
    let batch = r.labels.len();
    let layout = &blob.params.layout;
    let x = if r.tokens.is_empty() {
        Batch::F32(&r.input)
    } else {
        Batch::I64(&r.tokens)
    };
    let y = Labels::Classes(&r.labels);
    for lowering in [Lowering::Tract, Lowering::Portable] {
        let opts = CompileOptions {
            batch,
            loss: Loss::SoftmaxCrossEntropy,
            lowering,
            freeze: r.literals.clone(),
            ..CompileOptions::default()
        };

        // The first step's gradients, tensor by tensor.
        let mut ex = TractExecutor::new(
            &g,
            CompileOptions {
                mode: Mode::Gradients,
                ..opts.clone()
            },
        )
        .unwrap_or_else(|e| panic!("{name} ({lowering:?}): {e}"));
        ex.load(&blob.params.values).unwrap();
        let (loss, grads) = ex.gradients(x, y).unwrap();
        let rel = (loss - r.losses[0]).abs() / r.losses[0].abs();
        assert!(
            rel <= REL_TOL,
            "{name} ({lowering:?}): loss {loss}, PyTorch {}",
            r.losses[0]
        );
        let trainable: Vec<&str> = ex
            .training_graph()
            .trainable
            .iter()
            .map(|&i| layout.tensors()[i].name.as_str())
            .collect();
        let expected: Vec<&str> = r.grads.keys().map(|s| s.as_str()).collect();
        let mut sorted = trainable.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted, expected,
            "{name}: fedge trains other tensors than PyTorch's parameters"
        );
        let mut worst = 0.0f32;
        for (t, g) in trainable.iter().zip(&grads) {
            let (dims, want) = &r.grads[*t];
            let ti = layout.tensors().iter().position(|s| s.name == *t).unwrap();
            assert_eq!(&layout.tensors()[ti].shape, dims, "{name}: shape of `{t}`");
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = g
                .iter()
                .zip(want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= REL_TOL * scale,
                "{name} ({lowering:?}): gradient of `{t}` differs from PyTorch's by {diff:e} (largest magnitude {scale:e})"
            );
            worst = worst.max(diff / scale);
        }
        assert_eq!(grads.len(), r.grads.len());

        // Five plain SGD steps: PyTorch's losses, falling.
        let mut ex = TractExecutor::new(&g, opts).unwrap();
        ex.load(&blob.params.values).unwrap();
        let losses: Vec<f32> = (0..r.losses.len())
            .map(|_| ex.step(x, y, LR).unwrap())
            .collect();
        for (i, (got, want)) in losses.iter().zip(&r.losses).enumerate() {
            assert!(
                (got - want).abs() <= REL_TOL * want.abs(),
                "{name} ({lowering:?}): loss before step {i} is {got}, PyTorch's {want} (all: {losses:?} against {:?})",
                r.losses
            );
        }
        assert!(
            losses.last() < losses.first(),
            "{name} ({lowering:?}): loss did not fall: {losses:?}"
        );
        // Both exports have a symbolic batch: the first three samples make
        // a batch of three, whose loss is theirs alone.
        let three = CompileOptions {
            batch: 3,
            loss: Loss::SoftmaxCrossEntropy,
            lowering,
            freeze: r.literals.clone(),
            ..CompileOptions::default()
        };
        let mut ex3 = TractExecutor::new(&g, three).unwrap_or_else(|e| panic!("{name}: {e}"));
        ex3.load(&blob.params.values).unwrap();
        let sample = r.input_shape[1..].iter().product::<usize>();
        let x3 = match x {
            Batch::F32(v) => Batch::F32(&v[..3 * sample]),
            Batch::I64(v) => Batch::I64(&v[..3 * sample]),
        };
        let loss3 = ex3.step(x3, Labels::Classes(&r.labels[..3]), LR).unwrap();
        assert!(loss3.is_finite(), "{name}: batch of three: loss {loss3}");
        eprintln!(
            "{name} ({lowering:?}): {} gradients, worst difference {worst:.1e} of the tensor's scale; losses {losses:?}",
            grads.len()
        );
    }
}

#[test]
fn mobilenet_legacy_exporter() {
    check_fixture("mobilenet_legacy");
}

#[test]
fn mobilenet_dynamo_exporter() {
    check_fixture("mobilenet_dynamo");
}

#[test]
fn resnet_legacy_exporter() {
    check_fixture("resnet_legacy");
}

#[test]
fn resnet_dynamo_exporter() {
    check_fixture("resnet_dynamo");
}

#[test]
fn transformer_by_hand_legacy_exporter() {
    check_fixture("transformer_hand_legacy");
}

#[test]
fn transformer_by_hand_dynamo_exporter() {
    check_fixture("transformer_hand_dynamo");
}

#[test]
fn transformer_encoder_layer_legacy_exporter() {
    check_fixture("transformer_layer_legacy");
}

#[test]
fn transformer_encoder_layer_dynamo_exporter() {
    check_fixture("transformer_layer_dynamo");
}

#[test]
fn lstm_legacy_exporter() {
    check_fixture("lstm_legacy");
}

#[test]
fn lstm_dynamo_exporter() {
    check_fixture("lstm_dynamo");
}

#[test]
fn gru_legacy_exporter() {
    check_fixture("gru_legacy");
}

#[test]
fn gru_dynamo_exporter() {
    check_fixture("gru_dynamo");
}

#[test]
fn bidirectional_lstm_legacy_exporter() {
    check_fixture("bilstm_legacy");
}

#[test]
fn bidirectional_lstm_dynamo_exporter() {
    check_fixture("bilstm_dynamo");
}
