//! A database lock lost while its store runs. PostgreSQL only: SQLite's
//! lock is the state directory's open file, which nothing but the end of
//! the process takes away (the SQLite half of every other store test runs
//! the same fenced writes).

use std::path::Path;
use std::time::Duration;

use fedge_proto::ModelVersion;

use crate::store::tests::update;
use crate::store::{ADVISORY_KEY, Database, Store, StoreError, testing};

fn model() -> fedge_proto::ModelBlob {
    let layout = fedge_proto::ParamLayout::new(vec![fedge_proto::TensorSpec::new("w", &[2])]);
    fedge_proto::ModelBlob {
        onnx_graph: bytes::Bytes::new(),
        params: fedge_proto::Params::new(std::sync::Arc::new(layout.unwrap()), vec![1.0, 2.0])
            .unwrap(),
    }
}

/// The lock lost, with the reason saying `why`.
fn assert_lost(r: Result<(), StoreError>, why: &str) {
    match r {
        Err(StoreError::DatabaseLockLost { key, reason, .. }) => {
            assert_eq!(key, ADVISORY_KEY);
            assert!(reason.contains(why), "{reason}");
        }
        other => panic!("expected the database lock lost ({why}), got {other:?}"),
    }
}

/// A state directory beside `dir` with its ledger key: the same
/// aggregator's identity on another machine (a standby taking over).
fn standby_of(dir: &Path) -> tempfile::TempDir {
    let standby = tempfile::tempdir().unwrap();
    for f in ["ledger.key", "ledger.pub"] {
        std::fs::copy(dir.join(f), standby.path().join(f)).unwrap();
    }
    standby
}

/// The devices with an update row in round 1 (rows only: the payloads
/// are in the state directory that wrote them).
async fn devices(store: &Store) -> Vec<String> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT device FROM updates WHERE round_id = 1 ORDER BY device")
            .fetch_all(&store.db.pool)
            .await
            .unwrap();
    rows.into_iter().map(|d| d[..1].to_string()).collect()
}

/// The server ends the lock's session: the watch says so with the typed
/// error, every write after it fails with it (nothing more is written),
/// and the state directory and database open again for the next
/// aggregator, with what was written before.
#[tokio::test]
async fn a_lost_lock_is_noticed_and_nothing_more_is_written_postgres() {
    let db = testing::fresh_postgres("lock_lost").await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    let mut watch = store.watch_lock(Duration::from_millis(20));
    store.persist_update(&update("a", b"pa")).await.unwrap();
    assert_eq!(testing::end_lock_session(&db).await, 1);
    let e = tokio::time::timeout(Duration::from_secs(30), watch.lost())
        .await
        .expect("the lost lock noticed");
    assert_lost(Err(e), "session");
    let msg = store.persist_update(&update("b", b"pb")).await.unwrap_err();
    assert!(
        msg.to_string().contains("lost the lock on database")
            && msg.to_string().contains("writes nothing more"),
        "{msg}"
    );
    assert_lost(store.skip_round(1).await, "session");
    let blob = model().encode();
    assert_lost(
        store.publish(1, ModelVersion::of(&blob), &blob).await,
        "session",
    );
    drop(store);
    let next = Store::open_with(dir.path(), &db).await.unwrap();
    assert_eq!(devices(&next).await, ["a"]);
    assert_eq!(next.resume_point().next_round_id, 1, "nothing published");
}

/// The lock's session ends and another store takes the database before
/// the first has noticed (no watch): the first's next write fails on the
/// fence, having written nothing; the newcomer reads and writes on.
#[tokio::test]
async fn a_store_that_took_the_database_fences_out_the_old_holder_postgres() {
    let db = testing::fresh_postgres("lock_fenced").await;
    let dir = tempfile::tempdir().unwrap();
    let old = Store::open_with(dir.path(), &db).await.unwrap();
    old.persist_update(&update("a", b"pa")).await.unwrap();
    assert_eq!(testing::end_lock_session(&db).await, 1);
    let standby = standby_of(dir.path());
    let new = Store::open_with(standby.path(), &db).await.unwrap();
    assert_lost(
        old.persist_update(&update("b", b"pb")).await,
        "another aggregator took the database",
    );
    // Known lost now: refused before asking the database.
    assert_lost(
        old.persist_update(&update("c", b"pc")).await,
        "another aggregator",
    );
    new.persist_update(&update("d", b"pd")).await.unwrap();
    assert_eq!(devices(&new).await, ["a", "d"]);
}

/// A write in flight when the lock is lost and another store takes the
/// database (a group being committed at that moment): the newcomer's
/// claim waits for it, so it commits (what it acknowledges is durable)
/// and the newcomer opens on a database that has it; the old store's
/// next write fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_commits_before_the_newcomer_reads_postgres() {
    let db = testing::fresh_postgres("lock_in_flight").await;
    let dir = tempfile::tempdir().unwrap();
    let mut old = Store::open_with(dir.path(), &db).await.unwrap();
    let mut tx = old.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO state (key, value) VALUES ('next_round_id', '7')
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    assert_eq!(testing::end_lock_session(&db).await, 1);
    let standby = standby_of(dir.path());
    let db2 = db.clone();
    let opening = tokio::spawn(async move {
        Store::open_with(standby.path(), &db2)
            .await
            .map(|s| (s, standby))
    });
    // The newcomer holds the lock and waits on the epoch row, which the
    // transaction in flight holds.
    testing::wait_for_lock_waiter(&db).await;
    assert!(!opening.is_finished());
    tx.commit().await.unwrap();
    let (new, _standby) = tokio::time::timeout(Duration::from_secs(30), opening)
        .await
        .expect("the newcomer opened")
        .unwrap()
        .unwrap();
    assert_eq!(
        new.resume_point().next_round_id,
        7,
        "the write in flight is there"
    );
    assert_lost(old.skip_round(3).await, "another aggregator");
    assert_eq!(new.resume_point().next_round_id, 7);
}

/// A lock held is not reported lost, however often it is checked, nor
/// when the store releases it at close; the database opens again.
#[tokio::test]
async fn a_held_or_released_lock_is_not_reported_lost_postgres() {
    let db: Database = testing::fresh_postgres("lock_closed").await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    let watch = store.watch_lock(Duration::from_millis(10));
    // Some tens of checks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!watch.is_lost());
    store.persist_update(&update("a", b"pa")).await.unwrap();
    store.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!watch.is_lost());
    Store::open_with(dir.path(), &db)
        .await
        .unwrap()
        .close()
        .await;
}
