//! Admission at the QUIC level: how many TLS handshakes run at once.
//!
//! The coordinator paces connections once they are established (see
//! `coordinator::admission`), but the QUIC/TLS handshake comes first, and
//! it costs the most (a key exchange and a certificate signature here, a
//! key exchange and a verification on the device). Ten thousand devices
//! connecting at once ran ten thousand handshakes at once, all crawling,
//! and thousands timed out. Here at most `in_flight_max` run at once; a
//! new connection waits for its turn in order of arrival (quinn holds its
//! first packets, bounded by its own `incoming_buffer_size`) for at most
//! `queue_wait`, and is refused (QUIC's CONNECTION_REFUSED: one small
//! packet, no handshake) past that, or at once when `queue_max` already
//! wait. A refused device backs off with jitter and comes back
//! (`fedge_device::driver`), where it would have timed out.
//!
//! A turn is held until the handshake completes, or for `turn_max` at
//! most: a peer that stalls its handshake takes a turn no longer than that
//! (its handshake may still complete; it no longer holds anyone up). What
//! a flood of handshakes can make the server hold is bounded by
//! `queue_max` waiting connections and the driver's limit on open ones.
//!
//! A refused device is coming back, within its backoff cap; the gate
//! remembers the last refusal so that a finished server keeps serving the
//! final model until every device it turned away has had its chance
//! ([`HandshakeGate::comeback_until`]; at 50,000 devices, 1,832 were still
//! backing off when the server, seeing nobody connected, stopped).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The QUIC-level handshake limits (see the module's documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct HandshakeLimits {
    pub in_flight_max: usize,
    pub queue_max: usize,
    pub queue_wait: Duration,
    pub turn_max: Duration,
    /// The longest a device refused here waits before it connects again
    /// (its backoff cap): a finished server serves the final model at
    /// least this long past its last refusal.
    pub refused_comeback: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            in_flight_max: 64,
            queue_max: 4096,
            queue_wait: Duration::from_secs(2),
            turn_max: Duration::from_secs(2),
            refused_comeback: REFUSED_COMEBACK,
        }
    }
}

/// The turns, shared by every connection task.
#[derive(Clone)]
pub(super) struct HandshakeGate {
    turns: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    limits: HandshakeLimits,
    last_refused: Arc<Mutex<Option<Instant>>>,
}

/// The default [`HandshakeLimits::refused_comeback`]: `fedge_device`'s
/// default `refused_backoff_max` (a test of the CLI crate, which links
/// both, keeps them equal).
pub const REFUSED_COMEBACK: Duration = Duration::from_secs(60);

/// A place in the queue (released when dropped).
pub(super) struct Queued {
    gate: HandshakeGate,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.gate.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HandshakeGate {
    pub fn new(limits: HandshakeLimits) -> Self {
        HandshakeGate {
            turns: Arc::new(Semaphore::new(limits.in_flight_max.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            limits,
            last_refused: Arc::new(Mutex::new(None)),
        }
    }

    /// A connection was refused now (its device will come back).
    pub fn note_refused(&self) {
        *self.last_refused.lock().expect("refusal clock") = Some(Instant::now());
    }

    /// When every device refused so far will have come back, at the
    /// latest (None: nobody was refused).
    pub fn comeback_until(&self) -> Option<Instant> {
        self.last_refused
            .lock()
            .expect("refusal clock")
            .map(|t| t + self.limits.refused_comeback)
    }

    /// A place in the queue, or None (refuse the connection now) when
    /// `queue_max` already wait.
    pub fn queue(&self) -> Option<Queued> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let q = Queued { gate: self.clone() };
        (before < self.limits.queue_max).then_some(q)
    }

    /// Waits for a turn, at most `queue_wait` (None: refuse the
    /// connection).
    pub async fn turn(&self, place: Queued) -> Option<OwnedSemaphorePermit> {
        let turn = Arc::clone(&self.turns).acquire_owned();
        let got = tokio::time::timeout(self.limits.queue_wait, turn).await;
        drop(place);
        got.ok()?.ok()
    }

    /// How long a turn is held at most.
    pub fn turn_max(&self) -> Duration {
        self.limits.turn_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_bounded_and_the_queue_too() {
        let gate = HandshakeGate::new(HandshakeLimits {
            in_flight_max: 2,
            queue_max: 3,
            queue_wait: Duration::from_millis(100),
            turn_max: Duration::from_secs(1),
            refused_comeback: Duration::from_secs(5),
        });
        let a = gate.turn(gate.queue().unwrap()).await.expect("a turn");
        let _b = gate.turn(gate.queue().unwrap()).await.expect("a turn");
        // Both turns taken: the third waits its 100 ms and is refused.
        assert!(gate.turn(gate.queue().unwrap()).await.is_none());
        // Three waiting: a fourth is refused without waiting.
        let places: Vec<_> = (0..3).map(|_| gate.queue().unwrap()).collect();
        assert!(gate.queue().is_none());
        drop(places);
        // A turn given back goes to the next in line.
        let next = gate.queue().unwrap();
        drop(a);
        assert!(gate.turn(next).await.is_some());
    }

    #[test]
    fn a_refusal_is_remembered_for_as_long_as_its_device_may_back_off() {
        let gate = HandshakeGate::new(HandshakeLimits {
            refused_comeback: Duration::from_secs(5),
            ..HandshakeLimits::default()
        });
        assert_eq!(gate.comeback_until(), None, "nobody refused yet");
        let before = Instant::now();
        gate.clone().note_refused();
        let until = gate.comeback_until().expect("a refusal was noted");
        assert!(until >= before + Duration::from_secs(5));
        assert!(until <= Instant::now() + Duration::from_secs(5));
    }
}
