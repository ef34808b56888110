//! The bounded on-device sample store: a ring of fixed-size records in
//! one file, oldest overwritten first, that survives crashes.
//!
//! Layout of `DIR/samples.ring`:
//!
//! ```text
//! header (64 bytes): magic "FEDGERNG", format u32, record_bytes u32,
//!                    capacity_records u64, 8 zero bytes,
//!                    blake3 of the first 32 bytes
//! slot i (capacity_records of them), at 64 + i * (record_bytes + 24):
//!     seq u64 | record (record_bytes) | first 16 bytes of
//!     blake3(slot index u64 | seq u64 | record)
//! ```
//!
//! Record `seq` (1, 2, ...) lives in slot `(seq - 1) % capacity`. The
//! write position is not a mutable header field: it is the largest `seq`
//! whose slot checks out, found by scanning the slots when the store is
//! opened. So there is no header update to tear, and one append is one
//! positioned write into one slot. A write torn by a crash leaves a slot
//! whose checksum fails: that record (the new one, and the oldest one it
//! was overwriting) is skipped and counted, and every other record is
//! intact. The header is written once, at creation (to a temporary file
//! renamed into place), and never changes.
//!
//! **Invariant: bounded.** The file is `64 + capacity x slot` bytes from
//! creation on and never grows; at most `capacity_records` records are
//! ever readable; the whole file is capped at [`STORE_BYTES_MAX`].
//!
//! One writer at a time. A reader that meets a slot being written sees a
//! bad checksum and skips it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name inside the store directory.
pub const FILE_NAME: &str = "samples.ring";
pub const MAGIC: &[u8; 8] = b"FEDGERNG";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 64;
/// Per-slot overhead: sequence number and checksum.
pub const SLOT_OVERHEAD_BYTES: usize = 8 + CHECKSUM_BYTES;
const CHECKSUM_BYTES: usize = 16;
/// Largest record.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Largest store file.
pub const STORE_BYTES_MAX: u64 = 1 << 30;
/// Most records a store holds (opening keeps 8 bytes per record in memory).
pub const CAPACITY_MAX: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sample store directory {path} does not exist (create it, or pass another directory)")]
    MissingDir { path: PathBuf },
    #[error("no sample store in {path} (no {FILE_NAME}): collect samples first")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt sample store header: {reason}")]
    CorruptHeader { path: PathBuf, reason: String },
    #[error("{path}: records are {found} bytes, expected {expected}")]
    RecordSize {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{path}: the store holds {found} records, expected {expected}")]
    Capacity {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("invalid sample store size: {0}")]
    Invalid(String),
}

/// When appends reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` after every append: an acknowledged append survives a
    /// power cut.
    EveryAppend,
    /// Leave it to the OS (and [`SampleStore::sync`]); a crash may lose
    /// recent appends, never older records.
    Os,
}

pub struct SampleStore {
    path: PathBuf,
    file: File,
    record_bytes: usize,
    capacity: u64,
    /// Sequence number held by each slot (0: empty or unreadable).
    slots: Vec<u64>,
    head: u64,
    skipped_on_open: u64,
    durability: Durability,
}

impl std::fmt::Debug for SampleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleStore")
            .field("path", &self.path)
            .field("record_bytes", &self.record_bytes)
            .field("capacity", &self.capacity)
            .field("head", &self.head)
            .finish()
    }
}

fn slot_bytes(record_bytes: usize) -> u64 {
    (record_bytes + SLOT_OVERHEAD_BYTES) as u64
}

fn checksum(slot: u64, seq: u64, record: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(&slot.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(record);
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECKSUM_BYTES]);
    out
}

fn header(record_bytes: usize, capacity: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(record_bytes as u32).to_le_bytes());
    h[16..24].copy_from_slice(&capacity.to_le_bytes());
    let sum = *blake3::hash(&h[..32]).as_bytes();
    h[32..].copy_from_slice(&sum);
    h
}

fn check_size(record_bytes: usize, capacity: u64) -> Result<(), StoreError> {
    if record_bytes == 0 || record_bytes > RECORD_BYTES_MAX {
        return Err(StoreError::Invalid(format!(
            "records of {record_bytes} bytes: use 1..={RECORD_BYTES_MAX}"
        )));
    }
    let total = capacity
        .checked_mul(slot_bytes(record_bytes))
        .and_then(|b| b.checked_add(HEADER_BYTES));
    if capacity == 0 || capacity > CAPACITY_MAX || total.is_none_or(|t| t > STORE_BYTES_MAX) {
        return Err(StoreError::Invalid(format!(
            "{capacity} records of {record_bytes} bytes: hold 1..={CAPACITY_MAX} records in at most {STORE_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

impl SampleStore {
    /// Open the store in `dir`, creating it with these dimensions if it
    /// does not exist. An existing store must have the same record size
    /// and capacity.
    pub fn open_or_create(
        dir: &Path,
        record_bytes: usize,
        capacity: u64,
    ) -> Result<SampleStore, StoreError> {
        check_size(record_bytes, capacity)?;
        if !dir.is_dir() {
            return Err(StoreError::MissingDir {
                path: dir.to_path_buf(),
            });
        }
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            create(dir, &path, record_bytes, capacity)?;
        }
        let store = Self::open(dir)?;
        if store.record_bytes != record_bytes {
            return Err(StoreError::RecordSize {
                path,
                expected: record_bytes,
                found: store.record_bytes,
            });
        }
        if store.capacity != capacity {
            return Err(StoreError::Capacity {
                path,
                expected: capacity,
                found: store.capacity,
            });
        }
        Ok(store)
    }

    /// Open an existing store, scanning its slots to restore the write
    /// position.
    pub fn open(dir: &Path) -> Result<SampleStore, StoreError> {
        if !dir.is_dir() {
            return Err(StoreError::MissingDir {
                path: dir.to_path_buf(),
            });
        }
        let path = dir.join(FILE_NAME);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    path: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io(e)),
        };
        let corrupt = |reason: String| StoreError::CorruptHeader {
            path: path.clone(),
            reason,
        };
        let mut h = [0u8; HEADER_BYTES as usize];
        file.read_exact(&mut h)
            .map_err(|e| corrupt(format!("cannot read the header: {e}")))?;
        if &h[..8] != MAGIC {
            return Err(corrupt("not a fedge sample store (bad magic)".into()));
        }
        if h[32..] != blake3::hash(&h[..32]).as_bytes()[..] {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4"));
        if version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        let record_bytes = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
        let capacity = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        check_size(record_bytes, capacity).map_err(|e| corrupt(e.to_string()))?;
        let expected_len = HEADER_BYTES + capacity * slot_bytes(record_bytes);
        let len = file.metadata().map_err(io)?.len();
        if len != expected_len {
            return Err(corrupt(format!(
                "file is {len} bytes, its header implies {expected_len}"
            )));
        }
        let mut store = SampleStore {
            path: path.clone(),
            file,
            record_bytes,
            capacity,
            slots: vec![0; capacity as usize],
            head: 0,
            skipped_on_open: 0,
            durability: Durability::EveryAppend,
        };
        store.scan()?;
        Ok(store)
    }

    /// Read every slot; keep the sequence numbers of those that check out
    /// and belong to the newest `capacity` records.
    fn scan(&mut self) -> Result<(), StoreError> {
        let mut buf = vec![0u8; slot_bytes(self.record_bytes) as usize];
        let mut written = 0u64;
        for slot in 0..self.capacity {
            self.read_slot_raw(slot, &mut buf)?;
            if buf.iter().all(|&b| b == 0) {
                continue; // never written
            }
            written += 1;
            if let Some(seq) = self.verify(slot, &buf) {
                self.slots[slot as usize] = seq;
            }
        }
        self.head = self.slots.iter().copied().max().unwrap_or(0);
        // Slots holding a record older than the newest `capacity` cannot
        // come from this store's history: drop them.
        let oldest = self.head.saturating_sub(self.capacity - 1).max(1);
        for s in &mut self.slots {
            if *s != 0 && *s < oldest {
                *s = 0;
            }
        }
        let valid = self.slots.iter().filter(|&&s| s != 0).count() as u64;
        self.skipped_on_open = written - valid;
        Ok(())
    }

    /// The slot's sequence number if its checksum and position check out.
    fn verify(&self, slot: u64, buf: &[u8]) -> Option<u64> {
        let seq = u64::from_le_bytes(buf[..8].try_into().expect("8"));
        let rec = &buf[8..8 + self.record_bytes];
        let sum = &buf[8 + self.record_bytes..];
        (seq > 0 && (seq - 1) % self.capacity == slot && sum == checksum(slot, seq, rec))
            .then_some(seq)
    }

    fn slot_offset(&self, slot: u64) -> u64 {
        HEADER_BYTES + slot * slot_bytes(self.record_bytes)
    }

    fn read_slot_raw(&self, slot: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.file
            .read_exact_at(buf, self.slot_offset(slot))
            .map_err(|source| StoreError::Io {
                path: self.path.clone(),
                source,
            })
    }

    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Readable records (at most `capacity`).
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|&&s| s != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence number of the newest record (0: none yet).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Slots that had been written but failed their check when the store
    /// was opened (torn writes, corruption).
    pub fn skipped_on_open(&self) -> u64 {
        self.skipped_on_open
    }

    /// Append a record, overwriting the oldest when full; returns its
    /// sequence number.
    pub fn append(&mut self, record: &[u8]) -> Result<u64, StoreError> {
        if record.len() != self.record_bytes {
            return Err(StoreError::RecordSize {
                path: self.path.clone(),
                expected: self.record_bytes,
                found: record.len(),
            });
        }
        let seq = self.head + 1;
        let slot = (seq - 1) % self.capacity;
        let mut buf = Vec::with_capacity(slot_bytes(self.record_bytes) as usize);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(record);
        buf.extend_from_slice(&checksum(slot, seq, record));
        // The slot's old record is gone from here on, whatever happens.
        self.slots[slot as usize] = 0;
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&buf, self.slot_offset(slot))
            .map_err(io)?;
        if self.durability == Durability::EveryAppend {
            self.file.sync_data().map_err(io)?;
        }
        self.slots[slot as usize] = seq;
        self.head = seq;
        Ok(seq)
    }

    /// Flush appends to disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Records oldest first, as `(seq, bytes)`. Each is checked again as
    /// it is read; one that no longer checks out is skipped.
    pub fn iter(&self) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_ {
        let first = self.head.saturating_sub(self.capacity - 1).max(1);
        let mut buf = vec![0u8; slot_bytes(self.record_bytes) as usize];
        (first..=self.head).filter_map(move |seq| {
            let slot = (seq - 1) % self.capacity;
            if self.slots[slot as usize] != seq {
                return None;
            }
            if let Err(e) = self.read_slot_raw(slot, &mut buf) {
                return Some(Err(e));
            }
            self.verify(slot, &buf)
                .filter(|&s| s == seq)
                .map(|_| Ok((seq, buf[8..8 + self.record_bytes].to_vec())))
        })
    }
}

/// Write the header and the zeroed slots to a temporary file, then
/// rename it into place, so a crash never leaves a half-made store.
fn create(dir: &Path, path: &Path, record_bytes: usize, capacity: u64) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p, source }
    };
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&header(record_bytes, capacity))
        .map_err(io(&tmp))?;
    f.set_len(HEADER_BYTES + capacity * slot_bytes(record_bytes))
        .map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
