//! Three levels of aggregators: a root, a middle node (a leaf of the root
//! and the parent of two leaves) and the leaves' devices, real servers
//! over QUIC on loopback. With the plain sample-weighted mean the root
//! publishes one aggregator's models over the same devices, and the
//! middle node's partial counts every device under it (the root bounds a
//! partial's weight by its device count, set here so that counting each
//! leaf's partial as one device would be refused). A middle node
//! restarted mid-round counts the devices under the partials it restores
//! (coordinator level: the partials come back from its store).

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedge_aggregator::coordinator::{
    Coordinator, CoordinatorConfig, DurableUpdate, Forward, LeafBounds, Output, ParentRound,
    TreeRole,
};
use fedge_proto::evidence::SignedManifest;
use fedge_proto::sign::{PartialAggregate, UpdateManifest};
use fedge_proto::{ModelVersion, wire};
use prost::Message;

use crate::treekit;
use treekit::{devices, leaf, leaf_key, model, published, start};

const ROUNDS: u64 = 3;

/// Bounds on partials from `keys`: at most 6 devices, each weighing at
/// most 13 (the heaviest device below: 3 + 2 * 5 samples).
fn bounds(keys: &[fedge_proto::sign::SigningKey]) -> LeafBounds {
    LeafBounds {
        keys: keys.iter().map(|k| k.verifying_key().to_bytes()).collect(),
        devices_max: 6,
        device_weight_max: 13.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_levels_publish_the_models_one_aggregator_publishes() {
    let single = treekit::lone_models(6, ROUNDS).await;

    // Root <- middle <- two leaves, three devices each.
    let middle_key = leaf_key(9);
    let mut root_cfg = treekit::coordinator(1, ROUNDS);
    root_cfg.selection_window = Duration::ZERO;
    root_cfg.tree = TreeRole {
        leaf: false,
        leaves: Some(bounds(std::slice::from_ref(&middle_key))),
    };
    let mut top = start(treekit::server(root_cfg), None, model()).await;
    let keys = [leaf_key(0), leaf_key(1)];
    let mut middle_cfg = treekit::coordinator(2, 0);
    middle_cfg.selection_window = Duration::ZERO;
    middle_cfg.tree = TreeRole {
        leaf: true,
        leaves: Some(bounds(&keys)),
    };
    let middle = start(
        treekit::server(middle_cfg),
        Some((top.link(), middle_key)),
        model(),
    )
    .await;
    let mut leaves = Vec::new();
    let mut fleet = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let l = start(leaf(3), Some((middle.link(), key.clone())), model()).await;
        let ids = (0..3).map(|d| 3 * i as u8 + d);
        fleet.extend(devices(l.addr, l.fingerprint, ids));
        leaves.push(l);
    }
    treekit::join(fleet).await;
    let tree = published(&mut top.events);
    let mut finals = Vec::new();
    for l in leaves {
        finals.push(l.finish().await.0.final_version);
    }
    finals.push(middle.finish().await.0.final_version);
    let root_final = top.finish().await.0.final_version;

    let largest = treekit::largest_difference(&single, &tree);
    assert!(
        largest <= 1e-7,
        "three levels' models differ from one aggregator's by {largest}"
    );
    for f in finals {
        assert_eq!(f, root_final, "every node ends on the root's final model");
    }
}

/// A partial of `values` from leaf `i` for round `round` of `base`,
/// claiming `devices` devices and weight `weight`, as the middle node's
/// store gives it back after a restart.
fn restored_partial(
    (i, round): (u8, u64),
    base: ModelVersion,
    values: &[f64],
    (devices, weight): (u32, f64),
) -> DurableUpdate {
    let payload: Bytes = wire::UpdatePayload {
        codec: fedge_proto::update::PARTIAL_CODEC.into(),
        dimension: values.len() as u64,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        seed: 0,
        zstd: false,
    }
    .encode_to_vec()
    .into();
    let key = leaf_key(i);
    let manifest = UpdateManifest {
        round_id: round,
        model_version: base,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: 10,
        metrics: vec![],
        device_public_key: key.verifying_key(),
        federation_id: [0; 32],
        partial: Some(PartialAggregate {
            total_weight: weight,
            devices,
            manifests_root: [1; 32],
        }),
    };
    let signature = manifest.sign(&key);
    let signed = SignedManifest {
        manifest,
        signature,
    };
    let mut encoded = Vec::new();
    signed.encode_into(&mut encoded);
    DurableUpdate {
        round_id: round,
        task_round: round,
        model_version: Some(base),
        device: hex::encode(key.verifying_key().to_bytes()),
        payload_hash: signed.manifest.payload_hash,
        manifest_hash: signed.hash(),
        signed_manifest: encoded.into(),
        sample_count: 10,
        raw_weight: weight,
        discount: 1.0,
        stake: None,
        metrics: vec![],
        payload,
    }
}

#[test]
fn a_restarted_middle_node_counts_the_devices_under_its_restored_partials() {
    let cfg = middle(&[leaf_key(0), leaf_key(1)]);
    let base = model();
    let version = ModelVersion::of(&base.encode());
    let mut c = Coordinator::new(cfg, base.clone(), 1, 0).unwrap();
    let now = Instant::now();
    // Its store gives back two acknowledged partials (4 and 5 devices)
    // before the parent has offered the round again.
    let dim = base.params.values.len();
    c.restore_update(
        now,
        restored_partial((0, 1), version, &vec![0.1; dim], (4, 20.0)),
    )
    .unwrap();
    c.restore_update(
        now,
        restored_partial((1, 1), version, &vec![0.2; dim], (5, 30.0)),
    )
    .unwrap();
    c.handle_parent_round(now, offer(1, base)).unwrap();
    // Its close (the combine) is handed out as a job, off its task.
    let job = close_job(&mut c).expect("the round's close is handed out");
    c.handle_closed(now, job.run());
    let p = forwarded(&mut c);
    assert_eq!(p.round_id, 1);
    assert_eq!(p.devices, 9, "4 + 5 devices under the restored partials");
    assert!((p.total_weight - 50.0).abs() < 1e-9, "{}", p.total_weight);
    for v in &p.delta {
        assert!((v - 0.16).abs() < 1e-12, "(20 * 0.1 + 30 * 0.2) / 50: {v}");
    }
}

/// A middle node (a leaf with leaves) waiting for a partial from each of
/// `keys` a round, their claims loosely bounded.
fn middle(keys: &[fedge_proto::sign::SigningKey]) -> CoordinatorConfig {
    CoordinatorConfig {
        tree: TreeRole {
            leaf: true,
            leaves: Some(LeafBounds {
                devices_max: 100,
                device_weight_max: 100.0,
                ..bounds(keys)
            }),
        },
        ..treekit::coordinator(keys.len(), 0)
    }
}

/// Round `round_id` of the parent, on `model`.
fn offer(round_id: u64, model: fedge_proto::ModelBlob) -> ParentRound {
    ParentRound {
        round_id,
        model,
        plan: Default::default(),
        deadline: Instant::now() + Duration::from_secs(60),
    }
}

/// The close job the coordinator hands out next, if any (other outputs
/// are dropped).
fn close_job(c: &mut Coordinator) -> Option<fedge_aggregator::coordinator::CloseJob> {
    while let Some(o) = c.poll_output() {
        if let Output::CloseRound(job) = o {
            return Some(*job);
        }
    }
    None
}

/// The partial the coordinator forwards next.
fn forwarded(c: &mut Coordinator) -> fedge_aggregator::coordinator::Partial {
    while let Some(o) = c.poll_output() {
        match o {
            Output::Forward(f) => match *f {
                Forward::Partial(p) => return p,
                other => panic!("the round was given up: {other:?}"),
            },
            Output::CloseRound(_) => panic!("a second close job"),
            _ => {}
        }
    }
    panic!("nothing forwarded");
}

/// A leaf whose close is out when its parent moves on aborts the round;
/// the close's result, when it comes back, is ignored (nothing forwarded
/// for the old round), and the next round closes and forwards as usual.
#[test]
fn a_close_out_when_the_parent_moves_on_is_dropped() {
    let cfg = middle(&[leaf_key(0)]);
    let base = model();
    let version = ModelVersion::of(&base.encode());
    let dim = base.params.values.len();
    let mut c = Coordinator::new(cfg, base.clone(), 1, 0).unwrap();
    let now = Instant::now();
    c.restore_update(
        now,
        restored_partial((0, 1), version, &vec![0.1; dim], (2, 4.0)),
    )
    .unwrap();
    c.handle_parent_round(now, offer(1, base.clone())).unwrap();
    let stale = close_job(&mut c).expect("round 1's close is handed out");
    assert_eq!(stale.round_id(), 1);

    // The parent moves on to round 2 (same model) before the job is back.
    c.handle_parent_round(now, offer(2, base)).unwrap();
    c.handle_closed(now, stale.run());
    while let Some(o) = c.poll_output() {
        assert!(
            !matches!(o, Output::Forward(_) | Output::CloseRound(_)),
            "round 1's late close did something: {o:?}"
        );
    }
    // Round 2 is open and closes as any round does.
    let u = restored_partial((0, 2), version, &vec![0.3; dim], (3, 6.0));
    c.restore_update(now, u)
        .unwrap_or_else(|e| panic!("round 2 takes updates: {e}"));
    let job = close_job(&mut c).expect("round 2's close is handed out");
    c.handle_closed(now, job.run());
    let p = forwarded(&mut c);
    assert_eq!((p.round_id, p.devices), (2, 3));
    assert!(p.delta.iter().all(|v| (v - 0.3).abs() < 1e-12));
}
