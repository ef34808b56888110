// Element-wise ops with broadcasting, strided copies, gather and pooling.

// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
fn erf_approx(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    let y = 1.0 - poly * exp(-x * x);
    return select(-y, y, x >= 0.0);
}

// a^b as ONNX Pow: a negative base with an integral exponent keeps its
// sign rule (WGSL's pow is undefined for a < 0), 0^0 = 1.
fn pow_onnx(a: f32, b: f32) -> f32 {
    if (b == 0.0) {
        return 1.0;
    }
    if (a == 0.0) {
        return select(bitcast<f32>(0x7f800000u), 0.0, b > 0.0);
    }
    let p = pow(abs(a), b);
    if (a > 0.0) {
        return p;
    }
    if (fract(b) != 0.0) {
        return bitcast<f32>(0x7fc00000u);
    }
    return select(p, -p, fract(b * 0.5) != 0.0);
}

// eltwise: prm = [n, op, rank, ty0, ty1, ty2, out_ty, alpha,
//                 dims[6], strides0[6], strides1[6], strides2[6], beta]
fn ew_apply(op: u32, a: f32, b: f32, c: f32) -> f32 {
    switch op {
        case 0u: { return a; }
        case 1u: { return max(a, 0.0); }
        case 2u: { return select(a * pf(7u), a, a > 0.0); }
        case 3u: { return 1.0 / (1.0 + exp(-a)); }
        case 4u: { return tanh(clamp(a, -15.0, 15.0)); }
        case 5u: { return exp(a); }
        case 6u: { return log(a); }
        case 7u: { return -a; }
        case 8u: { return sqrt(a); }
        case 9u: { return 1.0 / a; }
        case 10u: { return abs(a); }
        case 11u: { return erf_approx(a); }
        case 12u: { return 0.5 * a * (1.0 + erf_approx(a * 0.70710678)); }
        case 13u: {
            let u = 0.7978845608 * (a + 0.044715 * a * a * a);
            return 0.5 * a * (1.0 + tanh(clamp(u, -15.0, 15.0)));
        }
        case 14u: { return clamp(pf(7u) * a + pf(32u), 0.0, 1.0); }
        case 15u: { return a * clamp(a / 6.0 + 0.5, 0.0, 1.0); }
        case 16u: { return min(max(a, pf(7u)), pf(32u)); }
        case 20u: { return a + b; }
        case 21u: { return a - b; }
        case 22u: { return a * b; }
        case 23u: { return a / b; }
        case 24u: { return pow_onnx(a, b); }
        case 28u: { return select(a * b, a, a > 0.0); }
        case 25u: { return select(0.0, 1.0, a == b); }
        case 26u: { return select(0.0, 1.0, a > b); }
        case 27u: { return select(0.0, 1.0, a < b); }
        case 30u: { return select(c, b, a != 0.0); }
        default: { return 0.0; }
    }
}

@compute @workgroup_size(256)
fn eltwise(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= prm[0]) {
        return;
    }
    let op = prm[1];
    var rem = i;
    var o0 = 0u;
    var o1 = 0u;
    var o2 = 0u;
    for (var k = prm[2]; k > 0u; k--) {
        let d = k - 1u;
        let dim = prm[8u + d];
        let c = rem % dim;
        rem = rem / dim;
        o0 += c * prm[14u + d];
        o1 += c * prm[20u + d];
        o2 += c * prm[26u + d];
    }
    let a = to_f32(in0[o0], prm[3]);
    var b = 0.0;
    var c = 0.0;
    if (op >= 20u) {
        b = to_f32(in1[o1], prm[4]);
    }
    if (op >= 30u) {
        c = to_f32(in2[o2], prm[5]);
    }
    dst[i] = from_f32(ew_apply(op, a, b, c), prm[6]);
}

// copy_strided: prm = [n, in_base, out_base, rank, dims[6], in_strides[6],
//                      out_strides[6]]
@compute @workgroup_size(256)
fn copy_strided(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= prm[0]) {
        return;
    }
    var rem = i;
    var si = prm[1];
    var so = prm[2];
    for (var k = prm[3]; k > 0u; k--) {
        let d = k - 1u;
        let dim = prm[4u + d];
        let c = rem % dim;
        rem = rem / dim;
        si += c * prm[10u + d];
        so += c * prm[16u + d];
    }
    dst[so] = in0[si];
}

// gather: prm = [n, inner, axis_len, index_count]; in0 data, in1 indices.
@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= prm[0]) {
        return;
    }
    let inner = prm[1];
    let len = prm[2];
    let count = prm[3];
    let k = i % inner;
    let t = i / inner;
    let j = t % count;
    let outer = t / count;
    var idx = bitcast<i32>(in1[j]);
    if (idx < 0) {
        idx += i32(len);
    }
    let row = u32(clamp(idx, 0, i32(len) - 1));
    dst[i] = in0[(outer * len + row) * inner + k];
}

// pool: prm = [n, H, W, OH, OW, kh, kw, sh, sw, pad_top, pad_left, dh, dw,
//              average, count_include_pad]; NCHW in, NCHW out.
@compute @workgroup_size(256)
fn pool(@builtin(global_invocation_id) gid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= prm[0]) {
        return;
    }
    let h = prm[1];
    let w = prm[2];
    let oh = prm[3];
    let ow = prm[4];
    let ox = i % ow;
    let t = i / ow;
    let oy = t % oh;
    let plane = t / oh;
    let base = plane * h * w;
    var best = -3.4028235e38;
    var sum = 0.0;
    var count = 0u;
    for (var ky = 0u; ky < prm[5]; ky++) {
        let iy = i32(oy * prm[7] + ky * prm[11]) - i32(prm[9]);
        if (iy < 0 || iy >= i32(h)) {
            continue;
        }
        for (var kx = 0u; kx < prm[6]; kx++) {
            let ix = i32(ox * prm[8] + kx * prm[12]) - i32(prm[10]);
            if (ix < 0 || ix >= i32(w)) {
                continue;
            }
            let v = bitcast<f32>(in0[base + u32(iy) * w + u32(ix)]);
            best = max(best, v);
            sum += v;
            count += 1u;
        }
    }
    var r = best;
    if (prm[13] == 1u) {
        var div = f32(count);
        if (prm[14] == 1u) {
            div = f32(prm[5] * prm[6]);
        }
        r = sum / div;
    }
    dst[i] = bitcast<u32>(r);
}

// trilu: prm = [n, rows, cols, k (i32), upper]; the upper (j - i >= k) or
// lower (j - i <= k) triangle of each matrix of in0, zeros elsewhere.
@compute @workgroup_size(256)
fn trilu(@builtin(global_invocation_id) gid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= prm[0]) {
        return;
    }
    let j = i32(i % prm[2]);
    let r = i32((i / prm[2]) % prm[1]);
    let k = bitcast<i32>(prm[3]);
    var keep = j - r <= k;
    if (prm[4] == 1u) {
        keep = j - r >= k;
    }
    dst[i] = select(0u, in0[i], keep);
}
