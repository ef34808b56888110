//! The simulated fleet: device keys and stakes, one real device (driver,
//! session, training) per shard, and the trainers that make a device slow,
//! flaky or malicious.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedge_device::driver::{DriverConfig, DriverError, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::{OnnxTrainer, Trainer};
use fedge_device::transport::Trust;
use fedge_device::{EvalOutput, TrainOutput};
use fedge_engine::data::Dataset;
use fedge_proto::ModelBlob;
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use tokio::task::JoinHandle;

use super::args::SimConfig;
use super::copycat::{AcceptedUpdates, Copycat, Copycats, Posting};

/// A running device: its driver task, and whether it attacks. What the
/// driver reports (the final model among it) is dropped as the device
/// finishes: ten thousand copies of the final model are gigabytes.
pub struct Device {
    pub task: JoinHandle<Result<Connects, DriverError>>,
    pub attacker: bool,
}

/// A device's connection attempts that failed (timed out, say) and that
/// the aggregator refused at its handshake limit (it came back later).
#[derive(Clone, Copy, Debug, Default)]
pub struct Connects {
    pub failed: u32,
    pub refused: u32,
}

/// Simulated devices that share one QUIC endpoint (a UDP socket and its
/// driver task). A device of its own would hold a socket, a receive
/// buffer of its own and a task: at 10,000 devices that was 10,000 file
/// descriptors (the process limit is often 20,000) and gigabytes of
/// receive buffers.
const DEVICES_PER_ENDPOINT: usize = 128;

/// Socket buffer each shared endpoint asks for, each way.
const ENDPOINT_BUFFER_BYTES: usize = 4 << 20;

/// Every device's signing key, derived from the simulation's seed: the
/// fleet's `devices`, then the `attacker_devices` added beyond it.
pub fn device_keys(c: &SimConfig) -> Vec<SigningKey> {
    let fleet = (0..c.devices).map(|i| format!("fedge-sim-device-{}-{i}", c.seed));
    let added = (0..c.attacker_devices).map(|j| format!("fedge-sim-attacker-{}-{j}", c.seed));
    fleet
        .chain(added)
        .map(|name| SigningKey::from_bytes(blake3::hash(name.as_bytes()).as_bytes()))
        .collect()
}

/// Write the stake registry (`stakes.txt` in `dir`: one `KEY STAKE` line
/// per device; added attackers only with `attacker_stake`) and return
/// its path.
pub fn write_stake_file(c: &SimConfig, keys: &[SigningKey], dir: &Path) -> anyhow::Result<PathBuf> {
    let mut stake_values = stakes(&c.stakes, c.devices)?;
    if let Some(s) = c.attacker_stake {
        stake_values.extend(std::iter::repeat_n(s, c.attacker_devices));
    }
    let stake_file = dir.join("stakes.txt");
    let lines: String = keys
        .iter()
        .zip(&stake_values)
        .map(|(k, s)| format!("{} {s}\n", hex::encode(k.verifying_key().to_bytes())))
        .collect();
    std::fs::write(&stake_file, lines)?;
    Ok(stake_file)
}

fn stakes(spec: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    match spec.split_once(':') {
        None if spec == "uniform" => Ok(vec![1.0; n]),
        Some(("zipf", s)) => {
            let s: f64 = s.parse().context("zipf exponent")?;
            Ok((0..n).map(|i| 1000.0 / ((i + 1) as f64).powf(s)).collect())
        }
        _ => anyhow::bail!("stakes `{spec}`: use uniform or zipf:S"),
    }
}

/// The device ids (hex public keys) of the attacking devices: the last
/// [`attacker_count`] of the fleet and every added attacker.
pub fn attacker_ids(c: &SimConfig, keys: &[SigningKey]) -> std::collections::HashSet<String> {
    let first = c.devices - attacker_count(c);
    keys.iter()
        .enumerate()
        .filter(|(i, _)| *i >= first)
        .map(|(_, k)| hex::encode(k.verifying_key().to_bytes()))
        .collect()
}

/// How many of the fleet's devices attack (the last ones by index); the
/// `attacker_devices` added beyond the fleet attack too.
pub fn attacker_count(c: &SimConfig) -> usize {
    ((c.devices as f64) * c.attackers).round() as usize
}

/// What devices may learn of the aggregator's progress (as a real
/// attacker would, by polling its `/status` or intercepting traffic).
pub struct Seen {
    /// Hogs read it.
    pub closed: ClosedRounds,
    /// Copycats read it.
    pub accepted: AcceptedUpdates,
    /// The aggregators' state directories, where accepted payloads are
    /// kept: copycats read the payload they copy there.
    pub payload_dirs: Vec<PathBuf>,
}

/// Start one device per shard against the aggregator at `addr` (pinned to
/// the certificate fingerprint `fp`), each training on its shard of
/// `train`.
pub fn spawn_devices(
    c: &SimConfig,
    seen: &Seen,
    keys: Vec<SigningKey>,
    train: &Dataset,
    shards: &[Vec<usize>],
    targets: &[(SocketAddr, [u8; 32])],
) -> anyhow::Result<Vec<Device>> {
    let (closed, accepted) = (&seen.closed, &seen.accepted);
    let n_attackers = attacker_count(c);
    let attack = AttackPlan::of(c)?;
    let kinds = AttackPlan::kinds(c)?;
    let colluders: Colluders = Default::default();
    // One compiled training step for the whole fleet, not one per device.
    let steps = fedge_engine::trainer::SharedSteps::default();
    let copying = kinds.contains(&Attack::Copycat) || kinds.contains(&Attack::NearCopy);
    let copycats = copying.then(|| {
        Copycats::new(
            Arc::clone(accepted),
            seen.payload_dirs.clone(),
            Duration::from_millis(c.round_deadline_ms / 2),
        )
    });
    let mut devices = Vec::new();
    let mut endpoint: Option<quinn::Endpoint> = None;
    // An added attacker trains on a copy of an honest device's shard.
    let shards = shards.iter().cycle();
    for (i, (key, shard)) in keys.into_iter().zip(shards).enumerate() {
        // With a tree of aggregators, devices are dealt to the leaves.
        let (addr, fp) = targets[i % targets.len()];
        if i % DEVICES_PER_ENDPOINT == 0 {
            endpoint = Some(
                fedge_device::transport::shared_endpoint(addr, ENDPOINT_BUFFER_BYTES)
                    .context("opening a UDP socket for the devices")?,
            );
        }
        let cfg = DriverConfig {
            endpoint: endpoint.clone(),
            session: SessionConfig {
                seed: c.seed.wrapping_add(i as u64),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(3),
                first_connect_jitter: Duration::from_millis(c.ramp_ms),
                secagg_drop_after: c.secagg_dropout.stage_of(i, c.devices),
                ..SessionConfig::default()
            },
            ..DriverConfig::new(addr, Trust::Pinned(fp))
        };
        let first_attacker = c.devices - n_attackers;
        let malicious = (i >= first_attacker).then(|| AttackPlan {
            kind: kinds[(i - first_attacker) % kinds.len()],
            ..attack
        });
        let id = hex::encode(key.verifying_key().to_bytes());
        let fleet = FleetShared {
            steps: &steps,
            colluders: &colluders,
            closed,
        };
        let trainer = device_trainer(
            c,
            i,
            &fleet,
            train.subset(shard),
            malicious,
            copycats.as_ref().map(|cc| (cc, id)),
        );
        devices.push(Device {
            task: tokio::spawn(async move {
                let r = run_device(cfg, key, trainer).await?;
                Ok(Connects {
                    failed: r.connect_failures,
                    refused: r.connects_refused,
                })
            }),
            attacker: malicious.is_some(),
        });
    }
    Ok(devices)
}

/// What the fleet's trainers share: the compiled training step, the
/// colluders' updates, the rounds closed.
struct FleetShared<'a> {
    steps: &'a fedge_engine::trainer::SharedSteps,
    colluders: &'a Colluders,
    closed: &'a ClosedRounds,
}

/// Device `i`'s trainer on its `local` data: honest, or running
/// `malicious`, and slowed, capped or flaky as the heterogeneity says.
fn device_trainer(
    c: &SimConfig,
    i: usize,
    fleet: &FleetShared<'_>,
    mut local: Dataset,
    malicious: Option<AttackPlan>,
    copycats: Option<(&Copycats, String)>,
) -> Box<dyn Trainer> {
    if malicious.is_some_and(|a| a.kind == Attack::LabelFlip) {
        let k = local.classes as i64;
        for l in &mut local.labels {
            *l = k - 1 - *l;
        }
    }
    // With federated evaluation, the shard's last examples are held out.
    let held = if c.evaluation.enabled() && local.len() >= 2 {
        ((local.len() as f64 * c.eval_holdout).round() as usize).clamp(1, local.len() - 1)
    } else {
        0
    };
    let cut = local.len() - held;
    let holdout = local.slice(cut..local.len());
    let local = local.slice(0..cut);
    let honest = OnnxTrainer::new(local, c.seed.wrapping_add(i as u64))
        .with_holdout(holdout)
        .with_shared_steps(fleet.steps.clone());
    let mut trainer: Box<dyn Trainer> = match malicious {
        Some(plan) if plan.kind == Attack::Hog => Box::new(Hog {
            hold: Duration::from_millis(c.round_deadline_ms) + HOG_MARGIN,
            closed: Arc::clone(fleet.closed),
        }),
        Some(plan) if matches!(plan.kind, Attack::Copycat | Attack::NearCopy) => {
            let (cc, device) = copycats.expect("copycats share a board");
            Box::new(Copycat::new(
                cc.clone(),
                plan,
                plan.kind == Attack::NearCopy,
                device,
            ))
        }
        Some(plan) => Box::new(Attacker {
            inner: honest,
            plan,
            seed: c.seed.wrapping_add(1000 + i as u64),
            colluders: Arc::clone(fleet.colluders),
            first: None,
        }),
        // With copycats about, honest updates are where they can see them.
        None => match copycats {
            Some((cc, device)) => Box::new(Posting {
                inner: honest,
                copycats: cc.clone(),
                device,
            }),
            None => Box::new(honest),
        },
    };
    if !c.heterogeneity.is_uniform() {
        let h = &c.heterogeneity;
        trainer = Box::new(Profiled {
            inner: trainer,
            speed: h.speed_factors[i % h.speed_factors.len()],
            dropout: h.dropout,
            bytes_per_sec: h.bandwidth_kbps[i % h.bandwidth_kbps.len()] * 1000.0 / 8.0,
            deadline: Duration::from_millis(c.round_deadline_ms),
            seed: c.seed.wrapping_add(5000 + i as u64),
        });
    }
    trainer
}

/// What became of the devices once the rounds were over.
pub struct Joined {
    /// Honest devices that did not finish cleanly.
    pub failed: usize,
    /// Attackers still running when the honest devices were done (a key
    /// refused a task is paced away for minutes): stopped.
    pub attackers_stopped: usize,
    /// Over the honest devices that finished: connection attempts that
    /// failed, and that the aggregator refused at its handshake limit.
    pub connect_failures: u64,
    pub connects_refused: u64,
}

/// Once the aggregators have stopped serving: wait for every honest
/// device to leave with the final model it fetched, with one deadline of
/// [`JOIN_AFTER_SERVING`] for all (a device still running then did not get
/// it: it is reconnecting to an aggregator that has gone), then give the
/// attackers a second more and stop the ones still running.
pub async fn join_devices(devices: Vec<Device>) -> Joined {
    let (attackers, honest): (Vec<_>, Vec<_>) = devices.into_iter().partition(|d| d.attacker);
    let mut joined = Joined {
        failed: 0,
        attackers_stopped: 0,
        connect_failures: 0,
        connects_refused: 0,
    };
    let until = tokio::time::Instant::now() + JOIN_AFTER_SERVING;
    for d in honest {
        match tokio::time::timeout_at(until, d.task).await {
            Ok(Ok(Ok(c))) => {
                joined.connect_failures += u64::from(c.failed);
                joined.connects_refused += u64::from(c.refused);
            }
            Ok(other) => {
                joined.failed += 1;
                tracing::warn!(?other, "a device did not finish cleanly");
            }
            Err(_) => joined.failed += 1, // still running at the deadline: dropped
        }
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    for d in attackers {
        let abort = d.task.abort_handle();
        if tokio::time::timeout_at(until, d.task).await.is_err() {
            abort.abort();
            joined.attackers_stopped += 1;
        }
    }
    joined
}

/// How long devices may take to leave once the aggregators stopped: a
/// device that has the final model returns within a second.
const JOIN_AFTER_SERVING: Duration = Duration::from_secs(10);

/// Attacks a malicious device runs on its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// Send the negated update.
    SignFlip,
    /// Model replacement: scale the update up by 10.
    Scaling,
    /// Send Gaussian noise (sigma 0.5 per coordinate) instead of an update.
    Gaussian,
    /// Train on flipped labels (y -> classes - 1 - y).
    LabelFlip,
    /// "A little is enough" (Baruch et al. 2019): mean - z x std of the
    /// colluders' honest updates, coordinate-wise (z = 1).
    Alie,
    /// Send an all-zero update every round (a free rider, and a model
    /// that does not move).
    Zero,
    /// Slot hogging: take every task offered, download the model, never
    /// upload. The trainer holds the task past the round's deadline
    /// without training, so the session keeps its slot the whole round.
    Hog,
    /// Re-send the update of the device's first task in every later task
    /// (freshly signed for the new round: a stale update, not a replayed
    /// signature; replaying the signed upload itself is the QUIC tests').
    Replay,
    /// A free-rider: trains nothing and sends a tiny random update
    /// (sigma 1e-6 per coordinate), hoping to be paid for taking part.
    FreeRider,
    /// A copycat: waits until an honest device's update of the same round
    /// has been accepted, then sends that payload as its own (freshly
    /// signed). Sends nothing useful (a zero update) if none is accepted
    /// before half the round's deadline. See [`super::copycat`].
    Copycat,
    /// A near-copy: like a copycat, but copies the honest device's raw
    /// update, which its own error feedback then makes differ from the
    /// victim's payload. Not defended (see [`super::copycat`]).
    NearCopy,
    /// A noise sender: random Gaussian noise scaled to the norm of the
    /// honest update it would have sent, so no norm bound tells it apart.
    Noise,
}

/// The liar: claims 10^12 samples and sends its update
/// sign-flipped x10.
const LIAR_SAMPLES: u64 = 1_000_000_000_000;
const LIAR_SCALE: f32 = 10.0;

impl Attack {
    pub const NAMES: &str = "sign-flip, scaling, gaussian, label-flip, alie, zero, hog, replay, \
liar, free-rider, copycat, near-copy or noise (or a comma-separated list, dealt to the attackers in turn)";

    /// An attack by name (`liar` is sign-flip; see [`AttackPlan::of`]).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "sign-flip" | "liar" => Attack::SignFlip,
            "scaling" => Attack::Scaling,
            "gaussian" => Attack::Gaussian,
            "label-flip" => Attack::LabelFlip,
            "alie" => Attack::Alie,
            "zero" => Attack::Zero,
            "hog" => Attack::Hog,
            "replay" => Attack::Replay,
            "free-rider" => Attack::FreeRider,
            "copycat" => Attack::Copycat,
            "near-copy" => Attack::NearCopy,
            "noise" => Attack::Noise,
            o => anyhow::bail!("attack `{o}`: use {}", Attack::NAMES),
        })
    }
}

/// What every attacker of a simulation does: the attack, a factor on the
/// corrupted update, and the sample count it claims.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttackPlan {
    pub kind: Attack,
    pub scale: f32,
    /// None: the honest count.
    pub claim_samples: Option<u64>,
}

impl AttackPlan {
    /// The configuration's attack: `liar` is sign-flip with scale 10 and a
    /// claim of 10^12 samples unless `attack_scale` or `claim_samples`
    /// say otherwise.
    pub fn of(c: &SimConfig) -> anyhow::Result<Self> {
        let kinds = Self::kinds(c)?;
        let kind = kinds[0];
        let liar = c.attack == "liar";
        let plan = AttackPlan {
            kind,
            scale: c
                .attack_scale
                .unwrap_or(if liar { LIAR_SCALE } else { 1.0 }),
            claim_samples: c.claim_samples.or(liar.then_some(LIAR_SAMPLES)),
        };
        anyhow::ensure!(
            plan.scale.is_finite(),
            "attack_scale must be finite, got {}",
            plan.scale
        );
        anyhow::ensure!(
            plan.claim_samples != Some(0),
            "claim_samples must be at least 1 (a device never sends a 0-sample update)"
        );
        if let Some(s) = c.attacker_stake {
            anyhow::ensure!(
                s >= 0.0 && s.is_finite(),
                "attacker_stake must be >= 0, got {s}"
            );
        }
        anyhow::ensure!(
            c.attacker_devices <= MAX_ADDED_ATTACKERS,
            "attacker_devices must be at most {MAX_ADDED_ATTACKERS}, got {}",
            c.attacker_devices
        );
        Ok(plan)
    }

    /// The attacks of `c.attack` (a comma-separated list), in the order
    /// they are dealt to the attackers.
    pub fn kinds(c: &SimConfig) -> anyhow::Result<Vec<Attack>> {
        let kinds = c
            .attack
            .split(',')
            .map(|s| Attack::parse(s.trim()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            kinds.len() == 1 || !c.attack.split(',').any(|s| s.trim() == "liar"),
            "liar sets the scale and claim of every attacker: it cannot be one of a list"
        );
        Ok(kinds)
    }

    /// What the plan says, for the run's announcement.
    pub fn describe(&self, name: &str) -> String {
        let mut s = name.to_string();
        if self.scale != 1.0 {
            s += &format!(", update x{}", self.scale);
        }
        if let Some(n) = self.claim_samples {
            s += &format!(", claiming {n} samples");
        }
        s
    }
}

/// Added attacker devices a simulation may start (each is a full device
/// stack in this process).
const MAX_ADDED_ATTACKERS: usize = 10_000;

/// How long past the round's deadline a hog holds its task at most.
const HOG_MARGIN: Duration = Duration::from_millis(500);
/// How often a hog looks whether its round has closed.
const HOG_POLL: Duration = Duration::from_millis(10);

/// A device of a given speed, link and reliability around a real trainer
/// (see [`Heterogeneity`]). Runs on the driver's blocking thread, so its
/// waits hold no async worker.
struct Profiled {
    inner: Box<dyn Trainer>,
    speed: f64,
    dropout: f64,
    /// Link rate (0: no cap).
    bytes_per_sec: f64,
    deadline: Duration,
    seed: u64,
}

impl Trainer for Profiled {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        use rand::Rng;
        let mut rng = round_rng(self.seed, round_id);
        let t0 = Instant::now();
        let out = self.inner.train(round_id, model, plan)?;
        let mut wait = t0.elapsed().mul_f64(self.speed - 1.0);
        if self.bytes_per_sec > 0.0 {
            // The model came down and the compressed update goes up.
            let codec = fedge_proto::codec::CodecSpec::parse(&plan.codec)?;
            let up = fedge_proto::codec::encode(&codec, &out.delta, self.seed ^ round_id)?.len();
            let down = model.encode().len();
            wait += Duration::from_secs_f64((up + down) as f64 / self.bytes_per_sec);
        }
        if rng.random::<f64>() < self.dropout {
            // Gone until after the deadline: the session drops the update.
            wait = wait.max(self.deadline + Duration::from_millis(100));
        }
        std::thread::sleep(wait);
        Ok(out)
    }

    fn evaluate(&mut self, model: &ModelBlob) -> anyhow::Result<Option<EvalOutput>> {
        self.inner.evaluate(model)
    }

    fn can_evaluate(&self) -> bool {
        self.inner.can_evaluate()
    }
}

/// Honest updates the colluding attackers have computed, by round.
type Colluders = Arc<Mutex<HashMap<u64, Vec<Vec<f32>>>>>;

/// A device that trains honestly and then corrupts its update (and may
/// lie about its sample count).
struct Attacker {
    inner: OnnxTrainer,
    plan: AttackPlan,
    seed: u64,
    colluders: Colluders,
    /// The update of the first task, for [`Attack::Replay`].
    first: Option<Vec<f32>>,
}

impl Trainer for Attacker {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        use rand_distr::Distribution;
        let mut out = self.inner.train(round_id, model, plan)?;
        match self.plan.kind {
            Attack::SignFlip => out.delta.iter_mut().for_each(|d| *d = -*d),
            Attack::Scaling => out.delta.iter_mut().for_each(|d| *d *= 10.0),
            Attack::Gaussian => {
                let mut rng = round_rng(self.seed, round_id);
                let normal = rand_distr::Normal::new(0.0f32, 0.5).expect("sigma > 0");
                out.delta
                    .iter_mut()
                    .for_each(|d| *d = normal.sample(&mut rng));
            }
            Attack::LabelFlip => {}
            Attack::Alie => {
                let mut all = self.colluders.lock().expect("colluders");
                let seen = all.entry(round_id).or_default();
                seen.push(out.delta.clone());
                let n = seen.len() as f32;
                for (j, d) in out.delta.iter_mut().enumerate() {
                    let mean = seen.iter().map(|u| u[j]).sum::<f32>() / n;
                    let var = seen.iter().map(|u| (u[j] - mean).powi(2)).sum::<f32>() / n;
                    // With one colluder so far, fall back to |mean| as the spread.
                    let sd = if n > 1.0 { var.sqrt() } else { mean.abs() };
                    *d = mean - sd;
                }
            }
            Attack::Zero => out.delta.iter_mut().for_each(|d| *d = 0.0),
            Attack::FreeRider => {
                let mut rng = round_rng(self.seed, round_id);
                let normal = rand_distr::Normal::new(0.0f32, 1e-6).expect("sigma > 0");
                out.delta
                    .iter_mut()
                    .for_each(|d| *d = normal.sample(&mut rng));
            }
            Attack::Noise => {
                let norm = fedge_aggregator::robust::l2_norm(&out.delta);
                let mut rng = round_rng(self.seed, round_id);
                let normal = rand_distr::Normal::new(0.0f32, 1.0).expect("sigma > 0");
                out.delta
                    .iter_mut()
                    .for_each(|d| *d = normal.sample(&mut rng));
                let k = (norm / fedge_aggregator::robust::l2_norm(&out.delta).max(1e-12)) as f32;
                out.delta.iter_mut().for_each(|d| *d *= k);
            }
            Attack::Replay => match &self.first {
                Some(first) if first.len() == out.delta.len() => out.delta.clone_from(first),
                _ => self.first = Some(out.delta.clone()),
            },
            Attack::Hog => unreachable!("a hog has its own trainer"),
            Attack::Copycat | Attack::NearCopy => unreachable!("a copycat has its own trainer"),
        }
        if self.plan.scale != 1.0 {
            let k = self.plan.scale;
            out.delta.iter_mut().for_each(|d| *d *= k);
        }
        if let Some(n) = self.plan.claim_samples {
            out.sample_count = n;
        }
        Ok(out)
    }

    /// An attacker lies in evaluation tasks too: a perfect model, on as
    /// many examples as a u64 holds (the aggregator caps the weight and
    /// trims the extremes).
    fn can_evaluate(&self) -> bool {
        true
    }

    fn evaluate(&mut self, _model: &ModelBlob) -> anyhow::Result<Option<EvalOutput>> {
        Ok(Some(EvalOutput {
            examples: u64::MAX,
            loss: 0.0,
            accuracy: 1.0,
        }))
    }
}

/// The highest round id the aggregator has closed (published or
/// aborted), as the simulation sees its events. Hogs read it: a real
/// attacker learns the same by polling with a spare key or reading the
/// aggregator's `/status`.
pub type ClosedRounds = Arc<AtomicU64>;

/// Slot hogging ([`Attack::Hog`]): holds every task it is given, without
/// training, until its round has closed (or for `hold`, the round's
/// deadline and a margin, at most), then returns an update that is not
/// finite, which the session refuses to send. The session meanwhile keeps
/// the task, so the aggregator counts the slot as taken; once the round is
/// over the hog asks for the next task at once, first in line when the
/// next round opens. Runs on the driver's blocking thread.
struct Hog {
    hold: Duration,
    closed: ClosedRounds,
}

impl Trainer for Hog {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        _plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        let until = Instant::now() + self.hold;
        while self.closed.load(Ordering::Acquire) < round_id && Instant::now() < until {
            std::thread::sleep(HOG_POLL);
        }
        // Not an error: the driver gives up after repeated training
        // failures, and a hog never gives up.
        Ok(TrainOutput {
            delta: vec![f32::NAN; model.params.values.len()],
            sample_count: 1,
            metrics: Vec::new(),
        })
    }
}

/// A device's random stream for one round. The seed is mixed before the
/// round goes in: with a plain `seed ^ round_id` two devices whose seeds
/// differ in a few low bits drew the same stream in different rounds (a
/// free-rider's noise in round 3 was the noise sender's in round 4, so
/// the two attackers colluded by accident).
fn round_rng(seed: u64, round_id: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round_id)
}
