//! The record format, the Merkle tree and reward proofs.
use super::*;

fn leaves(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| reward_leaf(7, &[i as u8; 32], 100 + i as u64))
        .collect()
}

/// The tree is RFC 6962's: hand-computed roots of 1, 2 and 3 leaves.
#[test]
fn roots_match_the_definition() {
    let l = leaves(3);
    let h: Vec<_> = l.iter().map(|x| leaf_hash(x)).collect();
    assert_eq!(merkle_root(&[]), *blake3::hash(b"").as_bytes());
    assert_eq!(merkle_root(&l[..1]), h[0]);
    assert_eq!(merkle_root(&l[..2]), node_hash(&h[0], &h[1]));
    assert_eq!(merkle_root(&l), node_hash(&node_hash(&h[0], &h[1]), &h[2]));
    // Domain separation: a leaf equal to two node hashes is not a node.
    let fake = [h[0].as_slice(), h[1].as_slice()].concat();
    assert_ne!(leaf_hash(&fake), node_hash(&h[0], &h[1]));
}

/// Every leaf of every tree size up to 33 proves, and nothing else does.
#[test]
fn proofs_verify_for_every_leaf_and_fail_when_altered() {
    for n in 1..=33 {
        let l = leaves(n);
        let root = merkle_root(&l);
        for i in 0..n {
            let p = inclusion_proof(&l, i).unwrap();
            verify_inclusion(&l[i], i as u64, n as u64, &p, &root)
                .unwrap_or_else(|e| panic!("n={n} i={i}: {e}"));
            let mut wrong = l[i].clone();
            *wrong.last_mut().unwrap() ^= 1;
            assert!(verify_inclusion(&wrong, i as u64, n as u64, &p, &root).is_err());
            if n > 1 {
                let j = (i + 1) % n;
                assert!(verify_inclusion(&l[i], j as u64, n as u64, &p, &root).is_err());
                let mut bad = p.clone();
                bad[0][0] ^= 1;
                assert!(verify_inclusion(&l[i], i as u64, n as u64, &bad, &root).is_err());
                assert!(verify_inclusion(&l[i], i as u64, n as u64, &p[1..], &root).is_err());
            }
        }
        assert!(inclusion_proof(&l, n).is_none());
    }
}

/// `r` round-trips, a flipped bit anywhere either fails to decode or
/// changes the hash, and no prefix decodes.
pub(super) fn assert_every_byte_counts(r: &LedgerRecord) {
    let b = r.encode();
    assert_eq!(&LedgerRecord::decode(&b).unwrap(), r);
    for i in 0..b.len() {
        let mut x = b.clone();
        x[i] ^= 0x01;
        if let Ok(d) = LedgerRecord::decode(&x) {
            assert_ne!(d.hash(), r.hash(), "byte {i}");
        }
    }
    for n in 0..b.len() {
        assert!(LedgerRecord::decode(&b[..n]).is_err(), "prefix {n}");
    }
}

pub(super) fn record() -> LedgerRecord {
    let mut r = LedgerRecord {
        seq: 3,
        round_id: 9,
        prev_hash: [1; 32],
        model_before: [2; 32],
        model_after: [3; 32],
        scoring_seed: [4; 32],
        validation_samples: 256,
        score_method: METHOD_LEAVE_ONE_OUT,
        server_lr: 1.0,
        reward_pool: 1000,
        reward_cap: 0.5,
        stake_transform: STAKE_CAPPED,
        stake_param: 3.0,
        entries: (0..3u8)
            .map(|i| LedgerEntry {
                device: [i + 10; 32],
                manifest_hash: [i; 32],
                payload_hash: [i + 1; 32],
                stake: 1.5,
                weight: 1.0 / 3.0,
                score: 0.01 * f64::from(i),
                flags: if i == 0 { FLAG_FREE_RIDER } else { 0 },
                reward: u64::from(i) * 100,
            })
            .collect(),
        penalties: vec![LedgerPenalty {
            device: [7; 32],
            round_id: 8,
            manifest_hash: [5; 32],
            payload_hash: [6; 32],
            kind: PENALTY_NORM_BOUND,
            slashed: 0.25,
        }],
        reward_root: [0; 32],
        evaluation: None,
        staleness: None,
        flag_rules: None,
    };
    r.reward_root = r.compute_reward_root();
    r
}

#[test]
fn records_round_trip_and_every_flipped_byte_is_caught() {
    let r = record();
    let b = r.encode();
    assert_eq!(LedgerRecord::decode(&b).unwrap(), r);
    let key = SigningKey::from_bytes(&[5; 32]);
    let sig = sign_record(&key, &r.hash());
    verify_record_signature(&key.verifying_key(), &r.hash(), &sig).unwrap();
    for i in 0..b.len() {
        for bit in [0x01u8, 0x80] {
            let mut x = b.clone();
            x[i] ^= bit;
            // Either it no longer decodes, or its hash (and so the
            // signature and the next record's link) changed.
            if let Ok(d) = LedgerRecord::decode(&x) {
                assert_ne!(d.hash(), r.hash(), "byte {i}");
                assert!(verify_record_signature(&key.verifying_key(), &d.hash(), &sig).is_err());
            }
        }
    }
    for n in 0..b.len() {
        assert!(LedgerRecord::decode(&b[..n]).is_err(), "prefix {n}");
    }
    let mut longer = b.clone();
    longer.push(0);
    assert_eq!(LedgerRecord::decode(&longer), Err(LedgerError::Trailing(1)));
}

/// Every scoring method round-trips; an unknown one is refused by name.
#[test]
fn score_methods_are_known_or_refused() {
    for m in [
        METHOD_DIRECT,
        METHOD_LEAVE_ONE_OUT,
        METHOD_MARGINAL,
        METHOD_SHAPLEY,
        METHOD_CLASS_GAIN,
    ] {
        let r = LedgerRecord {
            score_method: m,
            ..record()
        };
        assert_eq!(LedgerRecord::decode(&r.encode()).unwrap(), r);
    }
    let r = LedgerRecord {
        score_method: METHOD_CLASS_GAIN + 1,
        ..record()
    };
    assert!(matches!(
        LedgerRecord::decode(&r.encode()),
        Err(LedgerError::Invalid {
            field: "score_method",
            ..
        })
    ));
}

#[test]
fn a_reward_proof_checks_offline() {
    let r = record();
    let l = r.reward_leaves();
    for (i, e) in r.entries.iter().enumerate() {
        let mut p = RewardProof {
            round_id: r.round_id,
            device: e.device,
            reward: e.reward,
            leaf_index: i as u64,
            tree_size: l.len() as u64,
            path: inclusion_proof(&l, i).unwrap(),
            root: r.reward_root,
        };
        p.verify().unwrap();
        p.reward += 1;
        assert!(p.verify().is_err());
        p.reward -= 1;
        p.round_id += 1;
        assert!(p.verify().is_err());
    }
}
