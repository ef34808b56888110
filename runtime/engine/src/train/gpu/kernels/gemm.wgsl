// Gemm and batched MatMul operands for matmul.wgsl:
// C[b, m, n] = alpha * sum_k A[b, m, k] B[b, k, n] + beta * Cin[m, n]
// prm = [M, N, K, a_sb, a_sm, a_sk, b_sb, b_sk, b_sn, has_c, c_sm, c_sn,
//        alpha, beta]; in0 A, in1 B, in2 Cin; the output is [b, M, N].

fn mm_dims() -> vec3<u32> {
    return vec3<u32>(prm[0], prm[1], prm[2]);
}

fn load_a(b: u32, m: u32, k: u32) -> f32 {
    return bitcast<f32>(in0[b * prm[3] + m * prm[4] + k * prm[5]]);
}

fn load_b(b: u32, k: u32, n: u32) -> f32 {
    return bitcast<f32>(in1[b * prm[6] + k * prm[7] + n * prm[8]]);
}

fn store_c(b: u32, m: u32, n: u32, v: f32) {
    var r = v * pf(12u);
    if (prm[9] == 1u) {
        r += pf(13u) * bitcast<f32>(in2[m * prm[10] + n * prm[11]]);
    }
    dst[(b * prm[0] + m) * prm[1] + n] = bitcast<u32>(r);
}
