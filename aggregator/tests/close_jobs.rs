//! A round's close (the combiner's finish and contribution scoring) runs
//! off the coordinator's task: the coordinator hands out a close job and
//! takes its result back. On a simulated fleet with virtual time: what the
//! runs publish is what the inline close published (recorded runs), the
//! coordinator keeps answering while a close is out, and a close result
//! is applied once, to the round it was made for.

use crate::sim;

use std::time::Duration;

use fedge_aggregator::coordinator::{CoordinatorConfig, Event};
use fedge_aggregator::robust::CombineSpec;
use fedge_aggregator::scoring::{Evaluator, ScoreMethod, ScoringConfig};
use fedge_aggregator::strategy::BufferedSpec;
use fedge_proto::RejectCode;
use sim::{DeviceSpec, NetConfig, Sim};

const DIM: usize = 64;

/// The loss of `w` on example `k` is `|w - 1 - e_k|^2`.
struct Quadratic {
    n: usize,
}

impl Evaluator for Quadratic {
    fn len(&self) -> usize {
        self.n
    }
    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String> {
        let mut s = 0.0;
        for &k in indices {
            let off = 1.0 + 0.001 * ((k % 11) as f64 - 5.0);
            s += params
                .iter()
                .map(|&p| (f64::from(p) - off).powi(2))
                .sum::<f64>();
        }
        Ok(s / indices.len().max(1) as f64)
    }
}

fn specs(n: usize) -> Vec<DeviceSpec> {
    (0..n)
        .map(|i| {
            let mut s = DeviceSpec::new(0.01 * (i as f32 + 1.0), 10 + i as u64);
            s.train_time = Duration::from_millis(200 + 900 * i as u64 / n as u64);
            s.wobble = true;
            s.vector = Some((0..DIM).map(|j| 0.02 * ((i + j) % 7) as f32).collect());
            s
        })
        .collect()
}

fn scored_cfg(buffered: bool) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        devices_per_round: 5,
        over_selection: 1.0,
        min_devices: 3,
        rounds: 3,
        round_deadline: Duration::from_secs(30),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        scoring: ScoringConfig {
            validation_samples: 40,
            cost_budget: 0.0,
            reward_pool: 1000,
            method: ScoreMethod::Direct,
            ..ScoringConfig::default()
        },
        ..CoordinatorConfig::default()
    };
    c.strategy.combine = CombineSpec::TrimmedMean { trim: 0.2 };
    if buffered {
        c.min_devices = 1;
        c.versions_kept = 3;
        c.strategy.combine = CombineSpec::Mean;
        c.strategy.buffered = Some(BufferedSpec {
            max_staleness: 2,
            staleness_exponent: 0.5,
            concurrency: Some(4),
        });
    }
    c
}

fn scored_run(seed: u64, buffered: bool, close_time: Duration) -> Sim {
    let mut sim = Sim::new(seed, scored_cfg(buffered), NetConfig::default(), specs(7));
    sim.coord.set_evaluator(Box::new(Quadratic { n: 100 }));
    sim.closes.time = close_time;
    sim.run_to_end(Duration::from_secs(300));
    sim
}

fn versions(sim: &Sim) -> Vec<String> {
    sim.published().iter().map(|p| p.2.to_hex()).collect()
}

/// Every settled entry's device, score and reward, in order.
fn settled(sim: &Sim) -> Vec<(u64, String, Option<f64>, u64)> {
    sim.events
        .iter()
        .filter_map(|e| match e {
            Event::RoundSettled(s) => Some(s),
            _ => None,
        })
        .flat_map(|s| {
            s.entries
                .iter()
                .map(|e| (s.round_id, e.device.clone(), e.score, e.reward))
        })
        .collect()
}

/// Runs recorded before the close moved off the coordinator's task
/// (seed, FedBuff or not): the versions published and every settled
/// entry's reward, in order.
#[allow(clippy::type_complexity)]
const RECORDED: [(u64, bool, [&str; 3], [u64; 15]); 4] = [
    (
        3,
        false,
        [
            "800d67d1dc55797265038db59bc6dce987aa1fb2d8e8da64acfe6d5f692b9aae",
            "4c433c198485e1f9c489580fbcd885afb5afd8baf09f0fa6055e0859302848ed",
            "65844ac3af5d441494c0fa74e3df951dbc375dbd70677e979542bca956a4b671",
        ],
        [
            185, 208, 209, 200, 196, 214, 205, 191, 189, 199, 197, 187, 215, 212, 187,
        ],
    ),
    (
        3,
        true,
        [
            "24aff13ce451cbd4a1f2c322773479e963f9c61082ede71e097ea36944d55233",
            "12ae78ba7b5929f98ef9d95e993d00743bfcf097929cb135f531622bc2c583a0",
            "4df7b0705901e4adbdb2162649676c95e3f5715fc2a4782acc2cefbae9e97ddb",
        ],
        [
            186, 210, 202, 201, 199, 145, 217, 205, 205, 226, 155, 236, 228, 158, 220,
        ],
    ),
    (
        11,
        false,
        [
            "6863f5e1b13c294b6beda21518fd894c0e3b35b45cf96507154ec0df9516234b",
            "824466988321f7d9de0e996716a9fc45bcc91d3bd6951d0bd67ff4389ecc2147",
            "1ff11f569236c44d55deacbd5a566291ba3a0e608d3b1c2792fcbc7256ef77a2",
        ],
        [
            185, 198, 208, 209, 197, 215, 192, 195, 193, 203, 195, 192, 183, 213, 214,
        ],
    ),
    (
        11,
        true,
        [
            "0b68534c51ff659c3ef477e839aec0eed637ab76cc77fa9e85073a7677c26b8e",
            "46073f183cbe59c1f330e39d22508b87ec08f727d4c4b598e9914806f1e60150",
            "4bccd86ea62fbde92a12af705001d0f7fea7b94ca249b8fd3821fda41aa1b8d9",
        ],
        [
            208, 209, 196, 200, 185, 159, 242, 157, 220, 219, 156, 150, 227, 215, 250,
        ],
    ),
];

/// A close job answered at once is the inline close: the same models
/// published and the same rewards as the recorded runs (a robust
/// combiner and scoring; synchronous rounds and FedBuff buffers).
#[test]
fn a_close_answered_at_once_publishes_what_the_inline_close_did() {
    for (seed, buffered, models, rewards) in RECORDED {
        let sim = scored_run(seed, buffered, Duration::ZERO);
        assert_eq!(versions(&sim), models, "seed {seed} buffered {buffered}");
        let paid: Vec<u64> = settled(&sim).iter().map(|s| s.3).collect();
        assert_eq!(paid, rewards, "seed {seed} buffered {buffered}");
    }
}

/// With the close taking virtual time off the coordinator's task, the
/// runs still publish every round, each settled before its publication,
/// and a round's close answered later settles the same updates.
#[test]
fn a_close_off_task_publishes_every_round() {
    for seed in [3u64, 11] {
        for buffered in [false, true] {
            let sim = scored_run(seed, buffered, Duration::from_millis(400));
            let published = sim.published();
            assert_eq!(published.len(), 3, "seed {seed} buffered {buffered}");
            assert_eq!(settled(&sim).len(), 15, "seed {seed} buffered {buffered}");
            assert_eq!(sim.closes.wall.len(), 3, "seed {seed}: one job a round");
            assert!(sim.coord.is_finished(), "seed {seed}");
        }
    }
}

/// While a close is out (here 3 s of virtual time) the coordinator
/// answers everyone else: devices asking for a task are paced away,
/// connections authenticated, heartbeats answered, a late upload of the
/// closing round refused as late; the next round opens once the close
/// is back.
#[test]
fn the_coordinator_serves_other_sessions_while_a_close_is_out() {
    for seed in [3u64, 11] {
        let mut cfg = scored_cfg(false);
        cfg.over_selection = 1.4;
        let mut specs = specs(9);
        for s in &mut specs {
            s.session.heartbeat_interval = Duration::from_millis(500);
        }
        let mut sim = Sim::new(seed, cfg, NetConfig::default(), specs);
        sim.coord.set_evaluator(Box::new(Quadratic { n: 100 }));
        sim.closes.time = Duration::from_secs(3);
        sim.run_to_end(Duration::from_secs(300));
        assert_eq!(sim.published().len(), 3, "seed {seed}");
        let sent = &sim.closes.sent;
        eprintln!("seed {seed}: sent while closing: {sent:?}");
        for name in ["NoTask", "HeartbeatAck"] {
            assert!(sent.contains(&name), "seed {seed}: no {name} while closing");
        }
        assert!(
            sim.rejection_details(RejectCode::RoundClosed)
                .iter()
                .any(|d| d.contains("is closing")),
            "seed {seed}: a late upload refused while its round closed"
        );
    }
}

/// A close result is applied once, to the round it was made for: the
/// same result again, or one for an earlier round (from an identical
/// coordinator), changes nothing; the right one then publishes.
#[test]
fn a_close_result_applies_once_and_only_to_its_round() {
    let seed = 5;
    let holding = || {
        let mut sim = Sim::new(seed, scored_cfg(false), NetConfig::default(), specs(7));
        sim.coord.set_evaluator(Box::new(Quadratic { n: 100 }));
        sim.closes.hold = true;
        sim.run_until(Duration::from_secs(120), |s| !s.closes.held.is_empty());
        sim
    };
    let mut a = holding();
    let mut twin = holding();
    let mut other = holding();
    let job = a.closes.held.pop().expect("round 1's close");
    assert_eq!((job.round_id(), a.coord.round_id()), (1, 1));
    let before = a.coord.published_rounds();
    let now = a.now;
    a.coord.handle_closed(now, job.run());
    assert_eq!(a.coord.round_id(), 2);
    assert_eq!(a.coord.published_rounds(), before + 1);
    let version = a.coord.current_version();
    // The same round's result again (its twin's): ignored.
    let again = twin.closes.held.pop().expect("twin's round 1").run();
    a.coord.handle_closed(now, again);
    assert_eq!(
        (a.coord.round_id(), a.coord.current_version()),
        (2, version)
    );
    assert_eq!(a.coord.published_rounds(), before + 1);
    // Round 2 closing: round 1's result is not its.
    a.run_until(Duration::from_secs(120), |s| !s.closes.held.is_empty());
    let job2 = a.closes.held.pop().expect("round 2's close");
    assert_eq!(job2.round_id(), 2);
    let stale = other.closes.held.pop().expect("round 1").run();
    let now = a.now;
    a.coord.handle_closed(now, stale);
    assert_eq!(
        (a.coord.round_id(), a.coord.current_version()),
        (2, version)
    );
    a.coord.handle_closed(now, job2.run());
    assert_eq!(a.coord.round_id(), 3);
    assert_eq!(a.coord.published_rounds(), before + 2);
    assert_ne!(a.coord.current_version(), version);
}
