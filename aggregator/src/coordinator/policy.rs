//! Round policies: how rounds run. [`Synchronous`] rounds select a fixed
//! set of devices and wait for them behind a barrier; FedBuff
//! ([`super::fedbuff::FedBuff`]) hands out work continuously and turns
//! every full buffer of updates into a version. The coordinator asks the
//! policy who gets a task, whether an update's task is valid, how much a
//! stale update weighs, and what survives a round closing; everything else
//! (authentication, transfers, weighting, combining, durability) is shared.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fedge_proto::sign::UpdateManifest;
use fedge_proto::{ModelVersion, RejectCode};

use super::sessions::DeviceKey;
use super::transfers::TransferManager;

/// The open round, as a policy sees it.
pub(super) struct RoundView {
    pub id: u64,
    pub model_version: ModelVersion,
    pub deadline: Option<Instant>,
    pub finished: bool,
}

/// The answer to a device asking for work.
#[derive(Debug, PartialEq)]
pub(super) enum TaskDecision {
    /// Offer the round's task (again, to a device that already has it).
    Offer,
    /// Nothing for this device now: pace it away with this reason.
    PaceAway(&'static str),
}

pub(super) type Refusal = (RejectCode, String);

pub(super) trait RoundPolicy: Send {
    /// The policy's name composed with the strategy's.
    fn describe(&self, strategy: &str) -> String;

    /// A device that already holds a task in this round (or contributed to
    /// it): what it gets, before any eligibility check. None: a newcomer.
    fn existing_task(&self, key: &DeviceKey, round: &RoundView) -> Option<TaskDecision>;

    /// An eligible newcomer asks for work.
    fn select(&mut self, key: DeviceKey, round: &RoundView) -> TaskDecision;

    /// Whether newcomers are drawn among those who check in during a
    /// window after the round opens (rather than served as they ask).
    fn windowed(&self) -> bool;

    /// The device gives up (or lost) its task of round `task_round`;
    /// true if it held one, whose slot is now free. The device gets no
    /// other task in this round.
    fn release(&mut self, key: &DeviceKey, task_round: u64) -> bool;

    /// Every task handed out in the open round has ended (accepted or
    /// released), and at least one was: waiting longer gains nothing
    /// from the devices already chosen.
    fn all_done(&self) -> bool;

    /// No device has held a task in the open round.
    fn idle(&self) -> bool;

    /// Whether a newcomer asking now could get a slot.
    fn slot_free(&self) -> bool;

    /// When a task offered at `now` is due.
    fn offer_deadline(&self, now: Instant, round: &RoundView, task_time: Duration) -> Instant;

    /// Whether a signed manifest names a task this device may upload for
    /// now: the right round and model, selected, not already accepted.
    fn check_task(
        &self,
        key: &DeviceKey,
        m: &UpdateManifest,
        round: &RoundView,
        now: Instant,
        models: &TransferManager,
    ) -> Result<(), Refusal>;

    /// Whether an upload that has just completed may still be combined:
    /// the checks of [`RoundPolicy::check_task`] that time can change
    /// while it arrives (a deadline, the staleness window).
    fn check_completion(
        &self,
        m: &UpdateManifest,
        round: &RoundView,
        now: Instant,
    ) -> Result<(), Refusal>;

    /// The weight factor of an update `staleness` versions behind.
    fn discount(&self, staleness: u64) -> f64;

    /// An update for the task of round `task_round` was accepted into the
    /// open round `open`.
    fn on_accepted(&mut self, key: DeviceKey, task_round: u64, open: u64, payload_hash: [u8; 32]);

    /// An update acknowledged before a restart is put back into the open
    /// round; refused if the device already has one there, or if its task
    /// or model is not one this round takes (checked when the record has
    /// its model version).
    fn on_restored(
        &mut self,
        key: DeviceKey,
        task_round: u64,
        model_version: Option<ModelVersion>,
        payload_hash: [u8; 32],
        round: &RoundView,
    ) -> Result<(), String>;

    /// What must survive a restart beyond the open round's updates (JSON;
    /// empty when nothing).
    fn checkpoint(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores what [`RoundPolicy::checkpoint`] wrote, before the open
    /// round's updates are restored.
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err("this round policy keeps no state, but state was given".into())
        }
    }

    /// The open round closed; `next` trains `next_version`. Returns the
    /// oldest task round whose uploads in flight carry over into it (older
    /// ones are cut short).
    fn on_round_closed(&mut self, next: u64, next_version: ModelVersion) -> u64;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Participation {
    Selected,
    Accepted,
    /// Gave the task up, or lost it to the slot timeout.
    Released,
}

/// Synchronous rounds: `selection_target` devices are selected (drawn
/// among the check-ins of the round's window by the coordinator, then
/// first come first served); the round waits for them until its deadline.
pub(super) struct Synchronous {
    selection_target: usize,
    participants: HashMap<DeviceKey, Participation>,
    /// Participants holding a slot (selected or accepted).
    taken: usize,
    /// Participants still selected (neither accepted nor released).
    outstanding: usize,
}

impl Synchronous {
    pub fn new(selection_target: usize) -> Self {
        Synchronous {
            selection_target,
            participants: HashMap::new(),
            taken: 0,
            outstanding: 0,
        }
    }
}

/// Refuses a manifest for a round that is not open yet (or a finished run).
pub(super) fn check_not_ahead(m: &UpdateManifest, round: &RoundView) -> Result<(), Refusal> {
    if round.finished || m.round_id > round.id {
        return Err((
            RejectCode::UnknownRound,
            format!("round {} is not open here", m.round_id),
        ));
    }
    Ok(())
}

/// Refuses a manifest whose model version is not held here.
pub(super) fn check_model_held(
    m: &UpdateManifest,
    models: &TransferManager,
) -> Result<(), Refusal> {
    if !models.has_model(&m.model_version) {
        return Err((
            RejectCode::UnknownModelVersion,
            format!("model version {} is not known here", m.model_version),
        ));
    }
    Ok(())
}

impl RoundPolicy for Synchronous {
    fn describe(&self, strategy: &str) -> String {
        strategy.to_string()
    }

    fn existing_task(&self, key: &DeviceKey, _round: &RoundView) -> Option<TaskDecision> {
        match self.participants.get(key)? {
            // Reconnected mid-round: the same offer again.
            Participation::Selected => Some(TaskDecision::Offer),
            Participation::Accepted => {
                Some(TaskDecision::PaceAway("already contributed to this round"))
            }
            Participation::Released => Some(TaskDecision::PaceAway(
                "gave up or lost its task in this round",
            )),
        }
    }

    fn select(&mut self, key: DeviceKey, _round: &RoundView) -> TaskDecision {
        if self.taken >= self.selection_target {
            return TaskDecision::PaceAway("round is full");
        }
        self.participants.insert(key, Participation::Selected);
        self.taken += 1;
        self.outstanding += 1;
        TaskDecision::Offer
    }

    fn windowed(&self) -> bool {
        true
    }

    fn release(&mut self, key: &DeviceKey, task_round: u64) -> bool {
        let _ = task_round; // only the open round has tasks
        match self.participants.get_mut(key) {
            Some(p @ Participation::Selected) => {
                *p = Participation::Released;
                self.taken -= 1;
                self.outstanding -= 1;
                true
            }
            _ => false,
        }
    }

    fn all_done(&self) -> bool {
        !self.participants.is_empty() && self.outstanding == 0
    }

    fn idle(&self) -> bool {
        self.participants.is_empty()
    }

    fn slot_free(&self) -> bool {
        self.taken < self.selection_target
    }

    fn offer_deadline(&self, now: Instant, round: &RoundView, task_time: Duration) -> Instant {
        round.deadline.unwrap_or(now + task_time)
    }

    fn check_task(
        &self,
        key: &DeviceKey,
        m: &UpdateManifest,
        round: &RoundView,
        now: Instant,
        models: &TransferManager,
    ) -> Result<(), Refusal> {
        if m.round_id < round.id {
            return Err((
                RejectCode::RoundClosed,
                format!("round {} is closed; round {} is open", m.round_id, round.id),
            ));
        }
        check_not_ahead(m, round)?;
        check_model_held(m, models)?;
        if m.model_version != round.model_version {
            return Err((
                RejectCode::RoundClosed,
                format!(
                    "update is against model {}, round {} trains {}",
                    m.model_version, round.id, round.model_version
                ),
            ));
        }
        match self.participants.get(key) {
            None => {
                return Err((
                    RejectCode::NotSelected,
                    format!("device was not selected for round {}", round.id),
                ));
            }
            Some(Participation::Accepted) => {
                return Err((
                    RejectCode::Replay,
                    format!(
                        "an update from this device was already accepted in round {}",
                        round.id
                    ),
                ));
            }
            Some(Participation::Released) => {
                return Err((
                    RejectCode::NotSelected,
                    format!(
                        "this device's task in round {} was given up or timed out",
                        round.id
                    ),
                ));
            }
            Some(Participation::Selected) => {}
        }
        if round.deadline.is_some_and(|d| now >= d) {
            return Err((
                RejectCode::DeadlinePassed,
                "the round's deadline has passed".into(),
            ));
        }
        Ok(())
    }

    fn check_completion(
        &self,
        _m: &UpdateManifest,
        round: &RoundView,
        now: Instant,
    ) -> Result<(), Refusal> {
        if round.deadline.is_some_and(|d| now >= d) {
            return Err((
                RejectCode::DeadlinePassed,
                "the round's deadline passed during the upload".into(),
            ));
        }
        Ok(())
    }

    fn discount(&self, _staleness: u64) -> f64 {
        1.0
    }

    fn on_accepted(&mut self, key: DeviceKey, _task_round: u64, _open: u64, _hash: [u8; 32]) {
        if self.participants.insert(key, Participation::Accepted) == Some(Participation::Selected) {
            self.outstanding -= 1;
        }
    }

    fn on_restored(
        &mut self,
        key: DeviceKey,
        task_round: u64,
        model_version: Option<ModelVersion>,
        _hash: [u8; 32],
        round: &RoundView,
    ) -> Result<(), String> {
        if task_round != round.id {
            return Err(format!(
                "update for the task of round {task_round}, open round is {}",
                round.id
            ));
        }
        if let Some(v) = model_version
            && v != round.model_version
        {
            return Err(format!(
                "update trained against model {v}, round {} trains {}",
                round.id, round.model_version
            ));
        }
        if self.participants.contains_key(&key) {
            return Err(format!("device {} restored twice", hex::encode(key)));
        }
        self.participants.insert(key, Participation::Accepted);
        self.taken += 1;
        Ok(())
    }

    fn on_round_closed(&mut self, next: u64, _next_version: ModelVersion) -> u64 {
        self.participants.clear();
        self.taken = 0;
        self.outstanding = 0;
        // No upload survives a synchronous round.
        next
    }
}
