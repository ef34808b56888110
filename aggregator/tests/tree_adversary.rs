//! A root attacked by its leaves, over real QUIC and TLS: a key that is
//! no leaf is refused when it authenticates; an allowed leaf's partial
//! aggregates with the wrong shape, a values section of the wrong length,
//! a float32 payload instead of float64, NaN, Inf or values past float32's
//! range, an oversized announcement, too many devices, too much weight,
//! the wrong base model, a bad signature, or sent again, each get their
//! typed rejection and change nothing: the round then publishes exactly
//! the mean of the one valid partial and an honest leaf's devices.

use bytes::Bytes;
use fedge_proto::msg::UploadBegin;
use fedge_proto::sign::{PartialAggregate, SigningKey, UpdateManifest};
use fedge_proto::{AggMsg, DeviceMsg, ModelVersion, RejectCode, wire};
use prost::Message;

use crate::raw;
use crate::treekit;
use raw::Raw;
use treekit::{DIM, Wavy, devices, leaf, leaf_key, model, published, root, start};

/// A partial's float64 payload of `values`, whatever they are (the stock
/// encoder refuses non-finite values; an attacker's does not).
fn payload(values: &[f64]) -> Bytes {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_payload(fedge_proto::update::PARTIAL_CODEC, values.len(), data)
}

/// A payload of `dimension` coordinates in `codec` with `data` as its body.
fn raw_payload(codec: &str, dimension: usize, data: Vec<u8>) -> Bytes {
    wire::UpdatePayload {
        codec: codec.into(),
        dimension: dimension as u64,
        data: data.into(),
        seed: 0,
        zstd: false,
    }
    .encode_to_vec()
    .into()
}

/// A partial aggregate of `values` claiming `devices` and `weight`,
/// signed by `signer` in the name of `named`.
fn partial(
    federation: [u8; 32],
    signer: &SigningKey,
    named: &SigningKey,
    task: (u64, ModelVersion),
    values: &[f64],
    claims: (u32, f64),
) -> (UploadBegin, Bytes) {
    signed(federation, signer, named, task, payload(values), claims)
}

/// `payload` as a partial aggregate, signed as [`partial`] signs one.
fn signed(
    federation: [u8; 32],
    signer: &SigningKey,
    named: &SigningKey,
    (round_id, version): (u64, ModelVersion),
    payload: Bytes,
    (devices, weight): (u32, f64),
) -> (UploadBegin, Bytes) {
    let manifest = UpdateManifest {
        round_id,
        model_version: version,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: 10,
        metrics: vec![],
        device_public_key: named.verifying_key(),
        federation_id: federation,
        partial: Some(PartialAggregate {
            total_weight: weight,
            devices,
            manifests_root: [1; 32],
        }),
    };
    let signature = manifest.sign(signer);
    let begin = UploadBegin {
        manifest,
        signature,
        chunk_bytes: 1 << 16,
    };
    (begin, payload)
}

/// Announces and sends `up`; the root's answer once it has all of it (or
/// refused the announcement).
async fn send(c: &mut Raw, up: &(UploadBegin, Bytes)) -> AggMsg {
    c.send(&DeviceMsg::UploadBegin(Box::new(up.0.clone())))
        .await;
    match c.recv().await {
        AggMsg::UploadStatus { next_index: 0, .. } => {}
        other => return other,
    }
    c.send(&DeviceMsg::UploadChunk {
        payload_hash: up.0.manifest.payload_hash,
        index: 0,
        data: up.1.clone(),
    })
    .await;
    c.recv().await
}

fn rejected(m: AggMsg, code: RejectCode) -> String {
    match m {
        AggMsg::Reject {
            code: c,
            detail,
            fatal: false,
        } if c == code => detail,
        other => panic!("expected a {code} rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_partials_are_refused_and_change_nothing() {
    let keys = [leaf_key(0), leaf_key(1)];
    let top = start(root(&keys, 2, 2, 1), None, model()).await;
    let (addr, fp) = (top.addr, top.fingerprint);

    // A key that is no leaf of this root.
    let mut stranger = Raw::connect(addr, fp).await;
    stranger
        .hello(&leaf_key(9), fedge_proto::SCHEMA_VERSION)
        .await;
    let AggMsg::Challenge { nonce, .. } = stranger.recv().await else {
        panic!("challenge")
    };
    let signature = fedge_proto::sign::sign_auth(&leaf_key(9), &nonce, &stranger.binding);
    stranger.send(&DeviceMsg::AuthResponse { signature }).await;
    let detail = stranger.expect_reject(RejectCode::AuthFailed, true).await;
    assert!(detail.contains("not one of its leaves"), "{detail}");

    // An allowed leaf that lies.
    let k = &keys[1];
    let mut a = Raw::authenticated(addr, fp, k).await;
    let task = a.offer().await;
    let fed = a.federation;
    let ok = vec![0.5f64; DIM];

    // A device update, not a partial.
    let mut update = partial(fed, k, k, task, &ok, (2, 10.0));
    update.0.manifest.partial = None;
    update.0.signature = update.0.manifest.sign(k);
    let d = rejected(send(&mut a, &update).await, RejectCode::ProtocolViolation);
    assert!(d.contains("partial aggregates"), "{d}");
    // Wrong shape, and a values section that does not match it.
    let long = vec![0.5f64; DIM + 1];
    let m = send(&mut a, &partial(fed, k, k, task, &long, (2, 10.0))).await;
    rejected(m, RejectCode::DimensionMismatch);
    let short = raw_payload(
        fedge_proto::update::PARTIAL_CODEC,
        DIM,
        vec![0; 8 * DIM - 3],
    );
    let m = send(&mut a, &signed(fed, k, k, task, short, (2, 10.0))).await;
    let d = rejected(m, RejectCode::Malformed);
    assert!(d.contains("partial.values"), "{d}");
    // A float32 payload: a partial travels at float64 only.
    let f32s: Vec<u8> = ok.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    let dense = raw_payload("dense-f32", DIM, f32s);
    let m = send(&mut a, &signed(fed, k, k, task, dense, (2, 10.0))).await;
    let d = rejected(m, RejectCode::Malformed);
    assert!(d.contains("dense-f64"), "{d}");
    // NaN, Inf, and a value float32 cannot hold.
    for (i, bad) in [(3, f64::NAN), (0, f64::INFINITY), (5, -1e39)] {
        let mut values = ok.clone();
        values[i] = bad;
        let m = send(&mut a, &partial(fed, k, k, task, &values, (2, 10.0))).await;
        let d = rejected(m, RejectCode::NonFinite);
        assert!(d.contains(&format!("index {i}")), "{d}");
    }
    // An announcement no codec makes for this model: nothing is reserved.
    let mut huge = partial(fed, k, k, task, &ok, (2, 10.0));
    huge.0.manifest.payload_bytes = 100 << 20;
    huge.0.signature = huge.0.manifest.sign(k);
    rejected(send(&mut a, &huge).await, RejectCode::TooLarge);
    // One byte past the largest float64 partial of this model.
    huge.0.manifest.payload_bytes = fedge_proto::update::partial_payload_bytes_max(DIM as u64) + 1;
    huge.0.signature = huge.0.manifest.sign(k);
    rejected(send(&mut a, &huge).await, RejectCode::TooLarge);
    // More devices than a partial may combine, and more weight than its
    // devices can carry (100 each).
    let m = send(&mut a, &partial(fed, k, k, task, &ok, (1000, 10.0))).await;
    rejected(m, RejectCode::TooLarge);
    let m = send(&mut a, &partial(fed, k, k, task, &ok, (2, 201.0))).await;
    let d = rejected(m, RejectCode::WeightBound);
    assert!(d.contains("201"), "{d}");
    // Another base model.
    let other = (task.0, ModelVersion([0xcd; 32]));
    let m = send(&mut a, &partial(fed, k, k, other, &ok, (2, 10.0))).await;
    rejected(m, RejectCode::UnknownModelVersion);
    // Signed by another key in this leaf's name.
    let m = send(&mut a, &partial(fed, &leaf_key(7), k, task, &ok, (2, 10.0))).await;
    rejected(m, RejectCode::BadSignature);
    // The one valid partial: weight 10, every value 0.5.
    let good = partial(fed, k, k, task, &ok, (2, 10.0));
    assert!(matches!(
        send(&mut a, &good).await,
        AggMsg::UpdateAccepted { round_id: 1, .. }
    ));
    // Sent again.
    a.send(&DeviceMsg::UploadBegin(Box::new(good.0.clone())))
        .await;
    a.expect_reject(RejectCode::Replay, false).await;
    // A weight that is not a number never reaches the root's state: the
    // message is refused where it is decoded, and the connection closed.
    let mut nan_weight = partial(fed, k, k, task, &ok, (2, 10.0));
    if let Some(p) = nan_weight.0.manifest.partial.as_mut() {
        p.total_weight = f64::NAN;
    }
    a.send(&DeviceMsg::UploadBegin(Box::new(nan_weight.0)))
        .await;
    a.expect_reject(RejectCode::Malformed, true).await;

    // An honest leaf with two devices completes the round.
    let l = start(leaf(2), Some((top.link(), keys[0].clone())), model()).await;
    treekit::join(devices(l.addr, l.fingerprint, [0, 1])).await;
    l.finish().await;
    let (report, mut events) = top.finish().await;
    assert_eq!(report.rounds_published, 1);

    // (10 x 0.5 + W x honest mean) / (10 + W), W the honest devices' samples.
    let initial = model();
    let (mut sum, mut w) = (vec![0.0f64; DIM], 0.0);
    for id in [0u8, 1] {
        let samples = 3 + 2 * u64::from(id);
        let out = fedge_device::trainer::Trainer::train(
            &mut Wavy { id, samples },
            1,
            &initial,
            &Default::default(),
        )
        .unwrap();
        for (s, d) in sum.iter_mut().zip(&out.delta) {
            *s += samples as f64 * f64::from(*d);
        }
        w += samples as f64;
    }
    // The honest leaf's partial travels at float64: its mean as computed.
    let honest: Vec<f64> = sum.iter().map(|s| s / w).collect();
    let pub_ = published(&mut events);
    assert_eq!(pub_.len(), 1);
    for (i, got) in pub_[0].1.iter().enumerate() {
        let step = ((10.0 * 0.5 + w * honest[i]) / (10.0 + w)) as f32;
        let expect = initial.params.values[i] + step;
        assert!(
            (got - expect).abs() <= 1e-7,
            "parameter {i}: {got} != {expect}"
        );
    }
}
