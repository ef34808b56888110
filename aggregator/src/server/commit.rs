//! Group commit: accepted updates that arrive close together are made
//! durable as one group ([`UpdateWriter::persist_group`]: payloads
//! fsynced, rows in one transaction), written beside the coordinator's
//! task, one group at a time, while the next one gathers.
//!
//! **Invariant: acknowledged means durable.** An `UpdateAccepted` frame
//! is held until every update persisted before it (its own included) is
//! in a group that was written; a session's later frames (and its close)
//! wait behind its held ones, so each connection still sees its messages
//! in the coordinator's order. Frames to other sessions are not held. A
//! group that fails to write ends the server with the error: its
//! acknowledgements are never sent, and a restart resumes from what is
//! durable.
//!
//! A group is written when it is full (`group_max`), when its first
//! update has waited `wait`, or at once when the driver flushes (before a
//! publication or an aborted round, whose store writes must follow the
//! round's updates; before a leaf hands its partial to its parent, which
//! counts the updates in it; and when the server stops). While one group is written the next gathers;
//! a full group waits for the one before it (back-pressure on the
//! coordinator's task, which is where a flood of updates should wait).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use fedge_proto::AggMsg;
use tokio::task::JoinHandle;

use crate::coordinator::{DurableUpdate, Output, SessionId};
use crate::store::{StoreError, UpdateWriter};

/// Default for [`CommitLimits::group_max`].
pub const COMMIT_GROUP_MAX: usize = 64;
/// Default for [`CommitLimits::wait`].
pub const COMMIT_WAIT: Duration = Duration::from_millis(2);
/// The most [`CommitLimits::group_max`] may be.
pub const COMMIT_GROUP_LIMIT: usize = 4096;
/// The most [`CommitLimits::wait`] may be.
pub const COMMIT_WAIT_LIMIT: Duration = Duration::from_secs(1);

/// How accepted updates are grouped before they are made durable.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitLimits {
    /// Updates in one group, at most (1: each written alone).
    pub group_max: usize,
    /// How long a group's first update waits for others to join it.
    pub wait: Duration,
}

impl Default for CommitLimits {
    fn default() -> Self {
        CommitLimits {
            group_max: COMMIT_GROUP_MAX,
            wait: COMMIT_WAIT,
        }
    }
}

impl CommitLimits {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=COMMIT_GROUP_LIMIT).contains(&self.group_max) {
            return Err(format!(
                "server.commit_group_max must be in 1..={COMMIT_GROUP_LIMIT}, got {}",
                self.group_max
            ));
        }
        if self.wait > COMMIT_WAIT_LIMIT {
            return Err(format!(
                "server.commit_wait_ms must be at most {}, got {}",
                COMMIT_WAIT_LIMIT.as_millis(),
                self.wait.as_millis()
            ));
        }
        Ok(())
    }
}

type Running = JoinHandle<Result<(), StoreError>>;

/// The driver's half of group commit: the group gathering, the one being
/// written, and the frames waiting for them.
pub(super) struct GroupCommit {
    writer: UpdateWriter,
    limits: CommitLimits,
    open: Vec<DurableUpdate>,
    opened_at: Option<Instant>,
    /// Groups are numbered in the order they are written.
    open_id: u64,
    running: Option<(u64, Running)>,
    /// Per session, outputs waiting for a group (by number), in order.
    held: HashMap<SessionId, VecDeque<(u64, Output)>>,
    /// Updates written, and groups, for the report.
    pub written: (u64, u64),
}

impl GroupCommit {
    pub fn new(writer: UpdateWriter, limits: CommitLimits) -> Self {
        debug_assert!(limits.validate().is_ok());
        GroupCommit {
            writer,
            limits,
            open: Vec::new(),
            opened_at: None,
            open_id: 0,
            running: None,
            held: HashMap::new(),
            written: (0, 0),
        }
    }

    /// Adds an accepted update to the gathering group; the caller made
    /// room first ([`GroupCommit::make_room`]).
    pub fn add(&mut self, now: Instant, u: DurableUpdate) {
        debug_assert!(self.open.len() < self.limits.group_max);
        if self.open.is_empty() {
            self.opened_at = Some(now);
        }
        self.open.push(u);
    }

    /// Whether the gathering group is full.
    pub fn is_full(&self) -> bool {
        self.open.len() >= self.limits.group_max
    }

    /// Room for one more update: a full group is written (after the one
    /// before it, whose released outputs come back).
    pub async fn make_room(&mut self) -> anyhow::Result<Vec<Output>> {
        if !self.is_full() {
            return Ok(Vec::new());
        }
        let released = self.finish_running().await?;
        self.start();
        Ok(released)
    }

    /// The group an acknowledgement sent now waits for, if any update
    /// persisted before it is not yet durable.
    fn pending_group(&self) -> Option<u64> {
        if !self.open.is_empty() {
            Some(self.open_id)
        } else {
            self.running.as_ref().map(|(id, _)| *id)
        }
    }

    /// A frame or close: back if it may go now, or held behind a group.
    pub fn route(&mut self, out: Output) -> Option<Output> {
        let (session, ack) = match &out {
            Output::Send { session, msg } => {
                (*session, matches!(msg, AggMsg::UpdateAccepted { .. }))
            }
            Output::Close { session, .. } => (*session, false),
            _ => return Some(out),
        };
        let behind = self
            .held
            .get(&session)
            .and_then(|q| q.back())
            .map(|(g, _)| *g);
        let need = if ack { self.pending_group() } else { None };
        match behind.max(need) {
            Some(g) => {
                self.held.entry(session).or_default().push_back((g, out));
                None
            }
            None => Some(out),
        }
    }

    /// Outputs held, all sessions together.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.values().map(VecDeque::len).sum()
    }

    /// When the gathering group is due to be written (None: nothing
    /// gathers, or a group is being written and this one follows it).
    pub fn start_at(&self) -> Option<Instant> {
        if self.running.is_some() {
            return None;
        }
        self.opened_at.map(|t| {
            if self.is_full() {
                t
            } else {
                t + self.limits.wait
            }
        })
    }

    /// Starts writing the gathering group if it is due.
    pub fn poll_start(&mut self, now: Instant) {
        if self.start_at().is_some_and(|t| now >= t) {
            self.start();
        }
    }

    fn start(&mut self) {
        debug_assert!(self.running.is_none());
        if self.open.is_empty() {
            return;
        }
        let group = std::mem::take(&mut self.open);
        self.opened_at = None;
        self.written.0 += group.len() as u64;
        self.written.1 += 1;
        let writer = self.writer.clone();
        let task = tokio::spawn(async move { writer.persist_group(&group).await });
        self.running = Some((self.open_id, task));
        self.open_id += 1;
    }

    /// Whether a group is being written.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The group being written, to await (only while [`Self::is_running`]).
    pub fn running(&mut self) -> &mut Running {
        &mut self.running.as_mut().expect("a group is being written").1
    }

    /// The group being written returned: the outputs it releases, in
    /// order, or the error that must end the server.
    pub fn done(
        &mut self,
        res: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) -> anyhow::Result<Vec<Output>> {
        let (id, _) = self.running.take().expect("a group was being written");
        match res {
            Ok(Ok(())) => Ok(self.release(id)),
            Ok(Err(e)) => Err(anyhow::Error::new(e)
                .context("making accepted updates durable failed; none of them was acknowledged")),
            Err(e) => Err(anyhow::anyhow!(
                "the task making accepted updates durable failed: {e}; none of them was acknowledged"
            )),
        }
    }

    /// Waits for the group being written, if any.
    async fn finish_running(&mut self) -> anyhow::Result<Vec<Output>> {
        if self.running.is_none() {
            return Ok(Vec::new());
        }
        let res = self.running().await;
        self.done(res)
    }

    /// Everything gathered made durable now: the group being written, then
    /// the one gathering. The outputs they release, in order.
    pub async fn flush(&mut self) -> anyhow::Result<Vec<Output>> {
        let mut released = self.finish_running().await?;
        self.start();
        released.extend(self.finish_running().await?);
        Ok(released)
    }

    fn release(&mut self, durable: u64) -> Vec<Output> {
        let mut out = Vec::new();
        self.held.retain(|_, q| {
            while q.front().is_some_and(|(g, _)| *g <= durable) {
                out.push(q.pop_front().expect("front").1);
            }
            !q.is_empty()
        });
        out
    }
}

#[cfg(test)]
mod tests;
