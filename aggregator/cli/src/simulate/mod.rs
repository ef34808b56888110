//! `fedge-aggregator simulate`: an aggregator and N devices in one process,
//! speaking the real protocol over loopback QUIC through the real device
//! code path (driver, session, tract training), on the shipped data.
//!
//! - [`args`]: the configuration (TOML and flags) and its checks.
//! - [`data`]: the model and the data, split into the devices' shards.
//! - [`fleet`]: device keys and stakes, the devices, and the trainers that
//!   make a device slow, flaky or malicious.
//! - [`report`]: the per-round table, results.json and the plot.
//! - [`rewards`]: what scoring and rewards made of the run.
//! - [`tree`]: with `--aggregators N`, a root and N leaf aggregators
//!   instead of one.

mod args;
mod copycat;
mod data;
mod fleet;
mod report;
mod rewards;
mod tree;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_aggregator::config::{AggregatorConfig, PlanConfig, RoundsConfig, ServerLimits};
use fedge_aggregator::coordinator::Event;
use fedge_aggregator::metrics::Metrics;
use fedge_aggregator::server::{ServeReport, Server, ServerConfig};
use fedge_aggregator::store::Store;
use fedge_aggregator::tls::TlsIdentity;
use fedge_proto::ModelBlob;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

pub use args::{SimArgs, SimConfig};

pub fn run(a: SimArgs) -> anyhow::Result<()> {
    let c = SimConfig::from_args(&a)?;
    if a.print_config {
        print!("{}", toml::to_string(&c)?);
        return Ok(());
    }
    c.check_runnable()?;
    if c.aggregators > 0 {
        tree::check(&c)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The aggregators run on threads of their own, as they would in a
    // process of their own: on the devices' runtime, the server's UDP
    // socket and coordinator waited in one queue behind thousands of
    // device tasks, and a burst of connections overflowed the socket.
    let aggregators = tokio::runtime::Builder::new_multi_thread()
        .thread_name("aggregator")
        .enable_all()
        .build()?;
    let done = rt.block_on(simulate(c, aggregators.handle().clone()));
    aggregators.shutdown_background();
    done
}

/// The simulation, step by step.
async fn simulate(c: SimConfig, on: tokio::runtime::Handle) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = data::load_model(&c)?;
    let (train, test, shards) = data::load_data(&c, model.context)?;
    let work = tempfile::tempdir()?;
    let keys = fleet::device_keys(&c);
    let attackers = fleet::attacker_ids(&c, &keys);
    let state = match &c.state_dir {
        Some(d) => d.clone(),
        None => work.path().join("aggregator"),
    };
    let (graph, held) = (model.graph.clone(), test.clone());
    let scorer = move || crate::evaluator::EngineEvaluator::new(&graph, held.clone());
    let (mut aggregator, targets) = if c.aggregators == 0 {
        let (c, state, keys, blob) = (c.clone(), state.clone(), keys.clone(), model.blob.clone());
        let a = on
            .spawn(async move { start_aggregator(&c, &state, &keys, &blob, scorer()?).await })
            .await??;
        let target = (a.addr, a.fingerprint);
        (a, vec![target])
    } else {
        let stake_file = fresh_state(&state, &c, &keys)?;
        let (c, state, blob) = (c.clone(), state.clone(), model.blob.clone());
        on.spawn(async move { tree::start(&c, &state, stake_file, &blob, scorer).await })
            .await??
    };
    announce(&c, aggregator.addr);
    // A tree's leaves keep their devices' payloads (`tree::start`).
    let leaves = (0..c.aggregators).map(|i| state.join(format!("leaf-{i}")));
    let seen = fleet::Seen {
        closed: Default::default(),
        accepted: Default::default(),
        payload_dirs: std::iter::once(state.clone()).chain(leaves).collect(),
    };
    let devices = fleet::spawn_devices(&c, &seen, keys, &train, &shards, &targets)?;
    let mut held_out = report::HeldOut::new(&model.graph, test)?;
    let initial = held_out.evaluate(&model.blob.params.values)?;
    let table = report::Table::start(c.rounds, &initial);
    let watched = report::Watched {
        events: &mut aggregator.events,
        metrics: &aggregator.metrics,
        closed: &seen.closed,
        accepted: &seen.accepted,
        devices: &devices,
        stall: stall_after(&c),
        initial_accuracy: initial.accuracy,
    };
    let rounds = report::follow_rounds(watched, &mut held_out, &table, started).await?;
    table.finish();
    let stalled = rounds.stalled;
    let (joined, rounds_published) = if stalled {
        // Nobody is left to finish the rounds: stop the devices still
        // running and the aggregator.
        let left = |attacker: bool| {
            devices
                .iter()
                .filter(|d| d.attacker == attacker && !d.task.is_finished())
                .count()
        };
        let joined = fleet::Joined {
            failed: left(false),
            attackers_stopped: left(true),
            connect_failures: 0,
            connects_refused: 0,
        };
        devices.iter().for_each(|d| d.task.abort());
        aggregator.serving.abort();
        aggregator.leaves.iter().for_each(|l| l.abort());
        (joined, rounds.rows.len() as u64)
    } else {
        // The aggregators serve the final model until every device has
        // fetched it and left, or past the longest wait they told a
        // device (`finish_grace` after it); the devices then still
        // running did not get it.
        let served = aggregator.serving.await??;
        for l in aggregator.leaves {
            l.await??;
        }
        (fleet::join_devices(devices).await, served.rounds_published)
    };
    report::Summary {
        config: &c,
        attackers: &attackers,
        params: model.blob.params.values.len(),
        model_params: model.model_params,
        initial,
        rounds,
        failed_sessions: joined.failed,
        attackers_stopped: joined.attackers_stopped,
        connect_failures: joined.connect_failures,
        connects_refused: joined.connects_refused,
        rounds_published,
        started,
    }
    .report()?;
    anyhow::ensure!(
        !stalled,
        "the federation stalled after {rounds_published} published rounds (results.json says so)"
    );
    Ok(())
}

/// How long without any aggregator event means the federation stalled: a
/// round that has begun closes by its deadline, and live devices ask for
/// tasks within seconds.
fn stall_after(c: &SimConfig) -> Duration {
    Duration::from_millis(c.round_deadline_ms) + Duration::from_secs(60)
}

/// The aggregator serving the simulation (with `--aggregators`, the
/// root), and what the simulation watches.
struct Aggregator {
    addr: SocketAddr,
    /// Its certificate's fingerprint, which the devices pin.
    fingerprint: [u8; 32],
    events: UnboundedReceiver<Event>,
    /// The metrics of the servers devices talk to (the leaves of a tree).
    metrics: Vec<Arc<Metrics>>,
    serving: JoinHandle<anyhow::Result<ServeReport>>,
    /// With `--aggregators`: the leaves.
    leaves: Vec<JoinHandle<anyhow::Result<ServeReport>>>,
}

/// Makes `state` a fresh state directory with the fleet's stake registry.
fn fresh_state(
    state: &Path,
    c: &SimConfig,
    keys: &[fedge_proto::sign::SigningKey],
) -> anyhow::Result<std::path::PathBuf> {
    if state.join("aggregator.db").exists() || state.join("root").exists() {
        anyhow::bail!(
            "state directory {} already holds an aggregator's state: use a new one",
            state.display()
        );
    }
    std::fs::create_dir_all(state)?;
    fleet::write_stake_file(c, keys, state)
}

/// Start the aggregator on loopback with its state (TLS identity, stake
/// registry, store, ledger) in `state`, publishing `initial` first and
/// scoring updates with `scorer` (the held-out split).
async fn start_aggregator(
    c: &SimConfig,
    state: &Path,
    keys: &[fedge_proto::sign::SigningKey],
    initial: &ModelBlob,
    scorer: crate::evaluator::EngineEvaluator,
) -> anyhow::Result<Aggregator> {
    let stake_file = fresh_state(state, c, keys)?;
    let state = state.to_path_buf();
    let identity = TlsIdentity::load_or_create(&state)?;
    let mut server = Server::bind(
        server_config(c, stake_file)?,
        &identity,
        Store::open(&state).await?,
    )?;
    if c.strategy.secagg.is_none() {
        // SecAgg+ leaves nothing individual to score.
        server.set_evaluator(Box::new(scorer));
    }
    Ok(Aggregator {
        addr: server.local_addr()?,
        fingerprint: identity.fingerprint(),
        events: server.observe(),
        metrics: vec![server.metrics()],
        serving: tokio::spawn(server.run(initial.clone(), std::future::pending())),
        leaves: Vec::new(),
    })
}

/// The server's configuration, made the way `serve` makes it: the
/// simulation's rounds, plan, weights and strategy written into an
/// [`AggregatorConfig`] (every other field at `serve`'s default) and
/// validated by [`AggregatorConfig::server_config`]. A simulation may
/// study a configuration `serve` would refuse: it runs, and says so. The
/// limits then fit a whole fleet in one process.
fn server_config(c: &SimConfig, stake_file: std::path::PathBuf) -> anyhow::Result<ServerConfig> {
    let agg = aggregator_config(c, stake_file);
    let risks = agg.dominance_risks();
    if !risks.is_empty() {
        println!(
            "serve would refuse this configuration (one participant can dominate a round):\n  - {}",
            risks.join("\n  - ")
        );
    }
    let mut s = agg.server_config()?;
    fit_fleet(c, &mut s);
    Ok(s)
}

/// Every simulated device dials at once, from one process.
fn fit_fleet(c: &SimConfig, s: &mut ServerConfig) {
    let fleet = c.devices + c.attacker_devices;
    s.coordinator.max_sessions = fleet + 16;
    s.coordinator.max_unauthenticated = fleet + 16;
    s.finish_grace = Some(Duration::from_secs(30));
}

/// The simulation as an aggregator configuration file would say it.
fn aggregator_config(c: &SimConfig, stake_file: std::path::PathBuf) -> AggregatorConfig {
    let d = AggregatorConfig::default();
    AggregatorConfig {
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        seed: c.seed,
        rounds: RoundsConfig {
            rounds: c.rounds,
            devices_per_round: c.devices_per_round,
            min_devices: c.min_devices.unwrap_or((c.devices_per_round / 2).max(1)),
            round_deadline_ms: c.round_deadline_ms,
            retry_window_ms: [200, 600],
            selection_window_ms: c
                .selection_window_ms
                .unwrap_or(d.rounds.selection_window_ms),
            ..d.rounds
        },
        plan: PlanConfig {
            local_epochs: c.local_epochs,
            local_steps: c.local_steps,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            momentum: c.momentum,
            optimizer: c.optimizer.clone(),
            codec: c.codec.clone(),
            error_feedback: c.error_feedback,
            lora: c.lora.clone(),
            ..PlanConfig::default()
        },
        server: ServerLimits {
            // Every device shares one process: a generous per-connection rate.
            rate_per_sec: 10_000.0,
            rate_burst: 20_000.0,
            ..d.server
        },
        weights: c.weights.clone(),
        strategy: c.strategy.clone(),
        stakes: Some(stake_file),
        update_norm_max: c.update_norm_max,
        scoring: c.scoring.clone(),
        evaluation: c.evaluation.clone(),
        i_know_this_is_unsafe: true,
        ..d
    }
}

/// What is about to run.
fn announce(c: &SimConfig, addr: SocketAddr) {
    println!(
        "simulating {} devices ({} per round, {} rounds) training {} on {} ({} partition), codec {}, over QUIC at {addr}",
        c.devices, c.devices_per_round, c.rounds, c.model, c.data, c.partition, c.codec
    );
    if let Some(l) = &c.lora {
        println!("training LoRA adapters {} on the frozen model", l.spec());
    }
    let n_attackers = fleet::attacker_count(c);
    if n_attackers > 0 {
        println!("{n_attackers} of {} devices attack", c.devices);
    }
    if c.attacker_devices > 0 {
        let stake = match c.attacker_stake {
            Some(s) => format!("stake {s} each"),
            None => "fresh keys with no stake".into(),
        };
        println!(
            "{} attacking devices added beyond them ({stake})",
            c.attacker_devices
        );
    }
    if n_attackers + c.attacker_devices > 0
        && let Ok(plan) = fleet::AttackPlan::of(c)
    {
        println!("attack: {}", plan.describe(&c.attack));
    }
}

#[cfg(test)]
mod tests {
    /// A finished server keeps serving the final model for as long as a
    /// device it refused at the handshake limit may back off.
    #[test]
    fn the_server_waits_as_long_as_a_refused_device_backs_off() {
        assert_eq!(
            fedge_aggregator::server::REFUSED_COMEBACK,
            fedge_device::session::SessionConfig::default().refused_backoff_max
        );
    }
}
