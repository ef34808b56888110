//! fedge-aggregator: where untrusted updates become a model.
//!
//! - [`coordinator`]: round orchestration as a sans-IO state machine.
//! - [`server`]: the thin tokio + quinn driver around the coordinator.
//! - [`tls`]: the aggregator's TLS identity (created once, pinned by devices).
//! - [`uplink`]: a leaf aggregator's link with its parent (a tree of
//!   aggregators).
//! - [`store`]: durable state on disk (content-addressed model blobs).
//! - [`config`]: the TOML configuration and its defaults.
//! - [`metrics`]: Prometheus metrics and the JSON status endpoint.
//! - [`strategy`], [`robust`], [`weighting`]: strategies, robust
//!   combiners, token-weighted contributions.
//! - [`scoring`]: contribution scores, copy and free-rider flags, rewards.
//! - [`ledger`]: the signed, hash-chained ledger of settled rounds, its
//!   verification, reward proofs and export.
//!
//! The `fedge-aggregator` binary (serve, model files, `simulate`, `bench`)
//! is the `fedge-aggregator-cli` package in `aggregator/cli`.
//!
//! **Invariant:** this library never depends on tract, wgpu, the engine
//! (`fedge-engine`) or the device crate (`fedge-device`); only its tests
//! (the device's protocol client, without the engine) and the binary's
//! `simulate` wiring do. `tests/layering.rs` checks it on the resolved
//! dependency graph.

pub mod config;
pub mod coordinator;
pub mod downlink;
pub mod evaluation;
pub mod ledger;
pub mod metrics;
pub mod privacy;
pub mod robust;
pub mod scoring;
pub mod server;
pub mod store;
pub mod strategy;
pub mod tls;
pub mod uplink;
pub mod weighting;
