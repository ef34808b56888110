//! The `fedge-device` binary's command line: clear errors for bad input,
//! an identity that is created once and kept.

use std::process::Command;

fn device() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedge-device"))
}

#[test]
fn identity_is_stable_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let out = device()
            .args(["identity", "--state-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run();
    assert_eq!(a.trim().len(), 64, "{a}");
    assert_eq!(a, run());
}

#[test]
fn missing_trust_and_bad_pins_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = device()
        .args(["run", "--aggregator", "127.0.0.1:9", "--known-update", "1"])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pin") && err.contains("--trust-on-first-use"),
        "{err}"
    );

    let out = device()
        .args([
            "run",
            "--aggregator",
            "127.0.0.1:9",
            "--pin",
            "abcd",
            "--known-update",
            "1",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("64 hex digits"), "{err}");

    let out = device()
        .args([
            "run",
            "--aggregator",
            "no-such-host.invalid:1",
            "--trust-on-first-use",
        ])
        .args(["--known-update", "1"])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot resolve aggregator address"), "{err}");
}

/// `train --threads`: the step's products on two threads train the MLP
/// (its loss falls over an epoch); 0 threads is refused with the range.
#[test]
fn train_takes_a_thread_count() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("train.json");
    let out = device()
        .args(["train", "--model"])
        .arg(root.join("models/mlp.onnx"))
        .arg("--data")
        .arg(format!("mnist:{}", root.join("models/data").display()))
        .args([
            "--train",
            "0..512",
            "--test",
            "512..768",
            "--epochs",
            "2",
            "--threads",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let loss: Vec<f64> = results["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["train_loss"].as_f64().unwrap())
        .collect();
    assert!(loss.len() == 2 && loss[1] < loss[0], "{loss:?}");

    let out = device()
        .args(["train", "--model"])
        .arg(root.join("models/mlp.onnx"))
        .args(["--threads", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--threads") && err.contains("1..=256"),
        "{err}"
    );
}
