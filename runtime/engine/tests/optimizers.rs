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

/// The zoo MLP (Gemm transB=1) and a transB=0 variant trained with SGD and
/// momentum: tract's step, whose dense weights take the fused gradient and
/// update (FedgeGemmSgd), agrees with the portable step (a gradient
/// tensor, then the update) over several steps.
#[test]
fn fused_dense_gradient_and_update_agree_with_the_portable_step() {
    use fedge_engine::train::kernels::GEMM_SGD;
    let mlp = fedge_engine::zoo::mlp(3);
    let mut flipped = mlp.clone();
    // transB=0: the weight stored transposed.
    let g = flipped.graph.as_mut().unwrap();
    for n in g.node.iter_mut().filter(|n| n.op_type == "Gemm") {
        n.attribute.retain(|a| a.name != "transB");
        let w = n.input[1].clone();
        let t = g.initializer.iter_mut().find(|t| t.name == w).unwrap();
        let (r, c) = (t.dims[0] as usize, t.dims[1] as usize);
        let v: Vec<f32> = t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(v.len(), r * c);
        *t = onnx::tensor_f32(
            &w,
            &[c, r],
            &(0..r * c)
                .map(|i| v[(i % r) * c + i / r])
                .collect::<Vec<_>>(),
        );
    }
    for model in [mlp, flipped] {
        let blob = import_onnx(&model.encode_to_vec()).unwrap();
        let graph = ModelGraph::from_blob(&blob).unwrap();
        let batch = 8;
        let x: Vec<f32> = (0..batch * 784)
            .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.3)
            .collect();
        let y: Vec<i64> = (0..batch as i64).map(|i| (i * 3) % 10).collect();
        let mut params = Vec::new();
        for lowering in [Lowering::Tract, Lowering::Portable] {
            let opts = CompileOptions {
                batch,
                loss: Loss::SoftmaxCrossEntropy,
                optimizer: OptimizerSpec {
                    momentum: 0.9,
                    ..OptimizerSpec::default()
                },
                lowering,
                ..CompileOptions::default()
            };
            let mut ex = TractExecutor::new(&graph, opts).unwrap();
            if lowering == Lowering::Tract {
                let fused = ex
                    .training_graph()
                    .model
                    .graph
                    .as_ref()
                    .unwrap()
                    .node
                    .iter()
                    .filter(|n| n.op_type == GEMM_SGD)
                    .count();
                assert_eq!(fused, 3, "every dense weight fused");
            }
            ex.load(&blob.params.values).unwrap();
            for _ in 0..4 {
                ex.step(Batch::F32(&x), Labels::Classes(&y), 0.05).unwrap();
            }
            params.push(ex.params().unwrap());
        }
        let moved = params[1]
            .iter()
            .zip(&blob.params.values)
            .filter(|(a, b)| a != b)
            .count();
        assert!(moved > params[1].len() / 2, "the steps train");
        for (i, (a, b)) in params[0].iter().zip(&params[1]).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "parameter {i}: fused {a}, portable {b}"
            );
        }
    }
}
