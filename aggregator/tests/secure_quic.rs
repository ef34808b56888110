//! A secure federation over the real transport (QUIC + TLS on loopback,
//! the real server and store, stock device sessions): the round's
//! published model is the mean of the honest devices' updates, read back
//! from the SecAgg+ sum, while a modified client that was drawn into the
//! round tries to upload in the clear and to speak out of turn, and one
//! that was not drawn sends a stage message of its own. Each gets its
//! typed refusal; the round goes on without them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::privacy::secagg::SecAggSpec;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::strategy::StrategyConfig;
use fedge_aggregator::tls::TlsIdentity;
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::KnownUpdate;
use fedge_device::transport::Trust;
use fedge_proto::msg::{TrainingPlan, UploadBegin};
use fedge_proto::secagg::DeviceSecAgg;
use fedge_proto::sign::{SigningKey, UpdateManifest};
use fedge_proto::update::{Codec, encode_update};
use fedge_proto::{AggMsg, DeviceMsg, ModelBlob, ParamLayout, Params, RejectCode, TensorSpec};

const DIM: usize = 16;

fn model() -> ModelBlob {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[DIM])]).unwrap());
    ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, vec![0.25; DIM]).unwrap(),
    }
}

use crate::raw;
use raw::{Raw, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_over_quic_publishes_the_honest_mean_and_refuses_a_modified_client() {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let spec = SecAggSpec {
        colluding_devices: 1,
        degree: 6,
        threshold: 3,
        bits: 32,
        clip: 10.0,
        survivors_min: 3,
        advertise_keys_ms: 3_000,
        share_keys_ms: 3_000,
        masked_input_ms: 10_000,
        unmasking_ms: 3_000,
        dp: None,
    };
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 7,
            over_selection: 1.0,
            min_devices: 2,
            rounds: 1,
            round_deadline: Duration::from_secs(30),
            selection_window: Duration::from_secs(2),
            retry_window: (Duration::from_millis(100), Duration::from_millis(300)),
            plan: TrainingPlan {
                codec: "dense-f32".into(),
                ..TrainingPlan::default()
            },
            strategy: StrategyConfig {
                secagg: Some(spec),
                ..StrategyConfig::default()
            },
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(5)),
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let serving = tokio::spawn(server.run(model(), std::future::pending()));

    // The modified client asks first, inside the check-in window.
    let modified = SigningKey::from_bytes(&[0x42; 32]);
    let mut m = Raw::authenticated(addr, fp, &modified).await;
    m.send(&DeviceMsg::TaskRequest {
        have_model_version: None,
    })
    .await;

    // Six stock devices, device i sending 0.01 (i + 1) everywhere.
    let values: Vec<f32> = (0..6).map(|i| 0.01 * (i as f32 + 1.0)).collect();
    let honest: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, &value)| {
            let cfg = DriverConfig {
                session: SessionConfig {
                    seed: i as u64,
                    backoff_min: Duration::from_millis(50),
                    ..SessionConfig::default()
                },
                ..DriverConfig::new(addr, Trust::Pinned(fp))
            };
            let key = SigningKey::from_bytes(&[10 + i as u8; 32]);
            let trainer = Box::new(KnownUpdate {
                value,
                sample_count: 1,
            });
            tokio::spawn(run_device(cfg, key, trainer))
        })
        .collect();

    // Drawn with the others: its offer names its part in the round.
    let offer = match m.recv().await {
        AggMsg::TaskOffer(o) => o,
        other => panic!("expected an offer, got {other:?}"),
    };
    let part = offer.secagg.clone().expect("a secure round's offer");
    assert_eq!(part.params.devices, 7);
    assert_eq!(part.params.dimension as usize, DIM);

    // 1. An update in the clear, signed and well-formed: refused, the
    //    connection kept.
    let payload = encode_update(Codec::DenseF32, &[100.0; DIM]);
    let manifest = UpdateManifest {
        round_id: offer.round_id,
        model_version: offer.model.version,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: 1,
        metrics: vec![],
        device_public_key: modified.verifying_key(),
        federation_id: m.federation,
        partial: None,
    };
    let signature = manifest.sign(&modified);
    m.send(&DeviceMsg::UploadBegin(Box::new(UploadBegin {
        manifest,
        signature,
        chunk_bytes: 1 << 16,
    })))
    .await;
    let detail = m.expect_reject(RejectCode::ProtocolViolation, false).await;
    assert!(detail.contains("SecAgg+"), "{detail}");

    // 2. A masked input while the round waits for keys (and of the wrong
    //    size): out of turn, so the device is cut off, a dropout.
    m.send(&DeviceMsg::SecAgg {
        round_id: offer.round_id,
        bits: 32,
        msg: DeviceSecAgg::MaskedInput(vec![1; 3]),
    })
    .await;
    let detail = m.expect_reject(RejectCode::ProtocolViolation, true).await;
    assert!(detail.contains("SecAgg+ message refused"), "{detail}");
    let closed = tokio::time::timeout(WAIT, m.conn.closed()).await;
    assert!(closed.is_ok(), "the modified client is disconnected");

    // 3. A client that was never drawn sends a stage message: refused.
    let outsider = SigningKey::from_bytes(&[0x43; 32]);
    let mut o = Raw::authenticated(addr, fp, &outsider).await;
    o.send(&DeviceMsg::SecAgg {
        round_id: offer.round_id,
        bits: 0,
        msg: DeviceSecAgg::AdvertiseKeys(fedge_proto::secagg::msg::AdvertiseKeys {
            c_public: [9; 32],
            s_public: [9; 32],
        }),
    })
    .await;
    let detail = o.expect_reject(RejectCode::NotSelected, false).await;
    assert!(detail.contains("no part in a secure round"), "{detail}");

    // The six finish with the mean of their updates; the modified
    // client's 100s never entered it.
    let mean = values.iter().map(|v| f64::from(*v)).sum::<f64>() / 6.0;
    for h in honest {
        let report = tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("device done in time")
            .unwrap()
            .unwrap();
        for v in &report.final_model.params.values {
            assert!(
                (f64::from(*v) - (0.25 + mean)).abs() < 1e-5,
                "published {v}, want {}",
                0.25 + mean
            );
        }
    }
    let report = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("server stops after its grace")
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_published, 1);
}
