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
pub(in super::super) const MR: usize = 32;
/// Columns per tile: the right operand's panel width.
pub(in super::super) const NR: usize = 12;
/// Records of `k` per block: 128 KiB of a left panel and 48 KiB of a right
/// one, both in the L2 cache, at the cost of one more pass over `C` per
/// block (a few percent of a block's FMAs).
const KC: usize = 1024;

/// What the kernel does with a tile's product `P` before it lands in `C`.
#[derive(Clone, Copy)]
pub(in super::super) enum Epilogue<'a> {
    /// `C = P`.
    Store,
    /// `C += P`.
    Accumulate,
    /// `C[i, j] = P[i, j] + bias[i]`.
    AddPerRow(&'a [f32]),
    /// `C[i, j] = P[i, j] + bias[j]`.
    AddPerCol(&'a [f32]),
}

/// The right operand of a product: tract's packed panels, or a matrix
/// read where it lies (a dense layer's weight, which packing would copy
/// whole every step).
#[derive(Clone, Copy)]
pub(in super::super) enum Right<'a> {
    /// `ceil(n / NR)` panels of `len` floats, each `k` records of NR
    /// floats, zero past the last column.
    Panels(&'a [f32], usize),
    /// Element `(kk, j)` at `b[kk * rs + j * cs]`, with `rs == 1` or
    /// `cs == 1`: with `cs == 1` a record is NR contiguous floats, with
    /// `rs == 1` the NR columns are NR rows of `b` read side by side.
    Strided { b: &'a [f32], rs: usize, cs: usize },
}

/// Whether the kernel pays for an `[m, k] x [k, n]` product: tract's
/// narrower kernels keep the thin ones (a `k` under 16 is mostly the
/// tile's store; fewer than 16 rows leave most of a tile empty). Measured
/// on the first convolution of the bench's CNN (`[32, 25] x [25, 784]`
/// per image): 2.5 ms a step at batch 64 here against 4.2 with tract's.
pub(in super::super) fn suits(m: usize, k: usize, n: usize) -> bool {
    m >= 16 && k >= 16 && n >= NR && super::patches::avx512_available()
}

/// `C = A x B` then the epilogue; `a` holds `ceil(m / MR)` panels of `pa`
/// floats, each `k` records of `MR` floats, zero past the last row; `b`
/// as [`Right`] says.
pub(in super::super) fn run(
    k: usize,
    (m, n): (usize, usize),
    (a, pa): (&[f32], usize),
    b: Right,
    c: &mut [f32],
    epilogue: Epilogue,
) -> TractResult<()> {
    ensure!(
        super::patches::avx512_available(),
        "no AVX-512F on this CPU"
    );
    ensure!(pa >= k * MR, "left panels shorter than k records");
    ensure!(
        a.len() >= m.div_ceil(MR) * pa,
        "the left operand is shorter than its panels"
    );
    match b {
        Right::Panels(b, pb) => ensure!(
            pb >= k * NR && b.len() >= n.div_ceil(NR) * pb,
            "the right operand's panels are shorter than k records"
        ),
        Right::Strided { b, rs, cs } => {
            // The last element read, without overflow.
            let last = (k.max(1) - 1)
                .checked_mul(rs)
                .zip((n.max(1) - 1).checked_mul(cs))
                .and_then(|(r, c)| r.checked_add(c));
            ensure!(
                (rs == 1 || cs == 1) && rs > 0 && cs > 0 && last.is_some_and(|l| l < b.len()),
                "a right operand of {} values read with strides ({rs}, {cs}) for {k}x{n}",
                b.len()
            )
        }
    }
    ensure!(
        c.len() == m * n,
        "the output holds {} values, not {m}x{n}",
        c.len()
    );
    match epilogue {
        Epilogue::AddPerRow(bias) => ensure!(
            bias.len() == m,
            "a bias of {} values for {m} rows",
            bias.len()
        ),
        Epilogue::AddPerCol(bias) => ensure!(
            bias.len() == n,
            "a bias of {} values for {n} columns",
            bias.len()
        ),
        _ => {}
    }
    // Blocks of at most KC records along `k`, each over every tile: a
    // block's panels stay in the L2 cache while the tiles reuse them (a
    // weight-gradient product's `k` is a whole chunk of images, and its
    // panels would otherwise stream from memory once per tile row or
    // column). A block after the first adds to what the first stored.
    // Every float of a tile is written by `product` before it is read.
    let mut tile = [0.0f32; MR * NR];
    // A strided operand's last, partial panel, packed per block (reading
    // its NR columns in place would run past the matrix).
    let mut edge = Vec::new();
    for k0 in (0..k.max(1)).step_by(KC) {
        let kc = (k - k0).min(KC);
        let epilogue = if k0 == 0 {
            epilogue
        } else {
            Epilogue::Accumulate
        };
        for q in 0..n.div_ceil(NR) {
            let cols = (n - q * NR).min(NR);
            // Where records `k0..` of panel `q` start, and how to read them.
            let (bp, read) = match b {
                Right::Panels(b, pb) => (&b[q * pb + k0 * NR..], Read::Panel),
                Right::Strided { b, rs, cs } if cols == NR => {
                    if cs == 1 {
                        (&b[k0 * rs + q * NR..], Read::Records(rs))
                    } else {
                        (&b[k0 + q * NR * cs..], Read::Columns(cs))
                    }
                }
                Right::Strided { b, rs, cs } => {
                    edge.clear();
                    edge.resize(kc * NR, 0.0);
                    for (kk, rec) in edge.chunks_exact_mut(NR).enumerate() {
                        for (j, v) in rec.iter_mut().enumerate().take(cols) {
                            *v = b[(k0 + kk) * rs + (q * NR + j) * cs];
                        }
                    }
                    (&edge[..], Read::Panel)
                }
            };
            for p in 0..m.div_ceil(MR) {
                let rows = (m - p * MR).min(MR);
                let ap = &a[p * pa + k0 * MR..];
                let out = &mut c[p * MR * n + q * NR..];
                // A full tile goes from the registers straight into `C`;
                // a partial one through `tile`.
                let dest = if rows == MR && cols == NR {
                    let then = match epilogue {
                        Epilogue::Store => Then::Store,
                        Epilogue::Accumulate => Then::Accumulate,
                        Epilogue::AddPerRow(bias) => Then::PerRow(bias[p * MR..][..MR].as_ptr()),
                        Epilogue::AddPerCol(bias) => Then::PerCol(bias[q * NR..][..NR].as_ptr()),
                    };
                    Dest::Rows {
                        c: out.as_mut_ptr(),
                        ldc: n,
                        then,
                    }
                } else {
                    Dest::Tile(tile.as_mut_ptr())
                };
                // SAFETY: AVX-512F checked above; panel `p` of `a` holds
                // `k` records of MR floats (checked above), so records
                // `k0..k0 + kc` are in bounds; `bp` reads records
                // `0..kc` of its panel: for packed panels within `k`
                // records of NR (checked), for a strided operand
                // elements `(k0 + kk, q * NR + j)` with `kk < kc`, `j <
                // NR` and `q * NR + j < n` (a full panel), at most
                // `(k - 1) * rs + (n - 1) * cs` (checked). A full tile's
                // rows `i < MR` and columns `j < NR` of `out` are
                // `(p * MR + i) * n + q * NR + j < m * n` floats into
                // `c`, and its biases are the MR (NR) sliced above.
                unsafe {
                    match read {
                        Read::Panel => product::<true>(kc, ap.as_ptr(), bp.as_ptr(), NR, dest),
                        Read::Records(rs) => {
                            product::<true>(kc, ap.as_ptr(), bp.as_ptr(), rs, dest)
                        }
                        Read::Columns(cs) => {
                            product::<false>(kc, ap.as_ptr(), bp.as_ptr(), cs, dest)
                        }
                    }
                };
                if let Dest::Rows { .. } = dest {
                    continue;
                }
                for i in 0..rows {
                    let row = &mut out[i * n..][..cols];
                    match epilogue {
                        Epilogue::Accumulate => {
                            for (j, o) in row.iter_mut().enumerate() {
                                *o += tile[j * MR + i];
                            }
                        }
                        Epilogue::AddPerCol(bias) => {
                            let bias = &bias[q * NR..][..cols];
                            for (j, (o, b)) in row.iter_mut().zip(bias).enumerate() {
                                *o = tile[j * MR + i] + b;
                            }
                        }
                        Epilogue::Store | Epilogue::AddPerRow(_) => {
                            let add = match epilogue {
                                Epilogue::AddPerRow(bias) => bias[p * MR + i],
                                _ => 0.0,
                            };
                            for (j, o) in row.iter_mut().enumerate() {
                                *o = tile[j * MR + i] + add;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// How [`product`] reads the right operand.
#[derive(Clone, Copy)]
enum Read {
    /// Records of NR contiguous floats, one after the other.
    Panel,
    /// Records of NR contiguous floats, this many floats apart.
    Records(usize),
    /// NR columns, each contiguous along `k`, this many floats apart.
    Columns(usize),
}

/// Where [`product`] puts a tile.
#[derive(Clone, Copy)]
enum Dest {
    /// The tile buffer, column by column (`tile[j * MR + i]`).
    Tile(*mut f32),
    /// A full tile straight into row-major `C` at `c`, rows `ldc` floats
    /// apart, through the epilogue.
    Rows { c: *mut f32, ldc: usize, then: Then },
}

/// [`Epilogue`] for a full tile: its MR row biases or NR column biases.
#[derive(Clone, Copy)]
enum Then {
    Store,
    Accumulate,
    PerRow(*const f32),
    PerCol(*const f32),
}

/// One tile's product into `dest`. With `RECORDS`, element `(kk, j)` of
/// the right operand is `b[kk * s + j]`; else `b[kk + j * s]`.
///
/// # Safety
/// AVX-512F; `a` points at `k * MR` floats and every element of `b` read
/// for `kk < k`, `j < NR` is in bounds; `dest` holds MR x NR floats (a
/// tile buffer, or MR rows of NR in `C` and the biases its epilogue
/// reads).
#[target_feature(enable = "avx512f")]
unsafe fn product<const RECORDS: bool>(
    k: usize,
    a: *const f32,
    b: *const f32,
    s: usize,
    dest: Dest,
) {
    let mut lo = [_mm512_setzero_ps(); NR];
    let mut hi = [_mm512_setzero_ps(); NR];
    // The columns' starts (read side by side, one float per column per
    // step): computed without dereferencing.
    let columns: [*const f32; NR] = std::array::from_fn(|j| b.wrapping_add(j * s));
    for kk in 0..k {
        // SAFETY: record `kk < k` of each operand is in bounds (the caller).
        unsafe {
            let ar = a.add(kk * MR);
            let (a0, a1) = (_mm512_loadu_ps(ar), _mm512_loadu_ps(ar.add(16)));
            for j in 0..NR {
                let e = if RECORDS {
                    *b.add(kk * s + j)
                } else {
                    *columns[j].add(kk)
                };
                let bj = _mm512_set1_ps(e);
                lo[j] = _mm512_fmadd_ps(a0, bj, lo[j]);
                hi[j] = _mm512_fmadd_ps(a1, bj, hi[j]);
            }
        }
    }
    match dest {
        Dest::Tile(tile) => {
            for j in 0..NR {
                // SAFETY: `tile` holds NR columns of MR floats.
                unsafe {
                    let col = tile.add(j * MR);
                    _mm512_storeu_ps(col, lo[j]);
                    _mm512_storeu_ps(col.add(16), hi[j]);
                }
            }
        }
        Dest::Rows { c, ldc, then } => {
            // SAFETY: MR rows of NR floats at `c` (the caller), and the
            // biases of rows 16.. start 16 further.
            unsafe {
                store_rows(&lo, c, ldc, then);
                let then = match then {
                    Then::PerRow(bias) => Then::PerRow(bias.add(16)),
                    t => t,
                };
                store_rows(&hi, c.add(16 * ldc), ldc, then);
            }
        }
    }
}

/// Sixteen rows of a tile, held as NR column vectors `r[j]` (lane `i` is
/// row `i`), stored as rows of NR floats at `c` (`ldc` apart) through
/// the epilogue: a transpose in registers instead of a round trip through
/// memory (the scalar copy-out it replaces took 7% of the CNN step).
///
/// The columns in groups of four are interleaved (unpack, then shuffle
/// within each 128-bit lane), after which lane `l` of `u[g][e]` holds
/// columns `4g..4g + 4` of row `4l + e`; a row is then lane `l` of
/// `u[0][e]`, `u[1][e]` and `u[2][e]` side by side (two lane shuffles)
/// and one masked store of its NR floats.
///
/// # Safety
/// AVX-512F; 16 rows of NR floats at `c`, `ldc` apart; a row bias reads
/// 16 floats, a column bias NR.
#[target_feature(enable = "avx512f")]
unsafe fn store_rows(r: &[__m512; NR], c: *mut f32, ldc: usize, then: Then) {
    const ROW: __mmask16 = (1 << NR) - 1;
    let mut u = [[_mm512_setzero_ps(); 4]; NR / 4];
    for (g, ug) in u.iter_mut().enumerate() {
        let (r0, r1, r2, r3) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
        let (lo01, hi01) = (_mm512_unpacklo_ps(r0, r1), _mm512_unpackhi_ps(r0, r1));
        let (lo23, hi23) = (_mm512_unpacklo_ps(r2, r3), _mm512_unpackhi_ps(r2, r3));
        ug[0] = _mm512_shuffle_ps::<0x44>(lo01, lo23);
        ug[1] = _mm512_shuffle_ps::<0xEE>(lo01, lo23);
        ug[2] = _mm512_shuffle_ps::<0x44>(hi01, hi23);
        ug[3] = _mm512_shuffle_ps::<0xEE>(hi01, hi23);
    }
    // SAFETY (all below): the rows and biases the caller vouches for;
    // masked-off lanes are neither read nor written.
    let col = match then {
        Then::PerCol(bias) => unsafe { _mm512_maskz_loadu_ps(ROW, bias) },
        _ => _mm512_setzero_ps(),
    };
    // Lane `$l`: the selectors (l, l, l, l) then (0, 2, l, l).
    macro_rules! lane {
        ($l:literal, $x:literal, $y:literal) => {
            for (e, ((u0, u1), u2)) in u[0].iter().zip(&u[1]).zip(&u[2]).enumerate() {
                let x = _mm512_shuffle_f32x4::<$x>(*u0, *u1);
                let v = _mm512_shuffle_f32x4::<$y>(x, *u2);
                let i = 4 * $l + e;
                let dst = unsafe { c.add(i * ldc) };
                let v = match then {
                    Then::Store => v,
                    Then::Accumulate => {
                        _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(ROW, dst) })
                    }
                    Then::PerRow(bias) => _mm512_add_ps(v, _mm512_set1_ps(unsafe { *bias.add(i) })),
                    Then::PerCol(_) => _mm512_add_ps(v, col),
                };
                unsafe { _mm512_mask_storeu_ps(dst, ROW, v) };
            }
        };
    }
    lane!(0, 0x00, 0x08);
    lane!(1, 0x55, 0x58);
    lane!(2, 0xAA, 0xA8);
    lane!(3, 0xFF, 0xF8);
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
            let right = Right::Panels(&pb, lb);
            run(k, (m, n), (&pa, la), right, &mut c, Epilogue::Store).unwrap();
            let mut acc = c.clone();
            run(k, (m, n), (&pa, la), right, &mut acc, Epilogue::Accumulate).unwrap();
            let mut biased = vec![0.0; m * n];
            let e = Epilogue::AddPerRow(&bias);
            run(k, (m, n), (&pa, la), right, &mut biased, e).unwrap();
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
        // `k` records and `m` rows against operands packed for 8 and 32.
        let call = |k: usize, m: usize, c: &mut [f32], e: Epilogue| {
            run(k, (m, 12), (&a, 32 * 8), Right::Panels(&b, 12 * 8), c, e)
        };
        let e = Epilogue::Store;
        assert!(call(8, 32, &mut c, e).is_ok());
        assert!(call(9, 32, &mut c, e).is_err());
        assert!(call(8, 33, &mut c, e).is_err());
        assert!(call(8, 32, &mut c[1..], e).is_err());
        let short = [0.0; 31];
        assert!(call(8, 32, &mut c, Epilogue::AddPerRow(&short)).is_err());
        let short = [0.0; 11];
        assert!(call(8, 32, &mut c, Epilogue::AddPerCol(&short)).is_err());
    }

    /// A right operand read in place, as records (`cs == 1`, a row stride
    /// wider than `n`) and as columns (`rs == 1`), with a last partial
    /// panel, a second `k` block, and the per-column bias.
    #[test]
    fn strided_right_operands_match_the_definition() {
        if !super::super::patches::avx512_available() {
            return;
        }
        for (m, k, n) in [(32, 40, 12), (64, 33, 200), (17, 70, 25), (40, KC + 9, 30)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let (pa, la) = pack(&a, m, k, MR);
            // B as [k, n] with rows `n + 3` apart, and as [n, k] with rows
            // `k + 2` apart; the same values.
            let bv = |kk: usize, j: usize| ((kk * 5 + j * 3) % 11) as f32 - 5.0;
            let (rs, cs) = (n + 3, k + 2);
            let mut records = vec![f32::NAN; (k - 1) * rs + n];
            let mut columns = vec![f32::NAN; (n - 1) * cs + k];
            for kk in 0..k {
                for j in 0..n {
                    records[kk * rs + j] = bv(kk, j);
                    columns[j * cs + kk] = bv(kk, j);
                }
            }
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25).collect();
            let want =
                |i: usize, j: usize| -> f32 { (0..k).map(|kk| a[i * k + kk] * bv(kk, j)).sum() };
            for right in [
                Right::Strided {
                    b: &records,
                    rs,
                    cs: 1,
                },
                Right::Strided {
                    b: &columns,
                    rs: 1,
                    cs,
                },
            ] {
                let mut c = vec![0.0; m * n];
                run(k, (m, n), (&pa, la), right, &mut c, Epilogue::Store).unwrap();
                let mut biased = vec![0.0; m * n];
                let e = Epilogue::AddPerCol(&bias);
                run(k, (m, n), (&pa, la), right, &mut biased, e).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        assert_eq!(c[i * n + j], want(i, j), "{m}x{k}x{n} [{i}, {j}]");
                        assert_eq!(biased[i * n + j], want(i, j) + bias[j], "biased");
                    }
                }
            }
            // One float short of the last element read: refused.
            let short = Right::Strided {
                b: &records[..records.len() - 1],
                rs,
                cs: 1,
            };
            let mut c = vec![0.0; m * n];
            assert!(run(k, (m, n), (&pa, la), short, &mut c, Epilogue::Store).is_err());
            let both = Right::Strided {
                b: &records,
                rs: 2,
                cs: 2,
            };
            assert!(run(k, (m, n), (&pa, la), both, &mut c, Epilogue::Store).is_err());
            // Strides whose last element overflows: refused, not wrapped.
            let huge = Right::Strided {
                b: &records,
                rs: usize::MAX / 2,
                cs: 1,
            };
            assert!(run(k, (m, n), (&pa, la), huge, &mut c, Epilogue::Store).is_err());
        }
    }
}
