//! The device's QUIC driver: a thin tokio loop around [`DeviceSession`].
//!
//! It opens connections when the session asks, reads frames into the
//! session, writes what the session transmits, runs training on a blocking
//! thread, fires timers, and persists models in the state directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedge_proto::io::{read_frame, write_frame};
use fedge_proto::sign::{SigningKey, TLS_EXPORTER_LABEL};
use fedge_proto::{AggMsg, Limits, ModelBlob, ModelVersion, RejectCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::session::{DeviceEvent, DeviceSession, EvalOutput, SessionConfig, TrainOutput};
use crate::trainer::Trainer;
use crate::transport::{QuicTiming, Trust, client_config};

#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub aggregator: SocketAddr,
    /// TLS server name (the aggregator's certificate covers "localhost" and
    /// its IP addresses; pinning makes the name a formality).
    pub server_name: String,
    pub trust: Trust,
    pub session: SessionConfig,
    pub timing: QuicTiming,
    /// Where models are kept; `None` keeps nothing on disk.
    pub state_dir: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Device policy: checked at start and every `recheck`; while it says
    /// no, the session asks for no tasks. `None`: always eligible.
    pub eligibility: Option<crate::policy::Gate>,
    /// A QUIC endpoint (one UDP socket and its driver) shared with other
    /// devices in this process, as a simulation runs thousands; None: the
    /// device opens its own, as a real device does.
    pub endpoint: Option<quinn::Endpoint>,
}

impl DriverConfig {
    /// Defaults for everything but where the aggregator is and how to trust it.
    pub fn new(aggregator: SocketAddr, trust: Trust) -> Self {
        DriverConfig {
            aggregator,
            server_name: "localhost".into(),
            trust,
            session: SessionConfig::default(),
            timing: QuicTiming::default(),
            state_dir: None,
            connect_timeout: Duration::from_secs(10),
            eligibility: None,
            endpoint: None,
        }
    }
}

/// What a device run achieved.
#[derive(Clone, Debug)]
pub struct DeviceReport {
    pub final_version: ModelVersion,
    pub final_model: Arc<ModelBlob>,
    pub rounds_contributed: u64,
    pub rejections: Vec<(RejectCode, String)>,
    /// Connections established (1 when nothing was ever dropped).
    pub connections: u32,
    /// Connection attempts that failed (timed out, unreachable, a bad
    /// certificate), over the whole run.
    pub connect_failures: u32,
    /// Connection attempts the aggregator refused at its handshake limit
    /// (the device came back later; not failures).
    pub connects_refused: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("device session failed: {0}")]
    Failed(String),
    #[error("cannot write {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Conn {
    connection: quinn::Connection,
    writer: mpsc::Sender<bytes::Bytes>,
    incoming: mpsc::Receiver<Result<AggMsg, String>>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.connection.close(0u32.into(), b"bye");
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    cfg: &DriverConfig,
) -> anyhow::Result<(Conn, [u8; 32])> {
    let connecting = endpoint.connect_with(client.clone(), cfg.aggregator, &cfg.server_name)?;
    let connection = tokio::time::timeout(cfg.connect_timeout, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("connection timed out"))??;
    let mut binding = [0u8; 32];
    connection
        .export_keying_material(&mut binding, TLS_EXPORTER_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let (wtx, mut wrx) = mpsc::channel::<bytes::Bytes>(256);
    let writer = tokio::spawn(async move {
        while let Some(frame) = wrx.recv().await {
            if write_frame(&mut send, &frame).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    let (itx, irx) = mpsc::channel(256);
    let limits: Limits = cfg.session.limits.clone();
    let reader = tokio::spawn(async move {
        loop {
            let item = match read_frame(&mut recv, limits.frame_bytes_max).await {
                Ok(Some(frame)) => AggMsg::decode(&frame, &limits).map_err(|e| e.to_string()),
                Ok(None) => Err("connection closed by aggregator".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let stop = item.is_err();
            if itx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    Ok((
        Conn {
            connection,
            writer: wtx,
            incoming: irx,
            tasks: [writer, reader],
        },
        binding,
    ))
}

/// Whether a connection attempt was refused at the QUIC level (the
/// aggregator's handshake limit, `CONNECTION_REFUSED`).
fn refused(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<quinn::ConnectionError>(),
        Some(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    )
}

fn bind_addr(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("addr"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("addr"),
    }
}

/// Run one device until the aggregator finishes (or the session fails).
pub async fn run_device(
    cfg: DriverConfig,
    key: SigningKey,
    trainer: Box<dyn Trainer>,
) -> Result<DeviceReport, DriverError> {
    let client = client_config(&cfg.trust, &cfg.timing)?;
    let (endpoint, own_endpoint) = match &cfg.endpoint {
        Some(shared) => (shared.clone(), false),
        None => (
            quinn::Endpoint::client(bind_addr(cfg.aggregator)).map_err(DriverError::Socket)?,
            true,
        ),
    };
    let session_cfg = SessionConfig {
        evaluates: trainer.can_evaluate(),
        ..cfg.session.clone()
    };
    let mut session = DeviceSession::new(session_cfg, key);
    if let Some(dir) = &cfg.state_dir
        && let Ok(bytes) = std::fs::read(dir.join("model.fedge"))
        && let Ok(m) = ModelBlob::decode(&bytes, &cfg.session.limits)
    {
        session.set_cached_model(Arc::new(m));
    }
    if let Some(dir) = &cfg.state_dir {
        session.set_compressor(crate::compress::Compressor::load(&dir.join("residual.bin")));
    }
    let trainer = Arc::new(Mutex::new(trainer));
    let (train_tx, mut train_rx) = mpsc::channel::<Result<TrainOutput, String>>(1);
    let (eval_tx, mut eval_rx) = mpsc::channel::<(u64, Result<Option<EvalOutput>, String>)>(1);
    let mut conn: Option<Conn> = None;
    let mut rejections = Vec::new();
    let mut connect_failures = 0u32;
    let (mut failed_total, mut refused_total, mut refused_in_a_row) = (0u32, 0u32, 0u32);
    let mut connections = 0u32;
    // Consecutive training failures, for the log: a device never quits
    // over them (the aggregator is told each time, and a rolled-back or
    // newer model may train again).
    let mut training_failures = 0u32;
    let first_delay = session.first_connect_delay();
    if !first_delay.is_zero() {
        tracing::debug!(?first_delay, "first connection jittered");
        tokio::time::sleep(first_delay).await;
    }
    let mut eligibility = cfg.eligibility.clone().map(EligibilityCheck::new);
    if let Some(e) = eligibility.as_mut() {
        e.run(&mut session, Instant::now());
    }

    loop {
        while let Some(ev) = session.poll_event() {
            match ev {
                DeviceEvent::Connect => match connect(&endpoint, &client, &cfg).await {
                    Ok((c, binding)) => {
                        conn = Some(c);
                        connect_failures = 0;
                        refused_in_a_row = 0;
                        connections += 1;
                        session.handle_connected(Instant::now(), binding);
                    }
                    Err(e) if refused(&e) => {
                        // The aggregator is at its handshake limit: busy,
                        // not a failure; the session backs off and comes
                        // back. The first refusal of a run is logged.
                        refused_total += 1;
                        refused_in_a_row += 1;
                        if refused_in_a_row == 1 {
                            tracing::info!(
                                "aggregator busy: connection refused; connecting again later"
                            );
                        }
                        session.handle_refused(Instant::now());
                    }
                    Err(e) => {
                        connect_failures += 1;
                        failed_total += 1;
                        tracing::warn!(error = %e, attempt = connect_failures, "connect failed");
                        session.handle_disconnected(Instant::now());
                    }
                },
                DeviceEvent::Disconnect => conn = None,
                DeviceEvent::Train {
                    round_id,
                    model,
                    plan,
                } => {
                    tracing::info!(round_id, "training");
                    let trainer = Arc::clone(&trainer);
                    let tx = train_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let out = trainer
                            .lock()
                            .expect("trainer lock")
                            .train(round_id, &model, &plan)
                            .map_err(|e| format!("{e:#}"));
                        let _ = tx.blocking_send(out);
                    });
                }
                DeviceEvent::Evaluate { round_id, model } => {
                    tracing::info!(round_id, "evaluating");
                    let trainer = Arc::clone(&trainer);
                    let tx = eval_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let out = trainer
                            .lock()
                            .expect("trainer lock")
                            .evaluate(&model)
                            .map_err(|e| format!("{e:#}"));
                        let _ = tx.blocking_send((round_id, out));
                    });
                }
                DeviceEvent::EvaluationAccepted { round_id } => {
                    tracing::info!(round_id, "evaluation accepted");
                }
                DeviceEvent::ModelReady { version, model } => {
                    tracing::info!(%version, "model downloaded");
                    persist_model(&cfg, &model)?;
                }
                DeviceEvent::ResidualChanged => {
                    if let Some(dir) = &cfg.state_dir {
                        let path = dir.join("residual.bin");
                        session
                            .compressor()
                            .save(&path)
                            .map_err(|source| DriverError::Persist { path, source })?;
                    }
                }
                DeviceEvent::UpdateAccepted { round_id } => {
                    tracing::info!(round_id, "update accepted");
                }
                DeviceEvent::Rejected { code, detail } => {
                    if code == RejectCode::RoundClosed {
                        tracing::info!(%detail, "update arrived after the round closed");
                    } else {
                        tracing::warn!(%code, %detail, "rejected by aggregator");
                    }
                    rejections.push((code, detail));
                }
                DeviceEvent::Finished { version, model } => {
                    persist_model(&cfg, &model)?;
                    tracing::info!(%version, "aggregator finished; final model kept");
                    // Close politely so the aggregator need not wait for a timeout.
                    drop(conn.take());
                    if own_endpoint {
                        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
                            .await;
                    }
                    return Ok(DeviceReport {
                        final_version: version,
                        final_model: model,
                        rounds_contributed: session.rounds_contributed,
                        rejections,
                        connections,
                        connect_failures: failed_total,
                        connects_refused: refused_total,
                    });
                }
                DeviceEvent::Failed { reason } => return Err(DriverError::Failed(reason)),
            }
        }
        if let Some(c) = &conn {
            let mut broken = false;
            while let Some(m) = session.poll_transmit() {
                if c.writer.send(m.encode()).await.is_err() {
                    broken = true;
                    break;
                }
            }
            if broken {
                conn = None;
                session.handle_disconnected(Instant::now());
                continue;
            }
        } else {
            while session.poll_transmit().is_some() {}
        }
        let wake = session.poll_timeout();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let recheck_at = eligibility.as_ref().map(|e| e.next);
        let recheck = async {
            match recheck_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let incoming = async {
            match conn.as_mut() {
                Some(c) => c.incoming.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = incoming => match msg {
                Some(Ok(m)) => session.handle_message(Instant::now(), m),
                Some(Err(e)) => {
                    tracing::info!(error = %e, "connection lost");
                    conn = None;
                    session.handle_disconnected(Instant::now());
                }
                None => {
                    conn = None;
                    session.handle_disconnected(Instant::now());
                }
            },
            res = train_rx.recv() => match res {
                Some(Ok(out)) => {
                    training_failures = 0;
                    session.handle_trained(Instant::now(), out)
                }
                Some(Err(e)) => {
                    training_failures += 1;
                    tracing::warn!(
                        error = %e,
                        consecutive = training_failures,
                        "local training failed; the task is given up and the device asks again later"
                    );
                    session.handle_training_failed(Instant::now(), e);
                }
                None => unreachable!("the driver holds a sender"),
            },
            res = eval_rx.recv() => match res {
                Some((round_id, out)) => {
                    if let Err(e) = &out {
                        tracing::warn!(error = %e, "evaluation failed; the task is given up");
                    }
                    session.handle_evaluated(Instant::now(), round_id, out)
                }
                None => unreachable!("the driver holds a sender"),
            },
            _ = sleep => session.handle_timeout(Instant::now()),
            _ = recheck => if let Some(e) = eligibility.as_mut() {
                e.run(&mut session, Instant::now());
            },
        }
    }
}

fn persist_model(cfg: &DriverConfig, model: &ModelBlob) -> Result<(), DriverError> {
    if let Some(dir) = &cfg.state_dir {
        let path = dir.join("model.fedge");
        fedge_proto::io::write_atomic(&path, &model.encode(), None)
            .map_err(|source| DriverError::Persist { path, source })?;
    }
    Ok(())
}

/// The driver's side of the device policy: asks the gate, tells the
/// session, logs changes (not every check), schedules the next check.
struct EligibilityCheck {
    gate: crate::policy::Gate,
    next: Instant,
    last: Option<bool>,
}

impl EligibilityCheck {
    fn new(gate: crate::policy::Gate) -> Self {
        EligibilityCheck {
            gate,
            next: Instant::now(),
            last: None,
        }
    }

    fn run(&mut self, session: &mut DeviceSession, now: Instant) {
        let d = self.gate.check();
        if self.last != Some(d.eligible) {
            if d.eligible {
                tracing::info!("device eligible for tasks");
            } else {
                tracing::info!(reasons = %d.reasons.join("; "), "device not eligible for tasks; will check again");
            }
            self.last = Some(d.eligible);
        }
        session.handle_eligibility(now, d.eligible);
        self.next = now + self.gate.recheck.max(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Conditions, Gate, Policy, Reported};

    #[test]
    fn the_check_tells_the_session_and_schedules_the_next_one() {
        let src = Reported::new(Conditions {
            external_power: Some(false),
            ..Conditions::unknown()
        });
        let gate = Gate::new(
            Arc::new(src.clone()),
            Policy {
                require_charging: true,
                ..Policy::default()
            },
            Duration::from_secs(30),
        );
        let mut session =
            DeviceSession::new(SessionConfig::default(), SigningKey::from_bytes(&[3; 32]));
        let mut check = EligibilityCheck::new(gate);
        let now = Instant::now();
        check.run(&mut session, now);
        assert!(!session.is_eligible());
        assert_eq!(check.next, now + Duration::from_secs(30));
        src.set(Conditions {
            external_power: Some(true),
            ..Conditions::unknown()
        });
        check.run(&mut session, check.next);
        assert!(session.is_eligible());
        assert_eq!(check.next, now + Duration::from_secs(60));
    }
}
