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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The QUIC-level handshake limits (see the module's documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct HandshakeLimits {
    pub in_flight_max: usize,
    pub queue_max: usize,
    pub queue_wait: Duration,
    pub turn_max: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            in_flight_max: 64,
            queue_max: 4096,
            queue_wait: Duration::from_secs(2),
            turn_max: Duration::from_secs(2),
        }
    }
}

/// The turns, shared by every connection task.
#[derive(Clone)]
pub(super) struct HandshakeGate {
    turns: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    limits: HandshakeLimits,
}

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
        }
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
}
