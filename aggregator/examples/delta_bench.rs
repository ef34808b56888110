//! What a downlink XOR delta costs the coordinator, before and after the
//! estimate (`fedge_proto::delta::encode_smaller_than`). For each case a
//! model of the MNIST MLP's shape (784-200-200-10, 199,210 parameters) and
//! the next version after one step: the coordinator's work for one base a
//! device names, old (decode the base, XOR, zstd the whole body, compare
//! with the model's size) and new (decode the base, estimate from a
//! sample, and only then build), timed alternately in the same run. The
//! cases: dense float32 steps (every parameter moves, by 0.1% to 10% of
//! its size: FedAvg of dense updates) and sparse ones (1% or 10% of the
//! parameters move: a mean of top-k updates). Pairs of real model files
//! (`--pair BASE TARGET`, e.g. consecutive versions from a state
//! directory's `models/`) are measured the same way. Prints a table and
//! one JSON object per case.
//!
//! `cargo run --release -p fedge-aggregator --example delta_bench -- [--reps N] [--pair BASE TARGET]...`

use std::sync::Arc;
use std::time::Instant;

use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, TensorSpec, delta};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// The MNIST MLP's tensors.
fn mlp_layout() -> Arc<ParamLayout> {
    let t = |name: &str, shape: &[usize]| TensorSpec::new(name, shape);
    Arc::new(
        ParamLayout::new(vec![
            t("w1", &[784, 200]),
            t("b1", &[200]),
            t("w2", &[200, 200]),
            t("b2", &[200]),
            t("w3", &[200, 10]),
            t("b3", &[10]),
        ])
        .expect("layout"),
    )
}

/// Weights drawn as a trained MLP's look (about N(0, 1/fan_in)).
fn initial(rng: &mut rand_chacha::ChaCha8Rng) -> ModelBlob {
    let layout = mlp_layout();
    let mut values = Vec::with_capacity(layout.dimension());
    for (fan_in, n) in [(784, 784 * 200 + 200), (200, 200 * 200 + 200), (200, 2010)] {
        let d = Normal::new(0.0f32, (1.0 / fan_in as f32).sqrt()).expect("normal");
        values.extend((0..n).map(|_| d.sample(rng)));
    }
    ModelBlob {
        onnx_graph: bytes::Bytes::from(vec![7u8; 4096]),
        params: Params::new(layout, values).expect("params"),
    }
}

/// `base` after a step moving a `fraction` of its parameters by about
/// `relative` of their size.
fn stepped(
    base: &ModelBlob,
    rng: &mut rand_chacha::ChaCha8Rng,
    fraction: f64,
    relative: f32,
) -> ModelBlob {
    let d = Normal::new(0.0f32, relative).expect("normal");
    let values = (base.params.values.iter())
        .map(|v| {
            if rng.random_bool(fraction) {
                v + v.abs().max(1e-3) * d.sample(rng)
            } else {
                *v
            }
        })
        .collect();
    ModelBlob {
        onnx_graph: base.onnx_graph.clone(),
        params: Params::new(Arc::clone(&base.params.layout), values).expect("params"),
    }
}

/// The coordinator's work for one base before the sample.
fn old(base_blob: &[u8], current: &ModelBlob, full: u64) -> Option<usize> {
    let base = ModelBlob::decode(base_blob, &Limits::default()).ok()?;
    delta::encode_whole(&base, current)
        .filter(|d| (d.len() as u64) < full)
        .map(|d| d.len())
}

/// The same with the estimate first.
fn new(base_blob: &[u8], current: &ModelBlob, full: u64) -> Option<usize> {
    let base = ModelBlob::decode(base_blob, &Limits::default()).ok()?;
    delta::encode_smaller_than(&base, current, full).map(|d| d.len())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn measure(name: &str, base: &ModelBlob, target: &ModelBlob, reps: usize) -> serde_json::Value {
    let base_blob = base.encode();
    let full = target.encode().len() as u64;
    let whole = delta::encode_whole(base, target).map_or(0, |d| d.len() as u64);
    let actual = delta::encode(base, target).map_or(0, |d| d.len() as u64);
    let estimate = delta::estimate_bytes(base, target).unwrap_or(0);
    let (mut t_old, mut t_new) = (Vec::new(), Vec::new());
    let (mut served_old, mut served_new) = (None, None);
    for _ in 0..reps {
        let t = Instant::now();
        served_old = old(&base_blob, target, full);
        t_old.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        served_new = new(&base_blob, target, full);
        t_new.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (m_old, m_new) = (median(t_old), median(t_new));
    let pct = |x: u64| 100.0 * x as f64 / full as f64;
    println!(
        "{name:<22} {:>9} {:>7.1}% {:>7.1}% {:>7.1}% {:>6} {:>6} {:>9.2} {:>9.2} {:>6.3}",
        full,
        pct(whole),
        pct(actual),
        pct(estimate),
        served_old.is_some(),
        served_new.is_some(),
        m_old,
        m_new,
        m_new / m_old
    );
    serde_json::json!({
        "case": name,
        "model_bytes": full,
        "delta_bytes_old": whole,
        "delta_bytes": actual,
        "estimate_bytes": estimate,
        "delta_served_old": served_old,
        "delta_served_new": served_new,
        "old_ms": m_old,
        "new_ms": m_new,
        "new_over_old": m_new / m_old,
        "reps": reps,
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut reps = 15;
    let mut pairs = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().and_then(|r| r.parse().ok()).expect("--reps N"),
            "--pair" => {
                let (b, t) = (args.next().expect("BASE"), args.next().expect("TARGET"));
                pairs.push((b, t));
            }
            other => panic!("unknown argument {other}: [--reps N] [--pair BASE TARGET]..."),
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(18);
    let base = initial(&mut rng);
    println!(
        "{:<22} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>6}",
        "case", "model B", "old Δ", "new Δ", "estim.", "old", "new", "old ms", "new ms", "ratio"
    );
    let mut out = Vec::new();
    for (name, fraction, relative) in [
        ("dense 0.1%", 1.0, 1e-3),
        ("dense 1%", 1.0, 1e-2),
        ("dense 10%", 1.0, 1e-1),
        ("sparse 1% of params", 0.01, 1e-2),
        ("sparse 10% of params", 0.1, 1e-2),
        ("sparse 30% of params", 0.3, 1e-2),
    ] {
        let target = stepped(&base, &mut rng, fraction, relative);
        out.push(measure(name, &base, &target, reps));
    }
    for (b, t) in pairs {
        let read = |p: &str| {
            let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
            ModelBlob::decode(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{p}: {e}"))
        };
        let name = format!("file {}", t.rsplit('/').next().unwrap_or(&t));
        let name: String = name.chars().take(22).collect();
        out.push(measure(&name, &read(&b), &read(&t), reps));
    }
    println!("{}", serde_json::Value::Array(out));
}
