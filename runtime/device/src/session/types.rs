//! The session's configuration, what it reports to the driver, and what
//! the driver reports back from training.

use std::sync::Arc;
use std::time::Duration;

use fedge_proto::msg::{Capabilities, TrainingPlan};
use fedge_proto::{Limits, ModelBlob, ModelVersion, RejectCode};

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
    /// Backoff after a connection refused at the aggregator's handshake
    /// limit (it is busy): doubles with each refusal in a row from `min`
    /// to `max`, each wait drawn in [0, d] (see
    /// [`super::DeviceSession::handle_refused`]).
    pub refused_backoff_min: Duration,
    pub refused_backoff_max: Duration,
    /// Consecutive failed connection attempts before giving up (0 = never).
    pub reconnect_attempts_max: u32,
    /// Time allowed for a request (task, chunk, upload status) to be answered.
    pub request_timeout: Duration,
    /// The first connection waits a random time in [0, this] (see
    /// [`super::DeviceSession::first_connect_delay`]), so a fleet started
    /// together does not reach the aggregator as one burst.
    pub first_connect_jitter: Duration,
    pub seed: u64,
    /// Simulation only: in a SecAgg+ round, stop answering after sending
    /// this stage's message (a dropout the protocol must survive). None in
    /// production.
    pub secagg_drop_after: Option<fedge_proto::secagg::Stage>,
    /// The device keeps held-out data and takes evaluation tasks; without
    /// it an evaluation offer is declined at once, before any download.
    pub evaluates: bool,
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
            refused_backoff_min: Duration::from_secs(1),
            refused_backoff_max: Duration::from_secs(60),
            reconnect_attempts_max: 0,
            request_timeout: Duration::from_secs(60),
            first_connect_jitter: Duration::ZERO,
            seed: 0,
            secagg_drop_after: None,
            evaluates: false,
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

/// The result of evaluating a model on the device's held-out data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalOutput {
    pub examples: u64,
    /// Mean loss over them.
    pub loss: f64,
    /// The fraction predicted right.
    pub accuracy: f64,
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
    /// Evaluate `model` on the device's held-out data for round
    /// `round_id` (an evaluation task), then call `handle_evaluated`.
    Evaluate {
        round_id: u64,
        model: Arc<ModelBlob>,
    },
    /// The aggregator recorded this device's evaluation of `round_id`.
    EvaluationAccepted {
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
    /// Evaluating a model, or sending the result (an evaluation task).
    Evaluating,
    Uploading,
    Done,
    Failed,
}
