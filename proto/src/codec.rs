//! Update compression codecs: how a device turns its delta
//! (`local - global`, f32, canonical parameter order) into an
//! [`UpdatePayload`](crate::wire::UpdatePayload), and how the aggregator
//! turns one back into a dense vector, validating everything on the way.
//!
//! # Spec grammar
//!
//! The codec is named by a spec string. It travels in the training plan and
//! in `UpdatePayload.codec`; [`CodecSpec::parse`] reads it and `Display`
//! writes the canonical form (`parse(s.to_string()) == s`).
//!
//! ```text
//! spec       := "" | base ("+zstd")?          "" means dense-f32
//! base       := value | sparsifier ("+" value)?
//! sparsifier := "topk:" F | "randk:" F        F: decimal in [1e-9, 1]
//! value      := "dense-f32" | "f16" | "bf16"
//!             | ("q8" | "q4" | "q2" | "sign") ("/b" N)?
//!                                             N: block length, 8..=65536, default 256
//! ```
//!
//! Examples: `dense-f32`, `bf16`, `q4`, `q4/b64`, `sign`, `topk:0.01`,
//! `topk:0.01+q4`, `randk:0.05+q8`, `topk:0.01+f16+zstd`, `q8+zstd`.
//! At most 64 bytes, lower case, no spaces. A sparsifier without a value
//! stage sends its values as dense-f32.
//!
//! # Codecs
//!
//! - `dense-f32`: lossless.
//! - `f16`, `bf16`: round to nearest; values past the format's range
//!   saturate to its largest finite value.
//! - `qB` (B = 8, 4, 2 bits): per block, `scale = max |x|`, `L = 2^(B-1) - 1`;
//!   `x·L/scale` is rounded stochastically to a neighbouring integer `q`
//!   (up with probability equal to the fractional part), so the decoded
//!   `q·scale/L` is an unbiased estimate of `x`. Codes `q + L` in `0..=2L`
//!   (q2 is ternary: −scale, 0, +scale).
//! - `sign`: per block, `scale = mean |x|`; each value becomes `±scale`
//!   (`x >= 0` is `+`). Biased: use it with error feedback.
//! - `topk:F`: keeps the `k = ceil(F·n)` (at least 1, at most n) largest
//!   magnitudes, ties to the lower index; the rest decode to 0.
//! - `randk:F`: keeps `k` uniformly random coordinates chosen from the
//!   payload seed. The decoded vector is *not* rescaled: on average it is
//!   `(k/n)·x`; multiply by `n/k` for an unbiased estimate, or use error
//!   feedback.
//! - `+zstd`: the body is compressed with zstd (ruzstd, "fastest" level)
//!   and sent compressed only when that is smaller; `UpdatePayload.zstd`
//!   says which.
//!
//! Randomness (stochastic rounding, random-k) comes from the `seed` given
//! to [`encode`]: ChaCha8 keyed by `blake3::derive_key(context, seed_le)`,
//! one context a purpose. The seed travels in `UpdatePayload.seed`.
//!
//! # Body layout (all little-endian)
//!
//! `n` = dimension, `k` = kept count. The value section `V(m)` for `m`
//! values is:
//!
//! - dense-f32: `m` × f32; f16/bf16: `m` × u16 bits;
//! - `qB/bS`: `ceil(m/S)` × f32 scales, then `ceil(m·B/8)` bytes of codes,
//!   packed LSB-first (code `i` at bits `i·B..(i+1)·B`), padding bits zero;
//! - `sign/bS`: `ceil(m/S)` × f32 scales, then `ceil(m/8)` bytes of sign
//!   bits LSB-first (1 is `+`), padding bits zero.
//!
//! The body is `V(n)` without a sparsifier; with `topk` it is
//! `varint(k) · format · indices · V(k)`, where `format` 0 means `k` LEB128
//! varints (the first index, then gaps ≥ 1) and 1 means a bitmap of
//! `ceil(n/8)` bytes with exactly `k` bits set; the encoder writes whichever
//! is shorter (varints on a tie). With `randk` it is `varint(k) · V(k)`;
//! the indices are Floyd's sampling of `k` of `0..n` with draws from the
//! seed (uniform integers by Lemire's method on `next_u64`). That sampling
//! and the seed derivation are wire format.
//!
//! # Decoding
//!
//! [`decode`] refuses, each with a typed [`ProtoError`]: a dimension over
//! `limits.update_dimension_max` (checked before any allocation) or not the
//! expected one, an unknown or malformed codec spec, a `zstd` flag on a
//! spec without `+zstd`, a zstd frame that would decompress past the
//! largest body the spec can produce for `n` (at most the dense size
//! `4·n` plus `ceil(n/8) + 16` bytes; see [`CodecSpec::body_bytes_max`])
//! or is malformed or followed by bytes, a count `k` other than the spec's, indices out of range, repeated
//! or not increasing, sections of the wrong length, NaN or infinite values
//! or scales, negative scales, codes past `2L`, and non-zero padding.
//! Nothing a peer sends makes it allocate more than the declared (and
//! limit-checked) dimension implies.

mod bits;
pub(crate) mod entropy;
pub mod partial;
mod sparse;
mod spec;
mod values;

#[cfg(test)]
mod tests;

use bytes::Bytes;
use prost::Message;

pub use entropy::ZSTD_WINDOW_BYTES_MAX;
pub use spec::{
    BLOCK_LEN_DEFAULT, BLOCK_LEN_MAX, BLOCK_LEN_MIN, BlockLen, CodecSpec, CodecSpecError,
    FRACTION_MIN, Fraction, QuantBits, SPEC_BYTES_MAX, Sparsifier, ValueCodec,
};

use crate::{Limits, ProtoError, wire};
use bits::Reader;
use sparse::Purpose;

/// Why a delta cannot be encoded. Raised on the sending device, about its
/// own data, never about peer bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EncodeError {
    #[error("refusing to encode a non-finite update: coordinate {index} is {value}")]
    NonFinite { index: u64, value: f32 },
    #[error("update dimension {dimension} is over the codec limit of {max}")]
    DimensionTooLarge { dimension: u64, max: u64 },
}

/// Most coordinates a codec handles: indices are coded as u32.
pub const DIMENSION_MAX: u64 = u32::MAX as u64;

impl CodecSpec {
    /// Coordinates kept out of `dimension`: all of them without a sparsifier.
    pub fn kept(&self, dimension: u64) -> u64 {
        match self.sparsifier {
            None => dimension,
            Some(s) => s.fraction().kept(dimension),
        }
    }

    /// Largest body (before zstd) this spec can produce, and a decoder
    /// accepts, for `dimension` coordinates: at most the dense size
    /// `4·dimension` plus `ceil(dimension/8) + 16` (top-k's index section,
    /// its count and format byte, and one partial block's scale).
    pub fn body_bytes_max(&self, dimension: u64) -> u64 {
        let k = self.kept(dimension);
        let values = values::value_bytes(self.values, k);
        let max = match self.sparsifier {
            None => values,
            Some(Sparsifier::TopK(_)) => (bits::VARINT_BYTES_MAX as u64 + 1)
                .saturating_add(dimension.div_ceil(8))
                .saturating_add(values),
            Some(Sparsifier::RandK(_)) => (bits::VARINT_BYTES_MAX as u64).saturating_add(values),
        };
        assert!(
            max <= dimension
                .saturating_mul(4)
                .saturating_add(dimension.div_ceil(8) + 16)
        );
        max
    }
}

/// Largest encoded `UpdatePayload` (envelope included) any codec produces
/// for `dimension` coordinates; a manifest announcing more is refused
/// before a byte of it is held. The body is at most the dense bound of
/// [`CodecSpec::body_bytes_max`]; zstd stores incompressible data in raw
/// blocks of at most 128 KiB with a 3-byte header each, after a frame
/// header of at most 18 bytes and a 4-byte checksum (RFC 8878, 3.1); the
/// envelope adds the tags and varints of dimension, seed, flag and length,
/// and the codec string.
pub fn payload_bytes_max(dimension: u64) -> u64 {
    let body = dimension
        .saturating_mul(4)
        .saturating_add(dimension.div_ceil(8) + 16);
    let zstd = body.div_ceil(128 << 10).saturating_mul(3) + 3 + 18 + 4;
    let envelope = 4 * (1 + bits::VARINT_BYTES_MAX as u64) + 2 + SPEC_BYTES_MAX as u64;
    body.saturating_add(zstd).saturating_add(envelope)
}

/// Encode `delta` as an `UpdatePayload` with `spec`, drawing any randomness
/// from `seed`.
pub fn encode(spec: &CodecSpec, delta: &[f32], seed: u64) -> Result<Bytes, EncodeError> {
    let body = encode_body(spec, delta, seed)?;
    #[cfg(debug_assertions)]
    {
        let back = decode_body(spec, &body, delta.len(), seed).expect("own body decodes");
        assert_eq!(back.len(), delta.len());
    }
    Ok(finish(spec, delta.len(), seed, body))
}

/// [`encode`], and also what the receiver will decode (`decode(encode(x))`),
/// for device-side error feedback: `residual = delta - transmitted`.
pub fn encode_with_transmitted(
    spec: &CodecSpec,
    delta: &[f32],
    seed: u64,
) -> Result<(Bytes, Vec<f32>), EncodeError> {
    let body = encode_body(spec, delta, seed)?;
    // Decoding our own body is the definition of "transmitted": it cannot
    // drift from what the aggregator computes.
    let transmitted = decode_body(spec, &body, delta.len(), seed).expect("own body decodes");
    assert_eq!(transmitted.len(), delta.len());
    Ok((finish(spec, delta.len(), seed, body), transmitted))
}

fn finish(spec: &CodecSpec, dimension: usize, seed: u64, body: Vec<u8>) -> Bytes {
    let (data, zstd) = if spec.zstd {
        let z = entropy::compress(&body);
        if z.len() < body.len() {
            (z, true)
        } else {
            (body, false)
        }
    } else {
        (body, false)
    };
    wire::UpdatePayload {
        codec: spec.to_string(),
        dimension: dimension as u64,
        data: data.into(),
        seed,
        zstd,
    }
    .encode_to_vec()
    .into()
}

/// Build the body (before zstd).
fn encode_body(spec: &CodecSpec, delta: &[f32], seed: u64) -> Result<Vec<u8>, EncodeError> {
    if delta.len() as u64 > DIMENSION_MAX {
        return Err(EncodeError::DimensionTooLarge {
            dimension: delta.len() as u64,
            max: DIMENSION_MAX,
        });
    }
    if let Some(index) = delta.iter().position(|v| !v.is_finite()) {
        return Err(EncodeError::NonFinite {
            index: index as u64,
            value: delta[index],
        });
    }
    let n = delta.len();
    let mut rounding = sparse::rng(seed, Purpose::Rounding);
    let mut body = Vec::new();
    match spec.sparsifier {
        None => values::encode_values(spec.values, delta, &mut rounding, &mut body),
        Some(s) => {
            let k = spec.kept(n as u64) as usize;
            let indices = match s {
                Sparsifier::TopK(_) => sparse::topk_indices(delta, k),
                Sparsifier::RandK(_) => sparse::randk_indices(seed, n, k),
            };
            bits::put_varint(&mut body, k as u64);
            if let Sparsifier::TopK(_) = s {
                sparse::encode_indices(&indices, n, &mut body);
            }
            let kept: Vec<f32> = indices.iter().map(|&i| delta[i as usize]).collect();
            values::encode_values(spec.values, &kept, &mut rounding, &mut body);
        }
    }
    assert!(body.len() as u64 <= spec.body_bytes_max(n as u64));
    Ok(body)
}

/// Decode an update payload that must have `expected_dimension`
/// coordinates, validating everything (see the module docs).
pub fn decode(
    bytes: &[u8],
    expected_dimension: usize,
    limits: &Limits,
) -> Result<Vec<f32>, ProtoError> {
    let w = envelope(bytes, expected_dimension, limits)?;
    let spec = CodecSpec::parse(&w.codec)?;
    let n = expected_dimension;
    let decompressed;
    let body: &[u8] = if w.zstd {
        if !spec.zstd {
            return Err(ProtoError::Invalid {
                field: "update.zstd",
                reason: format!("codec `{spec}` has no +zstd stage"),
            });
        }
        decompressed = entropy::decompress_bounded(&w.data, spec.body_bytes_max(n as u64))?;
        &decompressed
    } else {
        &w.data
    };
    let out = decode_body(&spec, body, n, w.seed)?;
    assert_eq!(out.len(), n);
    assert!(
        out.iter().all(|v| v.is_finite()),
        "decoders refuse non-finite values"
    );
    Ok(out)
}

/// An `UpdatePayload` whose dimension is within the limits (checked
/// before anything of that size is allocated) and `expected_dimension`;
/// its codec and body not yet looked at.
fn envelope(
    bytes: &[u8],
    expected_dimension: usize,
    limits: &Limits,
) -> Result<wire::UpdatePayload, ProtoError> {
    let w = wire::UpdatePayload::decode(bytes)?;
    Limits::check("update dimension", w.dimension, limits.update_dimension_max)?;
    Limits::check("update dimension", w.dimension, DIMENSION_MAX)?;
    if w.dimension != expected_dimension as u64 {
        return Err(ProtoError::DimensionMismatch {
            expected: expected_dimension as u64,
            got: w.dimension,
        });
    }
    Ok(w)
}

/// Decode a body (after zstd) into `n` dense values.
fn decode_body(spec: &CodecSpec, body: &[u8], n: usize, seed: u64) -> Result<Vec<f32>, ProtoError> {
    let Some(sparsifier) = spec.sparsifier else {
        return values::decode_values(spec.values, body, n);
    };
    let k_expected = spec.kept(n as u64);
    let mut r = Reader::new(body);
    let k = r.varint("update.kept")?;
    Limits::check("update kept count", k, n as u64)?;
    if k != k_expected {
        return Err(ProtoError::CountMismatch {
            what: "kept coordinates",
            expected: k_expected,
            got: k,
        });
    }
    let k = k as usize;
    let indices = match sparsifier {
        Sparsifier::TopK(_) => sparse::decode_indices(&mut r, k, n)?,
        Sparsifier::RandK(_) => sparse::randk_indices(seed, n, k),
    };
    let kept = values::decode_values(spec.values, r.rest(), k).map_err(|e| match e {
        ProtoError::NonFinite { index } => ProtoError::NonFinite {
            index: u64::from(indices[index as usize]),
        },
        e => e,
    })?;
    let mut out = vec![0f32; n];
    for (&i, v) in indices.iter().zip(kept) {
        out[i as usize] = v;
    }
    Ok(out)
}
