//! The aggregator's integration tests, as one test binary: every file
//! beside this one is a module of it (`autotests = false` in Cargo.toml).
//! One binary links the crates' generic code once instead of once per
//! file, which took most of the suite's cold build; run one file's tests
//! with `cargo test --workspace --locked --test suite ledger::`.
//! `every_test_file_is_in_the_suite` fails when a file is left out.

mod raw;
mod sim;
mod treekit;

mod checkpoint;
mod close_jobs;
mod coordinator_props;
mod downlink;
mod evaluation;
mod evaluation_quic;
mod fleet;
mod layering;
mod ledger;
mod lock_lost;
mod quic_bad_input;
mod quic_burst;
mod quic_intake;
mod quic_keepalive;
mod scoring;
mod secagg;
mod secagg_quic;
mod secure_quic;
mod secure_rounds;
mod selection;
mod tree;
mod tree_adversary;
mod tree_levels;

/// A test file not declared in its suite's root would never be compiled
/// or run: each directory of tests that is one binary is checked here.
#[test]
fn every_test_file_is_in_the_suite() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [
        here.join("tests"),
        here.join("cli/tests"),
        here.join("../runtime/engine/tests"),
        here.join("../runtime/device/tests"),
    ] {
        let root = std::fs::read_to_string(dir.join("suite.rs")).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let module =
                path.extension().is_some_and(|e| e == "rs") || path.join("mod.rs").is_file();
            if module && name != "suite" {
                assert!(
                    root.contains(&format!("\nmod {name};\n")),
                    "{} is not declared in {}/suite.rs, so it never runs",
                    path.display(),
                    dir.display()
                );
            }
        }
    }
}
