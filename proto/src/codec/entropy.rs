//! The optional final stage: zstd over the whole body (pure-Rust `ruzstd`).
//! Decompression is bounded twice: the frame's window may not exceed
//! [`ZSTD_WINDOW_BYTES_MAX`], and output stops one byte past the caller's
//! bound, so a small frame can never make us allocate a large buffer.

use std::io::Read;

use ruzstd::decoding::StreamingDecoder;
use ruzstd::encoding::{CompressionLevel, compress_to_vec};

use crate::ProtoError;

/// Largest zstd window a peer's frame may declare. `ruzstd` (the only
/// encoder we speak with) always declares 128 KiB; the decoder reserves
/// the declared window up front, so this is a fixed, small allocation.
pub const ZSTD_WINDOW_BYTES_MAX: u64 = 128 << 10;

/// Bytes decoded per read; output grows in steps of this, never past the bound.
const READ_CHUNK_BYTES: usize = 64 << 10;

pub fn compress(body: &[u8]) -> Vec<u8> {
    compress_to_vec(body, CompressionLevel::Fastest)
}

/// The zstd frame magic number.
const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
/// The largest block (the format's `Block_Maximum_Size` with our window).
const BLOCK_BYTES_MAX: usize = 128 << 10;
/// A block header's `Last_Block` bit.
const LAST_BLOCK: u32 = 1;

/// One zstd frame of `body` in which only `body[part]` is compressed
/// ([`compress`]) and the bytes before and after it are stored in raw
/// blocks: for a body whose ends are known not to compress (the XOR of
/// float mantissas), what [`compress`] would have found only after
/// searching them for matches. Any zstd decoder reads it back
/// ([`decompress_bounded`] included): the compressed blocks are
/// [`compress`]'s own, after raw blocks, which change none of the state
/// they use (repeat offsets, entropy tables) and leave their back
/// references pointing at the same bytes.
pub fn compress_part(body: &[u8], part: std::ops::Range<usize>) -> Vec<u8> {
    assert!(
        part.start <= part.end && part.end <= body.len(),
        "part within the body"
    );
    if part.start == 0 && part.end == body.len() {
        return compress(body);
    }
    let inner = (!part.is_empty()).then(|| compress(&body[part.clone()]));
    let (window, blocks) = match &inner {
        Some(frame) => frame_blocks(frame).expect("ruzstd writes frames it can read"),
        None => (window_descriptor(), Vec::new()),
    };
    let mut out =
        Vec::with_capacity(body.len() - part.len() + inner.as_ref().map_or(0, Vec::len) + 32);
    // Magic, a descriptor with no content size, checksum or dictionary and
    // not single-segment (so a window descriptor follows), the window.
    out.extend_from_slice(&MAGIC);
    out.push(0);
    out.push(window);
    let mut last_header = None;
    raw_blocks(&mut out, &body[..part.start], &mut last_header);
    for block in blocks {
        let header = u32::from_le_bytes([block[0], block[1], block[2], 0]) & !LAST_BLOCK;
        last_header = Some(out.len());
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(&block[3..]);
    }
    raw_blocks(&mut out, &body[part.end..], &mut last_header);
    match last_header {
        Some(at) => out[at] |= LAST_BLOCK as u8,
        // Nothing at all: one empty raw block, the last.
        None => out.extend_from_slice(&[LAST_BLOCK as u8, 0, 0]),
    }
    out
}

/// `bytes` as raw blocks (type 0: the size, then the bytes) at the end of
/// `out`; `last` is where the last block header went.
fn raw_blocks(out: &mut Vec<u8>, bytes: &[u8], last: &mut Option<usize>) {
    for chunk in bytes.chunks(BLOCK_BYTES_MAX) {
        *last = Some(out.len());
        out.extend_from_slice(&((chunk.len() as u32) << 3).to_le_bytes()[..3]);
        out.extend_from_slice(chunk);
    }
}

/// The window descriptor [`compress`] writes.
fn window_descriptor() -> u8 {
    frame_blocks(&compress(&[0])).expect("a frame").0
}

/// A frame's window descriptor and its blocks (each with its 3-byte
/// header), empty raw blocks left out; `None` for a frame this does not
/// expect (single-segment, with a dictionary, or cut short).
fn frame_blocks(frame: &[u8]) -> Option<(u8, Vec<&[u8]>)> {
    let (magic, rest) = frame.split_at_checked(4)?;
    if magic != MAGIC {
        return None;
    }
    let (&descriptor, rest) = rest.split_first()?;
    let single_segment = descriptor & 0x20 != 0;
    let dictionary = descriptor & 0x03 != 0;
    if single_segment || dictionary {
        return None;
    }
    let content_size_bytes = [0, 2, 4, 8][usize::from(descriptor >> 6)];
    let (&window, mut rest) = rest.split_first()?;
    rest = rest.get(content_size_bytes..)?;
    let mut blocks = Vec::new();
    loop {
        let h = u32::from_le_bytes([*rest.first()?, *rest.get(1)?, *rest.get(2)?, 0]);
        let size = (h >> 3) as usize;
        let len = 3 + match (h >> 1) & 3 {
            0 | 2 => size,
            1 => 1,
            _ => return None,
        };
        let (block, after) = rest.split_at_checked(len)?;
        if !(h >> 1 & 3 == 0 && size == 0) {
            blocks.push(block);
        }
        rest = after;
        if h & LAST_BLOCK != 0 {
            return Some((window, blocks));
        }
    }
}

/// Decompress one zstd frame that must fill `frame` exactly and decode to at
/// most `bytes_max` bytes.
pub fn decompress_bounded(frame: &[u8], bytes_max: u64) -> Result<Vec<u8>, ProtoError> {
    let bad = |e: &dyn std::fmt::Display| ProtoError::Invalid {
        field: "update.data",
        reason: format!("zstd frame: {e}"),
    };
    let mut source = frame;
    let mut decoder =
        StreamingDecoder::new_with_max_window_size(&mut source, ZSTD_WINDOW_BYTES_MAX)
            .map_err(|e| bad(&e))?;
    let bytes_max = usize::try_from(bytes_max).unwrap_or(usize::MAX);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    // Each pass either makes progress (at least one byte) or ends, and
    // output is capped at bytes_max + 1, so this runs at most that often.
    loop {
        let got = decoder.read(&mut chunk).map_err(|e| bad(&e))?;
        if got == 0 {
            break;
        }
        if out.len() + got > bytes_max {
            return Err(ProtoError::DecompressedTooLarge {
                bytes_max: bytes_max as u64,
            });
        }
        // Grow geometrically but never past bytes_max.
        if out.capacity() < out.len() + got {
            let target = (out.capacity() * 2).max(out.len() + got).min(bytes_max);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..got]);
    }
    drop(decoder);
    if !source.is_empty() {
        return Err(ProtoError::Invalid {
            field: "update.data",
            reason: format!("{} bytes after the zstd frame", source.len()),
        });
    }
    assert!(out.len() <= bytes_max);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that do not compress (a xorshift stream) for `random`, then
    /// mostly zeros with a few small values.
    fn body(random: usize, sparse: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out: Vec<u8> = (0..random)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        out.extend((0..sparse).map(|i| if i % 37 == 0 { (i % 5) as u8 } else { 0 }));
        out
    }

    /// Every split of a body into a raw prefix, a compressed part and a
    /// raw suffix reads back exactly, across block boundaries (128 KiB)
    /// and with empty pieces; raw ends cost their bytes plus 3 a block.
    #[test]
    fn partly_compressed_frames_read_back_exactly() {
        let k = BLOCK_BYTES_MAX;
        for (random, sparse) in [
            (0, 0),
            (10, 0),
            (0, 10),
            (3 * k, 2 * k),
            (k + 7, 3 * k - 1),
            (2 * k, 0),
        ] {
            let b = body(random, sparse, (random + sparse) as u64);
            let n = b.len();
            let mut parts = vec![0..n, 0..0, n..n, 0..random, random..n, random / 2..n];
            if n > 0 {
                parts.extend([1..n - 1, n / 3..n / 3 + 1, k.min(n)..n]);
            }
            for part in parts {
                let frame = compress_part(&b, part.clone());
                let back = decompress_bounded(&frame, n as u64)
                    .unwrap_or_else(|e| panic!("{random}+{sparse} {part:?}: {e}"));
                assert!(back == b, "{random}+{sparse} {part:?}: not the body");
                let raw = n - part.len();
                let inner = if part.is_empty() {
                    0
                } else {
                    compress(&b[part.clone()]).len()
                };
                assert!(
                    frame.len() <= raw + 3 * raw.div_ceil(k) + inner + 9,
                    "{random}+{sparse} {part:?}: {} bytes",
                    frame.len()
                );
            }
        }
    }

    /// Raw ends cost no compression: a random prefix stored raw leaves
    /// the frame within a few bytes a block of the whole body compressed.
    #[test]
    fn raw_ends_cost_what_compressing_them_would() {
        let b = body(2 * BLOCK_BYTES_MAX, 2 * BLOCK_BYTES_MAX, 9);
        let whole = compress(&b).len();
        let part = compress_part(&b, 2 * BLOCK_BYTES_MAX..b.len()).len();
        assert!(part <= whole + 16, "{part} > {whole}");
    }
}
