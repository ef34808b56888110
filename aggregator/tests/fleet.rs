//! Protocol behaviour on a simulated fleet (no sockets, virtual time):
//! over-selection, deadlines, minimum-participant aborts, late updates,
//! dropouts mid-download and mid-upload with resume, and message loss.

use crate::sim;

use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::strategy::BufferedSpec;
use fedge_device::session::{DeviceEvent, Status};
use fedge_proto::RejectCode;
use sim::{DeviceSpec, DropAt, NetConfig, Sim};

const SEEDS: [u64; 3] = [1, 7, 42];

fn cfg(per_round: usize, min: usize, rounds: u64) -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round: per_round,
        over_selection: 1.3,
        min_devices: min,
        rounds,
        round_deadline: Duration::from_secs(10),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        ..CoordinatorConfig::default()
    }
}

fn specs(n: usize) -> Vec<DeviceSpec> {
    (0..n)
        .map(|i| DeviceSpec::new(0.01 * (i as f32 + 1.0), 10 + i as u64))
        .collect()
}

/// Every published model equals the previous one plus the sample-weighted
/// mean of that round's accepted deltas (checked against a naive recomputation).
fn check_aggregates(sim: &Sim, initial: &[f32]) {
    let mut expected: Vec<f64> = initial.iter().map(|&v| f64::from(v)).collect();
    for (round, _, _) in sim.published() {
        let d = sim.expected_round_delta(round);
        for e in &mut expected {
            *e += d;
        }
    }
    let got = &sim.coord.current_model().params.values;
    for (g, e) in got.iter().zip(&expected) {
        assert!(
            (f64::from(*g) - e).abs() < 1e-4,
            "seed {}: aggregate {g} != expected {e}",
            sim.seed
        );
    }
}

#[test]
fn over_selection_closes_rounds_at_target() {
    for seed in SEEDS {
        let initial = sim::model(64).params.values;
        let mut sim = Sim::new(seed, cfg(10, 5, 3), NetConfig::default(), specs(20));
        sim.run_to_end(Duration::from_secs(120));
        let published = sim.published();
        assert_eq!(published.len(), 3, "seed {seed}");
        for (round, accepted, _) in &published {
            assert_eq!(*accepted, 10, "seed {seed}: round {round} closed at target");
        }
        assert!(sim.aborted().is_empty(), "seed {seed}");
        // 13 selected, 10 needed: the 3 stragglers are refused as late.
        let late = sim
            .rejections()
            .iter()
            .filter(|c| **c == RejectCode::RoundClosed)
            .count();
        assert_eq!(late, 3 * 3, "seed {seed}: late updates rejected");
        for i in 0..sim.device_count() {
            assert_eq!(sim.device_status(i), Status::Done, "seed {seed} device {i}");
            let finished = sim.device_events(i).iter().any(|e| {
                matches!(e, DeviceEvent::Finished { version, .. } if *version == sim.coord.current_version())
            });
            assert!(finished, "seed {seed}: device {i} fetched the final model");
        }
        check_aggregates(&sim, &initial);
    }
}

#[test]
fn deadline_aggregates_what_arrived_when_enough() {
    for seed in SEEDS {
        // 4 fast devices, 6 that always miss the 10 s deadline.
        let mut s = specs(10);
        for d in s.iter_mut().skip(4) {
            d.train_time = Duration::from_secs(30);
        }
        let initial = sim::model(64).params.values;
        let mut sim = Sim::new(seed, cfg(8, 3, 2), NetConfig::default(), s);
        sim.run_until(Duration::from_secs(300), |s| s.published().len() == 2);
        for (round, accepted, _) in sim.published() {
            assert_eq!(
                accepted, 4,
                "seed {seed}: round {round} aggregated the 4 on time"
            );
        }
        check_aggregates(&sim, &initial);
    }
}

#[test]
fn too_few_updates_abort_the_round_and_keep_the_model() {
    for seed in SEEDS {
        let mut s = specs(6);
        for d in s.iter_mut().skip(2) {
            d.train_time = Duration::from_secs(60);
        }
        let mut sim = Sim::new(seed, cfg(5, 3, 2), NetConfig::default(), s);
        let v0 = sim.coord.current_version();
        sim.run_until(Duration::from_secs(100), |s| !s.aborted().is_empty());
        let (round, accepted) = sim.aborted()[0];
        assert_eq!((round, accepted), (1, 2), "seed {seed}");
        assert_eq!(
            sim.coord.current_version(),
            v0,
            "seed {seed}: model unchanged"
        );
        assert_eq!(
            sim.coord.round_id(),
            2,
            "seed {seed}: round retried as round 2"
        );
        assert!(sim.published().is_empty());
    }
}

#[test]
fn late_updates_are_rejected_and_the_device_carries_on() {
    for seed in SEEDS {
        // Device 0 is slow: selected in round 1 but finishes after it closed.
        let mut s = specs(8);
        s[0].train_time = Duration::from_secs(4);
        let mut sim = Sim::new(seed, cfg(4, 2, 2), NetConfig::default(), s);
        sim.run_to_end(Duration::from_secs(120));
        assert_eq!(sim.published().len(), 2, "seed {seed}");
        let dev0_rejects: Vec<RejectCode> = sim
            .device_events(0)
            .iter()
            .filter_map(|e| match e {
                DeviceEvent::Rejected { code, .. } => Some(*code),
                _ => None,
            })
            .collect();
        assert!(
            dev0_rejects.contains(&RejectCode::RoundClosed),
            "seed {seed}: slow device told its update is late: {dev0_rejects:?}"
        );
        assert_eq!(sim.device_status(0), Status::Done, "seed {seed}");
    }
}

#[test]
fn interrupted_download_resumes_from_the_missing_chunk() {
    for seed in SEEDS {
        // A 4 KiB model in 128-byte chunks: 33+ chunks.
        let mut s = specs(4);
        s[1].drop = Some((DropAt::DownloadChunks(5), Duration::from_secs(2)));
        let mut sim = Sim::with_model(
            seed,
            cfg(4, 4, 1),
            NetConfig::default(),
            s,
            sim::model(1024),
        );
        sim.run_to_end(Duration::from_secs(120));
        assert_eq!(sim.published().len(), 1, "seed {seed}");
        assert_eq!(
            sim.published()[0].1,
            4,
            "seed {seed}: the dropped device contributed"
        );
        // Round model download + final model download, resumed rather than restarted.
        let chunks: usize = 4 * 1024 + 100;
        let per_model = chunks.div_ceil(128);
        assert!(sim.was_dropped(1), "seed {seed}: the drop happened");
        let normal = sim.chunk_requests(0);
        let dropped = sim.chunk_requests(1);
        assert!(
            dropped < normal + per_model / 2,
            "seed {seed}: dropped device requested {dropped} chunks, a clean one {normal}"
        );
    }
}

#[test]
fn interrupted_upload_resumes_where_the_aggregator_stopped() {
    for seed in SEEDS {
        let mut s = specs(3);
        for d in &mut s {
            d.session.upload_chunk_bytes = 256;
        }
        s[2].drop = Some((DropAt::UploadChunks(6), Duration::from_secs(3)));
        let mut sim = Sim::with_model(
            seed,
            cfg(3, 3, 1),
            NetConfig::default(),
            s,
            sim::model(1024),
        );
        sim.run_to_end(Duration::from_secs(120));
        assert_eq!(sim.published().len(), 1, "seed {seed}");
        assert_eq!(sim.published()[0].1, 3, "seed {seed}");
        assert!(sim.was_dropped(2), "seed {seed}: the drop happened");
        let normal = sim.upload_chunk_msgs(0);
        let dropped = sim.upload_chunk_msgs(2);
        // A restart would resend all chunks; a resume only those after 6.
        assert!(
            dropped < normal + 6,
            "seed {seed}: dropped device sent {dropped} chunk messages, a clean one {normal}"
        );
    }
}

#[test]
fn rounds_complete_through_loss_and_jitter() {
    for seed in SEEDS {
        let net = NetConfig {
            latency: std::time::Duration::from_millis(50),
            jitter: std::time::Duration::from_millis(100),
            loss: 0.1,
            rto: std::time::Duration::from_millis(300),
        };
        let initial = sim::model(64).params.values;
        let mut sim = Sim::new(seed, cfg(6, 3, 3), net, specs(12));
        sim.run_to_end(Duration::from_secs(300));
        assert_eq!(sim.published().len(), 3, "seed {seed}");
        check_aggregates(&sim, &initial);
    }
}

#[test]
fn stake_weights_and_share_caps_shape_the_aggregate() {
    use fedge_aggregator::weighting::{Transform, WeightPolicy};
    for seed in SEEDS {
        // A whale with stake 100 pushing +1, three small holders pushing 0.
        let mut s = specs(4);
        for (i, d) in s.iter_mut().enumerate() {
            d.delta = if i == 0 { 1.0 } else { 0.0 };
            d.samples = 10;
        }
        let mut c = cfg(4, 4, 1);
        c.weights = WeightPolicy {
            stake: Transform::Linear,
            samples: Transform::Constant,
            min_stake: 1.0,
            max_share: 0.5,
            allow_unknown: false,
            ..WeightPolicy::default()
        };
        let mut sim = Sim::new(seed, c, NetConfig::default(), s);
        let stakes: std::collections::HashMap<String, f64> = (0..4)
            .map(|i| (sim.device_id(i), if i == 0 { 100.0 } else { 1.0 }))
            .collect();
        sim.coord.set_stakes(Box::new(stakes));
        let before = sim.coord.current_model().params.values.clone();
        sim.run_to_end(Duration::from_secs(60));
        // Uncapped the whale would own 100/103 of the round; capped, 1/2.
        let after = &sim.coord.current_model().params.values;
        for (a, b) in after.iter().zip(&before) {
            assert!(
                (a - b - 0.5).abs() < 1e-5,
                "seed {seed}: moved by {}",
                a - b
            );
        }
        let contributions = sim.contributions();
        assert_eq!(contributions.len(), 4);
        let whale = contributions
            .iter()
            .find(|c| c.device == sim.device_id(0))
            .unwrap();
        assert!(
            (whale.share - 0.5).abs() < 1e-9 && whale.raw_weight == 100.0,
            "{whale:?}"
        );
    }
}

#[test]
fn unregistered_devices_are_not_selected_and_oversized_updates_are_refused() {
    use fedge_aggregator::weighting::WeightPolicy;
    for seed in SEEDS {
        let mut s = specs(4);
        s[3].delta = 50.0; // norm 50 * sqrt(64) = 400
        let mut c = cfg(2, 2, 1);
        c.weights = WeightPolicy {
            allow_unknown: false,
            ..WeightPolicy::default()
        };
        c.update_norm_max = Some(10.0);
        c.round_deadline = Duration::from_secs(5);
        let mut sim = Sim::new(seed, c, NetConfig::default(), s);
        // Device 2 is not in the registry.
        let stakes: std::collections::HashMap<String, f64> =
            [0, 1, 3].iter().map(|&i| (sim.device_id(i), 1.0)).collect();
        sim.coord.set_stakes(Box::new(stakes));
        sim.run_until(Duration::from_secs(60), |s| !s.published().is_empty());
        let rejected = sim.rejections();
        assert!(
            rejected.contains(&RejectCode::NotSelected),
            "seed {seed}: {rejected:?}"
        );
        let refused: Vec<_> = sim
            .contributions()
            .into_iter()
            .filter(|c| !c.accepted)
            .collect();
        for r in &refused {
            assert_eq!(r.device, sim.device_id(3), "seed {seed}");
            assert!(
                r.reason.as_deref().unwrap_or("").starts_with("norm_bound"),
                "{r:?}"
            );
        }
        let accepted: Vec<String> = sim
            .contributions()
            .into_iter()
            .filter(|c| c.accepted)
            .map(|c| c.device)
            .collect();
        assert!(
            !accepted.contains(&sim.device_id(2)),
            "seed {seed}: unregistered device took part"
        );
    }
}

#[test]
fn devices_holding_the_last_model_download_a_smaller_delta() {
    for seed in SEEDS {
        let rounds = 4;
        let mut sim = Sim::with_model(
            seed,
            cfg(3, 3, rounds),
            NetConfig::default(),
            specs(3),
            sim::model(2048),
        );
        sim.run_to_end(Duration::from_secs(300));
        assert_eq!(sim.published().len(), rounds as usize, "seed {seed}");
        let model_bytes = sim.coord.current_model().encode().len();
        let full_chunks = model_bytes.div_ceil(128);
        for i in 0..3 {
            // Full downloads would cost (rounds + 1) x full_chunks requests.
            let asked = sim.chunk_requests(i);
            assert!(
                asked < (rounds as usize + 1) * full_chunks * 3 / 4,
                "seed {seed} device {i}: {asked} chunk requests, a full model is {full_chunks}"
            );
            let last = sim.device_events(i).iter().rev().find_map(|e| match e {
                DeviceEvent::Finished { model, .. } => Some(model.clone()),
                _ => None,
            });
            assert_eq!(
                last.unwrap().encode(),
                sim.coord.current_model().encode(),
                "seed {seed}: bit-exact final model"
            );
        }
    }
}

fn fedbuff(per_round: usize, rounds: u64, max_staleness: u64) -> CoordinatorConfig {
    let mut c = cfg(per_round, 1, rounds);
    c.versions_kept = max_staleness as usize + 1;
    c.strategy.buffered = Some(BufferedSpec {
        max_staleness,
        staleness_exponent: 0.5,
        concurrency: Some(8),
    });
    c
}

/// Devices from 0.2 s to 3.2 s per task: fast ones lap slow ones.
fn mixed_speed_specs(n: usize) -> Vec<DeviceSpec> {
    (0..n)
        .map(|i| {
            let mut s = DeviceSpec::new(0.01 * (i as f32 + 1.0), 10 + i as u64);
            s.train_time = Duration::from_millis(200 + 3000 * i as u64 / n as u64);
            s
        })
        .collect()
}

#[test]
fn fedbuff_publishes_every_k_updates_with_staleness_discounted_weights() {
    for seed in SEEDS {
        let initial = sim::model(64).params.values;
        let mut sim = Sim::new(
            seed,
            fedbuff(4, 8, 3),
            NetConfig::default(),
            mixed_speed_specs(12),
        );
        sim.run_to_end(Duration::from_secs(300));
        let published = sim.published();
        assert_eq!(published.len(), 8, "seed {seed}");
        for (round, accepted, _) in &published {
            assert_eq!(*accepted, 4, "seed {seed}: buffer {round} publishes at K");
        }
        let accepted = sim.accepted();
        // No round barrier: stale updates (trained on an older version) are
        // accepted, and devices train again as soon as their update is in.
        assert!(
            accepted.iter().any(|(_, _, s)| *s > 0),
            "seed {seed}: no stale update was accepted: {accepted:?}"
        );
        assert!(accepted.iter().all(|(_, _, s)| *s <= 3), "seed {seed}");
        let fastest = sim.device_id(0);
        let by_fastest = accepted.iter().filter(|(_, d, _)| *d == fastest).count();
        assert!(
            by_fastest >= 3,
            "seed {seed}: the fastest device contributed {by_fastest} times"
        );
        // Every version = previous + the staleness-discounted weighted mean.
        check_aggregates(&sim, &initial);
    }
}

#[test]
fn fedbuff_rejects_updates_beyond_the_staleness_bound() {
    for seed in SEEDS {
        let mut sim = Sim::new(
            seed,
            fedbuff(2, 6, 0),
            NetConfig::default(),
            mixed_speed_specs(8),
        );
        sim.run_to_end(Duration::from_secs(300));
        assert_eq!(sim.published().len(), 6, "seed {seed}");
        assert!(
            sim.accepted().iter().all(|(_, _, s)| *s == 0),
            "seed {seed}"
        );
        let stale = sim
            .rejections()
            .iter()
            .filter(|c| **c == RejectCode::RoundClosed)
            .count();
        assert!(
            stale > 0,
            "seed {seed}: slow devices' stale updates refused"
        );
    }
}

#[test]
fn fedbuff_config_needs_the_versions_its_staleness_window_reaches() {
    let mut c = fedbuff(2, 2, 3);
    c.versions_kept = 3;
    let err = c.validate().unwrap_err();
    assert!(err.contains("versions_kept must be at least 4"), "{err}");
}

/// Admission control: 120 devices connect at the same instant to an
/// aggregator that completes 10 authentications a second and gives each
/// 2 s. Ten authenticate at once; the other 110 are paced away before
/// they authenticate, each told a window further out the later it came
/// (its place in a queue served at the handshake rate). Nobody's
/// authentication times out, both rounds publish and every device
/// finishes.
#[test]
fn a_connection_burst_is_paced_not_timed_out() {
    for seed in SEEDS {
        let cfg = CoordinatorConfig {
            handshakes_per_sec: 10.0,
            auth_timeout: Duration::from_secs(2),
            ..cfg(10, 5, 2)
        };
        let mut sim = Sim::new(seed, cfg, NetConfig::default(), specs(120));
        sim.run_to_end(Duration::from_secs(600));
        let paced = sim.rejection_details(RejectCode::TooManyDevices);
        assert!(paced.len() >= 110, "seed {seed}: {} paced", paced.len());
        // The burst's windows start 100 ms apart, after the ten admitted.
        let starts: Vec<u64> = paced
            .iter()
            .take(110)
            .map(|d| {
                let window = d.rsplit("come back in ").next().unwrap();
                window.split("..").next().unwrap().parse().unwrap()
            })
            .collect();
        let expected: Vec<u64> = (0..110).map(|k| (10 + k) * 100).collect();
        assert_eq!(starts, expected, "seed {seed}");
        assert!(
            !sim.rejection_details(RejectCode::DeadlinePassed)
                .iter()
                .any(|d| d.contains("authentication timed out")),
            "seed {seed}: authentication timed out"
        );
        assert_eq!(sim.published().len(), 2, "seed {seed}");
        for i in 0..sim.device_count() {
            assert_eq!(
                sim.device_status(i),
                Status::Done,
                "seed {seed}: device {i}"
            );
        }
    }
}

/// Uploads that complete together wait for a payload-check slot: the
/// coordinator never has more than `verify_in_flight_max` checks out
/// (and here reaches it), and every update is still checked, made
/// durable, combined and acknowledged.
#[test]
fn payload_checks_stay_within_their_bound_when_uploads_complete_together() {
    for seed in SEEDS {
        let mut c = cfg(24, 24, 1);
        c.verify_in_flight_max = 2;
        c.over_selection = 1.0;
        let net = NetConfig {
            jitter: Duration::ZERO,
            ..NetConfig::default()
        };
        let mut sim = Sim::new(seed, c, net, specs(24));
        sim.run_to_end(Duration::from_secs(60));
        assert_eq!(
            sim.verify_out_max, 2,
            "seed {seed}: bound reached, never passed"
        );
        let published = sim.published();
        assert_eq!(published.len(), 1, "seed {seed}");
        assert_eq!(published[0].1, 24, "seed {seed}: every update combined");
        assert_eq!(sim.persisted, 24, "seed {seed}");
        assert_eq!(sim.coord.verify_backlog(), (0, 0), "seed {seed}");
    }
}
