//! Update intake: a signed manifest is checked, the upload reassembled
//! (by the transfer manager), and the complete payload admitted (hash,
//! decoding and norm off this task, see [`super::verify`]; then weight)
//! before it is made durable, combined and acknowledged.

use std::time::Instant;

use bytes::Bytes;
use fedge_proto::evidence::SignedManifest;
use fedge_proto::msg::UploadBegin;
use fedge_proto::sign::VerifyingKey;
use fedge_proto::{AggMsg, ProtoError, RejectCode};

use super::ledger::{self, Accepted};
use super::policy::Refusal;
use super::sessions::{DeviceKey, device_id};
use super::transfers::{ChunkOutcome, Upload};
use super::{Coordinator, DurableUpdate, Event, Output, SessionId};
use crate::robust::Values;

/// An update that passed every check: its delta (already scaled by its
/// staleness discount), the participant's weight and stake, and the
/// discount.
pub(super) struct Admitted {
    delta: Values,
    raw_weight: f64,
    discount: f64,
    stake: Option<f64>,
}

/// Scales a stale update's delta by its discount. FedBuff (Nguyen et al.
/// 2022, Algorithm 1) divides the buffer's discounted sum by the buffer
/// size, so staleness shrinks the step; weighting the mean by discounted
/// weights instead would cancel the discount out when every update in a
/// buffer is equally stale. Here the mean is weighted by the participants'
/// undiscounted weights (the weighted buffer size) over discounted deltas.
pub(super) fn discounted(mut delta: Values, discount: f64) -> Values {
    if discount != 1.0 {
        delta.scale(discount);
    }
    delta
}

impl Coordinator {
    /// Checks of a signed upload manifest; returns the reject to send, if any.
    pub(super) fn check_manifest(
        &self,
        now: Instant,
        key: &VerifyingKey,
        b: &UploadBegin,
    ) -> Result<(), Refusal> {
        let m = &b.manifest;
        if m.device_public_key != *key {
            return Err((
                RejectCode::BadSignature,
                "manifest names another device's key".into(),
            ));
        }
        m.verify(&b.signature)
            .map_err(|e| (RejectCode::BadSignature, e.to_string()))?;
        if m.federation_id != self.cfg.federation_id {
            return Err((
                RejectCode::WrongFederation,
                format!(
                    "update was signed for federation {}, this is {}",
                    hex::encode(m.federation_id),
                    hex::encode(self.cfg.federation_id)
                ),
            ));
        }
        if self.leaf.awaiting {
            return Err((
                RejectCode::RoundClosed,
                "the round closed; this aggregator waits for its parent's next round".into(),
            ));
        }
        self.policy
            .check_task(key.as_bytes(), m, &self.round_view(), now, &self.transfers)?;
        self.check_partial(m)?;
        if m.sample_count == 0 {
            return Err((
                RejectCode::Malformed,
                "sample_count must be at least 1".into(),
            ));
        }
        // The announced size is what the upload buffer may grow to: no
        // more than any codec can produce for this model (a partial's
        // float64 encoding, at a root).
        let dim = self.round.combiner.dimension() as u64;
        let max = self.cfg.tree.upload_bytes_max(dim);
        if m.payload_bytes > max {
            return Err((
                RejectCode::TooLarge,
                format!(
                    "announced payload of {} bytes; no codec makes more than {max} for {dim} parameters",
                    m.payload_bytes
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn on_upload_begin(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        b: UploadBegin,
    ) {
        if let Err((code, detail)) = self.check_manifest(now, &key, &b) {
            if code == RejectCode::Replay {
                self.note_replay(&key, &b);
            }
            self.reject(session, Some(device_id(&key)), code, detail, false);
            return;
        }
        if self.closing() && self.cfg.strategy.buffered.is_none() {
            // The round's close is out: its updates are all in. (A FedBuff
            // upload goes on: it is combined into the next buffer.)
            let detail = format!("round {} is closing: the update is late", self.round.id);
            self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::RoundClosed,
                detail,
                false,
            );
            return;
        }
        if self.verifying.holds(key.as_bytes()) {
            // One upload a device at a time: its last one is still being
            // checked (its answer follows).
            self.pace_away(session, "the device's previous upload is being checked");
            return;
        }
        let payload_hash = b.manifest.payload_hash;
        // Payloads being checked still count against the budget.
        let budget = self.cfg.uploads_in_flight_bytes_max;
        let room = budget.saturating_sub(self.verifying.bytes());
        let next_index = match self.transfers.begin_upload(key.to_bytes(), b, room) {
            Ok(i) => i,
            Err(reserved) => {
                // Back-pressure: the device keeps its update and comes back.
                tracing::debug!(
                    device = %device_id(&key),
                    reserved,
                    budget,
                    "upload paced away: the in-flight byte budget is full"
                );
                self.pace_away(
                    session,
                    "uploads in flight fill the aggregator's byte budget",
                );
                return;
            }
        };
        self.send(
            session,
            AggMsg::UploadStatus {
                payload_hash,
                next_index,
            },
        );
        if next_index > 0 {
            self.try_finish_upload(now, session, key);
        }
    }

    pub(super) fn on_upload_chunk(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        hash: [u8; 32],
        index: u32,
        data: Bytes,
    ) {
        let dev = Some(device_id(&key));
        match self.transfers.add_chunk(key.to_bytes(), hash, index, &data) {
            ChunkOutcome::Stored => self.try_finish_upload(now, session, key),
            ChunkOutcome::Duplicate | ChunkOutcome::Ignored => {}
            ChunkOutcome::Ahead { next_index } => self.send(
                session,
                AggMsg::UploadStatus {
                    payload_hash: hash,
                    next_index,
                },
            ),
            ChunkOutcome::Overflow { declared } => self.reject(
                session,
                dev,
                RejectCode::TooLarge,
                format!("upload chunks do not add up to the declared {declared} bytes"),
                false,
            ),
            ChunkOutcome::RoundClosed => self.reject(
                session,
                dev,
                RejectCode::RoundClosed,
                "the round closed during this upload".into(),
                false,
            ),
            ChunkOutcome::Unknown => self.reject(
                session,
                dev,
                RejectCode::UnknownRound,
                "chunk for an upload that is not open in this round".into(),
                false,
            ),
        }
    }

    pub(super) fn try_finish_upload(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
    ) {
        let Some(u) = self.transfers.take_complete(key.as_bytes()) else {
            return;
        };
        let dev = device_id(&key);
        let late = self
            .policy
            .check_completion(&u.begin.manifest, &self.round_view(), now);
        if let Err((code, detail)) = late {
            self.reject(session, Some(dev), code, detail, false);
            return;
        }
        // The payload's own checks run off this task (see `verify`).
        self.start_verify(session, key, u);
    }

    /// An update refused after its upload completed: penalties for
    /// misconduct, its contribution record, and the reject.
    pub(super) fn refuse_update(
        &mut self,
        session: SessionId,
        dev: &str,
        code: RejectCode,
        detail: String,
        u: &Upload,
    ) {
        self.note_refusal(dev, code, u);
        let samples = u.begin.manifest.sample_count;
        let stake = self.stake_of(dev);
        let reason = format!("{code}: {detail}");
        let record = ledger::refused(self.round.id, dev, stake, samples, reason);
        self.event(Event::Contribution(record));
        self.reject(session, Some(dev.to_string()), code, detail, false);
    }

    /// The last check of a complete upload whose payload passed its own
    /// (hash, decoding, norm: `verify`): its weight.
    pub(super) fn weigh(&self, dev: &str, u: &Upload, delta: Values) -> Result<Admitted, Refusal> {
        let m = &u.begin.manifest;
        let stake = self.stake_of(dev);
        let discount = self.policy.discount(self.round.id - m.round_id);
        if let Some(p) = &m.partial {
            // A leaf's weight is what its devices weighed (bounded by
            // `check_partial`), not its stake or its samples.
            return Ok(Admitted {
                delta: discounted(delta, discount),
                raw_weight: p.total_weight,
                discount,
                stake,
            });
        }
        match self
            .cfg
            .weights
            .raw_weight(stake, self.samples_counted(m.sample_count))
        {
            Ok(w) if w > 0.0 && w.is_finite() => Ok(Admitted {
                delta: discounted(delta, discount),
                raw_weight: w * self.rating_factor(dev),
                discount,
                stake,
            }),
            Ok(w) => Err((
                RejectCode::NotSelected,
                format!("participant weight {w} is not positive"),
            )),
            Err(e) => Err((RejectCode::NotSelected, e.to_string())),
        }
    }

    /// An update payload's values: a partial aggregate's at float64 where
    /// this aggregator takes partials (a root), a device's otherwise.
    pub(super) fn decode_delta(&self, payload: &[u8]) -> Result<Values, ProtoError> {
        let dim = self.round.combiner.dimension();
        super::verify::decode(
            payload,
            dim,
            self.cfg.tree.takes_partials(),
            &self.cfg.limits,
        )
    }

    /// Put back an update that was acknowledged before a restart. Its
    /// device counts as having contributed to the open round.
    pub fn restore_update(&mut self, now: Instant, u: DurableUpdate) -> Result<(), String> {
        if self.leaf.awaiting {
            // A leaf's round opens when its parent offers it again.
            self.leaf.restored.push(u);
            return Ok(());
        }
        self.tick(now);
        if u.round_id != self.round.id {
            return Err(format!(
                "update for round {}, open round is {}",
                u.round_id, self.round.id
            ));
        }
        let key: DeviceKey = hex::decode(&u.device)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("bad device id `{}`", u.device))?;
        let delta = self.decode_delta(&u.payload).map_err(|e| e.to_string())?;
        if !(u.discount > 0.0
            && u.discount <= 1.0
            && u.raw_weight > 0.0
            && u.raw_weight.is_finite())
        {
            return Err(format!(
                "update of device {} has weight {} and discount {}",
                u.device, u.raw_weight, u.discount
            ));
        }
        let view = self.round_view();
        self.policy
            .on_restored(key, u.task_round, u.model_version, u.payload_hash, &view)?;
        self.leaf.devices += self.keep_restored_manifest(key, &u);
        let delta = discounted(delta, u.discount);
        let held = self.held(
            u.manifest_hash,
            u.payload_hash,
            &delta,
            u.sample_count,
            (u.task_round, u.discount),
        );
        self.round.combiner.add_values(delta, u.raw_weight);
        self.sessions.note_known(key);
        self.round.book.record(
            u.round_id,
            Accepted {
                device: u.device,
                stake: u.stake,
                samples: u.sample_count,
                raw_weight: u.raw_weight,
                metrics: u.metrics,
                held,
            },
        );
        if self.round.combiner.count() >= self.cfg.devices_per_round {
            self.close_round(now);
        }
        Ok(())
    }

    /// A sample count is the device's claim. With a fixed number of local
    /// steps the plan says exactly how many samples a device trains on
    /// (`local_steps x batch_size`), and a claim counts for no more.
    pub(super) fn samples_counted(&self, claim: u64) -> u64 {
        let p = self.round_plan();
        match p.local_steps {
            0 => claim,
            steps => claim.min(u64::from(steps) * u64::from(p.batch_size)),
        }
    }

    /// Combines an admitted update: made durable first, then acknowledged.
    pub(super) fn accept(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        u: Upload,
        a: Admitted,
    ) {
        let Admitted {
            delta,
            raw_weight,
            discount,
            stake,
        } = a;
        let dev = device_id(&key);
        let signed = SignedManifest {
            manifest: u.begin.manifest.clone(),
            signature: u.begin.signature,
        };
        let manifest_hash = signed.hash();
        let mut signed_manifest = Vec::new();
        signed.encode_into(&mut signed_manifest);
        self.misconduct.keep(key.to_bytes(), signed);
        let m = u.begin.manifest;
        // Recorded under the round (buffer) it is combined into.
        self.out.push_back(Output::Persist(Box::new(DurableUpdate {
            round_id: self.round.id,
            task_round: m.round_id,
            model_version: Some(m.model_version),
            device: dev.clone(),
            payload_hash: m.payload_hash,
            manifest_hash,
            signed_manifest: signed_manifest.into(),
            sample_count: m.sample_count,
            raw_weight,
            discount,
            stake,
            metrics: m.metrics.clone(),
            payload: Bytes::from(u.data),
        })));
        let held = self.held(
            manifest_hash,
            m.payload_hash,
            &delta,
            m.sample_count,
            (m.round_id, discount),
        );
        self.round.combiner.add_values(delta, raw_weight);
        self.leaf.devices += m.partial.map_or(1, |p| u64::from(p.devices));
        self.round.book.record(
            self.round.id,
            Accepted {
                device: dev.clone(),
                stake,
                samples: m.sample_count,
                raw_weight,
                metrics: m.metrics,
                held,
            },
        );
        self.policy
            .on_accepted(key.to_bytes(), m.round_id, self.round.id, m.payload_hash);
        self.event(Event::UpdateAccepted {
            round_id: self.round.id,
            staleness: self.round.id - m.round_id,
            device: dev,
            sample_count: m.sample_count,
            payload_bytes: m.payload_bytes,
            payload_hash: m.payload_hash,
        });
        self.send(
            session,
            AggMsg::UpdateAccepted {
                round_id: m.round_id,
                payload_hash: m.payload_hash,
            },
        );
        if self.round.combiner.count() >= self.cfg.devices_per_round {
            self.close_round(now);
        } else {
            // The last of the selected devices to finish closes the round.
            self.close_if_done(now);
        }
    }
}
