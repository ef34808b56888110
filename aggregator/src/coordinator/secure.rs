//! Rounds combined with SecAgg+ (`[strategy.secagg]`; the protocol is
//! [`crate::privacy::secagg`], its stages and threat model
//! [`fedge_proto::secagg`]).
//!
//! A secure round is drawn at once, when its check-in window ends: the
//! devices drawn get indices `0..n` in draw order and a [`TaskOffer`]
//! carrying the round's SecAgg+ parameters and their index, and the
//! round's [`SecAggServer`] opens. Fewer than `survivors_min` candidates
//! (or too few for the configured threshold) and the window is extended:
//! the round waits for devices rather than run a sum that would reveal
//! one. Nobody joins a secure round after its draw, and a device that
//! reconnects during one is paced away (it lost its keys: a dropout).
//!
//! **API boundary: the index is the aggregator's.** A device's SecAgg+
//! messages are matched to its index through its authenticated session's
//! key; nothing a device sends names an index it could choose.
//!
//! The stages' deadlines, not the round's, bound a secure round; it closes
//! when the server has an outcome: the survivors' quantized sum, exactly,
//! read back into update units and divided by the number of survivors (a
//! plain mean: SecAgg+ has no per-update weights), or a typed failure
//! that aborts the round and is recorded against every device drawn.

use std::collections::HashMap;
use std::time::Instant;

use fedge_proto::msg::SecAggOffer;
use fedge_proto::secagg::{DeviceSecAgg, DistributedNoise, SecAggParams};
use fedge_proto::{AggMsg, RejectCode};
use rand::Rng;

use super::ledger::{self, Accepted, Held};
use super::output::Contribution;
use super::policy::TaskDecision;
use super::selection::Candidate;
use super::sessions::{DeviceKey, device_id};
use super::{Coordinator, Event, RoundOutcome, SessionId};
use crate::privacy::secagg::{SecAggServer, distributed_spent};
use crate::robust::Combined;
use fedge_proto::sign::VerifyingKey;

/// The open round's secure aggregation.
pub(super) struct SecureRound {
    pub server: SecAggServer,
    /// The devices drawn, by index.
    pub members: Vec<DeviceKey>,
    pub index_of: HashMap<DeviceKey, u32>,
    /// Bytes of the SecAgg+ messages its devices sent (accepted or not).
    pub upload_bytes: u64,
    /// Devices that gave up their task (recorded then; not again at close).
    pub abandoned: std::collections::HashSet<DeviceKey>,
}

impl SecureRound {
    pub fn offer(&self, key: &DeviceKey) -> Option<SecAggOffer> {
        Some(SecAggOffer {
            params: self.server.params().clone(),
            index: *self.index_of.get(key)?,
        })
    }
}

/// Bytes of a masked input's frame beyond its packed values (envelope,
/// round, ring, dimension).
const MASKED_INPUT_OVERHEAD_BYTES: u64 = 64;

/// The devices distributed DP's noise is split over: the fewest survivors
/// a round publishes with, less the devices that may collude with the
/// aggregator (they can leave their share of the noise out).
pub(super) fn honest_survivors(spec: &crate::privacy::secagg::SecAggSpec) -> u32 {
    spec.survivors_min
        .saturating_sub(spec.colluding_devices)
        .max(1)
}

/// Whether a model of `dimension` parameters fits SecAgg+ as built (the
/// masked input travels in one frame) and, with distributed DP, whether
/// the round's noise can be sampled exactly and fits the ring, for a
/// round of `devices`.
pub(super) fn check_model(
    spec: &crate::privacy::secagg::SecAggSpec,
    dimension: usize,
    frame_bytes_max: u32,
    devices: u32,
) -> Result<(), String> {
    if let Some(dp) = &spec.dp {
        let params = SecAggParams {
            round: 0,
            seed: [0; 32],
            devices,
            degree: spec.degree,
            threshold: spec.threshold,
            bits: spec.bits,
            clip: spec.clip,
            dimension: dimension as u32,
            noise: Some(DistributedNoise {
                multiplier: dp.noise_multiplier,
                survivors: honest_survivors(spec),
            }),
        };
        params
            .validate()
            .map_err(|e| format!("strategy.secagg.dp: {e}"))?;
    }
    let bytes = dimension as u64 * u64::from(spec.bits.div_ceil(8)) + MASKED_INPUT_OVERHEAD_BYTES;
    if bytes > u64::from(frame_bytes_max) {
        return Err(format!(
            "strategy.secagg: a masked input of this model's {dimension} parameters at {} bits \
             is {bytes} bytes, over the {frame_bytes_max}-byte frame limit (a masked input \
             travels in one frame; fewer bits or a smaller model fit)",
            spec.bits
        ));
    }
    Ok(())
}

impl Coordinator {
    /// The check-in window of a secure round ended: draw its devices and
    /// open its SecAgg+ round, or extend the window when too few came.
    pub(super) fn draw_secure(&mut self, now: Instant, mut drawn: Vec<Candidate>) {
        let spec = self
            .cfg
            .strategy
            .secagg
            .clone()
            .expect("a secure round has a spec");
        let target = self.cfg.selection_target().min(drawn.len());
        let rest = drawn.split_off(target);
        let n = drawn.len() as u32;
        if n < spec.survivors_min.max(2) || spec.validate(n).is_err() {
            tracing::info!(
                round_id = self.round.id,
                candidates = n,
                survivors_min = spec.survivors_min,
                "too few devices for a secure round; extending its check-in window"
            );
            for c in drawn.into_iter().chain(rest) {
                self.round.waiting.insert(c.key.to_bytes(), c);
            }
            self.round.window_end = Some(now + self.cfg.selection_window);
            return;
        }
        let mut seed = [0u8; 32];
        self.rng.fill(&mut seed);
        let params = SecAggParams {
            round: self.round.id,
            seed,
            devices: n,
            degree: spec.degree,
            threshold: spec.threshold,
            bits: spec.bits,
            clip: spec.clip,
            dimension: self.current.params.values.len() as u32,
            noise: spec.dp.as_ref().map(|dp| DistributedNoise {
                multiplier: dp.noise_multiplier,
                survivors: honest_survivors(&spec),
            }),
        };
        let server = match SecAggServer::new(params, spec.deadlines(), spec.survivors_min, now) {
            Ok(s) => s,
            Err(e) => {
                // validate(n) passed, so this is a bug; keep serving.
                tracing::error!(%e, "secure round parameters refused; extending the window");
                for c in drawn.into_iter().chain(rest) {
                    self.round.waiting.insert(c.key.to_bytes(), c);
                }
                self.round.window_end = Some(now + self.cfg.selection_window);
                return;
            }
        };
        let members: Vec<DeviceKey> = drawn.iter().map(|c| c.key.to_bytes()).collect();
        let index_of = members
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, i as u32))
            .collect();
        self.round.secure = Some(SecureRound {
            server,
            members,
            index_of,
            upload_bytes: 0,
            abandoned: Default::default(),
        });
        let view = self.round_view();
        for c in drawn {
            let decision = self.policy.select(c.key.to_bytes(), &view);
            debug_assert!(matches!(decision, TaskDecision::Offer), "within the target");
            self.event(Event::DeviceSelected {
                round_id: self.round.id,
                device: device_id(&c.key),
            });
            self.send_offer(now, c.session, c.have);
        }
        for c in rest {
            self.round.reserve.insert(c.key.to_bytes());
            self.pace_away(c.session, "round is full");
        }
    }

    /// Whether the open round is a secure one that has been drawn.
    pub(super) fn secure_running(&self) -> bool {
        self.round.secure.is_some()
    }

    /// A device's SecAgg+ message. The state machine refusing it closes
    /// the device's session: it is a dropout from then on.
    pub(super) fn on_secagg(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        round_id: u64,
        msg: DeviceSecAgg,
    ) {
        let dev = device_id(&key);
        let index = match &self.round.secure {
            Some(s) if round_id == self.round.id => s.index_of.get(key.as_bytes()).copied(),
            _ => None,
        };
        let Some(index) = index else {
            let detail = format!(
                "a SecAgg+ message for round {round_id}: this device has no part in a \
                 secure round running now"
            );
            self.reject(session, Some(dev), RejectCode::NotSelected, detail, false);
            return;
        };
        let secure = self.round.secure.as_mut().expect("checked");
        secure.upload_bytes += message_bytes(&msg, secure.server.params().bits);
        secure.server.handle_timeout(now);
        if !secure.server.waits_for(index) {
            // Late (its stage ended: it is a dropout from it) or a second
            // answer: refused, the connection kept.
            let detail = format!(
                "a SecAgg+ `{}` the round no longer waits for (its stage is over or was \
                 answered): this device is a dropout from it",
                msg.name()
            );
            self.reject(session, Some(dev), RejectCode::RoundClosed, detail, false);
            return;
        }
        if let Err(e) = secure.server.handle_message(now, index, msg) {
            let detail = format!("SecAgg+ message refused: {e}");
            self.reject(
                session,
                Some(dev),
                RejectCode::ProtocolViolation,
                detail,
                true,
            );
        }
        self.pump_secure(now);
    }

    /// Stage deadlines that have passed.
    pub(super) fn secure_timeout(&mut self, now: Instant) {
        if let Some(s) = self.round.secure.as_mut() {
            s.server.handle_timeout(now);
        }
        self.pump_secure(now);
    }

    pub(super) fn secure_deadline(&self) -> Option<Instant> {
        self.round.secure.as_ref()?.server.poll_timeout()
    }

    /// Sends what the server has for its devices (to those still
    /// connected: the others are dropouts) and closes the round once it
    /// has an outcome.
    fn pump_secure(&mut self, now: Instant) {
        let round_id = self.round.id;
        let mut out = Vec::new();
        let done = match self.round.secure.as_mut() {
            Some(s) => {
                while let Some((index, msg)) = s.server.poll_transmit() {
                    out.push((s.members[index as usize], msg));
                }
                s.server.outcome().is_some()
            }
            None => false,
        };
        for (key, msg) in out {
            if let Some(session) = self.sessions.session_of(&key) {
                self.send(session, AggMsg::SecAgg { round_id, msg });
            }
        }
        if done {
            self.close_round(now);
        }
    }

    /// Settle a secure round: the survivors' mean published, or the round
    /// aborted with the failure recorded against every device drawn.
    /// Returns the outcome, the contribution records and how many updates
    /// the published mean holds.
    pub(super) fn close_secure(
        &mut self,
        round_id: u64,
        mut secure: SecureRound,
    ) -> (RoundOutcome, Vec<Contribution>, usize, Vec<(String, f64)>) {
        let params = secure.server.params().clone();
        let refused_all = |c: &mut Self, why: String| -> Vec<Contribution> {
            secure
                .members
                .iter()
                .filter(|k| !secure.abandoned.contains(*k))
                .map(|k| {
                    let dev = hex::encode(k);
                    let stake = c.stake_of(&dev);
                    ledger::refused(round_id, &dev, stake, 0, why.clone())
                })
                .collect()
        };
        let result = match secure.server.take_outcome() {
            Some(Ok(o)) => o,
            Some(Err(failure)) => {
                let why = format!("secure aggregation failed: {failure}");
                self.event(Event::Rejected {
                    device: None,
                    code: RejectCode::NotSelected,
                    detail: format!("round {round_id}: {why}"),
                });
                return (RoundOutcome::Aborted, refused_all(self, why), 0, vec![]);
            }
            None => {
                let why = "the round closed before its secure aggregation finished".to_string();
                return (RoundOutcome::Aborted, refused_all(self, why), 0, vec![]);
            }
        };
        let k = result.survivors.len();
        self.event(Event::SecureAggregated {
            round_id,
            survivors: k,
            completed: result.completed,
            upload_bytes: secure.upload_bytes,
        });
        if k < self.cfg.min_devices {
            let why = format!(
                "secure aggregation summed {k} updates, fewer than min_devices ({})",
                self.cfg.min_devices
            );
            return (RoundOutcome::Aborted, refused_all(self, why), 0, vec![]);
        }
        let quantizer = params.quantizer().expect("validated when the round opened");
        let sum = quantizer.decode_sum(&result.sum);
        // Honest devices clip: the sum's norm is at most k x clip, plus
        // rounding and (with distributed DP) the noise. A larger one means
        // a device did not clip (a modified binary): the only check the
        // aggregator has, and the round is not published.
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        let bound = sum_norm_bound(&params, &quantizer, k);
        if norm.is_nan() || norm > bound {
            let why = format!(
                "secure aggregation's sum has L2 norm {norm:.4}, over the {bound:.4} that {k} \
                 updates clipped to {} can make: a device did not clip; round not published",
                params.clip
            );
            self.event(Event::Rejected {
                device: None,
                code: RejectCode::NormBound,
                detail: format!("round {round_id}: {why}"),
            });
            return (RoundOutcome::Aborted, refused_all(self, why), 0, vec![]);
        }
        let mean: Vec<f32> = sum.into_iter().map(|v| (v / k as f64) as f32).collect();
        let examples = crate::scoring::training_examples(&self.cfg.plan, 0);
        let mut survivors = vec![false; secure.members.len()];
        for &u in &result.survivors {
            survivors[u as usize] = true;
            let dev = hex::encode(secure.members[u as usize]);
            let stake = self.stake_of(&dev);
            self.round.book.record(
                round_id,
                Accepted {
                    device: dev,
                    stake,
                    samples: 0,
                    raw_weight: 1.0,
                    metrics: Vec::new(),
                    // No signed manifest and no payload: the aggregator saw
                    // only the masked sum.
                    held: Held {
                        manifest_hash: [0; 32],
                        payload_hash: [0; 32],
                        delta: None,
                        examples,
                        task_round: round_id,
                        discount: 1.0,
                    },
                },
            );
        }
        let weights = vec![1.0; k];
        let mut contributions = self.round.book.settle_published(&weights);
        self.settle(round_id, &contributions);
        let combined = Combined {
            delta: mean,
            weights,
        };
        let values =
            self.strategy
                .aggregate_round(round_id, &self.current.params.values, &combined, &[]);
        let completed = result.completed;
        for (i, k) in secure.members.iter().enumerate() {
            if !survivors[i] && !secure.abandoned.contains(k) {
                let dev = hex::encode(k);
                let stake = self.stake_of(&dev);
                let why = format!(
                    "dropped out of secure aggregation (devices completing each stage: \
                     {completed:?})"
                );
                contributions.push(ledger::refused(round_id, &dev, stake, 0, why));
            }
        }
        // Distributed DP: what the releases so far have spent. Every round
        // id up to this one counts as a release (an aborted round whose
        // sum was decoded is one; round ids are never reused, and restarts
        // continue them), so the figure never understates.
        let delta = self
            .cfg
            .strategy
            .secagg
            .as_ref()
            .and_then(|s| s.dp.as_ref())
            .map_or(1e-5, |dp| dp.delta);
        let metrics = distributed_spent(&params, round_id, delta)
            .map(|p| {
                vec![
                    ("dp_epsilon".to_string(), p.epsilon),
                    ("dp_delta".to_string(), p.delta),
                    ("dp_rho_zcdp".to_string(), p.rho_zcdp),
                    ("dp_rounds".to_string(), p.rounds as f64),
                    ("dp_noise_multiplier".to_string(), p.noise_multiplier),
                    ("dp_clip_bound".to_string(), params.clip),
                ]
            })
            .unwrap_or_default();
        (self.publish(round_id, values), contributions, k, metrics)
    }
}

/// The largest L2 norm (in update units) the sum of `k` honest, clipped
/// updates can have: k x clip, plus stochastic rounding (under one step
/// per coordinate each) and, with distributed DP, the noise out to twice
/// its expected norm (its norm concentrates: sqrt(d) stddevs, give or
/// take a few).
fn sum_norm_bound(params: &SecAggParams, q: &fedge_proto::secagg::Quantizer, k: usize) -> f64 {
    let d = f64::from(params.dimension);
    let k = k as f64;
    // The clipped sum and its rounding: a.
    let a = k * params.clip * (1.0 + 1e-9) + k * d.sqrt() / q.scale();
    // The noise: per-coordinate variance v (update units). ||a + n||^2 is
    // at most a^2 + |n|^2 + 2 a |n . u|, with |n|^2 about d v (stddev
    // sqrt(2 d) v) and n . u about N(0, v): six standard deviations of
    // each. So the allowance grows like d^(1/4), not sqrt(d).
    let v = match params.skellam_mu() {
        Ok(Some((_, mu_each))) => 2.0 * mu_each * k / (q.scale() * q.scale()),
        _ => 0.0,
    };
    (a * a + d * v + 6.0 * (2.0 * d).sqrt() * v + 12.0 * a * v.sqrt()).sqrt()
}

/// Bytes a device's SecAgg+ message carries on the wire, less the
/// framing: what the round's upload accounting counts.
fn message_bytes(msg: &DeviceSecAgg, bits: u32) -> u64 {
    use fedge_proto::secagg::msg::SEALED_SHARE_BYTES;
    let n = |len: usize, each: usize| (len * each) as u64;
    match msg {
        DeviceSecAgg::AdvertiseKeys(_) => 64,
        DeviceSecAgg::ShareKeys(s) => n(s.len(), 4 + SEALED_SHARE_BYTES),
        DeviceSecAgg::MaskedInput(v) => n(v.len(), bits.div_ceil(8) as usize),
        DeviceSecAgg::Unmask {
            self_mask,
            mask_key,
        } => n(self_mask.len() + mask_key.len(), 4 + 32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::secagg::SecAggSpec;

    #[test]
    fn a_model_whose_masked_input_overflows_a_frame_is_refused() {
        let spec = SecAggSpec::default();
        assert!(check_model(&spec, 199_210, 2 << 20, 13).is_ok());
        let e = check_model(&spec, 1_663_370, 2 << 20, 13).unwrap_err();
        assert!(e.contains("frame limit"), "{e}");
    }
}
