//! Clipping and quantizing an update into Z_{2^b}, and reading a sum back.
//!
//! A device clips its update to L2 norm `clip` (so every coordinate lies in
//! [-clip, clip]), scales it by `s` and rounds each coordinate
//! stochastically (up with probability equal to the fractional part, so
//! E[q] = s x: the sum is unbiased), and writes it in two's complement mod
//! 2^b. The scale leaves room for the sum of `devices_max` updates:
//! s = (floor((2^(b-1) - 1) / devices_max) - 1) / clip, so each quantized
//! coordinate has |q| <= m = s clip + 1 and any sum of at most
//! `devices_max` of them stays inside (-2^(b-1), 2^(b-1)): reading the
//! masked sum as a signed b-bit number gives the exact integer sum.

use rand_chacha::rand_core::RngCore;

use super::SecAggError;
use super::mask::ring_mask;

/// Fewest and most ring bits.
pub const BITS_MIN: u32 = 8;
pub const BITS_MAX: u32 = 62;

/// The fixed-point encoding of one round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    bits: u32,
    clip: f64,
    scale: f64,
}

impl Quantizer {
    /// The quantizer for `bits`-bit ring elements, L2 bound `clip` and at
    /// most `devices_max` summands.
    pub fn new(bits: u32, clip: f64, devices_max: u32) -> Result<Self, SecAggError> {
        if !(BITS_MIN..=BITS_MAX).contains(&bits) {
            return Err(SecAggError::Params(format!(
                "bits {bits} is not in {BITS_MIN}..={BITS_MAX}"
            )));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(SecAggError::Params(format!(
                "clip {clip} must be finite and positive"
            )));
        }
        let per_device = ((1u64 << (bits - 1)) - 1) / u64::from(devices_max.max(1));
        if per_device < 2 {
            return Err(SecAggError::Params(format!(
                "{bits} bits leave no room for {devices_max} devices: raise bits"
            )));
        }
        Ok(Quantizer {
            bits,
            clip,
            scale: (per_device - 1) as f64 / clip,
        })
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Integer steps per unit of the update.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Clip `update` to L2 norm `clip`, then quantize it into Z_{2^b} with
    /// stochastic rounding driven by `rng`. A non-finite update is refused.
    pub fn quantize(
        &self,
        update: &[f32],
        rng: &mut impl RngCore,
    ) -> Result<Vec<u64>, SecAggError> {
        let norm = update
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() {
            return Err(SecAggError::NotFinite);
        }
        let factor = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        let m = ring_mask(self.bits);
        let out = update
            .iter()
            .map(|&x| {
                let v = (f64::from(x) * factor).clamp(-self.clip, self.clip) * self.scale;
                let floor = v.floor();
                // 53 random bits: a uniform in [0, 1).
                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                let q = floor as i64 + i64::from(u < v - floor);
                (q as u64) & m
            })
            .collect();
        Ok(out)
    }

    /// A ring element read as a signed b-bit integer.
    pub fn signed(&self, v: u64) -> i64 {
        let v = v & ring_mask(self.bits);
        if v >> (self.bits - 1) == 1 {
            (v as i64) - (1i64 << self.bits)
        } else {
            v as i64
        }
    }

    /// The sum (in Z_{2^b}) read back into update units.
    pub fn decode_sum(&self, sum: &[u64]) -> Vec<f64> {
        sum.iter()
            .map(|&v| self.signed(v) as f64 / self.scale)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn rounding_is_unbiased_and_the_sum_has_room() {
        let q = Quantizer::new(16, 1.0, 100).unwrap();
        // 2^15 - 1 = 32767; 32767 / 100 = 327; scale 326.
        assert_eq!(q.scale(), 326.0);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let x = [0.123_f32, -0.5, 0.0];
        let trials = 20_000;
        let mut sums = [0f64; 3];
        for _ in 0..trials {
            let v = q.quantize(&x, &mut rng).unwrap();
            for (s, &e) in sums.iter_mut().zip(&v) {
                *s += q.signed(e) as f64;
            }
        }
        for (s, &e) in sums.iter().zip(&x) {
            let mean = s / trials as f64 / q.scale();
            assert!((mean - f64::from(e)).abs() < 1e-3, "mean {mean} for {e}");
        }
        // 100 updates at the clip bound sum without wrapping.
        let top = q.quantize(&[1.0], &mut rng).unwrap()[0];
        let sum = (0..100).fold(0u64, |a, _| a.wrapping_add(top)) & ring_mask(16);
        assert_eq!(q.signed(sum), 100 * q.signed(top));
        let bottom = q.quantize(&[-1.0], &mut rng).unwrap()[0];
        let sum = (0..100).fold(0u64, |a, _| a.wrapping_add(bottom)) & ring_mask(16);
        assert_eq!(q.signed(sum), 100 * q.signed(bottom));
    }

    #[test]
    fn clipping_and_refusals() {
        let q = Quantizer::new(32, 2.0, 10).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let v = q.quantize(&[30.0, 40.0], &mut rng).unwrap();
        let back: Vec<f64> = v.iter().map(|&e| q.signed(e) as f64 / q.scale()).collect();
        assert!(
            (back[0] - 1.2).abs() < 1e-6 && (back[1] - 1.6).abs() < 1e-6,
            "{back:?}"
        );
        assert_eq!(
            q.quantize(&[f32::NAN], &mut rng),
            Err(SecAggError::NotFinite)
        );
        assert!(Quantizer::new(8, 1.0, 100).is_err());
        assert!(Quantizer::new(63, 1.0, 1).is_err());
        assert!(Quantizer::new(32, 0.0, 1).is_err());
    }
}
