//! Loading a model: the built-in zoo, checking a model and compiling its
//! inference plan, running inference, and the device's access to the
//! loaded model on the blocking pool.

use std::sync::Arc;

use fedge_engine::train::exec::{Batch, TractInference};
use fedge_engine::train::import::ModelGraph;
use fedge_engine::train::onnx::F32;
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
    if graph.input_type != F32 {
        return Err(FedgeError::BadModel {
            detail:
                "the model's input is not float32 (a token model?); these bindings feed f32 inputs"
                    .into(),
        });
    }
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
    })
}

impl Loaded {
    pub(super) fn infer(&mut self, inputs: &[f32]) -> Result<InferOutput, FedgeError> {
        let per_sample = self.info.input_values_per_sample as usize;
        if inputs.is_empty() || !inputs.len().is_multiple_of(per_sample) {
            return Err(FedgeError::bad_input(format!(
                "{} input values is not a whole number of samples of {per_sample} values ({:?})",
                inputs.len(),
                self.info.input_shape
            )));
        }
        let batch = inputs.len() / per_sample;
        if batch > INFER_BATCH_MAX as usize {
            return Err(FedgeError::bad_input(format!(
                "batch of {batch} samples, at most {INFER_BATCH_MAX}"
            )));
        }
        if self.inference.batch_size() != batch {
            self.inference = TractInference::new(&self.graph, batch)?;
        }
        self.inference.load(&self.params)?;
        let values = self.inference.run(Batch::F32(inputs))?;
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
