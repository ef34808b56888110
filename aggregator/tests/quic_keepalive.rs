//! A connection survives local training much longer than the QUIC idle
//! timeout: keepalives carry it, no reconnect is needed.

use std::sync::Arc;
use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_device::TrainOutput;
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::Trainer;
use fedge_device::transport::{QuicTiming, Trust};
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};

/// Takes 3 s, three times the idle timeout.
struct SlowTrainer;

impl Trainer for SlowTrainer {
    fn train(
        &mut self,
        _: u64,
        model: &ModelBlob,
        _: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        std::thread::sleep(Duration::from_secs(3));
        Ok(TrainOutput {
            delta: vec![1.0; model.params.values.len()],
            sample_count: 1,
            metrics: vec![],
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_carries_the_connection_through_long_training() {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 1,
            rounds: 1,
            ..CoordinatorConfig::default()
        },
        idle_timeout: Duration::from_secs(1),
        finish_grace: Some(Duration::from_secs(2)),
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[4])]).unwrap());
    let model = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.0; 4]).unwrap(),
    };
    let serving = tokio::spawn(server.run(model, std::future::pending()));
    let device = DriverConfig {
        session: SessionConfig {
            // Application heartbeats far apart: QUIC keepalive alone must do.
            heartbeat_interval: Duration::from_secs(60),
            ..SessionConfig::default()
        },
        timing: QuicTiming {
            keep_alive: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(1),
        },
        ..DriverConfig::new(addr, Trust::Pinned(fp))
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        run_device(
            device,
            SigningKey::from_bytes(&[4; 32]),
            Box::new(SlowTrainer),
        ),
    )
    .await
    .expect("in time")
    .expect("device succeeded");
    assert_eq!(report.rounds_contributed, 1);
    assert_eq!(report.connections, 1, "no reconnect was needed");
    assert_eq!(report.final_model.params.values, vec![1.0; 4]);
    let served = serving.await.unwrap().unwrap();
    assert_eq!(served.rounds_published, 1);
}
