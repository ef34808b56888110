//! Real federated training over loopback QUIC: an aggregator and three
//! devices, each training the zoo MLP with the tract engine on its own
//! shard of MNIST. Held-out accuracy of the published model must beat the
//! initial model's by a wide margin.

use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::OnnxTrainer;
use fedge_device::transport::Trust;
use fedge_engine::data;
use fedge_engine::train::exec::TractInference;
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_engine::train::local::evaluate;
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use prost::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_train_the_mlp_over_quic_and_accuracy_improves() {
    let mnist = data::load_mnist(&data::shipped_data_dir()).unwrap();
    let held_out = mnist.slice(9000..10000);
    let initial = import_onnx(&fedge_engine::zoo::mlp(1).encode_to_vec()).unwrap();
    let graph = ModelGraph::from_blob(&initial).unwrap();
    let mut inf = TractInference::new(&graph, 250).unwrap();
    inf.load(&initial.params.values).unwrap();
    let before = evaluate(&inf, &held_out).unwrap().accuracy;

    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 3,
            min_devices: 3,
            rounds: 3,
            plan: TrainingPlan {
                local_epochs: 1,
                batch_size: 32,
                learning_rate: 0.05,
                momentum: 0.9,
                ..TrainingPlan::default()
            },
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(3)),
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let serving = tokio::spawn(server.run(initial.clone(), std::future::pending()));
    let mut devices = Vec::new();
    for i in 0..3u8 {
        let shard = mnist.slice(usize::from(i) * 600..usize::from(i + 1) * 600);
        let cfg = DriverConfig {
            session: SessionConfig {
                seed: u64::from(i),
                ..SessionConfig::default()
            },
            ..DriverConfig::new(addr, Trust::Pinned(fp))
        };
        let trainer = Box::new(OnnxTrainer::new(shard, u64::from(i)));
        devices.push(tokio::spawn(run_device(
            cfg,
            SigningKey::from_bytes(&[50 + i; 32]),
            trainer,
        )));
    }
    let mut finals = Vec::new();
    for d in devices {
        let report = tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("in time")
            .unwrap()
            .expect("device succeeded");
        assert_eq!(report.rounds_contributed, 3);
        finals.push(report.final_model);
    }
    let served = serving.await.unwrap().unwrap();
    assert_eq!(served.rounds_published, 3);
    inf.load(&finals[0].params.values).unwrap();
    let after = evaluate(&inf, &held_out).unwrap().accuracy;
    eprintln!("held-out accuracy: initial {before:.3}, after 3 rounds {after:.3}");
    assert!(before < 0.3, "an untrained model is near chance: {before}");
    assert!(after > 0.6, "federated training reached {after}");
}
