//! ONNX models in and out of fedge's model blobs.
//!
//! Importing takes every float32 initializer as a parameter (in initializer
//! order: the canonical layout) and strips it from the graph; int64
//! initializers (reshape targets and the like) stay as constants. The
//! stripped graph travels in [`ModelBlob::onnx_graph`].

use std::sync::Arc;

use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};
use prost::Message;
use tract_onnx::pb::ModelProto;

use super::TrainError;
use super::onnx::{F32, dims, f32_values, value_info_shape};

/// Opset versions the training compiler understands.
pub const OPSET_MIN: i64 = 13;
pub const OPSET_MAX: i64 = 17;

pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, TrainError> {
    ModelProto::decode(bytes).map_err(|e| TrainError::BadModel(format!("not an ONNX model: {e}")))
}

/// The default-domain opset of a model.
pub fn opset(m: &ModelProto) -> i64 {
    m.opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

/// Import an ONNX model (weights as initializers, as PyTorch exports it).
pub fn import_onnx(bytes: &[u8]) -> Result<ModelBlob, TrainError> {
    let mut model = decode_model(bytes)?;
    let op = opset(&model);
    if !(OPSET_MIN..=OPSET_MAX).contains(&op) {
        return Err(TrainError::BadModel(format!(
            "opset {op} is not supported: export with an opset in {OPSET_MIN}..={OPSET_MAX}"
        )));
    }
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| TrainError::BadModel("model has no graph".into()))?;
    let mut specs = Vec::new();
    let mut values = Vec::new();
    let mut kept = Vec::new();
    for t in std::mem::take(&mut graph.initializer) {
        if t.data_type == F32 {
            values.extend(f32_values(&t)?);
            specs.push(TensorSpec::new(t.name.clone(), &dims(&t)?));
        } else {
            kept.push(t);
        }
    }
    graph.initializer = kept;
    let names: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    graph.input.retain(|i| !names.contains(i.name.as_str()));
    if graph.input.len() != 1 {
        return Err(TrainError::BadModel(format!(
            "expected exactly one data input besides the weights, found {}",
            graph.input.len()
        )));
    }
    if graph.output.is_empty() {
        return Err(TrainError::BadModel("model has no output".into()));
    }
    let layout =
        Arc::new(ParamLayout::new(specs).map_err(|e| TrainError::BadModel(e.to_string()))?);
    let params = Params::new(layout, values).map_err(|e| TrainError::BadModel(e.to_string()))?;
    Ok(ModelBlob {
        onnx_graph: model.encode_to_vec().into(),
        params,
    })
}

/// A model blob back to a self-contained ONNX model (weights as initializers).
pub fn export_onnx(blob: &ModelBlob) -> Result<Vec<u8>, TrainError> {
    let mut model = decode_model(&blob.onnx_graph)?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| TrainError::BadModel("model has no graph".into()))?;
    let layout = &blob.params.layout;
    for (i, t) in layout.tensors().iter().enumerate() {
        graph.initializer.push(super::onnx::tensor_f32(
            &t.name,
            &t.shape,
            &blob.params.values[layout.range(i)],
        ));
    }
    Ok(model.encode_to_vec())
}

/// What the training compiler needs to know about a stripped model.
#[derive(Clone, Debug)]
pub struct ModelGraph {
    pub proto: ModelProto,
    pub opset: i64,
    pub input: String,
    pub input_type: i32,
    /// Input shape; the first dimension is the batch (None when symbolic).
    pub input_shape: Vec<Option<usize>>,
    pub output: String,
    pub layout: Arc<ParamLayout>,
}

impl ModelGraph {
    pub fn from_blob(blob: &ModelBlob) -> Result<Self, TrainError> {
        if blob.onnx_graph.is_empty() {
            return Err(TrainError::BadModel(
                "this model blob carries no ONNX graph (parameters only)".into(),
            ));
        }
        let proto = decode_model(&blob.onnx_graph)?;
        let opset = opset(&proto);
        if !(OPSET_MIN..=OPSET_MAX).contains(&opset) {
            return Err(TrainError::BadModel(format!(
                "opset {opset} is not supported"
            )));
        }
        let g = proto
            .graph
            .as_ref()
            .ok_or_else(|| TrainError::BadModel("model has no graph".into()))?;
        let input = g
            .input
            .first()
            .ok_or_else(|| TrainError::BadModel("model has no data input".into()))?;
        let (input_type, input_shape) = value_info_shape(input).ok_or_else(|| {
            TrainError::BadModel(format!("input `{}` has no tensor type", input.name))
        })?;
        if input_shape.iter().skip(1).any(|d| d.is_none()) {
            return Err(TrainError::BadModel(format!(
                "input `{}` must have static dimensions after the batch",
                input.name
            )));
        }
        Ok(ModelGraph {
            input: input.name.clone(),
            input_type,
            input_shape,
            output: g.output[0].name.clone(),
            opset,
            layout: Arc::clone(&blob.params.layout),
            proto,
        })
    }

    /// Shape of one sample (input shape without the batch).
    pub fn sample_shape(&self) -> Vec<usize> {
        self.input_shape
            .iter()
            .skip(1)
            .map(|d| d.expect("checked static"))
            .collect()
    }
}
