//! Round orchestration as a deterministic state machine (sans-IO).
//!
//! Inputs go in through `handle_*(now, ..)`; outputs come out of
//! [`Coordinator::poll_output`]; the next timer is [`Coordinator::poll_timeout`].
//! Time and randomness (a seed in the config) are inputs, so a simulated
//! fleet with virtual time drives exactly the code the QUIC server drives.
//!
//! A round: devices check in (`TaskRequest`) during a window after it
//! opens; `ceil(devices_per_round * over_selection)` of them are drawn at
//! random and sent a [`TaskOffer`]; the rest are paced away ("come back in
//! [t1, t2]") (see [`selection`]). The round's deadline runs from its
//! opening. It closes as soon as `devices_per_round` updates are accepted,
//! when every selected device has delivered or given up, or at the
//! deadline; it is aggregated if at least `min_devices` updates arrived and
//! aborted (model unchanged, the next round retries) otherwise, and rolled
//! back when most of its devices report that training diverged (see
//! [`closing`]). Late updates are rejected. With FedBuff
//! ([`crate::strategy::BufferedSpec`]) rounds run without a barrier
//! instead (see [`fedbuff`]).
//!
//! The coordinator is cut by responsibility:
//! - [`sessions`]: connections, authentication and its timers;
//! - [`transfers`]: chunked model downloads and upload reassembly, where
//!   every byte a device can make the coordinator hold is kept and counted;
//! - [`policy`] (synchronous rounds) and [`fedbuff`]: how rounds run, behind
//!   one `RoundPolicy` trait;
//! - [`selection`]: the check-in window, slot timeouts, abandoned tasks;
//! - [`ledger`]: the round's contribution records;
//! - [`closing`]: closing a round, and settling it (scores and rewards);
//! - [`misconduct`]: penalties with their evidence (refused signed updates,
//!   equivocation, copies) and the stake they slash;
//! - [`tree`]: a leaf's rounds driven by its parent, and a root's checks
//!   of its leaves' partial aggregates;
//! - [`verify`]: a complete upload's payload checks (hash, decoding, norm),
//!   handed to the driver to run off this task ([`Output::Verify`],
//!   [`Coordinator::handle_verified`]), bounded;
//! - [`close`]: a round's close (the combiner's finish and contribution
//!   scoring), handed to the driver likewise ([`Output::CloseRound`],
//!   [`Coordinator::handle_closed`]), one at a time;
//! - this module: the message flow that ties them together, weighting,
//!   combining and publishing.

mod admission;
mod checkpoint;
mod close;
mod closing;
mod config;
mod evaluation;
mod fedbuff;
mod finish;
mod intake;
mod ledger;
mod misconduct;
mod output;
mod policy;
mod ratings;
mod secure;
mod selection;
mod sessions;
mod settle;
mod transfers;
mod tree;
mod verify;

pub use close::{CloseJob, RoundClose};
pub use config::{
    CoordinatorConfig, LeafBounds, TreeRole, VERIFY_IN_FLIGHT_LIMIT, VERIFY_IN_FLIGHT_MAX,
};
pub use output::{
    Contribution, DurableUpdate, Event, Output, Penalty, RoundOutcome, SettledEntry, Settlement,
};
pub use tree::{Forward, ParentRound, Partial};
pub use verify::{Verified, VerifyJob};

use std::collections::VecDeque;
use std::time::Instant;

use fedge_proto::msg::TaskOffer;
use fedge_proto::sign::VerifyingKey;
use fedge_proto::{AggMsg, DeviceMsg, Limits, ModelBlob, ModelVersion, ProtoError, RejectCode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::robust::Combiner;
use crate::scoring::Evaluator;
use crate::strategy::Strategy;
use crate::weighting::StakeRegistry;
use ledger::RoundBook;
use policy::{RoundPolicy, RoundView, Synchronous, TaskDecision};
use sessions::{SessionState, SessionTable, device_id};
use transfers::TransferManager;

/// Identifies one connection (assigned by the driver).
pub type SessionId = u64;

struct Round {
    id: u64,
    model_version: ModelVersion,
    /// None until the round's clock starts (the first round: at the first
    /// input; later ones when they open).
    deadline: Option<Instant>,
    /// While the check-in window is open: when it ends.
    window_end: Option<Instant>,
    /// Candidates checked in during the window, one per key (a key that
    /// asks again replaces its entry; ordered by key, so the draw does not
    /// depend on who asked first).
    waiting: std::collections::BTreeMap<sessions::DeviceKey, selection::Candidate>,
    /// Devices that reported their training on this round's model diverged.
    diverged: usize,
    /// Devices that asked in this round and were paced away for want of a
    /// slot: they come back, and a freed slot is theirs to take.
    reserve: std::collections::HashSet<sessions::DeviceKey>,
    combiner: Box<dyn Combiner>,
    book: RoundBook,
    /// The round's SecAgg+, once drawn (`[strategy.secagg]`).
    secure: Option<secure::SecureRound>,
    /// Its evaluation tasks and their reports (`[evaluation]`).
    evaluation: evaluation::EvalRound,
}

impl Round {
    fn new(id: u64, model_version: ModelVersion, combiner: Box<dyn Combiner>) -> Self {
        Round {
            id,
            model_version,
            deadline: None,
            window_end: None,
            waiting: Default::default(),
            diverged: 0,
            reserve: Default::default(),
            combiner,
            book: RoundBook::default(),
            secure: None,
            evaluation: Default::default(),
        }
    }
}

/// The aggregator's round orchestration.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    rng: ChaCha8Rng,
    sessions: SessionTable,
    admission: admission::Admission,
    transfers: TransferManager,
    current: ModelBlob,
    current_version: ModelVersion,
    round: Round,
    slots: selection::SlotTimers,
    /// Versions the current model was built from, most recent last (the
    /// rollback targets).
    lineage: Vec<ModelVersion>,
    policy: Box<dyn RoundPolicy>,
    strategy: Box<dyn Strategy>,
    stakes: Box<dyn StakeRegistry>,
    evaluator: Option<settle::SharedEvaluator>,
    /// Penalties not yet settled (a round that aborts settles none).
    penalties: Vec<Penalty>,
    /// Signed manifests kept for equivocation evidence, and slashed stakes.
    misconduct: misconduct::Misconduct,
    /// Devices' ratings, for `weights.rating_floor`.
    ratings: ratings::Ratings,
    /// Sketches of recent rounds' updates, to flag stale replays.
    replays: crate::scoring::replay::History,
    published_rounds: u64,
    finished: bool,
    /// Fetches of the final model in progress, bounded.
    finals: finish::FinalDownloads,
    /// A leaf's link with its parent (unused elsewhere).
    leaf: tree::LeafState,
    /// Complete uploads whose payloads are being checked off this task.
    verifying: verify::Verifying,
    /// The round's close while its job is out, and results waiting for it.
    closes: close::Closes,
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
        let largest_upload = cfg.tree.upload_bytes_max(dim as u64);
        if cfg.uploads_in_flight_bytes_max < largest_upload {
            return Err(format!(
                "uploads_in_flight_bytes_max ({}) is below the largest upload of this model's \
                 {dim} parameters ({largest_upload} bytes): no device could ever upload",
                cfg.uploads_in_flight_bytes_max
            ));
        }
        if let Some(spec) = &cfg.strategy.secagg {
            secure::check_model(
                spec,
                dim,
                cfg.limits.frame_bytes_max,
                cfg.selection_target() as u32,
            )?;
        }
        let mut strategy = cfg.strategy.build(cfg.devices_per_round);
        let combiner = strategy.combiner(dim, cfg.weights.max_share);
        let policy: Box<dyn RoundPolicy> = match &cfg.strategy.buffered {
            Some(spec) => Box::new(fedbuff::FedBuff::new(
                spec.clone(),
                cfg.selection_target(),
                first_round_id,
                version,
            )),
            None => Box::new(Synchronous::new(cfg.selection_target())),
        };
        let mut transfers = TransferManager::new(cfg.chunk_bytes, cfg.versions_kept);
        transfers.store_model(version, blob);
        let finished = cfg.rounds != 0 && first_round_id > cfg.rounds;
        let mut c = Coordinator {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            sessions: SessionTable::new(
                cfg.auth_timeout,
                cfg.max_sessions,
                cfg.max_unauthenticated,
            ),
            admission: admission::Admission::new(
                cfg.handshakes_per_sec,
                cfg.auth_timeout,
                cfg.max_unauthenticated,
                cfg.retry_window.1.saturating_sub(cfg.retry_window.0),
            ),
            transfers,
            current: initial,
            current_version: version,
            round: Round::new(first_round_id, version, combiner),
            slots: selection::SlotTimers::default(),
            lineage: Vec::new(),
            policy,
            strategy,
            stakes: Box::new(std::collections::HashMap::<String, f64>::new()),
            evaluator: None,
            penalties: Vec::new(),
            misconduct: Default::default(),
            ratings: Default::default(),
            replays: Default::default(),
            published_rounds,
            finished,
            finals: finish::FinalDownloads::new(cfg.final_downloads_max, cfg.slot_timeout),
            leaf: tree::LeafState {
                awaiting: cfg.tree.leaf,
                ..Default::default()
            },
            verifying: verify::Verifying::new(cfg.verify_in_flight_max),
            closes: Default::default(),
            out: VecDeque::new(),
            cfg,
        };
        // A leaf's first round opens when its parent offers it.
        if !finished && !c.leaf.awaiting {
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

    /// Score updates on the operator's validation set from now on (see
    /// [`crate::scoring`]); without an evaluator rounds are settled
    /// unscored and pay no rewards.
    pub fn set_evaluator(&mut self, evaluator: Box<dyn Evaluator>) {
        self.evaluator = Some(std::sync::Arc::new(std::sync::Mutex::new(evaluator)));
    }

    pub fn set_stakes(&mut self, stakes: Box<dyn StakeRegistry>) {
        self.stakes = stakes;
    }

    pub fn stakes_mut(&mut self) -> &mut dyn StakeRegistry {
        self.stakes.as_mut()
    }

    pub fn strategy_name(&self) -> String {
        self.policy.describe(&self.strategy.name())
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

    /// The window a device not needed now is told to come back in: the
    /// configured `retry_window`, stretched with the devices connected
    /// (see [`admission::request_window`]).
    fn request_window(&self) -> (std::time::Duration, std::time::Duration) {
        admission::request_window(
            self.cfg.retry_window,
            self.sessions.len(),
            self.cfg.task_requests_per_sec,
        )
    }

    /// The longest a device told to come back now may stay away: a
    /// finished aggregator serves at least this long past its last round
    /// so that the devices it paced away can fetch the final model.
    pub fn pace_horizon(&self, now: Instant) -> std::time::Duration {
        self.request_window().1.max(self.admission.horizon(now))
    }

    /// Devices this process knows of that have not yet been told the run
    /// is finished (and may still come back for the final model).
    pub fn devices_awaiting_finish(&self) -> usize {
        self.sessions.awaiting_finish()
    }

    /// Bytes of partial uploads the coordinator holds.
    pub fn upload_bytes_held(&self) -> u64 {
        self.transfers.upload_bytes_held()
    }

    /// Payload checks handed out ([`Output::Verify`]) and not yet
    /// answered; at most `verify_in_flight_max`.
    pub fn verify_jobs_out(&self) -> usize {
        // Those answered while a close is out wait for it, answered.
        self.verifying.out() - self.closes.parked.len()
    }

    /// Complete uploads waiting for a payload check, and the payload bytes
    /// held for checks (waiting or out), which count against
    /// `uploads_in_flight_bytes_max`.
    pub fn verify_backlog(&self) -> (usize, u64) {
        (self.verifying.waiting(), self.verifying.bytes())
    }

    // ------------------------------------------------------------ outputs

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest instant at which `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // While a close job is out the round's timers wait for it.
        let round = if self.finished || self.closing() {
            [None; 3]
        } else {
            [
                // A secure round's stage deadlines bound it, not the round's.
                self.round.deadline.filter(|_| !self.secure_running()),
                self.round.window_end,
                self.slots.next(),
            ]
        };
        let secure = if self.finished {
            None
        } else {
            self.secure_deadline()
        };
        round
            .into_iter()
            .chain([self.sessions.next_timeout(), secure])
            .flatten()
            .min()
    }

    // ------------------------------------------------------------ inputs

    /// A connection was established; `tls_binding` is exported from its TLS
    /// session and binds the authentication signature to it.
    /// Past the admission budget (see [`admission`]) the connection is
    /// paced away before it authenticates: `NoTask` with a window sized
    /// by how many are waiting and the handshake rate, then closed.
    pub fn handle_connect(&mut self, now: Instant, session: SessionId, tls_binding: [u8; 32]) {
        self.tick(now);
        let authenticating = self.sessions.authenticating();
        if let Some((lo, hi)) = self.admission.decide(now, authenticating) {
            let (lo_ms, hi_ms) = (lo.as_millis() as u64, hi.as_millis() as u64);
            let detail = format!(
                "{authenticating} connections are authenticating (at most {} at once); \
                 come back in {lo_ms}..{hi_ms} ms",
                self.admission.budget()
            );
            self.event(Event::Rejected {
                device: None,
                code: RejectCode::TooManyDevices,
                detail: detail.clone(),
            });
            self.send(
                session,
                AggMsg::NoTask {
                    retry_after_ms_min: lo_ms,
                    retry_after_ms_max: hi_ms,
                    reason: detail.clone(),
                },
            );
            self.out.push_back(Output::Close {
                session,
                reason: detail,
            });
            return;
        }
        if !self.sessions.connect(now, session, tls_binding) {
            let max = self.sessions.max_unauthenticated();
            self.reject(
                session,
                None,
                RejectCode::TooManyDevices,
                format!("{max} connections are already authenticating; come back later"),
                true,
            );
        }
    }

    pub fn handle_disconnect(&mut self, _now: Instant, session: SessionId) {
        self.sessions.remove(session);
        self.finals.done(session);
    }

    /// A frame arrived that could not be decoded (malformed, oversized, or
    /// the wrong direction). The connection is told why and closed.
    pub fn handle_bad_frame(&mut self, _now: Instant, session: SessionId, err: &ProtoError) {
        let device = self.sessions.device_of(session);
        self.reject(session, device, err.reject_code(), err.to_string(), true);
    }

    /// A connection exceeded its request rate.
    pub fn handle_rate_limited(&mut self, _now: Instant, session: SessionId) {
        let device = self.sessions.device_of(session);
        self.reject(
            session,
            device,
            RejectCode::RateLimited,
            "request rate over the per-device limit".into(),
            true,
        );
    }

    pub fn handle_message(&mut self, now: Instant, session: SessionId, msg: DeviceMsg) {
        self.tick(now);
        let Some(state) = self.sessions.state(session) else {
            return; // already closed
        };
        match (state, msg) {
            (SessionState::AwaitHello, DeviceMsg::Hello(h)) => {
                self.on_hello(session, h.schema_version, h.device_public_key)
            }
            (SessionState::AwaitAuth { key, nonce }, DeviceMsg::AuthResponse { signature }) => {
                let (key, nonce) = (*key, *nonce);
                self.on_auth_response(session, key, nonce, &signature)
            }
            (SessionState::Ready { key }, msg) => {
                let key = *key;
                self.handle_ready(now, session, key, msg);
            }
            (_, msg) => {
                let device = self.sessions.device_of(session);
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
        self.tick(now);
        for id in self.sessions.auth_expired(now) {
            self.reject(
                id,
                None,
                // Not a refusal of the device: it may connect again.
                RejectCode::DeadlinePassed,
                "authentication timed out".into(),
                true,
            );
        }
        if self.closing() {
            return; // the round's timers wait for its close
        }
        if !self.finished {
            self.expire_slots(now);
            self.secure_timeout(now);
        }
        // A secure round's stage deadlines bound it, not the round's.
        if !self.finished
            && !self.secure_running()
            && let Some(d) = self.round.deadline
            && now >= d
        {
            if self.policy.idle() && self.round.combiner.count() == 0 && !self.is_leaf() {
                // Nobody came to train this round: nothing to close. Give
                // it another period rather than spend a round id on it.
                // (A leaf's round ids and deadline are its parent's: it
                // gives the round up instead, so the parent need not wait.)
                self.arm_round(now);
            } else {
                self.close_round(now);
            }
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
            } => {
                self.slots.stop(key.as_bytes());
                self.on_chunk_request(session, key, model_version, index)
            }
            DeviceMsg::UploadBegin(_) if self.cfg.strategy.secagg.is_some() => self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::ProtocolViolation,
                "this aggregator combines updates with SecAgg+: an update in the clear is refused \
                 (send it masked, through the round's SecAgg+ stages)"
                    .into(),
                false,
            ),
            DeviceMsg::UploadBegin(b) => {
                self.slots.stop(key.as_bytes());
                self.on_upload_begin(now, session, key, *b)
            }
            DeviceMsg::TaskAbandoned {
                round_id,
                reason,
                detail,
            } => self.on_abandoned(now, key, round_id, reason, detail),
            DeviceMsg::UploadChunk {
                payload_hash,
                index,
                data,
            } => self.on_upload_chunk(now, session, key, payload_hash, index, data),
            DeviceMsg::SecAgg { round_id, msg, .. } => {
                self.on_secagg(now, session, key, round_id, msg)
            }
            DeviceMsg::EvalReport(r) => self.on_eval_report(now, session, key, *r),
            DeviceMsg::Hello(_) | DeviceMsg::AuthResponse { .. } => self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::ProtocolViolation,
                format!("`{}` after authentication", msg.name()),
                true,
            ),
        }
    }

    fn round_view(&self) -> RoundView {
        RoundView {
            id: self.round.id,
            model_version: self.round.model_version,
            deadline: self.round.deadline,
            finished: self.finished,
        }
    }

    pub(super) fn on_task_request(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        have: Option<ModelVersion>,
    ) {
        if self.finished {
            self.on_finished_request(now, session, key, have);
            return;
        }
        if self.leaf.awaiting {
            self.pace_away(session, "waiting for the parent aggregator's next round");
            return;
        }
        if self.closing() {
            self.pace_away(session, "the round is closing");
            return;
        }
        if self.secure_running() {
            // A secure round takes nobody after its draw, and a drawn
            // device that asks again lost its keys (or has sent its part).
            self.pace_away(session, "a secure aggregation round is running");
            return;
        }
        let view = self.round_view();
        let decision = match self.policy.existing_task(key.as_bytes(), &view) {
            Some(d) => d,
            None => {
                if !self.eligible(session, &key) {
                    return;
                }
                if self.window_open(now) {
                    // Answered when the window is drawn.
                    self.check_in(session, key, have);
                } else {
                    self.select_now(now, session, key, have);
                }
                return;
            }
        };
        match decision {
            TaskDecision::Offer => self.send_offer(now, session, have),
            TaskDecision::PaceAway(reason) => self.pace_away(session, reason),
        }
    }

    /// Whether the device's stake lets it take part; if not, it is told to
    /// come back much later.
    fn eligible(&mut self, session: SessionId, key: &VerifyingKey) -> bool {
        if self.cfg.tree.leaves.is_some() {
            return true; // a root's leaves were named when they authenticated
        }
        let dev = device_id(key);
        let Err(e) = self.cfg.weights.raw_weight(self.stake_of(&dev), 1) else {
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

    /// The smaller download of the round's model for a device that holds
    /// `have`, if there is one.
    fn delta_for(&mut self, have: Option<ModelVersion>) -> Option<fedge_proto::msg::DeltaRef> {
        have.and_then(|base| {
            self.transfers.delta_ref(
                base,
                self.round.model_version,
                &self.current,
                &self.cfg.limits,
            )
        })
    }

    fn send_offer(&mut self, now: Instant, session: SessionId, have: Option<ModelVersion>) {
        let mref = self.transfers.model_ref(&self.round.model_version);
        let delta = self.delta_for(have);
        let deadline = self
            .policy
            .offer_deadline(now, &self.round_view(), self.cfg.round_deadline);
        let mut deadline_ms = deadline.saturating_duration_since(now).as_millis() as u64;
        let base = self.round_plan().clone();
        let plan = self.strategy.configure_round(self.round.id, &base);
        let secagg = match (&self.round.secure, self.sessions.state(session)) {
            (Some(s), Some(SessionState::Ready { key })) => s.offer(key.as_bytes()),
            _ => None,
        };
        if let (Some(_), Some(spec)) = (&secagg, &self.cfg.strategy.secagg) {
            // The masked input is due by the end of its stage.
            deadline_ms = spec.advertise_keys_ms + spec.share_keys_ms + spec.masked_input_ms;
        }
        let offer = TaskOffer {
            round_id: self.round.id,
            model: mref,
            plan,
            deadline_ms,
            delta,
            secagg,
            evaluate: false,
        };
        self.send(session, AggMsg::TaskOffer(Box::new(offer)));
    }

    fn pace_away(&mut self, session: SessionId, reason: &str) {
        let (lo, hi) = self.request_window();
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
        self.note_chunk_asked(session, version, index);
        match self.transfers.chunk(version, index) {
            Ok(data) => self.send(
                session,
                AggMsg::ModelChunk {
                    model_version: version,
                    index,
                    data,
                },
            ),
            Err((code, detail)) => self.reject(session, Some(device_id(&key)), code, detail, false),
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
            self.sessions.remove(session);
            self.out.push_back(Output::Close {
                session,
                reason: format!("{code}: {detail}"),
            });
        }
    }
}
