//! Settling a round: its accepted updates scored on the operator's
//! validation set, flagged (copies, free-riders, stale replays of earlier
//! rounds' updates) and rewarded (see
//! [`crate::scoring`]). The result goes out as [`Event::RoundSettled`]
//! just before the version it produced is published; the driver writes it
//! to the ledger with the publication.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::ledger::Held;
use super::{Contribution, Coordinator, Event, SettledEntry, Settlement};
use crate::robust::Values;
use crate::scoring::{self, Evaluator, RoundScores, UpdateScore};

/// The operator's validation set, shared by the coordinator (evaluation
/// at a round's close) and the close job it hands out (scoring): never
/// both at once, as a round's close job is out only after its evaluation
/// and the next close starts only after it came back.
pub(super) type SharedEvaluator = Arc<Mutex<Box<dyn Evaluator>>>;

/// The evaluator, locked (a job that panicked holding it leaves it as
/// it was: its methods take no lock of their own).
pub(super) fn lock(e: &SharedEvaluator) -> MutexGuard<'_, Box<dyn Evaluator>> {
    e.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What scoring a round needs of it, taken out of the round so that a
/// close job can own it: the held updates (their deltas with scoring
/// on), the scoring seed, the server learning rate, the estimated
/// training examples and the budgeted scoring configuration.
pub(super) struct Scoring {
    held: Vec<Held>,
    seed: [u8; 32],
    lr: f64,
    examples: u64,
    budgeted: scoring::ScoringConfig,
}

impl Scoring {
    /// Scores the updates against `base` (the model they were applied
    /// to) on the evaluator's validation sample. Pure given the
    /// evaluator: O(updates x validation sample) forward passes.
    pub(super) fn score(&self, evaluator: Option<&mut dyn Evaluator>, base: &[f32]) -> RoundScores {
        let held = &self.held;
        let examples = self.examples;
        let deltas: Option<Vec<&[f32]>> = held.iter().map(|h| h.delta.as_deref()).collect();
        match deltas.as_ref() {
            Some(d) if !held.is_empty() => scoring::score_round(
                &self.budgeted,
                evaluator,
                &self.seed,
                base,
                self.lr,
                d,
                examples,
            ),
            _ => RoundScores {
                base_loss: None,
                updates: held
                    .iter()
                    .map(|_| UpdateScore {
                        score: None,
                        norm: 0.0,
                        copy_of: None,
                        similarity: 0.0,
                        alignment: 0.0,
                        free_rider: false,
                        noise: false,
                    })
                    .collect(),
                error: Some(if held.is_empty() {
                    "no accepted updates".into()
                } else {
                    "no validation set configured".into()
                }),
                cost: scoring::ScoringCost {
                    training_passes: examples.saturating_mul(3),
                    ..Default::default()
                },
            },
        }
    }
}

impl Coordinator {
    /// What settling will need of an accepted update (its delta, already
    /// discounted, only when scoring is on; `task` is its task's round and
    /// discount).
    pub(super) fn held(
        &self,
        manifest_hash: [u8; 32],
        payload_hash: [u8; 32],
        delta: &Values,
        sample_count: u64,
        task: (u64, f64),
    ) -> Held {
        Held {
            task_round: task.0,
            discount: task.1,
            manifest_hash,
            payload_hash,
            // Scored at float32 (a partial rounded).
            delta: self
                .evaluator
                .is_some()
                .then(|| delta.to_f32().into_owned()),
            examples: scoring::training_examples(
                &self.cfg.plan,
                self.samples_counted(sample_count),
            ),
        }
    }

    /// Scores and rewards the open round's accepted updates (`settled`:
    /// their contribution records with final shares, in acceptance order)
    /// and emits [`Event::RoundSettled`], all on this task (a leaf's
    /// close; a root's runs [`Scoring::score`] in its close job). Call
    /// before publishing, while the current model is the one the updates
    /// were applied to.
    pub(super) fn settle(&mut self, round_id: u64, settled: &[Contribution]) {
        let scoring = self.scoring(round_id);
        let scores = {
            let mut evaluator = self.evaluator.as_ref().map(|e| lock(e));
            scoring.score(
                evaluator
                    .as_deref_mut()
                    .map(|e| &mut **e as &mut dyn Evaluator),
                &self.current.params.values,
            )
        };
        self.settle_scored(round_id, settled, scoring, scores);
    }

    /// What scoring the open round needs, taken from it (its held updates).
    pub(super) fn scoring(&mut self, round_id: u64) -> Scoring {
        let held = self.round.book.take_held();
        let seed = scoring::scoring_seed(self.cfg.seed, round_id, &self.current_version);
        let lr = scoring::server_lr(&self.cfg.strategy.server_opt);
        // Sample counts are claims: the training compute is estimated as n
        // times the median device's, so no claim moves it far.
        let mut claimed: Vec<u64> = held.iter().map(|h| h.examples).collect();
        claimed.sort_unstable();
        let examples = claimed
            .get(claimed.len() / 2)
            .map_or(0, |m| m.saturating_mul(claimed.len() as u64));
        let budgeted = scoring::ScoringConfig {
            validation_samples: scoring::budgeted_samples(&self.cfg.scoring, held.len(), examples),
            ..self.cfg.scoring.clone()
        };
        Scoring {
            held,
            seed,
            lr,
            examples,
            budgeted,
        }
    }

    /// Settles the open round with `scores` ([`Scoring::score`] of
    /// `scoring`): stale replays flagged, rewards split, the record emitted.
    pub(super) fn settle_scored(
        &mut self,
        round_id: u64,
        settled: &[Contribution],
        scoring: Scoring,
        mut scores: RoundScores,
    ) {
        let Scoring {
            held,
            seed,
            lr,
            examples: _,
            budgeted,
        } = scoring;
        let deltas: Option<Vec<&[f32]>> = held.iter().map(|h| h.delta.as_deref()).collect();
        // Scored rounds only: their records carry the flag rules, so a
        // verifier replays the same history.
        if let (Some(d), None) = (&deltas, &scores.error) {
            self.replays
                .flag_and_keep(&mut scores.updates, d, self.cfg.scoring.copy_cosine_min);
        }
        let reward_weights: Vec<f64> = settled
            .iter()
            .zip(&scores.updates)
            .map(|(c, u)| {
                scoring::reward_weight(
                    self.cfg.weights.stake,
                    c.stake.unwrap_or(0.0),
                    scoring::clipped_score(u),
                )
            })
            .collect();
        let pool = self.cfg.scoring.reward_pool;
        // Split in device-key order, the order of the ledger's entries, so
        // a verifier's floating-point sums are these.
        let devices: Vec<&str> = settled.iter().map(|c| c.device.as_str()).collect();
        let rewards = scoring::rewards_in_key_order(
            pool,
            &devices,
            &reward_weights,
            self.cfg.weights.max_share,
        );
        let entries: Vec<SettledEntry> = settled
            .iter()
            .zip(&held)
            .zip(&scores.updates)
            .zip(&rewards)
            .map(|(((c, h), u), &reward)| SettledEntry {
                device: c.device.clone(),
                manifest_hash: h.manifest_hash,
                payload_hash: h.payload_hash,
                stake: c.stake,
                weight: c.share,
                score: u.score,
                norm: u.norm,
                copy_of: u.copy_of.map(|i| settled[i].device.clone()),
                similarity: u.similarity,
                alignment: u.alignment,
                free_rider: u.free_rider,
                noise: u.noise,
                reward,
                task_round: h.task_round,
                discount: h.discount,
            })
            .collect();
        let scored = scores.error.is_none();
        let samples = if scored {
            let held = self.evaluator.as_ref().map_or(0, |e| lock(e).len());
            budgeted.validation_samples.min(held) as u32
        } else {
            0
        };
        for e in &entries {
            if e.copy_of.is_some() {
                self.note_copy(round_id, &e.device, e.manifest_hash, e.payload_hash);
            }
        }
        let penalties = self.take_penalties();
        self.ratings.settle(self.cfg.scoring.rating_alpha, &entries);
        self.event(Event::RoundSettled(Box::new(Settlement {
            round_id,
            model_before: self.current_version,
            scoring_seed: seed,
            validation_samples: samples,
            method: self.cfg.scoring.method,
            server_lr: lr,
            reward_pool: pool,
            reward_cap: self.cfg.weights.max_share,
            stake_transform: self.cfg.weights.stake,
            rating_alpha: self.cfg.scoring.rating_alpha,
            staleness_exponent: self.staleness_exponent(),
            flag_thresholds: self.flag_thresholds(),
            base_loss: scores.base_loss,
            error: scores.error,
            cost: scores.cost,
            entries,
            penalties,
            evaluation: self.round.evaluation.summary(),
        })));
    }

    fn flag_thresholds(&self) -> [f64; 3] {
        let s = &self.cfg.scoring;
        [s.copy_cosine_min, s.free_rider_norm_ratio, s.noise_sigmas]
    }

    /// FedBuff's staleness exponent (0 for synchronous rounds).
    fn staleness_exponent(&self) -> f64 {
        self.cfg
            .strategy
            .buffered
            .as_ref()
            .map_or(0.0, |b| b.staleness_exponent)
    }

    /// A rolled-back round: its updates were discarded, so its record has
    /// no participants and pays nothing.
    pub(super) fn settle_discarded(&mut self, round_id: u64) {
        self.round.book.take_held();
        let lr = scoring::server_lr(&self.cfg.strategy.server_opt);
        let penalties = self.take_penalties();
        self.event(Event::RoundSettled(Box::new(Settlement {
            round_id,
            model_before: self.current_version,
            scoring_seed: scoring::scoring_seed(self.cfg.seed, round_id, &self.current_version),
            validation_samples: 0,
            method: self.cfg.scoring.method,
            server_lr: lr,
            reward_pool: self.cfg.scoring.reward_pool,
            reward_cap: self.cfg.weights.max_share,
            stake_transform: self.cfg.weights.stake,
            rating_alpha: self.cfg.scoring.rating_alpha,
            staleness_exponent: self.staleness_exponent(),
            flag_thresholds: self.flag_thresholds(),
            base_loss: None,
            error: Some("round rolled back: its updates were discarded".into()),
            cost: Default::default(),
            entries: Vec::new(),
            penalties,
            evaluation: self.round.evaluation.summary(),
        })));
    }
}

impl Coordinator {
    /// Rebuilds the stale-replay history at startup from the last scored
    /// records of the (verified) chain, whose updates `payload` reads
    /// (round, payload hash): the history a verifier builds going through
    /// the chain, so flags recorded after a restart recompute. A round
    /// whose payloads are missing or do not decode is left out, with a
    /// warning.
    pub fn restore_replay_history(
        &mut self,
        records: &[fedge_proto::ledger::LedgerRecord],
        mut payload: impl FnMut(u64, &[u8; 32]) -> Result<Vec<u8>, String>,
    ) {
        let dim = self.current.params.values.len();
        let scored: Vec<_> = records.iter().filter(|r| r.flag_rules.is_some()).collect();
        let from = scored.len().saturating_sub(scoring::replay::ROUNDS_KEPT);
        for r in &scored[from..] {
            let deltas: Result<Vec<Vec<f32>>, String> = r
                .entries
                .iter()
                .map(|e| {
                    let bytes = payload(r.round_id, &e.payload_hash)?;
                    fedge_proto::update::decode_any(&bytes, dim, &self.cfg.limits)
                        .map_err(|e| e.to_string())
                })
                .collect();
            match deltas {
                Ok(d) => {
                    let (_, scaled) = crate::ledger::as_scored(r, &d);
                    let refs: Vec<&[f32]> = scaled.iter().map(|d| &**d).collect();
                    self.replays.remember(&refs);
                }
                Err(e) => {
                    tracing::warn!(
                        round_id = r.round_id,
                        error = %e,
                        "a scored round's updates are not readable: replays of it go unflagged"
                    );
                    // Its place in the window still counts, as a
                    // verifier's does.
                    self.replays.remember(&[]);
                }
            }
        }
    }
}
