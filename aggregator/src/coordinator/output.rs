//! What the coordinator asks of its driver ([`Output`]) and reports
//! ([`Event`]), and the records that must outlive the process
//! ([`DurableUpdate`], [`Contribution`]).

use bytes::Bytes;
use fedge_proto::{AggMsg, ModelVersion, RejectCode};

use super::SessionId;

/// An accepted update as it must be stored before it is acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub struct DurableUpdate {
    /// The round (FedBuff: the buffer) it was combined into.
    pub round_id: u64,
    /// The round whose task it answers (earlier than `round_id` for a
    /// stale FedBuff update).
    pub task_round: u64,
    /// The model it was trained against (None for records written before
    /// fedge kept it); checked again when it is restored.
    pub model_version: Option<ModelVersion>,
    pub device: String,
    pub payload_hash: [u8; 32],
    /// [`fedge_proto::sign::UpdateManifest::signed_hash`] of its signed
    /// manifest (zeros for records written before fedge kept it) ...
    pub manifest_hash: [u8; 32],
    /// ... and the signed manifest itself
    /// ([`fedge_proto::evidence::SignedManifest::encode_into`]; empty for
    /// records written before fedge kept it), so that after a restart a
    /// second update signed for the same task is still equivocation.
    pub signed_manifest: Bytes,
    pub sample_count: u64,
    /// The participant's weight, before any staleness discount.
    pub raw_weight: f64,
    /// The staleness discount its delta is scaled by (1 when fresh).
    pub discount: f64,
    pub stake: Option<f64>,
    pub metrics: Vec<(String, f64)>,
    pub payload: Bytes,
}

/// What the driver must do, in order.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Make this update durable before acting on any later output (the
    /// acknowledgement follows it).
    Persist(Box<DurableUpdate>),
    Send {
        session: SessionId,
        msg: AggMsg,
    },
    /// Close the connection after sending what was queued before this.
    Close {
        session: SessionId,
        reason: String,
    },
    Event(Event),
    /// A leaf's round closed: tell the parent (see `coordinator::tree`).
    Forward(Box<super::Forward>),
    /// Run this payload check ([`super::VerifyJob::run`], pure: anywhere,
    /// off the coordinator's task) and hand its result to
    /// [`super::Coordinator::handle_verified`]. Unlike the other outputs it
    /// need not be acted on in order.
    Verify(Box<super::VerifyJob>),
    /// Run this round's close ([`super::CloseJob::run`], pure: anywhere,
    /// off the coordinator's task) and hand its result to
    /// [`super::Coordinator::handle_closed`]. The round's publication, its
    /// ledger record and the next round follow that result; meanwhile
    /// the coordinator serves everything else. Need not be acted on in
    /// order.
    CloseRound(Box<super::CloseJob>),
}

/// What happened, for logs, metrics, persistence and tests.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    RoundOpened {
        round_id: u64,
        model_version: ModelVersion,
    },
    DeviceSelected {
        round_id: u64,
        device: String,
    },
    /// An update was combined into round `round_id`; `staleness` is how
    /// many versions behind it was trained (FedBuff; 0 in synchronous rounds).
    UpdateAccepted {
        round_id: u64,
        device: String,
        sample_count: u64,
        payload_bytes: u64,
        /// The payload's hash, as the device signed it: the store keeps
        /// the payload under it (`updates/<round>/<hash>.bin`).
        payload_hash: [u8; 32],
        staleness: u64,
    },
    Rejected {
        device: Option<String>,
        code: RejectCode,
        detail: String,
    },
    RoundClosed {
        round_id: u64,
        accepted: usize,
        outcome: RoundOutcome,
        /// Weighted means of the metrics devices reported with updates.
        metrics: Vec<(String, f64)>,
    },
    /// One participant's contribution to a round: accepted (with its final
    /// weight, emitted when the round closes) or rejected (with the reason,
    /// emitted at once).
    Contribution(Contribution),
    /// A round's contributions were scored and rewarded; emitted just
    /// before the [`Event::ModelPublished`] of the version it produced
    /// (the driver writes both, with the ledger record, at once).
    RoundSettled(Box<Settlement>),
    /// A penalty is held for the next settlement; the driver makes it
    /// durable (evidence and row) so a crash before that loses nothing.
    PenaltyHeld(Box<Penalty>),
    /// A new model version; the blob is what devices download.
    ModelPublished {
        round_id: u64,
        version: ModelVersion,
        blob: Bytes,
    },
    Finished {
        final_version: ModelVersion,
    },
    /// The state to keep with `version` (see [`Coordinator::checkpoint`]),
    /// emitted after each published version.
    ///
    /// [`Coordinator::checkpoint`]: super::Coordinator::checkpoint
    Checkpoint {
        version: ModelVersion,
        state: Bytes,
    },
    /// Most devices of round `round_id` reported that training on `from`
    /// diverged: the round publishes `to` (the version `from` was built
    /// from) again, and its `accepted` updates are discarded.
    RolledBack {
        round_id: u64,
        from: ModelVersion,
        to: ModelVersion,
        diverged: usize,
        accepted: usize,
    },
    /// A secure round's SecAgg+ finished: `survivors` updates are in its
    /// sum; `completed` counts the devices that completed each of the four
    /// stages; `upload_bytes` is what its devices sent in its messages
    /// (keys, sealed shares, masked inputs, revealed shares).
    SecureAggregated {
        round_id: u64,
        survivors: usize,
        completed: [u32; 4],
        upload_bytes: u64,
    },
    /// The round's federated evaluation of its model, combined (emitted
    /// when it closes, if any device reported).
    Evaluated(Box<crate::evaluation::EvalSummary>),
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Contribution {
    pub round_id: u64,
    pub device: String,
    pub stake: Option<f64>,
    pub samples: u64,
    /// f(stake) x g(samples), before share capping.
    pub raw_weight: f64,
    /// Share of the round's total weight after capping (0 when rejected).
    pub share: f64,
    pub accepted: bool,
    pub reason: Option<String>,
    /// Written as its round closes (not a refusal during the round): it
    /// replaces an accepted record an earlier closing of the same round
    /// wrote for the device. A leaf killed after closing a round, before
    /// its parent had the partial, closes that round again from its
    /// restored updates; without the replacement each device would count
    /// twice. Not stored: records read back say false.
    #[serde(skip)]
    pub settles: bool,
}

/// A published round's scores and rewards (see [`crate::scoring`]): what
/// the ledger records for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Settlement {
    pub round_id: u64,
    /// The model the round's updates were applied to.
    pub model_before: ModelVersion,
    /// Seed of the validation sample ([`crate::scoring::scoring_seed`]).
    pub scoring_seed: [u8; 32],
    /// Examples in the validation sample (0 when unscored).
    pub validation_samples: u32,
    pub method: crate::scoring::ScoreMethod,
    pub server_lr: f64,
    pub reward_pool: u64,
    /// The share cap and stake transform rewards were split with.
    pub reward_cap: f64,
    pub stake_transform: crate::weighting::Transform,
    /// Weight of this round's scores in the devices' ratings.
    pub rating_alpha: f64,
    /// FedBuff's `a` in the staleness discount `(1 + tau)^-a` (0 for
    /// synchronous rounds).
    pub staleness_exponent: f64,
    /// The flags' thresholds: `scoring.copy_cosine_min`,
    /// `free_rider_norm_ratio` and `noise_sigmas`.
    pub flag_thresholds: [f64; 3],
    /// Validation loss of `model_before` (None when unscored).
    pub base_loss: Option<f64>,
    /// Why the round's updates are unscored, if they are.
    pub error: Option<String>,
    pub cost: crate::scoring::ScoringCost,
    /// Participants in the order their updates were accepted (empty when
    /// the round was rolled back: its updates were discarded).
    pub entries: Vec<SettledEntry>,
    /// Provable misbehaviour since the previous settlement.
    pub penalties: Vec<Penalty>,
    /// The federated evaluation of `model_before` in this round, if any
    /// device reported one.
    pub evaluation: Option<crate::evaluation::EvalSummary>,
}

/// Provable misbehaviour (see `fedge_proto::ledger::LedgerPenalty`): a
/// signed update refused for a reason anyone can check from its payload,
/// two signed updates for one task, or a copy.
#[derive(Clone, Debug, PartialEq)]
pub struct Penalty {
    pub round_id: u64,
    pub device: String,
    pub manifest_hash: [u8; 32],
    pub payload_hash: [u8; 32],
    /// `fedge_proto::ledger::PENALTY_*`.
    pub kind: u8,
    /// Fraction of the device's stake it slashes (`scoring.slash_fraction`).
    pub slashed: f64,
    /// The evidence whose blake3 hash is `payload_hash` (the refused
    /// payload, or the encoded [`fedge_proto::evidence::Equivocation`]);
    /// empty for a copy, whose payload is kept with the round's updates.
    pub payload: Bytes,
}

/// One participant of a settled round.
#[derive(Clone, Debug, PartialEq)]
pub struct SettledEntry {
    pub device: String,
    pub manifest_hash: [u8; 32],
    pub payload_hash: [u8; 32],
    pub stake: Option<f64>,
    /// Share of the round's aggregation weight.
    pub weight: f64,
    pub score: Option<f64>,
    pub norm: f64,
    /// The device whose earlier update of the round this one copies.
    pub copy_of: Option<String>,
    /// Largest cosine similarity to an earlier update of the round.
    pub similarity: f64,
    /// Cosine similarity to the sum of the round's other updates.
    pub alignment: f64,
    pub free_rider: bool,
    /// Uncorrelated with the round's other updates.
    pub noise: bool,
    pub reward: u64,
    /// The round whose task it answered (before `round_id` when stale) ...
    pub task_round: u64,
    /// ... and the staleness discount its delta was scaled by, before it
    /// was combined and scored (1 when fresh).
    pub discount: f64,
}

impl SettledEntry {
    /// A copy, a free-rider or noise.
    pub fn flagged(&self) -> bool {
        self.copy_of.is_some() || self.free_rider || self.noise
    }

    /// The ledger's `FLAG_*` bits.
    pub fn flags(&self) -> u8 {
        use fedge_proto::ledger::{FLAG_COPY, FLAG_FREE_RIDER, FLAG_NOISE, FLAG_UNSCORED};
        let mut f = 0;
        if self.copy_of.is_some() {
            f |= FLAG_COPY;
        }
        if self.free_rider {
            f |= FLAG_FREE_RIDER;
        }
        if self.score.is_none() {
            f |= FLAG_UNSCORED;
        }
        if self.noise {
            f |= FLAG_NOISE;
        }
        f
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum RoundOutcome {
    Published(ModelVersion),
    /// Fewer than `min_devices` updates by the deadline; model unchanged.
    Aborted,
    /// A leaf's round: its combined update went to the parent, whose next
    /// model this leaf publishes when the parent offers its next round.
    Forwarded,
}
