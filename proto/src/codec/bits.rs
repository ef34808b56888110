//! Byte-level helpers: LEB128 varints, a bounds-checked reader, and tight
//! little-endian bit packing of 1, 2, 4 or 8-bit codes.

use crate::ProtoError;

/// Longest LEB128 encoding of a u64.
pub const VARINT_BYTES_MAX: usize = 10;

pub fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over peer bytes. Every read is bounds-checked and names the
/// field it was reading in its error.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        let b = *self.data.get(self.pos).ok_or(ProtoError::BadLength {
            field,
            expected: self.pos + 1,
            got: self.data.len(),
        })?;
        self.pos += 1;
        Ok(b)
    }

    /// A canonical (shortest-form) LEB128 u64.
    pub fn varint(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        let mut v: u64 = 0;
        for i in 0..VARINT_BYTES_MAX {
            let b = self.u8(field)?;
            let bits = u64::from(b & 0x7f);
            if i == VARINT_BYTES_MAX - 1 && b > 1 {
                return Err(invalid(field, "varint overflows u64"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(invalid(field, "varint is not in shortest form"));
                }
                return Ok(v);
            }
        }
        Err(invalid(field, "varint overflows u64"))
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(len).filter(|&e| e <= self.data.len());
        let end = end.ok_or(ProtoError::BadLength {
            field,
            expected: self.pos.saturating_add(len),
            got: self.data.len(),
        })?;
        let r = &self.data[self.pos..end];
        self.pos = end;
        Ok(r)
    }

    /// The remaining bytes; the reader is then exhausted.
    pub fn rest(&mut self) -> &'a [u8] {
        let r = &self.data[self.pos..];
        self.pos = self.data.len();
        r
    }
}

pub fn invalid(field: &'static str, reason: &str) -> ProtoError {
    ProtoError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

/// Check `data.len() == expected`, naming `field`.
pub fn expect_len(field: &'static str, data: &[u8], expected: u64) -> Result<(), ProtoError> {
    if data.len() as u64 != expected {
        return Err(ProtoError::BadLength {
            field,
            expected: usize::try_from(expected).unwrap_or(usize::MAX),
            got: data.len(),
        });
    }
    Ok(())
}

/// Bytes to hold `count` codes of `bits` bits each.
pub fn packed_len(count: u64, bits: u32) -> u64 {
    assert!(matches!(bits, 1 | 2 | 4 | 8));
    (count.saturating_mul(u64::from(bits))).div_ceil(8)
}

/// Pack `codes` (each `< 2^bits`) LSB-first: code `i` occupies bits
/// `i*bits .. (i+1)*bits` of the byte string. Padding bits are zero.
pub fn pack(codes: &[u8], bits: u32, out: &mut Vec<u8>) {
    match bits {
        8 => out.extend_from_slice(codes),
        4 => pack_n::<4>(codes, out),
        2 => pack_n::<2>(codes, out),
        1 => pack_n::<1>(codes, out),
        _ => unreachable!("bits is 1, 2, 4 or 8"),
    }
}

fn pack_n<const B: usize>(codes: &[u8], out: &mut Vec<u8>) {
    let per_byte = 8 / B;
    out.reserve(codes.len().div_ceil(per_byte));
    let byte = |chunk: &[u8]| {
        chunk.iter().enumerate().fold(0u8, |acc, (j, &c)| {
            debug_assert!(usize::from(c) < 1 << B);
            acc | c << (j * B)
        })
    };
    let whole = codes.chunks_exact(per_byte);
    let tail = whole.remainder();
    out.extend(whole.map(byte));
    if !tail.is_empty() {
        out.push(byte(tail));
    }
}

/// Unpack `count` codes of `bits` bits from `data` (exactly
/// `packed_len(count, bits)` bytes, checked by the caller). Padding bits
/// must be zero and every code at most `code_max`.
pub fn unpack(
    data: &[u8],
    count: usize,
    bits: u32,
    code_max: u8,
    field: &'static str,
) -> Result<Vec<u8>, ProtoError> {
    assert_eq!(data.len() as u64, packed_len(count as u64, bits));
    let per_byte = 8 / bits as usize;
    let mut codes = Vec::with_capacity(data.len() * per_byte);
    match bits {
        8 => codes.extend_from_slice(data),
        4 => unpack_n::<4>(data, &mut codes),
        2 => unpack_n::<2>(data, &mut codes),
        1 => unpack_n::<1>(data, &mut codes),
        _ => unreachable!("bits is 1, 2, 4 or 8"),
    }
    if codes[count..].iter().any(|&c| c != 0) {
        return Err(invalid(
            field,
            "padding bits after the last code are not zero",
        ));
    }
    codes.truncate(count);
    if let Some(i) = codes.iter().position(|&c| c > code_max) {
        return Err(invalid(
            field,
            &format!("code {} at position {i} is over {code_max}", codes[i]),
        ));
    }
    Ok(codes)
}

fn unpack_n<const B: usize>(data: &[u8], codes: &mut Vec<u8>) {
    let mask = (1u8 << B) - 1;
    for &byte in data {
        for j in 0..8 / B {
            codes.push((byte >> (j * B)) & mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_non_canonical() {
        for v in [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
            let mut r = Reader::new(&b);
            assert_eq!(r.varint("v"), Ok(v));
            assert_eq!(r.position(), b.len());
        }
        let bad: [(&[u8], &str); 4] = [
            (&[0x80], "truncated"),
            (&[0x80, 0x00], "overlong zero"),
            (&[0xff; 10], "continuation past 10 bytes"),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                "over u64",
            ),
        ];
        for (b, why) in bad {
            assert!(Reader::new(b).varint("v").is_err(), "{why}");
        }
    }

    #[test]
    fn packing_round_trips_and_pads_with_zero() {
        for bits in [1u32, 2, 4, 8] {
            for count in [0usize, 1, 3, 7, 8, 9, 17] {
                let codes: Vec<u8> = (0..count).map(|i| (i * 5 % (1 << bits)) as u8).collect();
                let mut out = Vec::new();
                pack(&codes, bits, &mut out);
                assert_eq!(out.len() as u64, packed_len(count as u64, bits));
                let max = ((1u32 << bits) - 1) as u8;
                assert_eq!(unpack(&out, count, bits, max, "c"), Ok(codes.clone()));
                if codes.contains(&max) {
                    assert!(unpack(&out, count, bits, max - 1, "c").is_err());
                }
                if bits < 8 && !(count * bits as usize).is_multiple_of(8) {
                    *out.last_mut().unwrap() |= 0x80;
                    assert!(unpack(&out, count, bits, max, "c").is_err());
                }
            }
        }
    }
}
