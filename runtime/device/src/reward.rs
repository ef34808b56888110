//! Checking a reward proof offline: the JSON `fedge-aggregator ledger
//! proof` prints, parsed into a [`RewardProof`] and checked against the
//! round's reward root with [`RewardProof::verify`] (RFC 6962-style audit
//! path; see `fedge_proto::ledger`). Needs no network and no aggregator
//! state. That the root is the aggregator's: given its ledger key, the
//! proof's signed record (the round's ledger record as stored, with the
//! aggregator's signature over its hash) must verify and carry that root
//! and this reward; or compare the root with one published elsewhere
//! (`ledger export`, an anchor).

use fedge_proto::ledger::{LedgerError, LedgerRecord, RewardProof, verify_record_signature};
use serde::Deserialize;

/// Longest proof file accepted: a record of the most entries a record may
/// hold (`fedge_proto::ledger::ENTRIES_MAX`), in hex, fits.
pub const PROOF_BYTES_MAX: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RewardProofError {
    #[error("proof is {0} bytes; at most {PROOF_BYTES_MAX}")]
    TooLarge(usize),
    #[error("proof is not valid JSON of a reward proof: {0}")]
    Json(String),
    #[error("proof field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("proof does not verify: {0}")]
    Invalid(#[from] LedgerError),
    #[error("proof is for device {proof}, not {expected}")]
    OtherDevice { proof: String, expected: String },
    #[error("proof leads to root {proof}, not the published {expected}")]
    OtherRoot { proof: String, expected: String },
    #[error(
        "proof carries no signed record to check against the ledger key (made by an older \
         `ledger proof`?)"
    )]
    Unsigned,
    #[error("proof's signed record: {0}")]
    BadRecord(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProofJson {
    round_id: u64,
    device: String,
    reward: u64,
    leaf_index: u64,
    tree_size: u64,
    path: Vec<String>,
    root: String,
    /// The round's ledger record as stored (hex) and the aggregator's
    /// signature over its hash (hex).
    #[serde(default)]
    record: Option<String>,
    #[serde(default)]
    record_signature: Option<String>,
}

fn hash(field: &'static str, s: &str) -> Result<[u8; 32], RewardProofError> {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| RewardProofError::Field {
            field,
            reason: format!("`{s}` is not 64 hex digits"),
        })
}

fn parse_json(text: &[u8]) -> Result<ProofJson, RewardProofError> {
    if text.len() > PROOF_BYTES_MAX {
        return Err(RewardProofError::TooLarge(text.len()));
    }
    serde_json::from_slice(text).map_err(|e| RewardProofError::Json(e.to_string()))
}

/// Parses a proof (JSON), without checking it.
pub fn parse_proof(text: &[u8]) -> Result<RewardProof, RewardProofError> {
    proof_of(&parse_json(text)?)
}

fn proof_of(j: &ProofJson) -> Result<RewardProof, RewardProofError> {
    if j.path.len() > 64 {
        return Err(RewardProofError::Field {
            field: "path",
            reason: format!("{} hashes; at most 64", j.path.len()),
        });
    }
    Ok(RewardProof {
        round_id: j.round_id,
        device: hash("device", &j.device)?,
        reward: j.reward,
        leaf_index: j.leaf_index,
        tree_size: j.tree_size,
        path: j
            .path
            .iter()
            .map(|p| hash("path", p))
            .collect::<Result<_, _>>()?,
        root: hash("root", &j.root)?,
    })
}

/// Checks the proof's signed record against the aggregator's ledger key
/// `key` (hex): the signature over the record's hash verifies, and the
/// record is of the proof's round, has its root and pays the device what
/// the proof says.
fn check_signed_record(j: &ProofJson, p: &RewardProof, key: &str) -> Result<(), RewardProofError> {
    let bad = |s: String| RewardProofError::BadRecord(s);
    let (Some(record), Some(sig)) = (&j.record, &j.record_signature) else {
        return Err(RewardProofError::Unsigned);
    };
    let key: [u8; 32] = hash("--ledger-key", key)?;
    let key = fedge_proto::sign::VerifyingKey::from_bytes(&key)
        .map_err(|e| bad(format!("the ledger key is not an Ed25519 key: {e}")))?;
    let bytes = hex::decode(record).map_err(|e| bad(format!("record is not hex: {e}")))?;
    let sig: [u8; 64] = hex::decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| bad("record_signature is not 128 hex digits".into()))?;
    let rec = LedgerRecord::decode(&bytes).map_err(|e| bad(e.to_string()))?;
    verify_record_signature(&key, &rec.hash(), &sig)
        .map_err(|e| bad(format!("not signed by that ledger key ({e})")))?;
    if rec.round_id != p.round_id || rec.reward_root != p.root {
        return Err(bad(format!(
            "the signed record is of round {} with root {}; the proof says round {} and root {}",
            rec.round_id,
            hex::encode(rec.reward_root),
            p.round_id,
            hex::encode(p.root)
        )));
    }
    match rec.entries.iter().find(|e| e.device == p.device) {
        Some(e) if e.reward == p.reward => Ok(()),
        Some(e) => Err(bad(format!(
            "the signed record pays this device {}, the proof says {}",
            e.reward, p.reward
        ))),
        None => Err(bad("the signed record has no entry for this device".into())),
    }
}

/// Parses and checks a proof; with `device` and `root` (hex), also that it
/// is that device's and leads to that root; with `ledger_key` (hex), also
/// that its signed record verifies under that key and carries its root
/// and reward (see [`check_signed_record`]).
pub fn verify_proof(
    text: &[u8],
    device: Option<&str>,
    root: Option<&str>,
    ledger_key: Option<&str>,
) -> Result<RewardProof, RewardProofError> {
    let j = parse_json(text)?;
    let p = proof_of(&j)?;
    p.verify()?;
    if let Some(k) = ledger_key {
        check_signed_record(&j, &p, k)?;
    }
    if let Some(d) = device {
        let want = hash("--device", d)?;
        if want != p.device {
            return Err(RewardProofError::OtherDevice {
                proof: hex::encode(p.device),
                expected: d.to_string(),
            });
        }
    }
    if let Some(r) = root {
        let want = hash("--root", r)?;
        if want != p.root {
            return Err(RewardProofError::OtherRoot {
                proof: hex::encode(p.root),
                expected: r.to_string(),
            });
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_proto::ledger::{inclusion_proof, merkle_root, reward_leaf};

    fn proof_text(reward_in_proof: u64) -> (String, String) {
        let leaves: Vec<Vec<u8>> = (0..5u8)
            .map(|i| reward_leaf(4, &[i; 32], 10 * u64::from(i)))
            .collect();
        let root = hex::encode(merkle_root(&leaves));
        let path: Vec<String> = inclusion_proof(&leaves, 3)
            .unwrap()
            .iter()
            .map(hex::encode)
            .collect();
        let text = serde_json::json!({
            "round_id": 4, "device": hex::encode([3u8; 32]), "reward": reward_in_proof,
            "leaf_index": 3, "tree_size": 5, "path": path, "root": root,
        })
        .to_string();
        (text, root)
    }

    #[test]
    fn a_proof_verifies_and_an_altered_reward_does_not() {
        let (text, root) = proof_text(30);
        let dev = hex::encode([3u8; 32]);
        let p = verify_proof(text.as_bytes(), Some(&dev), Some(&root), None).unwrap();
        assert_eq!(p.reward, 30);
        let (bad, _) = proof_text(31);
        assert!(matches!(
            verify_proof(bad.as_bytes(), None, None, None),
            Err(RewardProofError::Invalid(_))
        ));
        assert!(matches!(
            verify_proof(text.as_bytes(), Some(&hex::encode([2u8; 32])), None, None),
            Err(RewardProofError::OtherDevice { .. })
        ));
        assert!(matches!(
            verify_proof(text.as_bytes(), None, Some(&hex::encode([0u8; 32])), None),
            Err(RewardProofError::OtherRoot { .. })
        ));
        assert!(matches!(
            verify_proof(b"{", None, None, None),
            Err(RewardProofError::Json(_))
        ));
        assert!(matches!(
            verify_proof(&vec![b' '; PROOF_BYTES_MAX + 1], None, None, None),
            Err(RewardProofError::TooLarge(_))
        ));
    }
}
