//! Off-task payload checks. A complete upload's checks that need only its
//! bytes (the blake3 hash against the signed manifest, the decoding, which
//! refuses values that are not finite, and the norm bound) cost O(payload)
//! and used to run on the coordinator's task, one upload at a time, while
//! every other device waited. The coordinator now hands them to its driver
//! as an [`Output::Verify`] job; the driver runs [`VerifyJob::run`] where it
//! likes (the server: tokio's blocking pool) and hands the [`Verified`]
//! result back through [`Coordinator::handle_verified`]. The coordinator
//! keeps every check that needs its state (round, selection, replay,
//! equivocation, deadline, weight), in the order it always had: the task
//! and deadline before the payload, the payload before the weight.
//!
//! **Invariant: bounded.** At most `verify_in_flight_max` jobs are out at
//! once (each holds one decoded update: at most 8 bytes a parameter);
//! complete uploads past that wait here in arrival order. Every payload
//! waiting or out still counts against `uploads_in_flight_bytes_max`, so a
//! flood of uploads makes the server hold no more than before, and one
//! device has one upload at a time: while its upload is checked, a new
//! `UploadBegin` from it is paced away (it keeps its update).
//!
//! **API boundary:** a [`Verified`] can only be made by [`VerifyJob::run`];
//! a driver cannot hand the coordinator a payload it did not check.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use fedge_proto::msg::UploadBegin;
use fedge_proto::sign::VerifyingKey;
use fedge_proto::{Limits, RejectCode, update};

use super::policy::Refusal;
use super::sessions::{DeviceKey, device_id};
use super::transfers::Upload;
use super::{Coordinator, Output, SessionId};
use crate::robust::Values;

/// The checks of one complete upload that need only its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyJob {
    ticket: u64,
    payload: Vec<u8>,
    payload_hash: [u8; 32],
    dimension: usize,
    /// A partial aggregate at float64 (a root), a device's update otherwise.
    partial: bool,
    limits: Limits,
    norm_max: Option<f64>,
}

/// A job's outcome, for [`Coordinator::handle_verified`].
#[derive(Debug)]
pub struct Verified {
    ticket: u64,
    /// The signed hash the payload was checked against: a result is only
    /// taken for the upload it was made for (not, say, one another
    /// coordinator instance handed out under the same ticket).
    payload_hash: [u8; 32],
    payload: Vec<u8>,
    values: Result<Values, Refusal>,
}

impl VerifyJob {
    /// The payload's size: what the job holds.
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }

    /// Hash, decode (refusing non-finite values) and bound the norm. Pure;
    /// O(payload + dimension).
    pub fn run(self) -> Verified {
        let values = check_payload(
            &self.payload,
            &self.payload_hash,
            self.dimension,
            self.partial,
            &self.limits,
            self.norm_max,
        );
        Verified {
            ticket: self.ticket,
            payload_hash: self.payload_hash,
            payload: self.payload,
            values,
        }
    }
}

impl Verified {
    /// The rejection this payload earned, if any (for drivers' logs and
    /// tests; the coordinator sends it).
    pub fn refusal(&self) -> Option<RejectCode> {
        self.values.as_ref().err().map(|(code, _)| *code)
    }
}

/// The payload checks, in their order: the signed hash, the decoding, the
/// norm bound.
fn check_payload(
    payload: &[u8],
    payload_hash: &[u8; 32],
    dimension: usize,
    partial: bool,
    limits: &Limits,
    norm_max: Option<f64>,
) -> Result<Values, Refusal> {
    if blake3::hash(payload).as_bytes() != payload_hash {
        return Err((
            RejectCode::HashMismatch,
            "payload does not match the signed hash".into(),
        ));
    }
    let delta = decode(payload, dimension, partial, limits)
        .map_err(|e| (e.reject_code(), e.to_string()))?;
    if let Some(bound) = norm_max {
        let norm = delta.norm();
        if norm > bound {
            let detail = format!("update norm {norm:.4} exceeds the bound {bound}");
            return Err((RejectCode::NormBound, detail));
        }
    }
    debug_assert_eq!(delta.len(), dimension, "decoded to the model's dimension");
    Ok(delta)
}

/// An update payload's values: a partial aggregate's at float64, a
/// device's at float32.
pub(super) fn decode(
    payload: &[u8],
    dimension: usize,
    partial: bool,
    limits: &Limits,
) -> Result<Values, fedge_proto::ProtoError> {
    Ok(if partial {
        Values::F64(update::decode_partial(payload, dimension, limits)?)
    } else {
        Values::F32(update::decode_update(payload, dimension, limits)?)
    })
}

/// A complete upload whose payload is being checked.
struct Pending {
    session: SessionId,
    key: VerifyingKey,
    begin: UploadBegin,
    /// The open round when the upload completed: if another is open when
    /// the check comes back, the task is checked again.
    round_id: u64,
}

/// Uploads whose payloads are being checked, and the bound on them.
#[derive(Default)]
pub(super) struct Verifying {
    /// Jobs handed out at once, at most.
    max: usize,
    /// Complete uploads waiting for a job slot, oldest first.
    waiting: VecDeque<VerifyJob>,
    /// Jobs handed out and not yet answered.
    out: HashSet<u64>,
    pending: HashMap<u64, Pending>,
    keys: HashSet<DeviceKey>,
    /// Payload bytes waiting or out.
    bytes: u64,
    next_ticket: u64,
}

impl Verifying {
    pub(super) fn new(max: usize) -> Self {
        Verifying {
            max,
            ..Default::default()
        }
    }

    /// Payload bytes held for checks (waiting or out).
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether `key` has an upload being checked.
    pub(super) fn holds(&self, key: &DeviceKey) -> bool {
        self.keys.contains(key)
    }

    /// Jobs handed out and not yet answered.
    pub(super) fn out(&self) -> usize {
        self.out.len()
    }

    /// Uploads waiting for a job slot.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The next job to hand out, if a slot is free.
    fn next_job(&mut self) -> Option<VerifyJob> {
        if self.out.len() >= self.max {
            return None;
        }
        let job = self.waiting.pop_front()?;
        self.out.insert(job.ticket);
        Some(job)
    }

    /// An answered job: its upload, if still known.
    fn finish(&mut self, v: &Verified) -> Option<Pending> {
        let p = self.pending.get(&v.ticket)?;
        if p.begin.manifest.payload_hash != v.payload_hash
            || p.begin.manifest.payload_bytes != v.payload.len() as u64
            || !self.out.remove(&v.ticket)
        {
            return None;
        }
        self.bytes -= v.payload.len() as u64;
        let p = self.pending.remove(&v.ticket)?;
        self.keys.remove(p.key.as_bytes());
        Some(p)
    }
}

impl Coordinator {
    /// A complete upload goes to the payload checks (queued while
    /// `verify_in_flight_max` jobs are out).
    pub(super) fn start_verify(&mut self, session: SessionId, key: VerifyingKey, u: Upload) {
        let v = &mut self.verifying;
        let ticket = v.next_ticket;
        v.next_ticket += 1;
        let job = VerifyJob {
            ticket,
            payload_hash: u.begin.manifest.payload_hash,
            payload: u.data,
            dimension: self.current.params.values.len(),
            partial: self.cfg.tree.takes_partials(),
            limits: self.cfg.limits.clone(),
            norm_max: self.cfg.update_norm_max,
        };
        v.bytes += job.payload.len() as u64;
        v.keys.insert(key.to_bytes());
        v.pending.insert(
            ticket,
            Pending {
                session,
                key,
                begin: u.begin,
                round_id: self.round.id,
            },
        );
        v.waiting.push_back(job);
        self.hand_out_jobs();
    }

    /// Hands out payload checks while slots are free (none while a round's
    /// close is out: their results would wait for it).
    pub(super) fn hand_out_jobs(&mut self) {
        if self.closing() {
            return;
        }
        while let Some(job) = self.verifying.next_job() {
            self.out.push_back(Output::Verify(Box::new(job)));
        }
    }

    /// A payload check came back ([`VerifyJob::run`] of a job from
    /// [`Output::Verify`]): the update is refused with the check's typed
    /// reason, or, if its task still stands, weighed, accepted (made
    /// durable first) and acknowledged. A result for a job this
    /// coordinator did not hand out is ignored.
    pub fn handle_verified(&mut self, now: Instant, v: Verified) {
        self.tick(now);
        if self.closing() {
            // Taken once the close is applied, against the round it opens.
            self.closes.parked.push(v);
            return;
        }
        let Some(p) = self.verifying.finish(&v) else {
            tracing::warn!(ticket = v.ticket, "a payload check nobody asked for");
            return;
        };
        self.hand_out_jobs();
        let Verified {
            payload, values, ..
        } = v;
        let Pending {
            session,
            key,
            begin,
            round_id,
        } = p;
        let u = Upload {
            begin,
            data: payload,
            next_index: 0,
        };
        let dev = device_id(&key);
        if let Err((code, detail)) = self.recheck_task(now, &key, &u, round_id) {
            self.reject(session, Some(dev), code, detail, false);
            return;
        }
        match values.and_then(|delta| self.weigh(&dev, &u, delta)) {
            Ok(admitted) => self.accept(now, session, key, u, admitted),
            Err((code, detail)) => self.refuse_update(session, &dev, code, detail, &u),
        }
    }

    /// The task checks that the time a payload check took can change: the
    /// deadline and staleness window (as when the upload completed), and,
    /// if another round opened meanwhile, the task itself (as for an
    /// upload that carries over a round's close).
    fn recheck_task(
        &self,
        now: Instant,
        key: &VerifyingKey,
        u: &Upload,
        round_id: u64,
    ) -> Result<(), Refusal> {
        let m = &u.begin.manifest;
        if self.leaf.awaiting {
            return Err((
                RejectCode::RoundClosed,
                "the round closed while the update was checked".into(),
            ));
        }
        if round_id != self.round.id {
            self.policy
                .check_task(key.as_bytes(), m, &self.round_view(), now, &self.transfers)?;
        }
        self.policy.check_completion(m, &self.round_view(), now)
    }
}
