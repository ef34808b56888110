// Tiled matrix products C[b] = A[b] . B[b] over workgroup shared memory.
// The including module defines how operands are read and results stored:
//   fn mm_dims() -> vec3<u32>                    (M, N, K)
//   fn load_a(b: u32, m: u32, k: u32) -> f32
//   fn load_b(b: u32, k: u32, n: u32) -> f32
//   fn store_c(b: u32, m: u32, n: u32, v: f32)
// Workgroup (x, y, z) computes the tile at columns x, rows y of batch z.

const TK: u32 = 16u;

var<workgroup> sa: array<f32, 256>;   // [TK][16] of A, k-major
var<workgroup> sb: array<f32, 256>;   // [TK][16] of B, k-major

// 16 x 16 tile, one output per thread (small or thin products).
@compute @workgroup_size(16, 16)
fn mm_small(@builtin(workgroup_id) wg: vec3<u32>,
            @builtin(local_invocation_id) l: vec3<u32>) {
    let d = mm_dims();
    let b = wg.z;
    let m0 = wg.y * 16u;
    let n0 = wg.x * 16u;
    var acc = 0.0;
    for (var k0 = 0u; k0 < d.z; k0 += TK) {
        let ka = k0 + l.x;
        var va = 0.0;
        if (m0 + l.y < d.x && ka < d.z) {
            va = load_a(b, m0 + l.y, ka);
        }
        sa[l.x * 16u + l.y] = va;
        let kb = k0 + l.y;
        var vb = 0.0;
        if (kb < d.z && n0 + l.x < d.y) {
            vb = load_b(b, kb, n0 + l.x);
        }
        sb[l.y * 16u + l.x] = vb;
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            acc += sa[kk * 16u + l.y] * sb[kk * 16u + l.x];
        }
        workgroupBarrier();
    }
    if (m0 + l.y < d.x && n0 + l.x < d.y) {
        store_c(b, m0 + l.y, n0 + l.x, acc);
    }
}

var<workgroup> ta: array<f32, 1024>;  // [TK][64] of A, k-major
var<workgroup> tb: array<f32, 1024>;  // [TK][64] of B, k-major

// 64 x 64 tile, 4 x 4 outputs per thread (rows l.y + 16i, columns
// l.x + 16j, so shared-memory reads and stores stay unit-stride).
@compute @workgroup_size(16, 16)
fn mm_big(@builtin(workgroup_id) wg: vec3<u32>,
          @builtin(local_invocation_id) l: vec3<u32>,
          @builtin(local_invocation_index) t: u32) {
    let d = mm_dims();
    let b = wg.z;
    let m0 = wg.y * 64u;
    let n0 = wg.x * 64u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < d.z; k0 += TK) {
        for (var i = 0u; i < 4u; i++) {
            let e = t + i * 256u;
            let am = e / TK;
            let ak = e % TK;
            var va = 0.0;
            if (m0 + am < d.x && k0 + ak < d.z) {
                va = load_a(b, m0 + am, k0 + ak);
            }
            ta[ak * 64u + am] = va;
            let bk = e / 64u;
            let bn = e % 64u;
            var vb = 0.0;
            if (k0 + bk < d.z && n0 + bn < d.y) {
                vb = load_b(b, k0 + bk, n0 + bn);
            }
            tb[bk * 64u + bn] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let ra = kk * 64u + l.y;
            let rb = kk * 64u + l.x;
            let a = vec4<f32>(ta[ra], ta[ra + 16u], ta[ra + 32u], ta[ra + 48u]);
            let bv = vec4<f32>(tb[rb], tb[rb + 16u], tb[rb + 32u], tb[rb + 48u]);
            c0 += a.x * bv;
            c1 += a.y * bv;
            c2 += a.z * bv;
            c3 += a.w * bv;
        }
        workgroupBarrier();
    }
    var rows = array<vec4<f32>, 4>(c0, c1, c2, c3);
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + l.y + 16u * i;
        if (m >= d.x) {
            continue;
        }
        let row = rows[i];
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + l.x + 16u * j;
            if (n < d.y) {
                store_c(b, m, n, row[j]);
            }
        }
    }
}
