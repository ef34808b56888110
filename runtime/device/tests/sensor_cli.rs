//! `fedge-device collect` and the device-policy flags of `run`: clear
//! errors for a missing bus, unknown activities and an unreadable power
//! state, before anything is sampled or sent.

use std::process::Command;

fn device() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedge-device"))
}

fn fails_with(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected failure: {cmd:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn collect_with_a_missing_i2c_device_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("samples");
    let err = fails_with(
        device()
            .args(["collect", "--i2c", "/no/such/i2c-9", "--addr", "0x68"])
            .args(["--label", "walking", "--store"])
            .arg(&store),
    );
    if cfg!(feature = "sensors-linux") {
        assert!(
            err.contains("cannot open I2C bus /no/such/i2c-9") && err.contains("i2c-dev"),
            "{err}"
        );
    } else {
        assert!(err.contains("--features sensors-linux"), "{err}");
    }
    // The store was made before the bus was tried, and is empty.
    let s = fedge_device::store::SampleStore::open(&store).unwrap();
    assert!(s.is_empty());
}

#[test]
fn collect_rejects_bad_labels_addresses_and_windows_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails_with(
        device()
            .args(["collect", "--label", "swimming", "--store"])
            .arg(dir.path()),
    );
    assert!(
        err.contains("swimming") && err.contains("still,walking,running"),
        "{err}"
    );
    let err = fails_with(device().args(["collect", "--label", "still", "--addr", "0x80"]));
    assert!(err.contains("0x08..=0x77"), "{err}");
    let err = fails_with(
        device()
            .args(["collect", "--label", "still", "--window", "0", "--store"])
            .arg(dir.path()),
    );
    assert!(err.contains("window of 0 samples"), "{err}");
    let err = fails_with(device().args(["collect"]));
    assert!(err.contains("--label"), "{err}");
}

#[test]
fn run_with_a_policy_and_no_readable_power_state_fails_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails_with(
        device()
            .args(["run", "--aggregator", "127.0.0.1:9", "--trust-on-first-use"])
            .args(["--known-update", "1", "--require-charging"])
            .arg("--power-supply-root")
            .arg(dir.path().join("missing"))
            .arg("--state-dir")
            .arg(dir.path()),
    );
    assert!(
        err.contains("cannot read the device's power state") && err.contains("missing"),
        "{err}"
    );
    let err = fails_with(
        device()
            .args(["run", "--aggregator", "127.0.0.1:9", "--trust-on-first-use"])
            .args(["--known-update", "1", "--battery-floor", "101"]),
    );
    assert!(err.contains("101"), "{err}");
}
