//! Checking a reward proof offline: the JSON `fedge-aggregator ledger
//! proof` prints, parsed into a [`RewardProof`] and checked against the
//! round's reward root with [`RewardProof::verify`] (RFC 6962-style audit
//! path; see `fedge_proto::ledger`). Needs no network and no aggregator
//! state; whether the root is the one the aggregator published (its
//! `ledger export`, or an anchor elsewhere) is for the caller to compare.

use fedge_proto::ledger::{LedgerError, RewardProof};
use serde::Deserialize;

/// Longest proof file accepted (a path of 64 hashes is under 5 KiB).
pub const PROOF_BYTES_MAX: usize = 64 << 10;

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

/// Parses a proof (JSON), without checking it.
pub fn parse_proof(text: &[u8]) -> Result<RewardProof, RewardProofError> {
    if text.len() > PROOF_BYTES_MAX {
        return Err(RewardProofError::TooLarge(text.len()));
    }
    let j: ProofJson =
        serde_json::from_slice(text).map_err(|e| RewardProofError::Json(e.to_string()))?;
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

/// Parses and checks a proof; with `device` and `root` (hex), also that it
/// is that device's and leads to that root.
pub fn verify_proof(
    text: &[u8],
    device: Option<&str>,
    root: Option<&str>,
) -> Result<RewardProof, RewardProofError> {
    let p = parse_proof(text)?;
    p.verify()?;
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
        let p = verify_proof(text.as_bytes(), Some(&dev), Some(&root)).unwrap();
        assert_eq!(p.reward, 30);
        let (bad, _) = proof_text(31);
        assert!(matches!(
            verify_proof(bad.as_bytes(), None, None),
            Err(RewardProofError::Invalid(_))
        ));
        assert!(matches!(
            verify_proof(text.as_bytes(), Some(&hex::encode([2u8; 32])), None),
            Err(RewardProofError::OtherDevice { .. })
        ));
        assert!(matches!(
            verify_proof(text.as_bytes(), None, Some(&hex::encode([0u8; 32]))),
            Err(RewardProofError::OtherRoot { .. })
        ));
        assert!(matches!(
            verify_proof(b"{", None, None),
            Err(RewardProofError::Json(_))
        ));
        assert!(matches!(
            verify_proof(&vec![b' '; PROOF_BYTES_MAX + 1], None, None),
            Err(RewardProofError::TooLarge(_))
        ));
    }
}
