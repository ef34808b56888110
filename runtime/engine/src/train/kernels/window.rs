//! The window geometry of a 2-D convolution or pooling, and the kernels
//! fedge's ops run over it: im2col and its adjoint col2im, max pooling over
//! non-overlapping windows and its gradient.

/// The window of a 2-D convolution or pooling: image `[n, c, h, w]`,
/// kernel, strides, leading pads, output size.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geometry {
    /// A square kernel `k`, stride `s` and padding `p` on every side over
    /// `n` images of `c` channels of `h` x `w` (the tests' geometries).
    #[cfg(test)]
    pub(crate) fn square(
        (n, c, h, w): (usize, usize, usize, usize),
        (k, s, p): (usize, usize, usize),
    ) -> Geometry {
        Geometry {
            n,
            c,
            h,
            w,
            kh: k,
            kw: k,
            sh: s,
            sw: s,
            pt: p,
            pl: p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (w + 2 * p - k) / s + 1,
        }
    }

    pub fn to_ints(&self) -> Vec<i64> {
        [
            self.n, self.c, self.h, self.w, self.kh, self.kw, self.sh, self.sw, self.pt, self.pl,
            self.ho, self.wo,
        ]
        .iter()
        .map(|&v| v as i64)
        .collect()
    }

    pub fn from_ints(v: &[i64]) -> Option<Geometry> {
        if v.len() != 12 || v.iter().any(|&d| d < 0) {
            return None;
        }
        let u = |i: usize| v[i] as usize;
        let g = Geometry {
            n: u(0),
            c: u(1),
            h: u(2),
            w: u(3),
            kh: u(4),
            kw: u(5),
            sh: u(6),
            sw: u(7),
            pt: u(8),
            pl: u(9),
            ho: u(10),
            wo: u(11),
        };
        (g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0).then_some(g)
    }

    /// `[C*kh*kw, N*Ho*Wo]`
    pub fn cols_shape(&self) -> [usize; 2] {
        [self.c * self.kh * self.kw, self.n * self.ho * self.wo]
    }

    pub fn image_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// For kernel offset `i` and output row `o`, the input row, if inside.
    #[inline]
    pub(super) fn src(o: usize, s: usize, i: usize, p: usize, len: usize) -> Option<usize> {
        (o * s + i).checked_sub(p).filter(|&r| r < len)
    }

    /// The range of output columns `wo` whose input column
    /// `wo * sw + j - pl` falls inside the image.
    pub(super) fn valid_cols(&self, j: usize) -> std::ops::Range<usize> {
        let lo = self.pl.saturating_sub(j).div_ceil(self.sw);
        let hi = if self.w + self.pl > j {
            ((self.w + self.pl - j - 1) / self.sw + 1).min(self.wo)
        } else {
            0
        };
        lo.min(hi)..hi
    }

    pub(super) fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let p = self.n * self.ho * self.wo;
        for ci in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut cols[((ci * self.kh + i) * self.kw + j) * p..][..p];
                    self.im2col_row(x, (ci, i, j), 0..self.n, row);
                }
            }
        }
    }

    /// Row `(ci, i, j)` of the patches of `images` (of the batch `x`):
    /// `row[(b, oy, ox)] = x[first + b, ci, oy*sh + i - pt, ox*sw + j - pl]`
    /// (0 outside the image), `images.len() * ho * wo` values.
    pub(super) fn im2col_row(
        &self,
        x: &[f32],
        (ci, i, j): (usize, usize, usize),
        images: std::ops::Range<usize>,
        row: &mut [f32],
    ) {
        let Geometry {
            c,
            h,
            w,
            sh,
            sw,
            pt,
            pl,
            ho,
            wo,
            ..
        } = *self;
        let valid = self.valid_cols(j);
        if valid.is_empty() {
            row.fill(0.0);
            return;
        }
        let x0 = valid.start * sw + j - pl;
        for (k, b) in images.enumerate() {
            let img = &x[(b * c + ci) * h * w..][..h * w];
            for oy in 0..ho {
                let out = &mut row[(k * ho + oy) * wo..][..wo];
                let Some(y) = Self::src(oy, sh, i, pt, h) else {
                    out.fill(0.0);
                    continue;
                };
                let line = &img[y * w..][..w];
                out[..valid.start].fill(0.0);
                out[valid.end..].fill(0.0);
                if sw == 1 {
                    out[valid.clone()].copy_from_slice(&line[x0..x0 + valid.len()]);
                } else {
                    for (k, o) in out[valid.clone()].iter_mut().enumerate() {
                        *o = line[x0 + k * sw];
                    }
                }
            }
        }
    }

    pub(super) fn col2im(&self, cols: &[f32], x: &mut [f32]) {
        let Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            sh,
            sw,
            pt,
            pl,
            ho,
            wo,
        } = *self;
        let p = n * ho * wo;
        x.fill(0.0);
        for ci in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    let row = &cols[((ci * kh + i) * kw + j) * p..][..p];
                    let valid = self.valid_cols(j);
                    if valid.is_empty() {
                        continue;
                    }
                    let x0 = valid.start * sw + j - pl;
                    for b in 0..n {
                        let img = &mut x[(b * c + ci) * h * w..][..h * w];
                        for oy in 0..ho {
                            let Some(y) = Self::src(oy, sh, i, pt, h) else {
                                continue;
                            };
                            let src = &row[(b * ho + oy) * wo..][..wo][valid.clone()];
                            let line = &mut img[y * w..][..w];
                            if sw == 1 {
                                for (d, s) in line[x0..x0 + src.len()].iter_mut().zip(src) {
                                    *d += s;
                                }
                            } else {
                                for (k, s) in src.iter().enumerate() {
                                    line[x0 + k * sw] += s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Index (within the plane) of the first maximum of window (oy, ox):
    /// non-overlapping windows (stride == kernel, no pads, `Ho*kh <= H`).
    /// Strictly greater replaces: the first maximum wins, and a window
    /// holding a NaN keeps its first position.
    #[inline]
    pub(super) fn argmax(&self, xi: &[f32], oy: usize, ox: usize) -> usize {
        let (w, kh, kw) = (self.w, self.kh, self.kw);
        let mut best = oy * kh * w + ox * kw;
        let mut m = xi[best];
        for i in 0..kh {
            let row = (oy * kh + i) * w + ox * kw;
            for (j, &v) in xi[row..row + kw].iter().enumerate() {
                if v > m {
                    m = v;
                    best = row + j;
                }
            }
        }
        best
    }

    pub(super) fn max_pool(&self, x: &[f32], y: &mut [f32]) {
        let Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            ho,
            wo,
            ..
        } = *self;
        for plane in 0..n * c {
            let xi = &x[plane * h * w..][..h * w];
            let yo = &mut y[plane * ho * wo..][..ho * wo];
            if kh == 2 && kw == 2 {
                // The common 2x2 case: two rows at a time, no branches.
                for oy in 0..ho {
                    let (r0, r1) = (&xi[2 * oy * w..][..w], &xi[(2 * oy + 1) * w..][..w]);
                    let windows = r0.chunks_exact(2).zip(r1.chunks_exact(2));
                    for (o, (a, b)) in yo[oy * wo..][..wo].iter_mut().zip(windows) {
                        *o = a[0].max(a[1]).max(b[0].max(b[1]));
                    }
                }
                continue;
            }
            for oy in 0..ho {
                for ox in 0..wo {
                    yo[oy * wo + ox] = xi[self.argmax(xi, oy, ox)];
                }
            }
        }
    }

    /// With `positive`, a window whose maximum is not above zero (or is
    /// NaN) passes nothing back: the gradient of a Relu that made `x`,
    /// folded in.
    pub(super) fn max_pool_grad(&self, x: &[f32], gy: &[f32], gx: &mut [f32], positive: bool) {
        let Geometry {
            n, c, h, w, ho, wo, ..
        } = *self;
        if self.kh == 2 && self.kw == 2 && h == 2 * ho && w == 2 * wo && w > 0 {
            // The common case: 2x2 windows tiling the image, every element
            // of `gx` written once, no branches on the data.
            for plane in 0..n * c {
                let xi = &x[plane * h * w..][..h * w];
                let gi = &gy[plane * ho * wo..][..ho * wo];
                let go = &mut gx[plane * h * w..][..h * w];
                if positive {
                    max_pool_grad_2x2::<true>(xi, gi, go, w);
                } else {
                    max_pool_grad_2x2::<false>(xi, gi, go, w);
                }
            }
            return;
        }
        gx.fill(0.0);
        for plane in 0..n * c {
            let xi = &x[plane * h * w..][..h * w];
            let gi = &gy[plane * ho * wo..][..ho * wo];
            let go = &mut gx[plane * h * w..][..h * w];
            for oy in 0..ho {
                for ox in 0..wo {
                    let at = self.argmax(xi, oy, ox);
                    if !positive || xi[at] > 0.0 {
                        go[at] += gi[oy * wo + ox];
                    }
                }
            }
        }
    }
}

/// One plane's 2x2 max-pool gradient, the windows tiling `w`-wide rows:
/// each window's gradient goes to its first maximum in `argmax`'s order
/// (a strictly greater value replaces, so a NaN wins only in the first
/// tap), the other three taps get zero. Selects instead of branches: the
/// comparisons of real activations are unpredictable. With `POSITIVE`, a
/// window whose maximum is not above zero gets zero everywhere.
fn max_pool_grad_2x2<const POSITIVE: bool>(xi: &[f32], gi: &[f32], go: &mut [f32], w: usize) {
    #[cfg(target_arch = "x86_64")]
    let simd = std::arch::is_x86_feature_detected!("avx512f");
    let rows = xi.chunks_exact(2 * w).zip(go.chunks_exact_mut(2 * w));
    for ((x, g), gr) in rows.zip(gi.chunks_exact(w / 2)) {
        let (x0, x1) = x.split_at(w);
        let (g0, g1) = g.split_at_mut(w);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F is present; the rows hold `w` floats each and
            // `gr` `w / 2`.
            unsafe { pool_grad_avx512::row_pair::<POSITIVE>((x0, x1), gr, (g0, g1)) };
            continue;
        }
        let windows = x0.chunks_exact(2).zip(x1.chunks_exact(2));
        let outs = g0.chunks_exact_mut(2).zip(g1.chunks_exact_mut(2));
        for (((a, b), (o0, o1)), &v) in windows.zip(outs).zip(gr) {
            let s1 = a[1] > a[0];
            let m1 = if s1 { a[1] } else { a[0] };
            let s2 = b[0] > m1;
            let m2 = if s2 { b[0] } else { m1 };
            let s3 = b[1] > m2;
            let v = if POSITIVE {
                let m3 = if s3 { b[1] } else { m2 };
                if m3 > 0.0 { v } else { 0.0 }
            } else {
                v
            };
            let (t3, t2) = (s3, s2 && !s3);
            let t1 = s1 && !s2 && !s3;
            let t0 = !(s1 || s2 || s3);
            o0[0] = if t0 { v } else { 0.0 };
            o0[1] = if t1 { v } else { 0.0 };
            o1[0] = if t2 { v } else { 0.0 };
            o1[1] = if t3 { v } else { 0.0 };
        }
    }
}

/// [`max_pool_grad_2x2`] sixteen windows at a time: the rows' even and
/// odd columns split into vectors, the same comparisons as the scalar
/// loop (ordered `>`: a NaN never replaces), the four taps' gradients
/// selected by mask and interleaved back.
#[cfg(target_arch = "x86_64")]
mod pool_grad_avx512 {
    use std::arch::x86_64::*;

    /// One pair of rows (`x0`, `x1`, `w` floats each; `w` even) and the
    /// `w / 2` window gradients `gr`, into `g0`, `g1`.
    ///
    /// # Safety
    /// AVX-512F; the lengths above (checked).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_pair<const POSITIVE: bool>(
        (x0, x1): (&[f32], &[f32]),
        gr: &[f32],
        (g0, g1): (&mut [f32], &mut [f32]),
    ) {
        let wo = gr.len();
        assert!(
            x0.len() == 2 * wo && x1.len() == 2 * wo && g0.len() == 2 * wo && g1.len() == 2 * wo,
            "a 2x2 pool's rows and windows do not match"
        );
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let zero = _mm512_setzero_ps();
        for t0 in (0..wo).step_by(16) {
            let cnt = (wo - t0).min(16);
            // Masks of the windows, and of the row floats in each half.
            let win = ((1u32 << cnt) - 1) as __mmask16;
            let lo = ((1u32 << (2 * cnt).min(16)) - 1) as __mmask16;
            let hi = ((1u32 << (2 * cnt).saturating_sub(16)) - 1) as __mmask16;
            let at = 2 * t0;
            // SAFETY (all below): lanes past the masks are neither read nor
            // written; the masked ones are inside the rows (`at + 2 * cnt
            // <= w`) and `gr` (`t0 + cnt <= wo`).
            unsafe {
                // (Macros, not closures: a closure would not inherit the
                // target feature, and the intrinsics would not inline.)
                macro_rules! load {
                    ($r:expr) => {{
                        let p = $r.as_ptr().add(at);
                        let (l, h) = (
                            _mm512_maskz_loadu_ps(lo, p),
                            // `wrapping_add`: past the row when `hi` is
                            // empty (nothing is read then).
                            _mm512_maskz_loadu_ps(hi, p.wrapping_add(16)),
                        );
                        (
                            _mm512_permutex2var_ps(l, even, h),
                            _mm512_permutex2var_ps(l, odd, h),
                        )
                    }};
                }
                let (a0, a1) = load!(x0);
                let (b0, b1) = load!(x1);
                let s1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a1, a0);
                let m1 = _mm512_mask_blend_ps(s1, a0, a1);
                let s2 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b0, m1);
                let m2 = _mm512_mask_blend_ps(s2, m1, b0);
                let s3 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b1, m2);
                let mut v = _mm512_maskz_loadu_ps(win, gr.as_ptr().add(t0));
                if POSITIVE {
                    let m3 = _mm512_mask_blend_ps(s3, m2, b1);
                    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(m3, zero), v);
                }
                let (t3, t2) = (s3, s2 & !s3);
                let t1 = s1 & !s2 & !s3;
                let t0m = !(s1 | s2 | s3);
                macro_rules! store {
                    ($r:expr, $e:expr, $o:expr) => {{
                        let (e, o) = ($e, $o);
                        let p = $r.as_mut_ptr().add(at);
                        _mm512_mask_storeu_ps(p, lo, _mm512_permutex2var_ps(e, first, o));
                        let q = p.wrapping_add(16);
                        _mm512_mask_storeu_ps(q, hi, _mm512_permutex2var_ps(e, second, o));
                    }};
                }
                store!(g0, _mm512_maskz_mov_ps(t0m, v), _mm512_maskz_mov_ps(t1, v));
                store!(g1, _mm512_maskz_mov_ps(t2, v), _mm512_maskz_mov_ps(t3, v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive definition: cols[(c,i,j), (b,oy,ox)] = x[b,c,oy*sh+i-pt,ox*sw+j-pl].
    fn naive_im2col(g: &Geometry, x: &[f32]) -> Vec<f32> {
        let [rows, p] = g.cols_shape();
        let mut out = vec![0.0; rows * p];
        for c in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    for b in 0..g.n {
                        for oy in 0..g.ho {
                            for ox in 0..g.wo {
                                let y = (oy * g.sh + i) as isize - g.pt as isize;
                                let xx = (ox * g.sw + j) as isize - g.pl as isize;
                                let v = if y >= 0
                                    && xx >= 0
                                    && (y as usize) < g.h
                                    && (xx as usize) < g.w
                                {
                                    x[((b * g.c + c) * g.h + y as usize) * g.w + xx as usize]
                                } else {
                                    0.0
                                };
                                out[((c * g.kh + i) * g.kw + j) * p
                                    + (b * g.ho + oy) * g.wo
                                    + ox] = v;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn geometries() -> Vec<Geometry> {
        let mut v = Vec::new();
        for (h, w, k, s, p) in [
            (5, 6, 3, 1, 1),
            (5, 6, 3, 2, 0),
            (7, 4, 2, 2, 1),
            (4, 4, 1, 1, 0),
            (6, 7, 5, 1, 2),
            (3, 3, 3, 3, 2),
            (8, 5, 3, 2, 2),
        ] {
            v.push(Geometry::square((2, 3, h, w), (k, s, p)));
        }
        v
    }

    #[test]
    fn im2col_matches_the_definition() {
        for g in geometries() {
            let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| i as f32 + 1.0).collect();
            let mut cols = vec![f32::NAN; g.cols_shape().iter().product()];
            g.im2col(&x, &mut cols);
            assert_eq!(cols, naive_im2col(&g, &x), "{g:?}");
        }
    }

    /// col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>.
    #[test]
    fn col2im_is_the_adjoint() {
        for g in geometries() {
            let nx = g.n * g.c * g.h * g.w;
            let nc: usize = g.cols_shape().iter().product();
            let x: Vec<f32> = (0..nx).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
            let c: Vec<f32> = (0..nc).map(|i| ((i * 5 % 13) as f32) - 6.0).collect();
            let mut cols = vec![0.0; nc];
            g.im2col(&x, &mut cols);
            let mut back = vec![f32::NAN; nx];
            g.col2im(&c, &mut back);
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert_eq!(lhs, rhs, "{g:?}");
        }
    }

    #[test]
    fn max_pool_grad_routes_to_the_first_maximum() {
        let g = Geometry {
            n: 1,
            c: 1,
            h: 2,
            w: 4,
            kh: 2,
            kw: 2,
            sh: 2,
            sw: 2,
            pt: 0,
            pl: 0,
            ho: 1,
            wo: 2,
        };
        let x = [1.0, 3.0, 5.0, 5.0, 3.0, 2.0, 5.0, 0.0];
        let mut gx = [f32::NAN; 8];
        g.max_pool_grad(&x, &[10.0, 20.0], &mut gx, false);
        assert_eq!(gx, [0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // With `positive`: the same (both maxima above zero), and nothing
        // from a window whose maximum is zero.
        g.max_pool_grad(&x, &[10.0, 20.0], &mut gx, true);
        assert_eq!(gx, [0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let zero = [0.0, -1.0, 3.0, 5.0, -2.0, 0.0, 5.0, 0.0];
        g.max_pool_grad(&zero, &[10.0, 20.0], &mut gx, true);
        assert_eq!(gx, [0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0, 0.0]);
        let mut y = [f32::NAN; 2];
        g.max_pool(&x, &mut y);
        assert_eq!(y, [3.0, 5.0]);
    }

    #[test]
    fn max_pool_matches_the_general_path() {
        for (kh, kw, extra, wo) in [
            (2, 2, 1, 2),
            (2, 2, 0, 2),
            (3, 2, 1, 2),
            (1, 3, 0, 2),
            // The 2x2 path over one partial vector, a full one and more.
            (2, 2, 0, 7),
            (2, 2, 0, 12),
            (2, 2, 0, 16),
            (2, 2, 0, 19),
        ] {
            let ho = 3;
            let g = Geometry {
                n: 2,
                c: 2,
                h: ho * kh + extra,
                w: wo * kw,
                kh,
                kw,
                sh: kh,
                sw: kw,
                pt: 0,
                pl: 0,
                ho,
                wo,
            };
            let len = g.n * g.c * g.h * g.w;
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 23) as f32) - 11.0).collect();
            // Ties everywhere, and NaNs in every tap position: the
            // gradient still goes to `argmax`'s first maximum.
            let tied: Vec<f32> = (0..len)
                .map(|i| if i % 7 == 3 { f32::NAN } else { (i % 3) as f32 })
                .collect();
            let mut y = vec![f32::NAN; g.n * g.c * ho * wo];
            g.max_pool(&x, &mut y);
            let gy: Vec<f32> = (0..y.len()).map(|i| i as f32 + 1.0).collect();
            // With `positive`, only windows whose maximum is above zero
            // (not NaN) pass their gradient back.
            for (x, positive) in [(&x, false), (&tied, false), (&x, true), (&tied, true)] {
                let mut gx = vec![f32::NAN; x.len()];
                g.max_pool_grad(x, &gy, &mut gx, positive);
                let mut want = vec![0.0; x.len()];
                for plane in 0..g.n * g.c {
                    let xi = &x[plane * g.h * g.w..][..g.h * g.w];
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let at = g.argmax(xi, oy, ox);
                            if !positive || xi[at] > 0.0 {
                                want[plane * g.h * g.w + at] += gy[(plane * ho + oy) * wo + ox];
                            }
                        }
                    }
                }
                assert_eq!(gx, want, "{kh}x{kw} positive {positive}");
            }
            for plane in 0..g.n * g.c {
                let xi = &x[plane * g.h * g.w..][..g.h * g.w];
                for oy in 0..ho {
                    for ox in 0..wo {
                        assert_eq!(y[(plane * ho + oy) * wo + ox], xi[g.argmax(xi, oy, ox)]);
                    }
                }
            }
        }
    }
}
