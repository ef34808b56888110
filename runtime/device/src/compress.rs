//! Device-side update compression with error feedback: what a lossy codec
//! did not send this round is carried into the next round's update, and
//! the residual persists with the device's checkpoint so a restart loses
//! nothing.

use std::path::Path;

use bytes::Bytes;
use fedge_proto::codec::{self, CodecSpec, EncodeError};

/// The error-feedback state of one device.
///
/// [`Compressor::compress`] treats what it encodes as delivered. The
/// device session uses [`Compressor::compress_pending`] instead: what the
/// upload transmits is held aside until the aggregator acknowledges it
/// ([`Compressor::commit`]); if the update is refused or abandoned,
/// [`Compressor::restore_unsent`] puts it back into the residual, so a
/// rejected upload loses nothing of the signal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compressor {
    residual: Vec<f32>,
    /// What the pending upload transmits (empty when none is pending).
    unacked: Vec<f32>,
}

impl Compressor {
    /// The residual as committed: what has not been delivered, assuming the
    /// pending upload (if any) will be.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Whether an upload's transmitted part awaits an acknowledgement.
    pub fn has_pending(&self) -> bool {
        !self.unacked.is_empty()
    }

    /// Like [`Compressor::compress`], but the transmitted part stays
    /// pending until [`Compressor::commit`] or
    /// [`Compressor::restore_unsent`]. A pending upload never resolved is
    /// taken as not delivered.
    pub fn compress_pending(
        &mut self,
        spec: &CodecSpec,
        delta: &[f32],
        seed: u64,
        error_feedback: bool,
    ) -> Result<Bytes, EncodeError> {
        self.restore_unsent();
        if !error_feedback {
            return self.compress(spec, delta, seed, false);
        }
        if self.residual.len() != delta.len() {
            // A new model layout: nothing carries over.
            self.residual = vec![0.0; delta.len()];
        }
        let before = self.residual.clone();
        let bytes = self.compress(spec, delta, seed, true)?;
        // delta + before = sent + residual, so what was sent is:
        self.unacked = delta
            .iter()
            .zip(&before)
            .zip(&self.residual)
            .map(|((d, b), r)| d + b - r)
            .collect();
        Ok(bytes)
    }

    /// The aggregator acknowledged the pending upload; true if one was
    /// pending (the residual file then needs saving).
    pub fn commit(&mut self) -> bool {
        let had = self.has_pending();
        self.unacked.clear();
        had
    }

    /// The pending upload was refused or abandoned: what it carried goes
    /// back into the residual. True if one was pending.
    pub fn restore_unsent(&mut self) -> bool {
        if !self.has_pending() {
            return false;
        }
        for (r, u) in self.residual.iter_mut().zip(&self.unacked) {
            *r += u;
        }
        self.unacked.clear();
        true
    }

    /// Encode `delta` with `spec`. With `error_feedback`, the residual is
    /// added first and what the codec drops becomes the new residual.
    pub fn compress(
        &mut self,
        spec: &CodecSpec,
        delta: &[f32],
        seed: u64,
        error_feedback: bool,
    ) -> Result<Bytes, EncodeError> {
        if !error_feedback {
            self.residual.clear();
            return codec::encode(spec, delta, seed);
        }
        if self.residual.len() != delta.len() {
            // A new model layout: nothing carries over.
            self.residual = vec![0.0; delta.len()];
        }
        let corrected: Vec<f32> = delta
            .iter()
            .zip(&self.residual)
            .map(|(d, r)| d + r)
            .collect();
        let (bytes, sent) = codec::encode_with_transmitted(spec, &corrected, seed)?;
        self.residual = corrected.iter().zip(&sent).map(|(c, s)| c - s).collect();
        Ok(bytes)
    }

    /// Serialise: dimension (u64 LE) then the residual as f32 LE. A
    /// pending upload is saved as not delivered (after a restart it is
    /// gone), so the file never loses its part.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * self.residual.len());
        out.extend_from_slice(&(self.residual.len() as u64).to_le_bytes());
        for (i, v) in self.residual.iter().enumerate() {
            let v = v + self.unacked.get(i).copied().unwrap_or(0.0);
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parse what [`Compressor::to_bytes`] wrote; a torn or foreign file is
    /// an error (the caller starts from an empty residual).
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let dim = b
            .get(..8)
            .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
            .ok_or("residual file too short")?;
        // Checked: a foreign header can declare any u64.
        if dim.checked_mul(4).and_then(|n| n.checked_add(8)) != Some(b.len() as u64) {
            return Err(format!(
                "residual file holds {} bytes for {dim} values",
                b.len()
            ));
        }
        let residual: Vec<f32> = b[8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if residual.iter().any(|v| !v.is_finite()) {
            return Err("residual holds non-finite values".into());
        }
        Ok(Compressor {
            residual,
            unacked: Vec::new(),
        })
    }

    pub fn load(path: &Path) -> Self {
        match std::fs::read(path) {
            Ok(b) => Self::from_bytes(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring residual file");
                Compressor::default()
            }),
            Err(_) => Compressor::default(),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        fedge_proto::io::write_atomic(path, &self.to_bytes(), None)
    }
}

/// The codec seed for a device's update in a round: distinct per device
/// and per round, so random-k indices and stochastic rounding never repeat.
pub fn round_seed(device_key: &[u8; 32], round_id: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"fedge-codec-seed");
    h.update(device_key);
    h.update(&round_id.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_proto::Limits;

    #[test]
    fn residual_header_past_u64_bytes_is_refused() {
        // fuzz/artifacts/residual (the `residual` fuzz target): a declared
        // dimension of 0x7d7d7d7d7d000000 overflowed `8 + 4 * dim`.
        let input: &[u8] = &[
            0x00, 0x00, 0x00, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d,
            0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x7d, 0x00, 0x55, 0x00, 0x00, 0x00,
            0x00,
        ];
        let e = Compressor::from_bytes(input).unwrap_err();
        assert!(e.contains("29 bytes"), "{e}");
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 4]);
        assert!(Compressor::from_bytes(&huge).is_err());
    }

    #[test]
    fn error_feedback_invariant_holds_over_many_rounds_and_a_restart() {
        let spec = CodecSpec::parse("topk:0.05+q4").unwrap();
        let dim = 400;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("residual.bin");
        let mut c = Compressor::default();
        let mut sum_true = vec![0.0f64; dim];
        let mut sum_sent = vec![0.0f64; dim];
        for round in 0..60u64 {
            let delta: Vec<f32> = (0..dim)
                .map(|i| ((i as f32 * 0.37 + round as f32 * 1.3).sin()) * 0.01)
                .collect();
            let bytes = c
                .compress(&spec, &delta, round_seed(&[7; 32], round), true)
                .unwrap();
            let sent = codec::decode(&bytes, dim, &Limits::default()).unwrap();
            for i in 0..dim {
                sum_true[i] += f64::from(delta[i]);
                sum_sent[i] += f64::from(sent[i]);
            }
            // sent + residual == true, cumulatively.
            for i in 0..dim {
                let lhs = sum_sent[i] + f64::from(c.residual()[i]);
                assert!(
                    (lhs - sum_true[i]).abs() < 1e-4,
                    "round {round} coordinate {i}"
                );
            }
            if round == 30 {
                // A restart in the middle: the residual comes back from disk.
                c.save(&path).unwrap();
                c = Compressor::load(&path);
            }
        }
        assert!(Compressor::from_bytes(&[1, 2, 3]).is_err());
        assert!(Compressor::from_bytes(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert_ne!(round_seed(&[1; 32], 1), round_seed(&[1; 32], 2));
        assert_ne!(round_seed(&[1; 32], 1), round_seed(&[2; 32], 1));
    }

    /// An upload refused (or abandoned) loses nothing: the residual after
    /// restoring equals what it would be had the round not been attempted
    /// plus this round's delta; an acknowledged one keeps the
    /// `sent + residual == true` invariant.
    #[test]
    fn a_rejected_upload_loses_nothing() {
        let spec = CodecSpec::parse("topk:0.1+q4").unwrap();
        let dim = 200;
        let delta = |round: u64| -> Vec<f32> {
            (0..dim)
                .map(|i| ((i as f32 * 0.71 + round as f32).cos()) * 0.02)
                .collect()
        };
        let mut c = Compressor::default();
        let mut sum_true = vec![0.0f64; dim];
        let mut sum_sent = vec![0.0f64; dim];
        for round in 0..30u64 {
            let d = delta(round);
            let bytes = c
                .compress_pending(&spec, &d, round_seed(&[3; 32], round), true)
                .unwrap();
            assert!(c.has_pending());
            for (t, v) in sum_true.iter_mut().zip(&d) {
                *t += f64::from(*v);
            }
            // Every third upload is refused, every fifth abandoned (the
            // next compress resolves it); the rest are acknowledged.
            if round % 3 == 0 {
                assert!(c.restore_unsent());
            } else if round % 5 != 0 {
                assert!(c.commit());
                let sent = codec::decode(&bytes, dim, &Limits::default()).unwrap();
                for (s, v) in sum_sent.iter_mut().zip(&sent) {
                    *s += f64::from(*v);
                }
            } else {
                // Abandoned: the residual file holds it as not delivered.
                let saved = Compressor::from_bytes(&c.to_bytes()).unwrap();
                for i in 0..dim {
                    let lhs = sum_sent[i] + f64::from(saved.residual()[i]);
                    assert!((lhs - sum_true[i]).abs() < 1e-4, "round {round} file {i}");
                }
                continue;
            }
            for i in 0..dim {
                let lhs = sum_sent[i] + f64::from(c.residual()[i]);
                assert!(
                    (lhs - sum_true[i]).abs() < 1e-4,
                    "round {round} coordinate {i}: {lhs} vs {}",
                    sum_true[i]
                );
            }
        }
    }
}
