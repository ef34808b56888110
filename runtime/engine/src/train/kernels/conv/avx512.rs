//! An AVX-512F matrix kernel for the convolution products: tiles of 32
//! rows by 12 columns, 24 accumulators.
//!
//! tract-linalg's AVX-512 kernels keep 12 accumulators (16x12 is one row
//! vector by twelve columns, 32x6 two by six): each step along `k` loads
//! one or two row vectors and six to twelve broadcasts for twelve FMAs.
//! Measured on this project's 2-core machine, the convolution products ran
//! at 60-69 GFLOP/s through them while MKL's sgemm reaches about 128. Here
//! a step loads two row vectors and twelve broadcasts for 24 FMAs, so the
//! FMA ports, not the loads, set the pace: the register blocking of Goto
//! and van de Geijn, "Anatomy of High-Performance Matrix Multiplication"
//! (ACM TOMS 34(3), 2008), section 6. The same products run at 98-127
//! GFLOP/s (`fedge-device bench --profile` shows the nodes).
//!
//! The operands are tract's packed panels ([`PackedFormat`] with `r` 32
//! and 12), so the patch packers serve both kernels. `C` is a contiguous
//! row-major `[m, n]` block.
//!
//! [`PackedFormat`]: tract_onnx::tract_core::tract_linalg::pack::PackedFormat

use std::arch::x86_64::*;

use tract_onnx::tract_hir::internal::*;

/// Rows per tile: the left operand's panel width.
pub(super) const MR: usize = 32;
/// Columns per tile: the right operand's panel width.
pub(super) const NR: usize = 12;
/// Records of `k` per block: 128 KiB of a left panel and 48 KiB of a right
/// one, both in the L2 cache, at the cost of one more pass over `C` per
/// block (a few percent of a block's FMAs).
const KC: usize = 1024;

/// What the kernel does with a tile's product `P` before it lands in `C`.
#[derive(Clone, Copy)]
pub(super) enum Epilogue<'a> {
    /// `C = P`.
    Store,
    /// `C += P`.
    Accumulate,
    /// `C[i, j] = P[i, j] + bias[i]`.
    AddPerRow(&'a [f32]),
}

/// Whether the kernel pays for an `[m, k] x [k, n]` product: tract's
/// narrower kernels keep the thin ones (a `k` under 16 is mostly the
/// tile's store; fewer than 16 rows leave most of a tile empty). Measured
/// on the first convolution of the bench's CNN (`[32, 25] x [25, 784]`
/// per image): 2.5 ms a step at batch 64 here against 4.2 with tract's.
pub(super) fn suits(m: usize, k: usize, n: usize) -> bool {
    m >= 16 && k >= 16 && n >= NR && super::patches::avx512_available()
}

/// `C = A x B` then the epilogue; `a` holds `ceil(m / MR)` panels of `pa`
/// floats, `b` holds `ceil(n / NR)` panels of `pb` floats, each panel `k`
/// records of `MR` (`NR`) floats, zero past the last row (column).
pub(super) fn run(
    k: usize,
    (m, n): (usize, usize),
    (a, pa): (&[f32], usize),
    (b, pb): (&[f32], usize),
    c: &mut [f32],
    epilogue: Epilogue,
) -> TractResult<()> {
    ensure!(
        super::patches::avx512_available(),
        "no AVX-512F on this CPU"
    );
    ensure!(
        pa >= k * MR && pb >= k * NR,
        "panels shorter than k records"
    );
    ensure!(
        a.len() >= m.div_ceil(MR) * pa && b.len() >= n.div_ceil(NR) * pb,
        "packed operands shorter than their panels"
    );
    ensure!(
        c.len() == m * n,
        "the output holds {} values, not {m}x{n}",
        c.len()
    );
    if let Epilogue::AddPerRow(bias) = epilogue {
        ensure!(
            bias.len() == m,
            "a bias of {} values for {m} rows",
            bias.len()
        );
    }
    // Blocks of at most KC records along `k`, each over every tile: a
    // block's panels stay in the L2 cache while the tiles reuse them (a
    // weight-gradient product's `k` is a whole chunk of images, and its
    // panels would otherwise stream from memory once per tile row or
    // column). A block after the first adds to what the first stored.
    // Every float of a tile is written by `product` before it is read.
    let mut tile = [0.0f32; MR * NR];
    for k0 in (0..k.max(1)).step_by(KC) {
        let kc = (k - k0).min(KC);
        let epilogue = if k0 == 0 {
            epilogue
        } else {
            Epilogue::Accumulate
        };
        for q in 0..n.div_ceil(NR) {
            let cols = (n - q * NR).min(NR);
            for p in 0..m.div_ceil(MR) {
                let rows = (m - p * MR).min(MR);
                let bias = match epilogue {
                    Epilogue::AddPerRow(bias) => Some(&bias[p * MR..][..rows]),
                    _ => None,
                };
                let (ap, bp) = (&a[p * pa + k0 * MR..], &b[q * pb + k0 * NR..]);
                // SAFETY: AVX-512F checked above; panel `p` of `a` holds
                // `k` records of MR floats and panel `q` of `b` `k` records
                // of NR (checked above), so records `k0..k0 + kc` are in
                // bounds.
                unsafe { product(kc, ap.as_ptr(), bp.as_ptr(), &mut tile) };
                let out = &mut c[p * MR * n + q * NR..];
                for i in 0..rows {
                    let row = &mut out[i * n..][..cols];
                    let add = bias.map_or(0.0, |b| b[i]);
                    for (j, o) in row.iter_mut().enumerate() {
                        let v = tile[j * MR + i];
                        *o = match epilogue {
                            Epilogue::Accumulate => *o + v,
                            _ => v + add,
                        };
                    }
                }
            }
        }
    }
    Ok(())
}

/// One tile's product, column by column into `tile` (`tile[j * MR + i]`).
///
/// # Safety
/// AVX-512F; `a` points at `k * MR` floats and `b` at `k * NR`.
#[target_feature(enable = "avx512f")]
unsafe fn product(k: usize, a: *const f32, b: *const f32, tile: &mut [f32; MR * NR]) {
    let mut lo = [_mm512_setzero_ps(); NR];
    let mut hi = [_mm512_setzero_ps(); NR];
    for kk in 0..k {
        // SAFETY: record `kk < k` of each panel is in bounds (the caller).
        unsafe {
            let ar = a.add(kk * MR);
            let br = b.add(kk * NR);
            let (a0, a1) = (_mm512_loadu_ps(ar), _mm512_loadu_ps(ar.add(16)));
            for j in 0..NR {
                let bj = _mm512_set1_ps(*br.add(j));
                lo[j] = _mm512_fmadd_ps(a0, bj, lo[j]);
                hi[j] = _mm512_fmadd_ps(a1, bj, hi[j]);
            }
        }
    }
    for j in 0..NR {
        // SAFETY: `tile` holds NR columns of MR floats.
        unsafe {
            let col = tile.as_mut_ptr().add(j * MR);
            _mm512_storeu_ps(col, lo[j]);
            _mm512_storeu_ps(col.add(16), hi[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pack `[rows, k]` (row-major) into panels of `r` rows.
    fn pack(x: &[f32], rows: usize, k: usize, r: usize) -> (Vec<f32>, usize) {
        let pl = (k + 1) * r;
        let mut out = vec![0.0; rows.div_ceil(r) * pl];
        for i in 0..rows {
            for kk in 0..k {
                out[(i / r) * pl + kk * r + i % r] = x[i * k + kk];
            }
        }
        (out, pl)
    }

    #[test]
    fn products_match_the_definition_with_every_epilogue() {
        if !super::super::patches::avx512_available() {
            return;
        }
        for (m, k, n) in [
            (32, 40, 12),
            (64, 33, 196),
            (17, 70, 25),
            (45, 64, 13),
            (32, 25, 40),
            (33, 2 * KC + 5, 14),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.5).collect();
            let (pa, la) = pack(&a, m, k, MR);
            let (pb, lb) = pack(&bt, n, k, NR);
            let want = |i: usize, j: usize| -> f32 {
                (0..k).map(|kk| a[i * k + kk] * bt[j * k + kk]).sum()
            };
            let mut c = vec![1.0; m * n];
            run(k, (m, n), (&pa, la), (&pb, lb), &mut c, Epilogue::Store).unwrap();
            let mut acc = c.clone();
            run(
                k,
                (m, n),
                (&pa, la),
                (&pb, lb),
                &mut acc,
                Epilogue::Accumulate,
            )
            .unwrap();
            let mut biased = vec![0.0; m * n];
            let e = Epilogue::AddPerRow(&bias);
            run(k, (m, n), (&pa, la), (&pb, lb), &mut biased, e).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let w = want(i, j);
                    assert_eq!(c[i * n + j], w, "{m}x{k}x{n} [{i}, {j}]");
                    assert_eq!(acc[i * n + j], 2.0 * w, "accumulated");
                    assert_eq!(biased[i * n + j], w + bias[i], "biased");
                }
            }
        }
    }

    #[test]
    fn short_operands_are_refused() {
        if !super::super::patches::avx512_available() {
            return;
        }
        let (a, b) = (vec![0.0; 32 * 8], vec![0.0; 12 * 8]);
        let mut c = vec![0.0; 32 * 12];
        let e = Epilogue::Store;
        assert!(run(8, (32, 12), (&a, 32 * 8), (&b, 12 * 8), &mut c, e).is_ok());
        assert!(run(9, (32, 12), (&a, 32 * 8), (&b, 12 * 8), &mut c, e).is_err());
        assert!(run(8, (33, 12), (&a, 32 * 8), (&b, 12 * 8), &mut c, e).is_err());
        assert!(run(8, (32, 12), (&a, 32 * 8), (&b, 12 * 8), &mut c[1..], e).is_err());
        let short = [0.0; 31];
        let e = Epilogue::AddPerRow(&short);
        assert!(run(8, (32, 12), (&a, 32 * 8), (&b, 12 * 8), &mut c, e).is_err());
    }
}
