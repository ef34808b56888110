//! SecAgg+ end to end without sockets: the aggregator's `SecAggServer` and
//! the devices' `SecAggClient`s exchange messages in virtual time, devices
//! dropping out at each stage. The unmasked sum must equal the sum of the
//! survivors' quantized updates exactly; what the aggregator receives from
//! each device must look uniformly random; rounds with too few survivors
//! fail with a typed error. Every case names its seed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fedge_aggregator::privacy::secagg::{
    RoundFailure, SecAggOutcome, SecAggServer, StageDeadlines,
};
use fedge_device::secagg::SecAggClient;
use fedge_proto::secagg::mask::ring_mask;
use fedge_proto::secagg::{AggSecAgg, DeviceSecAgg, SecAggError, SecAggParams, Stage};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DEADLINES: StageDeadlines = StageDeadlines {
    advertise_keys: Duration::from_secs(5),
    share_keys: Duration::from_secs(5),
    masked_input: Duration::from_secs(30),
    unmasking: Duration::from_secs(5),
};

fn params(
    seed: u64,
    devices: u32,
    degree: u32,
    threshold: u32,
    bits: u32,
    dimension: u32,
) -> SecAggParams {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    SecAggParams {
        round: seed,
        seed: s,
        devices,
        degree,
        threshold,
        bits,
        clip: 4.0,
        dimension,
        noise: None,
    }
}

/// What one simulated round did.
struct Run {
    outcome: Result<SecAggOutcome, RoundFailure>,
    /// Each device's quantized update (before masking).
    quantized: Vec<Vec<u64>>,
    /// What the aggregator received at MaskedInput, by device.
    masked: BTreeMap<u32, Vec<u64>>,
    /// Devices that sent their message of each stage.
    sent: [u32; 4],
}

/// Drive one round. `drop_at[i]`: device i sends nothing from that stage
/// on. `updates[i]`: its update.
fn run(p: &SecAggParams, drop_at: &[Option<Stage>], updates: &[Vec<f32>], seed: u64) -> Run {
    run_with_liar(p, drop_at, updates, seed, None)
}

/// As [`run`], with device `liar` (a modified binary) revealing made-up
/// shares at unmasking.
fn run_with_liar(
    p: &SecAggParams,
    drop_at: &[Option<Stage>],
    updates: &[Vec<f32>],
    seed: u64,
    liar: Option<u32>,
) -> Run {
    let mut now = Instant::now();
    let mut server = SecAggServer::new(p.clone(), DEADLINES, p.threshold, now).expect("params");
    let mut clients: Vec<Option<SecAggClient>> = (0..p.devices)
        .map(|i| {
            let mut r = [0u8; 32];
            r[..8].copy_from_slice(&seed.to_le_bytes());
            r[8..12].copy_from_slice(&i.to_le_bytes());
            let mut c = SecAggClient::new(p.clone(), i, r).expect("client");
            c.set_update(&updates[i as usize]).expect("update");
            Some(c)
        })
        .collect();
    let quantized: Vec<Vec<u64>> = clients
        .iter()
        .map(|c| c.as_ref().unwrap().quantized().unwrap().to_vec())
        .collect();
    let mut masked = BTreeMap::new();
    let mut sent = [0u32; 4];
    for _ in 0..64 {
        let mut moved = false;
        for (i, slot) in clients.iter_mut().enumerate() {
            let i = i as u32;
            while let Some(m) = slot.as_mut().and_then(|c| c.poll_transmit()) {
                let stage = m.stage();
                if drop_at[i as usize].is_some_and(|d| d <= stage) {
                    *slot = None;
                    break;
                }
                moved = true;
                sent[stage as usize] += 1;
                if let DeviceSecAgg::MaskedInput(v) = &m {
                    masked.insert(i, v.clone());
                }
                let m = match m {
                    DeviceSecAgg::Unmask {
                        mut self_mask,
                        mut mask_key,
                    } if liar == Some(i) => {
                        for r in self_mask.iter_mut().chain(mask_key.iter_mut()) {
                            r.share = *blake3::hash(&r.share).as_bytes();
                        }
                        DeviceSecAgg::Unmask {
                            self_mask,
                            mask_key,
                        }
                    }
                    m => m,
                };
                server
                    .handle_message(now, i, m)
                    .unwrap_or_else(|e| panic!("seed {seed}: device {i}: {e}"));
            }
        }
        while let Some((d, m)) = server.poll_transmit() {
            moved = true;
            let slot = &mut clients[d as usize];
            if let Some(c) = slot.as_mut()
                && let Err(e) = c.handle_message(m)
            {
                // Only a neighbourhood below threshold may stop an honest device.
                assert!(
                    matches!(e, SecAggError::TooFewNeighbours { .. }),
                    "seed {seed}: device {d}: {e}"
                );
                *slot = None;
            }
        }
        if let Some(outcome) = server.take_outcome() {
            return Run {
                outcome,
                quantized,
                masked,
                sent,
            };
        }
        if !moved {
            now = server.poll_timeout().expect("a deadline while running");
            server.handle_timeout(now);
        }
    }
    panic!("seed {seed}: the round did not end");
}

fn plain_sum(r: &Run, who: &[u32], bits: u32) -> Vec<u64> {
    let mut sum = vec![0u64; r.quantized[0].len()];
    for &u in who {
        for (s, &v) in sum.iter_mut().zip(&r.quantized[u as usize]) {
            *s = s.wrapping_add(v) & ring_mask(bits);
        }
    }
    sum
}

fn random_updates(rng: &mut ChaCha8Rng, n: u32, dim: u32) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| (0..dim).map(|_| rng.random_range(-3.0f32..3.0)).collect())
        .collect()
}

fn check(seed: u64, p: &SecAggParams, drop_at: &[Option<Stage>]) -> Run {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let updates = random_updates(&mut rng, p.devices, p.dimension);
    let r = run(p, drop_at, &updates, seed);
    match &r.outcome {
        Ok(o) => {
            let senders: Vec<u32> = r.masked.keys().copied().collect();
            assert_eq!(
                o.survivors, senders,
                "seed {seed}: U3 is who sent a masked input"
            );
            assert_eq!(
                o.sum,
                plain_sum(&r, &o.survivors, p.bits),
                "seed {seed}: the unmasked sum"
            );
        }
        Err(RoundFailure::TooFewSurvivors {
            survivors, needed, ..
        }) => {
            assert!(survivors < needed, "seed {seed}");
        }
        Err(RoundFailure::BelowThreshold {
            shares, threshold, ..
        }) => {
            assert!(shares < threshold, "seed {seed}");
        }
        Err(e) => panic!("seed {seed}: {e}"),
    }
    r
}

/// One random case: `rates[s]` is the chance a device drops at stage s
/// (given it reached it); the threshold is half the degree.
fn random_case(
    seed: u64,
    devices: u32,
    degree: u32,
    bits: u32,
    dimension: u32,
    rates: [f64; 4],
) -> (Run, Vec<Option<Stage>>) {
    let p0 = params(seed, devices, degree, 1, bits, dimension);
    let k = p0.graph().degree();
    let p = SecAggParams {
        threshold: (k / 2).max(1),
        ..p0
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd20b);
    let stages = [
        Stage::AdvertiseKeys,
        Stage::ShareKeys,
        Stage::MaskedInput,
        Stage::Unmasking,
    ];
    let drop_at: Vec<Option<Stage>> = (0..devices)
        .map(|_| {
            stages
                .iter()
                .zip(rates)
                .find(|&(_, rate)| rng.random_bool(rate))
                .map(|(&s, _)| s)
        })
        .collect();
    (check(seed, &p, &drop_at), drop_at)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random fleets, graphs, rings and dropouts at every stage: a round
    /// that finishes has the survivors' exact sum; one that fails says why,
    /// truthfully.
    #[test]
    fn the_unmasked_sum_is_the_survivors_sum(
        seed in any::<u64>(),
        devices in 3u32..40,
        degree in 2u32..14,
        bits in 16u32..=62,
        dimension in 1u32..24,
        rates in prop::array::uniform4(0.0f64..0.25),
    ) {
        random_case(seed, devices, degree, bits, dimension, rates);
    }
}

/// The property above is not vacuous: most random rounds with dropouts
/// at every stage finish, including ones where dropped devices' mask keys
/// had to be rebuilt.
#[test]
fn most_random_rounds_with_dropouts_finish() {
    let (mut finished, mut keys_rebuilt) = (0, 0);
    for seed in 0..60u64 {
        let (r, drop_at) = random_case(
            seed,
            10 + (seed % 30) as u32,
            8,
            32,
            8,
            [0.02, 0.02, 0.05, 0.05],
        );
        if let Ok(o) = &r.outcome {
            finished += 1;
            if o.completed[1] > o.completed[2] && drop_at.contains(&Some(Stage::Unmasking)) {
                keys_rebuilt += 1;
            }
        }
    }
    assert!(finished >= 45, "{finished} of 60 finished");
    assert!(
        keys_rebuilt >= 10,
        "{keys_rebuilt} rounds rebuilt mask keys"
    );
}

#[test]
fn without_dropouts_every_round_finishes_exactly() {
    for seed in 0..8u64 {
        let p = params(seed, 12 + seed as u32, 6, 3, 24 + seed as u32, 9);
        let r = check(seed, &p, &vec![None; p.devices as usize]);
        let o = r.outcome.expect("no dropouts");
        assert_eq!(o.survivors.len() as u32, p.devices, "seed {seed}");
        assert_eq!(o.completed, [p.devices; 4], "seed {seed}");
    }
}

/// The round, without sockets: 100 devices, 30% dropping after
/// the key exchange (shares sent, no masked input) and 10% after
/// uploading (no unmasking answer).
#[test]
fn a_hundred_devices_thirty_percent_drop_after_keys_ten_after_upload() {
    let seed = 15;
    let p = params(seed, 100, 40, 12, 32, 64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..100).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut drop_at = vec![None; 100];
    for &d in &order[..30] {
        drop_at[d as usize] = Some(Stage::MaskedInput);
    }
    for &d in &order[30..40] {
        drop_at[d as usize] = Some(Stage::Unmasking);
    }
    let r = check(seed, &p, &drop_at);
    let o = r.outcome.expect("enough survivors");
    assert_eq!(o.completed, [100, 100, 70, 60]);
    assert_eq!(o.survivors.len(), 70);
    // Read back into update units: the clipped updates' sum, to within
    // the quantization step per device.
    let q = p.quantizer().unwrap();
    let decoded = q.decode_sum(&o.sum);
    let exact: Vec<f64> = (0..p.dimension as usize)
        .map(|j| {
            o.survivors
                .iter()
                .map(|&u| q.signed(r.quantized[u as usize][j]) as f64)
                .sum::<f64>()
                / q.scale()
        })
        .collect();
    assert_eq!(decoded, exact);
}

/// Pearson's chi-square over 256 equiprobable bins of the masked values
/// the aggregator receives: all devices send the same (worst-case) update,
/// zero, and still what arrives is uniform on Z_{2^8}, per device and
/// together.
#[test]
fn what_the_aggregator_holds_per_device_is_uniform() {
    let seed = 2;
    let p = params(seed, 16, 6, 3, 8, 4096);
    // 8 bits leave room for 16 devices of scale 6.
    let updates = vec![vec![0.0f32; p.dimension as usize]; p.devices as usize];
    let r = run(&p, &[None; 16], &updates, seed);
    assert!(r.outcome.is_ok());
    assert!(r.quantized.iter().all(|q| q.iter().all(|&v| v == 0)));
    // 255 degrees of freedom: P(chi2 > 340) ~ 3e-4.
    let chi2 = |values: &mut dyn Iterator<Item = u64>| {
        let mut bins = [0f64; 256];
        let mut n = 0f64;
        for v in values {
            bins[v as usize] += 1.0;
            n += 1.0;
        }
        let e = n / 256.0;
        bins.iter().map(|&o| (o - e) * (o - e) / e).sum::<f64>()
    };
    for (d, v) in &r.masked {
        let c = chi2(&mut v.iter().copied());
        assert!(c < 340.0, "device {d}: chi2 {c}");
    }
    let all = chi2(&mut r.masked.values().flatten().copied());
    assert!(all < 340.0, "all devices: chi2 {all}");
    // A control: the unmasked updates fail it.
    assert!(chi2(&mut r.quantized[0].iter().copied()) > 1e5);
}

#[test]
fn too_few_survivors_fail_the_round_with_a_typed_error() {
    // Most devices never advertise keys.
    let p = params(3, 10, 4, 3, 24, 5);
    let mut drop_at = vec![Some(Stage::AdvertiseKeys); 10];
    drop_at[0] = None;
    drop_at[1] = None;
    let r = check(3, &p, &drop_at);
    assert_eq!(
        r.outcome,
        Err(RoundFailure::TooFewSurvivors {
            stage: Stage::AdvertiseKeys,
            survivors: 2,
            needed: 3
        })
    );
    // Everyone uploads, then all but two vanish: the self-mask seeds of
    // the survivors cannot be rebuilt from t = 3 shares.
    let mut drop_at = vec![Some(Stage::Unmasking); 10];
    drop_at[0] = None;
    drop_at[1] = None;
    let r = check(4, &p, &drop_at);
    assert!(
        matches!(
            r.outcome,
            Err(RoundFailure::BelowThreshold { threshold: 3, .. })
        ),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.sent, [10, 10, 10, 2]);
}

#[test]
fn the_server_refuses_out_of_turn_and_malformed_messages() {
    let now = Instant::now();
    let p = params(5, 6, 2, 2, 16, 3);
    let mut server = SecAggServer::new(p.clone(), DEADLINES, 2, now).unwrap();
    let mut c = SecAggClient::new(p.clone(), 0, [1; 32]).unwrap();
    let adv = c.poll_transmit().unwrap();
    // Out of turn.
    let err = server
        .handle_message(now, 0, DeviceSecAgg::MaskedInput(vec![0; 3]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::OutOfOrder {
                stage: Stage::AdvertiseKeys,
                ..
            }
        ),
        "{err}"
    );
    // Not a device of the round.
    assert!(server.handle_message(now, 6, adv.clone()).is_err());
    server.handle_message(now, 0, adv.clone()).unwrap();
    // Twice.
    assert!(server.handle_message(now, 0, adv).is_err());
    // A small-order key.
    let bad = DeviceSecAgg::AdvertiseKeys(fedge_proto::secagg::msg::AdvertiseKeys {
        c_public: [0; 32],
        s_public: [7; 32],
    });
    assert_eq!(
        server.handle_message(now, 1, bad),
        Err(SecAggError::NonContributoryKey { peer: 1 })
    );
    // The device refuses an aggregator message out of turn.
    let err = c
        .handle_message(AggSecAgg::UnmaskRequest { survivors: vec![] })
        .unwrap_err();
    assert!(matches!(err, SecAggError::OutOfOrder { .. }), "{err}");
    // And parameters that do not hang together.
    assert!(
        SecAggServer::new(
            SecAggParams {
                threshold: 5,
                ..p.clone()
            },
            DEADLINES,
            2,
            now
        )
        .is_err()
    );
    assert!(SecAggServer::new(SecAggParams { bits: 4, ..p }, DEADLINES, 2, now).is_err());
}

/// A device that reveals made-up shares at unmasking (a modified binary)
/// does not spoil the round: the server rebuilds each secret from subsets
/// of its shares that agree (or that match the advertised mask key), and
/// the sum is still exactly the survivors' quantized sum. With dropouts
/// after the key exchange, mask keys are rebuilt too.
#[test]
fn a_device_revealing_made_up_shares_does_not_spoil_the_sum() {
    for seed in [3u64, 8, 21] {
        let p = SecAggParams {
            threshold: 3,
            ..params(seed, 16, 8, 3, 32, 12)
        };
        let mut drop_at = vec![None; 16];
        drop_at[2] = Some(Stage::MaskedInput);
        drop_at[9] = Some(Stage::MaskedInput);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let updates = random_updates(&mut rng, p.devices, p.dimension);
        let r = run_with_liar(&p, &drop_at, &updates, seed, Some(5));
        let o = r
            .outcome
            .as_ref()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(o.survivors.contains(&5), "seed {seed}");
        assert_eq!(o.sum, plain_sum(&r, &o.survivors, p.bits), "seed {seed}");
    }
}
