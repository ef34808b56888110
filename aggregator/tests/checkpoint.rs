//! Server state survives a restart: with FedAdam and adaptive clipping, an
//! aggregator restarted between rounds (from its checkpoint) publishes the
//! same model sequence as one that never stopped; without the checkpoint
//! the sequence differs (the test can fail).

use crate::sim;

use std::time::Duration;

use fedge_aggregator::coordinator::{Coordinator, CoordinatorConfig};
use fedge_aggregator::robust::CombineSpec;
use fedge_aggregator::strategy::{ClipSpec, ServerOpt, StrategyConfig};
use fedge_proto::ModelVersion;
use sim::{DeviceSpec, NetConfig, Sim};

fn cfg() -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round: 3,
        over_selection: 1.0,
        min_devices: 3,
        rounds: 5,
        round_deadline: Duration::from_secs(10),
        selection_window: Duration::from_millis(500),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        strategy: StrategyConfig {
            server_opt: ServerOpt::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            combine: CombineSpec::Mean,
            clip: Some(ClipSpec::AdaptiveMedian { multiplier: 2.0 }),
            ..StrategyConfig::default()
        },
        ..CoordinatorConfig::default()
    }
}

/// Every device sends the same update, so the sequence of models does not
/// depend on which devices a round draws: only on the server's state.
fn fleet() -> Vec<DeviceSpec> {
    (0..4).map(|_| DeviceSpec::new(0.05, 10)).collect()
}

fn versions(restart_after: Option<(usize, bool)>) -> Vec<ModelVersion> {
    let mut sim = Sim::new(9, cfg(), NetConfig::default(), fleet());
    if let Some((rounds, keep)) = restart_after {
        sim.run_until(Duration::from_secs(120), |s| s.published().len() == rounds);
        sim.restart_aggregator(keep);
    }
    sim.run_until(Duration::from_secs(300), |s| s.coord.is_finished());
    let mut v: Vec<ModelVersion> = sim.published().iter().map(|p| p.2).collect();
    if restart_after.is_some() {
        // The second coordinator's events are appended to the first's.
        v.dedup();
    }
    v
}

#[test]
fn a_restart_from_the_checkpoint_continues_the_same_model_sequence() {
    let straight = versions(None);
    assert_eq!(straight.len(), 5);
    let restarted = versions(Some((2, true)));
    assert_eq!(restarted, straight);
    let amnesiac = versions(Some((2, false)));
    assert_eq!(amnesiac[..2], straight[..2]);
    assert_ne!(
        amnesiac[2..],
        straight[2..],
        "without its state the optimizer starts afresh"
    );
}

#[test]
fn a_checkpoint_of_another_model_or_corrupt_bytes_is_refused() {
    let mut sim = Sim::new(9, cfg(), NetConfig::default(), fleet());
    sim.run_until(Duration::from_secs(120), |s| s.published().len() == 1);
    let state = sim.coord.checkpoint();
    let other = Sim::new(9, cfg(), NetConfig::default(), fleet());
    let mut other = other.coord;
    let err = other.restore_checkpoint(&state).unwrap_err();
    assert!(err.contains("checkpoint is for model"), "{err}");
    let model = sim.coord.current_model().clone();
    let fresh = || Coordinator::new(cfg(), model.clone(), 2, 1).unwrap();
    for cut in [0, 10, 20, 47, 55, state.len() - 1] {
        assert!(
            fresh().restore_checkpoint(&state[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut longer = state.clone();
    longer.push(0);
    assert!(fresh().restore_checkpoint(&longer).is_err());
    fresh().restore_checkpoint(&state).unwrap();
}
