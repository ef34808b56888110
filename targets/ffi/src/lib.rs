//! fedge-ffi: the fedge device runtime for mobile and other foreign hosts,
//! through [UniFFI](https://mozilla.github.io/uniffi-rs/) (Kotlin, Swift,
//! Python) and its C-level header.
//!
//! The surface is small and stable:
//!
//! - [`Device`]: created from a [`DeviceConfig`] (data directory for the
//!   device key, the error-feedback residual and downloaded models;
//!   optionally an aggregator address and its pinned certificate
//!   fingerprint). It loads a model ([`Device::load_model_onnx`],
//!   [`Device::load_zoo_model`]), runs inference on a batch
//!   ([`Device::infer`]), trains locally on given samples
//!   ([`Device::train`]), produces a signed, compressed update
//!   ([`Device::make_update`]) and takes part in an aggregator's rounds
//!   over QUIC ([`Device::run_rounds`]).
//! - [`verify_update`]: what an aggregator checks of a signed update.
//! - [`zoo_models`]: the built-in model names.
//! - [`FedgeError`]: the one error type; panics never cross the boundary.
//!
//! **Threading model:** see [`boundary`]. Long calls are `async` and run on
//! the library's own tokio runtime; a host's UI thread never blocks.
//!
//! **API boundary:** this crate only wraps `fedge-engine`, `fedge-device` and
//! `fedge-proto`; it adds no training, protocol or codec logic of its own.

uniffi::setup_scaffolding!();

pub mod boundary;
mod device;
mod error;

pub use device::{
    Device, DeviceConfig, InferOutput, ModelInfo, RunReport, Samples, SignedUpdate, TrainOptions,
    TrainReport, VerifiedUpdate, verify_update, zoo_models,
};
pub use error::FedgeError;

/// Most samples one batch of inference may hold.
pub const INFER_BATCH_MAX: u32 = 1024;
/// Most samples one call to `train` or `run_rounds` may hand over.
pub const SAMPLES_MAX: u32 = 100_000;
/// Largest training batch.
pub const TRAIN_BATCH_MAX: u32 = 1024;
/// Most steps and epochs one call to `train` may run.
pub const TRAIN_STEPS_MAX: u32 = 1_000_000;
pub const TRAIN_EPOCHS_MAX: u32 = 1_000;
/// Consecutive failed connection attempts before `run_rounds` gives up.
pub const RECONNECT_ATTEMPTS_MAX: u32 = 20;
