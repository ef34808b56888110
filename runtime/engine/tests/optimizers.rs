//! The in-graph optimizers against host reference implementations, on a
//! model whose gradient is known in closed form: y = w (Identity), MSE
//! loss against a target, so dL/dw = 2 (w - t) / n.

use fedge_engine::train::compile::{CompileOptions, Lowering, OptimizerSpec};
use fedge_engine::train::exec::{Batch, Executor, Labels, TractExecutor};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_engine::train::onnx::{self, F32};
use fedge_proto::ModelBlob;
use fedge_proto::msg::{Loss, Optimizer};
use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};

const N: usize = 4;
const TARGET: [f32; N] = [1.0, -2.0, 0.5, 3.0];
const W0: [f32; N] = [0.3, 0.1, -0.7, 2.0];
const FROZEN: [f32; 2] = [5.0, 6.0];

/// y = w; a second parameter, `frozen`, is kept frozen by pattern and must
/// come out unchanged.
fn model() -> ModelBlob {
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: vec![
                onnx::node("Identity", "id", &["w"], &["y"], vec![]),
                onnx::node("Identity", "id2", &["frozen"], &["unused"], vec![]),
            ],
            initializer: vec![
                onnx::tensor_f32("w", &[N], &W0),
                onnx::tensor_f32("frozen", &[2], &FROZEN),
            ],
            input: vec![onnx::value_info("x", F32, &[1, 1])],
            output: vec![onnx::value_info("y", F32, &[N])],
            ..Default::default()
        }),
        ..Default::default()
    };
    import_onnx(&m.encode_to_vec()).unwrap()
}

fn grad(w: &[f64]) -> Vec<f64> {
    w.iter()
        .zip(TARGET)
        .map(|(w, t)| 2.0 * (w - f64::from(t)) / N as f64)
        .collect()
}

/// The parameters after `steps` steps, with fedge's fused tract update
/// and with the portable one (which must agree).
fn run(spec: OptimizerSpec, mu: f32, steps: usize, lr: f32) -> Vec<f32> {
    let tract = run_lowered(Lowering::Tract, spec.clone(), mu, steps, lr);
    let portable = run_lowered(Lowering::Portable, spec, mu, steps, lr);
    for (a, b) in tract.iter().zip(&portable) {
        assert!(
            (a - b).abs() <= 1e-6,
            "tract {tract:?}, portable {portable:?}"
        );
    }
    tract
}

fn run_lowered(
    lowering: Lowering,
    spec: OptimizerSpec,
    mu: f32,
    steps: usize,
    lr: f32,
) -> Vec<f32> {
    let blob = model();
    let g = ModelGraph::from_blob(&blob).unwrap();
    let opts = CompileOptions {
        batch: 1,
        loss: Loss::Mse,
        optimizer: spec,
        freeze: vec!["froz*".into()],
        fedprox_mu: mu,
        lowering,
        ..CompileOptions::default()
    };
    let mut ex = TractExecutor::new(&g, opts).unwrap();
    ex.load(&blob.params.values).unwrap();
    for _ in 0..steps {
        ex.step(Batch::F32(&[0.0]), Labels::Targets(&TARGET), lr)
            .unwrap();
    }
    let p = ex.params().unwrap();
    assert_eq!(&p[N..], &FROZEN, "frozen parameters unchanged");
    p[..N].to_vec()
}

fn close(got: &[f32], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() < 1e-5,
            "got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn sgd_with_momentum_weight_decay_and_fedprox() {
    let (lr, m, wd, mu) = (0.1, 0.9, 0.01, 0.5);
    let w_global: Vec<f64> = W0.iter().map(|&v| f64::from(v)).collect();
    let mut w = w_global.clone();
    let mut v = [0.0; N];
    for _ in 0..5 {
        let g = grad(&w);
        for i in 0..N {
            let gi = g[i] + f64::from(mu) * (w[i] - w_global[i]) + wd * w[i];
            v[i] = m * v[i] + gi;
            w[i] -= f64::from(lr) * v[i];
        }
    }
    let spec = OptimizerSpec {
        kind: Optimizer::Sgd,
        momentum: m as f32,
        weight_decay: wd as f32,
        ..Default::default()
    };
    close(&run(spec, mu, 5, lr), &w);
}

#[test]
fn adam_and_adamw_match_the_reference() {
    for kind in [Optimizer::Adam, Optimizer::AdamW] {
        let (lr, b1, b2, eps, wd) = (0.05f64, 0.9f64, 0.999f64, 1e-8f64, 0.1f64);
        let mut w: Vec<f64> = W0.iter().map(|&v| f64::from(v)).collect();
        let (mut m, mut v) = ([0.0; N], [0.0; N]);
        for t in 1..=6 {
            let g = grad(&w);
            for i in 0..N {
                let gi = if kind == Optimizer::Adam {
                    g[i] + wd * w[i]
                } else {
                    g[i]
                };
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let lr_t = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
                let step = lr_t * m[i] / (v[i].sqrt() + eps);
                w[i] -= step
                    + if kind == Optimizer::AdamW {
                        lr * wd * w[i]
                    } else {
                        0.0
                    };
            }
        }
        let spec = OptimizerSpec {
            kind,
            weight_decay: wd as f32,
            ..Default::default()
        };
        close(&run(spec, 0.0, 6, lr as f32), &w);
    }
}
