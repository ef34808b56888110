//! One aggregator per state directory and per database.
//!
//! Two aggregators writing one state directory (or one PostgreSQL
//! database) would interleave their rounds, resume points and ledger
//! records. A [`Store`](super::Store) therefore holds, for as long as it
//! lives:
//!
//! - an exclusive lock on `<state dir>/aggregator.lock`
//!   ([`std::fs::File::try_lock`]: `flock(2)` on Linux), with the holder's
//!   process id written in the file for the message a second aggregator
//!   gets. It covers the SQLite database, which lives in the directory;
//! - with PostgreSQL, a session advisory lock (`pg_try_advisory_lock`,
//!   key [`ADVISORY_KEY`]) on a connection of its own, apart from the
//!   pool, whose `application_name` names the holder's process. Advisory
//!   locks are per database, so two state directories pointed at one
//!   database are refused too, not only one directory twice.
//!
//! Both are released by the operating system or the PostgreSQL server when
//! the process dies, SIGKILL included: a crashed aggregator never leaves a
//! stale lock behind. [`Store::close`](super::Store::close) releases them
//! at once; dropping a store releases the file lock at once and the
//! database lock when the server notices the connection closed, which a
//! new store waits for up to [`PG_LOCK_WAIT`].

use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use super::StoreError;

/// The lock file in a state directory.
pub const LOCK_FILE: &str = "aggregator.lock";

/// The advisory lock a store holds in its PostgreSQL database: "fedgeagg"
/// in ASCII.
pub const ADVISORY_KEY: i64 = 0x6665_6467_6561_6767;

/// How long a store waits for a database lock whose holder has just gone
/// (its session not yet ended on the server) before refusing.
pub const PG_LOCK_WAIT: Duration = Duration::from_secs(3);

/// The locks a store holds; released when dropped (the database lock once
/// the server sees the connection close) or by [`StateLock::release`].
pub(super) struct StateLock {
    _file: std::fs::File,
    pg: Option<PgConnection>,
}

impl StateLock {
    /// Takes the state directory's lock, then (for PostgreSQL, `url`) the
    /// database's; `label` names the database in messages.
    pub async fn acquire(
        dir: &Path,
        postgres: Option<(&str, &str)>,
    ) -> Result<StateLock, StoreError> {
        let file = lock_dir(dir)?;
        let pg = match postgres {
            Some((url, label)) => Some(lock_database(dir, url, label).await?),
            None => None,
        };
        Ok(StateLock { _file: file, pg })
    }

    /// Releases both locks now.
    pub async fn release(self) {
        if let Some(mut conn) = self.pg {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(ADVISORY_KEY)
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state directory's lock file, locked, with this process's id in it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(StoreError::StateDirInUse {
                dir: dir.to_path_buf(),
                holder: holder_of(&path),
                lock: path,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    file.set_len(0).map_err(io(&path))?;
    writeln!(file, "pid {}", std::process::id()).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    Ok(file)
}

/// What the lock file says of its holder.
fn holder_of(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => s.trim().chars().take(200).collect(),
        _ => "a process that has not written its id yet".into(),
    }
}

/// A connection of its own to `url` holding the database's advisory lock.
async fn lock_database(dir: &Path, url: &str, label: &str) -> Result<PgConnection, StoreError> {
    let unreachable = |source| StoreError::Connect {
        db: label.to_string(),
        source,
    };
    let name: String = format!(
        "fedge-aggregator pid {} {}",
        std::process::id(),
        dir.display()
    )
    .chars()
    .take(63)
    .collect();
    let opts = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::BadUrl {
            url: label.to_string(),
            reason: e.to_string(),
        })?
        .application_name(&name);
    let mut conn = opts.connect().await.map_err(unreachable)?;
    let db_err = |source| StoreError::Db {
        db: label.to_string(),
        source,
    };
    let waited = std::time::Instant::now();
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(ADVISORY_KEY)
            .fetch_one(&mut conn)
            .await
            .map_err(db_err)?;
        if locked {
            return Ok(conn);
        }
        if waited.elapsed() >= PG_LOCK_WAIT {
            let holder = pg_holder(&mut conn).await;
            let _ = conn.close().await;
            return Err(StoreError::DatabaseInUse {
                db: label.to_string(),
                key: ADVISORY_KEY,
                holder,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Who holds the advisory lock: the server's backend and its client's
/// `application_name` (the holder's process) and address.
async fn pg_holder(conn: &mut PgConnection) -> String {
    /// Backend pid, `application_name`, client address.
    type Holder = (i32, Option<String>, Option<String>);
    let row: Result<Option<Holder>, _> = sqlx::query_as(
        "SELECT l.pid, a.application_name, host(a.client_addr)
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
         LIMIT 1",
    )
    .bind(ADVISORY_KEY)
    .fetch_optional(conn)
    .await;
    match row {
        Ok(Some((pid, app, addr))) => format!(
            "`{}` (server process {pid}, client {})",
            app.filter(|a| !a.is_empty())
                .unwrap_or_else(|| "an unnamed client".into()),
            addr.unwrap_or_else(|| "on a local socket".into())
        ),
        Ok(None) => "a session that has just released it".into(),
        Err(e) => format!("a session this user may not see ({e})"),
    }
}
