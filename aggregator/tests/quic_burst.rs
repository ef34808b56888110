//! A connection storm over loopback QUIC: 300 devices (the real driver and
//! session, sharing endpoints as `simulate` runs them) connect at the same
//! instant, unramped, to an aggregator that runs 4 TLS handshakes at once
//! and lets 16 connections wait for a turn. The rest are refused at the
//! QUIC level and come back with jittered backoff; the connections that
//! get through are paced by the coordinator's admission control; the
//! devices not selected are paced away with windows stretched by how many
//! are connected; after the last round at most 16 fetch the final model at
//! once. Every round publishes, every device leaves with the final model,
//! and no connection attempt fails: nothing timed out.

use std::sync::Arc;
use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{HandshakeLimits, Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::KnownUpdate;
use fedge_device::transport::{Trust, shared_endpoint};
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};

const DEVICES: usize = 300;
const DEVICES_PER_ENDPOINT: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unramped_burst_is_paced_with_no_timeouts_and_no_failed_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 10,
            min_devices: 10,
            rounds: 2,
            round_deadline: Duration::from_secs(60),
            selection_window: Duration::from_millis(200),
            retry_window: (Duration::from_millis(50), Duration::from_millis(150)),
            // 300 devices at 200 requests a second: windows of about 1.5 s.
            task_requests_per_sec: 200.0,
            final_downloads_max: 16,
            plan: TrainingPlan {
                local_steps: 1,
                ..TrainingPlan::default()
            },
            ..CoordinatorConfig::default()
        },
        handshakes: HandshakeLimits {
            in_flight_max: 4,
            queue_max: 16,
            queue_wait: Duration::from_millis(200),
            // The devices' refused_backoff_max below.
            refused_comeback: Duration::from_secs(2),
            ..HandshakeLimits::default()
        },
        rate_per_sec: 10_000.0,
        rate_burst: 10_000.0,
        finish_grace: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let metrics = server.metrics();
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[64])]).unwrap());
    let model = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.0; 64]).unwrap(),
    };
    let serving = tokio::spawn(server.run(model, std::future::pending()));

    let mut devices = Vec::new();
    let mut endpoint = None;
    for i in 0..DEVICES {
        if i % DEVICES_PER_ENDPOINT == 0 {
            endpoint = Some(shared_endpoint(addr, 1 << 20).unwrap());
        }
        let cfg = DriverConfig {
            session: SessionConfig {
                seed: i as u64,
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
                refused_backoff_min: Duration::from_millis(100),
                refused_backoff_max: Duration::from_secs(2),
                ..SessionConfig::default()
            },
            endpoint: endpoint.clone(),
            ..DriverConfig::new(addr, Trust::Pinned(fp))
        };
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let trainer = Box::new(KnownUpdate {
            value: 0.5,
            sample_count: 10,
        });
        devices.push(tokio::spawn(run_device(
            cfg,
            SigningKey::from_bytes(&key),
            trainer,
        )));
    }

    let report = tokio::time::timeout(Duration::from_secs(300), serving)
        .await
        .expect("the aggregator finishes")
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_published, 2, "{report:?}");
    let (mut failed_attempts, mut refused) = (0, 0);
    for (i, d) in devices.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(10), d)
            .await
            .unwrap_or_else(|_| panic!("device {i} still running after the aggregator stopped"))
            .unwrap()
            .unwrap_or_else(|e| panic!("device {i} failed: {e}"));
        assert_eq!(r.final_version, report.final_version.unwrap(), "device {i}");
        failed_attempts += r.connect_failures;
        refused += r.connects_refused;
    }
    assert_eq!(failed_attempts, 0, "connection attempts failed (timed out)");
    // No authentication failed or timed out: the aggregator's rejections
    // are pacing (too many authenticating).
    for code in ["auth_failed", "deadline_passed"] {
        assert!(
            !report.rejections.contains_key(code),
            "{:?}",
            report.rejections
        );
    }
    println!(
        "{refused} connection attempts refused at the handshake limit; metrics:\n{}",
        metrics
            .encode()
            .lines()
            .filter(|l| l.contains("rejections"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
