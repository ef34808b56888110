//! The contribution ledger: one signed record per published model version
//! (the format is [`fedge_proto::ledger`]), hash-chained to the previous
//! one and stored in the state directory's database in the same
//! transaction as the publication it describes (see
//! [`crate::store::Store::publish`]), so a published version never lacks
//! its record, even across a crash.
//!
//! - [`LedgerKey`]: the aggregator's Ed25519 ledger key, created on first
//!   start (`ledger.key`, mode 0600) with its public half in `ledger.pub`
//!   (hex), which verifiers pin.
//! - [`build_record`]: a [`Settlement`] and the version it produced become
//!   a [`LedgerRecord`] (entries ordered by device key; reward root).
//! - [`verify_chain`]: every record decoded, its sequence number, link,
//!   signature and reward root checked; the first bad record is named.
//! - [`reward_proof`]: a device's inclusion proof for its reward in a round;
//!   [`RoundRoot`]s: the per-round roots `ledger export` writes.
//! - [`check_evidence`]: a penalty's evidence, as kept in the state
//!   directory ([`evidence_path`]), proves what the penalty says.
//! - [`check_manifests`]: every entry matches the signed manifest kept
//!   with its update (signature, device, payload, round).

use std::path::{Path, PathBuf};

use fedge_proto::evidence::Equivocation;
use fedge_proto::ledger::{
    self, LedgerEntry, LedgerError, LedgerFlagRules, LedgerPenalty, LedgerRecord, LedgerStaleness,
    RewardProof, StaleEntry, inclusion_proof,
};
use fedge_proto::sign::{SigningKey, VerifyingKey};
use fedge_proto::{Limits, ModelVersion, ProtoError, RejectCode};
use serde::Serialize;

use crate::coordinator::Settlement;
use crate::scoring::ScoreMethod;

mod manifests;
mod recompute;

pub use manifests::{ManifestCheck, StoredManifest, check_manifests};
pub use recompute::{as_scored, recompute_scores};

const KEY_FILE: &str = "ledger.key";
pub const PUBLIC_KEY_FILE: &str = "ledger.pub";

#[derive(Debug, thiserror::Error)]
pub enum LedgerKeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// An Ed25519 key kept in `dir/key_file` (its 32-byte seed, mode 0600),
/// created on first use with its public half in `dir/public_file` (hex):
/// the ledger key, and a leaf aggregator's key (`crate::uplink`).
pub fn load_or_create_key(
    dir: &Path,
    key_file: &str,
    public_file: &str,
) -> Result<SigningKey, LedgerKeyError> {
    let path = dir.join(key_file);
    match std::fs::read(&path) {
        Ok(b) => {
            let seed: [u8; 32] = b
                .as_slice()
                .try_into()
                .map_err(|_| LedgerKeyError::Corrupt {
                    path: path.clone(),
                    reason: format!("{} bytes; a key is 32", b.len()),
                })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| LedgerKeyError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let key = SigningKey::from_bytes(&seed);
            let write = |p: &Path, data: &[u8], mode: u32| {
                fedge_proto::io::write_atomic(p, data, Some(mode)).map_err(|source| {
                    LedgerKeyError::Io {
                        path: p.to_path_buf(),
                        source,
                    }
                })
            };
            write(&path, &seed, 0o600)?;
            let public = hex::encode(key.verifying_key().to_bytes());
            write(&dir.join(public_file), public.as_bytes(), 0o644)?;
            Ok(key)
        }
        Err(source) => Err(LedgerKeyError::Io { path, source }),
    }
}

/// The aggregator's ledger signing key.
pub struct LedgerKey {
    key: SigningKey,
}

impl LedgerKey {
    /// Loads the key from `dir`, or creates and stores one.
    pub fn load_or_create(dir: &Path) -> Result<Self, LedgerKeyError> {
        Ok(LedgerKey {
            key: load_or_create_key(dir, KEY_FILE, PUBLIC_KEY_FILE)?,
        })
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs a record hash.
    pub fn sign(&self, record_hash: &[u8; 32]) -> [u8; 64] {
        ledger::sign_record(&self.key, record_hash)
    }
}

/// Reads the public ledger key a state directory's aggregator signs with.
pub fn public_key(dir: &Path) -> Result<VerifyingKey, LedgerKeyError> {
    let path = dir.join(PUBLIC_KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| LedgerKeyError::Io {
        path: path.clone(),
        source,
    })?;
    parse_public_key(text.trim()).map_err(|reason| LedgerKeyError::Corrupt { path, reason })
}

/// An Ed25519 public key in hex.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let b = hex::decode(hex_key).map_err(|e| format!("not hex: {e}"))?;
    fedge_proto::sign::public_key("ledger key", &b).map_err(|e: ProtoError| e.to_string())
}

/// A 32-byte device key from its hex id.
pub fn device_bytes(device: &str) -> Result<[u8; 32], String> {
    hex::decode(device)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("`{device}` is not a 64-digit hex device key"))
}

/// The record of `settlement`, which published `model_after`, as record
/// `seq` after a record with hash `prev_hash`.
pub fn build_record(
    seq: u64,
    prev_hash: [u8; 32],
    s: &Settlement,
    model_after: ModelVersion,
) -> Result<LedgerRecord, String> {
    let mut entries = s
        .entries
        .iter()
        .map(|e| {
            Ok((
                LedgerEntry {
                    device: device_bytes(&e.device)?,
                    manifest_hash: e.manifest_hash,
                    payload_hash: e.payload_hash,
                    stake: e.stake.filter(|x| x.is_finite()).unwrap_or(0.0),
                    weight: if e.weight.is_finite() { e.weight } else { 0.0 },
                    score: e.score.filter(|x| x.is_finite()).unwrap_or(0.0),
                    flags: e.flags(),
                    reward: e.reward,
                },
                (e.task_round, e.discount),
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    // Entries in key order; `accepted[k]` is the k-th accepted update's
    // place among them.
    let mut by_key: Vec<usize> = (0..entries.len()).collect();
    by_key.sort_by_key(|&k| entries[k].0.device);
    let mut accepted = vec![0u32; entries.len()];
    for (place, &k) in by_key.iter().enumerate() {
        accepted[k] = place as u32;
    }
    entries.sort_by_key(|(e, _)| e.device);
    if entries.windows(2).any(|w| w[0].0.device == w[1].0.device) {
        return Err(format!("round {} settles one device twice", s.round_id));
    }
    let stale: Vec<StaleEntry> = entries
        .iter()
        .enumerate()
        .filter(|(_, (_, (task, _)))| *task < s.round_id)
        .map(|(i, &(_, (task_round, discount)))| StaleEntry {
            entry: i as u32,
            task_round,
            discount,
        })
        .collect();
    let entries: Vec<LedgerEntry> = entries.into_iter().map(|(e, _)| e).collect();
    let entries_empty = entries.is_empty();
    let penalties = s
        .penalties
        .iter()
        .map(|p| {
            Ok(ledger::LedgerPenalty {
                device: device_bytes(&p.device)?,
                round_id: p.round_id,
                manifest_hash: p.manifest_hash,
                payload_hash: p.payload_hash,
                kind: p.kind,
                slashed: p.slashed,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut r = LedgerRecord {
        seq,
        round_id: s.round_id,
        prev_hash,
        model_before: s.model_before.0,
        model_after: model_after.0,
        scoring_seed: s.scoring_seed,
        validation_samples: s.validation_samples,
        score_method: match s.method {
            ScoreMethod::Direct => ledger::METHOD_DIRECT,
            ScoreMethod::LeaveOneOut => ledger::METHOD_LEAVE_ONE_OUT,
            ScoreMethod::Marginal => ledger::METHOD_MARGINAL,
            ScoreMethod::Shapley => ledger::METHOD_SHAPLEY,
            ScoreMethod::ClassGain => ledger::METHOD_CLASS_GAIN,
        },
        server_lr: s.server_lr,
        reward_pool: s.reward_pool,
        reward_cap: s.reward_cap,
        stake_transform: s.stake_transform.ledger_code().0,
        stake_param: s.stake_transform.ledger_code().1,
        entries,
        penalties,
        reward_root: [0; 32],
        evaluation: s.evaluation.as_ref().and_then(ledger_evaluation),
        staleness: (!stale.is_empty()).then_some(LedgerStaleness {
            exponent: s.staleness_exponent,
            entries: stale,
        }),
        flag_rules: (s.validation_samples > 0 && !entries_empty).then(|| LedgerFlagRules {
            copy_cosine_min: s.flag_thresholds[0],
            free_rider_norm_ratio: s.flag_thresholds[1],
            noise_sigmas: s.flag_thresholds[2],
            order: accepted,
        }),
    };
    r.reward_root = r.compute_reward_root();
    if r.evaluation.is_some() && LedgerRecord::decode(&r.encode()).is_err() {
        // Never sign what the chain's readers would refuse: the round's
        // record goes without its evaluation.
        tracing::warn!(
            round_id = r.round_id,
            "the round's evaluation does not fit a ledger record; recorded without it"
        );
        r.evaluation = None;
    }
    Ok(r)
}

/// A round's evaluation as its record carries it: only the parts the
/// record's decoder takes back (finite, a loss not below zero, an
/// accuracy in [0, 1]); None when no part is left, so a record is never
/// written that does not decode.
fn ledger_evaluation(e: &crate::evaluation::EvalSummary) -> Option<ledger::LedgerEvaluation> {
    let loss_ok = |l: &f64| l.is_finite() && *l >= 0.0;
    let acc_ok = |a: &f64| (0.0..=1.0).contains(a);
    let (loss, accuracy) = match (e.loss.filter(loss_ok), e.accuracy.filter(acc_ok)) {
        (Some(l), Some(a)) => (l, a),
        _ => (0.0, 0.0),
    };
    let fed = e.devices > 0
        && e.weight > 0.0
        && e.weight.is_finite()
        && e.loss.is_some_and(|l| loss_ok(&l))
        && e.accuracy.is_some_and(|a| acc_ok(&a));
    let vloss = e.validation_examples > 0 && e.validation_loss.is_some_and(|l| loss_ok(&l));
    let vacc = vloss && e.validation_accuracy.is_some_and(|a| acc_ok(&a));
    if !fed && !vloss {
        return None;
    }
    let flags = if fed { ledger::EVAL_FEDERATED } else { 0 }
        | if vloss {
            ledger::EVAL_VALIDATION_LOSS
        } else {
            0
        }
        | if vacc {
            ledger::EVAL_VALIDATION_ACCURACY
        } else {
            0
        };
    Some(ledger::LedgerEvaluation {
        flags,
        devices: if fed { e.devices as u32 } else { 0 },
        weight: if fed { e.weight } else { 0.0 },
        loss: if fed { loss } else { 0.0 },
        accuracy: if fed { accuracy } else { 0.0 },
        reports_root: if fed { e.reports_root } else { [0; 32] },
        validation_examples: if vloss {
            e.validation_examples as u32
        } else {
            0
        },
        validation_loss: if vloss {
            e.validation_loss.unwrap_or(0.0)
        } else {
            0.0
        },
        validation_accuracy: if vacc {
            e.validation_accuracy.unwrap_or(0.0)
        } else {
            0.0
        },
    })
}

/// A record as stored: its canonical bytes and the aggregator's signature.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    /// The sequence number it is stored under.
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why a ledger does not verify: the record (by the sequence number it is
/// stored under) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("ledger record {seq}: {reason}")]
pub struct VerifyError {
    pub seq: u64,
    pub reason: String,
}

/// One round's reward root, as `ledger export` writes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundRoot {
    pub seq: u64,
    pub round_id: u64,
    pub model_before: String,
    pub model_after: String,
    pub record_hash: String,
    pub reward_root: String,
    pub participants: usize,
    pub rewards_paid: u64,
    pub reward_pool: u64,
}

/// Checks a whole ledger, oldest first: each record decodes, is numbered
/// one after the previous, names the previous record's hash, carries a
/// valid signature by `key` over its hash and a reward root that matches
/// its entries (and rewards within its pool), follows the previous round
/// and starts from the model the previous one published. Returns the
/// decoded records.
pub fn verify_chain(
    records: &[StoredRecord],
    key: &VerifyingKey,
) -> Result<Vec<LedgerRecord>, VerifyError> {
    let mut out: Vec<LedgerRecord> = Vec::with_capacity(records.len());
    let mut prev = [0u8; 32];
    for (i, s) in records.iter().enumerate() {
        let fail = |reason: String| VerifyError { seq: s.seq, reason };
        let r = LedgerRecord::decode(&s.bytes).map_err(|e| fail(e.to_string()))?;
        let expected_seq = i as u64 + 1;
        if r.seq != expected_seq || s.seq != expected_seq {
            return Err(fail(format!(
                "numbered {} (stored as {}), expected {expected_seq}",
                r.seq, s.seq
            )));
        }
        if r.prev_hash != prev {
            return Err(fail(format!(
                "names previous hash {}, but the previous record hashes to {}",
                hex::encode(r.prev_hash),
                hex::encode(prev)
            )));
        }
        let sig: [u8; 64] = s
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| fail(format!("signature is {} bytes, not 64", s.signature.len())))?;
        let h = ledger::record_hash(&s.bytes);
        ledger::verify_record_signature(key, &h, &sig).map_err(|e: LedgerError| {
            fail(format!(
                "{e} (with ledger key {})",
                hex::encode(key.to_bytes())
            ))
        })?;
        check_rewards(&r).map_err(fail)?;
        if let Some(st) = &r.staleness {
            st.check_discounts(r.round_id).map_err(fail)?;
        }
        // Once the chain states its flag rules, every scored record must:
        // without them its flags could not be recomputed.
        let scored = r.validation_samples > 0 && !r.entries.is_empty();
        if scored && r.flag_rules.is_none() && out.iter().any(|p| p.flag_rules.is_some()) {
            return Err(fail(
                "a scored round without its flag rules, after records that state them".into(),
            ));
        }
        if let Some(p) = out.last() {
            if r.round_id <= p.round_id {
                return Err(fail(format!(
                    "round {} does not follow round {}",
                    r.round_id, p.round_id
                )));
            }
            if r.model_before != p.model_after {
                return Err(fail(format!(
                    "starts from model {}, but the previous record published {}",
                    hex::encode(r.model_before),
                    hex::encode(p.model_after)
                )));
            }
        }
        prev = h;
        out.push(r);
    }
    Ok(out)
}

/// Recomputes a record's rewards from its entries (stake, score, flags),
/// its pool, its share cap and its stake transform, and checks each
/// entry's reward: a record cannot pay anyone more, or less, than its own
/// numbers say.
pub fn check_rewards(r: &LedgerRecord) -> Result<(), String> {
    let f = crate::weighting::Transform::from_ledger_code(r.stake_transform, r.stake_param)
        .ok_or_else(|| format!("unknown stake transform {}", r.stake_transform))?;
    let devices: Vec<String> = r.entries.iter().map(|e| hex::encode(e.device)).collect();
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    let weights: Vec<f64> = r
        .entries
        .iter()
        .map(|e| {
            let clipped = if e.flags == 0 && e.score > 0.0 {
                e.score
            } else {
                0.0
            };
            crate::scoring::reward_weight(f, e.stake, clipped)
        })
        .collect();
    let expected =
        crate::scoring::rewards_in_key_order(r.reward_pool, &refs, &weights, r.reward_cap);
    for (e, want) in r.entries.iter().zip(expected) {
        if e.reward != want {
            return Err(format!(
                "device {} is paid {}, its stake, score and flags earn {want}",
                hex::encode(e.device),
                e.reward
            ));
        }
    }
    Ok(())
}

/// The per-round roots of verified records.
pub fn roots(records: &[LedgerRecord]) -> Vec<RoundRoot> {
    records
        .iter()
        .map(|r| RoundRoot {
            seq: r.seq,
            round_id: r.round_id,
            model_before: hex::encode(r.model_before),
            model_after: hex::encode(r.model_after),
            record_hash: hex::encode(r.hash()),
            reward_root: hex::encode(r.reward_root),
            participants: r.entries.len(),
            rewards_paid: r.entries.iter().map(|e| e.reward).sum(),
            reward_pool: r.reward_pool,
        })
        .collect()
}

/// `device`'s proof of its reward in round `round_id`.
pub fn reward_proof(
    records: &[LedgerRecord],
    device: &[u8; 32],
    round_id: u64,
) -> Result<RewardProof, String> {
    let r = records
        .iter()
        .find(|r| r.round_id == round_id)
        .ok_or_else(|| format!("no ledger record for round {round_id}"))?;
    let index = r
        .entries
        .iter()
        .position(|e| &e.device == device)
        .ok_or_else(|| {
            format!(
                "device {} took no part in round {round_id}",
                hex::encode(device)
            )
        })?;
    let leaves = r.reward_leaves();
    let path = inclusion_proof(&leaves, index).expect("index in range");
    Ok(RewardProof {
        round_id,
        device: *device,
        reward: r.entries[index].reward,
        leaf_index: index as u64,
        tree_size: leaves.len() as u64,
        path,
        root: r.reward_root,
    })
}

/// A reward proof as JSON (what `ledger proof` prints and
/// `fedge-device verify-reward` reads), with the round's record as stored
/// (its canonical bytes and the aggregator's signature over their hash),
/// so a device holding the ledger key checks the root without asking
/// anyone what was published.
pub fn proof_json(p: &RewardProof, signed: &StoredRecord) -> serde_json::Value {
    serde_json::json!({
        "round_id": p.round_id,
        "device": hex::encode(p.device),
        "reward": p.reward,
        "leaf_index": p.leaf_index,
        "tree_size": p.tree_size,
        "path": p.path.iter().map(hex::encode).collect::<Vec<_>>(),
        "root": hex::encode(p.root),
        "record": hex::encode(&signed.bytes),
        "record_signature": hex::encode(&signed.signature),
    })
}

/// Where the state directory `dir` keeps a penalty's evidence: a copy's
/// payload with its round's updates, anything else under `evidence/`.
pub fn evidence_path(dir: &Path, p: &LedgerPenalty) -> PathBuf {
    let name = format!("{}.bin", hex::encode(p.payload_hash));
    if p.kind == ledger::PENALTY_COPY {
        dir.join("updates").join(p.round_id.to_string()).join(name)
    } else {
        dir.join("evidence").join(name)
    }
}

/// Checks that `evidence` proves penalty `p`: it is the file the penalty
/// names (its blake3 hash); for an equivocation, two manifests the device
/// signed for one task naming different payloads, the second being the
/// one the penalty names; for a non-finite update (given the model's
/// `dimension`), a payload that decodes to values that are not finite. An
/// over-the-bound or copy penalty is checked by hash only (the bound and
/// the copy threshold are the operator's configuration, not in the
/// record). Returns what was checked.
pub fn check_evidence(
    p: &LedgerPenalty,
    evidence: &[u8],
    dimension: Option<usize>,
    limits: &Limits,
) -> Result<&'static str, String> {
    if *blake3::hash(evidence).as_bytes() != p.payload_hash {
        return Err("the evidence does not match the hash the penalty names".into());
    }
    match p.kind {
        ledger::PENALTY_EQUIVOCATION => {
            let e = Equivocation::decode(evidence, limits).map_err(|e| e.to_string())?;
            e.check().map_err(|e| e.to_string())?;
            if e.second.manifest.device_public_key.to_bytes() != p.device {
                return Err("the manifests were signed by another device".into());
            }
            if e.second.hash() != p.manifest_hash {
                return Err("the penalty names another manifest".into());
            }
            if e.second.manifest.round_id != p.round_id {
                return Err(format!(
                    "the manifests are for round {}, the penalty says round {}",
                    e.second.manifest.round_id, p.round_id
                ));
            }
            Ok("two signed updates for one task")
        }
        ledger::PENALTY_NON_FINITE => {
            let Some(dim) = dimension else {
                return Ok("hash (no model to decode against)");
            };
            match fedge_proto::update::decode_any(evidence, dim, limits) {
                Err(e) if e.reject_code() == RejectCode::NonFinite => Ok("not finite"),
                Ok(v) if v.iter().any(|x| !x.is_finite()) => Ok("not finite"),
                Ok(_) => Err("the payload decodes to finite values".into()),
                Err(e) => Err(format!("the payload does not decode: {e}")),
            }
        }
        _ => Ok("hash"),
    }
}

#[cfg(test)]
mod tests;
