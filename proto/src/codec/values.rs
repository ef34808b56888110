//! The value stage: how `n` values (all coordinates, or the kept ones of a
//! sparsifier) become bytes, and back.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::RngCore;

use super::bits::{self, expect_len, invalid};
use super::spec::{BlockLen, QuantBits, ValueCodec};
use crate::ProtoError;

const FIELD_VALUES: &str = "update.values";
const FIELD_SCALES: &str = "update.scales";
const FIELD_CODES: &str = "update.codes";

/// Exact size in bytes of the value section for `n` values. Saturates
/// instead of overflowing, so a huge `n` simply never matches.
pub fn value_bytes(codec: ValueCodec, n: u64) -> u64 {
    let scales = |b: BlockLen| n.div_ceil(b.get() as u64).saturating_mul(4);
    match codec {
        ValueCodec::DenseF32 => n.saturating_mul(4),
        ValueCodec::F16 | ValueCodec::Bf16 => n.saturating_mul(2),
        ValueCodec::Quant { bits, block_len } => {
            scales(block_len).saturating_add(bits::packed_len(n, bits.bits()))
        }
        ValueCodec::Sign { block_len } => scales(block_len).saturating_add(bits::packed_len(n, 1)),
    }
}

/// Append the value section for `xs` (all finite) to `out`. `rng` drives
/// stochastic rounding and is untouched by deterministic codecs.
pub fn encode_values(codec: ValueCodec, xs: &[f32], rng: &mut ChaCha8Rng, out: &mut Vec<u8>) {
    let start = out.len();
    match codec {
        ValueCodec::DenseF32 => {
            out.reserve(xs.len() * 4);
            for x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        ValueCodec::F16 => {
            // The slice conversion uses F16C where the CPU has it; both it
            // and `f16::from_f32` round to nearest even.
            let mut h = vec![f16::ZERO; xs.len()];
            h.convert_from_f32_slice(xs);
            out.reserve(xs.len() * 2);
            for (v, &x) in h.iter().zip(xs) {
                out.extend_from_slice(&saturate_f16(*v, x).to_bits().to_le_bytes());
            }
        }
        ValueCodec::Bf16 => {
            out.reserve(xs.len() * 2);
            for &x in xs {
                out.extend_from_slice(&to_bf16(x).to_bits().to_le_bytes());
            }
        }
        ValueCodec::Quant { bits, block_len } => encode_quant(bits, block_len, xs, rng, out),
        ValueCodec::Sign { block_len } => encode_sign(block_len, xs, out),
    }
    assert_eq!(
        (out.len() - start) as u64,
        value_bytes(codec, xs.len() as u64)
    );
}

/// `h`, the f16 nearest `x`, or ±65504 where that overflowed to infinity.
fn saturate_f16(h: f16, x: f32) -> f16 {
    if h.is_infinite() {
        if x > 0.0 { f16::MAX } else { f16::MIN }
    } else {
        h
    }
}

/// Round to nearest bf16, saturating at ±bf16::MAX instead of going infinite.
fn to_bf16(x: f32) -> bf16 {
    let h = bf16::from_f32(x);
    if h.is_infinite() {
        if x > 0.0 { bf16::MAX } else { bf16::MIN }
    } else {
        h
    }
}

/// Uniform in [0, 1) with 24 bits of resolution.
fn uniform01(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
}

fn encode_quant(
    bits: QuantBits,
    block_len: BlockLen,
    xs: &[f32],
    rng: &mut ChaCha8Rng,
    out: &mut Vec<u8>,
) {
    let level = bits.level_max() as f32;
    let mut codes = Vec::with_capacity(xs.len());
    for block in xs.chunks(block_len.get()) {
        let scale = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        out.extend_from_slice(&scale.to_le_bytes());
        if scale == 0.0 {
            codes.extend(std::iter::repeat_n(level as u8, block.len()));
            continue;
        }
        // u = x·L/scale + L lies in [0, 2L] (the clamp only absorbs rounding);
        // it is rounded down or up to an integer code with probabilities
        // that make E[code] = u. u >= 0, so the cast is a floor.
        let inv = level / scale;
        for &x in block {
            let u = (x * inv + level).clamp(0.0, 2.0 * level);
            let lo = u as u32;
            let up = uniform01(rng) < u - lo as f32;
            let code = lo + u32::from(up);
            debug_assert!(code <= 2 * level as u32);
            codes.push(code as u8);
        }
    }
    bits::pack(&codes, bits.bits(), out);
}

fn encode_sign(block_len: BlockLen, xs: &[f32], out: &mut Vec<u8>) {
    for block in xs.chunks(block_len.get()) {
        let sum: f64 = block.iter().map(|x| f64::from(x.abs())).sum();
        let scale = (sum / block.len() as f64) as f32;
        assert!(scale.is_finite());
        out.extend_from_slice(&scale.to_le_bytes());
    }
    let codes: Vec<u8> = xs.iter().map(|&x| u8::from(x >= 0.0)).collect();
    bits::pack(&codes, 1, out);
}

/// Decode exactly `n` values from `data`, which must be exactly
/// `value_bytes(codec, n)` bytes. A non-finite value is reported by its
/// position in this section (`NonFinite { index }`), a bad scale by block.
pub fn decode_values(codec: ValueCodec, data: &[u8], n: usize) -> Result<Vec<f32>, ProtoError> {
    expect_len(FIELD_VALUES, data, value_bytes(codec, n as u64))?;
    let out = match codec {
        ValueCodec::DenseF32 => {
            let mut out = Vec::with_capacity(n);
            for (i, c) in data.chunks_exact(4).enumerate() {
                let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                if !v.is_finite() {
                    return Err(ProtoError::NonFinite { index: i as u64 });
                }
                out.push(v);
            }
            out
        }
        ValueCodec::F16 => {
            let mut h = Vec::with_capacity(n);
            for (i, c) in data.chunks_exact(2).enumerate() {
                let v = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                if !v.is_finite() {
                    return Err(ProtoError::NonFinite { index: i as u64 });
                }
                h.push(v);
            }
            let mut out = vec![0f32; n];
            h.convert_to_f32_slice(&mut out);
            out
        }
        ValueCodec::Bf16 => decode_half(data, n, |b| {
            let h = bf16::from_bits(b);
            h.is_finite().then(|| h.to_f32())
        })?,
        ValueCodec::Quant { bits, block_len } => decode_quant(bits, block_len, data, n)?,
        ValueCodec::Sign { block_len } => decode_sign(block_len, data, n)?,
    };
    assert_eq!(out.len(), n);
    Ok(out)
}

fn decode_half(
    data: &[u8],
    n: usize,
    to_f32: impl Fn(u16) -> Option<f32>,
) -> Result<Vec<f32>, ProtoError> {
    let mut out = Vec::with_capacity(n);
    for (i, c) in data.chunks_exact(2).enumerate() {
        let v = to_f32(u16::from_le_bytes([c[0], c[1]]))
            .ok_or(ProtoError::NonFinite { index: i as u64 })?;
        out.push(v);
    }
    Ok(out)
}

/// The f32 scales at the front of a quantized section, each finite and >= 0.
fn read_scales(data: &[u8], blocks: usize) -> Result<Vec<f32>, ProtoError> {
    let mut scales = Vec::with_capacity(blocks);
    for (b, c) in data[..blocks * 4].chunks_exact(4).enumerate() {
        let s = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        if !s.is_finite() {
            return Err(ProtoError::NonFiniteScale { block: b as u64 });
        }
        if s < 0.0 {
            return Err(invalid(
                FIELD_SCALES,
                &format!("block {b} has negative scale {s}"),
            ));
        }
        scales.push(s);
    }
    Ok(scales)
}

fn decode_quant(
    bits: QuantBits,
    block_len: BlockLen,
    data: &[u8],
    n: usize,
) -> Result<Vec<f32>, ProtoError> {
    let blocks = n.div_ceil(block_len.get());
    let scales = read_scales(data, blocks)?;
    let level = bits.level_max() as i32;
    let codes = bits::unpack(
        &data[blocks * 4..],
        n,
        bits.bits(),
        (2 * level) as u8,
        FIELD_CODES,
    )?;
    let mut out = Vec::with_capacity(n);
    for (block, &scale) in codes.chunks(block_len.get()).zip(&scales) {
        // In f64, |code - L| * (scale / L) rounds to an f32 <= scale, so a
        // finite scale always gives a finite value.
        let step = f64::from(scale) / f64::from(level);
        out.extend(
            block
                .iter()
                .map(|&c| (f64::from(i32::from(c) - level) * step) as f32),
        );
    }
    Ok(out)
}

fn decode_sign(block_len: BlockLen, data: &[u8], n: usize) -> Result<Vec<f32>, ProtoError> {
    let blocks = n.div_ceil(block_len.get());
    let scales = read_scales(data, blocks)?;
    let codes = bits::unpack(&data[blocks * 4..], n, 1, 1, FIELD_CODES)?;
    let mut out = Vec::with_capacity(n);
    for (block, &s) in codes.chunks(block_len.get()).zip(&scales) {
        out.extend(block.iter().map(|&bit| if bit == 1 { s } else { -s }));
    }
    Ok(out)
}
