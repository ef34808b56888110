//! `fedge-aggregator bench`: aggregation throughput on 1M-parameter
//! updates beside a plain memory-bandwidth baseline in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedge_aggregator::robust::{Combiner, StreamingMean};
use fedge_proto::Limits;
use fedge_proto::codec::{self, CodecSpec};
use rand::SeedableRng;
use rand_distr::Distribution;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-aggregate.json")]
    out: PathBuf,
    /// Parameters per update.
    #[arg(long, default_value_t = 1 << 20)]
    dimension: usize,
    /// Updates combined in the peak-memory round.
    #[arg(long, default_value_t = 1000)]
    round_updates: usize,
    /// Seconds to time each measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Run `f` repeatedly for at least `min`, return calls per second.
fn rate(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < min || n < 3 {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let dim = a.dimension;
    let min = Duration::from_secs_f64(a.seconds);
    let limits = Limits::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let normal = rand_distr::Normal::new(0.0f32, 0.01).expect("sigma");
    let updates: Vec<Vec<f32>> = (0..8)
        .map(|_| (0..dim).map(|_| normal.sample(&mut rng)).collect())
        .collect();
    let dense_spec = CodecSpec::parse("dense-f32")?;
    let topk_spec = CodecSpec::parse("topk:0.01+q8")?;
    let dense: Vec<bytes::Bytes> = updates
        .iter()
        .enumerate()
        .map(|(i, u)| codec::encode(&dense_spec, u, i as u64))
        .collect::<Result<_, _>>()?;
    let topk: Vec<bytes::Bytes> = updates
        .iter()
        .enumerate()
        .map(|(i, u)| codec::encode(&topk_spec, u, i as u64))
        .collect::<Result<_, _>>()?;
    let update_bytes = 4.0 * dim as f64;

    // Baseline: sum the same f32 bytes into an f64 accumulator.
    let mut acc = vec![0.0f64; dim];
    let mut k = 0;
    let base = rate(min, || {
        let u = &updates[k % updates.len()];
        for (s, &x) in acc.iter_mut().zip(u) {
            *s += f64::from(x);
        }
        k += 1;
    });
    std::hint::black_box(&acc);

    // Dense: decode (validating) and add to the streaming weighted mean.
    let mut mean = StreamingMean::with_share_cap(dim, 1.0);
    let mut k = 0;
    let dense_rate = rate(min, || {
        let d = codec::decode(&dense[k % dense.len()], dim, &limits).expect("valid");
        mean.add(d, 1.0);
        k += 1;
    });
    let mut mean = StreamingMean::with_share_cap(dim, 1.0);
    let mut k = 0;
    let topk_rate = rate(min, || {
        let d = codec::decode(&topk[k % topk.len()], dim, &limits).expect("valid");
        mean.add(d, 1.0);
        k += 1;
    });

    // Peak memory of a round of `round_updates` dense updates.
    let rss_before = peak_rss_mib();
    let mut round = StreamingMean::with_share_cap(dim, 0.25);
    for i in 0..a.round_updates {
        let d = codec::decode(&dense[i % dense.len()], dim, &limits)?;
        round.add(d, 1.0 + (i % 7) as f64);
    }
    let combined = round.finish(0.25).expect("updates");
    std::hint::black_box(&combined);
    let rss_after = peak_rss_mib();

    println!(
        "dimension {dim} ({:.1} MB per dense update)",
        update_bytes / 1e6
    );
    println!(
        "baseline (sum the same f32 bytes): {:>8.1} updates/s, {:>6.2} GB/s",
        base,
        base * update_bytes / 1e9
    );
    println!(
        "dense f32 decode + streaming mean:  {:>8.1} updates/s, {:>6.2} GB/s ({:.2} of baseline)",
        dense_rate,
        dense_rate * update_bytes / 1e9,
        dense_rate / base
    );
    println!(
        "top-k 1% + q8 decode + mean:        {:>8.1} updates/s",
        topk_rate
    );
    if let (Some(b), Some(a2)) = (rss_before, rss_after) {
        println!(
            "peak RSS: {b:.0} MiB before, {a2:.0} MiB after a round of {} updates",
            a.round_updates
        );
    }
    let report = serde_json::json!({
        "dimension": dim,
        "baseline_updates_per_s": base,
        "baseline_gb_per_s": base * update_bytes / 1e9,
        "dense_updates_per_s": dense_rate,
        "dense_gb_per_s": dense_rate * update_bytes / 1e9,
        "dense_ratio_to_baseline": dense_rate / base,
        "topk1_q8_updates_per_s": topk_rate,
        "round_updates": a.round_updates,
        "peak_rss_mib_before_round": rss_before,
        "peak_rss_mib_after_round": rss_after,
    });
    write_report(&a.out, &report)
}

/// Write a benchmark's JSON report (atomically) and say where.
pub fn write_report(path: &std::path::Path, report: &serde_json::Value) -> anyhow::Result<()> {
    fedge_proto::io::write_atomic(path, serde_json::to_string_pretty(report)?.as_bytes(), None)?;
    println!("report written to {}", path.display());
    Ok(())
}
