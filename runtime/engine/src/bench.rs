//! The training benchmark behind `fedge-device bench`: samples/s of whole
//! training steps, the FLOP rate they reach, and beside it the FLOP rate of
//! tract's own matrix multiply on the same shapes in the same run (the
//! baseline, for the CPU executor), plus peak memory. The same steps run
//! on any executor ([`ExecutorKind`]), so tract and the GPU executor can be
//! compared configuration by configuration.

use std::time::{Duration, Instant};

use fedge_proto::msg::Loss;
use prost::Message;
use serde::Serialize;
use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};
use tract_onnx::prelude::*;

use crate::data::{Dataset, Features};
use crate::train::TrainError;
use crate::train::compile::{CompileOptions, OptimizerSpec};
use crate::train::exec::{Batch, Executor, Labels, NodeTime, TractExecutor};
use crate::train::gpu::{ExecutorKind, select_executor};
use crate::train::import::{ModelGraph, import_onnx};
use crate::train::onnx::{self, F32, attr_i};
use crate::train::shape::infer;

/// How to run one benchmark configuration.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub executor: ExecutorKind,
    /// Threads for tract's matrix products (CPU runs).
    pub threads: usize,
    /// Time each configuration at least this long.
    pub min_time: Duration,
    /// See [`CompileOptions::im2col_bytes_max`].
    pub im2col_bytes_max: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            executor: ExecutorKind::Cpu,
            threads: 1,
            min_time: Duration::from_secs(3),
            im2col_bytes_max: crate::train::compile::IM2COL_BYTES_MAX,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StepBench {
    pub model: String,
    /// The executor's name ("tract-cpu", "wgpu: <adapter>").
    pub executor: String,
    pub batch: usize,
    pub threads: usize,
    /// The im2col budget of the step (CPU runs), bytes.
    pub im2col_bytes_max: usize,
    pub steps: u64,
    pub samples_per_s: f64,
    pub step_ms: f64,
    /// Forward FLOPs per sample (2 x multiply-adds of Gemm/MatMul/Conv).
    pub forward_flops_per_sample: f64,
    /// A training step counted as 3 x forward (forward, input and weight
    /// gradients).
    pub achieved_gflops: f64,
    /// tract's matmul on the same (im2col-equivalent) shapes (CPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matmul_baseline_gflops: Option<f64>,
    /// achieved / baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_matmul: Option<f64>,
    /// Peak resident memory of the process while this configuration
    /// compiled and trained (Linux: the high-water mark is reset before),
    /// MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// The peak while the step compiled (import, training graph, tract's
    /// optimization and plan), before any step ran, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_compile_mib: Option<f64>,
    /// Resident memory once compiled, before the first step, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_compiled_mib: Option<f64>,
    /// Resident memory after the timed steps, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_mib: Option<f64>,
    /// The most MiB of large blocks ([`crate::alloc::StepAlloc`]) mapped
    /// while the steps ran, in use or cached for the next step; absent
    /// when the process does not install that allocator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_blocks_peak_mib: Option<f64>,
    /// Resident memory when this configuration started (the binary, the
    /// data set, what earlier configurations left), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub executor: String,
    /// The GPU adapter, for GPU runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// Cores the machine offers.
    pub cores: usize,
    pub steps: Vec<StepBench>,
    /// The largest peak resident memory of any CNN configuration, MiB.
    pub peak_rss_mib_cnn: Option<f64>,
}

/// (M, K, N) of every matmul-like product in one forward pass, with conv
/// layers in their im2col form.
fn matmul_shapes(
    graph: &ModelGraph,
    batch: usize,
) -> Result<Vec<(usize, usize, usize)>, TrainError> {
    let s = infer(graph, batch)?;
    let g = graph.proto.graph.as_ref().expect("checked");
    let mut out = Vec::new();
    for n in &g.node {
        match n.op_type.as_str() {
            "Gemm" => {
                let a = s.shape(&n.input[0])?;
                let y = s.shape(&n.output[0])?;
                out.push((a[0], a[1], y[1]));
            }
            "MatMul" => {
                let a = s.shape(&n.input[0])?;
                let y = s.shape(&n.output[0])?;
                let rows: usize = a[..a.len() - 1].iter().product();
                out.push((rows, a[a.len() - 1], y[y.len() - 1]));
            }
            "Conv" => {
                let w = s.shape(&n.input[1])?;
                let y = s.shape(&n.output[0])?;
                let _ = attr_i(n, "group");
                out.push((y[0] * y[2] * y[3], w[1] * w[2] * w[3], w[0]));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn flops(shapes: &[(usize, usize, usize)]) -> f64 {
    shapes
        .iter()
        .map(|&(m, k, n)| 2.0 * (m * k * n) as f64)
        .sum()
}

/// Time tract's MatMul on the training step's products: for each forward
/// (M,K,N), the forward product and both gradient products.
fn matmul_baseline(
    shapes: &[(usize, usize, usize)],
    threads: usize,
    min_time: Duration,
) -> Result<f64, TrainError> {
    let mut nodes = Vec::new();
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut values = Vec::new();
    let mut total = 0.0;
    let mut add = |i: usize, m: usize, k: usize, n: usize| {
        let (a, b, y) = (format!("a{i}"), format!("b{i}"), format!("y{i}"));
        nodes.push(onnx::node(
            "MatMul",
            &format!("mm{i}"),
            &[&a, &b],
            &[&y],
            vec![],
        ));
        inputs.push(onnx::value_info(&a, F32, &[m, k]));
        inputs.push(onnx::value_info(&b, F32, &[k, n]));
        outputs.push(onnx::value_info(&y, F32, &[m, n]));
        values.push(Tensor::zero::<f32>(&[m, k]).expect("alloc"));
        values.push(Tensor::zero::<f32>(&[k, n]).expect("alloc"));
        total += 2.0 * (m * k * n) as f64;
    };
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        add(3 * i, m, k, n); // forward
        add(3 * i + 1, m, n, k); // input gradient
        add(3 * i + 2, k, m, n); // weight gradient
    }
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: nodes,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    let plan = crate::train::exec::plan_threads(&model, threads)?;
    let args: TVec<TValue> = values.into_iter().map(|t| t.into_tvalue()).collect();
    plan.run(args.clone()).map_err(TrainError::tract)?;
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < min_time || runs < 3 {
        plan.run(args.clone()).map_err(TrainError::tract)?;
        runs += 1;
    }
    Ok(total * runs as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Benchmark training steps of `onnx_model` at `batch` on `data` with
/// tract on one thread.
pub fn bench_model(
    name: &str,
    onnx_model: &ModelProto,
    data: &Dataset,
    batch: usize,
    min_time: Duration,
) -> Result<StepBench, TrainError> {
    let opts = BenchOptions {
        min_time,
        ..BenchOptions::default()
    };
    bench_model_on(name, onnx_model, data, batch, &opts)
}

/// One configuration of a comparison between tract and the GPU executor.
#[derive(Clone, Debug, Serialize)]
pub struct CompareRow {
    pub model: String,
    pub batch: usize,
    pub tract_samples_per_s: f64,
    pub gpu_samples_per_s: f64,
    /// gpu / tract.
    pub speedup: f64,
}

/// `fedge-device bench --compare`: both executors on the same
/// configurations.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub adapter: String,
    pub rows: Vec<CompareRow>,
    pub cpu: BenchReport,
    pub gpu: BenchReport,
}

/// Pair up the configurations two reports share.
pub fn compare_rows(cpu: &BenchReport, gpu: &BenchReport) -> Vec<CompareRow> {
    cpu.steps
        .iter()
        .filter_map(|c| {
            let g = gpu
                .steps
                .iter()
                .find(|g| g.model == c.model && g.batch == c.batch)?;
            Some(CompareRow {
                model: c.model.clone(),
                batch: c.batch,
                tract_samples_per_s: c.samples_per_s,
                gpu_samples_per_s: g.samples_per_s,
                speedup: g.samples_per_s / c.samples_per_s,
            })
        })
        .collect()
}

/// The step options the benchmark trains with (SGD, momentum 0.9).
fn step_options(batch: usize, threads: usize) -> CompileOptions {
    CompileOptions {
        batch,
        loss: Loss::SoftmaxCrossEntropy,
        optimizer: OptimizerSpec {
            momentum: 0.9,
            ..OptimizerSpec::default()
        },
        threads,
        ..CompileOptions::default()
    }
}

/// Benchmark training steps of `onnx_model` at `batch` on `data` with the
/// executor and threads `opts` ask for.
pub fn bench_model_on(
    name: &str,
    onnx_model: &ModelProto,
    data: &Dataset,
    batch: usize,
    opts: &BenchOptions,
) -> Result<StepBench, TrainError> {
    // Nothing an earlier configuration freed counts against this one.
    crate::alloc::trim();
    reset_peak_rss();
    let rss_before_mib = proc_status_mib("VmRSS:");
    let blob = import_onnx(&onnx_model.encode_to_vec())?;
    let graph = ModelGraph::from_blob(&blob)?;
    let step_opts = CompileOptions {
        im2col_bytes_max: opts.im2col_bytes_max,
        ..step_options(batch, opts.threads)
    };
    let mut ex = select_executor(opts.executor, &graph, step_opts)?;
    ex.load(&blob.params.values)?;
    drop(blob);
    // What importing left (the parameters' buffer among it) is not the
    // steps'.
    crate::alloc::trim();
    let peak_rss_compile_mib = peak_rss_mib();
    let rss_compiled_mib = proc_status_mib("VmRSS:");
    let batches = data.epoch_batches(batch, 0);
    let (mut xf, mut xi, mut y) = (Vec::new(), Vec::new(), Vec::new());
    let mut step = |ex: &mut dyn Executor, i: usize| -> Result<(), TrainError> {
        data.gather(&batches[i % batches.len()], &mut xf, &mut xi, &mut y);
        let x = match data.features {
            Features::F32(_) => Batch::F32(&xf),
            Features::I64(_) => Batch::I64(&xi),
        };
        ex.step(x, Labels::Classes(&y), 0.01).map(|_| ())
    };
    crate::alloc::reset_peak_mapped();
    step(ex.as_mut(), 0)?; // warm-up
    let start = Instant::now();
    let mut steps = 0u64;
    while start.elapsed() < opts.min_time || steps < 3 {
        step(ex.as_mut(), steps as usize + 1)?;
        steps += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let peak_rss_mib = peak_rss_mib();
    let rss_after_mib = proc_status_mib("VmRSS:");
    let step_blocks_peak_mib =
        Some(crate::alloc::mapped_bytes().1 as f64 / (1 << 20) as f64).filter(|&m| m > 0.0);
    let executor = ex.name();
    drop(ex);
    let shapes = matmul_shapes(&graph, batch)?;
    let fwd = flops(&shapes);
    let achieved = 3.0 * fwd * steps as f64 / secs / 1e9;
    let baseline = if executor == "tract-cpu" {
        Some(matmul_baseline(&shapes, opts.threads, opts.min_time)?)
    } else {
        None
    };
    Ok(StepBench {
        model: name.into(),
        executor,
        batch,
        threads: opts.threads,
        im2col_bytes_max: opts.im2col_bytes_max,
        steps,
        samples_per_s: (steps as usize * batch) as f64 / secs,
        step_ms: secs * 1e3 / steps as f64,
        forward_flops_per_sample: fwd / batch as f64,
        achieved_gflops: achieved,
        matmul_baseline_gflops: baseline,
        ratio_to_matmul: baseline.map(|b| achieved / b),
        peak_rss_mib,
        peak_rss_compile_mib,
        rss_compiled_mib,
        rss_after_mib,
        step_blocks_peak_mib,
        rss_before_mib,
    })
}

/// Time every node of tract's plan of the training step over `steps`
/// steps (after one warm-up step): where a CPU step spends its time,
/// slowest first.
pub fn profile_cpu_step(
    onnx_model: &ModelProto,
    data: &Dataset,
    batch: usize,
    threads: usize,
    steps: usize,
) -> Result<Vec<NodeTime>, TrainError> {
    let blob = import_onnx(&onnx_model.encode_to_vec())?;
    let graph = ModelGraph::from_blob(&blob)?;
    let mut ex = TractExecutor::new(&graph, step_options(batch, threads))?;
    ex.load(&blob.params.values)?;
    let batches = data.epoch_batches(batch, 0);
    let (mut xf, mut xi, mut y) = (Vec::new(), Vec::new(), Vec::new());
    let mut times = Vec::new();
    for i in 0..=steps {
        data.gather(&batches[i % batches.len()], &mut xf, &mut xi, &mut y);
        let x = match data.features {
            Features::F32(_) => Batch::F32(&xf),
            Features::I64(_) => Batch::I64(&xi),
        };
        if i == 0 {
            ex.step(x, Labels::Classes(&y), 0.01)?;
        } else {
            ex.step_profiled(x, Labels::Classes(&y), 0.01, &mut times)?;
        }
    }
    for t in &mut times {
        t.ms /= steps.max(1) as f64;
    }
    times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(times)
}

/// Reset this process's peak resident set size to its current one
/// (Linux: `/proc/self/clear_refs`), so that [`peak_rss_mib`] measures
/// what comes after. Elsewhere a no-op.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process (Linux), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_mib("VmHWM:")
}

/// A `kB` line of `/proc/self/status`, MiB.
fn proc_status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
