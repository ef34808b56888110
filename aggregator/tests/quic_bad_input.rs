//! Bad input over the real transport (QUIC + TLS on loopback): each kind
//! gets its typed rejection, and the aggregator keeps serving honest
//! devices, whose rounds then complete with the hand-computed aggregate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::strategy::{BufferedSpec, StrategyConfig};
use fedge_aggregator::tls::TlsIdentity;
use fedge_device::driver::{DeviceReport, DriverConfig, DriverError, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::KnownUpdate;
use fedge_device::transport::Trust;
use fedge_proto::msg::UploadBegin;
use fedge_proto::sign::{self, SigningKey, UpdateManifest};
use fedge_proto::update::{Codec, encode_update};
use fedge_proto::{
    AggMsg, DeviceMsg, Limits, ModelBlob, ModelVersion, ParamLayout, Params, RejectCode,
    SCHEMA_VERSION, TensorSpec,
};

use crate::raw;
use raw::{Raw, WAIT};

fn model() -> ModelBlob {
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec::new("w", &[3, 4]),
            TensorSpec::new("b", &[4]),
        ])
        .unwrap(),
    );
    ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, vec![0.25; 16]).unwrap(),
    }
}

/// An aggregator serving `m` with `cfg` from a fresh state directory (the
/// returned guard keeps it), until the test aborts it: its address, its
/// certificate's fingerprint, the task.
async fn serve(
    cfg: ServerConfig,
    m: ModelBlob,
) -> (
    SocketAddr,
    [u8; 32],
    tokio::task::AbortHandle,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let task = tokio::spawn(server.run(m, std::future::pending()));
    (addr, identity.fingerprint(), task.abort_handle(), dir)
}

/// A signed announcement of `bytes` of garbage for `c`'s task, in chunks
/// of `chunk` bytes, and the garbage (it passes every check until it is
/// decoded).
fn garbage_upload(
    c: &Raw,
    key: &SigningKey,
    round_id: u64,
    version: ModelVersion,
    bytes: u64,
    chunk: usize,
) -> (UploadBegin, Vec<u8>) {
    let payload = vec![7u8; bytes as usize];
    let manifest = UpdateManifest {
        round_id,
        model_version: version,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: bytes,
        sample_count: 1,
        metrics: vec![],
        device_public_key: key.verifying_key(),
        federation_id: c.federation,
        partial: None,
    };
    let signature = manifest.sign(key);
    let begin = UploadBegin {
        manifest,
        signature,
        chunk_bytes: chunk as u32,
    };
    (begin, payload)
}

/// Three stock devices (keys `[key_byte + i; 32]`) that send `value` on
/// every coordinate each round.
fn honest_devices(
    addr: SocketAddr,
    fp: [u8; 32],
    key_byte: u8,
    value: f32,
) -> Vec<tokio::task::JoinHandle<Result<DeviceReport, DriverError>>> {
    (0..3u8)
        .map(|i| {
            let cfg = DriverConfig {
                session: SessionConfig {
                    seed: u64::from(i),
                    backoff_min: Duration::from_millis(50),
                    ..SessionConfig::default()
                },
                ..DriverConfig::new(addr, Trust::Pinned(fp))
            };
            let key = SigningKey::from_bytes(&[key_byte + i; 32]);
            let trainer = Box::new(KnownUpdate {
                value,
                sample_count: 1,
            });
            tokio::spawn(run_device(cfg, key, trainer))
        })
        .collect()
}

fn upload(
    federation: [u8; 32],
    signer: &SigningKey,
    named: &SigningKey,
    round_id: u64,
    version: ModelVersion,
    delta: f32,
) -> (UploadBegin, Bytes) {
    let payload = encode_update(Codec::DenseF32, &[delta; 16]);
    let manifest = UpdateManifest {
        round_id,
        model_version: version,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: 1,
        metrics: vec![],
        device_public_key: named.verifying_key(),
        federation_id: federation,
        partial: None,
    };
    let signature = manifest.sign(signer);
    (
        UploadBegin {
            manifest,
            signature,
            chunk_bytes: 1 << 16,
        },
        payload,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_honest_devices_still_complete() {
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let fp = identity.fingerprint();
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 2,
            min_devices: 2,
            rounds: 2,
            round_deadline: Duration::from_secs(30),
            retry_window: (Duration::from_millis(50), Duration::from_millis(150)),
            limits: Limits {
                frame_bytes_max: 64 << 10,
                ..Limits::default()
            },
            chunk_bytes: 32 << 10,
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(5)),
        rate_per_sec: 100.0,
        rate_burst: 200.0,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerConfig::default()
    };
    let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let metrics_addr = server.metrics_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(model(), async {
        let _ = stop_rx.await;
    }));

    // Malformed frame: not a protobuf envelope.
    let mut c = Raw::connect(addr, fp).await;
    c.send_raw(&fedge_proto::frame::encode(&[0xff, 0xff, 0xff, 0x07]))
        .await;
    c.expect_reject(RejectCode::Malformed, true).await;
    c.expect_closed().await;

    // Oversized frame: the header alone is refused.
    let mut c = Raw::connect(addr, fp).await;
    c.send_raw(&(1u32 << 30).to_be_bytes()).await;
    let detail = c.expect_reject(RejectCode::TooLarge, true).await;
    assert!(detail.contains("exceeds the limit"), "{detail}");
    c.expect_closed().await;

    // Wrong schema version: both versions named.
    let mut c = Raw::connect(addr, fp).await;
    c.hello(&SigningKey::from_bytes(&[9; 32]), 99).await;
    let detail = c.expect_reject(RejectCode::SchemaMismatch, true).await;
    assert!(
        detail.contains("99") && detail.contains(&SCHEMA_VERSION.to_string()),
        "{detail}"
    );
    c.expect_closed().await;

    // Authentication signed for another TLS session.
    let mut c = Raw::connect(addr, fp).await;
    let k = SigningKey::from_bytes(&[8; 32]);
    c.hello(&k, SCHEMA_VERSION).await;
    let AggMsg::Challenge { nonce, .. } = c.recv().await else {
        panic!()
    };
    let signature = sign::sign_auth(&k, &nonce, &[0; 32]);
    c.send(&DeviceMsg::AuthResponse { signature }).await;
    c.expect_reject(RejectCode::AuthFailed, true).await;

    // A flood of requests: over the per-connection rate limit.
    let mut c = Raw::connect(addr, fp).await;
    c.auth(&SigningKey::from_bytes(&[7; 32])).await;
    let mut flood = Vec::new();
    for seq in 0..1000 {
        flood.extend_from_slice(&fedge_proto::frame::encode(
            &DeviceMsg::Heartbeat { seq }.encode(),
        ));
    }
    c.send_raw(&flood).await;
    let rate_limited = loop {
        match c.recv().await {
            AggMsg::HeartbeatAck { .. } => continue,
            AggMsg::Reject { code, fatal, .. } => break (code, fatal),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(rate_limited, (RejectCode::RateLimited, true));
    c.expect_closed().await;

    // Device A: a valid update, then replays and wrong rounds.
    let ka = SigningKey::from_bytes(&[1; 32]);
    let mut a = Raw::connect(addr, fp).await;
    a.auth(&ka).await;
    let (round, version) = a.offer().await;
    assert_eq!(round, 1);
    // Unknown model version.
    a.send(&DeviceMsg::ChunkRequest {
        model_version: ModelVersion([0xab; 32]),
        index: 0,
    })
    .await;
    a.expect_reject(RejectCode::UnknownModelVersion, false)
        .await;
    // Update for a round that does not exist.
    let (b, _) = upload(a.federation, &ka, &ka, 999, version, 1.0);
    a.send(&DeviceMsg::UploadBegin(Box::new(b))).await;
    a.expect_reject(RejectCode::UnknownRound, false).await;
    // Update against an unknown model version.
    let (b, _) = upload(a.federation, &ka, &ka, round, ModelVersion([0xcd; 32]), 1.0);
    a.send(&DeviceMsg::UploadBegin(Box::new(b))).await;
    a.expect_reject(RejectCode::UnknownModelVersion, false)
        .await;
    // An announced size no codec makes for this model (it would be what
    // the upload buffer may grow to): 100 MiB for 16 parameters, within
    // the frame decoder's chunk-count limit, refused by the coordinator.
    let (mut huge, _) = upload(a.federation, &ka, &ka, round, version, 1.0);
    huge.manifest.payload_bytes = 100 << 20;
    huge.signature = huge.manifest.sign(&ka);
    a.send(&DeviceMsg::UploadBegin(Box::new(huge))).await;
    let detail = a.expect_reject(RejectCode::TooLarge, false).await;
    assert!(detail.contains("104857600"), "{detail}");
    // The valid one.
    let (good, payload) = upload(a.federation, &ka, &ka, round, version, 1.0);
    a.send(&DeviceMsg::UploadBegin(Box::new(good.clone())))
        .await;
    assert!(matches!(
        a.recv().await,
        AggMsg::UploadStatus { next_index: 0, .. }
    ));
    a.send(&DeviceMsg::UploadChunk {
        payload_hash: good.manifest.payload_hash,
        index: 0,
        data: payload,
    })
    .await;
    assert!(matches!(
        a.recv().await,
        AggMsg::UpdateAccepted { round_id: 1, .. }
    ));
    // Replay of the accepted update.
    a.send(&DeviceMsg::UploadBegin(Box::new(good.clone())))
        .await;
    a.expect_reject(RejectCode::Replay, false).await;

    // Device B: selected, but its update is not signed by its key.
    let kb = SigningKey::from_bytes(&[2; 32]);
    let mut b = Raw::connect(addr, fp).await;
    b.auth(&kb).await;
    let (round_b, version_b) = b.offer().await;
    let (forged, _) = upload(
        b.federation,
        &SigningKey::from_bytes(&[3; 32]),
        &kb,
        round_b,
        version_b,
        100.0,
    );
    b.send(&DeviceMsg::UploadBegin(Box::new(forged))).await;
    b.expect_reject(RejectCode::BadSignature, false).await;
    // ... nor may it submit under device A's name.
    let (stolen, _) = upload(b.federation, &kb, &ka, round_b, version_b, 100.0);
    b.send(&DeviceMsg::UploadBegin(Box::new(stolen))).await;
    b.expect_reject(RejectCode::BadSignature, false).await;

    // Honest devices still complete both rounds.
    let devices = honest_devices(addr, fp, 100, 2.0);
    let mut finals = Vec::new();
    for d in devices {
        let report = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("device finished in time")
            .unwrap()
            .expect("device succeeded");
        finals.push(report.final_model);
    }
    // Round 1: A (1.0) and one honest device (2.0) -> +1.5; round 2: +2.0.
    for m in &finals {
        assert_eq!(m.params.values, vec![0.25 + 1.5 + 2.0; 16]);
    }

    // Device A's old update for the closed round 1.
    let (late, _) = upload(a.federation, &ka, &ka, 1, version, 1.0);
    a.send(&DeviceMsg::UploadBegin(Box::new(late))).await;
    a.expect_reject(RejectCode::RoundClosed, false).await;

    // Metrics and status over HTTP, while the aggregator still serves.
    let metrics = http_get(metrics_addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for needle in [
        "fedge_rounds_published_total 2",
        "fedge_updates_accepted_total",
        "fedge_rejections_total{reason=\"bad_signature\"} 2",
        "fedge_rejections_total{reason=\"malformed\"} 1",
        "fedge_bytes_in_total",
        "fedge_aggregation_seconds_count 2",
    ] {
        assert!(metrics.contains(needle), "missing `{needle}` in\n{metrics}");
    }
    let status = http_get(metrics_addr, "/status").await;
    assert!(
        status.contains("\"published_rounds\": 2") && status.contains("\"finished\": true"),
        "{status}"
    );
    assert!(
        http_get(metrics_addr, "/nope")
            .await
            .starts_with("HTTP/1.1 404")
    );

    let _ = stop_tx.send(());
    let report = serving.await.unwrap().unwrap();
    assert_eq!(report.rounds_published, 2);
    for code in [
        "malformed",
        "too_large",
        "schema_mismatch",
        "auth_failed",
        "bad_signature",
        "replay",
    ] {
        assert!(
            report.rejections.contains_key(code),
            "{code} counted: {:?}",
            report.rejections
        );
    }
}

/// A device that asks for model chunks and never reads them: the server's
/// queue for it is bounded in bytes, so it is dropped as too slow instead
/// of holding what the device asked for; other devices are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reads_is_dropped() {
    // 64k parameters: a 256 KiB model in 8 chunks of 32 KiB.
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[1 << 16])]).unwrap());
    let big = ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, vec![0.5; 1 << 16]).unwrap(),
    };
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 2,
            min_devices: 2,
            limits: Limits {
                frame_bytes_max: 64 << 10,
                ..Limits::default()
            },
            chunk_bytes: 32 << 10,
            ..CoordinatorConfig::default()
        },
        rate_per_sec: 10_000.0,
        rate_burst: 10_000.0,
        writer_queue_bytes_max: 256 << 10,
        ..ServerConfig::default()
    };
    let (addr, fp, serving, _dir) = serve(cfg, big).await;

    let mut c = Raw::connect(addr, fp).await;
    c.auth(&SigningKey::from_bytes(&[5; 32])).await;
    let (_, version) = c.offer().await;
    // 64 MiB of chunks asked for, none read.
    let mut asks = Vec::new();
    for i in 0..2048u32 {
        asks.extend_from_slice(&fedge_proto::frame::encode(
            &DeviceMsg::ChunkRequest {
                model_version: version,
                index: i % 8,
            }
            .encode(),
        ));
    }
    c.send_raw(&asks).await;
    let closed = tokio::time::timeout(WAIT, c.conn.closed()).await;
    let reason = format!("{:?}", closed.expect("the aggregator drops the device"));
    assert!(reason.contains("too slow"), "{reason}");

    // The aggregator still serves everyone else.
    let mut d = Raw::connect(addr, fp).await;
    d.auth(&SigningKey::from_bytes(&[6; 32])).await;
    let (_, v) = d.offer().await;
    assert_eq!(v, version);
    serving.abort();
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// An update signed for one aggregator does not verify at another serving
/// the same model in the same round: the federation id (name and
/// certificate) is in the signed manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_signed_for_another_federation_is_refused() {
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            coordinator: CoordinatorConfig {
                devices_per_round: 2,
                min_devices: 2,
                selection_window: Duration::from_millis(100),
                ..CoordinatorConfig::default()
            },
            ..ServerConfig::default()
        };
        let server = Server::bind(cfg, &identity, Store::open(dir.path()).await.unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        servers.push((
            addr,
            identity.fingerprint(),
            tokio::spawn(server.run(model(), std::future::pending())),
        ));
        dirs.push(dir);
    }
    let key = SigningKey::from_bytes(&[11; 32]);
    let mut here = Raw::connect(servers[0].0, servers[0].1).await;
    here.auth(&key).await;
    let mut there = Raw::connect(servers[1].0, servers[1].1).await;
    there.auth(&key).await;
    assert_ne!(here.federation, there.federation);
    let (round, version) = here.offer().await;
    assert_eq!(there.offer().await, (round, version));

    let (signed_here, payload) = upload(here.federation, &key, &key, round, version, 1.0);
    there
        .send(&DeviceMsg::UploadBegin(Box::new(signed_here.clone())))
        .await;
    let detail = there
        .expect_reject(RejectCode::WrongFederation, false)
        .await;
    assert!(detail.contains(&hex::encode(here.federation)), "{detail}");
    // Where it was signed for, it is accepted.
    here.send(&DeviceMsg::UploadBegin(Box::new(signed_here.clone())))
        .await;
    assert!(matches!(
        here.recv().await,
        AggMsg::UploadStatus { next_index: 0, .. }
    ));
    here.send(&DeviceMsg::UploadChunk {
        payload_hash: signed_here.manifest.payload_hash,
        index: 0,
        data: payload,
    })
    .await;
    assert!(matches!(
        here.recv().await,
        AggMsg::UpdateAccepted { round_id: 1, .. }
    ));
    for (_, _, s) in servers {
        s.abort();
    }
}

/// A device that holds the whole in-flight upload budget (it announces
/// the largest upload and sends half of it) makes the honest devices'
/// uploads wait: each is paced away, keeps its update, offers it again on
/// the same connection, and is accepted once the budget frees. Nothing is
/// lost to back-pressure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_paced_away_by_a_full_budget_are_offered_again() {
    let max_payload = fedge_proto::codec::payload_bytes_max(16);
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 4,
            min_devices: 3,
            rounds: 1,
            // The hog's refused upload leaves its slot taken: the round
            // closes at its deadline, with the three honest updates.
            round_deadline: Duration::from_secs(5),
            selection_window: Duration::from_millis(300),
            retry_window: (Duration::from_millis(200), Duration::from_millis(400)),
            // One largest upload at a time.
            uploads_in_flight_bytes_max: max_payload,
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(2)),
        ..ServerConfig::default()
    };
    let (addr, fp, serving, _dir) = serve(cfg, model()).await;

    let key = SigningKey::from_bytes(&[60; 32]);
    let mut hog = Raw::connect(addr, fp).await;
    hog.auth(&key).await;
    let (round_id, version) = hog.offer().await;
    let half = max_payload.div_ceil(2) as usize;
    let (begin, payload) = garbage_upload(&hog, &key, round_id, version, max_payload, half);
    let manifest = begin.manifest.clone();
    hog.send(&DeviceMsg::UploadBegin(Box::new(begin))).await;
    match hog.recv().await {
        AggMsg::UploadStatus { next_index: 0, .. } => {}
        other => panic!("expected the upload's status, got {other:?}"),
    }
    hog.send(&DeviceMsg::UploadChunk {
        payload_hash: manifest.payload_hash,
        index: 0,
        data: Bytes::from(payload[..half].to_vec()),
    })
    .await;
    // Slots are still free after the check-in window: the honest devices
    // take them, train at once and find the budget full for the next
    // 1.5 s; then the hog's garbage completes, is refused, and its bytes
    // go back.
    let devices = honest_devices(addr, fp, 70, 1.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hog.send(&DeviceMsg::UploadChunk {
        payload_hash: manifest.payload_hash,
        index: 1,
        data: Bytes::from(payload[half..].to_vec()),
    })
    .await;
    for d in devices {
        let report = tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .expect("honest devices finish")
            .unwrap()
            .expect("honest device succeeded");
        assert_eq!(report.rounds_contributed, 1, "{:?}", report.rejections);
        assert!(report.rejections.is_empty(), "{:?}", report.rejections);
        // Paced, not confused: the device waited on its connection
        // instead of dropping it and reconnecting.
        assert_eq!(report.connections, 1);
    }
    serving.abort();
}

/// FedBuff over QUIC: an upload begun against the current version and
/// finished after the buffer has published past its staleness window is
/// cut short (`RoundClosed`), not accepted at staleness 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fedbuff_upload_finished_beyond_the_staleness_window_is_refused() {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 1,
            min_devices: 1,
            versions_kept: 2,
            strategy: StrategyConfig {
                buffered: Some(BufferedSpec {
                    max_staleness: 1,
                    staleness_exponent: 0.5,
                    concurrency: Some(4),
                }),
                ..StrategyConfig::default()
            },
            ..CoordinatorConfig::default()
        },
        ..ServerConfig::default()
    };
    let (addr, fp, serving, _dir) = serve(cfg, model()).await;

    // The slow device takes a task on the first version and sends the
    // first chunk of its update.
    let slow_key = SigningKey::from_bytes(&[40; 32]);
    let mut slow = Raw::connect(addr, fp).await;
    slow.auth(&slow_key).await;
    let (round, v0) = slow.offer().await;
    let (mut begin, payload) = upload(slow.federation, &slow_key, &slow_key, round, v0, 0.5);
    let chunk = payload.len().div_ceil(2);
    begin.chunk_bytes = chunk as u32;
    slow.send(&DeviceMsg::UploadBegin(Box::new(begin.clone())))
        .await;
    assert!(matches!(
        slow.recv().await,
        AggMsg::UploadStatus { next_index: 0, .. }
    ));
    slow.send(&DeviceMsg::UploadChunk {
        payload_hash: begin.manifest.payload_hash,
        index: 0,
        data: payload.slice(..chunk),
    })
    .await;

    // Two fast devices each fill a buffer of one: two versions publish.
    let mut versions = vec![v0];
    for k in [41u8, 42] {
        let key = SigningKey::from_bytes(&[k; 32]);
        let mut fast = Raw::connect(addr, fp).await;
        fast.auth(&key).await;
        let (round, version) = fast.offer().await;
        assert_eq!(
            version,
            *versions.last().unwrap(),
            "offered the newest version"
        );
        let (b, p) = upload(
            fast.federation,
            &key,
            &key,
            round,
            version,
            f32::from(k) / 100.0,
        );
        let hash = b.manifest.payload_hash;
        fast.send(&DeviceMsg::UploadBegin(Box::new(b))).await;
        match fast.recv().await {
            AggMsg::UploadStatus { next_index: 0, .. } => {}
            other => panic!("expected the upload's status, got {other:?}"),
        }
        fast.send(&DeviceMsg::UploadChunk {
            payload_hash: hash,
            index: 0,
            data: p,
        })
        .await;
        assert!(matches!(fast.recv().await, AggMsg::UpdateAccepted { .. }));
        // The next task is offered on the version this update published.
        let (_, next) = fast.offer().await;
        assert_ne!(next, version);
        versions.push(next);
    }

    // Two versions later the slow device finishes: cut short, not counted.
    slow.send(&DeviceMsg::UploadChunk {
        payload_hash: begin.manifest.payload_hash,
        index: 1,
        data: payload.slice(chunk..),
    })
    .await;
    slow.expect_reject(RejectCode::RoundClosed, false).await;
    serving.abort();
}

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// 50 devices that take tasks, announce the largest upload the model
/// allows and trickle one chunk of it, and 50 that ask for the model and
/// never read, beside 3 honest devices: what the aggregator holds for
/// uploads is bounded by its slots (only a selected device may announce
/// one) and by its in-flight byte budget (four largest uploads here: the
/// others are paced away), the never-readers are dropped at the writer-queue bound, the run
/// finishes, and the whole process (aggregator and 103 clients) stays
/// within 300 MiB of where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_uploads_and_never_reading_clients_hold_bounded_memory() {
    const DIM: usize = 1 << 16;
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[DIM])]).unwrap());
    let big = ModelBlob {
        onnx_graph: Bytes::new(),
        params: Params::new(layout, vec![0.5; DIM]).unwrap(),
    };
    let max_payload = fedge_proto::codec::payload_bytes_max(DIM as u64);
    // Uploads in flight, all devices together, are held to four largest
    // uploads: the rest of the slowloris crowd is paced away.
    const BUDGET_UPLOADS: u64 = 4;
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: CoordinatorConfig {
            devices_per_round: 3,
            over_selection: 5.0,
            min_devices: 2,
            rounds: 2,
            round_deadline: Duration::from_secs(4),
            selection_window: Duration::from_millis(300),
            retry_window: (Duration::from_millis(100), Duration::from_millis(300)),
            chunk_bytes: 32 << 10,
            uploads_in_flight_bytes_max: BUDGET_UPLOADS * max_payload,
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(3)),
        rate_per_sec: 10_000.0,
        rate_burst: 10_000.0,
        writer_queue_bytes_max: 256 << 10,
        ..ServerConfig::default()
    };
    let start_rss = peak_rss();
    let (addr, fp, serving, _dir) = serve(cfg, big).await;

    let mut attackers = Vec::new();
    for i in 0..50u32 {
        attackers.push(tokio::spawn(async move {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&(1000 + i).to_le_bytes());
            let key = SigningKey::from_bytes(&key);
            let mut c = Raw::connect(addr, fp).await;
            c.auth(&key).await;
            c.send(&DeviceMsg::TaskRequest {
                have_model_version: None,
            })
            .await;
            let (round_id, version) = match c.recv().await {
                AggMsg::TaskOffer(o) => (o.round_id, o.model.version),
                _ => return (c, false),
            };
            let chunk = 64 << 10;
            let (begin, payload) = garbage_upload(&c, &key, round_id, version, max_payload, chunk);
            c.send(&DeviceMsg::UploadBegin(Box::new(begin))).await;
            match c.recv().await {
                AggMsg::UploadStatus { next_index: 0, .. } => {}
                // The in-flight byte budget is full: come back later.
                AggMsg::NoTask { reason, .. } => {
                    assert!(reason.contains("byte budget"), "{reason}");
                    return (c, false);
                }
                other => panic!("expected the upload's status, got {other:?}"),
            }
            c.send(&DeviceMsg::UploadChunk {
                payload_hash: *blake3::hash(&payload).as_bytes(),
                index: 0,
                data: Bytes::from(payload[..chunk].to_vec()),
            })
            .await;
            (c, true) // and never another chunk
        }));
    }
    let mut readers = Vec::new();
    for i in 0..50u32 {
        readers.push(tokio::spawn(async move {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&(5000 + i).to_le_bytes());
            let mut c = Raw::connect(addr, fp).await;
            c.auth(&SigningKey::from_bytes(&key)).await;
            // Whatever model is current: ask for every chunk, again and
            // again, and read nothing.
            c.send(&DeviceMsg::TaskRequest {
                have_model_version: None,
            })
            .await;
            let version = match c.recv().await {
                AggMsg::TaskOffer(o) => o.model.version,
                _ => return c,
            };
            let mut asks = Vec::new();
            for j in 0..1024u32 {
                asks.extend_from_slice(&fedge_proto::frame::encode(
                    &DeviceMsg::ChunkRequest {
                        model_version: version,
                        index: j % 8,
                    }
                    .encode(),
                ));
            }
            c.send_raw(&asks).await;
            c
        }));
    }
    let devices = honest_devices(addr, fp, 200, 1.0);
    let mut held = Vec::new();
    let mut uploads_begun = 0;
    for a in attackers {
        let (c, began) = a.await.unwrap();
        uploads_begun += usize::from(began);
        held.push(c);
    }
    let readers: Vec<Raw> = futures_join(readers).await;
    for d in devices {
        tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("honest devices finish")
            .unwrap()
            .expect("honest device succeeded");
    }
    let grown = peak_rss().saturating_sub(start_rss);
    eprintln!(
        "{uploads_begun} slowloris uploads begun ({} KiB each announced), 50 never-reading \
         clients; peak RSS grew {} MiB",
        max_payload >> 10,
        grown >> 20
    );
    assert!(grown < 300 << 20, "peak RSS grew {} MiB", grown >> 20);
    assert!(
        (1..=BUDGET_UPLOADS as usize).contains(&uploads_begun),
        "{uploads_begun} uploads opened within a budget of {BUDGET_UPLOADS}"
    );
    drop(held);
    drop(readers);
    serving.abort();
}

async fn futures_join<T: Send + 'static>(hs: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(hs.len());
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}
