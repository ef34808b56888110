//! `fedge-aggregator simulate`: an aggregator and N devices in one process,
//! speaking the real protocol over loopback QUIC through the real device
//! code path (driver, session, tract training), on the shipped data.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedge_aggregator::coordinator::{CoordinatorConfig, Event, RoundOutcome};
use fedge_aggregator::server::{Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::strategy::{ServerOpt, StrategyConfig};
use fedge_aggregator::tls::TlsIdentity;
use fedge_aggregator::weighting::{Transform, WeightPolicy};
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::session::SessionConfig;
use fedge_device::trainer::OnnxTrainer;
use fedge_device::transport::Trust;
use fedge_engine::data::{self, Dataset, Partition};
use fedge_engine::train::exec::TractInference;
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_engine::train::local::evaluate;
use fedge_proto::msg::TrainingPlan;
use fedge_proto::sign::SigningKey;
use fedge_proto::{Limits, ModelBlob};
use prost::Message;
use serde::{Deserialize, Serialize};

/// A simulation, as written in TOML (every field has a default; flags
/// override the file).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Zoo model (mlp, cnn, small_cnn, char) or a path to an ONNX file.
    pub model: String,
    /// mnist or shakespeare.
    pub data: String,
    /// iid, dirichlet:ALPHA, shards:N, or role (Shakespeare: one device
    /// per speaking role, the roles with the most lines).
    pub partition: String,
    pub devices: usize,
    pub devices_per_round: usize,
    pub rounds: u64,
    pub local_epochs: u32,
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub momentum: f32,
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
    /// Fraction of devices that attack (the last ones by index).
    pub attackers: f64,
    /// sign-flip, scaling, gaussian, label-flip or alie.
    pub attack: String,
    /// Device heterogeneity (simulated by delays around real training).
    pub heterogeneity: Heterogeneity,
    /// Where results.json goes.
    pub out_dir: PathBuf,
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

    fn is_uniform(&self) -> bool {
        self.speed_factors.iter().all(|f| *f == 1.0)
            && self.dropout == 0.0
            && self.bandwidth_kbps.iter().all(|b| *b == 0.0)
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "mlp".into(),
            data: "mnist".into(),
            partition: "dirichlet:0.5".into(),
            devices: 20,
            devices_per_round: 10,
            rounds: 20,
            local_epochs: 2,
            local_steps: 0,
            batch_size: 32,
            learning_rate: 0.05,
            momentum: 0.9,
            codec: "topk:0.1+q8".into(),
            error_feedback: true,
            stakes: "zipf:1.0".into(),
            weights: WeightPolicy {
                stake: Transform::Sqrt,
                samples: Transform::Linear,
                min_stake: 0.0,
                max_share: 0.25,
                allow_unknown: false,
            },
            strategy: StrategyConfig::default(),
            train_samples: 8000,
            held_out: 2000,
            round_deadline_ms: 30_000,
            seed: 1,
            attackers: 0.0,
            attack: "sign-flip".into(),
            heterogeneity: Heterogeneity::default(),
            out_dir: PathBuf::from("results"),
        }
    }
}

#[derive(clap::Args)]
pub struct SimArgs {
    /// TOML file with a [`SimConfig`]; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Zoo model name (mlp, cnn, small_cnn, char) or an ONNX file.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    devices: Option<usize>,
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
    #[arg(long)]
    seed: Option<u64>,
    /// Fraction of devices that attack, e.g. 0.2.
    #[arg(long)]
    attackers: Option<f64>,
    /// Stake distribution: uniform or zipf:S.
    #[arg(long)]
    stakes: Option<String>,
    /// Time from a round's first selection to its deadline, in ms.
    #[arg(long)]
    round_deadline_ms: Option<u64>,
    /// sign-flip, scaling, gaussian, label-flip or alie.
    #[arg(long)]
    attack: Option<String>,
    /// Robust aggregation: mean, median, trimmed-mean, multi-krum, centered-clipping, clip.
    #[arg(long)]
    aggregator: Option<String>,
    /// Directory for results.json.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    round: u64,
    participants: usize,
    accuracy: f64,
    loss: f64,
    upload_bytes: u64,
    download_bytes: u64,
    cumulative_upload_bytes: u64,
    seconds: f64,
}

fn zoo(name: &str, vocab: usize) -> anyhow::Result<Vec<u8>> {
    Ok(match name {
        "mlp" => fedge_engine::zoo::mlp(1).encode_to_vec(),
        "cnn" => fedge_engine::zoo::cnn(2).encode_to_vec(),
        "small_cnn" => fedge_engine::zoo::small_cnn(3).encode_to_vec(),
        "char" => fedge_engine::zoo::char_model(4, vocab).encode_to_vec(),
        path => std::fs::read(path)
            .with_context(|| format!("model `{path}`: not a zoo name nor a readable file"))?,
    })
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

pub fn run(a: SimArgs) -> anyhow::Result<()> {
    let mut c = match &a.config {
        Some(p) => toml::from_str::<SimConfig>(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("config {}", p.display()))?,
        None => SimConfig::default(),
    };
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
        seed,
        attackers,
        attack,
        stakes,
        round_deadline_ms,
        out_dir
    );
    if let Some(v) = a.speed_factors.clone() {
        c.heterogeneity.speed_factors = v;
    }
    if let Some(v) = a.dropout {
        c.heterogeneity.dropout = v;
    }
    if let Some(v) = a.bandwidth_kbps.clone() {
        c.heterogeneity.bandwidth_kbps = v;
    }
    if let Some(s) = &a.strategy {
        c.strategy.server_opt = server_opt(s)?;
        c.strategy.fedprox_mu = 0.0;
        c.strategy.buffered = None;
        if let Some(mu) = s.strip_prefix("fedprox:") {
            c.strategy.fedprox_mu = mu
                .parse()
                .with_context(|| format!("strategy `{s}`: fedprox:MU needs a number"))?;
        }
        if s == "fedbuff" {
            c.strategy.buffered = Some(Default::default());
        }
    }
    c.heterogeneity.validate()?;
    if let Some(agg) = &a.aggregator {
        use fedge_aggregator::robust::CombineSpec;
        use fedge_aggregator::strategy::ClipSpec;
        let f = ((c.devices_per_round as f64) * c.attackers).ceil() as usize;
        c.strategy.clip = None;
        c.strategy.combine = match agg.as_str() {
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
    }
    anyhow::ensure!(
        (0.0..1.0).contains(&c.attackers),
        "attackers must be in [0, 1)"
    );
    Attack::parse(&c.attack)?;
    if a.print_config {
        print!("{}", toml::to_string(&c)?);
        return Ok(());
    }
    anyhow::ensure!(
        c.devices >= 1 && c.devices_per_round >= 1,
        "devices and devices_per_round must be >= 1"
    );
    anyhow::ensure!(
        c.devices_per_round <= c.devices,
        "devices_per_round ({}) exceeds devices ({})",
        c.devices_per_round,
        c.devices
    );
    fedge_proto::codec::CodecSpec::parse(&c.codec)
        .with_context(|| format!("codec `{}`", c.codec))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(simulate(c))
}

/// Training data, held-out data, and the devices' shards.
fn load_data(c: &SimConfig, context: usize) -> anyhow::Result<(Dataset, Dataset, Vec<Vec<usize>>)> {
    let dir = data::shipped_data_dir();
    if c.partition == "role" {
        anyhow::ensure!(
            c.data == "shakespeare",
            "partition `role` splits a play by speaking role: use it with --data shakespeare"
        );
        let text = data::load_text(&dir.join("tinyshakespeare/input.txt"))?;
        let vocab = data::Vocab::of(&text);
        let per_role = c.train_samples.div_ceil(c.devices);
        let split = data::split_by_role(&text, &vocab, context, 7, c.devices, 0.1, per_role)?;
        // At most `held_out` samples, spread evenly over every role's tail.
        let n = split.test.len();
        let keep: Vec<usize> = (0..c.held_out.min(n))
            .map(|i| i * n / c.held_out.min(n))
            .collect();
        println!(
            "one device per speaking role: {} ... {} ({} training windows, {} held out)",
            split.roles.first().map(String::as_str).unwrap_or("-"),
            split.roles.last().map(String::as_str).unwrap_or("-"),
            split.train.len(),
            keep.len()
        );
        return Ok((split.train, split.test.subset(&keep), split.shards));
    }
    let partition = Partition::parse(&c.partition)?;
    let (train, test) = load_split(c, &dir, context)?;
    let shards = partition.split(&train, c.devices, c.seed);
    Ok((train, test, shards))
}

fn load_split(
    c: &SimConfig,
    dir: &std::path::Path,
    context: usize,
) -> anyhow::Result<(Dataset, Dataset)> {
    match c.data.as_str() {
        "mnist" => {
            let d = data::load_mnist(dir)?;
            anyhow::ensure!(
                c.train_samples + c.held_out <= d.len(),
                "not enough MNIST samples"
            );
            Ok((
                d.slice(0..c.train_samples),
                d.slice(d.len() - c.held_out..d.len()),
            ))
        }
        "shakespeare" => {
            let text = data::load_text(&dir.join("tinyshakespeare/input.txt"))?;
            let vocab = data::Vocab::of(&text);
            let d = data::char_windows(&text, &vocab, context, 7)?;
            anyhow::ensure!(
                c.train_samples + c.held_out <= d.len(),
                "not enough text windows"
            );
            Ok((
                d.slice(0..c.train_samples),
                d.slice(d.len() - c.held_out..d.len()),
            ))
        }
        other => anyhow::bail!("data `{other}`: use mnist or shakespeare"),
    }
}

async fn simulate(c: SimConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let vocab = if c.data == "shakespeare" { 65 } else { 0 };
    let blob = import_onnx(&zoo(&c.model, vocab)?)?;
    let graph = ModelGraph::from_blob(&blob)?;
    let context = graph.sample_shape().first().copied().unwrap_or(1);
    let (train, test, shards) = load_data(&c, context)?;

    let work = tempfile::tempdir()?;
    let state = work.path().join("aggregator");
    std::fs::create_dir_all(&state)?;
    let identity = TlsIdentity::load_or_create(&state)?;
    let fp = identity.fingerprint();
    let keys: Vec<SigningKey> = (0..c.devices)
        .map(|i| {
            let seed = blake3::hash(format!("fedge-sim-device-{}-{i}", c.seed).as_bytes());
            SigningKey::from_bytes(seed.as_bytes())
        })
        .collect();
    let stake_values = stakes(&c.stakes, c.devices)?;
    let stake_file = state.join("stakes.txt");
    let lines: String = keys
        .iter()
        .zip(&stake_values)
        .map(|(k, s)| format!("{} {s}\n", hex::encode(k.verifying_key().to_bytes())))
        .collect();
    std::fs::write(&stake_file, lines)?;

    let plan = TrainingPlan {
        local_epochs: c.local_epochs,
        local_steps: c.local_steps,
        batch_size: c.batch_size,
        learning_rate: c.learning_rate,
        momentum: c.momentum,
        codec: c.codec.clone(),
        error_feedback: c.error_feedback,
        ..TrainingPlan::default()
    };
    let server_cfg = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        coordinator: CoordinatorConfig {
            devices_per_round: c.devices_per_round,
            min_devices: (c.devices_per_round / 2).max(1),
            rounds: c.rounds,
            round_deadline: Duration::from_millis(c.round_deadline_ms),
            retry_window: (Duration::from_millis(200), Duration::from_millis(600)),
            plan,
            weights: c.weights.clone(),
            strategy: c.strategy.clone(),
            max_sessions: c.devices + 16,
            seed: c.seed,
            ..CoordinatorConfig::default()
        },
        finish_grace: Some(Duration::from_secs(30)),
        stakes: Some(stake_file),
        // Every device shares one process: a generous per-connection rate.
        rate_per_sec: 10_000.0,
        rate_burst: 20_000.0,
        ..ServerConfig::default()
    };
    let mut server = Server::bind(server_cfg, &identity, Store::open(&state).await?)?;
    let addr = server.local_addr()?;
    let mut events = server.observe();
    let metrics = server.metrics();
    let serving = tokio::spawn(server.run(blob.clone(), std::future::pending()));

    println!(
        "simulating {} devices ({} per round, {} rounds) training {} on {} ({} partition), codec {}, over QUIC at {addr}",
        c.devices, c.devices_per_round, c.rounds, c.model, c.data, c.partition, c.codec
    );
    let n_attackers = ((c.devices as f64) * c.attackers).round() as usize;
    if n_attackers > 0 {
        println!(
            "{n_attackers} of {} devices attack ({})",
            c.devices, c.attack
        );
    }
    let colluders: Colluders = Default::default();
    let mut devices = Vec::new();
    for (i, (key, shard)) in keys.into_iter().zip(&shards).enumerate() {
        let cfg = DriverConfig {
            session: SessionConfig {
                seed: c.seed.wrapping_add(i as u64),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(3),
                ..SessionConfig::default()
            },
            ..DriverConfig::new(addr, Trust::Pinned(fp))
        };
        let malicious = i >= c.devices - n_attackers;
        let mut local = train.subset(shard);
        let attack = Attack::parse(&c.attack)?;
        if malicious && attack == Attack::LabelFlip {
            let k = local.classes as i64;
            for l in &mut local.labels {
                *l = k - 1 - *l;
            }
        }
        let honest = OnnxTrainer::new(local, c.seed.wrapping_add(i as u64));
        let mut trainer: Box<dyn fedge_device::trainer::Trainer> =
            if malicious && attack != Attack::LabelFlip {
                Box::new(Attacker {
                    inner: honest,
                    attack,
                    seed: c.seed.wrapping_add(1000 + i as u64),
                    colluders: Arc::clone(&colluders),
                })
            } else {
                Box::new(honest)
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
        devices.push(tokio::spawn(run_device(cfg, key, trainer)));
    }

    let mut inf = TractInference::new(&graph, 250)?;
    inf.load(&blob.params.values)?;
    let e0 = evaluate(&inf, &test)?;
    let bar = indicatif::ProgressBar::new(c.rounds).with_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] [{bar:30}] round {pos}/{len} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    say(
        &bar,
        format!(
            "{:>5} {:>12} {:>9} {:>8} {:>12} {:>13} {:>7}",
            "round", "participants", "accuracy", "loss", "upload_B", "download_B", "secs"
        ),
    );
    say(
        &bar,
        format!(
            "{:>5} {:>12} {:>9.4} {:>8.4} {:>12} {:>13} {:>7.1}",
            0, "-", e0.accuracy, e0.loss, 0, 0, 0.0
        ),
    );
    let mut rows = Vec::new();
    let (mut up, mut cum_up, mut participants) = (0u64, 0u64, 0usize);
    let mut last_out = metrics.bytes_out.get();
    let mut final_version = None;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(600), events.recv())
        .await
        .context("no progress for 10 minutes")?
    {
        match e {
            Event::UpdateAccepted { payload_bytes, .. } => {
                up += payload_bytes;
                participants += 1;
            }
            Event::RoundClosed {
                accepted,
                outcome: RoundOutcome::Aborted,
                round_id,
                ..
            } => {
                say(
                    &bar,
                    format!("{round_id:>5} aborted with {accepted} updates"),
                );
                bar.inc(1);
                up = 0;
                participants = 0;
            }
            Event::ModelPublished {
                round_id,
                blob: bytes,
                ..
            } => {
                let m = ModelBlob::decode(&bytes, &Limits::default())?;
                inf.load(&m.params.values)?;
                let ev = evaluate(&inf, &test)?;
                let out_now = metrics.bytes_out.get();
                cum_up += up;
                let row = Row {
                    round: rows.len() as u64 + 1,
                    participants,
                    accuracy: ev.accuracy,
                    loss: ev.loss,
                    upload_bytes: up,
                    download_bytes: out_now - last_out,
                    cumulative_upload_bytes: cum_up,
                    seconds: started.elapsed().as_secs_f64(),
                };
                let _ = round_id;
                say(
                    &bar,
                    format!(
                        "{:>5} {:>12} {:>9.4} {:>8.4} {:>12} {:>13} {:>7.1}",
                        row.round,
                        row.participants,
                        row.accuracy,
                        row.loss,
                        row.upload_bytes,
                        row.download_bytes,
                        row.seconds
                    ),
                );
                bar.inc(1);
                bar.set_message(format!("accuracy {:.4}", ev.accuracy));
                last_out = out_now;
                up = 0;
                participants = 0;
                rows.push(row);
            }
            Event::Finished { final_version: v } => {
                final_version = Some(v);
                break;
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    let mut failed = 0;
    // One deadline for all devices to fetch the final model and leave.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    for d in devices {
        match tokio::time::timeout_at(until, d).await {
            Ok(Ok(Ok(_))) => {}
            Ok(other) => {
                failed += 1;
                tracing::warn!(?other, "a device did not finish cleanly");
            }
            Err(_) => failed += 1, // still running at the deadline: dropped
        }
    }
    let served = serving.await??;
    let dense_bytes_per_update = 4 * blob.params.values.len() as u64;
    let updates: usize = rows.iter().map(|r| r.participants).sum();
    let dense_total = dense_bytes_per_update * updates as u64;
    let final_acc = rows.last().map(|r| r.accuracy).unwrap_or(e0.accuracy);
    println!(
        "final accuracy {:.4} after {} rounds; upload {} bytes vs {} dense f32 ({:.1}x smaller); {} failed sessions; {:.1} s",
        final_acc,
        served.rounds_published,
        cum_up,
        dense_total,
        dense_total as f64 / cum_up.max(1) as f64,
        failed,
        started.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(&c.out_dir)
        .with_context(|| format!("creating {}", c.out_dir.display()))?;
    let results = serde_json::json!({
        "config": c,
        "initial": {"accuracy": e0.accuracy, "loss": e0.loss},
        "rounds": rows,
        "final_accuracy": final_acc,
        "final_version": final_version.map(|v| v.to_hex()),
        "upload_bytes": cum_up,
        "dense_f32_upload_bytes": dense_total,
        "failed_sessions": failed,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let path = c.out_dir.join("results.json");
    fedge_proto::io::write_atomic(
        &path,
        serde_json::to_string_pretty(&results)?.as_bytes(),
        None,
    )?;
    println!("results written to {}", path.display());
    let png = c.out_dir.join("accuracy.png");
    let title = format!(
        "{} on {}, {} devices ({} per round), {}, codec {}",
        c.model, c.data, c.devices, c.devices_per_round, c.partition, c.codec
    );
    match plot(&png, e0.accuracy, &rows, &title) {
        Ok(()) => println!("plot written to {}", png.display()),
        Err(e) => tracing::warn!(error = %e, "no plot"),
    }
    Ok(())
}

/// Print a line above the progress bar (also when stdout is not a terminal
/// and the bar is hidden).
fn say(bar: &indicatif::ProgressBar, line: String) {
    bar.suspend(|| println!("{line}"));
}

/// Attacks a malicious device runs on its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
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
}

impl Attack {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "sign-flip" => Attack::SignFlip,
            "scaling" => Attack::Scaling,
            "gaussian" => Attack::Gaussian,
            "label-flip" => Attack::LabelFlip,
            "alie" => Attack::Alie,
            o => {
                anyhow::bail!("attack `{o}`: use sign-flip, scaling, gaussian, label-flip or alie")
            }
        })
    }
}

/// A device of a given speed, link and reliability around a real trainer
/// (see [`Heterogeneity`]). Runs on the driver's blocking thread, so its
/// waits hold no async worker.
struct Profiled {
    inner: Box<dyn fedge_device::trainer::Trainer>,
    speed: f64,
    dropout: f64,
    /// Link rate (0: no cap).
    bytes_per_sec: f64,
    deadline: Duration,
    seed: u64,
}

impl fedge_device::trainer::Trainer for Profiled {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<fedge_device::TrainOutput> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ round_id);
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
}

/// Honest updates the colluding attackers have computed, by round.
type Colluders = Arc<Mutex<HashMap<u64, Vec<Vec<f32>>>>>;

/// A device that trains honestly and then corrupts its update.
struct Attacker {
    inner: OnnxTrainer,
    attack: Attack,
    seed: u64,
    colluders: Colluders,
}

impl fedge_device::trainer::Trainer for Attacker {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<fedge_device::TrainOutput> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut out = self.inner.train(round_id, model, plan)?;
        match self.attack {
            Attack::SignFlip => out.delta.iter_mut().for_each(|d| *d = -*d),
            Attack::Scaling => out.delta.iter_mut().for_each(|d| *d *= 10.0),
            Attack::Gaussian => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ round_id);
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
        }
        Ok(out)
    }
}

/// accuracy.png: held-out accuracy against the round and against the
/// cumulative upload (MB).
fn plot(path: &std::path::Path, initial: f64, rows: &[Row], title: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;
    static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
    // Registering twice (a second simulation in one process) is harmless.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(550);
    let mut by_round = vec![(0.0, initial)];
    by_round.extend(rows.iter().map(|r| (r.round as f64, r.accuracy)));
    let mut by_bytes = vec![(0.0, initial)];
    by_bytes.extend(
        rows.iter()
            .map(|r| (r.cumulative_upload_bytes as f64 / 1e6, r.accuracy)),
    );
    for (area, series, xlabel) in [
        (&left, &by_round, "round"),
        (&right, &by_bytes, "cumulative upload (MB)"),
    ] {
        let x_max = series.iter().map(|p| p.0).fold(1e-9, f64::max);
        let mut chart = ChartBuilder::on(area)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc(xlabel)
            .y_desc("held-out accuracy")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(series.iter().copied(), &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(series.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
