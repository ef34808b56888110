//! Group commit against real stores (SQLite in a temporary directory, and
//! PostgreSQL where `FEDGE_TEST_PG_URL` names a server): acknowledgements
//! wait for their group, and a group that cannot be written releases
//! none of them and leaves what was durable before intact.

use super::*;
use crate::store::testing::on_both_stores;
use crate::store::{Database, Store};

fn update(round_id: u64, device: u8, payload: &[u8]) -> DurableUpdate {
    DurableUpdate {
        round_id,
        task_round: round_id,
        model_version: None,
        device: hex::encode([device; 32]),
        payload_hash: *blake3::hash(payload).as_bytes(),
        manifest_hash: [device; 32],
        signed_manifest: bytes::Bytes::new(),
        sample_count: 1,
        raw_weight: 1.0,
        discount: 1.0,
        stake: None,
        metrics: Vec::new(),
        payload: bytes::Bytes::copy_from_slice(payload),
    }
}

fn ack(session: SessionId, u: &DurableUpdate) -> Output {
    Output::Send {
        session,
        msg: AggMsg::UpdateAccepted {
            round_id: u.round_id,
            payload_hash: u.payload_hash,
        },
    }
}

fn heartbeat(session: SessionId, seq: u64) -> Output {
    Output::Send {
        session,
        msg: AggMsg::HeartbeatAck { seq },
    }
}

on_both_stores!(an_ack_waits_for_its_group, "commit_ack_waits");

/// An acknowledgement is held until its group is durable, and the same
/// session's later frames behind it, in order; other sessions' frames
/// and frames sent before any update was persisted go at once. The group
/// is written as one (its rows are there when the acks come out).
async fn an_ack_waits_for_its_group(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let limits = CommitLimits {
        group_max: 8,
        wait: Duration::from_secs(1),
    };
    let mut commit = GroupCommit::new(store.update_writer(), limits);
    let now = Instant::now();
    assert!(
        commit.route(heartbeat(1, 0)).is_some(),
        "nothing pending yet"
    );
    let (a, b) = (update(3, 1, b"payload a"), update(3, 2, b"payload b"));
    commit.add(now, a.clone());
    assert!(commit.route(ack(1, &a)).is_none(), "held: a is not durable");
    assert!(commit.route(heartbeat(1, 1)).is_none(), "behind its ack");
    assert!(commit.route(heartbeat(2, 0)).is_some(), "another session");
    commit.add(now, b.clone());
    assert!(commit.route(ack(2, &b)).is_none());
    assert_eq!(commit.held(), 3);
    // Not due before its wait, nor started: nothing is durable yet.
    assert_eq!(commit.start_at(), Some(now + Duration::from_secs(1)));
    commit.poll_start(now);
    assert!(!commit.is_running());
    assert!(store.round_updates(3).await.unwrap().is_empty());
    commit.poll_start(now + Duration::from_secs(1));
    assert!(commit.is_running());
    let res = commit.running().await;
    let released = commit.done(res).unwrap();
    assert_eq!(
        released.len(),
        3,
        "both acks and the heartbeat behind the first"
    );
    let first: Vec<&Output> = released.iter().filter(|o| session_of(o) == 1).collect();
    assert_eq!(first, [&ack(1, &a), &heartbeat(1, 1)], "in order");
    let rows = store.round_updates(3).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(commit.written, (2, 1), "two updates, one group");
    assert_eq!(commit.held(), 0);
    store.close().await;
}

fn session_of(o: &Output) -> SessionId {
    match o {
        Output::Send { session, .. } | Output::Close { session, .. } => *session,
        _ => panic!("not a frame"),
    }
}

on_both_stores!(a_group_that_cannot_be_written_acks_nothing, "commit_fails");

/// The store fails (round 5's payload directory cannot be made: a file
/// is in its place): the group's acknowledgements are never released,
/// the error is the store's, typed, and what an earlier group made
/// durable is still there after a restart; the failed group left no row.
async fn a_group_that_cannot_be_written_acks_nothing(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let mut commit = GroupCommit::new(store.update_writer(), CommitLimits::default());
    let now = Instant::now();
    let early = update(5, 1, b"early");
    commit.add(now, early.clone());
    assert!(commit.route(ack(1, &early)).is_none());
    let released = commit.flush().await.unwrap();
    assert_eq!(released, [ack(1, &early)]);

    // Round 6 cannot be written.
    std::fs::write(dir.path().join("updates").join("6"), b"in the way").unwrap();
    let (a, b) = (update(6, 2, b"a"), update(6, 3, b"b"));
    commit.add(now, a.clone());
    assert!(commit.route(ack(2, &a)).is_none());
    commit.add(now, b.clone());
    assert!(commit.route(ack(3, &b)).is_none());
    let err = commit.flush().await.unwrap_err();
    let store_err = err
        .downcast_ref::<StoreError>()
        .unwrap_or_else(|| panic!("not a store error: {err:#}"));
    assert!(
        matches!(store_err, StoreError::Io { path, .. } if path.starts_with(dir.path().join("updates").join("6"))),
        "{store_err}"
    );
    assert!(
        format!("{err:#}").contains("none of them was acknowledged"),
        "{err:#}"
    );
    assert_eq!(commit.held(), 2, "neither ack was released");
    store.close().await;

    let store = Store::open_with(dir.path(), &db).await.unwrap();
    assert_eq!(store.round_updates(5).await.unwrap(), [early]);
    assert!(store.round_updates(6).await.unwrap().is_empty());
    store.close().await;
}

on_both_stores!(a_full_group_is_written_without_waiting, "commit_full");

/// A group that reaches `group_max` is due at once; the next update
/// waits for room (the full group is written first), so no group grows
/// past the bound however many updates arrive.
async fn a_full_group_is_written_without_waiting(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let limits = CommitLimits {
        group_max: 2,
        wait: Duration::from_secs(1),
    };
    let mut commit = GroupCommit::new(store.update_writer(), limits);
    let now = Instant::now();
    let mut released = Vec::new();
    for d in 0..5u8 {
        let u = update(9, d, &[d; 3]);
        released.extend(commit.make_room().await.unwrap());
        commit.add(now, u.clone());
        assert!(commit.open.len() <= 2);
        if commit.route(ack(u64::from(d), &u)).is_some() {
            panic!("ack {d} went out before its group was durable");
        }
    }
    released.extend(commit.flush().await.unwrap());
    assert_eq!(released.len(), 5);
    assert_eq!(commit.written, (5, 3), "groups of 2, 2 and 1");
    assert_eq!(store.round_updates(9).await.unwrap().len(), 5);
    store.close().await;
}
