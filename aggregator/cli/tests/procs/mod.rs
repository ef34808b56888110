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
