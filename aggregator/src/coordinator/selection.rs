//! Who gets a round's slots, and who keeps them.
//!
//! - **Check-in window.** A synchronous round opens with a window
//!   (`selection_window`). Eligible devices that ask for work during it
//!   are held as candidates (their request is answered when it ends); then
//!   the selected ones are drawn at random from the coordinator's seeded
//!   generator, uniformly or in proportion to stake, and the rest are paced
//!   away. Asking first, or asking often, buys nothing: a key is one
//!   candidate however many times it asks, and only the last connection a
//!   key authenticated on speaks for it. Slots still free after the window
//!   go to the next eligible devices to ask.
//! - **Slot timeout.** A selected device that has begun neither its
//!   download nor its upload `slot_timeout` after its offer loses the slot,
//!   which the next device to ask can take.
//! - **Abandoned tasks.** A device whose training fails tells the
//!   aggregator (`TaskAbandoned`); its slot is freed at once, and a report
//!   that training diverged counts towards rolling the model back (see
//!   `closing`).
//!
//! A key whose task was released (abandoned or timed out) gets no other
//! slot in the same round.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use fedge_proto::msg::AbandonReason;
use fedge_proto::sign::VerifyingKey;
use fedge_proto::{ModelVersion, RejectCode};
use rand::Rng;
use rand::seq::SliceRandom;

use super::ledger;
use super::policy::TaskDecision;
use super::sessions::{DeviceKey, SessionState, device_id};
use super::{Coordinator, Event, SessionId};

/// A device that asked for work during the check-in window.
pub(super) struct Candidate {
    pub session: SessionId,
    pub key: VerifyingKey,
    pub have: Option<ModelVersion>,
}

/// Offers whose device has not yet begun its download or upload, with
/// their deadlines in one ordered set (no scan per timer).
#[derive(Default)]
pub(super) struct SlotTimers {
    due: HashMap<DeviceKey, Instant>,
    order: BTreeSet<(Instant, DeviceKey)>,
}

impl SlotTimers {
    fn start(&mut self, key: DeviceKey, at: Instant) {
        self.stop(&key);
        self.due.insert(key, at);
        self.order.insert((at, key));
    }

    /// The device began: its slot is its own until the round's deadline.
    pub fn stop(&mut self, key: &DeviceKey) {
        if let Some(at) = self.due.remove(key) {
            self.order.remove(&(at, *key));
        }
    }

    pub fn next(&self) -> Option<Instant> {
        self.order.first().map(|(t, _)| *t)
    }

    fn expired(&mut self, now: Instant) -> Vec<DeviceKey> {
        let mut out = Vec::new();
        while let Some(&(t, k)) = self.order.first() {
            if t > now {
                break;
            }
            self.order.remove(&(t, k));
            self.due.remove(&k);
            out.push(k);
        }
        out
    }

    pub fn clear(&mut self) {
        self.due.clear();
        self.order.clear();
    }
}

impl Coordinator {
    /// Time moves on: the first round's clock starts with the first input,
    /// and a check-in window that has ended is drawn.
    pub(super) fn tick(&mut self, now: Instant) {
        if self.finished || self.leaf.awaiting {
            return;
        }
        if self.round.deadline.is_none() {
            self.arm_round(now);
        }
        if self.round.window_end.is_some_and(|e| now >= e) {
            self.draw_window(now);
        }
    }

    /// Starts the open round's clock: its deadline, and its check-in window.
    pub(super) fn arm_round(&mut self, now: Instant) {
        self.round.deadline = Some(now + self.cfg.round_deadline);
        self.round.window_end = (self.policy.windowed() && !self.cfg.selection_window.is_zero())
            .then(|| now + self.cfg.selection_window);
    }

    /// Whether the open round is still taking check-ins.
    pub(super) fn window_open(&self, now: Instant) -> bool {
        self.round.window_end.is_some_and(|e| now < e)
    }

    /// Holds an eligible newcomer's request until the window is drawn.
    pub(super) fn check_in(
        &mut self,
        session: SessionId,
        key: VerifyingKey,
        have: Option<ModelVersion>,
    ) {
        self.round
            .waiting
            .insert(key.to_bytes(), Candidate { session, key, have });
    }

    /// The window ended: draw the selected devices among the candidates
    /// still connected; the rest are paced away.
    pub(super) fn draw_window(&mut self, now: Instant) {
        self.round.window_end = None;
        let mut waiting: Vec<Candidate> = std::mem::take(&mut self.round.waiting)
            .into_values()
            .collect();
        waiting.retain(|c| {
            matches!(self.sessions.state(c.session),
                Some(SessionState::Ready { key }) if *key == c.key)
        });
        self.draw_order(&mut waiting);
        if self.cfg.strategy.secagg.is_some() {
            return self.draw_secure(now, waiting);
        }
        self.round.evaluation.drawing = true;
        for c in waiting {
            self.select_now(now, c.session, c.key, c.have);
        }
        self.round.evaluation.drawing = false;
    }

    /// A candidate held when its round closed asks again in the new one.
    pub(super) fn requeue(&mut self, now: Instant, c: Candidate) {
        let live = matches!(self.sessions.state(c.session),
            Some(SessionState::Ready { key }) if *key == c.key);
        if live {
            self.on_task_request(now, c.session, c.key, c.have);
        }
    }

    /// Orders candidates for selection: a seeded shuffle, or with
    /// `selection_by_stake` a weighted draw without replacement
    /// (Efraimidis and Spirakis, "Weighted random sampling with a
    /// reservoir", IPL 97(5), 2006: sort by u^(1/w), largest first).
    fn draw_order(&mut self, c: &mut Vec<Candidate>) {
        if !self.cfg.selection_by_stake {
            c.shuffle(&mut self.rng);
            return;
        }
        let mut keyed: Vec<(f64, Candidate)> = c
            .drain(..)
            .map(|cand| {
                let stake = self.stake_of(&device_id(&cand.key)).unwrap_or(0.0);
                let u: f64 = self.rng.random_range(f64::MIN_POSITIVE..1.0);
                let k = if stake > 0.0 && stake.is_finite() {
                    u.ln() / stake
                } else {
                    f64::NEG_INFINITY
                };
                (k, cand)
            })
            .collect();
        // ln(u^(1/w)) = ln(u)/w: the same order, without underflow.
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        c.extend(keyed.into_iter().map(|(_, cand)| cand));
    }

    /// Asks the round policy for a slot for this device, now.
    pub(super) fn select_now(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        have: Option<ModelVersion>,
    ) {
        let view = self.round_view();
        match self.policy.select(key.to_bytes(), &view) {
            TaskDecision::Offer => {
                self.round.reserve.remove(key.as_bytes());
                self.event(Event::DeviceSelected {
                    round_id: self.round.id,
                    device: device_id(&key),
                });
                if have != Some(self.round.model_version) {
                    // It must fetch the model: it has until the slot timeout
                    // to begin. One that holds it already starts training.
                    self.slots
                        .start(key.to_bytes(), now + self.cfg.slot_timeout);
                }
                self.send_offer(now, session, have);
            }
            TaskDecision::PaceAway(reason) => {
                self.round.reserve.insert(key.to_bytes());
                // No slot to train: evaluate the round's model, if the
                // round wants evaluators.
                if !self.offer_evaluation(now, session, &key, have) {
                    self.pace_away(session, reason)
                }
            }
        }
    }

    /// Offers whose device never began lose their slots.
    pub(super) fn expire_slots(&mut self, now: Instant) {
        let round_id = self.round.id;
        for key in self.slots.expired(now) {
            if self.policy.release(&key, round_id) {
                let secs = self.cfg.slot_timeout.as_secs_f64();
                self.event(Event::Rejected {
                    device: Some(hex::encode(key)),
                    code: RejectCode::NotSelected,
                    detail: format!(
                        "did not begin its download within {secs} s of its offer; the slot is free again"
                    ),
                });
                self.close_if_done(now);
            }
        }
    }

    /// A device gives up its task.
    pub(super) fn on_abandoned(
        &mut self,
        now: Instant,
        key: VerifyingKey,
        round_id: u64,
        reason: AbandonReason,
        detail: String,
    ) {
        let k = key.to_bytes();
        if !self.policy.release(&k, round_id) {
            return; // no task of that round: nothing to free
        }
        self.slots.stop(&k);
        if let Some(s) = self.round.secure.as_mut() {
            s.abandoned.insert(k);
        }
        if reason == AbandonReason::Diverged && round_id == self.round.id {
            self.round.diverged += 1;
        }
        let dev = device_id(&key);
        let stake = self.stake_of(&dev);
        let why = format!("task abandoned ({}): {detail}", reason.name());
        let record = ledger::refused(self.round.id, &dev, stake, 0, why);
        self.event(Event::Contribution(record));
        self.close_if_done(now);
    }

    /// Closes the round early when every device chosen for it is done, no
    /// device that was turned away for want of a slot can take a freed one,
    /// and there is something to do: enough updates to publish, or enough
    /// reports of divergence to roll back.
    pub(super) fn close_if_done(&mut self, now: Instant) {
        if self.secure_running() {
            return; // a secure round closes on its outcome
        }
        if self.finished || self.round.window_end.is_some() || !self.policy.all_done() {
            return;
        }
        if self.policy.slot_free() && !self.round.reserve.is_empty() {
            return; // a device waiting for a slot will come back for it
        }
        if self.round.combiner.count() >= self.cfg.min_devices || self.rollback_due() {
            self.close_round(now);
        }
    }
}
