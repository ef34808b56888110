// Conv and ConvTranspose (NCHW) as implicit GEMM for matmul.wgsl:
// M = output channels, N = batch x output pixels, K = input channels x
// kernel taps; the input patch is gathered on the fly (no im2col buffer).
// A grouped Conv (ConvTranspose is ungrouped) is one product per group,
// the group being the product's batch index `b`: M and K are then one
// group's output channels and input channels x taps.
// prm = [M, N, K, transpose, batch, C_in, IH, IW, OH, OW, KH, KW, sh, sw,
//        pad_top, pad_left, dh, dw, has_bias, groups]; in0 x, in1 w,
// in2 bias. Conv weights are [groups x M, C_in / groups, KH, KW];
// ConvTranspose weights [C_in, M, KH, KW].

fn mm_dims() -> vec3<u32> {
    return vec3<u32>(prm[0], prm[1], prm[2]);
}

fn load_a(b: u32, m: u32, k: u32) -> f32 {
    if (prm[3] == 0u) {
        return bitcast<f32>(in1[(b * prm[0] + m) * prm[2] + k]);
    }
    let taps = prm[10] * prm[11];
    let ci = k / taps;
    return bitcast<f32>(in1[(ci * prm[0] + m) * taps + k % taps]);
}

fn load_b(b: u32, k: u32, n: u32) -> f32 {
    let taps = prm[10] * prm[11];
    let ci = b * (prm[2] / taps) + k / taps;
    let r = k % taps;
    let ky = r / prm[11];
    let kx = r % prm[11];
    let pixels = prm[8] * prm[9];
    let img = n / pixels;
    let p = n % pixels;
    let oy = p / prm[9];
    let ox = p % prm[9];
    var iy: i32;
    var ix: i32;
    if (prm[3] == 0u) {
        iy = i32(oy * prm[12] + ky * prm[16]) - i32(prm[14]);
        ix = i32(ox * prm[13] + kx * prm[17]) - i32(prm[15]);
    } else {
        let ty = i32(oy + prm[14]) - i32(ky * prm[16]);
        let tx = i32(ox + prm[15]) - i32(kx * prm[17]);
        if (ty < 0 || tx < 0 || ty % i32(prm[12]) != 0 || tx % i32(prm[13]) != 0) {
            return 0.0;
        }
        iy = ty / i32(prm[12]);
        ix = tx / i32(prm[13]);
    }
    if (iy < 0 || ix < 0 || iy >= i32(prm[6]) || ix >= i32(prm[7])) {
        return 0.0;
    }
    return bitcast<f32>(in0[((img * prm[5] + ci) * prm[6] + u32(iy)) * prm[7] + u32(ix)]);
}

fn store_c(b: u32, m: u32, n: u32, v: f32) {
    let pixels = prm[8] * prm[9];
    let co = b * prm[0] + m;
    var r = v;
    if (prm[18] == 1u) {
        r += bitcast<f32>(in2[co]);
    }
    dst[((n / pixels) * prm[0] * prm[19] + co) * pixels + n % pixels] = bitcast<u32>(r);
}
