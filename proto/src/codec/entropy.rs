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
