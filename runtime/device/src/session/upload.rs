//! Training results become an update: encoded, signed and uploaded in
//! chunks, resumed from the chunk the aggregator reports after a reconnect.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedge_proto::codec::CodecSpec;
use fedge_proto::msg::{AbandonReason, UploadBegin};
use fedge_proto::sign::UpdateManifest;
use fedge_proto::{DeviceMsg, RejectCode};

use super::{DeviceEvent, DeviceSession, Phase, TrainOutput};

pub(super) struct PendingUpload {
    pub(super) begin: UploadBegin,
    payload: Bytes,
}

impl DeviceSession {
    /// Local training finished.
    pub fn handle_trained(&mut self, now: Instant, out: TrainOutput) {
        if self.phase != Phase::Training && !matches!(self.phase, Phase::Disconnected { .. }) {
            return;
        }
        let Some(offer) = self.offer.take() else {
            return;
        };
        let model = self.model.as_ref().expect("trained on a cached model");
        assert_eq!(
            out.delta.len(),
            model.1.params.values.len(),
            "delta dimension"
        );
        let late = self
            .offer_received
            .is_some_and(|t| now >= t + Duration::from_millis(offer.deadline_ms));
        let diverged = out.delta.iter().any(|v| !v.is_finite());
        if late || diverged || out.sample_count == 0 {
            self.secure = None;
            let reason = if late {
                "training finished after the round's deadline; update not sent"
            } else {
                "training produced no usable update (non-finite values or no samples)"
            };
            if !late {
                let why = if diverged {
                    AbandonReason::Diverged
                } else {
                    AbandonReason::Failed
                };
                self.abandon(offer.round_id, why, reason.into());
            }
            self.events.push_back(DeviceEvent::Rejected {
                code: if late {
                    RejectCode::DeadlinePassed
                } else {
                    RejectCode::NonFinite
                },
                detail: reason.into(),
            });
            self.after_round(now);
            return;
        }
        if offer.secagg.is_some() {
            self.send_masked(now, offer.round_id, &out.delta);
            return;
        }
        let spec = match CodecSpec::parse(&offer.plan.codec) {
            Ok(s) => s,
            Err(e) => {
                let detail = format!("the plan's codec is not understood: {e}");
                self.give_up(now, offer.round_id, RejectCode::Malformed, detail);
                return;
            }
        };
        let seed = crate::compress::round_seed(self.key.verifying_key().as_bytes(), offer.round_id);
        let payload = match self.compressor.compress_pending(
            &spec,
            &out.delta,
            seed,
            offer.plan.error_feedback,
        ) {
            Ok(p) => p,
            Err(e) => {
                let detail = format!("update not encodable: {e}");
                self.give_up(now, offer.round_id, RejectCode::NonFinite, detail);
                return;
            }
        };
        if offer.plan.error_feedback {
            self.events.push_back(DeviceEvent::ResidualChanged);
        }
        let manifest = UpdateManifest {
            round_id: offer.round_id,
            model_version: offer.model.version,
            payload_hash: *blake3::hash(&payload).as_bytes(),
            payload_bytes: payload.len() as u64,
            sample_count: out.sample_count,
            metrics: out.metrics,
            device_public_key: self.key.verifying_key(),
            federation_id: self.federation_id,
            partial: None,
        };
        let signature = manifest.sign(&self.key);
        self.upload = Some(PendingUpload {
            begin: UploadBegin {
                manifest,
                signature,
                chunk_bytes: self.cfg.upload_chunk_bytes,
            },
            payload,
        });
        if self.phase == Phase::Training {
            self.begin_upload(now);
        }
    }

    /// Local training failed (out of memory, a bad model, ...): tell the
    /// aggregator the task is given up (so the round need not wait for
    /// it), and ask for another later; the device stays in the federation.
    pub fn handle_training_failed(&mut self, now: Instant, detail: String) {
        if self.phase != Phase::Training && !matches!(self.phase, Phase::Disconnected { .. }) {
            return;
        }
        if let Some(offer) = &self.offer
            && self.phase == Phase::Training
        {
            let round_id = offer.round_id;
            self.abandon(round_id, AbandonReason::Failed, detail);
        }
        self.retry_later(now);
    }

    pub(super) fn begin_upload(&mut self, now: Instant) {
        let u = self.upload.as_ref().expect("pending upload");
        self.phase = Phase::Uploading;
        self.transmit
            .push_back(DeviceMsg::UploadBegin(Box::new(u.begin.clone())));
        self.touch(now);
    }

    pub(super) fn on_upload_status(&mut self, now: Instant, hash: [u8; 32], next_index: u32) {
        let Some(u) = self.upload.as_ref() else {
            return;
        };
        if u.begin.manifest.payload_hash != hash {
            return;
        }
        let cb = u.begin.chunk_bytes as usize;
        let chunks = u.payload.len().div_ceil(cb) as u32;
        for i in next_index..chunks {
            let start = i as usize * cb;
            let end = (start + cb).min(u.payload.len());
            self.transmit.push_back(DeviceMsg::UploadChunk {
                payload_hash: hash,
                index: i,
                data: u.payload.slice(start..end),
            });
        }
        self.touch(now);
    }
}
