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
//! of `v` and `w`, each read and written once per step. It is written
//! with AVX-512 intrinsics (plain Rust loops over arrays of this size were
//! left scalar by the compiler, 4x slower than tract-linalg); other CPUs
//! take tract-linalg's path.
//!
//! **Invariant:** only called where [`available`] says the CPU has
//! AVX-512F.

/// Whether this CPU runs the kernel below (x86_64 with AVX-512F).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v = mu v + alpha p^T q`, `w = w - lr v` (`w`, `v` `[m, n]`, `p`
/// `[b, m]`, `q` `[b, n]`).
///
/// # Panics
/// When the sizes do not match, or [`available`] is false.
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
    assert!(available(), "FedgeGemmSgd's direct kernel needs AVX-512F");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (asserted above) and the sizes match.
    unsafe {
        avx512((w, v), (p, q), (m, n, b), (alpha, mu, lr))
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, v, p, q, alpha, mu, lr);
}

/// Rows of the weight per tile.
#[cfg(target_arch = "x86_64")]
const R: usize = 8;
/// Columns per tile: two zmm registers; 16 of the 32 hold the tile.
#[cfg(target_arch = "x86_64")]
const L: usize = 32;

/// The update in `R x L` tiles. `alpha p` is copied once into `[b, R *
/// ceil(m / R)]` (rows past `m` zero) and a last partial block of columns
/// of `q` into `[b, L]` (zero past `n`), so every tile's product is the
/// full-size loop; the epilogue stores only the tile's rows and columns
/// inside the weight.
///
/// # Safety
/// The CPU has AVX-512F; the sizes are as [`gemm_sgd`] checks, `m, n > 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(
    (w, v): (&mut [f32], &mut [f32]),
    (p, q): (&[f32], &[f32]),
    (m, n, b): (usize, usize, usize),
    (alpha, mu, lr): (f32, f32, f32),
) {
    use std::arch::x86_64::*;
    let m_pad = m.div_ceil(R) * R;
    let mut ap = vec![0.0f32; b * m_pad];
    for (dst, src) in ap.chunks_exact_mut(m_pad).zip(p.chunks_exact(m)) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = alpha * s;
        }
    }
    let mut q_tail = vec![0.0f32; b * L];
    let (muv, nlr) = (_mm512_set1_ps(mu), _mm512_set1_ps(-lr));
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
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for k in 0..b {
                let qr = &qs[k * stride + at..][..L];
                let pr = &ap[k * m_pad + i0..][..R];
                // SAFETY: `qr` holds `L` = 32 floats.
                let (q0, q1) = unsafe {
                    (
                        _mm512_loadu_ps(qr.as_ptr()),
                        _mm512_loadu_ps(qr.as_ptr().add(16)),
                    )
                };
                for (acc_r, &s) in acc.iter_mut().zip(pr) {
                    let s = _mm512_set1_ps(s);
                    acc_r[0] = _mm512_fmadd_ps(s, q0, acc_r[0]);
                    acc_r[1] = _mm512_fmadd_ps(s, q1, acc_r[1]);
                }
            }
            let rows = R.min(m - i0);
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                let at = (i0 + r) * n + j0;
                if cols == L {
                    let (vr, wr) = (&mut v[at..][..L], &mut w[at..][..L]);
                    for (h, g) in acc_r.iter().enumerate() {
                        // SAFETY: `vr` and `wr` hold 32 floats; `h < 2`.
                        unsafe {
                            let (vp, wp) =
                                (vr.as_mut_ptr().add(16 * h), wr.as_mut_ptr().add(16 * h));
                            let nv = _mm512_fmadd_ps(muv, _mm512_loadu_ps(vp), *g);
                            _mm512_storeu_ps(vp, nv);
                            _mm512_storeu_ps(wp, _mm512_fmadd_ps(nlr, nv, _mm512_loadu_ps(wp)));
                        }
                    }
                } else {
                    let mut g = [0.0f32; L];
                    // SAFETY: `g` holds 32 floats.
                    unsafe {
                        _mm512_storeu_ps(g.as_mut_ptr(), acc_r[0]);
                        _mm512_storeu_ps(g.as_mut_ptr().add(16), acc_r[1]);
                    }
                    let (vr, wr) = (&mut v[at..][..cols], &mut w[at..][..cols]);
                    for ((w, v), &g) in wr.iter_mut().zip(vr.iter_mut()).zip(&g) {
                        let nv = mu.mul_add(*v, g);
                        *v = nv;
                        *w = (-lr).mul_add(nv, *w);
                    }
                }
            }
        }
    }
}
