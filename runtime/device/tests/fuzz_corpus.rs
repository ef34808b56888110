//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same entry points the cargo-fuzz targets call
//! ([`fedge_device::fuzzing::TARGETS`]), on stable, as an ordinary test:
//! every input the fuzzers kept must still decode or be refused without a
//! panic, and accepted ones must still round-trip.
//!
//! `FEDGE_WRITE_FUZZ_SEEDS=1 cargo test --workspace --locked --test
//! fuzz_corpus` (re)writes each target's seeds (valid encodings from the
//! real encoders) into its corpus folder as `seed-<hash>`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fedge_device::fuzzing::TARGETS;
use fedge_proto::fuzzing::Target;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// Run every file of `target`'s corpus; a panic names the file.
fn replay(t: &Target) -> usize {
    let dir = corpus_dir(t.name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    for f in &files {
        let bytes = std::fs::read(f).expect("corpus file");
        if catch_unwind(AssertUnwindSafe(|| (t.run)(&bytes))).is_err() {
            panic!("fuzz target `{}` panics on {}", t.name, f.display());
        }
    }
    files.len()
}

#[test]
fn every_target_has_a_corpus_and_replays_it() {
    if std::env::var_os("FEDGE_WRITE_FUZZ_SEEDS").is_some() {
        for t in TARGETS {
            write_seeds(t);
        }
    }
    for t in TARGETS {
        let n = replay(t);
        assert!(n > 0, "fuzz/corpus/{} is empty", t.name);
    }
}

fn write_seeds(t: &Target) {
    let dir = corpus_dir(t.name);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    for s in (t.seeds)() {
        let name = format!("seed-{}", &blake3::hash(&s).to_hex()[..16]);
        std::fs::write(dir.join(name), &s).expect("write seed");
    }
}
