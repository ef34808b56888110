//! The ledger and the ratings as stored: read by the store itself and,
//! read-only and without a key, by a verifier ([`LedgerView`]).

use std::path::Path;
use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

use super::{Rating, StoreError};
use crate::ledger::StoredRecord;

/// A state directory's ledger and ratings, opened read-only: what a
/// verifier reads (it creates nothing, and takes no key).
pub struct LedgerView {
    pub records: Vec<StoredRecord>,
    pub ratings: Vec<Rating>,
}

impl LedgerView {
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        let db_path = dir.join("aggregator.db");
        if !db_path.exists() {
            return Err(StoreError::Io {
                path: db_path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no aggregator database: is this a state directory?",
                ),
            });
        }
        let db = |source| StoreError::Db {
            path: db_path.clone(),
            source,
        };
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", db_path.display()))
            .map_err(db)?
            .read_only(true);
        let pool: SqlitePool = sqlx::pool::PoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(db)?;
        let view = LedgerView {
            records: ledger_rows(&pool, &db_path).await?,
            ratings: rating_rows(&pool, &db_path).await?,
        };
        pool.close().await;
        Ok(view)
    }
}

pub(super) async fn ledger_rows(
    pool: &SqlitePool,
    db_path: &Path,
) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query("SELECT seq, record, signature FROM ledger ORDER BY seq")
        .fetch_all(pool)
        .await
        .map_err(|source| StoreError::Db {
            path: db_path.to_path_buf(),
            source,
        })?;
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

pub(super) async fn rating_rows(
    pool: &SqlitePool,
    db_path: &Path,
) -> Result<Vec<Rating>, StoreError> {
    let rows = sqlx::query(
        "SELECT device, rating, rounds, last_round FROM ratings ORDER BY rating DESC, device",
    )
    .fetch_all(pool)
    .await
    .map_err(|source| StoreError::Db {
        path: db_path.to_path_buf(),
        source,
    })?;
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
