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
        }
        .encode_to_vec(),
    )
}

/// Apply a delta to `base`, checking everything: the base it was made for,
/// the dimension, the decompressed size, and the target's content hash.
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
