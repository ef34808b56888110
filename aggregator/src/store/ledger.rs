//! The ledger and the ratings as stored: read by the store itself and,
//! read-only and without a key, by a verifier ([`LedgerView`]).

use std::path::Path;

use sqlx::Row;

use super::db::{self, Database, Db};
use super::{Rating, StoreError};
use crate::ledger::StoredRecord;

/// A state directory's ledger and ratings, opened read-only: what a
/// verifier reads (it creates nothing, and takes no key).
pub struct LedgerView {
    pub records: Vec<StoredRecord>,
    pub ratings: Vec<Rating>,
    /// The signed manifests kept with accepted updates (updates persisted
    /// before the column existed have none).
    pub manifests: Vec<crate::ledger::StoredManifest>,
}

impl LedgerView {
    /// The ledger of a state directory whose tables are in its SQLite file.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, &Database::Sqlite).await
    }

    /// The ledger in `database` (for SQLite, the state directory `dir`'s).
    pub async fn open_with(dir: &Path, database: &Database) -> Result<Self, StoreError> {
        let db = open_read_only(dir, database).await?;
        let view = LedgerView {
            records: ledger_rows(&db).await?,
            ratings: rating_rows(&db).await?,
            manifests: manifest_rows(&db).await?,
        };
        db.pool.close().await;
        Ok(view)
    }
}

/// A state directory's database, read-only: nothing is created or
/// migrated, so a database of another schema, or with no fedge tables at
/// all, is refused.
pub(super) async fn open_read_only(dir: &Path, database: &Database) -> Result<Db, StoreError> {
    let db_path = db::sqlite_path(dir);
    if *database == Database::Sqlite && !db_path.exists() {
        return Err(StoreError::Io {
            path: db_path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no aggregator database: is this a state directory?",
            ),
        });
    }
    let db = db::connect(database, dir, true).await?;
    let found = match db.schema_version().await {
        Err(_) => Some("none (no fedge tables)".to_string()),
        Ok(v) => v.filter(|v| *v != db::SCHEMA_VERSION.to_string()),
    };
    if let Some(found) = found {
        return Err(StoreError::SchemaVersion {
            db: db.label.clone(),
            found,
            supported: db::SCHEMA_VERSION,
        });
    }
    Ok(db)
}

pub(super) async fn ledger_rows(db: &Db) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query("SELECT seq, record, signature FROM ledger ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .map_err(db.err())?;
    rows.into_iter()
        .map(|r| {
            let seq = r.get::<i64, _>(0) as u64;
            let unhex = |col: usize, what: &str| {
                hex::decode(r.get::<String, _>(col)).map_err(|e| {
                    StoreError::Ledger(format!("ledger record {seq}: {what} is not hex: {e}"))
                })
            };
            Ok(StoredRecord {
                seq,
                bytes: unhex(1, "record")?,
                signature: unhex(2, "signature")?,
            })
        })
        .collect()
}

/// Every accepted update's signed manifest, with its round and device.
pub(super) async fn manifest_rows(
    db: &Db,
) -> Result<Vec<crate::ledger::StoredManifest>, StoreError> {
    let rows = sqlx::query(
        "SELECT round_id, device, signed_manifest FROM updates
         WHERE signed_manifest IS NOT NULL ORDER BY round_id, device",
    )
    .fetch_all(&db.pool)
    .await
    .map_err(db.err())?;
    rows.into_iter()
        .map(|r| {
            let round_id = r.get::<i64, _>(0) as u64;
            let device: String = r.get(1);
            let bad = |what: &str| {
                StoreError::Ledger(format!(
                    "round {round_id}: device {device}'s stored manifest: {what}"
                ))
            };
            let key = hex::decode(&device)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| bad("the device is not a hex key"))?;
            let bytes =
                hex::decode(r.get::<String, _>(2)).map_err(|_| bad("the manifest is not hex"))?;
            Ok(crate::ledger::StoredManifest {
                round_id,
                device: key,
                bytes,
            })
        })
        .collect()
}

pub(super) async fn rating_rows(db: &Db) -> Result<Vec<Rating>, StoreError> {
    let rows = sqlx::query(
        "SELECT device, rating, rounds, last_round FROM ratings ORDER BY rating DESC, device",
    )
    .fetch_all(&db.pool)
    .await
    .map_err(db.err())?;
    Ok(rows
        .into_iter()
        .map(|r| Rating {
            device: r.get(0),
            rating: r.get(1),
            rounds: r.get::<i64, _>(2) as u64,
            last_round: r.get::<i64, _>(3) as u64,
        })
        .collect())
}
