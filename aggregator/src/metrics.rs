//! Observability: Prometheus metrics (`GET /metrics`) and a JSON status of
//! the current round (`GET /status`), served over plain HTTP on a separate
//! address (`server.metrics_listen`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric the aggregator exports.
pub struct Metrics {
    registry: Registry,
    pub rounds_published: Counter,
    pub rounds_aborted: Counter,
    pub updates_accepted: Counter,
    pub round_participants: Gauge,
    pub sessions: Gauge,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub rejections: Family<ReasonLabel, Counter>,
    pub aggregation_seconds: Histogram,
    /// Reward units paid, over all settled rounds.
    pub rewards_paid: Counter,
    /// Settled participations flagged, by flag (copy, free_rider, noise,
    /// unscored).
    pub flagged: Family<ReasonLabel, Counter>,
    /// Scoring's forward passes over the last settled round's training
    /// compute.
    pub scoring_cost_fraction: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Validation loss of the model the last settled round started from.
    pub validation_loss: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The last closed round's federated evaluation (trimmed means).
    pub eval_loss: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub eval_accuracy: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub eval_devices: Gauge,
    /// Accuracy of the last closed round's model on the operator's
    /// validation set.
    pub validation_accuracy: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedge");
        let m = Metrics {
            rounds_published: Counter::default(),
            rounds_aborted: Counter::default(),
            updates_accepted: Counter::default(),
            round_participants: Gauge::default(),
            sessions: Gauge::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            rejections: Family::default(),
            aggregation_seconds: Histogram::new(exponential_buckets(1e-4, 4.0, 10)),
            rewards_paid: Counter::default(),
            flagged: Family::default(),
            scoring_cost_fraction: Gauge::default(),
            validation_loss: Gauge::default(),
            eval_loss: Gauge::default(),
            eval_accuracy: Gauge::default(),
            eval_devices: Gauge::default(),
            validation_accuracy: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rounds_published",
            "Rounds that published a model",
            m.rounds_published.clone(),
        );
        registry.register(
            "rounds_aborted",
            "Rounds aborted for too few updates",
            m.rounds_aborted.clone(),
        );
        registry.register(
            "updates_accepted",
            "Updates accepted",
            m.updates_accepted.clone(),
        );
        registry.register(
            "round_participants",
            "Updates accepted in the last closed round",
            m.round_participants.clone(),
        );
        registry.register("sessions", "Connected devices", m.sessions.clone());
        registry.register(
            "bytes_in",
            "Frame bytes received from devices",
            m.bytes_in.clone(),
        );
        registry.register(
            "bytes_out",
            "Frame bytes sent to devices",
            m.bytes_out.clone(),
        );
        registry.register("rejections", "Rejections by reason", m.rejections.clone());
        registry.register(
            "aggregation_seconds",
            "Time to combine a round's updates and publish the model",
            m.aggregation_seconds.clone(),
        );
        registry.register(
            "rewards_paid",
            "Reward units paid to contributors",
            m.rewards_paid.clone(),
        );
        registry.register(
            "participations_flagged",
            "Settled participations flagged, by flag",
            m.flagged.clone(),
        );
        registry.register(
            "scoring_cost_fraction",
            "Scoring compute over the last settled round's training compute",
            m.scoring_cost_fraction.clone(),
        );
        registry.register(
            "validation_loss",
            "Validation loss of the model the last settled round started from",
            m.validation_loss.clone(),
        );
        registry.register(
            "eval_loss",
            "Federated evaluation: the last round's model, trimmed mean loss devices reported",
            m.eval_loss.clone(),
        );
        registry.register(
            "eval_accuracy",
            "Federated evaluation: the last round's model, trimmed mean accuracy devices reported",
            m.eval_accuracy.clone(),
        );
        registry.register(
            "eval_devices",
            "Federated evaluation: reports combined in the last round",
            m.eval_devices.clone(),
        );
        registry.register(
            "validation_accuracy",
            "Accuracy of the last round's model on the operator's validation set",
            m.validation_accuracy.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &str) {
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A settled round's scores and rewards.
    pub fn settled(&self, s: &crate::coordinator::Settlement) {
        for e in &s.entries {
            self.rewards_paid.inc_by(e.reward);
            for (on, flag) in [
                (e.copy_of.is_some(), "copy"),
                (e.free_rider, "free_rider"),
                (e.noise, "noise"),
                (e.score.is_none(), "unscored"),
            ] {
                if on {
                    self.flagged
                        .get_or_create(&ReasonLabel {
                            reason: flag.to_string(),
                        })
                        .inc();
                }
            }
        }
        if s.error.is_none() {
            self.scoring_cost_fraction.set(s.cost.fraction);
        }
        if let Some(l) = s.base_loss {
            self.validation_loss.set(l);
        }
    }

    /// A round's federated (and operator-held) evaluation.
    pub fn evaluated(&self, s: &crate::evaluation::EvalSummary) {
        if let (Some(l), Some(a)) = (s.loss, s.accuracy) {
            self.eval_loss.set(l);
            self.eval_accuracy.set(a);
        }
        self.eval_devices.set(s.devices as i64);
        if let Some(a) = s.validation_accuracy {
            self.validation_accuracy.set(a);
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("string write");
        s
    }
}

/// The current round, for `GET /status`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Status {
    pub round_id: u64,
    pub model_version: String,
    pub accepted_in_round: usize,
    pub devices_per_round: usize,
    pub published_rounds: u64,
    pub sessions: usize,
    pub finished: bool,
    pub strategy: String,
}

pub type SharedStatus = Arc<Mutex<Status>>;

async fn respond(
    req: Request<hyper::body::Incoming>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (code, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        ("GET", "/status") => {
            let s = status.lock().expect("status lock").clone();
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&s).expect("serialisable"),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /status\n".into(),
        ),
    };
    Ok(Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response"))
}

/// Serve `/metrics` and `/status` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, status: SharedStatus) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, status) = (Arc::clone(&metrics), Arc::clone(&status));
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                respond(req, Arc::clone(&metrics), Arc::clone(&status))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// Bind the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
