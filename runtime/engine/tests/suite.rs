//! The engine's integration tests, as one test binary: every file beside
//! this one is a module of it (`autotests = false` in Cargo.toml; see
//! `aggregator/tests/suite.rs`, whose `every_test_file_is_in_the_suite`
//! checks this directory too). Run one file's tests with `cargo test
//! --workspace --locked --test engine FILE::`.

mod fuzz_corpus;
#[cfg(feature = "gpu")]
mod gpu;
mod grad_check;
mod lora;
mod optimizers;
mod torch_fixtures;
mod transformer;
mod zoo;
