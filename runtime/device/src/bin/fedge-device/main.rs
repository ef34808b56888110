//! `fedge-device`: a federated learning device.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod bench;
mod collect;

use bench::{BenchArgs, bench};
use collect::{CollectArgs, collect};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_device::dataspec::{DataSpec, parse_range};
use fedge_device::driver::{DriverConfig, run_device};
use fedge_device::identity;
use fedge_device::policy;
use fedge_device::session::SessionConfig;
use fedge_device::trainer::{KnownUpdate, Trainer};
use fedge_device::transport::{QuicTiming, Trust, parse_fingerprint};
use fedge_engine::data::Dataset;
use fedge_engine::train::exec::{Batch, TractInference};
use fedge_engine::train::gpu::{ExecutorKind, select_executor};
use fedge_engine::train::import::{ModelGraph, export_onnx, import_onnx};
use fedge_engine::train::local;
use fedge_engine::train::lora;
use fedge_engine::trainer::{OnnxTrainer, compile_options};
use fedge_proto::msg::{Loss, Optimizer, TrainingPlan};
use fedge_proto::{Limits, ModelBlob};

/// A training step's large tensors in mappings reused from step to step,
/// not in the C heap (see `fedge_engine::alloc`).
#[global_allocator]
static ALLOC: fedge_engine::alloc::StepAlloc = fedge_engine::alloc::StepAlloc;

#[derive(Parser)]
#[command(
    name = "fedge-device",
    version,
    about = "A fedge device: trains locally and sends signed updates to an aggregator over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join an aggregator's rounds until it finishes.
    Run(RunArgs),
    /// Train a model alone on local data and evaluate it on held-out data.
    Train(TrainArgs),
    /// Run a model on a few samples and print its predictions.
    Infer(InferArgs),
    /// Benchmark training steps (MLP and CNN, batch 32 and 64) and write JSON.
    Bench(BenchArgs),
    /// Read an MPU-6050 IMU over Linux I2C into labelled windows in the
    /// sample store (train on them with `--data imu:STORE`).
    Collect(CollectArgs),
    /// Check a reward proof (`fedge-aggregator ledger proof` JSON) offline:
    /// the reward is in the round's reward root. With --root, also that the
    /// root is the published one; with --state-dir, that the proof is this
    /// device's.
    VerifyReward {
        /// The proof file.
        proof: PathBuf,
        /// The round's published reward root (hex, from `ledger export`).
        #[arg(long)]
        root: Option<String>,
        /// The aggregator's ledger key (hex, its `ledger.pub`; `ledger
        /// export` prints it): the proof's signed record must verify under
        /// it and carry the proof's root and reward, so no published root
        /// is needed.
        #[arg(long, value_name = "HEX")]
        ledger_key: Option<String>,
        /// This device's state directory: the proof must name its key.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Print this device's public key (creates the identity if needed).
    Identity {
        #[arg(long, default_value = "fedge-device-state")]
        state_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Aggregator address, host:port.
    #[arg(long)]
    aggregator: String,
    /// Executor for local training: cpu (tract), gpu (wgpu; training fails
    /// without a usable GPU) or auto (a hardware GPU when one is usable,
    /// else tract with a warning).
    #[arg(long, default_value = "cpu")]
    executor: ExecutorKind,
    /// CPU threads for the training step's matrix products (1 to 256; the
    /// GPU executor ignores it). More threads train faster on a device
    /// with idle cores and compete with its other work.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// SHA-256 fingerprint of the aggregator's certificate (printed by
    /// `fedge-aggregator fingerprint`).
    #[arg(long, conflicts_with = "trust_on_first_use")]
    pin: Option<String>,
    /// Pin whatever certificate the aggregator shows first (stored in the
    /// state directory). Only for networks you trust.
    #[arg(long)]
    trust_on_first_use: bool,
    /// State directory: device key, pinned fingerprint, models.
    #[arg(long, default_value = "fedge-device-state")]
    state_dir: PathBuf,
    /// TLS server name to present.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Local training data: mnist[:DIR], shakespeare[:FILE], text:FILE,
    /// idx:IMAGES,LABELS or imu:STORE_DIR (windows from `collect`).
    #[arg(long, conflicts_with = "known_update")]
    data: Option<String>,
    /// Use samples START..END of the data.
    #[arg(long, requires = "data")]
    range: Option<String>,
    /// Keep samples START..END of the data as held-out data for the
    /// aggregator's evaluation tasks (never trained on: keep it out of
    /// --range). Without it the device declines evaluation tasks.
    #[arg(long, requires = "data", value_name = "START..END")]
    holdout: Option<String>,
    /// Send a known update instead of training: delta = VALUE on every
    /// parameter (protocol checks whose aggregate is hand-computable).
    #[arg(long, value_name = "VALUE")]
    known_update: Option<f32>,
    /// Sample count reported with --known-update.
    #[arg(long, default_value_t = 1)]
    samples: u64,
    /// Seed for this device's randomness (shuffling, backoff jitter).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Heartbeat interval while connected, in ms.
    #[arg(long, default_value_t = 15_000)]
    heartbeat_ms: u64,
    /// Give up after this many failed connection attempts in a row (0: never).
    #[arg(long, default_value_t = 20)]
    reconnect_attempts: u32,
    /// QUIC keepalive interval, in ms.
    #[arg(long, default_value_t = 5_000)]
    keepalive_ms: u64,
    /// Wait a random time up to this before the first connection, in ms,
    /// so devices started together do not connect as one burst (the
    /// aggregator paces a burst away anyway, telling each when to come
    /// back; 0: connect at once).
    #[arg(long, default_value_t = 1_000)]
    first_connect_jitter_ms: u64,
    /// Drop a connection that heard nothing for this long, in ms.
    #[arg(long, default_value_t = 60_000)]
    idle_timeout_ms: u64,
    /// Take tasks only while on external power (plugged in or charging).
    #[arg(long)]
    require_charging: bool,
    /// Take tasks only while the battery holds at least PERCENT (devices
    /// without a battery always pass).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    battery_floor: Option<u8>,
    /// The Linux power-supply class the policy reads.
    #[arg(long, default_value = fedge_device::policy::POWER_SUPPLY_ROOT)]
    power_supply_root: PathBuf,
    /// How often to check the policy again, in ms.
    #[arg(long, default_value_t = 60_000)]
    eligibility_check_ms: u64,
}

#[derive(clap::Args)]
struct ModelData {
    /// Model: an ONNX file (weights as initializers) or a .fedge blob.
    #[arg(long)]
    model: PathBuf,
    /// Data: mnist[:DIR], shakespeare[:FILE], text:FILE, idx:IMAGES,LABELS
    /// or imu:STORE_DIR.
    #[arg(long, default_value = "mnist")]
    data: String,
    /// For text: a window starts every STRIDE characters.
    #[arg(long, default_value_t = 7)]
    stride: usize,
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    md: ModelData,
    /// Training samples.
    #[arg(long, default_value = "0..8000")]
    train: String,
    /// Held-out samples.
    #[arg(long, default_value = "8000..10000")]
    test: String,
    /// For text: held-out windows start every N characters (default:
    /// --stride), so that a model trained on windows at another stride
    /// is measured on the same held-out windows.
    #[arg(long, value_name = "N")]
    test_stride: Option<usize>,
    /// Epochs to train (0: evaluate the model as given, one row for epoch 0).
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    #[arg(long, default_value_t = 32)]
    batch: u32,
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Multiply the learning rate by this after each epoch.
    #[arg(long, default_value_t = 1.0)]
    lr_decay: f32,
    /// sgd, adam or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Parameter-name patterns to keep frozen (`*` wildcards), repeatable.
    #[arg(long)]
    freeze: Vec<String>,
    /// Train LoRA adapters on the frozen model instead of its weights:
    /// `rank=R,alpha=A,targets=PATTERN` (`targets` repeatable, `*`
    /// wildcards over MatMul/Gemm weight names; alpha defaults to the
    /// rank). The adapters are seeded by --seed.
    #[arg(long, value_name = "SPEC")]
    lora: Option<fedge_proto::msg::LoraSpec>,
    /// With --out FILE.onnx: fold the LoRA adapters into the weights
    /// (`W + (alpha/rank) A B`) and write the model as it was exported,
    /// with no adapter nodes. Without it the adapters are written as
    /// separate initializers (plain ONNX either way).
    #[arg(long, requires = "out")]
    merge: bool,
    /// Executor: cpu (tract), gpu (wgpu; an error without a GPU) or auto
    /// (a hardware GPU when one is usable, else tract with a warning).
    #[arg(long, default_value = "cpu")]
    executor: ExecutorKind,
    /// CPU threads for the training step's matrix products (1 to 256; the
    /// GPU executor ignores it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the trained model here (.onnx or .fedge).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write per-epoch results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct InferArgs {
    #[command(flatten)]
    md: ModelData,
    /// Samples to run.
    #[arg(long, default_value = "8000..8010")]
    range: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Identity { state_dir } => {
            let key = identity::load_or_create(&state_dir)?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            Ok(())
        }
        Cmd::VerifyReward {
            proof,
            root,
            ledger_key,
            state_dir,
        } => {
            let text =
                std::fs::read(&proof).with_context(|| format!("reading {}", proof.display()))?;
            let device = match &state_dir {
                Some(d) => Some(hex::encode(
                    identity::load_or_create(d)?.verifying_key().to_bytes(),
                )),
                None => None,
            };
            let p = fedge_device::reward::verify_proof(
                &text,
                device.as_deref(),
                root.as_deref(),
                ledger_key.as_deref(),
            )?;
            if ledger_key.is_some() {
                println!("the round's record is signed by the ledger key and carries this root");
            }
            println!(
                "reward proof ok: device {} earned {} in round {} (leaf {} of {}, root {})",
                hex::encode(p.device),
                p.reward,
                p.round_id,
                p.leaf_index,
                p.tree_size,
                hex::encode(p.root)
            );
            Ok(())
        }
        Cmd::Run(a) => run(a),
        Cmd::Train(a) => train(a),
        Cmd::Infer(a) => infer(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Collect(a) => collect(a),
    }
}

fn load_model(path: &Path) -> anyhow::Result<ModelBlob> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "fedge") {
        Ok(ModelBlob::decode(&bytes, &Limits::default())
            .with_context(|| format!("model {}", path.display()))?)
    } else {
        Ok(import_onnx(&bytes).with_context(|| format!("model {}", path.display()))?)
    }
}

fn load_data(md: &ModelData, graph: &ModelGraph) -> anyhow::Result<Dataset> {
    load_data_at(md, graph, md.stride)
}

/// [`load_data`] with text windows every `stride` characters.
fn load_data_at(md: &ModelData, graph: &ModelGraph, stride: usize) -> anyhow::Result<Dataset> {
    let spec = DataSpec::parse(&md.data)?;
    let context = graph.sample_shape().first().copied().unwrap_or(1);
    let data = spec.load(context, stride)?;
    anyhow::ensure!(
        data.sample_shape == graph.sample_shape(),
        "data samples are shaped {:?}, the model takes {:?}",
        data.sample_shape,
        graph.sample_shape()
    );
    Ok(data)
}

fn subset(data: &Dataset, range: &str) -> anyhow::Result<Dataset> {
    let r = parse_range(range)?;
    anyhow::ensure!(
        r.end <= data.len(),
        "range {range} is past the {} samples available",
        data.len()
    );
    Ok(data.slice(r))
}

fn optimizer(name: &str) -> anyhow::Result<Optimizer> {
    Ok(match name {
        "sgd" => Optimizer::Sgd,
        "adam" => Optimizer::Adam,
        "adamw" => Optimizer::AdamW,
        o => anyhow::bail!("optimizer `{o}`: expected sgd, adam or adamw"),
    })
}

#[derive(serde::Serialize)]
struct EpochRow {
    epoch: u32,
    lr: f32,
    train_loss: f64,
    test_accuracy: f64,
    test_loss: f64,
    seconds: f64,
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let mut blob = load_model(&a.md.model)?;
    let total_params = blob.params.values.len();
    if let Some(spec) = &a.lora {
        blob = lora::apply(&blob, spec, a.seed)
            .with_context(|| format!("adding LoRA adapters ({spec})"))?;
        println!(
            "LoRA {spec}: {} adapter parameters train, the model's {total_params} are frozen",
            blob.params.values.len()
        );
    }
    let graph = ModelGraph::from_blob(&blob)?;
    let data = load_data(&a.md, &graph)?;
    let train = subset(&data, &a.train)?;
    let test = match a.test_stride {
        Some(stride) => subset(&load_data_at(&a.md, &graph, stride)?, &a.test)?,
        None => subset(&data, &a.test)?,
    };
    let mut plan = TrainingPlan {
        local_epochs: 1,
        batch_size: a.batch,
        learning_rate: a.lr,
        optimizer: optimizer(&a.optimizer)?,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        loss: Loss::SoftmaxCrossEntropy,
        freeze: a.freeze.clone(),
        lora: a.lora.clone(),
        ..TrainingPlan::default()
    };
    let opts = fedge_engine::train::compile::CompileOptions {
        threads: usize::from(a.threads),
        ..compile_options(&plan)
    };
    let mut ex = select_executor(a.executor, &graph, opts)?;
    ex.load(&blob.params.values)?;
    let mut inf = TractInference::new(&graph, 250)?;
    let counts = test.label_counts();
    let majority = *counts.iter().max().unwrap_or(&0) as f64 / test.len() as f64;
    println!(
        "model {} ({} parameters), {} training and {} held-out samples, most-frequent-label baseline {:.4}",
        a.md.model.display(),
        blob.params.values.len(),
        train.len(),
        test.len(),
        majority
    );
    if a.threads > 1 && ex.name() == "tract-cpu" {
        println!("executor {} on {} threads", ex.name(), a.threads);
    } else {
        println!("executor {}", ex.name());
    }
    println!(
        "{:>5} {:>9} {:>10} {:>9} {:>9} {:>7}",
        "epoch", "lr", "train_loss", "test_acc", "test_loss", "secs"
    );
    let mut rows = Vec::new();
    if a.epochs == 0 {
        inf.load(&blob.params.values)?;
        let e = local::evaluate(&inf, &test)?;
        println!(
            "{:>5} {:>9} {:>10} {:>9.4} {:>9.4} {:>7}",
            0, "-", "-", e.accuracy, e.loss, "-"
        );
    }
    for epoch in 1..=a.epochs {
        let t = Instant::now();
        let bar = indicatif::ProgressBar::new((train.len() / a.batch as usize) as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} steps, loss {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_prefix(epoch.to_string());
        let stats = local::train(
            ex.as_mut(),
            &train,
            &plan,
            a.seed.wrapping_add(u64::from(epoch)),
            |s, _, l| {
                bar.set_position(s);
                if s % 20 == 0 {
                    bar.set_message(format!("{l:.4}"));
                }
            },
        )?;
        bar.finish_and_clear();
        inf.load(&ex.params()?)?;
        let e = local::evaluate(&inf, &test)?;
        let row = EpochRow {
            epoch,
            lr: plan.learning_rate,
            train_loss: stats.mean_loss,
            test_accuracy: e.accuracy,
            test_loss: e.loss,
            seconds: t.elapsed().as_secs_f64(),
        };
        println!(
            "{:>5} {:>9.5} {:>10.4} {:>9.4} {:>9.4} {:>7.1}",
            row.epoch, row.lr, row.train_loss, row.test_accuracy, row.test_loss, row.seconds
        );
        rows.push(row);
        plan.learning_rate *= a.lr_decay;
    }
    if let Some(out) = &a.out {
        let trained = ModelBlob {
            onnx_graph: blob.onnx_graph.clone(),
            params: fedge_proto::Params::new(blob.params.layout.clone(), ex.params()?)?,
        };
        let bytes = if out.extension().is_some_and(|e| e == "fedge") {
            anyhow::ensure!(!a.merge, "--merge writes ONNX: name the output FILE.onnx");
            trained.encode().to_vec()
        } else if a.merge {
            lora::merge(&trained).context("merging the LoRA adapters")?
        } else {
            export_onnx(&trained)?
        };
        fedge_proto::io::write_atomic(out, &bytes, None)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("trained model written to {}", out.display());
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "model": a.md.model.display().to_string(),
            "parameters": blob.params.values.len(),
            "train_samples": train.len(),
            "test_samples": test.len(),
            "majority_baseline": majority,
            "epochs": rows,
        });
        fedge_proto::io::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes(), None)?;
    }
    Ok(())
}

fn infer(a: InferArgs) -> anyhow::Result<()> {
    let blob = load_model(&a.md.model)?;
    let graph = ModelGraph::from_blob(&blob)?;
    let data = subset(&load_data(&a.md, &graph)?, &a.range)?;
    let mut inf = TractInference::new(&graph, data.len())?;
    inf.load(&blob.params.values)?;
    let (mut xf, mut xi, mut y) = (Vec::new(), Vec::new(), Vec::new());
    let idx: Vec<usize> = (0..data.len()).collect();
    data.gather(&idx, &mut xf, &mut xi, &mut y);
    let x = match data.features {
        fedge_engine::data::Features::F32(_) => Batch::F32(&xf),
        fedge_engine::data::Features::I64(_) => Batch::I64(&xi),
    };
    let out = inf.run(x)?;
    let mut correct = 0;
    println!(
        "{:>6} {:>6} {:>9} {:>8}",
        "sample", "label", "predicted", "prob"
    );
    for (i, row) in inf.class_scores(&out).enumerate() {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
        let (arg, _) = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (j, &v)| {
                if v > bv { (j, v) } else { (bi, bv) }
            });
        correct += usize::from(arg as i64 == y[i]);
        println!(
            "{:>6} {:>6} {:>9} {:>8.4}",
            i,
            y[i],
            arg,
            (row[arg] - m).exp() / z
        );
    }
    println!("accuracy {}/{}", correct, data.len());
    Ok(())
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let aggregator = a
        .aggregator
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve aggregator address `{}`", a.aggregator))?
        .next()
        .with_context(|| format!("aggregator address `{}` resolves to nothing", a.aggregator))?;
    let trust = match (&a.pin, a.trust_on_first_use) {
        (Some(p), _) => Trust::Pinned(parse_fingerprint(p)?),
        (None, true) => Trust::FirstUse {
            path: a.state_dir.join("aggregator.pin"),
        },
        (None, false) => anyhow::bail!(
            "no way to trust the aggregator: pass --pin FINGERPRINT (see `fedge-aggregator fingerprint`) or --trust-on-first-use"
        ),
    };
    let trainer: Box<dyn Trainer> = match (a.known_update, &a.data) {
        (Some(value), _) => Box::new(KnownUpdate {
            value,
            sample_count: a.samples,
        }),
        (None, Some(spec)) => {
            // The model's input shape is only known once it is downloaded;
            // text windows use the zoo's context length.
            let all = DataSpec::parse(spec)?.load(fedge_engine::zoo::CHAR_CONTEXT, 7)?;
            let holdout = a.holdout.as_ref().map(|r| subset(&all, r)).transpose()?;
            let data = match &a.range {
                Some(r) => subset(&all, r)?,
                None => all,
            };
            let mut trainer = OnnxTrainer::new(data, a.seed)
                .with_executor(a.executor)
                .with_threads(usize::from(a.threads));
            if let Some(h) = holdout {
                trainer = trainer.with_holdout(h);
            }
            Box::new(trainer)
        }
        (None, None) => anyhow::bail!(
            "nothing to train on: pass --data SPEC (e.g. --data mnist --range 0..400), or --known-update VALUE for protocol checks"
        ),
    };
    let eligibility = device_policy(&a)?;
    let key = identity::load_or_create(&a.state_dir)?;
    let cfg = DriverConfig {
        aggregator,
        server_name: a.server_name,
        trust,
        session: SessionConfig {
            heartbeat_interval: Duration::from_millis(a.heartbeat_ms),
            reconnect_attempts_max: a.reconnect_attempts,
            first_connect_jitter: Duration::from_millis(a.first_connect_jitter_ms),
            seed: a.seed,
            ..SessionConfig::default()
        },
        timing: QuicTiming {
            keep_alive: Duration::from_millis(a.keepalive_ms),
            idle_timeout: Duration::from_millis(a.idle_timeout_ms),
        },
        state_dir: Some(a.state_dir.clone()),
        connect_timeout: Duration::from_secs(10),
        eligibility,
        endpoint: None,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(run_device(cfg, key, trainer))?;
    println!(
        "finished rounds_contributed={} final_version={} rejections={}",
        report.rounds_contributed,
        report.final_version.to_hex(),
        report.rejections.len()
    );
    Ok(())
}

/// The device policy from the flags; `None` when nothing is required. The
/// source is read once here so a wrong `--power-supply-root` fails now,
/// not silently at every check.
fn device_policy(a: &RunArgs) -> anyhow::Result<Option<policy::Gate>> {
    let p = policy::Policy {
        require_charging: a.require_charging,
        battery_floor_percent: a.battery_floor,
        ..policy::Policy::default()
    };
    p.validate()?;
    if p.is_permissive() {
        return Ok(None);
    }
    let source = policy::PowerSupplySysfs::new(&a.power_supply_root);
    let now = policy::EligibilitySource::conditions(&source)
        .context("cannot read the device's power state for the device policy")?;
    let d = p.decide(&now);
    if d.eligible {
        tracing::info!(?now, "device policy: eligible now");
    } else {
        tracing::info!(reasons = %d.reasons.join("; "), "device policy: not eligible now; will wait");
    }
    Ok(Some(policy::Gate::new(
        std::sync::Arc::new(source),
        p,
        Duration::from_millis(a.eligibility_check_ms),
    )))
}
