// Reductions, softmax, layer normalisation and cumulative sums.

// reduce_*: prm = [n_out, r, mean, kept_rank, red_rank, kept_dims[6],
//                  kept_strides[6], red_dims[6], red_strides[6]]
fn kept_offset(o: u32) -> u32 {
    var rem = o;
    var off = 0u;
    for (var k = prm[3]; k > 0u; k--) {
        let d = k - 1u;
        let dim = prm[5u + d];
        off += (rem % dim) * prm[11u + d];
        rem = rem / dim;
    }
    return off;
}

fn reduced_offset(r: u32) -> u32 {
    var rem = r;
    var off = 0u;
    for (var k = prm[4]; k > 0u; k--) {
        let d = k - 1u;
        let dim = prm[17u + d];
        off += (rem % dim) * prm[23u + d];
        rem = rem / dim;
    }
    return off;
}

fn finish(s: f32) -> u32 {
    if (prm[2] == 1u) {
        return bitcast<u32>(s / f32(prm[1]));
    }
    return bitcast<u32>(s);
}

// One thread per output (short reductions).
@compute @workgroup_size(256)
fn reduce_thread(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = linear_id(gid, nwg);
    if (o >= prm[0]) {
        return;
    }
    let base = kept_offset(o);
    var s = 0.0;
    for (var r = 0u; r < prm[1]; r++) {
        s += bitcast<f32>(in0[base + reduced_offset(r)]);
    }
    dst[o] = finish(s);
}

var<workgroup> red_part: array<f32, 256>;

// One workgroup per output (long reductions): strided partial sums, then a
// tree in shared memory.
@compute @workgroup_size(256)
fn reduce_group(@builtin(workgroup_id) wg: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) t: u32) {
    let o = wg.x + wg.y * nwg.x;
    var s = 0.0;
    if (o < prm[0]) {
        let base = kept_offset(o);
        for (var r = t; r < prm[1]; r += THREADS) {
            s += bitcast<f32>(in0[base + reduced_offset(r)]);
        }
    }
    red_part[t] = s;
    workgroupBarrier();
    for (var width = THREADS / 2u; width > 0u; width = width / 2u) {
        if (t < width) {
            red_part[t] += red_part[t + width];
        }
        workgroupBarrier();
    }
    if (t == 0u && o < prm[0]) {
        dst[o] = finish(red_part[0]);
    }
}

// softmax: prm = [rows, len, inner, log]; one thread per row.
@compute @workgroup_size(256)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_id(gid, nwg);
    if (row >= prm[0]) {
        return;
    }
    let len = prm[1];
    let inner = prm[2];
    let base = (row / inner) * len * inner + row % inner;
    var m = -3.4028235e38;
    for (var j = 0u; j < len; j++) {
        m = max(m, bitcast<f32>(in0[base + j * inner]));
    }
    var s = 0.0;
    for (var j = 0u; j < len; j++) {
        s += exp(bitcast<f32>(in0[base + j * inner]) - m);
    }
    let lse = log(s);
    for (var j = 0u; j < len; j++) {
        let z = bitcast<f32>(in0[base + j * inner]) - m;
        if (prm[3] == 1u) {
            dst[base + j * inner] = bitcast<u32>(z - lse);
        } else {
            dst[base + j * inner] = bitcast<u32>(exp(z) / s);
        }
    }
}

// layer_norm: prm = [rows, len, eps, has_bias]; in0 x, in1 scale, in2 bias.
@compute @workgroup_size(256)
fn layer_norm(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = linear_id(gid, nwg);
    if (row >= prm[0]) {
        return;
    }
    let len = prm[1];
    let base = row * len;
    var mean = 0.0;
    for (var j = 0u; j < len; j++) {
        mean += bitcast<f32>(in0[base + j]);
    }
    mean = mean / f32(len);
    var variance = 0.0;
    for (var j = 0u; j < len; j++) {
        let d = bitcast<f32>(in0[base + j]) - mean;
        variance += d * d;
    }
    variance = variance / f32(len);
    let inv = 1.0 / sqrt(variance + pf(2u));
    for (var j = 0u; j < len; j++) {
        var y = (bitcast<f32>(in0[base + j]) - mean) * inv * bitcast<f32>(in1[j]);
        if (prm[3] == 1u) {
            y += bitcast<f32>(in2[j]);
        }
        dst[base + j] = bitcast<u32>(y);
    }
}

// cumsum: prm = [lines, len, inner, exclusive, reverse]; one thread per line.
@compute @workgroup_size(256)
fn cumsum(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let line = linear_id(gid, nwg);
    if (line >= prm[0]) {
        return;
    }
    let len = prm[1];
    let inner = prm[2];
    let base = (line / inner) * len * inner + line % inner;
    var s = 0.0;
    for (var jj = 0u; jj < len; jj++) {
        var j = jj;
        if (prm[4] == 1u) {
            j = len - 1u - jj;
        }
        let off = base + j * inner;
        let v = bitcast<f32>(in0[off]);
        if (prm[3] == 1u) {
            dst[off] = bitcast<u32>(s);
            s += v;
        } else {
            s += v;
            dst[off] = bitcast<u32>(s);
        }
    }
}
