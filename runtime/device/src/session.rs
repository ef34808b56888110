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

use bytes::Bytes;
use fedge_proto::codec::CodecSpec;
use fedge_proto::msg::{Capabilities, Hello, ModelRef, TaskOffer, TrainingPlan, UploadBegin};
use fedge_proto::sign::{self, SigningKey, UpdateManifest};
use fedge_proto::{
    AggMsg, DeviceMsg, Limits, ModelBlob, ModelVersion, RUNTIME_VERSION, RejectCode, SCHEMA_VERSION,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub limits: Limits,
    pub capabilities: Capabilities,
    /// Interval between heartbeats while connected.
    pub heartbeat_interval: Duration,
    /// Upload chunk size.
    pub upload_chunk_bytes: u32,
    /// Chunk requests in flight during a download.
    pub download_window: u32,
    /// Reconnect backoff: first delay and cap; jittered to [d/2, d].
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Consecutive failed connection attempts before giving up (0 = never).
    pub reconnect_attempts_max: u32,
    /// Time allowed for a request (task, chunk, upload status) to be answered.
    pub request_timeout: Duration,
    pub seed: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            limits: Limits::default(),
            capabilities: Capabilities {
                executors: vec!["tract-cpu".into()],
                ..Capabilities::default()
            },
            heartbeat_interval: Duration::from_secs(15),
            upload_chunk_bytes: 256 << 10,
            download_window: 8,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            reconnect_attempts_max: 0,
            request_timeout: Duration::from_secs(60),
            seed: 0,
        }
    }
}

/// The result of local training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutput {
    /// local - global, in the model's canonical layout.
    pub delta: Vec<f32>,
    pub sample_count: u64,
    pub metrics: Vec<(String, f64)>,
}

/// Work for the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceEvent {
    /// Open a connection, then call `handle_connected`.
    Connect,
    /// Close the current connection (the session will ask to reconnect).
    Disconnect,
    /// A model was downloaded and verified.
    ModelReady {
        version: ModelVersion,
        model: Arc<ModelBlob>,
    },
    /// Train on `model` for round `round_id`, then call `handle_trained`.
    Train {
        round_id: u64,
        model: Arc<ModelBlob>,
        plan: TrainingPlan,
    },
    UpdateAccepted {
        round_id: u64,
    },
    /// The error-feedback residual changed: persist it (before the upload
    /// that follows goes out).
    ResidualChanged,
    /// The aggregator refused something; the session has recovered.
    Rejected {
        code: RejectCode,
        detail: String,
    },
    /// The aggregator ran all its rounds; `model` is its final model.
    Finished {
        version: ModelVersion,
        model: Arc<ModelBlob>,
    },
    /// The session cannot go on (schema mismatch, authentication refused,
    /// too many failed reconnects).
    Failed {
        reason: String,
    },
}

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
    /// Upload begun; waiting for status or acceptance.
    Uploading,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DownloadPurpose {
    Task,
    /// A delta from the cached model to the offered one.
    TaskDelta,
    Final,
}

struct Download {
    mref: ModelRef,
    data: Vec<u8>,
    next_expected: u32,
    next_to_request: u32,
    purpose: DownloadPurpose,
}

struct PendingUpload {
    begin: UploadBegin,
    payload: Bytes,
}

/// Where the session is, for drivers and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Disconnected,
    Connecting,
    Idle,
    /// Connected, but not asking for tasks: the device's policy (charging,
    /// battery, ...) says no.
    Ineligible,
    Downloading,
    Training,
    Uploading,
    Done,
    Failed,
}

pub struct DeviceSession {
    cfg: SessionConfig,
    key: SigningKey,
    rng: ChaCha8Rng,
    phase: Phase,
    failed: bool,
    attempts: u32,
    tls_binding: [u8; 32],
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
            tls_binding: [0; 32],
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
        };
        s.events.push_back(DeviceEvent::Connect);
        s
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

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_terminal() {
            return None;
        }
        let phase_timer = match self.phase {
            Phase::Disconnected { at } => at,
            Phase::Idle { at } => Some(at),
            _ => None,
        };
        let connected = !matches!(self.phase, Phase::Disconnected { .. });
        [
            phase_timer,
            self.heartbeat_at.filter(|_| connected),
            self.request_deadline.filter(|_| connected),
        ]
        .into_iter()
        .flatten()
        .min()
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

    /// A connection attempt failed or the connection dropped.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if self.is_terminal() {
            return;
        }
        self.transmit.clear();
        self.request_deadline = None;
        if let Some(d) = self.download.as_mut() {
            // Resume from the first chunk not yet received.
            d.next_to_request = d.next_expected;
        }
        if matches!(self.phase, Phase::Disconnected { at: Some(_) }) {
            return; // already waiting to reconnect
        }
        self.attempts += 1;
        if self.cfg.reconnect_attempts_max != 0 && self.attempts > self.cfg.reconnect_attempts_max {
            self.fail(format!(
                "gave up after {} failed connection attempts",
                self.attempts - 1
            ));
            return;
        }
        let exp = self.cfg.backoff_min.as_millis() as u64
            * 2u64.saturating_pow(self.attempts.saturating_sub(1).min(20));
        let cap = (self.cfg.backoff_max.as_millis() as u64).max(1);
        let base = exp.min(cap).max(1);
        let delay = self.rng.random_range(base / 2..=base);
        self.phase = Phase::Disconnected {
            at: Some(now + Duration::from_millis(delay)),
        };
    }

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
        if late || out.delta.iter().any(|v| !v.is_finite()) || out.sample_count == 0 {
            let reason = if late {
                "training finished after the round's deadline; update not sent"
            } else {
                "training produced no usable update (non-finite values or no samples)"
            };
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
        let spec = match CodecSpec::parse(&offer.plan.codec) {
            Ok(s) => s,
            Err(e) => {
                self.events.push_back(DeviceEvent::Rejected {
                    code: RejectCode::Malformed,
                    detail: format!("the plan's codec is not understood: {e}"),
                });
                self.after_round(now);
                return;
            }
        };
        let seed = crate::compress::round_seed(self.key.verifying_key().as_bytes(), offer.round_id);
        let payload =
            match self
                .compressor
                .compress(&spec, &out.delta, seed, offer.plan.error_feedback)
            {
                Ok(p) => p,
                Err(e) => {
                    self.events.push_back(DeviceEvent::Rejected {
                        code: RejectCode::NonFinite,
                        detail: format!("update not encodable: {e}"),
                    });
                    self.after_round(now);
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

    /// Local training failed (diverged, out of memory, ...): give up this
    /// round's task and ask for another later; the device stays in the
    /// federation.
    pub fn handle_training_failed(&mut self, now: Instant) {
        if self.phase != Phase::Training && !matches!(self.phase, Phase::Disconnected { .. }) {
            return;
        }
        self.retry_later(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_terminal() {
            return;
        }
        match self.phase {
            Phase::Disconnected { at: Some(at) } if now >= at => {
                self.phase = Phase::Disconnected { at: None };
                self.events.push_back(DeviceEvent::Connect);
                return;
            }
            Phase::Idle { at } if now >= at => self.request_task(now),
            _ => {}
        }
        if matches!(self.phase, Phase::Disconnected { .. }) {
            return;
        }
        if let Some(hb) = self.heartbeat_at
            && now >= hb
        {
            self.heartbeat_seq += 1;
            self.transmit.push_back(DeviceMsg::Heartbeat {
                seq: self.heartbeat_seq,
            });
            self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
        }
        if let Some(d) = self.request_deadline
            && now >= d
        {
            // The aggregator went quiet: drop the connection and reconnect.
            self.request_deadline = None;
            self.events.push_back(DeviceEvent::Disconnect);
            self.handle_disconnected(now);
        }
    }

    pub fn handle_message(&mut self, now: Instant, msg: AggMsg) {
        if self.is_terminal() {
            return;
        }
        match (self.phase.clone(), msg) {
            (_, AggMsg::HeartbeatAck { .. }) => {}
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
            (Phase::AwaitAuthOk, AggMsg::AuthOk { .. }) => {
                self.attempts = 0;
                self.request_deadline = None;
                self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
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
                let wait = self
                    .rng
                    .random_range(retry_after_ms_min..=retry_after_ms_max.max(retry_after_ms_min));
                self.request_deadline = None;
                self.phase = Phase::Idle {
                    at: now + Duration::from_millis(wait),
                };
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

    fn touch(&mut self, now: Instant) {
        self.request_deadline = Some(now + self.cfg.request_timeout);
    }

    fn fail(&mut self, reason: String) {
        self.failed = true;
        self.transmit.clear();
        self.events.push_back(DeviceEvent::Failed { reason });
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
        let mref = offer.model;
        self.offer_received = Some(now);
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
        let offer = self.offer.as_ref().expect("offer");
        let (_, model) = self.model.as_ref().expect("model");
        self.phase = Phase::Training;
        self.events.push_back(DeviceEvent::Train {
            round_id: offer.round_id,
            model: Arc::clone(model),
            plan: offer.plan.clone(),
        });
    }

    fn start_download(&mut self, now: Instant, mref: ModelRef, purpose: DownloadPurpose) {
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

    fn pump_download(&mut self, now: Instant) {
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

    fn on_chunk(&mut self, now: Instant, version: ModelVersion, index: u32, data: Bytes) {
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

    /// Something went wrong that a fresh task request recovers from.
    fn fail_soft(&mut self, now: Instant, code: RejectCode, detail: String) {
        self.events
            .push_back(DeviceEvent::Rejected { code, detail });
        self.retry_later(now);
    }

    /// Drop the current task and ask again after a short pause, so a
    /// confused exchange cannot become a hot loop.
    fn retry_later(&mut self, now: Instant) {
        self.offer = None;
        self.offer_received = None;
        self.request_deadline = None;
        if !matches!(self.phase, Phase::Disconnected { .. }) {
            self.phase = Phase::Idle {
                at: now + self.cfg.backoff_min,
            };
        }
    }

    fn begin_upload(&mut self, now: Instant) {
        let u = self.upload.as_ref().expect("pending upload");
        self.phase = Phase::Uploading;
        self.transmit
            .push_back(DeviceMsg::UploadBegin(Box::new(u.begin.clone())));
        self.touch(now);
    }

    fn on_upload_status(&mut self, now: Instant, hash: [u8; 32], next_index: u32) {
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
            self.upload = None;
        }
        if matches!(
            self.phase,
            Phase::Uploading | Phase::Downloading | Phase::AwaitTask
        ) {
            self.retry_later(now);
        }
    }
}
