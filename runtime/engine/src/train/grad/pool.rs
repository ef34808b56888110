//! Pooling gradients: fused or reshaping rules for non-overlapping
//! windows, one-hot convolutions for overlapping or padded ones.

use super::*;

/// Nearest-neighbour upsampling of `t` ([N,C,h,w]) by (kh, kw), via
/// Reshape + Expand + Reshape.
pub(super) fn upsample(
    b: &mut Builder,
    t: &str,
    kh: usize,
    kw: usize,
) -> Result<String, TrainError> {
    let s = b.shape(t);
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let r = b.reshape(t, &[n, c, h, 1, w, 1])?;
    let target = b.const_i64(&[n as i64, c as i64, h as i64, kh as i64, w as i64, kw as i64]);
    let e = b.op("Expand", &[&r, &target], vec![])?;
    b.reshape(&e, &[n, c, h * kh, w * kw])
}

pub(super) fn pool(
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
pub(super) fn max_pool_grad(
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
pub(super) fn pool_grad_windows(
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

/// When the gradient `gy` of a Relu's output `y` is a `FedgeMaxPoolGrad`
/// of `y` itself (the Relu feeds only a MaxPool: a gradient summed from
/// several uses comes from an `Add`), mark that node `positive` so that it
/// also applies the Relu's mask (a window's maximum is what `y` holds at
/// the position the gradient goes to); true when it did.
pub(super) fn fold_relu_into_pool_grad(b: &mut Builder, y: &str, gy: &str) -> bool {
    let producer = b
        .nodes
        .iter_mut()
        .rev()
        .find(|n| n.output.iter().any(|o| o == gy));
    match producer {
        Some(n)
            if n.op_type == kernels::MAX_POOL_GRAD
                && n.domain == kernels::DOMAIN
                && n.input.first().map(String::as_str) == Some(y)
                && onnx::attr_i(n, "positive").is_none() =>
        {
            n.attribute.push(onnx::int("positive", 1));
            true
        }
        _ => false,
    }
}
