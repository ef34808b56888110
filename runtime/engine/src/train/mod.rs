//! On-device training: a plain ONNX model becomes a training step that
//! tract runs.
//!
//! - [`onnx`]: helpers over tract-onnx's protobuf types.
//! - [`import`]: ONNX model -> [`fedge_proto::ModelBlob`] (graph with the
//!   weights stripped, plus the parameters in the canonical layout) and back.
//! - [`recurrent`]: LSTM and GRU unrolled into elementary ops at load.
//! - [`shape`]: static shape inference for the supported ops.
//! - [`compile`]: the training-graph compiler: forward + loss + backward +
//!   optimizer step, with parameters and optimizer state as graph inputs and
//!   outputs so one optimized tract plan serves every step.
//! - [`grad`]: one gradient rule per supported op.
//! - [`kernels`]: fedge's own tract ops (im2col, col2im, max-pool gradient,
//!   fused SGD) that the compiler uses when it lowers for tract.
//! - [`exec`]: the [`exec::Executor`] trait and the tract CPU executor.
//! - [`gpu`]: the wgpu executor (the same step as WGSL compute shaders,
//!   feature `gpu`) and the choice between it and tract.
//! - [`local`]: local training loops and evaluation over a dataset.
//! - [`lora`]: low-rank adapters on a frozen model's MatMul/Gemm weights
//!   (the adapters become the model's only parameters), and merging them
//!   back into the weights.
//!
//! **Invariant:** trainable weights are graph inputs without initializers
//! (tract-onnx would freeze an input that also has an initializer).

pub mod compile;
pub mod exec;
pub mod gpu;
pub mod grad;
pub mod import;
pub mod kernels;
pub mod local;
pub mod lora;
pub mod onnx;
pub mod recurrent;
pub mod shape;

/// Everything that can go wrong turning a model into a training step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "op `{op}` (node `{node}`) has no gradient rule, and it is on a trainable path; freeze the parameters before it or replace the op"
    )]
    UnsupportedOp { op: String, node: String },
    #[error("op `{op}` (node `{node}`): {reason}")]
    UnsupportedForm {
        op: String,
        node: String,
        reason: String,
    },
    #[error("bad model: {0}")]
    BadModel(String),
    #[error("shape of `{tensor}`: {reason}")]
    Shape { tensor: String, reason: String },
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("tract: {0}")]
    Tract(String),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
}

impl TrainError {
    pub(crate) fn tract(e: impl std::fmt::Display) -> Self {
        TrainError::Tract(format!("{e:#}"))
    }
}
