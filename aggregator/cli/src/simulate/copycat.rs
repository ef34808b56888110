//! Copycats: devices that send, as their own, an update another device
//! trained. Two kinds:
//!
//! - [`Attack::Copycat`] re-signs the payload the aggregator accepted
//!   from an honest device in the same round (the copycat). It
//!   stands in for a victim who hands its upload over, or anyone who
//!   obtains it: the copy is the accepted payload, read where the
//!   aggregator keeps it (`updates/<round>/<hash>.bin` in its state
//!   directory), decoded and handed to the copycat's own session, which
//!   encodes and signs it. With a top-k or quantizing codec the encoding
//!   of an already encoded update is that update, so the copy is exact.
//! - [`Attack::NearCopy`] takes the honest device's raw update before its
//!   session compresses it (a colluder inside the victim's binary), so its
//!   own session's error feedback makes the payload differ: the copy sits
//!   at cosine 0.5-0.95 to the victim's. Not defended: a near-copy is paid
//!   as the honest update it nearly is (ARCHITECTURE.md, scoring).
//!
//! [`Attack::Copycat`]: super::fleet::Attack::Copycat
//! [`Attack::NearCopy`]: super::fleet::Attack::NearCopy

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedge_device::trainer::{OnnxTrainer, Trainer};
use fedge_device::{EvalOutput, TrainOutput};
use fedge_proto::msg::TrainingPlan;
use fedge_proto::{Limits, ModelBlob};

use super::fleet::AttackPlan;

/// Updates the aggregator has accepted, `(round, device id)` to the
/// payload's hash, as the simulation sees its events.
pub type AcceptedUpdates = Arc<Mutex<HashMap<(u64, String), [u8; 32]>>>;

/// Honest updates by round, as `(device id, raw delta)`: what copycats
/// look up (near-copies copy the delta itself).
type Board = Arc<Mutex<HashMap<u64, Vec<(String, Vec<f32>)>>>>;

/// What copycats share.
#[derive(Clone)]
pub struct Copycats {
    board: Board,
    accepted: AcceptedUpdates,
    /// The aggregators' state directories (one, or a tree's leaves'):
    /// where accepted payloads are kept.
    payload_dirs: Vec<PathBuf>,
    /// How long a copycat waits for an update to copy.
    wait: Duration,
}

impl Copycats {
    pub fn new(accepted: AcceptedUpdates, payload_dirs: Vec<PathBuf>, wait: Duration) -> Self {
        Copycats {
            board: Default::default(),
            accepted,
            payload_dirs,
            wait,
        }
    }

    /// What a copycat of `round` copies, once the aggregator has accepted
    /// an honest update of it: that update's accepted payload, decoded,
    /// or with `near` its raw delta. Only what is copied is cloned (this
    /// runs every poll).
    fn copy_of(&self, round: u64, dim: usize, near: bool) -> Option<Vec<f32>> {
        let hash = {
            let board = self.board.lock().expect("board");
            let accepted = self.accepted.lock().expect("accepted");
            let (raw, hash) = board
                .get(&round)?
                .iter()
                .find_map(|(d, u)| accepted.get(&(round, d.clone())).map(|hash| (u, *hash)))?;
            if near {
                return Some(raw.clone());
            }
            hash
        };
        self.payload(round, &hash, dim)
    }

    /// The accepted payload `hash` of `round`, decoded, if an aggregator
    /// keeps it (the store writes it before the device is acknowledged).
    fn payload(&self, round: u64, hash: &[u8; 32], dim: usize) -> Option<Vec<f32>> {
        let name = format!("{}.bin", hex::encode(hash));
        self.payload_dirs.iter().find_map(|d| {
            let bytes =
                std::fs::read(d.join("updates").join(round.to_string()).join(&name)).ok()?;
            fedge_proto::update::decode_update(&bytes, dim, &Limits::default()).ok()
        })
    }
}

/// An honest trainer that leaves its update where copycats see it.
pub struct Posting {
    pub inner: OnnxTrainer,
    pub copycats: Copycats,
    pub device: String,
}

impl Trainer for Posting {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        let out = self.inner.train(round_id, model, plan)?;
        let mut board = self.copycats.board.lock().expect("board");
        // Copycats copy from their own round: older rounds go.
        board.retain(|r, _| *r + 1 >= round_id);
        board
            .entry(round_id)
            .or_default()
            .push((self.device.clone(), out.delta.clone()));
        drop(board);
        Ok(out)
    }

    fn evaluate(&mut self, model: &ModelBlob) -> anyhow::Result<Option<EvalOutput>> {
        Trainer::evaluate(&mut self.inner, model)
    }

    fn can_evaluate(&self) -> bool {
        Trainer::can_evaluate(&self.inner)
    }
}

/// A copycat of either kind: waits for an honest update of its round to
/// be accepted, then sends it as its own (the accepted payload, or with
/// `near` the raw delta). Sends nothing useful (a zero update) if none is
/// found before the copycats' wait. Runs on the driver's blocking thread.
pub struct Copycat {
    pub copycats: Copycats,
    pub plan: AttackPlan,
    pub near: bool,
    /// Its own device id: whether its last upload was accepted.
    pub device: String,
    /// What the session's error feedback holds, as the copycat tracks it
    /// (see [`Copycat::exact`]).
    residual: Vec<f32>,
    /// The last update handed to the session, and its round.
    pending: Option<(u64, Vec<f32>)>,
}

impl Copycat {
    pub fn new(copycats: Copycats, plan: AttackPlan, near: bool, device: String) -> Self {
        Copycat {
            copycats,
            plan,
            near,
            device,
            residual: Vec::new(),
            pending: None,
        }
    }

    /// The delta that makes the session send exactly `copy`. A copycat's
    /// binary would send the bytes it copied; the simulated one hands them
    /// to the stock session, whose error feedback adds what earlier uploads
    /// did not deliver (all of an upload that was not accepted). So it
    /// tracks that residual and takes it off: `delta + residual = copy`,
    /// which the codec sends as it is, leaving no residual.
    fn exact(&mut self, round_id: u64, copy: Vec<f32>, error_feedback: bool) -> Vec<f32> {
        if !error_feedback {
            self.residual.clear();
            self.pending = None;
            return copy;
        }
        if self.residual.len() != copy.len() {
            self.residual = vec![0.0; copy.len()];
        }
        if let Some((round, sent)) = self.pending.take() {
            let accepted = self.copycats.accepted.lock().expect("accepted");
            if !accepted.contains_key(&(round, self.device.clone())) && sent.len() == copy.len() {
                for (r, s) in self.residual.iter_mut().zip(&sent) {
                    *r += s;
                }
            }
        }
        let delta = copy
            .iter()
            .zip(&self.residual)
            .map(|(c, r)| c - r)
            .collect();
        self.residual.iter_mut().for_each(|r| *r = 0.0);
        self.pending = Some((round_id, copy));
        delta
    }
}

/// How often a copycat looks for an update to copy.
const POLL: Duration = Duration::from_millis(10);

impl Trainer for Copycat {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        let dim = model.params.values.len();
        let until = Instant::now() + self.copycats.wait;
        let copy = loop {
            match self.copycats.copy_of(round_id, dim, self.near) {
                Some(u) if u.len() == dim => break u,
                _ if Instant::now() >= until => break vec![0.0; dim],
                _ => std::thread::sleep(POLL),
            }
        };
        let delta = if self.near {
            copy
        } else {
            self.exact(round_id, copy, plan.error_feedback)
        };
        Ok(TrainOutput {
            delta,
            sample_count: self.plan.claim_samples.unwrap_or(100),
            metrics: Vec::new(),
        })
    }
}
