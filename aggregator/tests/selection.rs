//! Who gets a round's slots and what happens when devices give them up, on
//! a simulated fleet (the real coordinator and device sessions, virtual
//! time): the check-in window's draw, slot hogging, the slot timeout,
//! abandoned tasks closing a round early, and rollback when most devices
//! report that training diverged.

use crate::sim;

use std::collections::HashSet;
use std::time::Duration;

use fedge_aggregator::coordinator::{CoordinatorConfig, Event};
use fedge_proto::RejectCode;
use sim::{DeviceSpec, NetConfig, Sim};

const SEEDS: [u64; 3] = [1, 7, 42];

fn cfg(per_round: usize, min: usize, rounds: u64) -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round: per_round,
        over_selection: 1.3,
        min_devices: min,
        rounds,
        round_deadline: Duration::from_secs(10),
        selection_window: Duration::from_secs(1),
        slot_timeout: Duration::from_secs(3),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        ..CoordinatorConfig::default()
    }
}

fn honest(n: usize) -> Vec<DeviceSpec> {
    (0..n)
        .map(|i| DeviceSpec::new(0.01 * (i as f32 + 1.0), 10 + i as u64))
        .collect()
}

/// The devices selected in each round, in order of rounds.
fn selected_by_round(sim: &Sim) -> Vec<(u64, Vec<String>)> {
    let mut out: Vec<(u64, Vec<String>)> = Vec::new();
    for e in &sim.events {
        if let Event::DeviceSelected { round_id, device } = e {
            match out.last_mut() {
                Some((r, v)) if r == round_id => v.push(device.clone()),
                _ => out.push((*round_id, vec![device.clone()])),
            }
        }
    }
    out
}

/// 13 keys that take every task they can and never finish one in time
/// (their training outlasts the deadline, then they ask again) against 20
/// honest devices: the draw gives the hogs only their share of the slots,
/// so every round publishes with honest updates only.
#[test]
fn hogging_keys_cannot_capture_rounds() {
    for seed in SEEDS {
        let mut specs = honest(20);
        for _ in 0..13 {
            let mut hog = DeviceSpec::new(5.0, 1000);
            hog.train_time = Duration::from_secs(11);
            specs.push(hog);
        }
        let hogs: HashSet<usize> = (20..33).collect();
        let mut sim = Sim::new(seed, cfg(10, 3, 5), NetConfig::default(), specs);
        let hog_ids: HashSet<String> = hogs.iter().map(|&i| sim.device_id(i)).collect();
        sim.run_until(Duration::from_secs(120), |s| s.published().len() == 5);
        assert!(sim.aborted().is_empty(), "seed {seed}: no round aborted");
        for c in sim.contributions().iter().filter(|c| c.accepted) {
            assert!(
                !hog_ids.contains(&c.device),
                "seed {seed}: a hog's update was accepted"
            );
        }
        // The hogs hold about 13/33 of the slots, not all of them.
        let rounds = selected_by_round(&sim);
        let (mut hog_slots, mut all_slots) = (0, 0);
        for (_, devs) in &rounds {
            all_slots += devs.len();
            hog_slots += devs.iter().filter(|d| hog_ids.contains(*d)).count();
        }
        let share = hog_slots as f64 / all_slots as f64;
        assert!(
            share < 0.6,
            "seed {seed}: hogs took {hog_slots} of {all_slots} slots"
        );
    }
}

/// A key is one candidate however it asks, and gets at most one slot in a
/// round.
#[test]
fn a_key_gets_at_most_one_slot_per_round() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, cfg(5, 2, 4), NetConfig::default(), honest(12));
        sim.run_until(Duration::from_secs(120), |s| s.published().len() == 4);
        for (round, devs) in selected_by_round(&sim) {
            let unique: HashSet<&String> = devs.iter().collect();
            assert_eq!(unique.len(), devs.len(), "seed {seed}: round {round}");
        }
    }
}

/// Selected devices that never begin their download lose their slots to
/// devices that do, and the round still reaches its target long before
/// its deadline.
#[test]
fn a_device_that_never_downloads_loses_its_slot() {
    let mut timeouts_seen = 0;
    for seed in SEEDS {
        // 4 honest devices and 2 that take an offer and never download;
        // 4 slots, all 4 honest updates needed.
        let mut specs = honest(4);
        for _ in 0..2 {
            let mut hog = DeviceSpec::new(1.0, 10);
            hog.never_download = true;
            specs.push(hog);
        }
        let c = CoordinatorConfig {
            over_selection: 1.0,
            round_deadline: Duration::from_secs(30),
            ..cfg(4, 2, 1)
        };
        let mut sim = Sim::new(seed, c, NetConfig::default(), specs);
        let hog_ids: HashSet<String> = (4..6).map(|i| sim.device_id(i)).collect();
        sim.run_until(Duration::from_secs(60), |s| !s.published().is_empty());
        let (_, accepted, _) = sim.published()[0];
        assert_eq!(
            accepted, 4,
            "seed {seed}: the freed slots went to devices that train"
        );
        assert!(
            sim.now - sim.t0 < Duration::from_secs(15),
            "seed {seed}: closed at {:?}, deadline 30 s",
            sim.now - sim.t0
        );
        let hogs_drawn = selected_by_round(&sim)[0]
            .1
            .iter()
            .filter(|d| hog_ids.contains(*d))
            .count();
        let timed_out = sim
            .rejection_details(RejectCode::NotSelected)
            .into_iter()
            .filter(|d| d.contains("did not begin its download"))
            .count();
        assert!(
            timed_out >= hogs_drawn,
            "seed {seed}: {hogs_drawn} hogs drawn, {timed_out} timed out"
        );
        timeouts_seen += timed_out;
    }
    assert!(timeouts_seen > 0, "the draw picked no hog in any seed");
}

/// Devices whose training fails tell the aggregator; once every selected
/// device has delivered or given up, the round closes without waiting for
/// its deadline.
#[test]
fn abandoned_tasks_close_the_round_early() {
    for seed in SEEDS {
        let mut specs = honest(13);
        for s in specs.iter_mut().take(4) {
            // Diverges (a NaN update): given up, and said so.
            s.diverge_from_round = Some(1);
        }
        let mut sim = Sim::new(seed, cfg(10, 3, 1), NetConfig::default(), specs);
        sim.run_until(Duration::from_secs(60), |s| !s.published().is_empty());
        let (_, accepted, _) = sim.published()[0];
        assert_eq!(accepted, 9, "seed {seed}");
        assert!(
            sim.now - sim.t0 < Duration::from_secs(5),
            "seed {seed}: closed at {:?}, not at the 10 s deadline",
            sim.now - sim.t0
        );
        let abandoned = sim
            .contributions()
            .iter()
            .filter(|c| {
                c.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("task abandoned (diverged)"))
            })
            .count();
        assert_eq!(abandoned, 4, "seed {seed}");
        assert!(
            sim.rollbacks().is_empty(),
            "seed {seed}: a minority diverged"
        );
    }
}

/// Round 1 publishes; on its model every device's training diverges in
/// round 2: the aggregator rolls back to the initial model rather than
/// build on the poisoned one, and training carries on from there.
#[test]
fn most_devices_diverging_rolls_the_model_back() {
    for seed in SEEDS {
        let mut specs = honest(10);
        for s in specs.iter_mut().take(8) {
            s.diverge_from_round = Some(2);
        }
        let mut sim = Sim::new(seed, cfg(5, 2, 3), NetConfig::default(), specs);
        let v0 = sim.coord.current_version();
        sim.run_until(Duration::from_secs(120), |s| !s.rollbacks().is_empty());
        let published = sim.published();
        let v1 = published[0].2;
        assert_ne!(v1, v0, "seed {seed}");
        let (round, from, to) = sim.rollbacks()[0];
        assert_eq!((round, from, to), (2, v1, v0), "seed {seed}");
        assert_eq!(sim.coord.current_version(), v0, "seed {seed}");
        // Round 2's accepted updates (from the devices that did not diverge)
        // were discarded with it.
        assert!(
            sim.contributions()
                .iter()
                .filter(|c| c.round_id == 2)
                .all(|c| !c.accepted),
            "seed {seed}"
        );
    }
}

/// Rollback is an operator's choice: off, a diverging majority only costs
/// the round its updates.
#[test]
fn rollback_can_be_turned_off() {
    let mut specs = honest(10);
    for s in specs.iter_mut().take(8) {
        s.diverge_from_round = Some(2);
    }
    let c = CoordinatorConfig {
        rollback_on_divergence: false,
        ..cfg(5, 2, 2)
    };
    let mut sim = Sim::new(3, c, NetConfig::default(), specs);
    sim.run_until(Duration::from_secs(120), |s| s.coord.round_id() > 2);
    assert!(sim.rollbacks().is_empty());
}

/// A round nobody comes to is not spent: its deadline moves on and the
/// round id stays until devices arrive.
#[test]
fn an_empty_round_waits_instead_of_aborting() {
    let mut sim = Sim::new(5, cfg(3, 2, 1), NetConfig::default(), Vec::new());
    let t0 = sim.t0;
    sim.coord.handle_timeout(t0);
    for k in 1..=5u64 {
        sim.coord
            .handle_timeout(t0 + Duration::from_secs(10 * k + 1));
    }
    assert_eq!(sim.coord.round_id(), 1);
    assert!(sim.coord.poll_timeout().is_some());
    while let Some(o) = sim.coord.poll_output() {
        if let fedge_aggregator::coordinator::Output::Event(Event::RoundClosed { .. }) = o {
            panic!("an empty round closed");
        }
    }
}
