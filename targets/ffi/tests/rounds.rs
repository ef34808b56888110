//! `Device::run_rounds` against a real aggregator over loopback QUIC: the
//! exported API as a host calls it (async, on the library's runtime),
//! training the zoo MLP on real MNIST digits.

use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_engine::data::{self, Features};
use fedge_engine::train::import::import_onnx;
use fedge_ffi::{Device, DeviceConfig, Samples};
use fedge_proto::msg::TrainingPlan;
use prost::Message;

fn mnist(range: std::ops::Range<usize>) -> Samples {
    let d = data::load_mnist(&data::shipped_data_dir())
        .unwrap()
        .slice(range);
    let Features::F32(inputs) = d.features else {
        panic!("MNIST pixels are f32")
    };
    Samples {
        inputs,
        labels: d.labels,
        tokens: Vec::new(),
    }
}

struct Aggregator {
    addr: std::net::SocketAddr,
    fingerprint: String,
    serving: tokio::task::JoinHandle<anyhow::Result<fedge_aggregator::server::ServeReport>>,
    _dir: tempfile::TempDir,
}

async fn aggregator(rounds: u64, initial: fedge_proto::ModelBlob) -> Aggregator {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 1,
            min_devices: 1,
            rounds,
            plan: TrainingPlan {
                local_steps: 3,
                batch_size: 32,
                learning_rate: 0.05,
                codec: "topk:0.1+q8".into(),
                error_feedback: true,
                ..TrainingPlan::default()
            },
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(3)),
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    Aggregator {
        addr: server.local_addr().unwrap(),
        fingerprint: identity.fingerprint_hex(),
        serving: tokio::spawn(server.run(initial, std::future::pending())),
        _dir: dir,
    }
}

fn device(dir: &std::path::Path, agg: &Aggregator) -> std::sync::Arc<Device> {
    Device::new(DeviceConfig {
        data_dir: dir.to_string_lossy().into_owned(),
        aggregator: Some(agg.addr.to_string()),
        aggregator_fingerprint: Some(agg.fingerprint.clone()),
        server_name: "localhost".into(),
        seed: 1,
    })
    .unwrap()
}

fn initial_mlp() -> fedge_proto::ModelBlob {
    import_onnx(&fedge_engine::zoo::mlp(1).encode_to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_trains_every_round_until_the_aggregator_finishes() {
    let initial = initial_mlp();
    let agg = aggregator(2, initial.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path(), &agg);
    let report = tokio::time::timeout(Duration::from_secs(120), dev.run_rounds(mnist(0..256), 0))
        .await
        .expect("rounds finish in time")
        .expect("run_rounds succeeds");
    let served = agg.serving.await.unwrap().unwrap();
    assert_eq!(served.rounds_published, 2);
    let published = served.final_version.expect("a published model").to_hex();
    assert!(report.aggregator_finished);
    assert_eq!(report.rounds_trained, 2);
    assert!(report.rejections.is_empty(), "{:?}", report.rejections);
    assert_eq!(report.model_version.as_deref(), Some(published.as_str()));
    assert_ne!(published, initial.version().to_hex());
    // The device now holds the published model, ready for inference.
    assert_eq!(dev.model_info().unwrap().unwrap().version, published);
    let out = dev.infer(mnist(9000..9004).inputs).await.unwrap();
    assert_eq!(out.values.len(), 40);
    // Error feedback kept its residual next to the key.
    assert!(dir.path().join("residual.bin").is_file());
    assert!(dir.path().join("device.key").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_stops_after_rounds_max_and_keeps_the_latest_model() {
    let initial = initial_mlp();
    let agg = aggregator(3, initial.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path(), &agg);
    let report = tokio::time::timeout(Duration::from_secs(120), dev.run_rounds(mnist(0..256), 1))
        .await
        .expect("the device stops in time")
        .expect("run_rounds succeeds");
    assert!(!report.aggregator_finished);
    assert_eq!(report.rounds_trained, 1);
    // Round 2's model (round 1 aggregated) was downloaded before the
    // device declined to train it.
    let version = report.model_version.expect("a downloaded model");
    assert_ne!(version, initial.version().to_hex());
    assert_eq!(dev.model_info().unwrap().unwrap().version, version);
    agg.serving.abort();
}
