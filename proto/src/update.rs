//! Update payloads: the delta (local - global) over the canonical layout,
//! encoded by a codec. Decoders validate everything a peer controls.

use bytes::Bytes;
use prost::Message;

use crate::{Limits, ProtoError, params::decode_f32le, wire};

/// Codec names understood by this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Plain little-endian f32, 4 bytes a coordinate.
    DenseF32,
}

impl Codec {
    pub fn parse(name: &str) -> Result<Self, ProtoError> {
        match name {
            "" | "dense-f32" => Ok(Codec::DenseF32),
            other => Err(ProtoError::UnknownCodec(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::DenseF32 => "dense-f32",
        }
    }
}

/// Encode an update delta with `codec`.
pub fn encode_update(codec: Codec, delta: &[f32]) -> Bytes {
    assert!(
        delta.iter().all(|v| v.is_finite()),
        "refusing to encode a non-finite update"
    );
    let data = match codec {
        Codec::DenseF32 => {
            let mut d = Vec::with_capacity(delta.len() * 4);
            for v in delta {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        }
    };
    wire::UpdatePayload {
        codec: codec.name().into(),
        dimension: delta.len() as u64,
        data: data.into(),
    }
    .encode_to_vec()
    .into()
}

/// Decode an update payload that must have `expected_dimension` coordinates.
pub fn decode_update(
    bytes: &[u8],
    expected_dimension: usize,
    limits: &Limits,
) -> Result<Vec<f32>, ProtoError> {
    let w = wire::UpdatePayload::decode(bytes)?;
    Limits::check("update dimension", w.dimension, limits.update_dimension_max)?;
    if w.dimension != expected_dimension as u64 {
        return Err(ProtoError::DimensionMismatch {
            expected: expected_dimension as u64,
            got: w.dimension,
        });
    }
    match Codec::parse(&w.codec)? {
        Codec::DenseF32 => decode_f32le(&w.data, expected_dimension),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
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
        }
        .encode_to_vec();
        assert!(matches!(
            decode_update(&lie, 3, &l),
            Err(ProtoError::DimensionMismatch { .. })
        ));
        let nan = wire::UpdatePayload {
            codec: "dense-f32".into(),
            dimension: 1,
            data: f32::INFINITY.to_le_bytes().to_vec().into(),
        }
        .encode_to_vec();
        assert_eq!(
            decode_update(&nan, 1, &l),
            Err(ProtoError::NonFinite { index: 0 })
        );
        let unknown = wire::UpdatePayload {
            codec: "zip".into(),
            dimension: 0,
            data: Bytes::new(),
        }
        .encode_to_vec();
        assert_eq!(
            decode_update(&unknown, 0, &l),
            Err(ProtoError::UnknownCodec("zip".into()))
        );
        let huge = wire::UpdatePayload {
            codec: "dense-f32".into(),
            dimension: u64::MAX,
            data: Bytes::new(),
        }
        .encode_to_vec();
        assert!(matches!(
            decode_update(&huge, 1, &l),
            Err(ProtoError::LimitExceeded { .. })
        ));
    }
}
