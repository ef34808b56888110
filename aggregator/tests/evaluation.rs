//! Federated evaluation on a simulated fleet (the real coordinator and
//! device sessions, virtual time): evaluation tasks go to devices the
//! round has no training slot for, their signed reports are combined when
//! the round closes, and liars claiming a perfect model on countless
//! examples move the result no further than the honest reports' range.

use crate::sim;

use std::collections::HashSet;
use std::time::Duration;

use fedge_aggregator::coordinator::{CoordinatorConfig, Event};
use fedge_aggregator::evaluation::EvaluationConfig;
use fedge_device::EvalOutput;
use fedge_device::session::DeviceEvent;
use sim::{DeviceSpec, NetConfig, Sim};

const SEEDS: [u64; 3] = [1, 7, 42];

fn cfg(evaluators: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round: 2,
        over_selection: 1.0,
        min_devices: 2,
        rounds: 3,
        round_deadline: Duration::from_secs(10),
        selection_window: Duration::from_secs(1),
        slot_timeout: Duration::from_secs(3),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        evaluation: EvaluationConfig {
            devices: evaluators,
            ..EvaluationConfig::default()
        },
        ..CoordinatorConfig::default()
    }
}

/// `honest` devices reporting accuracy 0.60, 0.61, ... and loss 1.0,
/// 1.1, ... on 100 examples, then `liars` claiming a perfect model on
/// u64::MAX examples.
fn fleet(honest: usize, liars: usize) -> Vec<DeviceSpec> {
    let mut specs: Vec<DeviceSpec> = (0..honest)
        .map(|i| DeviceSpec {
            eval: Some(EvalOutput {
                examples: 100,
                loss: 1.0 + 0.1 * i as f64,
                accuracy: 0.60 + 0.01 * i as f64,
            }),
            ..evaluator(DeviceSpec::new(0.01, 10))
        })
        .collect();
    specs.extend((0..liars).map(|_| DeviceSpec {
        eval: Some(EvalOutput {
            examples: u64::MAX,
            loss: 0.0,
            accuracy: 1.0,
        }),
        ..evaluator(DeviceSpec::new(0.01, 10))
    }));
    specs
}

/// `d`, keeping held-out data (its session takes evaluation tasks).
fn evaluator(mut d: DeviceSpec) -> DeviceSpec {
    d.session.evaluates = true;
    d
}

/// (round, device) of every training slot given.
fn trained(sim: &Sim) -> HashSet<(u64, String)> {
    sim.events
        .iter()
        .filter_map(|e| match e {
            Event::DeviceSelected { round_id, device } => Some((*round_id, device.clone())),
            _ => None,
        })
        .collect()
}

/// (round, device) of every evaluation report the aggregator recorded.
fn evaluated(sim: &Sim) -> HashSet<(u64, String)> {
    (0..sim.device_count())
        .flat_map(|i| {
            sim.device_events(i).iter().filter_map(move |e| match e {
                DeviceEvent::EvaluationAccepted { round_id } => Some((*round_id, sim.device_id(i))),
                _ => None,
            })
        })
        .collect()
}

/// 10 honest devices and 2 liars, 2 training slots and up to 10
/// evaluators a round: every round is evaluated by devices that did not
/// train in it, and the liars (at most 2 of the reports, equal weights on
/// the default weights: a claimed count buys nothing; trimmed 30% at each
/// end) leave the
/// result inside the honest reports' range.
#[test]
fn evaluation_tasks_go_to_devices_without_a_slot_and_liars_stay_bounded() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, cfg(10), NetConfig::default(), fleet(10, 2));
        sim.run_to_end(Duration::from_secs(120));
        assert_eq!(sim.published().len(), 3, "seed {seed}");
        let evals = sim.evaluations();
        assert_eq!(
            evals.iter().map(|e| e.round_id).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "seed {seed}"
        );
        for e in &evals {
            assert!(e.devices >= 5, "seed {seed}: {e:?}");
            let (acc, loss) = (e.accuracy.unwrap(), e.loss.unwrap());
            assert!((0.60..=0.69).contains(&acc), "seed {seed}: {e:?}");
            assert!((1.0..=1.9).contains(&loss), "seed {seed}: {e:?}");
            // One device, one weight: a claim of u64::MAX examples buys
            // nothing on the default weights.
            assert_eq!(e.weight, e.devices as f64, "seed {seed}: {e:?}");
        }
        let (t, ev) = (trained(&sim), evaluated(&sim));
        assert!(!ev.is_empty(), "seed {seed}");
        assert!(
            t.is_disjoint(&ev),
            "seed {seed}: a device trained and evaluated in one round"
        );
        // Each round's evaluation is in its settlement (and so its ledger
        // record).
        let settled: Vec<_> = sim
            .events
            .iter()
            .filter_map(|e| match e {
                Event::RoundSettled(s) => s.evaluation.clone(),
                _ => None,
            })
            .collect();
        assert_eq!(settled, evals, "seed {seed}");
    }
}

/// A device never gets two evaluation tasks in one round, the round never
/// offers more than `evaluation.devices`, and devices without held-out
/// data decline without holding the round up.
#[test]
fn evaluators_are_bounded_and_decliners_do_not_stall_rounds() {
    for seed in SEEDS {
        let mut specs = fleet(6, 0);
        // Four devices hold no held-out data.
        specs.extend((0..4).map(|_| DeviceSpec::new(0.01, 10)));
        let mut sim = Sim::new(seed, cfg(3), NetConfig::default(), specs);
        sim.run_to_end(Duration::from_secs(120));
        assert_eq!(sim.published().len(), 3, "seed {seed}");
        let ev = evaluated(&sim);
        for round in 1..=3u64 {
            let n = ev.iter().filter(|(r, _)| *r == round).count();
            assert!(n <= 3, "seed {seed}: {n} evaluators in round {round}");
        }
        for e in sim.evaluations() {
            assert!(e.devices <= 3, "seed {seed}: {e:?}");
        }
    }
}

/// Without `[evaluation]` nothing is offered and no round is evaluated.
#[test]
fn evaluation_is_off_by_default() {
    let mut sim = Sim::new(3, cfg(0), NetConfig::default(), fleet(6, 0));
    sim.run_to_end(Duration::from_secs(120));
    assert_eq!(sim.published().len(), 3);
    assert!(sim.evaluations().is_empty());
    assert!(evaluated(&sim).is_empty());
}

/// Evaluation tasks are drawn at the check-in window, so a configuration
/// without one, or with FedBuff (no window, buffers that close as they
/// fill), is refused at start.
#[test]
fn evaluation_needs_a_check_in_window_and_synchronous_rounds() {
    assert!(cfg(3).validate().is_ok());
    let no_window = CoordinatorConfig {
        selection_window: Duration::ZERO,
        ..cfg(3)
    };
    assert!(
        no_window
            .validate()
            .unwrap_err()
            .contains("selection_window")
    );
    let buffered = CoordinatorConfig {
        strategy: fedge_aggregator::strategy::StrategyConfig {
            buffered: Some(Default::default()),
            ..Default::default()
        },
        versions_kept: 8,
        ..cfg(3)
    };
    assert!(buffered.validate().unwrap_err().contains("FedBuff"));
}
