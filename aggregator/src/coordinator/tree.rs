//! The coordinator's part in a tree of aggregators.
//!
//! - **Leaf.** A leaf serves devices as any aggregator does (admission,
//!   authentication, transfers, per-update checks, share caps and the
//!   configured combiner), but its rounds are its parent's: it opens round
//!   `r` when its parent offers it ([`Coordinator::handle_parent_round`]:
//!   the parent's round id, model, plan and deadline), and when the round
//!   closes it publishes nothing. Its combined update goes out as a
//!   [`Partial`] ([`Output::Forward`]): the devices' weighted mean delta
//!   with the sum of their final weights, so a parent that weights each
//!   partial by that sum computes the same mean as one aggregator over all
//!   the devices. Between rounds it waits for its parent, pacing devices
//!   away; the parent's next model becomes its current version, and the
//!   run ends when the parent's does ([`Coordinator::handle_parent_finished`]).
//!   A round with too few updates, or one whose devices mostly diverged,
//!   is given up to the parent instead (`TaskAbandoned`), so the parent's
//!   round need not wait for it and the parent's rollback rule sees leaves
//!   whose devices diverged.
//! - **Root.** A root takes partial aggregates only, from the leaves its
//!   configuration names ([`super::LeafBounds`]): any other key is refused
//!   when it authenticates, a device update is refused, and a partial's
//!   claims are bounded (device count, and weight up to the device count
//!   times the largest weight one device can carry). Everything else is
//!   the ordinary round: a leaf is a participant whose update is its
//!   partial, weighted by the partial's total weight; the round's target
//!   (`devices_per_round`) is the partials it waits for, `min_devices`
//!   its quorum, the deadline leaves out a leaf that misses it.
//!
//! A node with both roles (a middle node) combines its leaves' partials
//! and forwards the result as its own partial, counting the devices under
//! it: the design does not stop at two levels.

use std::time::Instant;

use fedge_proto::msg::{AbandonReason, TrainingPlan};
use fedge_proto::sign::{UpdateManifest, VerifyingKey};
use fedge_proto::{ModelBlob, ModelVersion, RejectCode};

use super::policy::Refusal;
use super::settle::Scoring;
use super::{Contribution, Coordinator, DurableUpdate, Event, Output, Round, RoundOutcome};
use crate::robust::Combined;
use crate::scoring::RoundScores;

/// What a leaf forwards to its parent when its round closes with enough
/// updates: the round's combined update and what the parent needs to
/// weigh and check it.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// The parent's round this answers.
    pub round_id: u64,
    /// The model the devices trained (the parent's, for that round).
    pub model_version: ModelVersion,
    /// The combined update (the devices' weighted mean delta, or what the
    /// configured robust combiner made of them), at float64: it travels
    /// so (`dense-f64`), and the parent's mean over partials is then one
    /// aggregator's over their devices to well under a float32 ulp.
    pub delta: Vec<f64>,
    /// Sum of the combined updates' final weights (after share caps).
    pub total_weight: f64,
    /// Devices under this partial (a middle node counts its leaves').
    pub devices: u32,
    /// Sum of the combined updates' claimed sample counts.
    pub samples: u64,
    /// Merkle root of the combined updates' signed-manifest hashes.
    pub manifests_root: [u8; 32],
    /// The round's training metrics, weighted means.
    pub metrics: Vec<(String, f64)>,
}

/// What a leaf tells its parent about a round that closed.
#[derive(Clone, Debug, PartialEq)]
pub enum Forward {
    Partial(Partial),
    /// The round ended with nothing to forward: too few updates, or most
    /// devices diverged (`reason` says which).
    Abandoned {
        round_id: u64,
        reason: AbandonReason,
        detail: String,
    },
}

/// A round the parent offered, with everything the leaf needs to run it.
#[derive(Clone, Debug)]
pub struct ParentRound {
    pub round_id: u64,
    pub model: ModelBlob,
    pub plan: TrainingPlan,
    /// When the leaf must have closed the round (the parent's deadline,
    /// less the time the partial's upload needs).
    pub deadline: Instant,
}

/// A leaf's link with its parent, as the coordinator keeps it.
#[derive(Default)]
pub(super) struct LeafState {
    /// No round open: the parent's next one not yet offered.
    pub awaiting: bool,
    /// The last round that closed here (the parent's next is later).
    pub last_closed: Option<u64>,
    /// The parent's plan for the open round.
    pub plan: Option<TrainingPlan>,
    /// Updates acknowledged before a restart, put back when the parent
    /// offers their round again.
    pub restored: Vec<DurableUpdate>,
    /// Devices under the open round's accepted updates (partials count
    /// theirs).
    pub devices: u64,
    /// Merkle root of the signed manifests of the round being closed,
    /// taken before its close job took the held updates.
    pub manifests_root: [u8; 32],
}

impl Coordinator {
    /// Whether this aggregator is a leaf of a parent.
    pub fn is_leaf(&self) -> bool {
        self.cfg.tree.leaf
    }

    /// A leaf between rounds: its last round closed and its parent has not
    /// offered the next.
    pub fn awaiting_parent(&self) -> bool {
        self.leaf.awaiting
    }

    /// Leaf: the parent offers `round`. The parent's model becomes the
    /// current version (published locally, for this leaf's devices), and
    /// the round opens with the parent's id, plan and deadline. A round of
    /// this leaf still open (the parent moved on without it) is aborted.
    pub fn handle_parent_round(&mut self, now: Instant, round: ParentRound) -> Result<(), String> {
        if !self.is_leaf() {
            return Err("this aggregator has no parent".into());
        }
        if self.finished {
            return Err("the run is finished".into());
        }
        if !self.leaf.awaiting {
            if round.round_id <= self.round.id {
                return Ok(()); // the round already open here
            }
            let why = format!(
                "the parent opened round {} before this round closed",
                round.round_id
            );
            self.abort_leaf_round(&why);
            // A close still out is for a round that is over.
            self.drop_close();
        } else if self.leaf.last_closed.is_some_and(|c| round.round_id <= c) {
            return Ok(()); // a round that already closed here
        }
        self.install_parent_model(round.round_id.saturating_sub(1), round.model)?;
        let dim = self.current.params.values.len();
        let combiner = self.strategy.combiner(dim, self.cfg.weights.max_share);
        self.round = Round::new(round.round_id, self.current_version, combiner);
        self.leaf.awaiting = false;
        self.leaf.plan = Some(round.plan);
        self.leaf.devices = 0;
        self.event(Event::RoundOpened {
            round_id: round.round_id,
            model_version: self.current_version,
        });
        self.arm_round(now);
        let deadline = self
            .round
            .deadline
            .map_or(round.deadline, |d| d.min(round.deadline));
        self.round.deadline = Some(deadline);
        if self.round.window_end.is_some_and(|w| w >= deadline) {
            self.round.window_end = None;
        }
        for u in std::mem::take(&mut self.leaf.restored) {
            if u.round_id == round.round_id {
                let device = u.device.clone();
                if let Err(e) = self.restore_update(now, u) {
                    tracing::warn!(%device, error = %e, "an acknowledged update was not restored");
                }
            }
        }
        // Payload checks that waited for a dropped close, and those not
        // handed out meanwhile, go on against this round.
        self.take_parked(now);
        Ok(())
    }

    /// Leaf: the parent has run all its rounds; `model` is its final one.
    pub fn handle_parent_finished(&mut self, now: Instant, model: ModelBlob) -> Result<(), String> {
        if !self.is_leaf() {
            return Err("this aggregator has no parent".into());
        }
        if self.finished {
            return Ok(());
        }
        if !self.leaf.awaiting {
            self.abort_leaf_round("the parent finished its run");
            // Nothing is forwarded any more: a close still out is moot;
            // the payload checks that waited for it are refused as late.
            self.drop_close();
            self.take_parked(now);
        }
        self.install_parent_model(self.round.id, model)?;
        self.finished = true;
        self.event(Event::Finished {
            final_version: self.current_version,
        });
        Ok(())
    }

    /// Makes the parent's model current (a publication here, recorded
    /// under `round_id`, the round that made it) unless it is already.
    fn install_parent_model(&mut self, round_id: u64, model: ModelBlob) -> Result<(), String> {
        if model.params.layout != self.current.params.layout {
            return Err("the parent's model has another parameter layout than this leaf's".into());
        }
        let blob = model.encode();
        let version = ModelVersion::of(&blob);
        if version == self.current_version {
            return Ok(());
        }
        self.lineage.push(self.current_version);
        let keep = self.cfg.versions_kept;
        if self.lineage.len() > keep {
            self.lineage.drain(..self.lineage.len() - keep);
        }
        self.make_current(round_id, version, model, blob);
        self.emit_checkpoint();
        Ok(())
    }

    /// Leaf: the open round closes. Its combined update goes to the parent
    /// (or, with too few updates or most devices diverged, the round is
    /// given up to it), and the leaf waits for the parent's next round.
    pub(super) fn close_leaf_round(&mut self, _now: Instant) {
        let round_id = self.round.id;
        let accepted = self.round.combiner.count();
        let (outcome, contributions, forward) = if self.rollback_due() {
            let detail = format!(
                "{} devices reported that training on model {} diverged",
                self.round.diverged, self.current_version
            );
            self.discard_diverged(detail)
        } else if accepted >= self.cfg.min_devices && accepted > 0 {
            // Combined (at float64) and scored off this task; forwarded
            // when the job is back (`forward_closed`).
            self.leaf.manifests_root = self.round.book.manifests_root();
            return self.start_close(accepted);
        } else {
            let detail = format!(
                "{accepted} updates by the deadline, {} needed",
                self.cfg.min_devices
            );
            let f = Forward::Abandoned {
                round_id,
                reason: AbandonReason::Failed,
                detail,
            };
            (RoundOutcome::Aborted, self.round.book.settle_aborted(), f)
        };
        self.leaf_round_closed(accepted, outcome, contributions);
        self.out.push_back(Output::Forward(Box::new(forward)));
    }

    /// Leaf: the round's close job is back with its combined update
    /// (float64) and its devices' scores. A combined update that is not
    /// finite is never forwarded (as a root never publishes one): the
    /// round is given up instead. Otherwise it goes to the parent as the
    /// round's partial aggregate.
    pub(super) fn forward_closed(
        &mut self,
        accepted: usize,
        combined: Combined<f64>,
        scoring: Scoring,
        scores: RoundScores,
    ) {
        let round_id = self.round.id;
        let broken = |v: &f64| !(v.is_finite() && (*v as f32).is_finite());
        let (outcome, contributions, forward) = if let Some(i) =
            combined.delta.iter().position(broken)
        {
            self.discard_diverged(format!(
                "the combined update is not finite at parameter {i}"
            ))
        } else {
            let contributions = self.round.book.settle_published(&combined.weights);
            self.settle_scored(round_id, &contributions, scoring, scores);
            let partial = Partial {
                round_id,
                model_version: self.round.model_version,
                total_weight: combined.weights.iter().sum(),
                delta: combined.delta,
                devices: u32::try_from(self.leaf.devices.max(accepted as u64)).unwrap_or(u32::MAX),
                samples: contributions.iter().map(|c| c.samples).sum(),
                manifests_root: self.leaf.manifests_root,
                metrics: self.strategy.aggregate_evaluate(self.round.book.metrics()),
            };
            (
                RoundOutcome::Forwarded,
                contributions,
                Forward::Partial(partial),
            )
        };
        self.leaf_round_closed(accepted, outcome, contributions);
        self.out.push_back(Output::Forward(Box::new(forward)));
    }

    /// Leaf: the round's updates are discarded and the round given up to
    /// the parent as diverged, saying `detail`.
    fn discard_diverged(&mut self, detail: String) -> (RoundOutcome, Vec<Contribution>, Forward) {
        let round_id = self.round.id;
        let c = self.round.book.settle_discarded(&detail);
        self.settle_discarded(round_id);
        let f = Forward::Abandoned {
            round_id,
            reason: AbandonReason::Diverged,
            detail,
        };
        (RoundOutcome::Aborted, c, f)
    }

    /// Leaf: the open round ends without anything forwarded.
    fn abort_leaf_round(&mut self, why: &str) {
        let accepted = self.accepted_in_round();
        let mut contributions = self.round.book.settle_aborted();
        for c in &mut contributions {
            c.reason = Some(format!("round aborted: {why}"));
        }
        self.leaf_round_closed(accepted, RoundOutcome::Aborted, contributions);
    }

    /// What follows any end of a leaf's round: records out, the round's
    /// transfers and timers cut, devices waiting for a slot paced away.
    fn leaf_round_closed(
        &mut self,
        accepted: usize,
        outcome: RoundOutcome,
        contributions: Vec<Contribution>,
    ) {
        let round_id = self.round.id;
        let metrics = self.strategy.aggregate_evaluate(self.round.book.metrics());
        self.round_closed(accepted, outcome, contributions, metrics);
        self.round.deadline = None;
        self.round.window_end = None;
        let waiting = std::mem::take(&mut self.round.waiting);
        for c in waiting.into_values() {
            self.pace_away(c.session, "waiting for the parent aggregator's next round");
        }
        self.leaf.awaiting = true;
        self.leaf.last_closed = Some(round_id);
    }

    /// Root: whether `key` may authenticate here (every key, unless this
    /// aggregator takes partial aggregates from named leaves).
    pub(super) fn admits_key(&self, key: &VerifyingKey) -> bool {
        match &self.cfg.tree.leaves {
            Some(l) => l.keys.contains(key.as_bytes()),
            None => true,
        }
    }

    /// The checks of a manifest's partial-aggregate claims: a root takes
    /// partials only and bounds them; any other aggregator takes none.
    pub(super) fn check_partial(&self, m: &UpdateManifest) -> Result<(), Refusal> {
        let (bounds, p) = match (&self.cfg.tree.leaves, &m.partial) {
            (None, None) => return Ok(()),
            (Some(b), Some(p)) => (b, p),
            (None, Some(_)) => {
                return Err((
                    RejectCode::ProtocolViolation,
                    "a partial aggregate, but this aggregator has no leaves: it takes device \
                     updates"
                        .into(),
                ));
            }
            (Some(_), None) => {
                return Err((
                    RejectCode::ProtocolViolation,
                    "a device update, but this aggregator is a root: it takes partial \
                     aggregates from its leaves"
                        .into(),
                ));
            }
        };
        if p.devices > bounds.devices_max {
            return Err((
                RejectCode::TooLarge,
                format!(
                    "a partial aggregate of {} devices; a leaf may combine at most {}",
                    p.devices, bounds.devices_max
                ),
            ));
        }
        let most = f64::from(p.devices) * bounds.device_weight_max;
        if p.total_weight > most * (1.0 + 1e-9) {
            return Err((
                RejectCode::WeightBound,
                format!(
                    "a partial aggregate of {} devices claims weight {}; at most {} \
                     (device_weight_max = {}) each",
                    p.devices, p.total_weight, most, bounds.device_weight_max
                ),
            ));
        }
        Ok(())
    }

    /// The plan of the open round: the parent's, for a leaf.
    pub(super) fn round_plan(&self) -> &TrainingPlan {
        self.leaf.plan.as_ref().unwrap_or(&self.cfg.plan)
    }
}
