//! Update payloads: the delta (local - global) over the canonical layout,
//! encoded by a codec. The codecs themselves live in [`crate::codec`]; this
//! module keeps the entry points other crates call.

use bytes::Bytes;

use crate::codec;
use crate::{Limits, ProtoError};

pub use crate::codec::partial::{
    PARTIAL_CODEC, decode_any, decode_partial, encode_partial, partial_payload_bytes_max,
};
pub use crate::codec::{CodecSpec, CodecSpecError};

/// The codec a training plan names. Formerly `enum Codec { DenseF32 }`;
/// now any [`CodecSpec`] (`Codec::DenseF32` and `Codec::parse` still work).
pub type Codec = CodecSpec;

/// Encode an update delta with `codec`, drawing randomness from seed 0.
/// Prefer [`codec::encode`] with a fresh seed a round for stochastic codecs
/// (`qB`, `randk`), or [`codec::encode_with_transmitted`] for error feedback.
///
/// # Panics
/// If `delta` holds a NaN or an infinity (a precondition: callers check
/// their training output first), or has more than `u32::MAX` coordinates.
pub fn encode_update(codec: Codec, delta: &[f32]) -> Bytes {
    codec::encode(&codec, delta, 0)
        .unwrap_or_else(|e| panic!("encode_update precondition violated: {e}"))
}

/// Decode an update payload that must have `expected_dimension` coordinates.
/// See [`codec::decode`] for everything it refuses.
pub fn decode_update(
    bytes: &[u8],
    expected_dimension: usize,
    limits: &Limits,
) -> Result<Vec<f32>, ProtoError> {
    codec::decode(bytes, expected_dimension, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecSpecError;
    use crate::wire;
    use proptest::prelude::*;
    use prost::Message;

    proptest! {
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x0bda7e),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn dense_round_trip_is_exact(v in prop::collection::vec(-1e6f32..1e6, 0..256)) {
            let b = encode_update(Codec::DenseF32, &v);
            prop_assert_eq!(decode_update(&b, v.len(), &Limits::default()).unwrap(), v);
        }

        #[test]
        fn decoder_never_panics_on_garbage(b in prop::collection::vec(any::<u8>(), 0..128), dim in 0usize..64) {
            let _ = decode_update(&b, dim, &Limits::default());
        }
    }

    /// The call shapes runtime/ and aggregator/ use, so a change here that
    /// would break them fails in this crate first.
    #[test]
    fn legacy_call_sites_still_compile_and_work() {
        // Device-side callers (the FFI, tests): an unknown codec falls back.
        let codec = Codec::parse("zip").unwrap_or(Codec::DenseF32);
        let payload = encode_update(codec, &[1.0, -2.0]);
        // aggregator/src/coordinator/intake.rs
        let delta = decode_update(&payload, 2, &Limits::default()).unwrap();
        assert_eq!(delta, vec![1.0, -2.0]);
        // aggregator/src/config.rs
        let e = crate::update::Codec::parse("zip")
            .map_err(|e| format!("plan.codec: {e}"))
            .unwrap_err();
        assert!(e.contains("zip"), "{e}");
        // An empty plan codec still means dense f32.
        assert_eq!(Codec::parse(""), Ok(Codec::DenseF32));
        // Any spec now works through the same entry points.
        let q = Codec::parse("topk:0.5+q8").unwrap();
        let back = decode_update(&encode_update(q, &[0.0, 4.0]), 2, &Limits::default());
        assert_eq!(back, Ok(vec![0.0, 4.0]));
    }

    #[test]
    fn malformed_payloads_are_typed() {
        let l = Limits::default();
        let b = encode_update(Codec::DenseF32, &[1.0, 2.0]);
        assert_eq!(
            decode_update(&b, 3, &l),
            Err(ProtoError::DimensionMismatch {
                expected: 3,
                got: 2
            })
        );
        let lie = wire::UpdatePayload {
            codec: "dense-f32".into(),
            dimension: 3,
            data: vec![0u8; 8].into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode_update(&lie, 3, &l),
            Err(ProtoError::BadLength {
                field: "update.values",
                expected: 12,
                got: 8
            })
        );
        let nan = wire::UpdatePayload {
            codec: "dense-f32".into(),
            dimension: 1,
            data: f32::INFINITY.to_le_bytes().to_vec().into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode_update(&nan, 1, &l),
            Err(ProtoError::NonFinite { index: 0 })
        );
        let unknown = wire::UpdatePayload {
            codec: "zip".into(),
            dimension: 0,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            decode_update(&unknown, 0, &l),
            Err(ProtoError::CodecSpec(CodecSpecError::UnknownStage {
                spec: "zip".into(),
                stage: "zip".into()
            }))
        );
        let huge = wire::UpdatePayload {
            codec: "dense-f32".into(),
            dimension: u64::MAX,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(matches!(
            decode_update(&huge, 1, &l),
            Err(ProtoError::LimitExceeded { .. })
        ));
    }
}
