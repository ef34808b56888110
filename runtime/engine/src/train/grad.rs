//! Gradient rules, one per op, written in plain ONNX ops that tract runs.
//! Each rule receives the gradient of the node's first output and returns
//! the gradient of each input that needs one. Every rule is checked against
//! central finite differences in `runtime/engine/tests/grad_check.rs`.

use tract_onnx::pb::NodeProto;

use super::TrainError;
use super::compile::{Builder, Lowering};
use super::kernels::{self, Geometry};
use super::onnx::{self, F32, attr_f, attr_i, attr_ints};
use super::shape::{Window, spatial_attrs};

mod conv;
mod dense;
mod pool;

pub use conv::lower_forward;
use conv::*;
use dense::*;
use pool::*;

/// Ops with a gradient rule.
pub const SUPPORTED: &[&str] = &[
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Reciprocal",
    "Abs",
    "Sum",
    "Neg",
    "Sqrt",
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Concat",
    "Softmax",
    "LogSoftmax",
    "Gather",
    "LayerNormalization",
    "Dropout",
    "Identity",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "Erf",
    "Gelu",
    "Pow",
    "ReduceMean",
    "ReduceSum",
    "Split",
    "Slice",
    "Expand",
    "Where",
    "Trilu",
    "Cast",
];

pub fn has_rule(op: &str) -> bool {
    SUPPORTED.contains(&op)
}

fn unsupported(node: &NodeProto, reason: impl Into<String>) -> TrainError {
    TrainError::UnsupportedForm {
        op: node.op_type.clone(),
        node: node.name.clone(),
        reason: reason.into(),
    }
}

/// Gradients of `node`'s inputs given `gys`, the gradients of its
/// outputs that carry one (every part of a Split, else the first output;
/// `None` where an output does not reach the loss).
pub fn backward(
    b: &mut Builder,
    node: &NodeProto,
    gys: &[Option<String>],
    needs: &[bool],
) -> Result<Vec<Option<String>>, TrainError> {
    let n = node.input.len();
    let mut out: Vec<Option<String>> = vec![None; n];
    if node.op_type == "Split" {
        split(b, node, gys, &mut out)?;
        return Ok(out);
    }
    let Some(gy) = gys.first().cloned().flatten() else {
        return Ok(out);
    };
    let gy = gy.as_str();
    let x = |i: usize| node.input[i].as_str();
    let y = node.output[0].as_str();
    match node.op_type.as_str() {
        // Dropout runs in inference mode (shape inference refuses training
        // mode); a float-to-float Cast passes the gradient through.
        "Identity" | "Dropout" | "Cast" => out[0] = Some(gy.to_string()),
        "Clip" => out[0] = Some(clip(b, node, gy, needs)?),
        "HardSigmoid" => {
            // y = clamp(alpha x + beta, 0, 1): slope alpha strictly inside.
            let alpha = attr_f(node, "alpha").unwrap_or(0.2);
            let (zero, one) = (b.scalar(0.0), b.scalar(1.0));
            let g = b.scale(gy, alpha)?;
            let below_one = b.binary("Less", y, &one)?;
            let g = b.op("Where", &[&below_one, &g, &zero], vec![])?;
            let above_zero = b.binary("Greater", y, &zero)?;
            out[0] = Some(b.op("Where", &[&above_zero, &g, &zero], vec![])?);
        }
        "HardSwish" => {
            // y = x clamp(x/6 + 1/2, 0, 1): dy/dx is 0 below -3, 1 above
            // 3 and x/3 + 1/2 between.
            let (zero, one, half) = (b.scalar(0.0), b.scalar(1.0), b.scalar(0.5));
            let (lo, hi) = (b.scalar(-3.0), b.scalar(3.0));
            let third = b.scale(x(0), 1.0 / 3.0)?;
            let mid = b.binary("Add", &third, &half)?;
            let above = b.binary("Greater", x(0), &hi)?;
            let d = b.op("Where", &[&above, &one, &mid], vec![])?;
            let below = b.binary("Less", x(0), &lo)?;
            let d = b.op("Where", &[&below, &zero, &d], vec![])?;
            out[0] = Some(b.binary("Mul", gy, &d)?);
        }
        "Erf" => {
            // d erf(x) = 2/sqrt(pi) exp(-x^2)
            let x2 = b.binary("Mul", x(0), x(0))?;
            let nx2 = b.unary("Neg", &x2)?;
            let e = b.unary("Exp", &nx2)?;
            let d = b.scale(&e, std::f32::consts::FRAC_2_SQRT_PI)?;
            out[0] = Some(b.binary("Mul", gy, &d)?);
        }
        "Gelu" => out[0] = Some(gelu(b, node, gy)?),
        "Pow" => pow(b, node, gy, needs, &mut out)?,
        "ReduceMean" | "ReduceSum" => out[0] = Some(reduce(b, node, gy)?),
        "Slice" => out[0] = Some(slice_grad(b, node, gy)?),
        "Expand" => {
            let xs = b.shape(x(0));
            out[0] = Some(b.unbroadcast(gy, &xs)?);
        }
        "Where" => {
            // The condition is bool: no gradient; each branch gets the
            // gradient where it was taken.
            let zero = b.scalar(0.0);
            for i in 1..3 {
                if needs[i] {
                    let xs = b.shape(x(i));
                    let ins = if i == 1 {
                        [x(0), gy, zero.as_str()]
                    } else {
                        [x(0), zero.as_str(), gy]
                    };
                    let g = b.op("Where", &ins, vec![])?;
                    out[i] = Some(b.unbroadcast(&g, &xs)?);
                }
            }
        }
        "Trilu" => {
            // The kept triangle passes the gradient: the same Trilu of it.
            let mut ins = vec![gy];
            if let Some(k) = node.input.get(1).filter(|k| !k.is_empty()) {
                ins.push(k);
            }
            out[0] = Some(b.op("Trilu", &ins, node.attribute.clone())?);
        }
        "Neg" => out[0] = Some(b.unary("Neg", gy)?),
        "Add" | "Sub" => {
            for i in 0..2 {
                if needs[i] {
                    let xs = b.shape(x(i));
                    let g = if i == 1 && node.op_type == "Sub" {
                        b.unary("Neg", gy)?
                    } else {
                        gy.to_string()
                    };
                    out[i] = Some(b.unbroadcast(&g, &xs)?);
                }
            }
        }
        "Mul" => {
            for i in 0..2 {
                if needs[i] {
                    let xs = b.shape(x(i));
                    let g = b.binary("Mul", gy, x(1 - i))?;
                    out[i] = Some(b.unbroadcast(&g, &xs)?);
                }
            }
        }
        "Div" => {
            if needs[0] {
                let xs = b.shape(x(0));
                let g = b.binary("Div", gy, x(1))?;
                out[0] = Some(b.unbroadcast(&g, &xs)?);
            }
            if needs[1] {
                // d(a/b)/db = -y/b
                let xs = b.shape(x(1));
                let gyy = b.binary("Mul", gy, y)?;
                let q = b.binary("Div", &gyy, x(1))?;
                let neg = b.unary("Neg", &q)?;
                out[1] = Some(b.unbroadcast(&neg, &xs)?);
            }
        }
        "Relu" if b.lowering == Lowering::Tract => {
            // Masked by the output (y > 0 exactly where x > 0), so that the
            // input is used by the Relu alone and tract rectifies it in
            // place: one activation-sized tensor fewer per layer.
            out[0] = Some(match fold_relu_into_pool_grad(b, y, gy) {
                true => gy.to_string(),
                false => b
                    .fedge_op(kernels::RELU_GRAD, &[y, gy], vec![], 1)?
                    .remove(0),
            });
        }
        "Relu" | "LeakyRelu" => {
            let zero = b.scalar(0.0);
            let mask = b.binary("Greater", x(0), &zero)?;
            let other = if node.op_type == "Relu" {
                zero.clone()
            } else {
                b.scale(gy, attr_f(node, "alpha").unwrap_or(0.01))?
            };
            out[0] = Some(b.op("Where", &[&mask, gy, &other], vec![])?);
        }
        "PRelu" => {
            // y = x where x > 0, else slope x (the slope broadcasts).
            let zero = b.scalar(0.0);
            let pos = b.binary("Greater", x(0), &zero)?;
            if needs[0] {
                let gs = b.binary("Mul", gy, x(1))?;
                out[0] = Some(b.op("Where", &[&pos, gy, &gs], vec![])?);
            }
            if needs[1] {
                let gx = b.binary("Mul", gy, x(0))?;
                let g = b.op("Where", &[&pos, &zero, &gx], vec![])?;
                let ss = b.shape(x(1));
                out[1] = Some(b.unbroadcast(&g, &ss)?);
            }
        }
        "Sigmoid" => {
            let one = b.scalar(1.0);
            let om = b.binary("Sub", &one, y)?;
            let d = b.binary("Mul", y, &om)?;
            out[0] = Some(b.binary("Mul", gy, &d)?);
        }
        "Tanh" => {
            let one = b.scalar(1.0);
            let y2 = b.binary("Mul", y, y)?;
            let d = b.binary("Sub", &one, &y2)?;
            out[0] = Some(b.binary("Mul", gy, &d)?);
        }
        "Exp" => out[0] = Some(b.binary("Mul", gy, y)?),
        "Log" => out[0] = Some(b.binary("Div", gy, x(0))?),
        "Reciprocal" => {
            // d(1/x) = -1/x^2 = -y^2
            let y2 = b.binary("Mul", y, y)?;
            let g = b.binary("Mul", gy, &y2)?;
            out[0] = Some(b.unary("Neg", &g)?);
        }
        "Abs" => {
            // sign(x), 0 at 0 (PyTorch's choice)
            let zero = b.scalar(0.0);
            let neg = b.unary("Neg", gy)?;
            let below = b.binary("Less", x(0), &zero)?;
            let g = b.op("Where", &[&below, &neg, gy], vec![])?;
            let at_zero = b.binary("Equal", x(0), &zero)?;
            out[0] = Some(b.op("Where", &[&at_zero, &zero, &g], vec![])?);
        }
        "Sum" => {
            for (i, need) in needs.iter().enumerate() {
                if *need {
                    let xs = b.shape(x(i));
                    out[i] = Some(b.unbroadcast(gy, &xs)?);
                }
            }
        }
        "Sqrt" => {
            let g = b.binary("Div", gy, y)?;
            out[0] = Some(b.scale(&g, 0.5)?);
        }
        "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
            let xs = b.shape(x(0));
            out[0] = Some(b.reshape(gy, &xs)?);
        }
        "Transpose" => {
            let r = b.shape(x(0)).len();
            let perm: Vec<usize> = attr_ints(node, "perm")
                .map(|p| p.into_iter().map(|v| v as usize).collect())
                .unwrap_or_else(|| (0..r).rev().collect());
            let mut inv = vec![0; r];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            out[0] = Some(b.transpose(gy, &inv)?);
        }
        "Concat" => {
            let r = b.shape(x(0)).len() as i64;
            let a = attr_i(node, "axis").unwrap_or(0);
            let a = if a < 0 { a + r } else { a };
            let mut off = 0i64;
            for (i, need) in needs.iter().enumerate() {
                let len = b.shape(x(i))[a as usize] as i64;
                if *need {
                    let st = b.const_i64(&[off]);
                    let en = b.const_i64(&[off + len]);
                    let ax = b.const_i64(&[a]);
                    out[i] = Some(b.op("Slice", &[gy, &st, &en, &ax], vec![])?);
                }
                off += len;
            }
        }
        "Softmax" | "LogSoftmax" => {
            let r = b.shape(x(0)).len() as i64;
            let a = attr_i(node, "axis").unwrap_or(-1);
            let a = (if a < 0 { a + r } else { a }) as usize;
            if node.op_type == "Softmax" {
                // dx = y * (g - sum(g * y))
                let gyy = b.binary("Mul", gy, y)?;
                let s = b.reduce_sum(&gyy, &[a], true)?;
                let d = b.binary("Sub", gy, &s)?;
                out[0] = Some(b.binary("Mul", y, &d)?);
            } else {
                // dx = g - exp(y) * sum(g)
                let s = b.reduce_sum(gy, &[a], true)?;
                let p = b.unary("Exp", y)?;
                let ps = b.binary("Mul", &p, &s)?;
                out[0] = Some(b.binary("Sub", gy, &ps)?);
            }
        }
        "Gemm" => gemm(b, node, gy, needs, &mut out)?,
        "MatMul" => matmul(b, node, gy, needs, &mut out)?,
        "Conv" => conv(b, node, gy, needs, &mut out)?,
        "MaxPool" | "AveragePool" => pool(b, node, gy, &mut out)?,
        "GlobalAveragePool" => {
            let xs = b.shape(x(0));
            let hw: usize = xs[2..].iter().product();
            let sh: Vec<i64> = xs.iter().map(|&d| d as i64).collect();
            let sh = b.const_i64(&sh);
            let e = b.op("Expand", &[gy, &sh], vec![])?;
            out[0] = Some(b.scale(&e, 1.0 / hw as f32)?);
        }
        "Gather" => gather(b, node, gy, &mut out)?,
        "LayerNormalization" => layer_norm(b, node, gy, needs, &mut out)?,
        other => {
            return Err(TrainError::UnsupportedOp {
                op: other.into(),
                node: node.name.clone(),
            });
        }
    }
    Ok(out)
}

/// Gather along any axis: the output gradient scattered back with a
/// one-hot product, `dData[pre, d, post] = sum over i of [idx_i == d]
/// G[pre, i, post]` (repeated indices add up). Constant indices may be
/// negative (`x[:, -1]`); data-dependent ones (token ids) are taken as
/// given.
fn gather(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let (data, idx) = (node.input[0].as_str(), node.input[1].as_str());
    let ds = b.shape(data);
    let r = ds.len() as i64;
    let a = attr_i(node, "axis").unwrap_or(0);
    let a = (if a < 0 { a + r } else { a }) as usize;
    let dim = ds[a];
    let count: usize = b.shape(idx).iter().product();
    let (pre, post): (usize, usize) = (ds[..a].iter().product(), ds[a + 1..].iter().product());
    let idx = match b.s.consts.get(idx).cloned() {
        Some(c) => {
            let v: Vec<i64> = c
                .iter()
                .map(|&i| if i < 0 { i + dim as i64 } else { i })
                .collect();
            b.const_i64(&v)
        }
        None => idx.to_string(),
    };
    let flat = b.reshape(&idx, &[count, 1])?;
    let range: Vec<i64> = (0..dim as i64).collect();
    let range = b.const_i64(&range);
    let eq = b.binary("Equal", &flat, &range)?;
    let onehot = b.cast(&eq, F32)?;
    let oht = b.transpose(&onehot, &[1, 0])?;
    let g = if pre == 1 {
        b.reshape(gy, &[count, post])?
    } else {
        b.reshape(gy, &[pre, count, post])?
    };
    let d = b.binary("MatMul", &oht, &g)?;
    out[0] = Some(b.reshape(&d, &ds)?);
    Ok(())
}

fn layer_norm(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let x = node.input[0].as_str();
    let eps = attr_f(node, "epsilon").unwrap_or(1e-5);
    let mean = b.reduce_mean_last(x)?;
    let xc = b.binary("Sub", x, &mean)?;
    let xc2 = b.binary("Mul", &xc, &xc)?;
    let var = b.reduce_mean_last(&xc2)?;
    let e = b.scalar(eps);
    let ve = b.binary("Add", &var, &e)?;
    let sd = b.unary("Sqrt", &ve)?;
    let inv = b.unary("Reciprocal", &sd)?;
    let xh = b.binary("Mul", &xc, &inv)?;
    if needs.len() > 1 && needs[1] {
        let ss = b.shape(&node.input[1]);
        let g = b.binary("Mul", gy, &xh)?;
        out[1] = Some(b.unbroadcast(&g, &ss)?);
    }
    if needs.len() > 2 && needs[2] {
        let bs = b.shape(&node.input[2]);
        out[2] = Some(b.unbroadcast(gy, &bs)?);
    }
    if needs[0] {
        let gx = b.binary("Mul", gy, &node.input[1])?;
        let m1 = b.reduce_mean_last(&gx)?;
        let gxh = b.binary("Mul", &gx, &xh)?;
        let m2 = b.reduce_mean_last(&gxh)?;
        let t = b.binary("Mul", &xh, &m2)?;
        let d = b.binary("Sub", &gx, &m1)?;
        let d = b.binary("Sub", &d, &t)?;
        out[0] = Some(b.binary("Mul", &d, &inv)?);
    }
    Ok(())
}

/// Clip: the gradient passes where the input is inside [min, max] (either
/// bound may be absent); bounds are constants (ReLU6 is Clip(x, 0, 6)).
fn clip(b: &mut Builder, node: &NodeProto, gy: &str, needs: &[bool]) -> Result<String, TrainError> {
    if needs.iter().skip(1).any(|&n| n) {
        return Err(unsupported(
            node,
            "a trainable min or max bound has no gradient rule; make the bounds constants",
        ));
    }
    let x = node.input[0].as_str();
    let zero = b.scalar(0.0);
    let mut g = gy.to_string();
    for (i, cmp) in [(1, "Less"), (2, "Greater")] {
        if let Some(bound) = node.input.get(i).filter(|s| !s.is_empty()) {
            let outside = b.binary(cmp, x, bound)?;
            g = b.op("Where", &[&outside, &zero, &g], vec![])?;
        }
    }
    Ok(g)
}

/// Gelu, exact (`0.5 x (1 + erf(x / sqrt 2))`) or with
/// `approximate="tanh"`.
fn gelu(b: &mut Builder, node: &NodeProto, gy: &str) -> Result<String, TrainError> {
    let x = node.input[0].as_str();
    let (half, one) = (b.scalar(0.5), b.scalar(1.0));
    let approximate = super::onnx::attr_s(node, "approximate").unwrap_or_default();
    let d = match approximate.as_str() {
        "" | "none" => {
            // 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)
            let xs = b.scale(x, std::f32::consts::FRAC_1_SQRT_2)?;
            let erf = b.unary("Erf", &xs)?;
            let cdf = b.binary("Add", &one, &erf)?;
            let cdf = b.binary("Mul", &cdf, &half)?;
            let x2 = b.binary("Mul", x, x)?;
            let e = b.scale(&x2, -0.5)?;
            let e = b.unary("Exp", &e)?;
            let pdf = b.scale(&e, 1.0 / (2.0 * std::f32::consts::PI).sqrt())?;
            let xp = b.binary("Mul", x, &pdf)?;
            b.binary("Add", &cdf, &xp)?
        }
        "tanh" => {
            // u = c (x + k x^3), t = tanh u:
            // 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2)
            let (c, k) = ((2.0 / std::f32::consts::PI).sqrt(), 0.044715f32);
            let x2 = b.binary("Mul", x, x)?;
            let x3 = b.binary("Mul", &x2, x)?;
            let kx3 = b.scale(&x3, k)?;
            let inner = b.binary("Add", x, &kx3)?;
            let u = b.scale(&inner, c)?;
            let t = b.unary("Tanh", &u)?;
            let opt = b.binary("Add", &one, &t)?;
            let first = b.binary("Mul", &opt, &half)?;
            let t2 = b.binary("Mul", &t, &t)?;
            let sech2 = b.binary("Sub", &one, &t2)?;
            let kx2 = b.scale(&x2, 3.0 * k)?;
            let du = b.binary("Add", &one, &kx2)?;
            let du = b.scale(&du, 0.5 * c)?;
            let xs = b.binary("Mul", x, &sech2)?;
            let second = b.binary("Mul", &xs, &du)?;
            b.binary("Add", &first, &second)?
        }
        other => {
            return Err(unsupported(
                node,
                format!("approximate=\"{other}\" is not an ONNX Gelu form"),
            ));
        }
    };
    b.binary("Mul", gy, &d)
}

/// Pow with a constant exponent `p`: `dx = g p x^(p-1)`.
fn pow(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    if needs.get(1) == Some(&true) {
        return Err(unsupported(
            node,
            "a trainable exponent has no gradient rule; make the exponent a constant",
        ));
    }
    let x = node.input[0].as_str();
    let p = node.input[1].clone();
    let p = if b.s.types.get(&p).copied().unwrap_or(F32) != F32 {
        b.cast(&p, F32)?
    } else {
        p
    };
    let p = p.as_str();
    let one = b.scalar(1.0);
    let pm1 = b.binary("Sub", p, &one)?;
    let xp = b.binary("Pow", x, &pm1)?;
    let d = b.binary("Mul", &xp, p)?;
    let g = b.binary("Mul", gy, &d)?;
    let xs = b.shape(x);
    out[0] = Some(b.unbroadcast(&g, &xs)?);
    Ok(())
}

/// ReduceSum and ReduceMean: the output gradient spread back over the
/// reduced axes (divided by their size for the mean).
fn reduce(b: &mut Builder, node: &NodeProto, gy: &str) -> Result<String, TrainError> {
    let x = node.input[0].as_str();
    let xs = b.shape(x);
    let axes = super::shape::reduce_axes(node, &b.s)?;
    if axes.is_empty() && attr_i(node, "noop_with_empty_axes").unwrap_or(0) != 0 {
        return Ok(gy.to_string());
    }
    let r = xs.len() as i64;
    let ax: Vec<usize> = if axes.is_empty() {
        (0..xs.len()).collect()
    } else {
        axes.iter()
            .map(|&a| (if a < 0 { a + r } else { a }) as usize)
            .collect()
    };
    let kept: Vec<usize> = xs
        .iter()
        .enumerate()
        .map(|(i, &d)| if ax.contains(&i) { 1 } else { d })
        .collect();
    let g = b.reshape(gy, &kept)?;
    let sh: Vec<i64> = xs.iter().map(|&d| d as i64).collect();
    let sh = b.const_i64(&sh);
    let e = b.op("Expand", &[&g, &sh], vec![])?;
    if node.op_type == "ReduceMean" {
        let count: usize = ax.iter().map(|&i| xs[i]).product();
        b.scale(&e, 1.0 / count.max(1) as f32)
    } else {
        Ok(e)
    }
}

/// `t` with `before` and `after` zeros added along `axis`.
fn pad_axis(
    b: &mut Builder,
    t: &str,
    axis: usize,
    before: usize,
    after: usize,
) -> Result<String, TrainError> {
    if before == 0 && after == 0 {
        return Ok(t.to_string());
    }
    let ts = b.shape(t);
    let mut parts = Vec::new();
    for (len, is_t) in [(before, false), (0, true), (after, false)] {
        if is_t {
            parts.push(t.to_string());
        } else if len > 0 {
            let mut zs = ts.clone();
            zs[axis] = len;
            parts.push(b.zeros(&zs)?);
        }
    }
    let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    b.op("Concat", &refs, vec![onnx::int("axis", axis as i64)])
}

/// Slice: the gradient back in place, zeros around it. Per sliced axis,
/// a backward step first reverses the gradient (Gather with reversed
/// indices); a step above 1 interleaves `step - 1` zeros after each
/// element; then zeros pad it to the input's extent.
fn slice_grad(b: &mut Builder, node: &NodeProto, gy: &str) -> Result<String, TrainError> {
    let xs = b.shape(&node.input[0]);
    let axes = super::shape::slice_axes(node, &b.s, &xs)?;
    let mut g = gy.to_string();
    for r in axes {
        let dim = xs[r.axis];
        if r.len == 0 {
            let mut zs = b.shape(&g);
            zs[r.axis] = dim;
            g = b.zeros(&zs)?;
            continue;
        }
        let stride = r.step.unsigned_abs() as usize;
        // The lowest index taken, and g in ascending index order.
        let first = if r.step > 0 {
            r.start
        } else {
            let rev: Vec<i64> = (0..r.len as i64).rev().collect();
            let rev = b.const_i64(&rev);
            g = b.op(
                "Gather",
                &[&g, &rev],
                vec![onnx::int("axis", r.axis as i64)],
            )?;
            r.start - (r.len - 1) * stride
        };
        if stride > 1 {
            // [.., len, ..] -> [.., len, stride, ..] with zeros after each
            // element -> [.., len * stride, ..], cut to what the input holds.
            let gs = b.shape(&g);
            let mut one = gs.clone();
            one.insert(r.axis + 1, 1);
            let g1 = b.reshape(&g, &one)?;
            let mut zs = one.clone();
            zs[r.axis + 1] = stride - 1;
            let z = b.zeros(&zs)?;
            let cat = b.op(
                "Concat",
                &[&g1, &z],
                vec![onnx::int("axis", r.axis as i64 + 1)],
            )?;
            let mut spread = gs.clone();
            spread[r.axis] = r.len * stride;
            let spread_g = b.reshape(&cat, &spread)?;
            let keep = (r.len * stride).min(dim - first);
            g = slice(b, &spread_g, r.axis as i64, 0, keep)?;
        }
        let covered = b.shape(&g)[r.axis];
        g = pad_axis(b, &g, r.axis, first, dim - first - covered)?;
    }
    Ok(g)
}

/// Split: the parts' gradients concatenated back (zeros for a part that
/// does not reach the loss).
fn split(
    b: &mut Builder,
    node: &NodeProto,
    gys: &[Option<String>],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let xs = b.shape(&node.input[0]);
    let r = xs.len() as i64;
    let a = attr_i(node, "axis").unwrap_or(0);
    let a = if a < 0 { a + r } else { a };
    let mut parts = Vec::new();
    for (o, g) in node.output.iter().zip(gys) {
        parts.push(match g {
            Some(g) => g.clone(),
            None => {
                let os = b.shape(o);
                b.zeros(&os)?
            }
        });
    }
    let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    out[0] = Some(if refs.len() == 1 {
        refs[0].to_string()
    } else {
        b.op("Concat", &refs, vec![onnx::int("axis", a)])?
    });
    Ok(())
}
