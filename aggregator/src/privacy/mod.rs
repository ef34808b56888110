//! User-level differential privacy for the aggregate: DP-FedAvg with
//! Gaussian noise added by the aggregator (central DP), fixed or adaptive
//! clipping, and an accountant.
//!
//! - **DP-FedAvg** (McMahan, Ramage, Talwar and Zhang, "Learning
//!   Differentially Private Recurrent Language Models", ICLR 2018): every
//!   update is clipped to L2 norm C, the clipped updates are summed with
//!   equal weight (a device's claims, stake and sample count, do not enter:
//!   its sensitivity is C whatever it says), Gaussian noise of stddev z x C
//!   is added to the sum, and the sum is divided by the *expected* number of
//!   participants (fixed, so the denominator reveals nothing).
//! - **Adaptive clipping** (Andrew, Thakkar, McMahan and Ramaswamy,
//!   "Differentially Private Learning with Adaptive Clipping", NeurIPS
//!   2021): C tracks a target quantile of the update norms by a geometric
//!   step, C <- C exp(-eta (b - gamma)), where b is the noised fraction of
//!   updates whose norm was at most C. Its defaults are theirs: gamma 0.5,
//!   eta 0.2, count noise stddev m / 20 for m expected participants. The
//!   two Gaussian queries together are one with noise multiplier z when the
//!   sum's is z_sum = (z^-2 - (2 sigma_b)^-2)^-1/2 (their Theorem 1).
//! - **Accounting** ([`rdp`]): RDP of the sampled Gaussian mechanism,
//!   composed over released rounds and converted to (epsilon, delta); and
//!   rho-zCDP of the same rounds *without* sampling amplification, T / (2
//!   z^2), an upper bound that needs no sampling assumption.
//!
//! **The sampling assumption.** The (epsilon, delta) figure assumes each
//! device of a population of `population` takes part in a round
//! independently with probability q = expected participants / population
//! (Poisson sampling). fedge's selection draws a fixed number among the
//! devices that checked in, which is not that; the rho-zCDP figure, which
//! assumes nothing about sampling, is the one to quote when that matters.
//!
//! **Threat model.** The aggregator is trusted to clip and add noise: this
//! protects the released models from whoever downloads them (devices,
//! the public), not the updates from the aggregator. The noise generator
//! is seeded from the operating system unless `noise_seed` is set (for
//! reproducible tests only: a known seed makes the noise predictable and
//! voids the guarantee). Floating-point sampling is not hardened against
//! the attacks on its low bits (Mironov, CCS 2012).

pub mod rdp;
pub mod secagg;
pub mod secagg_quic;

use std::sync::{Arc, Mutex};

use fedge_proto::msg::TrainingPlan;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::robust::{Combined, Combiner, clip_to_norm, l2_norm};
use crate::strategy::{Failure, Strategy};

/// `[strategy.dp]`: central user-level DP.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpSpec {
    /// z: the noise stddev on the sum of clipped updates is z x C.
    pub noise_multiplier: f64,
    pub clip: DpClip,
    /// Devices the participants are drawn from (for the sampling rate q =
    /// expected participants / population; the accountant's only use).
    pub population: u64,
    /// The delta at which epsilon is reported.
    pub delta: f64,
    /// Seed the noise (reproducible tests only; see the module docs).
    pub noise_seed: Option<u64>,
}

impl Default for DpSpec {
    fn default() -> Self {
        DpSpec {
            noise_multiplier: 1.0,
            clip: DpClip::Adaptive {
                initial: 0.1,
                target_quantile: 0.5,
                learning_rate: 0.2,
                count_noise: None,
            },
            population: 0,
            delta: 1e-5,
            noise_seed: None,
        }
    }
}

/// How the DP clipping bound is set.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DpClip {
    Fixed {
        bound: f64,
    },
    /// Andrew et al. 2021. `count_noise`: stddev of the noise on the count
    /// of unclipped updates (None: expected participants / 20).
    Adaptive {
        initial: f64,
        target_quantile: f64,
        learning_rate: f64,
        count_noise: Option<f64>,
    },
}

impl DpSpec {
    pub fn validate(&self, expected_participants: usize) -> Result<(), String> {
        let z = self.noise_multiplier;
        if !(z > 0.0 && z.is_finite()) {
            return Err(format!("dp.noise_multiplier must be > 0, got {z}"));
        }
        if self.population < expected_participants as u64 || self.population == 0 {
            return Err(format!(
                "dp.population ({}) must be at least the participants per round ({expected_participants}): \
                 the accountant's sampling rate is participants / population",
                self.population
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!("dp.delta must be in (0, 1), got {}", self.delta));
        }
        match self.clip {
            DpClip::Fixed { bound } if !(bound > 0.0 && bound.is_finite()) => {
                Err(format!("dp.clip bound must be > 0, got {bound}"))
            }
            DpClip::Adaptive {
                initial,
                target_quantile,
                learning_rate,
                ..
            } if !(initial > 0.0
                && initial.is_finite()
                && target_quantile > 0.0
                && target_quantile < 1.0
                && learning_rate > 0.0
                && learning_rate.is_finite()) =>
            {
                Err(
                    "dp.clip (adaptive): initial must be > 0, target_quantile in (0, 1), \
                     learning_rate > 0"
                        .into(),
                )
            }
            DpClip::Adaptive { .. } => self.sum_noise_multiplier(expected_participants).map(|_| ()),
            DpClip::Fixed { .. } => Ok(()),
        }
    }

    fn count_noise(&self, expected: usize) -> Option<f64> {
        match self.clip {
            DpClip::Fixed { .. } => None,
            DpClip::Adaptive { count_noise, .. } => {
                Some(count_noise.unwrap_or(expected as f64 / 20.0))
            }
        }
    }

    /// The noise multiplier on the sum of clipped updates: z itself with a
    /// fixed bound; with adaptive clipping what is left of z once the
    /// count query has its share (Andrew et al., Theorem 1).
    pub fn sum_noise_multiplier(&self, expected: usize) -> Result<f64, String> {
        let z = self.noise_multiplier;
        match self.count_noise(expected) {
            None => Ok(z),
            Some(sb) => {
                let left = z.powi(-2) - (2.0 * sb).powi(-2);
                if sb.is_nan() || sb <= 0.0 || left <= 0.0 {
                    return Err(format!(
                        "dp: the clip-count noise (stddev {sb}) must exceed noise_multiplier / 2 \
                         ({}) so that noise is left for the updates; raise count_noise or the \
                         participants per round",
                        z / 2.0
                    ));
                }
                Ok(left.powf(-0.5))
            }
        }
    }
}

/// What the accountant reports after each released round.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivacySpent {
    pub rounds: u64,
    pub epsilon: f64,
    pub delta: f64,
    pub order: f64,
    /// rho-zCDP without sampling amplification: rounds / (2 z^2).
    pub rho_zcdp: f64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
}

/// Per-round accounting of the sampled Gaussian mechanism.
#[derive(Clone, Debug)]
pub struct Accountant {
    q: f64,
    z: f64,
    delta: f64,
    orders: Vec<f64>,
    per_round: Vec<f64>,
    rounds: u64,
}

impl Accountant {
    pub fn new(q: f64, z: f64, delta: f64) -> Self {
        let orders = rdp::default_orders();
        let per_round = rdp::compute_rdp(q, z, 1, &orders);
        Accountant {
            q,
            z,
            delta,
            orders,
            per_round,
            rounds: 0,
        }
    }

    pub fn set_rounds(&mut self, rounds: u64) {
        self.rounds = rounds;
    }

    pub fn step(&mut self) {
        self.rounds += 1;
    }

    pub fn spent(&self) -> PrivacySpent {
        let total: Vec<f64> = self
            .per_round
            .iter()
            .map(|r| r * self.rounds as f64)
            .collect();
        let (epsilon, order) = if self.rounds == 0 {
            (0.0, f64::NAN)
        } else {
            rdp::epsilon(&self.orders, &total, self.delta)
        };
        PrivacySpent {
            rounds: self.rounds,
            epsilon,
            delta: self.delta,
            order,
            rho_zcdp: self.rounds as f64 / (2.0 * self.z * self.z),
            sampling_rate: self.q,
            noise_multiplier: self.z,
        }
    }
}

/// What one round's combiner hands back to the strategy.
#[derive(Clone, Copy, Default)]
struct RoundTally {
    /// Updates whose norm was at most the bound (before clipping).
    unclipped: usize,
    count: usize,
}

/// DP-FedAvg around a server optimizer (see the module docs).
pub struct DpFedAvg {
    inner: Box<dyn Strategy>,
    spec: DpSpec,
    expected: usize,
    sum_z: f64,
    bound: f64,
    rng: Arc<Mutex<ChaCha20Rng>>,
    tally: Arc<Mutex<RoundTally>>,
    accountant: Accountant,
}

impl DpFedAvg {
    /// `expected`: participants per round (the fixed denominator and the
    /// accountant's sampling rate). The spec must have been validated.
    pub fn new(inner: Box<dyn Strategy>, spec: DpSpec, expected: usize) -> Self {
        let sum_z = spec
            .sum_noise_multiplier(expected)
            .expect("validated dp spec");
        let bound = match spec.clip {
            DpClip::Fixed { bound } => bound,
            DpClip::Adaptive { initial, .. } => initial,
        };
        let rng = match spec.noise_seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_os_rng(),
        };
        let q = expected as f64 / spec.population as f64;
        let accountant = Accountant::new(q, spec.noise_multiplier, spec.delta);
        DpFedAvg {
            inner,
            spec,
            expected,
            sum_z,
            bound,
            rng: Arc::new(Mutex::new(rng)),
            tally: Default::default(),
            accountant,
        }
    }

    pub fn clip_bound(&self) -> f64 {
        self.bound
    }

    pub fn spent(&self) -> PrivacySpent {
        self.accountant.spent()
    }

    /// The adaptive step of Andrew et al.: the noised fraction of updates
    /// that needed no clipping moves the bound towards the target quantile.
    fn adapt(&mut self, RoundTally { unclipped, count }: RoundTally) {
        let DpClip::Adaptive {
            target_quantile,
            learning_rate,
            ..
        } = self.spec.clip
        else {
            return;
        };
        let sb = self.spec.count_noise(self.expected).expect("adaptive");
        let noise = Normal::new(0.0, sb).expect("positive stddev");
        let m = self.expected as f64;
        // Centred bits (b - 1/2) have sensitivity 1/2.
        let centred = unclipped as f64 - 0.5 * count as f64
            + noise.sample(&mut *self.rng.lock().expect("lock"));
        let fraction = centred / m + 0.5;
        self.bound *= (-learning_rate * (fraction - target_quantile)).exp();
    }
}

struct DpCombiner {
    dim: usize,
    bound: f64,
    sum: Vec<f64>,
    expected: usize,
    noise_std: f64,
    rng: Arc<Mutex<ChaCha20Rng>>,
    tally: Arc<Mutex<RoundTally>>,
}

impl Combiner for DpCombiner {
    fn dimension(&self) -> usize {
        self.dim
    }

    /// The weight is ignored: every participant counts once, so that its
    /// influence on the sum is at most the clipping bound.
    fn add(&mut self, mut update: Vec<f32>, _weight: f64) {
        let mut t = self.tally.lock().expect("lock");
        t.count += 1;
        if l2_norm(&update) <= self.bound {
            t.unclipped += 1;
        }
        clip_to_norm(&mut update, self.bound);
        for (s, u) in self.sum.iter_mut().zip(&update) {
            *s += f64::from(*u);
        }
    }

    fn count(&self) -> usize {
        self.tally.lock().expect("lock").count
    }

    fn finish(&mut self, _max_share: f64) -> Option<Combined> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let noise = Normal::new(0.0, self.noise_std).expect("finite stddev");
        let mut rng = self.rng.lock().expect("lock");
        let m = self.expected as f64;
        let delta = self
            .sum
            .iter()
            .map(|s| ((s + noise.sample(&mut *rng)) / m) as f32)
            .collect();
        Some(Combined {
            delta,
            weights: vec![1.0 / n as f64; n],
        })
    }
}

impl Strategy for DpFedAvg {
    fn name(&self) -> String {
        format!("dp-{}", self.inner.name())
    }

    fn configure_round(&mut self, round_id: u64, base: &TrainingPlan) -> TrainingPlan {
        self.inner.configure_round(round_id, base)
    }

    fn combiner(&mut self, dim: usize, _max_share: f64) -> Box<dyn Combiner> {
        *self.tally.lock().expect("lock") = RoundTally::default();
        Box::new(DpCombiner {
            dim,
            bound: self.bound,
            sum: vec![0.0; dim],
            expected: self.expected,
            noise_std: self.sum_z * self.bound,
            rng: Arc::clone(&self.rng),
            tally: Arc::clone(&self.tally),
        })
    }

    /// A released round: the server optimizer steps, the accountant counts
    /// the round, and the adaptive bound moves.
    fn aggregate_round(
        &mut self,
        round_id: u64,
        params: &[f32],
        combined: &Combined,
        failures: &[Failure],
    ) -> Vec<f32> {
        let next = self
            .inner
            .aggregate_round(round_id, params, combined, failures);
        self.accountant.step();
        let tally = *self.tally.lock().expect("lock");
        self.adapt(tally);
        next
    }

    fn aggregate_evaluate(&mut self, results: &[(f64, Vec<(String, f64)>)]) -> Vec<(String, f64)> {
        self.inner.aggregate_evaluate(results)
    }

    fn report(&self) -> Vec<(String, f64)> {
        let s = self.spent();
        vec![
            ("dp_epsilon".into(), s.epsilon),
            ("dp_delta".into(), s.delta),
            ("dp_rho_zcdp".into(), s.rho_zcdp),
            ("dp_rounds".into(), s.rounds as f64),
            ("dp_clip_bound".into(), self.bound),
        ]
    }

    /// The clipping bound and the rounds accounted, then the inner state.
    fn checkpoint(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bound.to_le_bytes());
        out.extend_from_slice(&self.accountant.rounds.to_le_bytes());
        self.inner.checkpoint(out);
    }

    fn restore<'a>(&mut self, state: &'a [u8]) -> Result<&'a [u8], String> {
        let (head, rest) = state
            .split_first_chunk::<16>()
            .ok_or("strategy state: the DP clipping bound and rounds are cut short")?;
        let bound = f64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let rounds = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        if !(bound > 0.0 && bound.is_finite()) {
            return Err(format!("strategy state: DP clipping bound {bound}"));
        }
        let rest = self.inner.restore(rest)?;
        self.bound = bound;
        self.accountant.set_rounds(rounds);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::FedOpt;

    fn spec(clip: DpClip, z: f64) -> DpSpec {
        DpSpec {
            noise_multiplier: z,
            clip,
            population: 1000,
            delta: 1e-5,
            noise_seed: Some(7),
        }
    }

    fn round(s: &mut DpFedAvg, updates: &[Vec<f32>], params: &[f32]) -> Vec<f32> {
        let mut c = s.combiner(params.len(), 1.0);
        for u in updates {
            c.add(u.clone(), 1e9);
        }
        let combined = c.finish(1.0).unwrap();
        s.aggregate_round(1, params, &combined, &[])
    }

    /// Each update counts once whatever its claimed weight, clipped to
    /// the bound; the noise has the stddev z C / m on each coordinate.
    #[test]
    fn clipped_sum_with_calibrated_noise() {
        let dim = 20_000;
        let z = 0.5;
        let mut s = DpFedAvg::new(
            Box::new(FedOpt::fedavg()),
            spec(DpClip::Fixed { bound: 1.0 }, z),
            4,
        );
        // Two updates of norm 10 (clipped to 1) along e0 and e1.
        let mut a = vec![0.0f32; dim];
        a[0] = 10.0;
        let mut b = vec![0.0f32; dim];
        b[1] = 10.0;
        let out = round(&mut s, &[a, b], &vec![0.0; dim]);
        let rest = &out[2..];
        let mean = rest.iter().map(|v| f64::from(*v)).sum::<f64>() / rest.len() as f64;
        let var = rest
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / rest.len() as f64;
        let want = z * 1.0 / 4.0;
        assert!(
            mean.abs() < 5.0 * want / (rest.len() as f64).sqrt(),
            "{mean}"
        );
        assert!(
            (var.sqrt() / want - 1.0).abs() < 0.03,
            "{} vs {want}",
            var.sqrt()
        );
        // The clipped signal: 1 / 4 on each of the first two coordinates,
        // give or take the noise.
        for v in &out[..2] {
            assert!((f64::from(*v) - 0.25).abs() < 5.0 * want, "{v}");
        }
        assert_eq!(s.spent().rounds, 1);
    }

    /// The adaptive bound moves towards the norms' median: up when every
    /// update is clipped, down when none is.
    #[test]
    fn adaptive_bound_tracks_the_quantile() {
        let clip = DpClip::Adaptive {
            initial: 0.1,
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise: Some(1.0),
        };
        let mut s = DpFedAvg::new(Box::new(FedOpt::fedavg()), spec(clip, 0.8), 20);
        let big: Vec<Vec<f32>> = (0..20).map(|_| vec![1.0, 1.0]).collect();
        for _ in 0..30 {
            round(&mut s, &big, &[0.0, 0.0]);
        }
        let up = s.clip_bound();
        assert!(up > 0.5, "{up}");
        let small: Vec<Vec<f32>> = (0..20).map(|_| vec![0.001, 0.0]).collect();
        for _ in 0..30 {
            round(&mut s, &small, &[0.0, 0.0]);
        }
        assert!(s.clip_bound() < up / 5.0, "{}", s.clip_bound());
    }

    /// Too little count noise leaves none for the sum: a clear error.
    #[test]
    fn count_noise_must_leave_room() {
        let clip = DpClip::Adaptive {
            initial: 0.1,
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise: Some(0.2),
        };
        let e = spec(clip, 1.0).validate(10).unwrap_err();
        assert!(e.contains("count"), "{e}");
        let e = DpSpec {
            population: 5,
            ..spec(DpClip::Fixed { bound: 1.0 }, 1.0)
        }
        .validate(10)
        .unwrap_err();
        assert!(e.contains("population"), "{e}");
    }

    /// The state survives a restart: the bound and the rounds accounted.
    #[test]
    fn checkpoint_round_trip() {
        let mut s = DpFedAvg::new(Box::new(FedOpt::fedavg()), DpSpec::default_for_tests(), 100);
        for _ in 0..3 {
            round(&mut s, &vec![vec![1.0, 0.0]; 10], &[0.0, 0.0]);
        }
        let mut state = Vec::new();
        s.checkpoint(&mut state);
        let mut t = DpFedAvg::new(Box::new(FedOpt::fedavg()), DpSpec::default_for_tests(), 100);
        assert!(t.restore(&state).unwrap().is_empty());
        assert_eq!(t.clip_bound(), s.clip_bound());
        assert_eq!(t.spent(), s.spent());
        assert!(t.restore(&state[..10]).is_err());
    }

    impl DpSpec {
        fn default_for_tests() -> Self {
            DpSpec {
                population: 100,
                noise_seed: Some(1),
                ..DpSpec::default()
            }
        }
    }
}
