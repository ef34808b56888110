//! Closing a round: combine what was accepted (or abort, or roll back),
//! settle the contribution records, publish the new version, open the
//! next round.
//!
//! **Rollback.** Devices report when local training on the round's model
//! diverged (`TaskAbandoned`, reason `Diverged`: the update was not
//! finite). When at least `min_devices` of a round's devices say so and
//! they outnumber the updates accepted in it, the model is taken to be
//! poisoned: the round publishes the version the current one was built
//! from (kept for download, up to `versions_kept` back) instead of
//! building on it, and its accepted updates are discarded. The devices of
//! a round are drawn among its check-ins, so a minority of the fleet sits
//! in a majority of a round's slots only by chance, and every report
//! costs the device its slot and its reward in that round.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use fedge_proto::{ModelBlob, ModelVersion, Params, RejectCode};

use super::{Coordinator, Event, Round, RoundOutcome};

impl Coordinator {
    /// Whether the open round's reports of divergence call for a rollback.
    pub(super) fn rollback_due(&self) -> bool {
        self.rollback_due_with(self.round.combiner.count())
    }

    /// Whether `accepted` updates against the open round's reports of
    /// divergence call for a rollback.
    fn rollback_due_with(&self, accepted: usize) -> bool {
        let diverged = self.round.diverged;
        self.cfg.rollback_on_divergence && diverged >= self.cfg.min_devices && diverged > accepted
    }

    /// Closes the open round: aborted, rolled back or (SecAgg+) published
    /// here; combined, scored and published through a close job
    /// otherwise ([`super::close`]). Nothing while a close is out.
    pub(super) fn close_round(&mut self, now: Instant) {
        if self.closing() {
            return;
        }
        if self.is_leaf() {
            return self.close_leaf_round(now);
        }
        let mut accepted = self.round.combiner.count();
        let mut secure_metrics = Vec::new();
        let round_id = self.round.id;
        let secure = self.round.secure.take();
        self.close_evaluation();
        // A secure round's accepted updates are its survivors, if it has
        // an outcome.
        let due = match &secure {
            Some(s) => {
                let summed = match s.server.outcome() {
                    Some(Ok(o)) => o.survivors.len(),
                    _ => 0,
                };
                self.rollback_due_with(summed)
            }
            None => self.rollback_due(),
        };
        let rollback = if due { self.rollback_target() } else { None };
        // Rolled back: the secure round's sum (if any) is discarded.
        let secure = if rollback.is_some() { None } else { secure };
        let (outcome, contributions) = if let Some(secure) = secure {
            let (outcome, contributions, summed, m) = self.close_secure(round_id, secure);
            accepted = summed;
            secure_metrics = m;
            (outcome, contributions)
        } else if let Some((to, model)) = rollback {
            let from = self.current_version;
            let why = format!(
                "round rolled back: {} devices reported that training on model {from} diverged",
                self.round.diverged
            );
            self.event(Event::RolledBack {
                round_id,
                from,
                to,
                diverged: self.round.diverged,
                accepted,
            });
            let contributions = self.round.book.settle_discarded(&why);
            self.settle_discarded(round_id);
            self.strategy.on_rollback();
            let blob = model.encode();
            (self.make_current(round_id, to, model, blob), contributions)
        } else if accepted >= self.cfg.min_devices && accepted > 0 {
            // Combined and scored off this task; published when it is back.
            return self.start_close(accepted);
        } else {
            (RoundOutcome::Aborted, self.round.book.settle_aborted())
        };
        self.finish_close(now, accepted, outcome, contributions, secure_metrics);
    }

    /// What follows a round's outcome: metrics, records and `RoundClosed`
    /// out, the checkpoint of a published version, the next round opened
    /// (or the run finished).
    pub(super) fn finish_close(
        &mut self,
        now: Instant,
        accepted: usize,
        outcome: RoundOutcome,
        contributions: Vec<super::Contribution>,
        secure_metrics: Vec<(String, f64)>,
    ) {
        let round_id = self.round.id;
        let published = matches!(outcome, RoundOutcome::Published(_));
        let mut metrics = self.strategy.aggregate_evaluate(self.round.book.metrics());
        metrics.extend(self.strategy.report());
        metrics.extend(secure_metrics);
        self.round_closed(accepted, outcome, contributions, metrics);
        if published {
            self.emit_checkpoint();
        }
        let dim = self.current.params.values.len();
        let combiner = self.strategy.combiner(dim, self.cfg.weights.max_share);
        let waiting = std::mem::take(&mut self.round.waiting);
        self.round = Round::new(round_id + 1, self.current_version, combiner);
        if self.cfg.rounds != 0 && round_id >= self.cfg.rounds {
            self.finished = true;
            self.event(Event::Finished {
                final_version: self.current_version,
            });
        } else {
            self.event(Event::RoundOpened {
                round_id: self.round.id,
                model_version: self.current_version,
            });
            self.arm_round(now);
        }
        // Requests held for a window that never got drawn (the round closed
        // first) are answered in the next round.
        for c in waiting.into_values() {
            self.requeue(now, c);
        }
    }

    /// What every closed round does, published or not, here or at a leaf:
    /// its contribution records and `RoundClosed` go out, and what was
    /// kept for it (old versions, manifests, slot timers) is let go.
    pub(super) fn round_closed(
        &mut self,
        accepted: usize,
        outcome: RoundOutcome,
        contributions: Vec<super::Contribution>,
        metrics: Vec<(String, f64)>,
    ) {
        let round_id = self.round.id;
        for c in contributions {
            self.event(Event::Contribution(c));
        }
        self.event(Event::RoundClosed {
            round_id,
            accepted,
            outcome,
            metrics,
        });
        let keep_from = self
            .policy
            .on_round_closed(round_id + 1, self.current_version);
        self.transfers.on_round_closed(keep_from);
        self.misconduct.forget_before(keep_from);
        self.slots.clear();
    }

    /// The version the current model was built from, with its model, if it
    /// is still held.
    fn rollback_target(&mut self) -> Option<(ModelVersion, ModelBlob)> {
        while let Some(v) = self.lineage.pop() {
            let decoded = self
                .transfers
                .model_blob(&v)
                .and_then(|b| ModelBlob::decode(&b, &self.cfg.limits).ok());
            if let Some(m) = decoded {
                return Some((v, m));
            }
        }
        None
    }

    /// Makes `model` (encoded as `blob`, version `version`) current and
    /// offers it for download: a new version, or an earlier one again (a
    /// rollback).
    pub(super) fn make_current(
        &mut self,
        round_id: u64,
        version: ModelVersion,
        model: ModelBlob,
        blob: Bytes,
    ) -> RoundOutcome {
        self.current = model;
        self.current_version = version;
        self.transfers.store_model(version, blob.clone());
        self.published_rounds += 1;
        self.event(Event::ModelPublished {
            round_id,
            version,
            blob,
        });
        RoundOutcome::Published(version)
    }

    /// Makes `values` the current model and offers it for download.
    pub(super) fn publish(&mut self, round_id: u64, mut values: Vec<f32>) -> RoundOutcome {
        // The compressed step these values were made with, if any: what a
        // device holding the current model can fetch instead of the model.
        let mut step = self.strategy.take_published_step();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            step = None;
            // Never publish a broken model: keep the current one.
            self.event(Event::Rejected {
                device: None,
                code: RejectCode::NonFinite,
                detail: format!(
                    "round {round_id}'s aggregate is not finite at parameter {i}; model kept"
                ),
            });
            values = self.current.params.values.clone();
        }
        let params =
            Params::new(Arc::clone(&self.current.params.layout), values).expect("same layout");
        let next = ModelBlob {
            onnx_graph: self.current.onnx_graph.clone(),
            params,
        };
        let blob = next.encode();
        let version = ModelVersion::of(&blob);
        if version != self.current_version {
            if let Some(step) = step {
                let model_bytes = blob.len() as u64;
                self.transfers
                    .record_step(self.current_version, version, step, model_bytes);
            }
            self.lineage.push(self.current_version);
            let keep = self.cfg.versions_kept;
            if self.lineage.len() > keep {
                self.lineage.drain(..self.lineage.len() - keep);
            }
        }
        self.make_current(round_id, version, next, blob)
    }
}
