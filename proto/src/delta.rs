//! Lossless downlink deltas between model versions (see `ModelDelta` in
//! fedge.proto). A device holding version v fetches `delta(v, v')` instead
//! of v' when it is smaller; the result is bit-exact, which the target's
//! content hash proves.

use prost::Message;

use crate::codec::entropy;
use crate::{Limits, ModelBlob, ModelVersion, ProtoError, wire};

/// The delta from `base` to `target`, or `None` when they differ in graph
/// or layout (then only the full model will do).
pub fn encode(base: &ModelBlob, target: &ModelBlob) -> Option<Vec<u8>> {
    if base.onnx_graph != target.onnx_graph || base.params.layout != target.params.layout {
        return None;
    }
    let n = base.params.values.len();
    let mut body = vec![0u8; 4 * n];
    for (i, (a, b)) in base
        .params
        .values
        .iter()
        .zip(&target.params.values)
        .enumerate()
    {
        let x = (a.to_bits() ^ b.to_bits()).to_le_bytes();
        for (k, byte) in x.iter().enumerate() {
            body[k * n + i] = *byte;
        }
    }
    Some(
        wire::ModelDelta {
            base_version: base.version().0.to_vec().into(),
            target_version: target.version().0.to_vec().into(),
            dimension: n as u64,
            zstd_body: entropy::compress(&body).into(),
            steps: Vec::new(),
        }
        .encode_to_vec(),
    )
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
