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
