//! Lossless downlink deltas between model versions (see `ModelDelta` in
//! fedge.proto). A device holding version v fetches `delta(v, v')` instead
//! of v' when it is smaller; the result is bit-exact, which the target's
//! content hash proves.

use prost::Message;

use crate::codec::entropy;
use crate::{Limits, ModelBlob, ModelVersion, ProtoError, wire};

/// The delta from `base` to `target`, or `None` when they differ in graph
/// or layout (then only the full model will do). On a model larger than
/// twice [`ESTIMATE_SAMPLE_WORDS`], the XOR's byte planes that a sample
/// says do not compress (those of mantissa bits a dense step changes)
/// are stored raw instead of being searched for matches in vain.
pub fn encode(base: &ModelBlob, target: &ModelBlob) -> Option<Vec<u8>> {
    let planes = sampled_planes(base, target)?;
    Some(build(base, target, planes.as_ref()))
}

/// The delta with the whole XOR compressed, every plane searched for
/// matches: what [`encode`] made before it sampled the planes first. For
/// benchmarks and tests (`delta_bench` times both); `None` as for
/// [`encode`].
#[doc(hidden)]
pub fn encode_whole(base: &ModelBlob, target: &ModelBlob) -> Option<Vec<u8>> {
    sampled_planes(base, target)?;
    Some(build(base, target, None))
}

/// Words of a model an estimate compresses ([`estimate_bytes`]), at most:
/// a model up to twice this is compressed whole instead.
pub const ESTIMATE_SAMPLE_WORDS: usize = 16 << 10;

/// Evenly spaced runs of consecutive words the sample is made of (layers
/// differ; a run keeps the neighbours zstd finds its matches among).
const ESTIMATE_RUNS: usize = 16;

/// A plane whose sample compresses to more than this (in 1/64ths) is
/// stored raw: zstd would find next to nothing in it.
const RAW_PLANE_64THS: u64 = 62;

/// The fields around a delta's body: two versions, the dimension, tags,
/// the zstd frame's header.
const DELTA_ENVELOPE_BYTES: u64 = 96;

/// What a sample says of each byte plane of the XOR: its compressed
/// bytes scaled to the whole plane.
type Planes = [u64; 4];

/// About the size [`encode`] gives, from a sample of the XOR words
/// ([`ESTIMATE_SAMPLE_WORDS`] in [`ESTIMATE_RUNS`] runs, each byte plane
/// compressed on its own as zstd's blocks would): a sixteenth of the work
/// on a model of 256 Ki parameters, less on larger ones. On a model up to
/// twice the sample, the exact size. `None` as for [`encode`].
pub fn estimate_bytes(base: &ModelBlob, target: &ModelBlob) -> Option<u64> {
    match sampled_planes(base, target)? {
        Some(planes) => Some(planes.iter().sum::<u64>() + DELTA_ENVELOPE_BYTES),
        None => encode(base, target).map(|d| d.len() as u64),
    }
}

/// The delta from `base` to `target` when it is smaller than `bytes_max`
/// (the full model's size), else `None` (as for [`encode`] too). On a
/// model larger than twice [`ESTIMATE_SAMPLE_WORDS`] the sample comes
/// first (it also says which planes to store raw), and nothing is built
/// when its estimate is not under `bytes_max`: an XOR that does not
/// compress below the model costs a sample, not a build. (The estimate
/// compresses each plane apart, where the delta's zstd blocks straddle
/// planes: it errs low, towards building.)
pub fn encode_smaller_than(
    base: &ModelBlob,
    target: &ModelBlob,
    bytes_max: u64,
) -> Option<Vec<u8>> {
    let planes = sampled_planes(base, target)?;
    if let Some(p) = &planes {
        let estimate = p.iter().sum::<u64>() + DELTA_ENVELOPE_BYTES;
        if estimate >= bytes_max {
            return None;
        }
    }
    Some(build(base, target, planes.as_ref())).filter(|d| (d.len() as u64) < bytes_max)
}

/// `None` when the models differ in shape; `Some(None)` for a model small
/// enough to compress whole; else what a sample says of each plane.
fn sampled_planes(base: &ModelBlob, target: &ModelBlob) -> Option<Option<Planes>> {
    if base.onnx_graph != target.onnx_graph || base.params.layout != target.params.layout {
        return None;
    }
    let n = base.params.values.len();
    if n <= 2 * ESTIMATE_SAMPLE_WORDS {
        return Some(None);
    }
    let runs = sample_runs(n);
    let words: usize = runs.iter().map(|(_, len)| len).sum();
    let body = xor_planes(&base.params.values, &target.params.values, &runs);
    let mut planes = [0u64; 4];
    for (k, plane) in body.chunks(words).enumerate() {
        let sampled = entropy::compress(plane).len() as u128;
        // Scaled from the sample's words to the model's.
        planes[k] =
            u64::try_from((sampled * n as u128).div_ceil(words as u128)).unwrap_or(u64::MAX);
    }
    Some(Some(planes))
}

/// The delta: the whole XOR compressed, or (with a sample's `planes`)
/// the planes that compress compressed and the ones around them raw.
fn build(base: &ModelBlob, target: &ModelBlob, planes: Option<&Planes>) -> Vec<u8> {
    let n = base.params.values.len();
    let body = xor_planes(&base.params.values, &target.params.values, &[(0, n)]);
    let zstd_body = match planes {
        None => entropy::compress(&body),
        Some(p) => {
            let compresses = |k: &usize| p[*k] * 64 < RAW_PLANE_64THS * n as u64;
            let first = (0..4).find(compresses);
            let last = (0..4).rev().find(compresses);
            let part = match (first, last) {
                (Some(a), Some(b)) => a * n..(b + 1) * n,
                _ => 0..0,
            };
            entropy::compress_part(&body, part)
        }
    };
    wire::ModelDelta {
        base_version: base.version().0.to_vec().into(),
        target_version: target.version().0.to_vec().into(),
        dimension: n as u64,
        zstd_body: zstd_body.into(),
        steps: Vec::new(),
    }
    .encode_to_vec()
}

/// `(start, len)` runs of the words a sample takes: [`ESTIMATE_RUNS`]
/// evenly spaced runs of equal length (`n` is over twice
/// [`ESTIMATE_SAMPLE_WORDS`]).
fn sample_runs(n: usize) -> Vec<(usize, usize)> {
    let len = ESTIMATE_SAMPLE_WORDS / ESTIMATE_RUNS;
    (0..ESTIMATE_RUNS)
        .map(|r| (r * (n - len) / (ESTIMATE_RUNS - 1), len))
        .collect()
}

/// The XOR of `base` and `target` over `runs` of words, as byte planes:
/// every word's lowest byte first, then every word's second byte, and so
/// on (what [`apply`] reads back for one run over the whole model).
fn xor_planes(base: &[f32], target: &[f32], runs: &[(usize, usize)]) -> Vec<u8> {
    let words: usize = runs.iter().map(|(_, len)| len).sum();
    let mut body = vec![0u8; 4 * words];
    let mut i = 0;
    for &(start, len) in runs {
        for (a, b) in base[start..start + len]
            .iter()
            .zip(&target[start..start + len])
        {
            let x = (a.to_bits() ^ b.to_bits()).to_le_bytes();
            for (k, byte) in x.iter().enumerate() {
                body[k * words + i] = *byte;
            }
            i += 1;
        }
    }
    body
}

/// Most compressed steps one delta may chain.
pub const STEPS_MAX: usize = 64;

/// Adds a decoded compressed step to `params` (where it is not 0): how the
/// aggregator publishes a compressed step and how a device replays it, so
/// both get the same bits.
pub fn apply_step(params: &mut [f32], step: &[f32]) {
    for (p, &v) in params.iter_mut().zip(step) {
        if v != 0.0 {
            *p += v;
        }
    }
}

/// A delta made of the aggregator's compressed steps (update payloads)
/// from `base` to `target`, applied in order with [`apply_step`].
pub fn encode_steps(
    base: ModelVersion,
    target: ModelVersion,
    dimension: usize,
    steps: &[bytes::Bytes],
) -> Vec<u8> {
    wire::ModelDelta {
        base_version: base.0.to_vec().into(),
        target_version: target.0.to_vec().into(),
        dimension: dimension as u64,
        zstd_body: Default::default(),
        steps: steps.to_vec(),
    }
    .encode_to_vec()
}

/// Apply a delta to `base`, checking everything: the base it was made for,
/// the dimension, the decompressed size (or each step's payload), and the
/// target's content hash.
pub fn apply(base: &ModelBlob, delta: &[u8], limits: &Limits) -> Result<ModelBlob, ProtoError> {
    let d = wire::ModelDelta::decode(delta)?;
    let base_version = ModelVersion::from_slice("delta.base_version", &d.base_version)?;
    let target_version = ModelVersion::from_slice("delta.target_version", &d.target_version)?;
    if base_version != base.version() {
        return Err(ProtoError::Invalid {
            field: "delta.base_version",
            reason: format!(
                "delta is from {base_version}, the device holds {}",
                base.version()
            ),
        });
    }
    let n = base.params.values.len();
    Limits::check("delta dimension", d.dimension, limits.update_dimension_max)?;
    if d.dimension != n as u64 {
        return Err(ProtoError::DimensionMismatch {
            expected: n as u64,
            got: d.dimension,
        });
    }
    if !d.steps.is_empty() {
        Limits::check("delta steps", d.steps.len() as u64, STEPS_MAX as u64)?;
        if !d.zstd_body.is_empty() {
            return Err(ProtoError::Invalid {
                field: "delta.zstd_body",
                reason: "a delta of steps carries no XOR body".into(),
            });
        }
        let mut values = base.params.values.clone();
        for step in &d.steps {
            apply_step(&mut values, &crate::update::decode_update(step, n, limits)?);
        }
        return finish(base, values, target_version);
    }
    let body = entropy::decompress_bounded(&d.zstd_body, 4 * n as u64)?;
    if body.len() != 4 * n {
        return Err(ProtoError::BadLength {
            field: "delta.body",
            expected: 4 * n,
            got: body.len(),
        });
    }
    let values: Vec<f32> = base
        .params
        .values
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let x = u32::from_le_bytes([body[i], body[n + i], body[2 * n + i], body[3 * n + i]]);
            f32::from_bits(a.to_bits() ^ x)
        })
        .collect();
    finish(base, values, target_version)
}

/// The target from the base's graph and layout and `values`, if its
/// content hash is the one the delta names.
fn finish(
    base: &ModelBlob,
    values: Vec<f32>,
    target_version: ModelVersion,
) -> Result<ModelBlob, ProtoError> {
    let target = ModelBlob {
        onnx_graph: base.onnx_graph.clone(),
        params: crate::Params::new(base.params.layout.clone(), values)?,
    };
    let got = target.version();
    if got != target_version {
        return Err(ProtoError::HashMismatch {
            expected: target_version.to_hex(),
            got: got.to_hex(),
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParamLayout, Params, TensorSpec};
    use std::sync::Arc;

    fn blob(values: Vec<f32>) -> ModelBlob {
        let layout =
            Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[values.len()])]).unwrap());
        ModelBlob {
            onnx_graph: bytes::Bytes::from_static(b"g"),
            params: Params::new(layout, values).unwrap(),
        }
    }

    /// A chain of compressed steps replays to the very bits the sender
    /// published; a step too many, a tampered step or a mixed delta is
    /// refused.
    #[test]
    fn step_chains_replay_bit_exactly() {
        let n = 4096;
        let base = blob((0..n).map(|i| (i as f32 * 0.37).sin()).collect());
        let spec = crate::codec::CodecSpec::parse("topk:0.05+q8").unwrap();
        let mut values = base.params.values.clone();
        let mut steps = Vec::new();
        for k in 0..3u64 {
            let step: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 7 + k) % 13) as f32 * 1e-3)
                .collect();
            let (payload, sent) = crate::codec::encode_with_transmitted(&spec, &step, k).unwrap();
            apply_step(&mut values, &sent);
            steps.push(payload);
        }
        let target = blob(values);
        let limits = Limits::default();
        let d = encode_steps(base.version(), target.version(), n, &steps);
        let back = apply(&base, &d, &limits).unwrap();
        assert_eq!(back.encode(), target.encode(), "bit-exact");
        assert!(d.len() * 5 < target.encode().len(), "{} bytes", d.len());
        // A step missing, or one changed: not the target.
        let short = encode_steps(base.version(), target.version(), n, &steps[1..]);
        assert!(matches!(
            apply(&base, &short, &limits),
            Err(ProtoError::HashMismatch { .. })
        ));
        let too_many = vec![steps[0].clone(); STEPS_MAX + 1];
        let d = encode_steps(base.version(), target.version(), n, &too_many);
        assert!(apply(&base, &d, &limits).is_err());
        // Steps and an XOR body together are malformed.
        let mut w = wire::ModelDelta::decode(
            &encode_steps(base.version(), target.version(), n, &steps)[..],
        )
        .unwrap();
        w.zstd_body = vec![1, 2, 3].into();
        assert!(apply(&base, &w.encode_to_vec(), &limits).is_err());
    }

    #[test]
    fn deltas_are_bit_exact_and_small_for_small_steps() {
        let n = 4096;
        let base = blob((0..n).map(|i| (i as f32 * 0.37).sin()).collect());
        // One SGD-like step on 10% of the coordinates.
        let target = blob(
            base.params
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if i % 10 == 0 {
                        v - 1e-3 * v.signum()
                    } else {
                        *v
                    }
                })
                .collect(),
        );
        let d = encode(&base, &target).unwrap();
        let back = apply(&base, &d, &Limits::default()).unwrap();
        assert_eq!(back.encode(), target.encode(), "bit-exact");
        assert!(
            d.len() * 3 < target.encode().len(),
            "delta {} bytes vs model {}",
            d.len(),
            target.encode().len()
        );
    }

    /// A model of `n` parameters of about a trained layer's size, and one
    /// step from it: every parameter moved by about `relative` of its
    /// size (dense), or every `every`-th one (sparse).
    fn stepped(n: usize, relative: f32, every: usize) -> (ModelBlob, ModelBlob) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut unit = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let base: Vec<f32> = (0..n).map(|_| unit() * 0.1).collect();
        let target = (base.iter().enumerate())
            .map(|(i, v)| {
                if i % every == 0 {
                    v + v * relative * unit()
                } else {
                    *v
                }
            })
            .collect();
        (blob(base), blob(target))
    }

    /// On models past the sample size: dense and sparse steps' deltas read
    /// back bit-exact (raw planes and compressed ones in one frame); the
    /// estimate is at most a 20th over the delta (over would skip a delta
    /// that wins) and at least half of it (it errs low: a sample of short
    /// runs, each plane compressed apart); a dense step's delta is
    /// still smaller than the model (its exponent bytes compress), and
    /// `encode_smaller_than` builds the same bytes as `encode` when the
    /// delta wins.
    #[test]
    fn large_deltas_read_back_and_are_estimated() {
        let n = 5 * ESTIMATE_SAMPLE_WORDS + 123;
        let l = Limits::default();
        for (relative, every) in [(0.01, 1), (0.2, 1), (0.01, 50), (0.01, 3)] {
            let (base, target) = stepped(n, relative, every);
            let full = target.encode().len() as u64;
            let d = encode(&base, &target).unwrap();
            assert_eq!(apply(&base, &d, &l).unwrap().encode(), target.encode());
            let (est, got) = (estimate_bytes(&base, &target).unwrap(), d.len() as u64);
            assert!(
                est * 20 <= got * 21 && est * 2 >= got,
                "{relative} 1/{every}: {est} vs {got}"
            );
            assert!(got < full, "{relative} 1/{every}: {got} >= {full}");
            assert_eq!(encode_smaller_than(&base, &target, full), Some(d));
        }
    }

    /// An XOR that cannot win (two unrelated models) is not built: the
    /// sample says so. Below the sample size, the exact size decides.
    #[test]
    fn deltas_that_cannot_win_are_not_built() {
        let n = 3 * ESTIMATE_SAMPLE_WORDS;
        let (base, _) = stepped(n, 0.0, 1);
        // Every bit of every word random (a finite float each).
        let mut x = 0x1234_5678_9abc_def1u64;
        let other = blob(
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let v = f32::from_bits(x as u32);
                    if v.is_finite() { v } else { 1.0 }
                })
                .collect(),
        );
        let full = other.encode().len() as u64;
        assert!(estimate_bytes(&base, &other).unwrap() > full);
        assert_eq!(encode_smaller_than(&base, &other, full), None);
        let d = encode(&base, &other).unwrap();
        assert_eq!(
            apply(&base, &d, &Limits::default()).unwrap().encode(),
            other.encode()
        );
        let (small, small_other) = stepped(100, 0.01, 1);
        let d = encode(&small, &small_other).unwrap();
        let len = d.len() as u64;
        assert_eq!(encode_smaller_than(&small, &small_other, len + 1), Some(d));
        assert_eq!(encode_smaller_than(&small, &small_other, len), None);
    }

    #[test]
    fn bad_deltas_are_typed_errors() {
        let l = Limits::default();
        let base = blob(vec![1.0, 2.0, 3.0]);
        let target = blob(vec![1.0, 2.5, 3.0]);
        let other = blob(vec![9.0, 2.0, 3.0]);
        let d = encode(&base, &target).unwrap();
        assert!(matches!(
            apply(&other, &d, &l),
            Err(ProtoError::Invalid {
                field: "delta.base_version",
                ..
            })
        ));
        let mut w = wire::ModelDelta::decode(&d[..]).unwrap();
        w.dimension = 4;
        assert!(matches!(
            apply(&base, &w.encode_to_vec(), &l),
            Err(ProtoError::DimensionMismatch { .. })
        ));
        let mut w = wire::ModelDelta::decode(&d[..]).unwrap();
        w.target_version = vec![0; 32].into();
        assert!(matches!(
            apply(&base, &w.encode_to_vec(), &l),
            Err(ProtoError::HashMismatch { .. })
        ));
        let mut w = wire::ModelDelta::decode(&d[..]).unwrap();
        w.zstd_body = entropy::compress(&[0u8; 100]).into();
        assert!(apply(&base, &w.encode_to_vec(), &l).is_err());
        assert!(apply(&base, &[0xff, 0xff], &l).is_err());
        let mut bigger = blob(vec![1.0, 2.0, 3.0, 4.0]);
        assert!(encode(&base, &bigger).is_none());
        bigger.onnx_graph = bytes::Bytes::new();
        assert!(encode(&base, &bigger).is_none());
    }
}
