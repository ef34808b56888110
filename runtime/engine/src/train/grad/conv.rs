//! Convolution gradients: one im2col GEMM per layer on tract (in chunks of
//! images, grouped per group), the portable rules in plain ONNX ops, and
//! the forward lowering of Conv to the same GEMMs.

use super::*;

pub(super) fn conv(
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
        out[2] = Some(bias_grad(b, gy)?);
    }
    Ok(())
}

/// Conv's `group` attribute (1 when absent).
pub(super) fn group_of(node: &NodeProto) -> usize {
    attr_i(node, "group").unwrap_or(1).max(1) as usize
}

/// Input and weight gradients of one ungrouped 2-D convolution in
/// standard ONNX ops: `dX = ConvTranspose(G, W)` with the forward strides,
/// pads and dilations, `dW` a Conv of the transposed input by the
/// transposed output gradient (the forward stride becomes the dilation,
/// the forward dilation the stride).
pub(super) fn conv_portable(
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
pub(super) fn geometry_of(
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
pub(super) fn chunk_images(g: &Geometry, bytes_max: usize) -> usize {
    let [rows, p] = g.cols_shape();
    let bytes = 4 * rows * p;
    let chunks = bytes.div_ceil(bytes_max.max(1)).clamp(1, g.n.max(1));
    g.n.div_ceil(chunks)
}

/// `(first image, images)` of each chunk.
pub(super) fn chunks(n: usize, per: usize) -> Vec<(usize, usize)> {
    (0..n)
        .step_by(per.max(1))
        .map(|s| (s, per.min(n - s)))
        .collect()
}

/// Rows (or, with `axis` 1, columns) `[first, first + len)` of `t`.
pub(super) fn slice(
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
pub(super) fn im2col_chunk(
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
pub(super) fn concat_named(
    b: &mut Builder,
    parts: &[String],
    axis: i64,
    out: &str,
) -> Result<(), TrainError> {
    let refs: Vec<&str> = parts.iter().map(|s| s.as_str()).collect();
    if refs.len() == 1 {
        return b.op_named("Identity", &refs, vec![], out);
    }
    b.op_named("Concat", &refs, vec![onnx::int("axis", axis)], out)
}

/// Emit a forward node the tract lowering computes its own way, writing
/// the node's output; false when `node` stays as it is.
///
/// - Conv (2-D, no dilation), ungrouped: `FedgeConv` (per image
///   `Y = W2 x im2col(X) + bias`, `W2` the weight as `[Co, C*kh*kw]`, the
///   patches packed straight into the matrix kernel's panels).
/// - Grouped Conv: per chunk of images, the patches materialized and one
///   batched product over the groups, bias added, back to NCHW. When the
///   whole batch is one chunk its patches are kept for the weight
///   gradient ([`Builder::conv_cols`]).
/// - MaxPool over non-overlapping windows: `FedgeMaxPool`.
/// - Gemm (transA=0) with no bias, or a bias of one value per column and
///   beta 1: `FedgeLinear` (the weight read in place, not packed).
pub fn lower_forward(b: &mut Builder, node: &NodeProto) -> Result<bool, TrainError> {
    debug_assert_eq!(b.lowering, Lowering::Tract);
    match node.op_type.as_str() {
        "Gemm" => {
            let (a, w) = (node.input[0].as_str(), node.input[1].as_str());
            let (sa, sw) = (b.try_shape(a)?, b.try_shape(w)?);
            let tb = attr_i(node, "transB").unwrap_or(0) != 0;
            if attr_i(node, "transA").unwrap_or(0) != 0 || sa.len() != 2 || sw.len() != 2 {
                return Ok(false);
            }
            let n = if tb { sw[0] } else { sw[1] };
            let mut inputs = vec![a, w];
            if let Some(c) = node.input.get(2).filter(|c| !c.is_empty()) {
                let sc = b.try_shape(c)?;
                let beta = attr_f(node, "beta").unwrap_or(1.0);
                if beta != 1.0 || !(sc == [n] || sc == [1, n]) {
                    return Ok(false);
                }
                inputs.push(c);
            }
            let attrs = vec![
                onnx::int("trans_b", tb as i64),
                onnx::float("alpha", attr_f(node, "alpha").unwrap_or(1.0)),
                onnx::int("n", n as i64),
            ];
            b.fedge_op_named(kernels::LINEAR, &inputs, attrs, &[node.output[0].as_str()])?;
            Ok(true)
        }
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
            if groups == 1 {
                // One fused op: per image, the patches packed straight
                // into the matrix kernel's panels, bias added in its store.
                let mut inputs = vec![x, w];
                if let Some(bias) = node.input.get(2).filter(|b| !b.is_empty()) {
                    inputs.push(bias);
                }
                let attrs = conv_attrs(&g, co, inputs.len() == 3, 1);
                b.fedge_op_named(kernels::CONV, &inputs, attrs, &[y])?;
                return Ok(true);
            }
            // Grouped: [groups, co/groups, ck] against the patches as
            // [groups, ck, pixels], one batched product.
            let w2 = b.reshape(w, &[groups, co / groups, ck])?;
            let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
                Some(bias) => Some(b.reshape(bias, &[co, 1])?),
                None => None,
            };
            let per = chunk_images(&g, b.im2col_bytes_max);
            let mut parts = Vec::new();
            for (first, len) in chunks(g.n, per) {
                let cols = im2col_chunk(b, x, &g, first, len)?;
                let pixels = len * ys[2] * ys[3];
                let cols3 = b.reshape(&cols, &[groups, ck, pixels])?;
                let y3 = b.binary("MatMul", &w2, &cols3)?;
                let mut y2 = b.reshape(&y3, &[co, pixels])?;
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

/// Conv gradients as one large matrix product each (tract lowering), `W2`
/// the weight as `[Co, C*kh*kw]` and `G` the output gradient: ungrouped,
/// `FedgeConvGradW` (`dW2 = G x im2col(X)^T`, inner dimension `n*Ho*Wo`,
/// in chunks of images whose packed patches fit `im2col_bytes_max`) and
/// `FedgeConvGradX` (`dX = col2im(W2^T x G)`, image by image); grouped,
/// the same products on materialized patches batched over the groups
/// ([`grouped_conv_as_gemm`]).
pub(super) fn conv_as_gemm(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let (x, w) = (node.input[0].as_str(), node.input[1].as_str());
    let (xs, ws, gs) = (b.shape(x), b.shape(w), b.shape(gy));
    let g = geometry_of(node, &xs, ws[2..].to_vec(), &gs)?;
    let co = ws[0];
    let per = chunk_images(&g, b.im2col_bytes_max);
    let groups = group_of(node);
    if groups > 1 {
        let parts = chunks(g.n, per);
        return grouped_conv_as_gemm(b, node, gy, needs, out, (&g, &parts, groups));
    }
    if needs[1] {
        let attrs = conv_attrs(&g, co, false, per);
        out[1] = Some(
            b.fedge_op(kernels::CONV_GRAD_W, &[x, gy], attrs, 1)?
                .remove(0),
        );
    }
    if needs[0] {
        let attrs = conv_attrs(&g, co, false, per);
        out[0] = Some(
            b.fedge_op(kernels::CONV_GRAD_X, &[gy, w], attrs, 1)?
                .remove(0),
        );
    }
    if needs.len() > 2 && needs[2] {
        out[2] = Some(bias_grad(b, gy)?);
    }
    Ok(())
}

/// The attributes of fedge's convolution ops ([`kernels::CONV`] and its
/// gradients): geometry, output channels, bias, images per product.
fn conv_attrs(
    g: &Geometry,
    co: usize,
    bias: bool,
    images: usize,
) -> Vec<tract_onnx::pb::AttributeProto> {
    vec![
        onnx::ints("geometry", &g.to_ints()),
        onnx::int("co", co as i64),
        onnx::int("bias", bias as i64),
        onnx::int("images", images as i64),
    ]
}

/// [`conv_as_gemm`] for a grouped (or depthwise) convolution: the same
/// products batched over the groups. With `cols` as `[groups, ck, pixels]`,
/// `G` as `[groups, co/groups, pixels]` and `W` as `[groups, co/groups, ck]`:
/// `dW^T = cols x G^T` and `dX = col2im(W^T x G)`, per group.
pub(super) fn grouped_conv_as_gemm(
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
        out[2] = Some(bias_grad(b, gy)?);
    }
    Ok(())
}

/// A 2-D convolution's bias gradient, `gy` summed over batch and pixels:
/// over the pixels first (the contiguous axes), then the batch, which
/// tract reduces several times faster than the three axes at once.
fn bias_grad(b: &mut Builder, gy: &str) -> Result<String, TrainError> {
    let per_image = b.reduce_sum(gy, &[2, 3], false)?;
    b.reduce_sum(&per_image, &[0], false)
}
