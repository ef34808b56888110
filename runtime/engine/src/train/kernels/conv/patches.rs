//! The im2col patches of a convolution, packed straight from a
//! zero-padded copy of the images into a matrix kernel's panels.
//!
//! Both packings are one gather: a panel of width `r` covers `r` *lanes*
//! (pixels for the forward product's right operand, patch rows for the
//! weight gradient's), and each of its records (one per patch row, or one
//! per pixel) is `xp[base + off[t]]` for its lanes `t`, zero past the
//! last. The lane offsets `off` are the same for every record of a panel;
//! only `base` moves. Consecutive lanes mostly read consecutive floats
//! (the pixels of one output row with stride 1, the `kw` columns of one
//! kernel row), so a panel's lanes fall into a few *runs* of contiguous
//! floats.
//!
//! On x86_64 with AVX-512F ([`avx512_available`]) a record is one masked
//! vector load per run, merged in a register, and one masked store: a
//! panel of 12 lanes over two output rows is three instructions instead
//! of 12 scalar loads and stores. Elsewhere the scalar packers below (the
//! forward's through a contiguous copy of each patch row).
//!
//! **Invariant:** every lane a packer reads is inside `xp` (asserted once
//! per call), so the masked loads, which touch only the lanes of their
//! run, read nothing outside it.

use super::super::Geometry;
use super::width;

/// Some images zero-padded so that every patch element is in bounds, and
/// the patches as offsets into them: element `(kk, q)` of the patches (row
/// `kk = (ci, i, j)`, pixel `q = (b, oy, ox)`) is `xp[row[kk] + pixel[q]]`,
/// with `row[kk] = (ci*Hp + i)*Wp + j` and `pixel[q] = ((b*C)*Hp + oy*sh)*Wp + ox*sw`.
/// The packers below are then gathers with no branches.
pub(super) struct Padded {
    pub(super) xp: Vec<f32>,
    pub(super) row: Vec<usize>,
    pub(super) pixel: Vec<usize>,
    /// Padded height and width.
    hp: usize,
    wp: usize,
}

impl Padded {
    /// The offsets for `images` images, with `xp` zeroed (the padding stays
    /// zero; [`Padded::fill`] writes the images).
    pub(super) fn new(g: &Geometry, images: usize) -> Padded {
        // Padded rows oy*sh + i for oy < ho, i < kh; image row y is padded
        // row y + pt.
        let hp = (g.ho.max(1) - 1) * g.sh + g.kh;
        let wp = (g.wo.max(1) - 1) * g.sw + g.kw;
        let mut row = Vec::with_capacity(g.c * g.kh * g.kw);
        for ci in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    row.push((ci * hp + i) * wp + j);
                }
            }
        }
        let mut pixel = Vec::with_capacity(images * g.ho * g.wo);
        for b in 0..images {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    pixel.push((b * g.c * hp + oy * g.sh) * wp + ox * g.sw);
                }
            }
        }
        Padded {
            xp: vec![0.0; images * g.c * hp * wp],
            row,
            pixel,
            hp,
            wp,
        }
    }

    /// Where the image lands in the padded frame: `(padded index of image
    /// row 0, rows inside the frame)`, likewise for columns. Rows past the
    /// frame are read by no patch.
    fn overlap(g: &Geometry, hp: usize, wp: usize) -> [(usize, usize); 2] {
        [
            (g.pt, g.h.min(hp.saturating_sub(g.pt))),
            (g.pl, g.w.min(wp.saturating_sub(g.pl))),
        ]
    }

    /// Copy images `images` of the batch `x` into the frame.
    pub(super) fn fill(&mut self, g: &Geometry, x: &[f32], images: std::ops::Range<usize>) {
        let (hp, wp) = (self.hp, self.wp);
        let [(y0, ny), (x0, nx)] = Self::overlap(g, hp, wp);
        for (k, b) in images.enumerate() {
            for ci in 0..g.c {
                let src = &x[(b * g.c + ci) * g.h * g.w..][..g.h * g.w];
                let dst = &mut self.xp[(k * g.c + ci) * hp * wp..][..hp * wp];
                for y in 0..ny {
                    dst[(y0 + y) * wp + x0..][..nx].copy_from_slice(&src[y * g.w..][..nx]);
                }
            }
        }
    }
}

/// Whether this CPU takes the masked-load packers (x86_64 with AVX-512F).
pub(super) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A packing of one operand's lanes into panels of width `r`: each
/// panel's lanes as runs of contiguous offsets, for the masked loads.
/// Made once per product (the runs do not depend on the images).
pub(super) struct Lanes {
    r: usize,
    /// Runs per panel: the longest panel's count; shorter panels are
    /// padded with empty runs (mask 0: a load that reads nothing).
    runs: usize,
    /// Per run: the lanes it fills, as a bit mask.
    mask: Vec<u16>,
    /// Per run: its first offset minus its first lane, so that lane `t`
    /// of the run reads `xp[base + adj + t]` (read by the AVX-512
    /// packer only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    adj: Vec<isize>,
    /// One past the largest offset.
    end: usize,
}

impl Lanes {
    /// The runs of `offsets` (one per lane of the operand) in panels of
    /// `r` lanes; `None` when `r` is 0 or over 16 (one vector).
    pub(super) fn new(offsets: &[usize], r: usize) -> Option<Lanes> {
        if r == 0 || r > 16 {
            return None;
        }
        let mut per_panel: Vec<Vec<(u16, isize)>> = Vec::new();
        for lanes in offsets.chunks(r) {
            let mut runs: Vec<(u16, isize)> = Vec::new();
            let mut t0 = 0;
            for t in 1..=lanes.len() {
                if t == lanes.len() || lanes[t] != lanes[t - 1] + 1 {
                    let mask = (((1u32 << (t - t0)) - 1) << t0) as u16;
                    runs.push((mask, lanes[t0] as isize - t0 as isize));
                    t0 = t;
                }
            }
            per_panel.push(runs);
        }
        let runs = per_panel.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let (mut mask, mut adj) = (Vec::new(), Vec::new());
        for mut p in per_panel {
            p.resize(runs, (0, 0));
            for (m, a) in p {
                mask.push(m);
                adj.push(a);
            }
        }
        Some(Lanes {
            r,
            runs,
            mask,
            adj,
            end: offsets.iter().max().map_or(0, |&o| o + 1),
        })
    }
}

/// Pack with masked loads: record `i` of panel `p` (at `dst[p *
/// panel_len + i * r]`) is lane `t` = `xp[bases[i] + offsets[p * r + t]]`,
/// zero past the last lane; `lanes` made from `offsets` for this `r`.
///
/// # Panics
/// When a lane would read past `xp` or a panel past `dst`, or the CPU has
/// no AVX-512F.
pub(super) fn pack_masked(
    xp: &[f32],
    lanes: &Lanes,
    bases: &[usize],
    dst: &mut [f32],
    panel_len: usize,
) {
    let panels = lanes.mask.len() / lanes.runs;
    let Some(&last) = bases.iter().max() else {
        return;
    };
    assert!(
        panels == 0 || last + lanes.end <= xp.len(),
        "a patch lane past the padded images"
    );
    assert!(
        bases.len() * lanes.r <= panel_len
            && (panels == 0 || (panels - 1) * panel_len + bases.len() * lanes.r <= dst.len()),
        "panels past the packed buffer"
    );
    assert!(avx512_available(), "masked packing needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present; the asserts above keep every unmasked
    // lane inside `xp` (each run's lanes read offsets below `lanes.end`
    // from a base at most `last`) and every record inside `dst`.
    unsafe {
        match lanes.runs {
            1 => avx512::pack::<1>(xp, lanes, bases, dst, panel_len),
            2 => avx512::pack::<2>(xp, lanes, bases, dst, panel_len),
            3 => avx512::pack::<3>(xp, lanes, bases, dst, panel_len),
            4 => avx512::pack::<4>(xp, lanes, bases, dst, panel_len),
            _ => avx512::pack::<0>(xp, lanes, bases, dst, panel_len),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (xp, dst, panel_len);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// [`super::pack_masked`] with `S` runs per panel (`0`: read at run
    /// time).
    ///
    /// # Safety
    /// AVX-512F; the bounds that [`super::pack_masked`] asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack<const S: usize>(
        xp: &[f32],
        lanes: &Lanes,
        bases: &[usize],
        dst: &mut [f32],
        panel_len: usize,
    ) {
        let runs = if S == 0 { lanes.runs } else { S };
        let r = lanes.r;
        assert!(
            runs <= 16 && r <= 16,
            "a run covers at least one of 16 lanes"
        );
        let keep = ((1u32 << r) - 1) as __mmask16;
        let x = xp.as_ptr();
        for (p, (masks, adjs)) in lanes
            .mask
            .chunks_exact(runs)
            .zip(lanes.adj.chunks_exact(runs))
            .enumerate()
        {
            // The panel's runs in fixed arrays, so that the loop below
            // unrolls for a constant `S` with no bounds checks.
            let (mut mask, mut adj) = ([0 as __mmask16; 16], [0isize; 16]);
            mask[..runs].copy_from_slice(masks);
            adj[..runs].copy_from_slice(adjs);
            // SAFETY (all below): the caller's bounds; masked-off lanes are
            // never read or written, so the base address of a load may lie
            // outside `xp` (computed with wrapping arithmetic).
            let out = unsafe { dst.as_mut_ptr().add(p * panel_len) };
            for (i, &base) in bases.iter().enumerate() {
                let mut v = _mm512_setzero_ps();
                for (&m, &a) in mask.iter().zip(&adj).take(runs) {
                    let at = x.wrapping_offset(base as isize + a);
                    v = unsafe { _mm512_mask_loadu_ps(v, m, at) };
                }
                unsafe { _mm512_mask_storeu_ps(out.add(i * r), keep, v) };
            }
        }
    }
}

/// Patch rows `records` (of image 0 of `p`) as the right operand of
/// `W2 x im2col`: records are patch rows, panels run along the pixels,
/// row `records.start` lands in record 0. `lanes`: [`Lanes::new`] of
/// `p.pixel` for this `r`, when AVX-512F is there.
pub(super) fn pack_patches_by_pixel(
    p: &Padded,
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    g: &Geometry,
    (lanes, records): (Option<&Lanes>, std::ops::Range<usize>),
    row: &mut [f32],
) {
    let rows = &p.row[records];
    match lanes {
        Some(l) => pack_masked(&p.xp, l, rows, dst, panel_len),
        None => by_width!(
            r,
            pack_patches_by_pixel_r(p, rows, dst, (panel_len, r), g, row)
        ),
    }
}

fn pack_patches_by_pixel_r<const R: usize>(
    p: &Padded,
    rows: &[usize],
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    g: &Geometry,
    row: &mut [f32],
) {
    let r = width::<R>(r);
    let (xp, wp) = (&p.xp[..], p.wp);
    let (ho, wo, sh, sw) = (g.ho, g.wo, g.sh, g.sw);
    let hw = ho * wo;
    let (full, tail) = (hw / r, hw % r);
    let row = &mut row[..hw];
    for (kk, &base) in rows.iter().enumerate() {
        // The patch row, contiguous: one run of the frame per output row.
        for oy in 0..ho {
            let src = &xp[base + oy * sh * wp..];
            let out = &mut row[oy * wo..][..wo];
            if sw == 1 {
                out.copy_from_slice(&src[..wo]);
            } else {
                for (ox, v) in out.iter_mut().enumerate() {
                    *v = src[ox * sw];
                }
            }
        }
        for panel in 0..full {
            // A constant `r` (by_width!) makes this a few moves.
            dst[panel * panel_len + kk * r..][..r].copy_from_slice(&row[panel * r..][..r]);
        }
        if tail > 0 {
            let d = &mut dst[full * panel_len + kk * r..][..r];
            d[..tail].copy_from_slice(&row[full * r..]);
            d[tail..].fill(0.0);
        }
    }
}

/// The patches of all the images of `p` as the right operand of
/// `G x im2col^T`: records are pixels, panels run along the patch rows.
/// `lanes`: [`Lanes::new`] of `p.row` for this `r`, when AVX-512F is
/// there.
pub(super) fn pack_patches_by_row(
    p: &Padded,
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    lanes: Option<&Lanes>,
) {
    match lanes {
        Some(l) => pack_masked(&p.xp, l, &p.pixel, dst, panel_len),
        None => by_width!(r, pack_patches_by_row_r(p, dst, (panel_len, r))),
    }
}

fn pack_patches_by_row_r<const R: usize>(
    p: &Padded,
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
) {
    let r = width::<R>(r);
    let xp = &p.xp[..];
    let pixels = p.pixel.len();
    for (panel, rows) in p.row.chunks(r).enumerate() {
        let d = &mut dst[panel * panel_len..][..pixels * r];
        if rows.len() == r {
            for (d, &q) in d.chunks_exact_mut(r).zip(&p.pixel) {
                let src = &xp[q..];
                for (v, &base) in d.iter_mut().zip(rows) {
                    *v = src[base];
                }
            }
        } else {
            for (d, &q) in d.chunks_exact_mut(r).zip(&p.pixel) {
                for (v, &base) in d.iter_mut().zip(rows) {
                    *v = xp[q + base];
                }
                d[rows.len()..].fill(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element `(kk, q)` of the patches of `x` by the definition: zero
    /// where the window hangs over the image.
    fn patch(g: &Geometry, x: &[f32], kk: usize, q: usize) -> f32 {
        let (ci, i, j) = (kk / (g.kh * g.kw), kk / g.kw % g.kh, kk % g.kw);
        let (b, oy, ox) = (q / (g.ho * g.wo), q / g.wo % g.ho, q % g.wo);
        let y = (oy * g.sh + i).checked_sub(g.pt).filter(|&y| y < g.h);
        let xx = (ox * g.sw + j).checked_sub(g.pl).filter(|&v| v < g.w);
        match (y, xx) {
            (Some(y), Some(xx)) => x[((b * g.c + ci) * g.h + y) * g.w + xx],
            _ => 0.0,
        }
    }

    /// Padding, stride 2, a kernel wider than the image row, 1x1 kernels
    /// and outputs, odd sizes, the McMahan CNN's two layers.
    fn geometries() -> Vec<Geometry> {
        [
            ((2, 3, 9, 8), (5, 1, 2)),
            ((3, 2, 6, 7), (3, 1, 1)),
            ((2, 2, 7, 5), (3, 2, 0)),
            ((2, 3, 8, 6), (2, 2, 1)),
            ((2, 2, 4, 3), (5, 1, 2)),
            ((1, 1, 2, 2), (3, 2, 1)),
            ((2, 4, 5, 5), (1, 1, 0)),
            ((3, 1, 1, 1), (1, 1, 0)),
            ((2, 1, 28, 28), (5, 1, 2)),
            ((2, 32, 14, 14), (5, 1, 2)),
        ]
        .into_iter()
        .map(|(i, k)| Geometry::square(i, k))
        .collect()
    }

    /// A buffer of `panels` panels of `records` records of width `r`, one
    /// spare float per panel, all NaN (packers leave the spare alone).
    fn buffer(panels: usize, records: usize, r: usize) -> (Vec<f32>, usize) {
        let panel_len = records * r + 1;
        (vec![f32::NAN; panels * panel_len], panel_len)
    }

    fn same(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn packers_match_the_definition() {
        let mut masked_runs = 0;
        for g in geometries() {
            let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| i as f32 + 1.0).collect();
            let (ck, hw) = (g.c * g.kh * g.kw, g.ho * g.wo);
            for r in [1, 2, 3, 4, 5, 6, 8, 12, 16, 17] {
                // The forward's operand: image 1 (the last), pixels along
                // the panels, a record per patch row.
                let img = g.n - 1;
                let mut one = Padded::new(&g, 1);
                one.fill(&g, &x, img..img + 1);
                let (mut want, pl) = buffer(hw.div_ceil(r), ck, r);
                for (p, panel) in want.chunks_mut(pl).enumerate() {
                    for kk in 0..ck {
                        for t in 0..r {
                            let q = p * r + t;
                            panel[kk * r + t] = if q < hw {
                                patch(&g, &x, kk, img * hw + q)
                            } else {
                                0.0
                            };
                        }
                    }
                }
                let mut got = buffer(hw.div_ceil(r), ck, r).0;
                let mut row = vec![0.0; hw];
                let all = 0..one.row.len();
                pack_patches_by_pixel(&one, &mut got, (pl, r), &g, (None, all.clone()), &mut row);
                same(&got, &want, &format!("by pixel, scalar, r={r} {g:?}"));
                let lanes = Lanes::new(&one.pixel, r);
                assert_eq!(lanes.is_some(), r <= 16);
                if let (Some(l), true) = (&lanes, avx512_available()) {
                    let mut got = buffer(hw.div_ceil(r), ck, r).0;
                    let masked = (Some(l), all.clone());
                    pack_patches_by_pixel(&one, &mut got, (pl, r), &g, masked, &mut []);
                    same(&got, &want, &format!("by pixel, masked, r={r} {g:?}"));
                    masked_runs += 1;
                }
                // The weight gradient's: all the images, patch rows along
                // the panels, a record per pixel.
                let mut all = Padded::new(&g, g.n);
                all.fill(&g, &x, 0..g.n);
                let pixels = g.n * hw;
                let (mut want, pl) = buffer(ck.div_ceil(r), pixels, r);
                for (p, panel) in want.chunks_mut(pl).enumerate() {
                    for q in 0..pixels {
                        for t in 0..r {
                            let kk = p * r + t;
                            panel[q * r + t] = if kk < ck { patch(&g, &x, kk, q) } else { 0.0 };
                        }
                    }
                }
                let mut got = buffer(ck.div_ceil(r), pixels, r).0;
                pack_patches_by_row(&all, &mut got, (pl, r), None);
                same(&got, &want, &format!("by row, scalar, r={r} {g:?}"));
                if let (Some(l), true) = (Lanes::new(&all.row, r), avx512_available()) {
                    let mut got = buffer(ck.div_ceil(r), pixels, r).0;
                    pack_patches_by_row(&all, &mut got, (pl, r), Some(&l));
                    same(&got, &want, &format!("by row, masked, r={r} {g:?}"));
                }
            }
        }
        assert!(masked_runs > 0 || !avx512_available());
    }

    #[test]
    fn runs_split_where_offsets_jump() {
        // Lanes 0..3 contiguous, then 10, 11, then 20; r = 4: panels
        // [0, 1, 2, 10] and [11, 20].
        let l = Lanes::new(&[0, 1, 2, 10, 11, 20], 4).expect("r <= 16");
        assert_eq!(l.runs, 2);
        assert_eq!(l.mask, [0b0111, 0b1000, 0b01, 0b10]);
        assert_eq!(l.adj, [0, 7, 11, 19]);
        assert_eq!(l.end, 21);
        assert!(Lanes::new(&[0, 1], 17).is_none());
        assert!(Lanes::new(&[0, 1], 0).is_none());
    }

    #[test]
    #[should_panic(expected = "past the padded images")]
    fn masked_packing_refuses_lanes_outside_the_images() {
        let l = Lanes::new(&[0, 1, 2, 3], 4).expect("r <= 16");
        let mut dst = vec![0.0; 8];
        pack_masked(&[0.0; 4], &l, &[0, 1], &mut dst, 8);
    }
}
