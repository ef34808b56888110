//! The simulated fleet's part in a round's close (and what its events
//! say of rejections): the coordinator's close
//! job runs after virtual time (`Closes::time`), at once (zero: the
//! close as it ran inline), or is held for the test to answer.

use std::time::{Duration, Instant};

use fedge_aggregator::coordinator::{CloseJob, RoundClose};
use fedge_proto::AggMsg;

use super::{Ev, Sim};

/// Virtual time a round's close takes off the coordinator's task, unless
/// a test sets `Closes::time`.
pub const CLOSE_TIME: Duration = Duration::from_millis(40);

/// How a sim answers round closes, and what it saw meanwhile.
pub struct Closes {
    /// Virtual time a close job takes; zero: it is answered at once,
    /// before any other input (the close as it ran inline).
    pub time: Duration,
    /// While a close job is out: since when.
    pub since: Option<Instant>,
    /// What the coordinator sent devices while a close job was out.
    pub sent: Vec<&'static str>,
    /// Wall time of each close job's run and of applying its result.
    pub wall: Vec<(Duration, Duration)>,
    /// Keep close jobs in `held` instead of running them (a test answers
    /// them itself, through `coord.handle_closed`).
    pub hold: bool,
    pub held: Vec<CloseJob>,
}

impl Default for Closes {
    fn default() -> Self {
        Closes {
            time: CLOSE_TIME,
            since: None,
            sent: Vec::new(),
            wall: Vec::new(),
            hold: false,
            held: Vec::new(),
        }
    }
}

impl Closes {
    pub(super) fn note_sent(&mut self, msg: &AggMsg) {
        if self.since.is_some() {
            self.sent.push(agg_msg_name(msg));
        }
    }
}

impl Sim {
    /// Details of the rejections with `code`.
    pub fn rejection_details(&self, code: fedge_proto::RejectCode) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                fedge_aggregator::coordinator::Event::Rejected {
                    code: c, detail, ..
                } if *c == code => Some(detail.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn rejections(&self) -> Vec<fedge_proto::RejectCode> {
        self.events
            .iter()
            .filter_map(|e| match e {
                fedge_aggregator::coordinator::Event::Rejected { code, .. } => Some(*code),
                _ => None,
            })
            .collect()
    }

    pub(super) fn on_close_job(&mut self, job: CloseJob) {
        if self.closes.hold {
            self.closes.since = Some(self.now);
            self.closes.held.push(job);
            return;
        }
        let started = Instant::now();
        let closed = job.run();
        let ran = started.elapsed();
        if self.closes.time.is_zero() {
            let started = Instant::now();
            self.coord.handle_closed(self.now, closed);
            self.closes.wall.push((ran, started.elapsed()));
        } else {
            self.closes.wall.push((ran, Duration::ZERO));
            self.closes.since = Some(self.now);
            let at = self.now + self.closes.time;
            self.schedule(at, Ev::Closed(closed));
        }
    }

    pub(super) fn on_closed(&mut self, now: Instant, c: RoundClose) {
        self.closes.since = None;
        let started = Instant::now();
        self.coord.handle_closed(now, c);
        if let Some(last) = self.closes.wall.last_mut() {
            last.1 = started.elapsed();
        }
    }
}

/// A message's name, for what a test saw the coordinator send.
pub fn agg_msg_name(m: &AggMsg) -> &'static str {
    match m {
        AggMsg::Challenge { .. } => "Challenge",
        AggMsg::AuthOk { .. } => "AuthOk",
        AggMsg::NoTask { .. } => "NoTask",
        AggMsg::HeartbeatAck { .. } => "HeartbeatAck",
        AggMsg::ModelChunk { .. } => "ModelChunk",
        AggMsg::TaskOffer(_) => "TaskOffer",
        AggMsg::UpdateAccepted { .. } => "UpdateAccepted",
        AggMsg::Reject { .. } => "Reject",
        _ => "other",
    }
}
