//! The finish: once the last round has published, a device that asks for
//! a task is told so (`Finished`) and fetches the final model.
//!
//! Ten thousand devices fetching it at once would hold ten thousand
//! transfers in the aggregator's writers and the transport's buffers
//! (gigabytes), and every one of them would crawl. So at most
//! `final_downloads_max` fetch at once; the others are paced away like any
//! device not needed now, and come back. A fetch holds its slot until it
//! asks for the model's last chunk, its connection goes, or `slot_timeout`
//! passes: a device that takes a slot and never reads holds it no longer
//! than that (it may go on fetching; it no longer counts). A device that
//! already holds the final model takes no slot, nor does a key told
//! `Finished` before: a key takes a slot once, so a few keys asking again
//! and again cannot keep the slots from the devices still waiting (a
//! repeated fetch is bounded like any transfer, by the connection's
//! writer queue and rate limit).
//!
//! The server keeps serving while fetches start: it stops once every
//! device has left, or when none has started one for its grace period
//! past the longest wait it tells devices ([`Coordinator::finish_active_at`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use fedge_proto::sign::VerifyingKey;
use fedge_proto::{AggMsg, ModelVersion};

use super::{Coordinator, SessionId};

/// Fetches of the final model in progress, bounded.
#[derive(Debug)]
pub(super) struct FinalDownloads {
    max: usize,
    hold: Duration,
    /// Session -> when its slot lapses.
    open: HashMap<SessionId, Instant>,
    /// Slots in the order they lapse (entries of fetches already done are
    /// skipped). Bounded by the fetches started within one `hold`.
    lapses: VecDeque<(Instant, SessionId)>,
    last_start: Option<Instant>,
}

impl FinalDownloads {
    pub fn new(max: usize, hold: Duration) -> Self {
        FinalDownloads {
            max: max.max(1),
            hold,
            open: HashMap::new(),
            lapses: VecDeque::new(),
            last_start: None,
        }
    }

    fn lapse(&mut self, now: Instant) {
        while let Some(&(t, s)) = self.lapses.front() {
            if t > now {
                break;
            }
            self.lapses.pop_front();
            if self.open.get(&s) == Some(&t) {
                self.open.remove(&s);
            }
        }
    }

    /// Takes a slot for `session`'s fetch: false when all are taken.
    pub fn start(&mut self, now: Instant, session: SessionId) -> bool {
        self.lapse(now);
        if self.open.len() >= self.max && !self.open.contains_key(&session) {
            return false;
        }
        let until = now + self.hold;
        self.open.insert(session, until);
        self.lapses.push_back((until, session));
        self.last_start = Some(now);
        true
    }

    /// `session`'s fetch is done (its last chunk asked for) or gone.
    pub fn done(&mut self, session: SessionId) {
        self.open.remove(&session);
    }

    pub fn in_flight(&self) -> usize {
        self.open.len()
    }

    pub fn last_start(&self) -> Option<Instant> {
        self.last_start
    }
}

impl Coordinator {
    /// A device asks for a task after the last round: told `Finished` if
    /// it holds the final model or a fetch slot is free, else paced away.
    pub(super) fn on_finished_request(
        &mut self,
        now: Instant,
        session: SessionId,
        key: VerifyingKey,
        have: Option<ModelVersion>,
    ) {
        let holds_it = have == Some(self.current_version);
        let again = self.sessions.was_told_finished(key.as_bytes());
        if !holds_it && !again && !self.finals.start(now, session) {
            let reason = format!(
                "finished: {} devices are fetching the final model; come back for it",
                self.finals.in_flight()
            );
            self.pace_away(session, &reason);
            return;
        }
        let mref = self.transfers.model_ref(&self.current_version);
        self.sessions.note_told_finished(key.to_bytes());
        self.send(session, AggMsg::Finished(mref));
    }

    /// A chunk of `version` was asked for: the last chunk of the final
    /// model ends that session's fetch.
    pub(super) fn note_chunk_asked(
        &mut self,
        session: SessionId,
        version: ModelVersion,
        index: u32,
    ) {
        if self.finished
            && version == self.current_version
            && index + 1 >= self.transfers.model_ref(&version).chunk_count
        {
            self.finals.done(session);
        }
    }

    /// When the finish was last active (it finished, or a fetch of the
    /// final model started): a server stops serving the final model once
    /// its grace period past the longest wait it tells devices
    /// ([`Coordinator::pace_horizon`]) has passed since. None before the
    /// finish.
    pub fn finish_active_at(&self) -> Option<Instant> {
        if !self.finished {
            return None;
        }
        self.finals.last_start()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_fetches_are_bounded_and_slots_come_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut f = FinalDownloads::new(2, 10 * s);
        assert!(f.start(t0, 1));
        assert!(f.start(t0, 2));
        assert!(!f.start(t0, 3), "both slots taken");
        assert!(f.start(t0, 2), "a session asking again keeps its slot");
        f.done(1);
        assert!(f.start(t0 + s, 3));
        assert_eq!(f.in_flight(), 2);
        // Session 2 never finishes: its slot lapses after the hold.
        assert!(!f.start(t0 + 9 * s, 4));
        assert!(f.start(t0 + 10 * s, 4));
        assert_eq!(f.last_start(), Some(t0 + 10 * s));
        // 3's slot lapses at 11 s, 4's at 20 s.
        assert!(f.start(t0 + 11 * s, 5));
        assert!(!f.start(t0 + 11 * s, 6));
    }
}
