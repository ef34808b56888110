//! Fuzzing entry points for the ONNX side, shared by the cargo-fuzz
//! targets in `fuzz/` and the corpus replay test
//! (`tests/fuzz_corpus.rs`); see [`fedge_proto::fuzzing`] for the
//! conventions. Both targets take the bytes of an ONNX model as they are,
//! so their corpora are plain `.onnx` files.
//!
//! The training target stops at the compiled step graph (shape inference,
//! gradient rules, optimizer): it does not hand the graph to tract, whose
//! optimizer can take seconds on a large model, so one input stays well
//! under a millisecond-scale budget.

use fedge_proto::fuzzing::Target;
use fedge_proto::msg::Loss;
use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, ProtoError};
use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};

use crate::train::compile::{CompileOptions, Mode, compile_training};
use crate::train::import::{ModelGraph, export_onnx, import_onnx};
use crate::train::onnx::{self, F32, I64};

/// The engine's fuzz targets.
pub const TARGETS: &[Target] = &[
    Target {
        name: "onnx_import",
        run: onnx_import,
        seeds: onnx_seeds,
    },
    Target {
        name: "onnx_train",
        run: onnx_train,
        seeds: onnx_seeds,
    },
];

/// [`import_onnx`] (which decodes with `decode_model`). An imported model
/// is a blob the wire decoder accepts (or refuses only for a configured
/// limit), and exporting and importing it again gives the same blob.
pub fn onnx_import(data: &[u8]) {
    let Ok(blob) = import_onnx(data) else {
        return;
    };
    check_blob(&blob);
}

fn check_blob(blob: &ModelBlob) {
    assert_eq!(blob.params.values.len(), blob.params.layout.dimension());
    let bytes = blob.encode();
    match ModelBlob::decode(&bytes, &Limits::default()) {
        Ok(back) => assert_eq!(back.encode(), bytes),
        Err(ProtoError::LimitExceeded { .. }) => {}
        Err(e) => panic!("an imported model is refused on the wire: {e}"),
    }
    let exported = export_onnx(blob).expect("an imported graph exports");
    let again = import_onnx(&exported).expect("an exported model imports");
    assert_eq!(again.encode(), bytes, "export then import changed the blob");
}

/// Batch sizes and modes [`onnx_train`] compiles for.
const TRAIN_CASES: [(usize, Loss, Mode); 2] = [
    (2, Loss::SoftmaxCrossEntropy, Mode::Step),
    (1, Loss::Mse, Mode::Gradients),
];

/// Build what a trainer builds before running anything:
/// [`ModelGraph::from_blob`] (BatchNorm lowering, shape inference) and
/// [`compile_training`] for a step and for gradients, twice: for the
/// imported model, and for the bytes taken as the stripped graph of a
/// downloaded blob (no parameters), as a device does with the graph an
/// aggregator sends. Errors are fine; a compiled graph must encode and
/// name its parameters.
pub fn onnx_train(data: &[u8]) {
    if let Ok(blob) = import_onnx(data) {
        compile(&blob);
    }
    let layout = std::sync::Arc::new(ParamLayout::new(vec![]).expect("empty layout"));
    compile(&ModelBlob {
        onnx_graph: data.to_vec().into(),
        params: Params::zeros(layout),
    });
}

fn compile(blob: &ModelBlob) {
    let Ok(graph) = ModelGraph::from_blob(blob) else {
        return;
    };
    for (batch, loss, mode) in TRAIN_CASES {
        let opts = CompileOptions {
            batch,
            loss,
            mode,
            ..CompileOptions::default()
        };
        if let Ok(t) = compile_training(&graph, &opts) {
            assert_eq!(t.batch, batch);
            assert!(!t.trainable.is_empty());
            assert!(
                t.trainable
                    .iter()
                    .all(|&i| i < blob.params.layout.tensors().len())
            );
            let _ = t.model.encode_to_vec();
        }
    }
}

fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, input: (i32, &[usize])) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        producer_name: "fedge-fuzz-seed".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "seed".into(),
            node: nodes,
            initializer: inits,
            input: vec![onnx::value_info("input", input.0, input.1)],
            output: vec![onnx::value_info("logits", F32, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn weights(name: &str, shape: &[usize]) -> TensorProto {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7).sin() * 0.5).collect();
    onnx::tensor_f32(name, shape, &v)
}

/// Tiny models in the forms the zoo uses (Gemm, Conv, pooling,
/// BatchNorm, Reshape with a constant, Gather + LayerNorm): each imports
/// and compiles, and each is a few hundred bytes.
pub fn onnx_seeds() -> Vec<Vec<u8>> {
    let n = |op: &str, ins: &[&str], out: &str, attrs| onnx::node(op, out, ins, &[out], attrs);
    let gemm = |x: &str, w: &str, b: &str, out: &str| {
        n("Gemm", &[x, w, b], out, vec![onnx::int("transB", 1)])
    };
    let mlp = model(
        vec![
            n("Flatten", &["input"], "flat", vec![onnx::int("axis", 1)]),
            gemm("flat", "fc1.w", "fc1.b", "h"),
            n("Relu", &["h"], "r", vec![]),
            gemm("r", "fc2.w", "fc2.b", "logits"),
        ],
        vec![
            weights("fc1.w", &[3, 4]),
            weights("fc1.b", &[3]),
            weights("fc2.w", &[2, 3]),
            weights("fc2.b", &[2]),
        ],
        (F32, &[2, 1, 2, 2]),
    );
    let conv_attrs = || {
        vec![
            onnx::ints("kernel_shape", &[3, 3]),
            onnx::ints("pads", &[1, 1, 1, 1]),
            onnx::ints("strides", &[1, 1]),
        ]
    };
    let pool_attrs = || {
        vec![
            onnx::ints("kernel_shape", &[2, 2]),
            onnx::ints("strides", &[2, 2]),
        ]
    };
    let cnn = model(
        vec![
            n("Conv", &["input", "c.w", "c.b"], "c", conv_attrs()),
            n("Relu", &["c"], "r", vec![]),
            n("MaxPool", &["r"], "p", pool_attrs()),
            n("Flatten", &["p"], "f", vec![onnx::int("axis", 1)]),
            gemm("f", "fc.w", "fc.b", "logits"),
        ],
        vec![
            weights("c.w", &[2, 1, 3, 3]),
            weights("c.b", &[2]),
            weights("fc.w", &[3, 8]),
            weights("fc.b", &[3]),
        ],
        (F32, &[2, 1, 4, 4]),
    );
    let bn = model(
        vec![
            n("Conv", &["input", "c.w", "c.b"], "c", conv_attrs()),
            n(
                "BatchNormalization",
                &["c", "bn.s", "bn.b", "bn.m", "bn.v"],
                "bn",
                vec![onnx::float("epsilon", 1e-5)],
            ),
            n("Relu", &["bn"], "r", vec![]),
            n("AveragePool", &["r"], "p", pool_attrs()),
            n("Reshape", &["p", "shape"], "f", vec![]),
            gemm("f", "fc.w", "fc.b", "logits"),
        ],
        vec![
            weights("c.w", &[2, 1, 3, 3]),
            weights("c.b", &[2]),
            weights("bn.s", &[2]),
            weights("bn.b", &[2]),
            weights("bn.m", &[2]),
            onnx::tensor_f32("bn.v", &[2], &[1.0, 0.5]),
            onnx::tensor_i64("shape", &[2], &[-1, 8]),
            weights("fc.w", &[3, 8]),
            weights("fc.b", &[3]),
        ],
        (F32, &[2, 1, 4, 4]),
    );
    let chars = model(
        vec![
            n(
                "Gather",
                &["embed", "input"],
                "e",
                vec![onnx::int("axis", 0)],
            ),
            n("Flatten", &["e"], "f", vec![onnx::int("axis", 1)]),
            gemm("f", "fc.w", "fc.b", "h"),
            n(
                "LayerNormalization",
                &["h", "ln.g", "ln.b"],
                "ln",
                vec![onnx::int("axis", -1)],
            ),
            n("Tanh", &["ln"], "t", vec![]),
            n("Softmax", &["t"], "logits", vec![onnx::int("axis", -1)]),
        ],
        vec![
            weights("embed", &[5, 2]),
            weights("fc.w", &[5, 6]),
            weights("fc.b", &[5]),
            weights("ln.g", &[5]),
            weights("ln.b", &[5]),
        ],
        (I64, &[2, 3]),
    );
    vec![mlp, cnn, bn, chars]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_import_compile_and_pass_their_targets() {
        for s in onnx_seeds() {
            let blob = import_onnx(&s).unwrap();
            let graph = ModelGraph::from_blob(&blob).unwrap();
            compile_training(&graph, &CompileOptions::default()).unwrap();
        }
        for t in TARGETS {
            for s in (t.seeds)() {
                (t.run)(&s);
            }
            (t.run)(&[]);
        }
    }
}
