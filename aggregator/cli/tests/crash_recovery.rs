//! Kill the real aggregator with SIGKILL in the middle of a round and
//! restart it: no acknowledged update is lost, the round completes with
//! them, and its ledger record (with the restored updates' signed-manifest
//! hashes) verifies with `fedge-aggregator ledger verify`. One aggregator
//! per state directory and database: a second is refused while the first
//! runs, and starts once it is killed. A scored run's ratings and chain
//! survive a kill mid-round too. Each once with the tables in
//! SQLite, once in PostgreSQL (`FEDGE_TEST_PG_URL`, see `ci/pg.sh`). With
//! PostgreSQL, an aggregator whose database lock is lost mid-round stops
//! with the error and the next one finishes the round with every
//! acknowledged update.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::procs;
use procs::{
    CLOSED_FLEET, Proc, bin, closed_fleet_config, device_succeeded, listening, start_device,
    start_training_device, stderr_lines, wait_exit, wait_for,
};

use fedge_aggregator::store::{Database, LedgerView, Store, testing};
use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, TensorSpec};

/// What an aggregator of these tests runs: its model, `serve`'s rounds
/// (of three devices each) and its configuration.
struct Run<'a> {
    model: &'a Path,
    rounds: u32,
    config: std::path::PathBuf,
}

impl<'a> Run<'a> {
    /// One round of `model` with the closed-fleet configuration.
    fn one_round(state: &Path, model: &'a Path) -> Self {
        Run {
            model,
            rounds: 1,
            config: closed_fleet_config(state.parent().expect("state has a parent")),
        }
    }
}

/// `serve` for `run` on `state` and `database`.
fn serve(listen: &str, state: &Path, database: &Database, run: &Run<'_>) -> Command {
    let mut c = Command::new(bin("fedge-aggregator"));
    let rounds = run.rounds.to_string();
    c.args(["serve", "--listen", listen, "--rounds", &rounds])
        .arg("--config")
        .arg(&run.config)
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
        .arg(run.model)
        .env("RUST_LOG", "warn");
    c
}

fn start_aggregator(
    listen: &str,
    state: &Path,
    database: &Database,
    run: &Run<'_>,
) -> (Proc, String, String) {
    let mut p = Proc(
        serve(listen, state, database, run)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (addr, fp) = listening(&mut p);
    (p, addr, fp)
}

/// Devices a, b and c each succeed having contributed to one round, and
/// the aggregator exits cleanly after them.
fn each_contributed_once_and_the_aggregator_finished(devices: [Proc; 3], agg: &mut Proc) {
    for (name, mut p) in ["a", "b", "c"].into_iter().zip(devices) {
        let out = device_succeeded(name, &mut p, Duration::from_secs(60));
        assert!(
            out.contains("rounds_contributed=1 "),
            "device {name}: {out}"
        );
    }
    assert!(wait_exit(agg, Duration::from_secs(30)).success());
}

/// Six parameters at 0.5, in `dir/m.fedge`.
fn model_file(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("m.fedge");
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[6])]).unwrap());
    let initial = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.5; 6]).unwrap(),
    };
    std::fs::write(&model, initial.encode()).unwrap();
    model
}

#[test]
fn sigkill_mid_round_loses_no_acknowledged_update_sqlite() {
    sigkill_mid_round_loses_no_acknowledged_update(Database::Sqlite);
}

#[test]
fn sigkill_mid_round_loses_no_acknowledged_update_postgres() {
    sigkill_mid_round_loses_no_acknowledged_update(fresh_postgres("sigkill"));
}

/// A fresh database on the test server (see `testing::fresh_postgres`).
fn fresh_postgres(label: &str) -> Database {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(testing::fresh_postgres(label))
}

fn sigkill_mid_round_loses_no_acknowledged_update(database: Database) {
    // The device binary must be current (see e2e_processes.rs).
    assert!(
        bin("fedge-device").exists(),
        "build the workspace first (cargo test --workspace)"
    );
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(dir.path());
    let state = dir.path().join("agg");
    let run = Run::one_round(&state, &model);

    let (mut agg, addr, fp) = start_aggregator("127.0.0.1:0", &state, &database, &run);
    let (a, a_log) = start_device(&addr, &fp, &dir.path().join("a"), "1.0");
    let (b, b_log) = start_device(&addr, &fp, &dir.path().join("b"), "2.0");
    wait_for(&a_log, "update accepted", Duration::from_secs(30));
    wait_for(&b_log, "update accepted", Duration::from_secs(30));

    // Two of three updates acknowledged: kill -9.
    agg.0.kill().unwrap();
    agg.0.wait().unwrap();

    let (mut agg, addr2, fp2) = start_aggregator(&addr, &state, &database, &run);
    assert_eq!(
        (&addr2, &fp2),
        (&addr, &fp),
        "same address and identity after restart"
    );
    let (c, _c_log) = start_device(&addr, &fp, &dir.path().join("c"), "3.0");
    // Had the restarted aggregator forgotten a and b, they would have
    // been selected again and contributed twice.
    each_contributed_once_and_the_aggregator_finished([a, b, c], &mut agg);

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
        out.status.success()
            && stdout.contains("ledger ok: 1 records, 3 participations")
            && stdout.contains("manifests checked: 3 participations'"),
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

/// Mid-round (two of three updates acknowledged), the PostgreSQL server
/// ends the session holding the aggregator's database lock (as a server
/// restart or a cut network would): the aggregator stops within its
/// checks with the lost-lock error, exiting non-zero. The next aggregator
/// takes the database and finishes the round with both acknowledged
/// updates (the final model counts them). SQLite's lock is the state
/// directory's open file, which cannot be lost while the process runs.
#[test]
fn a_lost_database_lock_stops_the_aggregator_and_the_next_resumes_postgres() {
    let database = fresh_postgres("lock_lost_serve");
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(dir.path());
    let state = dir.path().join("agg");
    let config = dir.path().join("lock-check.toml");
    std::fs::write(
        &config,
        format!("{CLOSED_FLEET}\n[server]\nlock_check_ms = 100\n"),
    )
    .unwrap();
    let run = Run {
        model: &model,
        rounds: 1,
        config,
    };
    let mut agg = Proc(
        serve("127.0.0.1:0", &state, &database, &run)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (addr, fp) = listening(&mut agg);
    let errors = stderr_lines(&mut agg);
    let (a, a_log) = start_device(&addr, &fp, &dir.path().join("a"), "1.0");
    let (b, b_log) = start_device(&addr, &fp, &dir.path().join("b"), "2.0");
    wait_for(&a_log, "update accepted", Duration::from_secs(30));
    wait_for(&b_log, "update accepted", Duration::from_secs(30));

    let ended = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(testing::end_lock_session(&database));
    assert_eq!(ended, 1, "the aggregator's lock session");
    let status = wait_exit(&mut agg, Duration::from_secs(30));
    // Every line, up to the end of its standard error.
    let err: Vec<String> = errors.iter().collect();
    let err = err.join("\n");
    assert!(!status.success(), "it served on: {err}");
    assert!(
        err.contains("lost the lock on database") && err.contains("advisory lock"),
        "{err}"
    );

    let (mut agg, addr2, _) = start_aggregator(&addr, &state, &database, &run);
    assert_eq!(addr2, addr);
    let (c, _c_log) = start_device(&addr, &fp, &dir.path().join("c"), "3.0");
    each_contributed_once_and_the_aggregator_finished([a, b, c], &mut agg);
    // 0.5 + (1 + 2 + 3) / 3: both acknowledged updates made it in.
    for d in ["a", "b", "c"] {
        let bytes = std::fs::read(dir.path().join(d).join("model.fedge")).unwrap();
        let m = ModelBlob::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(m.params.values, vec![2.5; 6], "device {d}'s final model");
    }
}

#[test]
fn one_aggregator_per_state_directory_sqlite() {
    one_aggregator_per_state_directory(Database::Sqlite);
}

#[test]
fn one_aggregator_per_state_directory_postgres() {
    one_aggregator_per_state_directory(fresh_postgres("state_lock"));
}

/// While one `serve` runs, a second on its state directory fails at
/// startup naming the lock file and the first's process id; with
/// PostgreSQL, so does one on the same database from another state
/// directory, naming the advisory lock and the first's process. Once the
/// first is SIGKILLed (the locks die with it), the second starts.
fn one_aggregator_per_state_directory(database: Database) {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(dir.path());
    let state = dir.path().join("agg");
    let run = Run::one_round(&state, &model);
    let (mut first, addr, _) = start_aggregator("127.0.0.1:0", &state, &database, &run);
    let pid = first.0.id();
    let refused = |state: &Path| -> String {
        let mut p = Proc(
            serve("127.0.0.1:0", state, &database, &run)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let status = wait_exit(&mut p, Duration::from_secs(30));
        let mut err = String::new();
        std::io::Read::read_to_string(p.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "a second aggregator started: {err}");
        err
    };
    let err = refused(&state);
    assert!(
        err.contains("is in use by another aggregator")
            && err.contains(&state.join("aggregator.lock").display().to_string())
            && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    if let Database::Postgres(_) = database {
        let err = refused(&dir.path().join("elsewhere"));
        assert!(
            err.contains("advisory lock") && err.contains(&format!("fedge-aggregator pid {pid}")),
            "{err}"
        );
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_second, addr2, _) = start_aggregator(&addr, &state, &database, &run);
    assert_eq!(
        addr2, addr,
        "the second serves from the same state directory"
    );
}

#[test]
fn sigkill_mid_round_keeps_ratings_and_the_chain_sqlite() {
    sigkill_mid_round_keeps_ratings_and_the_chain(Database::Sqlite);
}

#[test]
fn sigkill_mid_round_keeps_ratings_and_the_chain_postgres() {
    sigkill_mid_round_keeps_ratings_and_the_chain(fresh_postgres("sigkill_ratings"));
}

/// A scored run (the MNIST MLP, three devices training on shards of the
/// shipped digits, scored on the last 2,000): round 1 publishes and rates
/// every device; device c goes away; the aggregator is SIGKILLed once a's
/// and b's round-2 updates are acknowledged. Restarted, with c back, it
/// finishes round 2: every device is rated over both rounds (round 1's
/// ratings survived the kill), and the two-record chain verifies with
/// every score and flag recomputed.
fn sigkill_mid_round_keeps_ratings_and_the_chain(database: Database) {
    assert!(
        bin("fedge-device").exists(),
        "build the workspace first (cargo test --workspace)"
    );
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mlp.fedge");
    let onnx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mlp.onnx");
    let out = Command::new(bin("fedge-aggregator"))
        .args(["model", "import"])
        .arg(&onnx)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = dir.path().join("scored.toml");
    let scoring = "\n[scoring]\nvalidation = \"mnist\"\nvalidation_range = \"8000..10000\"\n";
    std::fs::write(&config, format!("{CLOSED_FLEET}{scoring}")).unwrap();
    let state = dir.path().join("agg");
    let run = Run {
        model: &model,
        rounds: 2,
        config,
    };
    let ratings = |rounds: u64| {
        let view = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(LedgerView::open_with(&state, &database))
            .unwrap();
        assert_eq!(view.ratings.len(), 3, "{:?}", view.ratings);
        assert!(
            view.ratings.iter().all(|r| r.rounds == rounds),
            "every device rated over {rounds} rounds: {:?}",
            view.ratings
        );
        view.ratings
    };

    let (mut agg, addr, fp) = start_aggregator("127.0.0.1:0", &state, &database, &run);
    let device =
        |name: &str, range: &str| start_training_device(&addr, &fp, &dir.path().join(name), range);
    let (mut a, a_log) = device("a", "0..300");
    let (mut b, b_log) = device("b", "300..600");
    let (mut c, c_log) = device("c", "600..900");
    for log in [&a_log, &b_log, &c_log] {
        wait_for(log, "update accepted", Duration::from_secs(120));
    }
    // c goes away; a and b train round 2 and are acknowledged: kill -9.
    c.0.kill().unwrap();
    c.0.wait().unwrap();
    wait_for(&a_log, "update accepted", Duration::from_secs(120));
    wait_for(&b_log, "update accepted", Duration::from_secs(120));
    agg.0.kill().unwrap();
    agg.0.wait().unwrap();
    let before = ratings(1);

    let (mut agg, _, _) = start_aggregator(&addr, &state, &database, &run);
    let (mut c, _c_log) = device("c", "600..900");
    for (name, p) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
        device_succeeded(name, p, Duration::from_secs(120));
    }
    assert!(wait_exit(&mut agg, Duration::from_secs(30)).success());
    let after = ratings(2);
    assert!(
        before.iter().zip(&after).all(|(b, a)| b.device == a.device),
        "{before:?} {after:?}"
    );

    let state_arg = state.to_str().unwrap();
    let out = Command::new(bin("fedge-aggregator"))
        .args(["ledger", "verify", "--state-dir", state_arg])
        .args(["--database", &String::from(database.clone())])
        .args(["--validation", "mnist", "--validation-range", "8000..10000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("scores recomputed: 6 scores in 2 records agree")
            && stdout.contains("ledger ok: 2 records, 6 participations"),
        "ledger verify: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
