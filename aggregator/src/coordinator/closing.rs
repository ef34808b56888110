//! Closing a round: combine what was accepted (or abort), settle the
//! contribution records, publish the new version, open the next round.

use std::sync::Arc;
use std::time::Instant;

use fedge_proto::{ModelBlob, ModelVersion, Params, RejectCode};

use super::ledger::RoundBook;
use super::{Coordinator, Event, Round, RoundOutcome};

impl Coordinator {
    pub(super) fn close_round(&mut self, _now: Instant) {
        let accepted = self.round.combiner.count();
        let round_id = self.round.id;
        let (outcome, contributions) = if accepted >= self.cfg.min_devices {
            let combined = self
                .round
                .combiner
                .finish(self.cfg.weights.max_share)
                .expect("accepted >= 1");
            let contributions = self.round.book.settle_published(&combined.weights);
            let values = self.strategy.aggregate_round(
                round_id,
                &self.current.params.values,
                &combined,
                &[],
            );
            (self.publish(round_id, values), contributions)
        } else {
            (RoundOutcome::Aborted, self.round.book.settle_aborted())
        };
        for c in contributions {
            self.event(Event::Contribution(c));
        }
        let metrics = self.strategy.aggregate_evaluate(self.round.book.metrics());
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
        let dim = self.current.params.values.len();
        self.round = Round {
            id: round_id + 1,
            model_version: self.current_version,
            deadline: None,
            combiner: self.strategy.combiner(dim, self.cfg.weights.max_share),
            book: RoundBook::default(),
        };
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
        }
    }

    /// Makes `values` the current model and offers it for download.
    pub(super) fn publish(&mut self, round_id: u64, mut values: Vec<f32>) -> RoundOutcome {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
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
        self.current = next;
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
}
