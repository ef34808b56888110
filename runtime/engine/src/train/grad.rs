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
            out[0] = Some(
                b.fedge_op(kernels::RELU_GRAD, &[x(0), gy], vec![], 1)?
                    .remove(0),
            );
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

fn gemm(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let alpha = attr_f(node, "alpha").unwrap_or(1.0);
    let beta = attr_f(node, "beta").unwrap_or(1.0);
    if attr_i(node, "transA").unwrap_or(0) != 0 {
        return Err(unsupported(node, "transA=1 has no gradient rule"));
    }
    let tb = attr_i(node, "transB").unwrap_or(0) != 0;
    let (a, w) = (node.input[0].as_str(), node.input[1].as_str());
    if needs[0] {
        // dA = alpha * G * B'^T
        out[0] = Some(b.op(
            "Gemm",
            &[gy, w],
            vec![
                onnx::float("alpha", alpha),
                onnx::int("transB", (!tb) as i64),
            ],
        )?);
    }
    if needs[1] {
        out[1] = Some(if tb {
            // B is [N, K]: dB = alpha * G^T A
            b.op(
                "Gemm",
                &[gy, a],
                vec![onnx::float("alpha", alpha), onnx::int("transA", 1)],
            )?
        } else {
            b.op(
                "Gemm",
                &[a, gy],
                vec![onnx::float("alpha", alpha), onnx::int("transA", 1)],
            )?
        });
    }
    if needs.len() > 2 && needs[2] {
        let cs = b.shape(&node.input[2]);
        let g = b.scale(gy, beta)?;
        out[2] = Some(b.unbroadcast(&g, &cs)?);
    }
    Ok(())
}

fn matmul(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let (a, w) = (node.input[0].as_str(), node.input[1].as_str());
    let (sa, sb) = (b.shape(a), b.shape(w));
    if needs[0] {
        let bt = b.transpose_last2(w)?;
        let g = b.binary("MatMul", gy, &bt)?;
        out[0] = Some(b.unbroadcast(&g, &sa)?);
    }
    if needs[1] {
        let g = if sb.len() == 2 && sa.len() > 2 {
            let k = sa[sa.len() - 1];
            let n = sb[1];
            let rows: usize = sa[..sa.len() - 1].iter().product();
            let a2 = b.reshape(a, &[rows, k])?;
            let g2 = b.reshape(gy, &[rows, n])?;
            let at = b.transpose(&a2, &[1, 0])?;
            b.binary("MatMul", &at, &g2)?
        } else {
            let at = b.transpose_last2(a)?;
            let g = b.binary("MatMul", &at, gy)?;
            b.unbroadcast(&g, &sb)?
        };
        out[1] = Some(g);
    }
    Ok(())
}

fn conv(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let (x, w) = (node.input[0].as_str(), node.input[1].as_str());
    let (xs, ws) = (b.shape(x), b.shape(w));
    let Window {
        kernel: k,
        strides: st,
        pads,
        dilations: dil,
    } = spatial_attrs(node, ws[2..].to_vec())?;
    // fedge's im2col has no dilation: a dilated convolution takes the
    // portable rules on tract too.
    if b.lowering == Lowering::Tract && dil.iter().all(|&d| d == 1) {
        return conv_as_gemm(b, node, gy, needs, out);
    }
    let win = Window {
        kernel: k,
        strides: st,
        pads,
        dilations: dil,
    };
    let groups = group_of(node);
    if groups == 1 {
        let (dx, dw) = conv_portable(b, node, (x, w, gy), (needs[0], needs[1]), &win)?;
        out[0] = dx;
        out[1] = dw;
    } else {
        // One group at a time: its input channels, its filters, its
        // output channels.
        let (cg, cog) = (xs[1] / groups, ws[0] / groups);
        let (mut dxs, mut dws) = (Vec::new(), Vec::new());
        for g in 0..groups {
            let xg = slice(b, x, 1, g * cg, cg)?;
            let wg = slice(b, w, 0, g * cog, cog)?;
            let gyg = slice(b, gy, 1, g * cog, cog)?;
            let (dx, dw) = conv_portable(b, node, (&xg, &wg, &gyg), (needs[0], needs[1]), &win)?;
            dxs.extend(dx);
            dws.extend(dw);
        }
        let cat = |b: &mut Builder, parts: &[String], axis: i64| {
            let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
            b.op("Concat", &refs, vec![onnx::int("axis", axis)])
        };
        if needs[0] {
            out[0] = Some(cat(b, &dxs, 1)?);
        }
        if needs[1] {
            out[1] = Some(cat(b, &dws, 0)?);
        }
    }
    if needs.len() > 2 && needs[2] {
        out[2] = Some(b.reduce_sum(gy, &[0, 2, 3], false)?);
    }
    Ok(())
}

/// Conv's `group` attribute (1 when absent).
fn group_of(node: &NodeProto) -> usize {
    attr_i(node, "group").unwrap_or(1).max(1) as usize
}

/// Input and weight gradients of one ungrouped 2-D convolution in
/// standard ONNX ops: `dX = ConvTranspose(G, W)` with the forward strides,
/// pads and dilations, `dW` a Conv of the transposed input by the
/// transposed output gradient (the forward stride becomes the dilation,
/// the forward dilation the stride).
fn conv_portable(
    b: &mut Builder,
    node: &NodeProto,
    (x, w, gy): (&str, &str, &str),
    (need_x, need_w): (bool, bool),
    win: &Window,
) -> Result<(Option<String>, Option<String>), TrainError> {
    let (xs, gs) = (b.shape(x), b.shape(gy));
    let (k, st, pads, dil) = (&win.kernel, &win.strides, &win.pads, &win.dilations);
    let to_i = |v: &[usize]| v.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let mut dx = None;
    if need_x {
        let mut op_pad = vec![0i64; 2];
        for i in 0..2 {
            let full = st[i] * (gs[2 + i] - 1) + dil[i] * (k[i] - 1) + 1;
            let produced = full - pads[i] - pads[2 + i];
            op_pad[i] = xs[2 + i] as i64 - produced as i64;
            if op_pad[i] < 0 || op_pad[i] >= st[i] as i64 {
                return Err(unsupported(
                    node,
                    "no ConvTranspose matches this stride/pad",
                ));
            }
        }
        dx = Some(b.op(
            "ConvTranspose",
            &[gy, w],
            vec![
                onnx::ints("strides", &to_i(st)),
                onnx::ints("pads", &to_i(pads)),
                onnx::ints("output_padding", &op_pad),
                onnx::ints("kernel_shape", &to_i(k)),
                onnx::ints("dilations", &to_i(dil)),
            ],
        )?);
    }
    let mut dw = None;
    if need_w {
        let xt = b.transpose(x, &[1, 0, 2, 3])?;
        let gt = b.transpose(gy, &[1, 0, 2, 3])?;
        let dwt = b.op(
            "Conv",
            &[&xt, &gt],
            vec![
                onnx::ints("pads", &to_i(pads)),
                onnx::ints("strides", &to_i(dil)),
                onnx::ints("dilations", &to_i(st)),
                onnx::ints("kernel_shape", &[gs[2] as i64, gs[3] as i64]),
            ],
        )?;
        let got = b.shape(&dwt);
        let dwt = if got[2] != k[0] || got[3] != k[1] {
            let st0 = b.const_i64(&[0, 0]);
            let en = b.const_i64(&[k[0] as i64, k[1] as i64]);
            let ax = b.const_i64(&[2, 3]);
            b.op("Slice", &[&dwt, &st0, &en, &ax], vec![])?
        } else {
            dwt
        };
        dw = Some(b.transpose(&dwt, &[1, 0, 2, 3])?);
    }
    Ok((dx, dw))
}

/// The window of `node` (a 2-D Conv or MaxPool) over `x`, with `y` its
/// output's shape.
fn geometry_of(
    node: &NodeProto,
    xs: &[usize],
    kernel: Vec<usize>,
    ys: &[usize],
) -> Result<Geometry, TrainError> {
    let win = spatial_attrs(node, kernel)?;
    Ok(Geometry {
        n: xs[0],
        c: xs[1],
        h: xs[2],
        w: xs[3],
        kh: win.kernel[0],
        kw: win.kernel[1],
        sh: win.strides[0],
        sw: win.strides[1],
        pt: win.pads[0],
        pl: win.pads[1],
        ho: ys[2],
        wo: ys[3],
    })
}

/// Images per chunk for a convolution with this geometry: the whole batch
/// when its patches fit `bytes_max` ([`super::compile::CompileOptions::im2col_bytes_max`]),
/// else equal chunks that do (one image at least).
fn chunk_images(g: &Geometry, bytes_max: usize) -> usize {
    let [rows, p] = g.cols_shape();
    let bytes = 4 * rows * p;
    let chunks = bytes.div_ceil(bytes_max.max(1)).clamp(1, g.n.max(1));
    g.n.div_ceil(chunks)
}

/// `(first image, images)` of each chunk.
fn chunks(n: usize, per: usize) -> Vec<(usize, usize)> {
    (0..n)
        .step_by(per.max(1))
        .map(|s| (s, per.min(n - s)))
        .collect()
}

/// Rows (or, with `axis` 1, columns) `[first, first + len)` of `t`.
fn slice(
    b: &mut Builder,
    t: &str,
    axis: i64,
    first: usize,
    len: usize,
) -> Result<String, TrainError> {
    if first == 0 && b.shape(t)[axis as usize] == len {
        return Ok(t.to_string());
    }
    let st = b.const_i64(&[first as i64]);
    let en = b.const_i64(&[(first + len) as i64]);
    let ax = b.const_i64(&[axis]);
    b.op("Slice", &[t, &st, &en, &ax], vec![])
}

/// `im2col` of images `[first, first + len)` of `x`.
fn im2col_chunk(
    b: &mut Builder,
    x: &str,
    g: &Geometry,
    first: usize,
    len: usize,
) -> Result<String, TrainError> {
    let xc = slice(b, x, 0, first, len)?;
    let gc = Geometry { n: len, ..*g };
    let attrs = vec![onnx::ints("geometry", &gc.to_ints())];
    Ok(b.fedge_op(kernels::IM2COL, &[&xc], attrs, 1)?.remove(0))
}

/// Concatenate along `axis` into `out` (or rename the one part).
fn concat_named(b: &mut Builder, parts: &[String], axis: i64, out: &str) -> Result<(), TrainError> {
    let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    if refs.len() == 1 {
        return b.op_named("Identity", &refs, vec![], out);
    }
    b.op_named("Concat", &refs, vec![onnx::int("axis", axis)], out)
}

/// Emit a forward node the tract lowering computes its own way, writing
/// the node's output; false when `node` stays as it is.
///
/// - Conv (2-D, no dilation): per chunk of images,
///   `Y = W2 x im2col(X)` as one matrix product (`W2` the weight as
///   `[Co, C*kh*kw]`), bias added, back to NCHW. When the whole batch is
///   one chunk its patches are kept for the weight gradient
///   ([`Builder::conv_cols`]).
/// - MaxPool over non-overlapping windows: `FedgeMaxPool`.
pub fn lower_forward(b: &mut Builder, node: &NodeProto) -> Result<bool, TrainError> {
    debug_assert_eq!(b.lowering, Lowering::Tract);
    match node.op_type.as_str() {
        "Conv" => {
            let (x, w) = (node.input[0].as_str(), node.input[1].as_str());
            let y = node.output[0].as_str();
            let (xs, ws, ys) = (b.try_shape(x)?, b.try_shape(w)?, b.try_shape(y)?);
            if xs.len() != 4 || ws.len() != 4 || ys.len() != 4 {
                return Ok(false);
            }
            let win = spatial_attrs(node, ws[2..].to_vec())?;
            if win.dilations.iter().any(|&d| d != 1) {
                return Ok(false);
            }
            let g = geometry_of(node, &xs, ws[2..].to_vec(), &ys)?;
            // ck: one group's rows of the patches.
            let (co, ck, groups) = (ws[0], ws[1] * ws[2] * ws[3], group_of(node));
            // Grouped: [groups, co/groups, ck] against the patches as
            // [groups, ck, pixels], one batched product.
            let w2 = if groups == 1 {
                b.reshape(w, &[co, ck])?
            } else {
                b.reshape(w, &[groups, co / groups, ck])?
            };
            let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
                Some(bias) => Some(b.reshape(bias, &[co, 1])?),
                None => None,
            };
            let per = chunk_images(&g, b.im2col_bytes_max);
            let mut parts = Vec::new();
            for (first, len) in chunks(g.n, per) {
                let cols = im2col_chunk(b, x, &g, first, len)?;
                let mut y2 = if groups == 1 {
                    b.binary("MatMul", &w2, &cols)?
                } else {
                    let pixels = len * ys[2] * ys[3];
                    let cols3 = b.reshape(&cols, &[groups, ck, pixels])?;
                    let y3 = b.binary("MatMul", &w2, &cols3)?;
                    b.reshape(&y3, &[co, pixels])?
                };
                if let Some(bias) = &bias {
                    y2 = b.binary("Add", &y2, bias)?;
                }
                let y4 = b.reshape(&y2, &[co, len, ys[2], ys[3]])?;
                parts.push(b.transpose(&y4, &[1, 0, 2, 3])?);
                if per >= g.n {
                    b.conv_cols.insert(y.to_string(), cols);
                }
            }
            concat_named(b, &parts, 0, y)?;
            Ok(true)
        }
        "MaxPool" => {
            let (x, y) = (node.input[0].as_str(), node.output[0].as_str());
            let (xs, ys) = (b.try_shape(x)?, b.try_shape(y)?);
            let kernel: Vec<usize> = attr_ints(node, "kernel_shape")
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as usize)
                .collect();
            if xs.len() != 4
                || ys.len() != 4
                || kernel.len() != 2
                || attr_i(node, "ceil_mode").unwrap_or(0) != 0
            {
                return Ok(false);
            }
            let win = spatial_attrs(node, kernel.clone())?;
            if win.strides != win.kernel
                || win.pads.iter().any(|&p| p != 0)
                || win.dilations.iter().any(|&d| d != 1)
            {
                return Ok(false);
            }
            let geometry = geometry_of(node, &xs, kernel, &ys)?;
            let attrs = vec![onnx::ints("geometry", &geometry.to_ints())];
            b.fedge_op_named(kernels::MAX_POOL, &[x], attrs, &[y])?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Conv gradients as one large matrix product each per chunk of images
/// (tract lowering). With `cols = im2col(X)` (`[C*kh*kw, n*Ho*Wo]`, kept
/// from the forward pass when the batch is one chunk), `G` the output
/// gradient and `W2` the weight as `[Co, C*kh*kw]`:
/// `dW2^T = sum over chunks of cols x G^T` (inner dimension `n*Ho*Wo`)
/// and `dX = col2im(W2^T x G)`, chunk by chunk.
fn conv_as_gemm(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let (x, w) = (node.input[0].as_str(), node.input[1].as_str());
    let (xs, ws, gs) = (b.shape(x), b.shape(w), b.shape(gy));
    let g = geometry_of(node, &xs, ws[2..].to_vec(), &gs)?;
    let (co, ck, hw) = (ws[0], ws[1] * ws[2] * ws[3], gs[2] * gs[3]);
    let p = gs[0] * hw;
    let parts = chunks(g.n, chunk_images(&g, b.im2col_bytes_max));
    let groups = group_of(node);
    if groups > 1 {
        return grouped_conv_as_gemm(b, node, gy, needs, out, (&g, &parts, groups));
    }
    if needs[1] {
        let gt = b.transpose(gy, &[0, 2, 3, 1])?;
        let g2t = b.reshape(&gt, &[p, co])?;
        let mut acc: Option<String> = None;
        for &(first, len) in &parts {
            let cols = match b.conv_cols.get(&node.output[0]) {
                Some(c) if parts.len() == 1 => c.clone(),
                _ => im2col_chunk(b, x, &g, first, len)?,
            };
            let g2tc = slice(b, &g2t, 0, first * hw, len * hw)?;
            let d = b.binary("MatMul", &cols, &g2tc)?;
            acc = Some(match acc {
                Some(a) => b.binary("Add", &a, &d)?,
                None => d,
            });
        }
        let dw2 = b.transpose(&acc.expect("a chunk"), &[1, 0])?;
        out[1] = Some(b.reshape(&dw2, &ws)?);
    }
    if needs[0] {
        let gt = b.transpose(gy, &[1, 0, 2, 3])?;
        let g2 = b.reshape(&gt, &[co, p])?;
        let w2 = b.reshape(w, &[co, ck])?;
        let w2t = b.transpose(&w2, &[1, 0])?;
        let mut dx = Vec::new();
        for &(first, len) in &parts {
            let g2c = slice(b, &g2, 1, first * hw, len * hw)?;
            let cols = b.binary("MatMul", &w2t, &g2c)?;
            let gc = Geometry { n: len, ..g };
            let attrs = vec![onnx::ints("geometry", &gc.to_ints())];
            dx.push(b.fedge_op(kernels::COL2IM, &[&cols], attrs, 1)?.remove(0));
        }
        let name = if dx.len() == 1 {
            dx.remove(0)
        } else {
            let refs: Vec<&str> = dx.iter().map(|s| s.as_str()).collect();
            b.op("Concat", &refs, vec![onnx::int("axis", 0)])?
        };
        out[0] = Some(name);
    }
    if needs.len() > 2 && needs[2] {
        out[2] = Some(b.reduce_sum(gy, &[0, 2, 3], false)?);
    }
    Ok(())
}

/// Nearest-neighbour upsampling of `t` ([N,C,h,w]) by (kh, kw), via
/// Reshape + Expand + Reshape.
fn upsample(b: &mut Builder, t: &str, kh: usize, kw: usize) -> Result<String, TrainError> {
    let s = b.shape(t);
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let r = b.reshape(t, &[n, c, h, 1, w, 1])?;
    let target = b.const_i64(&[n as i64, c as i64, h as i64, kh as i64, w as i64, kw as i64]);
    let e = b.op("Expand", &[&r, &target], vec![])?;
    b.reshape(&e, &[n, c, h * kh, w * kw])
}

fn pool(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let x = node.input[0].as_str();
    let xs = b.shape(x);
    let kernel: Vec<usize> = attr_ints(node, "kernel_shape")
        .unwrap_or_default()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let Window {
        kernel: k,
        strides: st,
        pads,
        dilations: dil,
    } = spatial_attrs(node, kernel)?;
    if dil.iter().any(|&d| d != 1) {
        return Err(unsupported(node, "dilated pooling has no gradient rule"));
    }
    if st != k
        || pads.iter().any(|&p| p != 0)
        || !xs[2].is_multiple_of(k[0])
        || !xs[3].is_multiple_of(k[1])
    {
        let win = Window {
            kernel: k,
            strides: st,
            pads,
            dilations: dil,
        };
        out[0] = Some(pool_grad_windows(b, node, gy, &win)?);
        return Ok(());
    }
    out[0] = Some(
        if node.op_type == "MaxPool" && b.lowering == Lowering::Tract {
            let ys = b.shape(&node.output[0]);
            let geometry = geometry_of(node, &xs, k.clone(), &ys)?;
            let attrs = vec![onnx::ints("geometry", &geometry.to_ints())];
            b.fedge_op(kernels::MAX_POOL_GRAD, &[x, gy], attrs, 1)?
                .remove(0)
        } else if node.op_type == "MaxPool" {
            max_pool_grad(b, x, &node.output[0], gy, k[0], k[1])?
        } else {
            let g_up = upsample(b, gy, k[0], k[1])?;
            b.scale(&g_up, 1.0 / (k[0] * k[1]) as f32)?
        },
    );
    Ok(())
}

/// Route each window's gradient to the first position holding its max
/// (PyTorch's convention), so ties (flat regions of real images) do not
/// multiply the gradient.
fn max_pool_grad(
    b: &mut Builder,
    x: &str,
    y: &str,
    gy: &str,
    kh: usize,
    kw: usize,
) -> Result<String, TrainError> {
    let xs = b.shape(x);
    let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
    let (ho, wo) = (h / kh, w / kw);
    let x6 = b.reshape(x, &[n, c, ho, kh, wo, kw])?;
    let xt = b.transpose(&x6, &[0, 1, 2, 4, 3, 5])?;
    let xw = b.reshape(&xt, &[n, c, ho, wo, kh * kw])?;
    let y5 = b.reshape(y, &[n, c, ho, wo, 1])?;
    let eq = b.binary("Equal", &xw, &y5)?;
    let eq = b.cast(&eq, F32)?;
    let axis = b.const_i64_scalar(4);
    let cs = b.op("CumSum", &[&eq, &axis], vec![])?;
    let one = b.scalar(1.0);
    let is_first = b.binary("Equal", &cs, &one)?;
    let is_first = b.cast(&is_first, F32)?;
    let first = b.binary("Mul", &eq, &is_first)?;
    let g5 = b.reshape(gy, &[n, c, ho, wo, 1])?;
    let gw = b.binary("Mul", &first, &g5)?;
    let g6 = b.reshape(&gw, &[n, c, ho, wo, kh, kw])?;
    let gt = b.transpose(&g6, &[0, 1, 2, 4, 3, 5])?;
    b.reshape(&gt, &[n, c, h, w])
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

/// [`conv_as_gemm`] for a grouped (or depthwise) convolution: the same
/// products batched over the groups. With `cols` as `[groups, ck, pixels]`,
/// `G` as `[groups, co/groups, pixels]` and `W` as `[groups, co/groups, ck]`:
/// `dW^T = cols x G^T` and `dX = col2im(W^T x G)`, per group.
fn grouped_conv_as_gemm(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
    (g, parts, groups): (&Geometry, &[(usize, usize)], usize),
) -> Result<(), TrainError> {
    let (x, w) = (node.input[0].as_str(), node.input[1].as_str());
    let (ws, gs) = (b.shape(w), b.shape(gy));
    let (co, ck, hw) = (ws[0], ws[1] * ws[2] * ws[3], gs[2] * gs[3]);
    let (cog, p) = (co / groups, gs[0] * hw);
    // G as [n, groups, co/groups, pixels of one image].
    let g4 = b.reshape(gy, &[gs[0], groups, cog, hw])?;
    if needs[1] {
        let gt = b.transpose(&g4, &[1, 0, 3, 2])?;
        let g3t = b.reshape(&gt, &[groups, p, cog])?;
        let mut acc: Option<String> = None;
        for &(first, len) in parts {
            let cols = match b.conv_cols.get(&node.output[0]) {
                Some(c) if parts.len() == 1 => c.clone(),
                _ => im2col_chunk(b, x, g, first, len)?,
            };
            let cols3 = b.reshape(&cols, &[groups, ck, len * hw])?;
            let g3tc = slice(b, &g3t, 1, first * hw, len * hw)?;
            let d = b.binary("MatMul", &cols3, &g3tc)?;
            acc = Some(match acc {
                Some(a) => b.binary("Add", &a, &d)?,
                None => d,
            });
        }
        let dw3 = b.transpose(&acc.expect("a chunk"), &[0, 2, 1])?;
        out[1] = Some(b.reshape(&dw3, &ws)?);
    }
    if needs[0] {
        let gt = b.transpose(&g4, &[1, 2, 0, 3])?;
        let g3 = b.reshape(&gt, &[groups, cog, p])?;
        let w3 = b.reshape(w, &[groups, cog, ck])?;
        let w3t = b.transpose(&w3, &[0, 2, 1])?;
        let mut dx = Vec::new();
        for &(first, len) in parts {
            let g3c = slice(b, &g3, 2, first * hw, len * hw)?;
            let cols3 = b.binary("MatMul", &w3t, &g3c)?;
            let cols = b.reshape(&cols3, &[groups * ck, len * hw])?;
            let gc = Geometry { n: len, ..*g };
            let attrs = vec![onnx::ints("geometry", &gc.to_ints())];
            dx.push(b.fedge_op(kernels::COL2IM, &[&cols], attrs, 1)?.remove(0));
        }
        let name = if dx.len() == 1 {
            dx.remove(0)
        } else {
            let refs: Vec<&str> = dx.iter().map(|s| s.as_str()).collect();
            b.op("Concat", &refs, vec![onnx::int("axis", 0)])?
        };
        out[0] = Some(name);
    }
    if needs.len() > 2 && needs[2] {
        out[2] = Some(b.reduce_sum(gy, &[0, 2, 3], false)?);
    }
    Ok(())
}

/// Pooling gradients over any windows (overlapping, padded, a remainder
/// left over): each window's `K = kh*kw` taps are read by a convolution
/// with one-hot filters (`[K, 1, kh, kw]`, one channel per tap) over the
/// images as `N*C` single channels; the taps' gradients go back with the
/// transposed convolution of the same filters, which adds up where windows
/// overlap and drops the padding. Max pooling sends a window's gradient to
/// its first maximum (PyTorch's choice; padding never wins: a tap outside
/// the image reads -3e38); average pooling divides by the window's size,
/// or with `count_include_pad=0` by its taps inside the image. Standard
/// ops only, so both lowerings (and the GPU) use it.
fn pool_grad_windows(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    win: &Window,
) -> Result<String, TrainError> {
    let (x, y) = (node.input[0].as_str(), node.output[0].as_str());
    let (xs, ys) = (b.shape(x), b.shape(y));
    let (kh, kw) = (win.kernel[0], win.kernel[1]);
    let taps = kh * kw;
    let nc = xs[0] * xs[1];
    let to_i = |v: &[usize]| v.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let mut onehot = vec![0.0f32; taps * taps];
    for t in 0..taps {
        onehot[t * taps + t] = 1.0;
    }
    let filters = b.const_f32(&[taps, 1, kh, kw], &onehot);
    let conv_attrs = || {
        vec![
            onnx::ints("kernel_shape", &[kh as i64, kw as i64]),
            onnx::ints("strides", &to_i(&win.strides)),
            onnx::ints("pads", &to_i(&win.pads)),
        ]
    };
    // Which taps of each window lie inside the image: [1, K, Ho, Wo].
    let ones = b.const_f32(&[1, 1, xs[2], xs[3]], &vec![1.0; xs[2] * xs[3]]);
    let inside = b.op("Conv", &[&ones, &filters], conv_attrs())?;
    let g1 = b.reshape(gy, &[nc, 1, ys[2], ys[3]])?;
    let gk = if node.op_type == "MaxPool" {
        let x1 = b.reshape(x, &[nc, 1, xs[2], xs[3]])?;
        let taps_x = b.op("Conv", &[&x1, &filters], conv_attrs())?;
        let half = b.scalar(0.5);
        let is_inside = b.binary("Greater", &inside, &half)?;
        let lowest = b.scalar(-3.0e38);
        let taps_x = b.op("Where", &[&is_inside, &taps_x, &lowest], vec![])?;
        let y1 = b.reshape(y, &[nc, 1, ys[2], ys[3]])?;
        let eq = b.binary("Equal", &taps_x, &y1)?;
        let eq = b.cast(&eq, F32)?;
        let axis = b.const_i64_scalar(1);
        let count = b.op("CumSum", &[&eq, &axis], vec![])?;
        let one = b.scalar(1.0);
        let first = b.binary("Equal", &count, &one)?;
        let first = b.cast(&first, F32)?;
        let first = b.binary("Mul", &eq, &first)?;
        b.binary("Mul", &first, &g1)?
    } else {
        let include_pad = attr_i(node, "count_include_pad").unwrap_or(0) != 0;
        let share = if include_pad {
            b.scale(&g1, 1.0 / taps as f32)?
        } else {
            let axes = b.const_i64(&[1]);
            let size = b.op(
                "ReduceSum",
                &[&inside, &axes],
                vec![onnx::int("keepdims", 1)],
            )?;
            b.binary("Div", &g1, &size)?
        };
        b.binary("Mul", &share, &inside)?
    };
    let mut out_pad = vec![0i64; 2];
    for i in 0..2 {
        let produced = win.strides[i] * (ys[2 + i] - 1) + win.kernel[i];
        let produced = produced as i64 - (win.pads[i] + win.pads[2 + i]) as i64;
        out_pad[i] = xs[2 + i] as i64 - produced;
        if out_pad[i] < 0 || out_pad[i] >= win.strides[i] as i64 {
            return Err(unsupported(
                node,
                "no ConvTranspose matches this stride/pad",
            ));
        }
    }
    let dx = b.op(
        "ConvTranspose",
        &[&gk, &filters],
        vec![
            onnx::ints("kernel_shape", &[kh as i64, kw as i64]),
            onnx::ints("strides", &to_i(&win.strides)),
            onnx::ints("pads", &to_i(&win.pads)),
            onnx::ints("output_padding", &out_pad),
        ],
    )?;
    b.reshape(&dx, &xs)
}
