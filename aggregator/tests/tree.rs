//! A two-level tree of real aggregators over QUIC on loopback (a root,
//! leaves with their links to it, devices on the real driver): with the
//! plain sample-weighted mean it publishes the same models as one
//! aggregator over the same devices, to within a float32 ulp (partials
//! travel at float64); a leaf that
//! never answers is left out at the root's deadline and the round
//! publishes with the quorum.

use std::time::Duration;

use fedge_aggregator::coordinator::{Event, RoundOutcome};
use fedge_proto::ModelBlob;

use crate::raw;
use crate::treekit;
use treekit::{DIM, Wavy, devices, leaf, leaf_key, model, published, root, start};

/// Rounds of the equality test.
const ROUNDS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tree_publishes_the_models_one_aggregator_publishes() {
    // One aggregator, six devices, every device in every round.
    let single = treekit::lone_models(6, ROUNDS).await;

    // The same six devices split over three leaves of a root.
    let keys: Vec<_> = (0..3).map(leaf_key).collect();
    let mut top = start(root(&keys, 3, 3, ROUNDS), None, model()).await;
    let mut leaves = Vec::new();
    let mut fleet = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let l = start(leaf(2), Some((top.link(), key.clone())), model()).await;
        let ids = [2 * i as u8, 2 * i as u8 + 1];
        fleet.extend(devices(l.addr, l.fingerprint, ids));
        leaves.push(l);
    }
    treekit::join(fleet).await;
    let tree = published(&mut top.events);
    let mut leaf_finals = Vec::new();
    for l in leaves {
        leaf_finals.push(l.finish().await.0.final_version);
    }
    let root_final = top.finish().await.0.final_version;

    // Partials travel at float64: the root's mean is one aggregator's to
    // about 1e-16 before both round it to float32 (measured: 0).
    let largest = treekit::largest_difference(&single, &tree);
    assert!(
        largest <= 1e-7,
        "the tree's models differ from one aggregator's by {largest}"
    );
    eprintln!("largest difference from one aggregator's models: {largest:e}");
    // Every leaf ends on the root's final model.
    for f in leaf_finals {
        assert_eq!(f, root_final);
    }
}

/// The sample-weighted mean of the devices' updates on `m`, added to it.
fn fedavg_step(m: &[f32], ids: &[u8]) -> Vec<f32> {
    let blob = {
        let mut b = model();
        b.params.values = m.to_vec();
        b
    };
    let mut sum = vec![0.0f64; DIM];
    let mut total = 0.0;
    for &id in ids {
        let samples = 3 + 2 * u64::from(id);
        let mut t = Wavy { id, samples };
        let out =
            fedge_device::trainer::Trainer::train(&mut t, 1, &blob, &Default::default()).unwrap();
        for (s, d) in sum.iter_mut().zip(&out.delta) {
            *s += samples as f64 * f64::from(*d);
        }
        total += samples as f64;
    }
    m.iter()
        .zip(sum)
        .map(|(&w, s)| (f64::from(w) + f64::from((s / total) as f32)) as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_leaf_is_left_out_at_the_deadline() {
    let keys: Vec<_> = (0..3).map(leaf_key).collect();
    // Waits for three partials, publishes with two at its deadline.
    let mut cfg = root(&keys, 3, 2, 2);
    // Room for the present leaves' devices however loaded the machine;
    // the round still closes at it, without the silent leaf.
    cfg.coordinator.round_deadline = Duration::from_secs(10);
    let top = start(cfg, None, model()).await;
    // The third leaf takes its task and never answers.
    let mut silent = raw::Raw::authenticated(top.addr, top.fingerprint, &keys[2]).await;
    let (round, _) = silent.offer().await;
    assert_eq!(round, 1);
    let mut leaves = Vec::new();
    let mut fleet = Vec::new();
    for (i, key) in keys[..2].iter().enumerate() {
        let l = start(leaf(1), Some((top.link(), key.clone())), model()).await;
        fleet.extend(devices(l.addr, l.fingerprint, [i as u8]));
        leaves.push(l);
    }
    treekit::join(fleet).await;
    for l in leaves {
        l.finish().await;
    }
    drop(silent);
    let (report, mut events) = top.finish().await;
    assert_eq!(report.rounds_published, 2);
    let events = treekit::drain(&mut events);
    let closed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoundClosed {
                round_id,
                accepted,
                outcome,
                ..
            } => Some((*round_id, *accepted, outcome.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(closed.len(), 2, "{closed:?}");
    for (round_id, accepted, outcome) in closed {
        assert_eq!(accepted, 2, "round {round_id}");
        assert!(
            matches!(outcome, RoundOutcome::Published(_)),
            "round {round_id}"
        );
    }
    // What was published is the two present leaves' devices' mean.
    let mut expect = model().params.values;
    for e in &events {
        if let Event::ModelPublished { round_id, blob, .. } = e {
            expect = fedavg_step(&expect, &[0, 1]);
            let got = ModelBlob::decode(blob, &Default::default()).unwrap();
            let diff = got
                .params
                .values
                .iter()
                .zip(&expect)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(diff <= 1e-7, "round {round_id}: off by {diff}");
        }
    }
}

/// A leaf none of whose devices came gives its round up at its deadline
/// (`TaskAbandoned` to the root) instead of waiting past the root's; the
/// root publishes the other leaf's partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_without_devices_gives_its_round_up() {
    let keys: Vec<_> = (0..2).map(leaf_key).collect();
    let mut cfg = root(&keys, 2, 1, 1);
    cfg.coordinator.round_deadline = Duration::from_secs(8);
    let top = start(cfg, None, model()).await;
    // The idle leaf closes its round 4 s before the root's deadline: its
    // report arrives well before it.
    let mut link = top.link();
    link.upload_margin = Duration::from_secs(4);
    let busy = start(leaf(1), Some((top.link(), keys[0].clone())), model()).await;
    let idle = start(leaf(1), Some((link, keys[1].clone())), model()).await;
    treekit::join(devices(busy.addr, busy.fingerprint, [0])).await;
    busy.finish().await;
    let (_, mut idle_events) = idle.finish().await;
    let (report, mut events) = top.finish().await;
    assert_eq!(report.rounds_published, 1);
    let idle_key = hex::encode(keys[1].verifying_key().to_bytes());
    let given_up = treekit::drain(&mut events).into_iter().any(|e| {
        matches!(e, Event::Contribution(c)
            if c.device == idle_key && !c.accepted
                && c.reason.as_deref().is_some_and(|r| r.contains("task abandoned (failed)")))
    });
    assert!(given_up, "the idle leaf gave its round up to the root");
    let aborted = treekit::drain(&mut idle_events).into_iter().any(|e| {
        matches!(
            e,
            Event::RoundClosed {
                round_id: 1,
                accepted: 0,
                outcome: RoundOutcome::Aborted,
                ..
            }
        )
    });
    assert!(aborted, "the idle leaf closed its round 1 with nothing");
}
