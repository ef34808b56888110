//! What a simulation shows and keeps: the per-round table above a
//! progress bar, held-out accuracy after every published model, the
//! summary line, results.json and accuracy.png.

use std::time::{Duration, Instant};

use anyhow::Context;
use fedge_aggregator::coordinator::{Event, RoundOutcome, Settlement};
use fedge_aggregator::evaluation::EvalSummary;
use fedge_aggregator::metrics::Metrics;
use fedge_engine::data::Dataset;
use fedge_engine::train::exec::TractInference;
use fedge_engine::train::import::ModelGraph;
use fedge_engine::train::local::{EvalStats, evaluate};
use fedge_proto::{Limits, ModelBlob, ModelVersion};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::args::SimConfig;
use super::fleet::{ClosedRounds, Device};
use std::sync::atomic::Ordering;

/// One published round, as printed and as written to results.json.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    round: u64,
    participants: usize,
    accuracy: f64,
    loss: f64,
    upload_bytes: u64,
    download_bytes: u64,
    cumulative_upload_bytes: u64,
    seconds: f64,
    /// The privacy spent up to this round (DP runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    privacy: Option<Privacy>,
}

/// What the aggregator's accountant reported when a round closed.
#[derive(Clone, Debug, Serialize)]
pub struct Privacy {
    epsilon: f64,
    delta: f64,
    rho_zcdp: f64,
    clip_bound: f64,
}

impl Privacy {
    /// From a closed round's metrics, when the strategy reports them.
    fn of(metrics: &[(String, f64)]) -> Option<Self> {
        let get = |k: &str| metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        Some(Privacy {
            epsilon: get("dp_epsilon")?,
            delta: get("dp_delta")?,
            rho_zcdp: get("dp_rho_zcdp")?,
            clip_bound: get("dp_clip_bound")?,
        })
    }
}

/// Held-out evaluation of a model's parameters.
pub struct HeldOut {
    inf: TractInference,
    test: Dataset,
}

impl HeldOut {
    pub fn new(graph: &ModelGraph, test: Dataset) -> anyhow::Result<Self> {
        Ok(HeldOut {
            inf: TractInference::new(graph, 250)?,
            test,
        })
    }

    pub fn evaluate(&mut self, params: &[f32]) -> anyhow::Result<EvalStats> {
        self.inf.load(params)?;
        Ok(evaluate(&self.inf, &self.test)?)
    }
}

/// The per-round table, printed above a progress bar.
pub struct Table {
    bar: indicatif::ProgressBar,
}

impl Table {
    /// The header and round 0 (the initial model).
    pub fn start(rounds: u64, initial: &EvalStats) -> Self {
        let bar = indicatif::ProgressBar::new(rounds).with_style(
            indicatif::ProgressStyle::with_template(
                "[{elapsed_precise}] [{bar:30}] round {pos}/{len} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        let table = Table { bar };
        table.say(format!(
            "{:>5} {:>12} {:>9} {:>8} {:>12} {:>13} {:>7}",
            "round", "participants", "accuracy", "loss", "upload_B", "download_B", "secs"
        ));
        table.say(format!(
            "{:>5} {:>12} {:>9.4} {:>8.4} {:>12} {:>13} {:>7.1}",
            0, "-", initial.accuracy, initial.loss, 0, 0, 0.0
        ));
        table
    }

    /// Print a line above the progress bar (also when stdout is not a
    /// terminal and the bar is hidden).
    fn say(&self, line: String) {
        self.bar.suspend(|| println!("{line}"));
    }

    fn aborted(&self, round_id: u64, accepted: usize) {
        self.say(format!("{round_id:>5} aborted with {accepted} updates"));
        self.bar.inc(1);
    }

    fn published(&self, row: &Row) {
        self.say(format!(
            "{:>5} {:>12} {:>9.4} {:>8.4} {:>12} {:>13} {:>7.1}",
            row.round,
            row.participants,
            row.accuracy,
            row.loss,
            row.upload_bytes,
            row.download_bytes,
            row.seconds
        ));
        self.bar.inc(1);
        self.bar
            .set_message(format!("accuracy {:.4}", row.accuracy));
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// The rounds as the simulation saw them.
#[derive(Default)]
pub struct Rounds {
    pub rows: Vec<Row>,
    /// Update bytes uploaded in published rounds.
    pub upload_bytes: u64,
    pub final_version: Option<ModelVersion>,
    /// Rounds that closed without publishing.
    pub aborted: Vec<u64>,
    /// The aggregator stopped making progress before its last round (every
    /// device gave up: a poisoned model makes honest training diverge).
    pub stalled: bool,
    /// Every round's scores and rewards.
    pub settled: Vec<Settlement>,
    /// Every round's federated (and operator-held) evaluation of its
    /// starting model.
    pub evaluations: Vec<EvalSummary>,
}

/// What a simulation watches while its rounds run.
pub struct Watched<'a> {
    /// The aggregator's events.
    pub events: &'a mut UnboundedReceiver<Event>,
    /// The servers devices download from (one, or a tree's leaves): their
    /// bytes out are the downlink.
    pub metrics: &'a [std::sync::Arc<Metrics>],
    /// Where the rounds' closings are told (hogs read it).
    pub closed: &'a ClosedRounds,
    /// Where accepted updates are told (copycats read it).
    pub accepted: &'a super::copycat::AcceptedUpdates,
    pub devices: &'a [Device],
    /// How long without an event means the federation stalled.
    pub stall: Duration,
    /// The initial model's held-out accuracy (what round 1 evaluates).
    pub initial_accuracy: f64,
}

/// Follow the aggregator's events until it finishes: count the accepted
/// updates of each round, evaluate every published model on held-out data
/// and print its row. After `stall` without an event, or once every
/// honest device has given up, the federation has stalled: the rounds so
/// far come back with `stalled` set.
pub async fn follow_rounds(
    w: Watched<'_>,
    held_out: &mut HeldOut,
    table: &Table,
    started: Instant,
) -> anyhow::Result<Rounds> {
    let Watched {
        events,
        metrics,
        closed,
        accepted,
        devices,
        stall,
        initial_accuracy,
    } = w;
    let mut rounds = Rounds::default();
    let (mut up, mut participants) = (0u64, 0usize);
    let bytes_out = || metrics.iter().map(|m| m.bytes_out.get()).sum::<u64>();
    let mut last_out = bytes_out();
    loop {
        let next = tokio::select! {
            e = events.recv() => Ok(e),
            () = tokio::time::sleep(stall) => Err(format!(
                "no progress for {:.0} s",
                stall.as_secs_f64()
            )),
            () = honest_gone(devices) => Err("every honest device has given up".into()),
        };
        let e = match next {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(why) => {
                table.say(format!("{why}: the federation stalled"));
                rounds.stalled = true;
                break;
            }
        };
        if let Event::RoundClosed { round_id, .. } = &e {
            closed.fetch_max(*round_id, Ordering::AcqRel);
        }
        if let Event::UpdateAccepted {
            round_id,
            device,
            payload_hash,
            ..
        } = &e
        {
            accepted
                .lock()
                .expect("accepted")
                .insert((*round_id, device.clone()), *payload_hash);
        }
        match e {
            Event::UpdateAccepted { payload_bytes, .. } => {
                up += payload_bytes;
                participants += 1;
            }
            Event::SecureAggregated {
                survivors,
                upload_bytes,
                ..
            } => {
                up += upload_bytes;
                participants += survivors;
            }
            Event::RoundClosed {
                accepted,
                outcome: RoundOutcome::Aborted,
                round_id,
                ..
            } => {
                table.aborted(round_id, accepted);
                rounds.aborted.push(round_id);
                up = 0;
                participants = 0;
            }
            Event::ModelPublished { blob: bytes, .. } => {
                let m = ModelBlob::decode(&bytes, &Limits::default())?;
                let ev = held_out.evaluate(&m.params.values)?;
                let out_now = bytes_out();
                rounds.upload_bytes += up;
                let row = Row {
                    round: rounds.rows.len() as u64 + 1,
                    participants,
                    accuracy: ev.accuracy,
                    loss: ev.loss,
                    upload_bytes: up,
                    download_bytes: out_now - last_out,
                    cumulative_upload_bytes: rounds.upload_bytes,
                    seconds: started.elapsed().as_secs_f64(),
                    privacy: None,
                };
                table.published(&row);
                last_out = out_now;
                up = 0;
                participants = 0;
                rounds.rows.push(row);
            }
            // The round's model was published just before this.
            Event::RoundClosed {
                outcome: RoundOutcome::Published(_),
                metrics,
                ..
            } => {
                if let (Some(row), Some(p)) = (rounds.rows.last_mut(), Privacy::of(&metrics)) {
                    row.privacy = Some(p);
                }
            }
            Event::RoundSettled(s) => rounds.settled.push(*s),
            Event::Evaluated(s) => {
                if let (Some(acc), Some(loss)) = (s.accuracy, s.loss) {
                    // The round's starting model: the last one published.
                    let central = rounds.rows.last().map_or(initial_accuracy, |r| r.accuracy);
                    table.say(format!(
                        "{:>5} federated evaluation of its model by {} devices: accuracy {acc:.4}, \
                         loss {loss:.4} (held-out split: {central:.4})",
                        s.round_id, s.devices
                    ));
                }
                rounds.evaluations.push(*s);
            }
            Event::Finished { final_version: v } => {
                rounds.final_version = Some(v);
                break;
            }
            _ => {}
        }
    }
    Ok(rounds)
}

/// Resolves once every honest device's driver has returned (each gives up
/// after repeated training failures: a poisoned model); checked every
/// second.
async fn honest_gone(devices: &[Device]) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if devices
            .iter()
            .filter(|d| !d.attacker)
            .all(|d| d.task.is_finished())
        {
            return;
        }
    }
}

/// What a finished simulation reports.
pub struct Summary<'a> {
    pub config: &'a SimConfig,
    /// The attacking devices' ids.
    pub attackers: &'a std::collections::HashSet<String>,
    /// Parameters per update (the dense f32 baseline is 4 bytes each).
    pub params: usize,
    /// Parameters of the model (with LoRA, of the frozen model the
    /// adapters adapt): what an update's bytes are a fraction of.
    pub model_params: usize,
    pub initial: EvalStats,
    pub rounds: Rounds,
    /// Honest devices that did not finish cleanly.
    pub failed_sessions: usize,
    /// Attackers still running at the end, stopped.
    pub attackers_stopped: usize,
    /// Honest devices' connection attempts that failed (timed out...),
    /// and that an aggregator refused at its handshake limit.
    pub connect_failures: u64,
    pub connects_refused: u64,
    pub rounds_published: u64,
    pub started: Instant,
}

impl Summary<'_> {
    /// Print the summary line, write results.json and draw accuracy.png
    /// (a plot that fails is logged, not an error).
    pub fn report(&self) -> anyhow::Result<()> {
        let c = self.config;
        let rows = &self.rounds.rows;
        let cum_up = self.rounds.upload_bytes;
        // Against the whole model's parameters: with LoRA, what full
        // fine-tuning would send.
        let dense_bytes_per_update = 4 * self.model_params as u64;
        let updates: usize = rows.iter().map(|r| r.participants).sum();
        let dense_total = dense_bytes_per_update * updates as u64;
        // Dense FedAvg moves a float32 model each way per participant.
        let dense_fedavg = 2 * dense_total;
        let cum_down: u64 = rows.iter().map(|r| r.download_bytes).sum();
        let final_acc = rows
            .last()
            .map(|r| r.accuracy)
            .unwrap_or(self.initial.accuracy);
        if !self.rounds.aborted.is_empty() {
            println!(
                "{} rounds aborted: {:?}",
                self.rounds.aborted.len(),
                self.rounds.aborted
            );
        }
        println!(
            "final accuracy {:.4} after {} rounds; upload {} bytes vs {} dense f32 ({:.1}x smaller); {} failed sessions; {:.1} s",
            final_acc,
            self.rounds_published,
            cum_up,
            dense_total,
            dense_total as f64 / cum_up.max(1) as f64,
            self.failed_sessions,
            self.started.elapsed().as_secs_f64()
        );
        println!(
            "connections: {} attempts failed, {} refused at the handshake limit (came back later)",
            self.connect_failures, self.connects_refused
        );
        println!(
            "both ways: upload + download {} bytes vs {} for dense FedAvg ({:.1}x smaller)",
            cum_up + cum_down,
            dense_fedavg,
            dense_fedavg as f64 / (cum_up + cum_down).max(1) as f64
        );
        let per_update = cum_up as f64 / updates.max(1) as f64;
        let model_bytes = 4 * self.model_params as u64;
        let fraction = per_update / model_bytes.max(1) as f64;
        println!(
            "per update: {:.0} bytes on average, {:.2}% of the model's {} parameter bytes (f32)",
            per_update,
            100.0 * fraction,
            model_bytes
        );
        let privacy = rows.last().and_then(|r| r.privacy.clone());
        if let (Some(p), Some(_)) = (&privacy, &c.strategy.secagg) {
            println!(
                "privacy spent: epsilon {:.3} at delta {:e} (distributed DP under SecAgg+, no \
                 sampling amplification), rho-zCDP {:.4} (the Gaussian of the same variance); \
                 clip bound {:.4}",
                p.epsilon, p.delta, p.rho_zcdp, p.clip_bound
            );
        } else if let Some(p) = &privacy {
            println!(
                "privacy spent: epsilon {:.3} at delta {:e} (Poisson sampling at {} of {} devices per round), \
                 rho-zCDP {:.4} without sampling amplification; last clip bound {:.4}",
                p.epsilon,
                p.delta,
                c.devices_per_round,
                c.strategy.dp.as_ref().map_or(0, |d| d.population),
                p.rho_zcdp,
                p.clip_bound
            );
        }
        let rewards = super::rewards::summarize(&self.rounds.settled, self.attackers);
        println!("{}", rewards.line());
        std::fs::create_dir_all(&c.out_dir)
            .with_context(|| format!("creating {}", c.out_dir.display()))?;
        let results = serde_json::json!({
            "config": c,
            "initial": {"accuracy": self.initial.accuracy, "loss": self.initial.loss},
            "rounds": rows,
            "final_accuracy": final_acc,
            "final_version": self.rounds.final_version.as_ref().map(|v| v.to_hex()),
            "rounds_published": self.rounds_published,
            "rounds_aborted": self.rounds.aborted,
            "stalled": self.rounds.stalled,
            "upload_bytes": cum_up,
            "dense_f32_upload_bytes": dense_total,
            "download_bytes": cum_down,
            "total_bytes": cum_up + cum_down,
            "dense_fedavg_bytes": dense_fedavg,
            "trained_parameters": self.params,
            "model_parameters": self.model_params,
            "upload_bytes_per_update": per_update,
            "upload_fraction_of_model_bytes": fraction,
            "failed_sessions": self.failed_sessions,
            "attackers_stopped": self.attackers_stopped,
            "connect_failures": self.connect_failures,
            "connects_refused": self.connects_refused,
            "privacy": privacy,
            "rewards": rewards,
            "evaluations": self.rounds.evaluations,
            "seconds": self.started.elapsed().as_secs_f64(),
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
        match plot(&png, self.initial.accuracy, rows, &title) {
            Ok(()) => println!("plot written to {}", png.display()),
            Err(e) => tracing::warn!(error = %e, "no plot"),
        }
        Ok(())
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
