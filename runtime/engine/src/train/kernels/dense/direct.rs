//! `FedgeGemmSgd` without tract-linalg: a register-tiled product whose
//! tiles are added to the momentum and applied to the weight while they
//! are in registers.
//!
//! With the batch as the inner dimension (32 or 64 here) tract-linalg's
//! kernel spends as long on each tile's epilogue as on its product: it
//! reads the momentum with a gather and stores the tile one float at a
//! time, and the weight then takes a pass of its own. Here a tile is `R`
//! rows of the weight by `L` contiguous columns: the product reads `q`'s
//! rows in place (no packing: they are contiguous in the columns) and
//! broadcasts `alpha p`, and the epilogue is whole-vector loads and stores
//! of `v` and `w`, each read and written once per step. The loops are
//! plain Rust over fixed-size arrays, compiled once per instruction set
//! (`#[target_feature]`) so that they become FMAs on full registers.
//!
//! **Invariant:** only called where [`available`] says the CPU has the
//! features the chosen instantiation was compiled for.

/// Whether this CPU runs one of the instantiations below.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v = mu v + alpha p^T q`, `w = w - lr v` (shapes checked by the
/// caller: `w`, `v` `[m, n]`, `p` `[b, m]`, `q` `[b, n]`).
///
/// # Panics
/// When [`available`] is false.
pub(super) fn gemm_sgd(
    (w, v): (&mut [f32], &mut [f32]),
    (p, q): (&[f32], &[f32]),
    (m, n, b): (usize, usize, usize),
    (alpha, mu, lr): (f32, f32, f32),
) {
    assert!(
        w.len() == m * n && v.len() == m * n && p.len() == b * m && q.len() == b * n,
        "FedgeGemmSgd: sizes do not match m={m} n={n} b={b}"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let args = Args {
            w,
            v,
            p,
            q,
            m,
            n,
            b,
            alpha,
            mu,
            lr,
        };
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { avx512(args) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { avx2(args) };
            return;
        }
    }
    let _ = (w, v, p, q, alpha, mu, lr);
    panic!("FedgeGemmSgd's direct kernel needs AVX-512F or AVX2 and FMA");
}

#[cfg(target_arch = "x86_64")]
struct Args<'a> {
    w: &'a mut [f32],
    v: &'a mut [f32],
    p: &'a [f32],
    q: &'a [f32],
    m: usize,
    n: usize,
    b: usize,
    alpha: f32,
    mu: f32,
    lr: f32,
}

/// 8 rows by 32 columns: 16 of the 32 zmm registers hold the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512(a: Args<'_>) {
    tiled::<8, 32>(a)
}

/// 6 rows by 16 columns: 12 of the 16 ymm registers hold the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(a: Args<'_>) {
    tiled::<6, 16>(a)
}

/// The update in `R x L` tiles, inlined into each instruction set's
/// wrapper. `alpha p` is copied once into `[b, R * ceil(m / R)]` (rows
/// past `m` zero) and a last partial block of columns of `q` into `[b, L]`
/// (zero past `n`), so every tile's product is the full-size loop; the
/// epilogue stores only the tile's rows and columns inside the weight.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tiled<const R: usize, const L: usize>(a: Args<'_>) {
    let Args {
        w,
        v,
        p,
        q,
        m,
        n,
        b,
        alpha,
        mu,
        lr,
    } = a;
    if m == 0 || n == 0 {
        return;
    }
    let m_pad = m.div_ceil(R) * R;
    let mut ap = vec![0.0f32; b * m_pad];
    for (dst, src) in ap.chunks_exact_mut(m_pad).zip(p.chunks_exact(m)) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = alpha * s;
        }
    }
    let mut q_tail = vec![0.0f32; b * L];
    for j0 in (0..n).step_by(L) {
        let cols = L.min(n - j0);
        let (qs, stride, at) = if cols == L {
            (q, n, j0)
        } else {
            for (k, row) in q_tail.chunks_exact_mut(L).enumerate() {
                row[..cols].copy_from_slice(&q[k * n + j0..][..cols]);
            }
            (&q_tail[..], L, 0)
        };
        for i0 in (0..m).step_by(R) {
            let mut acc = [[0.0f32; L]; R];
            for k in 0..b {
                let qr: &[f32; L] = qs[k * stride + at..][..L].try_into().expect("L floats");
                let pr: &[f32; R] = ap[k * m_pad + i0..][..R].try_into().expect("R floats");
                for (acc_r, &s) in acc.iter_mut().zip(pr) {
                    for (c, &x) in acc_r.iter_mut().zip(qr) {
                        *c = s.mul_add(x, *c);
                    }
                }
            }
            let rows = R.min(m - i0);
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                let at = (i0 + r) * n + j0;
                if cols == L {
                    let vr: &mut [f32; L] = (&mut v[at..][..L]).try_into().expect("L floats");
                    let wr: &mut [f32; L] = (&mut w[at..][..L]).try_into().expect("L floats");
                    epilogue(wr, vr, acc_r, mu, lr);
                } else {
                    epilogue(&mut w[at..][..cols], &mut v[at..][..cols], acc_r, mu, lr);
                }
            }
        }
    }
}

/// `v = mu v + g`, `w = w - lr v` over one row of a tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn epilogue(w: &mut [f32], v: &mut [f32], g: &[f32], mu: f32, lr: f32) {
    for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
        let nv = mu.mul_add(*v, g);
        *v = nv;
        *w = (-lr).mul_add(nv, *w);
    }
}
