//! The GPU executor: the same compiled training step (forward, loss,
//! backward, optimizer update) that tract runs, interpreted node by node
//! as WGSL compute shaders through wgpu (Vulkan, Metal, DX12).
//!
//! - [`lower`]: the training graph becomes a list of kernel launches over
//!   32-bit buffers, with all shapes and parameter words fixed up front and
//!   temporaries packed by liveness. No GPU needed.
//! - `device` (feature `gpu`): the process-wide wgpu device and its
//!   compiled pipelines; `executor`: [`GpuExecutor`], the
//!   [`Executor`](super::exec::Executor) implementation.
//! - `kernels/*.wgsl`: one small family of kernels per op class: tiled
//!   matmul (Gemm, MatMul) and implicit-GEMM convolution (Conv and the
//!   ConvTranspose of its input gradient) sharing one shared-memory core;
//!   broadcasting element-wise ops; strided copies (Transpose, Expand,
//!   Slice, Concat); reductions, softmax, layer norm, cumulative sum;
//!   pooling; gather.
//!
//! Parameters and optimizer state live on the GPU across steps: a step
//! uploads the batch, the labels and two scalars (learning rate, decoupled
//! weight decay), and reads back the loss (4 bytes); `params()` reads the
//! weights back.
//!
//! This module also chooses an executor ([`ExecutorKind`],
//! [`select_executor`]) and is compiled with or without the `gpu` feature;
//! without it, asking for the GPU is a typed error and `auto` is the CPU.
//!
//! **Invariant:** the GPU executor agrees with tract on every zoo model
//! (losses and parameters within a relative 1e-3 after 20 steps,
//! `runtime/engine/tests/gpu.rs`).

use std::fmt;
use std::str::FromStr;

use super::TrainError;
use super::compile::CompileOptions;
use super::exec::{Executor, TractExecutor};
use super::import::ModelGraph;

pub mod lower;

#[cfg(feature = "gpu")]
mod device;
#[cfg(feature = "gpu")]
mod executor;

#[cfg(feature = "gpu")]
pub use device::{AdapterSummary, adapter};
#[cfg(feature = "gpu")]
pub use executor::GpuExecutor;

/// What can go wrong on the GPU path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found ({reason}); install a Vulkan driver (on Debian/Ubuntu Mesa's software one: `apt-get install mesa-vulkan-drivers libvulkan1`, as ci/setup.sh does) or use --executor cpu"
    )]
    NoAdapter { reason: String },
    #[error(
        "this build has no GPU executor: build fedge-device (or fedge-engine) with its `gpu` feature (on by default)"
    )]
    NotBuilt,
    #[error("the GPU executor has no kernel for op `{op}` (node `{node}`)")]
    UnsupportedOp { op: String, node: String },
    #[error("the GPU executor cannot run op `{op}` (node `{node}`): {reason}")]
    UnsupportedForm {
        op: String,
        node: String,
        reason: String,
    },
    #[error("GPU device error: {0}")]
    Device(String),
    #[error(
        "the GPU adapter is `{name}`, a software renderer slower than tract; --executor gpu runs on it anyway"
    )]
    SoftwareOnly { name: String },
}

/// Which executor runs training steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExecutorKind {
    /// tract on the CPU.
    #[default]
    Cpu,
    /// wgpu; an error when no GPU is usable.
    Gpu,
    /// wgpu when a hardware GPU is usable for this model, else tract
    /// (with a warning).
    Auto,
}

impl FromStr for ExecutorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(ExecutorKind::Cpu),
            "gpu" => Ok(ExecutorKind::Gpu),
            "auto" => Ok(ExecutorKind::Auto),
            o => Err(format!("executor `{o}`: expected cpu, gpu or auto")),
        }
    }
}

impl fmt::Display for ExecutorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecutorKind::Cpu => "cpu",
            ExecutorKind::Gpu => "gpu",
            ExecutorKind::Auto => "auto",
        })
    }
}

/// The outcome of [`resolve`].
#[derive(Debug)]
pub enum Resolved<T> {
    Gpu(T),
    /// Run on the CPU; `fallback` says why the GPU was not used when it
    /// was considered.
    Cpu {
        fallback: Option<TrainError>,
    },
}

/// Decide between the GPU and the CPU. `try_gpu` builds the GPU executor
/// (it runs only when the GPU is asked for or considered): with `Gpu`
/// its error is the answer; with `Auto` a GPU error (no adapter, an op
/// without a kernel, a device error) falls back to the CPU, while other
/// errors (a bad model) are returned, since the CPU would fail the same way.
pub fn resolve<T>(
    kind: ExecutorKind,
    try_gpu: impl FnOnce() -> Result<T, TrainError>,
) -> Result<Resolved<T>, TrainError> {
    match kind {
        ExecutorKind::Cpu => Ok(Resolved::Cpu { fallback: None }),
        ExecutorKind::Gpu => try_gpu().map(Resolved::Gpu),
        ExecutorKind::Auto => match try_gpu() {
            Ok(t) => Ok(Resolved::Gpu(t)),
            Err(e @ TrainError::Gpu(_)) => Ok(Resolved::Cpu { fallback: Some(e) }),
            Err(e) => Err(e),
        },
    }
}

/// The adapter the GPU executor runs on, for reports.
pub fn adapter_name() -> Result<String, GpuError> {
    #[cfg(feature = "gpu")]
    {
        adapter().map(|a| a.to_string())
    }
    #[cfg(not(feature = "gpu"))]
    {
        Err(GpuError::NotBuilt)
    }
}

/// Build the GPU executor for `graph`, or say why not.
pub fn gpu_executor(
    graph: &ModelGraph,
    opts: CompileOptions,
) -> Result<Box<dyn Executor>, TrainError> {
    #[cfg(feature = "gpu")]
    {
        Ok(Box::new(GpuExecutor::new(graph, opts)?))
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (graph, opts);
        Err(GpuError::NotBuilt.into())
    }
}

/// The GPU executor if the adapter is real hardware: `auto` does not pick
/// a software renderer (lavapipe, WARP) over tract.
fn hardware_gpu_executor(
    graph: &ModelGraph,
    opts: CompileOptions,
) -> Result<Box<dyn Executor>, TrainError> {
    #[cfg(feature = "gpu")]
    {
        let a = adapter()?;
        if a.software {
            return Err(GpuError::SoftwareOnly {
                name: a.to_string(),
            }
            .into());
        }
    }
    gpu_executor(graph, opts)
}

/// The executor `kind` asks for. With `Auto`, a GPU that cannot be used
/// (none, a software renderer only, an op without a kernel) is logged as
/// a warning and tract runs instead.
pub fn select_executor(
    kind: ExecutorKind,
    graph: &ModelGraph,
    opts: CompileOptions,
) -> Result<Box<dyn Executor>, TrainError> {
    let try_gpu = || match kind {
        ExecutorKind::Auto => hardware_gpu_executor(graph, opts.clone()),
        _ => gpu_executor(graph, opts.clone()),
    };
    match resolve(kind, try_gpu)? {
        Resolved::Gpu(ex) => Ok(ex),
        Resolved::Cpu { fallback } => {
            if let Some(e) = fallback {
                tracing::warn!("GPU executor unavailable, training on the CPU with tract: {e}");
            }
            Ok(Box::new(TractExecutor::new(graph, opts)?))
        }
    }
}
