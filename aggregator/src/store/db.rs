//! Where the store's tables live, and the schema on each backend.
//!
//! Both backends go through sqlx's `Any` driver, so every query in the
//! store is one piece of SQL run on SQLite and on PostgreSQL alike (`$n`
//! parameters, BIGINT / DOUBLE PRECISION / TEXT columns, `ON CONFLICT`).
//! What the dialects do differently is in [`Dialect`] and nowhere else:
//! how a table's columns are listed (for [`ADDED_COLUMNS`]) and how the
//! contributions keep their insertion order (SQLite's `rowid`, a
//! `BIGSERIAL` column on PostgreSQL).

use std::path::Path;
use std::str::FromStr;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AnyConnection, AnyPool};
use sqlx::{Connection, Executor};

use super::StoreError;

/// Where the aggregator's tables are. Blobs (models, update payloads,
/// evidence) and keys stay in the state directory either way.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Database {
    /// `aggregator.db` in the state directory (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database, `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`;
    /// it must exist (its tables are created on first use).
    Postgres(String),
}

/// The forms [`Database`] accepts, for error messages and `--help`.
pub const DATABASE_FORMS: &str = "`sqlite` (the default: aggregator.db in the state directory) \
     or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";

impl FromStr for Database {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadUrl {
            url: redact(s),
            reason,
        };
        if s == "sqlite" {
            return Ok(Database::Sqlite);
        }
        if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
            return Err(bad(format!("expected {DATABASE_FORMS}")));
        }
        let opts = PgConnectOptions::from_str(s).map_err(|e| bad(e.to_string()))?;
        if opts.get_database().is_none_or(str::is_empty) {
            return Err(bad("it names no database (…/DATABASE at the end)".into()));
        }
        // Safe by default on a network: a server off this machine is
        // reached over TLS with its certificate verified against the
        // system's roots (or `sslrootcert=FILE`) and its name checked,
        // unless the URL (or PGSSLMODE) says otherwise.
        let stated = url_names_ssl_mode(s) || std::env::var_os("PGSSLMODE").is_some();
        if !stated && !is_local(&opts) {
            let sep = if s.contains('?') { '&' } else { '?' };
            return Ok(Database::Postgres(format!("{s}{sep}sslmode=verify-full")));
        }
        Ok(Database::Postgres(s.to_string()))
    }
}

/// Whether `url`'s query names a TLS mode (`sslmode` or `ssl-mode`).
fn url_names_ssl_mode(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|kv| matches!(kv.split('=').next(), Some("sslmode" | "ssl-mode")))
    })
}

/// A Unix socket, or a loopback name or address: a server whose
/// traffic never leaves this machine.
fn is_local(opts: &PgConnectOptions) -> bool {
    let host = opts.get_host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    opts.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl TryFrom<String> for Database {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        s.parse()
    }
}

impl From<Database> for String {
    fn from(d: Database) -> String {
        match d {
            Database::Sqlite => "sqlite".into(),
            Database::Postgres(url) => url,
        }
    }
}

impl Database {
    /// Why a PostgreSQL connection to this database could be read or
    /// altered on the network, when it could: a server off this machine
    /// with TLS off or its certificate unverified (`sslmode` disable,
    /// allow, prefer or require, which the URL must have stated; see
    /// [`FromStr`]). None for
    /// SQLite, a loopback or socket server, or verified TLS.
    pub fn transport_warning(&self) -> Option<String> {
        use sqlx::postgres::PgSslMode;
        let Database::Postgres(url) = self else {
            return None;
        };
        let opts = PgConnectOptions::from_str(url).ok()?;
        if is_local(&opts) {
            return None;
        }
        let mode = match opts.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa | PgSslMode::VerifyFull => return None,
        };
        Some(format!(
            "the PostgreSQL server {} is reached with sslmode={mode}: the connection (its \
             password, the aggregator's rounds and ledger) is not protected by verified TLS; \
             use sslmode=verify-full (the default for a server off this machine)",
            opts.get_host()
        ))
    }

    /// A name for messages: the SQLite file, or the PostgreSQL URL
    /// without its password.
    pub fn label(&self, dir: &Path) -> String {
        match self {
            Database::Sqlite => sqlite_path(dir).display().to_string(),
            Database::Postgres(url) => redact(url),
        }
    }
}

/// `url` with the password (if any) replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

pub(super) fn sqlite_path(dir: &Path) -> std::path::PathBuf {
    dir.join("aggregator.db")
}

/// The version of the tables this code reads and writes, kept in `state`
/// under `schema_version`. Databases from before it was kept have the
/// same tables (with [`ADDED_COLUMNS`] added on open) and count as 1.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The contributions table; PostgreSQL has no `rowid`, so its
    /// insertion order is a column of its own.
    fn contributions_table(self) -> String {
        let id = match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => "id BIGSERIAL PRIMARY KEY,",
        };
        format!(
            "CREATE TABLE IF NOT EXISTS contributions ({id}
                round_id BIGINT NOT NULL,
                device TEXT NOT NULL,
                stake DOUBLE PRECISION,
                samples BIGINT NOT NULL,
                raw_weight DOUBLE PRECISION NOT NULL,
                share DOUBLE PRECISION NOT NULL,
                accepted BIGINT NOT NULL,
                reason TEXT)"
        )
    }

    /// The column that orders contributions as they were recorded.
    pub(super) fn insertion_order(self) -> &'static str {
        match self {
            Dialect::Sqlite => "rowid",
            Dialect::Postgres => "id",
        }
    }

    /// Counts the columns named `$2` of table `$1`.
    fn column_count(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2",
            Dialect::Postgres => {
                "SELECT COUNT(*) FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
            }
        }
    }

    /// Run on every new connection: SQLite in WAL mode with a full sync
    /// on commit; PostgreSQL with a synchronous commit whatever the
    /// server's default (a commit returns once it is on disk). Both are
    /// what "acknowledged means durable" rests on.
    fn on_connect(self, read_only: bool) -> &'static [&'static str] {
        match (self, read_only) {
            (Dialect::Sqlite, false) => &["PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL"],
            (Dialect::Sqlite, true) => &[],
            (Dialect::Postgres, false) => &["SET synchronous_commit = on"],
            (Dialect::Postgres, true) => &["SET default_transaction_read_only = on"],
        }
    }
}

const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS model_versions (
        version TEXT PRIMARY KEY,
        round_id BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        created_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS updates (
        round_id BIGINT NOT NULL,
        device TEXT NOT NULL,
        payload_hash TEXT NOT NULL,
        samples BIGINT NOT NULL,
        raw_weight DOUBLE PRECISION NOT NULL,
        stake DOUBLE PRECISION,
        metrics TEXT NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (round_id, device))",
    // Records and signatures in hex (TEXT on both backends).
    "CREATE TABLE IF NOT EXISTS ledger (
        seq BIGINT PRIMARY KEY,
        round_id BIGINT NOT NULL,
        record TEXT NOT NULL,
        signature TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ratings (
        device TEXT PRIMARY KEY,
        rating DOUBLE PRECISION NOT NULL,
        rounds BIGINT NOT NULL,
        last_round BIGINT NOT NULL)",
    // Penalties held for the next ledger record (their evidence is on
    // disk); each is deleted by the publication whose record names it.
    "CREATE TABLE IF NOT EXISTS pending_penalties (
        device TEXT NOT NULL,
        round_id BIGINT NOT NULL,
        manifest_hash TEXT NOT NULL,
        payload_hash TEXT NOT NULL,
        kind BIGINT NOT NULL,
        slashed DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, manifest_hash, kind))",
];

/// Columns added after a table was first released: `(table, column,
/// type)`, each added once to a database that lacks it (`ALTER TABLE ...
/// ADD COLUMN`, the same statement on SQLite and PostgreSQL). Rows written
/// before have NULL there.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // The task an update answers, the model it trained, and its staleness
    // discount: restored updates are checked against them.
    ("updates", "task_round", "BIGINT"),
    ("updates", "model_version", "TEXT"),
    ("updates", "discount", "DOUBLE PRECISION"),
    // The signed manifest's hash, for the ledger.
    ("updates", "manifest_hash", "TEXT"),
    // The signed manifest (hex), the evidence of equivocation across a
    // restart.
    ("updates", "signed_manifest", "TEXT"),
];

/// An open database: its pool, its dialect and its name for messages.
pub(super) struct Db {
    pub pool: AnyPool,
    pub dialect: Dialect,
    pub label: String,
}

impl Db {
    pub fn err(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        |source| StoreError::Db {
            db: self.label.clone(),
            source,
        }
    }
}

/// Connect to `database` (for SQLite, in `dir`; created unless
/// `read_only`). One connection: the store has one writer, and its
/// statements run in order.
pub(super) async fn connect(
    database: &Database,
    dir: &Path,
    read_only: bool,
) -> Result<Db, StoreError> {
    sqlx::any::install_default_drivers();
    let label = database.label(dir);
    if let Some(warning) = database.transport_warning() {
        tracing::warn!("{warning}");
    }
    let (url, dialect) = match database {
        Database::Sqlite => {
            let mode = if read_only { "ro" } else { "rwc" };
            let url = format!("sqlite://{}?mode={mode}", sqlite_path(dir).display());
            (url, Dialect::Sqlite)
        }
        Database::Postgres(url) => (url.clone(), Dialect::Postgres),
    };
    let unreachable = |source| StoreError::Connect {
        db: label.clone(),
        source,
    };
    // One direct attempt first: a refused connection or a missing
    // database is reported at once, not retried until a pool times out.
    AnyConnection::connect(&url)
        .await
        .map_err(unreachable)?
        .close()
        .await
        .map_err(unreachable)?;
    let statements = dialect.on_connect(read_only);
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for s in statements {
                    conn.execute(*s).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(unreachable)?;
    Ok(Db {
        pool,
        dialect,
        label,
    })
}

impl Db {
    /// Bring the tables to [`SCHEMA_VERSION`]; refuse a database written
    /// by a newer version (before changing anything in it).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let db = self.err();
        sqlx::query("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .execute(&self.pool)
            .await
            .map_err(&db)?;
        let found = self.schema_version().await?;
        if let Some(v) = found.filter(|v| *v != SCHEMA_VERSION.to_string()) {
            return Err(StoreError::SchemaVersion {
                db: self.label.clone(),
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        let contributions = self.dialect.contributions_table();
        for stmt in TABLES.iter().copied().chain([contributions.as_str()]) {
            sqlx::query(stmt).execute(&self.pool).await.map_err(&db)?;
        }
        for (table, column, ty) in ADDED_COLUMNS {
            let present: i64 = sqlx::query_scalar(self.dialect.column_count())
                .bind(*table)
                .bind(*column)
                .fetch_one(&self.pool)
                .await
                .map_err(&db)?;
            if present == 0 {
                sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
                    .execute(&self.pool)
                    .await
                    .map_err(&db)?;
            }
        }
        sqlx::query(
            "INSERT INTO state (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(SCHEMA_VERSION.to_string())
        .execute(&self.pool)
        .await
        .map_err(&db)?;
        Ok(())
    }

    /// The `schema_version` the database says it has, if any (a database
    /// with no `state` table has none).
    pub async fn schema_version(&self) -> Result<Option<String>, StoreError> {
        self.state_value("schema_version").await
    }

    pub async fn state_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM state WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())
    }
}

/// Test support: a fresh PostgreSQL database on the test server, one per
/// test, so that tests stay hermetic and run in parallel.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// Runs the crate's test `$name(db)` on both backends, as tests
    /// `$name::sqlite` and `$name::postgres` (a fresh database `$label...`
    /// on the server FEDGE_TEST_PG_URL names; without it the PostgreSQL
    /// half fails, saying how to start one).
    #[cfg(test)]
    macro_rules! on_both_stores {
        ($name:ident, $label:literal) => {
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name($crate::store::Database::Sqlite).await;
                }

                #[tokio::test]
                async fn postgres() {
                    super::$name($crate::store::testing::fresh_postgres($label).await).await;
                }
            }
        };
    }
    #[cfg(test)]
    pub(crate) use on_both_stores;

    /// The test server's URL (any existing database on it, e.g.
    /// `postgres://postgres@127.0.0.1:54329/postgres`); `ci/pg.sh`
    /// starts the server and prints it.
    pub const PG_URL_VAR: &str = "FEDGE_TEST_PG_URL";

    /// The CA certificate (PEM file) that signed the test server's TLS
    /// certificate; `ci/pg.sh` makes it and prints the variable.
    pub const PG_CA_VAR: &str = "FEDGE_TEST_PG_CA";

    /// The file [`PG_CA_VAR`] names.
    ///
    /// # Panics
    /// When it is unset (as [`fresh_postgres`] does for its server).
    pub fn postgres_ca() -> String {
        std::env::var(PG_CA_VAR).unwrap_or_else(|_| {
            panic!(
                "{PG_CA_VAR} is not set: this test needs the TLS CA of the test PostgreSQL \
                 server. Start one with `eval \"$(bash ci/pg.sh start)\"`"
            )
        })
    }

    /// Create a database named after `label` (and a random suffix) on the
    /// server `FEDGE_TEST_PG_URL` names, and return it.
    ///
    /// # Panics
    /// When the variable is unset or the server cannot be reached: a test
    /// that needs PostgreSQL fails, saying how to start one, rather than
    /// passing without having run.
    pub async fn fresh_postgres(label: &str) -> Database {
        let server = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{PG_URL_VAR} is not set: this test needs a PostgreSQL server. Start one with \
                 `eval \"$(bash ci/pg.sh start)\"` (stop it with `bash ci/pg.sh stop`), \
                 or run the whole suite with `bash ci/test.sh`, which does both"
            )
        });
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).expect("randomness");
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!("fedge_{label}_{}", hex::encode(suffix));
        let opts = PgConnectOptions::from_str(&server)
            .unwrap_or_else(|e| panic!("{PG_URL_VAR}={}: {e}", redact(&server)));
        let mut conn = sqlx::postgres::PgConnection::connect_with(&opts)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach the test PostgreSQL server {PG_URL_VAR}={}: {e}; \
                     is it running (`bash ci/pg.sh start`)?",
                    redact(&server)
                )
            });
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let _ = conn.close().await;
        let url = replace_database(&server, &name);
        Database::Postgres(url)
    }

    /// Ends the server session holding `database`'s advisory lock (what
    /// a server restart or a cut network does to a running aggregator),
    /// waiting up to 5 s for it to be gone: how many sessions were ended.
    ///
    /// # Panics
    /// When `database` is not a reachable PostgreSQL database.
    pub async fn end_lock_session(database: &Database) -> u64 {
        let Database::Postgres(url) = database else {
            panic!("only a PostgreSQL database has a lock session");
        };
        let mut conn = sqlx::postgres::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", redact(url)));
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(super::super::ADVISORY_KEY)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("ending the lock's session: {e}"));
        let _ = conn.close().await;
        ended.into_iter().filter(|e| *e).count() as u64
    }

    /// Waits (30 s at most) until a session of `database` waits for a
    /// lock another holds.
    ///
    /// # Panics
    /// When none does by then.
    pub async fn wait_for_lock_waiter(database: &Database) {
        let Database::Postgres(url) = database else {
            panic!("only a PostgreSQL database has lock waiters");
        };
        let mut conn = sqlx::postgres::PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", redact(url)));
        let since = std::time::Instant::now();
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("reading pg_stat_activity: {e}"));
            if waiting > 0 {
                break;
            }
            assert!(
                since.elapsed() < std::time::Duration::from_secs(30),
                "no session of {} waited for a lock in 30 s",
                redact(url)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _ = conn.close().await;
    }

    /// `url` naming database `name` instead of its own (query kept).
    fn replace_database(url: &str, name: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let host_part = match base[scheme_end..].find('/') {
            Some(i) => &base[..scheme_end + i],
            None => base,
        };
        match query {
            Some(q) => format!("{host_part}/{name}?{q}"),
            None => format!("{host_part}/{name}"),
        }
    }

    #[cfg(test)]
    #[test]
    fn database_replaced_in_urls() {
        for (url, want) in [
            ("postgres://u@h:1/postgres", "postgres://u@h:1/x"),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("postgresql://h:5", "postgresql://h:5/x"),
        ] {
            assert_eq!(replace_database(url, "x"), want);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_parse_or_are_refused_with_a_reason() {
        assert_eq!("sqlite".parse::<Database>().unwrap(), Database::Sqlite);
        assert_eq!(
            "postgres://u@127.0.0.1:5/fedge"
                .parse::<Database>()
                .unwrap(),
            Database::Postgres("postgres://u@127.0.0.1:5/fedge".into())
        );
        for (bad, says) in [
            ("mysql://u@h/db", "expected"),
            ("", "expected"),
            ("postgres://u:secret@h:notaport/db", "port"),
            ("postgres://u:secret@h:5", "names no database"),
        ] {
            let e = bad.parse::<Database>().unwrap_err();
            assert!(matches!(e, StoreError::BadUrl { .. }), "{bad}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(says), "{bad}: {msg}");
            assert!(!msg.contains("secret"), "password shown: {msg}");
        }
    }

    #[test]
    fn a_server_off_this_machine_gets_verified_tls_unless_the_url_says_otherwise() {
        // (PGSSLMODE, which would count as stated, is not set in the suite.)
        let parse = |u: &str| match u.parse::<Database>().unwrap() {
            Database::Postgres(url) => url,
            Database::Sqlite => unreachable!(),
        };
        for (given, becomes) in [
            (
                "postgres://u@db.example.com/fedge",
                "postgres://u@db.example.com/fedge?sslmode=verify-full",
            ),
            (
                "postgres://u@10.0.0.7:5432/fedge?application_name=a",
                "postgres://u@10.0.0.7:5432/fedge?application_name=a&sslmode=verify-full",
            ),
            // Loopback and sockets stay as given; a stated mode is kept.
            (
                "postgres://u@127.0.0.1/fedge",
                "postgres://u@127.0.0.1/fedge",
            ),
            (
                "postgres://u@localhost/fedge",
                "postgres://u@localhost/fedge",
            ),
            ("postgres://u@[::1]:5/fedge", "postgres://u@[::1]:5/fedge"),
            (
                "postgres:///fedge?host=/run/postgresql",
                "postgres:///fedge?host=/run/postgresql",
            ),
            (
                "postgres://u@db.example.com/fedge?sslmode=disable",
                "postgres://u@db.example.com/fedge?sslmode=disable",
            ),
        ] {
            assert_eq!(parse(given), becomes);
        }
        let warned = |u: &str| u.parse::<Database>().unwrap().transport_warning();
        assert_eq!(warned("postgres://u@db.example.com/fedge"), None);
        assert_eq!(warned("postgres://u@127.0.0.1/fedge?sslmode=disable"), None);
        assert_eq!(Database::Sqlite.transport_warning(), None);
        for mode in ["disable", "allow", "prefer", "require"] {
            let w = warned(&format!(
                "postgres://u:secret@db.example.com/f?sslmode={mode}"
            ))
            .expect("an unverified remote connection is warned about");
            assert!(w.contains(&format!("sslmode={mode}")), "{w}");
            assert!(!w.contains("secret"), "{w}");
        }
    }

    #[test]
    fn labels_hide_passwords() {
        let d = Database::Postgres("postgres://u:secret@h:5/db".into());
        assert_eq!(d.label(Path::new("/s")), "postgres://u:***@h:5/db");
        assert_eq!(Database::Sqlite.label(Path::new("/s")), "/s/aggregator.db");
    }
}
