//! The one error type that crosses the boundary.

use fedge_engine::train::TrainError;

/// Everything an exported function can fail with. Foreign code sees one
/// exception (Kotlin, Python) or `Error` (Swift) type with one subtype per
/// variant, each carrying a human-readable `detail`.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
pub enum FedgeError {
    /// The device configuration is unusable (data directory, aggregator
    /// address, fingerprint).
    #[error("configuration: {detail}")]
    Config { detail: String },
    /// The device key in the data directory cannot be read or created.
    #[error("device identity: {detail}")]
    Identity { detail: String },
    /// The model bytes are not a usable ONNX model, or the zoo has no model
    /// by that name.
    #[error("model: {detail}")]
    BadModel { detail: String },
    /// An operation that needs a model was called before one was loaded.
    #[error("no model loaded: call load_model_onnx or load_zoo_model first")]
    NoModel,
    /// Inputs, labels or options do not fit the model or a limit.
    #[error("bad input: {detail}")]
    BadInput { detail: String },
    /// Local training failed (diverged, or the engine refused the model).
    #[error("training: {detail}")]
    Training { detail: String },
    /// The codec string does not parse, or the update cannot be encoded.
    #[error("codec: {detail}")]
    Codec { detail: String },
    /// A signed update does not verify (signature, hash, payload).
    #[error("update does not verify: {detail}")]
    BadUpdate { detail: String },
    /// Talking to the aggregator failed.
    #[error("network: {detail}")]
    Network { detail: String },
    /// The data directory cannot be written.
    #[error("storage: {detail}")]
    Storage { detail: String },
    /// The device is already running rounds against an aggregator.
    #[error("busy: {detail}")]
    Busy { detail: String },
    /// A bug: a panic inside the library, caught at the boundary. The
    /// device object that was in use should be dropped and recreated.
    #[error("internal error (please report): {detail}")]
    Internal { detail: String },
}

impl FedgeError {
    pub(crate) fn bad_input(detail: impl Into<String>) -> Self {
        FedgeError::BadInput {
            detail: detail.into(),
        }
    }
}

impl From<TrainError> for FedgeError {
    /// Errors while training or running a loaded model. Loading maps every
    /// engine error to [`FedgeError::BadModel`] itself.
    fn from(e: TrainError) -> Self {
        let detail = e.to_string();
        match e {
            TrainError::BadInput(_) => FedgeError::BadInput { detail },
            TrainError::BadModel(_) => FedgeError::BadModel { detail },
            _ => FedgeError::Training { detail },
        }
    }
}
