//! A short end-to-end simulation through the real `simulate` command: a
//! few rounds of the MLP over loopback QUIC; held-out accuracy must
//! rise well above the initial model's.

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
}
