//! Off-task round close. A round's close used to run whole on the
//! coordinator's task: the combiner's finish (the robust ones O(n x dim),
//! Multi-Krum O(n^2 x dim)) and contribution scoring (forward passes of
//! the validation sample for every update, the costliest part), while
//! every other session waited. Now the coordinator takes what they need
//! out of the round (its combiner, the held updates, the model they apply
//! to and a share of the evaluator) into a [`CloseJob`], hands it to its
//! driver as [`Output::CloseRound`], and applies the [`RoundClose`] the
//! driver hands back through [`Coordinator::handle_closed`]: settlement
//! (replay flags, rewards, the ledger record), the server optimizer's
//! step, the publication, the checkpoint and the next round, in the order
//! they always had.
//!
//! **While a close is out** the coordinator serves every other session:
//! connections are admitted and authenticated, heartbeats answered,
//! downloads served, task requests paced away ("the round is closing");
//! a synchronous round's late `UploadBegin` is refused (`RoundClosed`),
//! and payload checks that come back wait for the close, then are
//! checked against the round that opened (a late update refused as it
//! always was, a FedBuff update combined into the next buffer). The
//! round's timers are stopped (nothing is due until the result is back),
//! and no second close starts.
//!
//! **API boundary:** a [`RoundClose`] is made only by [`CloseJob::run`],
//! and it is applied only by the coordinator that handed out its job,
//! for the round it was made for, once: anything else is ignored.
//!
//! A leaf's close goes the same way: its job combines at float64 (the
//! partial aggregate travels so) and scores its devices, and the result
//! is forwarded to the parent instead of published
//! ([`Coordinator::forward_closed`]). Should the parent offer a later
//! round while a leaf's close is out, the round is aborted and the job's
//! result ignored when it comes back.
//!
//! Kept inline, on purpose: an aborted or rolled-back round (no combine,
//! no scoring) and a SecAgg+ round (its sum is the SecAgg server's, built
//! stage by stage; the close divides it, O(dim), and scores nothing).

use std::fmt;
use std::time::Instant;

use super::settle::{Scoring, SharedEvaluator, lock};
use super::verify::Verified;
use super::{Coordinator, RoundOutcome};
use crate::robust::{Combined, Combiner, StreamingMean};
use crate::scoring::{Evaluator, RoundScores};

/// A round's close: the pure, costly part, to run off the coordinator's
/// task.
pub struct CloseJob {
    ticket: u64,
    round_id: u64,
    combiner: Box<dyn Combiner>,
    max_share: f64,
    scoring: Scoring,
    /// The model the round's updates apply to (scoring's base).
    base: Vec<f32>,
    evaluator: Option<SharedEvaluator>,
    /// A leaf's close: the combined update at float64, for its partial.
    leaf: bool,
}

/// A close job's result, for [`Coordinator::handle_closed`].
pub struct RoundClose {
    ticket: u64,
    round_id: u64,
    combined: Option<Combined>,
    /// A leaf's: the combined update at float64.
    partial: Option<Combined<f64>>,
    scoring: Scoring,
    scores: RoundScores,
}

impl fmt::Debug for CloseJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloseJob")
            .field("ticket", &self.ticket)
            .field("round_id", &self.round_id)
            .field("updates", &self.combiner.count())
            .finish_non_exhaustive()
    }
}

/// The same job: the same ticket of the same round (what it holds is
/// not comparable; no two jobs of one coordinator share a ticket).
impl PartialEq for CloseJob {
    fn eq(&self, other: &Self) -> bool {
        (self.ticket, self.round_id) == (other.ticket, other.round_id)
    }
}

impl fmt::Debug for RoundClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundClose")
            .field("ticket", &self.ticket)
            .field("round_id", &self.round_id)
            .finish_non_exhaustive()
    }
}

impl CloseJob {
    /// The round this job closes.
    pub fn round_id(&self) -> u64 {
        self.round_id
    }

    /// Combines the round's updates and scores them. Pure (the evaluator
    /// is locked for the scoring: no one else uses it while a close is
    /// out); O(combine + updates x validation sample).
    pub fn run(mut self) -> RoundClose {
        let (combined, partial) = if self.leaf {
            (None, self.combiner.finish_f64(self.max_share))
        } else {
            (self.combiner.finish(self.max_share), None)
        };
        let scores = {
            let mut evaluator = self.evaluator.as_ref().map(lock);
            self.scoring.score(
                evaluator
                    .as_deref_mut()
                    .map(|e| &mut **e as &mut dyn Evaluator),
                &self.base,
            )
        };
        RoundClose {
            ticket: self.ticket,
            round_id: self.round_id,
            combined,
            partial,
            scoring: self.scoring,
            scores,
        }
    }
}

impl RoundClose {
    /// The round this result closes.
    pub fn round_id(&self) -> u64 {
        self.round_id
    }
}

/// The close out, if any, and what waits for it.
#[derive(Default)]
pub(super) struct Closes {
    next_ticket: u64,
    /// The job out: its ticket, its round and the updates it combines.
    out: Option<(u64, u64, usize)>,
    /// Payload checks that came back while the close was out (at most
    /// `verify_in_flight_max`: no job is handed out meanwhile).
    pub parked: Vec<Verified>,
}

impl Closes {
    /// The updates the round being closed combines, while its job is out.
    pub(super) fn closing_accepted(&self) -> Option<usize> {
        self.out.map(|(_, _, n)| n)
    }
}

impl Coordinator {
    /// Updates accepted so far in the open round (the round being closed
    /// while its job is out).
    pub fn accepted_in_round(&self) -> usize {
        self.closes
            .closing_accepted()
            .unwrap_or_else(|| self.round.combiner.count())
    }

    /// Whether a round's close job is out.
    pub(super) fn closing(&self) -> bool {
        self.closes.out.is_some()
    }

    /// Hands out the open round's close (`accepted` updates, at least
    /// one): its combiner and held updates go with the job.
    pub(super) fn start_close(&mut self, accepted: usize) {
        debug_assert!(!self.closing(), "one close at a time");
        let round_id = self.round.id;
        let dim = self.current.params.values.len();
        // An empty stand-in until the next round opens with its own.
        let combiner =
            std::mem::replace(&mut self.round.combiner, Box::new(StreamingMean::new(dim)));
        debug_assert_eq!(combiner.count(), accepted);
        let ticket = self.closes.next_ticket;
        self.closes.next_ticket += 1;
        self.closes.out = Some((ticket, round_id, accepted));
        let job = CloseJob {
            ticket,
            round_id,
            combiner,
            max_share: self.cfg.weights.max_share,
            scoring: self.scoring(round_id),
            base: self.current.params.values.clone(),
            evaluator: self.evaluator.clone(),
            leaf: self.is_leaf(),
        };
        self.out.push_back(super::Output::CloseRound(Box::new(job)));
    }

    /// A round's close came back ([`CloseJob::run`] of the job from
    /// [`super::Output::CloseRound`]): the round is settled, its model
    /// published and the next round opened; payload checks that came back
    /// meanwhile are then taken. A result for a job this coordinator did
    /// not hand out, for another round, or already applied, is ignored.
    pub fn handle_closed(&mut self, now: Instant, c: RoundClose) {
        self.tick(now);
        let round_id = self.round.id;
        let Some((ticket, closing_round, accepted)) = self.closes.out else {
            tracing::warn!(round_id = c.round_id, "a round close nobody asked for");
            return;
        };
        if (c.ticket, c.round_id) != (ticket, closing_round) || closing_round != round_id {
            tracing::warn!(
                round_id = c.round_id,
                closing = closing_round,
                "a round close for another round or job"
            );
            return;
        }
        self.closes.out = None;
        let RoundClose {
            combined,
            partial,
            scoring,
            scores,
            ..
        } = c;
        if let Some(partial) = partial {
            self.forward_closed(accepted, partial, scoring, scores);
        } else {
            let combined = combined.expect("a close job combines at least one update");
            let contributions = self.round.book.settle_published(&combined.weights);
            self.settle_scored(round_id, &contributions, scoring, scores);
            let values = self.strategy.aggregate_round(
                round_id,
                &self.current.params.values,
                &combined,
                &[],
            );
            let outcome: RoundOutcome = self.publish(round_id, values);
            self.finish_close(now, accepted, outcome, contributions, Vec::new());
        }
        self.take_parked(now);
    }

    /// A leaf's round ended while its close was out (the parent moved
    /// on): the job's result will be ignored. The payload checks parked
    /// for it stay parked until [`Self::take_parked`] takes them against
    /// the round open then.
    pub(super) fn drop_close(&mut self) {
        self.closes.out = None;
    }

    /// Payload checks parked while a close was out, taken now; then the
    /// checks that were not handed out while it was.
    pub(super) fn take_parked(&mut self, now: Instant) {
        for v in std::mem::take(&mut self.closes.parked) {
            self.handle_verified(now, v);
        }
        self.hand_out_jobs();
    }
}
