//! The exported device: model, local training, signed updates, rounds.
//!
//! This module is the exported surface: the `Device` object, the records,
//! the exported methods and functions stay here, because UniFFI records
//! `module_path!()` in each item's metadata and the bindings' checksums
//! hash it (moving one changes the generated Kotlin and Swift). The work
//! behind them lives in the submodules.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::identity;
use fedge_device::session::SessionConfig;
use fedge_device::transport::{QuicTiming, Trust, parse_fingerprint};
use fedge_engine::train::exec::{Batch, TractExecutor, TractInference};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_proto::sign::{SigningKey, UpdateManifest};
use fedge_proto::{Limits, ModelBlob, wire};
use prost::Message;

use crate::boundary::{guard, guard_async, spawn};
use crate::{FedgeError, RECONNECT_ATTEMPTS_MAX, SAMPLES_MAX};

mod model;
mod rounds;
mod train;
mod update;

use model::{InputKind, zoo_onnx};
use rounds::{ClearOnDrop, RoundTrainer, driver_error};

/// Where the error-feedback residual lives in the data directory (the
/// same file the device loop keeps, so both paths share one residual).
const RESIDUAL_FILE: &str = "residual.bin";
/// Where the device loop keeps the latest global model it downloaded.
const MODEL_FILE: &str = "model.fedge";

/// How to create a `Device`.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct DeviceConfig {
    /// Directory for the device key (`device.key`, created on first use),
    /// the error-feedback residual and downloaded models. Created if
    /// missing. On Android use `Context.filesDir`, on iOS the app's
    /// Application Support directory.
    pub data_dir: String,
    /// The aggregator, `host:port`. Needed only by `run_rounds`.
    #[uniffi(default = None)]
    pub aggregator: Option<String>,
    /// SHA-256 fingerprint of the aggregator's certificate, 64 hex digits
    /// (colons allowed), as `fedge-aggregator fingerprint` prints it.
    /// Required with `aggregator`: the device trusts exactly this
    /// certificate.
    #[uniffi(default = None)]
    pub aggregator_fingerprint: Option<String>,
    /// TLS server name presented to the aggregator.
    #[uniffi(default = "localhost")]
    pub server_name: String,
    /// Seed for this device's randomness (shuffling, backoff jitter).
    #[uniffi(default = 0)]
    pub seed: u64,
}

/// What a loaded model looks like.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ModelInfo {
    /// Content hash of the model (graph and parameters), hex: the version
    /// an aggregator would give it.
    pub version: String,
    /// Trainable and frozen parameters, in the canonical layout.
    pub parameters: u64,
    /// Shape of one sample, without the batch dimension (`[1, 28, 28]`).
    pub input_shape: Vec<u32>,
    /// `f32` values per sample in one inference batch (`product(input_shape)`).
    pub input_values_per_sample: u32,
    /// Output values per sample (classes, for a classifier).
    pub outputs_per_sample: u32,
    /// What the input takes: `float32` (`Samples.inputs`, `infer`) or
    /// `int64` token ids (`Samples.tokens`, `infer_tokens`), as a language
    /// model's embedding does.
    pub input_type: String,
    /// For an `int64` model: token ids must be below this (the embedding
    /// table's rows); 0 for a `float32` model.
    pub token_limit: u32,
}

/// Labelled samples: `inputs` (a `float32` model) or `tokens` (an `int64`
/// model, e.g. a character model's context windows; see
/// `ModelInfo.input_type`) holds `labels.len()` samples, flat, row-major,
/// each shaped as the model's input; the other stays empty. `labels` are
/// class indices (for a language model, the next token).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Samples {
    pub inputs: Vec<f32>,
    pub labels: Vec<i64>,
    #[uniffi(default)]
    pub tokens: Vec<i64>,
}

/// Outputs of one inference batch: `batch * outputs_per_sample` values.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct InferOutput {
    pub batch: u32,
    pub outputs_per_sample: u32,
    pub values: Vec<f32>,
}

/// How to train locally.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct TrainOptions {
    /// Steps to run; 0 runs `epochs` epochs instead.
    #[uniffi(default = 0)]
    pub steps: u32,
    /// Epochs over the samples when `steps` is 0.
    #[uniffi(default = 1)]
    pub epochs: u32,
    #[uniffi(default = 32)]
    pub batch_size: u32,
    #[uniffi(default = 0.05)]
    pub learning_rate: f32,
    /// `sgd`, `adam` or `adamw`.
    #[uniffi(default = "sgd")]
    pub optimizer: String,
    #[uniffi(default = 0.0)]
    pub momentum: f32,
    #[uniffi(default = 0.0)]
    pub weight_decay: f32,
    /// Seed for shuffling the samples.
    #[uniffi(default = 0)]
    pub seed: u64,
}

/// What a call to `train` did.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct TrainReport {
    pub steps: u64,
    /// Samples seen by this call (steps x batch size).
    pub samples: u64,
    pub mean_loss: f64,
    pub last_loss: f64,
    /// Samples seen since the model was loaded: the sample count of the
    /// next update.
    pub samples_since_load: u64,
}

/// A signed, compressed update, as a device uploads it: the payload, the
/// encoded manifest that names round, model version and payload hash, and
/// the device's Ed25519 signature over the manifest.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SignedUpdate {
    /// The encoded update (`UpdatePayload`): the delta trained - loaded,
    /// compressed with `codec`.
    pub payload: Vec<u8>,
    /// The encoded `UpdateManifest` (protobuf), as signed.
    pub manifest: Vec<u8>,
    /// Ed25519 signature (64 bytes) over the manifest.
    pub signature: Vec<u8>,
    pub round_id: u64,
    /// Version (hex) of the model the delta is relative to.
    pub model_version: String,
    /// blake3 of the payload, hex.
    pub payload_hash: String,
    /// The device's public key, hex.
    pub device_public_key: String,
    pub sample_count: u64,
    /// Coordinates of the delta (the model's parameter count).
    pub dimension: u64,
    pub codec: String,
}

/// What `verify_update` found in a valid update.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct VerifiedUpdate {
    pub round_id: u64,
    pub model_version: String,
    pub device_public_key: String,
    pub sample_count: u64,
    /// The decoded delta has this many coordinates...
    pub dimension: u64,
    /// ...of which this many are not zero.
    pub nonzero: u64,
}

/// What a call to `run_rounds` achieved.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct RunReport {
    /// The aggregator ran its last round (otherwise the device stopped at
    /// `rounds_max`).
    pub aggregator_finished: bool,
    /// Rounds this device trained for (and uploaded an update).
    pub rounds_trained: u32,
    /// Version of the global model the device now holds (loaded, ready for
    /// inference), when it downloaded one.
    pub model_version: Option<String>,
    /// The aggregator's rejections, `code: detail` (known when it finished).
    pub rejections: Vec<String>,
}

/// The built-in model names: `mlp` (784-200-200-10), `cnn` (McMahan et
/// al.'s MNIST CNN) and `small_cnn`; each is the `models/<name>.onnx` the
/// project ships, built in code from the same seed.
#[uniffi::export]
pub fn zoo_models() -> Vec<String> {
    ZOO_NAMES.iter().map(|n| (*n).to_string()).collect()
}

const ZOO_NAMES: [&str; 3] = ["mlp", "cnn", "small_cnn"];

/// A federated-learning device: its identity, the loaded model and its
/// locally trained parameters.
///
/// Long calls are `async`: their work runs on threads the library owns,
/// never on the caller's, so they are safe to await from a UI thread.
/// `new`, `public_key` and `model_info` are quick and synchronous. Calls
/// on one device are serialized: a second `train` waits for the first;
/// `run_rounds` refuses to run twice at once.
#[derive(uniffi::Object)]
pub struct Device {
    key: SigningKey,
    data_dir: PathBuf,
    aggregator: Option<(String, [u8; 32])>,
    server_name: String,
    seed: u64,
    /// The model and its compiled plans; locked only on the runtime's
    /// threads, never on the caller's.
    engine: Arc<Mutex<Option<Loaded>>>,
    /// A copy of the loaded model's description, for `model_info`.
    info: Arc<Mutex<Option<ModelInfo>>>,
    running: Arc<AtomicBool>,
}

/// A loaded model.
struct Loaded {
    /// The model as loaded: updates are deltas from its parameters.
    blob: ModelBlob,
    graph: ModelGraph,
    info: ModelInfo,
    /// The current (locally trained) parameters.
    params: Vec<f32>,
    samples_since_load: u64,
    last_mean_loss: Option<f64>,
    inference: TractInference,
    /// The training step, compiled for the options it is keyed by.
    executor: Option<(String, TractExecutor)>,
    kind: InputKind,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, FedgeError> {
    m.lock().map_err(|_| FedgeError::Internal {
        detail:
            "device state was left inconsistent by an earlier internal error; create a new Device"
                .into(),
    })
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> FedgeError {
    FedgeError::Storage {
        detail: format!("{what} {}: {e}", path.display()),
    }
}

impl Device {
    fn aggregator(&self) -> Result<(String, [u8; 32]), FedgeError> {
        self.aggregator.clone().ok_or_else(|| FedgeError::Config {
            detail:
                "no aggregator configured: set DeviceConfig.aggregator and aggregator_fingerprint"
                    .into(),
        })
    }
}

#[uniffi::export]
impl Device {
    /// Open (or create) the device in `config.data_dir`: reads or creates
    /// its key, a small file. Checks the aggregator settings; the address
    /// is resolved only when rounds run.
    #[uniffi::constructor]
    pub fn new(config: DeviceConfig) -> Result<Arc<Self>, FedgeError> {
        guard(|| {
            let data_dir = PathBuf::from(&config.data_dir);
            if config.data_dir.is_empty() {
                return Err(FedgeError::Config {
                    detail: "data_dir is empty".into(),
                });
            }
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| io_error("cannot create the data directory", &data_dir, e))?;
            let key = identity::load_or_create(&data_dir).map_err(|e| FedgeError::Identity {
                detail: e.to_string(),
            })?;
            let aggregator = match (&config.aggregator, &config.aggregator_fingerprint) {
                (None, None) => None,
                (Some(addr), Some(fp)) => {
                    if addr
                        .rsplit_once(':')
                        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                    {
                        return Err(FedgeError::Config {
                            detail: format!("aggregator `{addr}` is not host:port"),
                        });
                    }
                    let fp = parse_fingerprint(fp).map_err(|e| FedgeError::Config {
                        detail: e.to_string(),
                    })?;
                    Some((addr.clone(), fp))
                }
                (Some(_), None) => {
                    return Err(FedgeError::Config {
                        detail: "aggregator given without aggregator_fingerprint: the device only talks to a pinned aggregator (see `fedge-aggregator fingerprint`)".into(),
                    });
                }
                (None, Some(_)) => {
                    return Err(FedgeError::Config {
                        detail: "aggregator_fingerprint given without an aggregator address".into(),
                    });
                }
            };
            Ok(Arc::new(Device {
                key,
                data_dir,
                aggregator,
                server_name: config.server_name,
                seed: config.seed,
                engine: Arc::new(Mutex::new(None)),
                info: Arc::new(Mutex::new(None)),
                running: Arc::new(AtomicBool::new(false)),
            }))
        })
    }

    /// The device's Ed25519 public key, hex: its identity to aggregators.
    pub fn public_key(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The loaded model, or `None`.
    pub fn model_info(&self) -> Result<Option<ModelInfo>, FedgeError> {
        guard(|| Ok(lock(&self.info)?.clone()))
    }

    /// Load an ONNX model (weights as initializers, float32 input, as
    /// PyTorch exports it). Replaces any loaded model and its trained
    /// parameters.
    pub async fn load_model_onnx(&self, onnx: Vec<u8>) -> Result<ModelInfo, FedgeError> {
        guard_async(self.load(move || {
            let max = Limits::default().model_bytes_max;
            if onnx.len() as u64 > max {
                return Err(FedgeError::BadModel {
                    detail: format!("{} bytes, over the model limit of {max}", onnx.len()),
                });
            }
            import_onnx(&onnx).map_err(|e| FedgeError::BadModel {
                detail: e.to_string(),
            })
        }))
        .await
    }

    /// Load a model of the built-in zoo by name (see `zoo_models`).
    pub async fn load_zoo_model(&self, name: String) -> Result<ModelInfo, FedgeError> {
        guard_async(self.load(move || {
            let onnx = zoo_onnx(&name).ok_or_else(|| FedgeError::BadModel {
                detail: format!(
                    "no zoo model `{name}`; the zoo has {}",
                    ZOO_NAMES.join(", ")
                ),
            })?;
            import_onnx(&onnx).map_err(|e| FedgeError::BadModel {
                detail: e.to_string(),
            })
        }))
        .await
    }

    /// Run the model (with its current parameters) on a batch: `inputs`
    /// holds whole samples, flat, row-major.
    pub async fn infer(&self, inputs: Vec<f32>) -> Result<InferOutput, FedgeError> {
        guard_async(self.with_model(move |m| m.infer(Batch::F32(&inputs)))).await
    }

    /// Run a token model (`ModelInfo.input_type` `int64`) on a batch of
    /// token ids: whole samples, flat; each id below
    /// `ModelInfo.token_limit`.
    pub async fn infer_tokens(&self, tokens: Vec<i64>) -> Result<InferOutput, FedgeError> {
        guard_async(self.with_model(move |m| m.infer(Batch::I64(&tokens)))).await
    }

    /// Train the current parameters on `samples` (softmax cross-entropy).
    /// Optimizer state starts afresh each call; the trained parameters and
    /// the sample count carry over to the next `train` and `make_update`.
    pub async fn train(
        &self,
        samples: Samples,
        options: TrainOptions,
    ) -> Result<TrainReport, FedgeError> {
        guard_async(self.with_model(move |m| m.train(samples, &options))).await
    }

    /// The current parameters, in the model's canonical layout.
    pub async fn parameters(&self) -> Result<Vec<f32>, FedgeError> {
        guard_async(self.with_model(|m| Ok(m.params.clone()))).await
    }

    /// Sign and compress the delta (trained - loaded parameters) for
    /// `round_id` with `codec` (e.g. `dense-f32`, `q8`, `topk:0.1+q8`,
    /// `randk:0.05+f16+zstd`). With `error_feedback`, what the codec drops
    /// is kept in the data directory and added to the next update (the same
    /// residual `run_rounds` keeps). The codec's randomness is seeded per
    /// device and round. The update names no federation (an all-zero
    /// federation id), so a fedge aggregator refuses it: updates for one
    /// come from `run_rounds`, which signs for the federation it joined.
    pub async fn make_update(
        &self,
        codec: String,
        round_id: u64,
        error_feedback: bool,
    ) -> Result<SignedUpdate, FedgeError> {
        let key = self.key.clone();
        let residual = self.data_dir.join(RESIDUAL_FILE);
        guard_async(
            self.with_model(move |m| {
                m.make_update(&key, &residual, &codec, round_id, error_feedback)
            }),
        )
        .await
    }

    /// Join the configured aggregator's rounds over QUIC (TLS 1.3, the
    /// aggregator pinned by its fingerprint), training each round on
    /// `samples` with the aggregator's plan. Returns when the aggregator
    /// finishes or, with `rounds_max` > 0, when it offers round
    /// `rounds_max + 1` (that task is declined). The device then holds the
    /// latest global model it downloaded. Cancelling the call stops the
    /// device loop.
    pub async fn run_rounds(
        &self,
        samples: Samples,
        rounds_max: u32,
    ) -> Result<RunReport, FedgeError> {
        guard_async(async {
            let (addr, fingerprint) = self.aggregator()?;
            let n = samples.labels.len();
            if n == 0 || n > SAMPLES_MAX as usize || !samples.inputs.len().is_multiple_of(n) {
                return Err(FedgeError::bad_input(format!(
                    "{} input values for {n} labels: need 1..={SAMPLES_MAX} samples of equal size",
                    samples.inputs.len()
                )));
            }
            if self.running.swap(true, Ordering::SeqCst) {
                return Err(FedgeError::Busy {
                    detail: "this device is already running rounds".into(),
                });
            }
            let _running = ClearOnDrop(Arc::clone(&self.running));
            let trained = Arc::new(AtomicU32::new(0));
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
            let trainer = RoundTrainer {
                samples,
                seed: self.seed,
                rounds_max,
                trained: Arc::clone(&trained),
                stop: Some(stop_tx),
                inner: None,
            };
            let key = self.key.clone();
            let state_dir = self.data_dir.clone();
            let server_name = self.server_name.clone();
            let seed = self.seed;
            let outcome = spawn(async move {
                let aggregator = tokio::net::lookup_host(addr.as_str())
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| FedgeError::Network {
                        detail: format!("cannot resolve aggregator address `{addr}`"),
                    })?;
                let cfg = DriverConfig {
                    server_name,
                    session: SessionConfig {
                        reconnect_attempts_max: RECONNECT_ATTEMPTS_MAX,
                        seed,
                        ..SessionConfig::default()
                    },
                    timing: QuicTiming::default(),
                    state_dir: Some(state_dir),
                    connect_timeout: Duration::from_secs(10),
                    ..DriverConfig::new(aggregator, Trust::Pinned(fingerprint))
                };
                tokio::select! {
                    r = run_device(cfg, key, Box::new(trainer)) => r.map(Some).map_err(driver_error),
                    Ok(()) = stop_rx => Ok(None),
                }
            })
            .await?;
            let finished = outcome.is_some();
            let (blob, rejections) = match outcome {
                Some(report) => (
                    Some((*report.final_model).clone()),
                    report
                        .rejections
                        .iter()
                        .map(|(code, detail)| format!("{code}: {detail}"))
                        .collect(),
                ),
                None => {
                    let path = self.data_dir.join(MODEL_FILE);
                    let blob = match std::fs::read(&path) {
                        Ok(b) => Some(ModelBlob::decode(&b, &Limits::default()).map_err(|e| {
                            FedgeError::BadModel {
                                detail: format!("{}: {e}", path.display()),
                            }
                        })?),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        Err(e) => return Err(io_error("cannot read", &path, e)),
                    };
                    (blob, Vec::new())
                }
            };
            let model_version = match blob {
                Some(blob) => Some(self.load(move || Ok(blob)).await?.version),
                None => None,
            };
            Ok(RunReport {
                aggregator_finished: finished,
                rounds_trained: trained.load(Ordering::SeqCst),
                model_version,
                rejections,
            })
        })
        .await
    }
}

/// Check a signed update as an aggregator does: the manifest decodes
/// within limits, the signature verifies against the key it names, the
/// payload matches the signed hash and length, and decodes to `dimension`
/// finite coordinates.
#[uniffi::export]
pub fn verify_update(
    manifest: Vec<u8>,
    signature: Vec<u8>,
    payload: Vec<u8>,
    dimension: u64,
) -> Result<VerifiedUpdate, FedgeError> {
    guard(|| {
        let bad = |detail: String| FedgeError::BadUpdate { detail };
        let limits = Limits::default();
        let wire = wire::UpdateManifest::decode(manifest.as_slice())
            .map_err(|e| bad(format!("manifest: {e}")))?;
        let m = UpdateManifest::from_wire(wire, &limits).map_err(|e| bad(e.to_string()))?;
        let sig = fedge_proto::sign::signature64("signature", &signature)
            .map_err(|e| bad(e.to_string()))?;
        m.verify(&sig).map_err(|e| bad(e.to_string()))?;
        if m.payload_bytes != payload.len() as u64
            || m.payload_hash != *blake3::hash(&payload).as_bytes()
        {
            return Err(bad("payload does not match the signed hash".into()));
        }
        let dimension =
            usize::try_from(dimension).map_err(|_| bad("dimension too large".into()))?;
        let delta = fedge_proto::update::decode_update(&payload, dimension, &limits)
            .map_err(|e| bad(e.to_string()))?;
        Ok(VerifiedUpdate {
            round_id: m.round_id,
            model_version: m.model_version.to_hex(),
            device_public_key: hex::encode(m.device_public_key.as_bytes()),
            sample_count: m.sample_count,
            dimension: delta.len() as u64,
            nonzero: delta.iter().filter(|v| **v != 0.0).count() as u64,
        })
    })
}
