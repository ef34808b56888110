//! Fuzzing entry points: one function a decoder, shared by the cargo-fuzz
//! targets in `fuzz/` and the corpus replay test (`tests/fuzz_corpus.rs`),
//! so CI replays exactly what the fuzzers ran.
//!
//! Each `run` takes arbitrary bytes, feeds them to a decoder and panics if
//! an invariant breaks: the decoder itself panics, accepts something its
//! own checks should refuse, or an accepted value does not survive
//! `decode(encode(x)) == x`. A refused input is fine; a panic is the bug.
//!
//! Some targets read a few leading bytes as parameters (a dimension, a
//! limit, a codec from a table) and hand the rest to the decoder; each
//! function's doc says how. [`TARGETS`] is the table the fuzz crate and the
//! replay test both walk; `seeds` are valid encodings made by the real
//! encoders, written to `fuzz/corpus/<name>/` as the starting corpus.
//!
//! **Invariant:** nothing here is on a production path; it only calls the
//! public decoders and encoders.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::codec::{self, CodecSpec, ValueCodec};
use crate::sign::SigningKey;
use crate::{
    AggMsg, DeviceMsg, Limits, ModelBlob, ParamLayout, Params, ProtoError, TensorSpec, delta,
    frame, params, wire,
};

/// One fuzz target: a name (the cargo-fuzz target and the corpus folder),
/// the function that drives the decoder, and seed inputs.
#[derive(Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every decoder of this crate under fuzzing.
/// Replays the committed corpus of each of `targets` (`fuzz/corpus/<name>/`
/// under `repo_root`) through its entry point, as the stable tests of the
/// proto, engine and device crates do: a panic names the target and the
/// file, and an empty corpus folder fails. With `FEDGE_WRITE_FUZZ_SEEDS`
/// set, each target's seeds (valid encodings from the real encoders) are
/// (re)written first as `seed-<hash>`.
pub fn replay_corpus(repo_root: &std::path::Path, targets: &[Target]) {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let write = std::env::var_os("FEDGE_WRITE_FUZZ_SEEDS").is_some();
    for t in targets {
        let dir = repo_root.join("fuzz/corpus").join(t.name);
        if write {
            std::fs::create_dir_all(&dir).expect("corpus folder");
            for s in (t.seeds)() {
                let name = format!("seed-{}", &blake3::hash(&s).to_hex()[..16]);
                std::fs::write(dir.join(name), &s).expect("write seed");
            }
        }
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "fuzz/corpus/{} is empty", t.name);
        for f in &files {
            let bytes = std::fs::read(f).expect("corpus file");
            if catch_unwind(AssertUnwindSafe(|| (t.run)(&bytes))).is_err() {
                panic!("fuzz target `{}` panics on {}", t.name, f.display());
            }
        }
    }
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        run: frame,
        seeds: frame_seeds,
    },
    Target {
        name: "device_msg",
        run: device_msg,
        seeds: device_msg_seeds,
    },
    Target {
        name: "agg_msg",
        run: agg_msg,
        seeds: agg_msg_seeds,
    },
    Target {
        name: "update",
        run: update,
        seeds: update_seeds,
    },
    Target {
        name: "update_body",
        run: update_body,
        seeds: update_body_seeds,
    },
    Target {
        name: "partial",
        run: partial,
        seeds: partial_seeds,
    },
    Target {
        name: "codec_spec",
        run: codec_spec,
        seeds: codec_spec_seeds,
    },
    Target {
        name: "model_blob",
        run: model_blob,
        seeds: model_blob_seeds,
    },
    Target {
        name: "params_f32le",
        run: params_f32le,
        seeds: params_f32le_seeds,
    },
    Target {
        name: "model_delta",
        run: model_delta,
        seeds: model_delta_seeds,
    },
    Target {
        name: "secagg_device_msg",
        run: secagg_device_msg,
        seeds: secagg_device_msg_seeds,
    },
    Target {
        name: "secagg_agg_msg",
        run: secagg_agg_msg,
        seeds: secagg_agg_msg_seeds,
    },
    Target {
        name: "ledger_record",
        run: ledger_record,
        seeds: ledger_record_seeds,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Limits small enough that fuzzed inputs reach every limit check.
fn tight_limits() -> Limits {
    Limits {
        frame_bytes_max: 256,
        chunk_bytes_max: 64,
        transfer_chunks_max: 8,
        model_bytes_max: 1024,
        update_dimension_max: 64,
        tensors_max: 4,
        metrics_max: 2,
        string_bytes_max: 16,
    }
}

/// `n` bytes from the front of `data` (zero-padded), and the rest.
fn split<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut head = [0u8; N];
    let n = data.len().min(N);
    head[..n].copy_from_slice(&data[..n]);
    (head, &data[n..])
}

// ---------------------------------------------------------------- frames

const FRAME_MAXES: [u32; 6] = [0, 1, 16, 64, 4096, u32::MAX];

/// Frames. Byte 0 picks `frame_bytes_max` from a table, byte 1 the size
/// of the pieces the stream arrives in (1..=16 bytes); the rest is the
/// byte stream. Checks [`frame::FrameDecoder`] against a one-shot
/// reference parse, and that re-framing the frames gives the stream back.
pub fn frame(data: &[u8]) {
    let ([max_sel, piece], stream) = split::<2>(data);
    let max = FRAME_MAXES[usize::from(max_sel) % FRAME_MAXES.len()];
    let piece = usize::from(piece % 16) + 1;

    // Reference: walk the headers over the whole stream at once.
    let mut want = Vec::new();
    let mut want_err = None;
    let mut rest = stream;
    while rest.len() >= frame::HEADER_BYTES {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        if len > max {
            want_err = Some(ProtoError::FrameTooLarge {
                len: len.into(),
                max: max.into(),
            });
            break;
        }
        let Some(body) = rest.get(4..4 + len as usize) else {
            break;
        };
        want.push(body.to_vec());
        rest = &rest[4 + len as usize..];
    }

    let mut d = frame::FrameDecoder::new(max);
    let mut got = Vec::new();
    let mut got_err = None;
    'outer: for p in stream.chunks(piece) {
        d.push(p);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.len() as u64 <= u64::from(max), "frame over the limit");
                    got.push(f.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    got_err = Some(e);
                    break 'outer;
                }
            }
        }
    }
    assert_eq!(got, want, "frames differ from the reference parse");
    assert_eq!(got_err, want_err);
    if got_err.is_none() {
        assert_eq!(d.buffered(), rest.len(), "unconsumed bytes");
    }
    let reframed: Vec<u8> = got.iter().flat_map(|f| frame::encode(f).to_vec()).collect();
    assert_eq!(&reframed[..], &stream[..stream.len() - rest.len()]);
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let mut two = vec![4, 3];
    two.extend_from_slice(&frame::encode(b"hello"));
    two.extend_from_slice(&frame::encode(&[]));
    two.extend_from_slice(&frame::encode(&[7; 40]));
    let mut msg = vec![3, 15];
    msg.extend_from_slice(&frame::encode(&DeviceMsg::Heartbeat { seq: 1 }.encode()));
    let mut oversized = vec![2, 0];
    oversized.extend_from_slice(&frame::encode(&[1; 17]));
    let mut torn = vec![5, 7];
    torn.extend_from_slice(&frame::encode(&[9; 30])[..20]);
    vec![two, msg, oversized, torn]
}

// -------------------------------------------------------------- messages

/// A device message (one frame body, as the aggregator receives it).
/// Decoded under the default and under tight limits: whatever the tight
/// limits accept the default ones accept too, identically; an accepted
/// message re-encodes canonically and decodes to itself.
pub fn device_msg(data: &[u8]) {
    let wide = DeviceMsg::decode(data, &Limits::default());
    let tight = DeviceMsg::decode(data, &tight_limits());
    if let Ok(t) = &tight {
        assert_eq!(
            wide.as_ref(),
            Ok(t),
            "tight limits accept what default refuse"
        );
    }
    if let Ok(m) = wide {
        let bytes = m.encode();
        let back = DeviceMsg::decode(&bytes, &Limits::default()).expect("own encoding decodes");
        assert_eq!(back, m);
        assert_eq!(back.encode(), bytes, "encoding is canonical");
    }
}

/// An aggregator message (one frame body, as a device receives it);
/// checked like [`device_msg`].
pub fn agg_msg(data: &[u8]) {
    let wide = AggMsg::decode(data, &Limits::default());
    let tight = AggMsg::decode(data, &tight_limits());
    if let Ok(t) = &tight {
        assert_eq!(
            wide.as_ref(),
            Ok(t),
            "tight limits accept what default refuse"
        );
    }
    if let Ok(m) = wide {
        let bytes = m.encode();
        let back = AggMsg::decode(&bytes, &Limits::default()).expect("own encoding decodes");
        assert_eq!(back, m);
        assert_eq!(back.encode(), bytes, "encoding is canonical");
    }
}

fn seed_key() -> SigningKey {
    SigningKey::from_bytes(&[5; 32])
}

fn device_msg_seeds() -> Vec<Vec<u8>> {
    device_msg_samples()
        .iter()
        .map(|m| m.encode().to_vec())
        .collect()
}

fn agg_msg_seeds() -> Vec<Vec<u8>> {
    agg_msg_samples()
        .iter()
        .map(|m| m.encode().to_vec())
        .collect()
}

// --------------------------------------------------------------- updates

/// An update payload. Bytes 0..2 are the expected dimension (u16 LE), the
/// rest is the encoded `UpdatePayload`. See [`check_update`].
pub fn update(data: &[u8]) {
    let (dim, payload) = split::<2>(data);
    check_update(payload, usize::from(u16::from_le_bytes(dim)));
}

/// An update body under a well-formed envelope, so the fuzzer spends its
/// time in the value and index sections rather than in protobuf. Byte 0
/// picks a codec from [`BODY_SPECS`], byte 1 bit 0 is the zstd flag,
/// bytes 2..4 the dimension (u16 LE) modulo 1025 (four default blocks:
/// small enough to keep executions fast; [`update`] reaches larger ones),
/// bytes 4..12 the seed; the rest is the body. See [`check_update`].
pub fn update_body(data: &[u8]) {
    let (head, body) = split::<12>(data);
    let spec = BODY_SPECS[usize::from(head[0]) % BODY_SPECS.len()];
    let dimension = u64::from(u16::from_le_bytes([head[2], head[3]])) % 1025;
    let payload = wire::UpdatePayload {
        codec: spec.into(),
        dimension,
        data: body.to_vec().into(),
        seed: u64::from_le_bytes(head[4..12].try_into().expect("8 bytes")),
        zstd: head[1] & 1 == 1,
    }
    .encode_to_vec();
    check_update(&payload, dimension as usize);
}

/// Codecs [`update_body`] picks from: every value codec and sparsifier,
/// short and default blocks, with and without zstd.
pub const BODY_SPECS: [&str; 24] = [
    "dense-f32",
    "f16",
    "bf16",
    "q8",
    "q4",
    "q2",
    "sign",
    "q8/b8",
    "q4/b8",
    "q2/b16",
    "sign/b8",
    "topk:0.1",
    "topk:0.5+f16",
    "topk:0.01+q4",
    "topk:1+q2/b8",
    "topk:0.25+sign/b8",
    "randk:0.1",
    "randk:0.5+bf16",
    "randk:0.05+q8/b8",
    "dense-f32+zstd",
    "q8+zstd",
    "topk:0.1+f16+zstd",
    "topk:0.5+q4/b8+zstd",
    "randk:0.2+sign+zstd",
];

/// Decode `payload` as an update of `dimension` coordinates. An accepted
/// update has that many finite values and re-encodes with its own codec
/// and seed within the payload bound; lossless value codecs (dense-f32,
/// f16, bf16; any sparsifier) decode back to the same values.
pub fn check_update(payload: &[u8], dimension: usize) {
    let Ok(values) = codec::decode(payload, dimension, &Limits::default()) else {
        return;
    };
    assert_eq!(values.len(), dimension);
    assert!(values.iter().all(|v| v.is_finite()));
    let w = wire::UpdatePayload::decode(payload).expect("decoded once");
    let spec = CodecSpec::parse(&w.codec).expect("parsed once");
    let again = codec::encode(&spec, &values, w.seed).expect("finite values encode");
    assert!(again.len() as u64 <= codec::payload_bytes_max(dimension as u64));
    let back = codec::decode(&again, dimension, &Limits::default()).expect("own encoding decodes");
    if matches!(
        spec.values,
        ValueCodec::DenseF32 | ValueCodec::F16 | ValueCodec::Bf16
    ) {
        assert_eq!(back, values, "lossless codec `{spec}` changed values");
    }
}

/// A partial aggregate's payload ([`codec::partial`]): bytes 0..2 are
/// the expected dimension (u16 LE), the rest the payload. An accepted
/// payload has that many values, finite in float32's range, and its
/// values re-encode within the bound and decode back bit for bit.
pub fn partial(data: &[u8]) {
    let (dim, payload) = split::<2>(data);
    let dim = usize::from(u16::from_le_bytes(dim));
    let Ok(values) = codec::partial::decode_partial(payload, dim, &Limits::default()) else {
        return;
    };
    assert_eq!(values.len(), dim);
    assert!(
        values
            .iter()
            .all(|v| v.is_finite() && (*v as f32).is_finite())
    );
    let again = codec::partial::encode_partial(&values).expect("accepted values encode");
    assert!(again.len() as u64 <= codec::partial::partial_payload_bytes_max(dim as u64));
    let back = codec::partial::decode_partial(&again, dim, &Limits::default())
        .expect("own encoding decodes");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back), bits(&values));
}

fn partial_seeds() -> Vec<Vec<u8>> {
    [0usize, 1, 5, 64]
        .into_iter()
        .map(|n| {
            let values: Vec<f64> = sample_delta(n)
                .iter()
                .map(|&x| f64::from(x) / 3.0)
                .collect();
            let mut seed = (n as u16).to_le_bytes().to_vec();
            seed.extend_from_slice(&codec::partial::encode_partial(&values).expect("finite"));
            seed
        })
        .collect()
}

fn sample_delta(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3))
        .collect()
}

fn update_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (spec, n) in [
        ("dense-f32", 5),
        ("f16", 9),
        ("bf16", 9),
        ("q8", 300),
        ("q4/b8", 40),
        ("sign", 17),
        ("topk:0.1+q2", 100),
        ("randk:0.3+f16", 33),
        ("q8+zstd", 600),
        ("topk:0.5+zstd", 64),
        ("dense-f32", 0),
    ] {
        let spec = CodecSpec::parse(spec).expect("seed spec");
        let mut seed = (n as u16).to_le_bytes().to_vec();
        seed.extend_from_slice(&codec::encode(&spec, &sample_delta(n), 7).expect("finite"));
        out.push(seed);
    }
    out
}

fn update_body_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, spec) in BODY_SPECS.iter().enumerate() {
        let n = [0usize, 1, 9, 64, 300][i % 5];
        let spec_p = CodecSpec::parse(spec).expect("seed spec");
        let seed = i as u64 * 31;
        let w = wire::UpdatePayload::decode(
            &*codec::encode(&spec_p, &sample_delta(n), seed).expect("finite"),
        )
        .expect("own payload");
        let mut s = vec![i as u8, u8::from(w.zstd)];
        s.extend_from_slice(&(n as u16).to_le_bytes());
        s.extend_from_slice(&seed.to_le_bytes());
        s.extend_from_slice(&w.data);
        out.push(s);
    }
    out
}

/// A codec spec string: whatever parses prints canonically, parses back
/// to itself, and gives sane bounds for a few dimensions.
pub fn codec_spec(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = CodecSpec::parse(s) else {
        return;
    };
    let canonical = spec.to_string();
    assert!(canonical.len() <= codec::SPEC_BYTES_MAX, "`{canonical}`");
    assert_eq!(CodecSpec::parse(&canonical), Ok(spec), "`{canonical}`");
    for n in [0u64, 1, 7, 1000, 1 << 32, u64::MAX] {
        let k = spec.kept(n);
        assert!(k <= n);
        let _ = spec.body_bytes_max(n);
        let _ = codec::payload_bytes_max(n);
    }
}

fn codec_spec_seeds() -> Vec<Vec<u8>> {
    BODY_SPECS
        .iter()
        .chain(&["", "topk:1e-9+q8/b65536+zstd", "randk:0.0000000015+q2/b8"])
        .map(|s| s.as_bytes().to_vec())
        .collect()
}

// ---------------------------------------------------------------- models

/// A model blob. An accepted blob re-encodes to a blob that decodes to
/// itself with the same version.
pub fn model_blob(data: &[u8]) {
    let Ok(b) = ModelBlob::decode(data, &Limits::default()) else {
        return;
    };
    assert!(b.params.values.iter().all(|v| v.is_finite()));
    assert_eq!(b.params.values.len(), b.params.layout.dimension());
    let bytes = b.encode();
    let back = ModelBlob::decode(&bytes, &Limits::default()).expect("own encoding decodes");
    assert_eq!(back, b);
    assert_eq!(back.version(), b.version());
}

/// [`params::decode_f32le`]. Bytes 0..8 are the dimension (u64 LE, any
/// value: the function is public), the rest the data.
pub fn params_f32le(data: &[u8]) {
    let (dim, rest) = split::<8>(data);
    let dimension = u64::from_le_bytes(dim) as usize;
    if let Ok(v) = params::decode_f32le(rest, dimension) {
        assert_eq!(v.len(), dimension);
        assert_eq!(v.len() * 4, rest.len());
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(bytes, rest);
    }
}

/// Base models for [`model_delta`], picked by byte 0.
fn delta_bases() -> Vec<ModelBlob> {
    let blob = |graph: &'static [u8], tensors: Vec<TensorSpec>| {
        let layout = Arc::new(ParamLayout::new(tensors).expect("seed layout"));
        let values = sample_delta(layout.dimension());
        ModelBlob {
            onnx_graph: Bytes::from_static(graph),
            params: Params::new(layout, values).expect("seed params"),
        }
    };
    vec![
        blob(b"", vec![]),
        blob(b"g", vec![TensorSpec::new("w", &[3])]),
        blob(
            b"graph",
            vec![TensorSpec::new("w", &[10, 20]), TensorSpec::new("b", &[20])],
        ),
    ]
}

/// A lossless model delta (see [`delta::apply`]). Byte 0 picks a base
/// model; if byte 1 is odd the rest is the zstd body of a delta with the
/// right base, dimension and an arbitrary target (reaching decompression
/// and the hash check), else it is the whole encoded `ModelDelta`. An
/// applied delta gives a model with the declared version, and the
/// encoder's delta from base to it applies back to it.
pub fn model_delta(data: &[u8]) {
    let ([base_sel, mode], rest) = split::<2>(data);
    let bases = delta_bases();
    let base = &bases[usize::from(base_sel) % bases.len()];
    let wrapped;
    let delta_bytes: &[u8] = if mode & 1 == 1 {
        wrapped = wire::ModelDelta {
            base_version: base.version().0.to_vec().into(),
            target_version: vec![0; 32].into(),
            dimension: base.params.values.len() as u64,
            zstd_body: rest.to_vec().into(),
            steps: Vec::new(),
        }
        .encode_to_vec();
        &wrapped
    } else {
        rest
    };
    let Ok(target) = delta::apply(base, delta_bytes, &Limits::default()) else {
        return;
    };
    let w = wire::ModelDelta::decode(delta_bytes).expect("decoded once");
    assert_eq!(&target.version().0[..], &w.target_version[..]);
    assert_eq!(target.params.layout, base.params.layout);
    let again = delta::encode(base, &target).expect("same graph and layout");
    let back = delta::apply(base, &again, &Limits::default()).expect("own delta applies");
    assert_eq!(back.encode(), target.encode());
}

fn model_blob_seeds() -> Vec<Vec<u8>> {
    delta_bases().iter().map(|b| b.encode().to_vec()).collect()
}

fn params_f32le_seeds() -> Vec<Vec<u8>> {
    [0usize, 1, 5]
        .iter()
        .map(|&n| {
            let mut s = (n as u64).to_le_bytes().to_vec();
            s.extend(sample_delta(n).iter().flat_map(|v| v.to_le_bytes()));
            s
        })
        .collect()
}

fn model_delta_seeds() -> Vec<Vec<u8>> {
    let bases = delta_bases();
    let mut out = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        let mut target = base.clone();
        for (j, v) in target.params.values.iter_mut().enumerate() {
            if j % 3 == 0 {
                *v -= 1e-3;
            }
        }
        let d = delta::encode(base, &target).expect("same layout");
        let mut whole = vec![i as u8, 0];
        whole.extend_from_slice(&d);
        out.push(whole);
        let w = wire::ModelDelta::decode(&d[..]).expect("own delta");
        let mut body = vec![i as u8, 1];
        body.extend_from_slice(&w.zstd_body);
        out.push(body);
        // A delta of two compressed steps (as `[strategy] downlink` makes).
        let spec = crate::codec::CodecSpec::parse("topk:0.25+q8").expect("spec");
        let n = base.params.values.len();
        let mut values = base.params.values.clone();
        let mut steps = Vec::new();
        for k in 0..2u64 {
            let step: Vec<f32> = (0..n).map(|j| ((j as u64 + k) % 7) as f32 * 1e-2).collect();
            let (payload, sent) =
                crate::codec::encode_with_transmitted(&spec, &step, k).expect("finite");
            delta::apply_step(&mut values, &sent);
            steps.push(payload);
        }
        let target = crate::ModelBlob {
            onnx_graph: base.onnx_graph.clone(),
            params: crate::Params::new(base.params.layout.clone(), values).expect("layout"),
        };
        let d = delta::encode_steps(base.version(), target.version(), n, &steps);
        assert!(
            delta::apply(base, &d, &Limits::default()).is_ok(),
            "own steps apply"
        );
        let mut whole = vec![i as u8, 0];
        whole.extend_from_slice(&d);
        out.push(whole);
    }
    out
}

mod samples;
mod secagg;
pub use samples::{agg_msg_samples, device_msg_samples};
pub use secagg::{
    secagg_agg_msg, secagg_agg_msg_samples, secagg_device_msg, secagg_device_msg_samples,
};
use secagg::{secagg_agg_msg_seeds, secagg_device_msg_seeds};

// ---------------------------------------------------------------- ledger

/// A ledger record ([`crate::ledger::LedgerRecord`], formats 2 to 4). The
/// decoder is total: what it accepts encodes back to the same bytes.
pub fn ledger_record(data: &[u8]) {
    use crate::ledger::LedgerRecord;
    let Ok(r) = LedgerRecord::decode(data) else {
        return;
    };
    assert_eq!(r.encode(), data, "accepted bytes re-encode as they were");
}

/// A record of two entries in each format and with each section.
fn ledger_record_seeds() -> Vec<Vec<u8>> {
    use crate::ledger::*;
    let mut base = LedgerRecord {
        seq: 2,
        round_id: 5,
        prev_hash: [1; 32],
        model_before: [2; 32],
        model_after: [3; 32],
        scoring_seed: [4; 32],
        validation_samples: 64,
        score_method: METHOD_CLASS_GAIN,
        server_lr: 1.0,
        reward_pool: 100,
        reward_cap: 0.5,
        stake_transform: STAKE_SQRT,
        stake_param: 0.0,
        entries: (0..2u8)
            .map(|i| LedgerEntry {
                device: [10 + i; 32],
                manifest_hash: [i; 32],
                payload_hash: [20 + i; 32],
                stake: 1.0,
                weight: 0.5,
                score: 0.25,
                flags: 0,
                reward: 50,
            })
            .collect(),
        penalties: Vec::new(),
        reward_root: [0; 32],
        evaluation: None,
        staleness: None,
        flag_rules: None,
    };
    base.reward_root = base.compute_reward_root();
    let evaluation = LedgerEvaluation {
        flags: EVAL_VALIDATION_LOSS,
        devices: 0,
        weight: 0.0,
        loss: 0.0,
        accuracy: 0.0,
        reports_root: [0; 32],
        validation_examples: 10,
        validation_loss: 0.5,
        validation_accuracy: 0.0,
    };
    let staleness = LedgerStaleness {
        exponent: 0.5,
        entries: vec![StaleEntry {
            entry: 1,
            task_round: 4,
            discount: 0.5f64.sqrt(),
        }],
    };
    let rules = LedgerFlagRules {
        copy_cosine_min: 0.99,
        free_rider_norm_ratio: 0.05,
        noise_sigmas: 3.0,
        order: vec![1, 0],
    };
    // Plain (2), evaluated (3), then format 4: with flag rules, with
    // stale entries, with both and the evaluation.
    [
        (false, false, false),
        (true, false, false),
        (false, false, true),
        (false, true, false),
        (true, true, true),
    ]
    .into_iter()
    .map(|(eval, stale, flags)| {
        let mut r = base.clone();
        r.evaluation = eval.then(|| evaluation.clone());
        r.staleness = stale.then(|| staleness.clone());
        r.flag_rules = flags.then(|| rules.clone());
        r.encode()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_their_targets() {
        for t in TARGETS {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{}", t.name);
            for s in seeds {
                (t.run)(&s);
            }
            (t.run)(&[]);
        }
    }
}
