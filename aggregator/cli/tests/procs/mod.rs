//! Child processes for the end-to-end tests: killed if a test fails
//! before waiting on them, and waited on with a bound.

use std::process::{Child, ExitStatus};
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

/// Writes the configuration of a closed test fleet whose aggregate can be
/// computed by hand (plain sample-weighted FedAvg, any key takes part):
/// what `serve` refuses by default, so it says `i_know_this_is_unsafe`.
pub fn closed_fleet_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("closed-fleet.toml");
    std::fs::write(
        &path,
        r#"i_know_this_is_unsafe = true

[weights]
stake = { kind = "constant" }
samples = { kind = "linear" }
max_share = 1.0
allow_unknown = true

[strategy]
combine = { kind = "mean" }
"#,
    )
    .expect("write the test config");
    path
}
