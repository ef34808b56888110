//! Durable aggregator state on disk: content-addressed model blobs
//! (`models/<version>.fedge`) and a small resume point (`state.json`:
//! next round id, rounds published, current version), each written
//! atomically.

use std::path::{Path, PathBuf};

use fedge_proto::{Limits, ModelBlob, ModelVersion};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub next_round_id: u64,
    pub published_rounds: u64,
    pub current_version: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub struct Store {
    dir: PathBuf,
    resume: ResumePoint,
}

impl Store {
    /// Open (or create) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir.join("models")).map_err(io(dir))?;
        let state = dir.join("state.json");
        let resume = match std::fs::read(&state) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: state.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ResumePoint {
                next_round_id: 1,
                ..ResumePoint::default()
            },
            Err(e) => return Err(io(&state)(e)),
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            resume,
        })
    }

    pub fn resume_point(&self) -> ResumePoint {
        self.resume.clone()
    }

    pub fn model_path(&self, v: &ModelVersion) -> PathBuf {
        self.dir
            .join("models")
            .join(format!("{}.fedge", v.to_hex()))
    }

    /// The current model, if a previous run published one.
    pub fn current_model(&self, limits: &Limits) -> Result<Option<ModelBlob>, StoreError> {
        let Some(hex) = &self.resume.current_version else {
            return Ok(None);
        };
        let path = self.dir.join("models").join(format!("{hex}.fedge"));
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let blob = ModelBlob::decode(&bytes, limits).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if blob.version().to_hex() != *hex {
            return Err(StoreError::Corrupt {
                path,
                reason: "content does not match its version".into(),
            });
        }
        Ok(Some(blob))
    }

    /// Append a contribution record to `contributions.jsonl`.
    pub fn record_contribution(
        &mut self,
        c: &crate::coordinator::Contribution,
    ) -> Result<(), StoreError> {
        use std::io::Write;
        let path = self.dir.join("contributions.jsonl");
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut line = serde_json::to_vec(c).expect("serialisable");
        line.push(b'\n');
        f.write_all(&line).map_err(io)
    }

    /// Record a published model: blob first, then the resume point.
    pub fn publish(
        &mut self,
        round_id: u64,
        v: ModelVersion,
        blob: &[u8],
    ) -> Result<(), StoreError> {
        let path = self.model_path(&v);
        fedge_proto::io::write_atomic(&path, blob, None).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        self.resume = ResumePoint {
            next_round_id: round_id + 1,
            published_rounds: self.resume.published_rounds + 1,
            current_version: Some(v.to_hex()),
        };
        let state = self.dir.join("state.json");
        let json = serde_json::to_vec_pretty(&self.resume).expect("serialisable");
        fedge_proto::io::write_atomic(&state, &json, None).map_err(|source| StoreError::Io {
            path: state,
            source,
        })
    }
}
