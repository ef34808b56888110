//! Model download: a window of chunk requests, resumed from the first
//! missing chunk after a reconnect, checked against the offered version,
//! and model deltas rebuilt on top of the cached model.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fedge_proto::msg::ModelRef;
use fedge_proto::{DeviceMsg, ModelBlob, ModelVersion, RejectCode};

use super::{DeviceEvent, DeviceSession, Phase};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DownloadPurpose {
    Task,
    /// A delta from the cached model to the offered one.
    TaskDelta,
    Final,
}

pub(super) struct Download {
    mref: ModelRef,
    data: Vec<u8>,
    pub(super) next_expected: u32,
    pub(super) next_to_request: u32,
    purpose: DownloadPurpose,
}

impl DeviceSession {
    pub(super) fn start_download(
        &mut self,
        now: Instant,
        mref: ModelRef,
        purpose: DownloadPurpose,
    ) {
        // Keep a partial download of the same version (resume).
        let keep = self.download.as_ref().is_some_and(|d| d.mref == mref);
        if !keep {
            self.download = Some(Download {
                mref,
                data: Vec::with_capacity(mref.model_bytes.min(64 << 20) as usize),
                next_expected: 0,
                next_to_request: 0,
                purpose,
            });
        } else if let Some(d) = self.download.as_mut() {
            d.purpose = purpose;
            d.next_to_request = d.next_expected;
        }
        self.phase = Phase::Downloading;
        self.pump_download(now);
    }

    pub(super) fn pump_download(&mut self, now: Instant) {
        let window = self.cfg.download_window.max(1);
        let Some(d) = self.download.as_mut() else {
            return;
        };
        while d.next_to_request < d.mref.chunk_count && d.next_to_request < d.next_expected + window
        {
            self.transmit.push_back(DeviceMsg::ChunkRequest {
                model_version: d.mref.version,
                index: d.next_to_request,
            });
            d.next_to_request += 1;
        }
        self.request_deadline = Some(now + self.cfg.request_timeout);
    }

    pub(super) fn on_chunk(
        &mut self,
        now: Instant,
        version: ModelVersion,
        index: u32,
        data: Bytes,
    ) {
        let Some(d) = self.download.as_mut() else {
            return;
        };
        if version != d.mref.version || index != d.next_expected {
            return; // stale or duplicate after a resume
        }
        let expected = d.mref.chunk_range(index);
        if data.len() != expected.len() {
            self.download = None;
            self.fail_soft(
                now,
                RejectCode::Malformed,
                format!(
                    "chunk {index} has {} bytes, expected {}",
                    data.len(),
                    expected.len()
                ),
            );
            return;
        }
        d.data.extend_from_slice(&data);
        d.next_expected += 1;
        if d.next_expected < d.mref.chunk_count {
            self.pump_download(now);
            return;
        }
        let d = self.download.take().expect("present");
        self.request_deadline = None;
        let got = ModelVersion::of(&d.data);
        if got != d.mref.version {
            self.fail_soft(
                now,
                RejectCode::HashMismatch,
                format!(
                    "downloaded model hashes to {got}, expected {}",
                    d.mref.version
                ),
            );
            return;
        }
        if d.purpose == DownloadPurpose::TaskDelta {
            self.finish_delta(now, &d.data);
            return;
        }
        let model = match ModelBlob::decode(&d.data, &self.cfg.limits) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                self.fail_soft(now, e.reject_code(), format!("downloaded model: {e}"));
                return;
            }
        };
        self.model = Some((got, Arc::clone(&model)));
        self.events.push_back(DeviceEvent::ModelReady {
            version: got,
            model: Arc::clone(&model),
        });
        match d.purpose {
            DownloadPurpose::Task if self.model_matches_offer() => self.start_training(),
            DownloadPurpose::Task | DownloadPurpose::TaskDelta => self.after_round(now),
            DownloadPurpose::Final => {
                self.events.push_back(DeviceEvent::Finished {
                    version: got,
                    model,
                });
                self.phase = Phase::Done;
            }
        }
    }

    /// A downloaded delta: rebuild the offered model from the cached one,
    /// bit for bit, or fall back to downloading it whole.
    fn finish_delta(&mut self, now: Instant, delta: &[u8]) {
        let applied = self
            .model
            .as_ref()
            .map(|(_, base)| fedge_proto::delta::apply(base, delta, &self.cfg.limits));
        let Some(target) = self.offer.as_ref().map(|o| o.model) else {
            self.retry_later(now);
            return;
        };
        match applied {
            Some(Ok(m)) if m.version() == target.version => {
                let model = Arc::new(m);
                self.model = Some((target.version, Arc::clone(&model)));
                self.events.push_back(DeviceEvent::ModelReady {
                    version: target.version,
                    model,
                });
                self.start_training();
            }
            other => {
                let reason = match other {
                    Some(Err(e)) => e.to_string(),
                    Some(Ok(_)) => "delta gives another version".into(),
                    None => "no base model".into(),
                };
                tracing::warn!(%reason, "model delta unusable; downloading the full model");
                self.start_download(now, target, DownloadPurpose::Task);
            }
        }
    }
}
