//! The transfer manager: what devices download (model versions and
//! downlink deltas, served in chunks) and what they upload (updates,
//! reassembled chunk by chunk and resumable across reconnects).
//!
//! **Every byte an untrusted device can make the coordinator hold lives
//! here**: upload buffers (counted in [`TransferManager::upload_bytes_held`])
//! and the record of uploads cut short by a closed round. Model versions and
//! deltas are the aggregator's own data, bounded by `versions_kept` and
//! cleared every round. A device names the base it holds, any version it
//! likes: only a held version or one in the chain of recorded steps gets
//! a delta (at most one build each per round, remembered whether it won
//! or not), and the deltas held never pass `versions_kept` models' bytes.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use fedge_proto::msg::{DeltaRef, ModelRef, UploadBegin};
use fedge_proto::{Limits, ModelBlob, ModelVersion, RejectCode};

use super::sessions::DeviceKey;

struct StoredModel {
    blob: Bytes,
    mref: ModelRef,
}

/// An upload in progress; kept across reconnects so it can resume.
pub(super) struct Upload {
    pub begin: UploadBegin,
    pub data: Vec<u8>,
    pub next_index: u32,
}

/// What became of an upload chunk.
#[derive(Debug, PartialEq)]
pub(super) enum ChunkOutcome {
    /// Appended; the upload may now be complete.
    Stored,
    /// Already held (a resend after a resume): ignored.
    Duplicate,
    /// Ahead of the next expected chunk: the device is told where to resume.
    Ahead {
        next_index: u32,
    },
    /// The chunks do not add up to the declared size: the upload is dropped.
    Overflow {
        declared: u64,
    },
    /// The upload was cut short by a closed round, and this is the first
    /// chunk to arrive since (later ones are `Ignored`).
    RoundClosed,
    Ignored,
    /// No such upload is open.
    Unknown,
}

pub(super) struct TransferManager {
    chunk_bytes: u32,
    versions_kept: usize,
    models: HashMap<ModelVersion, StoredModel>,
    history: VecDeque<ModelVersion>,
    /// Downlink deltas to the current model, by delta id, and which base
    /// has one (None: the full model is smaller). Cleared each round.
    /// Only bases held or in `steps` are entered.
    deltas: HashMap<ModelVersion, StoredModel>,
    delta_for: HashMap<ModelVersion, Option<ModelVersion>>,
    /// Bytes of `deltas`.
    delta_bytes: u64,
    /// Deltas built (or estimated and not built) since the start.
    #[cfg(test)]
    delta_builds: u64,
    /// Compressed steps between the last versions (`[strategy] downlink`),
    /// oldest first, contiguous, at most `fedge_proto::delta::STEPS_MAX`:
    /// (before, after, payload). A device holding any `before` replays the
    /// chain to the current model, whether or not that model is still held.
    steps: VecDeque<(ModelVersion, ModelVersion, Bytes)>,
    uploads: HashMap<DeviceKey, Upload>,
    /// Bytes held in `uploads` buffers.
    upload_bytes: u64,
    /// Uploads cut short by a round closing: their next chunk is told
    /// `RoundClosed` once, later ones are dropped silently. Bounded by one
    /// round's selection.
    closed_uploads: HashMap<[u8; 32], bool>,
}

impl TransferManager {
    pub fn new(chunk_bytes: u32, versions_kept: usize) -> Self {
        TransferManager {
            chunk_bytes,
            versions_kept,
            models: HashMap::new(),
            history: VecDeque::new(),
            deltas: HashMap::new(),
            delta_for: HashMap::new(),
            delta_bytes: 0,
            #[cfg(test)]
            delta_builds: 0,
            steps: VecDeque::new(),
            uploads: HashMap::new(),
            upload_bytes: 0,
            closed_uploads: HashMap::new(),
        }
    }

    // ------------------------------------------------------------ downloads

    /// Keeps a published model for download, evicting the oldest beyond
    /// `versions_kept`.
    pub fn store_model(&mut self, version: ModelVersion, blob: Bytes) {
        if self.models.contains_key(&version) {
            // The same parameters again (a round of all-zero updates, or the
            // non-finite fallback): held once, now the newest, so the
            // current model is never the one evicted.
            self.history.retain(|v| *v != version);
            self.history.push_back(version);
            return;
        }
        let mref = ModelRef::new(version, blob.len() as u64, self.chunk_bytes);
        self.models.insert(version, StoredModel { blob, mref });
        self.history.push_back(version);
        while self.history.len() > self.versions_kept {
            let old = self.history.pop_front().expect("non-empty");
            self.models.remove(&old);
        }
    }

    /// A held model's encoded blob.
    pub fn model_blob(&self, version: &ModelVersion) -> Option<Bytes> {
        self.models.get(version).map(|m| m.blob.clone())
    }

    pub fn has_model(&self, version: &ModelVersion) -> bool {
        self.models.contains_key(version)
    }

    /// The download reference of a held model version.
    pub fn model_ref(&self, version: &ModelVersion) -> ModelRef {
        self.models[version].mref
    }

    /// A delta from `base` to `current` (whose version is
    /// `current_version`): the recorded compressed steps from `base`, or
    /// the lossless XOR delta when `base` is held; only when it is smaller
    /// than the full model.
    pub fn delta_ref(
        &mut self,
        base: ModelVersion,
        current_version: ModelVersion,
        current: &ModelBlob,
        limits: &Limits,
    ) -> Option<DeltaRef> {
        if base == current_version {
            return None;
        }
        if !self.delta_for.contains_key(&base) {
            // A version the device made up, or one long gone: nothing to
            // build, and nothing remembered (a device could fill the map).
            let in_steps = self.steps.iter().any(|(b, _, _)| *b == base);
            if !in_steps && !self.models.contains_key(&base) {
                return None;
            }
            let made = self.make_delta(base, current_version, current, limits);
            self.delta_for.insert(base, made);
        }
        let id = self.delta_for[&base]?;
        Some(DeltaRef {
            base,
            blob: self.deltas[&id].mref,
        })
    }

    /// The compressed step that published `after` from `before` (a gap in
    /// the chain, after a rollback, starts it afresh).
    /// At most `STEPS_MAX` steps and twice `model_bytes` in all are kept:
    /// a longer chain would never be chosen over the whole model.
    pub fn record_step(
        &mut self,
        before: ModelVersion,
        after: ModelVersion,
        payload: Bytes,
        model_bytes: u64,
    ) {
        if self.steps.back().is_some_and(|(_, a, _)| *a != before) {
            self.steps.clear();
        }
        self.steps.push_back((before, after, payload));
        let total = |s: &VecDeque<(ModelVersion, ModelVersion, Bytes)>| -> u64 {
            s.iter().map(|(_, _, p)| p.len() as u64).sum()
        };
        while self.steps.len() > fedge_proto::delta::STEPS_MAX
            || (self.steps.len() > 1 && total(&self.steps) > 2 * model_bytes)
        {
            self.steps.pop_front();
        }
    }

    /// The chain of recorded steps from `base` to `current`, if there is one.
    fn steps_from(&self, base: ModelVersion, current: ModelVersion) -> Option<Vec<Bytes>> {
        if self.steps.back()?.1 != current {
            return None;
        }
        let start = self.steps.iter().position(|(b, _, _)| *b == base)?;
        Some(
            self.steps
                .iter()
                .skip(start)
                .map(|(_, _, p)| p.clone())
                .collect(),
        )
    }

    /// Deltas built (or found not worth building) so far.
    #[cfg(test)]
    fn delta_builds(&self) -> u64 {
        self.delta_builds
    }

    /// The delta from `base` to the current model if it is smaller than
    /// the model and fits beside the deltas held (`versions_kept` models'
    /// bytes in all).
    fn make_delta(
        &mut self,
        base: ModelVersion,
        current_version: ModelVersion,
        current: &ModelBlob,
        limits: &Limits,
    ) -> Option<ModelVersion> {
        let full = self.models[&current_version].mref.model_bytes;
        let room = (self.versions_kept as u64)
            .saturating_mul(full)
            .saturating_sub(self.delta_bytes);
        let bytes_max = full.min(room);
        #[cfg(test)]
        {
            self.delta_builds += 1;
        }
        let bytes = match self.steps_from(base, current_version) {
            Some(steps) => fedge_proto::delta::encode_steps(
                base,
                current_version,
                current.params.values.len(),
                &steps,
            ),
            None => {
                let m = self.models.get(&base)?;
                let base_model = ModelBlob::decode(&m.blob, limits).ok()?;
                // Estimated first: a dense step's XOR is not worth
                // compressing whole.
                fedge_proto::delta::encode_smaller_than(&base_model, current, bytes_max)?
            }
        };
        if bytes.len() as u64 >= bytes_max {
            return None;
        }
        self.delta_bytes += bytes.len() as u64;
        let id = ModelVersion::of(&bytes);
        let mref = ModelRef::new(id, bytes.len() as u64, self.chunk_bytes);
        self.deltas.insert(
            id,
            StoredModel {
                blob: Bytes::from(bytes),
                mref,
            },
        );
        Some(id)
    }

    /// Chunk `index` of a held model or delta.
    pub fn chunk(&self, version: ModelVersion, index: u32) -> Result<Bytes, (RejectCode, String)> {
        let Some(m) = self
            .models
            .get(&version)
            .or_else(|| self.deltas.get(&version))
        else {
            return Err((
                RejectCode::UnknownModelVersion,
                format!("model version {version} is not held here"),
            ));
        };
        if index >= m.mref.chunk_count {
            return Err((
                RejectCode::Malformed,
                format!(
                    "chunk {index} out of range: model {version} has {} chunks",
                    m.mref.chunk_count
                ),
            ));
        }
        Ok(m.blob.slice(m.mref.chunk_range(index)))
    }

    // ------------------------------------------------------------ uploads

    /// Opens (or resumes) `key`'s upload for a checked manifest; returns the
    /// index of the next chunk the device must send. A new upload reserves
    /// its declared size against `budget` (bytes of uploads in flight, all
    /// devices together); when that would overflow it is not opened and the
    /// bytes already reserved by others come back as the error.
    pub fn begin_upload(
        &mut self,
        key: DeviceKey,
        b: UploadBegin,
        budget: u64,
    ) -> Result<u32, u64> {
        if let Some(u) = self.uploads.get(&key)
            && u.begin.manifest.payload_hash == b.manifest.payload_hash
            && u.begin.chunk_bytes == b.chunk_bytes
        {
            // Resume the same payload from where it stopped.
            return Ok(u.next_index);
        }
        let reserved_by_others: u64 = self
            .uploads
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, u)| u.begin.manifest.payload_bytes)
            .sum();
        if reserved_by_others.saturating_add(b.manifest.payload_bytes) > budget {
            return Err(reserved_by_others);
        }
        self.drop_upload(&key);
        self.uploads.insert(
            key,
            Upload {
                begin: b,
                data: Vec::new(),
                next_index: 0,
            },
        );
        Ok(0)
    }

    /// Chunk `index` of the upload with payload `hash` from `key`.
    pub fn add_chunk(
        &mut self,
        key: DeviceKey,
        hash: [u8; 32],
        index: u32,
        data: &[u8],
    ) -> ChunkOutcome {
        let Some(u) = self
            .uploads
            .get_mut(&key)
            .filter(|u| u.begin.manifest.payload_hash == hash)
        else {
            return match self.closed_uploads.get_mut(&hash) {
                Some(told) if *told => ChunkOutcome::Ignored,
                Some(told) => {
                    *told = true;
                    ChunkOutcome::RoundClosed
                }
                None => ChunkOutcome::Unknown,
            };
        };
        if index < u.next_index {
            return ChunkOutcome::Duplicate;
        }
        if index > u.next_index {
            return ChunkOutcome::Ahead {
                next_index: u.next_index,
            };
        }
        let declared = u.begin.manifest.payload_bytes;
        let total = u.data.len() as u64 + data.len() as u64;
        let is_last = total >= declared;
        if (data.len() as u64) != u64::from(u.begin.chunk_bytes) && !is_last || total > declared {
            self.drop_upload(&key);
            return ChunkOutcome::Overflow { declared };
        }
        u.data.extend_from_slice(data);
        u.next_index += 1;
        self.upload_bytes += data.len() as u64;
        ChunkOutcome::Stored
    }

    /// Takes `key`'s upload out if every declared byte has arrived.
    pub fn take_complete(&mut self, key: &DeviceKey) -> Option<Upload> {
        let u = self.uploads.get(key)?;
        if (u.data.len() as u64) < u.begin.manifest.payload_bytes {
            return None;
        }
        let u = self.uploads.remove(key)?;
        self.upload_bytes -= u.data.len() as u64;
        Some(u)
    }

    fn drop_upload(&mut self, key: &DeviceKey) {
        if let Some(u) = self.uploads.remove(key) {
            self.upload_bytes -= u.data.len() as u64;
        }
    }

    /// Bytes of partial uploads held in memory.
    pub fn upload_bytes_held(&self) -> u64 {
        self.upload_bytes
    }

    // ------------------------------------------------------------ rounds

    /// A round closed. Deltas to the old model go; uploads in flight for
    /// tasks of round `keep_from` or later carry over to the next round,
    /// the others are cut short (their memory freed), and each of those is
    /// told `RoundClosed` at its next chunk.
    pub fn on_round_closed(&mut self, keep_from: u64) {
        self.deltas.clear();
        self.delta_for.clear();
        self.delta_bytes = 0;
        self.closed_uploads.clear();
        let (closed, held) = (&mut self.closed_uploads, &mut self.upload_bytes);
        self.uploads.retain(|_, u| {
            let keep = u.begin.manifest.round_id >= keep_from;
            if !keep {
                *held -= u.data.len() as u64;
                closed.insert(u.begin.manifest.payload_hash, false);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_proto::sign::{SigningKey, UpdateManifest};

    fn begin(payload_bytes: u64, chunk_bytes: u32, hash: u8) -> UploadBegin {
        let key = SigningKey::from_bytes(&[7; 32]);
        UploadBegin {
            manifest: UpdateManifest {
                round_id: 1,
                model_version: ModelVersion([0; 32]),
                payload_hash: [hash; 32],
                payload_bytes,
                sample_count: 1,
                metrics: vec![],
                device_public_key: key.verifying_key(),
                federation_id: [0; 32],
                partial: None,
            },
            signature: [0; 64],
            chunk_bytes,
        }
    }

    fn blob(values: Vec<f32>) -> (ModelVersion, ModelBlob, Bytes) {
        let layout =
            fedge_proto::ParamLayout::new(vec![fedge_proto::TensorSpec::new("w", &[values.len()])]);
        let m = ModelBlob {
            onnx_graph: Bytes::new(),
            params: fedge_proto::Params::new(std::sync::Arc::new(layout.unwrap()), values).unwrap(),
        };
        let b = m.encode();
        (ModelVersion::of(&b), m, b)
    }

    /// A device names whatever base it likes: a made-up or evicted
    /// version gets no delta, builds nothing and is not remembered; a held
    /// one is built once a round, however often it is asked for.
    #[test]
    fn only_held_bases_are_built_once_a_round() {
        let limits = Limits::default();
        let mut t = TransferManager::new(1 << 10, 2);
        let models: Vec<_> = (0..3)
            .map(|k| blob((0..4096).map(|i| (i % 7) as f32 + k as f32 * 0.5).collect()))
            .collect();
        for (v, _, b) in &models {
            t.store_model(*v, b.clone());
        }
        let (current_v, current, _) = &models[2];
        for k in 0..1000u32 {
            let mut made_up = [0u8; 32];
            made_up[..4].copy_from_slice(&k.to_le_bytes());
            let base = ModelVersion(made_up);
            assert!(t.delta_ref(base, *current_v, current, &limits).is_none());
        }
        // Evicted (versions_kept = 2).
        assert!(
            t.delta_ref(models[0].0, *current_v, current, &limits)
                .is_none()
        );
        assert_eq!((t.delta_for.len(), t.delta_builds()), (0, 0));
        for _ in 0..5 {
            let d = t
                .delta_ref(models[1].0, *current_v, current, &limits)
                .unwrap();
            assert_eq!(d.base, models[1].0);
        }
        assert_eq!((t.delta_for.len(), t.delta_builds()), (1, 1));
        t.on_round_closed(1);
        assert!(
            t.delta_ref(models[1].0, *current_v, current, &limits)
                .is_some()
        );
        assert_eq!(t.delta_builds(), 2, "built again for the next round");
    }

    /// Every version of a long chain of small steps asked for: the deltas
    /// held stay within `versions_kept` models' bytes; past that a device
    /// gets the whole model.
    #[test]
    fn deltas_held_stay_within_versions_kept_models() {
        let limits = Limits::default();
        let kept = 2;
        let mut t = TransferManager::new(1 << 10, kept);
        let (current_v, current, b) = blob((0..4096).map(|i| i as f32).collect());
        t.store_model(current_v, b.clone());
        let full = b.len() as u64;
        let chain: Vec<ModelVersion> = (0..=12u8).map(|k| ModelVersion([k + 1; 32])).collect();
        for w in chain.windows(2) {
            t.record_step(w[0], w[1], Bytes::from(vec![0u8; full as usize / 8]), full);
        }
        t.record_step(
            chain[12],
            current_v,
            Bytes::from(vec![0u8; full as usize / 8]),
            full,
        );
        let mut served = 0;
        for base in &chain {
            if let Some(d) = t.delta_ref(*base, current_v, &current, &limits) {
                assert!(d.blob.model_bytes < full);
                served += 1;
            }
        }
        assert!(
            t.delta_bytes <= kept as u64 * full,
            "{} > {kept} x {full}",
            t.delta_bytes
        );
        let held: u64 = t.deltas.values().map(|d| d.blob.len() as u64).sum();
        assert_eq!(held, t.delta_bytes);
        assert!(
            served >= 2,
            "the first bases asked for are served ({served})"
        );
        assert!(t.delta_builds() <= chain.len() as u64);
    }

    /// Uploads for tasks older than `keep_from` are cut at a round's close
    /// (FedBuff's staleness window), the rest carry on with their bytes.
    #[test]
    fn uploads_outside_the_window_expire() {
        let mut t = TransferManager::new(64, 2);
        let mut old = begin(10, 4, 1);
        old.manifest.round_id = 3;
        let mut recent = begin(10, 4, 2);
        recent.manifest.round_id = 5;
        let (a, b) = ([1; 32], [2; 32]);
        t.begin_upload(a, old, u64::MAX).unwrap();
        t.begin_upload(b, recent, u64::MAX).unwrap();
        assert_eq!(t.add_chunk(a, [1; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        assert_eq!(t.add_chunk(b, [2; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        t.on_round_closed(4);
        assert_eq!(t.upload_bytes_held(), 4, "only the recent upload is held");
        assert_eq!(
            t.add_chunk(a, [1; 32], 1, &[0; 4]),
            ChunkOutcome::RoundClosed
        );
        assert_eq!(t.add_chunk(b, [2; 32], 1, &[0; 4]), ChunkOutcome::Stored);
    }

    /// A version published again (a round that changed nothing) is held
    /// once and stays the newest: the current model is never evicted.
    #[test]
    fn republished_versions_are_not_evicted() {
        let mut t = TransferManager::new(64, 2);
        let (a, b) = (ModelVersion([1; 32]), ModelVersion([2; 32]));
        t.store_model(a, Bytes::from_static(b"a"));
        t.store_model(b, Bytes::from_static(b"b"));
        for _ in 0..5 {
            t.store_model(b, Bytes::from_static(b"b"));
            assert!(t.has_model(&b));
            assert_eq!(t.chunk(b, 0).unwrap(), Bytes::from_static(b"b"));
        }
        assert!(
            t.has_model(&a),
            "the older version is still within versions_kept"
        );
        t.store_model(ModelVersion([3; 32]), Bytes::from_static(b"c"));
        assert!(!t.has_model(&a) && t.has_model(&b));
    }

    /// Every byte of a partial upload is counted while held and released
    /// when the upload completes, is replaced, overflows or is cut short.
    #[test]
    fn upload_bytes_are_accounted_for() {
        let mut t = TransferManager::new(64, 2);
        let (a, b) = ([1; 32], [2; 32]);
        assert_eq!(t.begin_upload(a, begin(10, 4, 1), u64::MAX), Ok(0));
        assert_eq!(t.add_chunk(a, [1; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        assert_eq!(t.add_chunk(a, [1; 32], 0, &[0; 4]), ChunkOutcome::Duplicate);
        assert_eq!(
            t.add_chunk(a, [1; 32], 3, &[0; 4]),
            ChunkOutcome::Ahead { next_index: 1 }
        );
        assert_eq!(t.upload_bytes_held(), 4);
        // Resuming the same payload keeps what arrived.
        assert_eq!(t.begin_upload(a, begin(10, 4, 1), u64::MAX), Ok(1));
        assert_eq!(t.begin_upload(b, begin(8, 4, 2), u64::MAX), Ok(0));
        assert_eq!(t.add_chunk(b, [2; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        assert_eq!(t.upload_bytes_held(), 8);
        // A different payload replaces the old upload.
        assert_eq!(t.begin_upload(a, begin(10, 4, 3), u64::MAX), Ok(0));
        assert_eq!(t.upload_bytes_held(), 4);
        // Chunks that overshoot the declared size drop the upload.
        assert_eq!(
            t.add_chunk(b, [2; 32], 1, &[0; 5]),
            ChunkOutcome::Overflow { declared: 8 }
        );
        assert_eq!(t.upload_bytes_held(), 0);
        assert_eq!(t.add_chunk(a, [3; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        assert!(t.take_complete(&a).is_none());
        // A closed round cuts uploads short: told once, then ignored.
        t.on_round_closed(2);
        assert_eq!(t.upload_bytes_held(), 0);
        assert_eq!(
            t.add_chunk(a, [3; 32], 1, &[0; 4]),
            ChunkOutcome::RoundClosed
        );
        assert_eq!(t.add_chunk(a, [3; 32], 2, &[0; 2]), ChunkOutcome::Ignored);
        assert_eq!(t.add_chunk(a, [9; 32], 0, &[0; 2]), ChunkOutcome::Unknown);
        // A complete upload leaves nothing behind.
        assert_eq!(t.begin_upload(b, begin(6, 4, 4), u64::MAX), Ok(0));
        assert_eq!(t.add_chunk(b, [4; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        assert_eq!(t.add_chunk(b, [4; 32], 1, &[0; 2]), ChunkOutcome::Stored);
        assert_eq!(t.take_complete(&b).map(|u| u.data.len()), Some(6));
        assert_eq!(t.upload_bytes_held(), 0);
    }

    /// Uploads in flight reserve their declared size: one that would take
    /// the total past the budget is not opened (the device is paced away),
    /// and a finished, replaced or expired upload gives its bytes back.
    #[test]
    fn uploads_in_flight_stay_within_the_byte_budget() {
        let mut t = TransferManager::new(64, 2);
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        assert_eq!(t.begin_upload(a, begin(10, 4, 1), 16), Ok(0));
        assert_eq!(t.begin_upload(b, begin(8, 4, 2), 16), Err(10));
        // Nothing was opened for `b`: its chunks are unknown.
        assert_eq!(t.add_chunk(b, [2; 32], 0, &[0; 4]), ChunkOutcome::Unknown);
        assert_eq!(t.begin_upload(c, begin(6, 4, 3), 16), Ok(0));
        // `a` resumes its own upload whatever the others hold, and may
        // replace it by one that fits beside them.
        assert_eq!(t.begin_upload(a, begin(10, 4, 1), 16), Ok(0));
        assert_eq!(t.begin_upload(a, begin(11, 4, 4), 16), Err(6));
        assert_eq!(t.begin_upload(a, begin(10, 4, 5), 16), Ok(0));
        // `c` completes: its bytes go back, and `b` fits.
        assert_eq!(t.add_chunk(c, [3; 32], 0, &[0; 4]), ChunkOutcome::Stored);
        assert_eq!(t.add_chunk(c, [3; 32], 1, &[0; 2]), ChunkOutcome::Stored);
        assert!(t.take_complete(&c).is_some());
        assert_eq!(t.begin_upload(b, begin(6, 4, 2), 16), Ok(0));
        // A closed round frees what it cut short.
        t.on_round_closed(2);
        assert_eq!(t.begin_upload(c, begin(16, 4, 6), 16), Ok(0));
    }
}
