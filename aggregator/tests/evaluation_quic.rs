//! Evaluation reports from a modified binary, over the real transport
//! (QUIC + TLS on loopback): each bad report gets its typed rejection and
//! leaves the round's evaluation as it was; the one good report is what
//! the round's evaluation and its settlement say.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedge_aggregator::coordinator::{CoordinatorConfig, Event};
use fedge_aggregator::evaluation::EvaluationConfig;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_proto::msg::{EvalManifest, EvalReport, TaskOffer, UploadBegin};
use fedge_proto::sign::{SigningKey, UpdateManifest};
use fedge_proto::update::{Codec, encode_update};
use fedge_proto::{
    AggMsg, DeviceMsg, ModelBlob, ModelVersion, ParamLayout, Params, RejectCode, TensorSpec, wire,
};
use prost::Message;

use crate::raw;
use raw::{Raw, WAIT};

fn model() -> ModelBlob {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[4])]).unwrap());
    ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, vec![0.5; 4]).unwrap(),
    }
}

async fn offer(c: &mut Raw) -> Box<TaskOffer> {
    c.send(&DeviceMsg::TaskRequest {
        have_model_version: None,
    })
    .await;
    match c.recv().await {
        AggMsg::TaskOffer(o) => o,
        other => panic!("expected an offer, got {other:?}"),
    }
}

fn report(key: &SigningKey, m: EvalManifest) -> DeviceMsg {
    DeviceMsg::EvalReport(Box::new(EvalReport {
        signature: m.sign(key),
        manifest: m,
    }))
}

#[tokio::test]
async fn bad_evaluation_reports_are_refused_by_type_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 1,
            over_selection: 1.0,
            min_devices: 1,
            rounds: 1,
            round_deadline: Duration::from_secs(30),
            selection_window: Duration::from_millis(300),
            retry_window: (Duration::from_millis(50), Duration::from_millis(150)),
            evaluation: EvaluationConfig {
                devices: 3,
                ..EvaluationConfig::default()
            },
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(2)),
        rate_per_sec: 1000.0,
        rate_burst: 1000.0,
        ..ServerConfig::default()
    };
    let mut server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let mut events = server.observe();
    let (addr, fp) = (server.local_addr().unwrap(), identity.fingerprint());
    let serving = tokio::spawn(server.run(model(), std::future::pending()));

    // Two devices check in during the window: one gets the training slot,
    // the other an evaluation task.
    let (ka, kb, kc) = (
        SigningKey::from_bytes(&[11; 32]),
        SigningKey::from_bytes(&[12; 32]),
        SigningKey::from_bytes(&[13; 32]),
    );
    let mut a = Raw::authenticated(addr, fp, &ka).await;
    let mut b = Raw::authenticated(addr, fp, &kb).await;
    let (oa, ob) = tokio::join!(offer(&mut a), offer(&mut b));
    assert_ne!(oa.evaluate, ob.evaluate, "one trains, one evaluates");
    let ((mut t, kt, ot), (mut e, ke, oe)) = if oa.evaluate {
        ((b, kb, ob), (a, ka, oa))
    } else {
        ((a, ka, oa), (b, kb, ob))
    };
    assert_eq!(oe.model.version, ot.model.version);
    let good = EvalManifest {
        round_id: oe.round_id,
        model_version: oe.model.version,
        examples: u64::MAX,
        loss: 0.5,
        accuracy: 0.75,
        device_public_key: ke.verifying_key(),
        federation_id: e.federation,
    };

    // Signed by the evaluator for another device's key.
    let forged = EvalManifest {
        device_public_key: kc.verifying_key(),
        ..good.clone()
    };
    e.send(&report(&ke, forged)).await;
    e.expect_reject(RejectCode::BadSignature, false).await;
    // Another model, another round, another federation.
    let cases = [
        (
            EvalManifest {
                model_version: ModelVersion([9; 32]),
                ..good.clone()
            },
            RejectCode::UnknownModelVersion,
        ),
        (
            EvalManifest {
                round_id: good.round_id + 1,
                ..good.clone()
            },
            RejectCode::RoundClosed,
        ),
        (
            EvalManifest {
                federation_id: [3; 32],
                ..good.clone()
            },
            RejectCode::WrongFederation,
        ),
    ];
    for (m, code) in cases {
        e.send(&report(&ke, m)).await;
        e.expect_reject(code, false).await;
    }
    // The good one, then its replay.
    e.send(&report(&ke, good.clone())).await;
    match e.recv().await {
        AggMsg::EvalAccepted { round_id } => assert_eq!(round_id, good.round_id),
        other => panic!("expected eval_accepted, got {other:?}"),
    }
    e.send(&report(&ke, good.clone())).await;
    e.expect_reject(RejectCode::Replay, false).await;

    // A device never offered an evaluation task.
    let mut c = Raw::authenticated(addr, fp, &kc).await;
    let uninvited = EvalManifest {
        device_public_key: kc.verifying_key(),
        ..good.clone()
    };
    c.send(&report(&kc, uninvited)).await;
    c.expect_reject(RejectCode::NotSelected, false).await;
    // An impossible claim does not decode: the frame is refused and the
    // connection closed.
    let nan = wire::Envelope {
        body: Some(wire::envelope::Body::EvalReport(wire::EvalReport {
            manifest: Some(
                EvalManifest {
                    accuracy: 0.5,
                    ..good.clone()
                }
                .to_wire(),
            )
            .map(|m| wire::EvalManifest {
                accuracy: f64::NAN,
                ..m
            }),
            signature: vec![0; 64].into(),
        })),
    };
    c.send_raw(&(nan.encoded_len() as u32).to_be_bytes()).await;
    c.send_raw(&nan.encode_to_vec()).await;
    c.expect_reject(RejectCode::Malformed, true).await;

    // The trainer's update closes the round.
    let payload = encode_update(Codec::DenseF32, &[0.1; 4]);
    let manifest = UpdateManifest {
        round_id: ot.round_id,
        model_version: ot.model.version,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: 1,
        metrics: vec![],
        device_public_key: kt.verifying_key(),
        federation_id: t.federation,
        partial: None,
    };
    t.send(&DeviceMsg::UploadBegin(Box::new(UploadBegin {
        signature: manifest.sign(&kt),
        manifest,
        chunk_bytes: 1 << 16,
    })))
    .await;
    assert!(matches!(t.recv().await, AggMsg::UploadStatus { .. }));
    t.send(&DeviceMsg::UploadChunk {
        payload_hash: *blake3::hash(&payload).as_bytes(),
        index: 0,
        data: payload.clone(),
    })
    .await;
    assert!(matches!(t.recv().await, AggMsg::UpdateAccepted { .. }));

    // The round's evaluation is the one good report, in its event and in
    // its settlement.
    let (mut evaluated, mut settled) = (None, None);
    while evaluated.is_none() || settled.is_none() {
        match tokio::time::timeout(WAIT, events.recv()).await.unwrap() {
            Some(Event::Evaluated(s)) => evaluated = Some(*s),
            Some(Event::RoundSettled(s)) => settled = Some(s.evaluation),
            Some(_) => {}
            None => panic!("the aggregator stopped"),
        }
    }
    let s = evaluated.unwrap();
    assert_eq!(s.round_id, good.round_id);
    assert_eq!(s.devices, 1);
    assert_eq!(s.weight, 1.0);
    assert_eq!((s.loss, s.accuracy), (Some(0.5), Some(0.75)));
    assert_eq!(s.model_version, hex::encode(good.model_version.0));
    assert_eq!(settled.unwrap(), Some(s));
    serving.abort();
}
