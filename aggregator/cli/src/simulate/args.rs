//! The simulation's configuration: [`SimConfig`] (a TOML file, every
//! field defaulted), the command line's [`SimArgs`] that override it, and
//! turning the two into one checked configuration.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedge_aggregator::config::LoraConfig;
use fedge_aggregator::scoring::ScoringConfig;
use fedge_aggregator::strategy::{ServerOpt, StrategyConfig};
use fedge_aggregator::weighting::{Transform, WeightPolicy};
use serde::{Deserialize, Serialize};

use super::fleet::AttackPlan;

mod secure;
pub use secure::SecAggDropout;

/// A simulation, as written in TOML (every field has a default; flags
/// override the file).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Zoo model (mlp, cnn, small_cnn, char, transformer) or a path to an ONNX file.
    pub model: String,
    /// mnist or shakespeare.
    pub data: String,
    /// iid, dirichlet:ALPHA, shards:N, or role (Shakespeare: one device
    /// per speaking role, the roles with the most lines).
    pub partition: String,
    pub devices: usize,
    /// Leaf aggregators under a root (0: one aggregator): see
    /// `simulate::tree`.
    pub aggregators: usize,
    /// Devices are ramped in: each makes its first connection at a random
    /// instant in [0, ramp_ms] (0: all at once).
    pub ramp_ms: u64,
    pub devices_per_round: usize,
    pub rounds: u64,
    pub local_epochs: u32,
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub momentum: f32,
    /// Devices' optimizer: sgd (with `momentum`), adam or adamw (its state
    /// starts afresh with every task).
    pub optimizer: String,
    /// Update codec (see the codec grammar) and error feedback.
    pub codec: String,
    pub error_feedback: bool,
    /// uniform, or zipf:S (device i holds 1/(i+1)^S of the top stake).
    pub stakes: String,
    pub weights: WeightPolicy,
    pub strategy: StrategyConfig,
    /// Training samples (the first N) and held-out samples (the last M).
    pub train_samples: usize,
    pub held_out: usize,
    pub round_deadline_ms: u64,
    pub seed: u64,
    /// Fewest accepted updates for a round to publish at its deadline
    /// (None: half of `devices_per_round`, at least 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_devices: Option<usize>,
    /// Updates with a larger L2 norm are refused (None: no bound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_norm_max: Option<f64>,
    /// Check-in window at a round's opening, in ms: the selected devices
    /// are drawn among those that asked during it (None: serve's default;
    /// 0: first come, first served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection_window_ms: Option<u64>,
    /// Fraction of devices that attack (the last ones by index).
    pub attackers: f64,
    /// Attacking devices added beyond the honest fleet (their own keys;
    /// each trains on a copy of an honest device's shard).
    pub attacker_devices: usize,
    /// The stake registered for each added attacker key (None: not in the
    /// registry, a fresh key with no stake).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attacker_stake: Option<f64>,
    /// What attackers do (see [`Attack`]): sign-flip, scaling, gaussian,
    /// label-flip, alie, zero, hog, replay, or liar (sign-flip x10
    /// claiming 10^12 samples).
    pub attack: String,
    /// Attackers multiply their corrupted update by this (None: 1, or 10
    /// for `liar`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack_scale: Option<f32>,
    /// Attackers claim this many samples in their signed manifest (None:
    /// their honest count, or 10^12 for `liar`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_samples: Option<u64>,
    /// Device heterogeneity (simulated by delays around real training).
    pub heterogeneity: Heterogeneity,
    /// With `[strategy.secagg]`: devices that drop out of every SecAgg+
    /// round they are drawn for, at a stage.
    pub secagg_dropout: SecAggDropout,
    /// Where results.json goes.
    pub out_dir: PathBuf,
    /// Keep the aggregator's state directory (models, database, ledger)
    /// here (None: a temporary directory, removed at the end). It must
    /// not hold an earlier run's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Contribution scoring and rewards, as in `serve`'s `[scoring]`; the
    /// validation set is the simulation's held-out split (`held_out`
    /// examples), so `validation` is not used.
    pub scoring: ScoringConfig,
    /// Federated evaluation, as in `serve`'s `[evaluation]`.
    pub evaluation: fedge_aggregator::evaluation::EvaluationConfig,
    /// With federated evaluation, each device keeps this fraction of its
    /// shard (its last examples) as held-out data, never trained on.
    pub eval_holdout: f64,
    /// Train LoRA adapters on the frozen model, as `serve`'s
    /// `[plan.lora]` (None: train the model's weights).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// How simulated devices differ. Training itself is real; a slower device
/// waits `(factor - 1) x` its training time after training, a capped link
/// waits for its download and upload bytes at that rate, and a dropout
/// stays away past the task's deadline, so its update arrives too late and
/// is not sent (the aggregator sees a selected device that never answers).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Heterogeneity {
    /// Slowdown factors (>= 1), dealt to devices round-robin.
    pub speed_factors: Vec<f64>,
    /// Chance that a device drops out of any one task.
    pub dropout: f64,
    /// Link rates in kbit/s (0: no cap), dealt round-robin.
    pub bandwidth_kbps: Vec<f64>,
}

impl Default for Heterogeneity {
    fn default() -> Self {
        Heterogeneity {
            speed_factors: vec![1.0],
            dropout: 0.0,
            bandwidth_kbps: vec![0.0],
        }
    }
}

impl Heterogeneity {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.speed_factors.is_empty() && self.speed_factors.iter().all(|f| *f >= 1.0),
            "speed factors must be >= 1 (1: full speed), got {:?}",
            self.speed_factors
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.dropout),
            "dropout must be in [0, 1), got {}",
            self.dropout
        );
        anyhow::ensure!(
            !self.bandwidth_kbps.is_empty()
                && self
                    .bandwidth_kbps
                    .iter()
                    .all(|b| *b >= 0.0 && b.is_finite()),
            "bandwidth caps must be >= 0 kbit/s (0: none), got {:?}",
            self.bandwidth_kbps
        );
        Ok(())
    }

    pub fn is_uniform(&self) -> bool {
        self.speed_factors.iter().all(|f| *f == 1.0)
            && self.dropout == 0.0
            && self.bandwidth_kbps.iter().all(|b| *b == 0.0)
    }
}

/// `simulate`'s downlink codec unless told otherwise (`serve` publishes
/// exact models unless `[strategy] downlink` says otherwise).
pub const DEFAULT_DOWNLINK: &str = "topk:0.02+q8";

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "mlp".into(),
            data: "mnist".into(),
            partition: "dirichlet:0.5".into(),
            devices: 20,
            aggregators: 0,
            ramp_ms: 0,
            devices_per_round: 10,
            rounds: 20,
            local_epochs: 2,
            local_steps: 0,
            batch_size: 32,
            learning_rate: 0.05,
            momentum: 0.9,
            optimizer: "sgd".into(),
            codec: "topk:0.1+q8".into(),
            error_feedback: true,
            stakes: "zipf:1.0".into(),
            weights: WeightPolicy {
                stake: Transform::Sqrt,
                samples: Transform::Linear,
                min_stake: 0.0,
                max_share: 0.25,
                allow_unknown: false,
                ..WeightPolicy::default()
            },
            // Compressed model steps down (measured: at least 10x fewer
            // bytes both ways than dense FedAvg on the default run, at
            // final accuracy within a point of exact models; README).
            strategy: StrategyConfig {
                downlink: Some(DEFAULT_DOWNLINK.into()),
                ..StrategyConfig::default()
            },
            train_samples: 8000,
            held_out: 2000,
            round_deadline_ms: 30_000,
            seed: 1,
            min_devices: None,
            update_norm_max: None,
            selection_window_ms: None,
            attackers: 0.0,
            attacker_devices: 0,
            attacker_stake: None,
            attack: "sign-flip".into(),
            attack_scale: None,
            claim_samples: None,
            heterogeneity: Heterogeneity::default(),
            secagg_dropout: SecAggDropout::default(),
            out_dir: PathBuf::from("results"),
            state_dir: None,
            scoring: ScoringConfig::default(),
            evaluation: Default::default(),
            eval_holdout: 0.1,
            lora: None,
        }
    }
}

#[derive(clap::Args)]
pub struct SimArgs {
    /// TOML file with a [`SimConfig`]; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Zoo model name (mlp, cnn, small_cnn, char, transformer) or an ONNX file.
    #[arg(long)]
    model: Option<String>,
    /// Train LoRA adapters on the frozen model, as `[plan.lora]`:
    /// `rank=R,alpha=A,targets=PATTERN` (`targets` repeatable).
    #[arg(long, value_name = "SPEC")]
    lora: Option<fedge_proto::msg::LoraSpec>,
    #[arg(long)]
    devices: Option<usize>,
    /// Run a two-level tree instead of one aggregator: a root and this
    /// many leaf aggregators over loopback QUIC, the devices dealt to the
    /// leaves in turn. Per-device weights, caps, clipping, the combiner
    /// and scoring apply at the leaves; the root averages their partial
    /// aggregates by weight and applies the server optimizer.
    #[arg(long, value_name = "N")]
    aggregators: Option<usize>,
    /// Ramp the devices in: each connects first at a random instant
    /// within this many ms (0: all at once; the aggregator paces a burst).
    #[arg(long)]
    ramp_ms: Option<u64>,
    #[arg(long)]
    devices_per_round: Option<usize>,
    #[arg(long)]
    rounds: Option<u64>,
    /// iid, dirichlet:ALPHA, shards:N, or role (Shakespeare only).
    #[arg(long)]
    partition: Option<String>,
    /// Data set: mnist or shakespeare.
    #[arg(long)]
    data: Option<String>,
    /// Training samples in all (the first N; with `role`, split evenly as a
    /// per-role cap).
    #[arg(long)]
    train_samples: Option<usize>,
    #[arg(long)]
    batch_size: Option<u32>,
    /// Local steps per task (0: use --local-epochs).
    #[arg(long)]
    local_steps: Option<u32>,
    /// fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox:MU, or fedbuff
    /// (asynchronous, staleness-discounted FedAvg).
    #[arg(long)]
    strategy: Option<String>,
    /// Device slowdown factors, dealt round-robin, e.g. 1,1,2,4.
    #[arg(long, value_delimiter = ',')]
    speed_factors: Option<Vec<f64>>,
    /// Chance that a device drops out of any one task, e.g. 0.1.
    #[arg(long)]
    dropout: Option<f64>,
    /// Link caps in kbit/s, dealt round-robin (0: none), e.g. 0,1000,250.
    #[arg(long, value_delimiter = ',')]
    bandwidth_kbps: Option<Vec<f64>>,
    /// Update codec, e.g. dense-f32, q8, topk:0.01+q4.
    #[arg(long)]
    codec: Option<String>,
    #[arg(long)]
    local_epochs: Option<u32>,
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Devices' optimizer: sgd, adam or adamw.
    #[arg(long)]
    optimizer: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Fewest accepted updates for a round to publish at its deadline
    /// (default: half of --devices-per-round).
    #[arg(long)]
    min_devices: Option<usize>,
    /// Refuse updates with a larger L2 norm.
    #[arg(long)]
    update_norm_max: Option<f64>,
    /// Check-in window at a round's opening, in ms: selected devices are
    /// drawn among those that asked during it (default: serve's; 0: first
    /// come, first served).
    #[arg(long)]
    selection_window_ms: Option<u64>,
    /// Fraction of devices that attack (the last ones by index), e.g. 0.2.
    #[arg(long)]
    attackers: Option<f64>,
    /// Attacking devices added beyond the honest fleet, e.g. 13 hogs
    /// against 20 honest devices: `--attacker-devices 13 --attack hog`.
    /// Each has its own key and trains on a copy of an honest shard.
    #[arg(long)]
    attacker_devices: Option<usize>,
    /// Stake registered for each added attacker key (default: none, a
    /// fresh key missing from the stake registry).
    #[arg(long)]
    attacker_stake: Option<f64>,
    /// Attackers multiply their corrupted update by this (default 1; 10
    /// for `liar`): `--attack sign-flip --attack-scale 10`.
    #[arg(long)]
    attack_scale: Option<f32>,
    /// Attackers claim N samples in their signed manifest instead of
    /// their honest count (the sample-count lie; composes with every
    /// attack), e.g. 1000000000000.
    #[arg(long, value_name = "N")]
    claim_samples: Option<u64>,
    /// Stake distribution: uniform or zipf:S.
    #[arg(long)]
    stakes: Option<String>,
    /// Time from a round's first selection to its deadline, in ms.
    #[arg(long)]
    round_deadline_ms: Option<u64>,
    /// What attackers do: sign-flip (negated update), scaling (x10),
    /// gaussian (noise, sigma 0.5), label-flip (train on flipped labels),
    /// alie ("a little is enough"), zero (an all-zero update), hog (take
    /// every task offered, download, never upload: the slot is held until
    /// the round's deadline), replay (re-send the update of the first task
    /// in every later task), or liar (sign-flip x10 claiming 10^12
    /// samples; --attack-scale and --claim-samples override either).
    #[arg(long)]
    attack: Option<String>,
    /// Robust aggregation, replacing the preset's combiner and clipping:
    /// mean, median, trimmed-mean, multi-krum, centered-clipping, clip
    /// (adaptive norm clipping + mean).
    #[arg(long)]
    aggregator: Option<String>,
    /// Aggregator weighting and robustness preset, applied before the
    /// other flags: `simulate` (this command's defaults: sqrt stake,
    /// samples linear, 25% share cap, plain mean, min_devices half a
    /// round), `serve` (exactly `fedge-aggregator serve`'s open-network
    /// defaults: sqrt stake, sample claims ignored, 20% share cap,
    /// no weight for unknown keys, adaptive clipping, 20% trimmed mean,
    /// min_devices 2) or `legacy` (serve's defaults before they were made
    /// safe: constant stake, samples linear, no share cap, unknown keys
    /// allowed, plain mean, no norm bound, min_devices 1).
    #[arg(long, value_name = "PRESET")]
    defaults: Option<String>,
    /// Central user-level differential privacy (DP-FedAvg): the noise
    /// multiplier z (noise stddev z x clip bound on the sum of clipped
    /// updates). Needs a plain mean and no other clipping (the `simulate`
    /// preset). The privacy spent is printed and written to results.json.
    #[arg(long, value_name = "Z")]
    dp_noise: Option<f64>,
    /// DP clipping: `adaptive` (Andrew et al. 2021: target quantile 0.5,
    /// learning rate 0.2, from 0.1), `adaptive:INITIAL`, or `fixed:BOUND`.
    #[arg(long, value_name = "SPEC", requires = "dp_noise")]
    dp_clip: Option<String>,
    /// Population the accountant's sampling rate is taken from
    /// (participants per round / population; default: --devices).
    #[arg(long, value_name = "N", requires = "dp_noise")]
    dp_population: Option<u64>,
    /// Delta at which epsilon is reported (default 1e-5).
    #[arg(long, requires = "dp_noise")]
    dp_delta: Option<f64>,
    /// Compress each published model step with this update codec, with
    /// server-side error feedback: devices holding a recent model
    /// download the compressed steps since (bit-exact: they end up with
    /// the server's model). Default `topk:0.02+q8`; `none` publishes
    /// exact models (devices then download the model, or its lossless
    /// XOR delta when smaller). Sets `[strategy] downlink` (a config
    /// file's `[strategy]` table without `downlink` means exact models:
    /// the table starts from serve's strategy defaults).
    #[arg(long, value_name = "CODEC")]
    downlink: Option<String>,
    /// Secure aggregation (SecAgg+, Bell et al. 2020): devices clip their
    /// update to --secagg-clip, quantize and mask it; the aggregator sees
    /// only the round's sum. Sets the plan's codec to dense-f32 and turns
    /// off error feedback, norm bounds, robust combiners and scoring,
    /// which need individual updates. Sizes `[strategy.secagg]` for the
    /// round (degree min(32, n - 1), colluding devices max(1, n/10),
    /// threshold max(T + 1, k/3), survivors_min T + 2, or 70% of n with
    /// --secagg-dp-noise) unless a config file gives one.
    #[arg(long)]
    secagg: bool,
    /// L2 bound devices clip their update to before masking (default 1).
    #[arg(long, requires = "secagg")]
    secagg_clip: Option<f64>,
    /// Devices that drop out of each SecAgg+ round at a stage, as
    /// fractions of the fleet: `keys:0.3,input:0.1` (stages: keys, shares,
    /// input).
    #[arg(long, value_name = "STAGE:FRACTION,...", requires = "secagg")]
    secagg_dropout: Option<String>,
    /// Distributed DP under SecAgg+: each device adds Skellam noise to its
    /// masked update so the round's sum carries noise of stddev Z x the
    /// update's sensitivity (split over the fewest survivors a round
    /// publishes with). The privacy spent (no sampling amplification) is
    /// printed and written to results.json.
    #[arg(long, value_name = "Z", requires = "secagg")]
    secagg_dp_noise: Option<f64>,
    /// Directory for results.json.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Keep the aggregator's state directory (models, database, ledger)
    /// here, for `fedge-aggregator ledger verify`; it must be empty or new.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Validation examples each round's scores are computed on.
    #[arg(long)]
    validation_samples: Option<usize>,
    /// How scores are computed: class-gain (the default: what the update,
    /// as one of the round's n parts of its step, gains on the classes it
    /// improves, the class priors refitted), direct (its loss difference on
    /// all the validation sample), leave-one-out (what the round's mean
    /// step loses without it, the mean renormalised), marginal (what the
    /// step loses without it, the others' parts unchanged) or shapley (the
    /// mean of direct and marginal; twice the evaluations).
    #[arg(long)]
    score_method: Option<String>,
    /// Federated evaluation: evaluation tasks offered per round to devices
    /// without a training slot (0: none). Each device then keeps
    /// --eval-holdout of its shard to evaluate on.
    #[arg(long, value_name = "N")]
    eval_devices: Option<usize>,
    /// Fraction of each device's shard kept as its held-out data when
    /// --eval-devices is set (default 0.1).
    #[arg(long, value_name = "FRACTION")]
    eval_holdout: Option<f64>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl SimConfig {
    /// The configuration `a` asks for: its file (or the defaults) with its
    /// flags applied, checked as far as `--print-config` needs.
    pub fn from_args(a: &SimArgs) -> anyhow::Result<Self> {
        let mut c = Self::load(a.config.as_deref())?;
        if let Some(p) = &a.defaults {
            c.apply_preset(p)?;
        }
        c.apply_flags(a);
        if let Some(m) = &a.score_method {
            c.scoring.method = match m.as_str() {
                "direct" => fedge_aggregator::scoring::ScoreMethod::Direct,
                "leave-one-out" => fedge_aggregator::scoring::ScoreMethod::LeaveOneOut,
                "marginal" => fedge_aggregator::scoring::ScoreMethod::Marginal,
                "shapley" => fedge_aggregator::scoring::ScoreMethod::Shapley,
                "class-gain" => fedge_aggregator::scoring::ScoreMethod::ClassGain,
                o => anyhow::bail!(
                    "--score-method `{o}`: use class-gain, direct, leave-one-out, marginal or shapley"
                ),
            };
        }
        if let Some(s) = &a.strategy {
            c.apply_strategy(s)?;
        }
        c.heterogeneity.validate()?;
        if let Some(agg) = &a.aggregator {
            c.apply_aggregator(agg)?;
        }
        c.apply_dp(a)?;
        c.apply_secagg(a)?;
        anyhow::ensure!(
            (0.0..1.0).contains(&c.attackers),
            "attackers must be in [0, 1), got {}",
            c.attackers
        );
        AttackPlan::of(&c)?;
        Ok(c)
    }

    /// `--defaults`: the aggregator's weighting, combiner, clipping, norm
    /// bound and round minimum as a preset names them.
    fn apply_preset(&mut self, preset: &str) -> anyhow::Result<()> {
        match preset {
            "simulate" => {
                let d = SimConfig::default();
                self.weights = d.weights;
                self.strategy = d.strategy;
                self.min_devices = d.min_devices;
                self.update_norm_max = d.update_norm_max;
            }
            "serve" => {
                let d = fedge_aggregator::config::AggregatorConfig::default();
                self.weights = d.weights;
                self.strategy = d.strategy;
                self.min_devices = Some(d.rounds.min_devices);
                self.update_norm_max = d.update_norm_max;
            }
            "legacy" => {
                // What `serve` ran with before its open-network defaults:
                // the library's permissive defaults.
                self.weights = WeightPolicy::default();
                self.strategy = StrategyConfig::default();
                self.min_devices = Some(1);
                self.update_norm_max = None;
            }
            other => anyhow::bail!("defaults `{other}`: use simulate, serve or legacy"),
        }
        Ok(())
    }

    /// The TOML file at `path`, or the defaults.
    fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        Ok(match path {
            Some(p) => toml::from_str::<SimConfig>(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("config {}", p.display()))?,
            None => SimConfig::default(),
        })
    }

    /// The flags that override a field as they are.
    fn apply_flags(&mut self, a: &SimArgs) {
        let c = self;
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = a.$f.clone() { c.$f = v; })* };
        }
        set!(
            model,
            devices,
            devices_per_round,
            rounds,
            partition,
            data,
            train_samples,
            batch_size,
            local_steps,
            codec,
            local_epochs,
            learning_rate,
            optimizer,
            seed,
            attackers,
            attacker_devices,
            attack,
            stakes,
            round_deadline_ms,
            out_dir
        );
        if a.min_devices.is_some() {
            c.min_devices = a.min_devices;
        }
        if a.downlink.is_some() {
            c.strategy.downlink = a.downlink.clone();
        }
        if a.update_norm_max.is_some() {
            c.update_norm_max = a.update_norm_max;
        }
        if a.selection_window_ms.is_some() {
            c.selection_window_ms = a.selection_window_ms;
        }
        if a.attacker_stake.is_some() {
            c.attacker_stake = a.attacker_stake;
        }
        if a.state_dir.is_some() {
            c.state_dir = a.state_dir.clone();
        }
        if let Some(l) = &a.lora {
            c.lora = Some(LoraConfig {
                rank: l.rank,
                alpha: Some(l.alpha),
                targets: l.targets.clone(),
            });
        }
        if let Some(v) = a.ramp_ms {
            c.ramp_ms = v;
        }
        if let Some(v) = a.aggregators {
            c.aggregators = v;
        }
        if let Some(n) = a.validation_samples {
            c.scoring.validation_samples = n;
        }
        if let Some(n) = a.eval_devices {
            c.evaluation.devices = n;
        }
        if let Some(f) = a.eval_holdout {
            c.eval_holdout = f;
        }

        if a.attack_scale.is_some() {
            c.attack_scale = a.attack_scale;
        }
        if a.claim_samples.is_some() {
            c.claim_samples = a.claim_samples;
        }
        if let Some(v) = a.speed_factors.clone() {
            c.heterogeneity.speed_factors = v;
        }
        if let Some(v) = a.dropout {
            c.heterogeneity.dropout = v;
        }
        if let Some(v) = a.bandwidth_kbps.clone() {
            c.heterogeneity.bandwidth_kbps = v;
        }
    }

    /// `--dp-*`: central DP. The simulation seeds the noise with its seed
    /// so that a run can be repeated (a deployment never does).
    fn apply_dp(&mut self, a: &SimArgs) -> anyhow::Result<()> {
        use fedge_aggregator::privacy::DpClip;
        let Some(z) = a.dp_noise else {
            return Ok(());
        };
        let mut spec = self.strategy.dp.clone().unwrap_or_default();
        spec.noise_multiplier = z;
        spec.population = a.dp_population.unwrap_or(self.devices as u64);
        if let Some(d) = a.dp_delta {
            spec.delta = d;
        }
        spec.noise_seed = Some(self.seed);
        if let Some(clip) = &a.dp_clip {
            let adaptive = |initial| DpClip::Adaptive {
                initial,
                target_quantile: 0.5,
                learning_rate: 0.2,
                count_noise: None,
            };
            spec.clip = match clip.split_once(':') {
                None if clip == "adaptive" => adaptive(0.1),
                Some(("adaptive", v)) => adaptive(
                    v.parse()
                        .with_context(|| format!("--dp-clip `{clip}`: adaptive:INITIAL"))?,
                ),
                Some(("fixed", v)) => DpClip::Fixed {
                    bound: v
                        .parse()
                        .with_context(|| format!("--dp-clip `{clip}`: fixed:BOUND"))?,
                },
                _ => anyhow::bail!(
                    "--dp-clip `{clip}`: use adaptive, adaptive:INITIAL or fixed:BOUND"
                ),
            };
        }
        self.strategy.dp = Some(spec);
        self.strategy
            .validate_dp(self.devices_per_round)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// `--strategy`: the server optimizer, FedProx's mu, or FedBuff.
    fn apply_strategy(&mut self, s: &str) -> anyhow::Result<()> {
        self.strategy.server_opt = server_opt(s)?;
        self.strategy.fedprox_mu = 0.0;
        self.strategy.buffered = None;
        if let Some(mu) = s.strip_prefix("fedprox:") {
            self.strategy.fedprox_mu = mu
                .parse()
                .with_context(|| format!("strategy `{s}`: fedprox:MU needs a number"))?;
        }
        if s == "fedbuff" {
            self.strategy.buffered = Some(Default::default());
        }
        Ok(())
    }

    /// `--aggregator`: the robust combiner (or adaptive clipping), sized for
    /// the expected number of attackers per round.
    fn apply_aggregator(&mut self, agg: &str) -> anyhow::Result<()> {
        use fedge_aggregator::robust::CombineSpec;
        use fedge_aggregator::strategy::ClipSpec;
        let c = self;
        let f = ((c.devices_per_round as f64) * c.attackers).ceil() as usize;
        c.strategy.clip = None;
        c.strategy.combine = match agg {
            "mean" => CombineSpec::Mean,
            "median" => CombineSpec::Median,
            "trimmed-mean" => CombineSpec::TrimmedMean { trim: 0.2 },
            "multi-krum" => CombineSpec::MultiKrum {
                byzantine: f.max(1),
                keep: c.devices_per_round.saturating_sub(f.max(1)).max(1),
            },
            "centered-clipping" => CombineSpec::CenteredClipping { tau: 1.0, iters: 3 },
            "clip" => {
                c.strategy.clip = Some(ClipSpec::AdaptiveMedian { multiplier: 1.0 });
                CombineSpec::Mean
            }
            other => anyhow::bail!(
                "aggregator `{other}`: use mean, median, trimmed-mean, multi-krum, centered-clipping or clip"
            ),
        };
        Ok(())
    }

    /// What running (not printing) the configuration also needs: a fleet
    /// that can fill a round, and a codec that parses.
    pub fn check_runnable(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.devices >= 1 && self.devices_per_round >= 1,
            "devices and devices_per_round must be >= 1"
        );
        anyhow::ensure!(
            self.devices_per_round <= self.devices,
            "devices_per_round ({}) exceeds devices ({})",
            self.devices_per_round,
            self.devices
        );
        if let Some(m) = self.min_devices {
            anyhow::ensure!(
                (1..=self.devices_per_round).contains(&m),
                "min_devices must be in [1, devices_per_round = {}], got {m}",
                self.devices_per_round
            );
        }
        fedge_proto::codec::CodecSpec::parse(&self.codec)
            .with_context(|| format!("codec `{}`", self.codec))?;
        anyhow::ensure!(
            self.eval_holdout > 0.0 && self.eval_holdout < 1.0,
            "eval_holdout must be a fraction in (0, 1), got {}",
            self.eval_holdout
        );
        self.evaluation
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}

/// The server optimizer a `--strategy` name stands for (defaults from
/// Reddi et al. 2021 where they apply).
fn server_opt(s: &str) -> anyhow::Result<ServerOpt> {
    Ok(match s {
        "fedavg" | "fedbuff" => ServerOpt::Avg { lr: 1.0 },
        _ if s.starts_with("fedprox:") => ServerOpt::Avg { lr: 1.0 },
        "fedavgm" => ServerOpt::Momentum { lr: 1.0, beta: 0.9 },
        "fedadam" => ServerOpt::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        "fedyogi" => ServerOpt::Yogi {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        "fedadagrad" => ServerOpt::Adagrad {
            lr: 0.01,
            beta1: 0.0,
            tau: 1e-3,
        },
        o => anyhow::bail!(
            "strategy `{o}`: use fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox:MU or fedbuff"
        ),
    })
}
