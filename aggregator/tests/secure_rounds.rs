//! Rounds combined with SecAgg+ through the coordinator and real device
//! sessions (sans-IO, virtual time; the protocol itself over real QUIC is
//! `secagg_quic.rs`): devices drawn together at the window's end, their
//! indices fixed by the aggregator, dropouts at every stage, the
//! published model the survivors' mean, failures recorded, and nothing
//! sent in the clear accepted.

use crate::sim;

use std::collections::BTreeSet;
use std::time::Duration;

use fedge_aggregator::coordinator::{CoordinatorConfig, Event};
use fedge_aggregator::privacy::secagg::{SecAggDp, SecAggSpec};
use fedge_aggregator::strategy::StrategyConfig;
use fedge_proto::msg::TrainingPlan;
use fedge_proto::secagg::Stage;
use sim::{DeviceSpec, NetConfig, Sim};

fn spec() -> SecAggSpec {
    SecAggSpec {
        colluding_devices: 1,
        degree: 8,
        threshold: 3,
        bits: 32,
        clip: 10.0,
        survivors_min: 4,
        advertise_keys_ms: 2_000,
        share_keys_ms: 2_000,
        masked_input_ms: 8_000,
        unmasking_ms: 2_000,
        dp: None,
    }
}

fn cfg(per_round: usize, rounds: u64) -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round: per_round,
        over_selection: 1.0,
        min_devices: 2,
        rounds,
        round_deadline: Duration::from_secs(20),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        plan: TrainingPlan {
            codec: "dense-f32".into(),
            ..TrainingPlan::default()
        },
        strategy: StrategyConfig {
            secagg: Some(spec()),
            ..StrategyConfig::default()
        },
        ..CoordinatorConfig::default()
    }
}

/// Device i sends delta 0.01 (i + 1) in every coordinate; `drop` deals
/// the stage each device goes silent after.
fn fleet(n: usize, drop: impl Fn(usize) -> Option<Stage>) -> Vec<DeviceSpec> {
    (0..n)
        .map(|i| {
            let mut s = DeviceSpec::new(0.01 * (i as f32 + 1.0), 10 + i as u64);
            s.session.secagg_drop_after = drop(i);
            s
        })
        .collect()
}

/// The devices whose updates a round's published sum holds.
fn survivors(sim: &Sim, round: u64) -> BTreeSet<String> {
    sim.contributions()
        .into_iter()
        .filter(|c| c.round_id == round && c.accepted)
        .map(|c| c.device)
        .collect()
}

#[test]
fn secure_rounds_survive_dropouts_at_every_stage_and_publish_the_survivors_mean() {
    for seed in [1u64, 7, 42] {
        // 12 of 12 drawn: 3 drop after their keys, 1 after its shares, 1
        // after its masked input (which stays in the sum: its self mask
        // is rebuilt from its neighbours' shares).
        let drop = |i: usize| match i {
            0..=2 => Some(Stage::AdvertiseKeys),
            3 => Some(Stage::ShareKeys),
            4 => Some(Stage::MaskedInput),
            _ => None,
        };
        let specs = fleet(12, drop);
        let deltas: Vec<f32> = specs.iter().map(|s| s.delta).collect();
        let initial = sim::model(64).params.values;
        let mut sim = Sim::new(seed, cfg(12, 2), NetConfig::default(), specs);
        sim.run_to_end(Duration::from_secs(300));
        let published = sim.published();
        assert_eq!(published.len(), 2, "seed {seed}: {:?}", sim.aborted());
        let ids: Vec<String> = (0..12).map(|i| sim.device_id(i)).collect();
        let mut expected: Vec<f64> = initial.iter().map(|&v| f64::from(v)).collect();
        for (round, accepted, _) in &published {
            let s = survivors(&sim, *round);
            // Every device that sent its masked input, and no other.
            let want: BTreeSet<String> = ids[4..].iter().cloned().collect();
            assert_eq!(s, want, "seed {seed} round {round}");
            assert_eq!(*accepted, 8, "seed {seed} round {round}");
            let mean = ids
                .iter()
                .zip(&deltas)
                .filter(|(id, _)| s.contains(*id))
                .map(|(_, d)| f64::from(*d))
                .sum::<f64>()
                / s.len() as f64;
            for e in &mut expected {
                *e += mean;
            }
            // The dropouts are recorded, with why.
            let dropped: Vec<_> = sim
                .contributions()
                .into_iter()
                .filter(|c| c.round_id == *round && !c.accepted)
                .collect();
            assert_eq!(dropped.len(), 4, "seed {seed} round {round}");
            assert!(
                dropped.iter().all(|c| c
                    .reason
                    .as_deref()
                    .unwrap_or("")
                    .contains("dropped out of secure aggregation")),
                "seed {seed}: {dropped:?}"
            );
        }
        // Exact in the ring; the float mean is within the quantization
        // step (clip 10 over 2^31 / 12 levels) of the plain mean.
        let got = &sim.coord.current_model().params.values;
        for (g, e) in got.iter().zip(&expected) {
            assert!(
                (f64::from(*g) - e).abs() < 1e-5,
                "seed {seed}: published {g}, survivors' mean gives {e}"
            );
        }
        let summed: Vec<_> = sim
            .events
            .iter()
            .filter_map(|e| match e {
                Event::SecureAggregated {
                    completed,
                    survivors,
                    upload_bytes,
                    ..
                } => Some((*completed, *survivors, *upload_bytes)),
                _ => None,
            })
            .collect();
        assert_eq!(summed.len(), 2, "seed {seed}");
        for (completed, survivors, upload_bytes) in summed {
            assert_eq!(completed[..3], [12, 9, 8], "seed {seed}");
            assert_eq!(survivors, 8, "seed {seed}");
            // 8 masked inputs of 64 values at 4 bytes, plus the rest.
            assert!(upload_bytes > 8 * 64 * 4, "seed {seed}: {upload_bytes}");
        }
    }
}

#[test]
fn too_few_survivors_abort_the_round_cleanly_and_the_federation_goes_on() {
    // 7 of 10 drop after their keys: 3 left, survivors_min 4. Every round
    // fails and is recorded; nothing is published and nothing panics.
    let specs = fleet(10, |i| (i < 7).then_some(Stage::AdvertiseKeys));
    let initial = sim::model(64).params.values;
    let mut sim = Sim::new(3, cfg(10, 2), NetConfig::default(), specs);
    sim.run_until(Duration::from_secs(120), |s| s.aborted().len() >= 2);
    assert!(sim.published().is_empty());
    assert_eq!(sim.coord.current_model().params.values, initial);
    let failures = sim.rejection_details(fedge_proto::RejectCode::NotSelected);
    assert!(
        failures
            .iter()
            .any(|d| d.contains("secure aggregation failed") && d.contains("3 devices left")),
        "{failures:?}"
    );
    let recorded = sim
        .contributions()
        .into_iter()
        .filter(|c| !c.accepted && c.reason.as_deref().unwrap_or("").contains("failed"))
        .count();
    assert!(
        recorded >= 20,
        "every drawn device, every round: {recorded}"
    );
}

#[test]
fn a_round_waits_for_enough_devices_rather_than_run_a_revealing_sum() {
    // 3 devices, survivors_min 4: the window keeps extending; no offer
    // goes out and no round runs.
    let mut sim = Sim::new(5, cfg(10, 1), NetConfig::default(), fleet(3, |_| None));
    sim.run_until(Duration::from_secs(40), |s| {
        s.now - s.t0 >= Duration::from_secs(30)
    });
    assert!(sim.published().is_empty() && sim.aborted().is_empty());
    assert!(
        !sim.events
            .iter()
            .any(|e| matches!(e, Event::DeviceSelected { .. })),
        "nobody is drawn into a round that cannot hide them"
    );
}

#[test]
fn distributed_dp_noises_the_sum_as_calibrated_and_reports_what_it_spent() {
    // 10 devices, none dropping; z = 0.5 over survivors_min - colluding =
    // 3, so each device adds Sk(mu_total / 3) and the sum carries 10/3 of
    // mu_total.
    let dim = 4096;
    let z = 0.5;
    let mut c = cfg(10, 2);
    let mut s = spec();
    s.dp = Some(SecAggDp {
        noise_multiplier: z,
        delta: 1e-5,
    });
    c.strategy.secagg = Some(s.clone());
    let specs = fleet(10, |_| None);
    let deltas: Vec<f32> = specs.iter().map(|s| s.delta).collect();
    let mut sim = Sim::with_model(9, c, NetConfig::default(), specs, sim::model(dim));
    let initial = sim.coord.current_model().params.values.clone();
    sim.run_until(Duration::from_secs(120), |s| s.published().len() == 1);
    let mean = deltas.iter().map(|d| f64::from(*d)).sum::<f64>() / 10.0;
    let got = &sim.coord.current_model().params.values;
    let err: Vec<f64> = got
        .iter()
        .zip(&initial)
        .map(|(g, i)| f64::from(*g) - f64::from(*i) - mean)
        .collect();
    let sd = (err.iter().map(|e| e * e).sum::<f64>() / dim as f64).sqrt();
    // The calibration, recomputed: Delta2 = s clip + sqrt(d) in ring units,
    // variance of the sum 10/3 (z Delta2)^2, read back as / (s x 10).
    let params = fedge_proto::secagg::SecAggParams {
        round: 1,
        seed: [0; 32],
        devices: 10,
        degree: s.degree,
        threshold: s.threshold,
        bits: s.bits,
        clip: s.clip,
        dimension: dim as u32,
        noise: Some(fedge_proto::secagg::DistributedNoise {
            multiplier: z,
            survivors: s.survivors_min - s.colluding_devices,
        }),
    };
    let scale = params.quantizer().unwrap().scale();
    let (_, l2) = params.sensitivity().unwrap();
    let want = (10.0f64 / 3.0).sqrt() * z * l2 / (scale * 10.0);
    assert!(
        (sd / want - 1.0).abs() < 0.1,
        "noise stddev on the mean {sd}, calibrated {want}"
    );
    // The round reports what it spent: one unsampled Skellam release at
    // z = 0.5 is far from private (a Gaussian at z = 0.5 gives about 10).
    let metrics = sim
        .events
        .iter()
        .find_map(|e| match e {
            Event::RoundClosed { metrics, .. } => Some(metrics.clone()),
            _ => None,
        })
        .unwrap();
    let get = |k: &str| metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    let eps = get("dp_epsilon").expect("epsilon reported");
    assert!(eps > 5.0 && eps < 20.0, "epsilon {eps}");
    assert_eq!(get("dp_rounds"), Some(1.0));
    assert_eq!(get("dp_delta"), Some(1e-5));
    let rho = get("dp_rho_zcdp").unwrap();
    assert!((rho - 1.0 / (2.0 * z * z)).abs() < 1e-3, "rho {rho}");
}

#[test]
fn a_device_that_does_not_clip_gets_no_round_published() {
    // One modified binary adds 2^29 (about 20 update units) to every value it masks: in the ring,
    // so nothing refuses the message; the sum's norm gives it away.
    for seed in [2u64, 11] {
        let mut specs = fleet(8, |_| None);
        specs[5].tamper_masked_input = Some(1 << 29);
        let initial = sim::model(64).params.values;
        let mut sim = Sim::new(seed, cfg(8, 1), NetConfig::default(), specs);
        sim.run_until(Duration::from_secs(120), |s| !s.aborted().is_empty());
        assert!(sim.published().is_empty(), "seed {seed}");
        assert_eq!(sim.coord.current_model().params.values, initial);
        let why = sim.rejection_details(fedge_proto::RejectCode::NormBound);
        assert!(
            why.iter().any(|d| d.contains("a device did not clip")),
            "seed {seed}: {why:?}"
        );
    }
    // The same fleet, all honest, publishes (the bound is not too tight).
    let mut sim = Sim::new(2, cfg(8, 1), NetConfig::default(), fleet(8, |_| None));
    sim.run_until(Duration::from_secs(120), |s| s.published().len() == 1);
}

#[test]
fn a_secure_round_most_of_whose_devices_diverge_rolls_back() {
    // Round 1 publishes; from round 2 on, 6 of 8 devices' training
    // diverges (they abandon, reason Diverged): round 2 publishes the
    // version round 1 was built from again.
    let mut specs = fleet(8, |_| None);
    for s in specs.iter_mut().take(6) {
        s.diverge_from_round = Some(2);
    }
    let mut sim = Sim::new(4, cfg(8, 2), NetConfig::default(), specs);
    let v0 = sim.coord.current_version();
    sim.run_until(Duration::from_secs(120), |s| !s.rollbacks().is_empty());
    let rollbacks = sim.rollbacks();
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    let (round, _from, to) = rollbacks[0];
    assert_eq!((round, to), (2, v0));
    // Each device that gave up is recorded once, when it did.
    for i in 0..6 {
        let id = sim.device_id(i);
        let records = sim
            .contributions()
            .into_iter()
            .filter(|c| c.round_id == 2 && c.device == id)
            .count();
        assert_eq!(records, 1, "device {i}");
    }
}

#[test]
fn a_secure_round_outlasting_the_round_deadline_neither_spins_nor_closes_early() {
    // Stage waits (dropouts after keys and after input: 2 s each) take the
    // round past its 3 s deadline: the stages bound it, and the
    // coordinator's next timer is never an instant already past (the
    // simulation's step bound would catch a spin).
    let mut c = cfg(8, 2);
    c.round_deadline = Duration::from_secs(3);
    let drop = |i: usize| match i {
        0 => Some(Stage::AdvertiseKeys),
        1 => Some(Stage::MaskedInput),
        _ => None,
    };
    let mut sim = Sim::new(6, c, NetConfig::default(), fleet(8, drop));
    sim.run_until(Duration::from_secs(120), |s| s.published().len() == 2);
    assert!(sim.aborted().is_empty(), "{:?}", sim.aborted());
    assert!(sim.steps < 100_000, "{} steps", sim.steps);
}
