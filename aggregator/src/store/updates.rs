//! Accepted updates made durable in groups (group commit). A group's
//! payloads are written to `updates/<round>/<payload hash>.bin` and
//! fsynced several at once, each directory is fsynced once, and then
//! the group's rows are committed in one transaction: one database sync
//! (SQLite `synchronous = FULL`, PostgreSQL `synchronous_commit = on`)
//! and one directory sync for the whole group instead of one each per
//! update. The driver acknowledges an update only once its whole group
//! returned (see `server::commit`). Nothing is written once the store's
//! database lock is lost, and the transaction is fenced (see
//! `store::lock`): it commits only while the database is this store's.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use sqlx::AnyPool;

use super::{StoreError, now_ms, update_path};
use crate::coordinator::DurableUpdate;

/// Payload files written and fsynced at once, at most.
const PAYLOAD_WRITERS_MAX: usize = 8;

/// A handle that makes accepted updates durable, apart from the
/// [`super::Store`] (the server's committer runs beside the coordinator's
/// task). Cloning it is cheap: it shares the store's pool.
#[derive(Clone)]
pub struct UpdateWriter {
    pub(super) dir: PathBuf,
    pub(super) pool: AnyPool,
    pub(super) label: String,
    pub(super) fence: std::sync::Arc<super::lock::Fence>,
}

impl UpdateWriter {
    fn db_err(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        |source| StoreError::Db {
            db: self.label.clone(),
            source,
        }
    }

    /// Make a group of accepted updates durable: every payload fsynced
    /// (and its directory), then every row in one transaction. On an
    /// error nothing may be acknowledged: some payload files may be there,
    /// but no row names them (a restart puts back only rows).
    pub async fn persist_group(&self, group: &[DurableUpdate]) -> Result<(), StoreError> {
        if group.is_empty() {
            return Ok(());
        }
        self.fence.check()?;
        // Two devices may send the same bytes in one round (a copy): one
        // file, written once.
        let mut seen = BTreeSet::new();
        let files: Vec<(PathBuf, bytes::Bytes)> = group
            .iter()
            .map(|u| (update_path(&self.dir, u.round_id, &u.payload_hash), u))
            .filter(|(p, _)| seen.insert(p.clone()))
            .map(|(p, u)| (p, u.payload.clone()))
            .collect();
        tokio::task::spawn_blocking(move || write_payloads(&files))
            .await
            .map_err(|e| StoreError::Io {
                path: PathBuf::from("updates"),
                source: std::io::Error::other(e.to_string()),
            })??;
        let mut tx = self.fence.begin(&self.pool).await?;
        for u in group {
            insert_row(u)
                .execute(&mut *tx)
                .await
                .map_err(self.db_err())?;
        }
        tx.commit().await.map_err(self.db_err())?;
        Ok(())
    }
}

fn insert_row(
    u: &DurableUpdate,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments<'static>> {
    let metrics = serde_json::to_string(&u.metrics).expect("serialisable");
    sqlx::query(
        "INSERT INTO updates (round_id, device, payload_hash, samples, raw_weight, stake, metrics, received_ms,
                              task_round, model_version, discount, manifest_hash, signed_manifest)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (round_id, device) DO NOTHING",
    )
    .bind(u.round_id as i64)
    .bind(u.device.clone())
    .bind(hex::encode(u.payload_hash))
    .bind(u.sample_count as i64)
    .bind(u.raw_weight)
    .bind(u.stake)
    .bind(metrics)
    .bind(now_ms())
    .bind(u.task_round as i64)
    .bind(u.model_version.map(|v| v.to_hex()))
    .bind(u.discount)
    .bind(hex::encode(u.manifest_hash))
    .bind((!u.signed_manifest.is_empty()).then(|| hex::encode(&u.signed_manifest)))
}

/// Writes each file through a temporary beside it (written, fsynced,
/// renamed), up to [`PAYLOAD_WRITERS_MAX`] at once, then fsyncs each
/// directory once.
fn write_payloads(files: &[(PathBuf, bytes::Bytes)]) -> Result<(), StoreError> {
    let dirs: BTreeSet<&Path> = files.iter().filter_map(|(p, _)| p.parent()).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|source| StoreError::Io {
            path: d.to_path_buf(),
            source,
        })?;
    }
    let per = files.len().div_ceil(PAYLOAD_WRITERS_MAX).max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = files
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .try_for_each(|(path, data)| write_synced(path, data))
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("payload writer panicked"))
    })?;
    for d in dirs {
        let synced = std::fs::File::open(d).and_then(|f| f.sync_all());
        synced.map_err(|source| StoreError::Io {
            path: d.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// `path`'s content, fsynced, put in place by a rename (its directory is
/// fsynced by the caller).
fn write_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("bin.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}
