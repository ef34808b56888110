//! `simulate --aggregators N`: a root and N leaf aggregators in this
//! process, each the real server on its own loopback port and state
//! directory, the leaves linked to the root over QUIC as `serve` links
//! them (`[tree]`). The fleet is dealt to the leaves in turn (device `i`
//! to leaf `i mod N`).
//!
//! The simulation's weights, share cap, clipping, norm bound, combiner
//! and scoring apply at the leaves, per device; the root takes the plain
//! mean of the leaves' partials, weighted by what their devices weighed,
//! and applies the server optimizer. A round's target is split over the
//! leaves (`ceil(devices_per_round / N)` each), and the root publishes
//! with a majority of them (`ceil(N / 2)`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedge_aggregator::config::{AggregatorConfig, LeavesConfig, ParentConfig};
use fedge_aggregator::coordinator::Event;
use fedge_aggregator::robust::CombineSpec;
use fedge_aggregator::server::Server;
use fedge_aggregator::store::Store;
use fedge_aggregator::strategy::ServerOpt;
use fedge_aggregator::tls::TlsIdentity;
use fedge_aggregator::weighting::{FileRegistry, WeightPolicy};
use fedge_proto::ModelBlob;
use tokio::sync::mpsc;

use super::{Aggregator, SimConfig, aggregator_config, fit_fleet};

/// Time kept back from the root's deadline for a leaf's upload.
const UPLOAD_MARGIN_MS: u64 = 2_000;

/// Starts the root and its leaves. The returned [`Aggregator`] is the
/// root, watched through one stream of events: the root's (its rounds and
/// publications), and the leaves' accepted device updates and
/// settlements in place of the root's partials; its metrics are the
/// leaves' (the devices' downloads). The devices' targets are the leaves'.
pub async fn start(
    c: &SimConfig,
    state: &Path,
    stake_file: PathBuf,
    initial: &ModelBlob,
    scorer: impl Fn() -> anyhow::Result<crate::evaluator::EngineEvaluator>,
) -> anyhow::Result<(Aggregator, Vec<(SocketAddr, [u8; 32])>)> {
    let n = c.aggregators;
    let (merged_tx, merged_rx) = mpsc::unbounded_channel();
    let leaf_dirs: Vec<PathBuf> = (0..n).map(|i| state.join(format!("leaf-{i}"))).collect();
    let mut leaf_keys = Vec::new();
    for d in &leaf_dirs {
        std::fs::create_dir_all(d)?;
        let key = fedge_aggregator::uplink::leaf_key(d)?;
        leaf_keys.push(hex::encode(key.verifying_key().to_bytes()));
    }

    // The root.
    let root_dir = state.join("root");
    std::fs::create_dir_all(&root_dir)?;
    let mut rc = root_config(c, &stake_file, leaf_keys)?;
    rc.state_dir = root_dir.clone();
    let identity = TlsIdentity::load_or_create(&root_dir)?;
    let mut scfg = rc.server_config()?;
    fit_fleet(c, &mut scfg);
    let mut root = Server::bind(scfg, &identity, Store::open(&root_dir).await?)?;
    let root_addr = root.local_addr()?;
    // Devices' updates and their settlement are the leaves' to report.
    let devices_events =
        |e: &Event| matches!(e, Event::UpdateAccepted { .. } | Event::RoundSettled(_));
    forward(root.observe(), merged_tx.clone(), move |e| {
        !devices_events(e)
    });
    let mut metrics = Vec::new();
    let serving = tokio::spawn(root.run(initial.clone(), std::future::pending()));

    // The leaves.
    let mut targets = Vec::new();
    let mut leaves = Vec::new();
    for (i, dir) in leaf_dirs.iter().enumerate() {
        let mut lc = leaf_config(c, &stake_file);
        lc.state_dir = dir.clone();
        lc.tree.parent = Some(ParentConfig {
            address: root_addr,
            pin: identity.fingerprint_hex(),
            upload_margin_ms: UPLOAD_MARGIN_MS,
        });
        let link = lc.parent_link()?.expect("a parent");
        let leaf_identity = TlsIdentity::load_or_create(dir)?;
        let mut scfg = lc.server_config()?;
        fit_fleet(c, &mut scfg);
        let mut leaf = Server::bind(scfg, &leaf_identity, Store::open(dir).await?)?;
        leaf.set_parent(link, fedge_aggregator::uplink::leaf_key(dir)?);
        if c.strategy.secagg.is_none() {
            leaf.set_evaluator(Box::new(scorer()?));
        }
        targets.push((leaf.local_addr()?, leaf_identity.fingerprint()));
        forward(leaf.observe(), merged_tx.clone(), devices_events);
        metrics.push(leaf.metrics());
        tracing::debug!(leaf = i, addr = %targets[i].0, "leaf aggregator started");
        leaves.push(tokio::spawn(
            leaf.run(initial.clone(), std::future::pending()),
        ));
    }
    println!(
        "a tree of aggregators: root at {root_addr}, {n} leaves at {}",
        targets
            .iter()
            .map(|t| t.0.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((
        Aggregator {
            addr: root_addr,
            fingerprint: identity.fingerprint(),
            events: merged_rx,
            metrics,
            serving,
            leaves,
        },
        targets,
    ))
}

/// Copies the events `keep` selects into the merged stream.
fn forward(
    mut from: mpsc::UnboundedReceiver<Event>,
    to: mpsc::UnboundedSender<Event>,
    keep: impl Fn(&Event) -> bool + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(e) = from.recv().await {
            if keep(&e) && to.send(e).is_err() {
                break;
            }
        }
    });
}

/// A leaf: the simulation's configuration for its share of each round;
/// its rounds are the root's.
fn leaf_config(c: &SimConfig, stake_file: &Path) -> AggregatorConfig {
    let mut a = aggregator_config(c, stake_file.to_path_buf());
    let n = c.aggregators;
    let per_leaf = c.devices_per_round.div_ceil(n).max(1);
    a.rounds.devices_per_round = per_leaf;
    a.rounds.min_devices = match c.min_devices {
        Some(m) => m.div_ceil(n).clamp(1, per_leaf),
        None => (per_leaf / 2).max(1),
    };
    // The root applies the server optimizer and compresses its steps.
    a.strategy.server_opt = ServerOpt::Avg { lr: 1.0 };
    a.strategy.downlink = None;
    a
}

/// The root: the leaves' partials, plainly averaged by their weights, and
/// the simulation's server optimizer.
fn root_config(
    c: &SimConfig,
    stake_file: &Path,
    leaf_keys: Vec<String>,
) -> anyhow::Result<AggregatorConfig> {
    let mut a = aggregator_config(c, stake_file.to_path_buf());
    let n = c.aggregators;
    a.rounds.devices_per_round = n;
    a.rounds.min_devices = n.div_ceil(2);
    a.rounds.selection_window_ms = 0;
    a.rounds.round_deadline_ms = c.round_deadline_ms + 2 * UPLOAD_MARGIN_MS;
    a.stakes = None;
    a.weights = WeightPolicy {
        max_share: 1.0,
        ..WeightPolicy::default()
    };
    a.strategy.combine = CombineSpec::Mean;
    a.strategy.clip = None;
    a.update_norm_max = None;
    a.scoring = Default::default();
    a.tree.leaves = Some(LeavesConfig {
        keys: leaf_keys,
        device_weight_max: device_weight_max(c, stake_file)?,
        devices_max: u32::try_from(c.devices + c.attacker_devices).unwrap_or(u32::MAX),
    });
    Ok(a)
}

/// The most one device can weigh at a leaf: the largest stake, and the
/// largest sample count a device holds or an attacker claims, through the
/// simulation's weight transforms.
fn device_weight_max(c: &SimConfig, stake_file: &Path) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(stake_file)?;
    let stake = FileRegistry::parse(stake_file, &text)?
        .into_values()
        .fold(0.0f64, f64::max);
    let samples = c.train_samples.max(c.claim_samples.unwrap_or(0) as usize) as f64;
    let w = c.weights.stake.apply(stake) * c.weights.samples.apply(samples);
    Ok(if w > 0.0 { w } else { 1.0 })
}

/// What `--aggregators` needs of the rest of the configuration.
pub fn check(c: &SimConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        c.aggregators <= c.devices,
        "--aggregators {} exceeds devices ({})",
        c.aggregators,
        c.devices
    );
    anyhow::ensure!(
        c.strategy.buffered.is_none() && c.strategy.secagg.is_none() && c.strategy.dp.is_none(),
        "--aggregators runs synchronous rounds without SecAgg+ or central DP"
    );
    Ok(())
}
