//! Lowering a compiled training graph to a list of kernel launches.
//!
//! Pure bookkeeping, no GPU: every tensor becomes a *value* (a run of
//! 32-bit words: f32 bits, i32 or a 0/1 bool), every node one or more
//! [`Launch`]es of a WGSL entry point with its parameter words, and the
//! temporaries are packed into reusable buffers by liveness. Shapes are
//! static (the batch is fixed when the step is compiled), so every
//! parameter word is known here, once.
//!
//! Reshape-like nodes (Identity, Dropout, Flatten, Reshape, Squeeze,
//! Unsqueeze, same-kind Cast) are aliases, not launches; int64 tensors the
//! shape pass folded (reshape targets, axes, ranges) are constants.
use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{ModelProto, NodeProto};

use super::GpuError;
use crate::train::TrainError;
use crate::train::compile::{LABELS, LOSS, LR, Mode, TrainingGraph, WD_STEP};
use crate::train::onnx::{F32, I64, attr, attr_f, attr_i, dims, f32_values};
use crate::train::shape::{BOOL, Shapes, infer_node};

mod buffers;
mod conv;
mod copy;
mod elementwise;
mod gemm;
mod layout;
mod program;
mod reduce;
#[cfg(test)]
mod tests;

pub use buffers::pack;
pub use elementwise::EwOp;
pub use layout::{broadcast_strides, groups_1d, linear_groups, simplify, strides};
pub use program::{Kernel, Launch, Module, Program, Role, Ty, Value};

/// Most dimensions a strided kernel walks (after merging contiguous ones).
pub const RANK_MAX: usize = 6;
/// Threads per workgroup of the one-dimensional kernels.
pub const GROUP_THREADS: usize = 256;
/// Reductions over at least this many elements use a workgroup per output.
pub const GROUP_REDUCE_MIN: usize = 512;

fn unsupported_form(node: &NodeProto, reason: impl Into<String>) -> TrainError {
    GpuError::UnsupportedForm {
        op: node.op_type.clone(),
        node: node.name.clone(),
        reason: reason.into(),
    }
    .into()
}

fn ty_of(onnx_type: i32, what: &str) -> Result<Ty, TrainError> {
    match onnx_type {
        F32 => Ok(Ty::F32),
        BOOL => Ok(Ty::Bool),
        // int8/16/32/64 and uint8/16/32
        2..=7 | 12 => Ok(Ty::I32),
        t => Err(GpuError::UnsupportedForm {
            op: "tensor".into(),
            node: what.into(),
            reason: format!("element type {t} has no GPU representation"),
        }
        .into()),
    }
}

fn word_u32(node: &NodeProto, what: &str, v: usize) -> Result<u32, TrainError> {
    u32::try_from(v).map_err(|_| unsupported_form(node, format!("{what} {v} exceeds 32 bits")))
}

/// Lowers a training step graph.
struct Lowerer {
    s: Shapes,
    /// Tensors the step's outputs depend on (a node's other outputs, such
    /// as Dropout's mask, may be left unwritten when nothing reads them).
    needed: HashSet<String>,
    values: Vec<Value>,
    of: HashMap<String, usize>,
    launches: Vec<Launch>,
    f32_consts: HashMap<String, Vec<f32>>,
}

impl Lowerer {
    fn add(&mut self, name: &str, words: usize, ty: Ty, role: Role) -> usize {
        self.values.push(Value {
            name: name.into(),
            words,
            ty,
            role,
        });
        let id = self.values.len() - 1;
        self.of.insert(name.into(), id);
        id
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, TrainError> {
        Ok(self.s.shape(name)?.to_vec())
    }

    /// The value holding tensor `name`, uploading constants on first use.
    fn data(&mut self, name: &str) -> Result<usize, TrainError> {
        if let Some(&id) = self.of.get(name) {
            return Ok(id);
        }
        if let Some(v) = self.f32_consts.get(name) {
            let words = v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            return Ok(self.add(name, words.len(), Ty::F32, Role::Const(words)));
        }
        if let Some(v) = self.s.bools.get(name) {
            let words = v.iter().map(|&b| b as u32).collect::<Vec<_>>();
            return Ok(self.add(name, words.len(), Ty::Bool, Role::Const(words)));
        }
        if let Some(v) = self.s.consts.get(name) {
            let words = v
                .iter()
                .map(|&x| {
                    i32::try_from(x)
                        .map(|x| x as u32)
                        .map_err(|_| GpuError::UnsupportedForm {
                            op: "constant".into(),
                            node: name.into(),
                            reason: format!(
                                "int64 value {x} does not fit the GPU's 32-bit integers"
                            ),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(self.add(name, words.len(), Ty::I32, Role::Const(words)));
        }
        Err(TrainError::BadModel(format!(
            "tensor `{name}` is read before it is computed"
        )))
    }

    fn ty(&self, id: usize) -> Ty {
        self.values[id].ty
    }

    /// A fresh temporary for `node`'s first output.
    fn output(&mut self, node: &NodeProto, ty: Ty) -> Result<usize, TrainError> {
        let name = &node.output[0];
        let words = self.shape(name)?.iter().product();
        Ok(self.add(name, words, ty, Role::Temp))
    }

    fn alias(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let src = self.data(&node.input[0])?;
        self.of.insert(node.output[0].clone(), src);
        Ok(())
    }

    fn launch(
        &mut self,
        node: &NodeProto,
        kernel: Kernel,
        params: Vec<u32>,
        inputs: Vec<usize>,
        output: usize,
        groups: [u32; 3],
    ) {
        debug_assert!(inputs.len() <= 3);
        self.launches.push(Launch {
            kernel,
            params,
            inputs,
            output,
            groups,
            node: node.name.clone(),
        });
    }

    fn node(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let op = node.op_type.as_str();
        if let Some(out) = node.output.first()
            && (self.s.consts.contains_key(out) || self.s.bools.contains_key(out))
        {
            return Ok(()); // folded int64 or bool: a constant when read
        }
        if op == "Split" {
            return self.split(node);
        }
        if node.output.len() > 1 && node.output[1..].iter().any(|o| self.needed.contains(o)) {
            return Err(unsupported_form(
                node,
                "only the first output is supported (another is read)",
            ));
        }
        match op {
            "Identity" | "Dropout" | "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
                self.alias(node)
            }
            "Cast" => {
                let to = attr_i(node, "to").unwrap_or(F32 as i64) as i32;
                let to = ty_of(to, &node.name)?;
                let x = self.data(&node.input[0])?;
                if self.ty(x) == to {
                    self.alias(node)
                } else {
                    self.eltwise(node, EwOp::Copy, to)
                }
            }
            "Constant" => {
                let t = attr(node, "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| unsupported_form(node, "only `value` constants"))?;
                if t.data_type != F32 {
                    return Err(unsupported_form(node, "non-float constant not folded"));
                }
                self.f32_consts
                    .insert(node.output[0].clone(), f32_values(t)?);
                Ok(())
            }
            "ConstantOfShape" => {
                let words: usize = self.shape(&node.output[0])?.iter().product();
                let value = attr(node, "value").and_then(|a| a.t.as_ref());
                let (ty, word) = match value {
                    None => (Ty::F32, 0),
                    Some(t) if t.data_type == F32 => (
                        Ty::F32,
                        f32_values(t)?.first().copied().unwrap_or(0.0).to_bits(),
                    ),
                    Some(t) if t.data_type == BOOL => (
                        Ty::Bool,
                        crate::train::onnx::bool_values(t)?
                            .first()
                            .copied()
                            .unwrap_or(false) as u32,
                    ),
                    Some(t) => {
                        return Err(unsupported_form(
                            node,
                            format!(
                                "a fill of element type {} (int64 fills of up to 64 elements fold to constants)",
                                t.data_type
                            ),
                        ));
                    }
                };
                self.add(&node.output[0], words, ty, Role::Const(vec![word; words]));
                Ok(())
            }
            "Equal" | "Greater" | "Less" => {
                let e = EwOp::from_onnx(op).expect("listed");
                self.eltwise(node, e, Ty::Bool)
            }
            "Where" => {
                let ty = {
                    let a = self.data(&node.input[1])?;
                    self.ty(a)
                };
                self.eltwise(node, EwOp::Where, ty)
            }
            "Clip" => {
                let bound = |i: usize, default: f32| -> Result<f32, TrainError> {
                    match node.input.get(i).filter(|s| !s.is_empty()) {
                        None => Ok(default),
                        Some(b) => self
                            .f32_consts
                            .get(b)
                            .filter(|v| v.len() == 1)
                            .map(|v| v[0])
                            .ok_or_else(|| {
                                unsupported_form(node, "Clip bounds must be constant scalars")
                            }),
                    }
                };
                let bounds = (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?);
                self.eltwise_with(node, EwOp::Clamp, Ty::F32, bounds)
            }
            "HardSigmoid" => {
                let ab = (
                    attr_f(node, "alpha").unwrap_or(0.2),
                    attr_f(node, "beta").unwrap_or(0.5),
                );
                self.eltwise_with(node, EwOp::HardSigmoid, Ty::F32, ab)
            }
            "Gelu" => {
                let op = match crate::train::onnx::attr_s(node, "approximate").as_deref() {
                    None | Some("none") => EwOp::Gelu,
                    Some("tanh") => EwOp::GeluTanh,
                    Some(other) => {
                        return Err(unsupported_form(node, format!("approximate=\"{other}\"")));
                    }
                };
                self.eltwise(node, op, Ty::F32)
            }
            "Trilu" => self.trilu(node),
            "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" | "Exp" | "Log" | "Neg" | "Sqrt"
            | "Reciprocal" | "Abs" | "Add" | "Sub" | "Mul" | "Div" | "Erf" | "HardSwish"
            | "Pow" | "PRelu" => {
                let e = EwOp::from_onnx(op).expect("listed");
                let ty = {
                    let a = self.data(&node.input[0])?;
                    self.ty(a)
                };
                self.eltwise(node, e, ty)
            }
            "Transpose" => self.transpose(node),
            "Expand" => self.expand(node),
            "Slice" => self.slice(node),
            "Concat" => self.concat(node),
            "Gemm" => self.gemm(node),
            "MatMul" => self.matmul(node),
            "Conv" | "ConvTranspose" => self.conv(node),
            "MaxPool" | "AveragePool" => self.pool(node),
            "GlobalAveragePool" => {
                let r = self.shape(&node.input[0])?.len();
                self.reduce(node, &(2..r).collect::<Vec<_>>(), true)
            }
            "ReduceSum" | "ReduceMean" => {
                let r = self.shape(&node.input[0])?.len();
                // Axes as an input (ReduceSum from opset 13, ReduceMean
                // from 18) or as an attribute (ReduceMean up to 17).
                let axes: Vec<i64> = crate::train::shape::reduce_axes(node, &self.s)
                    .map_err(|_| unsupported_form(node, "reduction axes must be constant"))?;
                let axes: Vec<usize> = if axes.is_empty() {
                    if attr_i(node, "noop_with_empty_axes").unwrap_or(0) != 0 {
                        return self.alias(node);
                    }
                    (0..r).collect()
                } else {
                    axes.iter()
                        .map(|&a| if a < 0 { a + r as i64 } else { a } as usize)
                        .collect()
                };
                self.reduce(node, &axes, op == "ReduceMean")
            }
            "Softmax" | "LogSoftmax" => self.softmax(node),
            "LayerNormalization" => self.layer_norm(node),
            "CumSum" => self.cumsum(node),
            "Gather" => self.gather(node),
            op if crate::train::kernels::is_fedge_op(op) => Err(unsupported_form(
                node,
                "a fedge kernel for tract: the GPU runs steps compiled with Lowering::Portable",
            )),
            other => Err(GpuError::UnsupportedOp {
                op: other.into(),
                node: node.name.clone(),
            }
            .into()),
        }
    }

    fn konst(&self, node: &NodeProto, i: usize) -> Result<Vec<i64>, TrainError> {
        node.input
            .get(i)
            .and_then(|n| self.s.consts.get(n))
            .cloned()
            .ok_or_else(|| unsupported_form(node, format!("input {i} must be constant")))
    }
}

/// Shapes of every tensor of a compiled step graph, from its declared
/// inputs and initializers.
fn graph_shapes(model: &ModelProto) -> Result<Shapes, TrainError> {
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| TrainError::BadModel("training graph has no graph".into()))?;
    let mut s = Shapes::default();
    for v in &g.input {
        let (ty, shape) = crate::train::onnx::value_info_shape(v)
            .ok_or_else(|| TrainError::BadModel(format!("input `{}` has no type", v.name)))?;
        let shape = shape
            .into_iter()
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| TrainError::BadModel(format!("input `{}` is not static", v.name)))?;
        s.set(&v.name, shape, ty);
    }
    for t in &g.initializer {
        s.set(&t.name, dims(t)?, t.data_type);
        if t.data_type == I64 {
            s.consts
                .insert(t.name.clone(), crate::train::onnx::i64_values(t)?);
        }
        if t.data_type == BOOL {
            s.bools
                .insert(t.name.clone(), crate::train::onnx::bool_values(t)?);
        }
    }
    for n in &g.node {
        infer_node(n, &mut s)?;
    }
    Ok(s)
}

/// Lower a compiled training step (`Mode::Step`) for `params` layout
/// tensors.
pub fn lower(tg: &TrainingGraph, param_count: usize) -> Result<Program, TrainError> {
    if tg.mode != Mode::Step {
        return Err(TrainError::BadInput(
            "the GPU executor runs training steps, not gradient graphs".into(),
        ));
    }
    let g = tg
        .model
        .graph
        .as_ref()
        .ok_or_else(|| TrainError::BadModel("training graph has no graph".into()))?;
    let s = graph_shapes(&tg.model)?;
    let mut lw = Lowerer {
        s,
        needed: HashSet::new(),
        values: Vec::new(),
        of: HashMap::new(),
        launches: Vec::new(),
        f32_consts: HashMap::new(),
    };

    // Graph inputs, in the order compile_training declares them.
    let k = tg.trainable.len();
    let n_states = k * tg.state_per_param;
    let n_prox = if tg.prox { k } else { 0 };
    let expected = 4 + param_count + n_states + n_prox;
    if g.input.len() != expected || g.input[1].name != LABELS || g.input[2].name != LR {
        return Err(TrainError::BadModel(format!(
            "training graph declares {} inputs, expected {expected}",
            g.input.len()
        )));
    }
    let mut params = Vec::new();
    let mut states = Vec::new();
    let mut prox = Vec::new();
    let (mut input, mut labels, mut lr, mut wd) = (0, 0, 0, 0);
    for (i, v) in g.input.iter().enumerate() {
        let shape = lw.shape(&v.name)?;
        let words = shape.iter().product();
        let ty = ty_of(*lw.s.types.get(&v.name).unwrap_or(&F32), &v.name)?;
        let role = match i {
            0 => Role::Input,
            1 => Role::Labels,
            2 => Role::Lr,
            3 if v.name == WD_STEP => Role::WdStep,
            i if i < 4 + param_count => Role::Param(i - 4),
            i if i < 4 + param_count + n_states => Role::State(i - 4 - param_count),
            i => Role::Prox(i - 4 - param_count - n_states),
        };
        let id = lw.add(&v.name, words, ty, role.clone());
        match role {
            Role::Input => input = id,
            Role::Labels => labels = id,
            Role::Lr => lr = id,
            Role::WdStep => wd = id,
            Role::Param(_) => params.push(id),
            Role::State(_) => states.push(id),
            Role::Prox(_) => prox.push(id),
            Role::Temp | Role::Const(_) => unreachable!("inputs"),
        }
    }
    for t in &g.initializer {
        if t.data_type == F32 {
            lw.f32_consts.insert(t.name.clone(), f32_values(t)?);
        }
    }

    // Only the nodes the outputs depend on.
    let mut needed: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let mut live = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o.as_str())) {
            live[i] = true;
            needed.extend(n.input.iter().map(|s| s.as_str()));
        }
    }
    lw.needed = needed.iter().map(|s| s.to_string()).collect();
    for (n, _) in g.node.iter().zip(&live).filter(|(_, l)| **l) {
        lw.node(n)?;
    }

    let out_ids = g
        .output
        .iter()
        .map(|o| lw.data(&o.name))
        .collect::<Result<Vec<_>, _>>()?;
    if g.output.first().map(|o| o.name.as_str()) != Some(LOSS) || out_ids.len() != 1 + k + n_states
    {
        return Err(TrainError::BadModel(
            "training graph outputs are not loss, parameters, state".into(),
        ));
    }
    let loss = out_ids[0];
    let new_params = out_ids[1..1 + k].to_vec();
    let new_states = out_ids[1 + k..].to_vec();

    let mut input_index_bound: Option<usize> = None;
    for l in &lw.launches {
        if l.kernel == Kernel::Gather && l.inputs[1] == input {
            let len = l.params[2] as usize;
            input_index_bound = Some(input_index_bound.map_or(len, |b| b.min(len)));
        }
    }

    let pinned: HashSet<usize> = out_ids.iter().copied().collect();
    let (buffer_of, buffer_words) = pack(&lw.values, &lw.launches, &pinned);
    Ok(Program {
        values: lw.values,
        launches: lw.launches,
        input,
        labels,
        lr,
        wd_step: wd,
        params,
        states,
        prox,
        loss,
        new_params,
        new_states,
        buffer_of,
        buffer_words,
        input_index_bound,
    })
}
