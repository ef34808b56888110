//! The `fedge-aggregator` binary's integration tests, as one test binary:
//! every file beside this one is a module of it (`autotests = false` in
//! Cargo.toml; see `aggregator/tests/suite.rs`, whose
//! `every_test_file_is_in_the_suite` checks this directory too). Run one
//! file's tests with `cargo test --workspace --locked --test aggregator_cli
//! crash_recovery::`.

mod procs;

mod crash_recovery;
mod e2e_processes;
mod quic_training;
mod simulate_cli;
mod simulate_tree;
mod tree_restart;
