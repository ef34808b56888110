//! fedge-engine: on-device training, from a plain ONNX model to trained
//! parameters.
//!
//! - [`train`]: the training engine (ONNX -> training graph -> tract on the
//!   CPU, or the wgpu executor on a GPU, [`train::gpu`], feature `gpu`).
//! - [`trainer`]: [`trainer::OnnxTrainer`], one round of local training on
//!   the aggregator's model, giving a [`trainer::LocalUpdate`].
//! - [`data`]: local data sets (MNIST, IDX, text windows) and partitions.
//! - [`zoo`]: the model zoo; [`bench`]: the training benchmark.
//! - [`alloc`]: [`alloc::StepAlloc`], the global allocator a training
//!   process installs (a step's large tensors reused, not fragmenting the
//!   C heap).
//! - [`fuzzing`]: entry points for the ONNX fuzz targets (`fuzz/`) and
//!   their corpus replay test.
//!
//! **Invariant:** no networking: the engine knows nothing of the protocol,
//! QUIC, TLS or tokio. The device crate (`fedge-device`) drives it.
//!
//! **Invariant:** this is the only crate in the workspace that depends on
//! tract or wgpu directly (checked by `aggregator/tests/layering.rs`).

pub mod alloc;
pub mod bench;
pub mod data;
pub mod fuzzing;
pub mod train;
pub mod trainer;
pub mod zoo;
