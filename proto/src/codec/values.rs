//! The value stage: how `n` values (all coordinates, or the kept ones of a
//! sparsifier) become bytes, and back.

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
            out.reserve(xs.len() * 2);
            for &x in xs {
                out.extend_from_slice(&to_f16(x).to_bits().to_le_bytes());
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

/// Round to nearest f16, saturating at ±65504 instead of going infinite.
fn to_f16(x: f32) -> f16 {
    let h = f16::from_f32(x);
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
    let level = bits.level_max() as i32;
    let mut codes = Vec::with_capacity(xs.len());
    for block in xs.chunks(block_len.get()) {
        let scale = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        out.extend_from_slice(&scale.to_le_bytes());
        if scale == 0.0 {
            codes.extend(std::iter::repeat_n(level as u8, block.len()));
            continue;
        }
        // |x| <= scale, so t lies in [-L, L]; the clamp only absorbs
        // rounding in the multiplication.
        let inv = level as f32 / scale;
        for &x in block {
            let t = (x * inv).clamp(-level as f32, level as f32);
            let lo = t.floor();
            let up = uniform01(rng) < t - lo;
            let q = lo as i32 + i32::from(up);
            debug_assert!((-level..=level).contains(&q));
            codes.push((q + level) as u8);
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
        ValueCodec::F16 => decode_half(data, n, |b| {
            let h = f16::from_bits(b);
            h.is_finite().then(|| h.to_f32())
        })?,
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
    let level = bits.level_max();
    let code_max = 2 * level;
    // step in f64: |code - L| * (scale / L) then rounds to an f32 <= scale,
    // so a finite scale always gives a finite value.
    let steps: Vec<f64> = scales
        .iter()
        .map(|&s| f64::from(s) / f64::from(level))
        .collect();
    let mut out = Vec::with_capacity(n);
    bits::unpack(
        &data[blocks * 4..],
        n,
        bits.bits(),
        FIELD_CODES,
        |i, code| {
            if u32::from(code) > code_max {
                return Err(invalid(
                    FIELD_CODES,
                    &format!("code {code} at position {i} is over {code_max}"),
                ));
            }
            let step = steps[i / block_len.get()];
            out.push(((i32::from(code) - level as i32) as f64 * step) as f32);
            Ok(())
        },
    )?;
    Ok(out)
}

fn decode_sign(block_len: BlockLen, data: &[u8], n: usize) -> Result<Vec<f32>, ProtoError> {
    let blocks = n.div_ceil(block_len.get());
    let scales = read_scales(data, blocks)?;
    let mut out = Vec::with_capacity(n);
    bits::unpack(&data[blocks * 4..], n, 1, FIELD_CODES, |i, bit| {
        let s = scales[i / block_len.get()];
        out.push(if bit == 1 { s } else { -s });
        Ok(())
    })?;
    Ok(out)
}
