//! Admission control: what a connection arriving in a burst is told.
//!
//! The aggregator completes about `handshakes_per_sec` authentications a
//! second (configured: TLS, the challenge signature, the session table).
//! A connection is admitted while the ones already authenticating can be
//! served within half the authentication timeout (and within
//! `max_unauthenticated`); past that it is paced away before it
//! authenticates (`NoTask`, then closed) with a window to come back in,
//! instead of queueing until its handshake times out.
//!
//! Windows are sized by how many are waiting: each paced connection takes
//! the next place in a virtual queue served at the handshake rate, after
//! those still authenticating and those already told to come back. The
//! k-th one paced in a burst is told `[t, t + spread]` with
//! `t = (authenticating + k) / rate`, so a burst of any size returns at
//! the rate the aggregator can take it. O(1) per connection: one instant
//! (the queue's tail), no scan.
//!
//! Authenticated devices that are not needed now are paced the same way
//! ([`request_window`]): the configured `retry_window` is stretched with
//! the number of devices connected, so that all of them together ask for
//! tasks at most `task_requests_per_sec` times a second, whatever the size
//! of the fleet (10,000 devices told to come back in half a second would
//! ask 20,000 times a second).

use std::time::{Duration, Instant};

/// The longest an admission window starts from now, whatever the queue:
/// a device is never told to stay away longer than this.
pub const ADMISSION_WAIT_MAX: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub(super) struct Admission {
    interval: Duration,
    budget: usize,
    spread: Duration,
    /// When the last connection paced away was told to come back (the
    /// virtual queue's tail).
    tail: Option<Instant>,
}

impl Admission {
    /// `handshakes_per_sec` must be positive (the config checks it).
    pub fn new(
        handshakes_per_sec: f64,
        auth_timeout: Duration,
        max_unauthenticated: usize,
        spread: Duration,
    ) -> Self {
        let per_sec = handshakes_per_sec.max(f64::MIN_POSITIVE);
        let budget = (per_sec * auth_timeout.as_secs_f64() / 2.0).ceil();
        Admission {
            interval: Duration::from_secs_f64(
                (1.0 / per_sec).min(ADMISSION_WAIT_MAX.as_secs_f64()),
            ),
            budget: (budget.min(max_unauthenticated as f64) as usize).max(1),
            spread,
            tail: None,
        }
    }

    /// Connections that may authenticate at once.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// How long from `now` until the last connection paced away is due
    /// back (zero when none is).
    pub fn horizon(&self, now: Instant) -> Duration {
        self.tail.map_or(Duration::ZERO, |t| {
            (t + self.spread).saturating_duration_since(now)
        })
    }

    /// A connection arrives while `authenticating` others are: `None` to
    /// admit it, or the window `(min, max)` it is told to come back in.
    pub fn decide(&mut self, now: Instant, authenticating: usize) -> Option<(Duration, Duration)> {
        if authenticating < self.budget {
            return None;
        }
        let drained = now + self.interval.saturating_mul(authenticating as u32);
        let start = self.tail.map_or(drained, |t| t.max(drained));
        let start = start.min(now + ADMISSION_WAIT_MAX);
        self.tail = Some(start + self.interval);
        let wait = start.saturating_duration_since(now);
        Some((wait, wait + self.spread))
    }
}

/// The window a device not needed now is told to come back in: `base`
/// (the configured `retry_window`), stretched when `sessions` devices
/// asking once per window on average would ask more than
/// `requests_per_sec` times a second. The stretched window keeps its
/// shape (both ends scaled by the same factor) and starts at most
/// [`ADMISSION_WAIT_MAX`] from now.
pub fn request_window(
    base: (Duration, Duration),
    sessions: usize,
    requests_per_sec: f64,
) -> (Duration, Duration) {
    let (lo, hi) = base;
    let per_sec = requests_per_sec.max(f64::MIN_POSITIVE);
    // The mean time between two requests of one device that all of them
    // together need, against the base window's mean.
    let needed = (sessions as f64 / per_sec).min(ADMISSION_WAIT_MAX.as_secs_f64());
    let mean = (lo + hi).as_secs_f64() / 2.0;
    if needed <= mean {
        return base;
    }
    if mean <= 0.0 {
        return (
            Duration::from_secs_f64(needed / 2.0),
            Duration::from_secs_f64(needed * 1.5),
        );
    }
    let k = needed / mean;
    let lo = lo.mul_f64(k).min(ADMISSION_WAIT_MAX);
    (lo, hi.mul_f64(k).max(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_is_admitted_up_to_the_budget_then_queued_at_the_rate() {
        // 100 handshakes/s, 10 s to authenticate: 500 may wait at once.
        let mut a = Admission::new(100.0, Duration::from_secs(10), 1024, 500 * MS);
        assert_eq!(a.budget(), 500);
        let now = Instant::now();
        for waiting in 0..500 {
            assert_eq!(a.decide(now, waiting), None);
        }
        // The next ones: after the 500 authenticating, 10 ms apart.
        for k in 0..3u32 {
            let start = 10 * MS * (500 + k);
            assert_eq!(a.decide(now, 500), Some((start, start + 500 * MS)));
        }
        // A second later, 500 still authenticating: behind them.
        let later = now + Duration::from_secs(1);
        assert_eq!(a.decide(later, 500).unwrap().0, 10 * MS * 500);
        // Under the budget again: admitted.
        assert_eq!(a.decide(later, 10), None);
    }

    #[test]
    fn the_budget_respects_max_unauthenticated_and_waits_are_capped() {
        let mut a = Admission::new(1000.0, Duration::from_secs(10), 64, MS);
        assert_eq!(a.budget(), 64);
        let mut slow = Admission::new(0.001, Duration::from_secs(1), 64, MS);
        assert_eq!(slow.budget(), 1);
        let now = Instant::now();
        let (start, end) = slow.decide(now, 5).unwrap();
        assert_eq!((start, end), (ADMISSION_WAIT_MAX, ADMISSION_WAIT_MAX + MS));
        assert!(a.decide(now, 64).is_some());
    }

    #[test]
    fn request_windows_stretch_with_the_fleet_to_keep_the_request_rate() {
        let base = (200 * MS, 600 * MS);
        // 100 devices asking every 0.4 s: 250 a second, under 1000.
        assert_eq!(request_window(base, 100, 1000.0), base);
        // 10,000 would ask 25,000 times a second: stretched 25x, to a
        // mean of 10 s (1000 a second).
        let (lo, hi) = request_window(base, 10_000, 1000.0);
        assert_eq!((lo, hi), (5000 * MS, 15_000 * MS));
        // A zero window still spreads; the wait is capped.
        assert_eq!(
            request_window((Duration::ZERO, Duration::ZERO), 2000, 1000.0),
            (1000 * MS, 3000 * MS)
        );
        let secs = Duration::from_secs;
        let capped = request_window(base, usize::MAX, 1.0);
        assert_eq!(capped, (secs(300), secs(900)));
    }
}
