//! The aggregator's side of SecAgg+ (Bell et al., CCS 2020; the stages and
//! the threat model are in [`fedge_proto::secagg`]) as a sans-IO state
//! machine: devices' messages go in through [`SecAggServer::handle_message`]
//! with the time, deadlines through [`SecAggServer::handle_timeout`], and
//! the messages to send, the next deadline and the round's outcome come
//! out of the `poll_*` methods.
//!
//! Every stage has a deadline: a stage ends when every device it waits for
//! has answered or when its deadline passes, and a device that has not
//! answered by then is a dropout from that stage on. The round fails with
//! a typed [`RoundFailure`] when fewer than `survivors_min` devices are
//! left after a stage, or when a secret the unmasking needs has fewer than
//! t shares.
//!
//! **Invariant: the server never holds an individual update.** A masked
//! input is added to a running sum in Z_{2^b} as it arrives and dropped;
//! what remains is the sum of masked inputs, then (after unmasking) the sum
//! of the survivors' quantized updates. Memory: O(dimension) for the sum
//! plus O(n k) sealed shares and revealed shares.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use fedge_proto::secagg::mask::{self, KeyPair};
use fedge_proto::secagg::msg::{
    AdvertiseKeys, PeerKeys, RevealedShare, SEALED_SHARE_BYTES, SealedShare,
};
use fedge_proto::secagg::shamir::{self, Share};
use fedge_proto::secagg::{
    AggSecAgg, DeviceSecAgg, NeighbourGraph, SecAggError, SecAggParams, Stage,
};

/// How long each stage waits for its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageDeadlines {
    pub advertise_keys: Duration,
    pub share_keys: Duration,
    pub masked_input: Duration,
    pub unmasking: Duration,
}

impl StageDeadlines {
    fn of(&self, stage: Stage) -> Duration {
        match stage {
            Stage::AdvertiseKeys => self.advertise_keys,
            Stage::ShareKeys => self.share_keys,
            Stage::MaskedInput => self.masked_input,
            Stage::Unmasking => self.unmasking,
        }
    }
}

/// `[strategy.secagg]`: SecAgg+ for every round.
///
/// **Threat model (what the configuration states and checks):** a
/// semi-honest aggregator (it follows the protocol but tries to learn
/// individual updates) and at most `colluding_devices` devices colluding
/// with it. Then t = `threshold` > `colluding_devices` keeps any device's
/// secrets out of the coalition's reach, and `survivors_min` >=
/// `colluding_devices` + 2 means a revealed sum always mixes at least two
/// honest updates. An aggregator that lies about dropouts is outside this
/// model unless 2t > k (`degree`): then no device reveals both secrets of
/// a neighbour whatever it is told.
///
/// **What is traded:** the aggregator sees only the sum, so nothing that
/// looks at one update works: robust combiners, per-update contribution
/// scoring, the aggregator's per-update norm bound and clipping, codecs
/// that the aggregator must decode (sparse, sign, quantized, zstd),
/// FedBuff's per-update staleness weights and central DP's per-update
/// clipping are refused. Devices clip their own updates to `clip` before
/// masking, and the aggregator can still bound the norm of the sum.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggSpec {
    /// T: devices that may collude with the aggregator.
    pub colluding_devices: u32,
    /// k: neighbours per device (Bell et al.: O(log n)).
    pub degree: u32,
    /// t: shares needed to rebuild a secret; t > T.
    pub threshold: u32,
    /// The ring Z_2^bits of quantized updates and masks.
    pub bits: u32,
    /// L2 bound each device clips its update to before quantizing.
    pub clip: f64,
    /// Fewest devices left after a stage; fewer fail the round.
    pub survivors_min: u32,
    pub advertise_keys_ms: u64,
    pub share_keys_ms: u64,
    /// Includes local training.
    pub masked_input_ms: u64,
    pub unmasking_ms: u64,
    /// Distributed DP: each device adds Skellam noise before masking
    /// (`[strategy.secagg.dp]`; None: off).
    pub dp: Option<SecAggDp>,
}

/// `[strategy.secagg.dp]`: user-level DP with the noise added by the
/// devices themselves (the Skellam mechanism; see
/// [`fedge_proto::secagg::DistributedNoise`] for the calibration), so the
/// aggregator never sees a sum without it. Accounted without sampling
/// amplification (devices are not Poisson-sampled by fedge's selection),
/// over every published round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggDp {
    /// z: the sum's noise stddev in units of one update's sensitivity.
    pub noise_multiplier: f64,
    /// Delta at which epsilon is reported.
    #[serde(default = "default_delta")]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

impl Default for SecAggSpec {
    fn default() -> Self {
        SecAggSpec {
            colluding_devices: 4,
            degree: 32,
            threshold: 12,
            bits: 32,
            clip: 1.0,
            survivors_min: 8,
            advertise_keys_ms: 10_000,
            share_keys_ms: 10_000,
            masked_input_ms: 120_000,
            unmasking_ms: 10_000,
            dp: None,
        }
    }
}

impl SecAggSpec {
    pub fn deadlines(&self) -> StageDeadlines {
        StageDeadlines {
            advertise_keys: Duration::from_millis(self.advertise_keys_ms),
            share_keys: Duration::from_millis(self.share_keys_ms),
            masked_input: Duration::from_millis(self.masked_input_ms),
            unmasking: Duration::from_millis(self.unmasking_ms),
        }
    }

    /// Check the numbers against each other and the round size (`devices`
    /// selected per round).
    pub fn validate(&self, devices: u32) -> Result<(), String> {
        let degree = NeighbourGraph::new(&[0; 32], devices, self.degree).degree();
        if self.threshold <= self.colluding_devices {
            return Err(format!(
                "strategy.secagg.threshold ({}) must exceed colluding_devices ({}): otherwise the \
                 colluders together rebuild a neighbour's mask secrets",
                self.threshold, self.colluding_devices
            ));
        }
        if self.threshold > degree {
            return Err(format!(
                "strategy.secagg.threshold ({}) exceeds the neighbours a device has ({degree} with \
                 degree {} and {devices} devices per round)",
                self.threshold, self.degree
            ));
        }
        if self.survivors_min < self.colluding_devices + 2 || self.survivors_min > devices {
            return Err(format!(
                "strategy.secagg.survivors_min ({}) must be in [colluding_devices + 2, devices per \
                 round] = [{}, {devices}]: a sum of fewer honest updates reveals one",
                self.survivors_min,
                self.colluding_devices + 2
            ));
        }
        let ms = [
            self.advertise_keys_ms,
            self.share_keys_ms,
            self.masked_input_ms,
            self.unmasking_ms,
        ];
        if ms.contains(&0) {
            return Err("strategy.secagg: every stage deadline must be positive".into());
        }
        if let Some(dp) = &self.dp {
            let z = dp.noise_multiplier;
            if !(z > 0.0 && z <= fedge_proto::secagg::NOISE_MULTIPLIER_MAX) {
                return Err(format!(
                    "strategy.secagg.dp.noise_multiplier must be in (0, {}], got {z}",
                    fedge_proto::secagg::NOISE_MULTIPLIER_MAX
                ));
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return Err(format!(
                    "strategy.secagg.dp.delta must be in (0, 1), got {}",
                    dp.delta
                ));
            }
        }
        // The ring must hold the sum and, with distributed DP, its noise.
        let probe = SecAggParams {
            round: 0,
            seed: [0; 32],
            devices,
            degree: self.degree,
            threshold: self.threshold,
            bits: self.bits,
            clip: self.clip,
            dimension: 1,
            noise: self
                .dp
                .as_ref()
                .map(|dp| fedge_proto::secagg::DistributedNoise {
                    multiplier: dp.noise_multiplier,
                    survivors: self.survivors_min,
                }),
        };
        probe
            .quantizer()
            .map(|_| ())
            .map_err(|e| format!("strategy.secagg: {e}"))
    }
}

/// What distributed DP has spent after `rounds` released rounds of
/// `params` (Skellam noise calibrated as
/// [`fedge_proto::secagg::DistributedNoise`] says; the Skellam RDP bound
/// of Agarwal, Kairouz and Liu 2021 at integer orders, composed over the
/// rounds, without sampling amplification). `rho_zcdp` is that of the
/// Gaussian with the same variance (the bound's leading term; its
/// correction is in epsilon). None when the round adds no noise.
pub fn distributed_spent(
    params: &SecAggParams,
    rounds: u64,
    delta: f64,
) -> Option<super::PrivacySpent> {
    let noise = params.noise?;
    let (l1, l2) = params.sensitivity().ok()?;
    let (mu_total, _) = params.skellam_mu().ok()??;
    let variance = 2.0 * mu_total;
    let orders = super::rdp::integer_orders();
    let total: Vec<f64> = orders
        .iter()
        .map(|&a| super::rdp::skellam(a, l1, l2, variance) * rounds as f64)
        .collect();
    let orders_f: Vec<f64> = orders.iter().map(|&a| f64::from(a)).collect();
    let (epsilon, order) = if rounds == 0 {
        (0.0, f64::NAN)
    } else {
        super::rdp::epsilon(&orders_f, &total, delta)
    };
    Some(super::PrivacySpent {
        rounds,
        epsilon,
        delta,
        order,
        rho_zcdp: rounds as f64 * l2 * l2 / (2.0 * variance),
        sampling_rate: 1.0,
        noise_multiplier: noise.multiplier,
    })
}

/// Why a round's secure aggregation failed. The round is aborted; nothing
/// about any one update was learnt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoundFailure {
    #[error("after {stage}: {survivors} devices left, at least {needed} needed")]
    TooFewSurvivors {
        stage: Stage,
        survivors: u32,
        needed: u32,
    },
    #[error("device {device}'s {secret} cannot be rebuilt: {shares} shares, threshold {threshold}")]
    BelowThreshold {
        device: u32,
        secret: &'static str,
        shares: u32,
        threshold: u32,
    },
    #[error("device {device}'s rebuilt mask key does not match the key it advertised")]
    KeyMismatch { device: u32 },
    #[error(
        "device {device}'s {secret} cannot be rebuilt: no subsets of its shares agree \
         (shares were altered)"
    )]
    SharesInconsistent { device: u32, secret: &'static str },
}

/// A finished round: the survivors' quantized sum, exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecAggOutcome {
    /// Σ_{u ∈ U3} x_u in Z_{2^b} (read it with the round's `Quantizer`).
    pub sum: Vec<u64>,
    /// U3: whose updates the sum holds, ascending.
    pub survivors: Vec<u32>,
    /// |U1|, |U2|, |U3|, |U4|: devices that completed each stage.
    pub completed: [u32; 4],
}

/// The aggregator's SecAgg+ round.
pub struct SecAggServer {
    params: SecAggParams,
    graph: NeighbourGraph,
    deadlines: StageDeadlines,
    survivors_min: u32,
    stage: Stage,
    deadline: Instant,
    /// Who the current stage waits for, and who has answered.
    expected: BTreeSet<u32>,
    answered: BTreeSet<u32>,
    /// U1 and their keys.
    keys: BTreeMap<u32, AdvertiseKeys>,
    /// Sealed shares by recipient (`peer` is the sender), until routed.
    inbox: BTreeMap<u32, Vec<SealedShare>>,
    u2: BTreeSet<u32>,
    u3: BTreeSet<u32>,
    /// The running sum of masked inputs.
    sum: Vec<u64>,
    self_shares: BTreeMap<u32, Vec<Share>>,
    key_shares: BTreeMap<u32, Vec<Share>>,
    completed: [u32; 4],
    transmit: VecDeque<(u32, AggSecAgg)>,
    outcome: Option<Result<SecAggOutcome, RoundFailure>>,
}

impl SecAggServer {
    /// Open a round at `now`; the AdvertiseKeys stage waits for all
    /// `params.devices` devices.
    pub fn new(
        params: SecAggParams,
        deadlines: StageDeadlines,
        survivors_min: u32,
        now: Instant,
    ) -> Result<Self, SecAggError> {
        params.validate()?;
        if survivors_min < 1 || survivors_min > params.devices {
            return Err(SecAggError::Params(format!(
                "survivors_min {survivors_min} is not in 1..={}",
                params.devices
            )));
        }
        Ok(SecAggServer {
            graph: params.graph(),
            expected: (0..params.devices).collect(),
            params,
            deadlines,
            survivors_min,
            stage: Stage::AdvertiseKeys,
            deadline: now + deadlines.advertise_keys,
            answered: BTreeSet::new(),
            keys: BTreeMap::new(),
            inbox: BTreeMap::new(),
            u2: BTreeSet::new(),
            u3: BTreeSet::new(),
            sum: Vec::new(),
            self_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
            completed: [0; 4],
            transmit: VecDeque::new(),
            outcome: None,
        })
    }

    pub fn params(&self) -> &SecAggParams {
        &self.params
    }

    /// The stage in progress (the last one, once finished).
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The next message to send to a device.
    pub fn poll_transmit(&mut self) -> Option<(u32, AggSecAgg)> {
        self.transmit.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next; `None` once the
    /// round is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.outcome.is_none().then_some(self.deadline)
    }

    /// The round's result, once there is one.
    pub fn outcome(&self) -> Option<&Result<SecAggOutcome, RoundFailure>> {
        self.outcome.as_ref()
    }

    pub fn take_outcome(&mut self) -> Option<Result<SecAggOutcome, RoundFailure>> {
        self.outcome.take()
    }

    /// Whether the current stage still waits for `device`.
    pub fn waits_for(&self, device: u32) -> bool {
        self.outcome.is_none()
            && self.expected.contains(&device)
            && !self.answered.contains(&device)
    }

    /// Stages whose deadline has passed end; their silent devices are
    /// dropouts.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Each advance moves the deadline past `now` or ends the round.
        for _ in 0..4 {
            if self.outcome.is_some() || now < self.deadline {
                return;
            }
            self.advance(now);
        }
    }

    /// `device`'s message at `now`. A refused message changes nothing (the
    /// caller closes that device's session; it is then a dropout).
    pub fn handle_message(
        &mut self,
        now: Instant,
        device: u32,
        msg: DeviceSecAgg,
    ) -> Result<(), SecAggError> {
        self.handle_timeout(now);
        if !self.waits_for(device) {
            return Err(SecAggError::OutOfOrder {
                stage: self.stage,
                got: msg.name(),
            });
        }
        match (self.stage, msg) {
            (Stage::AdvertiseKeys, DeviceSecAgg::AdvertiseKeys(k)) => self.advertise(device, k)?,
            (Stage::ShareKeys, DeviceSecAgg::ShareKeys(shares)) => {
                self.share_keys(device, shares)?
            }
            (Stage::MaskedInput, DeviceSecAgg::MaskedInput(values)) => self.masked_input(values)?,
            (
                Stage::Unmasking,
                DeviceSecAgg::Unmask {
                    self_mask,
                    mask_key,
                },
            ) => self.unmask(device, self_mask, mask_key)?,
            (stage, msg) => {
                return Err(SecAggError::OutOfOrder {
                    stage,
                    got: msg.name(),
                });
            }
        }
        self.answered.insert(device);
        if self.answered == self.expected {
            self.advance(now);
        }
        Ok(())
    }

    fn advertise(&mut self, device: u32, k: AdvertiseKeys) -> Result<(), SecAggError> {
        // A small-order key would make every agreement with it predictable.
        let probe = KeyPair::from_bytes([0x5a; 32]);
        mask::agree(&probe.secret, &k.c_public, device)?;
        mask::agree(&probe.secret, &k.s_public, device)?;
        self.keys.insert(device, k);
        Ok(())
    }

    fn share_keys(&mut self, device: u32, shares: Vec<SealedShare>) -> Result<(), SecAggError> {
        let want: BTreeSet<u32> = self.live_neighbours(device, |d| self.keys.contains_key(&d));
        let mut got = BTreeSet::new();
        for s in &shares {
            if !want.contains(&s.peer) {
                return Err(SecAggError::NotNeighbour { peer: s.peer });
            }
            if !got.insert(s.peer) {
                return Err(SecAggError::Duplicate { peer: s.peer });
            }
            if s.ciphertext.len() != SEALED_SHARE_BYTES {
                return Err(SecAggError::ShareUnreadable { from: device });
            }
        }
        if got != want {
            let missing = want.difference(&got).next().copied().unwrap_or(device);
            return Err(SecAggError::NotNeighbour { peer: missing });
        }
        for s in shares {
            self.inbox.entry(s.peer).or_default().push(SealedShare {
                peer: device,
                ciphertext: s.ciphertext,
            });
        }
        Ok(())
    }

    fn masked_input(&mut self, values: Vec<u64>) -> Result<(), SecAggError> {
        if values.len() != self.params.dimension as usize {
            return Err(SecAggError::Dimension {
                got: values.len(),
                expected: self.params.dimension,
            });
        }
        let m = mask::ring_mask(self.params.bits);
        if values.iter().any(|&v| v > m) {
            return Err(SecAggError::OutOfRing {
                bits: self.params.bits,
            });
        }
        for (s, v) in self.sum.iter_mut().zip(values) {
            *s = s.wrapping_add(v) & m;
        }
        Ok(())
    }

    fn unmask(
        &mut self,
        device: u32,
        self_mask: Vec<RevealedShare>,
        mask_key: Vec<RevealedShare>,
    ) -> Result<(), SecAggError> {
        // Exactly: self-mask shares of N ∩ U3, mask-key shares of N ∩ (U2 \ U3).
        let want_self = self.live_neighbours(device, |d| self.u3.contains(&d));
        let want_key =
            self.live_neighbours(device, |d| self.u2.contains(&d) && !self.u3.contains(&d));
        check_owners(&self_mask, &want_self)?;
        check_owners(&mask_key, &want_key)?;
        for (list, into) in [
            (self_mask, &mut self.self_shares),
            (mask_key, &mut self.key_shares),
        ] {
            for r in list {
                let x = self.graph.share_x(r.owner, device).expect("a neighbour");
                into.entry(r.owner)
                    .or_default()
                    .push(Share { x, y: r.share });
            }
        }
        Ok(())
    }

    /// N(device) filtered by `alive`, ascending.
    fn live_neighbours(&self, device: u32, alive: impl Fn(u32) -> bool) -> BTreeSet<u32> {
        self.graph
            .neighbours(device)
            .into_iter()
            .filter(|&d| alive(d))
            .collect()
    }

    fn fail(&mut self, failure: RoundFailure) {
        tracing::warn!(round = self.params.round, %failure, "secure aggregation failed");
        self.sum = Vec::new();
        self.outcome = Some(Err(failure));
    }

    /// The current stage ends: its silent devices are dropouts.
    fn advance(&mut self, now: Instant) {
        let done: BTreeSet<u32> = std::mem::take(&mut self.answered);
        let index = self.stage as usize;
        self.completed[index] = done.len() as u32;
        if self.stage != Stage::Unmasking && (done.len() as u32) < self.survivors_min {
            let failure = RoundFailure::TooFewSurvivors {
                stage: self.stage,
                survivors: done.len() as u32,
                needed: self.survivors_min,
            };
            return self.fail(failure);
        }
        let next = match self.stage {
            Stage::AdvertiseKeys => {
                for &u in &done {
                    let peers = self
                        .live_neighbours(u, |d| self.keys.contains_key(&d))
                        .into_iter()
                        .map(|d| {
                            let k = &self.keys[&d];
                            PeerKeys {
                                device: d,
                                c_public: k.c_public,
                                s_public: k.s_public,
                            }
                        })
                        .collect();
                    self.transmit
                        .push_back((u, AggSecAgg::NeighbourKeys(peers)));
                }
                Stage::ShareKeys
            }
            Stage::ShareKeys => {
                let mut inbox = std::mem::take(&mut self.inbox);
                for &v in &done {
                    // Only senders in U2 put shares here; all of them count.
                    let shares = inbox.remove(&v).unwrap_or_default();
                    self.transmit
                        .push_back((v, AggSecAgg::RoutedShares(shares)));
                }
                self.u2 = done.clone();
                self.sum = vec![0; self.params.dimension as usize];
                Stage::MaskedInput
            }
            Stage::MaskedInput => {
                self.u3 = done.clone();
                for &v in &done {
                    let survivors = self
                        .live_neighbours(v, |d| self.u3.contains(&d))
                        .into_iter()
                        .collect();
                    self.transmit
                        .push_back((v, AggSecAgg::UnmaskRequest { survivors }));
                }
                Stage::Unmasking
            }
            Stage::Unmasking => {
                match self.finish() {
                    Ok(outcome) => self.outcome = Some(Ok(outcome)),
                    Err(f) => self.fail(f),
                }
                return;
            }
        };
        self.expected = done;
        self.stage = next;
        self.deadline = now + self.deadlines.of(next);
    }

    /// Remove the self masks of U3 and the masks U3 holds with U2 \ U3.
    fn finish(&mut self) -> Result<SecAggOutcome, RoundFailure> {
        let (round, bits) = (self.params.round, self.params.bits);
        let t = self.params.threshold;
        let seed = self.params.seed;
        let keys = &self.keys;
        let rebuild = |shares: Option<&Vec<Share>>, device: u32, secret: &'static str| {
            let shares = shares.map(Vec::as_slice).unwrap_or(&[]);
            let below = RoundFailure::BelowThreshold {
                device,
                secret,
                shares: shares.len() as u32,
                threshold: t,
            };
            if shares.len() < t as usize {
                return Err(below);
            }
            // A mask key is checked against the public key its owner
            // advertised; a self-mask seed by agreement between subsets.
            let verify = |s: &[u8; 32]| match secret {
                "mask key" => KeyPair::from_bytes(*s).public == keys[&device].s_public,
                _ => true,
            };
            rebuild_robust(
                shares,
                t as usize,
                &seed,
                device,
                secret == "mask key",
                verify,
            )
            .ok_or(RoundFailure::SharesInconsistent { device, secret })
        };
        let mut sum = std::mem::take(&mut self.sum);
        for &u in &self.u3 {
            let b = rebuild(self.self_shares.get(&u), u, "self-mask seed")?;
            mask::apply_mask(&mask::self_seed(&b, round), bits, true, &mut sum);
        }
        for &u in self.u2.difference(&self.u3) {
            let holders = self.live_neighbours(u, |d| self.u3.contains(&d));
            if holders.is_empty() {
                continue;
            }
            let s = KeyPair::from_bytes(rebuild(self.key_shares.get(&u), u, "mask key")?);
            if s.public != self.keys[&u].s_public {
                return Err(RoundFailure::KeyMismatch { device: u });
            }
            for v in holders {
                let shared = mask::agree(&s.secret, &self.keys[&v].s_public, v)
                    .expect("keys were checked contributory at AdvertiseKeys");
                // v added +PRG(s_uv) when v < u and -PRG otherwise: undo it.
                mask::apply_mask(
                    &mask::pairwise_seed(&shared, round, v, u),
                    bits,
                    v < u,
                    &mut sum,
                );
            }
        }
        self.self_shares.clear();
        self.key_shares.clear();
        Ok(SecAggOutcome {
            sum,
            survivors: self.u3.iter().copied().collect(),
            completed: self.completed,
        })
    }
}

/// Most t-subsets of a secret's shares tried before giving up.
const REBUILD_ATTEMPTS: usize = 64;

/// Rebuild a secret from `shares` (at least `t`) when some of them may be
/// garbage (a device that revealed made-up shares, or a dealer that gave
/// some neighbours bad ones): t-subsets are tried, the first t, then
/// rotations, then subsets drawn from a generator seeded by the round and
/// the owner (deterministic). With `verified`, the first rebuilt value
/// `verify` accepts wins (a mask key, checked against the advertised
/// public key). Without, a value two different subsets agree on wins:
/// subsets free of bad shares all give the true secret, one with a bad
/// share gives an unrelated value, so two subsets agreeing means both are
/// clean (or, with only t shares, there is nothing to compare and the one
/// value is taken). None when nothing qualifies.
fn rebuild_robust(
    shares: &[Share],
    t: usize,
    round_seed: &[u8; 32],
    owner: u32,
    verified: bool,
    verify: impl Fn(&[u8; 32]) -> bool,
) -> Option<[u8; 32]> {
    use rand::seq::index::sample;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::SeedableRng;
    let m = shares.len();
    if m < t || t == 0 {
        return None;
    }
    let mut key = *round_seed;
    key[..4]
        .iter_mut()
        .zip(owner.to_le_bytes())
        .for_each(|(k, o)| *k ^= o);
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut seen: Vec<[u8; 32]> = Vec::new();
    for attempt in 0..REBUILD_ATTEMPTS {
        let subset: Vec<Share> = if attempt < m {
            (0..t).map(|i| shares[(attempt + i) % m]).collect()
        } else {
            sample(&mut rng, m, t)
                .into_iter()
                .map(|i| shares[i])
                .collect()
        };
        let Ok(s) = shamir::reconstruct(&subset, t) else {
            continue;
        };
        if verified {
            if verify(&s) {
                return Some(s);
            }
        } else if m == t || seen.contains(&s) {
            return Some(s);
        } else {
            seen.push(s);
        }
        if m == t && attempt == 0 {
            break;
        }
    }
    None
}

/// `list` names exactly the owners in `want`, once each.
fn check_owners(list: &[RevealedShare], want: &BTreeSet<u32>) -> Result<(), SecAggError> {
    let mut seen = BTreeSet::new();
    for r in list {
        if !want.contains(&r.owner) {
            return Err(SecAggError::NotNeighbour { peer: r.owner });
        }
        if !seen.insert(r.owner) {
            return Err(SecAggError::Duplicate { peer: r.owner });
        }
    }
    match want.difference(&seen).next() {
        Some(&missing) => Err(SecAggError::NotNeighbour { peer: missing }),
        None => Ok(()),
    }
}
