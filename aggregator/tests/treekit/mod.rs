//! Trees of real aggregators on loopback for the tree tests: a root, its
//! leaves (each the real server with its link to the root) and devices
//! (the real device driver) whose updates depend on the model they get,
//! so a round that combined anything differently shows in every later
//! model.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedge_aggregator::coordinator::{CoordinatorConfig, Event, LeafBounds, TreeRole};
use fedge_aggregator::server::{ServeReport, Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_aggregator::uplink::ParentLink;
use fedge_aggregator::weighting::WeightPolicy;
use fedge_device::TrainOutput;
use fedge_device::driver::{DeviceReport, DriverConfig, DriverError, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::Trainer;
use fedge_device::transport::Trust;
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

pub const DIM: usize = 16;

pub fn model() -> ModelBlob {
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec::new("w", &[3, 4]),
            TensorSpec::new("b", &[4]),
        ])
        .unwrap(),
    );
    ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, (0..DIM).map(|i| 0.05 * i as f32).collect()).unwrap(),
    }
}

/// An update that depends on the device and on the model it trains:
/// `0.1 sin(1.7 id + 0.3 i + 2 w_i)` on coordinate `i`, with `samples`
/// samples (so sample weighting matters).
pub struct Wavy {
    pub id: u8,
    pub samples: u64,
}

impl Trainer for Wavy {
    fn train(
        &mut self,
        _round_id: u64,
        model: &ModelBlob,
        _plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        let id = f32::from(self.id);
        Ok(TrainOutput {
            delta: model
                .params
                .values
                .iter()
                .enumerate()
                .map(|(i, w)| 0.1 * (1.7 * id + 0.3 * i as f32 + 2.0 * w).sin())
                .collect(),
            sample_count: self.samples,
            metrics: vec![("loss".into(), f64::from(id))],
        })
    }
}

/// Device `id`'s key.
pub fn device_key(id: u8) -> SigningKey {
    SigningKey::from_bytes(&[100 + id; 32])
}

/// Leaf `i`'s key.
pub fn leaf_key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[200 + i; 32])
}

/// Plain sample-weighted FedAvg with open enrolment and no share cap: the
/// configuration under which a tree must publish what one aggregator does.
pub fn coordinator(devices_per_round: usize, rounds: u64) -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round,
        over_selection: 1.0,
        min_devices: devices_per_round,
        rounds,
        round_deadline: Duration::from_secs(60),
        selection_window: Duration::from_millis(300),
        retry_window: (Duration::from_millis(50), Duration::from_millis(150)),
        weights: WeightPolicy::default(),
        ..CoordinatorConfig::default()
    }
}

/// A root over `leaves` (their keys), waiting for `wait_for` partials a
/// round with a quorum of `quorum`.
pub fn root(leaves: &[SigningKey], wait_for: usize, quorum: usize, rounds: u64) -> ServerConfig {
    let mut c = coordinator(wait_for, rounds);
    c.min_devices = quorum;
    // Leaves are named, not drawn: no check-in window.
    c.selection_window = Duration::ZERO;
    c.tree = TreeRole {
        leaf: false,
        leaves: Some(LeafBounds {
            keys: leaves
                .iter()
                .map(|k| k.verifying_key().to_bytes())
                .collect(),
            devices_max: 100,
            device_weight_max: 100.0,
        }),
    };
    server(c)
}

/// A leaf waiting for `devices` updates a round.
pub fn leaf(devices: usize) -> ServerConfig {
    let mut c = coordinator(devices, 0);
    c.tree.leaf = true;
    server(c)
}

pub fn server(coordinator: CoordinatorConfig) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator,
        finish_grace: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    }
}

/// A server running from a fresh state directory.
pub struct Running {
    pub addr: SocketAddr,
    pub fingerprint: [u8; 32],
    pub events: UnboundedReceiver<Event>,
    pub task: JoinHandle<anyhow::Result<ServeReport>>,
    pub dir: tempfile::TempDir,
}

impl Running {
    /// How a leaf reaches this server.
    pub fn link(&self) -> ParentLink {
        ParentLink {
            address: self.addr,
            pin: self.fingerprint,
            upload_margin: Duration::from_millis(500),
            chunk_bytes: 64 << 10,
            reply_timeout: Duration::from_secs(30),
        }
    }

    /// Its report once it stops, and the events it emitted.
    pub async fn finish(self) -> (ServeReport, UnboundedReceiver<Event>) {
        let report = tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .expect("aggregator finished in time")
            .unwrap()
            .unwrap();
        (report, self.events)
    }
}

pub async fn start(
    cfg: ServerConfig,
    parent: Option<(ParentLink, SigningKey)>,
    initial: ModelBlob,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let mut server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    if let Some((link, key)) = parent {
        server.set_parent(link, key);
    }
    let events = server.observe();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run(initial, std::future::pending()));
    Running {
        addr,
        fingerprint: identity.fingerprint(),
        events,
        task,
        dir,
    }
}

/// Devices `ids` against the aggregator at `addr`.
pub fn devices(
    addr: SocketAddr,
    fp: [u8; 32],
    ids: impl IntoIterator<Item = u8>,
) -> Vec<JoinHandle<Result<DeviceReport, DriverError>>> {
    ids.into_iter()
        .map(|id| {
            let cfg = DriverConfig {
                session: SessionConfig {
                    seed: u64::from(id),
                    backoff_min: Duration::from_millis(50),
                    ..SessionConfig::default()
                },
                ..DriverConfig::new(addr, Trust::Pinned(fp))
            };
            let trainer = Wavy {
                id,
                samples: 3 + 2 * u64::from(id),
            };
            tokio::spawn(run_device(cfg, device_key(id), Box::new(trainer)))
        })
        .collect()
}

pub async fn join(devices: Vec<JoinHandle<Result<DeviceReport, DriverError>>>) {
    for d in devices {
        tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("device finished in time")
            .unwrap()
            .expect("device succeeded");
    }
}

/// The models published, in order, as parameter values.
pub fn published(events: &mut UnboundedReceiver<Event>) -> Vec<(u64, Vec<f32>)> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::ModelPublished { round_id, blob, .. } = e {
            let m = ModelBlob::decode(&blob, &Default::default()).unwrap();
            out.push((round_id, m.params.values.clone()));
        }
    }
    out
}

/// Every event seen so far.
pub fn drain(events: &mut UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.push(e);
    }
    out
}

/// The models one aggregator publishes over devices `0..devices`, every
/// device in every round of `rounds`.
pub async fn lone_models(devices_n: u8, rounds: u64) -> Vec<(u64, Vec<f32>)> {
    let mut lone = start(
        server(coordinator(usize::from(devices_n), rounds)),
        None,
        model(),
    )
    .await;
    join(devices(lone.addr, lone.fingerprint, 0..devices_n)).await;
    let single = published(&mut lone.events);
    lone.finish().await;
    assert_eq!(single.len(), rounds as usize, "{single:?}");
    single
}

/// The largest parameter difference between two runs' published models,
/// round by round; both publish the same rounds, and every model moved
/// from the initial one (or the comparison would show nothing).
pub fn largest_difference(a: &[(u64, Vec<f32>)], b: &[(u64, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len(), "{a:?} / {b:?}");
    let start_values = model().params.values;
    let mut largest = 0.0f32;
    for ((r1, x), (r2, y)) in a.iter().zip(b) {
        assert_eq!(r1, r2);
        let moved = x
            .iter()
            .zip(&start_values)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 0.01, "round {r1}: the model did not move");
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        largest = largest.max(diff);
    }
    largest
}
