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
//! - input gradient: with stride 1, the forward product on `G` by the
//!   weight with its channel axes swapped and its window turned half a
//!   turn (pads `k - 1 - p`); else, per image, `dX[b] = col2im(W2^T x G[b])`.

use std::sync::Arc;

use tract_onnx::tract_core::tract_linalg::BinOp;
use tract_onnx::tract_core::tract_linalg::mmm::{
    AsInputValue, EagerPackedInput, FusedSpec, MMMInputValue, MatMatMul, MmmDispatch, Query,
    ScratchSpace, Suitable, pick_by_shape, retain_best,
};
use tract_onnx::tract_core::tract_linalg::pack::PackedFormat;
use tract_onnx::tract_hir::internal::*;

use super::Geometry;

/// A matrix kernel chosen for one product shape, with its operand layouts.
pub(super) struct Gemm {
    kernel: Kernel,
    pub(super) a: PackedFormat,
    pub(super) b: PackedFormat,
}

enum Kernel {
    /// One of tract-linalg's, with the index of its plain packing.
    Tract {
        mmm: Box<dyn MatMatMul>,
        packing: usize,
    },
    /// [`avx512`]'s 32x12 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// What a product does with `C` after `A x B`.
#[derive(Clone, Copy)]
pub(super) enum Then<'t> {
    /// `C = A x B`.
    Store,
    /// `C += A x B`.
    Accumulate,
    /// `C = A x B + bias`, one bias per row.
    AddPerRow(&'t Tensor),
}

/// The scratch space a kernel needs between products (none for ours).
pub(super) struct Scratch(Option<Box<dyn ScratchSpace>>);

impl Gemm {
    /// The kernel for an f32 `[m, k] x [k, n]` product: [`avx512`]'s where
    /// it pays, else the one tract would pick among those reading plain
    /// packed panels.
    pub(super) fn new(m: usize, k: usize, n: usize) -> TractResult<Gemm> {
        #[cfg(target_arch = "x86_64")]
        if avx512::suits(m, k, n) {
            tracing::trace!(m, k, n, kernel = "fedge avx512 32x12", "fedge conv product");
            return Ok(Gemm {
                kernel: Kernel::Avx512,
                a: PackedFormat::new(f32::datum_type(), avx512::MR, 64),
                b: PackedFormat::new(f32::datum_type(), avx512::NR, 64),
            });
        }
        Self::tract(m, k, n)
    }

    /// The kernel tract would pick for an f32 `[m, k] x [k, n]` product,
    /// among those reading plain packed panels.
    pub(super) fn tract(m: usize, k: usize, n: usize) -> TractResult<Gemm> {
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
        tracing::trace!(m, k, n, kernel = mmm.name(), "fedge conv product");
        let (a, b) = &mmm.packings()[packing];
        let a = a.downcast_ref::<PackedFormat>().expect("checked").clone();
        let b = b.downcast_ref::<PackedFormat>().expect("checked").clone();
        Ok(Gemm {
            kernel: Kernel::Tract { mmm, packing },
            a,
            b,
        })
    }

    /// Whether this is fedge's own kernel (not one of tract's).
    fn is_ours(&self) -> bool {
        match self.kernel {
            Kernel::Tract { .. } => false,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => true,
        }
    }

    /// A scratch space for this kernel's products.
    pub(super) fn scratch(&self) -> Scratch {
        match &self.kernel {
            // SAFETY: used only with this kernel (`run` below).
            Kernel::Tract { mmm, .. } => Scratch(Some(unsafe { mmm.allocate_scratch_space() })),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => Scratch(None),
        }
    }

    /// tract's kernel and its fused ops, for a [`Gemm::tract`] product whose
    /// store is not a plain row-major block.
    pub(super) fn run_fused<'t>(
        &self,
        scratch: &mut Scratch,
        (m, n): (usize, usize),
        (a, b): (&'t EagerPackedInput, &'t EagerPackedInput),
        ops: impl FnOnce(&dyn MatMatMul) -> TVec<FusedSpec<'t>>,
    ) -> TractResult<()> {
        let (mmm, packing) = match &self.kernel {
            Kernel::Tract { mmm, packing } => (mmm, packing),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => bail!("fused ops need one of tract's kernels"),
        };
        let mut specs: TVec<FusedSpec> = tvec![FusedSpec::AddMatMul {
            a: AsInputValue::Borrowed(a),
            b: AsInputValue::Borrowed(b),
            packing: *packing,
        }];
        specs.extend(ops(&**mmm));
        let scratch = scratch
            .0
            .as_deref_mut()
            .context("a scratch space for tract")?;
        // SAFETY: both operands were packed in the kernel's own formats for
        // this `k`, and every store in `ops` covers an `m x n` region (the
        // caller's).
        unsafe { mmm.run_with_scratch_space(m, n, scratch, &specs) }
    }

    /// `C = A x B` (then `then`), into `c`: a contiguous row-major `[m, n]`
    /// block, `a` and `b` packed in this kernel's formats for the same `k`.
    pub(super) fn run(
        &self,
        scratch: &mut Scratch,
        (m, n): (usize, usize),
        (a, b): (&EagerPackedInput, &EagerPackedInput),
        c: &mut TensorView,
        then: Then,
    ) -> TractResult<()> {
        ensure!(
            c.datum_type() == f32::datum_type() && c.len() == m * n,
            "a product's output is {:?} {:?}, not f32 {m}x{n}",
            c.datum_type(),
            c.shape()
        );
        let k = a.k();
        ensure!(b.k() == k, "operands packed for k {k} and {}", b.k());
        match &self.kernel {
            Kernel::Tract { .. } => self.run_fused(scratch, (m, n), (a, b), |mmm| {
                // SAFETY: `c` is a contiguous `[m, n]` f32 block (checked).
                let store = unsafe { mmm.c_from_data_and_strides(4, n as isize, 1).wrap(c) };
                let mut ops: TVec<FusedSpec> = tvec![];
                match then {
                    Then::Store => {}
                    Then::Accumulate => ops.push(FusedSpec::AddUnicast(store)),
                    Then::AddPerRow(bias) => {
                        ops.push(FusedSpec::BinPerRow(bias.view(), BinOp::Add))
                    }
                }
                ops.push(FusedSpec::Store(store));
                ops
            }),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                let then = match then {
                    Then::Store => avx512::Epilogue::Store,
                    Then::Accumulate => avx512::Epilogue::Accumulate,
                    Then::AddPerRow(bias) => avx512::Epilogue::AddPerRow(plain_f32(bias)?),
                };
                let out = c.as_slice_mut::<f32>()?;
                let (b, pb) = panels(b)?;
                avx512::run(
                    k,
                    (m, n),
                    panels(a)?,
                    avx512::Right::Panels(b, pb),
                    out,
                    then,
                )
            }
        }
    }
}

/// A packed operand's panels as floats, and the floats per panel.
#[cfg(target_arch = "x86_64")]
fn panels(p: &EagerPackedInput) -> TractResult<(&[f32], usize)> {
    // SAFETY: any bytes are valid f32s; `align_to` keeps only what is
    // aligned (all of a 64-byte aligned blob).
    let (head, f, _) = unsafe { p.packed.as_bytes().align_to::<f32>() };
    ensure!(head.is_empty(), "a packed operand not aligned for f32");
    Ok((f, p.panel_bytes / 4))
}

#[cfg(target_arch = "x86_64")]
fn plain_f32(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// The panels of a packed operand, as floats, and the floats per panel.
pub(super) fn panels_mut(p: &mut EagerPackedInput) -> (&mut [f32], usize) {
    let panel = p.panel_bytes / 4;
    let blob = Arc::get_mut(&mut p.packed).expect("a packed buffer of our own");
    let bytes = blob.as_bytes_mut();
    // SAFETY: the blob is aligned for the kernel (at least 4 bytes) and
    // holds whole f32s.
    let f =
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, bytes.len() / 4) };
    (f, panel)
}

/// Call `$f::<R>(args)` with `R` the panel width `$r` when it is one the
/// kernels use, so the copies below unroll; else `$f::<0>`, which reads
/// the width at run time.
macro_rules! by_width {
    ($r:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $r {
            1 => $f::<1>($($a),*),
            2 => $f::<2>($($a),*),
            3 => $f::<3>($($a),*),
            4 => $f::<4>($($a),*),
            5 => $f::<5>($($a),*),
            6 => $f::<6>($($a),*),
            8 => $f::<8>($($a),*),
            12 => $f::<12>($($a),*),
            16 => $f::<16>($($a),*),
            24 => $f::<24>($($a),*),
            32 => $f::<32>($($a),*),
            48 => $f::<48>($($a),*),
            64 => $f::<64>($($a),*),
            _ => $f::<0>($($a),*),
        }
    };
}

/// The panel width: `R`, or the run-time `r` when `R` is 0.
#[inline(always)]
fn width<const R: usize>(r: usize) -> usize {
    if R == 0 { r } else { R }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;
mod patches;

use patches::{Lanes, Padded, pack_patches_by_pixel, pack_patches_by_row};

/// Pack records `k0..k0 + k` of an `[mn, k]` operand read at `src[r *
/// mn_stride + kk * k_stride]` into `r`-wide panels.
pub(super) fn pack_strided(
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    src: &[f32],
    (mn, k, k0): (usize, usize, usize),
    (mn_stride, k_stride): (usize, usize),
) {
    by_width!(
        r,
        pack_strided_r(dst, (panel_len, r), src, (mn, k, k0), (mn_stride, k_stride))
    )
}

fn pack_strided_r<const R: usize>(
    dst: &mut [f32],
    (panel_len, r): (usize, usize),
    src: &[f32],
    (mn, k, k0): (usize, usize, usize),
    (mn_stride, k_stride): (usize, usize),
) {
    let r = width::<R>(r);
    if k_stride == 1 && mn_stride != 1 {
        // Each lane's values are contiguous along `k` (a transpose): copied
        // a block of records at a time, row by row, so that the reads are
        // runs and the block being written stays in the L1 cache. (Record
        // by record, each of the `r` reads hits another row.)
        const BLOCK: usize = 64;
        for p in 0..mn.div_ceil(r) {
            let rows = (mn - p * r).min(r);
            let panel = &mut dst[p * panel_len + k0 * r..][..k * r];
            for kb in (0..k).step_by(BLOCK) {
                let len = BLOCK.min(k - kb);
                let block = &mut panel[kb * r..][..len * r];
                for rr in 0..r {
                    if rr < rows {
                        let run = &src[(p * r + rr) * mn_stride + kb..][..len];
                        for (rec, &v) in block.chunks_exact_mut(r).zip(run) {
                            rec[rr] = v;
                        }
                    } else {
                        block.chunks_exact_mut(r).for_each(|rec| rec[rr] = 0.0);
                    }
                }
            }
        }
        return;
    }
    for p in 0..mn.div_ceil(r) {
        let rows = (mn - p * r).min(r);
        let panel = &mut dst[p * panel_len..][..panel_len];
        for kk in 0..k {
            let d = &mut panel[(k0 + kk) * r..][..r];
            if rows == r && mn_stride == 1 {
                // A constant `r` (by_width!) makes this a few moves.
                d.copy_from_slice(&src[p * r + kk * k_stride..][..r]);
            } else {
                for (rr, v) in d.iter_mut().enumerate() {
                    *v = if rr < rows {
                        src[(p * r + rr) * mn_stride + kk * k_stride]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// The runs of `offsets` for the masked-load packers, when the CPU has
/// them and the panel width fits a vector; else `None` (the scalar
/// packers).
fn masked_lanes(offsets: &[usize], r: usize) -> Option<Lanes> {
    if patches::avx512_available() {
        Lanes::new(offsets, r)
    } else {
        None
    }
}

fn check_len(what: &str, got: usize, want: usize) -> TractResult<()> {
    ensure!(got == want, "{what} has {got} values, expected {want}");
    Ok(())
}

/// The most patch rows a forward product packs at once with our kernel:
/// a convolution with more takes several products over slices of its
/// patch rows, added up, so that the packed patches of one stay in the
/// L2 cache between their packing and the product (the second
/// convolution's input gradient packs 1,600 rows of 196 pixels, 1.3 MB).
const FORWARD_K: usize = 512;

/// The slices of `ck` patch rows that [`forward`] packs one at a time.
fn record_chunks(ck: usize, gemm: &Gemm) -> Vec<std::ops::Range<usize>> {
    // One slice of all the rows, or slices of equal length (the last
    // shorter) of at most FORWARD_K.
    let len = if gemm.is_ours() && ck > FORWARD_K {
        ck.div_ceil(ck.div_ceil(FORWARD_K))
    } else {
        ck.max(1)
    };
    (0..ck.max(1))
        .step_by(len)
        .map(|s| s..(s + len).min(ck))
        .collect()
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
    let chunks = record_chunks(ck, &gemm);
    // Per slice of patch rows: the weight's columns, packed once, and a
    // buffer for the patches.
    let mut packed = Vec::with_capacity(chunks.len());
    for rows in &chunks {
        let kc = rows.len();
        let mut a = gemm.a.new_packed_buffer(kc, co)?;
        {
            let (d, pl) = panels_mut(&mut a);
            pack_strided(d, (pl, gemm.a.r), &w[rows.start..], (co, kc, 0), (ck, 1));
        }
        packed.push((a, gemm.b.new_packed_buffer(kc, hw)?));
    }
    let y = unsafe { Tensor::uninitialized::<f32>(&[g.n, co, g.ho, g.wo])? };
    let mut padded = Padded::new(g, 1);
    let lanes = masked_lanes(&padded.pixel, gemm.b.r);
    // The scalar packer's patch row (none with masked loads).
    let mut row = vec![0.0f32; if lanes.is_some() { 0 } else { hw }];
    let mut scratch = gemm.scratch();
    for img in 0..g.n {
        padded.fill(g, x, img..img + 1);
        // Image `img` of `y`: `[co, ho, wo]`, contiguous.
        let mut view = TensorView::at_prefix(&y, &[img])?;
        for (i, (rows, (a, b))) in chunks.iter().zip(&mut packed).enumerate() {
            {
                let (d, pl) = panels_mut(b);
                let what = (lanes.as_ref(), rows.clone());
                pack_patches_by_pixel(&padded, d, (pl, gemm.b.r), g, what, &mut row);
            }
            let then = match (i, bias) {
                (0, Some(bias)) => Then::AddPerRow(bias),
                (0, None) => Then::Store,
                _ => Then::Accumulate,
            };
            gemm.run(&mut scratch, (co, hw), (a, b), &mut view, then)?;
        }
    }
    Ok(y)
}

/// The most records of `k` a weight-gradient chunk packs at once (unless
/// one image has more).
const CHUNK_K: usize = 1024;

/// `dW` (`[co, c, kh, kw]`) from the input `x` and the output gradient
/// `gy`, at most `images` images per product.
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
    // At most about CHUNK_K records per chunk (at least one image): a
    // chunk's two packed operands then stay in the L2 cache from their
    // packing to the product; packed whole for a larger chunk they went
    // out to memory and back (profiled: the packing's stores stalled).
    let images = images
        .clamp(1, g.n.max(1))
        .min((CHUNK_K / hw.max(1)).max(1));
    let dw = Tensor::zero::<f32>(&[co, g.c, g.kh, g.kw])?;
    let gemm = Gemm::new(co, images * hw, ck)?;
    let mut scratch = gemm.scratch();
    // `dw` as `[co, ck]`, contiguous.
    let mut out = dw.view();
    let mut padded = Padded::new(g, images);
    let lanes = masked_lanes(&padded.row, gemm.b.r);
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
            if len != images {
                padded = Padded::new(g, len);
            }
            padded.fill(g, x, first..first + len);
            let (d, pl) = panels_mut(b);
            pack_patches_by_row(&padded, d, (pl, gemm.b.r), lanes.as_ref());
        }
        let then = if chunk == 0 {
            Then::Store
        } else {
            Then::Accumulate
        };
        gemm.run(&mut scratch, (co, ck), (a, b), &mut out, then)?;
    }
    Ok(dw)
}

/// `dX` (`[n, c, h, w]`) from the output gradient `gy` and the weight.
///
/// With stride 1 (and pads smaller than the kernel) it is the forward
/// convolution of `gy` by the weight with its channel axes swapped and
/// its window turned half a turn, pads `k - 1 - p`: packed like the
/// forward, no col2im. Else `col2im(W2^T x G)`, image by image.
pub(super) fn grad_input(g: &Geometry, co: usize, gy: &[f32], w: &[f32]) -> TractResult<Tensor> {
    let (ck, hw) = (g.c * g.kh * g.kw, g.ho * g.wo);
    check_len("the output gradient", gy.len(), g.n * co * hw)?;
    check_len("the weight", w.len(), co * ck)?;
    if g.sh == 1 && g.sw == 1 && g.pt < g.kh && g.pl < g.kw {
        let (kh, kw) = (g.kh, g.kw);
        let turned = Geometry {
            n: g.n,
            c: co,
            h: g.ho,
            w: g.wo,
            kh,
            kw,
            sh: 1,
            sw: 1,
            pt: kh - 1 - g.pt,
            pl: kw - 1 - g.pl,
            ho: g.h,
            wo: g.w,
        };
        let mut wt = vec![0.0f32; w.len()];
        for o in 0..co {
            for ci in 0..g.c {
                for i in 0..kh {
                    for j in 0..kw {
                        wt[((ci * co + o) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)] =
                            w[((o * g.c + ci) * kh + i) * kw + j];
                    }
                }
            }
        }
        return forward(&turned, g.c, gy, &wt, None);
    }
    let gemm = Gemm::new(ck, co, hw)?;
    let mut a = gemm.a.new_packed_buffer(co, ck)?;
    {
        let (d, pl) = panels_mut(&mut a);
        pack_strided(d, (pl, gemm.a.r), w, (ck, co, 0), (1, ck));
    }
    let mut b = gemm.b.new_packed_buffer(co, hw)?;
    let cols = unsafe { Tensor::uninitialized::<f32>(&[ck, hw])? };
    let mut scratch = gemm.scratch();
    let mut dx = unsafe { Tensor::uninitialized::<f32>(&g.image_shape())? };
    let one = Geometry { n: 1, ..*g };
    let image = g.c * g.h * g.w;
    for img in 0..g.n {
        {
            let (d, pl) = panels_mut(&mut b);
            let src = &gy[img * co * hw..][..co * hw];
            pack_strided(d, (pl, gemm.b.r), src, (hw, co, 0), (1, hw));
        }
        // `cols` as `[ck, hw]`, contiguous.
        gemm.run(
            &mut scratch,
            (ck, hw),
            (&a, &b),
            &mut cols.view(),
            Then::Store,
        )?;
        let mut view = dx.try_as_plain_ram_mut()?;
        let out = &mut view.as_slice_mut::<f32>()?[img * image..][..image];
        one.col2im(cols.try_as_plain_ram()?.as_slice::<f32>()?, out);
    }
    Ok(dx)
}

#[cfg(test)]
mod tests;
