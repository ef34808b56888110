//! End to end with real processes: the `fedge-aggregator` binary and three
//! `fedge-device` processes on loopback QUIC complete two rounds. Models
//! are downloaded, updates uploaded, verified and aggregated, and the next
//! version is published and fetched; the final model equals the
//! hand-computed value.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::procs;
use procs::{Proc, closed_fleet_config, read_listening, wait_exit};

use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, TensorSpec};

fn aggregator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fedge-aggregator"))
}

/// `fedge-device` sits beside `fedge-aggregator` in the target directory.
/// `cargo test --workspace` builds it (the device package has integration
/// tests); when only this package is tested it may be missing or older
/// than the device library this test was built with, and is rebuilt.
fn device_bin() -> PathBuf {
    let path = aggregator_bin().with_file_name("fedge-device");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let newest_device_lib = std::fs::read_dir(path.with_file_name("deps"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            // Libraries only: `cargo clippy` and `cargo check` leave newer
            // `.rmeta` files that say nothing about the binary.
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("libfedge_device-") && name.ends_with(".rlib")
        })
        .filter_map(|e| modified(&e.path()))
        .max();
    let stale = match (modified(&path), newest_device_lib) {
        (None, _) => true,
        (Some(bin), Some(lib)) => bin < lib,
        (Some(_), None) => false,
    };
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The workspace, as `cargo test --workspace` resolves it: `-p
        // fedge-device` alone resolves other features and rebuilds tract.
        cmd.args(["build", "--quiet", "--workspace", "--locked", "--bins"]);
        if path.parent().and_then(|p| p.file_name()) == Some(std::ffi::OsStr::new("release")) {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo runs").success(),
            "building fedge-device"
        );
    }
    assert!(path.exists(), "fedge-device at {}", path.display());
    path
}

fn read_model(path: &Path) -> ModelBlob {
    ModelBlob::decode(&std::fs::read(path).unwrap(), &Limits::default()).unwrap()
}

#[test]
fn aggregator_and_three_device_processes_complete_two_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("initial.fedge");
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec::new("w", &[8, 4]),
            TensorSpec::new("b", &[4]),
        ])
        .unwrap(),
    );
    let initial = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.5; 36]).unwrap(),
    };
    std::fs::write(&model_path, initial.encode()).unwrap();
    let device_bin = device_bin();
    let t0 = Instant::now();

    let agg_state = dir.path().join("agg");
    let mut agg = Proc(
        Command::new(aggregator_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--rounds", "2"])
            .arg("--config")
            .arg(closed_fleet_config(dir.path()))
            .args(["--devices-per-round", "3", "--min-devices", "3"])
            .arg("--state-dir")
            .arg(&agg_state)
            .arg("--model")
            .arg(&model_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(agg.0.stdout.take().unwrap()).lines();
    let (addr, fingerprint) = read_listening(&mut lines);

    // Known updates: values 0.5, 1.0, 2.0 with 1, 2, 4 samples.
    // Weighted mean per round = (0.5 + 2 + 8) / 7 = 1.5.
    let updates = [("0.5", "1"), ("1.0", "2"), ("2.0", "4")];
    let mut devices = Vec::new();
    for (i, (value, samples)) in updates.iter().enumerate() {
        let state = dir.path().join(format!("dev{i}"));
        let child = Command::new(&device_bin)
            .args(["run", "--aggregator", &addr, "--pin", &fingerprint])
            .arg("--state-dir")
            .arg(&state)
            .args(["--known-update", value, "--samples", samples])
            .args(["--seed", &i.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        devices.push((Proc(child), state));
    }
    let mut device_finals = Vec::new();
    for (p, state) in &mut devices {
        let status = wait_exit(p, Duration::from_secs(60));
        eprintln!("device done at {:?}", t0.elapsed());
        assert!(status.success(), "device exited with {status}");
        let mut out = String::new();
        std::io::Read::read_to_string(p.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(out.contains("rounds_contributed=2"), "{out}");
        device_finals.push(read_model(&state.join("model.fedge")));
    }
    let status = wait_exit(&mut agg, Duration::from_secs(30));
    eprintln!("agg done at {:?}", t0.elapsed());
    assert!(status.success(), "aggregator exited with {status}");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let finished = rest
        .iter()
        .find_map(|l| l.strip_prefix("finished "))
        .expect("aggregator reports its end");
    assert!(finished.contains("rounds=2"), "{finished}");
    let final_hex = finished.split("final_version=").nth(1).unwrap().trim();

    let published = read_model(&agg_state.join("models").join(format!("{final_hex}.fedge")));
    assert_eq!(published.version().to_hex(), final_hex);
    // 0.5 + 2 rounds x 1.5 = 3.5 exactly in f32.
    assert_eq!(published.params.values, vec![3.5; 36]);
    for m in &device_finals {
        assert_eq!(
            m.version(),
            published.version(),
            "devices fetched the final version"
        );
    }
}
