//! The on-device sample store: a bounded ring of fixed-size records that
//! wraps around, reopens where it left off, and skips (rather than
//! trusts) records torn by a crash.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::Path;

use fedge_device::store::{
    self, CAPACITY_MAX, Durability, HEADER_BYTES, SLOT_OVERHEAD_BYTES, SampleStore, StoreError,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

fn rec(seq: u64, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn contents(s: &SampleStore) -> Vec<(u64, Vec<u8>)> {
    s.iter().collect::<Result<_, _>>().unwrap()
}

fn slot_offset(slot: u64, record_bytes: usize) -> u64 {
    HEADER_BYTES + slot * (record_bytes + SLOT_OVERHEAD_BYTES) as u64
}

fn file(dir: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(store::FILE_NAME))
        .unwrap()
}

#[test]
fn the_oldest_records_are_overwritten_and_the_file_never_grows() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SampleStore::open_or_create(dir.path(), 8, 4).unwrap();
    assert!(s.is_empty());
    let size = std::fs::metadata(s.path()).unwrap().len();
    assert_eq!(size, HEADER_BYTES + 4 * (8 + SLOT_OVERHEAD_BYTES) as u64);
    for seq in 1..=10 {
        assert_eq!(s.append(&rec(seq, 8)).unwrap(), seq);
        assert!(s.len() <= 4);
    }
    assert_eq!(s.len(), 4);
    assert_eq!(
        contents(&s),
        (7..=10).map(|q| (q, rec(q, 8))).collect::<Vec<_>>()
    );
    assert_eq!(std::fs::metadata(s.path()).unwrap().len(), size);
}

#[test]
fn reopening_restores_the_records_and_the_write_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SampleStore::open_or_create(dir.path(), 5, 3).unwrap();
    for seq in 1..=5 {
        s.append(&rec(seq, 5)).unwrap();
    }
    let before = contents(&s);
    drop(s);
    let mut s = SampleStore::open(dir.path()).unwrap();
    assert_eq!((s.record_bytes(), s.capacity(), s.head()), (5, 3, 5));
    assert_eq!(s.skipped_on_open(), 0);
    assert_eq!(contents(&s), before);
    assert_eq!(s.append(&rec(6, 5)).unwrap(), 6);
    drop(s);
    let s = SampleStore::open_or_create(dir.path(), 5, 3).unwrap();
    assert_eq!(
        contents(&s),
        (4..=6).map(|q| (q, rec(q, 5))).collect::<Vec<_>>()
    );
}

#[test]
fn a_write_torn_by_a_crash_is_detected_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SampleStore::open_or_create(dir.path(), 16, 4).unwrap();
    for seq in 1..=6 {
        s.append(&rec(seq, 16)).unwrap();
    }
    drop(s);
    // Crash while writing record 7 into slot 2 (which held record 3): its
    // sequence number and half its bytes reached the disk, the rest did not.
    let f = file(dir.path());
    let mut torn = 7u64.to_le_bytes().to_vec();
    torn.extend_from_slice(&rec(7, 16)[..8]);
    f.write_all_at(&torn, slot_offset(2, 16)).unwrap();
    drop(f);
    let mut s = SampleStore::open(dir.path()).unwrap();
    assert_eq!(s.skipped_on_open(), 1);
    assert_eq!(s.head(), 6, "the torn record is not the newest");
    assert_eq!(
        contents(&s),
        (4..=6).map(|q| (q, rec(q, 16))).collect::<Vec<_>>(),
        "record 3 was being overwritten; every other record is intact"
    );
    // Appending carries on where the store really was.
    assert_eq!(s.append(&rec(7, 16)).unwrap(), 7);
    assert_eq!(s.len(), 4);
}

#[test]
fn a_corrupted_old_record_is_skipped_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SampleStore::open_or_create(dir.path(), 16, 4).unwrap();
    for seq in 1..=4 {
        s.append(&rec(seq, 16)).unwrap();
    }
    // Flip one bit inside record 2's payload while the store is open:
    // reading checks again.
    let f = file(dir.path());
    let off = slot_offset(1, 16) + 8 + 5;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], off).unwrap();
    let seqs: Vec<u64> = contents(&s).into_iter().map(|(q, _)| q).collect();
    assert_eq!(seqs, vec![1, 3, 4]);
    drop(s);
    let s = SampleStore::open(dir.path()).unwrap();
    assert_eq!((s.len(), s.skipped_on_open()), (3, 1));
}

#[test]
fn records_older_than_the_newest_capacity_are_not_resurrected() {
    // With OS-buffered appends a crash can lose record 5 yet keep record
    // 6; the slot record 5 should have overwritten still holds record 2,
    // which is no longer among the newest three.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = SampleStore::open_or_create(a.path(), 4, 3).unwrap();
    full.set_durability(Durability::Os);
    for seq in 1..=6 {
        full.append(&rec(seq, 4)).unwrap();
    }
    full.sync().unwrap();
    let mut lost = SampleStore::open_or_create(b.path(), 4, 3).unwrap();
    for seq in 1..=4 {
        lost.append(&rec(seq, 4)).unwrap();
    }
    drop(lost);
    let slot_len = 4 + SLOT_OVERHEAD_BYTES;
    let mut six = vec![0u8; slot_len];
    file(a.path())
        .read_exact_at(&mut six, slot_offset(2, 4))
        .unwrap();
    file(b.path())
        .write_all_at(&six, slot_offset(2, 4))
        .unwrap();
    let s = SampleStore::open(b.path()).unwrap();
    assert_eq!(s.head(), 6);
    let seqs: Vec<u64> = contents(&s).into_iter().map(|(q, _)| q).collect();
    assert_eq!(seqs, vec![4, 6]);
    assert_eq!(s.skipped_on_open(), 1);
}

#[test]
fn a_damaged_header_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    SampleStore::open_or_create(dir.path(), 8, 2).unwrap();
    let f = file(dir.path());
    f.write_all_at(&[9], 12).unwrap(); // record size field, checksum now wrong
    drop(f);
    let err = SampleStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StoreError::CorruptHeader { reason, .. } if reason.contains("checksum")),
        "{err}"
    );
    file(dir.path()).write_all_at(b"NOTARING", 0).unwrap();
    let err = SampleStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, StoreError::CorruptHeader { reason, .. } if reason.contains("magic")),
        "{err}"
    );

    // A file cut short (a copy interrupted, say).
    let dir = tempfile::tempdir().unwrap();
    SampleStore::open_or_create(dir.path(), 8, 2).unwrap();
    file(dir.path()).set_len(HEADER_BYTES + 10).unwrap();
    let err = SampleStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::CorruptHeader { .. }), "{err}");
    file(dir.path()).set_len(20).unwrap();
    assert!(matches!(
        SampleStore::open(dir.path()),
        Err(StoreError::CorruptHeader { .. })
    ));
}

#[test]
fn sizes_directories_and_record_lengths_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SampleStore::open_or_create(dir.path(), 8, 2).unwrap();
    assert!(matches!(
        s.append(&[0; 7]),
        Err(StoreError::RecordSize {
            expected: 8,
            found: 7,
            ..
        })
    ));
    drop(s);
    assert!(matches!(
        SampleStore::open_or_create(dir.path(), 16, 2),
        Err(StoreError::RecordSize {
            expected: 16,
            found: 8,
            ..
        })
    ));
    assert!(matches!(
        SampleStore::open_or_create(dir.path(), 8, 3),
        Err(StoreError::Capacity {
            expected: 3,
            found: 2,
            ..
        })
    ));
    let missing = dir.path().join("nope");
    let err = SampleStore::open_or_create(&missing, 8, 2).unwrap_err();
    assert!(matches!(err, StoreError::MissingDir { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        SampleStore::open(empty.path()),
        Err(StoreError::Missing { .. })
    ));
    for (bytes, cap) in [(0, 4), (8, 0), (8, CAPACITY_MAX + 1), (1 << 21, 1)] {
        assert!(
            matches!(
                SampleStore::open_or_create(empty.path(), bytes, cap),
                Err(StoreError::Invalid(_))
            ),
            "{bytes} x {cap}"
        );
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(Op::Append),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5709e),
        ..ProptestConfig::default()
    })]

    /// Whatever the sequence of appends and reopens, the store holds
    /// exactly the newest `min(appended, capacity)` records, never more
    /// than its capacity, in a file of constant size.
    #[test]
    fn the_capacity_bound_holds_and_the_newest_records_survive(
        capacity in 1u64..8,
        record_bytes in 1usize..24,
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SampleStore::open_or_create(dir.path(), record_bytes, capacity).unwrap();
        s.set_durability(Durability::Os);
        let size = std::fs::metadata(s.path()).unwrap().len();
        let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let mut seq = 0u64;
        for op in ops {
            match op {
                Op::Append(b) => {
                    seq += 1;
                    let r = vec![b; record_bytes];
                    prop_assert_eq!(s.append(&r).unwrap(), seq);
                    model.push_back((seq, r));
                    if model.len() as u64 > capacity {
                        model.pop_front();
                    }
                }
                Op::Reopen => {
                    drop(s);
                    s = SampleStore::open(dir.path()).unwrap();
                    prop_assert_eq!(s.skipped_on_open(), 0);
                }
            }
            prop_assert!(s.len() as u64 <= capacity);
            prop_assert_eq!(std::fs::metadata(s.path()).unwrap().len(), size);
            prop_assert_eq!(contents(&s), model.iter().cloned().collect::<Vec<_>>());
        }
    }
}
