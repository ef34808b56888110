//! Evaluation tasks in the round (see [`crate::evaluation`]): offered to
//! devices the round has no training slot for, their signed reports
//! checked and kept, and combined when the round closes.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use fedge_proto::msg::{EvalReport, TaskOffer};
use fedge_proto::sign::VerifyingKey;
use fedge_proto::{AggMsg, ModelVersion, RejectCode};

use super::policy::Refusal;
use super::sessions::{DeviceKey, device_id};
use super::{Coordinator, Event, SessionId};
use crate::evaluation::{EvalClaim, EvalSummary, summarise};

/// The open round's evaluation tasks and reports.
#[derive(Default)]
pub(super) struct EvalRound {
    /// Keys offered an evaluation task this round (at most
    /// `evaluation.devices`).
    offered: HashSet<DeviceKey>,
    /// Accepted reports, one per key.
    reports: BTreeMap<DeviceKey, EvalClaim>,
    /// The reports combined, once the round closes.
    summary: Option<EvalSummary>,
    /// Set while the check-in window is drawn: evaluation tasks go only to
    /// the window's candidates not drawn to train, in the draw's random
    /// (or stake-weighted) order, never first come, first served.
    pub(super) drawing: bool,
}

impl EvalRound {
    pub(super) fn summary(&self) -> Option<EvalSummary> {
        self.summary.clone()
    }
}

impl Coordinator {
    /// Offers `key` an evaluation task of the open round instead of pacing
    /// it away, if its check-in window is being drawn, the round wants more
    /// evaluators, has not offered it one, and its report would weigh
    /// something. Returns whether it did.
    pub(super) fn offer_evaluation(
        &mut self,
        now: Instant,
        session: SessionId,
        key: &VerifyingKey,
        have: Option<ModelVersion>,
    ) -> bool {
        let eval = &self.cfg.evaluation;
        let round = &self.round;
        if !eval.enabled()
            || !round.evaluation.drawing
            || round.secure.is_some()
            || round.evaluation.offered.len() >= eval.devices
            || round.evaluation.offered.contains(key.as_bytes())
        {
            return false;
        }
        let weighs = self
            .cfg
            .weights
            .raw_weight(self.stake_of(&device_id(key)), 1)
            .is_ok_and(|w| w > 0.0 && w.is_finite());
        if !weighs {
            return false;
        }
        self.round.evaluation.offered.insert(key.to_bytes());
        let mref = self.transfers.model_ref(&self.round.model_version);
        let delta = self.delta_for(have);
        let deadline_ms = self
            .round
            .deadline
            .map_or(self.cfg.round_deadline, |d| {
                d.saturating_duration_since(now)
            })
            .as_millis() as u64;
        let offer = TaskOffer {
            round_id: self.round.id,
            model: mref,
            plan: self.strategy.configure_round(self.round.id, &self.cfg.plan),
            deadline_ms,
            delta,
            secagg: None,
            evaluate: true,
        };
        self.send(session, AggMsg::TaskOffer(Box::new(offer)));
        true
    }

    /// Cheap checks first; the signature last.
    fn check_eval_report(&self, key: &VerifyingKey, r: &EvalReport) -> Result<(), Refusal> {
        let m = &r.manifest;
        if m.device_public_key != *key {
            return Err((
                RejectCode::BadSignature,
                "evaluation report names another device's key".into(),
            ));
        }
        if m.federation_id != self.cfg.federation_id {
            return Err((
                RejectCode::WrongFederation,
                format!(
                    "evaluation report was signed for federation {}, this is {}",
                    hex::encode(m.federation_id),
                    hex::encode(self.cfg.federation_id)
                ),
            ));
        }
        // The round's evaluation was combined as its close began: a report
        // taken now would be acknowledged and never counted.
        if self.closing() {
            return Err((
                RejectCode::RoundClosed,
                format!(
                    "round {} is closing: the evaluation report is late",
                    self.round.id
                ),
            ));
        }
        if m.round_id != self.round.id {
            return Err((
                RejectCode::RoundClosed,
                format!(
                    "evaluation report for round {}; the open round is {}",
                    m.round_id, self.round.id
                ),
            ));
        }
        if m.model_version != self.round.model_version {
            return Err((
                RejectCode::UnknownModelVersion,
                format!(
                    "evaluation report of model {}; round {} evaluates {}",
                    m.model_version, self.round.id, self.round.model_version
                ),
            ));
        }
        let ev = &self.round.evaluation;
        if !ev.offered.contains(key.as_bytes()) {
            return Err((
                RejectCode::NotSelected,
                format!("no evaluation task of round {} was offered", m.round_id),
            ));
        }
        if ev.reports.contains_key(key.as_bytes()) {
            return Err((
                RejectCode::Replay,
                format!("round {} already has this device's report", m.round_id),
            ));
        }
        m.verify(&r.signature)
            .map_err(|e| (RejectCode::BadSignature, e.to_string()))
    }

    pub(super) fn on_eval_report(
        &mut self,
        _now: Instant,
        session: SessionId,
        key: VerifyingKey,
        r: EvalReport,
    ) {
        if let Err((code, detail)) = self.check_eval_report(&key, &r) {
            self.reject(session, Some(device_id(&key)), code, detail, false);
            return;
        }
        let m = &r.manifest;
        // Weighed as its update would be; the claimed count counts only
        // when the operator opted in, and then capped.
        let dev = device_id(&key);
        let eval = &self.cfg.evaluation;
        let examples = if eval.count_examples {
            m.examples.min(eval.examples_max)
        } else {
            1
        };
        let weight = match self.cfg.weights.raw_weight(self.stake_of(&dev), examples) {
            Ok(w) if w > 0.0 && w.is_finite() => w,
            Ok(w) => {
                let detail = format!("an evaluation report of weight {w} counts for nothing");
                self.reject(session, Some(dev), RejectCode::NotSelected, detail, false);
                return;
            }
            Err(e) => {
                self.reject(
                    session,
                    Some(dev),
                    RejectCode::NotSelected,
                    e.to_string(),
                    false,
                );
                return;
            }
        };
        let claim = EvalClaim {
            key: key.to_bytes(),
            weight,
            loss: m.loss,
            accuracy: m.accuracy,
            report_hash: m.signed_hash(&r.signature),
        };
        self.round.evaluation.reports.insert(key.to_bytes(), claim);
        self.send(
            session,
            AggMsg::EvalAccepted {
                round_id: m.round_id,
            },
        );
    }

    /// The round closes: its reports combined, with the operator-held
    /// evaluation of the same model (the current one: the round's base),
    /// kept for its settlement and emitted as an event. Nothing when there
    /// is neither.
    pub(super) fn close_evaluation(&mut self) {
        let claims: Vec<EvalClaim> = std::mem::take(&mut self.round.evaluation.reports)
            .into_values()
            .collect();
        let mut s = summarise(
            self.round.id,
            &self.round.model_version,
            &claims,
            self.cfg.evaluation.trim,
            self.cfg.weights.max_share,
        );
        let n = self.cfg.evaluation.validation_examples;
        let mut evaluator = self.evaluator.as_ref().map(|e| super::settle::lock(e));
        if let Some(e) = evaluator.as_deref_mut()
            && self.cfg.evaluation.enabled()
            && n > 0
            && !e.is_empty()
            && self.current_version == self.round.model_version
        {
            let indices: Vec<usize> = (0..n.min(e.len())).collect();
            match e.loss_and_accuracy(&self.current.params.values, &indices) {
                // A model whose loss is not finite has no loss to record.
                Ok((loss, acc)) if loss.is_finite() && loss >= 0.0 => {
                    s.validation_examples = indices.len();
                    s.validation_loss = Some(loss);
                    s.validation_accuracy = acc.filter(|a| (0.0..=1.0).contains(a));
                }
                Ok((loss, _)) => tracing::warn!(loss, "the model's validation loss is not finite"),
                Err(err) => tracing::warn!(%err, "evaluating on the validation set failed"),
            }
        }
        drop(evaluator);
        let summary = (s.devices > 0 || s.validation_loss.is_some()).then_some(s);
        if let Some(s) = &summary {
            self.event(Event::Evaluated(Box::new(s.clone())));
        }
        self.round.evaluation.summary = summary;
    }
}
