//! Contribution scoring and rewards, as pure functions the coordinator
//! calls when a round closes.
//!
//! **Score.** An accepted update's score is its effect on held-out data
//! as one of the round's `n` parts of its mean step: the model moved by
//! `(lr / n) x delta` ([`applied_step`]), where `delta` is the update as
//! combined (a stale FedBuff update already discounted) and `lr` the
//! server learning rate ([`server_lr`]). The share is `1/n`, not the
//! device's aggregation weight, because that weight grows with a claimed
//! sample count, and a claim must never raise a score. The default method,
//! `class-gain` ([`class_gain`]), sums what that step gains on each class
//! it improves, less a tenth of what it loses on the others, on per-class
//! losses taken after refitting the class priors: near convergence an
//! honest update from a skewed (non-IID) shard lowers the loss of its own
//! classes and raises the others', which the round's other updates cancel,
//! so `direct`, `loss(model) - loss(model + (lr / n) x delta)`, scores a
//! fifth to a third of honest participations at or below zero on
//! Dirichlet(0.5) MNIST, and `class-gain` almost none. The other methods
//! ([`ScoreMethod`]) are kept for comparison and for models that are not
//! classifiers. Scores are evaluated on a validation sample
//! of `validation_samples` examples drawn from the operator's validation
//! set with a seed derived from the configured seed, the round and the
//! model ([`scoring_seed`], [`validation_indices`]). Everything is
//! deterministic, so anyone holding the published model, the update
//! payloads and the validation set recomputes the same scores. This is the
//! loss-difference score Templar's validators compute per miner; the
//! evaluation itself is behind the [`Evaluator`] trait (the binary wires
//! the engine in), because this library knows no ONNX.
//!
//! **Flags.** An update whose cosine similarity to an earlier-accepted
//! update of the same round is at least `copy_cosine_min` is a copy; one
//! whose L2 norm is below `free_rider_norm_ratio` times the round's median
//! norm is a free-rider (a zero or token update); one whose cosine with
//! the sum of the round's other updates is within `noise_sigmas /
//! sqrt(dimension)` of zero, and with each of them that is neither a
//! free-rider nor a copy of it within twice that, is noise (a random
//! direction is nearly orthogonal to everything in high dimension; honest
//! updates of one model are not: near convergence the others' sum may
//! cancel out, but some other update of the round shares directions with
//! an honest one). An update that repeats one of an earlier round is a
//! free-rider too ([`replay`], flagged by the coordinator, which keeps the
//! history).
//! Flagged and unscored updates earn nothing.
//!
//! **Rewards.** The round's pool is split by `f(stake) x max(score, 0)`
//! (`f` is the stake transform of the aggregation weights), with each
//! device's share capped at `weights.max_share` by water-filling as the
//! aggregation weights are ([`reward_shares`]). Sample counts, which are a
//! device's claim, play no part: nothing a device says raises its reward.
//!
//! **Cost.** Scoring runs `(1 + n) x validation_samples` forward passes
//! for `n` updates (`class-gain` and `direct`; `2 + n` for `leave-one-out`
//! and `marginal`, `2 + 2n` for `shapley`); training ran about `3 x` (forward and backward, the
//! usual estimate of training at three forward passes, e.g. Kaplan et al.
//! 2020, "Scaling Laws for Neural Language Models", §2.1) the samples the
//! round's plan trains on, estimated as `n` times the median device's
//! (sample counts are claims). [`ScoringCost`] reports the ratio, and
//! [`budgeted_samples`] shrinks the sample to keep it within
//! `cost_budget` (down to `validation_samples_min`).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use fedge_proto::ModelVersion;
use fedge_proto::msg::TrainingPlan;

use crate::robust::l2_norm;
use crate::strategy::ServerOpt;

pub mod class_gain;
pub mod replay;
mod rewards;

pub use rewards::{
    clipped_score, rating_inputs, reward_shares, reward_weight, rewards, rewards_in_key_order,
};

/// A classifier's class scores (logits) on validation examples, row-major
/// (`labels.len()` rows of `classes`), and each example's label.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassScores {
    pub classes: usize,
    pub scores: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Evaluates a model's parameters on the operator's validation set.
pub trait Evaluator: Send {
    /// How many validation examples are held.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Mean loss of `params` (in the canonical layout) on the examples at
    /// `indices` (each below [`Evaluator::len`]).
    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String>;

    /// Mean loss and accuracy of `params` on the examples at `indices`;
    /// the accuracy is None where the evaluator has no notion of one.
    fn loss_and_accuracy(
        &mut self,
        params: &[f32],
        indices: &[usize],
    ) -> Result<(f64, Option<f64>), String> {
        Ok((self.loss(params, indices)?, None))
    }

    /// The class scores of `params` on the examples at `indices`, for
    /// [`ScoreMethod::ClassGain`]; None where the model is not a
    /// classifier (a regression loss).
    fn class_scores(
        &mut self,
        _params: &[f32],
        _indices: &[usize],
    ) -> Result<Option<ClassScores>, String> {
        Ok(None)
    }
}

/// How updates are scored and rewarded (`[scoring]` in the TOML file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// The operator's validation set (a data spec: `mnist[:DIR]`,
    /// `idx:IMAGES,LABELS`, `text:FILE`), loaded by the binary. None: no
    /// update is scored and no reward is paid; the ledger still records
    /// every round.
    pub validation: Option<String>,
    /// Only these examples of the validation set (`START..END`).
    pub validation_range: Option<String>,
    /// How an update's effect is measured.
    pub method: ScoreMethod,
    /// Examples per round's validation sample, at most (the bound on
    /// scoring cost) ...
    pub validation_samples: usize,
    /// ... fewer when scoring that many would cost more than this
    /// fraction of the round's training compute (devices with small
    /// shards train little), down to `validation_samples_min` (0: always
    /// `validation_samples`). The sample taken is in the round's record.
    pub cost_budget: f64,
    /// The fewest examples a round is scored on, whatever the budget.
    pub validation_samples_min: usize,
    /// An update at least this cosine-similar to an earlier one of the
    /// same round is a copy.
    pub copy_cosine_min: f64,
    /// An update with a norm below this fraction of the round's median
    /// norm is a free-rider.
    pub free_rider_norm_ratio: f64,
    /// An update whose cosine similarity to the sum of the round's other
    /// updates is within `noise_sigmas / sqrt(dimension)` of zero, and to
    /// each of them that is neither a free-rider nor a copy of it within
    /// twice that, is noise: a random direction has cosine about `N(0,
    /// 1/dimension)` with any fixed vector, while honest updates of one model share its loss
    /// landscape and are aligned with the others, or (a skewed shard)
    /// against them, far beyond that (0: no noise flag; meaningful for
    /// models of thousands of parameters and more).
    pub noise_sigmas: f64,
    /// Weight of the newest score in a device's rating (an exponential
    /// moving average over the rounds it took part in).
    pub rating_alpha: f64,
    /// Reward units split among a round's participants (0: none).
    pub reward_pool: u64,
    /// Fraction of a device's stake each of its penalties slashes (a
    /// signed update refused as not finite or over the norm bound, two
    /// signed updates for one task, a copy), in [0, 1]. 0: penalties are
    /// recorded in the ledger as evidence but cost nothing.
    pub slash_fraction: f64,
    /// Whether copy penalties slash stake too. A copy is flagged by
    /// similarity, which honest devices with near-identical data (or an
    /// attacker who predicts an honest update and sends it first) can
    /// trigger: off by default, copies are recorded as evidence only.
    pub slash_copies: bool,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        ScoringConfig {
            validation: None,
            validation_range: None,
            method: ScoreMethod::ClassGain,
            validation_samples: 128,
            cost_budget: 0.1,
            validation_samples_min: 32,
            copy_cosine_min: 0.99,
            free_rider_norm_ratio: 0.05,
            noise_sigmas: 3.0,
            rating_alpha: 0.3,
            reward_pool: 1_000_000,
            slash_fraction: 0.0,
            slash_copies: false,
        }
    }
}

impl ScoringConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.validation_samples == 0 || self.validation_samples > 1 << 20 {
            return Err(format!(
                "scoring.validation_samples must be in [1, 1048576], got {}",
                self.validation_samples
            ));
        }
        if !(self.cost_budget >= 0.0 && self.cost_budget.is_finite()) {
            return Err(format!(
                "scoring.cost_budget must be a fraction >= 0, got {}",
                self.cost_budget
            ));
        }
        if self.validation_samples_min == 0 {
            return Err("scoring.validation_samples_min must be at least 1".into());
        }
        if !(self.copy_cosine_min > 0.0 && self.copy_cosine_min <= 1.0) {
            return Err(format!(
                "scoring.copy_cosine_min must be in (0, 1], got {}",
                self.copy_cosine_min
            ));
        }
        if !(0.0..1.0).contains(&self.free_rider_norm_ratio) {
            return Err(format!(
                "scoring.free_rider_norm_ratio must be in [0, 1), got {}",
                self.free_rider_norm_ratio
            ));
        }
        if !(self.noise_sigmas >= 0.0 && self.noise_sigmas.is_finite()) {
            return Err(format!(
                "scoring.noise_sigmas must be >= 0, got {}",
                self.noise_sigmas
            ));
        }
        if !(0.0..=1.0).contains(&self.slash_fraction) {
            return Err(format!(
                "scoring.slash_fraction must be in [0, 1], got {}",
                self.slash_fraction
            ));
        }
        if !(self.rating_alpha > 0.0 && self.rating_alpha <= 1.0) {
            return Err(format!(
                "scoring.rating_alpha must be in (0, 1], got {}",
                self.rating_alpha
            ));
        }
        Ok(())
    }
}

/// How an update's effect on the validation loss is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreMethod {
    /// The default: the class-weighted sum of the update's per-class
    /// improvements, the classes it makes worse counted at a tenth, as one
    /// of the round's `n` parts of its mean step, on losses taken after
    /// refitting one offset per class (so moving the class priors gains
    /// nothing). Honest updates from skewed shards gain on their own
    /// classes; see [`class_gain`]. Needs a classifier
    /// ([`Evaluator::class_scores`]). Noise, copies and free-riders go
    /// unpaid by their flags.
    ClassGain,
    /// `loss(model) - loss(model + (lr/n) x delta_i)`: the update alone,
    /// as one of the round's `n` parts of its mean step.
    Direct,
    /// `loss(model + lr x mean without i) - loss(model + lr x mean)`: what
    /// the round's equal-weight mean step loses without the update (the
    /// leave-one-out value of data valuation, e.g. Ghorbani & Zou 2019,
    /// "Data Shapley", §2). Honest updates from skewed (non-IID) shards
    /// that hurt on their own but complete the others score positive; a
    /// zero update dilutes the mean and scores negative.
    LeaveOneOut,
    /// `loss(model + (lr/n) x (sum - delta_i)) - loss(model + (lr/n) x
    /// sum)`: what the round's step loses without the update, the others
    /// keeping their `1/n` parts (no renormalisation, which would change
    /// the step's length and score that instead of the update).
    Marginal,
    /// The mean of `direct` and `marginal`: the Shapley value of the update
    /// in the game "the round's step made of these updates" when the loss
    /// is quadratic over the step (for a quadratic game the Shapley value
    /// is exactly the mean of the first-in and the last-in marginal
    /// contributions; Shapley 1953, e.g. Ghorbani & Zou 2019, "Data
    /// Shapley"). Updates from skewed shards that hurt on their own but
    /// complete the others get the credit of the interaction, split
    /// evenly. Costs twice the evaluations of the others.
    Shapley,
}

/// The server learning rate an update is applied at.
pub fn server_lr(opt: &ServerOpt) -> f64 {
    match *opt {
        ServerOpt::Avg { lr }
        | ServerOpt::Momentum { lr, .. }
        | ServerOpt::Adam { lr, .. }
        | ServerOpt::Yogi { lr, .. }
        | ServerOpt::Adagrad { lr, .. } => lr,
    }
}

/// The step one of `n` updates is scored at: `lr / n`.
pub fn applied_step(lr: f64, n: usize) -> f64 {
    lr / n.max(1) as f64
}

/// The seed of round `round_id`'s validation sample: blake3 (key
/// derivation, context `"fedge scoring seed v1"`) of the configured seed,
/// the round and the model the round's updates are applied to.
pub fn scoring_seed(seed: u64, round_id: u64, model: &ModelVersion) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("fedge scoring seed v1");
    h.update(&seed.to_le_bytes());
    h.update(&round_id.to_le_bytes());
    h.update(&model.0);
    *h.finalize().as_bytes()
}

/// `min(m, n)` distinct indices below `n`, drawn by a partial
/// Fisher-Yates shuffle driven by ChaCha8 from `seed` (each draw uniform by
/// rejection, so the result depends on nothing but the seed), in
/// ascending order.
pub fn validation_indices(seed: &[u8; 32], n: usize, m: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::from_seed(*seed);
    let m = m.min(n);
    let mut pool: Vec<usize> = (0..n).collect();
    for i in 0..m {
        let span = (n - i) as u64;
        // Largest multiple of span that fits: reject above it.
        let zone = u64::MAX - (u64::MAX % span);
        let r = loop {
            let x = rng.next_u64();
            if x < zone {
                break x % span;
            }
        };
        pool.swap(i, i + r as usize);
    }
    let mut out = pool[..m].to_vec();
    out.sort_unstable();
    out
}

/// Cosine similarity of `a` with an f64 vector (0 when either is zero).
fn cosine64(a: &[f32], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let x = f64::from(x);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// What scoring found about one update.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateScore {
    /// loss before - loss after (None: not scored).
    pub score: Option<f64>,
    pub norm: f64,
    /// The earlier update (its position) this one copies.
    pub copy_of: Option<usize>,
    /// Largest cosine similarity to an earlier update of the round.
    pub similarity: f64,
    /// Cosine similarity to the sum of the round's other updates.
    pub alignment: f64,
    pub free_rider: bool,
    /// Uncorrelated with the rest of the round (see
    /// [`ScoringConfig::noise_sigmas`]).
    pub noise: bool,
}

/// A round's scores and what they cost.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundScores {
    pub base_loss: Option<f64>,
    pub updates: Vec<UpdateScore>,
    /// Why the updates are unscored, if they are.
    pub error: Option<String>,
    pub cost: ScoringCost,
}

/// Scoring cost against training cost, in forward passes of one example.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScoringCost {
    /// Examples evaluated by scoring: `(1 + scored) x sample size`.
    pub scoring_passes: u64,
    /// Examples the round's devices trained on (per the plan), each
    /// counted as 3 forward passes.
    pub training_passes: u64,
    /// `scoring_passes / training_passes` (0 when nothing trained).
    pub fraction: f64,
}

impl ScoringCost {
    /// Records `passes` examples evaluated, and the fraction.
    fn count(&mut self, passes: u64) {
        self.scoring_passes = passes;
        self.fraction = if self.training_passes == 0 {
            0.0
        } else {
            passes as f64 / self.training_passes as f64
        };
    }
}

/// The validation sample a round of `updates` is scored on: at most
/// `cfg.validation_samples`, and no more than keeps scoring within
/// `cfg.cost_budget` of the round's training compute (`training_examples`
/// at 3 forward passes each; scoring takes one pass per example per
/// evaluation of the method), but at least `cfg.validation_samples_min`.
pub fn budgeted_samples(cfg: &ScoringConfig, updates: usize, training_examples: u64) -> usize {
    if cfg.cost_budget == 0.0 {
        return cfg.validation_samples;
    }
    let n = updates as f64;
    let evaluations = match cfg.method {
        ScoreMethod::ClassGain | ScoreMethod::Direct => 1.0 + n,
        ScoreMethod::LeaveOneOut | ScoreMethod::Marginal => 2.0 + n,
        ScoreMethod::Shapley => 2.0 + 2.0 * n,
    };
    let affordable = cfg.cost_budget * 3.0 * training_examples as f64 / evaluations;
    let floor = cfg.validation_samples_min.min(cfg.validation_samples);
    (affordable.floor() as usize).clamp(floor, cfg.validation_samples)
}

/// A score for a loss that is not finite: the worst there is.
pub const NON_FINITE_SCORE: f64 = f64::MIN;

/// Examples one device trains on in a round under `plan`, given its
/// sample count (already bounded by the plan).
pub fn training_examples(plan: &TrainingPlan, samples: u64) -> u64 {
    if plan.local_steps > 0 {
        u64::from(plan.local_steps) * u64::from(plan.batch_size)
    } else {
        samples.saturating_mul(u64::from(plan.local_epochs.max(1)))
    }
}

/// Scores a round's updates (`deltas`, as combined, in acceptance order)
/// against `base` with server learning rate `lr` ([`ScoreMethod`]).
/// `training_examples` are the examples the round's devices trained on
/// (for the cost). With no evaluator only the flags are computed.
pub fn score_round(
    cfg: &ScoringConfig,
    evaluator: Option<&mut dyn Evaluator>,
    seed: &[u8; 32],
    base: &[f32],
    lr: f64,
    deltas: &[&[f32]],
    training_examples: u64,
) -> RoundScores {
    let norms: Vec<f64> = deltas.iter().map(|d| l2_norm(d)).collect();
    let mut sorted = norms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.is_empty() {
        0.0
    } else {
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        }
    };
    let dim = deltas.first().map_or(0, |d| d.len());
    let mut total = vec![0f64; dim];
    for d in deltas {
        for (t, &x) in total.iter_mut().zip(d.iter()) {
            *t += f64::from(x);
        }
    }
    let noise_below = if dim > 0 {
        cfg.noise_sigmas / (dim as f64).sqrt()
    } else {
        0.0
    };
    // Pairwise cosines, each computed once: row j holds cos(i, j) for
    // every other update i.
    let n = deltas.len();
    let mut pairs = vec![vec![0f64; n]; n];
    for j in 0..n {
        for i in 0..j {
            let c = cosine(deltas[i], deltas[j]);
            pairs[j][i] = c;
            pairs[i][j] = c;
        }
    }
    let free_riders: Vec<bool> = norms
        .iter()
        .map(|&x| x <= cfg.free_rider_norm_ratio * median)
        .collect();
    let mut updates: Vec<UpdateScore> = (0..n)
        .map(|j| {
            let cos = &pairs[j][..j];
            // A partner shares directions beyond twice the noise band (a
            // random direction reaches that with one given update with
            // probability about 2e-9 at 3 sigmas, so a noise sender does
            // not find one by chance among the round's updates); a
            // free-rider is no partner: a tiny update sent along a noise
            // sender's direction must not vouch for it, nor can a copy (a
            // second key re-sending the noise).
            let unlike_all = (0..n)
                .filter(|&i| i != j && !free_riders[i] && pairs[j][i] < cfg.copy_cosine_min)
                .all(|i| pairs[j][i].abs() < 2.0 * noise_below);
            let free_rider = free_riders[j];
            let alignment = if deltas.len() > 1 {
                // The others, copies of this update aside (a second key
                // re-sending it must not make it look aligned).
                let mut others: Vec<f64> = total
                    .iter()
                    .zip(deltas[j].iter())
                    .map(|(&t, &x)| t - f64::from(x))
                    .collect();
                for i in (0..n).filter(|&i| i != j && pairs[j][i] >= cfg.copy_cosine_min) {
                    for (o, &x) in others.iter_mut().zip(deltas[i].iter()) {
                        *o -= f64::from(x);
                    }
                }
                cosine64(deltas[j], &others)
            } else {
                0.0
            };
            UpdateScore {
                score: None,
                norm: norms[j],
                copy_of: cos.iter().position(|&c| c >= cfg.copy_cosine_min),
                similarity: cos.iter().copied().fold(0.0, f64::max),
                alignment,
                free_rider,
                noise: n > 1
                    && cfg.noise_sigmas > 0.0
                    && !free_rider
                    && alignment.abs() < noise_below
                    && unlike_all,
            }
        })
        .collect();
    let mut cost = ScoringCost {
        training_passes: training_examples.saturating_mul(3),
        ..Default::default()
    };
    let Some(eval) = evaluator else {
        return RoundScores {
            base_loss: None,
            updates,
            error: Some("no validation set configured".into()),
            cost,
        };
    };
    let idx = validation_indices(seed, eval.len(), cfg.validation_samples);
    if idx.is_empty() {
        return RoundScores {
            base_loss: None,
            updates,
            error: Some("the validation set is empty".into()),
            cost,
        };
    }
    if cfg.method == ScoreMethod::ClassGain {
        let mut passes = 0;
        let step = applied_step(lr, deltas.len());
        let result = class_gain::score(eval, &idx, base, step, median, deltas, &mut passes);
        cost.count(passes);
        return match result {
            Ok((base_loss, scores)) => {
                for (u, s) in updates.iter_mut().zip(scores) {
                    u.score = Some(s);
                }
                RoundScores {
                    base_loss: Some(base_loss),
                    updates,
                    error: None,
                    cost,
                }
            }
            Err(e) => RoundScores {
                base_loss: None,
                updates,
                error: Some(e),
                cost,
            },
        };
    }
    let base_loss = match eval.loss(base, &idx) {
        Ok(l) if l.is_finite() => l,
        Ok(l) => {
            return RoundScores {
                base_loss: None,
                updates,
                error: Some(format!("the current model's validation loss is {l}")),
                cost,
            };
        }
        Err(e) => {
            return RoundScores {
                base_loss: None,
                updates,
                error: Some(format!("evaluating the current model: {e}")),
                cost,
            };
        }
    };
    let mut passes = idx.len() as u64;
    let mut params = vec![0f32; base.len()];
    let mut failed = None;
    let method = cfg.method;
    // Direct compares model + (lr/n) delta_i with the model; the others
    // compare the round's step without update i with the whole step
    // (`total`, the sum of the round's updates, at lr/n each).
    let uses_direct = matches!(method, ScoreMethod::Direct | ScoreMethod::Shapley);
    let uses_without = !matches!(method, ScoreMethod::Direct);
    let full_loss = if uses_without {
        let step = lr / n as f64;
        for ((p, &b), &t) in params.iter_mut().zip(base).zip(&total) {
            *p = (f64::from(b) + step * t) as f32;
        }
        passes += idx.len() as u64;
        match eval.loss(&params, &idx) {
            Ok(l) if l.is_finite() => l,
            Ok(_) => f64::INFINITY,
            Err(e) => {
                failed = Some(format!("evaluating the round's step: {e}"));
                f64::NAN
            }
        }
    } else {
        f64::NAN
    };
    for (u, d) in updates.iter_mut().zip(deltas) {
        if failed.is_some() {
            break;
        }
        let mut direct = None;
        if uses_direct {
            let step = applied_step(lr, n);
            for ((p, &b), &x) in params.iter_mut().zip(base).zip(d.iter()) {
                *p = (f64::from(b) + step * f64::from(x)) as f32;
            }
            passes += idx.len() as u64;
            match eval.loss(&params, &idx) {
                Ok(l) if l.is_finite() => direct = Some(base_loss - l),
                Ok(_) => direct = Some(NON_FINITE_SCORE),
                Err(e) => {
                    failed = Some(format!("evaluating an update: {e}"));
                    break;
                }
            }
        }
        let mut without = None;
        if uses_without {
            // Leave-one-out renormalises the mean over the others; the
            // marginal keeps each other update at its 1/n part.
            let step = match method {
                ScoreMethod::LeaveOneOut if n > 1 => lr / (n - 1) as f64,
                ScoreMethod::LeaveOneOut => 0.0,
                _ => lr / n as f64,
            };
            for (((p, &b), &t), &x) in params.iter_mut().zip(base).zip(&total).zip(d.iter()) {
                *p = (f64::from(b) + step * (t - f64::from(x))) as f32;
            }
            passes += idx.len() as u64;
            match eval.loss(&params, &idx) {
                Ok(l) => {
                    without = Some(match (l.is_finite(), full_loss.is_finite()) {
                        (true, true) => l - full_loss,
                        // The step is broken only with this update in it.
                        (true, false) => NON_FINITE_SCORE,
                        _ => 0.0,
                    })
                }
                Err(e) => {
                    failed = Some(format!("evaluating an update: {e}"));
                    break;
                }
            }
        }
        u.score = match (direct, without) {
            (Some(a), Some(b)) if a == NON_FINITE_SCORE || b == NON_FINITE_SCORE => {
                Some(NON_FINITE_SCORE)
            }
            (Some(a), Some(b)) => Some(0.5 * (a + b)),
            (a, b) => a.or(b),
        };
    }
    if failed.is_some() {
        // All or nothing: a round is scored completely or not at all.
        for u in &mut updates {
            u.score = None;
        }
    }
    cost.count(passes);
    RoundScores {
        base_loss: Some(base_loss),
        updates,
        error: failed,
        cost,
    }
}

impl UpdateScore {
    /// A copy, a free-rider or noise.
    pub fn flagged(&self) -> bool {
        self.copy_of.is_some() || self.free_rider || self.noise
    }
}

#[cfg(test)]
mod tests;
