//! Loading a model: the built-in zoo, checking a model and compiling its
//! inference plan, running inference, and the device's access to the
//! loaded model on the blocking pool.

use std::sync::Arc;

use fedge_engine::train::exec::{Batch, TractInference};
use fedge_engine::train::import::ModelGraph;
use fedge_engine::train::onnx::{F32, I64};
use fedge_engine::train::{TrainError, shape};
use fedge_proto::ModelBlob;
use prost::Message;

use super::{Device, InferOutput, Loaded, ModelInfo, lock};
use crate::boundary::blocking;
use crate::{FedgeError, INFER_BATCH_MAX};

/// The ONNX bytes of a zoo model (the seeds of `fedge_engine::zoo::all`).
pub(super) fn zoo_onnx(name: &str) -> Option<Vec<u8>> {
    let model = match name {
        "mlp" => fedge_engine::zoo::mlp(1),
        "cnn" => fedge_engine::zoo::cnn(2),
        "small_cnn" => fedge_engine::zoo::small_cnn(3),
        _ => return None,
    };
    Some(model.encode_to_vec())
}

/// Output values per sample of `graph`.
pub(super) fn outputs_per_sample(graph: &ModelGraph) -> Result<usize, TrainError> {
    Ok(shape::infer(graph, 1)?
        .shape(&graph.output)?
        .iter()
        .skip(1)
        .product())
}

/// What a model's input takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InputKind {
    /// float32 values (`Samples.inputs`, `infer`).
    F32,
    /// int64 token ids below `limit` (`Samples.tokens`, `infer_tokens`).
    Tokens { limit: usize },
}

impl InputKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            InputKind::F32 => "float32",
            InputKind::Tokens { .. } => "int64",
        }
    }
}

/// The input kind of `graph`. A token model's input must index an
/// embedding table (a `Gather` of an initializer by the input, as
/// PyTorch's `nn.Embedding` exports); every token must be below its rows,
/// checked before the engine sees it.
pub(super) fn input_kind(graph: &ModelGraph) -> Result<InputKind, FedgeError> {
    if graph.input_type == F32 {
        return Ok(InputKind::F32);
    }
    let bad = |detail: String| Err(FedgeError::BadModel { detail });
    if graph.input_type != I64 {
        return bad(format!(
            "the model's input has ONNX type {}; these bindings feed float32 or int64 inputs",
            graph.input_type
        ));
    }
    // The table is a parameter (in the layout) or a constant initializer.
    let g = graph.proto.graph.as_ref();
    let rows_of = |table: &String| -> Option<usize> {
        if let Some(t) = graph.layout.tensors().iter().find(|t| &t.name == table) {
            return t.shape.first().copied();
        }
        let init = g?.initializer.iter().find(|t| &t.name == table)?;
        init.dims.first().and_then(|&d| usize::try_from(d).ok())
    };
    let rows = g.into_iter().flat_map(|g| &g.node).filter_map(|n| {
        if n.op_type != "Gather" || n.input.get(1) != Some(&graph.input) {
            return None;
        }
        rows_of(n.input.first()?)
    });
    match rows.min() {
        Some(limit) if limit > 0 => Ok(InputKind::Tokens { limit }),
        _ => bad(
            "the model's int64 input does not index an embedding table (a Gather of an \
             initializer by the input), so token ids cannot be checked"
                .into(),
        ),
    }
}

/// Checks token ids against the model's embedding rows.
pub(super) fn check_tokens(tokens: &[i64], limit: usize) -> Result<(), FedgeError> {
    match tokens
        .iter()
        .enumerate()
        .find(|(_, t)| !(0..limit as i64).contains(*t))
    {
        Some((i, t)) => Err(FedgeError::bad_input(format!(
            "token {t} (value {i}) is not an id in 0..{limit}"
        ))),
        None => Ok(()),
    }
}

fn to_u32(what: &str, v: usize) -> Result<u32, FedgeError> {
    u32::try_from(v).map_err(|_| FedgeError::BadModel {
        detail: format!("{what} {v} does not fit in 32 bits"),
    })
}

/// Check a model and compile its batch-1 inference plan, so a model the
/// engine cannot run is refused at load.
fn load_blob(blob: ModelBlob) -> Result<Loaded, FedgeError> {
    let bad = |e: TrainError| FedgeError::BadModel {
        detail: e.to_string(),
    };
    let graph = ModelGraph::from_blob(&blob).map_err(bad)?;
    let kind = input_kind(&graph)?;
    let sample_shape = graph.sample_shape();
    let outputs = outputs_per_sample(&graph).map_err(bad)?;
    let mut inference = TractInference::new(&graph, 1).map_err(bad)?;
    inference.load(&blob.params.values).map_err(bad)?;
    let info = ModelInfo {
        version: blob.version().to_hex(),
        parameters: blob.params.values.len() as u64,
        input_shape: sample_shape
            .iter()
            .map(|&d| to_u32("input dimension", d))
            .collect::<Result<_, _>>()?,
        input_values_per_sample: to_u32("input size", sample_shape.iter().product())?,
        outputs_per_sample: to_u32("output size", outputs)?,
        input_type: kind.name().into(),
        token_limit: match kind {
            InputKind::F32 => 0,
            InputKind::Tokens { limit } => to_u32("embedding rows", limit)?,
        },
    };
    Ok(Loaded {
        params: blob.params.values.clone(),
        blob,
        graph,
        info,
        samples_since_load: 0,
        last_mean_loss: None,
        inference,
        executor: None,
        kind,
    })
}

impl Loaded {
    /// Runs a batch of float32 inputs or of token ids (whichever the
    /// model takes: the other is refused).
    pub(super) fn infer(&mut self, inputs: Batch) -> Result<InferOutput, FedgeError> {
        let (len, kind) = match inputs {
            Batch::F32(v) => (v.len(), InputKind::F32),
            Batch::I64(t) => (t.len(), InputKind::Tokens { limit: 0 }),
        };
        if kind.name() != self.kind.name() {
            return Err(FedgeError::bad_input(format!(
                "this model takes {} inputs, not {} (use {})",
                self.kind.name(),
                kind.name(),
                if self.kind == InputKind::F32 {
                    "infer"
                } else {
                    "infer_tokens"
                }
            )));
        }
        if let (Batch::I64(t), InputKind::Tokens { limit }) = (inputs, self.kind) {
            check_tokens(t, limit)?;
        }
        let per_sample = self.info.input_values_per_sample as usize;
        if len == 0 || !len.is_multiple_of(per_sample) {
            return Err(FedgeError::bad_input(format!(
                "{len} input values is not a whole number of samples of {per_sample} values ({:?})",
                self.info.input_shape
            )));
        }
        let batch = len / per_sample;
        if batch > INFER_BATCH_MAX as usize {
            return Err(FedgeError::bad_input(format!(
                "batch of {batch} samples, at most {INFER_BATCH_MAX}"
            )));
        }
        if self.inference.batch_size() != batch {
            self.inference = TractInference::new(&self.graph, batch)?;
        }
        self.inference.load(&self.params)?;
        let values = self.inference.run(inputs)?;
        Ok(InferOutput {
            batch: batch as u32,
            outputs_per_sample: self.info.outputs_per_sample,
            values,
        })
    }
}

impl Device {
    /// Run `f` on the loaded model, on the runtime's blocking pool.
    pub(super) async fn with_model<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Loaded) -> Result<T, FedgeError> + Send + 'static,
    ) -> Result<T, FedgeError> {
        let engine = Arc::clone(&self.engine);
        blocking(move || {
            let mut guard = lock(&engine)?;
            let loaded = guard.as_mut().ok_or(FedgeError::NoModel)?;
            f(loaded)
        })
        .await
    }

    /// Load `blob` (checked and compiled on the blocking pool) as the model.
    pub(super) async fn load(
        &self,
        blob: impl FnOnce() -> Result<ModelBlob, FedgeError> + Send + 'static,
    ) -> Result<ModelInfo, FedgeError> {
        let engine = Arc::clone(&self.engine);
        let info = Arc::clone(&self.info);
        blocking(move || {
            let loaded = load_blob(blob()?)?;
            let out = loaded.info.clone();
            *lock(&engine)? = Some(loaded);
            *lock(&info)? = Some(out.clone());
            Ok(out)
        })
        .await
    }
}
