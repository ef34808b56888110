//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same entry points the cargo-fuzz targets call
//! ([`fedge_device::fuzzing::TARGETS`]), on stable, as an ordinary test:
//! every input the fuzzers kept must still decode or be refused without a
//! panic, and accepted ones must still round-trip (see
//! `fedge_proto::fuzzing::replay_corpus`; `FEDGE_WRITE_FUZZ_SEEDS=1`
//! rewrites the seeds).

#[test]
fn every_target_has_a_corpus_and_replays_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    fedge_proto::fuzzing::replay_corpus(&root, fedge_device::fuzzing::TARGETS);
}
