//! The contribution ledger's formats, shared by the aggregator (which
//! writes and verifies the ledger) and devices (which check their reward
//! proofs offline).
//!
//! - [`LedgerRecord`]: one record per published model version: the
//!   versions before and after, the scoring seed, the reward pool, one
//!   [`LedgerEntry`] per participant (signed-manifest hash, weight, score,
//!   flags, reward) and the [`LedgerPenalty`]s since the previous record. Its canonical encoding ([`LedgerRecord::encode`]) is
//!   fixed-width little-endian, so every byte is covered by the record hash.
//! - The chain: each record names the hash of the previous one
//!   ([`LedgerRecord::hash`], blake3 in key-derivation mode), and the
//!   aggregator signs that hash with its Ed25519 ledger key
//!   ([`sign_record`], [`verify_record_signature`], verified strictly).
//! - Rewards: a Merkle tree per round over `(round, device, reward)`
//!   leaves, in the shape of RFC 6962 §2.1 (Certificate Transparency):
//!   leaf hashes `H(0x00 || leaf)` and node hashes `H(0x01 || left ||
//!   right)` are domain-separated, so a node can never pass for a leaf; the
//!   tree over `n` leaves splits at the largest power of two below `n`.
//!   [`inclusion_proof`] is RFC 6962's audit path and
//!   [`verify_inclusion`] the verification algorithm of RFC 9162 §2.1.3.2.
//!   H is blake3 instead of SHA-256.
//!
//! **Invariant:** decoding is total: any byte string either decodes to a
//! record whose [`LedgerRecord::encode`] gives the same bytes back, or is a
//! typed [`LedgerError`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

mod eval;
mod flags;
mod stale;
pub use eval::{
    EVAL_FEDERATED, EVAL_VALIDATION_ACCURACY, EVAL_VALIDATION_LOSS, LedgerEvaluation, report_leaf,
};
pub use flags::LedgerFlagRules;
pub use stale::{LedgerStaleness, StaleEntry};

/// Context of the record hash (blake3 key derivation).
const RECORD_CONTEXT: &str = "fedge ledger record v1";
/// Prefix of what the aggregator signs.
const SIGN_DOMAIN: &[u8] = b"fedge-ledger-v1";
/// First bytes of an encoded record (format version 2: penalties carry the
/// stake fraction they slash). A record without an evaluation is written
/// in format 2.
const MAGIC: &[u8; 8] = b"fedgeLR2";
/// Format 3: format 2 and an evaluation section (see [`LedgerEvaluation`]).
const MAGIC_V3: &[u8; 8] = b"fedgeLR3";
/// Format 4: a sections byte after the reward root ([`SECTION_EVALUATION`],
/// [`SECTION_STALENESS`], [`SECTION_FLAG_RULES`]; one of the last two
/// always set), then the sections in that order. Written for a record
/// with stale entries or flag rules (every scored round's).
const MAGIC_V4: &[u8; 8] = b"fedgeLR4";
/// Format 4 sections: the evaluation ([`LedgerEvaluation`]) ...
pub const SECTION_EVALUATION: u8 = 1;
/// ... the stale entries ([`LedgerStaleness`]) ...
pub const SECTION_STALENESS: u8 = 2;
/// ... and the flag rules ([`LedgerFlagRules`]).
pub const SECTION_FLAG_RULES: u8 = 4;
const SECTIONS_KNOWN: u8 = SECTION_EVALUATION | SECTION_STALENESS | SECTION_FLAG_RULES;
/// First bytes of a format-1 record (before slashing), refused by name.
const MAGIC_V1: &[u8; 8] = b"fedgeLR1";
/// Most entries one record may carry (a round has at most this many
/// participants; far above any `devices_per_round`).
pub const ENTRIES_MAX: usize = 1 << 16;

/// Entry flag: the update's cosine similarity to an earlier update of the
/// same round was above the copy threshold.
pub const FLAG_COPY: u8 = 1;
/// Entry flag: the update had almost no effect (its norm far below the
/// round's median): a free-rider.
pub const FLAG_FREE_RIDER: u8 = 2;
/// Entry flag: the update was not scored (no validation set, or the
/// evaluation failed); it earns no reward.
pub const FLAG_UNSCORED: u8 = 4;
/// Entry flag: the update was nearly orthogonal to the round's other
/// updates (noise).
pub const FLAG_NOISE: u8 = 8;
/// Penalty: the signed update decoded to values that are not finite.
pub const PENALTY_NON_FINITE: u8 = 1;
/// Penalty: the signed update's norm was over the configured bound.
pub const PENALTY_NORM_BOUND: u8 = 2;
/// Penalty: the device signed two different updates for the same task;
/// the evidence is both signed manifests ([`crate::evidence::Equivocation`]).
pub const PENALTY_EQUIVOCATION: u8 = 3;
/// Penalty: the update was flagged a copy of an earlier update of the same
/// round ([`FLAG_COPY`]); the evidence is the two payloads, kept with the
/// round's updates.
pub const PENALTY_COPY: u8 = 4;
const PENALTIES_KNOWN: [u8; 4] = [
    PENALTY_NON_FINITE,
    PENALTY_NORM_BOUND,
    PENALTY_EQUIVOCATION,
    PENALTY_COPY,
];
/// Stake transforms of [`LedgerRecord::stake_transform`]: every stake
/// counts 1; the stake; its square root; `ln(1 + stake)`; `min(stake,
/// stake_param)`.
pub const STAKE_CONSTANT: u8 = 0;
pub const STAKE_LINEAR: u8 = 1;
pub const STAKE_SQRT: u8 = 2;
pub const STAKE_LOG: u8 = 3;
pub const STAKE_CAPPED: u8 = 4;
/// Most penalties one record may carry.
pub const PENALTIES_MAX: usize = 1 << 12;

/// Scores are `loss(model) - loss(model + (lr/n) x update)`.
pub const METHOD_DIRECT: u8 = 0;
/// Scores are what the round's mean step loses without the update.
pub const METHOD_LEAVE_ONE_OUT: u8 = 1;
/// Scores are what the round's step loses without the update, the others
/// keeping their parts.
pub const METHOD_MARGINAL: u8 = 2;
/// Scores are the mean of the direct and the marginal score (a Shapley
/// value under a quadratic loss).
pub const METHOD_SHAPLEY: u8 = 3;
/// Scores are the class-weighted positive per-class gains of the update's
/// part of the step, on losses with the class priors refitted.
pub const METHOD_CLASS_GAIN: u8 = 4;
const FLAGS_KNOWN: u8 = FLAG_COPY | FLAG_FREE_RIDER | FLAG_UNSCORED | FLAG_NOISE;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    #[error("record is truncated: {0}")]
    Truncated(&'static str),
    #[error("record does not start with the ledger magic")]
    BadMagic,
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    #[error("record has {0} entries; at most {ENTRIES_MAX} allowed")]
    TooManyEntries(u64),
    #[error("field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("{0}")]
    BadProof(String),
}

/// One participant of a published round.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerEntry {
    /// The device's Ed25519 public key.
    pub device: [u8; 32],
    /// blake3 of the device's signed manifest (the signed bytes and the
    /// signature): the evidence of what it sent.
    pub manifest_hash: [u8; 32],
    pub payload_hash: [u8; 32],
    /// Stake in the registry when the update was accepted (0: none).
    pub stake: f64,
    /// Share of the round's aggregation weight (after capping).
    pub weight: f64,
    /// loss(model) - loss(model + update at the server learning rate) on
    /// the round's validation sample (0 when unscored).
    pub score: f64,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Reward in the pool's units.
    pub reward: u64,
}

/// Provable misbehaviour: a device signed an update (its manifest names
/// the payload hash) whose payload was refused for a reason anyone can
/// check from that payload, signed two different updates for one task, or
/// copied another device's update. The aggregator keeps the evidence: for
/// [`PENALTY_NON_FINITE`], [`PENALTY_NORM_BOUND`] and
/// [`PENALTY_EQUIVOCATION`] a file whose blake3 hash is `payload_hash`;
/// for [`PENALTY_COPY`] the copy's payload among the round's updates.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerPenalty {
    pub device: [u8; 32],
    /// The round the refused update was sent in.
    pub round_id: u64,
    pub manifest_hash: [u8; 32],
    pub payload_hash: [u8; 32],
    /// `PENALTY_*`.
    pub kind: u8,
    /// Fraction of the device's stake this penalty slashed, in [0, 1]
    /// (0: recorded as evidence only).
    pub slashed: f64,
}

/// One published version's record.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    pub round_id: u64,
    /// [`LedgerRecord::hash`] of record `seq - 1` (zeros for the first).
    pub prev_hash: [u8; 32],
    pub model_before: [u8; 32],
    pub model_after: [u8; 32],
    /// Seed the validation sample was drawn with.
    pub scoring_seed: [u8; 32],
    /// Validation samples each score was computed on.
    pub validation_samples: u32,
    /// How scores were computed: one of the `METHOD_` constants
    /// ([`METHOD_CLASS_GAIN`], [`METHOD_DIRECT`], ...).
    pub score_method: u8,
    /// The server learning rate; each update was scored applied at
    /// `server_lr / entries.len()` (its part of the round's mean step).
    pub server_lr: f64,
    pub reward_pool: u64,
    /// How rewards were split: no participant's share of the pool above
    /// this (`weights.max_share`, in (0, 1]) ...
    pub reward_cap: f64,
    /// ... by `f(stake) x max(score, 0)`, `f` the stake transform
    /// (`STAKE_*`) with its parameter (the cap of [`STAKE_CAPPED`], else
    /// 0). With these, anyone recomputes every reward from the entries.
    pub stake_transform: u8,
    pub stake_param: f64,
    /// Participants, ordered by device key (no key twice).
    pub entries: Vec<LedgerEntry>,
    /// Misbehaviour since the previous record, in the order it happened.
    pub penalties: Vec<LedgerPenalty>,
    /// [`merkle_root`] over the entries' [`reward_leaf`]s.
    pub reward_root: [u8; 32],
    /// The round's evaluation of `model_before` (format 3), if any.
    pub evaluation: Option<LedgerEvaluation>,
    /// Stale FedBuff updates among the entries and their discounts (format
    /// 4), if any.
    pub staleness: Option<LedgerStaleness>,
    /// How the entries' flags were computed (format 4; a scored round's).
    pub flag_rules: Option<LedgerFlagRules>,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], LedgerError> {
        if self.b.len() < n {
            return Err(LedgerError::Truncated(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn h32(&mut self, what: &'static str) -> Result<[u8; 32], LedgerError> {
        Ok(self.take(32, what)?.try_into().expect("32 bytes"))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, LedgerError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn f64(&mut self, what: &'static str) -> Result<f64, LedgerError> {
        let v = f64::from_bits(self.u64(what)?);
        if !v.is_finite() {
            return Err(LedgerError::Invalid {
                field: what,
                reason: "not finite".into(),
            });
        }
        Ok(v)
    }
}

impl LedgerRecord {
    /// The canonical bytes (what is hashed, signed and stored).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 8 * 2 + 32 * 5 + 4 + 16 + 8 + 137 * self.entries.len());
        let sectioned = self.staleness.is_some() || self.flag_rules.is_some();
        b.extend_from_slice(match (sectioned, &self.evaluation) {
            (true, _) => MAGIC_V4,
            (false, Some(_)) => MAGIC_V3,
            (false, None) => MAGIC,
        });
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.round_id.to_le_bytes());
        b.extend_from_slice(&self.prev_hash);
        b.extend_from_slice(&self.model_before);
        b.extend_from_slice(&self.model_after);
        b.extend_from_slice(&self.scoring_seed);
        b.extend_from_slice(&self.validation_samples.to_le_bytes());
        b.push(self.score_method);
        b.extend_from_slice(&self.server_lr.to_bits().to_le_bytes());
        b.extend_from_slice(&self.reward_pool.to_le_bytes());
        b.extend_from_slice(&self.reward_cap.to_bits().to_le_bytes());
        b.push(self.stake_transform);
        b.extend_from_slice(&self.stake_param.to_bits().to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.device);
            b.extend_from_slice(&e.manifest_hash);
            b.extend_from_slice(&e.payload_hash);
            b.extend_from_slice(&e.stake.to_bits().to_le_bytes());
            b.extend_from_slice(&e.weight.to_bits().to_le_bytes());
            b.extend_from_slice(&e.score.to_bits().to_le_bytes());
            b.push(e.flags);
            b.extend_from_slice(&e.reward.to_le_bytes());
        }
        b.extend_from_slice(&(self.penalties.len() as u64).to_le_bytes());
        for p in &self.penalties {
            b.extend_from_slice(&p.device);
            b.extend_from_slice(&p.round_id.to_le_bytes());
            b.extend_from_slice(&p.manifest_hash);
            b.extend_from_slice(&p.payload_hash);
            b.push(p.kind);
            b.extend_from_slice(&p.slashed.to_bits().to_le_bytes());
        }
        b.extend_from_slice(&self.reward_root);
        if sectioned {
            let bit = |on: bool, bit: u8| if on { bit } else { 0 };
            b.push(
                bit(self.evaluation.is_some(), SECTION_EVALUATION)
                    | bit(self.staleness.is_some(), SECTION_STALENESS)
                    | bit(self.flag_rules.is_some(), SECTION_FLAG_RULES),
            );
        }
        if let Some(e) = &self.evaluation {
            e.encode_into(&mut b);
        }
        if let Some(s) = &self.staleness {
            s.encode_into(&mut b);
        }
        if let Some(f) = &self.flag_rules {
            f.encode_into(&mut b);
        }
        b
    }

    /// Decodes canonical bytes, checking every field (finite numbers,
    /// known flags, entries ordered by device, the reward root).
    pub fn decode(bytes: &[u8]) -> Result<Self, LedgerError> {
        let mut r = Reader { b: bytes };
        let magic = r.take(8, "magic")?;
        if magic == MAGIC_V1 {
            return Err(LedgerError::Invalid {
                field: "magic",
                reason: "ledger format 1 (before slashing); this build reads formats 2 to 4".into(),
            });
        }
        let sectioned = magic == MAGIC_V4;
        if magic != MAGIC && magic != MAGIC_V3 && !sectioned {
            return Err(LedgerError::BadMagic);
        }
        let seq = r.u64("seq")?;
        let round_id = r.u64("round_id")?;
        let prev_hash = r.h32("prev_hash")?;
        let model_before = r.h32("model_before")?;
        let model_after = r.h32("model_after")?;
        let scoring_seed = r.h32("scoring_seed")?;
        let validation_samples =
            u32::from_le_bytes(r.take(4, "validation_samples")?.try_into().expect("4"));
        let score_method = r.take(1, "score_method")?[0];
        if score_method > METHOD_CLASS_GAIN {
            return Err(LedgerError::Invalid {
                field: "score_method",
                reason: format!("unknown method {score_method}"),
            });
        }
        let server_lr = r.f64("server_lr")?;
        let reward_pool = r.u64("reward_pool")?;
        let reward_cap = r.f64("reward_cap")?;
        if !(reward_cap > 0.0 && reward_cap <= 1.0) {
            return Err(LedgerError::Invalid {
                field: "reward_cap",
                reason: format!("{reward_cap} is not in (0, 1]"),
            });
        }
        let stake_transform = r.take(1, "stake_transform")?[0];
        if stake_transform > STAKE_CAPPED {
            return Err(LedgerError::Invalid {
                field: "stake_transform",
                reason: format!("unknown transform {stake_transform}"),
            });
        }
        let stake_param = r.f64("stake_param")?;
        if stake_param < 0.0 {
            return Err(LedgerError::Invalid {
                field: "stake_param",
                reason: format!("{stake_param} is negative"),
            });
        }
        let n = r.u64("entry count")?;
        if n > ENTRIES_MAX as u64 {
            return Err(LedgerError::TooManyEntries(n));
        }
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let device = r.h32("entry device")?;
            let manifest_hash = r.h32("entry manifest_hash")?;
            let payload_hash = r.h32("entry payload_hash")?;
            let stake = r.f64("entry stake")?;
            let weight = r.f64("entry weight")?;
            let score = r.f64("entry score")?;
            let flags = r.take(1, "entry flags")?[0];
            if flags & !FLAGS_KNOWN != 0 {
                return Err(LedgerError::Invalid {
                    field: "entry flags",
                    reason: format!("unknown bits {flags:#04x}"),
                });
            }
            let reward = r.u64("entry reward")?;
            entries.push(LedgerEntry {
                device,
                manifest_hash,
                payload_hash,
                stake,
                weight,
                score,
                flags,
                reward,
            });
        }
        let n = r.u64("penalty count")?;
        if n > PENALTIES_MAX as u64 {
            return Err(LedgerError::Invalid {
                field: "penalty count",
                reason: format!("{n}; at most {PENALTIES_MAX}"),
            });
        }
        let mut penalties = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let device = r.h32("penalty device")?;
            let round_id = r.u64("penalty round_id")?;
            let manifest_hash = r.h32("penalty manifest_hash")?;
            let payload_hash = r.h32("penalty payload_hash")?;
            let kind = r.take(1, "penalty kind")?[0];
            if !PENALTIES_KNOWN.contains(&kind) {
                return Err(LedgerError::Invalid {
                    field: "penalty kind",
                    reason: format!("unknown kind {kind}"),
                });
            }
            let slashed = r.f64("penalty slashed")?;
            if !(0.0..=1.0).contains(&slashed) {
                return Err(LedgerError::Invalid {
                    field: "penalty slashed",
                    reason: format!("{slashed} is not a fraction in [0, 1]"),
                });
            }
            penalties.push(LedgerPenalty {
                device,
                round_id,
                manifest_hash,
                payload_hash,
                kind,
                slashed,
            });
        }
        let reward_root = r.h32("reward_root")?;
        let sections = if sectioned {
            let s = r.take(1, "sections")?[0];
            if s & !SECTIONS_KNOWN != 0 || s & (SECTION_STALENESS | SECTION_FLAG_RULES) == 0 {
                return Err(LedgerError::Invalid {
                    field: "sections",
                    reason: format!(
                        "{s:#04x}: format 4 has staleness or flag rules, and may have the \
                         evaluation, nothing else"
                    ),
                });
            }
            s
        } else if magic == MAGIC_V3 {
            SECTION_EVALUATION
        } else {
            0
        };
        let evaluation = if sections & SECTION_EVALUATION != 0 {
            Some(LedgerEvaluation::decode(&mut r)?)
        } else {
            None
        };
        let staleness = if sections & SECTION_STALENESS != 0 {
            Some(LedgerStaleness::decode(&mut r, entries.len(), round_id)?)
        } else {
            None
        };
        let flag_rules = if sections & SECTION_FLAG_RULES != 0 {
            Some(LedgerFlagRules::decode(&mut r, entries.len())?)
        } else {
            None
        };
        if !r.b.is_empty() {
            return Err(LedgerError::Trailing(r.b.len()));
        }
        if entries.windows(2).any(|w| w[0].device >= w[1].device) {
            return Err(LedgerError::Invalid {
                field: "entries",
                reason: "not ordered by device key, or a key twice".into(),
            });
        }
        let rec = LedgerRecord {
            seq,
            round_id,
            prev_hash,
            model_before,
            model_after,
            scoring_seed,
            validation_samples,
            score_method,
            server_lr,
            reward_pool,
            reward_cap,
            stake_transform,
            stake_param,
            entries,
            penalties,
            reward_root,
            evaluation,
            staleness,
            flag_rules,
        };
        if rec.compute_reward_root() != rec.reward_root {
            return Err(LedgerError::Invalid {
                field: "reward_root",
                reason: "does not match the entries' rewards".into(),
            });
        }
        let paid: u128 = rec.entries.iter().map(|e| u128::from(e.reward)).sum();
        if paid > u128::from(rec.reward_pool) {
            return Err(LedgerError::Invalid {
                field: "entry reward",
                reason: format!("rewards total {paid}, above the pool {}", rec.reward_pool),
            });
        }
        Ok(rec)
    }

    /// The record's hash: what the next record names and what is signed.
    pub fn hash(&self) -> [u8; 32] {
        record_hash(&self.encode())
    }

    /// The leaves of the round's reward tree, in entry order.
    pub fn reward_leaves(&self) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .map(|e| reward_leaf(self.round_id, &e.device, e.reward))
            .collect()
    }

    /// [`merkle_root`] over [`LedgerRecord::reward_leaves`].
    pub fn compute_reward_root(&self) -> [u8; 32] {
        merkle_root(&self.reward_leaves())
    }
}

/// The hash of a record's canonical bytes.
pub fn record_hash(encoded: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(RECORD_CONTEXT);
    h.update(encoded);
    *h.finalize().as_bytes()
}

fn signed_message(record_hash: &[u8; 32]) -> Vec<u8> {
    [SIGN_DOMAIN, record_hash.as_slice()].concat()
}

/// The aggregator's signature over a record hash.
pub fn sign_record(key: &SigningKey, record_hash: &[u8; 32]) -> [u8; 64] {
    key.sign(&signed_message(record_hash)).to_bytes()
}

/// Checks the aggregator's signature over a record hash (strictly:
/// small-order keys and malleable signatures are refused).
pub fn verify_record_signature(
    key: &VerifyingKey,
    record_hash: &[u8; 32],
    signature: &[u8; 64],
) -> Result<(), LedgerError> {
    key.verify_strict(
        &signed_message(record_hash),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| LedgerError::BadSignature)
}

/// A reward tree leaf: `round_id || device || reward`, little-endian.
pub fn reward_leaf(round_id: u64, device: &[u8; 32], reward: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(48);
    b.extend_from_slice(&round_id.to_le_bytes());
    b.extend_from_slice(device);
    b.extend_from_slice(&reward.to_le_bytes());
    b
}

/// `H(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(leaf);
    *h.finalize().as_bytes()
}

/// `H(0x01 || left || right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The largest power of two below `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

fn root_of(hashes: &[[u8; 32]]) -> [u8; 32] {
    match hashes.len() {
        0 => *blake3::hash(&[]).as_bytes(),
        1 => hashes[0],
        n => {
            let k = split(n);
            node_hash(&root_of(&hashes[..k]), &root_of(&hashes[k..]))
        }
    }
}

/// RFC 6962 §2.1 Merkle tree hash of `leaves` (the empty tree: `H()`).
pub fn merkle_root(leaves: &[Vec<u8>]) -> [u8; 32] {
    let hashes: Vec<[u8; 32]> = leaves.iter().map(|l| leaf_hash(l)).collect();
    root_of(&hashes)
}

/// RFC 6962 §2.1.1 audit path of leaf `index` (None when out of range).
pub fn inclusion_proof(leaves: &[Vec<u8>], index: usize) -> Option<Vec<[u8; 32]>> {
    if index >= leaves.len() {
        return None;
    }
    let hashes: Vec<[u8; 32]> = leaves.iter().map(|l| leaf_hash(l)).collect();
    fn path(m: usize, d: &[[u8; 32]], out: &mut Vec<[u8; 32]>) {
        let n = d.len();
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            path(m, &d[..k], out);
            out.push(root_of(&d[k..]));
        } else {
            path(m - k, &d[k..], out);
            out.push(root_of(&d[..k]));
        }
    }
    let mut out = Vec::new();
    path(index, &hashes, &mut out);
    Some(out)
}

/// RFC 9162 §2.1.3.2: does `path` prove `leaf` at `index` in a tree of
/// `size` leaves with root `root`?
pub fn verify_inclusion(
    leaf: &[u8],
    index: u64,
    size: u64,
    path: &[[u8; 32]],
    root: &[u8; 32],
) -> Result<(), LedgerError> {
    if index >= size {
        return Err(LedgerError::BadProof(format!(
            "leaf index {index} is outside a tree of {size} leaves"
        )));
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = leaf_hash(leaf);
    for p in path {
        if s == 0 {
            return Err(LedgerError::BadProof("audit path is too long".into()));
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(LedgerError::BadProof("audit path is too short".into()));
    }
    if r != *root {
        return Err(LedgerError::BadProof(
            "the path does not lead to the root: the leaf (device, reward, round) or the path is wrong"
                .into(),
        ));
    }
    Ok(())
}

/// A device's proof that `reward` was paid to `device` in `round_id`: the
/// audit path into the round's reward root. Checking it needs no network
/// and no aggregator state ([`RewardProof::verify`]); comparing `root`
/// with a root published elsewhere (`ledger export`, an anchor on a chain)
/// is the caller's part.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardProof {
    pub round_id: u64,
    pub device: [u8; 32],
    pub reward: u64,
    pub leaf_index: u64,
    pub tree_size: u64,
    pub path: Vec<[u8; 32]>,
    pub root: [u8; 32],
}

impl RewardProof {
    pub fn verify(&self) -> Result<(), LedgerError> {
        if self.path.len() > 64 {
            return Err(LedgerError::BadProof(format!(
                "audit path of {} hashes; at most 64",
                self.path.len()
            )));
        }
        let leaf = reward_leaf(self.round_id, &self.device, self.reward);
        verify_inclusion(
            &leaf,
            self.leaf_index,
            self.tree_size,
            &self.path,
            &self.root,
        )
    }
}

#[cfg(test)]
mod tests;
