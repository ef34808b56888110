//! Sparsifiers: which coordinates are kept (top-k by magnitude, or random-k
//! from a seed), how top-k indices are coded, and the seeded randomness.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::bits::{self, Reader, invalid};
use crate::ProtoError;

const FIELD_INDICES: &str = "update.indices";

/// Index section format byte: delta-coded LEB128 varints.
pub const INDEX_FORMAT_VARINT: u8 = 0;
/// Index section format byte: a bitmap of `ceil(n/8)` bytes.
pub const INDEX_FORMAT_BITMAP: u8 = 1;

/// What a seeded stream is used for. Each purpose gets its own ChaCha8 key,
/// so the streams are independent.
#[derive(Clone, Copy)]
pub enum Purpose {
    /// random-k indices: part of the wire format (the decoder replays it).
    RandKIndices,
    /// Stochastic rounding: encoder only.
    Rounding,
}

/// ChaCha8 keyed by `blake3::derive_key(context, seed_le)`. Defined here
/// rather than with `SeedableRng::seed_from_u64` so the derivation cannot
/// change under us with a rand_core release: random-k indices must come out
/// the same on every build that speaks this schema.
pub fn rng(seed: u64, purpose: Purpose) -> ChaCha8Rng {
    let context = match purpose {
        Purpose::RandKIndices => "fedge-proto update codec v1 randk indices",
        Purpose::Rounding => "fedge-proto update codec v1 stochastic rounding",
    };
    ChaCha8Rng::from_seed(blake3::derive_key(context, &seed.to_le_bytes()))
}

/// Uniform in `0..bound` (Lemire's multiply-and-reject over `next_u64`).
/// Also wire format for random-k. Rejection happens with probability
/// `< bound / 2^64`; after 64 rejections in a row (never, in practice) the
/// last draw is taken as is, so the loop is bounded and both ends agree.
fn uniform_below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    assert!(bound > 0);
    let threshold = bound.wrapping_neg() % bound;
    let mut m = u128::from(rng.next_u64()) * u128::from(bound);
    for _ in 0..64 {
        if (m as u64) >= threshold {
            break;
        }
        m = u128::from(rng.next_u64()) * u128::from(bound);
    }
    (m >> 64) as u64
}

/// `k` distinct indices of `0..n`, ascending, uniformly at random from
/// `seed` (Robert Floyd's algorithm over a bitmap: `k` draws, `n/8` bytes).
pub fn randk_indices(seed: u64, n: usize, k: usize) -> Vec<u32> {
    assert!(k <= n && n <= u32::MAX as usize);
    let mut rng = rng(seed, Purpose::RandKIndices);
    let mut words = vec![0u64; n.div_ceil(64)];
    let set = |i: usize, words: &mut [u64]| -> bool {
        let (w, b) = (i / 64, i % 64);
        let was = words[w] >> b & 1 == 1;
        words[w] |= 1 << b;
        was
    };
    for j in (n - k)..n {
        let t = uniform_below(&mut rng, j as u64 + 1) as usize;
        if set(t, &mut words) {
            set(j, &mut words);
        }
    }
    let out = bitmap_ones(&words, k);
    assert_eq!(out.len(), k);
    out
}

fn bitmap_ones(words: &[u64], k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(k);
    for (w, &word) in words.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            out.push((w * 64) as u32 + x.trailing_zeros());
            x &= x - 1;
        }
    }
    out
}

/// The `k` coordinates of largest magnitude (ties: lower index first),
/// ascending.
pub fn topk_indices(xs: &[f32], k: usize) -> Vec<u32> {
    let n = xs.len();
    assert!(k <= n && n <= u32::MAX as usize);
    if k == 0 {
        return Vec::new();
    }
    // For finite floats the bits of |x| order like |x|; the low half makes
    // the lower index win a tie and keeps keys distinct.
    let mut keys: Vec<u64> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| (u64::from(x.abs().to_bits()) << 32) | u64::from(!(i as u32)))
        .collect();
    keys.select_nth_unstable(n - k);
    let mut out: Vec<u32> = keys[n - k..].iter().map(|&key| !(key as u32)).collect();
    out.sort_unstable();
    out
}

/// Append the index section (format byte, then varints or a bitmap,
/// whichever is shorter; varints on a tie) for ascending `indices` of `0..n`.
pub fn encode_indices(indices: &[u32], n: usize, out: &mut Vec<u8>) {
    let bitmap_bytes = n.div_ceil(8);
    let mut varint_bytes = 0usize;
    let mut prev = 0u32;
    for (i, &idx) in indices.iter().enumerate() {
        assert!(
            (idx as usize) < n && (i == 0 || idx > prev),
            "indices ascending, in range"
        );
        varint_bytes += bits::varint_len(u64::from(if i == 0 { idx } else { idx - prev }));
        prev = idx;
    }
    if varint_bytes <= bitmap_bytes {
        out.push(INDEX_FORMAT_VARINT);
        let mut prev = 0u32;
        for (i, &idx) in indices.iter().enumerate() {
            bits::put_varint(out, u64::from(if i == 0 { idx } else { idx - prev }));
            prev = idx;
        }
    } else {
        out.push(INDEX_FORMAT_BITMAP);
        let start = out.len();
        out.resize(start + bitmap_bytes, 0);
        for &idx in indices {
            out[start + idx as usize / 8] |= 1 << (idx % 8);
        }
    }
}

/// Read an index section holding exactly `k` strictly increasing indices
/// of `0..n`. A varint section longer than the bitmap would be is refused:
/// the encoder never writes one, and it keeps bodies within their bound.
pub fn decode_indices(r: &mut Reader<'_>, k: usize, n: usize) -> Result<Vec<u32>, ProtoError> {
    assert!(k <= n && n <= u32::MAX as usize);
    let bitmap_bytes = n.div_ceil(8);
    let out = match r.u8(FIELD_INDICES)? {
        INDEX_FORMAT_VARINT => {
            let start = r.position();
            let mut out = Vec::with_capacity(k);
            let mut prev = 0u64;
            for position in 0..k {
                let v = r.varint(FIELD_INDICES)?;
                let idx = if position == 0 {
                    v
                } else if v == 0 {
                    return Err(ProtoError::IndicesNotIncreasing {
                        position: position as u64,
                        index: prev,
                        previous: prev,
                    });
                } else {
                    prev.checked_add(v).ok_or(ProtoError::IndexOutOfRange {
                        index: u64::MAX,
                        dimension: n as u64,
                    })?
                };
                if idx >= n as u64 {
                    return Err(ProtoError::IndexOutOfRange {
                        index: idx,
                        dimension: n as u64,
                    });
                }
                if r.position() - start > bitmap_bytes {
                    return Err(invalid(
                        FIELD_INDICES,
                        "varint index section is longer than the bitmap form",
                    ));
                }
                out.push(idx as u32);
                prev = idx;
            }
            out
        }
        INDEX_FORMAT_BITMAP => {
            let bytes = r.take(bitmap_bytes, FIELD_INDICES)?;
            let ones: u64 = bytes.iter().map(|b| u64::from(b.count_ones())).sum();
            if ones != k as u64 {
                return Err(ProtoError::CountMismatch {
                    what: "bitmap set bits",
                    expected: k as u64,
                    got: ones,
                });
            }
            if !n.is_multiple_of(8) && bytes[bitmap_bytes - 1] >> (n % 8) != 0 {
                return Err(ProtoError::IndexOutOfRange {
                    index: (bitmap_bytes - 1) as u64 * 8
                        + u64::from(8 - (bytes[bitmap_bytes - 1]).leading_zeros())
                        - 1,
                    dimension: n as u64,
                });
            }
            let mut out = Vec::with_capacity(k);
            for (i, &b) in bytes.iter().enumerate() {
                let mut x = b;
                while x != 0 {
                    out.push((i * 8) as u32 + x.trailing_zeros());
                    x &= x - 1;
                }
            }
            out
        }
        other => {
            return Err(ProtoError::UnknownEnum {
                field: FIELD_INDICES,
                value: i32::from(other),
            });
        }
    };
    assert_eq!(out.len(), k);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_the_largest_magnitudes_lowest_index_on_ties() {
        let cases: [(&[f32], usize, &[u32]); 5] = [
            (&[1.0, -5.0, 3.0, 0.0], 2, &[1, 2]),
            (&[1.0, -5.0, 3.0, 0.0], 4, &[0, 1, 2, 3]),
            (&[2.0, -2.0, 2.0, 1.0], 2, &[0, 1]),
            (&[0.0, 0.0, 0.0], 1, &[0]),
            (&[], 0, &[]),
        ];
        for (xs, k, want) in cases {
            assert_eq!(topk_indices(xs, k), want, "{xs:?} k={k}");
        }
    }

    #[test]
    fn randk_is_a_seeded_sorted_k_subset() {
        for (n, k) in [(0, 0), (1, 1), (10, 3), (100, 100), (1000, 17)] {
            let a = randk_indices(7, n, k);
            assert_eq!(a, randk_indices(7, n, k), "deterministic");
            assert_eq!(a.len(), k);
            assert!(a.windows(2).all(|w| w[0] < w[1]));
            assert!(a.iter().all(|&i| (i as usize) < n));
        }
        assert_ne!(randk_indices(1, 1000, 17), randk_indices(2, 1000, 17));
        // Pinned: random-k indices are wire format; if this changes,
        // decoders of older payloads disagree with their encoders.
        assert_eq!(randk_indices(42, 100, 5), PINNED_RANDK_42_100_5);
    }

    const PINNED_RANDK_42_100_5: [u32; 5] = [21, 44, 51, 63, 90];

    #[test]
    fn index_sections_pick_the_shorter_form() {
        // (indices, n, format)
        let cases: [(&[u32], usize, u8); 4] = [
            (&[3], 1000, INDEX_FORMAT_VARINT),
            (&[], 16, INDEX_FORMAT_VARINT),
            (&[0, 1, 2, 3, 4, 5, 6, 7, 8], 16, INDEX_FORMAT_BITMAP),
            (&[0, 500, 999], 1000, INDEX_FORMAT_VARINT),
        ];
        for (idx, n, format) in cases {
            let mut b = Vec::new();
            encode_indices(idx, n, &mut b);
            assert_eq!(b[0], format, "{idx:?}");
            let mut r = Reader::new(&b);
            assert_eq!(decode_indices(&mut r, idx.len(), n).unwrap(), idx);
            assert_eq!(r.position(), b.len());
        }
    }
}
