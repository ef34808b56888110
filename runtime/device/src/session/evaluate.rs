//! Evaluation tasks: the offered model is evaluated by the driver on the
//! device's own held-out data, and the result goes back signed
//! (`fedge_proto::msg::EvalReport`). A device with no held-out data
//! declines the task; one whose connection drops while evaluating gives
//! the task up (an evaluation is cheap to lose: the round does not wait
//! for it).

use std::sync::Arc;
use std::time::Instant;

use fedge_proto::DeviceMsg;
use fedge_proto::msg::{AbandonReason, EvalManifest, EvalReport};

use super::{DeviceEvent, DeviceSession, Phase};
use crate::EvalOutput;

impl DeviceSession {
    /// The offered model is here: the driver evaluates it.
    pub(super) fn start_evaluation(&mut self) {
        let offer = self.offer.as_ref().expect("offer");
        let (_, model) = self.model.as_ref().expect("model");
        self.phase = Phase::Evaluating;
        self.events.push_back(DeviceEvent::Evaluate {
            round_id: offer.round_id,
            model: Arc::clone(model),
        });
    }

    /// The driver's evaluation of the model of round `round_id`'s offer:
    /// `Ok(None)` when the device holds no held-out data, `Err` when it
    /// failed. A result for another round than the task in hand (one given
    /// up at a reconnect, still running) is dropped, never signed for it.
    pub fn handle_evaluated(
        &mut self,
        now: Instant,
        round_id: u64,
        out: Result<Option<EvalOutput>, String>,
    ) {
        if self.phase != Phase::Evaluating
            || self.offer.as_ref().is_none_or(|o| o.round_id != round_id)
        {
            return;
        }
        let Some(offer) = self.offer.take() else {
            return;
        };
        let model_version = offer.model.version;
        let usable = match out {
            Ok(Some(o))
                if o.examples > 0
                    && o.loss.is_finite()
                    && o.loss >= 0.0
                    && (0.0..=1.0).contains(&o.accuracy) =>
            {
                o
            }
            Ok(None) => {
                self.abandon(
                    offer.round_id,
                    AbandonReason::Declined,
                    "no held-out data to evaluate on".into(),
                );
                self.after_round(now);
                return;
            }
            Ok(Some(o)) => {
                let detail = format!(
                    "evaluation gave no usable result ({} examples, loss {}, accuracy {})",
                    o.examples, o.loss, o.accuracy
                );
                self.abandon(offer.round_id, AbandonReason::Failed, detail);
                self.after_round(now);
                return;
            }
            Err(e) => {
                self.abandon(offer.round_id, AbandonReason::Failed, e);
                self.after_round(now);
                return;
            }
        };
        let manifest = EvalManifest {
            round_id: offer.round_id,
            model_version,
            examples: usable.examples,
            loss: usable.loss,
            accuracy: usable.accuracy,
            device_public_key: self.key.verifying_key(),
            federation_id: self.federation_id,
        };
        let signature = manifest.sign(&self.key);
        self.transmit
            .push_back(DeviceMsg::EvalReport(Box::new(EvalReport {
                manifest,
                signature,
            })));
        self.phase = Phase::Reporting {
            round_id: offer.round_id,
        };
        self.touch(now);
    }

    /// The aggregator recorded the report.
    pub(super) fn on_eval_accepted(&mut self, now: Instant, round_id: u64) {
        if self.phase == (Phase::Reporting { round_id }) {
            self.request_deadline = None;
            self.events
                .push_back(DeviceEvent::EvaluationAccepted { round_id });
            self.after_round(now);
        }
    }
}
