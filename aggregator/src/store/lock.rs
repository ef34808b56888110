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
//!
//! **A database lock can be lost while its holder runs**: the server
//! ends the lock's session (`pg_terminate_backend`, a restart, a cut
//! network, an idle-session timeout) and the lock goes with it, while the
//! pool's connections may well go on. Two things keep that from ever
//! letting two aggregators write one database:
//!
//! - **the fence**: on taking the lock a store moves the database's lock
//!   epoch on by one (`state` row `lock_epoch`) and remembers it, and
//!   every transaction it writes begins by reading the epoch `FOR SHARE`
//!   ([`Fence::begin`]). A store that took the lock after ours was lost
//!   moved the epoch on first, which waits for any transaction of ours
//!   that holds the row and is seen by every later one: ours fails with
//!   [`StoreError::DatabaseLockLost`], having written nothing, and the
//!   newcomer reads the database only after our last commit. Whatever we
//!   committed (and acknowledged) is in the database the newcomer reads;
//!   nothing of ours lands after it;
//! - **the watch** ([`Store::watch_lock`](super::Store::watch_lock),
//!   which the server runs every `server.lock_check_ms`): a cheap query
//!   on the lock's connection asks the server whether this session still
//!   holds the lock. A failed or unanswered query, or a no, marks the
//!   lock lost: from then on every write fails at once, and the server
//!   stops with the typed error instead of serving on.
//!
//! A lost lock is not taken again: the store fails closed. Taking it
//! again would be safe only if nobody had written in between (the epoch
//! unchanged), and a process restarted from what is durable (as after a
//! crash) is the path the suite tests; a supervisor restarts it.
//! SQLite needs neither: its lock is the state directory's, held by this
//! process's open file, which nothing but the process's end takes away.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Transaction};
use tokio::sync::{Mutex, watch};

use super::StoreError;

/// The lock file in a state directory.
pub const LOCK_FILE: &str = "aggregator.lock";

/// The advisory lock a store holds in its PostgreSQL database: "fedgeagg"
/// in ASCII.
pub const ADVISORY_KEY: i64 = 0x6665_6467_6561_6767;

/// How long a store waits for a database lock whose holder has just gone
/// (its session not yet ended on the server) before refusing.
pub const PG_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Default for how often a server asks whether it still holds its
/// database lock (`server.lock_check_ms`).
pub const LOCK_CHECK: Duration = Duration::from_secs(1);
/// The shortest and longest check interval allowed.
pub const LOCK_CHECK_MIN: Duration = Duration::from_millis(10);
pub const LOCK_CHECK_MAX: Duration = Duration::from_secs(60);

/// How long one check may wait for its answer before the lock counts as
/// lost (a cut network answers nothing; a loaded server answers well
/// within this).
pub const LOCK_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Whether `every` is a usable lock check interval.
pub fn check_lock_interval(every: Duration) -> Result<(), String> {
    if !(LOCK_CHECK_MIN..=LOCK_CHECK_MAX).contains(&every) {
        return Err(format!(
            "server.lock_check_ms must be in {}..={}, got {}",
            LOCK_CHECK_MIN.as_millis(),
            LOCK_CHECK_MAX.as_millis(),
            every.as_millis()
        ));
    }
    Ok(())
}

/// What every write of a store checks first (see the module docs).
pub(crate) struct Fence {
    label: String,
    /// PostgreSQL: the lock epoch this store set when it took the lock.
    epoch: Option<String>,
    /// Why the lock was lost, once it was.
    lost: watch::Sender<Option<String>>,
}

impl Fence {
    fn new(label: String, epoch: Option<String>) -> Arc<Fence> {
        Arc::new(Fence {
            label,
            epoch,
            lost: watch::Sender::new(None),
        })
    }

    /// The error for a lock lost because of `reason`.
    fn error(&self, reason: String) -> StoreError {
        StoreError::DatabaseLockLost {
            db: self.label.clone(),
            key: ADVISORY_KEY,
            reason,
        }
    }

    /// Marks the lock lost (the first reason is kept) and returns the error.
    fn mark_lost(&self, reason: String) -> StoreError {
        self.lost.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
        self.error(self.lost.borrow().clone().unwrap_or_default())
    }

    /// The error if the lock is known lost.
    pub fn check(&self) -> Result<(), StoreError> {
        match &*self.lost.borrow() {
            Some(reason) => Err(self.error(reason.clone())),
            None => Ok(()),
        }
    }

    /// A transaction to write in, begun only while this store holds the
    /// database: the lock not known lost and, on PostgreSQL, the epoch
    /// still this store's (read `FOR SHARE`, so that no other store can
    /// move it on before this transaction ends).
    pub async fn begin(&self, pool: &AnyPool) -> Result<Transaction<'static, Any>, StoreError> {
        self.check()?;
        let db = |source| StoreError::Db {
            db: self.label.clone(),
            source,
        };
        let mut tx = pool.begin().await.map_err(db)?;
        if let Some(epoch) = &self.epoch {
            let now: Option<String> =
                sqlx::query_scalar("SELECT value FROM state WHERE key = 'lock_epoch' FOR SHARE")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            if now.as_deref() != Some(epoch.as_str()) {
                return Err(self.mark_lost(format!(
                    "another aggregator took the database since (its lock epoch is {}, this \
                     one's {epoch})",
                    now.as_deref().unwrap_or("gone")
                )));
            }
        }
        Ok(tx)
    }
}

/// Resolves once the store's database lock is lost ([`LockWatch::lost`]);
/// never for SQLite.
pub struct LockWatch {
    fence: Arc<Fence>,
    lost: watch::Receiver<Option<String>>,
}

impl LockWatch {
    /// Whether the lock is known lost.
    pub fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }

    /// The error, once the lock is lost. Cancel-safe (for `select!`).
    pub async fn lost(&mut self) -> StoreError {
        let lost = (self.lost.wait_for(Option::is_some).await)
            .ok()
            .map(|r| r.clone().unwrap_or_default());
        match lost {
            Some(reason) => self.fence.error(reason),
            // The store is gone: nothing more to watch.
            None => std::future::pending().await,
        }
    }
}

/// The database lock's connection (None once released), shared with the
/// task that watches it.
type LockConn = Arc<Mutex<Option<PgConnection>>>;

/// The locks a store holds; released when dropped (the database lock once
/// the server sees the connection close) or by [`StateLock::release`].
pub(super) struct StateLock {
    _file: std::fs::File,
    pg: Option<LockConn>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    fence: Arc<Fence>,
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // The watcher holds the connection: it goes with the store.
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

impl StateLock {
    /// Takes the state directory's lock, then (for PostgreSQL, `url`) the
    /// database's; `label` names the database in messages. Writes are
    /// fenced only once [`StateLock::claim`] has run.
    pub async fn acquire(
        dir: &Path,
        postgres: Option<(&str, &str)>,
        label: String,
    ) -> Result<StateLock, StoreError> {
        let file = lock_dir(dir)?;
        let pg = match postgres {
            Some((url, label)) => Some(Arc::new(Mutex::new(Some(
                lock_database(dir, url, label).await?,
            )))),
            None => None,
        };
        Ok(StateLock {
            _file: file,
            pg,
            watcher: None,
            fence: Fence::new(label, None),
        })
    }

    /// With PostgreSQL, moves the database's lock epoch on (its `state`
    /// table must exist): from here on a store that held the database
    /// before can write nothing more, and every write of this one checks
    /// that none has taken it since. The fence this store writes through.
    pub async fn claim(&mut self, pool: &AnyPool) -> Result<Arc<Fence>, StoreError> {
        if self.pg.is_some() {
            let label = self.fence.label.clone();
            let epoch: String = sqlx::query_scalar(
                "INSERT INTO state (key, value) VALUES ('lock_epoch', '1')
                 ON CONFLICT (key) DO UPDATE
                 SET value = CAST(CAST(state.value AS BIGINT) + 1 AS TEXT)
                 RETURNING value",
            )
            .fetch_one(pool)
            .await
            .map_err(|source| StoreError::Db {
                db: label.clone(),
                source,
            })?;
            self.fence = Fence::new(label, Some(epoch));
        }
        Ok(Arc::clone(&self.fence))
    }

    /// Watches the database lock every `every` (see the module docs); for
    /// SQLite, a watch that never fires. A second call replaces the first
    /// watcher.
    pub fn watch(&mut self, every: Duration) -> LockWatch {
        if let Some(conn) = &self.pg {
            if let Some(w) = self.watcher.take() {
                w.abort();
            }
            let task = watch_database(Arc::clone(conn), Arc::clone(&self.fence), every);
            self.watcher = Some(tokio::spawn(task));
        }
        LockWatch {
            fence: Arc::clone(&self.fence),
            lost: self.fence.lost.subscribe(),
        }
    }

    /// Releases both locks now.
    pub async fn release(mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        let conn = match self.pg.take() {
            Some(c) => c.lock().await.take(),
            None => None,
        };
        if let Some(mut conn) = conn {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(ADVISORY_KEY)
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}

/// Asks every `every` whether the lock's session still holds it; marks
/// the fence lost (and ends) on a no, an error or no answer in
/// [`LOCK_ANSWER_WAIT`].
async fn watch_database(conn: LockConn, fence: Arc<Fence>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let mut guard = conn.lock().await;
        let Some(c) = guard.as_mut() else {
            return; // released
        };
        let reason = match tokio::time::timeout(LOCK_ANSWER_WAIT, still_held(c)).await {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) => "the server no longer lists it as held by this aggregator's \
                              session"
                .to_string(),
            Ok(Err(e)) => format!("its session is gone ({e})"),
            Err(_) => format!(
                "its connection did not answer a check within {} s",
                LOCK_ANSWER_WAIT.as_secs()
            ),
        };
        *guard = None;
        let e = fence.mark_lost(reason);
        tracing::error!(error = %e, "database lock lost");
        return;
    }
}

/// Whether this connection's session holds the advisory lock.
async fn still_held(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let held: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = pg_backend_pid()
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(ADVISORY_KEY)
    .fetch_one(conn)
    .await?;
    Ok(held > 0)
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

#[cfg(test)]
mod tests;
