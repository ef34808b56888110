//! How long a round's close holds the coordinator's task, before and
//! after it moved off it. A simulated fleet (virtual time, the real
//! coordinator) runs rounds with Multi-Krum and contribution scoring on a
//! synthetic validation loss; for every close the sim measures the close
//! job's run (the combiner's finish and the scoring) and the applying of
//! its result (settlement, server step, publication). Inline, the task
//! was held for both; now it is held only for the apply (the job runs on
//! the blocking pool). Prints one JSON object.
//!
//! `cargo run --release -p fedge-aggregator --example close_bench -- [dim] [devices]`

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::robust::CombineSpec;
use fedge_aggregator::scoring::{Evaluator, ScoreMethod, ScoringConfig};
use sim::{DeviceSpec, NetConfig, Sim};

/// A validation loss that costs O(dim) a sample: `|w - 1 - e_k|^2`.
struct Quadratic {
    n: usize,
}

impl Evaluator for Quadratic {
    fn len(&self) -> usize {
        self.n
    }
    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String> {
        let mut s = 0.0;
        for &k in indices {
            let off = 1.0 + 0.001 * ((k % 11) as f64 - 5.0);
            s += params
                .iter()
                .map(|&p| (f64::from(p) - off).powi(2))
                .sum::<f64>();
        }
        Ok(s / indices.len().max(1) as f64)
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dim: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let devices: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let mut cfg = CoordinatorConfig {
        devices_per_round: devices,
        over_selection: 1.0,
        min_devices: devices,
        rounds: 3,
        round_deadline: Duration::from_secs(600),
        scoring: ScoringConfig {
            validation_samples: 64,
            cost_budget: 0.0,
            method: ScoreMethod::Direct,
            ..ScoringConfig::default()
        },
        ..CoordinatorConfig::default()
    };
    cfg.strategy.combine = CombineSpec::MultiKrum {
        byzantine: devices / 4,
        keep: devices / 2,
    };
    let specs = (0..devices)
        .map(|i| DeviceSpec::new(0.001 * (i as f32 + 1.0), 10))
        .collect();
    let mut sim = Sim::with_model(7, cfg, NetConfig::default(), specs, sim::model(dim));
    sim.coord.set_evaluator(Box::new(Quadratic { n: 200 }));
    sim.run_to_end(Duration::from_secs(3600));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let job: Vec<f64> = sim.closes.wall.iter().map(|c| ms(c.0)).collect();
    let apply: Vec<f64> = sim.closes.wall.iter().map(|c| ms(c.1)).collect();
    let inline: Vec<f64> = job.iter().zip(&apply).map(|(j, a)| j + a).collect();
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    println!(
        "{}",
        serde_json::json!({
            "dim": dim,
            "devices": devices,
            "combiner": "multi_krum",
            "rounds_published": sim.published().len(),
            "close_job_ms": job,
            "apply_ms": apply,
            "task_blocked_inline_ms": inline,
            "task_blocked_off_task_ms": apply,
            "ratio_inline_to_off_task": sum(&inline) / sum(&apply).max(1e-9),
        })
    );
}
