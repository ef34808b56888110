//! `simulate --aggregators 3` through the real command: a root and three
//! leaf aggregators over loopback QUIC train the MLP to the accuracy one
//! aggregator reaches with the same devices and seed, every device's
//! session finishes, and each leaf's ledger (its devices' contributions,
//! recorded with the root's models) verifies.

use std::path::Path;
use std::process::Command;

fn simulate(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-aggregator"))
        .args(["simulate", "--model", "mlp", "--devices", "6"])
        .args(["--devices-per-round", "6", "--rounds", "3", "--codec", "q8"])
        .args(extra)
        .arg("--out-dir")
        .arg(dir)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn a_tree_of_aggregators_trains_as_one_aggregator_does() {
    let one = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    let single = simulate(one.path(), &[]);
    let split = simulate(tree.path(), &["--aggregators", "3"]);
    for r in [&single, &split] {
        assert_eq!(r["rounds"].as_array().unwrap().len(), 3, "{r}");
        assert_eq!(r["failed_sessions"].as_u64(), Some(0), "{r}");
    }
    let a = single["final_accuracy"].as_f64().unwrap();
    let b = split["final_accuracy"].as_f64().unwrap();
    let initial = split["initial"]["accuracy"].as_f64().unwrap();
    assert!(b > initial + 0.3, "the tree trained {initial} -> {b}");
    // Share caps apply per leaf in the tree, over the whole round alone:
    // the same band, not the same model.
    assert!((a - b).abs() <= 0.03, "one aggregator {a}, tree {b}");
    // Every round's participants are the devices, counted at the leaves.
    for row in split["rounds"].as_array().unwrap() {
        assert_eq!(row["participants"].as_u64(), Some(6), "{row}");
    }
    for leaf in 0..3 {
        let state = tree.path().join("state").join(format!("leaf-{leaf}"));
        let out = Command::new(env!("CARGO_BIN_EXE_fedge-aggregator"))
            .args(["ledger", "verify", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "leaf {leaf}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
