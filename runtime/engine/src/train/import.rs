//! ONNX models in and out of fedge's model blobs.
//!
//! Importing takes every float32 initializer as a parameter (in initializer
//! order: the canonical layout) and strips it from the graph; int64 and
//! bool initializers (reshape targets, masks) stay as constants, and so do
//! float initializers no gradient reaches (a causal-mask buffer compared
//! with Equal), rank-0 ones (the dynamo exporter lifts literals such as
//! attention's 1/sqrt(d) to initializers; a learnable rank-0 number, a
//! temperature, is imported as a constant too), those only ever an op's
//! constant operand (Clip's bounds, Dropout's ratio, Pow's exponent) and
//! attention masks (-inf, filled in by `Where` or added to the scores).
//! The stripped graph travels in
//! [`ModelBlob::onnx_graph`].
//!
//! # Opsets
//!
//! Models from opset 13 to 21 are accepted (PyTorch's legacy exporter
//! writes 17 by default, its dynamo exporter 18 and up). What changed
//! after 17 in the ops fedge reads, and how it is handled:
//!
//! | opset | change | handled |
//! |---|---|---|
//! | 18 | ReduceMean, ReduceMax, ... take `axes` as an input, not an attribute | shape inference and the GPU lowering read either; the compiler emits the form of the model's opset ([`super::compile::Builder::reduce_mean_last`]) |
//! | 18 | Split gains `num_outputs` | equal parts only (unequal ones need the `split` input), checked against the outputs |
//! | 18 | Pad, Resize, Col2Im, GroupNormalization, bitwise ops, ... | not supported: refused by shape inference naming op and node |
//! | 19 | AveragePool gains `dilations`; Cast gains `saturate` (float8 only) | dilated pooling has no gradient rule and is refused naming the node; `saturate` does not apply to the types fedge trains |
//! | 15 | Shape gains `start` and `end` | read by shape inference |
//! | 19-21 | Reshape, Shape, Cast, Constant, Identity, Flatten, Squeeze, Unsqueeze, Transpose accept new element types (float8, int4) | only float32 initializers become parameters; other types pass through as constants where tract runs them, and the GPU lowering refuses a type it has no representation for |
//! | 20 | Gelu (exact and tanh) | a gradient rule |
//! | 21 | GroupNormalization changes its scale and bias shapes | not supported (refused, as at 18) |

use std::sync::Arc;

use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};
use prost::Message;
use tract_onnx::pb::ModelProto;

use super::TrainError;
use super::onnx::{F32, dims, f32_values, value_info_shape};

/// Opset versions the training compiler understands.
pub const OPSET_MIN: i64 = 13;
pub const OPSET_MAX: i64 = 21;

/// `(op, input)` operands that are constants by nature: a float
/// initializer used only here is kept as a constant, not made a parameter
/// (bounds, ratios and exponents are hyperparameters).
const CONSTANT_OPERANDS: &[(&str, usize)] = &[("Clip", 1), ("Clip", 2), ("Dropout", 1), ("Pow", 1)];

/// Tensors from which one of `seeds` is reached through differentiable
/// inputs: walking the nodes backwards, the differentiable inputs of each
/// node one of whose gradient-carrying outputs is in the set.
fn reaching(
    graph: &tract_onnx::pb::GraphProto,
    seeds: std::collections::HashSet<String>,
) -> std::collections::HashSet<String> {
    let mut set = seeds;
    for n in graph.node.iter().rev() {
        if super::compile::grad_outputs(n)
            .iter()
            .any(|o| set.contains(o))
        {
            for i in super::compile::differentiable(n) {
                if let Some(x) = n.input.get(i).filter(|x| !x.is_empty()) {
                    set.insert(x.clone());
                }
            }
        }
    }
    set
}

/// Float initializers that stay constants: rank-0 ones; those no
/// gradient reaches that end in a comparison, a shape or a condition (a
/// mask buffer; one in a dead branch stays a parameter, with a zero
/// gradient); those whose every use is a constant operand
/// ([`CONSTANT_OPERANDS`]); or the value holds infinities (it cannot be a parameter) and every use
/// is a value operand of `Where` or of `Add` (an attention mask).
fn float_constants(
    graph: &tract_onnx::pb::GraphProto,
) -> Result<std::collections::HashSet<String>, TrainError> {
    let mut uses: std::collections::HashMap<&str, Vec<(&str, usize)>> = Default::default();
    for n in &graph.node {
        for (i, x) in n.input.iter().enumerate() {
            uses.entry(x.as_str())
                .or_default()
                .push((n.op_type.as_str(), i));
        }
    }
    let mut out = std::collections::HashSet::new();
    let to_output = reaching(
        graph,
        graph
            .output
            .iter()
            .take(1)
            .map(|o| o.name.clone())
            .collect(),
    );
    let non_differentiable_uses = graph
        .node
        .iter()
        .flat_map(|n| {
            let diff = super::compile::differentiable(n);
            n.input
                .iter()
                .enumerate()
                .filter(move |(i, x)| !diff.contains(i) && !x.is_empty())
                .map(|(_, x)| x.clone())
        })
        .collect();
    let to_non_differentiable = reaching(graph, non_differentiable_uses);
    for t in graph.initializer.iter().filter(|t| t.data_type == F32) {
        let Some(u) = uses.get(t.name.as_str()) else {
            continue;
        };
        if t.dims.is_empty()
            || (!to_output.contains(&t.name) && to_non_differentiable.contains(&t.name))
        {
            out.insert(t.name.clone());
            continue;
        }
        let constant_operand = u.iter().all(|use_| CONSTANT_OPERANDS.contains(use_));
        // An attention mask: -inf where attention is not allowed, filled in
        // with Where or added to the scores; infinite, never NaN.
        let masked_fill = u
            .iter()
            .all(|&(op, i)| (op == "Where" && i > 0) || op == "Add")
            && {
                let v = f32_values(t)?;
                v.iter().any(|v| v.is_infinite()) && !v.iter().any(|v| v.is_nan())
            };
        if constant_operand || masked_fill {
            out.insert(t.name.clone());
        }
    }
    Ok(out)
}

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
    let constants = float_constants(graph)?;
    for t in std::mem::take(&mut graph.initializer) {
        if t.data_type == F32 && !constants.contains(&t.name) {
            let v = f32_values(&t)?;
            // The wire refuses non-finite parameters (ModelBlob::decode):
            // refuse them here, where the user can still fix the export.
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(TrainError::BadModel(format!(
                    "initializer `{}` holds {} at index {i}",
                    t.name, v[i]
                )));
            }
            values.extend(v);
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
    /// Parameters that never train (BatchNorm running statistics).
    pub frozen_stats: std::collections::HashSet<String>,
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
        let mut mg = ModelGraph {
            input: input.name.clone(),
            input_type,
            input_shape,
            output: g
                .output
                .first()
                .ok_or_else(|| TrainError::BadModel("model has no output".into()))?
                .name
                .clone(),
            opset,
            layout: Arc::clone(&blob.params.layout),
            proto,
            frozen_stats: Default::default(),
        };
        mg.lower_recurrent()?;
        mg.lower_batch_norm()?;
        mg.check_single_assignment()?;
        Ok(mg)
    }

    /// Every tensor has one producer: a node output never repeats an input,
    /// an initializer, a parameter or another output. Gradients flow by
    /// name, so a graph that reuses one would send a gradient to a node
    /// whose inputs do not need it.
    fn check_single_assignment(&self) -> Result<(), TrainError> {
        let g = self.proto.graph.as_ref().expect("checked");
        let mut seen: std::collections::HashSet<&str> = g
            .input
            .iter()
            .map(|i| i.name.as_str())
            .chain(g.initializer.iter().map(|t| t.name.as_str()))
            .chain(self.layout.tensors().iter().map(|t| t.name.as_str()))
            .collect();
        for n in &g.node {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if !seen.insert(o) {
                    return Err(TrainError::BadModel(format!(
                        "tensor `{o}` is produced twice (node `{}`)",
                        n.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Unroll LSTM and GRU over their (static) sequence into elementary
    /// ops, which have gradient rules: per time step, the gate products
    /// (`x W^T + h R^T + biases`), Split into gates, Sigmoid and Tanh, the
    /// state updates; `Y` is the steps' `h` concatenated. Any direction,
    /// default activations, no peepholes, clip or `sequence_lens` (else
    /// refused, naming the node); the initial state is the input's or
    /// zeros.
    fn lower_recurrent(&mut self) -> Result<(), TrainError> {
        let g = self.proto.graph.as_ref().expect("checked");
        if !g
            .node
            .iter()
            .any(|n| n.op_type == "LSTM" || n.op_type == "GRU")
        {
            return Ok(());
        }
        let mut s = super::shape::seed(self, self.declared_batch())?;
        let g = self.proto.graph.as_mut().expect("checked");
        let mut nodes = Vec::with_capacity(g.node.len());
        let mut inits = Vec::new();
        for n in std::mem::take(&mut g.node) {
            if n.op_type != "LSTM" && n.op_type != "GRU" {
                super::shape::infer_node(&n, &mut s)?;
                nodes.push(n);
                continue;
            }
            let start = nodes.len();
            super::recurrent::unroll(&n, &s, &mut nodes, &mut inits)?;
            for t in &inits {
                if !s.shapes.contains_key(&t.name) {
                    s.set(&t.name, super::onnx::dims(t)?, t.data_type);
                    if t.data_type == super::onnx::I64 {
                        s.consts.insert(t.name.clone(), super::onnx::i64_values(t)?);
                    }
                }
            }
            for m in &nodes[start..] {
                super::shape::infer_node(m, &mut s)?;
            }
        }
        g.node = nodes;
        g.initializer.extend(inits);
        Ok(())
    }

    /// Rewrite inference-form BatchNormalization into elementary ops
    /// (tract wants its parameters constant; ours are graph inputs):
    /// `y = (x - mean) * (scale / sqrt(var + eps)) + bias`, per channel.
    /// The running statistics become frozen parameters.
    fn lower_batch_norm(&mut self) -> Result<(), TrainError> {
        let g = self.proto.graph.as_ref().expect("checked");
        if !g.node.iter().any(|n| n.op_type == "BatchNormalization") {
            return Ok(());
        }
        let shapes = super::shape::infer(self, self.declared_batch())?;
        let g = self.proto.graph.as_mut().expect("checked");
        let mut nodes = Vec::with_capacity(g.node.len());
        for n in std::mem::take(&mut g.node) {
            if n.op_type != "BatchNormalization" {
                nodes.push(n);
                continue;
            }
            if n.input.len() != 5
                || n.output.len() != 1
                || super::onnx::attr_i(&n, "training_mode").unwrap_or(0) != 0
            {
                return Err(TrainError::UnsupportedForm {
                    op: n.op_type.clone(),
                    node: n.name.clone(),
                    reason: "only the inference form (5 inputs, 1 output, running statistics) is supported; export the model in eval mode".into(),
                });
            }
            let rank = shapes.shape(&n.input[0])?.len();
            let c = shapes.shape(&n.input[1])?.first().copied().unwrap_or(1);
            let eps = super::onnx::attr_f(&n, "epsilon").unwrap_or(1e-5);
            let p = |s: &str| format!("{}/{s}", n.name);
            let mut target = vec![c as i64];
            target.extend(std::iter::repeat_n(1, rank.saturating_sub(2)));
            g.initializer.push(super::onnx::tensor_i64(
                &p("shape"),
                &[target.len()],
                &target,
            ));
            g.initializer
                .push(super::onnx::tensor_f32(&p("eps"), &[], &[eps]));
            let mk =
                |op: &str, ins: &[&str], out: &str| super::onnx::node(op, out, ins, &[out], vec![]);
            let (x, scale, bias, mean, var) = (
                &n.input[0],
                &n.input[1],
                &n.input[2],
                &n.input[3],
                &n.input[4],
            );
            nodes.push(mk("Reshape", &[scale, &p("shape")], &p("scale_r")));
            nodes.push(mk("Reshape", &[bias, &p("shape")], &p("bias_r")));
            nodes.push(mk("Reshape", &[mean, &p("shape")], &p("mean_r")));
            nodes.push(mk("Reshape", &[var, &p("shape")], &p("var_r")));
            nodes.push(mk("Add", &[&p("var_r"), &p("eps")], &p("var_eps")));
            nodes.push(mk("Sqrt", &[&p("var_eps")], &p("std")));
            nodes.push(mk("Div", &[&p("scale_r"), &p("std")], &p("k")));
            nodes.push(mk("Sub", &[x, &p("mean_r")], &p("centred")));
            nodes.push(mk("Mul", &[&p("centred"), &p("k")], &p("scaled")));
            nodes.push(mk("Add", &[&p("scaled"), &p("bias_r")], &n.output[0]));
            self.frozen_stats.insert(mean.clone());
            self.frozen_stats.insert(var.clone());
        }
        g.node = nodes;
        Ok(())
    }

    /// The batch the model was exported with when it is fixed, else 1:
    /// the rewrites at load infer shapes at it (a model exported with a
    /// fixed batch may reshape to it).
    fn declared_batch(&self) -> usize {
        self.input_shape.first().copied().flatten().unwrap_or(1)
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

#[cfg(test)]
mod tests {
    //! Inputs the `onnx_import` and `onnx_train` fuzz targets found
    //! (`fedge_engine::fuzzing`), each rebuilt here as the smallest model
    //! that shows the same fault: each panicked and is now a typed error
    //! (or, for the gradient, a compiled step).
    use super::*;
    use crate::train::compile::{CompileOptions, compile_training};
    use crate::train::onnx::{self, F32};
    use tract_onnx::pb::{GraphProto, NodeProto, OperatorSetIdProto, TensorProto};

    fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, outputs: &[&str]) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: vec![onnx::value_info("x", F32, &[2, 4])],
                output: outputs
                    .iter()
                    .map(|o| onnx::value_info(o, F32, &[]))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn node(op: &str, ins: &[&str], out: &str) -> NodeProto {
        onnx::node(op, out, ins, &[out], vec![])
    }

    fn compile(bytes: &[u8]) -> Result<(), TrainError> {
        let blob = import_onnx(bytes)?;
        let g = ModelGraph::from_blob(&blob)?;
        let opts = CompileOptions {
            batch: 2,
            ..CompileOptions::default()
        };
        compile_training(&g, &opts).map(|_| ())
    }

    #[test]
    fn non_finite_initializers_are_refused_at_import() {
        // onnx_import: a NaN weight imported into a blob the wire refuses.
        let w = onnx::tensor_f32("w", &[2], &[1.0, f32::NAN]);
        let bytes = model(vec![node("Mul", &["x", "w"], "y")], vec![w], &["y"]);
        let e = import_onnx(&bytes).unwrap_err().to_string();
        assert!(e.contains("initializer `w` holds NaN at index 1"), "{e}");
    }

    #[test]
    fn element_counts_past_usize_are_refused_at_import() {
        let mut w = onnx::tensor_f32("w", &[], &[]);
        w.dims = vec![1 << 32, 1 << 32];
        let bytes = model(vec![node("Mul", &["x", "w"], "y")], vec![w], &["y"]);
        let e = import_onnx(&bytes).unwrap_err().to_string();
        assert!(e.contains("more elements than usize"), "{e}");
    }

    #[test]
    fn a_downloaded_graph_without_outputs_is_a_bad_model() {
        // onnx_train: the graph of a blob, not imported, with no output.
        let bytes = model(vec![node("Relu", &["x"], "y")], vec![], &[]);
        let blob = ModelBlob {
            onnx_graph: bytes.into(),
            params: Params::zeros(Arc::new(ParamLayout::new(vec![]).unwrap())),
        };
        let e = ModelGraph::from_blob(&blob).unwrap_err().to_string();
        assert!(e.contains("no output"), "{e}");
    }

    #[test]
    fn reshape_to_more_elements_than_usize_is_a_shape_error() {
        // onnx_train: a Reshape target whose element count overflows.
        let w = onnx::tensor_f32("w", &[2, 4], &[0.5; 8]);
        let t = onnx::tensor_i64("t", &[3], &[1 << 40, 1 << 40, -1]);
        let nodes = vec![
            node("Mul", &["x", "w"], "m"),
            node("Reshape", &["m", "t"], "y"),
        ];
        let e = compile(&model(nodes, vec![w, t], &["y"])).unwrap_err();
        assert!(matches!(e, TrainError::Shape { .. }), "{e}");
    }

    #[test]
    fn pooling_with_a_one_entry_kernel_is_a_shape_error() {
        // onnx_train: MaxPool with kernel_shape [2] indexed pads[2].
        let w = onnx::tensor_f32("w", &[2, 4], &[0.5; 8]);
        let r = onnx::tensor_i64("r", &[4], &[2, 1, 2, 2]);
        let pool = onnx::node(
            "MaxPool",
            "y",
            &["r4"],
            &["y"],
            vec![onnx::ints("kernel_shape", &[2])],
        );
        let nodes = vec![
            node("Mul", &["x", "w"], "m"),
            node("Reshape", &["m", "r"], "r4"),
            pool,
        ];
        let e = compile(&model(nodes, vec![w, r], &["y"])).unwrap_err();
        assert!(e.to_string().contains("kernel_shape"), "{e}");
    }

    #[test]
    fn a_tensor_produced_twice_is_a_bad_model() {
        // onnx_train: two nodes writing `y` sent a gradient to an input
        // that needed none.
        let w = onnx::tensor_f32("w", &[2, 4], &[0.5; 8]);
        let nodes = vec![node("Mul", &["x", "w"], "y"), node("Relu", &["x"], "y")];
        let e = compile(&model(nodes, vec![w], &["y"])).unwrap_err();
        assert!(e.to_string().contains("produced twice"), "{e}");
    }

    #[test]
    fn a_bias_of_higher_rank_than_its_gemm_is_a_shape_error() {
        // onnx_train: Gemm's bias gradient summed [2, 3] down to [1, 2, 3].
        let w = onnx::tensor_f32("w", &[3, 4], &[0.5; 12]);
        let c = onnx::tensor_f32("c", &[1, 2, 3], &[0.1; 6]);
        let gemm = onnx::node(
            "Gemm",
            "y",
            &["x", "w", "c"],
            &["y"],
            vec![onnx::int("transB", 1)],
        );
        let e = compile(&model(vec![gemm], vec![w, c], &["y"])).unwrap_err();
        assert!(matches!(e, TrainError::Shape { .. }), "{e}");
    }

    #[test]
    fn a_fixed_batch_reshape_before_batch_norm_loads() {
        // The dynamo exporter without dynamic shapes writes the batch into
        // Reshape targets; the BatchNorm rewrite at load inferred shapes
        // at batch 1 and refused such a model.
        let w = onnx::tensor_f32("w", &[2, 4], &[0.5; 8]);
        let target = onnx::tensor_i64("t", &[4], &[2, 2, 2, 1]);
        let back = onnx::tensor_i64("t2", &[2], &[2, 4]);
        let stats: Vec<_> = ["s", "b", "m", "v"]
            .iter()
            .map(|n| onnx::tensor_f32(n, &[2], &[1.0, 0.5]))
            .collect();
        let mut inits = vec![w, target, back];
        inits.extend(stats);
        let nodes = vec![
            node("Mul", &["x", "w"], "m0"),
            node("Reshape", &["m0", "t"], "r"),
            onnx::node(
                "BatchNormalization",
                "bn",
                &["r", "s", "b", "m", "v"],
                &["n"],
                vec![],
            ),
            node("Reshape", &["n", "t2"], "y"),
        ];
        compile(&model(nodes, inits, &["y"])).unwrap();
    }

    #[test]
    fn constant_operands_beside_a_parameter_get_no_gradient() {
        // onnx_train: Concat gives a gradient to every operand, also to a
        // constant; the compiler asserted that only needed ones come back.
        let w = onnx::tensor_f32("w", &[2, 4], &[0.5; 8]);
        let c = onnx::tensor_f32("c", &[2, 4], &[1.0; 8]);
        let constant = onnx::node(
            "Constant",
            "c",
            &[],
            &["c"],
            vec![tract_onnx::pb::AttributeProto {
                name: "value".into(),
                t: Some(c),
                ..Default::default()
            }],
        );
        let concat = onnx::node(
            "Concat",
            "y",
            &["m", "c"],
            &["y"],
            vec![onnx::int("axis", 1)],
        );
        let nodes = vec![node("Mul", &["x", "w"], "m"), constant, concat];
        compile(&model(nodes, vec![w], &["y"])).unwrap();
    }
}
