//! An ungrouped 2-D convolution and its two gradients computed with
//! tract-linalg's matrix kernels directly, packing the im2col patches
//! straight from the image into the kernel's panel layout.
//!
//! tract's own MatMul would take `im2col(X)` as a plain matrix and copy it
//! into its panels before every product (the patches written once by
//! im2col, then read and written again by the packer). Here each product
//! packs its operands itself, one image (or one chunk of images) at a
//! time, so no patch matrix exists at all: the packed panels of one image
//! are a few hundred KiB and stay in cache, and the output is stored
//! straight into NCHW (no transpose).
//!
//! With `ck = C*kh*kw`, `hw = Ho*Wo` and `W2` the weight as `[Co, ck]`:
//! - forward, per image: `Y[b] = W2 x im2col(X[b]) + bias` (`[Co, hw]`);
//! - weight gradient, per chunk of images (inner dimension `images * hw`):
//!   `dW2 += G[chunk] x im2col(X[chunk])^T`;
//! - input gradient, per image: `dX[b] = col2im(W2^T x G[b])`.

use std::sync::Arc;

use tract_onnx::tract_core::tract_linalg::BinOp;
use tract_onnx::tract_core::tract_linalg::mmm::{
    AsInputValue, EagerPackedInput, FusedSpec, MatMatMul, MmmDispatch, Query, Suitable,
    pick_by_shape, retain_best,
};
use tract_onnx::tract_core::tract_linalg::pack::PackedFormat;
use tract_onnx::tract_hir::internal::*;

use super::Geometry;

/// A matrix kernel chosen for one product shape, with its operand layouts.
struct Gemm {
    mmm: Box<dyn MatMatMul>,
    packing: usize,
    a: PackedFormat,
    b: PackedFormat,
}

impl Gemm {
    /// The kernel tract would pick for an f32 `[m, k] x [k, n]` product,
    /// among those reading plain packed panels.
    fn new(m: usize, k: usize, n: usize) -> TractResult<Gemm> {
        let dispatch = MmmDispatch::native();
        let query = Query::plain(f32::datum_type(), Some(m), Some(k), Some(n));
        let plain = |(mmm, ix, pe): &Suitable| {
            let (a, b) = &mmm.packings()[*ix];
            pe.is_none()
                && a.downcast_ref::<PackedFormat>().is_some()
                && b.downcast_ref::<PackedFormat>().is_some()
        };
        let chosen = match dispatch.pick(&query) {
            Some(s) if plain(&s) => s,
            _ => {
                let mut suitable = dispatch.suitable(&query);
                suitable.retain(|s| plain(s));
                retain_best(&mut suitable);
                let ix = pick_by_shape(&query, &suitable)
                    .or_else(|| (!suitable.is_empty()).then_some(0))
                    .context("no f32 matrix kernel with plain packing")?;
                suitable.swap_remove(ix)
            }
        };
        let (mmm, packing, _) = chosen;
        let (a, b) = &mmm.packings()[packing];
        let a = a.downcast_ref::<PackedFormat>().expect("checked").clone();
        let b = b.downcast_ref::<PackedFormat>().expect("checked").clone();
        Ok(Gemm { mmm, packing, a, b })
    }

    /// Run `C = A x B` (then `ops` after the product, before the store).
    fn run<'t>(
        &self,
        scratch: &mut dyn tract_onnx::tract_core::tract_linalg::mmm::ScratchSpace,
        (m, n): (usize, usize),
        a: &'t EagerPackedInput,
        b: &'t EagerPackedInput,
        ops: TVec<FusedSpec<'t>>,
    ) -> TractResult<()> {
        let mut specs: TVec<FusedSpec> = tvec![FusedSpec::AddMatMul {
            a: AsInputValue::Borrowed(a),
            b: AsInputValue::Borrowed(b),
            packing: self.packing,
        }];
        specs.extend(ops);
        // SAFETY: both operands were packed in the kernel's own formats for
        // this `k`, and every store in `ops` covers an `m x n` region.
        unsafe { self.mmm.run_with_scratch_space(m, n, scratch, &specs) }
    }
}

/// The panels of a packed operand, as floats, and the floats per panel.
fn panels_mut(p: &mut EagerPackedInput) -> (&mut [f32], usize) {
    let panel = p.panel_bytes / 4;
    let blob = Arc::get_mut(&mut p.packed).expect("a packed buffer of our own");
    let bytes = blob.as_bytes_mut();
    // SAFETY: the blob is aligned for the kernel (at least 4 bytes) and
    // holds whole f32s.
    let f =
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, bytes.len() / 4) };
    (f, panel)
}

/// Pack records `k0..k0 + k` of an `[mn, k]` operand read at `src[r *
/// mn_stride + kk * k_stride]` into `r`-wide panels.
#[allow(clippy::too_many_arguments)]
fn pack_strided(
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    src: &[f32],
    (mn, k, k0): (usize, usize, usize),
    (mn_stride, k_stride): (usize, usize),
) {
    for p in 0..mn.div_ceil(r) {
        let rows = (mn - p * r).min(r);
        let panel = &mut dst[p * panel_len..][..panel_len];
        for kk in 0..k {
            let d = &mut panel[(k0 + kk) * r..][..r];
            if mn_stride == 1 {
                d[..rows].copy_from_slice(&src[p * r + kk * k_stride..][..rows]);
            } else {
                for (rr, v) in d[..rows].iter_mut().enumerate() {
                    *v = src[(p * r + rr) * mn_stride + kk * k_stride];
                }
            }
            d[rows..].fill(0.0);
        }
    }
}

/// `(ci, i, j)` of patch row `kk`.
fn patch_row(g: &Geometry, kk: usize) -> (usize, usize, usize) {
    (kk / (g.kh * g.kw), kk / g.kw % g.kh, kk % g.kw)
}

/// The patches of image `img` as the right operand of `W2 x im2col`:
/// records are patch rows, panels run along the image's pixels.
fn pack_patches_by_pixel(
    g: &Geometry,
    x: &[f32],
    img: usize,
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    row: &mut [f32],
) {
    let hw = g.ho * g.wo;
    let ck = g.c * g.kh * g.kw;
    for kk in 0..ck {
        g.im2col_row(x, patch_row(g, kk), img..img + 1, &mut row[..hw]);
        for p in 0..hw.div_ceil(r) {
            let cols = (hw - p * r).min(r);
            let d = &mut dst[p * panel_len + kk * r..][..r];
            d[..cols].copy_from_slice(&row[p * r..][..cols]);
            d[cols..].fill(0.0);
        }
    }
}

/// The patches of `images` as the right operand of `G x im2col^T`: records
/// are pixels, panels run along the patch rows.
fn pack_patches_by_row(
    g: &Geometry,
    x: &[f32],
    images: std::ops::Range<usize>,
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    rows: &mut [f32],
) {
    let pixels = images.len() * g.ho * g.wo;
    let ck = g.c * g.kh * g.kw;
    for p in 0..ck.div_ceil(r) {
        let valid = (ck - p * r).min(r);
        for rr in 0..valid {
            let out = &mut rows[rr * pixels..][..pixels];
            g.im2col_row(x, patch_row(g, p * r + rr), images.clone(), out);
        }
        let panel = &mut dst[p * panel_len..][..panel_len];
        for q in 0..pixels {
            let d = &mut panel[q * r..][..r];
            for (rr, v) in d[..valid].iter_mut().enumerate() {
                *v = rows[rr * pixels + q];
            }
            d[valid..].fill(0.0);
        }
    }
}

fn check_len(what: &str, got: usize, want: usize) -> TractResult<()> {
    ensure!(got == want, "{what} has {got} values, expected {want}");
    Ok(())
}

/// `Y = conv(X, W) + bias`, NCHW: `[n, co, ho, wo]`.
pub(super) fn forward(
    g: &Geometry,
    co: usize,
    x: &[f32],
    w: &[f32],
    bias: Option<&Tensor>,
) -> TractResult<Tensor> {
    let (ck, hw) = (g.c * g.kh * g.kw, g.ho * g.wo);
    check_len("the input", x.len(), g.n * g.c * g.h * g.w)?;
    check_len("the weight", w.len(), co * ck)?;
    let gemm = Gemm::new(co, ck, hw)?;
    let mut a = gemm.a.new_packed_buffer(ck, co)?;
    {
        let (d, pl) = panels_mut(&mut a);
        pack_strided(d, (pl, gemm.a.r), w, (co, ck, 0), (ck, 1));
    }
    let mut b = gemm.b.new_packed_buffer(ck, hw)?;
    let y = unsafe { Tensor::uninitialized::<f32>(&[g.n, co, g.ho, g.wo])? };
    let mut row = vec![0.0f32; hw];
    // SAFETY: `[co, hw]` rows of an image's output, contiguous.
    let spec = unsafe { gemm.mmm.c_from_data_and_strides(4, hw as isize, 1) };
    let mut scratch = unsafe { gemm.mmm.allocate_scratch_space() };
    for img in 0..g.n {
        {
            let (d, pl) = panels_mut(&mut b);
            pack_patches_by_pixel(g, x, img, d, (pl, gemm.b.r), &mut row);
        }
        let view = TensorView::at_prefix(&y, &[img])?;
        // SAFETY: the view is image `img` of `y`, `[co, ho, wo]`.
        let store = unsafe { spec.wrap(&view) };
        let mut ops: TVec<FusedSpec> = tvec![];
        if let Some(bias) = bias {
            ops.push(FusedSpec::BinPerRow(bias.view(), BinOp::Add));
        }
        ops.push(FusedSpec::Store(store));
        gemm.run(&mut *scratch, (co, hw), &a, &b, ops)?;
    }
    Ok(y)
}

/// `dW` (`[co, c, kh, kw]`) from the input `x` and the output gradient
/// `gy`, `images` images per product.
pub(super) fn grad_weight(
    g: &Geometry,
    co: usize,
    x: &[f32],
    gy: &[f32],
    images: usize,
) -> TractResult<Tensor> {
    let (ck, hw) = (g.c * g.kh * g.kw, g.ho * g.wo);
    check_len("the input", x.len(), g.n * g.c * g.h * g.w)?;
    check_len("the output gradient", gy.len(), g.n * co * hw)?;
    let images = images.clamp(1, g.n.max(1));
    let dw = Tensor::zero::<f32>(&[co, g.c, g.kh, g.kw])?;
    let gemm = Gemm::new(co, images * hw, ck)?;
    // SAFETY: `dw` is `[co, ck]`, contiguous.
    let store = unsafe {
        gemm.mmm
            .c_from_data_and_strides(4, ck as isize, 1)
            .wrap(&dw.view())
    };
    let mut scratch = unsafe { gemm.mmm.allocate_scratch_space() };
    let mut rows = vec![0.0f32; gemm.b.r * images * hw];
    // Buffers for a full chunk and, made when needed, the shorter last one.
    let mut full: Option<(EagerPackedInput, EagerPackedInput)> = None;
    for (chunk, first) in (0..g.n).step_by(images).enumerate() {
        let len = images.min(g.n - first);
        let k = len * hw;
        let mut fresh;
        let (a, b) = if len == images {
            if full.is_none() {
                full = Some((
                    gemm.a.new_packed_buffer(k, co)?,
                    gemm.b.new_packed_buffer(k, ck)?,
                ));
            }
            let (a, b) = full.as_mut().expect("made");
            (a, b)
        } else {
            fresh = (
                gemm.a.new_packed_buffer(k, co)?,
                gemm.b.new_packed_buffer(k, ck)?,
            );
            (&mut fresh.0, &mut fresh.1)
        };
        {
            let (d, pl) = panels_mut(a);
            for (i, img) in (first..first + len).enumerate() {
                let src = &gy[img * co * hw..][..co * hw];
                pack_strided(d, (pl, gemm.a.r), src, (co, hw, i * hw), (hw, 1));
            }
        }
        {
            let (d, pl) = panels_mut(b);
            pack_patches_by_row(g, x, first..first + len, d, (pl, gemm.b.r), &mut rows);
        }
        let ops: TVec<FusedSpec> = if chunk == 0 {
            tvec![FusedSpec::Store(store)]
        } else {
            tvec![FusedSpec::AddUnicast(store), FusedSpec::Store(store)]
        };
        gemm.run(&mut *scratch, (co, ck), a, b, ops)?;
    }
    Ok(dw)
}

/// `dX` (`[n, c, h, w]`) from the output gradient `gy` and the weight.
pub(super) fn grad_input(g: &Geometry, co: usize, gy: &[f32], w: &[f32]) -> TractResult<Tensor> {
    let (ck, hw) = (g.c * g.kh * g.kw, g.ho * g.wo);
    check_len("the output gradient", gy.len(), g.n * co * hw)?;
    check_len("the weight", w.len(), co * ck)?;
    let gemm = Gemm::new(ck, co, hw)?;
    let mut a = gemm.a.new_packed_buffer(co, ck)?;
    {
        let (d, pl) = panels_mut(&mut a);
        pack_strided(d, (pl, gemm.a.r), w, (ck, co, 0), (1, ck));
    }
    let mut b = gemm.b.new_packed_buffer(co, hw)?;
    let cols = unsafe { Tensor::uninitialized::<f32>(&[ck, hw])? };
    // SAFETY: `cols` is `[ck, hw]`, contiguous.
    let store = unsafe {
        gemm.mmm
            .c_from_data_and_strides(4, hw as isize, 1)
            .wrap(&cols.view())
    };
    let mut scratch = unsafe { gemm.mmm.allocate_scratch_space() };
    let mut dx = unsafe { Tensor::uninitialized::<f32>(&g.image_shape())? };
    let one = Geometry { n: 1, ..*g };
    let image = g.c * g.h * g.w;
    for img in 0..g.n {
        {
            let (d, pl) = panels_mut(&mut b);
            let src = &gy[img * co * hw..][..co * hw];
            pack_strided(d, (pl, gemm.b.r), src, (hw, co, 0), (1, hw));
        }
        gemm.run(
            &mut *scratch,
            (ck, hw),
            &a,
            &b,
            tvec![FusedSpec::Store(store)],
        )?;
        let mut view = dx.try_as_plain_ram_mut()?;
        let out = &mut view.as_slice_mut::<f32>()?[img * image..][..image];
        one.col2im(cols.try_as_plain_ram()?.as_slice::<f32>()?, out);
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_forward(g: &Geometry, co: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; g.n * co * g.ho * g.wo];
        for b in 0..g.n {
            for o in 0..co {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let mut s = bias[o] as f64;
                        for c in 0..g.c {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let yy = (oy * g.sh + i) as isize - g.pt as isize;
                                    let xx = (ox * g.sw + j) as isize - g.pl as isize;
                                    if yy < 0 || xx < 0 || yy as usize >= g.h || xx as usize >= g.w
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * g.c + c) * g.h + yy as usize) * g.w + xx as usize];
                                    let wv = w[((o * g.c + c) * g.kh + i) * g.kw + j];
                                    s += (xv * wv) as f64;
                                }
                            }
                        }
                        y[((b * co + o) * g.ho + oy) * g.wo + ox] = s as f32;
                    }
                }
            }
        }
        y
    }

    fn geometries() -> Vec<(Geometry, usize)> {
        let mut v = Vec::new();
        for (n, c, h, w, k, s, p, co) in [
            (3, 2, 6, 7, 3, 1, 1, 5),
            (2, 3, 9, 8, 5, 1, 2, 17),
            (4, 1, 7, 5, 3, 2, 0, 33),
            (2, 4, 5, 5, 1, 1, 0, 3),
            (5, 3, 8, 6, 2, 2, 1, 7),
        ] {
            let ho = (h + 2 * p - k) / s + 1;
            let wo = (w + 2 * p - k) / s + 1;
            let g = Geometry {
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
                ho,
                wo,
            };
            v.push((g, co));
        }
        v
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 8.0)
            .collect()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn forward_matches_the_definition() {
        for (g, co) in geometries() {
            let x = data(g.n * g.c * g.h * g.w, 1);
            let w = data(co * g.c * g.kh * g.kw, 2);
            let bias = data(co, 3);
            let bt = Tensor::from_shape(&[co], &bias).unwrap();
            let y = forward(&g, co, &x, &w, Some(&bt)).unwrap();
            close(
                &values(&y),
                &naive_forward(&g, co, &x, &w, &bias),
                &format!("{g:?}"),
            );
            let y = forward(&g, co, &x, &w, None).unwrap();
            close(
                &values(&y),
                &naive_forward(&g, co, &x, &w, &vec![0.0; co]),
                "no bias",
            );
        }
    }

    /// The gradients are the adjoints of the forward product:
    /// `<dW, V> = <gy, conv(x, V)>` and `<dX, U> = <gy, conv(U, w)>`,
    /// checked against the naive convolution.
    #[test]
    fn gradients_are_the_adjoints() {
        for (g, co) in geometries() {
            let (nx, nw) = (g.n * g.c * g.h * g.w, co * g.c * g.kh * g.kw);
            let x = data(nx, 4);
            let w = data(nw, 5);
            let gy = data(g.n * co * g.ho * g.wo, 6);
            let zero = vec![0.0; co];
            let dot =
                |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum::<f64>();
            for images in [1, 2, g.n] {
                let dw = values(&grad_weight(&g, co, &x, &gy, images).unwrap());
                // <dW, w> = <gy, conv(x, w)> for any w: a basis check per entry.
                let mut want = vec![0.0f32; nw];
                for (e, slot) in want.iter_mut().enumerate() {
                    let mut basis = vec![0.0; nw];
                    basis[e] = 1.0;
                    *slot = dot(&gy, &naive_forward(&g, co, &x, &basis, &zero)) as f32;
                }
                close(&dw, &want, &format!("dW {g:?} images {images}"));
            }
            let dx = values(&grad_input(&g, co, &gy, &w).unwrap());
            let mut want = vec![0.0f32; nx];
            for (e, slot) in want.iter_mut().enumerate() {
                let mut basis = vec![0.0; nx];
                basis[e] = 1.0;
                *slot = dot(&gy, &naive_forward(&g, co, &basis, &w, &zero)) as f32;
            }
            close(&dx, &want, &format!("dX {g:?}"));
        }
    }
}
