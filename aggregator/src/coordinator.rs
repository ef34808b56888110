//! Round orchestration as a deterministic state machine (sans-IO).
//!
//! Inputs go in through `handle_*(now, ..)`; outputs come out of
//! [`Coordinator::poll_output`]; the next timer is [`Coordinator::poll_timeout`].
//! Time and randomness (a seed in the config) are inputs, so a simulated
//! fleet with virtual time drives exactly the code the QUIC server drives.
//!
//! A round: devices check in (`TaskRequest`); the first
//! `ceil(devices_per_round * over_selection)` are selected and sent a
//! [`TaskOffer`]; the rest are paced away ("come back in [t1, t2]"). The
//! round's deadline starts at its first selection. It closes as soon as
//! `devices_per_round` updates are accepted, or at the deadline, when it is
//! aggregated if at least `min_devices` updates arrived and aborted (model
//! unchanged, round retried) otherwise. Late updates are rejected.
//!
//! With FedBuff ([`crate::strategy::BufferedSpec`]) there is no round
//! barrier: any device asking for work gets the current model while fewer
//! than `concurrency` are training, and may ask again as soon as its update
//! is in. A "round" is then one buffer: it publishes after
//! `devices_per_round` accepted updates (or at the deadline, as above).
//! Updates trained on an older version are accepted up to `max_staleness`
//! publications behind, weighted down by `(1 + staleness)^-a`; uploads in
//! flight survive a publication.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedge_proto::msg::{ModelRef, TaskOffer, TrainingPlan, UploadBegin};
use fedge_proto::sign::{self, VerifyingKey};
use fedge_proto::{
    AggMsg, DeviceMsg, Limits, ModelBlob, ModelVersion, Params, ProtoError, RejectCode,
    SCHEMA_VERSION, update,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::robust::{Combiner, l2_norm};
use crate::strategy::{Strategy, StrategyConfig};
use crate::weighting::{StakeRegistry, WeightPolicy};

/// Identifies one connection (assigned by the driver).
pub type SessionId = u64;

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Updates that close a round (the target).
    pub devices_per_round: usize,
    /// Selected devices = ceil(devices_per_round * over_selection).
    pub over_selection: f64,
    /// Fewest accepted updates for a round to be aggregated at its deadline.
    pub min_devices: usize,
    /// Rounds to run (round ids 1..=rounds, published or aborted) before
    /// finishing (0 = run forever).
    pub rounds: u64,
    /// Time from a round's first selection to its deadline.
    pub round_deadline: Duration,
    /// Pace-steering window for devices not needed now.
    pub retry_window: (Duration, Duration),
    /// Time a connection may take to authenticate.
    pub auth_timeout: Duration,
    /// Chunk size for model downloads.
    pub chunk_bytes: u32,
    /// Most concurrent connections.
    pub max_sessions: usize,
    /// Model versions kept for download (the current one and older ones).
    pub versions_kept: usize,
    /// Training plan sent with each task (the strategy may adjust it).
    pub plan: TrainingPlan,
    /// How participants are weighted (stake, samples, share cap).
    pub weights: WeightPolicy,
    /// How updates are combined and applied.
    pub strategy: StrategyConfig,
    /// Updates with a larger L2 norm are rejected (None: no bound).
    pub update_norm_max: Option<f64>,
    pub limits: Limits,
    pub seed: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            devices_per_round: 10,
            over_selection: 1.3,
            min_devices: 1,
            rounds: 10,
            round_deadline: Duration::from_secs(60),
            retry_window: (Duration::from_millis(500), Duration::from_millis(1500)),
            auth_timeout: Duration::from_secs(10),
            chunk_bytes: 256 << 10,
            max_sessions: 10_000,
            versions_kept: 4,
            plan: TrainingPlan::default(),
            weights: WeightPolicy::default(),
            strategy: StrategyConfig::default(),
            update_norm_max: None,
            limits: Limits::default(),
            seed: 0,
        }
    }
}

impl CoordinatorConfig {
    /// Devices selected per round.
    pub fn selection_target(&self) -> usize {
        ((self.devices_per_round as f64) * self.over_selection).ceil() as usize
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.devices_per_round == 0 {
            return Err("devices_per_round must be at least 1".into());
        }
        if !(self.over_selection >= 1.0 && self.over_selection <= 10.0) {
            return Err(format!(
                "over_selection must be in [1, 10], got {}",
                self.over_selection
            ));
        }
        if self.min_devices == 0 || self.min_devices > self.devices_per_round {
            return Err(format!(
                "min_devices must be in [1, devices_per_round={}], got {}",
                self.devices_per_round, self.min_devices
            ));
        }
        if self.retry_window.0 > self.retry_window.1 {
            return Err("retry window min is above its max".into());
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > self.limits.chunk_bytes_max {
            return Err(format!(
                "chunk_bytes must be in [1, {}], got {}",
                self.limits.chunk_bytes_max, self.chunk_bytes
            ));
        }
        if self.versions_kept == 0 {
            return Err("versions_kept must be at least 1".into());
        }
        if let Some(b) = &self.strategy.buffered
            && self.versions_kept as u64 <= b.max_staleness
        {
            return Err(format!(
                "FedBuff accepts updates {} versions stale, so versions_kept must be at least {}, got {}",
                b.max_staleness,
                b.max_staleness + 1,
                self.versions_kept
            ));
        }
        if let Some(b) = self.update_norm_max
            && !(b > 0.0 && b.is_finite())
        {
            return Err(format!("update_norm_max must be positive, got {b}"));
        }
        self.strategy.validate()?;
        self.weights.validate()
    }
}

/// An accepted update as it must be stored before it is acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub struct DurableUpdate {
    pub round_id: u64,
    pub device: String,
    pub payload_hash: [u8; 32],
    pub sample_count: u64,
    pub raw_weight: f64,
    pub stake: Option<f64>,
    pub metrics: Vec<(String, f64)>,
    pub payload: Bytes,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Make this update durable before acting on any later output (the
    /// acknowledgement follows it).
    Persist(Box<DurableUpdate>),
    Send {
        session: SessionId,
        msg: AggMsg,
    },
    /// Close the connection after sending what was queued before this.
    Close {
        session: SessionId,
        reason: String,
    },
    Event(Event),
}

/// What happened, for logs, metrics, persistence and tests.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    RoundOpened {
        round_id: u64,
        model_version: ModelVersion,
    },
    DeviceSelected {
        round_id: u64,
        device: String,
    },
    /// An update was combined into round `round_id`; `staleness` is how
    /// many versions behind it was trained (FedBuff; 0 in synchronous rounds).
    UpdateAccepted {
        round_id: u64,
        device: String,
        sample_count: u64,
        payload_bytes: u64,
        staleness: u64,
    },
    Rejected {
        device: Option<String>,
        code: RejectCode,
        detail: String,
    },
    RoundClosed {
        round_id: u64,
        accepted: usize,
        outcome: RoundOutcome,
        /// Weighted means of the metrics devices reported with updates.
        metrics: Vec<(String, f64)>,
    },
    /// One participant's contribution to a round: accepted (with its final
    /// weight, emitted when the round closes) or rejected (with the reason,
    /// emitted at once).
    Contribution(Contribution),
    /// A new model version; the blob is what devices download.
    ModelPublished {
        round_id: u64,
        version: ModelVersion,
        blob: Bytes,
    },
    Finished {
        final_version: ModelVersion,
    },
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Contribution {
    pub round_id: u64,
    pub device: String,
    pub stake: Option<f64>,
    pub samples: u64,
    /// f(stake) x g(samples), before share capping.
    pub raw_weight: f64,
    /// Share of the round's total weight after capping (0 when rejected).
    pub share: f64,
    pub accepted: bool,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RoundOutcome {
    Published(ModelVersion),
    /// Fewer than `min_devices` updates by the deadline; model unchanged.
    Aborted,
}

fn device_id(k: &VerifyingKey) -> String {
    hex::encode(k.to_bytes())
}

enum SessionState {
    AwaitHello,
    AwaitAuth { key: VerifyingKey, nonce: [u8; 32] },
    Ready { key: VerifyingKey },
}

struct Session {
    tls_binding: [u8; 32],
    connected_at: Instant,
    state: SessionState,
}

/// An upload in progress; kept across reconnects so it can resume.
struct Upload {
    begin: UploadBegin,
    data: Vec<u8>,
    next_index: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Participation {
    Selected,
    Accepted,
}

struct Round {
    id: u64,
    model_version: ModelVersion,
    deadline: Option<Instant>,
    participants: HashMap<[u8; 32], Participation>,
    uploads: HashMap<[u8; 32], Upload>,
    combiner: Box<dyn Combiner>,
    /// Accepted participants in the order their updates were combined.
    accepted: Vec<Contribution>,
    metrics: Vec<(f64, Vec<(String, f64)>)>,
}

struct StoredModel {
    blob: Bytes,
    mref: ModelRef,
}

/// The aggregator's round orchestration.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    rng: ChaCha8Rng,
    sessions: HashMap<SessionId, Session>,
    by_device: HashMap<[u8; 32], SessionId>,
    models: HashMap<ModelVersion, StoredModel>,
    history: VecDeque<ModelVersion>,
    current: ModelBlob,
    current_version: ModelVersion,
    round: Round,
    strategy: Box<dyn Strategy>,
    stakes: Box<dyn StakeRegistry>,
    /// Uploads cut short by a round closing: their next chunk is told
    /// `RoundClosed` once, later ones are dropped silently. Bounded by one
    /// round's selection.
    closed_uploads: HashMap<[u8; 32], bool>,
    published_rounds: u64,
    finished: bool,
    /// Devices seen by this process (authenticated or restored) and those
    /// already told the run is finished: the driver waits for the rest.
    known_devices: std::collections::HashSet<[u8; 32]>,
    told_finished: std::collections::HashSet<[u8; 32]>,
    /// Downlink deltas to the current model, by delta id, and which base
    /// has one (None: the full model is smaller). Cleared each round.
    deltas: HashMap<ModelVersion, StoredModel>,
    delta_for: HashMap<ModelVersion, Option<ModelVersion>>,
    /// FedBuff state (unused in synchronous rounds): devices training now
    /// and the round (buffer) whose model they train; the model of each
    /// recent round; tasks and payloads already accepted (replays), kept
    /// for the staleness window.
    inflight: HashMap<[u8; 32], u64>,
    round_versions: VecDeque<(u64, ModelVersion)>,
    accepted_tasks: HashSet<([u8; 32], u64)>,
    accepted_hashes: VecDeque<(u64, [u8; 32])>,
    out: VecDeque<Output>,
}

impl Coordinator {
    /// Start from `initial`, opening round `first_round_id` (a restarted
    /// aggregator continues its numbering).
    pub fn new(
        cfg: CoordinatorConfig,
        initial: ModelBlob,
        first_round_id: u64,
        published_rounds: u64,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let blob = initial.encode();
        Limits::check("model bytes", blob.len() as u64, cfg.limits.model_bytes_max)
            .map_err(|e| e.to_string())?;
        let version = ModelVersion::of(&blob);
        let dim = initial.params.values.len();
        let mut strategy = cfg.strategy.build();
        let combiner = strategy.combiner(dim, cfg.weights.max_share);
        let mut c = Coordinator {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            sessions: HashMap::new(),
            by_device: HashMap::new(),
            models: HashMap::new(),
            history: VecDeque::new(),
            current: initial,
            current_version: version,
            round: Round {
                id: first_round_id,
                model_version: version,
                deadline: None,
                participants: HashMap::new(),
                uploads: HashMap::new(),
                combiner,
                accepted: Vec::new(),
                metrics: Vec::new(),
            },
            strategy,
            stakes: Box::new(HashMap::<String, f64>::new()),
            closed_uploads: HashMap::new(),
            published_rounds,
            finished: false,
            known_devices: Default::default(),
            told_finished: Default::default(),
            deltas: HashMap::new(),
            delta_for: HashMap::new(),
            inflight: HashMap::new(),
            round_versions: VecDeque::from([(first_round_id, version)]),
            accepted_tasks: HashSet::new(),
            accepted_hashes: VecDeque::new(),
            out: VecDeque::new(),
            cfg,
        };
        c.store_model(version, blob);
        c.finished = c.cfg.rounds != 0 && first_round_id > c.cfg.rounds;
        if !c.finished {
            c.event(Event::RoundOpened {
                round_id: first_round_id,
                model_version: version,
            });
        }
        Ok(c)
    }

    /// Use `strategy` from the current round on.
    pub fn set_strategy(&mut self, mut strategy: Box<dyn Strategy>) {
        let dim = self.current.params.values.len();
        self.round.combiner = strategy.combiner(dim, self.cfg.weights.max_share);
        self.strategy = strategy;
    }

    pub fn set_stakes(&mut self, stakes: Box<dyn StakeRegistry>) {
        self.stakes = stakes;
    }

    pub fn stakes_mut(&mut self) -> &mut dyn StakeRegistry {
        self.stakes.as_mut()
    }

    pub fn strategy_name(&self) -> String {
        match &self.cfg.strategy.buffered {
            Some(b) => format!(
                "fedbuff(max_staleness={}, a={})+{}",
                b.max_staleness,
                b.staleness_exponent,
                self.strategy.name()
            ),
            None => self.strategy.name(),
        }
    }

    /// Put back an update that was acknowledged before a restart. Its
    /// device counts as having contributed to the open round.
    pub fn restore_update(&mut self, now: Instant, u: DurableUpdate) -> Result<(), String> {
        if u.round_id != self.round.id {
            return Err(format!(
                "update for round {}, open round is {}",
                u.round_id, self.round.id
            ));
        }
        let key: [u8; 32] = hex::decode(&u.device)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("bad device id `{}`", u.device))?;
        if self.round.participants.get(&key) == Some(&Participation::Accepted) {
            return Err(format!("device {} restored twice", u.device));
        }
        let delta = update::decode_update(
            &u.payload,
            self.round.combiner.dimension(),
            &self.cfg.limits,
        )
        .map_err(|e| e.to_string())?;
        self.round.combiner.add(delta, u.raw_weight);
        self.round.metrics.push((u.raw_weight, u.metrics.clone()));
        self.round.participants.insert(key, Participation::Accepted);
        if self.cfg.strategy.buffered.is_some() {
            self.accepted_hashes.push_back((u.round_id, u.payload_hash));
        }
        self.known_devices.insert(key);
        self.round.accepted.push(Contribution {
            round_id: u.round_id,
            device: u.device,
            stake: u.stake,
            samples: u.sample_count,
            raw_weight: u.raw_weight,
            share: 0.0,
            accepted: true,
            reason: None,
        });
        if self.round.deadline.is_none() {
            self.round.deadline = Some(now + self.cfg.round_deadline);
        }
        if self.round.combiner.count() >= self.cfg.devices_per_round {
            self.close_round(now);
        }
        Ok(())
    }

    // ------------------------------------------------------------ getters

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    pub fn current_version(&self) -> ModelVersion {
        self.current_version
    }

    pub fn current_model(&self) -> &ModelBlob {
        &self.current
    }

    pub fn round_id(&self) -> u64 {
        self.round.id
    }

    pub fn published_rounds(&self) -> u64 {
        self.published_rounds
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Devices this process knows of that have not yet been told the run
    /// is finished (and may still come back for the final model).
    pub fn devices_awaiting_finish(&self) -> usize {
        self.known_devices.difference(&self.told_finished).count()
    }

    /// Updates accepted so far in the open round.
    pub fn accepted_in_round(&self) -> usize {
        self.round.combiner.count()
    }

    // ------------------------------------------------------------ outputs

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest instant at which `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let auth = self
            .sessions
            .values()
            .filter(|s| !matches!(s.state, SessionState::Ready { .. }))
            .map(|s| s.connected_at + self.cfg.auth_timeout)
            .min();
        match (auth, self.round.deadline.filter(|_| !self.finished)) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        }
    }

    // ------------------------------------------------------------ inputs

    /// A connection was established; `tls_binding` is exported from its TLS
    /// session and binds the authentication signature to it.
    pub fn handle_connect(&mut self, now: Instant, session: SessionId, tls_binding: [u8; 32]) {
        if self.sessions.len() >= self.cfg.max_sessions {
            self.reject(
                session,
                None,
                RejectCode::TooManyDevices,
                format!(
                    "aggregator is at its limit of {} devices",
                    self.cfg.max_sessions
                ),
                true,
            );
            return;
        }
        self.sessions.insert(
            session,
            Session {
                tls_binding,
                connected_at: now,
                state: SessionState::AwaitHello,
            },
        );
    }

    pub fn handle_disconnect(&mut self, _now: Instant, session: SessionId) {
        self.drop_session(session);
    }

    fn drop_session(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session)
            && let SessionState::Ready { key } = s.state
            && self.by_device.get(key.as_bytes()) == Some(&session)
        {
            self.by_device.remove(key.as_bytes());
        }
    }

    /// A frame arrived that could not be decoded (malformed, oversized, or
    /// the wrong direction). The connection is told why and closed.
    pub fn handle_bad_frame(&mut self, _now: Instant, session: SessionId, err: &ProtoError) {
        let device = self.device_of(session);
        self.reject(session, device, err.reject_code(), err.to_string(), true);
    }

    /// A connection exceeded its request rate.
    pub fn handle_rate_limited(&mut self, _now: Instant, session: SessionId) {
        let device = self.device_of(session);
        self.reject(
            session,
            device,
            RejectCode::RateLimited,
            "request rate over the per-device limit".into(),
            true,
        );
    }

    pub fn handle_message(&mut self, now: Instant, session: SessionId, msg: DeviceMsg) {
        let Some(s) = self.sessions.get(&session) else {
            return; // already closed
        };
        match (&s.state, msg) {
            (SessionState::AwaitHello, DeviceMsg::Hello(h)) => {
                if h.schema_version != SCHEMA_VERSION {
                    let detail = format!(
                        "schema version mismatch: aggregator speaks {SCHEMA_VERSION}, device sent {}",
                        h.schema_version
                    );
                    self.reject(session, None, RejectCode::SchemaMismatch, detail, true);
                    return;
                }
                let mut nonce = [0u8; 32];
                self.rng.fill(&mut nonce);
                self.sessions.get_mut(&session).expect("checked").state = SessionState::AwaitAuth {
                    key: h.device_public_key,
                    nonce,
                };
                self.send(
                    session,
                    AggMsg::Challenge {
                        schema_version: SCHEMA_VERSION,
                        nonce,
                    },
                );
            }
            (SessionState::AwaitAuth { key, nonce }, DeviceMsg::AuthResponse { signature }) => {
                let key = *key;
                if sign::verify_auth(&key, nonce, &s.tls_binding, &signature).is_err() {
                    self.reject(
                        session,
                        Some(device_id(&key)),
                        RejectCode::AuthFailed,
                        "challenge signature does not verify for this key and TLS session".into(),
                        true,
                    );
                    return;
                }
                // A device that reconnects replaces its old connection.
                if let Some(old) = self.by_device.insert(key.to_bytes(), session)
                    && old != session
                {
                    self.sessions.remove(&old);
                    self.out.push_back(Output::Close {
                        session: old,
                        reason: "device reconnected on another connection".into(),
                    });
                }
                self.known_devices.insert(key.to_bytes());
                self.sessions.get_mut(&session).expect("checked").state =
                    SessionState::Ready { key };
                self.send(
                    session,
                    AggMsg::AuthOk {
                        device_id: device_id(&key),
                    },
                );
            }
            (SessionState::Ready { key }, msg) => {
                let key = *key;
                self.handle_ready(now, session, key, msg);
            }
            (_, msg) => {
                let device = self.device_of(session);
                self.reject(
                    session,
                    device,
                    RejectCode::ProtocolViolation,
                    format!("`{}` before authentication completed", msg.name()),
                    true,
                );
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                !matches!(s.state, SessionState::Ready { .. })
                    && now >= s.connected_at + self.cfg.auth_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable(); // deterministic output order
        for id in expired {
            self.reject(
                id,
                None,
                RejectCode::AuthFailed,
                "authentication timed out".into(),
                true,
            );
        }
        if !self.finished
            && let Some(d) = self.round.deadline
            && now >= d
        {
            self.close_round(now);
        }
    }

    // ------------------------------------------------------------ internals

    fn handle_ready(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        msg: DeviceMsg,
    ) {
        match msg {
            DeviceMsg::Heartbeat { seq } => self.send(session, AggMsg::HeartbeatAck { seq }),
            DeviceMsg::TaskRequest { have_model_version } => {
                self.on_task_request(now, session, key, have_model_version)
            }
            DeviceMsg::ChunkRequest {
                model_version,
                index,
            } => self.on_chunk_request(session, key, model_version, index),
            DeviceMsg::UploadBegin(b) => self.on_upload_begin(now, session, key, *b),
            DeviceMsg::UploadChunk {
                payload_hash,
                index,
                data,
            } => self.on_upload_chunk(now, session, key, payload_hash, index, data),
            DeviceMsg::Hello(_) | DeviceMsg::AuthResponse { .. } => self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::ProtocolViolation,
                format!("`{}` after authentication", msg.name()),
                true,
            ),
        }
    }

    fn on_task_request(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        have: Option<ModelVersion>,
    ) {
        if self.finished {
            let mref = self.models[&self.current_version].mref;
            self.told_finished.insert(key.to_bytes());
            self.send(session, AggMsg::Finished(mref));
            return;
        }
        if self.cfg.strategy.buffered.is_some() {
            self.on_task_request_buffered(now, session, key, have);
            return;
        }
        let target = self.cfg.selection_target();
        let part = self.round.participants.get(key.as_bytes()).copied();
        match part {
            Some(Participation::Selected) => {
                // Reconnected mid-round: the same offer again.
                self.send_offer(now, session, have);
            }
            Some(Participation::Accepted) => {
                self.pace_away(session, "already contributed to this round");
            }
            None => {
                if !self.eligible(session, &key) {
                    return;
                }
                if self.round.participants.len() >= target {
                    self.pace_away(session, "round is full");
                    return;
                }
                self.round
                    .participants
                    .insert(key.to_bytes(), Participation::Selected);
                if self.round.deadline.is_none() {
                    self.round.deadline = Some(now + self.cfg.round_deadline);
                }
                self.event(Event::DeviceSelected {
                    round_id: self.round.id,
                    device: device_id(&key),
                });
                self.send_offer(now, session, have);
            }
        }
    }

    /// Whether the device's stake lets it take part; if not, it is told to
    /// come back much later.
    fn eligible(&mut self, session: SessionId, key: &VerifyingKey) -> bool {
        let dev = device_id(key);
        let Err(e) = self.cfg.weights.raw_weight(self.stakes.stake(&dev), 1) else {
            return true;
        };
        self.event(Event::Rejected {
            device: Some(dev),
            code: RejectCode::NotSelected,
            detail: e.to_string(),
        });
        self.send(
            session,
            AggMsg::NoTask {
                retry_after_ms_min: 60_000,
                retry_after_ms_max: 120_000,
                reason: format!("not eligible: {e}"),
            },
        );
        false
    }

    /// FedBuff: work for any eligible device while fewer than `concurrency`
    /// are training; a device may ask again once its update is in.
    fn on_task_request_buffered(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        have: Option<ModelVersion>,
    ) {
        let dev = key.to_bytes();
        if self.inflight.get(&dev) == Some(&self.round.id) {
            // Reconnected while training: the same offer again.
            self.send_offer(now, session, have);
            return;
        }
        if !self.eligible(session, &key) {
            return;
        }
        let concurrency = self
            .cfg
            .strategy
            .buffered
            .as_ref()
            .and_then(|b| b.concurrency)
            .unwrap_or_else(|| self.cfg.selection_target());
        // A device asking again has given up its older task.
        self.inflight.remove(&dev);
        if self.inflight.len() >= concurrency {
            self.pace_away(session, "enough devices are training");
            return;
        }
        self.inflight.insert(dev, self.round.id);
        if self.round.deadline.is_none() {
            self.round.deadline = Some(now + self.cfg.round_deadline);
        }
        self.event(Event::DeviceSelected {
            round_id: self.round.id,
            device: device_id(&key),
        });
        self.send_offer(now, session, have);
    }

    /// A lossless delta from `base` to the round's model, when smaller.
    fn delta_ref(&mut self, base: ModelVersion) -> Option<fedge_proto::msg::DeltaRef> {
        if base == self.round.model_version {
            return None;
        }
        if !self.delta_for.contains_key(&base) {
            let made = self.models.get(&base).and_then(|m| {
                let base_model = ModelBlob::decode(&m.blob, &self.cfg.limits).ok()?;
                let bytes = fedge_proto::delta::encode(&base_model, &self.current)?;
                let full = self.models[&self.round.model_version].mref.model_bytes;
                if bytes.len() as u64 >= full {
                    return None;
                }
                let id = ModelVersion::of(&bytes);
                let mref = ModelRef::new(id, bytes.len() as u64, self.cfg.chunk_bytes);
                self.deltas.insert(
                    id,
                    StoredModel {
                        blob: Bytes::from(bytes),
                        mref,
                    },
                );
                Some(id)
            });
            self.delta_for.insert(base, made);
        }
        let id = self.delta_for[&base]?;
        Some(fedge_proto::msg::DeltaRef {
            base,
            blob: self.deltas[&id].mref,
        })
    }

    fn send_offer(&mut self, now: Instant, session: SessionId, have: Option<ModelVersion>) {
        let mref = self.models[&self.round.model_version].mref;
        let delta = have.and_then(|v| self.delta_ref(v));
        let deadline = match self.cfg.strategy.buffered {
            // FedBuff: each task has its own time budget.
            Some(_) => now + self.cfg.round_deadline,
            None => self.round.deadline.expect("set at first selection"),
        };
        let plan = self.strategy.configure_round(self.round.id, &self.cfg.plan);
        let offer = TaskOffer {
            round_id: self.round.id,
            model: mref,
            plan,
            deadline_ms: deadline.saturating_duration_since(now).as_millis() as u64,
            delta,
        };
        self.send(session, AggMsg::TaskOffer(Box::new(offer)));
    }

    fn pace_away(&mut self, session: SessionId, reason: &str) {
        let (lo, hi) = self.cfg.retry_window;
        let lo_ms = lo.as_millis() as u64;
        let hi_ms = hi.as_millis() as u64;
        // Randomise the window's start so paced devices do not return as a herd.
        let start = if hi_ms > lo_ms {
            self.rng.random_range(lo_ms..=hi_ms)
        } else {
            lo_ms
        };
        let end = start + (hi_ms - lo_ms) / 2;
        self.send(
            session,
            AggMsg::NoTask {
                retry_after_ms_min: start,
                retry_after_ms_max: end.max(start),
                reason: reason.into(),
            },
        );
    }

    fn on_chunk_request(
        &mut self,
        session: SessionId,
        key: VerifyingKey,
        version: ModelVersion,
        index: u32,
    ) {
        let Some(m) = self
            .models
            .get(&version)
            .or_else(|| self.deltas.get(&version))
        else {
            self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::UnknownModelVersion,
                format!("model version {version} is not held here"),
                false,
            );
            return;
        };
        if index >= m.mref.chunk_count {
            let detail = format!(
                "chunk {index} out of range: model {version} has {} chunks",
                m.mref.chunk_count
            );
            self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::Malformed,
                detail,
                false,
            );
            return;
        }
        let data = m.blob.slice(m.mref.chunk_range(index));
        self.send(
            session,
            AggMsg::ModelChunk {
                model_version: version,
                index,
                data,
            },
        );
    }

    /// Checks shared by upload begin; returns the reject to send, if any.
    fn check_manifest(
        &self,
        now: Instant,
        key: &VerifyingKey,
        b: &UploadBegin,
    ) -> Result<(), (RejectCode, String)> {
        let m = &b.manifest;
        if m.device_public_key != *key {
            return Err((
                RejectCode::BadSignature,
                "manifest names another device's key".into(),
            ));
        }
        m.verify(&b.signature)
            .map_err(|e| (RejectCode::BadSignature, e.to_string()))?;
        if let Some(spec) = &self.cfg.strategy.buffered {
            return self.check_buffered(key, m, spec.max_staleness);
        }
        if m.round_id < self.round.id {
            return Err((
                RejectCode::RoundClosed,
                format!(
                    "round {} is closed; round {} is open",
                    m.round_id, self.round.id
                ),
            ));
        }
        if self.finished || m.round_id > self.round.id {
            return Err((
                RejectCode::UnknownRound,
                format!("round {} is not open here", m.round_id),
            ));
        }
        if !self.models.contains_key(&m.model_version) {
            return Err((
                RejectCode::UnknownModelVersion,
                format!("model version {} is not known here", m.model_version),
            ));
        }
        if m.model_version != self.round.model_version {
            return Err((
                RejectCode::RoundClosed,
                format!(
                    "update is against model {}, round {} trains {}",
                    m.model_version, self.round.id, self.round.model_version
                ),
            ));
        }
        match self.round.participants.get(key.as_bytes()) {
            None => {
                return Err((
                    RejectCode::NotSelected,
                    format!("device was not selected for round {}", self.round.id),
                ));
            }
            Some(Participation::Accepted) => {
                return Err((
                    RejectCode::Replay,
                    format!(
                        "an update from this device was already accepted in round {}",
                        self.round.id
                    ),
                ));
            }
            Some(Participation::Selected) => {}
        }
        if self.round.deadline.is_some_and(|d| now >= d) {
            return Err((
                RejectCode::DeadlinePassed,
                "the round's deadline has passed".into(),
            ));
        }
        if m.sample_count == 0 {
            return Err((
                RejectCode::Malformed,
                "sample_count must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// FedBuff's checks: the task was handed out here, is within the
    /// staleness window, trained the model of its round, and was not
    /// accepted before.
    fn check_buffered(
        &self,
        key: &VerifyingKey,
        m: &sign::UpdateManifest,
        max_staleness: u64,
    ) -> Result<(), (RejectCode, String)> {
        if self.finished || m.round_id > self.round.id {
            return Err((
                RejectCode::UnknownRound,
                format!("round {} is not open here", m.round_id),
            ));
        }
        let staleness = self.round.id - m.round_id;
        if staleness > max_staleness {
            return Err((
                RejectCode::RoundClosed,
                format!(
                    "update is {staleness} versions stale; at most {max_staleness} are accepted"
                ),
            ));
        }
        if !self.models.contains_key(&m.model_version) {
            return Err((
                RejectCode::UnknownModelVersion,
                format!("model version {} is not known here", m.model_version),
            ));
        }
        let trained = self
            .round_versions
            .iter()
            .find(|(r, _)| *r == m.round_id)
            .map(|(_, v)| *v);
        if trained != Some(m.model_version) {
            return Err((
                RejectCode::UnknownModelVersion,
                format!(
                    "update is against model {}, not the model of round {}",
                    m.model_version, m.round_id
                ),
            ));
        }
        if self.accepted_tasks.contains(&(key.to_bytes(), m.round_id))
            || self
                .accepted_hashes
                .iter()
                .any(|(_, h)| *h == m.payload_hash)
        {
            return Err((
                RejectCode::Replay,
                format!(
                    "an update from this device for round {} was already accepted",
                    m.round_id
                ),
            ));
        }
        if self.inflight.get(key.as_bytes()) != Some(&m.round_id) {
            return Err((
                RejectCode::NotSelected,
                format!("no task of round {} is open for this device", m.round_id),
            ));
        }
        if m.sample_count == 0 {
            return Err((
                RejectCode::Malformed,
                "sample_count must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn on_upload_begin(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        b: UploadBegin,
    ) {
        if let Err((code, detail)) = self.check_manifest(now, &key, &b) {
            self.reject(session, Some(device_id(&key)), code, detail, false);
            return;
        }
        let hash = b.manifest.payload_hash;
        let next_index = match self.round.uploads.get(key.as_bytes()) {
            // Resume the same payload from where it stopped.
            Some(u)
                if u.begin.manifest.payload_hash == hash
                    && u.begin.chunk_bytes == b.chunk_bytes =>
            {
                u.next_index
            }
            _ => {
                self.round.uploads.insert(
                    key.to_bytes(),
                    Upload {
                        begin: b,
                        data: Vec::new(),
                        next_index: 0,
                    },
                );
                0
            }
        };
        self.send(
            session,
            AggMsg::UploadStatus {
                payload_hash: hash,
                next_index,
            },
        );
        if next_index > 0 {
            self.try_finish_upload(now, session, key);
        }
    }

    fn on_upload_chunk(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        hash: [u8; 32],
        index: u32,
        data: Bytes,
    ) {
        let dev = device_id(&key);
        let Some(u) = self
            .round
            .uploads
            .get_mut(key.as_bytes())
            .filter(|u| u.begin.manifest.payload_hash == hash)
        else {
            match self.closed_uploads.get_mut(&hash) {
                Some(told) if *told => {} // already told; drop the rest
                Some(told) => {
                    *told = true;
                    self.reject(
                        session,
                        Some(dev),
                        RejectCode::RoundClosed,
                        "the round closed during this upload".into(),
                        false,
                    );
                }
                None => self.reject(
                    session,
                    Some(dev),
                    RejectCode::UnknownRound,
                    "chunk for an upload that is not open in this round".into(),
                    false,
                ),
            }
            return;
        };
        if index < u.next_index {
            return; // duplicate after a resume: already have it
        }
        if index > u.next_index {
            let next = u.next_index;
            self.send(
                session,
                AggMsg::UploadStatus {
                    payload_hash: hash,
                    next_index: next,
                },
            );
            return;
        }
        let declared = u.begin.manifest.payload_bytes;
        let is_last = u.data.len() as u64 + data.len() as u64 >= declared;
        if (data.len() as u64) != u64::from(u.begin.chunk_bytes) && !is_last
            || u.data.len() as u64 + data.len() as u64 > declared
        {
            self.round.uploads.remove(key.as_bytes());
            self.reject(
                session,
                Some(dev),
                RejectCode::TooLarge,
                format!("upload chunks do not add up to the declared {declared} bytes"),
                false,
            );
            return;
        }
        u.data.extend_from_slice(&data);
        u.next_index += 1;
        self.try_finish_upload(now, session, key);
    }

    fn try_finish_upload(&mut self, now: Instant, session: SessionId, key: VerifyingKey) {
        let dev = device_id(&key);
        let Some(u) = self.round.uploads.get(key.as_bytes()) else {
            return;
        };
        if (u.data.len() as u64) < u.begin.manifest.payload_bytes {
            return;
        }
        let u = self.round.uploads.remove(key.as_bytes()).expect("present");
        let m = &u.begin.manifest;
        let buffered = self.cfg.strategy.buffered.clone();
        if buffered.is_none() && self.round.deadline.is_some_and(|d| now >= d) {
            self.reject(
                session,
                Some(dev),
                RejectCode::DeadlinePassed,
                "the round's deadline passed during the upload".into(),
                false,
            );
            return;
        }
        let got = *blake3::hash(&u.data).as_bytes();
        if got != m.payload_hash {
            self.reject(
                session,
                Some(dev),
                RejectCode::HashMismatch,
                "payload does not match the signed hash".into(),
                false,
            );
            return;
        }
        let delta =
            match update::decode_update(&u.data, self.round.combiner.dimension(), &self.cfg.limits)
            {
                Ok(d) => d,
                Err(e) => {
                    self.reject_update(
                        session,
                        &dev,
                        m.sample_count,
                        e.reject_code(),
                        e.to_string(),
                    );
                    return;
                }
            };
        if let Some(bound) = self.cfg.update_norm_max {
            let norm = l2_norm(&delta);
            if norm > bound {
                let detail = format!("update norm {norm:.4} exceeds the bound {bound}");
                self.reject_update(session, &dev, m.sample_count, RejectCode::NormBound, detail);
                return;
            }
        }
        let stake = self.stakes.stake(&dev);
        // FedBuff discounts stale updates; synchronous rounds have none.
        let discount = buffered
            .as_ref()
            .map_or(1.0, |b| b.discount(self.round.id - m.round_id));
        let raw_weight = match self.cfg.weights.raw_weight(stake, m.sample_count) {
            Ok(w) if w > 0.0 && w.is_finite() => w * discount,
            Ok(w) => {
                let detail = format!("participant weight {w} is not positive");
                self.reject_update(
                    session,
                    &dev,
                    m.sample_count,
                    RejectCode::NotSelected,
                    detail,
                );
                return;
            }
            Err(e) => {
                self.reject_update(
                    session,
                    &dev,
                    m.sample_count,
                    RejectCode::NotSelected,
                    e.to_string(),
                );
                return;
            }
        };
        // Recorded under the round (buffer) it is combined into.
        self.out.push_back(Output::Persist(Box::new(DurableUpdate {
            round_id: self.round.id,
            device: dev.clone(),
            payload_hash: m.payload_hash,
            sample_count: m.sample_count,
            raw_weight,
            stake,
            metrics: m.metrics.clone(),
            payload: Bytes::from(u.data.clone()),
        })));
        self.round.combiner.add(delta, raw_weight);
        self.round.metrics.push((raw_weight, m.metrics.clone()));
        self.round.accepted.push(Contribution {
            round_id: self.round.id,
            device: dev.clone(),
            stake,
            samples: m.sample_count,
            raw_weight,
            share: 0.0,
            accepted: true,
            reason: None,
        });
        self.round
            .participants
            .insert(key.to_bytes(), Participation::Accepted);
        if buffered.is_some() {
            self.inflight.remove(key.as_bytes());
            self.accepted_tasks.insert((key.to_bytes(), m.round_id));
            self.accepted_hashes
                .push_back((self.round.id, m.payload_hash));
        }
        let (round_id, payload_hash) = (m.round_id, m.payload_hash);
        self.event(Event::UpdateAccepted {
            round_id: self.round.id,
            staleness: self.round.id - round_id,
            device: dev,
            sample_count: m.sample_count,
            payload_bytes: m.payload_bytes,
        });
        self.send(
            session,
            AggMsg::UpdateAccepted {
                round_id,
                payload_hash,
            },
        );
        if self.round.combiner.count() >= self.cfg.devices_per_round {
            self.close_round(now);
        }
    }

    /// Refuse a fully received update and record why.
    fn reject_update(
        &mut self,
        session: SessionId,
        dev: &str,
        samples: u64,
        code: RejectCode,
        detail: String,
    ) {
        self.event(Event::Contribution(Contribution {
            round_id: self.round.id,
            device: dev.to_string(),
            stake: self.stakes.stake(dev),
            samples,
            raw_weight: 0.0,
            share: 0.0,
            accepted: false,
            reason: Some(format!("{code}: {detail}")),
        }));
        self.reject(session, Some(dev.to_string()), code, detail, false);
    }

    fn close_round(&mut self, _now: Instant) {
        let accepted = self.round.combiner.count();
        let round_id = self.round.id;
        let dim = self.current.params.values.len();
        let mut contributions = std::mem::take(&mut self.round.accepted);
        let outcome = if accepted >= self.cfg.min_devices {
            let combined = self
                .round
                .combiner
                .finish(self.cfg.weights.max_share)
                .expect("accepted >= 1");
            let total: f64 = combined.weights.iter().sum();
            for (c, w) in contributions.iter_mut().zip(&combined.weights) {
                c.share = w / total;
            }
            let mut values = self.strategy.aggregate_round(
                round_id,
                &self.current.params.values,
                &combined,
                &[],
            );
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
            self.store_model(version, blob.clone());
            self.published_rounds += 1;
            self.event(Event::ModelPublished {
                round_id,
                version,
                blob,
            });
            RoundOutcome::Published(version)
        } else {
            for c in &mut contributions {
                c.accepted = false;
                c.reason = Some("round aborted: too few updates by the deadline".into());
            }
            RoundOutcome::Aborted
        };
        for c in contributions {
            self.event(Event::Contribution(c));
        }
        let metrics = self.strategy.aggregate_evaluate(&self.round.metrics);
        self.event(Event::RoundClosed {
            round_id,
            accepted,
            outcome,
            metrics,
        });
        self.deltas.clear();
        self.delta_for.clear();
        let uploads = match self.cfg.strategy.buffered.clone() {
            Some(b) => {
                // FedBuff: uploads in flight go on; tasks, replay records
                // and model versions older than the staleness window go.
                let next = round_id + 1;
                let oldest = next.saturating_sub(b.max_staleness);
                self.inflight.retain(|_, r| *r >= oldest);
                self.accepted_tasks.retain(|(_, r)| *r >= oldest);
                while self
                    .accepted_hashes
                    .front()
                    .is_some_and(|(r, _)| *r < oldest)
                {
                    self.accepted_hashes.pop_front();
                }
                self.round_versions.push_back((next, self.current_version));
                while self
                    .round_versions
                    .front()
                    .is_some_and(|(r, _)| *r < oldest)
                {
                    self.round_versions.pop_front();
                }
                std::mem::take(&mut self.round.uploads)
            }
            None => {
                self.closed_uploads = self
                    .round
                    .uploads
                    .values()
                    .map(|u| (u.begin.manifest.payload_hash, false))
                    .collect();
                HashMap::new()
            }
        };
        self.round = Round {
            id: round_id + 1,
            model_version: self.current_version,
            deadline: None,
            participants: HashMap::new(),
            uploads,
            combiner: self.strategy.combiner(dim, self.cfg.weights.max_share),
            accepted: Vec::new(),
            metrics: Vec::new(),
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

    fn store_model(&mut self, version: ModelVersion, blob: Bytes) {
        let mref = ModelRef::new(version, blob.len() as u64, self.cfg.chunk_bytes);
        self.models.insert(version, StoredModel { blob, mref });
        self.history.push_back(version);
        while self.history.len() > self.cfg.versions_kept {
            let old = self.history.pop_front().expect("non-empty");
            self.models.remove(&old);
        }
    }

    fn device_of(&self, session: SessionId) -> Option<String> {
        match &self.sessions.get(&session)?.state {
            SessionState::AwaitAuth { key, .. } | SessionState::Ready { key } => {
                Some(device_id(key))
            }
            SessionState::AwaitHello => None,
        }
    }

    fn send(&mut self, session: SessionId, msg: AggMsg) {
        self.out.push_back(Output::Send { session, msg });
    }

    fn event(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    fn reject(
        &mut self,
        session: SessionId,
        device: Option<String>,
        code: RejectCode,
        detail: String,
        fatal: bool,
    ) {
        self.event(Event::Rejected {
            device,
            code,
            detail: detail.clone(),
        });
        self.send(session, AggMsg::reject(code, detail.clone(), fatal));
        if fatal {
            self.drop_session(session);
            self.out.push_back(Output::Close {
                session,
                reason: format!("{code}: {detail}"),
            });
        }
    }
}
