//! Provable misbehaviour and what it costs: penalties held for the next
//! settlement, each with its evidence, and the stake they slash.
//!
//! - A signed update refused as not finite or over the norm bound: the
//!   payload is the evidence ([`PENALTY_NON_FINITE`], [`PENALTY_NORM_BOUND`]).
//! - Equivocation ([`PENALTY_EQUIVOCATION`]): a device signs a second,
//!   different update for a task whose update was already accepted. The
//!   accepted update's signed manifest is kept while its task can still be
//!   answered, so the second manifest, refused as a replay, makes with it a
//!   [`fedge_proto::evidence::Equivocation`] anyone can check.
//! - A copy ([`PENALTY_COPY`]): an update flagged as a copy of an earlier
//!   one of the same round when the round is scored; both payloads are
//!   kept with the round's updates.
//!
//! **Slashing.** Each penalty slashes `scoring.slash_fraction` of the
//! device's stake from the moment it is settled (a copy only with
//! `scoring.slash_copies`: similarity is evidence, not proof): the stake the registry
//! says is multiplied by `1 - f` per penalty. The ledger records each
//! penalty with the fraction it slashed, so a restarted aggregator (or
//! anyone) rebuilds the multipliers from the ledger
//! ([`Coordinator::restore_slashes`]); the registry file stays the
//! operator's, never rewritten.

use std::collections::HashMap;

use bytes::Bytes;
use fedge_proto::RejectCode;
use fedge_proto::evidence::{Equivocation, SignedManifest};
use fedge_proto::ledger::{
    LedgerRecord, PENALTY_COPY, PENALTY_EQUIVOCATION, PENALTY_NON_FINITE, PENALTY_NORM_BOUND,
};
use fedge_proto::msg::UploadBegin;
use fedge_proto::sign::VerifyingKey;

use super::sessions::{DeviceKey, device_id};
use super::transfers::Upload;
use super::{Coordinator, DurableUpdate, Event, Penalty};

/// Penalties held for the next settlement at most (each holds its
/// evidence); more are dropped. Only devices holding a slot can upload,
/// and each task yields at most one equivocation, so this is far above
/// what a round sees.
const PENALTIES_PENDING_MAX: usize = 64;

/// What the coordinator remembers about misbehaviour between rounds.
#[derive(Default)]
pub(super) struct Misconduct {
    /// Signed manifests of accepted updates, by device and task round,
    /// while their task can still be answered (one equivocation penalty
    /// per task: `hold_penalty` holds one of each kind per device and
    /// round).
    signed: HashMap<(DeviceKey, u64), SignedManifest>,
    /// Stake multiplier of each slashed device (absent: 1).
    stake_factor: HashMap<String, f64>,
}

impl Misconduct {
    /// The stake multiplier of `device` (1 when never slashed).
    pub fn factor(&self, device: &str) -> f64 {
        self.stake_factor.get(device).copied().unwrap_or(1.0)
    }

    fn slash(&mut self, device: &str, fraction: f64) {
        if fraction > 0.0 {
            *self.stake_factor.entry(device.to_string()).or_insert(1.0) *= 1.0 - fraction;
        }
    }

    /// Keeps an accepted update's signed manifest (for equivocation).
    pub fn keep(&mut self, key: DeviceKey, s: SignedManifest) {
        self.signed.insert((key, s.manifest.round_id), s);
    }

    /// Tasks of rounds before `oldest` can no longer be answered.
    pub fn forget_before(&mut self, oldest: u64) {
        self.signed.retain(|(_, round), _| *round >= oldest);
    }
}

impl Coordinator {
    /// A device's stake: the registry's, less what its penalties slashed.
    pub(super) fn stake_of(&self, device: &str) -> Option<f64> {
        self.stakes
            .stake(device)
            .map(|s| s * self.misconduct.factor(device))
    }

    /// Keeps the signed manifest of an update restored after a restart,
    /// when its record has one that is this device's, for this task, and
    /// hashes to the recorded hash (anything else is ignored with a
    /// warning: the update itself was checked when it was accepted).
    /// Returns the devices under the update: a partial aggregate's count
    /// (a middle node restarted mid-round forwards its restored partials'
    /// devices, not one each), 1 for a device's update or a record
    /// without its manifest.
    pub(super) fn keep_restored_manifest(&mut self, key: DeviceKey, u: &DurableUpdate) -> u64 {
        if u.signed_manifest.is_empty() {
            return 1;
        }
        match SignedManifest::decode(&u.signed_manifest, &self.cfg.limits) {
            Ok(s)
                if s.hash() == u.manifest_hash
                    && s.manifest.device_public_key.to_bytes() == key
                    && s.manifest.round_id == u.task_round =>
            {
                let devices = s.manifest.partial.map_or(1, |p| u64::from(p.devices));
                self.misconduct.keep(key, s);
                devices
            }
            other => {
                tracing::warn!(
                    device = %u.device,
                    error = ?other.err(),
                    "a restored update's signed manifest does not match its record; not kept"
                );
                1
            }
        }
    }

    /// Rebuilds the slashed stakes from the ledger (at startup: every
    /// penalty the chain records, with the fraction it slashed).
    pub fn restore_slashes(&mut self, records: &[LedgerRecord]) {
        for p in records.iter().flat_map(|r| &r.penalties) {
            self.misconduct.slash(&hex::encode(p.device), p.slashed);
        }
    }

    /// Holds a penalty for the next settlement (and makes it durable). At most one penalty of each kind per
    /// device and round: a device re-sending refused uploads neither
    /// fills the pending list (crowding out other devices' penalties) nor
    /// is slashed twice for one offence.
    fn hold_penalty(&mut self, p: Penalty) {
        let again = self
            .penalties
            .iter()
            .any(|q| q.device == p.device && q.kind == p.kind && q.round_id == p.round_id);
        if again || self.penalties.len() >= PENALTIES_PENDING_MAX {
            return;
        }
        self.penalties.push(p.clone());
        self.event(Event::PenaltyHeld(Box::new(p)));
    }

    /// Puts back the penalties held (and made durable) before a restart,
    /// for the next settlement.
    pub fn restore_penalties(&mut self, held: Vec<Penalty>) {
        for p in held {
            if self.penalties.len() < PENALTIES_PENDING_MAX && !self.penalties.contains(&p) {
                self.penalties.push(p);
            }
        }
    }

    /// A complete, signed upload was refused: when the reason is one anyone
    /// can check from the payload (not finite, over the norm bound), it is
    /// held as a penalty with its payload as evidence, for the next
    /// settlement.
    pub(super) fn note_refusal(&mut self, device: &str, code: RejectCode, u: &Upload) {
        let kind = match code {
            RejectCode::NonFinite => PENALTY_NON_FINITE,
            RejectCode::NormBound => PENALTY_NORM_BOUND,
            _ => return,
        };
        let m = &u.begin.manifest;
        let slashed = self.cfg.scoring.slash_fraction;
        self.hold_penalty(Penalty {
            round_id: self.round.id,
            device: device.to_string(),
            manifest_hash: m.signed_hash(&u.begin.signature),
            payload_hash: m.payload_hash,
            kind,
            slashed,
            payload: Bytes::copy_from_slice(&u.data),
        });
    }

    /// A signed manifest (signature and federation already verified) was
    /// refused as a replay: if the device's accepted update for the same
    /// task named another payload, the two manifests are held as an
    /// equivocation penalty.
    pub(super) fn note_replay(&mut self, key: &VerifyingKey, b: &UploadBegin) {
        let Some(first) = self
            .misconduct
            .signed
            .get(&(key.to_bytes(), b.manifest.round_id))
        else {
            return;
        };
        let e = Equivocation {
            first: first.clone(),
            second: SignedManifest {
                manifest: b.manifest.clone(),
                signature: b.signature,
            },
        };
        if e.check().is_err() {
            return;
        }
        let evidence = e.encode();
        let dev = device_id(key);
        tracing::warn!(device = %dev, round = b.manifest.round_id, "equivocation: two signed updates for one task");
        self.hold_penalty(Penalty {
            round_id: b.manifest.round_id,
            device: dev,
            manifest_hash: e.second.hash(),
            payload_hash: *blake3::hash(&evidence).as_bytes(),
            kind: PENALTY_EQUIVOCATION,
            slashed: self.cfg.scoring.slash_fraction,
            payload: Bytes::from(evidence),
        });
    }

    /// Holds a copy penalty for an update settled as a copy (its payload,
    /// kept with the round's updates, is the evidence). A copy is flagged
    /// by similarity, not proven, so it slashes stake only with
    /// `scoring.slash_copies`.
    pub(super) fn note_copy(
        &mut self,
        round_id: u64,
        device: &str,
        manifest_hash: [u8; 32],
        payload_hash: [u8; 32],
    ) {
        self.hold_penalty(Penalty {
            round_id,
            device: device.to_string(),
            manifest_hash,
            payload_hash,
            kind: PENALTY_COPY,
            slashed: if self.cfg.scoring.slash_copies {
                self.cfg.scoring.slash_fraction
            } else {
                0.0
            },
            payload: Bytes::new(),
        });
    }

    /// The penalties a settlement records, their slashes applied.
    pub(super) fn take_penalties(&mut self) -> Vec<Penalty> {
        let penalties = std::mem::take(&mut self.penalties);
        for p in &penalties {
            self.misconduct.slash(&p.device, p.slashed);
        }
        penalties
    }
}
