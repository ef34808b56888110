//! The device crate's integration tests, as one test binary: every file beside
//! this one is a module of it (`autotests = false` in Cargo.toml; see
//! `aggregator/tests/suite.rs`, whose `every_test_file_is_in_the_suite`
//! checks this directory too). Run one file's tests with `cargo test
//! --workspace --locked --test device FILE::`.

#[cfg(feature = "engine")]
mod cli;
mod fuzz_corpus;
mod policy;
#[cfg(feature = "engine")]
mod sensor;
#[cfg(feature = "engine")]
mod sensor_cli;
mod sensor_store;
mod session_handshake;
