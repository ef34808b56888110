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
use crate::train::onnx::{F32, I64, attr, attr_f, attr_i, attr_ints, dims, f32_values};
use crate::train::shape::{BOOL, Shapes, Window, infer_node, spatial_attrs};

/// Most dimensions a strided kernel walks (after merging contiguous ones).
pub const RANK_MAX: usize = 6;
/// Threads per workgroup of the one-dimensional kernels.
pub const GROUP_THREADS: usize = 256;
/// Reductions over at least this many elements use a workgroup per output.
pub const GROUP_REDUCE_MIN: usize = 512;

/// How a value's words are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    F32 = 0,
    I32 = 1,
    Bool = 2,
}

/// A WGSL entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Eltwise,
    Copy,
    Gather,
    Pool,
    ReduceThread,
    ReduceGroup,
    Softmax,
    LayerNorm,
    CumSum,
    GemmSmall,
    GemmBig,
    ConvSmall,
    ConvBig,
}

/// The WGSL module a kernel lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    Reduce,
    Gemm,
    Conv,
}

impl Kernel {
    pub fn module(self) -> Module {
        match self {
            Kernel::Eltwise | Kernel::Copy | Kernel::Gather | Kernel::Pool => Module::Elementwise,
            Kernel::ReduceThread
            | Kernel::ReduceGroup
            | Kernel::Softmax
            | Kernel::LayerNorm
            | Kernel::CumSum => Module::Reduce,
            Kernel::GemmSmall | Kernel::GemmBig => Module::Gemm,
            Kernel::ConvSmall | Kernel::ConvBig => Module::Conv,
        }
    }

    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::Eltwise => "eltwise",
            Kernel::Copy => "copy_strided",
            Kernel::Gather => "gather",
            Kernel::Pool => "pool",
            Kernel::ReduceThread => "reduce_thread",
            Kernel::ReduceGroup => "reduce_group",
            Kernel::Softmax => "softmax",
            Kernel::LayerNorm => "layer_norm",
            Kernel::CumSum => "cumsum",
            Kernel::GemmSmall | Kernel::ConvSmall => "mm_small",
            Kernel::GemmBig | Kernel::ConvBig => "mm_big",
        }
    }
}

/// Element-wise op codes (`eltwise` in elementwise.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum EwOp {
    Copy = 0,
    Relu = 1,
    LeakyRelu = 2,
    Sigmoid = 3,
    Tanh = 4,
    Exp = 5,
    Log = 6,
    Neg = 7,
    Sqrt = 8,
    Reciprocal = 9,
    Abs = 10,
    Add = 20,
    Sub = 21,
    Mul = 22,
    Div = 23,
    Equal = 25,
    Greater = 26,
    Less = 27,
    Where = 30,
}

impl EwOp {
    fn from_onnx(op: &str) -> Option<EwOp> {
        Some(match op {
            "Relu" => EwOp::Relu,
            "LeakyRelu" => EwOp::LeakyRelu,
            "Sigmoid" => EwOp::Sigmoid,
            "Tanh" => EwOp::Tanh,
            "Exp" => EwOp::Exp,
            "Log" => EwOp::Log,
            "Neg" => EwOp::Neg,
            "Sqrt" => EwOp::Sqrt,
            "Reciprocal" => EwOp::Reciprocal,
            "Abs" => EwOp::Abs,
            "Add" => EwOp::Add,
            "Sub" => EwOp::Sub,
            "Mul" => EwOp::Mul,
            "Div" => EwOp::Div,
            "Equal" => EwOp::Equal,
            "Greater" => EwOp::Greater,
            "Less" => EwOp::Less,
            "Where" => EwOp::Where,
            _ => return None,
        })
    }

    fn arity(self) -> usize {
        match self as u32 {
            0..20 => 1,
            20..30 => 2,
            _ => 3,
        }
    }
}

/// Where a value's words come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// Written by a launch of this step.
    Temp,
    /// The model input batch.
    Input,
    Labels,
    Lr,
    WdStep,
    /// Parameter `i` of the layout.
    Param(usize),
    /// Optimizer state input `i`.
    State(usize),
    /// FedProx anchor `i` (per trainable parameter).
    Prox(usize),
    /// Uploaded once.
    Const(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub words: usize,
    pub ty: Ty,
    pub role: Role,
}

/// One dispatch: `kernel` over `inputs` (at most three) into `output`.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: Kernel,
    pub params: Vec<u32>,
    pub inputs: Vec<usize>,
    pub output: usize,
    /// Workgroups in x, y, z.
    pub groups: [u32; 3],
    /// The ONNX node this launch computes (for messages).
    pub node: String,
}

/// A training step as launches over values packed into buffers.
#[derive(Clone, Debug)]
pub struct Program {
    pub values: Vec<Value>,
    pub launches: Vec<Launch>,
    pub input: usize,
    pub labels: usize,
    pub lr: usize,
    pub wd_step: usize,
    /// Per layout tensor.
    pub params: Vec<usize>,
    pub states: Vec<usize>,
    pub prox: Vec<usize>,
    pub loss: usize,
    /// Per trainable parameter, the value holding its new weights.
    pub new_params: Vec<usize>,
    /// Per state input, the value holding its new state.
    pub new_states: Vec<usize>,
    /// Buffer of each value.
    pub buffer_of: Vec<usize>,
    /// Size of each buffer in words.
    pub buffer_words: Vec<usize>,
    /// When the model input is used as Gather indices: the smallest axis
    /// length it indexes (inputs are checked against it before upload).
    pub input_index_bound: Option<usize>,
}

impl Program {
    /// The launches' kernels, each once.
    pub fn kernels(&self) -> Vec<Kernel> {
        let mut seen = Vec::new();
        for l in &self.launches {
            if !seen.contains(&l.kernel) {
                seen.push(l.kernel);
            }
        }
        seen
    }
}

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

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides that read `x` broadcast to `out` (numpy rules): 0 on broadcast
/// axes.
pub fn broadcast_strides(x: &[usize], out: &[usize]) -> Vec<usize> {
    let xs = strides(x);
    let off = out.len() - x.len();
    (0..out.len())
        .map(|i| {
            if i < off || x[i - off] == 1 && out[i] != 1 {
                0
            } else {
                xs[i - off]
            }
        })
        .collect()
}

/// Drop size-1 axes and merge neighbours that are contiguous for every
/// operand, so kernels walk as few axes as possible.
pub fn simplify(dims: &[usize], operands: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut d: Vec<usize> = Vec::new();
    let mut s: Vec<Vec<usize>> = vec![Vec::new(); operands.len()];
    for i in 0..dims.len() {
        if dims[i] == 1 {
            continue;
        }
        let mergeable = !d.is_empty()
            && operands
                .iter()
                .enumerate()
                .all(|(k, st)| s[k][d.len() - 1] == st[i] * dims[i]);
        if mergeable {
            let last = d.len() - 1;
            d[last] *= dims[i];
            for (k, st) in operands.iter().enumerate() {
                s[k][last] = st[i];
            }
        } else {
            d.push(dims[i]);
            for (k, st) in operands.iter().enumerate() {
                s[k].push(st[i]);
            }
        }
    }
    (d, s)
}

/// Pad to `RANK_MAX` words.
fn padded(v: &[usize]) -> impl Iterator<Item = u32> + '_ {
    v.iter()
        .map(|&x| x as u32)
        .chain(std::iter::repeat(0))
        .take(RANK_MAX)
}

/// Workgroups for `threads` one-dimensional threads (x capped, spill to y).
pub fn groups_1d(threads: usize) -> [u32; 3] {
    let g = threads.div_ceil(GROUP_THREADS).max(1);
    linear_groups(g)
}

/// Lay `g` workgroups out as x * y with x <= 65535.
pub fn linear_groups(g: usize) -> [u32; 3] {
    let x = g.min(65_535);
    [x as u32, g.div_ceil(x) as u32, 1]
}

fn word_u32(node: &NodeProto, what: &str, v: usize) -> Result<u32, TrainError> {
    u32::try_from(v).map_err(|_| unsupported_form(node, format!("{what} {v} exceeds 32 bits")))
}

/// Lowers a training step graph.
struct Lowerer {
    s: Shapes,
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
            && self.s.consts.contains_key(out)
        {
            return Ok(()); // folded int64: a constant when read
        }
        if node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()) {
            return Err(unsupported_form(node, "only the first output is supported"));
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
            "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" | "Exp" | "Log" | "Neg" | "Sqrt"
            | "Reciprocal" | "Abs" | "Add" | "Sub" | "Mul" | "Div" => {
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
                let axes: Vec<i64> =
                    if op == "ReduceSum" && node.input.len() > 1 {
                        self.s.consts.get(&node.input[1]).cloned().ok_or_else(|| {
                            unsupported_form(node, "reduction axes must be constant")
                        })?
                    } else {
                        attr_ints(node, "axes").unwrap_or_default()
                    };
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
            other => Err(GpuError::UnsupportedOp {
                op: other.into(),
                node: node.name.clone(),
            }
            .into()),
        }
    }

    fn eltwise(&mut self, node: &NodeProto, op: EwOp, out_ty: Ty) -> Result<(), TrainError> {
        let n_in = op.arity();
        if node.input.len() < n_in {
            return Err(unsupported_form(node, "missing inputs"));
        }
        let out_shape = self.shape(&node.output[0])?;
        let mut ids = Vec::with_capacity(n_in);
        let mut operands = vec![strides(&out_shape)];
        for name in &node.input[..n_in] {
            ids.push(self.data(name)?);
            operands.push(broadcast_strides(&self.shape(name)?, &out_shape));
        }
        let (d, st) = simplify(&out_shape, &operands);
        if d.len() > RANK_MAX {
            return Err(unsupported_form(node, "more than 6 broadcast axes"));
        }
        let n: usize = out_shape.iter().product();
        let alpha = if op == EwOp::LeakyRelu {
            attr_f(node, "alpha").unwrap_or(0.01)
        } else {
            0.0
        };
        let mut p = vec![word_u32(node, "size", n)?, op as u32, d.len() as u32];
        for k in 0..3 {
            p.push(ids.get(k).map(|&i| self.ty(i) as u32).unwrap_or(0));
        }
        p.push(out_ty as u32);
        p.push(alpha.to_bits());
        p.extend(padded(&d));
        for k in 0..3 {
            match st.get(k + 1) {
                Some(s) => p.extend(padded(s)),
                None => p.extend([0; RANK_MAX]),
            }
        }
        let out = self.output(node, out_ty)?;
        self.launch(node, Kernel::Eltwise, p, ids, out, groups_1d(n));
        Ok(())
    }

    /// `out[out_base + c . out_strides] = in[in_base + c . in_strides]` for
    /// every coordinate `c` of `dims`.
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        node: &NodeProto,
        input: usize,
        output: usize,
        dims_: &[usize],
        in_strides: Vec<usize>,
        out_strides: Vec<usize>,
        bases: (usize, usize),
    ) -> Result<(), TrainError> {
        let (d, st) = simplify(dims_, &[in_strides, out_strides]);
        if d.len() > RANK_MAX {
            return Err(unsupported_form(node, "more than 6 strided axes"));
        }
        let n: usize = dims_.iter().product();
        let mut p = vec![
            word_u32(node, "size", n)?,
            bases.0 as u32,
            bases.1 as u32,
            d.len() as u32,
        ];
        p.extend(padded(&d));
        p.extend(padded(&st[0]));
        p.extend(padded(&st[1]));
        self.launch(node, Kernel::Copy, p, vec![input], output, groups_1d(n));
        Ok(())
    }

    fn transpose(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let perm: Vec<usize> = attr_ints(node, "perm")
            .map(|p| p.into_iter().map(|v| v as usize).collect())
            .unwrap_or_else(|| (0..xs.len()).rev().collect());
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out_shape = self.shape(&node.output[0])?;
        let xst = strides(&xs);
        let in_st: Vec<usize> = perm.iter().map(|&p| xst[p]).collect();
        let out = self.output(node, ty)?;
        self.copy(node, x, out, &out_shape, in_st, strides(&out_shape), (0, 0))
    }

    fn expand(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out_shape = self.shape(&node.output[0])?;
        let out = self.output(node, ty)?;
        let in_st = broadcast_strides(&xs, &out_shape);
        self.copy(node, x, out, &out_shape, in_st, strides(&out_shape), (0, 0))
    }

    fn konst(&self, node: &NodeProto, i: usize) -> Result<Vec<i64>, TrainError> {
        node.input
            .get(i)
            .and_then(|n| self.s.consts.get(n))
            .cloned()
            .ok_or_else(|| unsupported_form(node, format!("input {i} must be constant")))
    }

    fn slice(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let starts = self.konst(node, 1)?;
        let axes: Vec<i64> = if node.input.len() > 3 && !node.input[3].is_empty() {
            self.konst(node, 3)?
        } else {
            (0..starts.len() as i64).collect()
        };
        let xst = strides(&xs);
        let mut base = 0usize;
        for (&st, &a) in starts.iter().zip(&axes) {
            let a = if a < 0 { a + xs.len() as i64 } else { a } as usize;
            let dim = xs[a] as i64;
            let b = if st < 0 {
                (st + dim).max(0)
            } else {
                st.min(dim)
            };
            base += b as usize * xst[a];
        }
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out_shape = self.shape(&node.output[0])?;
        let out = self.output(node, ty)?;
        self.copy(
            node,
            x,
            out,
            &out_shape,
            xst,
            strides(&out_shape),
            (base, 0),
        )
    }

    fn concat(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let out_shape = self.shape(&node.output[0])?;
        let r = out_shape.len() as i64;
        let a = attr_i(node, "axis").unwrap_or(0);
        let a = if a < 0 { a + r } else { a } as usize;
        let first = self.data(&node.input[0])?;
        let ty = self.ty(first);
        let out = self.output(node, ty)?;
        let ost = strides(&out_shape);
        let mut off = 0;
        for name in &node.input {
            let xs = self.shape(name)?;
            let x = self.data(name)?;
            if xs.iter().product::<usize>() > 0 {
                self.copy(
                    node,
                    x,
                    out,
                    &xs,
                    strides(&xs),
                    ost.clone(),
                    (0, off * ost[a]),
                )?;
            }
            off += xs[a];
        }
        Ok(())
    }

    fn matmul_launch(
        &mut self,
        node: &NodeProto,
        (m, n, k, batch): (usize, usize, usize, usize),
        params: Vec<u32>,
        inputs: Vec<usize>,
        conv: bool,
    ) -> Result<(), TrainError> {
        let big = m >= 64 && n >= 64;
        let tile = if big { 64 } else { 16 };
        let groups = [n.div_ceil(tile), m.div_ceil(tile), batch];
        if groups.iter().any(|&g| g > 65_535) || k > u32::MAX as usize {
            return Err(unsupported_form(node, "product too large for one dispatch"));
        }
        let kernel = match (conv, big) {
            (false, false) => Kernel::GemmSmall,
            (false, true) => Kernel::GemmBig,
            (true, false) => Kernel::ConvSmall,
            (true, true) => Kernel::ConvBig,
        };
        let out = self.output(node, Ty::F32)?;
        self.launch(
            node,
            kernel,
            params,
            inputs,
            out,
            [groups[0] as u32, groups[1] as u32, groups[2] as u32],
        );
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let (a, b) = (self.shape(&node.input[0])?, self.shape(&node.input[1])?);
        let ta = attr_i(node, "transA").unwrap_or(0) != 0;
        let tb = attr_i(node, "transB").unwrap_or(0) != 0;
        let alpha = attr_f(node, "alpha").unwrap_or(1.0);
        let beta = attr_f(node, "beta").unwrap_or(1.0);
        let (m, k) = if ta { (a[1], a[0]) } else { (a[0], a[1]) };
        let n = if tb { b[0] } else { b[1] };
        let (a_sm, a_sk) = if ta { (1, a[1]) } else { (a[1], 1) };
        let (b_sk, b_sn) = if tb { (1, b[1]) } else { (b[1], 1) };
        let mut inputs = vec![self.data(&node.input[0])?, self.data(&node.input[1])?];
        let has_c = node.input.len() > 2 && !node.input[2].is_empty();
        let (c_sm, c_sn) = if has_c {
            let cs = self.shape(&node.input[2])?;
            if cs.len() > 2 {
                return Err(unsupported_form(node, "C of rank > 2"));
            }
            inputs.push(self.data(&node.input[2])?);
            let st = broadcast_strides(&cs, &[m, n]);
            (st[0], st[1])
        } else {
            (0, 0)
        };
        let p = [
            m,
            n,
            k,
            0,
            a_sm,
            a_sk,
            0,
            b_sk,
            b_sn,
            has_c as usize,
            c_sm,
            c_sn,
        ]
        .iter()
        .map(|&v| word_u32(node, "dimension", v))
        .chain([Ok(alpha.to_bits()), Ok(beta.to_bits())])
        .collect::<Result<Vec<_>, _>>()?;
        self.matmul_launch(node, (m, n, k, 1), p, inputs, false)
    }

    fn matmul(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let (a, b) = (self.shape(&node.input[0])?, self.shape(&node.input[1])?);
        let out_shape = self.shape(&node.output[0])?;
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let n = b[b.len() - 1];
        let batch: usize = out_shape[..out_shape.len() - 2].iter().product();
        let ba: usize = a[..a.len() - 2].iter().product();
        let bb: usize = b[..b.len() - 2].iter().product();
        let side = |bx: usize, rank: usize, per: usize| -> Option<usize> {
            if bx == 1 {
                Some(0)
            } else if bx == batch && rank == out_shape.len() {
                Some(per)
            } else {
                None
            }
        };
        let (Some(a_sb), Some(b_sb)) = (side(ba, a.len(), m * k), side(bb, b.len(), k * n)) else {
            return Err(unsupported_form(
                node,
                "batch broadcasting other than equal batches or a shared operand",
            ));
        };
        let inputs = vec![self.data(&node.input[0])?, self.data(&node.input[1])?];
        let p = [m, n, k, a_sb, k, 1, b_sb, n, 1, 0, 0, 0]
            .iter()
            .map(|&v| word_u32(node, "dimension", v))
            .chain([Ok(1f32.to_bits()), Ok(0f32.to_bits())])
            .collect::<Result<Vec<_>, _>>()?;
        self.matmul_launch(node, (m, n, k, batch), p, inputs, false)
    }

    fn conv(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let transpose = node.op_type == "ConvTranspose";
        let (xs, ws) = (self.shape(&node.input[0])?, self.shape(&node.input[1])?);
        let ys = self.shape(&node.output[0])?;
        let Window {
            kernel: kk,
            strides: st,
            pads,
            dilations: dil,
        } = spatial_attrs(node, ws[2..].to_vec())?;
        if attr_i(node, "group").unwrap_or(1) != 1 {
            return Err(unsupported_form(node, "grouped convolution"));
        }
        let cout = ys[1];
        let m = cout;
        let n = ys[0] * ys[2] * ys[3];
        let k = xs[1] * kk[0] * kk[1];
        let mut inputs = vec![self.data(&node.input[0])?, self.data(&node.input[1])?];
        let has_b = node.input.len() > 2 && !node.input[2].is_empty();
        if has_b {
            inputs.push(self.data(&node.input[2])?);
        }
        let p = [
            m,
            n,
            k,
            transpose as usize,
            xs[0],
            xs[1],
            xs[2],
            xs[3],
            ys[2],
            ys[3],
            kk[0],
            kk[1],
            st[0],
            st[1],
            pads[0],
            pads[1],
            dil[0],
            dil[1],
            has_b as usize,
        ]
        .iter()
        .map(|&v| word_u32(node, "dimension", v))
        .collect::<Result<Vec<_>, _>>()?;
        self.matmul_launch(node, (m, n, k, 1), p, inputs, true)
    }

    fn pool(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let ys = self.shape(&node.output[0])?;
        let kernel: Vec<usize> = attr_ints(node, "kernel_shape")
            .unwrap_or_default()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        let Window {
            kernel: kk,
            strides: st,
            pads,
            dilations: dil,
        } = spatial_attrs(node, kernel)?;
        let avg = node.op_type == "AveragePool";
        let include_pad = attr_i(node, "count_include_pad").unwrap_or(0) != 0;
        let n: usize = ys.iter().product();
        let p = [
            n,
            xs[2],
            xs[3],
            ys[2],
            ys[3],
            kk[0],
            kk[1],
            st[0],
            st[1],
            pads[0],
            pads[1],
            dil[0],
            dil[1],
            avg as usize,
            include_pad as usize,
        ]
        .iter()
        .map(|&v| word_u32(node, "dimension", v))
        .collect::<Result<Vec<_>, _>>()?;
        let x = self.data(&node.input[0])?;
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::Pool, p, vec![x], out, groups_1d(n));
        Ok(())
    }

    fn reduce(&mut self, node: &NodeProto, axes: &[usize], mean: bool) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let xst = strides(&xs);
        let kept: Vec<usize> = (0..xs.len()).filter(|i| !axes.contains(i)).collect();
        let (kd, ks) = simplify(
            &kept.iter().map(|&i| xs[i]).collect::<Vec<_>>(),
            &[kept.iter().map(|&i| xst[i]).collect()],
        );
        let (rd, rs) = simplify(
            &axes.iter().map(|&i| xs[i]).collect::<Vec<_>>(),
            &[axes.iter().map(|&i| xst[i]).collect()],
        );
        if kd.len() > RANK_MAX || rd.len() > RANK_MAX {
            return Err(unsupported_form(node, "more than 6 reduced or kept axes"));
        }
        let n_out: usize = kd.iter().product();
        let r: usize = rd.iter().product();
        let mut p = vec![
            word_u32(node, "size", n_out)?,
            word_u32(node, "size", r)?,
            mean as u32,
            kd.len() as u32,
            rd.len() as u32,
        ];
        p.extend(padded(&kd));
        p.extend(padded(&ks[0]));
        p.extend(padded(&rd));
        p.extend(padded(&rs[0]));
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        if ty != Ty::F32 {
            return Err(unsupported_form(node, "reductions of non-float tensors"));
        }
        let out = self.output(node, Ty::F32)?;
        let (kernel, groups) = if r >= GROUP_REDUCE_MIN {
            (Kernel::ReduceGroup, linear_groups(n_out))
        } else {
            (Kernel::ReduceThread, groups_1d(n_out))
        };
        self.launch(node, kernel, p, vec![x], out, groups);
        Ok(())
    }

    /// (rows, length, inner) of an axis of `shape`.
    fn along(shape: &[usize], axis: usize) -> (usize, usize, usize) {
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        (outer * inner, shape[axis], inner)
    }

    fn norm_axis(node: &NodeProto, a: i64, rank: usize) -> Result<usize, TrainError> {
        let r = rank as i64;
        if a < -r || a >= r {
            return Err(unsupported_form(node, format!("axis {a} out of range")));
        }
        Ok(if a < 0 { a + r } else { a } as usize)
    }

    fn softmax(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let a = Self::norm_axis(node, attr_i(node, "axis").unwrap_or(-1), xs.len())?;
        let (rows, len, inner) = Self::along(&xs, a);
        let p = vec![
            word_u32(node, "size", rows)?,
            len as u32,
            inner as u32,
            (node.op_type == "LogSoftmax") as u32,
        ];
        let x = self.data(&node.input[0])?;
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::Softmax, p, vec![x], out, groups_1d(rows));
        Ok(())
    }

    fn layer_norm(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let a = Self::norm_axis(node, attr_i(node, "axis").unwrap_or(-1), xs.len())?;
        if a != xs.len() - 1 {
            return Err(unsupported_form(
                node,
                "normalisation over the last axis only",
            ));
        }
        let len = xs[a];
        let rows: usize = xs[..a].iter().product();
        let mut inputs = vec![self.data(&node.input[0])?];
        let has_b = node.input.len() > 2 && !node.input[2].is_empty();
        for i in 1..node.input.len().min(3) {
            if node.input[i].is_empty() {
                continue;
            }
            if self.shape(&node.input[i])?.iter().product::<usize>() != len {
                return Err(unsupported_form(
                    node,
                    "scale and bias must have the normalised axis' length",
                ));
            }
            inputs.push(self.data(&node.input[i])?);
        }
        let eps = attr_f(node, "epsilon").unwrap_or(1e-5);
        let p = vec![
            word_u32(node, "size", rows)?,
            len as u32,
            eps.to_bits(),
            has_b as u32,
        ];
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::LayerNorm, p, inputs, out, groups_1d(rows));
        Ok(())
    }

    fn cumsum(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let axis = self.konst(node, 1)?;
        let [axis] = axis[..] else {
            return Err(unsupported_form(node, "axis must hold one value"));
        };
        let a = Self::norm_axis(node, axis, xs.len())?;
        let (lines, len, inner) = Self::along(&xs, a);
        let p = vec![
            word_u32(node, "size", lines)?,
            len as u32,
            inner as u32,
            (attr_i(node, "exclusive").unwrap_or(0) != 0) as u32,
            (attr_i(node, "reverse").unwrap_or(0) != 0) as u32,
        ];
        let x = self.data(&node.input[0])?;
        if self.ty(x) != Ty::F32 {
            return Err(unsupported_form(node, "CumSum of non-float tensors"));
        }
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::CumSum, p, vec![x], out, groups_1d(lines));
        Ok(())
    }

    fn gather(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let ds = self.shape(&node.input[0])?;
        let is = self.shape(&node.input[1])?;
        let a = Self::norm_axis(node, attr_i(node, "axis").unwrap_or(0), ds.len())?;
        let inner: usize = ds[a + 1..].iter().product();
        let count: usize = is.iter().product();
        let n: usize = self.shape(&node.output[0])?.iter().product();
        let data = self.data(&node.input[0])?;
        let idx = self.data(&node.input[1])?;
        if self.ty(idx) != Ty::I32 {
            return Err(unsupported_form(node, "indices must be integers"));
        }
        let ty = self.ty(data);
        let p = vec![
            word_u32(node, "size", n)?,
            inner as u32,
            ds[a] as u32,
            count as u32,
        ];
        let out = self.output(node, ty)?;
        self.launch(node, Kernel::Gather, p, vec![data, idx], out, groups_1d(n));
        Ok(())
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

/// Give every value a buffer; temporaries share buffers of the same size
/// once their last reader has run. A launch's output is taken before its
/// inputs are released, so no launch reads and writes one buffer.
pub fn pack(
    values: &[Value],
    launches: &[Launch],
    pinned: &HashSet<usize>,
) -> (Vec<usize>, Vec<usize>) {
    let temp = |v: usize| values[v].role == Role::Temp && !pinned.contains(&v);
    let mut last = vec![None::<usize>; values.len()];
    for (i, l) in launches.iter().enumerate() {
        for &v in l.inputs.iter().chain([&l.output]) {
            last[v] = Some(i);
        }
    }
    let mut buffer_of = vec![usize::MAX; values.len()];
    let mut words = Vec::new();
    let mut free: HashMap<usize, Vec<usize>> = HashMap::new();
    for (v, val) in values.iter().enumerate() {
        if !temp(v) {
            buffer_of[v] = words.len();
            words.push(val.words.max(1));
        }
    }
    for (i, l) in launches.iter().enumerate() {
        let o = l.output;
        if buffer_of[o] == usize::MAX {
            let w = values[o].words.max(1);
            buffer_of[o] = match free.get_mut(&w).and_then(|f| f.pop()) {
                Some(b) => b,
                None => {
                    words.push(w);
                    words.len() - 1
                }
            };
        }
        let mut released: Vec<usize> = Vec::new();
        for &v in l.inputs.iter().chain([&o]) {
            if temp(v) && last[v] == Some(i) && !released.contains(&v) {
                released.push(v);
                free.entry(values[v].words.max(1))
                    .or_default()
                    .push(buffer_of[v]);
            }
        }
    }
    // Values nothing launches or reads (unused inputs) still get a buffer.
    for (v, b) in buffer_of.iter_mut().enumerate() {
        if *b == usize::MAX {
            *b = words.len();
            words.push(values[v].words.max(1));
        }
    }
    (buffer_of, words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simplify_merges_contiguous_axes() {
        // [2,3,4] contiguous collapses to one axis.
        let (d, s) = simplify(&[2, 3, 4], &[strides(&[2, 3, 4])]);
        assert_eq!((d, s), (vec![24], vec![vec![1]]));
        // A broadcast bias [1,3,1] against [2,3,4] keeps three axes.
        let (d, s) = simplify(
            &[2, 3, 4],
            &[strides(&[2, 3, 4]), broadcast_strides(&[3, 1], &[2, 3, 4])],
        );
        assert_eq!(d, vec![2, 3, 4]);
        assert_eq!(s[1], vec![0, 1, 0]);
        // Size-1 axes vanish.
        let (d, _) = simplify(&[1, 5, 1], &[vec![5, 1, 1]]);
        assert_eq!(d, vec![5]);
    }

    #[test]
    fn groups_cover_threads() {
        assert_eq!(groups_1d(1), [1, 1, 1]);
        assert_eq!(groups_1d(257), [2, 1, 1]);
        let [x, y, _] = groups_1d(70_000 * 256);
        assert!(x <= 65_535 && (x as usize * y as usize) >= 70_000);
    }

    fn v(words: usize, role: Role) -> Value {
        Value {
            name: String::new(),
            words,
            ty: Ty::F32,
            role,
        }
    }

    fn l(inputs: Vec<usize>, output: usize) -> Launch {
        Launch {
            kernel: Kernel::Eltwise,
            params: vec![],
            inputs,
            output,
            groups: [1, 1, 1],
            node: String::new(),
        }
    }

    #[test]
    fn pack_reuses_dead_temporaries_but_never_in_place() {
        // x -> a -> b -> c -> out: a is dead once b is written, so c takes
        // a's buffer; b never shares with its own input a.
        let values = vec![
            v(8, Role::Input),
            v(8, Role::Temp),
            v(8, Role::Temp),
            v(8, Role::Temp),
            v(8, Role::Temp),
        ];
        let launches = vec![l(vec![0], 1), l(vec![1], 2), l(vec![2], 3), l(vec![3], 4)];
        let pinned = HashSet::from([4]);
        let (of, words) = pack(&values, &launches, &pinned);
        assert_ne!(of[1], of[2]);
        assert_ne!(of[2], of[3]);
        assert_eq!(of[3], of[1]);
        assert!(of[4] != of[3] && of[4] != of[2] && of[4] != of[0]);
        assert_eq!(words.len(), 4);
    }
}
