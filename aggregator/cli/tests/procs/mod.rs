//! Child processes for the end-to-end tests: killed if a test fails
//! before waiting on them, and waited on with a bound; the aggregator's
//! and devices' output lines the tests wait on.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kills the child if the test ends before waiting on it.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for the process to exit, panicking after `limit`.
pub fn wait_exit(p: &mut Proc, limit: Duration) -> ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < end,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The configuration of a closed test fleet whose aggregate can be
/// computed by hand (plain sample-weighted FedAvg, any key takes part):
/// what `serve` refuses by default, so it says `i_know_this_is_unsafe`.
pub const CLOSED_FLEET: &str = r#"i_know_this_is_unsafe = true

[weights]
stake = { kind = "constant" }
samples = { kind = "linear" }
max_share = 1.0
allow_unknown = true

[strategy]
combine = { kind = "mean" }
"#;

/// Writes [`CLOSED_FLEET`] to `dir/closed-fleet.toml`.
pub fn closed_fleet_config(dir: &Path) -> PathBuf {
    let path = dir.join("closed-fleet.toml");
    std::fs::write(&path, CLOSED_FLEET).expect("write the test config");
    path
}

/// A binary of this workspace: they sit beside `fedge-aggregator`.
pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fedge-aggregator")).with_file_name(name)
}

/// The `listening` address and `fingerprint` an aggregator prints on its
/// standard output once it serves, read from its `lines`.
pub fn read_listening(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
) -> (String, String) {
    let (mut addr, mut fp) = (String::new(), String::new());
    while addr.is_empty() || fp.is_empty() {
        let line = lines.next().expect("aggregator output").unwrap();
        if let Some(a) = line.strip_prefix("listening ") {
            addr = a.into();
        } else if let Some(f) = line.strip_prefix("fingerprint ") {
            fp = f.into();
        }
    }
    (addr, fp)
}

/// [`read_listening`] of an aggregator's standard output (piped); the
/// rest of it is drained.
pub fn listening(p: &mut Proc) -> (String, String) {
    let mut lines = BufReader::new(p.0.stdout.take().expect("piped stdout")).lines();
    let found = read_listening(&mut lines);
    std::thread::spawn(move || for _ in lines {});
    found
}

/// Spawns `cmd` logging at info without colours, its standard output and
/// error piped.
pub fn spawn_logged(cmd: &mut Command) -> Proc {
    Proc(
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// The lines of a child's standard error (piped), as they come.
pub fn stderr_lines(p: &mut Proc) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = p.0.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// A device process training on the shipped MNIST's examples `range`
/// (`START..END`), and a channel of its log lines.
pub fn start_training_device(
    addr: &str,
    fp: &str,
    state: &Path,
    range: &str,
) -> (Proc, mpsc::Receiver<String>) {
    start_device_with(addr, fp, state, &["--data", "mnist", "--range", range])
}

/// A device process sending the update `value` everywhere with one
/// sample, and a channel of its log lines.
pub fn start_device(
    addr: &str,
    fp: &str,
    state: &Path,
    value: &str,
) -> (Proc, mpsc::Receiver<String>) {
    start_device_with(
        addr,
        fp,
        state,
        &["--known-update", value, "--samples", "1"],
    )
}

/// `fedge-device run` against `addr` (pinned to `fp`) on `state` with
/// `what` it sends, quick to notice a lost connection.
fn start_device_with(
    addr: &str,
    fp: &str,
    state: &Path,
    what: &[&str],
) -> (Proc, mpsc::Receiver<String>) {
    let mut p = spawn_logged(
        Command::new(bin("fedge-device"))
            .args(["run", "--aggregator", addr, "--pin", fp])
            .arg("--state-dir")
            .arg(state)
            .args(what)
            .args(["--keepalive-ms", "300", "--idle-timeout-ms", "1500"]),
    );
    let rx = stderr_lines(&mut p);
    (p, rx)
}

/// Waits for a line containing `needle`, panicking after `limit`; the
/// lines read, that one last.
pub fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut seen = Vec::new();
    while Instant::now() < end {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }
    panic!("no `{needle}` within {limit:?}");
}

/// A device's standard output once it has exited successfully.
pub fn device_succeeded(name: &str, p: &mut Proc, limit: Duration) -> String {
    let status = wait_exit(p, limit);
    assert!(status.success(), "device {name} exited with {status}");
    let mut out = String::new();
    std::io::Read::read_to_string(p.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    out
}
