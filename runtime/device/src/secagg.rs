//! The device's side of SecAgg+ (Bell et al., CCS 2020; the stages are
//! described in [`fedge_proto::secagg`]) as a sans-IO state machine: the
//! aggregator's messages go in through [`SecAggClient::handle_message`],
//! the update through [`SecAggClient::set_update`], and what to send comes
//! out of [`SecAggClient::poll_transmit`]. No clock: the aggregator's stage
//! deadlines decide who dropped, and a device that gives up simply stops
//! answering (a dropout the protocol recovers from).
//!
//! **Invariant:** the update leaves the device only masked: the masked
//! input is built once, after the device holds its neighbours' shares
//! (so the masks it adds are exactly those the aggregator can remove), and
//! the device reveals for each neighbour the share of its self-mask seed
//! or of its mask key, never both (it refuses an unmask request that names
//! a survivor it did not hear from, or fewer than t survivors).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fedge_proto::secagg::mask::{self, KeyPair};
use fedge_proto::secagg::msg::{
    AdvertiseKeys, PeerKeys, RevealedShare, SEALED_SHARE_BYTES, SHARE_PLAINTEXT_BYTES, SealedShare,
};
use fedge_proto::secagg::shamir;
use fedge_proto::secagg::{AggSecAgg, DeviceSecAgg, SecAggError, SecAggParams, Stage};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// One device's part in one SecAgg+ round.
pub struct SecAggClient {
    params: SecAggParams,
    me: u32,
    /// N(me) in the round's graph, ascending.
    graph_neighbours: Vec<u32>,
    c: KeyPair,
    s: KeyPair,
    s_secret: [u8; 32],
    self_seed: [u8; 32],
    rng: ChaCha20Rng,
    /// The stage whose aggregator message the device waits for next.
    stage: Stage,
    /// N(me) ∩ U1, with their keys.
    peers: BTreeMap<u32, PeerKeys>,
    /// The pairwise mask seed with each of `peers`.
    pair_seeds: BTreeMap<u32, [u8; 32]>,
    /// N(me) ∩ U2: the neighbours whose shares the device holds, with
    /// (share of their self-mask seed, share of their mask key).
    held: BTreeMap<u32, ([u8; 32], [u8; 32])>,
    /// The quantized update, once given.
    input: Option<Vec<u64>>,
    masked_sent: bool,
    transmit: VecDeque<DeviceSecAgg>,
}

impl SecAggClient {
    /// Device `me` of a round; `randomness` seeds its keys, its self-mask
    /// seed, its Shamir polynomials and its stochastic rounding (32 bytes
    /// from the operating system in production; fixed in tests). Queues
    /// the device's [`AdvertiseKeys`].
    pub fn new(params: SecAggParams, me: u32, randomness: [u8; 32]) -> Result<Self, SecAggError> {
        params.validate()?;
        if me >= params.devices {
            return Err(SecAggError::Params(format!(
                "device index {me} of {}",
                params.devices
            )));
        }
        let mut rng = ChaCha20Rng::from_seed(randomness);
        let mut draw = || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            b
        };
        let (c_secret, s_secret, self_seed) = (draw(), draw(), draw());
        let c = KeyPair::from_bytes(c_secret);
        let s = KeyPair::from_bytes(s_secret);
        let graph_neighbours = params.graph().neighbours(me);
        let advertise = AdvertiseKeys {
            c_public: c.public,
            s_public: s.public,
        };
        Ok(SecAggClient {
            params,
            me,
            graph_neighbours,
            c,
            s,
            s_secret,
            self_seed,
            rng,
            stage: Stage::ShareKeys,
            peers: BTreeMap::new(),
            pair_seeds: BTreeMap::new(),
            held: BTreeMap::new(),
            input: None,
            masked_sent: false,
            transmit: VecDeque::from([DeviceSecAgg::AdvertiseKeys(advertise)]),
        })
    }

    /// The device's index in the round.
    pub fn index(&self) -> u32 {
        self.me
    }

    /// The quantized update (before masking, with its distributed-DP noise
    /// when the round has some), once given. Tests compare
    /// the unmasked sum with the sum of these.
    pub fn quantized(&self) -> Option<&[u64]> {
        self.input.as_deref()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<DeviceSecAgg> {
        self.transmit.pop_front()
    }

    /// Give the update (clipped and quantized here). The masked input goes
    /// out once both the update and the neighbours' shares are here.
    pub fn set_update(&mut self, update: &[f32]) -> Result<(), SecAggError> {
        if update.len() != self.params.dimension as usize {
            return Err(SecAggError::Dimension {
                got: update.len(),
                expected: self.params.dimension,
            });
        }
        let mut q = self.params.quantizer()?.quantize(update, &mut self.rng)?;
        if let Some((_, mu)) = self.params.skellam_mu()? {
            add_skellam(&mut q, mu, self.params.bits, &mut self.rng)?;
        }
        self.input = Some(q);
        self.try_mask();
        Ok(())
    }

    /// Set an already quantized update (values in Z_{2^b}).
    pub fn set_quantized(&mut self, values: Vec<u64>) -> Result<(), SecAggError> {
        if values.len() != self.params.dimension as usize {
            return Err(SecAggError::Dimension {
                got: values.len(),
                expected: self.params.dimension,
            });
        }
        if values
            .iter()
            .any(|&v| v > mask::ring_mask(self.params.bits))
        {
            return Err(SecAggError::OutOfRing {
                bits: self.params.bits,
            });
        }
        self.input = Some(values);
        self.try_mask();
        Ok(())
    }

    /// A message from the aggregator. An error means the device cannot go
    /// on in this round (it drops out); nothing it holds has leaked.
    pub fn handle_message(&mut self, msg: AggSecAgg) -> Result<(), SecAggError> {
        match (self.stage, msg) {
            (Stage::ShareKeys, AggSecAgg::NeighbourKeys(peers)) => self.share_keys(peers),
            (Stage::MaskedInput, AggSecAgg::RoutedShares(shares)) => self.routed_shares(shares),
            (Stage::Unmasking, AggSecAgg::UnmaskRequest { survivors }) => self.unmask(survivors),
            (stage, msg) => Err(SecAggError::OutOfOrder {
                stage,
                got: msg.name(),
            }),
        }
    }

    /// At least t neighbours take part at `stage`, or the device stops.
    fn enough(&self, stage: Stage, have: usize) -> Result<(), SecAggError> {
        let threshold = self.params.threshold;
        if have < threshold as usize {
            return Err(SecAggError::TooFewNeighbours {
                stage,
                have,
                threshold,
            });
        }
        Ok(())
    }

    fn share_keys(&mut self, peers: Vec<PeerKeys>) -> Result<(), SecAggError> {
        for p in peers {
            if self.graph_neighbours.binary_search(&p.device).is_err() {
                return Err(SecAggError::NotNeighbour { peer: p.device });
            }
            let device = p.device;
            if self.peers.insert(device, p).is_some() {
                return Err(SecAggError::Duplicate { peer: device });
            }
        }
        self.enough(Stage::ShareKeys, self.peers.len())?;
        let t = self.params.threshold;
        for p in self.peers.values() {
            let shared = mask::agree(&self.s.secret, &p.s_public, p.device)?;
            let seed = mask::pairwise_seed(&shared, self.params.round, self.me, p.device);
            self.pair_seeds.insert(p.device, seed);
        }
        // x-coordinates: 1 + the holder's rank in N(me) (the graph's, so
        // that the aggregator knows them without being told).
        let xs: Vec<u8> = self
            .peers
            .keys()
            .map(|d| self.graph_neighbours.binary_search(d).expect("checked") as u8 + 1)
            .collect();
        let self_shares = shamir::split(&self.self_seed, t as usize, &xs, &mut self.rng)?;
        let key_shares = shamir::split(&self.s_secret, t as usize, &xs, &mut self.rng)?;
        let mut sealed = Vec::with_capacity(self.peers.len());
        for ((p, a), b) in self.peers.values().zip(&self_shares).zip(&key_shares) {
            let shared = mask::agree(&self.c.secret, &p.c_public, p.device)?;
            let key = mask::channel_key(&shared, self.params.round, self.me, p.device);
            let mut plain = Vec::with_capacity(SHARE_PLAINTEXT_BYTES);
            plain.extend_from_slice(&self.me.to_le_bytes());
            plain.extend_from_slice(&p.device.to_le_bytes());
            plain.extend_from_slice(&a.y);
            plain.extend_from_slice(&b.y);
            sealed.push(SealedShare {
                peer: p.device,
                ciphertext: mask::seal(&key, &plain),
            });
        }
        self.stage = Stage::MaskedInput;
        self.transmit.push_back(DeviceSecAgg::ShareKeys(sealed));
        Ok(())
    }

    fn routed_shares(&mut self, shares: Vec<SealedShare>) -> Result<(), SecAggError> {
        for sh in shares {
            let from = sh.peer;
            let peer = self
                .peers
                .get(&from)
                .ok_or(SecAggError::NotNeighbour { peer: from })?;
            if self.held.contains_key(&from) {
                return Err(SecAggError::Duplicate { peer: from });
            }
            if sh.ciphertext.len() != SEALED_SHARE_BYTES {
                return Err(SecAggError::ShareUnreadable { from });
            }
            let shared = mask::agree(&self.c.secret, &peer.c_public, from)?;
            let key = mask::channel_key(&shared, self.params.round, from, self.me);
            let plain = mask::open(&key, &sh.ciphertext, from)?;
            let word = |i: usize| u32::from_le_bytes(plain[i..i + 4].try_into().expect("4 bytes"));
            if word(0) != from || word(4) != self.me {
                return Err(SecAggError::ShareMisaddressed { from });
            }
            let a: [u8; 32] = plain[8..40].try_into().expect("32 bytes");
            let b: [u8; 32] = plain[40..72].try_into().expect("32 bytes");
            self.held.insert(from, (a, b));
        }
        self.enough(Stage::MaskedInput, self.held.len())?;
        self.stage = Stage::Unmasking;
        self.try_mask();
        Ok(())
    }

    /// y = x + PRG(b) + Σ_{v ∈ N ∩ U2} ±PRG(s_{me,v}), once x and the
    /// shares are both here.
    fn try_mask(&mut self) {
        if self.masked_sent || self.stage != Stage::Unmasking {
            return;
        }
        let Some(input) = &self.input else { return };
        let (round, bits) = (self.params.round, self.params.bits);
        let mut y = input.clone();
        mask::apply_mask(
            &mask::self_seed(&self.self_seed, round),
            bits,
            false,
            &mut y,
        );
        for &v in self.held.keys() {
            // + towards a larger index, - towards a smaller one: the two
            // ends' masks cancel in the sum.
            mask::apply_mask(&self.pair_seeds[&v], bits, self.me > v, &mut y);
        }
        self.masked_sent = true;
        self.transmit.push_back(DeviceSecAgg::MaskedInput(y));
    }

    fn unmask(&mut self, survivors: Vec<u32>) -> Result<(), SecAggError> {
        if !self.masked_sent {
            // The aggregator moved on without this device's masked input:
            // it is a dropout, and reveals nothing.
            return Err(SecAggError::OutOfOrder {
                stage: Stage::MaskedInput,
                got: "UnmaskRequest",
            });
        }
        let mut alive = BTreeSet::new();
        for v in survivors {
            if !self.held.contains_key(&v) {
                return Err(SecAggError::NotNeighbour { peer: v });
            }
            if !alive.insert(v) {
                return Err(SecAggError::Duplicate { peer: v });
            }
        }
        self.enough(Stage::Unmasking, alive.len())?;
        let mut self_mask = Vec::new();
        let mut mask_key = Vec::new();
        for (&owner, &(a, b)) in &self.held {
            if alive.contains(&owner) {
                self_mask.push(RevealedShare { owner, share: a });
            } else {
                mask_key.push(RevealedShare { owner, share: b });
            }
        }
        self.transmit.push_back(DeviceSecAgg::Unmask {
            self_mask,
            mask_key,
        });
        // Nothing more to answer this round.
        self.stage = Stage::AdvertiseKeys;
        Ok(())
    }
}

/// How a device's part in a round over QUIC ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicRoundEnd {
    /// It sent its unmasking shares and the aggregator closed the stream.
    Finished,
    /// It stopped before sending its message of this stage (dropout
    /// injection for tests and `simulate`).
    Dropped(Stage),
    /// The aggregator ended the stream first (the round moved on without
    /// this device, or failed).
    Closed,
}

/// Drive `client` over one bi stream of `conn`: the stream opens with the
/// device's round index (4 bytes, little-endian), then carries
/// `fedge_proto::msg::secagg` frames both ways. `drop_at`: stop before
/// sending the message of that stage. A protocol error from the
/// aggregator's side ends the device's part (`Err`).
pub async fn run_over_quic(
    conn: &quinn::Connection,
    mut client: SecAggClient,
    limits: &fedge_proto::Limits,
    drop_at: Option<Stage>,
) -> anyhow::Result<QuicRoundEnd> {
    use fedge_proto::io::{read_frame, write_frame};
    use fedge_proto::msg::secagg::{decode_agg, encode_device};
    let (round, bits) = (client.params.round, client.params.bits);
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &client.index().to_le_bytes()).await?;
    loop {
        while let Some(m) = client.poll_transmit() {
            if drop_at.is_some_and(|s| s <= m.stage()) {
                return Ok(QuicRoundEnd::Dropped(m.stage()));
            }
            write_frame(&mut send, &encode_device(round, bits, &m)).await?;
            if m.stage() == Stage::Unmasking {
                send.finish()?;
                // Wait for the aggregator to end its side: it has read ours.
                while read_frame(&mut recv, limits.frame_bytes_max)
                    .await?
                    .is_some()
                {}
                return Ok(QuicRoundEnd::Finished);
            }
        }
        let Some(frame) = read_frame(&mut recv, limits.frame_bytes_max).await? else {
            return Ok(QuicRoundEnd::Closed);
        };
        let (r, msg) = decode_agg(&frame, limits)?;
        anyhow::ensure!(r == round, "a message for round {r} in round {round}");
        client.handle_message(msg)?;
    }
}
/// Distributed DP: adds symmetric Skellam noise Sk(mu) = Poisson(mu) -
/// Poisson(mu) to every coordinate, in the ring (Agarwal, Kairouz and Liu,
/// NeurIPS 2021; the round's calibration is
/// [`fedge_proto::secagg::DistributedNoise`]). Poisson variates come from
/// `rand_distr` (Knuth's method below 12, Hörmann's PTRS rejection
/// sampler above), seeded by the device's OS randomness.
fn add_skellam(
    values: &mut [u64],
    mu: f64,
    bits: u32,
    rng: &mut ChaCha20Rng,
) -> Result<(), SecAggError> {
    use rand_distr::{Distribution, Poisson};
    let poisson =
        Poisson::new(mu).map_err(|e| SecAggError::Params(format!("Skellam mu {mu}: {e}")))?;
    let m = mask::ring_mask(bits);
    for v in values.iter_mut() {
        let noise = poisson.sample(rng) as i64 - poisson.sample(rng) as i64;
        *v = v.wrapping_add(noise as u64) & m;
    }
    Ok(())
}
