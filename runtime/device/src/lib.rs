//! fedge-device: what runs on a device, around the training engine.
//!
//! - [`session`]: the device side of the protocol as a sans-IO state machine.
//! - [`driver`]: the thin tokio + quinn driver that feeds it.
//! - [`transport`]: QUIC client configuration and aggregator pinning.
//! - [`identity`]: the device's Ed25519 key, created once and kept.
//! - [`trainer`]: the [`trainer::Trainer`] trait the driver calls to train,
//!   [`trainer::KnownUpdate`] for protocol tests, and (feature `engine`)
//!   the engine's `OnnxTrainer` as a `Trainer`.
//! - [`secagg`]: the device's side of SecAgg+ (secure aggregation with
//!   dropouts) as a sans-IO state machine.
//! - [`compress`]: update compression with error feedback.
//! - [`sensor`]: IMU drivers over embedded-hal 1.0 I2C and (feature
//!   `engine`) the windowed activity-recognition data set; [`store`]: the
//!   bounded, crash-safe on-device sample store they fill.
//! - [`policy`]: device policy: when the device may take tasks (charging,
//!   battery floor, idle, unmetered), and the Linux power-supply source.
//! - [`reward`]: checking a reward proof from the aggregator's ledger
//!   offline (`fedge-device verify-reward`).
//! - `dataspec` (feature `engine`): naming local data on the command line.
//! - [`fuzzing`]: entry points for the residual and sensor-window fuzz
//!   targets (`fuzz/`) and their corpus replay test.
//!
//! The training engine is the `fedge-engine` crate, an optional
//! dependency behind the `engine` feature (on by default, as is `gpu`);
//! the `fedge-device` binary needs it.
//!
//! **Invariant:** `session` knows nothing of tokio, sockets or the clock;
//! every protocol behaviour is testable on a simulated fleet.
//!
//! **Invariant:** without the `engine` feature this crate links no tract
//! and no wgpu: the protocol client builds on its own (checked by
//! `aggregator/tests/layering.rs`).

pub mod compress;
#[cfg(feature = "engine")]
pub mod dataspec;
pub mod driver;
pub mod fuzzing;
pub mod identity;
pub mod policy;
pub mod reward;
pub mod secagg;
pub mod sensor;
pub mod session;
pub mod store;
pub mod trainer;
pub mod transport;

pub use session::{DeviceEvent, DeviceSession, EvalOutput, SessionConfig, TrainOutput};
