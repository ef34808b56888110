//! Bookkeeping of a round's contributions: who was accepted with what raw
//! weight and metrics, and their final shares once the round closes. The
//! records go out as [`Event::Contribution`](super::Event::Contribution)
//! and are persisted by the driver. With scoring on, the book also holds
//! each accepted update's delta until the round is settled (O(model x
//! devices), like the robust combiners); the signed-manifest hashes are
//! held either way, for the ledger ([`crate::ledger`]).

use super::output::Contribution;

/// What one accepted update contributes, as recorded when it is accepted.
pub(super) struct Accepted {
    pub device: String,
    pub stake: Option<f64>,
    pub samples: u64,
    pub raw_weight: f64,
    pub metrics: Vec<(String, f64)>,
    pub held: Held,
}

/// What settling a round needs of one accepted update.
pub(super) struct Held {
    pub manifest_hash: [u8; 32],
    pub payload_hash: [u8; 32],
    /// The delta as combined (scoring on), else None.
    pub delta: Option<Vec<f32>>,
    /// Examples it trained on per the plan (for the scoring cost).
    pub examples: u64,
    /// The round whose task it answered (earlier than the round it is
    /// combined into for a stale FedBuff update) ...
    pub task_round: u64,
    /// ... and the staleness discount its delta was scaled by (1 fresh).
    pub discount: f64,
}

/// The open round's accepted contributions, in the order they were combined.
#[derive(Default)]
pub(super) struct RoundBook {
    accepted: Vec<Contribution>,
    metrics: Vec<(f64, Vec<(String, f64)>)>,
    held: Vec<Held>,
}

impl RoundBook {
    pub fn record(&mut self, round_id: u64, a: Accepted) {
        self.metrics.push((a.raw_weight, a.metrics));
        self.held.push(a.held);
        self.accepted.push(Contribution {
            round_id,
            device: a.device,
            stake: a.stake,
            samples: a.samples,
            raw_weight: a.raw_weight,
            share: 0.0,
            accepted: true,
            reason: None,
            settles: true,
        });
    }

    /// What settling needs of each accepted update, in acceptance order
    /// (taken once, when the round closes).
    pub fn take_held(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.held)
    }

    /// Merkle root of the accepted updates' signed-manifest hashes, in
    /// acceptance order (what a leaf's partial aggregate names).
    pub fn manifests_root(&self) -> [u8; 32] {
        let leaves: Vec<Vec<u8>> = self.held.iter().map(|h| h.manifest_hash.to_vec()).collect();
        fedge_proto::ledger::merkle_root(&leaves)
    }

    /// Metrics reported with accepted updates, each with its raw weight.
    pub fn metrics(&self) -> &[(f64, Vec<(String, f64)>)] {
        &self.metrics
    }

    /// The round published: each contribution's share of the combined
    /// weights (`weights` in the order contributions were recorded).
    pub fn settle_published(&mut self, weights: &[f64]) -> Vec<Contribution> {
        let total: f64 = weights.iter().sum();
        let mut out = std::mem::take(&mut self.accepted);
        for (c, w) in out.iter_mut().zip(weights) {
            c.share = w / total;
        }
        out
    }

    /// The round's updates were discarded (a rollback): nothing counted.
    pub fn settle_discarded(&mut self, reason: &str) -> Vec<Contribution> {
        let mut out = std::mem::take(&mut self.accepted);
        for c in &mut out {
            c.accepted = false;
            c.reason = Some(reason.to_string());
        }
        out
    }

    /// The round was aborted: nothing counted.
    pub fn settle_aborted(&mut self) -> Vec<Contribution> {
        let mut out = std::mem::take(&mut self.accepted);
        for c in &mut out {
            c.accepted = false;
            c.reason = Some("round aborted: too few updates by the deadline".into());
        }
        out
    }
}

/// The record of an update refused after it was fully received.
pub(super) fn refused(
    round_id: u64,
    device: &str,
    stake: Option<f64>,
    samples: u64,
    reason: String,
) -> Contribution {
    Contribution {
        round_id,
        device: device.to_string(),
        stake,
        samples,
        raw_weight: 0.0,
        share: 0.0,
        accepted: false,
        reason: Some(reason),
        settles: false,
    }
}
