//! fedge-runtime: what runs on a device.
//!
//! - [`session`]: the device side of the protocol as a sans-IO state machine.
//! - [`driver`]: the thin tokio + quinn driver that feeds it.
//! - [`transport`]: QUIC client configuration and aggregator pinning.
//! - [`identity`]: the device's Ed25519 key, created once and kept.
//! - [`trainer`]: the [`trainer::Trainer`] trait the driver calls to train,
//!   and [`trainer::OnnxTrainer`], which trains the aggregator's model.
//! - [`train`]: the training engine (ONNX -> training graph -> tract on the
//!   CPU, or the wgpu executor on a GPU, [`train::gpu`]).
//! - [`compress`]: update compression with error feedback.
//! - [`data`], [`dataspec`]: local data sets, partitions, naming them.
//! - [`sensor`]: IMU drivers over embedded-hal 1.0 I2C and the windowed
//!   activity-recognition data set; [`store`]: the bounded, crash-safe
//!   on-device sample store they fill.
//! - [`policy`]: device policy: when the device may take tasks (charging,
//!   battery floor, idle, unmetered), and the Linux power-supply source.
//! - [`zoo`]: the model zoo; [`bench`]: the training benchmark.
//!
//! **Invariant:** `session` knows nothing of tokio, sockets or the clock;
//! every protocol behaviour is testable on a simulated fleet.

pub mod bench;
pub mod compress;
pub mod data;
pub mod dataspec;
pub mod driver;
pub mod identity;
pub mod policy;
pub mod sensor;
pub mod session;
pub mod store;
pub mod train;
pub mod trainer;
pub mod transport;
pub mod zoo;

pub use session::{DeviceEvent, DeviceSession, SessionConfig, TrainOutput};
