//! The aggregator's QUIC driver: a thin tokio layer around [`Coordinator`].
//!
//! One task owns the coordinator. Each connection has a reader task (frames
//! in, bounded, rate-limited, decoded at the boundary) and a writer task
//! (frames out). A bad frame or a rate violation closes that connection
//! only; every other device keeps being served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedge_proto::io::{ReadError, read_frame, write_frame};
use fedge_proto::sign::TLS_EXPORTER_LABEL;
use fedge_proto::{DeviceMsg, Limits, ModelBlob, ModelVersion, ProtoError};
use tokio::sync::mpsc;

use crate::coordinator::{Coordinator, CoordinatorConfig, Event, Forward, SessionId};
use crate::metrics::{Metrics, SharedStatus, Status};
use crate::scoring::Evaluator;
use crate::store::Store;
use crate::tls::TlsIdentity;
use crate::uplink::{FromParent, ParentLink};

mod commit;
mod finish;
mod handshakes;
mod outputs;

pub use commit::{
    COMMIT_GROUP_LIMIT, COMMIT_GROUP_MAX, COMMIT_WAIT, COMMIT_WAIT_LIMIT, CommitLimits,
};
pub use handshakes::{HandshakeLimits, REFUSED_COMEBACK};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub coordinator: CoordinatorConfig,
    /// Sustained requests per second allowed from one connection.
    pub rate_per_sec: f64,
    /// Burst allowance on top of the sustained rate.
    pub rate_burst: f64,
    pub idle_timeout: Duration,
    /// After the last round, keep serving this long so devices can fetch
    /// the final model, then stop (None: serve forever).
    pub finish_grace: Option<Duration>,
    /// Stake registry file, reloaded every few seconds when it changes.
    pub stakes: Option<std::path::PathBuf>,
    /// HTTP address for `/metrics` (Prometheus) and `/status` (JSON).
    pub metrics_listen: Option<SocketAddr>,
    /// Bytes queued for one connection that has not read them yet; a
    /// device over it is dropped (it never makes the server hold more).
    pub writer_queue_bytes_max: usize,
    /// TLS handshakes at once, and how new connections wait for a turn
    /// (see `server::handshakes`).
    pub handshakes: HandshakeLimits,
    /// How accepted updates are grouped before they are made durable
    /// and acknowledged (see `server::commit`).
    pub commit: CommitLimits,
    /// How often the server asks whether it still holds its PostgreSQL
    /// database lock; it stops once it does not (see `store::lock`).
    pub lock_check: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:4433".parse().expect("addr"),
            coordinator: CoordinatorConfig::default(),
            rate_per_sec: 2000.0,
            rate_burst: 4000.0,
            idle_timeout: Duration::from_secs(60),
            finish_grace: Some(Duration::from_secs(10)),
            stakes: None,
            metrics_listen: None,
            writer_queue_bytes_max: WRITER_QUEUE_BYTES_MAX,
            handshakes: HandshakeLimits::default(),
            commit: CommitLimits::default(),
            lock_check: crate::store::LOCK_CHECK,
        }
    }
}

/// Default for [`ServerConfig::writer_queue_bytes_max`]: a few model chunks.
pub const WRITER_QUEUE_BYTES_MAX: usize = 4 << 20;

/// Frames a connection's writer may have queued, whatever their size.
const WRITER_QUEUE_FRAMES_MAX: usize = 1024;

/// The coordinator's side of a connection's outgoing queue, bounded in
/// frames and in bytes: the writer task gives bytes back as it sends them.
#[derive(Clone)]
struct Writer {
    tx: mpsc::Sender<WriterCmd>,
    queued_bytes: Arc<AtomicUsize>,
    bytes_max: usize,
}

impl Writer {
    fn new(bytes_max: usize) -> (Self, mpsc::Receiver<WriterCmd>, Arc<AtomicUsize>) {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE_FRAMES_MAX);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let w = Writer {
            tx,
            queued_bytes: Arc::clone(&queued_bytes),
            bytes_max,
        };
        (w, rx, queued_bytes)
    }

    /// Queues a frame; false (and nothing queued) when either bound is hit.
    fn try_frame(&self, frame: Bytes) -> bool {
        let n = frame.len();
        let before = self.queued_bytes.fetch_add(n, Ordering::AcqRel);
        if before + n > self.bytes_max || self.tx.try_send(WriterCmd::Frame(frame)).is_err() {
            self.queued_bytes.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn close(&self, reason: String) {
        let _ = self.tx.try_send(WriterCmd::Close(reason));
    }
}

/// What happened during a run.
#[derive(Clone, Debug, Default)]
pub struct ServeReport {
    pub rounds_published: u64,
    pub final_version: Option<ModelVersion>,
    pub rejections: HashMap<String, u64>,
}

enum Input {
    Connected {
        id: SessionId,
        binding: [u8; 32],
        writer: Writer,
    },
    Message(SessionId, Box<DeviceMsg>),
    BadFrame(SessionId, ProtoError),
    RateLimited(SessionId),
    Disconnected(SessionId),
}

enum WriterCmd {
    Frame(Bytes),
    Close(String),
}

/// Token bucket for one connection's request rate.
struct RateLimit {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A bound, ready server.
pub struct Server {
    endpoint: quinn::Endpoint,
    cfg: ServerConfig,
    store: Store,
    http: Option<std::net::TcpListener>,
    metrics: Arc<Metrics>,
    observer: Option<mpsc::UnboundedSender<Event>>,
    evaluator: Option<Box<dyn Evaluator>>,
    parent: Option<(ParentLink, fedge_proto::sign::SigningKey)>,
}

impl Server {
    /// Bind the QUIC endpoint.
    pub fn bind(
        mut cfg: ServerConfig,
        identity: &TlsIdentity,
        store: Store,
    ) -> anyhow::Result<Self> {
        cfg.coordinator.federation_id =
            fedge_proto::sign::federation_id(&cfg.coordinator.federation, &identity.fingerprint());
        let tls = identity.server_config()?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(cfg.idle_timeout)?));
        t.max_concurrent_bidi_streams(4u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        sc.transport_config(Arc::new(t));
        let endpoint = listen(sc, cfg.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let http = match cfg.metrics_listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        Ok(Server {
            endpoint,
            cfg,
            store,
            http,
            metrics: Arc::new(Metrics::default()),
            observer: None,
            evaluator: None,
            parent: None,
        })
    }

    /// Serve as a leaf of the aggregator `link` names, authenticating to it
    /// with `key` (see [`crate::uplink`]); the coordinator's configuration
    /// must say it is a leaf (`tree.leaf`).
    pub fn set_parent(&mut self, link: ParentLink, key: fedge_proto::sign::SigningKey) {
        self.parent = Some((link, key));
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Receive a copy of every coordinator event (for the simulator and
    /// embedding applications).
    pub fn observe(&mut self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.observer = Some(tx);
        rx
    }

    /// Score updates with `evaluator` (the operator's validation set; see
    /// [`crate::scoring`]).
    pub fn set_evaluator(&mut self, evaluator: Box<dyn Evaluator>) {
        self.evaluator = Some(evaluator);
    }

    /// The metrics this server updates.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Where `/metrics` and `/status` are served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until all rounds are done (plus the grace period) or
    /// `shutdown` resolves.
    pub async fn run(
        self,
        initial: ModelBlob,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<ServeReport> {
        let Server {
            endpoint,
            cfg,
            mut store,
            http,
            metrics,
            observer,
            evaluator,
            parent,
        } = self;
        let status: SharedStatus = Default::default();
        let http_task = match http {
            Some(l) => Some(tokio::spawn(crate::metrics::serve(
                tokio::net::TcpListener::from_std(l)?,
                Arc::clone(&metrics),
                Arc::clone(&status),
            ))),
            None => None,
        };
        let resume = store.resume_point();
        let mut core = Coordinator::new(
            cfg.coordinator.clone(),
            initial,
            resume.next_round_id,
            resume.published_rounds,
        )
        .map_err(|e| anyhow::anyhow!("bad configuration: {e}"))?;
        if let Some(e) = evaluator {
            core.set_evaluator(e);
            // What a verifier recomputes the scores from.
            store.keep_update_payloads(true);
            store.keep_model(core.current_model())?;
        }
        // Server optimizer, clipping and FedBuff state of the current
        // version, then the updates acknowledged before a restart.
        let current = core.current_version();
        match store.checkpoint(&current)? {
            Some(state) => {
                core.restore_checkpoint(&state)
                    .map_err(|e| anyhow::anyhow!("restoring the server state of {current}: {e}"))?;
                tracing::info!(version = %current, "server state restored");
            }
            None if resume.published_rounds > 0 => tracing::warn!(
                version = %current,
                "no saved server state for the current model (it was published just before a \
                 crash): server optimizer moments, the clipping bound and FedBuff's records \
                 start afresh"
            ),
            None => {}
        }
        // Stakes slashed by the penalties the ledger records (it is
        // checked first: slashes come from a chain this key signed).
        let records =
            crate::ledger::verify_chain(&store.ledger_records().await?, &store.ledger_public_key())
                .map_err(|e| {
                    anyhow::anyhow!("the ledger in the state directory does not verify: {e}")
                })?;
        core.restore_slashes(&records);
        core.restore_replay_history(&records, |round, hash| {
            store
                .read_update_payload(round, hash)
                .map_err(|e| e.to_string())
        });
        core.restore_ratings(&store.ratings().await?);
        core.restore_penalties(store.pending_penalties().await?);
        for u in store.round_updates(core.round_id()).await? {
            let device = u.device.clone();
            core.restore_update(Instant::now(), u)
                .map_err(|e| anyhow::anyhow!("restoring an update from {device}: {e}"))?;
        }
        if core.accepted_in_round() > 0 {
            tracing::info!(
                round_id = core.round_id(),
                restored = core.accepted_in_round(),
                "resumed the open round with its acknowledged updates"
            );
        }
        if let Some(path) = &cfg.stakes {
            let reg = crate::weighting::FileRegistry::open(path)?;
            tracing::info!(path = %path.display(), devices = reg.len(), "stake registry loaded");
            core.set_stakes(Box::new(reg));
        }
        let mut reload = tokio::time::interval(Duration::from_secs(5));
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limits = cfg.coordinator.limits.clone();
        let (in_tx, mut in_rx) = mpsc::channel::<Input>(4096);
        let gate = handshakes::HandshakeGate::new(cfg.handshakes.clone());
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            in_tx,
            (limits, gate.clone()),
            cfg.clone(),
            Arc::clone(&metrics),
        ));
        anyhow::ensure!(
            parent.is_some() == core.is_leaf(),
            "a leaf aggregator needs its parent's address, and only a leaf has one"
        );
        // A leaf's link with its parent: rounds come in, partials go out.
        let (forward_tx, mut from_parent, uplink) = match parent {
            Some((link, key)) => {
                let (ftx, frx) = mpsc::channel::<Forward>(16);
                let (ptx, prx) = mpsc::channel::<FromParent>(4);
                let task = tokio::spawn(crate::uplink::run(
                    link,
                    key,
                    core.current_model().clone(),
                    cfg.coordinator.limits.clone(),
                    frx,
                    ptx,
                ));
                (Some(ftx), Some(prx), Some(task))
            }
            None => (None, None, None),
        };
        cfg.commit
            .validate()
            .map_err(|e| anyhow::anyhow!("bad configuration: {e}"))?;
        crate::store::check_lock_interval(cfg.lock_check)
            .map_err(|e| anyhow::anyhow!("bad configuration: {e}"))?;
        let mut lock = store.watch_lock(cfg.lock_check);
        // Set when the database lock is lost: the server stops, writing
        // nothing more (see `store::lock`).
        let mut lock_lost = None;
        let mut commit = commit::GroupCommit::new(store.update_writer(), cfg.commit.clone());
        let mut jobs = tokio::task::JoinSet::new();
        let mut closes = tokio::task::JoinSet::new();
        let mut writers: HashMap<SessionId, Writer> = HashMap::new();
        let mut report = ServeReport::default();
        let mut finished_at: Option<Instant> = core.is_finished().then(Instant::now);
        let mut handled_at = Instant::now();
        tokio::pin!(shutdown);
        loop {
            let outlets = outputs::Outlets {
                metrics: &metrics,
                observer: observer.as_ref(),
                forwards: forward_tx.as_ref(),
                commit: &mut commit,
                jobs: &mut jobs,
                closes: &mut closes,
            };
            let closed = outputs::drain(
                &mut core,
                &mut writers,
                &mut store,
                &mut report,
                &mut finished_at,
                outlets,
            )
            .await?;
            commit.poll_start(Instant::now());
            if closed {
                metrics
                    .aggregation_seconds
                    .observe(handled_at.elapsed().as_secs_f64());
            }
            metrics.sessions.set(core.session_count() as i64);
            *status.lock().expect("status lock") = Status {
                round_id: core.round_id(),
                model_version: core.current_version().to_hex(),
                accepted_in_round: core.accepted_in_round(),
                devices_per_round: cfg.coordinator.devices_per_round,
                published_rounds: core.published_rounds(),
                sessions: core.session_count(),
                finished: core.is_finished(),
                strategy: core.strategy_name(),
            };
            // Finished: serve the final model while devices come for it,
            // until the grace period past the longest wait devices are
            // told (or a device refused at the door may take) has passed
            // since the last fetch began (or everyone has left).
            let comeback = finished_at.and_then(|_| gate.comeback_until());
            let finish_until = match (finished_at, cfg.finish_grace) {
                (Some(t), Some(grace)) => Some(finish::finish_until(
                    t,
                    grace,
                    core.finish_active_at(),
                    comeback,
                    core.pace_horizon(Instant::now()),
                )),
                _ => None,
            };
            if let Some(until) = finish_until
                && (Instant::now() >= until
                    || (writers.is_empty()
                        && core.session_count() == 0
                        && core.devices_awaiting_finish() == 0
                        && comeback.is_none_or(|c| Instant::now() >= c)))
            {
                break;
            }
            let mut wake = core.poll_timeout();
            for until in [finish_until, commit.start_at()].into_iter().flatten() {
                wake = Some(wake.map_or(until, |w| w.min(until)));
            }
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = in_rx.recv() => {
                    let Some(input) = input else { break };
                    let now = Instant::now();
                    handled_at = now;
                    match input {
                        Input::Connected { id, binding, writer } => {
                            writers.insert(id, writer);
                            core.handle_connect(now, id, binding);
                        }
                        Input::Message(id, msg) => core.handle_message(now, id, *msg),
                        Input::BadFrame(id, e) => core.handle_bad_frame(now, id, &e),
                        Input::RateLimited(id) => core.handle_rate_limited(now, id),
                        Input::Disconnected(id) => {
                            writers.remove(&id);
                            core.handle_disconnect(now, id);
                        }
                    }
                }
                _ = sleep => {
                    handled_at = Instant::now();
                    core.handle_timeout(handled_at);
                }
                res = async { commit.running().await }, if commit.is_running() => {
                    for o in commit.done(res)? {
                        outputs::deliver(o, &mut core, &mut writers, &metrics);
                    }
                }
                Some(v) = jobs.join_next(), if !jobs.is_empty() => {
                    let v = v.map_err(|e| anyhow::anyhow!("a payload check failed: {e}"))?;
                    handled_at = Instant::now();
                    core.handle_verified(handled_at, v);
                }
                Some(c) = closes.join_next(), if !closes.is_empty() => {
                    let (c, took) = c.map_err(|e| anyhow::anyhow!("a round's close failed: {e}"))?;
                    handled_at = Instant::now();
                    let round_id = c.round_id();
                    core.handle_closed(handled_at, c);
                    tracing::info!(
                        round_id,
                        close_job_ms = took.as_secs_f64() * 1e3,
                        apply_ms = handled_at.elapsed().as_secs_f64() * 1e3,
                        "round closed: combined and scored off the coordinator's task"
                    );
                }
                m = async { from_parent.as_mut()?.recv().await }, if from_parent.is_some() => {
                    let now = Instant::now();
                    handled_at = now;
                    let done = match m {
                        Some(FromParent::Round(r)) => core.handle_parent_round(now, r),
                        Some(FromParent::Finished(model)) => core.handle_parent_finished(now, model),
                        None => {
                            from_parent = None;
                            Ok(())
                        }
                    };
                    if let Err(e) = done {
                        tracing::error!(error = %e, "the parent's round could not be run here");
                    }
                }
                _ = reload.tick() => match core.stakes_mut().reload() {
                    Ok(true) => tracing::info!("stake registry reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "stake registry not reloaded; previous stakes stay"),
                },
                e = lock.lost() => {
                    lock_lost = Some(e);
                    break;
                }
                _ = &mut shutdown => break,
            }
        }
        // Whatever was accepted is made durable before the store closes
        // (its acknowledgements go out with the frames still queued),
        // unless the database is no longer this server's: then nothing is
        // written, and what waits for a group is never acknowledged.
        let flushed = match lock_lost {
            Some(e) => Err(anyhow::Error::new(e)),
            None => commit.flush().await.map(|released| {
                for o in released {
                    outputs::deliver(o, &mut core, &mut writers, &metrics);
                }
            }),
        };
        tracing::debug!(
            updates = commit.written.0,
            groups = commit.written.1,
            "accepted updates made durable"
        );
        accept.abort();
        if let Some(t) = uplink {
            t.abort();
        }
        if let Some(t) = http_task {
            t.abort();
        }
        report.rounds_published = core.published_rounds();
        report.final_version = Some(core.current_version());
        for (_, w) in writers.drain() {
            w.close("aggregator stopping".into());
        }
        endpoint.close(0u32.into(), b"aggregator stopping");
        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
            .await
            .ok();
        flushed?;
        // The state directory and database are free for the next run.
        store.close().await;
        Ok(report)
    }
}

/// Socket buffer the server's UDP socket asks for, each way (the kernel
/// grants at most `net.core.rmem_max` / `wmem_max`). Every device's packets
/// arrive on this one socket: with the kernel's default (about 200 KiB) a
/// burst of connections overflows it between two reads, and the dropped
/// Initial packets are only sent again after QUIC's probe timeout, which
/// doubles each time (1 s, 2 s, 4 s...): a handshake that could take a
/// millisecond times out instead.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// The server's QUIC endpoint on `addr`, its socket's buffers enlarged to
/// [`UDP_BUFFER_BYTES`] as far as the kernel allows.
fn listen(sc: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    enlarge_buffers(&socket);
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(sc), socket, runtime)
}

/// Ask for [`UDP_BUFFER_BYTES`] of socket buffer each way; what the kernel
/// grants is logged, a refusal only warned about (the defaults still work,
/// with more loss under a burst).
pub fn enlarge_buffers(socket: &std::net::UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the UDP socket's state; default buffers");
            return;
        }
    };
    let asked = (
        state.set_recv_buffer_size(socket.into(), UDP_BUFFER_BYTES),
        state.set_send_buffer_size(socket.into(), UDP_BUFFER_BYTES),
    );
    if let (Err(e), _) | (_, Err(e)) = asked {
        tracing::warn!(error = %e, "cannot enlarge the UDP socket's buffers");
    }
    tracing::debug!(
        recv = state.recv_buffer_size(socket.into()).unwrap_or(0),
        send = state.send_buffer_size(socket.into()).unwrap_or(0),
        "UDP socket buffers"
    );
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: mpsc::Sender<Input>,
    (limits, gate): (Limits, handshakes::HandshakeGate),
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
) {
    let mut next_id: SessionId = 1;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        // Refuse at the door well before the coordinator's own limit.
        let room = cfg.coordinator.max_sessions + cfg.coordinator.max_unauthenticated;
        if open.load(std::sync::atomic::Ordering::Relaxed) > room {
            gate.note_refused();
            incoming.refuse();
            continue;
        }
        let Some(place) = gate.queue() else {
            refuse_handshake(incoming, &gate, &metrics);
            continue;
        };
        let gate = gate.clone();
        let id = next_id;
        next_id += 1;
        let core = core.clone();
        let limits = limits.clone();
        let cfg = cfg.clone();
        let open = Arc::clone(&open);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(turn) = gate.turn(place).await else {
                refuse_handshake(incoming, &gate, &metrics);
                open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                return;
            };
            let conn = handshake(incoming, turn, gate.turn_max());
            if let Err(e) = connection(id, conn, core.clone(), limits, &cfg, &metrics).await {
                tracing::debug!(session = id, error = %e, "connection ended");
            }
            let _ = core.send(Input::Disconnected(id)).await;
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

/// A connection the handshake limits turned away: refused at the QUIC
/// level (the device backs off and comes back: the gate notes when),
/// counted with the rejections as `handshake_refused`.
fn refuse_handshake(
    incoming: quinn::Incoming,
    gate: &handshakes::HandshakeGate,
    metrics: &Metrics,
) {
    gate.note_refused();
    incoming.refuse();
    metrics
        .rejections
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: "handshake_refused".into(),
        })
        .inc();
}

/// The QUIC/TLS handshake, holding its `turn` until it completes or for
/// `turn_max` at most.
async fn handshake(
    incoming: quinn::Incoming,
    turn: tokio::sync::OwnedSemaphorePermit,
    turn_max: Duration,
) -> anyhow::Result<quinn::Connection> {
    let connecting = incoming.accept()?;
    tokio::pin!(connecting);
    let first = tokio::time::timeout(turn_max, &mut connecting).await;
    drop(turn);
    Ok(match first {
        Ok(c) => c?,
        Err(_) => connecting.await?,
    })
}

async fn connection(
    id: SessionId,
    conn: impl std::future::Future<Output = anyhow::Result<quinn::Connection>>,
    core: mpsc::Sender<Input>,
    limits: Limits,
    cfg: &ServerConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<()> {
    let conn = conn.await?;
    let mut binding = [0u8; 32];
    conn.export_keying_material(&mut binding, TLS_EXPORTER_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
    let (mut send, mut recv) =
        tokio::time::timeout(cfg.coordinator.auth_timeout, conn.accept_bi()).await??;
    let (wtx, mut wrx, queued_bytes) = Writer::new(cfg.writer_queue_bytes_max);
    core.send(Input::Connected {
        id,
        binding,
        writer: wtx,
    })
    .await?;
    let wconn = conn.clone();
    let wmetrics = Arc::clone(metrics);
    let writer = tokio::spawn(async move {
        while let Some(cmd) = wrx.recv().await {
            match cmd {
                WriterCmd::Frame(f) => {
                    wmetrics.bytes_out.inc_by(f.len() as u64 + 4);
                    let sent = write_frame(&mut send, &f).await;
                    queued_bytes.fetch_sub(f.len(), Ordering::AcqRel);
                    if sent.is_err() {
                        break;
                    }
                }
                WriterCmd::Close(reason) => {
                    let _ = send.finish();
                    // Give the peer a moment to read the reject first.
                    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                    let reason = reason.as_bytes();
                    wconn.close(1u32.into(), &reason[..reason.len().min(200)]);
                    break;
                }
            }
        }
    });
    let mut rate = RateLimit {
        tokens: cfg.rate_burst,
        last: Instant::now(),
        rate: cfg.rate_per_sec,
        burst: cfg.rate_burst,
    };
    let mut rejected = false;
    loop {
        let input = match read_frame(&mut recv, limits.frame_bytes_max).await {
            Ok(Some(frame)) => {
                metrics.bytes_in.inc_by(frame.len() as u64 + 4);
                if !rate.allow(Instant::now()) {
                    core.send(Input::RateLimited(id)).await?;
                    rejected = true;
                    break;
                }
                match DeviceMsg::decode(&frame, &limits) {
                    Ok(m) => Input::Message(id, Box::new(m)),
                    Err(e) => {
                        core.send(Input::BadFrame(id, e)).await?;
                        rejected = true;
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(ReadError::Proto(e)) => {
                core.send(Input::BadFrame(id, e)).await?;
                rejected = true;
                break;
            }
            Err(e) => return Err(e.into()),
        };
        core.send(input).await?;
    }
    if rejected {
        // Let the writer deliver the reject before the connection goes.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    }
    Ok(())
}
