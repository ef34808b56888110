//! The `class-gain` score: what an update gains on the classes it
//! improves, on a loss that does not reward moving the class priors.
//!
//! **Why.** Near convergence the round's mean step is small, and every
//! honest device of a skewed (non-IID) shard pulls the model toward its own
//! classes: on balanced validation data its update, even as `1/n` of the
//! step, lowers the loss of its classes and raises the others' by about as
//! much, and `direct` scores it at or below zero (20-35% of honest
//! participations on Dirichlet(0.5) MNIST). The round's other updates
//! cancel that harm; what the update brings is the improvement on its own
//! classes. So the score is the class-weighted sum of the per-class
//! improvements, with the classes it makes worse counted at a tenth
//! ([`HARM_WEIGHT`]): `sum_c (n_c / N) g(L_c(model) - L_c(model + (lr/n) x
//! delta))` with `g(d) = d` for a gain and `d / 10` for a loss, over the
//! validation sample's classes `c` (`n_c` of its `N` examples). That is in
//! the spirit of scoring a contributor on the data it is responsible for
//! (Templar's validators evaluate each miner on data assigned to it) when
//! the operator cannot know each device's data; the tenth keeps an update
//! that wins one class by wrecking the others unpaid.
//!
//! **Prior-free losses.** Taking only the gains would pay the cheapest
//! update of all: shifting one class's output bias up lowers that class's
//! loss without learning anything. So each model's per-class losses are
//! taken after refitting one additive offset per class to the validation
//! sample (the offsets minimising the sample's mean cross-entropy: the
//! class-wise bias terms of the bias-corrected calibration of Alexandari
//! et al. 2020, "Maximum Likelihood with Bias-Corrected Calibration is
//! Hard-To-Beat at Label Shift Adaptation", ICML, without its
//! temperature). A change of the class priors alone is
//! absorbed by the refit, and its gain is zero; the refit is the same
//! fixed number of gradient steps from zero offsets in f64 for every
//! model, so a verifier recomputes it exactly.
//!
//! **Scale.** Each update is scored at no more than the round's median
//! norm: a norm is the sender's choice, and near convergence a larger step
//! moves the per-class losses further in both directions, so without the
//! cap scaling an update up would raise its score.
//!
//! **What it does not catch.** Near convergence an update and its
//! negation move the per-class losses by about the same amounts, so the
//! score cannot tell a sign-flipped honest update from the original there
//! (in the README's run sign-flippers were paid in 2 of 11 participations;
//! the combiner bounds what they do to the model). Random noise gains a little on some
//! classes by chance and may score above zero, an exact copy scores what
//! its original does, and a zero update scores zero: noise, copies and
//! free-riders are caught by their flags (`noise`, `copy_of`,
//! `free_rider`), which pay nothing.

use super::{ClassScores, Evaluator, NON_FINITE_SCORE};

/// Most steps of the offset refit. Each is the EM step of Saerens,
/// Latinne and Decaestecker 2002 ("Adjusting the Outputs of a Classifier to
/// New a Priori Probabilities: A Simple Procedure", Neural Computation
/// 14(1)), `offset_c += ln(f_c / p_c)` with `f_c` the class's share of the
/// sample and `p_c` its mean probability, whose fixed point is the
/// cross-entropy's minimum over the offsets; it stops once every `p_c` is
/// within [`REFIT_TOLERANCE`] of `f_c`. A deterministic rule, so a verifier
/// stops where the aggregator did.
const REFIT_STEPS: usize = 500;
const REFIT_TOLERANCE: f64 = 1e-12;
const REFIT_STEP_MAX: f64 = 30.0;

/// What a loss on a class counts for against a gain on another: an update
/// that gains on its own classes less than a tenth of what it loses on
/// the others scores below zero (one that wrecks the model to win one
/// class earns nothing), while an honest skewed update, whose losses are
/// about its gains, keeps most of its gain.
pub const HARM_WEIGHT: f64 = 0.1;

/// Why class scores cannot be used: an inconsistent shape or a label that
/// is not a class.
fn check(s: &ClassScores) -> Result<(), String> {
    let k = s.classes;
    let n = s.labels.len();
    if k == 0 || n == 0 || s.scores.len() != n * k {
        return Err(format!(
            "{} class scores for {n} examples of {k} classes",
            s.scores.len()
        ));
    }
    if let Some(&l) = s.labels.iter().find(|&&l| l as usize >= k) {
        return Err(format!("label {l} is not one of the {k} classes"));
    }
    Ok(())
}

/// Per class of a validation sample: how many of its examples have that
/// label, and their mean cross-entropy after the offset refit, the softmax
/// taken over the classes the sample holds (a class it does not hold has
/// no loss to lower, and its best offset is minus infinity: leaving it out
/// means raising or lowering its scores changes nothing). `None` where a
/// class score is not finite (the model is broken).
pub fn prior_free_class_losses(s: &ClassScores) -> Result<Option<Vec<(u64, f64)>>, String> {
    check(s)?;
    let k = s.classes;
    let n = s.labels.len();
    if s.scores.iter().any(|v| !v.is_finite()) {
        return Ok(None);
    }
    let mut count = vec![0u64; k];
    for &l in &s.labels {
        count[l as usize] += 1;
    }
    // The classes present, and each one's place among them.
    let present: Vec<usize> = (0..k).filter(|&c| count[c] > 0).collect();
    let mut place = vec![usize::MAX; k];
    for (i, &c) in present.iter().enumerate() {
        place[c] = i;
    }
    let m = present.len();
    let rows: Vec<Vec<f32>> = s
        .scores
        .chunks_exact(k)
        .map(|r| present.iter().map(|&c| r[c]).collect())
        .collect();
    let freq: Vec<f64> = present
        .iter()
        .map(|&c| count[c] as f64 / n as f64)
        .collect();
    let mut off = vec![0f64; m];
    let mut z = vec![0f64; m];
    let mut mean_p = vec![0f64; m];
    for _ in 0..REFIT_STEPS {
        mean_p.iter_mut().for_each(|p| *p = 0.0);
        for row in &rows {
            let (sum, _) = softmax_into(row, &off, &mut z);
            for (p, &e) in mean_p.iter_mut().zip(&z) {
                *p += e / sum / n as f64;
            }
        }
        let gap = mean_p
            .iter()
            .zip(&freq)
            .map(|(p, f)| (p - f).abs())
            .fold(0.0, f64::max);
        if gap < REFIT_TOLERANCE {
            break;
        }
        for ((o, &p), &f) in off.iter_mut().zip(&mean_p).zip(&freq) {
            // A class whose mean probability underflowed moves by at most
            // REFIT_STEP_MAX a step.
            *o += (f / p.max(f64::MIN_POSITIVE))
                .ln()
                .clamp(-REFIT_STEP_MAX, REFIT_STEP_MAX);
        }
    }
    let mut out = vec![(0u64, 0f64); k];
    for (row, &l) in rows.iter().zip(&s.labels) {
        let i = place[l as usize];
        let (sum, top) = softmax_into(row, &off, &mut z);
        // -log softmax at the label.
        let loss = sum.ln() - (f64::from(row[i]) + off[i] - top);
        let c = &mut out[l as usize];
        c.0 += 1;
        c.1 += loss;
    }
    for c in &mut out {
        if c.0 > 0 {
            c.1 /= c.0 as f64;
        }
    }
    if out.iter().any(|c| !c.1.is_finite()) {
        return Ok(None);
    }
    Ok(Some(out))
}

/// `exp(row + off - max)` into `z`; returns its sum and the max.
fn softmax_into(row: &[f32], off: &[f64], z: &mut [f64]) -> (f64, f64) {
    let mut m = f64::NEG_INFINITY;
    for ((zi, &r), &o) in z.iter_mut().zip(row).zip(off) {
        *zi = f64::from(r) + o;
        m = m.max(*zi);
    }
    let mut sum = 0.0;
    for zi in z.iter_mut() {
        *zi = (*zi - m).exp();
        sum += *zi;
    }
    (sum, m)
}

/// The score from `base` to `new` (both from [`prior_free_class_losses`]
/// on the same sample): the class-weighted per-class improvements, the
/// losses counted at [`HARM_WEIGHT`].
pub fn gain(base: &[(u64, f64)], new: &[(u64, f64)]) -> f64 {
    let n: u64 = base.iter().map(|c| c.0).sum();
    if n == 0 {
        return 0.0;
    }
    base.iter()
        .zip(new)
        .filter(|(b, _)| b.0 > 0)
        .map(|(b, a)| {
            let d = b.1 - a.1;
            b.0 as f64 / n as f64 * if d > 0.0 { d } else { HARM_WEIGHT * d }
        })
        .sum()
}

/// The mean cross-entropy without the refit (the round's reported base
/// loss, comparable with the other methods').
pub fn plain_loss(s: &ClassScores) -> Result<f64, String> {
    check(s)?;
    let k = s.classes;
    let mut total = 0.0;
    let zero = vec![0f64; k];
    let mut z = vec![0f64; k];
    for (row, &l) in s.scores.chunks_exact(k).zip(&s.labels) {
        let (sum, m) = softmax_into(row, &zero, &mut z);
        total += sum.ln() - (f64::from(row[l as usize]) - m);
    }
    Ok(total / s.labels.len() as f64)
}

/// Scores `deltas` at `step` each from `base` on the sample `idx`, each
/// scaled down to a norm of at most `norm_max` (the round's median norm:
/// sending a larger update buys no larger score): the base model's plain
/// loss and each update's score ([`NON_FINITE_SCORE`] for one that breaks
/// the model). `passes` counts the examples evaluated.
pub fn score(
    eval: &mut dyn Evaluator,
    idx: &[usize],
    base: &[f32],
    step: f64,
    norm_max: f64,
    deltas: &[&[f32]],
    passes: &mut u64,
) -> Result<(f64, Vec<f64>), String> {
    let no_scores = || {
        "scoring.method = \"class-gain\" needs a classifier's class scores, which this \
         evaluator does not give (use \"direct\")"
            .to_string()
    };
    let s = eval.class_scores(base, idx)?.ok_or_else(no_scores)?;
    *passes += idx.len() as u64;
    let refit = prior_free_class_losses(&s)?;
    let base_loss = plain_loss(&s)?;
    let (Some(before), true) = (refit, base_loss.is_finite()) else {
        return Err(format!(
            "the current model's validation loss is {base_loss}"
        ));
    };
    let mut params = vec![0f32; base.len()];
    let mut scores = Vec::with_capacity(deltas.len());
    for d in deltas {
        let norm = crate::robust::l2_norm(d);
        let scale = if norm > norm_max && norm > 0.0 {
            step * norm_max / norm
        } else {
            step
        };
        for ((p, &b), &x) in params.iter_mut().zip(base).zip(d.iter()) {
            *p = (f64::from(b) + scale * f64::from(x)) as f32;
        }
        let s = eval.class_scores(&params, idx)?.ok_or_else(no_scores)?;
        *passes += idx.len() as u64;
        scores.push(match prior_free_class_losses(&s)? {
            Some(after) => gain(&before, &after),
            None => NON_FINITE_SCORE,
        });
    }
    Ok((base_loss, scores))
}

#[cfg(test)]
mod tests;
