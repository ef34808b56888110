//! Update intake over the real transport (QUIC + TLS on loopback) with the
//! payload checks off the coordinator's task and group commit: bad
//! payloads still get their typed rejections, and a flood of uploads (one
//! device pipelining many, many devices at once) is answered with every
//! honest update acknowledged and durable, each device holding one
//! upload at a time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{CommitLimits, Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_proto::msg::UploadBegin;
use fedge_proto::sign::{SigningKey, UpdateManifest};
use fedge_proto::update::{Codec, encode_update};
use fedge_proto::{
    AggMsg, DeviceMsg, Limits, ModelBlob, ModelVersion, ParamLayout, Params, RejectCode, TensorSpec,
};

use crate::raw;
use raw::Raw;

const DIM: usize = 16;

fn model() -> ModelBlob {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[DIM])]).unwrap());
    ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.25; DIM]).unwrap(),
    }
}

fn config(devices: usize) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            // Not reached: the round closes when all selected delivered.
            devices_per_round: devices + 8,
            over_selection: 1.0,
            min_devices: 1,
            rounds: 1,
            round_deadline: Duration::from_secs(120),
            selection_window: Duration::ZERO,
            retry_window: (Duration::from_millis(50), Duration::from_millis(150)),
            update_norm_max: Some(100.0),
            verify_in_flight_max: 1,
            ..CoordinatorConfig::default()
        },
        commit: CommitLimits {
            group_max: 4,
            wait: Duration::from_millis(5),
        },
        ..ServerConfig::default()
    }
}

/// A signed announcement of `payload` (whose hash it names: `signed_hash`
/// when given) for the device's task.
fn begin(c: &Raw, key: &SigningKey, task: (u64, ModelVersion), payload: &[u8]) -> UploadBegin {
    let manifest = UpdateManifest {
        round_id: task.0,
        model_version: task.1,
        payload_hash: *blake3::hash(payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: 1,
        metrics: vec![],
        device_public_key: key.verifying_key(),
        federation_id: c.federation,
        partial: None,
    };
    let signature = manifest.sign(key);
    UploadBegin {
        manifest,
        signature,
        chunk_bytes: 1 << 16,
    }
}

/// `b` and then `payload` as its one chunk.
async fn send_upload(c: &mut Raw, b: UploadBegin, payload: &[u8]) {
    let hash = b.manifest.payload_hash;
    c.send(&DeviceMsg::UploadBegin(Box::new(b))).await;
    c.send(&DeviceMsg::UploadChunk {
        payload_hash: hash,
        index: 0,
        data: Bytes::copy_from_slice(payload),
    })
    .await;
}

/// The answer to a one-chunk upload (after its `UploadStatus`).
async fn answer(c: &mut Raw) -> AggMsg {
    loop {
        match c.recv().await {
            AggMsg::UploadStatus { .. } => continue,
            other => return other,
        }
    }
}

/// What is sent, the payload signed, the payload sent, the rejection
/// expected (none: accepted).
type Case = (&'static str, Vec<u8>, Vec<u8>, Option<RejectCode>);

fn dense(value: f32) -> Bytes {
    encode_update(Codec::DenseF32, &[value; DIM])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_checked_off_task_get_their_typed_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let store = Store::open(dir.path()).await.unwrap();
    let server = Server::bind(config(5), &identity, store).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(model(), async {
        let _ = stop_rx.await;
    }));

    let garbage = vec![0xffu8; 40];
    let garbage_code = fedge_proto::update::decode_update(&garbage, DIM, &Limits::default())
        .unwrap_err()
        .reject_code();
    assert_eq!(garbage_code, RejectCode::Malformed, "the garbage chosen");
    let good = dense(0.5);
    // The encoder refuses NaN: the dense payload of 0.5s with its first
    // value's bytes made NaN.
    let mut nan = good.to_vec();
    let at = nan
        .windows(4)
        .position(|w| w == 0.5f32.to_le_bytes())
        .expect("a float32 in the payload");
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut tampered = good.to_vec();
    tampered[8] ^= 1;
    let cases: Vec<Case> = vec![
        (
            "hash",
            good.to_vec(),
            tampered,
            Some(RejectCode::HashMismatch),
        ),
        (
            "garbage",
            garbage.clone(),
            garbage,
            Some(RejectCode::Malformed),
        ),
        ("nan", nan.clone(), nan, Some(RejectCode::NonFinite)),
        (
            "norm",
            dense(1e3).to_vec(),
            dense(1e3).to_vec(),
            Some(RejectCode::NormBound),
        ),
        ("honest", good.to_vec(), good.to_vec(), None),
    ];
    for (i, (what, signed, sent, expected)) in cases.into_iter().enumerate() {
        let key = SigningKey::from_bytes(&[i as u8 + 1; 32]);
        let mut c = Raw::connect(addr, fp).await;
        c.auth(&key).await;
        let task = c.offer().await;
        let b = begin(&c, &key, task, &signed);
        send_upload(&mut c, b, &sent).await;
        match (answer(&mut c).await, expected) {
            (AggMsg::Reject { code, fatal, .. }, Some(want)) => {
                assert_eq!((code, fatal), (want, false), "{what}")
            }
            (AggMsg::UpdateAccepted { round_id, .. }, None) => assert_eq!(round_id, 1, "{what}"),
            (other, want) => panic!("{what}: expected {want:?}, got {other:?}"),
        }
    }
    let _ = stop_tx.send(());
    serving.await.unwrap().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let rows = store.round_updates(1).await.unwrap();
    assert_eq!(rows.len(), 1, "only the honest update is durable");
    assert_eq!(rows[0].payload, good);
    store.close().await;
}

/// Sixteen devices upload at once while a seventeenth pipelines thirty
/// signed uploads for its one task without waiting for answers. The
/// checks run one at a time (`verify_in_flight_max = 1`), groups hold at
/// most four: every honest device is acknowledged, and durable; the
/// flooder holds one upload at a time (the others are paced away while it
/// is checked, or refused once it is accepted), so one of its updates is
/// taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_uploads_leaves_honest_devices_acknowledged() {
    const HONEST: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let mut store = Store::open(dir.path()).await.unwrap();
    // The round publishes once all have delivered: its payloads are kept
    // to be read back.
    store.keep_update_payloads(true);
    let server = Server::bind(config(HONEST + 1), &identity, store).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(model(), async {
        let _ = stop_rx.await;
    }));

    // Every device authenticated and holding its task first.
    let flood_key = SigningKey::from_bytes(&[200; 32]);
    let mut flooder = Raw::connect(addr, fp).await;
    flooder.auth(&flood_key).await;
    let flood_task = flooder.offer().await;
    let mut honest = Vec::new();
    for i in 0..HONEST {
        let key = SigningKey::from_bytes(&[i as u8 + 1; 32]);
        let mut c = Raw::connect(addr, fp).await;
        c.auth(&key).await;
        let task = c.offer().await;
        honest.push((c, key, task));
    }
    // The flood: thirty uploads back to back, answers not awaited.
    for k in 0..30 {
        let payload = dense(0.001 * k as f32);
        let b = begin(&flooder, &flood_key, flood_task, &payload);
        send_upload(&mut flooder, b, &payload).await;
    }
    let uploads = honest
        .into_iter()
        .enumerate()
        .map(|(i, (mut c, key, task))| {
            tokio::spawn(async move {
                let payload = dense(0.01 * (i as f32 + 1.0));
                let b = begin(&c, &key, task, &payload);
                send_upload(&mut c, b, &payload).await;
                let got = answer(&mut c).await;
                (c, got)
            })
        });
    let mut conns = Vec::new();
    for h in uploads.collect::<Vec<_>>() {
        let (c, got) = h.await.unwrap();
        assert!(
            matches!(got, AggMsg::UpdateAccepted { round_id: 1, .. }),
            "an honest device got {got:?}"
        );
        conns.push(c);
    }
    // The flooder's answers: its first upload's, then two for each other
    // (paced away while the first is checked, or a replay once it is
    // accepted; and its chunk, for an upload that was never opened).
    let mut accepted = 0;
    for _ in 0..1 + 29 * 2 {
        match answer(&mut flooder).await {
            AggMsg::UpdateAccepted { .. } => accepted += 1,
            AggMsg::NoTask { .. } => {}
            AggMsg::Reject { code, fatal, .. } => {
                assert!(!fatal, "{code}");
                assert!(
                    matches!(code, RejectCode::Replay | RejectCode::UnknownRound),
                    "{code}"
                );
            }
            other => panic!("the flooder got {other:?}"),
        }
    }
    assert_eq!(accepted, 1, "one of the flooder's updates is taken");
    let _ = stop_tx.send(());
    serving.await.unwrap().unwrap();
    drop(conns);
    let store = Store::open(dir.path()).await.unwrap();
    let rows = store.round_updates(1).await.unwrap();
    assert_eq!(
        rows.len(),
        HONEST + accepted,
        "every acknowledged update is durable"
    );
    store.close().await;
}
