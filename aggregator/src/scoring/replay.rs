//! Stale replays: an update that repeats one accepted in an earlier round
//! (the device's own, or anyone's) earns nothing; it is flagged a
//! free-rider, as the issue of record defines one ("an update with ~no
//! effect or a stale replay"). A stale update can still lower the
//! validation loss, so its score alone does not catch it.
//!
//! Keeping every earlier update whole would cost a model's size per
//! participation, so each is kept as a count sketch (Charikar, Chen and
//! Farach-Colton 2002, "Finding Frequent Items in Data Streams", ICALP):
//! coordinate `i` is added, with a sign, to one of [`SKETCH_DIM`] buckets,
//! both drawn from a fixed hash of `i`. Sketches preserve inner products
//! in expectation with a spread of about `1/sqrt(SKETCH_DIM)` (0.03) on a
//! cosine, and identical updates have identical sketches, so a replay is
//! at cosine 1 while honest updates of different rounds, below 0.7 in the
//! MNIST runs, stay far from `copy_cosine_min` (0.99). The last
//! [`ROUNDS_KEPT`] rounds are kept, at most [`SKETCHES_MAX`] sketches (16
//! MiB). The history lives in memory and is rebuilt at startup from the
//! last scored rounds' kept payloads ([`History::remember`]), as a ledger
//! verifier builds it going through the chain.

use std::collections::VecDeque;

use super::{UpdateScore, cosine};

/// Buckets of a sketch.
pub const SKETCH_DIM: usize = 1024;
/// Rounds whose updates are remembered.
pub const ROUNDS_KEPT: usize = 16;
/// Most sketches remembered, whatever the rounds' sizes.
pub const SKETCHES_MAX: usize = 4096;

/// The count sketch of `delta`.
pub fn sketch(delta: &[f32]) -> Vec<f32> {
    let mut s = vec![0f64; SKETCH_DIM];
    for (i, &x) in delta.iter().enumerate() {
        let h = mix(i as u64);
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        s[(h % SKETCH_DIM as u64) as usize] += sign * f64::from(x);
    }
    s.into_iter().map(|v| v as f32).collect()
}

/// SplitMix64's finaliser (Steele, Lea and Flood 2014): a fixed,
/// well-mixed hash of a coordinate's index.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sketches of the updates accepted in recent rounds.
#[derive(Default)]
pub struct History {
    rounds: VecDeque<Vec<Vec<f32>>>,
}

impl History {
    /// Flags as free-riders the updates (`deltas`, with their `updates`)
    /// at least `min_cos`-similar to one of an earlier round, then
    /// remembers this round's. Returns how many were flagged.
    pub fn flag_and_keep(
        &mut self,
        updates: &mut [UpdateScore],
        deltas: &[&[f32]],
        min_cos: f64,
    ) -> usize {
        let sketches: Vec<Vec<f32>> = deltas.iter().map(|d| sketch(d)).collect();
        let mut flagged = 0;
        for (u, s) in updates.iter_mut().zip(&sketches) {
            let stale = self
                .rounds
                .iter()
                .flatten()
                .any(|e| cosine(e, s) >= min_cos);
            if stale && !u.free_rider {
                u.free_rider = true;
                flagged += 1;
            }
        }
        self.keep_sketches(sketches);
        flagged
    }

    /// Remembers a round's updates without flagging them: rebuilding the
    /// history at startup from the ledger's last scored rounds.
    pub fn remember(&mut self, deltas: &[&[f32]]) {
        self.keep_sketches(deltas.iter().map(|d| sketch(d)).collect());
    }

    fn keep_sketches(&mut self, sketches: Vec<Vec<f32>>) {
        self.rounds.push_back(sketches);
        // The newest round stays whatever its size, so a round of more
        // than SKETCHES_MAX updates still protects the next one.
        while self.rounds.len() > ROUNDS_KEPT
            || (self.rounds.len() > 1
                && self.rounds.iter().map(Vec::len).sum::<usize>() > SKETCHES_MAX)
        {
            self.rounds.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn score() -> UpdateScore {
        UpdateScore {
            score: Some(1.0),
            norm: 1.0,
            copy_of: None,
            similarity: 0.0,
            alignment: 0.0,
            free_rider: false,
            noise: false,
        }
    }

    /// A device re-sending its round-1 update in round 3, or another
    /// device's, is flagged; fresh updates of the same model, even close
    /// ones (cosine 0.9), are not; rounds older than the history are
    /// forgotten.
    #[test]
    fn replays_of_earlier_rounds_are_free_riders() {
        let d = 200_000;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut random =
            || -> Vec<f32> { (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let (a, b, noise) = (random(), random(), random());
        // Cosine 0.9 with a: a fresh update close to an earlier one.
        let near: Vec<f32> = a.iter().zip(&noise).map(|(x, n)| x + 0.484 * n).collect();
        assert!((cosine(&a, &near) - 0.9).abs() < 0.01);
        let mut h = History::default();
        let mut u = vec![score(), score()];
        assert_eq!(h.flag_and_keep(&mut u, &[&a, &b], 0.99), 0);
        let fresh = random();
        let mut u = vec![score(), score()];
        assert_eq!(h.flag_and_keep(&mut u, &[&fresh, &near], 0.99), 0);
        let mut u = vec![score(), score(), score()];
        assert_eq!(h.flag_and_keep(&mut u, &[&b, &random(), &a], 0.99), 2);
        assert!(u[0].free_rider && !u[1].free_rider && u[2].free_rider);
        for _ in 0..ROUNDS_KEPT {
            let mut u = vec![score()];
            h.flag_and_keep(&mut u, &[&random()], 0.99);
        }
        let mut u = vec![score()];
        assert_eq!(h.flag_and_keep(&mut u, &[&fresh], 0.99), 0);
        // Identical updates have identical sketches, for any length.
        assert_eq!(sketch(&a[..10]), sketch(&a[..10]));
        assert_eq!(cosine(&sketch(&a[..10]), &sketch(&a[..10])), 1.0);
    }
}
