//! A partial aggregate's payload: the combined update a leaf aggregator
//! forwards to its parent, at float64 precision (codec `dense-f64`, not a
//! [`CodecSpec`](super::CodecSpec): devices cannot name it, and a parent
//! takes nothing else for a partial).
//!
//! A leaf's partial is its devices' weighted mean delta. Sent as float32
//! it would be rounded once at the leaf and again at the parent, and the
//! parent's mean would drift from one aggregator's by about an ulp a
//! round; at float64 the parent's mean is one aggregator's to about 1e-16
//! relative, which the final rounding to float32 removes.
//!
//! Layout: an [`UpdatePayload`](crate::wire::UpdatePayload) with codec
//! `dense-f64`, the dimension, `data` = `dimension` x f64 little-endian,
//! seed 0 and no zstd (one canonical encoding for given values).
//!
//! [`decode_partial`] refuses, each with a typed [`ProtoError`]: a
//! dimension over `limits.update_dimension_max` (checked before any
//! allocation) or not the expected one, any other codec, a seed or a zstd
//! flag, a `data` section of another length than `8 x dimension`, and a
//! value that is NaN, infinite or outside float32's range (a mean of
//! float32 updates never is; rounded to float32 it would be infinite).

use bytes::Bytes;
use prost::Message;

use super::{DIMENSION_MAX, EncodeError, bits};
use crate::{Limits, ProtoError, wire};

/// The codec name a partial aggregate's payload carries.
pub const PARTIAL_CODEC: &str = "dense-f64";

/// Bytes per coordinate.
const VALUE_BYTES: u64 = 8;

/// Largest encoded partial payload (envelope included) for `dimension`
/// coordinates: the values, and the tags, varints and codec string of
/// the envelope. A parent refuses a partial's manifest announcing more.
pub fn partial_payload_bytes_max(dimension: u64) -> u64 {
    let envelope = 3 * (1 + bits::VARINT_BYTES_MAX as u64) + 1 + PARTIAL_CODEC.len() as u64;
    dimension
        .saturating_mul(VALUE_BYTES)
        .saturating_add(envelope)
}

/// Encodes a partial aggregate's combined update.
pub fn encode_partial(values: &[f64]) -> Result<Bytes, EncodeError> {
    if values.len() as u64 > DIMENSION_MAX {
        return Err(EncodeError::DimensionTooLarge {
            dimension: values.len() as u64,
            max: DIMENSION_MAX,
        });
    }
    if let Some(index) = values.iter().position(|v| !in_range(*v)) {
        return Err(EncodeError::NonFinite {
            index: index as u64,
            value: values[index] as f32,
        });
    }
    let mut data = Vec::with_capacity(values.len() * VALUE_BYTES as usize);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let payload = wire::UpdatePayload {
        codec: PARTIAL_CODEC.into(),
        dimension: values.len() as u64,
        data: data.into(),
        seed: 0,
        zstd: false,
    }
    .encode_to_vec();
    debug_assert!(payload.len() as u64 <= partial_payload_bytes_max(values.len() as u64));
    Ok(payload.into())
}

/// Decodes a partial aggregate's payload of `expected_dimension` values.
pub fn decode_partial(
    bytes: &[u8],
    expected_dimension: usize,
    limits: &Limits,
) -> Result<Vec<f64>, ProtoError> {
    let w = super::envelope(bytes, expected_dimension, limits)?;
    if w.codec != PARTIAL_CODEC {
        return Err(ProtoError::Invalid {
            field: "update.codec",
            reason: format!(
                "a partial aggregate travels as `{PARTIAL_CODEC}`, not `{}`",
                w.codec.chars().take(64).collect::<String>()
            ),
        });
    }
    if w.zstd || w.seed != 0 {
        return Err(ProtoError::Invalid {
            field: "update.zstd",
            reason: format!("`{PARTIAL_CODEC}` has no zstd stage and no seed"),
        });
    }
    let n = expected_dimension;
    let want = n * VALUE_BYTES as usize;
    if w.data.len() != want {
        return Err(ProtoError::BadLength {
            field: "partial.values",
            expected: want,
            got: w.data.len(),
        });
    }
    let mut out = Vec::with_capacity(n);
    for (i, c) in w.data.chunks_exact(VALUE_BYTES as usize).enumerate() {
        let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
        if !in_range(v) {
            return Err(ProtoError::NonFinite { index: i as u64 });
        }
        out.push(v);
    }
    debug_assert_eq!(out.len(), n);
    Ok(out)
}

/// What a verifier reads back from a state directory, whichever kind of
/// aggregator kept it: a device's update (any codec), or a partial
/// aggregate with its values rounded to float32.
pub fn decode_any(
    bytes: &[u8],
    expected_dimension: usize,
    limits: &Limits,
) -> Result<Vec<f32>, ProtoError> {
    let w = wire::UpdatePayload::decode(bytes)?;
    if w.codec == PARTIAL_CODEC {
        let v = decode_partial(bytes, expected_dimension, limits)?;
        Ok(v.into_iter().map(|x| x as f32).collect())
    } else {
        super::decode(bytes, expected_dimension, limits)
    }
}

/// Finite, and finite once rounded to float32.
fn in_range(v: f64) -> bool {
    v.is_finite() && v.abs() <= f64::from(f32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload(codec: &str, dimension: u64, data: Vec<u8>, seed: u64, zstd: bool) -> Vec<u8> {
        wire::UpdatePayload {
            codec: codec.into(),
            dimension,
            data: data.into(),
            seed,
            zstd,
        }
        .encode_to_vec()
    }

    fn f64s(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x9a471a1),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn round_trip_is_exact_and_bounded(v in prop::collection::vec(-3e38f64..3e38, 0..256)) {
            let b = encode_partial(&v).unwrap();
            prop_assert!(b.len() as u64 <= partial_payload_bytes_max(v.len() as u64));
            prop_assert_eq!(decode_partial(&b, v.len(), &Limits::default()).unwrap(), v);
        }

        #[test]
        fn decoder_never_panics_on_garbage(b in prop::collection::vec(any::<u8>(), 0..128), dim in 0usize..64) {
            let _ = decode_partial(&b, dim, &Limits::default());
            let _ = decode_any(&b, dim, &Limits::default());
        }
    }

    #[test]
    fn keeps_what_float32_loses() {
        let v = [0.1f64, 1.0 / 3.0, -2.5e-9];
        let back = decode_partial(&encode_partial(&v).unwrap(), 3, &Limits::default()).unwrap();
        assert_eq!(back, v);
        assert_ne!(f64::from(v[1] as f32), v[1]);
        // A verifier's view: the values rounded to float32.
        let rounded = decode_any(&encode_partial(&v).unwrap(), 3, &Limits::default()).unwrap();
        assert_eq!(rounded, v.map(|x| x as f32));
    }

    #[test]
    fn bad_payloads_are_typed() {
        let l = Limits::default();
        let good = f64s(&[1.0, 2.0]);
        for (bytes, want) in [
            (
                payload(PARTIAL_CODEC, 3, f64s(&[1.0, 2.0, 3.0]), 0, false),
                ProtoError::DimensionMismatch {
                    expected: 2,
                    got: 3,
                },
            ),
            (
                payload(PARTIAL_CODEC, 2, good[..12].to_vec(), 0, false),
                ProtoError::BadLength {
                    field: "partial.values",
                    expected: 16,
                    got: 12,
                },
            ),
            (
                payload(
                    PARTIAL_CODEC,
                    2,
                    [good.clone(), vec![0; 8]].concat(),
                    0,
                    false,
                ),
                ProtoError::BadLength {
                    field: "partial.values",
                    expected: 16,
                    got: 24,
                },
            ),
            (
                payload(PARTIAL_CODEC, 2, f64s(&[1.0, f64::NAN]), 0, false),
                ProtoError::NonFinite { index: 1 },
            ),
            (
                payload(PARTIAL_CODEC, 2, f64s(&[f64::NEG_INFINITY, 1.0]), 0, false),
                ProtoError::NonFinite { index: 0 },
            ),
            // Finite, but infinite once rounded to float32.
            (
                payload(PARTIAL_CODEC, 2, f64s(&[1.0, 1e39]), 0, false),
                ProtoError::NonFinite { index: 1 },
            ),
        ] {
            assert_eq!(decode_partial(&bytes, 2, &l), Err(want));
        }
        for bytes in [
            payload("dense-f32", 2, good[..8].to_vec(), 0, false),
            payload("", 2, good.clone(), 0, false),
            payload(PARTIAL_CODEC, 2, good.clone(), 7, false),
            payload(PARTIAL_CODEC, 2, good.clone(), 0, true),
        ] {
            let e = decode_partial(&bytes, 2, &l).unwrap_err();
            assert!(matches!(e, ProtoError::Invalid { .. }), "{e:?}");
            assert_eq!(e.reject_code(), crate::RejectCode::Malformed);
        }
        let huge = payload(PARTIAL_CODEC, u64::MAX, Vec::new(), 0, false);
        assert!(matches!(
            decode_partial(&huge, 1, &l),
            Err(ProtoError::LimitExceeded { .. })
        ));
        assert!(matches!(
            decode_partial(b"\xff\xff", 1, &l),
            Err(ProtoError::Malformed(_))
        ));
        // A device's decoder does not know the codec: devices cannot send one.
        let partial = encode_partial(&[1.0, 2.0]).unwrap();
        assert!(matches!(
            super::super::decode(&partial, 2, &l),
            Err(ProtoError::CodecSpec(_))
        ));
    }

    #[test]
    fn non_finite_values_are_not_encoded() {
        assert_eq!(
            encode_partial(&[0.0, f64::INFINITY]).unwrap_err(),
            EncodeError::NonFinite {
                index: 1,
                value: f32::INFINITY
            }
        );
        assert!(encode_partial(&[f64::from(f32::MAX) * 2.0]).is_err());
    }
}
