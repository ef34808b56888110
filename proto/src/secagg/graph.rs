//! The round's neighbour graph: who exchanges keys, masks and shares with
//! whom.
//!
//! SecAgg+ (Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure
//! Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020)
//! replaces SecAgg's complete graph by a sparse random graph of degree
//! k = O(log n), so each device's work and traffic grow with log n. The
//! paper analyses an Erdős-Rényi graph; like its practical instantiations
//! we use a *random Harary graph*: the n devices are placed on a ring in an
//! order drawn from the round seed, and each is joined to the k/2 nearest
//! on either side. Every device has exactly k neighbours (k even, at most
//! n - 1: with k >= n - 1 the graph is complete), the graph is connected,
//! and an adversary who does not know the seed before the round cannot
//! place itself next to a victim.
//!
//! Devices are named by their index `0..n` in the round's participant
//! list; both sides build the same graph from `(seed, n, k)`.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// Most neighbours a device may have: Shamir shares use x-coordinates
/// 1..=255 in GF(2^8) ([`super::shamir`]).
pub const DEGREE_MAX: u32 = 254;

/// A random k-regular Harary graph over `n` devices.
#[derive(Clone, Debug)]
pub struct NeighbourGraph {
    n: u32,
    half: u32,
    /// ring position of each device index
    position: Vec<u32>,
    /// device index at each ring position
    device_at: Vec<u32>,
}

impl NeighbourGraph {
    /// The graph for `n` devices and the requested `degree` (rounded up
    /// to even, capped at n - 1 and at [`DEGREE_MAX`]).
    pub fn new(seed: &[u8; 32], n: u32, degree: u32) -> Self {
        let degree = degree.min(DEGREE_MAX).min(n.saturating_sub(1));
        let half = degree.div_ceil(2);
        let key = blake3::derive_key("fedge secagg v1 neighbour graph", seed);
        let mut rng = ChaCha20Rng::from_seed(key);
        let mut device_at: Vec<u32> = (0..n).collect();
        // Fisher-Yates with rejection sampling (no modulo bias).
        for i in (1..n as usize).rev() {
            let j = uniform_below(&mut rng, i as u64 + 1) as usize;
            device_at.swap(i, j);
        }
        let mut position = vec![0u32; n as usize];
        for (p, &d) in device_at.iter().enumerate() {
            position[d as usize] = p as u32;
        }
        NeighbourGraph {
            n,
            half,
            position,
            device_at,
        }
    }

    /// Devices in the graph.
    pub fn len(&self) -> u32 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Every device's degree (all equal).
    pub fn degree(&self) -> u32 {
        if 2 * self.half >= self.n {
            self.n.saturating_sub(1)
        } else {
            2 * self.half
        }
    }

    /// The neighbours of `device`, ascending (empty for an unknown index).
    pub fn neighbours(&self, device: u32) -> Vec<u32> {
        if device >= self.n {
            return Vec::new();
        }
        let mut out: Vec<u32> = if 2 * self.half >= self.n {
            (0..self.n).filter(|&d| d != device).collect()
        } else {
            let p = self.position[device as usize];
            (1..=self.half)
                .flat_map(|d| [(p + d) % self.n, (p + self.n - d) % self.n])
                .map(|q| self.device_at[q as usize])
                .collect()
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether `a` and `b` are neighbours.
    pub fn are_neighbours(&self, a: u32, b: u32) -> bool {
        if a >= self.n || b >= self.n || a == b {
            return false;
        }
        let (pa, pb) = (self.position[a as usize], self.position[b as usize]);
        let d = pa.abs_diff(pb);
        d.min(self.n - d) <= self.half
    }

    /// The Shamir x-coordinate of the share `owner` deals to `holder`:
    /// 1 + the holder's rank among the owner's neighbours.
    pub fn share_x(&self, owner: u32, holder: u32) -> Option<u8> {
        let ns = self.neighbours(owner);
        ns.binary_search(&holder).ok().map(|r| (r + 1) as u8)
    }
}

/// Uniform in `0..bound` (bound > 0) by rejection.
fn uniform_below(rng: &mut impl RngCore, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % bound;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_has_k_symmetric_neighbours() {
        for (n, k) in [(1, 4), (2, 4), (5, 4), (6, 8), (10, 4), (101, 12), (100, 7)] {
            let g = NeighbourGraph::new(&[n as u8; 32], n, k);
            let expect = if k.div_ceil(2) * 2 >= n {
                n - 1
            } else {
                k.div_ceil(2) * 2
            };
            assert_eq!(g.degree(), expect, "n {n} k {k}");
            for a in 0..n {
                let ns = g.neighbours(a);
                assert_eq!(ns.len() as u32, expect, "n {n} k {k} device {a}");
                for b in 0..n {
                    assert_eq!(g.are_neighbours(a, b), ns.contains(&b), "n {n} {a}-{b}");
                    assert_eq!(g.are_neighbours(a, b), g.are_neighbours(b, a));
                }
                for (r, &b) in ns.iter().enumerate() {
                    assert_eq!(g.share_x(a, b), Some(r as u8 + 1));
                }
                assert_eq!(g.share_x(a, a), None);
            }
        }
    }

    #[test]
    fn the_seed_decides_the_graph() {
        let a = NeighbourGraph::new(&[1; 32], 50, 6);
        let b = NeighbourGraph::new(&[1; 32], 50, 6);
        let c = NeighbourGraph::new(&[2; 32], 50, 6);
        assert_eq!(a.neighbours(0), b.neighbours(0));
        assert!((0..50).any(|d| a.neighbours(d) != c.neighbours(d)));
    }
}
