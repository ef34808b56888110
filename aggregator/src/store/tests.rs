use super::*;
use crate::store::testing::on_both_stores;

on_both_stores!(one_store_per_state_directory_and_database, "state_lock");

/// A store holds its state directory (and its PostgreSQL database) while
/// it lives: a second store of the directory is refused, naming the lock
/// file and its holder (this process); with PostgreSQL, so is a store of
/// another directory on the same database, naming the advisory lock and
/// its holder. Closed, or only dropped, the first lets the next one open.
async fn one_store_per_state_directory_and_database(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let pid = format!("pid {}", std::process::id());
    let first = Store::open_with(dir.path(), &db).await.unwrap();
    let e = Store::open_with(dir.path(), &db).await.err().unwrap();
    match &e {
        StoreError::StateDirInUse { lock, holder, .. } => {
            assert_eq!(lock, &dir.path().join(LOCK_FILE));
            assert_eq!(holder, &pid);
        }
        other => panic!("expected the state directory in use, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("in use by another aggregator") && msg.contains(LOCK_FILE),
        "{msg}"
    );
    if let Database::Postgres(_) = db {
        let elsewhere = tempfile::tempdir().unwrap();
        let e = Store::open_with(elsewhere.path(), &db).await.err().unwrap();
        assert!(matches!(e, StoreError::DatabaseInUse { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("advisory lock") && msg.contains(&format!("fedge-aggregator {pid}")),
            "{msg}"
        );
    }
    first.close().await;
    let second = Store::open_with(dir.path(), &db).await.unwrap();
    // Dropped without closing (an aggregator task aborted): free again,
    // the database once its server has ended the session.
    drop(second);
    Store::open_with(dir.path(), &db)
        .await
        .unwrap()
        .close()
        .await;
}

on_both_stores!(aborted_rounds_are_never_reused, "aborted_rounds");

/// An aborted round moves the resume point past it, across a reopen,
/// so its id is never used again.
async fn aborted_rounds_are_never_reused(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    assert_eq!(store.resume_point().next_round_id, 1);
    store.skip_round(1).await.unwrap();
    store.skip_round(2).await.unwrap();
    store.close().await;
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let resume = store.resume_point();
    assert_eq!(resume.next_round_id, 3);
    assert_eq!(resume.published_rounds, 0);
}

fn settlement(
    round_id: u64,
    before: ModelVersion,
    scores: &[(&str, Option<f64>, bool)],
) -> Settlement {
    let mut s = Settlement {
        round_id,
        model_before: before,
        scoring_seed: [round_id as u8; 32],
        validation_samples: 10,
        method: crate::scoring::ScoreMethod::Direct,
        server_lr: 1.0,
        reward_pool: 100,
        reward_cap: 1.0,
        stake_transform: crate::weighting::Transform::Linear,
        rating_alpha: 0.5,
        staleness_exponent: 0.5,
        flag_thresholds: [0.99, 0.05, 3.0],
        base_loss: Some(1.0),
        error: None,
        cost: Default::default(),
        // Even rounds carry an evaluation (a format-3 ledger record).
        evaluation: round_id
            .is_multiple_of(2)
            .then(|| crate::evaluation::EvalSummary {
                round_id,
                model_version: hex::encode(before.0),
                devices: 3,
                weight: 3.0,
                reports_root: [round_id as u8; 32],
                loss: Some(0.5),
                accuracy: Some(0.8),
                validation_examples: 100,
                validation_loss: Some(0.45),
                validation_accuracy: Some(0.82),
            }),
        entries: scores
            .iter()
            .enumerate()
            .map(
                // Even rounds' first entry is a stale FedBuff update (a
                // format-4 ledger record, with its evaluation).
                |(i, &(device, score, free_rider))| crate::coordinator::SettledEntry {
                    device: device.repeat(64),
                    manifest_hash: [1; 32],
                    payload_hash: [2; 32],
                    stake: Some(1.0),
                    weight: 0.5,
                    score,
                    norm: 1.0,
                    copy_of: None,
                    similarity: 0.0,
                    alignment: 0.5,
                    free_rider,
                    noise: false,
                    reward: 0,
                    task_round: round_id - u64::from(i == 0 && round_id.is_multiple_of(2)),
                    discount: if i == 0 && round_id.is_multiple_of(2) {
                        0.5f64.sqrt()
                    } else {
                        1.0
                    },
                },
            )
            .collect(),
        penalties: Vec::new(),
    };
    // Paid as the ledger's own numbers say (what verification checks).
    let weights: Vec<f64> = s
        .entries
        .iter()
        .map(|e| match e.score {
            Some(x) if x > 0.0 && !e.flagged() => x,
            _ => 0.0,
        })
        .collect();
    let devices: Vec<&str> = s.entries.iter().map(|e| e.device.as_str()).collect();
    let paid = crate::scoring::rewards_in_key_order(100, &devices, &weights, 1.0);
    for (e, r) in s.entries.iter_mut().zip(paid) {
        e.reward = r;
    }
    s
}

on_both_stores!(ratings_are_moving_averages_kept_with_the_ledger, "ratings");

/// Ratings are the moving average of scores over the rounds a device
/// took part in (alpha 0.5 here): a flagged round counts at most 0, an
/// unscored one not at all; they survive a reopen with the chain's tip.
async fn ratings_are_moving_averages_kept_with_the_ledger(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    let v0 = ModelVersion([0; 32]);
    store.stage_settlement(settlement(
        1,
        v0,
        &[("a", Some(0.4), false), ("b", Some(0.2), false)],
    ));
    store
        .publish(1, ModelVersion([1; 32]), b"m1")
        .await
        .unwrap();
    store.close().await;
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    let mut s2 = settlement(
        2,
        ModelVersion([1; 32]),
        &[
            ("a", Some(0.8), true),
            ("b", None, false),
            ("c", Some(-0.2), false),
        ],
    );
    s2.penalties.push(crate::coordinator::Penalty {
        round_id: 2,
        device: "d".repeat(64),
        manifest_hash: [3; 32],
        payload_hash: *blake3::hash(b"evidence").as_bytes(),
        kind: fedge_proto::ledger::PENALTY_NORM_BOUND,
        slashed: 0.0,
        payload: bytes::Bytes::from_static(b"evidence"),
    });
    store.stage_settlement(s2);
    store
        .publish(2, ModelVersion([2; 32]), b"m2")
        .await
        .unwrap();
    let ratings = store.ratings().await.unwrap();
    let get = |d: &str| {
        ratings
            .iter()
            .find(|r| r.device == d.repeat(64))
            .unwrap()
            .clone()
    };
    // a: 0.5 x 0.4 = 0.2, then flagged: 0.5 x 0 + 0.5 x 0.2 = 0.1.
    assert!((get("a").rating - 0.1).abs() < 1e-12, "{ratings:?}");
    assert_eq!(get("a").rounds, 2);
    // b: 0.1, then unscored: unchanged.
    assert!((get("b").rating - 0.1).abs() < 1e-12);
    assert_eq!((get("b").rounds, get("b").last_round), (1, 1));
    // c: 0.5 x -0.2.
    assert!((get("c").rating + 0.1).abs() < 1e-12);
    // The second record links to the first across the reopen.
    let key = store.ledger_public_key();
    let records =
        crate::ledger::verify_chain(&store.ledger_records().await.unwrap(), &key).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].prev_hash, records[0].hash());
    // Round 2's stale entry and its discount are in its record.
    assert!(records[0].staleness.is_none());
    let stale = records[1].staleness.as_ref().unwrap();
    assert_eq!((stale.entries.len(), stale.entries[0].task_round), (1, 1));
    assert_eq!(stale.entries[0].discount, 0.5f64.sqrt());
    // The penalty is in the record and its evidence on disk.
    assert_eq!(records[1].penalties.len(), 1);
    let p = &records[1].penalties[0];
    let evidence = dir
        .path()
        .join("evidence")
        .join(format!("{}.bin", hex::encode(p.payload_hash)));
    assert_eq!(std::fs::read(evidence).unwrap(), b"evidence");
}

on_both_stores!(
    held_penalties_survive_a_crash_until_recorded,
    "pending_penalties"
);

/// A held penalty is durable at once: after a reopen (a crash before
/// the next publication) it is still pending with its evidence, and
/// the publication whose record names it clears it.
async fn held_penalties_survive_a_crash_until_recorded(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let held = |kind, payload: &'static [u8], manifest: u8| crate::coordinator::Penalty {
        round_id: 1,
        device: "e".repeat(64),
        manifest_hash: [manifest; 32],
        payload_hash: *blake3::hash(payload).as_bytes(),
        kind,
        slashed: 0.25,
        payload: bytes::Bytes::from_static(payload),
    };
    let equivocation = held(
        fedge_proto::ledger::PENALTY_EQUIVOCATION,
        b"two manifests",
        1,
    );
    let copy = crate::coordinator::Penalty {
        payload: bytes::Bytes::new(),
        ..held(fedge_proto::ledger::PENALTY_COPY, b"copied update", 2)
    };
    store.hold_penalty(&equivocation).await.unwrap();
    store.hold_penalty(&copy).await.unwrap();
    // Held twice (a replayed event): still one.
    store.hold_penalty(&equivocation).await.unwrap();
    store.close().await;
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    let pending = store.pending_penalties().await.unwrap();
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(pending.contains(&equivocation));
    assert!(pending.contains(&copy));
    let mut s = settlement(1, ModelVersion([0; 32]), &[("a", Some(0.1), false)]);
    s.penalties = pending;
    store.stage_settlement(s);
    store
        .publish(1, ModelVersion([1; 32]), b"m1")
        .await
        .unwrap();
    assert!(store.pending_penalties().await.unwrap().is_empty());
    let key = store.ledger_public_key();
    let records =
        crate::ledger::verify_chain(&store.ledger_records().await.unwrap(), &key).unwrap();
    assert_eq!(records[0].penalties.len(), 2);
    assert!(records[0].penalties.iter().all(|p| p.slashed == 0.25));
    // Evidence that no longer matches its hash is a typed error.
    store.hold_penalty(&equivocation).await.unwrap();
    std::fs::write(store.evidence_path(&equivocation.payload_hash), b"forged").unwrap();
    assert!(matches!(
        store.pending_penalties().await,
        Err(StoreError::Corrupt { .. })
    ));
}

on_both_stores!(updates_and_contributions_round_trip, "round_trip");

/// What a restarted aggregator reads back is what was persisted:
/// accepted updates (payload checked against its hash, every column,
/// NULL stake and model version included) and contribution records
/// in the order they were recorded; a second row for the same device
/// and round is ignored, not an error.
async fn updates_and_contributions_round_trip(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let update = |device: &str, payload: &'static [u8], stake: Option<f64>| DurableUpdate {
        round_id: 7,
        manifest_hash: [5; 32],
        // Kept as bytes (the coordinator checks them on restore).
        signed_manifest: bytes::Bytes::from_static(if stake.is_some() { b"signed" } else { b"" }),
        task_round: 6,
        model_version: stake.map(|_| ModelVersion([9; 32])),
        device: device.repeat(64),
        payload_hash: *blake3::hash(payload).as_bytes(),
        sample_count: 12,
        raw_weight: 0.25,
        discount: 0.5,
        stake,
        metrics: vec![("loss".into(), 1.5)],
        payload: bytes::Bytes::from_static(payload),
    };
    let (a, b) = (update("a", b"pa", Some(2.0)), update("b", b"pb", None));
    store.persist_update(&a).await.unwrap();
    store.persist_update(&b).await.unwrap();
    store.persist_update(&a).await.unwrap();
    // Recorded in an order that is not the devices' order.
    for (device, accepted) in [("z", true), ("b", false), ("m", true)] {
        store
            .record_contribution(&Contribution {
                round_id: 7,
                device: device.into(),
                stake: None,
                samples: 3,
                raw_weight: 1.0,
                share: 0.5,
                accepted,
                reason: (!accepted).then(|| "late".to_string()),
                settles: accepted,
            })
            .await
            .unwrap();
    }
    store.close().await;
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let mut got = store.round_updates(7).await.unwrap();
    got.sort_by(|x, y| x.device.cmp(&y.device));
    assert_eq!(got.len(), 2);
    for (g, want) in got.iter().zip([&a, &b]) {
        assert_eq!(
            (&g.device, g.payload_hash, &g.payload, g.manifest_hash),
            (
                &want.device,
                want.payload_hash,
                &want.payload,
                want.manifest_hash
            )
        );
        assert_eq!(
            (g.task_round, g.model_version, g.stake),
            (6, want.model_version, want.stake)
        );
        assert_eq!((g.sample_count, g.raw_weight, g.discount), (12, 0.25, 0.5));
        assert_eq!(g.metrics, want.metrics);
        assert_eq!(g.signed_manifest, want.signed_manifest);
    }
    let order: Vec<_> = store
        .contributions(7)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.device, c.accepted, c.reason))
        .collect();
    assert_eq!(
        order,
        [
            ("z".into(), true, None),
            ("b".into(), false, Some("late".into())),
            ("m".into(), true, None)
        ]
    );
    assert!(store.round_updates(8).await.unwrap().is_empty());
}

on_both_stores!(a_newer_schema_is_refused, "newer_schema");

/// A database whose schema version is not this code's is refused,
/// by the store and by a ledger reader, with a typed error naming
/// both versions; nothing in it is changed.
async fn a_newer_schema_is_refused(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    sqlx::query("UPDATE state SET value = '99' WHERE key = 'schema_version'")
        .execute(&store.db.pool)
        .await
        .unwrap();
    store.close().await;
    for e in [
        Store::open_with(dir.path(), &db).await.err().unwrap(),
        LedgerView::open_with(dir.path(), &db).await.err().unwrap(),
    ] {
        assert!(
            matches!(&e, StoreError::SchemaVersion { found, supported: 1, .. } if found == "99"),
            "{e:?}"
        );
        assert!(e.to_string().contains("schema version 99"), "{e}");
    }
}

on_both_stores!(corrupt_rows_are_typed_errors, "corrupt_rows");

/// A round-1 update of `device` (its name repeated to a key's 64
/// characters) carrying `payload`: one sample, weight 1, no stake.
pub(super) fn update(device: &str, payload: &'static [u8]) -> DurableUpdate {
    DurableUpdate {
        round_id: 1,
        manifest_hash: [5; 32],
        signed_manifest: bytes::Bytes::new(),
        task_round: 1,
        model_version: None,
        device: device.repeat(64),
        payload_hash: *blake3::hash(payload).as_bytes(),
        sample_count: 1,
        raw_weight: 1.0,
        discount: 1.0,
        stake: None,
        metrics: vec![],
        payload: bytes::Bytes::from_static(payload),
    }
}

/// Rows altered behind the store's back are typed errors on either
/// backend: a hash that is not hex, a ledger record that is not hex, a
/// resume point that is not a number (naming the database).
async fn corrupt_rows_are_typed_errors(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), &db).await.unwrap();
    store.persist_update(&update("a", b"p")).await.unwrap();
    store.stage_settlement(settlement(
        1,
        ModelVersion([0; 32]),
        &[("a", Some(0.1), false)],
    ));
    store
        .publish(1, ModelVersion([1; 32]), b"m1")
        .await
        .unwrap();
    for sql in [
        "UPDATE updates SET payload_hash = 'zz'",
        "UPDATE ledger SET record = 'not hex'",
        "UPDATE state SET value = 'x' WHERE key = 'published_rounds'",
    ] {
        sqlx::query(sql).execute(&store.db.pool).await.unwrap();
    }
    let e = store.round_updates(1).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::CorruptRow { reason, .. } if reason.contains("zz")),
        "{e:?}"
    );
    let e = store.ledger_records().await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Ledger(m) if m.contains("not hex")),
        "{e:?}"
    );
    store.close().await;
    let e = Store::open_with(dir.path(), &db).await.err().unwrap();
    assert!(e.to_string().contains(&db.label(dir.path())), "{e}");
}

/// PostgreSQL only (a SQLite database lives in its state directory):
/// a database another state directory created is refused, since the
/// blobs and the ledger key it needs are not in this one.
#[tokio::test]
async fn a_database_of_another_state_directory_is_refused_postgres() {
    let db = testing::fresh_postgres("foreign").await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    Store::open_with(a.path(), &db).await.unwrap().close().await;
    let e = Store::open_with(b.path(), &db).await.err().unwrap();
    assert!(matches!(e, StoreError::ForeignDatabase { .. }), "{e:?}");
    // Its own directory still opens it.
    Store::open_with(a.path(), &db).await.unwrap();
}

/// Connecting fails at once with a typed error naming the database
/// (without its password): no server listening, a database that does
/// not exist, a database with no fedge tables for a ledger reader.
#[tokio::test]
async fn unreachable_and_missing_databases_get_typed_errors_postgres() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let nobody = Database::Postgres("postgres://fedge:secret@127.0.0.1:1/fedge".into());
    let e = Store::open_with(dir.path(), &nobody).await.err().unwrap();
    assert!(matches!(e, StoreError::Connect { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("127.0.0.1:1") && !msg.contains("secret"),
        "{msg}"
    );

    let Database::Postgres(url) = testing::fresh_postgres("missing").await else {
        unreachable!()
    };
    let missing = Database::Postgres(format!("{url}_not_there"));
    let e = Store::open_with(dir.path(), &missing).await.err().unwrap();
    assert!(matches!(e, StoreError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    let empty = Database::Postgres(url);
    let e = LedgerView::open_with(dir.path(), &empty)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::SchemaVersion { .. }), "{e:?}");
}

on_both_stores!(a_round_closed_twice_counts_each_device_once, "closed_twice");

/// A leaf killed after closing a round closes it again from its restored
/// updates: the second closing's record of a device replaces the first's
/// accepted one (the share is the second's), while refusals recorded
/// during the round stay.
async fn a_round_closed_twice_counts_each_device_once(db: Database) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path(), &db).await.unwrap();
    let record = |device: &str, share: f64, accepted: bool, settles: bool| Contribution {
        round_id: 4,
        device: device.into(),
        stake: None,
        samples: 3,
        raw_weight: 1.0,
        share,
        accepted,
        reason: (!accepted).then(|| "replay: stale".to_string()),
        settles,
    };
    store
        .record_contribution(&record("a", 0.0, false, false))
        .await
        .unwrap();
    for share in [0.5, 0.25] {
        for device in ["a", "b"] {
            store
                .record_contribution(&record(device, share, true, true))
                .await
                .unwrap();
        }
    }
    let rows: Vec<_> = store
        .contributions(4)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.device, c.accepted, c.share))
        .collect();
    assert_eq!(
        rows,
        [
            ("a".into(), false, 0.0),
            ("a".into(), true, 0.25),
            ("b".into(), true, 0.25)
        ]
    );
}

/// Over the network the store speaks TLS and checks who it talks to. The
/// test server refuses role `fedge_tls` without TLS (`ci/pg.sh`), so a
/// store that opens as that role used it; with `sslmode=verify-full` and
/// the server's CA it opens and works, without that CA (the system's
/// roots, which do not know it) it is refused with a typed error.
#[tokio::test]
async fn the_store_reaches_postgres_over_verified_tls() {
    let Database::Postgres(url) = testing::fresh_postgres("tls").await else {
        unreachable!()
    };
    let url = url.replacen("postgres@", "fedge_tls@", 1);
    let ca = testing::postgres_ca();
    let dir = tempfile::tempdir().unwrap();

    let plain = Database::Postgres(format!("{url}?sslmode=disable"));
    let e = Store::open_with(dir.path(), &plain).await.err().unwrap();
    assert!(matches!(e, StoreError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("no encryption"), "{e}");

    let verified = Database::Postgres(format!("{url}?sslmode=verify-full&sslrootcert={ca}"));
    let store = Store::open_with(dir.path(), &verified).await.unwrap();
    let c = Contribution {
        round_id: 3,
        device: "ab".repeat(32),
        stake: None,
        samples: 7,
        raw_weight: 7.0,
        share: 1.0,
        accepted: true,
        reason: None,
        settles: true,
    };
    store.record_contribution(&c).await.unwrap();
    store.close().await;
    let store = Store::open_with(dir.path(), &verified).await.unwrap();
    let read = store.contributions(3).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].samples, 7);
    store.close().await;

    let unknown_ca = Database::Postgres(format!("{url}?sslmode=verify-full"));
    let e = Store::open_with(dir.path(), &unknown_ca)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::Connect { .. }), "{e:?}");
}
