//! A simulated fleet: the real sans-IO [`Coordinator`] and real
//! [`DeviceSession`]s exchanging messages through a simulated network with
//! virtual time, latency, retransmission delays (message loss on a reliable
//! stream), and connections dropped mid-download or mid-upload.
//!
//! Deterministic for a seed; a failing test prints it.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use fedge_aggregator::coordinator::{
    Coordinator, CoordinatorConfig, Event, Output, RoundClose, RoundOutcome, Verified,
};
use fedge_device::session::{
    DeviceEvent, DeviceSession, EvalOutput, SessionConfig, Status, TrainOutput,
};
use fedge_proto::sign::SigningKey;
use fedge_proto::{AggMsg, DeviceMsg, ModelBlob, ModelVersion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod close;
mod data;
pub use data::{model, wobble};

#[derive(Clone, Debug)]
pub struct NetConfig {
    pub latency: Duration,
    /// Extra random latency in [0, jitter].
    pub jitter: Duration,
    /// Probability a message is lost once and retransmitted after `rto`.
    pub loss: f64,
    pub rto: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            loss: 0.0,
            rto: Duration::from_millis(200),
        }
    }
}

/// When to cut a device's connection, and for how long it stays offline.
#[derive(Clone, Debug)]
pub enum DropAt {
    /// After the device has received this many model chunks.
    DownloadChunks(usize),
    /// After the aggregator has received this many upload chunks from it.
    UploadChunks(usize),
}

#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub delta: f32,
    pub samples: u64,
    pub train_time: Duration,
    pub drop: Option<(DropAt, Duration)>,
    pub session: SessionConfig,
    /// From this round on, local training diverges (the update is NaN).
    pub diverge_from_round: Option<u64>,
    /// Takes offers but never asks for a model chunk (a slot hog).
    pub never_download: bool,
    /// The update to send instead of `delta` in every coordinate (its
    /// length must be the model's).
    pub vector: Option<Vec<f32>>,
    /// Scales each coordinate of `vector` by 1.5 or 0.5, drawn per round
    /// and coordinate (the same for every device), so that no round's
    /// update replays an earlier one (an honest device's never does).
    pub wobble: bool,
    /// Once its update is accepted, signs three other updates for the
    /// same task and announces them (equivocation; a modified binary).
    pub equivocate: bool,
    /// Adds this to every value of its SecAgg+ masked input on the way
    /// out (a modified binary that does not clip; the values stay in the
    /// ring, so nothing but their sum can tell).
    pub tamper_masked_input: Option<u64>,
    /// What it reports from an evaluation task (None: it has no held-out
    /// data and declines).
    pub eval: Option<EvalOutput>,
}

impl DeviceSpec {
    pub fn new(delta: f32, samples: u64) -> Self {
        DeviceSpec {
            delta,
            samples,
            train_time: Duration::from_millis(500),
            drop: None,
            diverge_from_round: None,
            never_download: false,
            vector: None,
            wobble: false,
            equivocate: false,
            tamper_masked_input: None,
            eval: None,
            session: SessionConfig {
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
                heartbeat_interval: Duration::from_secs(5),
                ..SessionConfig::default()
            },
        }
    }
}

struct Device {
    spec: DeviceSpec,
    session: DeviceSession,
    key: SigningKey,
    /// The last upload it announced (for `equivocate`).
    announced: Option<fedge_proto::msg::UploadBegin>,
    conn: Option<u64>,
    offline_until: Option<Instant>,
    dropped: bool,
    chunks_received: usize,
    upload_chunks_sent_to_agg: usize,
    chunk_requests: usize,
    upload_chunk_msgs: usize,
    events: Vec<DeviceEvent>,
}

enum Ev {
    ToAgg {
        conn: u64,
        msg: DeviceMsg,
    },
    ToDev {
        conn: u64,
        msg: AggMsg,
    },
    Connected {
        dev: usize,
        conn: u64,
    },
    ConnectFailed {
        dev: usize,
    },
    DevLost {
        conn: u64,
    },
    AggLost {
        conn: u64,
    },
    Trained {
        dev: usize,
        round: u64,
        out: TrainOutput,
    },
    Evaluated {
        dev: usize,
        round: u64,
        out: Option<EvalOutput>,
    },
    /// A payload check the coordinator handed out came back.
    Verified(Verified),
    /// A round's close the coordinator handed out came back.
    Closed(RoundClose),
}

/// Virtual time a payload check takes off the coordinator's task (other
/// inputs are handled meanwhile, as on the server).
const VERIFY_TIME: Duration = Duration::from_millis(3);

pub struct Sim {
    pub seed: u64,
    pub t0: Instant,
    pub now: Instant,
    net: NetConfig,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: BTreeMap<u64, Ev>,
    seq: u64,
    pub coord: Coordinator,
    devices: Vec<Device>,
    conn_dev: HashMap<u64, usize>,
    last_delivery: HashMap<(u64, bool), Instant>,
    next_conn: u64,
    pub events: Vec<Event>,
    pub steps: u64,
    /// Updates the coordinator asked to make durable, and the last of them
    /// (at most 64, for a verifier's recomputation).
    pub persisted: usize,
    /// The most payload checks the coordinator had out at once.
    pub verify_out_max: usize,
    pub kept: std::collections::VecDeque<fedge_aggregator::coordinator::DurableUpdate>,
    /// Round closes: how they are answered, and what happened meanwhile.
    pub closes: close::Closes,
}

impl Sim {
    pub fn new(seed: u64, cfg: CoordinatorConfig, net: NetConfig, specs: Vec<DeviceSpec>) -> Self {
        Self::with_model(seed, cfg, net, specs, model(64))
    }

    pub fn with_model(
        seed: u64,
        cfg: CoordinatorConfig,
        net: NetConfig,
        specs: Vec<DeviceSpec>,
        model: ModelBlob,
    ) -> Self {
        let t0 = Instant::now();
        let coord = Coordinator::new(CoordinatorConfig { seed, ..cfg }, model, 1, 0).unwrap();
        let devices = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&(seed ^ ((i as u64 + 1) * 0x9e37)).to_le_bytes());
                key[8] = i as u8;
                let key = SigningKey::from_bytes(&key);
                let session = DeviceSession::new(
                    SessionConfig {
                        seed: seed.wrapping_add(i as u64),
                        ..spec.session.clone()
                    },
                    key.clone(),
                );
                Device {
                    spec,
                    session,
                    key,
                    announced: None,
                    conn: None,
                    offline_until: None,
                    dropped: false,
                    chunks_received: 0,
                    upload_chunks_sent_to_agg: 0,
                    chunk_requests: 0,
                    upload_chunk_msgs: 0,
                    events: Vec::new(),
                }
            })
            .collect();
        Sim {
            seed,
            t0,
            now: t0,
            net,
            rng: ChaCha8Rng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            pending: BTreeMap::new(),
            seq: 0,
            coord,
            devices,
            conn_dev: HashMap::new(),
            last_delivery: HashMap::new(),
            next_conn: 1,
            events: Vec::new(),
            steps: 0,
            persisted: 0,
            verify_out_max: 0,
            kept: Default::default(),
            closes: Default::default(),
        }
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.pending.insert(self.seq, ev);
    }

    /// Delivery time of the next message on one direction of a connection:
    /// a QUIC stream is ordered, so a message never overtakes the previous one.
    fn stream_at(&mut self, conn: u64, to_agg: bool) -> Instant {
        let at = self.now + self.delay();
        let last = self.last_delivery.entry((conn, to_agg)).or_insert(at);
        *last = (*last).max(at);
        *last
    }

    fn delay(&mut self) -> Duration {
        let jitter = self.net.jitter.as_micros() as u64;
        let mut d = self.net.latency + Duration::from_micros(self.rng.random_range(0..=jitter));
        if self.rng.random_bool(self.net.loss) {
            d += self.net.rto;
        }
        d
    }

    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(out) = self.coord.poll_output() {
                progressed = true;
                match out {
                    Output::Send { session, msg } => {
                        self.closes.note_sent(&msg);
                        let at = self.stream_at(session, false);
                        self.schedule(at, Ev::ToDev { conn: session, msg });
                    }
                    Output::Close { session, .. } => {
                        let at = self.now + self.net.latency * 2;
                        self.schedule(at, Ev::DevLost { conn: session });
                    }
                    Output::Event(e) => self.events.push(e),
                    Output::Persist(u) => {
                        self.persisted += 1;
                        self.kept.truncate(63);
                        self.kept.push_front(*u);
                    }
                    Output::Forward(f) => panic!("a lone aggregator forwarded {f:?}"),
                    Output::Verify(job) => {
                        self.verify_out_max = self.verify_out_max.max(self.coord.verify_jobs_out());
                        let at = self.now + VERIFY_TIME;
                        self.schedule(at, Ev::Verified(job.run()));
                    }
                    Output::CloseRound(job) => self.on_close_job(*job),
                }
            }
            for i in 0..self.devices.len() {
                while let Some(ev) = self.devices[i].session.poll_event() {
                    progressed = true;
                    match &ev {
                        DeviceEvent::Connect => {
                            let offline =
                                self.devices[i].offline_until.is_some_and(|t| self.now < t);
                            let at = self.now + self.net.latency * 2;
                            if offline {
                                self.schedule(at, Ev::ConnectFailed { dev: i });
                            } else {
                                let conn = self.next_conn;
                                self.next_conn += 1;
                                self.schedule(at, Ev::Connected { dev: i, conn });
                            }
                        }
                        DeviceEvent::Disconnect => {
                            if let Some(c) = self.devices[i].conn.take() {
                                let at = self.now + self.net.latency;
                                self.schedule(at, Ev::AggLost { conn: c });
                            }
                        }
                        DeviceEvent::Train {
                            round_id, model, ..
                        } => {
                            let spec = &self.devices[i].spec;
                            let diverged = spec.diverge_from_round.is_some_and(|r| *round_id >= r);
                            let value = if diverged { f32::NAN } else { spec.delta };
                            let delta = match &spec.vector {
                                Some(v) if !diverged && spec.wobble => v
                                    .iter()
                                    .enumerate()
                                    .map(|(j, x)| x * wobble(*round_id, j))
                                    .collect(),
                                Some(v) if !diverged => v.clone(),
                                _ => vec![value; model.params.values.len()],
                            };
                            let out = TrainOutput {
                                delta,
                                sample_count: spec.samples,
                                metrics: vec![],
                            };
                            let at = self.now + spec.train_time;
                            let round = *round_id;
                            self.schedule(at, Ev::Trained { dev: i, round, out });
                        }
                        DeviceEvent::Evaluate { round_id, .. } => {
                            let spec = &self.devices[i].spec;
                            let at = self.now + spec.train_time / 10;
                            let (out, round) = (spec.eval, *round_id);
                            self.schedule(at, Ev::Evaluated { dev: i, round, out });
                        }
                        _ => {}
                    }
                    self.devices[i].events.push(ev);
                }
                while let Some(msg) = self.devices[i].session.poll_transmit() {
                    progressed = true;
                    if self.devices[i].spec.never_download
                        && matches!(msg, DeviceMsg::ChunkRequest { .. })
                    {
                        continue;
                    }
                    if let Some(conn) = self.devices[i].conn {
                        match &msg {
                            DeviceMsg::ChunkRequest { .. } => self.devices[i].chunk_requests += 1,
                            DeviceMsg::UploadChunk { .. } => self.devices[i].upload_chunk_msgs += 1,
                            DeviceMsg::UploadBegin(b) => {
                                self.devices[i].announced = Some((**b).clone());
                            }
                            _ => {}
                        }
                        let at = self.stream_at(conn, true);
                        self.schedule(at, Ev::ToAgg { conn, msg });
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let q = self.queue.peek().map(|Reverse((t, _))| *t);
        let c = self.coord.poll_timeout();
        let d = self
            .devices
            .iter()
            .filter_map(|d| d.session.poll_timeout())
            .min();
        [q, c, d].into_iter().flatten().min()
    }

    fn cut(&mut self, dev: usize, offline: Duration) {
        let d = &mut self.devices[dev];
        d.dropped = true;
        d.offline_until = Some(self.now + offline);
        if let Some(c) = d.conn.take() {
            d.session.handle_disconnected(self.now);
            let at = self.now + self.net.latency;
            self.schedule(at, Ev::AggLost { conn: c });
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::ToAgg { conn, msg } => {
                if !self.conn_dev.contains_key(&conn) {
                    return;
                }
                let dev = self.conn_dev[&conn];
                let is_chunk = matches!(msg, DeviceMsg::UploadChunk { .. });
                let msg = match (msg, self.devices[dev].spec.tamper_masked_input) {
                    (
                        DeviceMsg::SecAgg {
                            round_id,
                            bits,
                            msg: fedge_proto::secagg::DeviceSecAgg::MaskedInput(v),
                        },
                        Some(add),
                    ) => {
                        let m = fedge_proto::secagg::mask::ring_mask(bits);
                        DeviceMsg::SecAgg {
                            round_id,
                            bits,
                            msg: fedge_proto::secagg::DeviceSecAgg::MaskedInput(
                                v.into_iter().map(|x| x.wrapping_add(add) & m).collect(),
                            ),
                        }
                    }
                    (msg, _) => msg,
                };
                self.coord.handle_message(now, conn, msg);
                if is_chunk {
                    self.devices[dev].upload_chunks_sent_to_agg += 1;
                    let n = self.devices[dev].upload_chunks_sent_to_agg;
                    if let Some((DropAt::UploadChunks(k), off)) =
                        self.devices[dev].spec.drop.clone()
                        && n == k
                        && !self.devices[dev].dropped
                    {
                        self.cut(dev, off);
                    }
                }
            }
            Ev::ToDev { conn, msg } => {
                let Some(&dev) = self.conn_dev.get(&conn) else {
                    return;
                };
                if self.devices[dev].conn != Some(conn) {
                    return;
                }
                let is_chunk = matches!(msg, AggMsg::ModelChunk { .. });
                if matches!(msg, AggMsg::UpdateAccepted { .. }) && self.devices[dev].spec.equivocate
                {
                    self.equivocate(dev, conn);
                }
                self.devices[dev].session.handle_message(now, msg);
                if is_chunk {
                    self.devices[dev].chunks_received += 1;
                    let n = self.devices[dev].chunks_received;
                    if let Some((DropAt::DownloadChunks(k), off)) =
                        self.devices[dev].spec.drop.clone()
                        && n == k
                        && !self.devices[dev].dropped
                    {
                        self.cut(dev, off);
                    }
                }
            }
            Ev::Connected { dev, conn } => {
                self.conn_dev.insert(conn, dev);
                self.devices[dev].conn = Some(conn);
                let mut binding = [0u8; 32];
                binding[..8].copy_from_slice(&conn.to_le_bytes());
                self.coord.handle_connect(now, conn, binding);
                self.devices[dev].session.handle_connected(now, binding);
            }
            Ev::ConnectFailed { dev } => self.devices[dev].session.handle_disconnected(now),
            Ev::DevLost { conn } => {
                if let Some(&dev) = self.conn_dev.get(&conn)
                    && self.devices[dev].conn == Some(conn)
                {
                    self.devices[dev].conn = None;
                    self.devices[dev].session.handle_disconnected(now);
                }
            }
            Ev::AggLost { conn } => self.coord.handle_disconnect(now, conn),
            Ev::Verified(v) => self.coord.handle_verified(now, v),
            Ev::Closed(c) => self.on_closed(now, c),
            Ev::Trained { dev, out, .. } => self.devices[dev].session.handle_trained(now, out),
            Ev::Evaluated { dev, round, out } => {
                self.devices[dev]
                    .session
                    .handle_evaluated(now, round, Ok(out))
            }
        }
    }

    /// [`Sim::equivocate`] on the device's current connection, if any.
    pub fn equivocate_now(&mut self, dev: usize) {
        if let Some(conn) = self.devices[dev].conn {
            self.equivocate(dev, conn);
        }
    }

    /// Device `dev` signs a second update for the task whose update was
    /// just accepted (another payload) and announces it on `conn`.
    fn equivocate(&mut self, dev: usize, conn: u64) {
        let d = &mut self.devices[dev];
        let Some(first) = d.announced.take() else {
            return;
        };
        // Three other payloads, each signed: one offence, one penalty.
        let forged: Vec<_> = (1..=3u8)
            .map(|k| {
                let mut b = first.clone();
                b.manifest.payload_hash[0] ^= k;
                b.signature = b.manifest.sign(&d.key);
                b
            })
            .collect();
        for b in forged {
            let at = self.stream_at(conn, true);
            self.schedule(
                at,
                Ev::ToAgg {
                    conn,
                    msg: DeviceMsg::UploadBegin(Box::new(b)),
                },
            );
        }
    }

    /// Run until `done` holds, at most `limit` of virtual time. Panics
    /// (printing the seed) if the limit is reached.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) {
        let end = self.t0 + limit;
        for _ in 0..5_000_000u64 {
            self.pump();
            if done(self) {
                return;
            }
            let Some(t) = self.next_time() else {
                panic!(
                    "seed {}: simulation stalled at {:?}",
                    self.seed,
                    self.now - self.t0
                );
            };
            assert!(
                t <= end,
                "seed {}: not done within {limit:?} of virtual time; events: {:?}",
                self.seed,
                self.events
                    .iter()
                    .filter_map(|e| match e {
                        Event::DeviceSelected { .. } => None,
                        Event::ModelPublished {
                            round_id, version, ..
                        } => Some(format!("published round {round_id} as {version}")),
                        Event::Rejected { code, detail, .. } => {
                            Some(format!("rejected {code}: {detail}"))
                        }
                        other => Some(format!("{other:?}").chars().take(100).collect()),
                    })
                    .take(30)
                    .collect::<Vec<_>>()
            );
            self.now = self.now.max(t);
            self.steps += 1;
            while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
                if at > self.now {
                    break;
                }
                self.queue.pop();
                let ev = self.pending.remove(&seq).expect("scheduled");
                self.deliver(ev);
            }
            self.coord.handle_timeout(self.now);
            let now = self.now;
            for d in &mut self.devices {
                if d.session.poll_timeout().is_some_and(|t| t <= now) {
                    d.session.handle_timeout(now);
                }
            }
        }
        panic!("seed {}: step bound reached", self.seed);
    }

    /// The aggregator restarts: a new coordinator from the current model,
    /// the next round id and (with `keep_state`) the old one's checkpoint;
    /// every device loses its connection and reconnects.
    pub fn restart_aggregator(&mut self, keep_state: bool) {
        let state = self.coord.checkpoint();
        let cfg = self.coord.config().clone();
        let model = self.coord.current_model().clone();
        let (round, published) = (self.coord.round_id(), self.coord.published_rounds());
        self.coord = Coordinator::new(cfg, model, round, published).unwrap();
        if keep_state {
            self.coord.restore_checkpoint(&state).unwrap();
        }
        for i in 0..self.devices.len() {
            self.cut(i, Duration::ZERO);
        }
        self.conn_dev.clear();
    }

    /// Run until every device has finished (or failed).
    pub fn run_to_end(&mut self, limit: Duration) {
        self.run_until(limit, |s| s.devices.iter().all(|d| d.session.is_terminal()));
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn device_events(&self, i: usize) -> &[DeviceEvent] {
        &self.devices[i].events
    }

    pub fn device_id(&self, i: usize) -> String {
        self.devices[i].session.device_id()
    }

    pub fn contributions(&self) -> Vec<fedge_aggregator::coordinator::Contribution> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Contribution(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn device_status(&self, i: usize) -> Status {
        self.devices[i].session.status()
    }

    /// Whether device `i`'s connection was cut by its drop plan.
    pub fn was_dropped(&self, i: usize) -> bool {
        self.devices[i].dropped
    }

    pub fn chunk_requests(&self, i: usize) -> usize {
        self.devices[i].chunk_requests
    }

    pub fn upload_chunk_msgs(&self, i: usize) -> usize {
        self.devices[i].upload_chunk_msgs
    }

    pub fn published(&self) -> Vec<(u64, usize, ModelVersion)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::RoundClosed {
                    round_id,
                    accepted,
                    outcome: RoundOutcome::Published(v),
                    ..
                } => Some((*round_id, *accepted, *v)),
                _ => None,
            })
            .collect()
    }

    /// Every round's combined evaluation.
    pub fn evaluations(&self) -> Vec<fedge_aggregator::evaluation::EvalSummary> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Evaluated(s) => Some((**s).clone()),
                _ => None,
            })
            .collect()
    }

    pub fn aborted(&self) -> Vec<(u64, usize)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::RoundClosed {
                    round_id,
                    accepted,
                    outcome: RoundOutcome::Aborted,
                    ..
                } => Some((*round_id, *accepted)),
                _ => None,
            })
            .collect()
    }

    /// (round, from, to) of every rollback.
    pub fn rollbacks(&self) -> Vec<(u64, ModelVersion, ModelVersion)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::RolledBack {
                    round_id, from, to, ..
                } => Some((*round_id, *from, *to)),
                _ => None,
            })
            .collect()
    }

    /// Sample-weighted mean of the deltas of the devices whose updates were
    /// accepted in `round`, recomputed naively from the specs; with FedBuff
    /// each delta is also multiplied by `(1 + staleness)^-a` (Nguyen et al.
    /// divide the discounted sum by the buffer size).
    pub fn expected_round_delta(&self, round: u64) -> f64 {
        let by_key: HashMap<String, &DeviceSpec> = self
            .devices
            .iter()
            .map(|d| (d.session.device_id(), &d.spec))
            .collect();
        let a = self
            .coord
            .config()
            .strategy
            .buffered
            .as_ref()
            .map_or(0.0, |b| b.staleness_exponent);
        let mut num = 0.0;
        let mut den = 0.0;
        for e in &self.events {
            if let Event::UpdateAccepted {
                round_id,
                device,
                staleness,
                ..
            } = e
                && *round_id == round
            {
                // FedBuff divides by the (weighted) buffer size: the
                // discount shrinks the delta, not its share of the weight.
                let s = by_key[device];
                let w = s.samples as f64;
                let discount = (1.0 + *staleness as f64).powf(-a);
                num += f64::from(s.delta) * discount * w;
                den += w;
            }
        }
        num / den
    }

    /// (round, device, staleness) of every accepted update, in order.
    pub fn accepted(&self) -> Vec<(u64, String, u64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::UpdateAccepted {
                    round_id,
                    device,
                    staleness,
                    ..
                } => Some((*round_id, device.clone(), *staleness)),
                _ => None,
            })
            .collect()
    }
}
