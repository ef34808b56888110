//! The contribution ledger of a real run (QUIC on loopback, the real
//! server and store, devices sending known updates, a validation set):
//! it verifies; flipping any single byte of any record or signature, or
//! altering a stored record, fails verification naming that record;
//! every participant's reward proof verifies and an altered reward does
//! not; ratings persist; every entry matches its stored signed manifest.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::ledger::{self, StoredRecord};
use fedge_aggregator::scoring::{Evaluator, ScoreMethod, ScoringConfig};
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::{Database, LedgerView, Store, testing};
use fedge_aggregator::tls::TlsIdentity;
use fedge_aggregator::weighting::WeightPolicy;
use fedge_device::TrainOutput;
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::Trainer;
use fedge_device::transport::Trust;
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};

const DIM: usize = 16;
const DEVICES: u8 = 4;
const ROUNDS: u64 = 3;

fn model() -> ModelBlob {
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec::new("w", &[3, 4]),
            TensorSpec::new("b", &[4]),
        ])
        .unwrap(),
    );
    ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, vec![0.0; DIM]).unwrap(),
    }
}

/// Loss `|w - 1 - e_k|^2` on example `k`.
struct Quadratic;

impl Evaluator for Quadratic {
    fn len(&self) -> usize {
        100
    }
    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String> {
        let mut s = 0.0;
        for &k in indices {
            let off = 0.01 * ((k % 5) as f64 - 2.0);
            s += params
                .iter()
                .map(|&p| (f64::from(p) - 1.0 - off).powi(2))
                .sum::<f64>();
        }
        Ok(s / indices.len() as f64)
    }
}

/// Sends `0.2 + ((i + shift) mod 4) / 10` on coordinate `i`, times
/// `sign`: positive toward the optimum, negative away from it; each shift
/// a different direction (cosine 0.89 at most), so nobody is a copy. Each
/// coordinate is also scaled by 1.5 or 0.5, drawn per round, so no round's
/// update replays an earlier one.
struct Pattern {
    sign: f32,
    shift: usize,
}

impl Trainer for Pattern {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        _plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        let n = model.params.values.len();
        let wobble = |i: usize| {
            let h = blake3::hash(&[round_id.to_le_bytes(), (i as u64).to_le_bytes()].concat());
            if h.as_bytes()[0] & 1 == 0 { 1.5 } else { 0.5 }
        };
        Ok(TrainOutput {
            delta: (0..n)
                .map(|i| self.sign * (0.2 + ((i + self.shift) % 4) as f32 / 10.0) * wobble(i))
                .collect(),
            sample_count: 5,
            metrics: vec![],
        })
    }
}

/// A run of `ROUNDS` rounds in a fresh state directory.
async fn real_run() -> (tempfile::TempDir, fedge_proto::ModelVersion, String) {
    let dir = tempfile::tempdir().unwrap();
    let (v, metrics) = run_in(dir.path(), &Database::Sqlite, ROUNDS).await;
    (dir, v, metrics)
}

/// Serve rounds up to `rounds` (round ids) from the state in `dir` and
/// `database` (or `model()` when it has none) with `DEVICES` devices; the
/// final version and the server's metrics at the end.
async fn run_in(
    dir: &std::path::Path,
    database: &Database,
    rounds: u64,
) -> (fedge_proto::ModelVersion, String) {
    let identity = TlsIdentity::load_or_create(dir).unwrap();
    let fp = identity.fingerprint();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: DEVICES as usize,
            over_selection: 1.0,
            min_devices: DEVICES as usize,
            rounds,
            round_deadline: Duration::from_secs(60),
            selection_window: Duration::from_millis(500),
            retry_window: (Duration::from_millis(50), Duration::from_millis(150)),
            weights: WeightPolicy {
                max_share: 0.5,
                ..WeightPolicy::default()
            },
            scoring: ScoringConfig {
                validation_samples: 20,
                // 16 parameters: too few for the noise flag.
                noise_sigmas: 0.0,
                reward_pool: 10_000,
                // A quadratic loss has no classes.
                method: ScoreMethod::Direct,
                ..ScoringConfig::default()
            },
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    };
    let store = Store::open_with(dir, database).await.unwrap();
    let published_before = store.resume_point().published_rounds;
    let initial = store
        .current_model(&Default::default())
        .unwrap()
        .unwrap_or_else(model);
    let mut server = Server::bind(cfg, &identity, store).unwrap();
    server.set_evaluator(Box::new(Quadratic));
    let metrics = server.metrics();
    let addr = server.local_addr().unwrap();
    let serving = tokio::spawn(server.run(initial, std::future::pending()));
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| {
            let cfg = DriverConfig {
                session: SessionConfig {
                    seed: u64::from(i),
                    backoff_min: Duration::from_millis(50),
                    ..SessionConfig::default()
                },
                ..DriverConfig::new(addr, Trust::Pinned(fp))
            };
            // Device 3 pushes the model away from the optimum.
            let sign = if i == 3 { -1.0 } else { 1.0 };
            let key = SigningKey::from_bytes(&[40 + i; 32]);
            tokio::spawn(run_device(
                cfg,
                key,
                Box::new(Pattern {
                    sign,
                    shift: usize::from(i),
                }),
            ))
        })
        .collect();
    for d in devices {
        tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("device finished in time")
            .unwrap()
            .unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("aggregator finished")
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_published, rounds);
    assert!(published_before < rounds);
    (report.final_version.unwrap(), metrics.encode())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_continues_across_a_restart_sqlite() {
    the_chain_continues_across_a_restart(Database::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_continues_across_a_restart_postgres() {
    the_chain_continues_across_a_restart(testing::fresh_postgres("chain_restart").await).await;
}

/// An aggregator stopped after two rounds and started again from its
/// state directory and database continues the chain: the store picks up
/// the tip, the next record links to it and starts from its model.
async fn the_chain_continues_across_a_restart(database: Database) {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), &database, 2).await;
    let (last, _) = run_in(dir.path(), &database, 4).await;
    let key = ledger::public_key(dir.path()).unwrap();
    let view = LedgerView::open_with(dir.path(), &database).await.unwrap();
    let records = ledger::verify_chain(&view.records, &key).unwrap();
    let rounds: Vec<u64> = records.iter().map(|r| r.round_id).collect();
    assert_eq!(rounds, vec![1, 2, 3, 4]);
    assert_eq!(records[3].model_after, last.0);
    assert_eq!(records[2].prev_hash, records[1].hash());
    // Ratings went on from where they were: four rounds each.
    assert!(
        view.ratings.iter().all(|r| r.rounds == 4),
        "{:?}",
        view.ratings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_runs_ledger_verifies_and_every_altered_byte_is_named() {
    let (dir, final_version, metrics) = real_run().await;
    // Prometheus sees the settlements: rewards paid, the scoring cost.
    assert!(metrics.contains("fedge_rewards_paid_total "), "{metrics}");
    assert!(
        !metrics.contains("fedge_rewards_paid_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fedge_scoring_cost_fraction "),
        "{metrics}"
    );
    let key = ledger::public_key(dir.path()).unwrap();
    let away_key = SigningKey::from_bytes(&[43; 32]).verifying_key().to_bytes();
    let view = LedgerView::open(dir.path()).await.unwrap();
    let records = ledger::verify_chain(&view.records, &key).unwrap();
    assert_eq!(records.len(), ROUNDS as usize);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.entries.len(), DEVICES as usize);
        if i > 0 {
            assert_eq!(r.model_before, records[i - 1].model_after, "chained models");
        }
        assert!(r.entries.iter().map(|e| e.reward).sum::<u64>() <= r.reward_pool);
        let away = r.entries.iter().find(|e| e.device == away_key).unwrap();
        assert!(away.score < 0.0 && away.reward == 0, "{away:?}");
        for e in r.entries.iter().filter(|e| e.device != away_key) {
            assert!(e.score > 0.0 && e.reward > 0, "{e:?}");
            assert_ne!(
                e.manifest_hash, [0; 32],
                "the signed manifest's hash is kept"
            );
        }
    }
    assert_eq!(records.last().unwrap().model_after, final_version.0);

    // Any single byte of any record or signature, flipped: named.
    for (k, stored) in view.records.iter().enumerate() {
        for field in 0..2 {
            let len = if field == 0 {
                stored.bytes.len()
            } else {
                stored.signature.len()
            };
            for b in 0..len {
                let mut altered: Vec<StoredRecord> = view.records.clone();
                let target = if field == 0 {
                    &mut altered[k].bytes
                } else {
                    &mut altered[k].signature
                };
                target[b] ^= 0x01;
                match ledger::verify_chain(&altered, &key) {
                    Err(e) => assert_eq!(e.seq, stored.seq, "record {k} byte {b}: {e}"),
                    Ok(_) => panic!("record {k} field {field} byte {b} flipped and still verified"),
                }
            }
        }
    }

    // Proofs: every participant's verifies, with its signed record under
    // the ledger key; an altered reward does not, nor a record under
    // another key, nor another round's record.
    let key_hex = hex::encode(key.to_bytes());
    for r in &records {
        let signed = view.records.iter().find(|s| s.seq == r.seq).unwrap();
        for e in &r.entries {
            let mut p = ledger::reward_proof(&records, &e.device, r.round_id).unwrap();
            p.verify().unwrap();
            let json = ledger::proof_json(&p, signed);
            let text = json.to_string();
            let parsed = fedge_device::reward::verify_proof(
                text.as_bytes(),
                None,
                Some(&hex::encode(r.reward_root)),
                Some(&key_hex),
            )
            .unwrap();
            assert_eq!(parsed, p);
            let other_key = hex::encode([9u8; 32]);
            assert!(
                fedge_device::reward::verify_proof(text.as_bytes(), None, None, Some(&other_key))
                    .is_err()
            );
            let mut lie = json.clone();
            lie["reward"] = serde_json::json!(p.reward + 1);
            assert!(
                fedge_device::reward::verify_proof(
                    lie.to_string().as_bytes(),
                    None,
                    None,
                    Some(&key_hex)
                )
                .is_err()
            );
            if let Some(other) = view.records.iter().find(|s| s.seq != r.seq) {
                let mut moved = json.clone();
                moved["record"] = serde_json::json!(hex::encode(&other.bytes));
                moved["record_signature"] = serde_json::json!(hex::encode(&other.signature));
                assert!(matches!(
                    fedge_device::reward::verify_proof(
                        moved.to_string().as_bytes(),
                        None,
                        None,
                        Some(&key_hex)
                    ),
                    Err(fedge_device::reward::RewardProofError::BadRecord(_))
                ));
            }
            p.reward += 1;
            assert!(p.verify().is_err());
        }
    }
    assert!(ledger::reward_proof(&records, &[1; 32], 1).is_err());

    // Ratings persisted: every device rated over every round, the one
    // pushing away from the optimum last.
    assert_eq!(view.ratings.len(), DEVICES as usize);
    assert!(view.ratings.iter().all(|r| r.rounds == ROUNDS));
    assert_eq!(view.ratings.last().unwrap().device, hex::encode(away_key));
    assert!(view.ratings.last().unwrap().rating < 0.0);

    // A record altered in the database, or removed, is named too.
    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!(
            "sqlite://{}",
            dir.path().join("aggregator.db").display()
        ))
        .await
        .unwrap();
    let mut bytes = view.records[1].bytes.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    sqlx::query("UPDATE ledger SET record = $1 WHERE seq = 2")
        .bind(hex::encode(&bytes))
        .execute(&db)
        .await
        .unwrap();
    let altered = LedgerView::open(dir.path()).await.unwrap();
    let e = ledger::verify_chain(&altered.records, &key).unwrap_err();
    assert_eq!(e.seq, 2, "{e}");
    sqlx::query("DELETE FROM ledger WHERE seq = 2")
        .execute(&db)
        .await
        .unwrap();
    let gap = LedgerView::open(dir.path()).await.unwrap();
    let e = ledger::verify_chain(&gap.records, &key).unwrap_err();
    assert_eq!(e.seq, 3, "{e}");
    // Another key: the first record's signature fails.
    let other = SigningKey::from_bytes(&[9; 32]).verifying_key();
    assert_eq!(
        ledger::verify_chain(&view.records, &other).unwrap_err().seq,
        1
    );
}

/// Every entry matches the signed manifest kept with its update; a stored
/// manifest with any byte flipped, another device's manifest in its
/// place, or a missing one after the first record with manifests is named
/// with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_matches_its_stored_signed_manifest() {
    let (dir, _, _) = real_run().await;
    let key = ledger::public_key(dir.path()).unwrap();
    let view = LedgerView::open(dir.path()).await.unwrap();
    let records = ledger::verify_chain(&view.records, &key).unwrap();
    let all = ledger::check_manifests(&records, &view.manifests).unwrap();
    assert_eq!(
        all,
        ledger::ManifestCheck {
            checked: (ROUNDS * u64::from(DEVICES)) as usize,
            unsigned: 0,
            secure_records: 0,
            before_manifests: 0,
        }
    );
    let seq_of = |round: u64| records.iter().find(|r| r.round_id == round).unwrap().seq;

    // Any byte of a stored manifest (round 2's first), flipped.
    let k = view.manifests.iter().position(|m| m.round_id == 2).unwrap();
    for b in 0..view.manifests[k].bytes.len() {
        let mut altered = view.manifests.clone();
        altered[k].bytes[b] ^= 0x01;
        let e = ledger::check_manifests(&records, &altered).unwrap_err();
        assert_eq!(e.seq, seq_of(2), "byte {b}: {e}");
    }
    // Another device's manifest of the same round, under this device.
    let other = view
        .manifests
        .iter()
        .position(|m| m.round_id == 2 && m.device != view.manifests[k].device)
        .unwrap();
    let mut swapped = view.manifests.clone();
    swapped[k].bytes = view.manifests[other].bytes.clone();
    let e = ledger::check_manifests(&records, &swapped).unwrap_err();
    assert!(
        e.seq == seq_of(2) && e.reason.contains("does not hash"),
        "{e}"
    );
    // The same manifest under the next round: signed for another round.
    let mut moved = view.manifests.clone();
    moved.retain(|m| !(m.round_id == 3 && m.device == view.manifests[k].device));
    let mut m = view.manifests[k].clone();
    m.round_id = 3;
    moved.push(m);
    let e = ledger::check_manifests(&records, &moved).unwrap_err();
    assert_eq!(e.seq, seq_of(3), "{e}");
    // A manifest missing from round 3: named. Round 1's all missing: those
    // entries predate the stored manifests.
    let mut missing = view.manifests.clone();
    missing.remove(missing.iter().position(|m| m.round_id == 3).unwrap());
    let e = ledger::check_manifests(&records, &missing).unwrap_err();
    assert!(
        e.seq == seq_of(3) && e.reason.contains("none is stored"),
        "{e}"
    );
    let mut early = view.manifests.clone();
    early.retain(|m| m.round_id != 1);
    let counts = ledger::check_manifests(&records, &early).unwrap();
    assert_eq!(counts.before_manifests, usize::from(DEVICES));
    assert_eq!(counts.checked, 2 * usize::from(DEVICES));

    // Whoever holds the ledger key (the operator) re-signs records at
    // will, so these are edited after the chain check. One entry of an
    // ordinary round naming no manifest: a participant nobody signed for.
    let k2 = records.iter().position(|r| r.round_id == 2).unwrap();
    let mut slipped = records.clone();
    slipped[k2].entries[0].manifest_hash = [0; 32];
    let e = ledger::check_manifests(&slipped, &view.manifests).unwrap_err();
    assert!(e.seq == seq_of(2) && e.reason.contains("1 of its"), "{e}");
    // Every entry naming none but still naming payloads: not the shape of
    // a secure round (its inputs are masked: no payload either).
    let mut named = records.clone();
    for en in &mut named[k2].entries {
        en.manifest_hash = [0; 32];
    }
    let e = ledger::check_manifests(&named, &view.manifests).unwrap_err();
    assert_eq!(e.seq, seq_of(2), "{e}");
    // A whole record in a secure round's shape passes, and is counted as
    // one, so `ledger verify` shows the claim.
    for en in &mut named[k2].entries {
        en.payload_hash = [0; 32];
    }
    let counts = ledger::check_manifests(&named, &view.manifests).unwrap();
    assert_eq!(
        (counts.secure_records, counts.unsigned, counts.checked),
        (1, usize::from(DEVICES), 2 * usize::from(DEVICES))
    );
}
