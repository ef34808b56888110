//! Static shape inference (and int64 constant folding) for the ops the
//! training compiler reads and writes. Shapes are concrete: the batch size
//! is fixed when a training step is compiled.

use std::collections::HashMap;

use tract_onnx::pb::NodeProto;

use super::TrainError;
use super::import::ModelGraph;
use super::onnx::{
    F32, I64, attr, attr_f, attr_i, attr_ints, attr_s, bool_values, dims, i64_values,
};

pub use super::onnx::BOOL;

mod operands;
pub use operands::{SliceAxis, reduce_axes, slice_axes, split_sizes};

/// Known shapes, element types and int64 constant values by tensor name.
#[derive(Clone, Debug, Default)]
pub struct Shapes {
    pub shapes: HashMap<String, Vec<usize>>,
    pub types: HashMap<String, i32>,
    pub consts: HashMap<String, Vec<i64>>,
    /// Values of constant bool tensors (initializers and `Constant`
    /// nodes): Dropout's `training_mode`, attention masks.
    pub bools: HashMap<String, Vec<bool>>,
}

impl Shapes {
    pub fn shape(&self, name: &str) -> Result<&[usize], TrainError> {
        self.shapes
            .get(name)
            .map(|v| v.as_slice())
            .ok_or_else(|| TrainError::Shape {
                tensor: name.into(),
                reason: "unknown tensor".into(),
            })
    }

    pub fn set(&mut self, name: &str, shape: Vec<usize>, ty: i32) {
        self.shapes.insert(name.into(), shape);
        self.types.insert(name.into(), ty);
    }

    fn ty(&self, name: &str) -> i32 {
        self.types.get(name).copied().unwrap_or(F32)
    }

    fn konst(&self, node: &NodeProto, i: usize) -> Result<&[i64], TrainError> {
        let name = node
            .input
            .get(i)
            .ok_or_else(|| err(node, "missing input"))?;
        self.consts
            .get(name)
            .map(|v| v.as_slice())
            .ok_or_else(|| err(node, &format!("input `{name}` must be a constant")))
    }
}

fn err(node: &NodeProto, reason: &str) -> TrainError {
    TrainError::Shape {
        tensor: node.output.first().cloned().unwrap_or_default(),
        reason: format!("{} `{}`: {reason}", node.op_type, node.name),
    }
}

/// Shapes of every tensor of `graph` for batch size `batch`.
pub fn infer(graph: &ModelGraph, batch: usize) -> Result<Shapes, TrainError> {
    let mut s = seed(graph, batch)?;
    let g = graph.proto.graph.as_ref().expect("checked");
    for node in &g.node {
        infer_node(node, &mut s)?;
    }
    Ok(s)
}

/// The shapes known before any node runs: the data input (batch
/// `batch`), the parameters and the initializers.
pub fn seed(graph: &ModelGraph, batch: usize) -> Result<Shapes, TrainError> {
    let mut s = Shapes::default();
    let mut input_shape = vec![batch];
    input_shape.extend(graph.sample_shape());
    s.set(&graph.input, input_shape, graph.input_type);
    for (i, t) in graph.layout.tensors().iter().enumerate() {
        let _ = i;
        s.set(&t.name, t.shape.clone(), F32);
    }
    let g = graph.proto.graph.as_ref().expect("checked");
    for t in &g.initializer {
        s.set(&t.name, dims(t)?, t.data_type);
        if t.data_type == I64 {
            s.consts.insert(t.name.clone(), i64_values(t)?);
        }
        if t.data_type == BOOL {
            s.bools.insert(t.name.clone(), bool_values(t)?);
        }
    }
    Ok(s)
}

fn broadcast(node: &NodeProto, shapes: &[&[usize]]) -> Result<Vec<usize>, TrainError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(err(node, &format!("cannot broadcast {shapes:?}")));
            }
        }
    }
    Ok(out)
}

fn axis(node: &NodeProto, a: i64, rank: usize) -> Result<usize, TrainError> {
    let r = rank as i64;
    if a < -r || a >= r.max(1) {
        return Err(err(node, &format!("axis {a} out of range for rank {rank}")));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

/// Output size of a sliding window; `None` when the window does not fit
/// (or the attributes overflow, as a hostile model's can).
pub fn window_out(
    input: usize,
    k: usize,
    stride: usize,
    pad_lo: usize,
    pad_hi: usize,
    dil: usize,
) -> Option<usize> {
    let span = dil.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let padded = input.checked_add(pad_lo)?.checked_add(pad_hi)?;
    (padded >= span && stride > 0).then(|| (padded - span) / stride + 1)
}

/// Elements of a tensor of `shape`; an error when that overflows.
fn numel(node: &NodeProto, shape: &[usize]) -> Result<usize, TrainError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| err(node, &format!("{shape:?} has more elements than usize")))
}

/// Input `i`'s name.
fn input_name(node: &NodeProto, i: usize) -> Result<&str, TrainError> {
    node.input
        .get(i)
        .map(String::as_str)
        .ok_or_else(|| err(node, &format!("missing input {i}")))
}

/// Spatial attributes of Conv and pooling nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    /// All begins, then all ends (ONNX order).
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
}

/// Read and check the spatial attributes of a Conv or pooling node.
pub fn spatial_attrs(node: &NodeProto, kernel: Vec<usize>) -> Result<Window, TrainError> {
    let n = kernel.len();
    if let Some(p) = attr_s(node, "auto_pad")
        && p != "NOTSET"
        && p != "VALID"
    {
        return Err(err(
            node,
            &format!("auto_pad={p} is not supported; export explicit pads"),
        ));
    }
    if attr_i(node, "ceil_mode").unwrap_or(0) != 0 {
        return Err(err(node, "ceil_mode=1 is not supported"));
    }
    let to_us = |v: Vec<i64>| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>();
    let strides = attr_ints(node, "strides").map(to_us).unwrap_or(vec![1; n]);
    let pads = attr_ints(node, "pads").map(to_us).unwrap_or(vec![0; 2 * n]);
    let dil = attr_ints(node, "dilations")
        .map(to_us)
        .unwrap_or(vec![1; n]);
    if strides.len() != n || pads.len() != 2 * n || dil.len() != n {
        return Err(err(
            node,
            "strides/pads/dilations do not match the kernel rank",
        ));
    }
    if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
        return Err(err(node, "zero stride, dilation or kernel"));
    }
    Ok(Window {
        kernel,
        strides,
        pads,
        dilations: dil,
    })
}

fn input_shape(node: &NodeProto, s: &Shapes, i: usize) -> Result<Vec<usize>, TrainError> {
    let name = node
        .input
        .get(i)
        .ok_or_else(|| err(node, &format!("missing input {i}")))?;
    Ok(s.shape(name)?.to_vec())
}

/// Infer the outputs of one node from the shapes of its inputs.
pub fn infer_node(node: &NodeProto, s: &mut Shapes) -> Result<(), TrainError> {
    let op = node.op_type.as_str();
    macro_rules! inp {
        ($i:expr) => {
            input_shape(node, s, $i)?
        };
    }
    let out0 = node.output.first().cloned().unwrap_or_default();
    let x_ty = node.input.first().map(|n| s.ty(n)).unwrap_or(F32);
    let (shape, ty): (Vec<usize>, i32) = match op {
        "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" | "Exp" | "Log" | "Neg" | "Sqrt" | "Sin"
        | "Cos" | "Reciprocal" | "Softmax" | "LogSoftmax" | "Identity" | "Dropout" | "Abs"
        | "CumSum" | "Erf" | "Gelu" | "HardSigmoid" | "HardSwish" | "Clip" | "Trilu" | "PRelu" => {
            if op == "Dropout" {
                dropout_mask(node, s)?;
            }
            if (op == "Neg" || op == "Identity")
                && let Some(c) = s.consts.get(input_name(node, 0)?).cloned()
            {
                let v = if op == "Neg" {
                    c.iter().map(|x| x.checked_neg()).collect()
                } else {
                    Some(c)
                };
                if let Some(v) = v {
                    s.consts.insert(out0.clone(), v);
                }
            }
            (inp!(0), x_ty)
        }
        "Cast" => {
            let to = attr_i(node, "to").ok_or_else(|| err(node, "missing `to`"))? as i32;
            if to == I64
                && let Some(c) = s.consts.get(input_name(node, 0)?).cloned()
            {
                s.consts.insert(out0.clone(), c);
            }
            (inp!(0), to)
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Equal" | "Greater" | "Less" => {
            let fmod = attr_i(node, "fmod").unwrap_or(0) != 0;
            let a = inp!(0);
            let b = inp!(1);
            if let (Some(ca), Some(cb)) =
                (s.consts.get(&node.input[0]), s.consts.get(&node.input[1]))
                && ca.len() == cb.len().max(ca.len())
                && (cb.len() == ca.len() || cb.len() == 1)
            {
                let f = |x: i64, y: i64| match op {
                    "Add" => x.checked_add(y),
                    "Sub" => x.checked_sub(y),
                    "Mul" => x.checked_mul(y),
                    "Div" => x.checked_div(y),
                    // ONNX Mod: C's remainder with fmod=1, else the
                    // remainder takes the divisor's sign (Python's %).
                    "Mod" if fmod => x.checked_rem(y),
                    "Mod" => x.checked_rem(y).map(|r| {
                        if r != 0 && (r < 0) != (y < 0) {
                            r + y
                        } else {
                            r
                        }
                    }),
                    _ => None,
                };
                let v: Option<Vec<i64>> = ca
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| f(x, cb[if cb.len() == 1 { 0 } else { i }]))
                    .collect();
                if let Some(v) = v {
                    s.consts.insert(out0.clone(), v);
                }
            }
            let ty = if matches!(op, "Equal" | "Greater" | "Less") {
                BOOL
            } else {
                x_ty
            };
            (broadcast(node, &[&a, &b])?, ty)
        }
        "Where" => {
            let (c, a, b) = (inp!(0), inp!(1), inp!(2));
            (broadcast(node, &[&c, &a, &b])?, s.ty(&node.input[1]))
        }
        "Sum" => {
            let all: Vec<Vec<usize>> = (0..node.input.len())
                .map(|i| input_shape(node, s, i))
                .collect::<Result<_, _>>()?;
            let refs: Vec<&[usize]> = all.iter().map(|v| v.as_slice()).collect();
            (broadcast(node, &refs)?, x_ty)
        }
        "Gemm" => {
            let (a, b) = (inp!(0), inp!(1));
            if a.len() != 2 || b.len() != 2 {
                return Err(err(node, "Gemm needs 2-D inputs"));
            }
            let ta = attr_i(node, "transA").unwrap_or(0) != 0;
            let tb = attr_i(node, "transB").unwrap_or(0) != 0;
            let (m, k) = if ta { (a[1], a[0]) } else { (a[0], a[1]) };
            let (k2, n) = if tb { (b[1], b[0]) } else { (b[0], b[1]) };
            if k != k2 {
                return Err(err(node, &format!("inner dimensions {k} and {k2} differ")));
            }
            (vec![m, n], x_ty)
        }
        "MatMul" => {
            let (a, b) = (inp!(0), inp!(1));
            if a.len() < 2 || b.len() < 2 {
                return Err(err(node, "MatMul with a 1-D operand is not supported"));
            }
            let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
            let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
            if k != k2 {
                return Err(err(node, &format!("inner dimensions {k} and {k2} differ")));
            }
            let mut batch = broadcast(node, &[&a[..a.len() - 2], &b[..b.len() - 2]])?;
            batch.extend([m, n]);
            (batch, x_ty)
        }
        "Conv" | "ConvTranspose" => {
            let (x, w) = (inp!(0), inp!(1));
            if x.len() != 4 || w.len() != 4 {
                return Err(err(
                    node,
                    "only 2-D convolutions (4-D tensors) are supported",
                ));
            }
            let Window {
                kernel: k,
                strides: st,
                pads,
                dilations: dil,
            } = spatial_attrs(node, w[2..].to_vec())?;
            let group = usize::try_from(attr_i(node, "group").unwrap_or(1))
                .ok()
                .filter(|&g| g >= 1)
                .ok_or_else(|| err(node, "group must be at least 1"))?;
            let mut out = vec![x[0]];
            if op == "Conv" {
                if Some(x[1]) != w[1].checked_mul(group) || !w[0].is_multiple_of(group) {
                    return Err(err(
                        node,
                        &format!(
                            "input has {} channels and the weight is {w:?}: not a convolution in {group} group(s)",
                            x[1]
                        ),
                    ));
                }
                out.push(w[0]);
                for i in 0..2 {
                    out.push(
                        window_out(x[2 + i], k[i], st[i], pads[i], pads[2 + i], dil[i])
                            .ok_or_else(|| err(node, "kernel larger than padded input"))?,
                    );
                }
            } else {
                if x[1] != w[0] || !w[0].is_multiple_of(group) {
                    return Err(err(node, "ConvTranspose channel mismatch"));
                }
                out.push(
                    w[1].checked_mul(group)
                        .ok_or_else(|| err(node, "output channels overflow"))?,
                );
                let op_ = attr_ints(node, "output_padding").unwrap_or(vec![0, 0]);
                if op_.len() != 2 || op_.iter().any(|&p| p < 0) {
                    return Err(err(node, "output_padding must be two non-negative ints"));
                }
                for i in 0..2 {
                    // st·(x-1) + output_padding + dil·(k-1) + 1 - pads, checked.
                    let full = x[2 + i]
                        .checked_sub(1)
                        .and_then(|v| st[i].checked_mul(v))
                        .and_then(|v| v.checked_add(op_[i] as usize))
                        .and_then(|v| v.checked_add(dil[i].checked_mul(k[i] - 1)?))
                        .and_then(|v| v.checked_add(1))
                        .and_then(|v| v.checked_sub(pads[i])?.checked_sub(pads[2 + i]))
                        .ok_or_else(|| err(node, "output size out of range"))?;
                    out.push(full);
                }
            }
            (out, x_ty)
        }
        "MaxPool" | "AveragePool" => {
            let x = inp!(0);
            if x.len() != 4 {
                return Err(err(node, "only 2-D pooling is supported"));
            }
            if node.output.len() > 1 {
                return Err(err(node, "the Indices output is not supported"));
            }
            let kernel: Vec<usize> = attr_ints(node, "kernel_shape")
                .ok_or_else(|| err(node, "missing kernel_shape"))?
                .into_iter()
                .map(|v| usize::try_from(v).unwrap_or(0))
                .collect();
            if kernel.len() != 2 {
                return Err(err(node, "kernel_shape must have two entries"));
            }
            let Window {
                kernel: k,
                strides: st,
                pads,
                dilations: dil,
            } = spatial_attrs(node, kernel)?;
            let mut out = vec![x[0], x[1]];
            for i in 0..2 {
                out.push(
                    window_out(x[2 + i], k[i], st[i], pads[i], pads[2 + i], dil[i])
                        .ok_or_else(|| err(node, "window larger than padded input"))?,
                );
            }
            (out, x_ty)
        }
        "GlobalAveragePool" => {
            let x = inp!(0);
            if x.len() < 2 {
                return Err(err(node, "input rank below 2"));
            }
            let mut out = x[..2].to_vec();
            out.extend(std::iter::repeat_n(1, x.len() - 2));
            (out, x_ty)
        }
        "Flatten" => {
            let x = inp!(0);
            let a = axis(node, attr_i(node, "axis").unwrap_or(1), x.len() + 1)?;
            (vec![numel(node, &x[..a])?, numel(node, &x[a..])?], x_ty)
        }
        "Reshape" => {
            let x = inp!(0);
            let target = s.konst(node, 1)?.to_vec();
            let total = numel(node, &x)?;
            let mut out = Vec::with_capacity(target.len());
            let mut infer_at = None;
            for (i, &d) in target.iter().enumerate() {
                match d {
                    0 => out.push(*x.get(i).ok_or_else(|| err(node, "0 past the input rank"))?),
                    -1 if infer_at.is_none() => {
                        infer_at = Some(i);
                        out.push(1);
                    }
                    d if d > 0 => out.push(d as usize),
                    _ => return Err(err(node, &format!("bad target shape {target:?}"))),
                }
            }
            let known = numel(node, &out)?;
            if let Some(i) = infer_at {
                if known == 0 || !total.is_multiple_of(known) {
                    return Err(err(node, &format!("cannot reshape {x:?} to {target:?}")));
                }
                out[i] = total / known;
            }
            if numel(node, &out)? != total {
                return Err(err(node, &format!("cannot reshape {x:?} to {target:?}")));
            }
            if let Some(c) = s.consts.get(&node.input[0]).cloned() {
                s.consts.insert(out0.clone(), c);
            }
            (out, x_ty)
        }
        "Transpose" => {
            let x = inp!(0);
            let perm: Vec<usize> = attr_ints(node, "perm")
                .map(|p| p.into_iter().map(|v| v as usize).collect())
                .unwrap_or_else(|| (0..x.len()).rev().collect());
            if perm.len() != x.len() || perm.iter().any(|&p| p >= x.len()) {
                return Err(err(node, "perm does not match rank"));
            }
            (perm.iter().map(|&p| x[p]).collect(), x_ty)
        }
        "Concat" => {
            let first = inp!(0);
            let a = axis(
                node,
                attr_i(node, "axis").ok_or_else(|| err(node, "missing axis"))?,
                first.len(),
            )?;
            let mut out = first.clone();
            out[a] = 0;
            let mut folded = Some(Vec::new());
            for i in 0..node.input.len() {
                let sh = inp!(i);
                if sh.len() != first.len() {
                    return Err(err(node, "inputs of different ranks"));
                }
                out[a] = out[a]
                    .checked_add(sh[a])
                    .ok_or_else(|| err(node, "concatenated size overflows"))?;
                folded = match (folded, s.consts.get(&node.input[i])) {
                    (Some(mut acc), Some(c)) => {
                        acc.extend_from_slice(c);
                        Some(acc)
                    }
                    _ => None,
                };
            }
            if let Some(v) = folded {
                s.consts.insert(out0.clone(), v);
            }
            (out, x_ty)
        }
        "Gather" => {
            let (d, idx) = (inp!(0), inp!(1));
            if d.is_empty() {
                return Err(err(node, "gather from a scalar"));
            }
            let a = axis(node, attr_i(node, "axis").unwrap_or(0), d.len())?;
            if let (Some(data), Some(ix)) =
                (s.consts.get(&node.input[0]), s.consts.get(&node.input[1]))
                && d.len() == 1
            {
                let n = data.len() as i64;
                let v: Option<Vec<i64>> = ix
                    .iter()
                    .map(|&i| {
                        let i = if i < 0 { i.checked_add(n)? } else { i };
                        data.get(usize::try_from(i).ok()?).copied()
                    })
                    .collect();
                let v = v.ok_or_else(|| err(node, "constant index out of range"))?;
                s.consts.insert(out0.clone(), v);
            }
            let mut out = d[..a].to_vec();
            out.extend(&idx);
            out.extend(&d[a + 1..]);
            (out, x_ty)
        }
        "Unsqueeze" | "Squeeze" => {
            let x = inp!(0);
            let axes: Vec<i64> = if node.input.len() > 1 {
                s.konst(node, 1)?.to_vec()
            } else {
                attr_ints(node, "axes").unwrap_or_default()
            };
            let out = if op == "Unsqueeze" {
                let rank = x.len() + axes.len();
                let mut ax: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(node, a, rank))
                    .collect::<Result<_, _>>()?;
                ax.sort_unstable();
                let mut out = x.clone();
                for a in ax {
                    if a > out.len() {
                        return Err(err(node, "repeated or out-of-range axes"));
                    }
                    out.insert(a, 1);
                }
                out
            } else {
                let ax: Vec<usize> = if axes.is_empty() {
                    (0..x.len()).filter(|&i| x[i] == 1).collect()
                } else {
                    axes.iter()
                        .map(|&a| axis(node, a, x.len()))
                        .collect::<Result<_, _>>()?
                };
                x.iter()
                    .enumerate()
                    .filter(|(i, _)| !ax.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            };
            if let Some(c) = s.consts.get(&node.input[0]).cloned() {
                s.consts.insert(out0.clone(), c);
            }
            (out, x_ty)
        }
        "ReduceSum" | "ReduceMean" => {
            let x = inp!(0);
            let axes = reduce_axes(node, s)?;
            let keep = attr_i(node, "keepdims").unwrap_or(1) != 0;
            if axes.is_empty() && attr_i(node, "noop_with_empty_axes").unwrap_or(0) != 0 {
                s.set(&out0, x, x_ty);
                return Ok(());
            }
            let ax: Vec<usize> = if axes.is_empty() {
                (0..x.len()).collect()
            } else {
                axes.iter()
                    .map(|&a| axis(node, a, x.len()))
                    .collect::<Result<_, _>>()?
            };
            let out = x
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| match (ax.contains(&i), keep) {
                    (true, true) => Some(1),
                    (true, false) => None,
                    (false, _) => Some(d),
                })
                .collect();
            (out, x_ty)
        }
        "Expand" => {
            let x = inp!(0);
            let target: Vec<usize> = s
                .konst(node, 1)?
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect();
            (broadcast(node, &[&x, &target])?, x_ty)
        }
        "Slice" => {
            let x = inp!(0);
            let ranges = slice_axes(node, s, &x)?;
            let mut out = x.clone();
            for r in &ranges {
                out[r.axis] = r.len;
            }
            if let Some(c) = s.consts.get(&node.input[0]).cloned()
                && x.len() == 1
            {
                let folded: Vec<i64> = match ranges.first() {
                    Some(r) => (0..r.len)
                        .map(|j| {
                            usize::try_from(r.start as i64 + j as i64 * r.step)
                                .ok()
                                .and_then(|i| c.get(i).copied())
                                .ok_or_else(|| err(node, "slice out of range"))
                        })
                        .collect::<Result<_, _>>()?,
                    None => c,
                };
                s.consts.insert(out0.clone(), folded);
            }
            (out, x_ty)
        }
        "Shape" => {
            // `start` and `end` (opset 15) take a range of the dimensions.
            let x = inp!(0);
            let r = x.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(attr_i(node, "start").unwrap_or(0));
            let end = clamp(attr_i(node, "end").unwrap_or(r)).max(start);
            let dims: Vec<i64> = x[start..end].iter().map(|&d| d as i64).collect();
            let len = dims.len();
            s.consts.insert(out0.clone(), dims);
            (vec![len], I64)
        }
        "Constant" => {
            let t = attr(node, "value")
                .and_then(|a| a.t.as_ref())
                .ok_or_else(|| err(node, "only `value` constants are supported"))?;
            if t.data_type == I64 {
                s.consts.insert(out0.clone(), i64_values(t)?);
            }
            if t.data_type == BOOL {
                s.bools.insert(out0.clone(), bool_values(t)?);
            }
            (dims(t)?, t.data_type)
        }
        "Split" => {
            let x = inp!(0);
            let sizes = split_sizes(node, s, &x)?;
            let a = axis(node, attr_i(node, "axis").unwrap_or(0), x.len())?;
            for (o, &len) in node.output.iter().zip(&sizes).skip(1) {
                let mut sh = x.clone();
                sh[a] = len;
                s.set(o, sh, x_ty);
            }
            let mut sh = x.clone();
            sh[a] = sizes[0];
            (sh, x_ty)
        }
        "ConstantOfShape" => {
            let dims: Vec<usize> = s
                .konst(node, 0)?
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| err(node, "negative dimension")))
                .collect::<Result<_, _>>()?;
            let n = numel(node, &dims)?;
            let value = attr(node, "value").and_then(|a| a.t.as_ref());
            let ty = value.map(|t| t.data_type).unwrap_or(F32);
            if ty == I64 && n <= 64 {
                let v = value
                    .map(i64_values)
                    .transpose()?
                    .and_then(|v| v.first().copied());
                s.consts.insert(out0.clone(), vec![v.unwrap_or(0); n]);
            }
            (dims, ty)
        }
        "LayerNormalization" => {
            let x = inp!(0);
            if node.output.len() > 1 {
                return Err(err(node, "only the first output is supported"));
            }
            let a = axis(node, attr_i(node, "axis").unwrap_or(-1), x.len())?;
            if a + 1 != x.len() {
                return Err(err(node, "normalisation over the last axis only"));
            }
            let _ = attr_f(node, "epsilon");
            (x, x_ty)
        }
        op if super::kernels::is_fedge_op(op) => {
            let x = inp!(0);
            let shape = super::kernels::output_shape(node, &x).map_err(|e| err(node, &e))?;
            // FedgeSgd's second output (the new momentum) is shaped like its first.
            for o in node.output.iter().skip(1) {
                s.set(o, shape.clone(), F32);
            }
            (shape, F32)
        }
        "BatchNormalization" => {
            if attr_i(node, "training_mode").unwrap_or(0) != 0 || node.output.len() > 1 {
                return Err(TrainError::UnsupportedForm {
                    op: op.into(),
                    node: node.name.clone(),
                    reason: "only the inference form (running statistics, one output) is supported; export the model in eval mode".into(),
                });
            }
            (inp!(0), x_ty)
        }
        other => {
            return Err(TrainError::UnsupportedForm {
                op: other.into(),
                node: node.name.clone(),
                reason: "no shape rule (unsupported op)".into(),
            });
        }
    };
    s.set(&out0, shape, ty);
    Ok(())
}

/// Dropout runs as in inference (the output is the input); its optional
/// mask output is all true, a bool tensor shaped like the input. Training
/// mode (a `training_mode` input that is not a constant false) would drop
/// at random, which a reproducible training step does not do: refused.
fn dropout_mask(node: &NodeProto, s: &mut Shapes) -> Result<(), TrainError> {
    if let Some(tm) = node.input.get(2).filter(|n| !n.is_empty()) {
        match s.bools.get(tm) {
            Some(v) if v.iter().all(|&b| !b) => {}
            _ => {
                return Err(TrainError::UnsupportedForm {
                    op: node.op_type.clone(),
                    node: node.name.clone(),
                    reason: "training mode (random dropping) is not supported; export the model in eval mode, where Dropout is the identity".into(),
                });
            }
        }
    }
    if let Some(mask) = node.output.get(1).filter(|n| !n.is_empty()) {
        let x = input_shape(node, s, 0)?;
        s.set(mask, x, BOOL);
    }
    Ok(())
}
