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
