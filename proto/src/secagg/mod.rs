//! SecAgg+: secure aggregation with dropouts (Bell, Bonawitz, Gascón,
//! Lepoint and Raykova, "Secure Single-Server Aggregation with
//! (Poly)Logarithmic Overhead", CCS 2020; the protocol of Bonawitz et al.,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
//! CCS 2017, on a sparse neighbour graph).
//!
//! What both ends share lives here: the parameters of a round, the
//! neighbour graph ([`graph`]), Shamir sharing ([`shamir`]), key
//! agreement, key derivation, mask expansion and the share channel
//! ([`mask`]), the fixed-point encoding ([`quant`]) and the domain
//! messages of the four stages ([`msg`]). The device's state machine is
//! `fedge_device::secagg`, the aggregator's
//! `fedge_aggregator::privacy::secagg`.
//!
//! The stages, for devices `0..n` on a graph of degree k, threshold t:
//!
//! 1. **AdvertiseKeys**: each device sends two X25519 public keys (`c` for
//!    the share channel, `s` for masks). U1 = who did.
//! 2. **ShareKeys**: each device in U1 gets its neighbours' keys (those in
//!    U1), Shamir-splits its self-mask seed b_u and its mask secret s_u
//!    t-of-|N(u) ∩ U1| and sends each neighbour its two shares sealed
//!    under their channel key. U2 = who did; the server routes the sealed
//!    shares to their recipients in U2.
//! 3. **MaskedInput**: each device in U2 sends
//!    y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) in Z_{2^b}
//!    (+ when u < v, - otherwise). U3 = who did; the server keeps only the
//!    running sum of the y_u.
//! 4. **Unmasking**: each device in U3 is told which of its neighbours are
//!    in U3 and answers, for each neighbour v in U2, v's share of b_v if v
//!    is in U3 and of s_v otherwise (never both). The server rebuilds b_u
//!    for every u in U3 and s_u for every u in U2 \ U3, removes the self
//!    masks and the pairwise masks survivors hold with dropped devices,
//!    and is left with Σ_{u ∈ U3} x_u: the sum of the survivors' quantized
//!    updates, exactly.
//!
//! **Threat model.** A semi-honest (honest-but-curious) aggregator and at
//! most `T` colluding devices, T < t: the aggregator follows the protocol
//! and learns only the sum of at least `survivors_min` updates; fewer than
//! t devices learn nothing of a neighbour's secrets. An aggregator that
//! lies about who dropped (telling neighbours different stories) can get
//! both secrets of a device unless 2t > k; the configuration says which
//! trade it makes. Public keys are not signed here (the malicious-server
//! variant signs them); devices are authenticated by the session.

pub mod graph;
pub mod mask;
pub mod msg;
pub mod quant;
pub mod shamir;

pub use graph::NeighbourGraph;
pub use msg::{AggSecAgg, DeviceSecAgg};
pub use quant::Quantizer;

/// Most devices a round's SecAgg+ may have: a bound on what a task offer
/// can make a device allocate (its graph is O(n)).
pub const DEVICES_MAX: u32 = 1 << 20;

/// The four stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    Unmasking,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::AdvertiseKeys => "AdvertiseKeys",
            Stage::ShareKeys => "ShareKeys",
            Stage::MaskedInput => "MaskedInput",
            Stage::Unmasking => "Unmasking",
        })
    }
}

/// One round's public parameters, sent to every selected device.
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggParams {
    pub round: u64,
    /// Draws the neighbour graph.
    pub seed: [u8; 32],
    /// Devices selected (indices `0..devices`).
    pub devices: u32,
    /// Requested graph degree k (see [`NeighbourGraph::new`]).
    pub degree: u32,
    /// Shares needed to rebuild a secret (t).
    pub threshold: u32,
    /// Ring Z_{2^bits}.
    pub bits: u32,
    /// L2 bound every update is clipped to before quantizing.
    pub clip: f64,
    /// Coordinates of an update.
    pub dimension: u32,
    /// Distributed DP: each device adds Skellam noise to its quantized
    /// update before masking (None: no noise).
    pub noise: Option<DistributedNoise>,
}

/// Distributed differential privacy with the Skellam mechanism (Agarwal,
/// Kairouz and Liu, "The Skellam Mechanism for Differentially Private
/// Federated Learning", NeurIPS 2021): the sum of symmetric Skellam
/// variables is symmetric Skellam, so devices that each add Sk(mu_i)
/// give the sum Sk(sum mu_i), with no party ever holding the noise.
///
/// Calibration (both sides compute it from these two numbers): the sum
/// gets Skellam noise of variance (`multiplier` x Delta2)^2, where Delta2
/// = s x clip + sqrt(dimension) bounds the L2 norm of one quantized
/// update (s the quantizer's scale; the second term covers stochastic
/// rounding), split over `survivors` devices: each adds Sk(mu_total /
/// survivors). Devices cannot know who will drop, so they noise for the
/// fewest honest survivors a round may publish with (the aggregator sets
/// `survivors` to `survivors_min` less the devices that may collude with
/// it, which can leave their share out): when more survive, the sum
/// carries more noise than the accountant counts (never less).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedNoise {
    /// z: the sum's noise stddev in units of one update's L2 sensitivity.
    pub multiplier: f64,
    /// The noise is split over this many devices (the round's
    /// `survivors_min`).
    pub survivors: u32,
}

/// Largest Skellam parameter a device samples (Poisson variates in f64
/// stay exact integers below 2^53; a margin of two).
pub const SKELLAM_MU_MAX: f64 = 4_503_599_627_370_496.0; // 2^52

/// Largest noise multiplier a round may ask for.
pub const NOISE_MULTIPLIER_MAX: f64 = 1_000.0;

impl SecAggParams {
    /// Check the parameters hang together.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let degree = self.graph().degree();
        if self.devices < 2 {
            return Err(SecAggError::Params(format!(
                "{} devices: at least 2 needed",
                self.devices
            )));
        }
        if self.threshold < 1 || self.threshold > degree {
            return Err(SecAggError::Params(format!(
                "threshold {} is not in 1..={degree} (the graph's degree for {} devices)",
                self.threshold, self.devices
            )));
        }
        if self.dimension == 0 {
            return Err(SecAggError::Params("dimension 0".into()));
        }
        if let Some(n) = self.noise
            && !(n.multiplier.is_finite()
                && n.multiplier > 0.0
                && n.multiplier <= NOISE_MULTIPLIER_MAX
                && n.survivors >= 1
                && n.survivors <= self.devices)
        {
            return Err(SecAggError::Params(format!(
                "distributed noise {n:?}: the multiplier must be in (0, {NOISE_MULTIPLIER_MAX}] \
                 and the survivors in 1..={}",
                self.devices
            )));
        }
        let q = self.quantizer()?;
        if self.noise.is_some() {
            // The headroom counts noise in units of one update's range,
            // s clip: that holds while rounding's sqrt(d) is small beside it.
            let d = f64::from(self.dimension);
            if q.scale() * self.clip < 10.0 * d.sqrt() {
                return Err(SecAggError::Params(format!(
                    "{} bits leave too fine a ring for distributed noise on {} coordinates \
                     (scale x clip {:.0} < 10 sqrt(d)): raise bits",
                    self.bits,
                    self.dimension,
                    q.scale() * self.clip
                )));
            }
            // Poisson variates are exact integers only below 2^52.
            if let Some((_, mu)) = self.skellam_mu()?
                && mu > SKELLAM_MU_MAX
            {
                return Err(SecAggError::Params(format!(
                    "each device's Skellam noise parameter {mu:.3e} exceeds {SKELLAM_MU_MAX:.3e} \
                     (its Poisson variates would no longer be exact integers): use fewer bits"
                )));
            }
        }
        Ok(())
    }

    /// Summands the ring must hold: the devices, plus room for the noise
    /// out to 8 standard deviations (one update's range per Delta2 of
    /// noise stddev; the sum's stddev is z Delta2 sqrt(devices /
    /// survivors) when everyone survives).
    pub fn headroom(&self) -> u32 {
        match self.noise {
            None => self.devices,
            Some(n) => {
                let spread =
                    n.multiplier * (f64::from(self.devices) / f64::from(n.survivors)).sqrt();
                self.devices.saturating_add(
                    (8.0 * spread * 1.01 + 1.0).ceil().min(f64::from(u32::MAX)) as u32,
                )
            }
        }
    }

    /// (Delta1, Delta2): L1 and L2 bounds on one quantized update in ring
    /// units (Delta1 <= sqrt(d) Delta2).
    pub fn sensitivity(&self) -> Result<(f64, f64), SecAggError> {
        let q = self.quantizer()?;
        let d = f64::from(self.dimension);
        let l2 = q.scale() * self.clip + d.sqrt();
        Ok((d.sqrt() * l2, l2))
    }

    /// (mu of the sum, mu each device adds), when the round is noised.
    pub fn skellam_mu(&self) -> Result<Option<(f64, f64)>, SecAggError> {
        let Some(n) = self.noise else {
            return Ok(None);
        };
        let (_, l2) = self.sensitivity()?;
        // Sk(mu) has variance 2 mu.
        let total = (n.multiplier * l2).powi(2) / 2.0;
        Ok(Some((total, total / f64::from(n.survivors))))
    }

    pub fn graph(&self) -> NeighbourGraph {
        NeighbourGraph::new(&self.seed, self.devices, self.degree)
    }

    /// The fixed-point encoding, with room for all `devices` updates (and
    /// their noise, see [`Self::headroom`]).
    pub fn quantizer(&self) -> Result<Quantizer, SecAggError> {
        Quantizer::new(self.bits, self.clip, self.headroom())
    }
}

/// What can go wrong in the protocol's cryptography and its messages, on
/// either side.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("secagg parameters: {0}")]
    Params(String),
    #[error("device {peer}'s public key is of small order (X25519 output not contributory)")]
    NonContributoryKey { peer: u32 },
    #[error("the sealed share from device {from} does not open")]
    ShareUnreadable { from: u32 },
    #[error("the share from device {from} names another sender or recipient")]
    ShareMisaddressed { from: u32 },
    #[error("device {peer} is not a neighbour here")]
    NotNeighbour { peer: u32 },
    #[error("device {peer} appears twice")]
    Duplicate { peer: u32 },
    #[error("{stage}: {have} neighbours take part, threshold {threshold}")]
    TooFewNeighbours {
        stage: Stage,
        have: usize,
        threshold: u32,
    },
    #[error("{got} values, the round's dimension is {expected}")]
    Dimension { got: usize, expected: u32 },
    #[error("a value is outside Z_2^{bits}")]
    OutOfRing { bits: u32 },
    #[error("the update is not finite")]
    NotFinite,
    #[error("{got} is not the message the device expects at {stage}")]
    OutOfOrder { stage: Stage, got: &'static str },
    #[error("secret sharing: {0}")]
    Shamir(#[from] shamir::ShamirError),
}
