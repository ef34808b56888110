//! Kill the real aggregator with SIGKILL in the middle of a round and
//! restart it: no acknowledged update is lost, the round completes with
//! them, and its ledger record (with the restored updates' signed-manifest
//! hashes) verifies with `fedge-aggregator ledger verify`. Once with the
//! tables in SQLite, once in PostgreSQL (`FEDGE_TEST_PG_URL`, see
//! `ci/pg.sh`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod procs;
use procs::{Proc, closed_fleet_config, wait_exit};

use fedge_aggregator::store::{Database, LedgerView, Store, testing};
use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, TensorSpec};

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fedge-aggregator")).with_file_name(name)
}

fn start_aggregator(
    listen: &str,
    state: &Path,
    database: &Database,
    model: &Path,
) -> (Proc, String, String) {
    let mut p = Proc(
        Command::new(bin("fedge-aggregator"))
            .args(["serve", "--listen", listen, "--rounds", "1"])
            .arg("--config")
            .arg(closed_fleet_config(
                state.parent().expect("state has a parent"),
            ))
            .args([
                "--devices-per-round",
                "3",
                "--min-devices",
                "3",
                "--round-deadline-ms",
                "120000",
            ])
            .arg("--state-dir")
            .arg(state)
            .arg("--database")
            .arg(String::from(database.clone()))
            .arg("--model")
            .arg(model)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(p.0.stdout.take().unwrap()).lines();
    let (mut addr, mut fp) = (String::new(), String::new());
    while addr.is_empty() || fp.is_empty() {
        let line = lines.next().expect("aggregator output").unwrap();
        if let Some(a) = line.strip_prefix("listening ") {
            addr = a.into();
        } else if let Some(f) = line.strip_prefix("fingerprint ") {
            fp = f.into();
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (p, addr, fp)
}

/// A device process and a channel of its log lines.
fn start_device(addr: &str, fp: &str, state: &Path, value: &str) -> (Proc, mpsc::Receiver<String>) {
    let mut p = Proc(
        Command::new(bin("fedge-device"))
            .args(["run", "--aggregator", addr, "--pin", fp])
            .arg("--state-dir")
            .arg(state)
            .args(["--known-update", value, "--samples", "1"])
            .args(["--keepalive-ms", "300", "--idle-timeout-ms", "1500"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let err = p.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (p, rx)
}

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100))
            && line.contains(needle)
        {
            return;
        }
    }
    panic!("no `{needle}` within {limit:?}");
}

#[test]
fn sigkill_mid_round_loses_no_acknowledged_update_sqlite() {
    sigkill_mid_round_loses_no_acknowledged_update(Database::Sqlite);
}

#[test]
fn sigkill_mid_round_loses_no_acknowledged_update_postgres() {
    let db = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(testing::fresh_postgres("sigkill"));
    sigkill_mid_round_loses_no_acknowledged_update(db);
}

fn sigkill_mid_round_loses_no_acknowledged_update(database: Database) {
    // The device binary must be current (see e2e_processes.rs).
    assert!(
        bin("fedge-device").exists(),
        "build the workspace first (cargo test --workspace)"
    );
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.fedge");
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[6])]).unwrap());
    let initial = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.5; 6]).unwrap(),
    };
    std::fs::write(&model, initial.encode()).unwrap();
    let state = dir.path().join("agg");

    let (mut agg, addr, fp) = start_aggregator("127.0.0.1:0", &state, &database, &model);
    let (mut a, a_log) = start_device(&addr, &fp, &dir.path().join("a"), "1.0");
    let (mut b, b_log) = start_device(&addr, &fp, &dir.path().join("b"), "2.0");
    wait_for(&a_log, "update accepted", Duration::from_secs(30));
    wait_for(&b_log, "update accepted", Duration::from_secs(30));

    // Two of three updates acknowledged: kill -9.
    agg.0.kill().unwrap();
    agg.0.wait().unwrap();

    let (mut agg, addr2, fp2) = start_aggregator(&addr, &state, &database, &model);
    assert_eq!(
        (&addr2, &fp2),
        (&addr, &fp),
        "same address and identity after restart"
    );
    let (mut c, _c_log) = start_device(&addr, &fp, &dir.path().join("c"), "3.0");
    for (name, p) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
        let status = wait_exit(p, Duration::from_secs(60));
        assert!(status.success(), "device {name} exited with {status}");
        let mut out = String::new();
        std::io::Read::read_to_string(p.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        // Had the restarted aggregator forgotten a and b, they would have
        // been selected again and contributed twice.
        assert!(
            out.contains("rounds_contributed=1 "),
            "device {name}: {out}"
        );
    }
    assert!(wait_exit(&mut agg, Duration::from_secs(30)).success());

    // The contribution records survived too: three accepted in round 1.
    let records = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open_with(&state, &database).await.unwrap();
        store.contributions(1).await.unwrap()
    });
    assert_eq!(
        records.iter().filter(|c| c.accepted).count(),
        3,
        "{records:?}"
    );
    assert!(
        records.iter().all(|c| (c.share - 1.0 / 3.0).abs() < 1e-9),
        "{records:?}"
    );

    // The ledger: one record, for the published version, naming all three
    // devices with the hashes of their signed manifests (a's and b's
    // restored from the store after the kill); the chain verifies.
    let out = Command::new(bin("fedge-aggregator"))
        .args(["ledger", "verify", "--state-dir"])
        .arg(&state)
        .arg("--database")
        .arg(String::from(database.clone()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ledger ok: 1 records, 3 participations"),
        "ledger verify: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(LedgerView::open_with(&state, &database))
        .unwrap();
    let key = fedge_aggregator::ledger::public_key(&state).unwrap();
    let ledger = fedge_aggregator::ledger::verify_chain(&view.records, &key).unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].round_id, 1);
    assert_eq!(ledger[0].entries.len(), 3);
    assert!(
        ledger[0].entries.iter().all(|e| e.manifest_hash != [0; 32]),
        "every manifest hash kept across the kill: {:?}",
        ledger[0].entries
    );
    let final_model = std::fs::read(dir.path().join("a").join("model.fedge")).unwrap();
    assert_eq!(
        ledger[0].model_after,
        ModelBlob::decode(&final_model, &Limits::default())
            .unwrap()
            .version()
            .0
    );

    // 0.5 + (1 + 2 + 3) / 3: both acknowledged updates made it in.
    for d in ["a", "b", "c"] {
        let bytes = std::fs::read(dir.path().join(d).join("model.fedge")).unwrap();
        let m = ModelBlob::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(m.params.values, vec![2.5; 6], "device {d}'s final model");
    }
}
