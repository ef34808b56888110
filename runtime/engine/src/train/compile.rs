//! The training-graph compiler.
//!
//! From a stripped inference graph ([`ModelGraph`]) it builds one ONNX
//! model that does a whole training step: the user's forward nodes, the
//! loss, the backward pass (one rule per op, [`super::grad`]) and the
//! optimizer update. Parameters, optimizer state, the learning rate and
//! (for FedProx) the global weights are graph inputs; the loss, the new
//! parameters and the new state are outputs. tract optimizes it once and
//! the plan serves every step.

use std::collections::{HashMap, HashSet};

use fedge_proto::msg::{Loss, Optimizer};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};

use super::TrainError;
use super::grad;
use super::import::ModelGraph;
use super::onnx::{self, F32, I64};
use super::shape::{Shapes, infer, infer_node};

mod builder;
mod loss;
pub use builder::Builder;

/// Optimizer settings baked into the step graph (the learning rate is an
/// input, so schedules need no recompile).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerSpec {
    pub kind: Optimizer,
    pub momentum: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            kind: Optimizer::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerSpec {
    /// State tensors kept per trainable parameter.
    pub fn state_per_param(&self) -> usize {
        match self.kind {
            Optimizer::Sgd if self.momentum > 0.0 => 1,
            Optimizer::Sgd => 0,
            Optimizer::Adam | Optimizer::AdamW => 2,
        }
    }
}

/// What the compiled graph computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A full step: outputs loss, new parameters, new optimizer state.
    Step,
    /// Outputs the loss and the gradient of each trainable parameter.
    Gradients,
}

/// Which ops the backward pass and the optimizer update are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Lowering {
    /// For tract on the CPU: conv gradients as one im2col / col2im matrix
    /// product each, max-pool gradients and the SGD update as single fused
    /// ops ([`super::kernels`]).
    #[default]
    Tract,
    /// Standard ONNX ops only (ConvTranspose, transposed Conv, Equal +
    /// CumSum masks, element-wise updates): what the GPU executor
    /// interprets.
    Portable,
}

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub batch: usize,
    pub loss: Loss,
    pub optimizer: OptimizerSpec,
    /// Parameter-name patterns (`*` wildcards) kept frozen.
    pub freeze: Vec<String>,
    pub fedprox_mu: f32,
    pub mode: Mode,
    pub lowering: Lowering,
    /// CPU threads for tract's matrix products (1: the calling thread
    /// only). The GPU executor ignores it.
    pub threads: usize,
    /// Tract lowering: the most bytes of im2col patches a convolution
    /// holds at once (packed for the weight gradient's product, or
    /// materialized for a grouped convolution); a larger batch runs in
    /// chunks of images, so the patches of one chunk live only while its
    /// products run.
    pub im2col_bytes_max: usize,
}

/// Default [`CompileOptions::im2col_bytes_max`]: 2 MiB keeps a weight
/// gradient's product long (three 14x14 images of the CNN's second layer,
/// an inner dimension of 588) and its packed patches in cache-sized pieces.
pub const IM2COL_BYTES_MAX: usize = 2 << 20;

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            batch: 32,
            loss: Loss::SoftmaxCrossEntropy,
            optimizer: OptimizerSpec::default(),
            freeze: Vec::new(),
            fedprox_mu: 0.0,
            mode: Mode::Step,
            lowering: Lowering::default(),
            threads: 1,
            im2col_bytes_max: IM2COL_BYTES_MAX,
        }
    }
}

/// Names of the extra graph inputs and outputs.
pub const LABELS: &str = "fedge.labels";
pub const LR: &str = "fedge.lr";
pub const WD_STEP: &str = "fedge.wd_step";
pub const LOSS: &str = "fedge.loss";

/// A compiled training step and how to feed it.
#[derive(Clone, Debug)]
pub struct TrainingGraph {
    pub model: ModelProto,
    pub mode: Mode,
    pub batch: usize,
    pub input_shape: Vec<usize>,
    pub input_type: i32,
    pub label_shape: Vec<usize>,
    pub label_type: i32,
    /// Indices (in the layout) of the trainable parameters.
    pub trainable: Vec<usize>,
    pub state_per_param: usize,
    pub prox: bool,
}

/// `*` wildcard match of a parameter name.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            let Some(pos) = rest.find(p) else {
                return false;
            };
            rest = &rest[pos + p.len()..];
        }
    }
    true
}

/// Inputs of `node` through which gradients flow.
///
/// Cast passes a gradient only when it casts to float32 (a float path the
/// exporter re-typed); a cast to an integer or bool stops it, as the
/// comparisons do.
pub(crate) fn differentiable(node: &NodeProto) -> Vec<usize> {
    match node.op_type.as_str() {
        "Shape" | "Constant" | "Equal" | "Greater" | "Less" | "Mod" => vec![],
        "Cast" if onnx::attr_i(node, "to") == Some(F32 as i64) => vec![0],
        "Cast" => vec![],
        "Reshape" | "Gather" | "Expand" | "Slice" | "Unsqueeze" | "Squeeze" | "Dropout"
        | "Split" | "Trilu" => vec![0],
        "Where" => vec![1, 2],
        _ => (0..node.input.len()).collect(),
    }
}

/// Outputs of `node` that carry a gradient: every part of a Split and
/// every output of LSTM and GRU (unrolled at load, but not yet when a model
/// is imported), else the first output only (Dropout's mask carries none).
pub(crate) fn grad_outputs(node: &NodeProto) -> &[String] {
    match node.op_type.as_str() {
        "Split" | "LSTM" | "GRU" => &node.output,
        _ => &node.output[..node.output.len().min(1)],
    }
}

/// Whether the step's SGD updates may be fused into dense layers' weight
/// gradients (FedgeGemmSgd): tract, SGD with enough momentum, no weight
/// decay, no FedProx.
fn fuse_gemm_sgd(opts: &CompileOptions) -> bool {
    let o = &opts.optimizer;
    opts.mode == Mode::Step
        && opts.lowering == Lowering::Tract
        && o.kind == Optimizer::Sgd
        && o.momentum >= super::kernels::GEMM_SGD_MOMENTUM_MIN
        && o.weight_decay == 0.0
        && opts.fedprox_mu <= 0.0
}

/// How many times each tensor is an input of the graph's nodes.
fn input_uses(g: &GraphProto) -> HashMap<&str, usize> {
    let mut uses = HashMap::new();
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *uses.entry(i.as_str()).or_insert(0) += 1;
        }
    }
    uses
}

/// A `Gemm` (transA=0) whose operand B is a trainable weight used by
/// nothing else: its gradient is `alpha p^T q` with `(p, q)` the output
/// gradient and the input (transB=1) or the other way round, computed by
/// FedgeGemmSgd together with the update. Returns the weight's name and
/// `(p, q, alpha)`.
fn fusable_gemm(
    n: &NodeProto,
    gys: &[Option<String>],
    needs: &[bool],
    uses: &HashMap<&str, usize>,
    layout: &fedge_proto::ParamLayout,
    trainable: &[usize],
) -> Option<(String, (String, String, f32))> {
    if n.op_type != "Gemm" || onnx::attr_i(n, "transA").unwrap_or(0) != 0 || !*needs.get(1)? {
        return None;
    }
    let w = n.input.get(1)?;
    let gy = gys.first()?.clone()?;
    let is_trainable = trainable.iter().any(|&i| &layout.tensors()[i].name == w);
    if !is_trainable || uses.get(w.as_str()) != Some(&1) {
        return None;
    }
    let a = n.input[0].clone();
    let alpha = onnx::attr_f(n, "alpha").unwrap_or(1.0);
    let pq = if onnx::attr_i(n, "transB").unwrap_or(0) != 0 {
        (gy, a)
    } else {
        (a, gy)
    };
    Some((w.clone(), (pq.0, pq.1, alpha)))
}

/// The inference graph with parameters as inputs, for a fixed batch.
pub fn compile_inference(graph: &ModelGraph, batch: usize) -> Result<ModelProto, TrainError> {
    let s = infer(graph, batch)?;
    let g = graph.proto.graph.as_ref().expect("checked");
    let mut inputs = vec![onnx::value_info(
        &graph.input,
        graph.input_type,
        s.shape(&graph.input)?,
    )];
    for t in graph.layout.tensors() {
        inputs.push(onnx::value_info(&t.name, F32, &t.shape));
    }
    let out = s.shape(&graph.output)?.to_vec();
    Ok(model_proto(
        graph,
        GraphProto {
            name: "fedge-inference".into(),
            node: g.node.clone(),
            initializer: g.initializer.clone(),
            input: inputs,
            output: vec![onnx::value_info(&graph.output, F32, &out)],
            ..Default::default()
        },
    ))
}

fn model_proto(graph: &ModelGraph, g: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: 8,
        producer_name: "fedge".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: graph.opset,
        }],
        graph: Some(g),
        ..Default::default()
    }
}

/// Build the training step (or gradient) graph.
pub fn compile_training(
    graph: &ModelGraph,
    opts: &CompileOptions,
) -> Result<TrainingGraph, TrainError> {
    if opts.batch == 0 {
        return Err(TrainError::BadInput("batch size must be at least 1".into()));
    }
    let s = infer(graph, opts.batch)?;
    let g = graph.proto.graph.as_ref().expect("checked");
    let layout = &graph.layout;

    // Which parameters train: not frozen by pattern, not a BatchNorm
    // running statistic.
    let bn_stats = &graph.frozen_stats;
    let trainable: Vec<usize> = layout
        .tensors()
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            !bn_stats.contains(&t.name) && !opts.freeze.iter().any(|p| pattern_matches(p, &t.name))
        })
        .map(|(i, _)| i)
        .collect();
    if trainable.is_empty() {
        return Err(TrainError::BadInput(
            "every parameter is frozen: nothing to train".into(),
        ));
    }

    // Forward: which tensors depend on a trainable parameter.
    let mut requires: HashSet<String> = trainable
        .iter()
        .map(|&i| layout.tensors()[i].name.clone())
        .collect();
    for n in &g.node {
        let diff = differentiable(n);
        if diff
            .iter()
            .any(|&i| n.input.get(i).is_some_and(|x| requires.contains(x)))
        {
            if !grad::has_rule(&n.op_type) {
                return Err(TrainError::UnsupportedOp {
                    op: n.op_type.clone(),
                    node: n.name.clone(),
                });
            }
            requires.extend(grad_outputs(n).iter().cloned());
        }
    }
    if !requires.contains(&graph.output) {
        return Err(TrainError::BadInput(
            "the output does not depend on any trainable parameter".into(),
        ));
    }

    let mut b = Builder::new(s, opts.lowering);
    b.opset = graph.opset;
    b.im2col_bytes_max = opts.im2col_bytes_max;
    // Forward: the user's nodes, some computed fedge's way for tract.
    for n in &g.node {
        if opts.lowering == Lowering::Tract && grad::lower_forward(&mut b, n)? {
            continue;
        }
        b.nodes.push(n.clone());
    }
    let out_shape = b.shape(&graph.output);

    // Loss and its gradient with respect to the output.
    let (label_shape, label_type) = loss::label_spec(opts.loss, graph, opts.batch, &out_shape)?;
    b.s.set(LABELS, label_shape.clone(), label_type);
    let last_op = g
        .node
        .iter()
        .find(|n| n.output.first() == Some(&graph.output))
        .map(|n| n.op_type.clone());
    let (loss, g_out) = loss::emit(&mut b, opts.loss, graph, opts.batch, last_op.as_deref())?;
    b.op_named("Identity", &[&loss], vec![], LOSS)?;

    // Dense layers whose weight gradient goes straight into the update
    // (FedgeGemmSgd): weight -> (p, q, alpha), see `fusable_gemm`.
    let fuse = fuse_gemm_sgd(opts);
    let mut fused: HashMap<String, (String, String, f32)> = HashMap::new();
    let uses = input_uses(g);

    // Backward, in reverse topological order, accumulating gradients.
    let mut grads: HashMap<String, String> = HashMap::new();
    grads.insert(graph.output.clone(), g_out);
    for n in g.node.iter().rev() {
        let Some(out) = n.output.first() else {
            continue;
        };
        if !requires.contains(out) {
            continue;
        }
        let gys: Vec<Option<String>> = grad_outputs(n)
            .iter()
            .map(|o| grads.get(o).cloned())
            .collect();
        if gys.iter().all(Option::is_none) {
            continue; // this node does not reach the loss
        }
        let diff = differentiable(n);
        let needs: Vec<bool> = (0..n.input.len())
            .map(|i| diff.contains(&i) && requires.contains(&n.input[i]))
            .collect();
        let mut rule_needs = needs.clone();
        if let Some((w, pq)) = fuse
            .then(|| fusable_gemm(n, &gys, &needs, &uses, layout, &trainable))
            .flatten()
        {
            rule_needs[1] = false;
            fused.insert(w, pq);
        }
        let gx = grad::backward(&mut b, n, &gys, &rule_needs)?;
        for (i, gi) in gx.into_iter().enumerate() {
            // A rule may also give the gradient of an input that needs
            // none (a constant beside a parameter); it is dropped.
            let Some(gi) = gi.filter(|_| needs[i]) else {
                continue;
            };
            let name = &n.input[i];
            let acc = match grads.remove(name) {
                Some(prev) => b.binary("Add", &prev, &gi)?,
                None => gi,
            };
            grads.insert(name.clone(), acc);
        }
    }

    let mut inputs = vec![
        onnx::value_info(&graph.input, graph.input_type, &b.shape(&graph.input)),
        onnx::value_info(LABELS, label_type, &label_shape),
    ];
    let mut outputs = vec![onnx::value_info(LOSS, F32, &[])];
    let state_per_param = if opts.mode == Mode::Step {
        opts.optimizer.state_per_param()
    } else {
        0
    };
    let prox = opts.mode == Mode::Step && opts.fedprox_mu > 0.0;
    if opts.mode == Mode::Step {
        inputs.push(onnx::value_info(LR, F32, &[]));
        inputs.push(onnx::value_info(WD_STEP, F32, &[]));
        b.s.set(LR, vec![], F32);
        b.s.set(WD_STEP, vec![], F32);
    }
    for t in layout.tensors() {
        inputs.push(onnx::value_info(&t.name, F32, &t.shape));
    }
    let mut state_inputs = Vec::new();
    let mut state_outputs = Vec::new();
    let mut prox_inputs = Vec::new();
    let mut param_outputs = Vec::new();
    for &i in &trainable {
        let t = &layout.tensors()[i];
        let w = t.name.as_str();
        if let Some((p, q, alpha)) = fused.get(w) {
            let o = &opts.optimizer;
            let v = format!("fedge.state.{w}.v");
            b.s.set(&v, t.shape.clone(), F32);
            state_inputs.push(onnx::value_info(&v, F32, &t.shape));
            let (new_w, new_v) = (format!("fedge.new.{w}"), format!("fedge.new_state.{w}.v"));
            b.fedge_op_named(
                super::kernels::GEMM_SGD,
                &[w, &v, p, q, LR],
                vec![
                    onnx::float("momentum", o.momentum),
                    onnx::float("alpha", *alpha),
                ],
                &[&new_w, &new_v],
            )?;
            state_outputs.push(onnx::value_info(&new_v, F32, &t.shape));
            param_outputs.push(onnx::value_info(&new_w, F32, &t.shape));
            continue;
        }
        let grad = match grads.get(w) {
            Some(gname) => gname.clone(),
            None => {
                // Unused by the loss: a zero gradient.
                let z = b.scalar(0.0);
                let sh: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                let sh = b.const_i64(&sh);
                b.op("Expand", &[&z, &sh], vec![])?
            }
        };
        if opts.mode == Mode::Gradients {
            let out = format!("fedge.grad.{w}");
            b.op_named("Identity", &[&grad], vec![], &out)?;
            outputs.push(onnx::value_info(&out, F32, &t.shape));
            continue;
        }
        let mut gr = grad;
        if prox {
            let wg = format!("fedge.global.{w}");
            b.s.set(&wg, t.shape.clone(), F32);
            prox_inputs.push(onnx::value_info(&wg, F32, &t.shape));
            let d = b.binary("Sub", w, &wg)?;
            let pd = b.scale(&d, opts.fedprox_mu)?;
            gr = b.binary("Add", &gr, &pd)?;
        }
        let new_w = format!("fedge.new.{w}");
        let o = &opts.optimizer;
        match o.kind {
            Optimizer::Sgd if o.momentum > 0.0 && opts.lowering == Lowering::Tract => {
                // One pass: v' = mu v + g + wd w, w' = w - lr v'.
                let v = format!("fedge.state.{w}.v");
                b.s.set(&v, t.shape.clone(), F32);
                state_inputs.push(onnx::value_info(&v, F32, &t.shape));
                let new_v = format!("fedge.new_state.{w}.v");
                b.fedge_op_named(
                    super::kernels::SGD,
                    &[w, &v, &gr, LR],
                    vec![
                        onnx::float("momentum", o.momentum),
                        onnx::float("weight_decay", o.weight_decay),
                    ],
                    &[&new_w, &new_v],
                )?;
                state_outputs.push(onnx::value_info(&new_v, F32, &t.shape));
            }
            Optimizer::Sgd => {
                if o.weight_decay > 0.0 {
                    let wd = b.scale(w, o.weight_decay)?;
                    gr = b.binary("Add", &gr, &wd)?;
                }
                let step_dir = if o.momentum > 0.0 {
                    let v = format!("fedge.state.{w}.v");
                    b.s.set(&v, t.shape.clone(), F32);
                    state_inputs.push(onnx::value_info(&v, F32, &t.shape));
                    let mv = b.scale(&v, o.momentum)?;
                    let new_v = format!("fedge.new_state.{w}.v");
                    b.op_named("Add", &[&mv, &gr], vec![], &new_v)?;
                    state_outputs.push(onnx::value_info(&new_v, F32, &t.shape));
                    new_v
                } else {
                    gr
                };
                let upd = b.binary("Mul", &step_dir, LR)?;
                b.op_named("Sub", &[w, &upd], vec![], &new_w)?;
            }
            Optimizer::Adam | Optimizer::AdamW => {
                if o.kind == Optimizer::Adam && o.weight_decay > 0.0 {
                    let wd = b.scale(w, o.weight_decay)?;
                    gr = b.binary("Add", &gr, &wd)?;
                }
                let (m, v) = (format!("fedge.state.{w}.m"), format!("fedge.state.{w}.v"));
                for name in [&m, &v] {
                    b.s.set(name, t.shape.clone(), F32);
                    state_inputs.push(onnx::value_info(name, F32, &t.shape));
                }
                let (new_m, new_v) = (
                    format!("fedge.new_state.{w}.m"),
                    format!("fedge.new_state.{w}.v"),
                );
                let bm = b.scale(&m, o.beta1)?;
                let gm = b.scale(&gr, 1.0 - o.beta1)?;
                b.op_named("Add", &[&bm, &gm], vec![], &new_m)?;
                let bv = b.scale(&v, o.beta2)?;
                let g2 = b.binary("Mul", &gr, &gr)?;
                let g2 = b.scale(&g2, 1.0 - o.beta2)?;
                b.op_named("Add", &[&bv, &g2], vec![], &new_v)?;
                state_outputs.push(onnx::value_info(&new_m, F32, &t.shape));
                state_outputs.push(onnx::value_info(&new_v, F32, &t.shape));
                let sq = b.unary("Sqrt", &new_v)?;
                let eps = b.scalar(o.eps);
                let den = b.binary("Add", &sq, &eps)?;
                let ratio = b.binary("Div", &new_m, &den)?;
                let upd = b.binary("Mul", &ratio, LR)?;
                if o.kind == Optimizer::AdamW && o.weight_decay > 0.0 {
                    let decay = b.binary("Mul", w, WD_STEP)?;
                    let upd2 = b.binary("Add", &upd, &decay)?;
                    b.op_named("Sub", &[w, &upd2], vec![], &new_w)?;
                } else {
                    b.op_named("Sub", &[w, &upd], vec![], &new_w)?;
                }
            }
        }
        param_outputs.push(onnx::value_info(&new_w, F32, &t.shape));
    }
    inputs.extend(state_inputs);
    inputs.extend(prox_inputs);
    outputs.extend(param_outputs);
    outputs.extend(state_outputs);

    let nodes = b.nodes;
    let mut inits = g.initializer.clone();
    inits.extend(b.inits);
    let mut model = model_proto(
        graph,
        GraphProto {
            name: "fedge-training-step".into(),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        },
    );
    if opts.lowering == Lowering::Tract {
        model.opset_import.push(OperatorSetIdProto {
            domain: super::kernels::DOMAIN.into(),
            version: 1,
        });
    }
    let mut input_shape = vec![opts.batch];
    input_shape.extend(graph.sample_shape());
    Ok(TrainingGraph {
        model,
        mode: opts.mode,
        batch: opts.batch,
        input_shape,
        input_type: graph.input_type,
        label_shape,
        label_type,
        trainable,
        state_per_param,
        prox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_patterns() {
        for (p, n, m) in [
            ("fc1.weight", "fc1.weight", true),
            ("fc1.*", "fc1.bias", true),
            ("*.bias", "fc2.bias", true),
            ("*.bias", "fc2.weight", false),
            ("conv*weight", "conv2.weight", true),
            ("conv*weight", "fc.weight", false),
            ("*", "anything", true),
        ] {
            assert_eq!(pattern_matches(p, n), m, "{p} vs {n}");
        }
    }
}
