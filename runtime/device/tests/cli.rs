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

/// `train --lora`: adapters on the character model's FC weights train
/// (the loss falls), `--out` writes them as plain ONNX, with `--merge`
/// folded into the weights, and both files run (`infer`); a target
/// pattern that matches no weight is refused naming it.
#[test]
fn train_with_lora_writes_plain_onnx() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let train = |lora: &str, extra: &[&str]| {
        device()
            .args(["train", "--model"])
            .arg(root.join("models/char_model.onnx"))
            .args([
                "--data",
                "shakespeare",
                "--train",
                "0..512",
                "--test",
                "512..640",
                "--epochs",
                "2",
                "--optimizer",
                "adam",
                "--lr",
                "0.01",
                "--lora",
                lora,
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    for (file, merge) in [("adapters.onnx", false), ("merged.onnx", true)] {
        let out_path = dir.path().join(file);
        let json = dir.path().join(format!("{file}.json"));
        let mut extra = vec![
            "--out",
            out_path.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ];
        if merge {
            extra.push("--merge");
        }
        let out = train("rank=4,alpha=8,targets=fc*", &extra);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("LoRA rank=4,alpha=8,targets=fc*: 4356 adapter parameters train"),
            "{stdout}"
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
            .args(["infer", "--model"])
            .arg(&out_path)
            .args(["--data", "shakespeare", "--range", "700..704"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = train("rank=4,targets=conv*", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`conv*` matches no MatMul or Gemm weight") && err.contains("`fc1.weight`"),
        "{err}"
    );
}
