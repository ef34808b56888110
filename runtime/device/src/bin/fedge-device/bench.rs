//! `fedge-device bench`: training-step throughput, GFLOP/s beside tract's
//! own matrix product and peak RSS, per model, batch size and thread count,
//! written as a JSON report.

use std::path::PathBuf;
use std::time::Duration;

use fedge_engine::data::Dataset;
use fedge_engine::train::gpu::ExecutorKind;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-train.json")]
    out: PathBuf,
    /// Seconds to time each configuration.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Executor to benchmark: cpu (tract), gpu (wgpu) or auto.
    #[arg(long, default_value = "cpu")]
    executor: ExecutorKind,
    /// Benchmark tract and the GPU executor on the same configurations and
    /// report both, with the adapter's name.
    #[arg(long)]
    compare: bool,
    /// Thread counts for tract's matrix products: each configuration runs
    /// once per count (e.g. `1,2`).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Also time each node of each model's CPU step (at the first batch
    /// size, one thread) and print the slowest this many (0: none).
    #[arg(long, default_value_t = 0)]
    profile: usize,
    /// Models to benchmark (`cnn`, `mlp`).
    #[arg(long, value_delimiter = ',', default_value = "cnn,mlp")]
    models: Vec<String>,
    /// Batch sizes to benchmark.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    batches: Vec<usize>,
    /// The most MiB of im2col patches a convolution holds at once
    /// (larger batches run in chunks of images): trades memory for speed.
    #[arg(long, default_value_t = 2)]
    im2col_mib: usize,
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    use fedge_engine::bench::BenchOptions;
    let data =
        fedge_engine::data::load_mnist(&fedge_engine::data::shipped_data_dir())?.slice(0..2048);
    let min_time = Duration::from_secs_f64(a.seconds);
    if a.threads.is_empty() || a.threads.iter().any(|&t| t == 0 || t > 256) {
        anyhow::bail!("--threads takes thread counts from 1 to 256, e.g. `1,2`");
    }
    if let Some(m) = a
        .models
        .iter()
        .find(|m| !["cnn", "mlp"].contains(&m.as_str()))
    {
        anyhow::bail!("unknown model `{m}`: --models takes cnn and mlp");
    }
    if a.batches.is_empty() || a.batches.iter().any(|&b| b == 0 || b > 4096) {
        anyhow::bail!("--batches takes batch sizes from 1 to 4096, e.g. `32,64`");
    }
    if a.im2col_mib == 0 || a.im2col_mib > 4096 {
        anyhow::bail!("--im2col-mib takes 1 to 4096");
    }
    let suite = Suite {
        models: a.models.clone(),
        batches: a.batches.clone(),
    };
    if a.profile > 0 {
        for name in &a.models {
            let model = if name == "cnn" {
                fedge_engine::zoo::cnn(2)
            } else {
                fedge_engine::zoo::mlp(1)
            };
            let batch = a.batches[0];
            let times = fedge_engine::bench::profile_cpu_step(&model, &data, batch, 1, 10)?;
            let total: f64 = times.iter().map(|t| t.ms).sum();
            println!(
                "{name} step at batch {batch}, 1 thread: {total:.3} ms in tract's nodes; the slowest:"
            );
            for t in times.iter().take(a.profile) {
                println!(
                    "{:>8.3} ms {:>5.1}%  {}",
                    t.ms,
                    100.0 * t.ms / total,
                    t.node
                );
            }
        }
    }
    let opts = |executor, threads| BenchOptions {
        executor,
        threads,
        min_time,
        im2col_bytes_max: a.im2col_mib << 20,
    };
    let json = if a.compare {
        let adapter = fedge_engine::train::gpu::adapter_name()?;
        println!("GPU adapter: {adapter}");
        let cpu = bench_suite(&data, &suite, &[opts(ExecutorKind::Cpu, a.threads[0])])?;
        let gpu = bench_suite(&data, &suite, &[opts(ExecutorKind::Gpu, 1)])?;
        let rows = fedge_engine::bench::compare_rows(&cpu, &gpu);
        println!(
            "{:<4} {:>5} {:>14} {:>14} {:>8}",
            "", "batch", "tract samp/s", "wgpu samp/s", "speedup"
        );
        for r in &rows {
            println!(
                "{:<4} {:>5} {:>14.1} {:>14.1} {:>7.2}x",
                r.model, r.batch, r.tract_samples_per_s, r.gpu_samples_per_s, r.speedup
            );
        }
        serde_json::to_string_pretty(&fedge_engine::bench::CompareReport {
            adapter,
            rows,
            cpu,
            gpu,
        })?
    } else {
        let runs: Vec<BenchOptions> = a.threads.iter().map(|&t| opts(a.executor, t)).collect();
        serde_json::to_string_pretty(&bench_suite(&data, &suite, &runs)?)?
    };
    fedge_proto::io::write_atomic(&a.out, json.as_bytes(), None)?;
    println!("report written to {}", a.out.display());
    Ok(())
}

/// Which models and batch sizes a benchmark runs.
struct Suite {
    models: Vec<String>,
    batches: Vec<usize>,
}

/// The suite's models at its batch sizes, once per entry of `runs`.
fn bench_suite(
    data: &Dataset,
    suite: &Suite,
    runs: &[fedge_engine::bench::BenchOptions],
) -> anyhow::Result<fedge_engine::bench::BenchReport> {
    let mut steps: Vec<fedge_engine::bench::StepBench> = Vec::new();
    for opts in runs {
        for (name, model) in [
            ("cnn", fedge_engine::zoo::cnn(2)),
            ("mlp", fedge_engine::zoo::mlp(1)),
        ] {
            if !suite.models.iter().any(|m| m == name) {
                continue;
            }
            for &batch in &suite.batches {
                eprintln!(
                    "benchmarking {name} at batch {batch} ({}, {} thread(s))...",
                    opts.executor, opts.threads
                );
                let r = fedge_engine::bench::bench_model_on(name, &model, data, batch, opts)?;
                let rss = match (r.peak_rss_mib, r.rss_before_mib) {
                    (Some(p), Some(b)) => {
                        format!(
                            ", peak RSS {p:.1} MiB (from {b:.1}; compiling peaked at {:.1}, left {:.1}; {:.1} after the steps)",
                            r.peak_rss_compile_mib.unwrap_or(f64::NAN),
                            r.rss_compiled_mib.unwrap_or(f64::NAN),
                            r.rss_after_mib.unwrap_or(f64::NAN)
                        ) + &r
                            .step_blocks_peak_mib
                            .map(|m| format!("; large blocks {m:.1} MiB at most"))
                            .unwrap_or_default()
                    }
                    (Some(p), None) => format!(", peak RSS {p:.1} MiB"),
                    _ => String::new(),
                };
                match (r.matmul_baseline_gflops, r.ratio_to_matmul) {
                    (Some(base), Some(ratio)) => println!(
                        "{:<4} batch {:>3} threads {}: {:>8.1} samples/s, {:>6.2} GFLOP/s achieved, tract matmul on the same shapes {:>6.2} GFLOP/s (ratio {:.2}){rss}",
                        r.model,
                        r.batch,
                        r.threads,
                        r.samples_per_s,
                        r.achieved_gflops,
                        base,
                        ratio
                    ),
                    _ => println!(
                        "{:<4} batch {:>3}: {:>8.1} samples/s, {:>6.2} GFLOP/s achieved on {}{rss}",
                        r.model, r.batch, r.samples_per_s, r.achieved_gflops, r.executor
                    ),
                }
                steps.push(r);
            }
        }
    }
    let executor = steps
        .first()
        .map(|s| s.executor.clone())
        .unwrap_or_else(|| "tract-cpu".into());
    let peak_rss_mib_cnn = steps
        .iter()
        .filter(|s| s.model == "cnn")
        .filter_map(|s| s.peak_rss_mib)
        .reduce(f64::max);
    let report = fedge_engine::bench::BenchReport {
        adapter: (executor != "tract-cpu").then(|| executor.clone()),
        executor,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        steps,
        peak_rss_mib_cnn,
    };
    if let Some(rss) = report.peak_rss_mib_cnn {
        println!("peak RSS while training the CNN: {rss:.1} MiB");
    }
    Ok(report)
}
