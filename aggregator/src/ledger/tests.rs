use super::*;
use fedge_proto::update::{Codec, encode_update};

/// Once a chain states its flag rules, a scored record without them
/// (whose flags no verifier could recompute) is refused, named.
#[test]
fn a_scored_record_without_flag_rules_after_one_with_them_is_refused() {
    let key = SigningKey::from_bytes(&[3; 32]);
    let rec = |seq: u64, prev: [u8; 32], rules: bool| {
        let mut r = LedgerRecord {
            seq,
            round_id: seq,
            prev_hash: prev,
            model_before: [seq as u8; 32],
            model_after: [seq as u8 + 1; 32],
            scoring_seed: [0; 32],
            validation_samples: 8,
            score_method: ledger::METHOD_DIRECT,
            server_lr: 1.0,
            reward_pool: 0,
            reward_cap: 1.0,
            stake_transform: ledger::STAKE_CONSTANT,
            stake_param: 0.0,
            entries: vec![LedgerEntry {
                device: [9; 32],
                manifest_hash: [1; 32],
                payload_hash: [2; 32],
                stake: 0.0,
                weight: 1.0,
                score: 0.0,
                flags: 0,
                reward: 0,
            }],
            penalties: vec![],
            reward_root: [0; 32],
            evaluation: None,
            staleness: None,
            flag_rules: rules.then(|| LedgerFlagRules {
                copy_cosine_min: 0.99,
                free_rider_norm_ratio: 0.05,
                noise_sigmas: 3.0,
                order: vec![0],
            }),
        };
        r.reward_root = r.compute_reward_root();
        r
    };
    let stored = |rs: &[LedgerRecord]| -> Vec<StoredRecord> {
        rs.iter()
            .map(|r| StoredRecord {
                seq: r.seq,
                bytes: r.encode(),
                signature: ledger::sign_record(&key, &r.hash()).to_vec(),
            })
            .collect()
    };
    let first = rec(1, [0; 32], true);
    let with = rec(2, first.hash(), true);
    verify_chain(&stored(&[first.clone(), with]), &key.verifying_key()).unwrap();
    let without = rec(2, first.hash(), false);
    let e = verify_chain(&stored(&[first, without]), &key.verifying_key()).unwrap_err();
    assert_eq!(e.seq, 2, "{e}");
}

fn penalty(kind: u8, evidence: &[u8]) -> LedgerPenalty {
    LedgerPenalty {
        device: [7; 32],
        round_id: 3,
        manifest_hash: [1; 32],
        payload_hash: *blake3::hash(evidence).as_bytes(),
        kind,
        slashed: 0.1,
    }
}

/// Rewards follow from a record's own numbers: a record whose rewards
/// do not (even one with a matching root and a valid signature) is
/// named.
#[test]
fn rewards_are_recomputed_from_the_record() {
    let entry = |d: u8, stake: f64, score: f64, flags: u8| LedgerEntry {
        device: [d; 32],
        manifest_hash: [0; 32],
        payload_hash: [0; 32],
        stake,
        weight: 0.25,
        score,
        flags,
        reward: 0,
    };
    let mut r = LedgerRecord {
        seq: 1,
        round_id: 1,
        prev_hash: [0; 32],
        model_before: [1; 32],
        model_after: [2; 32],
        scoring_seed: [0; 32],
        validation_samples: 8,
        score_method: ledger::METHOD_DIRECT,
        server_lr: 1.0,
        reward_pool: 1000,
        reward_cap: 0.5,
        stake_transform: ledger::STAKE_SQRT,
        stake_param: 0.0,
        entries: vec![
            entry(1, 4.0, 0.3, 0),
            entry(2, 1.0, 0.3, 0),
            entry(3, 9.0, -0.1, 0),
            entry(4, 9.0, 0.5, ledger::FLAG_COPY),
            entry(5, 1.0, 0.2, 0),
        ],
        penalties: vec![],
        reward_root: [0; 32],
        evaluation: None,
        staleness: None,
        flag_rules: None,
    };
    // sqrt(4) x 0.3 = 0.6, 0.3, 0, 0 (flagged), 0.2: shares capped at 0.5.
    let w = [0.6, 0.3, 0.0, 0.0, 0.2];
    let devices: Vec<String> = r.entries.iter().map(|e| hex::encode(e.device)).collect();
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    let paid = crate::scoring::rewards_in_key_order(1000, &refs, &w, 0.5);
    assert_eq!(paid[2..4], [0, 0]);
    assert!(paid[0] <= 500 && paid[0] > paid[1]);
    for (e, p) in r.entries.iter_mut().zip(&paid) {
        e.reward = *p;
    }
    check_rewards(&r).unwrap();
    // The negative score's device paid, or a stake changed: named.
    let mut bad = r.clone();
    bad.entries[2].reward = 1;
    assert!(
        check_rewards(&bad)
            .unwrap_err()
            .contains(&hex::encode([3u8; 32]))
    );
    let mut bad = r.clone();
    bad.entries[1].stake = 100.0;
    assert!(check_rewards(&bad).is_err());
}

#[test]
fn evidence_proves_its_penalty_and_nothing_else() {
    let limits = Limits::default();
    let finite = encode_update(Codec::DenseF32, &[1.0; 4]).to_vec();
    // The same payload with its last value made NaN (what a modified
    // device can sign; honest encoders refuse to).
    let mut nan = finite.clone();
    let n = nan.len();
    nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = penalty(ledger::PENALTY_NON_FINITE, &nan);
    assert_eq!(check_evidence(&p, &nan, Some(4), &limits), Ok("not finite"));
    // Without the model, only the hash is checked.
    assert!(check_evidence(&p, &nan, None, &limits).is_ok());
    // A finite payload proves no non-finite penalty.
    let p = penalty(ledger::PENALTY_NON_FINITE, &finite);
    assert!(check_evidence(&p, &finite, Some(4), &limits).is_err());
    // A root's evidence: a leaf's float64 partial with a NaN in it.
    let mut partial = fedge_proto::update::encode_partial(&[1.0; 4])
        .unwrap()
        .to_vec();
    let n = partial.len();
    partial[n - 8..].copy_from_slice(&f64::NAN.to_le_bytes());
    let p = penalty(ledger::PENALTY_NON_FINITE, &partial);
    assert_eq!(
        check_evidence(&p, &partial, Some(4), &limits),
        Ok("not finite")
    );
    // Evidence that is not the file the penalty names.
    let p = penalty(ledger::PENALTY_NORM_BOUND, &finite);
    assert!(check_evidence(&p, &finite, Some(4), &limits).is_ok());
    assert!(check_evidence(&p, &nan, Some(4), &limits).is_err());
    // An equivocation's evidence is bound to its device, manifest and
    // round.
    use fedge_proto::evidence::{Equivocation, SignedManifest};
    let key = fedge_proto::sign::SigningKey::from_bytes(&[9; 32]);
    let signed = |payload: u8| {
        let manifest = fedge_proto::sign::UpdateManifest {
            round_id: 3,
            model_version: fedge_proto::ModelVersion([1; 32]),
            payload_hash: [payload; 32],
            payload_bytes: 10,
            sample_count: 1,
            metrics: vec![],
            device_public_key: key.verifying_key(),
            federation_id: [2; 32],
            partial: None,
        };
        let signature = manifest.sign(&key);
        SignedManifest {
            manifest,
            signature,
        }
    };
    let e = Equivocation {
        first: signed(1),
        second: signed(2),
    };
    let bytes = e.encode();
    let mut p = penalty(ledger::PENALTY_EQUIVOCATION, &bytes);
    p.device = key.verifying_key().to_bytes();
    p.manifest_hash = e.second.hash();
    assert!(check_evidence(&p, &bytes, None, &limits).is_ok());
    let mut other_round = p.clone();
    other_round.round_id = 4;
    assert!(check_evidence(&other_round, &bytes, None, &limits).is_err());
    let mut other_manifest = p.clone();
    other_manifest.manifest_hash = e.first.hash();
    assert!(check_evidence(&other_manifest, &bytes, None, &limits).is_err());
    // Garbage is not an equivocation.
    let p = penalty(ledger::PENALTY_EQUIVOCATION, &finite);
    assert!(check_evidence(&p, &finite, None, &limits).is_err());
    // Where each kind's evidence is kept.
    let dir = Path::new("/state");
    let copy = penalty(ledger::PENALTY_COPY, &finite);
    assert!(evidence_path(dir, &copy).starts_with("/state/updates/3"));
    assert!(evidence_path(dir, &p).starts_with("/state/evidence"));
}
