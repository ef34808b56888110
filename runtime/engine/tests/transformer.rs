//! The zoo's causal character transformer (`zoo::char_transformer`): it is
//! causal; its step's loss is the next character's cross-entropy at every
//! position (the input shifted by one, the label last) and its gradient
//! is right, checked on the whole model by directional derivatives as the
//! other zoo models are (`grad_check.rs`), in both lowerings; evaluation
//! reads the last position; and a few steps of training lower the loss.

use fedge_engine::data::{self, Dataset, Features};
use fedge_engine::train::compile::{CompileOptions, Lowering, Mode, OptimizerSpec};
use fedge_engine::train::exec::{Batch, Executor, Labels, TractExecutor, TractInference};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_engine::train::local;
use fedge_engine::zoo::{TransformerConfig, char_transformer};
use fedge_proto::ModelBlob;
use fedge_proto::msg::{Loss, Optimizer, TrainingPlan};
use prost::Message;

/// A transformer small enough to check quickly, the zoo's shape otherwise.
fn small() -> TransformerConfig {
    TransformerConfig {
        vocab: 65,
        context: 8,
        d_model: 16,
        heads: 2,
        layers: 2,
        d_mlp: 32,
    }
}

fn blob(c: &TransformerConfig, seed: u64) -> ModelBlob {
    import_onnx(&char_transformer(seed, c).encode_to_vec()).unwrap()
}

/// `n` windows of `context` characters from the shipped text.
fn shakespeare(context: usize, n: usize) -> Dataset {
    let text =
        data::load_text(&data::shipped_data_dir().join("tinyshakespeare/input.txt")).unwrap();
    let vocab = data::Vocab::of(&text);
    let head: String = text.chars().take(n * 7 + context + 1).collect();
    data::char_windows(&head, &vocab, context, 7)
        .unwrap()
        .slice(0..n)
}

fn tokens(d: &Dataset) -> &[i64] {
    let Features::I64(x) = &d.features else {
        panic!("character windows are int64")
    };
    x
}

fn outputs(b: &ModelBlob, x: &[i64], batch: usize) -> Vec<f32> {
    let g = ModelGraph::from_blob(b).unwrap();
    let mut inf = TractInference::new(&g, batch).unwrap();
    inf.load(&b.params.values).unwrap();
    inf.run(Batch::I64(x)).unwrap()
}

/// Cross-entropy of one row of logits against `label`, in f64.
fn xent(row: &[f32], label: i64) -> f64 {
    let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() - row[label as usize] as f64
}

/// The next-character loss at every position, on the host: position `t`
/// of window `i` against token `t + 1`, the last against the label.
fn host_loss(out: &[f32], x: &[i64], y: &[i64], t: usize, vocab: usize) -> f64 {
    let mut sum = 0.0;
    for (i, &label) in y.iter().enumerate() {
        for p in 0..t {
            let target = if p + 1 < t { x[i * t + p + 1] } else { label };
            let row = &out[(i * t + p) * vocab..(i * t + p + 1) * vocab];
            sum += xent(row, target);
        }
    }
    sum / (y.len() * t) as f64
}

#[test]
fn no_position_sees_the_future() {
    let c = small();
    let b = blob(&c, 1);
    let d = shakespeare(c.context, 1);
    let x = tokens(&d).to_vec();
    let base = outputs(&b, &x, 1);
    for changed in 0..c.context {
        let mut x2 = x.clone();
        x2[changed] = (x2[changed] + 1) % c.vocab as i64;
        let out = outputs(&b, &x2, 1);
        for p in 0..c.context {
            let same = base[p * c.vocab..(p + 1) * c.vocab] == out[p * c.vocab..(p + 1) * c.vocab];
            assert_eq!(
                same,
                p < changed,
                "position {p} after changing token {changed}"
            );
        }
    }
}

/// Directional derivatives of the host loss against the step's gradients,
/// per trainable tensor (see `grad_check.rs`, `check_directional`).
fn check_gradients(c: &TransformerConfig, batch: usize, lowering: Lowering) -> f64 {
    let b = blob(c, 2);
    let d = shakespeare(c.context, batch);
    let (x, y) = (tokens(&d), &d.labels);
    let g = ModelGraph::from_blob(&b).unwrap();
    let opts = CompileOptions {
        batch,
        loss: Loss::SoftmaxCrossEntropy,
        mode: Mode::Gradients,
        lowering,
        ..CompileOptions::default()
    };
    let mut ex = TractExecutor::new(&g, opts).unwrap();
    ex.load(&b.params.values).unwrap();
    let (loss, grads) = ex.gradients(Batch::I64(x), Labels::Classes(y)).unwrap();
    let mut inf = TractInference::new(&g, batch).unwrap();
    let mut host = |values: &[f32]| -> f64 {
        inf.load(values).unwrap();
        host_loss(&inf.run(Batch::I64(x)).unwrap(), x, y, c.context, c.vocab)
    };
    let at = host(&b.params.values);
    assert!(
        (f64::from(loss) - at).abs() <= 1e-5 * at,
        "the step's loss {loss} is not the next-character loss at every position {at}"
    );
    let layout = &b.params.layout;
    let trainable = ex.training_graph().trainable.clone();
    assert_eq!(
        trainable.len(),
        layout.tensors().len(),
        "every tensor trains"
    );
    let mut worst = 0.0f64;
    for (gi, &ti) in trainable.iter().enumerate() {
        let name = &layout.tensors()[ti].name;
        let range = layout.range(ti);
        let gt = &grads[gi];
        let norm = gt.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "`{name}` has a zero gradient");
        let eps = 2e-4;
        let (mut plus, mut minus) = (b.params.values.clone(), b.params.values.clone());
        let mut analytic = 0.0f64;
        for (k, &gk) in gt.iter().enumerate() {
            let j = range.start + k;
            let (w, dir) = (f64::from(b.params.values[j]), f64::from(gk) / norm);
            plus[j] = (w + eps * dir) as f32;
            minus[j] = (w - eps * dir) as f32;
            analytic += f64::from(gk) * (f64::from(plus[j]) - f64::from(minus[j]));
        }
        let numeric = host(&plus) - host(&minus);
        let rel = (numeric - analytic).abs() / (numeric.abs().max(analytic.abs()) + 1e-9);
        assert!(
            rel <= 1e-2,
            "`{name}` along its gradient ({lowering:?}): analytic {analytic:e}, numeric {numeric:e}, relative error {rel:.3e}"
        );
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn whole_model_gradients_small() {
    for lowering in [Lowering::Tract, Lowering::Portable] {
        let worst = check_gradients(&small(), 3, lowering);
        eprintln!("small transformer, {lowering:?}: worst relative error {worst:.2e}");
    }
}

#[test]
fn whole_model_gradients_zoo() {
    let worst = check_gradients(&TransformerConfig::zoo(65), 2, Lowering::Tract);
    eprintln!("zoo transformer: worst relative error {worst:.2e}");
}

#[test]
fn evaluation_reads_the_last_position() {
    let c = small();
    let b = blob(&c, 3);
    let d = shakespeare(c.context, 5);
    let g = ModelGraph::from_blob(&b).unwrap();
    let mut inf = TractInference::new(&g, 4).unwrap();
    inf.load(&b.params.values).unwrap();
    let e = local::evaluate(&inf, &d).unwrap();
    // The host's reading: window i's last position against its label.
    let out = outputs(&b, tokens(&d), d.len());
    let per = c.context * c.vocab;
    let (mut loss, mut correct) = (0.0, 0);
    for (i, &label) in d.labels.iter().enumerate() {
        let row = &out[i * per + per - c.vocab..(i + 1) * per];
        loss += xent(row, label);
        let arg = (0..c.vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        correct += usize::from(arg as i64 == label);
    }
    assert!((e.loss - loss / d.len() as f64).abs() < 1e-5, "{e:?}");
    assert_eq!(e.accuracy, correct as f64 / d.len() as f64);
    assert_eq!(e.samples, 5);
}

#[test]
fn training_lowers_the_loss() {
    let c = small();
    let b = blob(&c, 4);
    let d = shakespeare(c.context, 64);
    let g = ModelGraph::from_blob(&b).unwrap();
    let opts = CompileOptions {
        batch: 16,
        optimizer: OptimizerSpec {
            kind: Optimizer::Adam,
            ..OptimizerSpec::default()
        },
        ..CompileOptions::default()
    };
    let mut ex = TractExecutor::new(&g, opts).unwrap();
    ex.load(&b.params.values).unwrap();
    let plan = TrainingPlan {
        local_epochs: 6,
        batch_size: 16,
        learning_rate: 0.01,
        optimizer: Optimizer::Adam,
        ..TrainingPlan::default()
    };
    let mut losses = Vec::new();
    local::train(&mut ex, &d, &plan, 0, |_, _, l| losses.push(l)).unwrap();
    let first = losses[..4].iter().sum::<f32>() / 4.0;
    let last = losses[losses.len() - 4..].iter().sum::<f32>() / 4.0;
    assert!(
        last < 0.8 * first,
        "loss {first} -> {last} over {} steps",
        losses.len()
    );
}
