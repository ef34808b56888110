//! `fedge-device`: a federated learning device.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_runtime::driver::{DriverConfig, run_device};
use fedge_runtime::identity;
use fedge_runtime::session::SessionConfig;
use fedge_runtime::trainer::{KnownUpdate, Trainer};
use fedge_runtime::transport::{QuicTiming, Trust, parse_fingerprint};

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
    /// Send a known update instead of training: delta = VALUE on every
    /// parameter (protocol checks whose aggregate is hand-computable).
    #[arg(long, value_name = "VALUE")]
    known_update: Option<f32>,
    /// Sample count reported with --known-update.
    #[arg(long, default_value_t = 1)]
    samples: u64,
    /// Seed for this device's randomness (backoff jitter).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Heartbeat interval while connected, in ms.
    #[arg(long, default_value_t = 15_000)]
    heartbeat_ms: u64,
    /// Give up after this many failed connection attempts in a row (0: never).
    #[arg(long, default_value_t = 20)]
    reconnect_attempts: u32,
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
        Cmd::Run(a) => run(a),
    }
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
    let trainer: Box<dyn Trainer> = match a.known_update {
        Some(value) => Box::new(KnownUpdate {
            value,
            sample_count: a.samples,
        }),
        None => anyhow::bail!(
            "no trainer: this build trains with --known-update VALUE only (ONNX training arrives with the training engine)"
        ),
    };
    let key = identity::load_or_create(&a.state_dir)?;
    let cfg = DriverConfig {
        aggregator,
        server_name: a.server_name,
        trust,
        session: SessionConfig {
            heartbeat_interval: Duration::from_millis(a.heartbeat_ms),
            reconnect_attempts_max: a.reconnect_attempts,
            seed: a.seed,
            ..SessionConfig::default()
        },
        timing: QuicTiming::default(),
        state_dir: Some(a.state_dir.clone()),
        connect_timeout: Duration::from_secs(10),
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
