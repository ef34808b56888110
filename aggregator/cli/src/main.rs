//! `fedge-aggregator`: run federated rounds over QUIC.

mod bench;
mod bench_commit;
mod bench_secagg;
mod evaluator;
mod ledger_cmd;
mod simulate;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedge_aggregator::config::AggregatorConfig;
use fedge_aggregator::server::Server;
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_engine::train::lora;
use fedge_proto::msg::LoraSpec;
use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, TensorSpec};

#[derive(Parser)]
#[command(
    name = "fedge-aggregator",
    version,
    about = "Run federated learning rounds for fedge devices over QUIC",
    long_about = "Runs federated learning rounds: selects devices, hands out the model and the \
training plan, collects signed updates, rejects bad ones, aggregates the rest and publishes \
the next model version.\n\nOn first start it creates a TLS key and certificate in the state \
directory and prints the certificate fingerprint that devices pin (--pin)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve rounds until the configured number is published.
    ///
    /// The defaults are for an open network: a stake registry (--stakes)
    /// decides who takes part, no device holds more than 20% of a round's
    /// weight, a claimed sample count buys no weight, updates are clipped
    /// to twice the previous round's median norm and combined by a 20%
    /// trimmed mean, and a round needs 2 updates. `--print-config` shows
    /// every setting.
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Print the TLS certificate fingerprint devices must pin (creates the
    /// identity if the state directory has none).
    Fingerprint {
        #[arg(long, default_value = "fedge-aggregator-state")]
        state_dir: PathBuf,
    },
    /// Print the public key this aggregator authenticates to its parent
    /// with, as a leaf of a tree of aggregators (creates `leaf.key` in the
    /// state directory if it has none). The parent lists it in its
    /// `[tree.leaves] keys`.
    LeafKey {
        #[arg(long, default_value = "fedge-aggregator-state")]
        state_dir: PathBuf,
    },
    /// Work with model files (`.fedge` blobs: ONNX graph plus parameters).
    #[command(subcommand)]
    Model(ModelCmd),
    /// Run an aggregator and many devices in this process over loopback
    /// QUIC, training a real model on the shipped data; prints a table per
    /// round and writes results.json. With no arguments: MNIST, 20 devices
    /// with Dirichlet(0.5) labels, 10 per round, compressed updates,
    /// token-weighted FedAvg.
    Simulate(Box<simulate::SimArgs>),
    /// Read the contribution ledger of a state directory: verify the
    /// chain, print a device's reward proof, export the per-round roots,
    /// list ratings.
    #[command(subcommand)]
    Ledger(ledger_cmd::LedgerCmd),
    /// Benchmark aggregation of 1M-parameter updates against a memory
    /// bandwidth baseline; writes JSON.
    Bench(bench::BenchArgs),
    /// Run SecAgg+ rounds in process (100 and 1,000 devices by default)
    /// with injected dropouts; check the exact sum and write bytes per
    /// device and the aggregator's time, with and without SecAgg, as JSON.
    BenchSecagg(bench_secagg::SecAggBenchArgs),
    /// Accepted updates made durable per second, one at a time and in
    /// groups (group commit), in the same run; writes JSON with the ratio.
    BenchCommit(bench_commit::CommitBenchArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Make a parameter-only model with every value set to `--value`.
    Init {
        /// Tensors as `name=d0xd1x...`, comma separated, e.g. `w=4x3,b=3`.
        #[arg(long)]
        tensors: String,
        #[arg(long, default_value_t = 0.0)]
        value: f32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a model blob from an ONNX file (weights as initializers, as
    /// PyTorch exports them): the graph with the weights stripped, plus
    /// the weights in the canonical parameter layout.
    Import {
        onnx: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a model's version, tensors and parameter count.
    Info { path: PathBuf },
    /// Compare two models of one parameter layout: the largest absolute
    /// difference of a parameter, and the largest relative to the
    /// parameters' largest magnitude.
    Diff { a: PathBuf, b: PathBuf },
    /// Write a model as a plain ONNX file: the current global model of a
    /// state directory (what the aggregator published last), or a
    /// `.fedge` blob. A LoRA model is written with its adapters as
    /// separate initializers, or with --merge folded into the weights.
    Export {
        /// The aggregator's state directory.
        #[arg(
            long,
            default_value = "fedge-aggregator-state",
            conflicts_with = "model"
        )]
        state_dir: PathBuf,
        /// The database the aggregator ran with: `sqlite` (aggregator.db
        /// in the state directory) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
        #[arg(long, env = "FEDGE_DATABASE", default_value = "sqlite")]
        database: fedge_aggregator::store::Database,
        /// Export this model file (`.fedge` or `.onnx`) instead.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Fold LoRA adapters into the weights (`W + (alpha/rank) A B`):
        /// the model as it was before the adapters, fine-tuned.
        #[arg(long)]
        merge: bool,
        /// The ONNX file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// State directory (keys, models, update payloads; and the SQLite
    /// database unless --database names another).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Where the tables (resume point, updates, contributions, ledger,
    /// ratings) live: `sqlite` (the default: aggregator.db in the state
    /// directory) or a PostgreSQL database,
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE. The database must
    /// exist (createdb); its tables are created on first use, and one
    /// written by a newer fedge or paired with another state directory is
    /// refused. Blobs and keys stay in the state directory either way.
    /// A server off this machine is reached over TLS with its certificate
    /// and name verified (sslmode=verify-full, against the system's roots
    /// or `?sslrootcert=CA.pem`) unless the URL states another sslmode
    /// (disable, prefer, require: warned about at start).
    /// With PostgreSQL the aggregator holds a lock in the database, checked
    /// every `server.lock_check_ms` (1000): should the server end that
    /// session, serve stops with an error, writing nothing more.
    /// Config file: `database = "..."`.
    #[arg(long, env = "FEDGE_DATABASE", value_name = "URL")]
    database: Option<fedge_aggregator::store::Database>,
    /// Initial model (`.onnx` or `.fedge`), used when the state directory has none.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rounds to publish before finishing (0: forever).
    #[arg(long)]
    rounds: Option<u64>,
    /// Accepted updates that close a round.
    #[arg(long)]
    devices_per_round: Option<usize>,
    /// Fewest updates for a round to be aggregated at its deadline.
    #[arg(long)]
    min_devices: Option<usize>,
    /// Selected devices = devices_per_round x this.
    #[arg(long)]
    over_selection: Option<f64>,
    /// Time from a round's first selection to its deadline, in ms.
    #[arg(long)]
    round_deadline_ms: Option<u64>,
    /// Seed for the aggregator's randomness.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep serving after the last round.
    #[arg(long)]
    serve_forever: bool,
    /// Stake registry: a file of `<hex public key> <stake>` lines, reloaded
    /// when it changes. Devices missing from it get no weight unless the
    /// config sets `weights.allow_unknown = true` (open enrolment).
    #[arg(long)]
    stakes: Option<PathBuf>,
    /// Start even when the configuration lets one participant dominate a
    /// round (no share cap, a single-device round, a plain mean without a
    /// norm bound). Only for closed fleets you trust: on an open network a
    /// device that lies about its sample count then owns the model.
    #[arg(long)]
    i_know_this_is_unsafe: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_tensors(s: &str) -> anyhow::Result<Vec<TensorSpec>> {
    s.split(',')
        .map(|t| {
            let (name, dims) = t
                .split_once('=')
                .with_context(|| format!("tensor `{t}`: expected name=d0xd1"))?;
            let shape = dims
                .split('x')
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("tensor `{t}`: bad dimensions"))?;
            Ok(TensorSpec::new(name.trim(), &shape))
        })
        .collect()
}

/// The model a federation starts from: with `[plan.lora]`, `blob` with
/// the adapters added (seeded by the aggregator's seed; a model that
/// already carries them is taken as it is and checked).
pub(crate) fn with_adapters(
    blob: ModelBlob,
    lora: Option<&LoraSpec>,
    seed: u64,
) -> anyhow::Result<ModelBlob> {
    match lora {
        Some(spec) if lora::spec_of(&blob)?.is_none() => {
            let adapted = lora::apply(&blob, spec, seed)
                .with_context(|| format!("adding the LoRA adapters of [plan.lora] ({spec})"))?;
            tracing::info!(
                %spec,
                adapters = adapted.params.layout.dimension(),
                frozen = blob.params.layout.dimension(),
                "training LoRA adapters on the frozen model"
            );
            Ok(adapted)
        }
        _ => Ok(blob),
    }
}

/// A model resumed or given with adapters carries the ones the plan
/// names; adapters the plan does not name are only noted.
fn check_adapters(blob: &ModelBlob, lora: Option<&LoraSpec>) -> anyhow::Result<()> {
    match (lora, lora::spec_of(blob)?) {
        (Some(spec), _) => lora::check(blob, spec).with_context(|| {
            "the model does not carry the adapters [plan.lora] names (a state directory's model keeps the adapters it started with)"
        })?,
        (None, Some(spec)) => tracing::warn!(
            %spec,
            "the model carries LoRA adapters but [plan.lora] is not set: devices train them without checking"
        ),
        (None, None) => {}
    }
    Ok(())
}

/// A `.fedge` blob, or an ONNX model imported on the fly.
fn load_model(path: &std::path::Path, limits: &Limits) -> anyhow::Result<ModelBlob> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "onnx") {
        return fedge_engine::train::import::import_onnx(&bytes)
            .with_context(|| format!("model {}", path.display()));
    }
    ModelBlob::decode(&bytes, limits).with_context(|| format!("model {}", path.display()))
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
        Cmd::Fingerprint { state_dir } => {
            let id = TlsIdentity::load_or_create(&state_dir)?;
            println!("{}", id.fingerprint_hex());
            Ok(())
        }
        Cmd::LeafKey { state_dir } => {
            let key = fedge_aggregator::uplink::leaf_key(&state_dir)?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            Ok(())
        }
        Cmd::Model(ModelCmd::Init {
            tensors,
            value,
            out,
        }) => {
            anyhow::ensure!(value.is_finite(), "--value must be finite");
            let layout = Arc::new(ParamLayout::new(parse_tensors(&tensors)?)?);
            let values = vec![value; layout.dimension()];
            let blob = ModelBlob {
                onnx_graph: Default::default(),
                params: Params::new(layout, values)?,
            };
            fedge_proto::io::write_atomic(&out, &blob.encode(), None)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{} {}", blob.version().to_hex(), out.display());
            Ok(())
        }
        Cmd::Model(ModelCmd::Import { onnx, out }) => {
            let blob = load_model(&onnx, &Limits::default())?;
            fedge_proto::io::write_atomic(&out, &blob.encode(), None)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{} {}", blob.version().to_hex(), out.display());
            Ok(())
        }
        Cmd::Model(ModelCmd::Info { path }) => {
            let blob = load_model(&path, &Limits::default())?;
            println!("version    {}", blob.version().to_hex());
            println!("parameters {}", blob.params.layout.dimension());
            println!("onnx graph {} bytes", blob.onnx_graph.len());
            for t in blob.params.layout.tensors() {
                println!("  {:<32} {:?}", t.name, t.shape);
            }
            Ok(())
        }
        Cmd::Model(ModelCmd::Diff { a, b }) => {
            let (ma, mb) = (
                load_model(&a, &Limits::default())?,
                load_model(&b, &Limits::default())?,
            );
            anyhow::ensure!(
                ma.params.layout == mb.params.layout,
                "{} and {} have different parameter layouts",
                a.display(),
                b.display()
            );
            let va = &ma.params.values;
            let vb = &mb.params.values;
            let abs = va
                .iter()
                .zip(vb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            let scale = va.iter().chain(vb).map(|x| x.abs()).fold(0.0f32, f32::max);
            let rel = if scale > 0.0 { abs / scale } else { 0.0 };
            println!(
                "parameters {} max_abs_diff {abs:e} max_rel_diff {rel:e}",
                va.len()
            );
            Ok(())
        }
        Cmd::Model(ModelCmd::Export {
            state_dir,
            database,
            model,
            merge,
            out,
        }) => {
            let limits = Limits::default();
            let blob = match &model {
                Some(path) => load_model(path, &limits)?,
                None => tokio::runtime::Runtime::new()?
                    .block_on(fedge_aggregator::store::published_model(
                        &state_dir, &database, &limits,
                    ))
                    .with_context(|| format!("state directory {}", state_dir.display()))?
                    .with_context(|| {
                        format!(
                            "state directory {} has published no model yet",
                            state_dir.display()
                        )
                    })?,
            };
            anyhow::ensure!(
                !blob.onnx_graph.is_empty(),
                "model {} carries no ONNX graph (parameters only): nothing to export",
                blob.version().to_hex()
            );
            let bytes = if merge {
                lora::merge(&blob).context("merging the LoRA adapters")?
            } else {
                fedge_engine::train::import::export_onnx(&blob)?
            };
            fedge_proto::io::write_atomic(&out, &bytes, None)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let adapters = match lora::spec_of(&blob)? {
                Some(spec) if merge => format!(", LoRA {spec} merged"),
                Some(spec) => format!(", LoRA {spec} as separate initializers"),
                None => String::new(),
            };
            println!(
                "{} {} ({} bytes{adapters})",
                blob.version().to_hex(),
                out.display(),
                bytes.len()
            );
            Ok(())
        }
        Cmd::Serve(args) => serve(args),
        Cmd::Simulate(args) => simulate::run(*args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchSecagg(args) => bench_secagg::run(args),
        Cmd::BenchCommit(args) => bench_commit::run(args),
        Cmd::Ledger(cmd) => ledger_cmd::run(cmd),
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = match &a.config {
        Some(p) => AggregatorConfig::load(p)?,
        None => AggregatorConfig::default(),
    };
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.state_dir {
        cfg.state_dir = v;
    }
    if let Some(v) = a.database {
        cfg.database = v;
    }
    if let Some(v) = a.model {
        cfg.model = Some(v);
    }
    if let Some(v) = a.rounds {
        cfg.rounds.rounds = v;
    }
    if let Some(v) = a.devices_per_round {
        cfg.rounds.devices_per_round = v;
    }
    if let Some(v) = a.min_devices {
        cfg.rounds.min_devices = v;
    }
    if let Some(v) = a.over_selection {
        cfg.rounds.over_selection = v;
    }
    if let Some(v) = a.round_deadline_ms {
        cfg.rounds.round_deadline_ms = v;
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if a.serve_forever {
        cfg.server.serve_forever = true;
    }
    if let Some(v) = a.stakes {
        cfg.stakes = Some(v);
    }
    if a.i_know_this_is_unsafe {
        cfg.i_know_this_is_unsafe = true;
    }
    if a.print_config {
        print!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    let server_cfg = cfg.server_config()?;
    let parent_link = cfg.parent_link()?;
    let limits = server_cfg.coordinator.limits.clone();
    let server_cfg_lora = cfg.plan()?.lora;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // First the store: it holds the state directory and the database
        // (a second aggregator on either is refused here, before it
        // touches anything in them).
        let store = Store::open_with(&cfg.state_dir, &cfg.database).await?;
        let parent = match parent_link {
            Some(link) => Some((link, fedge_aggregator::uplink::leaf_key(&cfg.state_dir)?)),
            None => None,
        };
        let identity = TlsIdentity::load_or_create(&cfg.state_dir)?;
        let initial = match store.current_model(&limits)? {
            Some(m) => {
                tracing::info!(version = %m.version(), "resuming from the state directory's model");
                m
            }
            None => {
                let path = cfg.model.as_ref().context(
                    "no model: pass --model FILE (.onnx, or a .fedge blob from `fedge-aggregator model import`)",
                )?;
                let blob = load_model(path, &limits)?;
                with_adapters(blob, server_cfg_lora.as_ref(), cfg.seed)?
            }
        };
        check_adapters(&initial, server_cfg_lora.as_ref())?;
        let validation = cfg.scoring.validation.clone();
        let validation_range = cfg.scoring.validation_range.clone();
        let mut server = Server::bind(server_cfg, &identity, store)?;
        if let Some(spec) = validation {
            let eval = evaluator::EngineEvaluator::from_spec(
                &initial,
                &spec,
                validation_range.as_deref(),
            )?;
            tracing::info!(examples = fedge_aggregator::scoring::Evaluator::len(&eval), "scoring updates on the validation set");
            server.set_evaluator(Box::new(eval));
        }
        let addr = server.local_addr()?;
        // Machine-readable lines for scripts and tests.
        println!("listening {addr}");
        println!("fingerprint {}", identity.fingerprint_hex());
        if let Some((link, key)) = parent {
            println!("leaf of {}", link.address);
            tracing::info!(parent = %link.address, key = %hex::encode(key.verifying_key().to_bytes()), "serving as a leaf");
            server.set_parent(link, key);
        }
        tracing::info!(%addr, fingerprint = %identity.fingerprint_hex(), "aggregator ready");
        let report = server
            .run(initial, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        println!(
            "finished rounds={} final_version={}",
            report.rounds_published,
            report.final_version.map(|v| v.to_hex()).unwrap_or_default()
        );
        Ok(())
    })
}
