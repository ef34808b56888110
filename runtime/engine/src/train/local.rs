//! Local training loops and evaluation over a [`Dataset`].

use fedge_proto::msg::TrainingPlan;

use super::TrainError;
use super::exec::{Batch, Executor, Labels, TractInference};
use crate::data::{Dataset, Features};

/// What a run of local training did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainStats {
    pub steps: u64,
    pub samples: u64,
    pub mean_loss: f64,
    pub last_loss: f64,
}

/// Train for the plan's steps (or epochs when `local_steps` is 0) on
/// `data`, calling `progress(step, total, loss)` after each step.
pub fn train(
    ex: &mut dyn Executor,
    data: &Dataset,
    plan: &TrainingPlan,
    seed: u64,
    mut progress: impl FnMut(u64, u64, f32),
) -> Result<TrainStats, TrainError> {
    let b = ex.batch_size();
    if data.is_empty() {
        return Err(TrainError::BadInput("no local samples to train on".into()));
    }
    let per_epoch = (data.len() / b).max(1) as u64;
    let total = if plan.local_steps > 0 {
        u64::from(plan.local_steps)
    } else {
        per_epoch * u64::from(plan.local_epochs.max(1))
    };
    let (mut xf, mut xi, mut y) = (Vec::new(), Vec::new(), Vec::new());
    let mut sum = 0.0f64;
    let mut last = 0.0f64;
    let mut step = 0u64;
    let mut epoch = 0u64;
    while step < total {
        for idx in data.epoch_batches(b, seed.wrapping_add(epoch)) {
            if step >= total {
                break;
            }
            data.gather(&idx, &mut xf, &mut xi, &mut y);
            let x = match data.features {
                Features::F32(_) => Batch::F32(&xf),
                Features::I64(_) => Batch::I64(&xi),
            };
            let loss = ex.step(x, Labels::Classes(&y), plan.learning_rate)?;
            if !loss.is_finite() {
                return Err(TrainError::BadInput(format!(
                    "loss became {loss} at step {step}; lower the learning rate"
                )));
            }
            sum += f64::from(loss);
            last = f64::from(loss);
            step += 1;
            progress(step, total, loss);
        }
        epoch += 1;
    }
    Ok(TrainStats {
        steps: step,
        samples: step * b as u64,
        mean_loss: sum / step.max(1) as f64,
        last_loss: last,
    })
}

/// Accuracy and mean cross-entropy of a classifier on `data` (of a causal
/// language model: of its last position, the token after each window).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalStats {
    pub accuracy: f64,
    pub loss: f64,
    pub samples: usize,
}

pub fn evaluate(inf: &TractInference, data: &Dataset) -> Result<EvalStats, TrainError> {
    let mut correct = 0usize;
    let mut loss = 0.0f64;
    let n = data.len();
    for_each_scored(inf, data, |row, label| {
        let (arg, _) = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv { (i, v) } else { (bi, bv) }
            });
        correct += usize::from(arg == label);
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m as f64
            + row
                .iter()
                .map(|&v| ((v - m) as f64).exp())
                .sum::<f64>()
                .ln();
        loss += lse - row[label] as f64;
    })?;
    Ok(EvalStats {
        accuracy: correct as f64 / n.max(1) as f64,
        loss: loss / n.max(1) as f64,
        samples: n,
    })
}

/// Calls `f` with the class scores (logits) and the label of each example
/// of `data` in order (of a causal language model: its last position).
pub fn for_each_scored(
    inf: &TractInference,
    data: &Dataset,
    mut f: impl FnMut(&[f32], usize),
) -> Result<(), TrainError> {
    let b = inf.batch_size();
    let (mut xf, mut xi, mut y) = (Vec::new(), Vec::new(), Vec::new());
    let n = data.len();
    let mut start = 0;
    while start < n {
        // Pad the last batch with sample 0; padded outputs are ignored.
        let idx: Vec<usize> = (start..start + b)
            .map(|i| if i < n { i } else { 0 })
            .collect();
        data.gather(&idx, &mut xf, &mut xi, &mut y);
        let x = match data.features {
            Features::F32(_) => Batch::F32(&xf),
            Features::I64(_) => Batch::I64(&xi),
        };
        let out = inf.run(x)?;
        for (j, row) in inf.class_scores(&out).enumerate().take(n - start) {
            f(row, y[j] as usize);
        }
        start += b;
    }
    Ok(())
}
