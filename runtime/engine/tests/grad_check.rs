//! Every gradient rule against central finite differences, on random shapes
//! and inputs (property tests), and a whole-model check for each zoo model.
//! The analytic gradient comes from the compiled training graph run by
//! tract; the numeric one from the inference graph, with the loss computed
//! on the host in f64. Pass: max relative error <= 1e-2.

use fedge_engine::data;
use fedge_engine::train::compile::{CompileOptions, IM2COL_BYTES_MAX, Lowering, Mode};
use fedge_engine::train::exec::{Batch, Executor, Labels, TractExecutor, TractInference};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_engine::train::onnx::{self, F32};
use fedge_proto::ModelBlob;
use fedge_proto::msg::Loss;
use proptest::prelude::*;
use prost::Message;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
};

const TOL: f64 = 1e-2;

/// The lowerings every check runs: tract's (whole batch, then convolutions
/// forced into chunks of one image) and the portable one.
const LOWERINGS: [(Lowering, usize); 3] = [
    (Lowering::Tract, IM2COL_BYTES_MAX),
    (Lowering::Tract, 1),
    (Lowering::Portable, IM2COL_BYTES_MAX),
];

/// One parameter of a test model: a shape and how to draw its values.
#[derive(Clone, Debug)]
enum Init {
    /// Uniform in [-1, 1].
    Any,
    /// Magnitude in [0.2, 1], random sign: away from ReLU kinks.
    AwayFromZero,
    /// Distinct values on a 0.05 grid: no near-ties for max pooling.
    Distinct,
    /// Uniform in [0.5, 1.5]: positive (variances, divisors).
    Positive,
}

struct OpCase {
    params: Vec<(String, Vec<usize>, Init)>,
    consts: Vec<TensorProto>,
    nodes: Vec<NodeProto>,
    output: String,
}

fn draw(rng: &mut ChaCha8Rng, n: usize, init: &Init) -> Vec<f32> {
    match init {
        Init::Any => (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
        Init::AwayFromZero => (0..n)
            .map(|_| {
                let m: f32 = rng.random_range(0.2..1.0);
                if rng.random_bool(0.5) { m } else { -m }
            })
            .collect(),
        Init::Distinct => {
            let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.05).collect();
            v.shuffle(rng);
            v
        }
        Init::Positive => (0..n).map(|_| rng.random_range(0.5..1.5)).collect(),
    }
}

/// Build a model: an unused data input `x` [2, 1], the params as
/// initializers, the nodes. Returns the imported blob.
fn build(case: &OpCase, seed: u64) -> ModelBlob {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut inits: Vec<TensorProto> = case
        .params
        .iter()
        .map(|(name, shape, init)| {
            let n = shape.iter().product();
            onnx::tensor_f32(name, shape, &draw(&mut rng, n, init))
        })
        .collect();
    inits.extend(case.consts.iter().cloned());
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: case.nodes.clone(),
            initializer: inits,
            input: vec![onnx::value_info("data_in", F32, &[2, 1])],
            output: vec![onnx::value_info(&case.output, F32, &[])],
            ..Default::default()
        }),
        ..Default::default()
    };
    import_onnx(&model.encode_to_vec()).unwrap()
}

/// Max relative error between analytic and numeric gradients of the MSE
/// loss against a random target, over up to `coords` coordinates per param.
///
/// The numeric derivative is Richardson-extrapolated from step sizes h and
/// h/2. With `skip_kinks`, a coordinate whose one-sided differences
/// disagree sits at a kink (a ReLU edge, a max-pool tie in a flat image
/// region) where the derivative is not defined; it is skipped, and at most
/// a third of the coordinates may be.
#[allow(clippy::too_many_arguments)]
fn check(
    blob: &ModelBlob,
    loss: Loss,
    x: Batch<'_>,
    y: Labels<'_>,
    batch: usize,
    h: f64,
    coords: usize,
    seed: u64,
    skip_kinks: bool,
) -> f64 {
    let g = ModelGraph::from_blob(blob).unwrap();
    // Every lowering: fedge's tract kernels (convolutions whole and in
    // chunks of one image) and the portable ONNX rules.
    let mut by_lowering = Vec::new();
    let mut trainable = Vec::new();
    for (lowering, im2col_bytes_max) in LOWERINGS {
        let opts = CompileOptions {
            batch,
            loss,
            mode: Mode::Gradients,
            lowering,
            im2col_bytes_max,
            ..CompileOptions::default()
        };
        let mut ex = TractExecutor::new(&g, opts).unwrap();
        ex.load(&blob.params.values).unwrap();
        let label = format!("{lowering:?}, im2col at most {im2col_bytes_max} bytes");
        by_lowering.push((label, ex.gradients(x, y).unwrap().1));
        trainable = ex.training_graph().trainable.clone();
    }
    let mut inf = TractInference::new(&g, batch).unwrap();
    let host_loss = |inf: &mut TractInference, values: &[f32]| -> f64 {
        inf.load(values).unwrap();
        let out = inf.run(x).unwrap();
        match y {
            Labels::Targets(t) => {
                out.iter()
                    .zip(t)
                    .map(|(&o, &t)| (f64::from(o) - f64::from(t)).powi(2))
                    .sum::<f64>()
                    / out.len() as f64
            }
            Labels::Classes(c) => {
                let k = out.len() / c.len();
                out.chunks(k)
                    .zip(c)
                    .map(|(row, &l)| {
                        let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                        lse - row[l as usize] as f64
                    })
                    .sum::<f64>()
                    / c.len() as f64
            }
        }
    };
    let layout = &blob.params.layout;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfd);
    let mut worst = 0.0f64;
    let (mut checked, mut skipped) = (0usize, 0usize);
    let base = host_loss(&mut inf, &blob.params.values);
    for (gi, &ti) in trainable.iter().enumerate() {
        let range = layout.range(ti);
        let mut idx: Vec<usize> = range.clone().collect();
        idx.shuffle(&mut rng);
        idx.truncate(coords);
        for j in idx {
            let mut v = blob.params.values.clone();
            let orig = f64::from(v[j]);
            let mut at = |d: f64| {
                v[j] = (orig + d) as f32;
                // The step actually taken in f32.
                let step = f64::from(v[j]) - orig;
                (host_loss(&mut inf, &v), step)
            };
            let ((up, su), (down, sd)) = (at(h), at(-h));
            let ((up2, su2), (down2, sd2)) = (at(h / 2.0), at(-h / 2.0));
            if skip_kinks {
                let fwd = (up - base) / su;
                let bwd = (base - down) / -sd;
                if (fwd - bwd).abs() > 0.05 * fwd.abs().max(bwd.abs()) + 1e-4 {
                    skipped += 1;
                    continue;
                }
            }
            let d1 = (up - down) / (su - sd);
            let d2 = (up2 - down2) / (su2 - sd2);
            let numeric = (4.0 * d2 - d1) / 3.0;
            for (lowering, grads) in &by_lowering {
                let analytic = f64::from(grads[gi][j - range.start]);
                let rel = (numeric - analytic).abs() / (numeric.abs().max(analytic.abs()) + 1e-3);
                assert!(
                    rel <= TOL,
                    "param `{}`[{}] ({lowering}): analytic {analytic:e}, numeric {numeric:e}, relative error {rel:.3e}",
                    layout.tensors()[ti].name,
                    j - range.start
                );
                worst = worst.max(rel);
            }
            checked += 1;
        }
    }
    assert!(
        skipped * 2 <= checked,
        "{skipped} coordinates at kinks, only {checked} checked"
    );
    worst
}

/// Run an op case with an MSE loss against a random target.
fn check_case(case: OpCase, seed: u64) {
    let blob = build(&case, seed);
    let g = ModelGraph::from_blob(&blob).unwrap();
    let shapes = fedge_engine::train::shape::infer(&g, 2).unwrap();
    let n: usize = shapes.shape(&case.output).unwrap().iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let target: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    check(
        &blob,
        Loss::Mse,
        Batch::F32(&[0.0, 0.0]),
        Labels::Targets(&target),
        2,
        1e-2,
        24,
        seed,
        false,
    );
}

fn p(name: &str, shape: &[usize], init: Init) -> (String, Vec<usize>, Init) {
    (name.into(), shape.to_vec(), init)
}

fn n(op: &str, inputs: &[&str], out: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    onnx::node(op, &format!("{op}_node"), inputs, &[out], attrs)
}

fn unary(op: &str, shape: &[usize], init: Init, attrs: Vec<AttributeProto>) -> OpCase {
    OpCase {
        params: vec![p("a", shape, init)],
        consts: vec![],
        nodes: vec![n(op, &["a"], "y", attrs)],
        output: "y".into(),
    }
}

fn dims(max: usize, rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max, rank)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed), ..ProptestConfig::default() })]

    #[test]
    fn gemm(m in 1usize..5, k in 1usize..6, nn in 1usize..5, tb in any::<bool>(), full_c in any::<bool>(), seed in 0u64..1000) {
        let b_shape = if tb { vec![nn, k] } else { vec![k, nn] };
        let c_shape = if full_c { vec![m, nn] } else { vec![nn] };
        check_case(OpCase {
            params: vec![p("a", &[m, k], Init::Any), p("b", &b_shape, Init::Any), p("c", &c_shape, Init::Any)],
            consts: vec![],
            nodes: vec![n("Gemm", &["a", "b", "c"], "y", vec![onnx::int("transB", tb as i64), onnx::float("alpha", 0.7), onnx::float("beta", 1.3)])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn matmul(batch in prop::collection::vec(1usize..3, 0..2), m in 1usize..4, k in 1usize..5, nn in 1usize..4, batched_b in any::<bool>(), seed in 0u64..1000) {
        let mut a = batch.clone();
        a.extend([m, k]);
        let mut b = if batched_b { batch.clone() } else { vec![] };
        b.extend([k, nn]);
        check_case(OpCase {
            params: vec![p("a", &a, Init::Any), p("b", &b, Init::Any)],
            consts: vec![],
            nodes: vec![n("MatMul", &["a", "b"], "y", vec![])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn broadcasting_arithmetic(shape in dims(4, 3), mask in prop::collection::vec(any::<bool>(), 3), drop in 0usize..3, op in 0usize..4, seed in 0u64..1000) {
        let b_shape: Vec<usize> = shape.iter().zip(&mask).map(|(&d, &m)| if m { d } else { 1 }).skip(drop).collect();
        let op = ["Add", "Sub", "Mul", "Div"][op];
        let b_init = if op == "Div" { Init::Positive } else { Init::Any };
        check_case(OpCase {
            params: vec![p("a", &shape, Init::Any), p("b", &b_shape, b_init)],
            consts: vec![],
            nodes: vec![n(op, &["a", "b"], "y", vec![])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn activations(shape in dims(5, 2), op in 0usize..6, seed in 0u64..1000) {
        let (name, attrs) = [
            ("Relu", vec![]),
            ("LeakyRelu", vec![onnx::float("alpha", 0.1)]),
            ("Sigmoid", vec![]),
            ("Tanh", vec![]),
            ("Softmax", vec![onnx::int("axis", -1)]),
            ("LogSoftmax", vec![onnx::int("axis", 1)]),
        ][op].clone();
        check_case(unary(name, &shape, Init::AwayFromZero, attrs), seed);
    }

    #[test]
    fn conv(nb in 1usize..3, c in 1usize..3, m in 1usize..4, hw in 4usize..8, k in 1usize..4, stride in 1usize..3, pad in 0usize..2, bias in any::<bool>(), seed in 0u64..1000) {
        let mut params = vec![p("x", &[nb, c, hw, hw + 1], Init::Any), p("w", &[m, c, k, k], Init::Any)];
        let mut inputs = vec!["x", "w"];
        if bias {
            params.push(p("b", &[m], Init::Any));
            inputs.push("b");
        }
        let (s, pd) = (stride as i64, pad as i64);
        check_case(OpCase {
            params,
            consts: vec![],
            nodes: vec![n("Conv", &inputs, "y", vec![
                onnx::ints("kernel_shape", &[k as i64, k as i64]),
                onnx::ints("strides", &[s, s]),
                onnx::ints("pads", &[pd, pd, pd, pd]),
            ])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn pooling(nb in 1usize..3, c in 1usize..3, h in 1usize..4, w in 1usize..4, k in 1usize..3, max in any::<bool>(), seed in 0u64..1000) {
        let op = if max { "MaxPool" } else { "AveragePool" };
        let ks = k as i64;
        check_case(unary(op, &[nb, c, h * k, w * k], Init::Distinct, vec![
            onnx::ints("kernel_shape", &[ks, ks]), onnx::ints("strides", &[ks, ks]),
        ]), seed);
    }

    #[test]
    fn global_average_pool(shape in dims(4, 4), seed in 0u64..1000) {
        check_case(unary("GlobalAveragePool", &shape, Init::Any, vec![]), seed);
    }

    #[test]
    fn shape_ops(shape in dims(4, 3), which in 0usize..4, seed in 0u64..1000) {
        let case = match which {
            0 => unary("Flatten", &shape, Init::Any, vec![onnx::int("axis", 1)]),
            1 => unary("Transpose", &shape, Init::Any, vec![onnx::ints("perm", &[2, 0, 1])]),
            2 => OpCase {
                params: vec![p("a", &shape, Init::Any)],
                consts: vec![onnx::tensor_i64("target", &[2], &[-1, shape[2] as i64])],
                nodes: vec![n("Reshape", &["a", "target"], "y", vec![])],
                output: "y".into(),
            },
            _ => unary("Dropout", &shape, Init::Any, vec![]),
        };
        check_case(case, seed);
    }

    #[test]
    fn concat(a in dims(3, 3), extra in 1usize..4, axis in 0usize..3, seed in 0u64..1000) {
        let mut b = a.clone();
        b[axis] = extra;
        check_case(OpCase {
            params: vec![p("a", &a, Init::Any), p("b", &b, Init::Any)],
            consts: vec![],
            nodes: vec![n("Concat", &["a", "b"], "y", vec![onnx::int("axis", axis as i64)])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn gather_embedding(v in 2usize..7, e in 1usize..4, idx in prop::collection::vec(0i64..7, 1..6), seed in 0u64..1000) {
        let idx: Vec<i64> = idx.into_iter().map(|i| i % v as i64).collect();
        check_case(OpCase {
            params: vec![p("table", &[v, e], Init::Any)],
            consts: vec![onnx::tensor_i64("idx", &[1, idx.len()], &idx)],
            nodes: vec![n("Gather", &["table", "idx"], "y", vec![onnx::int("axis", 0)])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn layer_norm(rows in 1usize..4, d in 2usize..6, seed in 0u64..1000) {
        check_case(OpCase {
            params: vec![p("x", &[rows, d], Init::Any), p("g", &[d], Init::Positive), p("b", &[d], Init::Any)],
            consts: vec![],
            nodes: vec![n("LayerNormalization", &["x", "g", "b"], "y", vec![onnx::int("axis", -1), onnx::float("epsilon", 1e-3)])],
            output: "y".into(),
        }, seed);
    }

    #[test]
    fn batch_norm(nb in 1usize..3, c in 1usize..4, hw in 1usize..4, seed in 0u64..1000) {
        check_case(OpCase {
            params: vec![
                p("x", &[nb, c, hw, hw], Init::Any),
                p("scale", &[c], Init::Positive),
                p("bias", &[c], Init::Any),
                p("mean", &[c], Init::Any),
                p("var", &[c], Init::Positive),
            ],
            consts: vec![],
            nodes: vec![n("BatchNormalization", &["x", "scale", "bias", "mean", "var"], "y", vec![])],
            output: "y".into(),
        }, seed);
    }
}

/// Whole-model check by directional derivatives: for each trainable
/// tensor, perturb it along its own gradient direction and compare the
/// loss change (host, f64) with the analytic `g . delta` for the
/// perturbation actually taken in f32. The two agree only if the gradient
/// has the true derivative's norm and direction, so a wrong rule anywhere
/// in the graph shows as a mismatch. Per-coordinate finite differences on
/// whole models are not used: real images put many units on ReLU edges and
/// max-pool ties, and f32 forward rounding (~1e-6 in the loss) swamps the
/// small ones; the per-op property tests above check coordinates.
fn check_directional(blob: &ModelBlob, x: Batch<'_>, y: &[i64], batch: usize, seed: u64) -> f64 {
    LOWERINGS
        .into_iter()
        .map(|l| check_directional_with(l, blob, x, y, batch, seed))
        .fold(0.0, f64::max)
}

fn check_directional_with(
    (lowering, im2col_bytes_max): (Lowering, usize),
    blob: &ModelBlob,
    x: Batch<'_>,
    y: &[i64],
    batch: usize,
    seed: u64,
) -> f64 {
    let g = ModelGraph::from_blob(blob).unwrap();
    let opts = CompileOptions {
        batch,
        loss: Loss::SoftmaxCrossEntropy,
        mode: Mode::Gradients,
        lowering,
        im2col_bytes_max,
        ..CompileOptions::default()
    };
    let mut ex = TractExecutor::new(&g, opts).unwrap();
    ex.load(&blob.params.values).unwrap();
    let (_, grads) = ex.gradients(x, Labels::Classes(y)).unwrap();
    let mut inf = TractInference::new(&g, batch).unwrap();
    let mut loss = |values: &[f32]| -> f64 {
        inf.load(values).unwrap();
        let out = inf.run(x).unwrap();
        let k = out.len() / y.len();
        out.chunks(k)
            .zip(y)
            .map(|(row, &l)| {
                let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
                    - row[l as usize] as f64
            })
            .sum::<f64>()
            / y.len() as f64
    };
    let layout = &blob.params.layout;
    let trainable = ex.training_graph().trainable.clone();
    let _ = seed;
    let mut worst = 0.0f64;
    for (gi, &ti) in trainable.iter().enumerate() {
        let range = layout.range(ti);
        let gt = &grads[gi];
        let gnorm = gt.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        assert!(
            gnorm > 0.0,
            "`{}` has a zero gradient",
            layout.tensors()[ti].name
        );
        let dir: Vec<f64> = gt.iter().map(|&v| f64::from(v) / gnorm).collect();
        {
            let eps = 2e-4;
            let mut plus = blob.params.values.clone();
            let mut minus = blob.params.values.clone();
            let mut analytic = 0.0f64;
            for (k, d) in dir.iter().enumerate() {
                let j = range.start + k;
                let w = f64::from(blob.params.values[j]);
                plus[j] = (w + eps * d) as f32;
                minus[j] = (w - eps * d) as f32;
                analytic += f64::from(gt[k]) * (f64::from(plus[j]) - f64::from(minus[j]));
            }
            let numeric = loss(&plus) - loss(&minus);
            let rel = (numeric - analytic).abs() / (numeric.abs().max(analytic.abs()) + 1e-9);
            assert!(
                rel <= TOL,
                "`{}` along its gradient ({lowering:?}, im2col at most {im2col_bytes_max} bytes): analytic {analytic:e}, numeric {numeric:e}, relative error {rel:.3e}",
                layout.tensors()[ti].name
            );
            worst = worst.max(rel);
        }
    }
    worst
}

fn zoo_check(proto: ModelProto, coords: usize) {
    let blob = import_onnx(&proto.encode_to_vec()).unwrap();
    let batch = 4;
    if blob.params.layout.tensors()[0].name == "embed.weight" {
        let text =
            data::load_text(&data::shipped_data_dir().join("tinyshakespeare/input.txt")).unwrap();
        let text: String = text.chars().take(2000).collect();
        let vocab = data::Vocab::of(
            &data::load_text(&data::shipped_data_dir().join("tinyshakespeare/input.txt")).unwrap(),
        );
        let d = data::char_windows(&text, &vocab, fedge_engine::zoo::CHAR_CONTEXT, 7).unwrap();
        let d = d.slice(0..batch);
        let data::Features::I64(x) = &d.features else {
            panic!()
        };
        let _ = coords;
        let worst = check_directional(&blob, Batch::I64(x), &d.labels, batch, 5);
        eprintln!("char model: worst relative error {worst:.2e}");
    } else {
        let d = data::load_mnist(&data::shipped_data_dir())
            .unwrap()
            .slice(0..batch);
        let data::Features::F32(x) = &d.features else {
            panic!()
        };
        let worst = check_directional(&blob, Batch::F32(x), &d.labels, batch, 5);
        eprintln!("worst relative error {worst:.2e}");
    }
}

#[test]
fn whole_model_mlp() {
    zoo_check(fedge_engine::zoo::mlp(1), 12);
}

#[test]
fn whole_model_cnn() {
    zoo_check(fedge_engine::zoo::cnn(2), 6);
}

#[test]
fn whole_model_small_cnn() {
    zoo_check(fedge_engine::zoo::small_cnn(3), 12);
}

#[test]
fn whole_model_char() {
    zoo_check(fedge_engine::zoo::char_model(4, 65), 12);
}

#[test]
fn unused_parameters_get_zero_gradient_and_frozen_ones_none() {
    let case = OpCase {
        params: vec![p("a", &[3], Init::Any), p("unused", &[2], Init::Any)],
        consts: vec![],
        nodes: vec![n("Relu", &["a"], "y", vec![])],
        output: "y".into(),
    };
    let blob = build(&case, 1);
    let g = ModelGraph::from_blob(&blob).unwrap();
    let mut ex = TractExecutor::new(
        &g,
        CompileOptions {
            batch: 2,
            loss: Loss::Mse,
            mode: Mode::Gradients,
            ..Default::default()
        },
    )
    .unwrap();
    ex.load(&blob.params.values).unwrap();
    let (_, grads) = ex
        .gradients(Batch::F32(&[0.0, 0.0]), Labels::Targets(&[0.0; 3]))
        .unwrap();
    assert_eq!(grads.len(), 2);
    assert_eq!(grads[1], vec![0.0, 0.0]);
    let frozen = TractExecutor::new(
        &g,
        CompileOptions {
            batch: 2,
            loss: Loss::Mse,
            mode: Mode::Gradients,
            freeze: vec!["unused".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(frozen.training_graph().trainable, vec![0]);
}

#[test]
fn an_unsupported_op_on_the_trainable_path_is_a_clear_error() {
    // Sin after a trainable parameter: no gradient rule.
    let case = OpCase {
        params: vec![p("w", &[3], Init::Any)],
        consts: vec![],
        nodes: vec![onnx::node("Sin", "/head/Sin", &["w"], &["y"], vec![])],
        output: "y".into(),
    };
    let blob = build(&case, 1);
    let g = ModelGraph::from_blob(&blob).unwrap();
    let err = TractExecutor::new(
        &g,
        CompileOptions {
            batch: 2,
            loss: Loss::Mse,
            ..Default::default()
        },
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("`Sin`") && msg.contains("/head/Sin"), "{msg}");

    // The same op on the data path before any parameter needs no rule.
    let case = OpCase {
        params: vec![p("w", &[2, 1], Init::Any)],
        consts: vec![],
        nodes: vec![
            onnx::node("Sin", "/pre/Sin", &["data_in"], &["s"], vec![]),
            onnx::node("Mul", "/head/Mul", &["s", "w"], &["y"], vec![]),
        ],
        output: "y".into(),
    };
    let blob = build(&case, 1);
    let g = ModelGraph::from_blob(&blob).unwrap();
    let mut ex = TractExecutor::new(
        &g,
        CompileOptions {
            batch: 2,
            loss: Loss::Mse,
            ..Default::default()
        },
    )
    .unwrap();
    ex.load(&blob.params.values).unwrap();
    let loss = ex
        .step(Batch::F32(&[0.5, 1.0]), Labels::Targets(&[0.0, 0.0]), 0.1)
        .unwrap();
    assert!(loss.is_finite());
}
