//! fedge-aggregator: where untrusted updates become a model.
//!
//! - [`coordinator`]: round orchestration as a sans-IO state machine.
//! - [`server`]: the thin tokio + quinn driver around the coordinator.
//! - [`tls`]: the aggregator's TLS identity (created once, pinned by devices).
//! - [`store`]: durable state on disk (content-addressed model blobs).
//! - [`config`]: the TOML configuration and its defaults.
//! - [`metrics`]: Prometheus metrics and the JSON status endpoint.
//! - [`strategy`], [`robust`], [`weighting`]: strategies, robust
//!   combiners, token-weighted contributions.
//!
//! **Invariant:** the aggregator never depends on tract or on the device
//! runtime; only tests and the `simulate` wiring in the binary do.

pub mod config;
pub mod coordinator;
pub mod metrics;
pub mod robust;
pub mod server;
pub mod store;
pub mod strategy;
pub mod tls;
pub mod weighting;
