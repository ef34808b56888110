//! Each ledger entry against the signed manifest the aggregator kept with
//! the update (`updates.signed_manifest`). An entry names the hash of a
//! manifest its device signed; the stored manifest must hash to it, carry
//! a valid signature of the entry's device, and name the entry's payload
//! and the round the update was trained for (the record's round, or a
//! stale entry's task round). Without the check a ledger could hold an
//! entry for an update its device never signed and still verify; with it,
//! anyone holding the state directory sees that every participation was
//! signed, and what for.

use std::collections::HashMap;

use fedge_proto::Limits;
use fedge_proto::evidence::SignedManifest;
use fedge_proto::ledger::LedgerRecord;

use super::VerifyError;

/// A signed manifest as the store keeps it: the round the update was
/// accepted in, the device, and [`SignedManifest::encode_into`]'s bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredManifest {
    pub round_id: u64,
    pub device: [u8; 32],
    pub bytes: Vec<u8>,
}

/// What [`check_manifests`] found: entries whose manifest was checked;
/// entries that name none (a secure-aggregation round's, whose inputs
/// are masked), and how many records hold them; and entries of records
/// before the first with a stored manifest (updates kept before manifests
/// were).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ManifestCheck {
    pub checked: usize,
    pub unsigned: usize,
    pub secure_records: usize,
    pub before_manifests: usize,
}

/// Checks every entry of `records` against its stored manifest; fails
/// naming the first record whose entry does not match its manifest, or,
/// from the first record with a stored manifest on, has none.
///
/// An entry may name no manifest (all zeros) only as an input of a
/// secure-aggregation round, where the aggregator saw the masked sum and
/// nothing a device signed alone: such a record's entries all name none,
/// and no payload either. A record mixing the two, or an entry naming a
/// payload but no manifest, fails: otherwise whoever writes the ledger
/// could slip unsigned participants into an ordinary round. (A whole
/// record claiming to be a secure round is counted in
/// [`ManifestCheck::secure_records`], and `ledger verify` says so.)
pub fn check_manifests(
    records: &[LedgerRecord],
    stored: &[StoredManifest],
) -> Result<ManifestCheck, VerifyError> {
    let mut by_entry: HashMap<(u64, [u8; 32]), Vec<&StoredManifest>> = HashMap::new();
    for m in stored {
        by_entry.entry((m.round_id, m.device)).or_default().push(m);
    }
    let limits = Limits::default();
    let mut found = ManifestCheck::default();
    let first = records.iter().position(|r| {
        r.entries
            .iter()
            .any(|e| by_entry.contains_key(&(r.round_id, e.device)))
    });
    for (k, r) in records.iter().enumerate() {
        let unsigned = r
            .entries
            .iter()
            .filter(|e| e.manifest_hash == [0; 32])
            .count();
        if unsigned > 0 {
            let secure_shape = unsigned == r.entries.len()
                && r.staleness.is_none()
                && r.entries.iter().all(|e| e.payload_hash == [0; 32]);
            if !secure_shape {
                return Err(VerifyError {
                    seq: r.seq,
                    reason: format!(
                        "{unsigned} of its {} entries name no signed manifest: only a \
                         secure-aggregation round's inputs may, all of them, naming no \
                         payload either, in a synchronous round",
                        r.entries.len()
                    ),
                });
            }
            found.unsigned += unsigned;
            found.secure_records += 1;
            continue;
        }
        let task_round = |i: usize| {
            r.staleness
                .as_ref()
                .and_then(|s| s.entries.iter().find(|e| e.entry as usize == i))
                .map_or(r.round_id, |e| e.task_round)
        };
        for (i, e) in r.entries.iter().enumerate() {
            let fail = |reason: String| VerifyError {
                seq: r.seq,
                reason: format!(
                    "device {}'s signed manifest: {reason}",
                    hex::encode(e.device)
                ),
            };
            let Some(kept) = by_entry.get(&(r.round_id, e.device)) else {
                if first.is_none_or(|f| k < f) {
                    found.before_manifests += 1;
                    continue;
                }
                return Err(fail(
                    "none is stored, and manifests are kept from an earlier record on".into(),
                ));
            };
            // A device has one accepted update a round; should a store
            // hold two rows, the entry's is the one that hashes to it.
            let mut signed = None;
            for m in kept {
                let s = SignedManifest::decode(&m.bytes, &limits)
                    .map_err(|err| fail(format!("does not decode: {err}")))?;
                if s.hash() == e.manifest_hash {
                    signed = Some(s);
                }
            }
            let s =
                signed.ok_or_else(|| fail("does not hash to the entry's manifest hash".into()))?;
            s.manifest
                .verify(&s.signature)
                .map_err(|err| fail(format!("signature: {err}")))?;
            let m = &s.manifest;
            if m.device_public_key.to_bytes() != e.device {
                return Err(fail("signed by another device".into()));
            }
            if m.payload_hash != e.payload_hash {
                return Err(fail("names another payload than the entry".into()));
            }
            let round = task_round(i);
            if m.round_id != round {
                return Err(fail(format!(
                    "is for round {}, the record says the update was trained for round {round}",
                    m.round_id
                )));
            }
            found.checked += 1;
        }
    }
    Ok(found)
}
