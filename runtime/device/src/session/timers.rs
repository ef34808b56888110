//! Time: reconnect backoff with jitter, heartbeats, request deadlines and
//! the pause before asking again.

use std::time::{Duration, Instant};

use fedge_proto::DeviceMsg;
use rand::Rng;

use super::{DeviceEvent, DeviceSession, Phase};

impl DeviceSession {
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_terminal() {
            return None;
        }
        let phase_timer = match self.phase {
            Phase::Disconnected { at } => at,
            Phase::Idle { at } => Some(at),
            _ => None,
        };
        let connected = !matches!(self.phase, Phase::Disconnected { .. });
        [
            phase_timer,
            self.heartbeat_at.filter(|_| connected),
            self.request_deadline.filter(|_| connected),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A connection attempt failed or the connection dropped.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if self.is_terminal() {
            return;
        }
        self.connection_gone();
        if matches!(self.phase, Phase::Disconnected { at: Some(_) }) {
            return; // already waiting to reconnect
        }
        self.attempts += 1;
        if self.cfg.reconnect_attempts_max != 0 && self.attempts > self.cfg.reconnect_attempts_max {
            self.fail(format!(
                "gave up after {} failed connection attempts",
                self.attempts - 1
            ));
            return;
        }
        let exp = self.cfg.backoff_min.as_millis() as u64
            * 2u64.saturating_pow(self.attempts.saturating_sub(1).min(20));
        let cap = (self.cfg.backoff_max.as_millis() as u64).max(1);
        let base = exp.min(cap).max(1);
        let delay = self.rng.random_range(base / 2..=base);
        self.phase = Phase::Disconnected {
            at: Some(now + Duration::from_millis(delay)),
        };
    }

    /// The aggregator refused the connection at its handshake limit
    /// (QUIC's `CONNECTION_REFUSED`): it is busy, and the attempt is no
    /// failure (it does not count towards `reconnect_attempts_max`). The
    /// device comes back after a wait drawn in [0, d], d doubling with each
    /// refusal in a row from `refused_backoff_min` to `refused_backoff_max`
    /// ("full jitter"): a refusal says nothing of how long the queue is,
    /// and a refused crowd retrying within a few seconds (the ordinary
    /// backoff) kept the aggregator busy refusing it.
    pub fn handle_refused(&mut self, now: Instant) {
        if self.is_terminal() {
            return;
        }
        self.connection_gone();
        self.refusals = self.refusals.saturating_add(1);
        let min = self.cfg.refused_backoff_min.as_millis() as u64;
        let exp = min.saturating_mul(1 << self.refusals.saturating_sub(1).min(20));
        let cap = (self.cfg.refused_backoff_max.as_millis() as u64).max(1);
        let d = exp.min(cap).max(1);
        let delay = self.rng.random_range(0..=d);
        self.phase = Phase::Disconnected {
            at: Some(now + Duration::from_millis(delay)),
        };
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_terminal() {
            return;
        }
        match self.phase {
            Phase::Disconnected { at: Some(at) } if now >= at => {
                self.phase = Phase::Disconnected { at: None };
                self.events.push_back(DeviceEvent::Connect);
                return;
            }
            // An upload paced away by the aggregator is offered again;
            // otherwise the device asks for work.
            Phase::Idle { at } if now >= at && self.upload.is_some() => self.begin_upload(now),
            Phase::Idle { at } if now >= at => self.request_task(now),
            _ => {}
        }
        if matches!(self.phase, Phase::Disconnected { .. }) {
            return;
        }
        if let Some(hb) = self.heartbeat_at
            && now >= hb
        {
            self.heartbeat_seq += 1;
            self.transmit.push_back(DeviceMsg::Heartbeat {
                seq: self.heartbeat_seq,
            });
            self.heartbeat_at = Some(now + self.cfg.heartbeat_interval);
        }
        if let Some(d) = self.request_deadline
            && now >= d
        {
            // The aggregator went quiet: drop the connection and reconnect.
            self.request_deadline = None;
            self.events.push_back(DeviceEvent::Disconnect);
            self.handle_disconnected(now);
        }
    }

    /// Nothing more goes out on the connection; a download resumes from
    /// its first chunk not yet received.
    fn connection_gone(&mut self) {
        self.transmit.clear();
        // A SecAgg+ part does not survive its connection: the aggregator
        // counts the device as a dropout.
        self.secure = None;
        self.request_deadline = None;
        if let Some(d) = self.download.as_mut() {
            d.next_to_request = d.next_expected;
        }
    }

    /// Admission control: the aggregator paced this connection away
    /// before it authenticated (a burst of connections). The connection
    /// is dropped and the next one opened at a random instant in the
    /// window; the aggregator answered, so it is no failed attempt.
    pub(super) fn paced_before_auth(&mut self, now: Instant, wait: Duration) {
        self.connection_gone();
        self.events.push_back(DeviceEvent::Disconnect);
        self.phase = Phase::Disconnected {
            at: Some(now + wait),
        };
    }

    pub(super) fn touch(&mut self, now: Instant) {
        self.request_deadline = Some(now + self.cfg.request_timeout);
    }

    /// Drop the current task and ask again after a short pause, so a
    /// confused exchange cannot become a hot loop.
    pub(super) fn retry_later(&mut self, now: Instant) {
        self.offer = None;
        self.offer_received = None;
        self.request_deadline = None;
        if !matches!(self.phase, Phase::Disconnected { .. }) {
            self.phase = Phase::Idle {
                at: now + self.cfg.backoff_min,
            };
        }
    }
}
