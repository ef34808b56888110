//! fedge-proto: everything that crosses the wire between a device and an
//! aggregator.
//!
//! - [`wire`]: the prost messages generated from `proto/fedge.proto`
//!   (compiled with protox in build.rs; no `protoc` needed).
//! - [`msg`]: the domain messages ([`DeviceMsg`], [`AggMsg`]) and their
//!   validating conversions. Bad input is rejected here, with a typed
//!   [`ProtoError`], before any state machine sees it.
//! - [`frame`]: length-prefixed framing with a size bound checked before
//!   anything is allocated.
//! - [`params`]: the one canonical parameter layout, model blobs and their
//!   content-addressed versions.
//! - [`codec`]: update compression codecs (dense, half precision,
//!   quantized, sign, top-k / random-k, zstd), their spec grammar and
//!   their validating decoders.
//! - [`update`]: the update encode/decode entry points callers use.
//! - [`sign`]: what devices sign (authentication and update manifests).
//! - [`ledger`]: the contribution ledger's record format, its hash chain
//!   and signatures, and the per-round Merkle tree of rewards whose
//!   inclusion proofs devices check offline.
//! - [`secagg`]: SecAgg+ (Bell et al. 2020): what the device and the
//!   aggregator share: parameters, neighbour graph, Shamir sharing, key
//!   agreement and masks, fixed-point encoding, the stages' messages.
//! - [`evidence`]: the evidence of equivocation (two signed updates of
//!   one device for one task), as the ledger's penalties name it.
//! - [`fuzzing`]: one entry point a decoder for the fuzz targets (`fuzz/`)
//!   and the corpus replay test.
//!
//! **Invariant:** nothing in this crate does I/O or keeps time except the
//! optional `io` helpers, which only read and write frames.

pub mod codec;
pub mod delta;
pub mod error;
pub mod evidence;
pub mod frame;
pub mod fuzzing;
#[cfg(feature = "io")]
pub mod io;
pub mod ledger;
pub mod limits;
pub mod msg;
pub mod params;
pub mod secagg;
pub mod sign;
#[cfg(feature = "tls")]
pub mod tls;
pub mod update;

/// Generated prost code. Domain code uses [`msg`] instead.
#[allow(clippy::all, missing_docs)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/fedge.v1.rs"));
}

pub use error::{ProtoError, RejectCode};
pub use limits::Limits;
pub use msg::{AggMsg, DeviceMsg};
pub use params::{ModelBlob, ModelVersion, ParamLayout, Params, TensorSpec};

/// The schema version this build speaks. A peer with another version is
/// refused at hello with [`RejectCode::SchemaMismatch`].
pub const SCHEMA_VERSION: u32 = 3;

/// Version of this runtime, sent in hello.
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");
