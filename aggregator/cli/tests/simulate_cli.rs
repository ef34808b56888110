//! A short end-to-end simulation through the real `simulate` command: a
//! few rounds of the MLP over loopback QUIC; held-out accuracy must
//! rise well above the initial model's, every round is scored and
//! rewarded, and the run's ledger verifies with `ledger verify`, exports
//! its roots, and proves a device's reward to `fedge-device verify-reward`.

use std::process::Command;

#[test]
fn a_short_simulation_improves_held_out_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-aggregator"))
        .args([
            "simulate",
            "--model",
            "mlp",
            "--devices",
            "6",
            "--devices-per-round",
            "3",
        ])
        .args([
            "--rounds",
            "4",
            "--partition",
            "dirichlet:0.5",
            "--codec",
            "q8",
        ])
        .arg("--out-dir")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("round participants"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    let initial = results["initial"]["accuracy"].as_f64().unwrap();
    let last = results["final_accuracy"].as_f64().unwrap();
    assert_eq!(results["rounds"].as_array().unwrap().len(), 4);
    assert_eq!(results["failed_sessions"].as_u64(), Some(0));
    assert!(last > initial + 0.3, "accuracy {initial} -> {last}");
    let png = std::fs::read(dir.path().join("accuracy.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG plot");

    // Every round scored and rewarded, at a bounded cost.
    let rewards = &results["rewards"];
    assert_eq!(rewards["rounds_settled"].as_u64(), Some(4), "{rewards}");
    assert_eq!(rewards["honest"]["participations"].as_u64(), Some(12));
    assert_eq!(rewards["honest"]["unscored"].as_u64(), Some(0));
    assert!(rewards["reward_paid"].as_u64().unwrap() > 0, "{rewards}");
    let cost = rewards["scoring_cost_fraction_max"].as_f64().unwrap();
    assert!(cost > 0.0 && cost < 1.0, "scoring cost {cost}");
    ledger_checks(&dir.path().join("state"), rewards);
}

fn run(bin: &str, args: &[&str]) -> (bool, String, String) {
    let path = std::path::PathBuf::from(env!("CARGO_BIN_EXE_fedge-aggregator")).with_file_name(bin);
    let out = Command::new(path)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The simulation's state directory: the ledger verifies, exports a root
/// per round, and a participant's proof checks on the device side (and
/// fails with an altered reward).
fn ledger_checks(state: &std::path::Path, rewards: &serde_json::Value) {
    let s = state.to_str().unwrap();
    let (ok, out, err) = run("fedge-aggregator", &["ledger", "verify", "--state-dir", s]);
    assert!(
        ok && out.contains("ledger ok: 4 records, 12 participations")
            && out.contains("manifests checked: 12 participations' signed manifests verify"),
        "{out}{err}"
    );
    // Every score recomputed from the kept models and payloads and the
    // simulation's held-out split (the last 2,000 of the 10,000 digits).
    let recompute = [
        "ledger",
        "verify",
        "--state-dir",
        s,
        "--validation",
        "mnist",
        "--validation-range",
        "8000..10000",
    ];
    let (ok, out, err) = run("fedge-aggregator", &recompute);
    assert!(
        ok && out.contains("scores recomputed: 12 scores in 4 records agree")
            && out.contains("flags recomputed: 12 participations'"),
        "{out}{err}"
    );
    // Another validation set gives other scores: named.
    let (ok, _, err) = run(
        "fedge-aggregator",
        &[
            "ledger",
            "verify",
            "--state-dir",
            s,
            "--validation",
            "mnist",
            "--validation-range",
            "0..2000",
        ],
    );
    assert!(!ok && err.contains("ledger record 1: device"), "{err}");
    // An altered update payload: named.
    let round2 = state.join("updates").join("2");
    let payload = std::fs::read_dir(&round2)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&payload).unwrap();
    let original = bytes.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&payload, &bytes).unwrap();
    let (ok, _, err) = run("fedge-aggregator", &recompute);
    assert!(
        !ok && err.contains("ledger record 2: update payload"),
        "{err}"
    );
    std::fs::write(&payload, &original).unwrap();
    let (ok, out, err) = run("fedge-aggregator", &["ledger", "export", "--state-dir", s]);
    assert!(ok, "{err}");
    let export: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rounds = export["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4);
    let root = rounds[1]["reward_root"].as_str().unwrap();
    let (ok, ratings, err) = run("fedge-aggregator", &["ledger", "ratings", "--state-dir", s]);
    assert!(ok, "{err}");
    let ratings: serde_json::Value = serde_json::from_str(&ratings).unwrap();
    // A participant of round 2 (results.json names it by its first 12
    // hex digits; the ratings by its whole key).
    let short = rewards["participations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["round"].as_u64() == Some(2))
        .unwrap()["device"]
        .as_str()
        .unwrap()
        .to_string();
    let device = ratings
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap().to_string())
        .find(|d| d.starts_with(&short))
        .unwrap();
    let (ok, proof, err) = run(
        "fedge-aggregator",
        &[
            "ledger",
            "proof",
            "--state-dir",
            s,
            "--device",
            &device,
            "--round",
            "2",
        ],
    );
    assert!(ok, "{err}");
    let file = state.join("proof.json");
    std::fs::write(&file, &proof).unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = run("fedge-device", &["verify-reward", f, "--root", root]);
    assert!(ok && out.contains("reward proof ok"), "{out}{err}");
    let mut altered: serde_json::Value = serde_json::from_str(&proof).unwrap();
    altered["reward"] = (altered["reward"].as_u64().unwrap() + 1).into();
    std::fs::write(&file, altered.to_string()).unwrap();
    let (ok, _, err) = run("fedge-device", &["verify-reward", f, "--root", root]);
    assert!(!ok && err.contains("does not lead to the root"), "{err}");
}

/// `simulate` with `args`, its output and exit status (no backtraces:
/// a user sees the error, not a trace).
fn simulate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-aggregator"))
        .arg("simulate")
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn red_team_flags_are_checked_before_anything_runs() {
    for (args, needle) in [
        (
            &["--attack", "bogus"][..],
            "attack `bogus`: use sign-flip, scaling, gaussian, label-flip, alie, zero, hog, replay, liar, free-rider, copycat, near-copy or noise",
        ),
        (
            &["--defaults", "secure"],
            "defaults `secure`: use simulate, serve or legacy",
        ),
        (
            &["--claim-samples", "0"],
            "claim_samples must be at least 1",
        ),
        (&["--attack-scale", "inf"], "attack_scale must be finite"),
        (&["--attacker-stake=-1"], "attacker_stake must be >= 0"),
        (&["--attackers", "1.5"], "attackers must be in [0, 1)"),
        (
            &["--min-devices", "11", "--devices-per-round", "10"],
            "min_devices must be in [1, devices_per_round = 10], got 11",
        ),
        (&["--claim-samples", "lots"], "invalid value 'lots'"),
    ] {
        let (ok, _, stderr) = simulate(args);
        assert!(!ok, "{args:?} ran");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn presets_set_the_weighting_the_other_flags_then_override() {
    let (ok, serve, err) = simulate(&["--defaults", "serve", "--print-config"]);
    assert!(ok, "{err}");
    for needle in [
        "min_devices = 2",
        "max_share = 0.2",
        "allow_unknown = false",
        "kind = \"trimmed_mean\"",
        "kind = \"adaptive_median\"",
        "[weights.samples]\nkind = \"constant\"",
    ] {
        assert!(
            serve.contains(needle),
            "serve preset lacks {needle}:\n{serve}"
        );
    }
    let (ok, legacy, err) = simulate(&[
        "--defaults",
        "legacy",
        "--attackers",
        "0.05",
        "--attack",
        "liar",
        "--claim-samples",
        "5000",
        "--attacker-devices",
        "3",
        "--print-config",
    ]);
    assert!(ok, "{err}");
    for needle in [
        "min_devices = 1",
        "max_share = 1.0",
        "allow_unknown = true",
        "kind = \"constant\"",
        "kind = \"linear\"",
        "kind = \"mean\"",
        "attack = \"liar\"",
        "claim_samples = 5000",
        "attacker_devices = 3",
    ] {
        assert!(
            legacy.contains(needle),
            "legacy preset lacks {needle}:\n{legacy}"
        );
    }
    assert!(!legacy.contains("[strategy.clip]"), "{legacy}");
    // A flag after the preset wins.
    let (ok, mixed, err) = simulate(&[
        "--defaults",
        "serve",
        "--aggregator",
        "median",
        "--min-devices",
        "3",
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert!(mixed.contains("kind = \"median\""), "{mixed}");
    assert!(mixed.contains("min_devices = 3"), "{mixed}");
    assert!(mixed.contains("max_share = 0.2"), "{mixed}");
}

/// The liar (10^12 samples claimed, update sign-flipped x10)
/// against `serve`'s defaults: every round publishes and the model still
/// learns.
#[test]
fn a_liar_does_not_stop_serve_defaults_from_learning() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    // Five per round: the 20% trim removes one update at each end (with
    // three it removes none, and a round the liar sits in made no
    // progress, so the test depended on how often it was drawn).
    let (ok, stdout, stderr) = simulate(&[
        "--defaults",
        "serve",
        "--devices",
        "10",
        "--devices-per-round",
        "5",
        "--rounds",
        "4",
        "--codec",
        "q8",
        "--stakes",
        "uniform",
        "--attackers",
        "0.1",
        "--attack",
        "liar",
        // Generous: a round closes as soon as its three devices are done,
        // and a loaded CI machine once took longer than 4 s to train one.
        "--round-deadline-ms",
        "30000",
        "--out-dir",
        out_dir,
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 of 10 devices attack"), "{stdout}");
    assert!(
        stdout.contains("attack: liar, update x10, claiming 1000000000000 samples"),
        "{stdout}"
    );
    assert!(!stdout.contains("serve would refuse"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["rounds_aborted"].as_array().unwrap().len(), 0);
    assert_eq!(results["stalled"].as_bool(), Some(false));
    let initial = results["initial"]["accuracy"].as_f64().unwrap();
    let last = results["final_accuracy"].as_f64().unwrap();
    assert!(last > initial + 0.3, "accuracy {initial} -> {last}");
}

/// Two staked keys that take tasks and never upload, beside six honest
/// devices: the run finishes, the hogs are stopped at the end, and no
/// honest session fails.
#[test]
fn slot_hogs_run_and_are_stopped_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = simulate(&[
        "--devices",
        "6",
        "--devices-per-round",
        "3",
        "--min-devices",
        "1",
        "--rounds",
        "2",
        "--codec",
        "q8",
        "--attacker-devices",
        "2",
        "--attacker-stake",
        "1",
        "--attack",
        "hog",
        "--round-deadline-ms",
        "6000",
        "--out-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("2 attacking devices added beyond them (stake 1 each)"),
        "{stdout}"
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["failed_sessions"].as_u64(), Some(0), "{stdout}");
    assert_eq!(results["rounds_published"].as_u64(), Some(2), "{stdout}");
}

/// Central DP over the real simulation: every published round carries the
/// privacy spent, epsilon grows with the rounds and the rho-zCDP figure is
/// rounds / (2 z^2); a robust combiner or FedBuff beside DP is refused
/// before anything runs.
#[test]
fn dp_runs_report_the_privacy_spent_and_incompatible_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = simulate(&[
        "--devices",
        "6",
        "--devices-per-round",
        "3",
        "--rounds",
        "3",
        "--codec",
        "q8",
        "--dp-noise",
        "0.8",
        "--dp-clip",
        "fixed:0.5",
        "--dp-population",
        "600",
        "--out-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("privacy spent: epsilon"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    let rows = results["rounds"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let eps: Vec<f64> = rows
        .iter()
        .map(|r| r["privacy"]["epsilon"].as_f64().unwrap())
        .collect();
    assert!(
        eps[0] > 0.0 && eps.windows(2).all(|w| w[1] > w[0]),
        "{eps:?}"
    );
    let rho = results["privacy"]["rho_zcdp"].as_f64().unwrap();
    assert!((rho - 3.0 / (2.0 * 0.64)).abs() < 1e-9, "{rho}");
    assert_eq!(results["privacy"]["clip_bound"].as_f64(), Some(0.5));

    for (extra, needle) in [
        (&["--defaults", "serve"][..], "combine = mean"),
        (&["--strategy", "fedbuff"][..], "FedBuff"),
        (&["--dp-population", "2"][..], "population"),
    ] {
        let mut args = vec!["--dp-noise", "1", "--rounds", "1"];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = simulate(&args);
        assert!(!ok, "{extra:?} ran: {stdout}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
}

/// `simulate --lora` (the aggregator's `[plan.lora]`): the devices train
/// and upload only the adapters of the character model, accuracy rises,
/// and `model export` writes the state directory's global model as plain
/// ONNX, with the adapters as initializers or merged into the weights.
#[test]
fn a_lora_simulation_uploads_adapters_and_exports_plain_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (ok, stdout, stderr) = simulate(&[
        "--model",
        "char",
        "--data",
        "shakespeare",
        "--partition",
        "role",
        "--devices",
        "4",
        "--devices-per-round",
        "4",
        "--rounds",
        "2",
        "--train-samples",
        "800",
        "--learning-rate",
        "0.1",
        "--codec",
        "dense-f32",
        "--lora",
        "rank=4,alpha=8,targets=fc*",
        "--out-dir",
        dir.path().to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["trained_parameters"].as_u64(), Some(4356));
    assert_eq!(results["model_parameters"].as_u64(), Some(149_585));
    // A dense f32 update of the adapters, plus the payload's envelope.
    let per_update = results["upload_bytes_per_update"].as_f64().unwrap();
    assert!(
        (4.0 * 4356.0..4.0 * 4356.0 + 256.0).contains(&per_update),
        "{per_update}"
    );
    let fraction = results["upload_fraction_of_model_bytes"].as_f64().unwrap();
    assert!(fraction < 0.03, "{fraction}");
    let initial = results["initial"]["accuracy"].as_f64().unwrap();
    let last = results["final_accuracy"].as_f64().unwrap();
    assert!(last > initial + 0.05, "accuracy {initial} -> {last}");

    let version = results["final_version"].as_str().unwrap();
    for merge in [false, true] {
        let out = dir.path().join(format!("global-{merge}.onnx"));
        let mut args = vec![
            "model",
            "export",
            "--state-dir",
            state.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if merge {
            args.push("--merge");
        }
        let (ok, stdout, stderr) = run("fedge-aggregator", &args);
        assert!(ok, "{stdout}\n{stderr}");
        assert!(stdout.starts_with(version), "{stdout}");
        // Plain ONNX: it imports, every weight a parameter again; merged,
        // exactly the model's own tensors.
        let (ok, info, stderr) = run(
            "fedge-aggregator",
            &["model", "info", out.to_str().unwrap()],
        );
        assert!(ok, "{stderr}");
        let want = if merge { 149_585 } else { 149_585 + 4356 };
        assert!(info.contains(&format!("parameters {want}\n")), "{info}");
        assert_eq!(info.contains("lora_A"), !merge, "{info}");
    }
    let (ok, _, stderr) = run(
        "fedge-aggregator",
        &[
            "model",
            "export",
            "--state-dir",
            dir.path().join("nothing").to_str().unwrap(),
            "--out",
            "x.onnx",
        ],
    );
    assert!(
        !ok && stderr.contains("is this a state directory?"),
        "{stderr}"
    );

    // `serve` resumes the state directory only with the adapters it
    // started with (checked before it listens).
    let cfg = dir.path().join("other-lora.toml");
    std::fs::write(
        &cfg,
        "i_know_this_is_unsafe = true\n[weights]\nstake = { kind = \"constant\" }\n\
         allow_unknown = true\n[plan.lora]\nrank = 8\ntargets = [\"fc*\"]\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(
        "fedge-aggregator",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && stderr.contains("does not carry the adapters [plan.lora] names")
            && stderr.contains("but the model carries rank=4,alpha=8,targets=fc*"),
        "{stderr}"
    );
}

/// The copycat re-signs an honest device's accepted payload. On
/// `simulate`'s default codec (top-k with error feedback) its payload is
/// the victim's, so every one of its participations is flagged as a copy
/// and unpaid, and the flags verify.
#[test]
fn a_copycat_on_the_default_codec_is_flagged_every_round() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (ok, stdout, stderr) = simulate(&[
        "--model",
        "mlp",
        "--devices",
        "6",
        "--devices-per-round",
        "6",
        "--rounds",
        "3",
        "--attackers",
        "0.17",
        "--attack",
        "copycat",
        "--seed",
        "5",
        "--out-dir",
        dir.path().to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("1 of 6 devices attack"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    let adversarial = &results["rewards"]["adversarial"];
    assert_eq!(
        adversarial["participations"].as_u64(),
        Some(3),
        "{adversarial}"
    );
    assert_eq!(
        adversarial["flagged_copy"].as_u64(),
        Some(3),
        "{adversarial}"
    );
    assert_eq!(adversarial["reward"].as_u64(), Some(0), "{adversarial}");
    for p in results["rewards"]["participations"].as_array().unwrap() {
        if p["adversarial"].as_bool() == Some(true) {
            let similarity = p["similarity"].as_f64().unwrap();
            assert!(similarity > 0.999, "the copy is the payload: {p}");
        }
    }
    let (ok, out, err) = run(
        "fedge-aggregator",
        &[
            "ledger",
            "verify",
            "--state-dir",
            state.to_str().unwrap(),
            "--validation",
            "mnist",
            "--validation-range",
            "8000..10000",
        ],
    );
    assert!(
        ok && out.contains("flags recomputed: 18 participations'"),
        "{out}{err}"
    );
}
