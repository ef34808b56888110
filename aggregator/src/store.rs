//! Durable aggregator state: tables in SQLite (the default,
//! `aggregator.db` in the state directory) or PostgreSQL, both through
//! sqlx's `Any` driver with the same SQL (the few dialect differences and
//! the schema are in [`db`]), plus content-addressed blobs on disk in the
//! state directory whichever the database:
//!
//! - `models/<version>.fedge`: every published model (and, with scoring
//!   on, the initial one);
//! - `updates/<round>/<payload hash>.bin`: accepted update payloads of
//!   rounds not yet published, so a restarted aggregator resumes the round
//!   with every update it acknowledged (with scoring on, kept after
//!   publication too: what a verifier recomputes scores from);
//! - tables `state` (resume point), `model_versions`, `updates`,
//!   `contributions`, `ledger` (one signed record per published version,
//!   see [`crate::ledger`]) and `ratings` (each device's score average);
//! - `evidence/<payload hash>.bin`: the payloads of signed updates refused
//!   as not finite or over the norm bound, which ledger records name as
//!   penalties;
//! - `ledger.key` / `ledger.pub`: the aggregator's ledger key.
//!
//! **Invariant:** an update is acknowledged only after the group it was
//! written with ([`UpdateWriter::persist_group`]; [`Store::persist_update`]
//! is a group of one) returned: its payload is fsynced and its row
//! committed (SQLite with `synchronous = FULL`, PostgreSQL with
//! `synchronous_commit = on`, set on every connection).
//!
//! **Invariant:** a published version, its ledger record and the ratings
//! it moves are committed in one transaction ([`Store::publish`]): after a
//! crash either all are there or none, and the chain has no gap.

use std::path::{Path, PathBuf};

use fedge_proto::{Limits, ModelBlob, ModelVersion};
use sqlx::Row;

use crate::coordinator::{Contribution, DurableUpdate, Settlement};
use crate::ledger::{LedgerKey, StoredRecord};

mod db;
mod ledger;
mod lock;
mod penalties;
mod updates;
use db::Db;
pub use db::{DATABASE_FORMS, Database, SCHEMA_VERSION, testing};
pub use ledger::LedgerView;
use ledger::{ledger_rows, rating_rows};
pub use lock::{
    ADVISORY_KEY, LOCK_ANSWER_WAIT, LOCK_CHECK, LOCK_CHECK_MAX, LOCK_CHECK_MIN, LOCK_FILE,
    LockWatch, PG_LOCK_WAIT, check_lock_interval,
};
pub use updates::UpdateWriter;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    #[error("database {db} is corrupt: {reason}")]
    CorruptRow { db: String, reason: String },
    #[error("database {db}: {source}")]
    Db { db: String, source: sqlx::Error },
    #[error("database URL `{url}` is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot connect to database {db}: {source} (is the server running at that address, \
         and does the database exist?)"
    )]
    Connect { db: String, source: sqlx::Error },
    #[error(
        "database {db} has schema version {found}; this aggregator reads version {supported} \
         (was it written by a newer fedge, or by something else?)"
    )]
    SchemaVersion {
        db: String,
        found: String,
        supported: u32,
    },
    #[error(
        "database {db} belongs to another state directory: its ledger key is not the one in \
         {dir} (pair each state directory with its own database)"
    )]
    ForeignDatabase { db: String, dir: PathBuf },
    #[error(
        "state directory {dir} is in use by another aggregator: {lock} is locked by {holder} \
         (stop that aggregator first, or give this one a state directory of its own)",
        dir = dir.display(),
        lock = lock.display()
    )]
    StateDirInUse {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error(
        "database {db} is in use by another aggregator: its advisory lock {key:#x} is held by \
         {holder} (stop that aggregator first, or give this one a database of its own)"
    )]
    DatabaseInUse {
        db: String,
        key: i64,
        holder: String,
    },
    #[error(
        "lost the lock on database {db} (advisory lock {key:#x}): {reason}; this aggregator \
         writes nothing more and stops (its acknowledged updates are durable). Start it again: \
         it resumes from the database, or is refused while another aggregator holds it"
    )]
    DatabaseLockLost {
        db: String,
        key: i64,
        reason: String,
    },
    #[error(transparent)]
    LedgerKey(#[from] crate::ledger::LedgerKeyError),
    #[error("ledger: {0}")]
    Ledger(String),
}

/// A device's rating: the exponential moving average of its scores over
/// the rounds it took part in (a flagged round counts below 0: see [`crate::scoring::rating_inputs`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rating {
    pub device: String,
    pub rating: f64,
    pub rounds: u64,
    pub last_round: u64,
}

/// The model a state directory's aggregator published last (its resume
/// point), read without changing anything: no table is created and no
/// key is made, so it is safe on a directory a running aggregator uses.
/// `None` when nothing was published yet.
pub async fn published_model(
    dir: &Path,
    database: &Database,
    limits: &Limits,
) -> Result<Option<ModelBlob>, StoreError> {
    let db = ledger::open_read_only(dir, database).await?;
    let hex = db.state_value("current_version").await;
    db.pool.close().await;
    match hex? {
        None => Ok(None),
        Some(hex) => read_model(dir, &hex, limits).map(Some),
    }
}

/// `models/<hex>.fedge` of a state directory, checked against its version.
fn read_model(dir: &Path, hex: &str, limits: &Limits) -> Result<ModelBlob, StoreError> {
    let path = dir.join("models").join(format!("{hex}.fedge"));
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
    Ok(blob)
}

/// `updates/<round>/<payload hash>.bin` of a state directory.
fn update_path(dir: &Path, round_id: u64, payload_hash: &[u8; 32]) -> PathBuf {
    dir.join("updates")
        .join(round_id.to_string())
        .join(format!("{}.bin", hex::encode(payload_hash)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct Store {
    dir: PathBuf,
    db: Db,
    /// This store's hold on its state directory and database (one
    /// aggregator each; see [`lock`]).
    lock: lock::StateLock,
    /// What every write checks first: that the database is still this
    /// store's ([`lock::Fence`]).
    fence: std::sync::Arc<lock::Fence>,
    resume: ResumePoint,
    ledger_key: LedgerKey,
    /// The last ledger record's sequence number and hash.
    ledger_tip: (u64, [u8; 32]),
    /// The settlement of a round about to publish ([`Store::stage_settlement`]).
    staged: Option<Settlement>,
    /// Keep accepted update payloads after their round publishes (the
    /// evidence a verifier recomputes scores from).
    keep_payloads: bool,
}

impl Store {
    /// Open (or create) the state directory and its SQLite database.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, &Database::Sqlite).await
    }

    /// Open (or create) the state directory, and its tables in `database`
    /// (created there on first use; a database of a newer schema is
    /// refused, as is one another state directory's ledger key signed).
    /// The store holds the directory and the database for as long as it
    /// lives: while it does, another store of either is refused
    /// ([`StoreError::StateDirInUse`], [`StoreError::DatabaseInUse`]).
    pub async fn open_with(dir: &Path, database: &Database) -> Result<Self, StoreError> {
        let postgres = match database {
            Database::Sqlite => None,
            Database::Postgres(url) => Some((url.as_str(), database.label(dir))),
        };
        let mut lock = lock::StateLock::acquire(
            dir,
            postgres.as_ref().map(|(u, l)| (*u, l.as_str())),
            database.label(dir),
        )
        .await?;
        for sub in ["models", "updates", "evidence"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|source| StoreError::Io {
                path: dir.join(sub),
                source,
            })?;
        }
        let db = db::connect(database, dir, false).await?;
        db.migrate().await?;
        let fence = lock.claim(&db.pool).await?;
        let ledger_key = LedgerKey::load_or_create(dir)?;
        let key_hex = hex::encode(ledger_key.public().to_bytes());
        match db.state_value("ledger_key").await? {
            Some(k) if k != key_hex => {
                return Err(StoreError::ForeignDatabase {
                    db: db.label.clone(),
                    dir: dir.to_path_buf(),
                });
            }
            Some(_) => {}
            None => {
                let mut tx = fence.begin(&db.pool).await?;
                sqlx::query("INSERT INTO state (key, value) VALUES ('ledger_key', $1)")
                    .bind(&key_hex)
                    .execute(&mut *tx)
                    .await
                    .map_err(db.err())?;
                tx.commit().await.map_err(db.err())?;
            }
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            db,
            lock,
            fence,
            resume: ResumePoint::default(),
            ledger_key,
            ledger_tip: (0, [0; 32]),
            staged: None,
            keep_payloads: false,
        };
        store.resume = store.read_resume().await?;
        if let Some(last) = store.ledger_records().await?.pop() {
            let bytes = last.bytes;
            store.ledger_tip = (last.seq, fedge_proto::ledger::record_hash(&bytes));
        }
        Ok(store)
    }

    /// Closes the database and releases the state directory and the
    /// database at once (dropping a store releases them too, the
    /// database's lock once its server sees the connection close).
    pub async fn close(self) {
        self.db.pool.close().await;
        self.lock.release().await;
    }

    /// Watches the database lock every `every` (`server.lock_check_ms`):
    /// the watch resolves once it is lost, and from then on every write
    /// fails with [`StoreError::DatabaseLockLost`] (see [`lock`]). For
    /// SQLite, a watch that never resolves.
    pub fn watch_lock(&mut self, every: std::time::Duration) -> LockWatch {
        self.lock.watch(every)
    }

    fn db(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        self.db.err()
    }

    /// A transaction to write in, while the database is this store's.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        self.fence.begin(&self.db.pool).await
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::CorruptRow {
            db: self.db.label.clone(),
            reason,
        }
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.db.state_value(key).await
    }

    async fn read_resume(&self) -> Result<ResumePoint, StoreError> {
        let num = |v: Option<String>, default: u64| -> Result<u64, StoreError> {
            match v {
                None => Ok(default),
                Some(s) => s
                    .parse()
                    .map_err(|_| self.corrupt(format!("state value `{s}` is not a number"))),
            }
        };
        Ok(ResumePoint {
            next_round_id: num(self.get("next_round_id").await?, 1)?,
            published_rounds: num(self.get("published_rounds").await?, 0)?,
            current_version: self.get("current_version").await?,
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
        match &self.resume.current_version {
            None => Ok(None),
            Some(hex) => read_model(&self.dir, hex, limits).map(Some),
        }
    }

    /// A kept update payload of `round_id`, checked against its hash.
    pub fn read_update_payload(
        &self,
        round_id: u64,
        payload_hash: &[u8; 32],
    ) -> Result<Vec<u8>, StoreError> {
        let path = self.update_path(round_id, payload_hash);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        if blake3::hash(&bytes).as_bytes() != payload_hash {
            return Err(StoreError::Corrupt {
                path,
                reason: "payload does not match its hash".into(),
            });
        }
        Ok(bytes)
    }

    fn update_path(&self, round_id: u64, payload_hash: &[u8; 32]) -> PathBuf {
        update_path(&self.dir, round_id, payload_hash)
    }

    /// Make an accepted update durable: payload fsynced, then its row
    /// (a group of one: see [`UpdateWriter::persist_group`]).
    pub async fn persist_update(&self, u: &DurableUpdate) -> Result<(), StoreError> {
        self.update_writer()
            .persist_group(std::slice::from_ref(u))
            .await
    }

    /// A handle that makes accepted updates durable in groups, usable
    /// beside this store (it shares the store's pool and directory).
    pub fn update_writer(&self) -> UpdateWriter {
        UpdateWriter {
            dir: self.dir.clone(),
            pool: self.db.pool.clone(),
            label: self.db.label.clone(),
            fence: std::sync::Arc::clone(&self.fence),
        }
    }

    /// Accepted updates of `round_id` (a round open when the aggregator stopped).
    pub async fn round_updates(&self, round_id: u64) -> Result<Vec<DurableUpdate>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, payload_hash, samples, raw_weight, stake, metrics,
                    task_round, model_version, discount, manifest_hash, signed_manifest FROM updates
             WHERE round_id = $1 ORDER BY received_ms, device",
        )
        .bind(round_id as i64)
        .fetch_all(&self.db.pool)
        .await
        .map_err(self.db())?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let hash_hex: String = r.get(1);
            let corrupt = |reason: String| self.corrupt(reason);
            let payload_hash: [u8; 32] = hex::decode(&hash_hex)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| corrupt(format!("bad payload hash `{hash_hex}`")))?;
            let payload = self.read_update_payload(round_id, &payload_hash)?;
            let metrics: Vec<(String, f64)> =
                serde_json::from_str(&r.get::<String, _>(5)).map_err(|e| corrupt(e.to_string()))?;
            let model_version = match r.get::<Option<String>, _>(7) {
                None => None,
                Some(h) => Some(
                    ModelVersion::from_hex(&h)
                        .ok_or_else(|| corrupt(format!("bad model version `{h}`")))?,
                ),
            };
            let manifest_hash = match r.get::<Option<String>, _>(9) {
                None => [0; 32],
                Some(h) => hex::decode(&h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| corrupt(format!("bad manifest hash `{h}`")))?,
            };
            let signed_manifest = match r.get::<Option<String>, _>(10) {
                None => Vec::new(),
                Some(h) => {
                    hex::decode(&h).map_err(|e| corrupt(format!("bad signed manifest: {e}")))?
                }
            };
            out.push(DurableUpdate {
                round_id,
                manifest_hash,
                signed_manifest: signed_manifest.into(),
                // Rows from before these columns: a fresh update of the round.
                task_round: r.get::<Option<i64>, _>(6).map_or(round_id, |t| t as u64),
                model_version,
                device: r.get(0),
                payload_hash,
                sample_count: r.get::<i64, _>(2) as u64,
                raw_weight: r.get(3),
                discount: r.get::<Option<f64>, _>(8).unwrap_or(1.0),
                stake: r.get(4),
                metrics,
                payload: payload.into(),
            });
        }
        Ok(out)
    }

    /// Record a contribution. One written as its round closes
    /// ([`Contribution::settles`]) first removes the device's accepted
    /// record of that round from an earlier closing, in one transaction:
    /// a device counts once a round however often the round closes.
    pub async fn record_contribution(&self, c: &Contribution) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        if c.settles {
            sqlx::query(
                "DELETE FROM contributions WHERE round_id = $1 AND device = $2 AND accepted = 1",
            )
            .bind(c.round_id as i64)
            .bind(&c.device)
            .execute(&mut *tx)
            .await
            .map_err(self.db())?;
        }
        sqlx::query(
            "INSERT INTO contributions (round_id, device, stake, samples, raw_weight, share, accepted, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(c.round_id as i64)
        .bind(&c.device)
        .bind(c.stake)
        .bind(c.samples as i64)
        .bind(c.raw_weight)
        .bind(c.share)
        .bind(i64::from(c.accepted))
        .bind(&c.reason)
        .execute(&mut *tx)
        .await
        .map_err(self.db())?;
        tx.commit().await.map_err(self.db())?;
        Ok(())
    }

    /// Contribution records of a round, in insertion order.
    pub async fn contributions(&self, round_id: u64) -> Result<Vec<Contribution>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT device, stake, samples, raw_weight, share, accepted, reason FROM contributions
             WHERE round_id = $1 ORDER BY {}",
            self.db.dialect.insertion_order()
        ))
        .bind(round_id as i64)
        .fetch_all(&self.db.pool)
        .await
        .map_err(self.db())?;
        Ok(rows
            .into_iter()
            .map(|r| Contribution {
                round_id,
                device: r.get(0),
                stake: r.get(1),
                samples: r.get::<i64, _>(2) as u64,
                raw_weight: r.get(3),
                share: r.get(4),
                accepted: r.get::<i64, _>(5) != 0,
                reason: r.get(6),
                settles: false,
            })
            .collect())
    }

    /// Keep accepted update payloads (`updates/<round>/<hash>.bin`) after
    /// their round publishes, for `ledger verify --validation` to recompute
    /// the scores; otherwise they are deleted then.
    pub fn keep_update_payloads(&mut self, keep: bool) {
        self.keep_payloads = keep;
    }

    /// Keep `model` under `models/<version>.fedge` (fsynced) if it is not
    /// there: the initial model, which a verifier needs to recompute the
    /// first round's scores.
    pub fn keep_model(&self, model: &ModelBlob) -> Result<(), StoreError> {
        let blob = model.encode();
        let path = self.model_path(&ModelVersion::of(&blob));
        if path.exists() {
            return Ok(());
        }
        fedge_proto::io::write_atomic(&path, &blob, None).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })
    }

    /// Hold the settlement of the round about to publish: [`Store::publish`]
    /// writes its ledger record with the version.
    pub fn stage_settlement(&mut self, s: Settlement) {
        self.staged = Some(s);
    }

    /// The public half of the ledger key.
    pub fn ledger_public_key(&self) -> fedge_proto::sign::VerifyingKey {
        self.ledger_key.public()
    }

    /// Every ledger record, oldest first.
    pub async fn ledger_records(&self) -> Result<Vec<StoredRecord>, StoreError> {
        ledger_rows(&self.db).await
    }

    /// Every device's rating, best first.
    pub async fn ratings(&self) -> Result<Vec<Rating>, StoreError> {
        rating_rows(&self.db).await
    }

    /// Record a published model: blob fsynced first, then one transaction
    /// with its row, the new resume point, and, when the round's
    /// settlement was staged, its signed ledger record and the ratings it
    /// moves; the round's update payloads are no longer needed.
    pub async fn publish(
        &mut self,
        round_id: u64,
        v: ModelVersion,
        blob: &[u8],
    ) -> Result<(), StoreError> {
        self.fence.check()?;
        let settlement = self.staged.take().filter(|s| s.round_id == round_id);
        let record = match &settlement {
            Some(s) => {
                let (seq, prev) = self.ledger_tip;
                let r =
                    crate::ledger::build_record(seq + 1, prev, s, v).map_err(StoreError::Ledger)?;
                let bytes = r.encode();
                let hash = fedge_proto::ledger::record_hash(&bytes);
                Some((r.seq, bytes, self.ledger_key.sign(&hash), hash))
            }
            None => None,
        };
        // The evidence of each penalty the record names, durable first (a
        // copy's evidence is its payload, kept with the round's updates).
        for p in settlement
            .iter()
            .flat_map(|s| &s.penalties)
            .filter(|p| !p.payload.is_empty())
        {
            let path = self
                .dir
                .join("evidence")
                .join(format!("{}.bin", hex::encode(p.payload_hash)));
            fedge_proto::io::write_atomic(&path, &p.payload, None).map_err(|source| {
                StoreError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        let path = self.model_path(&v);
        fedge_proto::io::write_atomic(&path, blob, None).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let next = ResumePoint {
            next_round_id: round_id + 1,
            published_rounds: self.resume.published_rounds + 1,
            current_version: Some(v.to_hex()),
        };
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO model_versions (version, round_id, bytes, created_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(v.to_hex())
        .bind(round_id as i64)
        .bind(blob.len() as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(self.db())?;
        for (k, val) in [
            ("next_round_id", next.next_round_id.to_string()),
            ("published_rounds", next.published_rounds.to_string()),
            ("current_version", v.to_hex()),
        ] {
            sqlx::query(
                "INSERT INTO state (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(k)
            .bind(val)
            .execute(&mut *tx)
            .await
            .map_err(self.db())?;
        }
        // The penalties the record names are no longer pending.
        for p in settlement.iter().flat_map(|s| &s.penalties) {
            sqlx::query(
                "DELETE FROM pending_penalties WHERE device = $1 AND manifest_hash = $2 AND kind = $3",
            )
            .bind(&p.device)
            .bind(hex::encode(p.manifest_hash))
            .bind(i64::from(p.kind))
            .execute(&mut *tx)
            .await
            .map_err(self.db())?;
        }
        if let (Some((seq, bytes, sig, _)), Some(s)) = (&record, &settlement) {
            sqlx::query(
                "INSERT INTO ledger (seq, round_id, record, signature) VALUES ($1, $2, $3, $4)",
            )
            .bind(*seq as i64)
            .bind(round_id as i64)
            .bind(hex::encode(bytes))
            .bind(hex::encode(sig))
            .execute(&mut *tx)
            .await
            .map_err(self.db())?;
            let scored: Vec<(Option<f64>, bool)> =
                s.entries.iter().map(|e| (e.score, e.flagged())).collect();
            for (e, x) in s.entries.iter().zip(crate::scoring::rating_inputs(&scored)) {
                let Some(x) = x else {
                    continue;
                };
                sqlx::query(
                    "INSERT INTO ratings (device, rating, rounds, last_round) VALUES ($1, $2 * $3, 1, $4)
                     ON CONFLICT (device) DO UPDATE SET
                        rating = $2 * $3 + (1 - $2) * ratings.rating,
                        rounds = ratings.rounds + 1,
                        last_round = $4",
                )
                .bind(&e.device)
                .bind(s.rating_alpha)
                .bind(x)
                .bind(round_id as i64)
                .execute(&mut *tx)
                .await
                .map_err(self.db())?;
            }
        }
        tx.commit().await.map_err(self.db())?;
        if let Some((seq, _, _, hash)) = record {
            self.ledger_tip = (seq, hash);
        }
        self.resume = next;
        if !self.keep_payloads {
            let _ = std::fs::remove_dir_all(self.dir.join("updates").join(round_id.to_string()));
        }
        Ok(())
    }

    fn checkpoint_path(&self, v: &ModelVersion) -> PathBuf {
        self.dir
            .join("models")
            .join(format!("{}.state", v.to_hex()))
    }

    /// Keep the coordinator's checkpoint of version `v` (fsynced).
    pub fn save_checkpoint(&self, v: &ModelVersion, state: &[u8]) -> Result<(), StoreError> {
        self.fence.check()?;
        let path = self.checkpoint_path(v);
        fedge_proto::io::write_atomic(&path, state, None)
            .map_err(|source| StoreError::Io { path, source })
    }

    /// The coordinator's checkpoint of version `v`, if one was kept.
    pub fn checkpoint(&self, v: &ModelVersion) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.checkpoint_path(v);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// A round ended without a model (aborted): move the resume point past it.
    pub async fn skip_round(&mut self, round_id: u64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO state (key, value) VALUES ('next_round_id', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind((round_id + 1).to_string())
        .execute(&mut *tx)
        .await
        .map_err(self.db())?;
        tx.commit().await.map_err(self.db())?;
        self.resume.next_round_id = round_id + 1;
        let _ = std::fs::remove_dir_all(self.dir.join("updates").join(round_id.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
