//! The device side of the protocol as a deterministic state machine
//! (sans-IO, quinn-proto's shape).
//!
//! Inputs: [`DeviceSession::handle_connected`], `handle_message`,
//! `handle_disconnected`, `handle_trained`, `handle_timeout`, each with the
//! current time. Outputs: [`DeviceSession::poll_transmit`] (messages to
//! send), [`DeviceSession::poll_event`] (work for the driver: connect,
//! train, persist), [`DeviceSession::poll_timeout`] (next timer).
//!
//! Transfers survive disconnects: a model download resumes from the first
//! missing chunk and an update upload from the chunk the aggregator reports,
//! after a reconnect with exponential backoff and jitter.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_proto::msg::{AbandonReason, Hello, TaskOffer};
use fedge_proto::sign::{self, SigningKey};
use fedge_proto::{
    AggMsg, DeviceMsg, ModelBlob, ModelVersion, RUNTIME_VERSION, RejectCode, SCHEMA_VERSION,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod download;
mod evaluate;
mod secure;
mod timers;
mod types;
mod upload;

use download::{Download, DownloadPurpose};
pub use types::{DeviceEvent, EvalOutput, SessionConfig, Status, TrainOutput};
use upload::PendingUpload;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection; reconnect at `at` (None: waiting for the driver).
    Disconnected {
        at: Option<Instant>,
    },
    AwaitChallenge,
    AwaitAuthOk,
    /// Authenticated; ask for a task at `at`.
    Idle {
        at: Instant,
    },
    /// Authenticated, but the device's policy says it may not take work
    /// now: ask for a task once the driver reports it eligible again.
    Held,
    AwaitTask,
    Downloading,
    Training,
    /// An evaluation task: the driver is evaluating the offered model.
    Evaluating,
    /// The evaluation report was sent; waiting for its acknowledgement.
    Reporting {
        round_id: u64,
    },
    /// Upload begun; waiting for status or acceptance.
    Uploading,
    Done,
}

pub struct DeviceSession {
    cfg: SessionConfig,
    key: SigningKey,
    rng: ChaCha8Rng,
    phase: Phase,
    failed: bool,
    attempts: u32,
    /// Connections refused in a row at the aggregator's handshake limit.
    refusals: u32,
    tls_binding: [u8; 32],
    /// The federation this aggregator named at authentication; signed into
    /// every manifest.
    federation_id: [u8; 32],
    model: Option<(ModelVersion, Arc<ModelBlob>)>,
    download: Option<Download>,
    offer: Option<TaskOffer>,
    offer_received: Option<Instant>,
    upload: Option<PendingUpload>,
    heartbeat_at: Option<Instant>,
    heartbeat_seq: u64,
    request_deadline: Option<Instant>,
    transmit: VecDeque<DeviceMsg>,
    events: VecDeque<DeviceEvent>,
    /// Rounds whose update this device had accepted.
    pub rounds_contributed: u64,
    compressor: crate::compress::Compressor,
    /// Whether the device's policy lets it take tasks (see
    /// [`DeviceSession::handle_eligibility`]).
    eligible: bool,
    /// The device's part in its task's SecAgg+, if the round is secure.
    secure: Option<secure::SecureTask>,
}

impl DeviceSession {
    /// A new session; the driver should connect (the first event is
    /// [`DeviceEvent::Connect`]).
    pub fn new(cfg: SessionConfig, key: SigningKey) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut s = DeviceSession {
            cfg,
            key,
            rng,
            phase: Phase::Disconnected { at: None },
            failed: false,
            attempts: 0,
            refusals: 0,
            tls_binding: [0; 32],
            federation_id: [0; 32],
            model: None,
            download: None,
            offer: None,
            offer_received: None,
            upload: None,
            heartbeat_at: None,
            heartbeat_seq: 0,
            request_deadline: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            rounds_contributed: 0,
            compressor: Default::default(),
            eligible: true,
            secure: None,
        };
        s.events.push_back(DeviceEvent::Connect);
        s
    }

    /// How long the driver waits before acting on the first
    /// [`DeviceEvent::Connect`]: uniform in `[0, first_connect_jitter]`,
    /// drawn from the session's seeded generator (nothing is drawn when
    /// the jitter is zero). Call it once, before the first connection.
    pub fn first_connect_delay(&mut self) -> Duration {
        let jitter_ms = self.cfg.first_connect_jitter.as_millis() as u64;
        if jitter_ms == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(self.rng.random_range(0..=jitter_ms))
    }

    /// Seed the model cache (from a local checkpoint), so an offer of the
    /// same version needs no download.
    pub fn set_cached_model(&mut self, model: Arc<ModelBlob>) {
        self.model = Some((model.version(), model));
    }

    /// Hex of this device's public key, as the aggregator names it.
    pub fn device_id(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Restore error-feedback state (from a checkpoint).
    pub fn set_compressor(&mut self, c: crate::compress::Compressor) {
        self.compressor = c;
    }

    pub fn compressor(&self) -> &crate::compress::Compressor {
        &self.compressor
    }

    pub fn cached_model(&self) -> Option<&Arc<ModelBlob>> {
        self.model.as_ref().map(|(_, m)| m)
    }

    pub fn status(&self) -> Status {
        if self.failed {
            return Status::Failed;
        }
        match self.phase {
            Phase::Disconnected { .. } => Status::Disconnected,
            Phase::AwaitChallenge | Phase::AwaitAuthOk => Status::Connecting,
            Phase::Idle { .. } | Phase::AwaitTask => Status::Idle,
            Phase::Held => Status::Ineligible,
            Phase::Downloading => Status::Downloading,
            Phase::Training => Status::Training,
            Phase::Evaluating | Phase::Reporting { .. } => Status::Evaluating,
            Phase::Uploading => Status::Uploading,
            Phase::Done => Status::Done,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.failed || self.phase == Phase::Done
    }

    // ------------------------------------------------------------ outputs

    pub fn poll_transmit(&mut self) -> Option<DeviceMsg> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    // ------------------------------------------------------------ inputs

    /// The driver connected; `tls_binding` is the TLS exporter value.
    pub fn handle_connected(&mut self, now: Instant, tls_binding: [u8; 32]) {
        if self.is_terminal() {
            return;
        }
        self.tls_binding = tls_binding;
        self.phase = Phase::AwaitChallenge;
        // Heartbeats start once authenticated: the aggregator takes nothing
        // but the handshake before that (a slow handshake under load must
        // not look like a protocol violation); the request deadline covers it.
        self.heartbeat_at = None;
        self.request_deadline = Some(now + self.cfg.request_timeout);
        self.transmit.push_back(DeviceMsg::Hello(Hello {
            schema_version: SCHEMA_VERSION,
            device_public_key: self.key.verifying_key(),
            runtime_version: RUNTIME_VERSION.into(),
            capabilities: self.cfg.capabilities.clone(),
        }));
    }

    /// The device's policy changed its mind (the driver checks
    /// periodically; sessions start eligible). An ineligible session sends
    /// no `TaskRequest` and declines offers it receives (the aggregator's
    /// deadline and over-selection cover the slot); pace steering still
    /// holds: a device told by `NoTask` to come back at `t` asks no earlier
    /// than `t`, and no earlier than it is eligible again. A task already
    /// downloading, training or uploading is finished.
    pub fn handle_eligibility(&mut self, now: Instant, eligible: bool) {
        self.eligible = eligible;
        if eligible && self.phase == Phase::Held && !self.is_terminal() {
            self.request_task(now);
        }
    }

    pub fn is_eligible(&self) -> bool {
        self.eligible
    }

    pub fn handle_message(&mut self, now: Instant, msg: AggMsg) {
        if self.is_terminal() {
            return;
        }
        match (self.phase.clone(), msg) {
            (_, AggMsg::HeartbeatAck { .. }) => {}
            // SecAgg+ stages run beside the task's phases (the masked
            // input goes once training is done; unmasking after that).
            (_, AggMsg::SecAgg { round_id, msg }) => self.on_secagg(round_id, msg),
            (_, AggMsg::EvalAccepted { round_id }) => self.on_eval_accepted(now, round_id),
            (
                _,
                AggMsg::Reject {
                    code,
                    detail,
                    fatal,
                },
            ) => self.on_reject(now, code, detail, fatal),
            (
                Phase::AwaitChallenge,
                AggMsg::Challenge {
                    schema_version,
                    nonce,
                },
            ) => {
                if schema_version != SCHEMA_VERSION {
                    self.fail(format!(
                        "schema version mismatch: device speaks {SCHEMA_VERSION}, aggregator {schema_version}"
                    ));
                    return;
                }
                let signature = sign::sign_auth(&self.key, &nonce, &self.tls_binding);
                self.transmit
                    .push_back(DeviceMsg::AuthResponse { signature });
                self.phase = Phase::AwaitAuthOk;
                self.touch(now);
            }
            (Phase::AwaitAuthOk, AggMsg::AuthOk { federation_id, .. }) => {
                if self.upload.is_some() && self.federation_id != federation_id {
                    // Signed for another federation: it cannot verify here.
                    self.upload = None;
                    if self.compressor.restore_unsent() {
                        self.events.push_back(DeviceEvent::ResidualChanged);
                    }
                }
                self.federation_id = federation_id;
                self.attempts = 0;
                self.refusals = 0;
                self.request_deadline = None;
                self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
                if self.offer.as_ref().is_some_and(|o| o.evaluate) {
                    // An evaluation task does not survive its connection:
                    // the round does not wait for it.
                    self.offer = None;
                    self.download = None;
                }
                if self.upload.is_some() {
                    self.begin_upload(now);
                } else if self.offer.is_some() && self.model_matches_offer() {
                    // Training continues in the driver; nothing to ask for.
                    self.phase = Phase::Training;
                } else if self.download.is_some() {
                    self.phase = Phase::Downloading;
                    self.pump_download(now);
                } else {
                    self.request_task(now);
                }
            }
            (Phase::AwaitTask, AggMsg::TaskOffer(offer)) if !self.eligible => {
                tracing::info!(
                    round_id = offer.round_id,
                    "declining a task offer: the device is not eligible now"
                );
                self.abandon(
                    offer.round_id,
                    AbandonReason::Declined,
                    "the device's policy says not now".into(),
                );
                self.request_deadline = None;
                self.phase = Phase::Held;
            }
            (Phase::AwaitTask, AggMsg::TaskOffer(offer)) => self.on_offer(now, *offer),
            (
                Phase::AwaitTask,
                AggMsg::NoTask {
                    retry_after_ms_min,
                    retry_after_ms_max,
                    ..
                },
            ) => {
                let wait = self.pace_wait(retry_after_ms_min, retry_after_ms_max);
                self.request_deadline = None;
                self.phase = Phase::Idle { at: now + wait };
            }
            (
                Phase::AwaitChallenge | Phase::AwaitAuthOk,
                AggMsg::NoTask {
                    retry_after_ms_min,
                    retry_after_ms_max,
                    reason,
                },
            ) => {
                tracing::debug!(%reason, "paced away before authenticating");
                let wait = self.pace_wait(retry_after_ms_min, retry_after_ms_max);
                self.paced_before_auth(now, wait);
            }
            (
                Phase::Uploading,
                AggMsg::NoTask {
                    retry_after_ms_min,
                    retry_after_ms_max,
                    reason,
                },
            ) if self.upload.is_some() => {
                // Back-pressure: the aggregator's uploads in flight are at
                // its byte budget. The update is kept and offered again.
                tracing::debug!(%reason, "upload paced away");
                let wait = self.pace_wait(retry_after_ms_min, retry_after_ms_max);
                self.request_deadline = None;
                self.phase = Phase::Idle { at: now + wait };
            }
            (Phase::AwaitTask, AggMsg::Finished(mref)) => {
                self.request_deadline = None;
                match &self.model {
                    Some((v, m)) if *v == mref.version => {
                        self.events.push_back(DeviceEvent::Finished {
                            version: *v,
                            model: Arc::clone(m),
                        });
                        self.phase = Phase::Done;
                    }
                    _ => self.start_download(now, mref, DownloadPurpose::Final),
                }
            }
            (
                Phase::Downloading,
                AggMsg::ModelChunk {
                    model_version,
                    index,
                    data,
                },
            ) => self.on_chunk(now, model_version, index, data),
            (
                Phase::Uploading,
                AggMsg::UploadStatus {
                    payload_hash,
                    next_index,
                },
            ) => self.on_upload_status(now, payload_hash, next_index),
            (
                Phase::Uploading,
                AggMsg::UpdateAccepted {
                    round_id,
                    payload_hash,
                },
            ) => {
                if self
                    .upload
                    .as_ref()
                    .is_some_and(|u| u.begin.manifest.payload_hash == payload_hash)
                {
                    self.upload = None;
                    if self.compressor.commit() {
                        self.events.push_back(DeviceEvent::ResidualChanged);
                    }
                    self.rounds_contributed += 1;
                    self.events
                        .push_back(DeviceEvent::UpdateAccepted { round_id });
                    self.after_round(now);
                }
            }
            (phase, msg) => {
                // Stale answers after a reconnect or a round change are
                // harmless; anything else is a confused peer: reconnect.
                if !matches!(msg, AggMsg::ModelChunk { .. } | AggMsg::UploadStatus { .. }) {
                    tracing::warn!(?phase, msg = msg.name(), "unexpected message; reconnecting");
                    self.events.push_back(DeviceEvent::Disconnect);
                    self.handle_disconnected(now);
                }
            }
        }
    }

    // ------------------------------------------------------------ internals

    fn fail(&mut self, reason: String) {
        self.failed = true;
        self.transmit.clear();
        self.events.push_back(DeviceEvent::Failed { reason });
    }

    /// Tell the aggregator this device gives up its task for `round_id`,
    /// so the round need not wait for it.
    pub(super) fn abandon(&mut self, round_id: u64, reason: AbandonReason, detail: String) {
        self.transmit.push_back(DeviceMsg::TaskAbandoned {
            round_id,
            reason,
            detail,
        });
    }

    /// The task of `round_id` cannot be done here: the aggregator is told
    /// (`TaskAbandoned`, failed), the driver hears why, and the device
    /// asks for its next task.
    pub(super) fn give_up(
        &mut self,
        now: Instant,
        round_id: u64,
        code: RejectCode,
        detail: String,
    ) {
        self.abandon(round_id, AbandonReason::Failed, detail.clone());
        self.events
            .push_back(DeviceEvent::Rejected { code, detail });
        self.after_round(now);
    }

    fn model_matches_offer(&self) -> bool {
        match (&self.offer, &self.model) {
            (Some(o), Some((v, _))) => o.model.version == *v,
            _ => false,
        }
    }

    fn request_task(&mut self, now: Instant) {
        if !self.eligible {
            self.request_deadline = None;
            self.phase = Phase::Held;
            return;
        }
        self.phase = Phase::AwaitTask;
        self.transmit.push_back(DeviceMsg::TaskRequest {
            have_model_version: self.model.as_ref().map(|(v, _)| *v),
        });
        self.touch(now);
    }

    fn after_round(&mut self, now: Instant) {
        self.offer = None;
        self.offer_received = None;
        if matches!(self.phase, Phase::Disconnected { .. }) {
            return;
        }
        self.request_task(now);
    }

    fn on_offer(&mut self, now: Instant, offer: TaskOffer) {
        self.request_deadline = None;
        if offer.evaluate && !self.cfg.evaluates {
            // Nothing to evaluate on: said before anything is downloaded.
            self.abandon(
                offer.round_id,
                AbandonReason::Declined,
                "no held-out data to evaluate on".into(),
            );
            self.after_round(now);
            return;
        }
        let mref = offer.model;
        self.offer_received = Some(now);
        self.secure = None;
        if let Some(sa) = &offer.secagg
            && let Err(e) = self.join_secure(offer.round_id, sa)
        {
            let detail = format!("cannot take part in the round's SecAgg+: {e}");
            self.give_up(now, offer.round_id, RejectCode::Malformed, detail);
            return;
        }
        self.offer = Some(offer);
        if self.model_matches_offer() {
            self.start_training();
            return;
        }
        let delta = self.offer.as_ref().and_then(|o| o.delta);
        match (delta, &self.model) {
            (Some(d), Some((v, _))) if d.base == *v => {
                self.start_download(now, d.blob, DownloadPurpose::TaskDelta)
            }
            _ => self.start_download(now, mref, DownloadPurpose::Task),
        }
    }

    fn start_training(&mut self) {
        if self.offer.as_ref().is_some_and(|o| o.evaluate) {
            self.start_evaluation();
            return;
        }
        let offer = self.offer.as_ref().expect("offer");
        let (_, model) = self.model.as_ref().expect("model");
        self.phase = Phase::Training;
        self.events.push_back(DeviceEvent::Train {
            round_id: offer.round_id,
            model: Arc::clone(model),
            plan: offer.plan.clone(),
        });
    }

    /// Something went wrong that a fresh task request recovers from.
    fn fail_soft(&mut self, now: Instant, code: RejectCode, detail: String) {
        self.events
            .push_back(DeviceEvent::Rejected { code, detail });
        self.retry_later(now);
    }

    /// A random instant in a pace-steering window `[min_ms, max_ms]`.
    fn pace_wait(&mut self, min_ms: u64, max_ms: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(min_ms..=max_ms.max(min_ms)))
    }

    fn on_reject(&mut self, now: Instant, code: RejectCode, detail: String, fatal: bool) {
        tracing::debug!(%code, %detail, fatal, "rejected");
        match code {
            RejectCode::SchemaMismatch | RejectCode::AuthFailed => {
                self.fail(format!("aggregator refused this device ({code}): {detail}"));
                return;
            }
            RejectCode::UnknownModelVersion if self.download.is_some() => {
                // The round moved on while we downloaded; ask again.
                self.download = None;
            }
            _ => {}
        }
        self.events.push_back(DeviceEvent::Rejected {
            code,
            detail: detail.clone(),
        });
        if fatal {
            self.events.push_back(DeviceEvent::Disconnect);
            self.handle_disconnected(now);
            return;
        }
        if self.phase == Phase::Uploading {
            // The update was refused: it will not be accepted on retry.
            // What it carried goes back into the error-feedback residual,
            // unless the refusal says it was accepted already (a replay of
            // an update whose acknowledgement was lost).
            self.upload = None;
            let changed = if code == RejectCode::Replay {
                self.compressor.commit()
            } else {
                self.compressor.restore_unsent()
            };
            if changed {
                self.events.push_back(DeviceEvent::ResidualChanged);
            }
        }
        if matches!(
            self.phase,
            Phase::Uploading | Phase::Downloading | Phase::AwaitTask | Phase::Reporting { .. }
        ) {
            self.retry_later(now);
        }
    }
}
