//! `FedgeGemmSgd`: a dense layer's weight gradient and its SGD update with
//! momentum in one matrix product.
//!
//! Inputs `(w [m, n], v [m, n], p [b, m], q [b, n], lr)`, outputs
//! `(w', v')`, attributes `momentum` (`mu`) and `alpha`:
//! `v' = mu v + alpha p^T q` and `w' = w - lr v'`. For `Gemm(a, W,
//! transB=1)` (PyTorch's Linear) `p` is the output gradient and `q` the
//! layer's input; with `transB=0` the other way round.
//!
//! Unfused, the step writes the gradient `p^T q` (as large as the weight),
//! then reads it, the weight and the momentum again to update them. On
//! x86_64 with AVX-512F, [`direct`] updates `v` and `w` from each tile of
//! the product in registers. Elsewhere tract-linalg's kernel adds the
//! momentum to each tile of the product and stores `v'` over `v`, then one
//! pass writes `w - lr v'`: no gradient tensor exists either way. There
//! `p` is packed scaled by `alpha / mu` so that the tile's
//! `(tile + v) x mu` is `mu v + alpha p^T q` (within a rounding of
//! PyTorch's order of operations). (Storing `w'` from the same tiles, a
//! second `Store` after the first, gave wrong weights on border tiles of
//! some shapes with tract-linalg 0.23.9, so the weight takes its own
//! pass.) The compiler fuses only when `mu` is at least
//! [`MOMENTUM_MIN`], there is no weight decay, and this product is the
//! weight's only use.

use tract_onnx::tract_core::tract_linalg::BinOp;
use tract_onnx::tract_core::tract_linalg::mmm::FusedSpec;
use tract_onnx::tract_hir::internal::*;

use super::conv::{Gemm, pack_strided, panels_mut};

mod direct;

/// The smallest momentum the compiler fuses for (`alpha / mu` scales the
/// packed gradient).
pub const MOMENTUM_MIN: f32 = 0.01;

/// `v = mu v + alpha p^T q`, `w = w - lr v`, in place (see the module
/// docs); `p` is `[b, m]`, `q` is `[b, n]`, `w` and `v` are `[m, n]`.
/// On x86_64 with AVX-512F, [`direct`]; elsewhere tract-linalg's kernel
/// ([`gemm_sgd_tract`]).
pub(super) fn gemm_sgd(
    w: &mut Tensor,
    v: &mut Tensor,
    (p, q): (&[f32], &[f32]),
    (m, n, b): (usize, usize, usize),
    (alpha, mu, lr): (f32, f32, f32),
) -> TractResult<()> {
    check(w, v, (p, q), (m, n, b))?;
    if direct::available() {
        let mut wv = w.try_as_plain_ram_mut()?;
        let mut vv = v.try_as_plain_ram_mut()?;
        direct::gemm_sgd(
            (wv.as_slice_mut::<f32>()?, vv.as_slice_mut::<f32>()?),
            (p, q),
            (m, n, b),
            (alpha, mu, lr),
        );
        return Ok(());
    }
    gemm_sgd_tract(w, v, (p, q), (m, n, b), (alpha, mu, lr))
}

fn check(
    w: &Tensor,
    v: &Tensor,
    (p, q): (&[f32], &[f32]),
    (m, n, b): (usize, usize, usize),
) -> TractResult<()> {
    ensure!(
        w.len() == m * n && v.len() == m * n && p.len() == b * m && q.len() == b * n,
        "FedgeGemmSgd: sizes {} {} {} {} for m={m} n={n} b={b}",
        w.len(),
        v.len(),
        p.len(),
        q.len()
    );
    Ok(())
}

/// [`gemm_sgd`] with tract-linalg's kernel: the momentum added to each tile
/// of the product, then a pass for the weight.
fn gemm_sgd_tract(
    w: &mut Tensor,
    v: &mut Tensor,
    (p, q): (&[f32], &[f32]),
    (m, n, b): (usize, usize, usize),
    (alpha, mu, lr): (f32, f32, f32),
) -> TractResult<()> {
    check(w, v, (p, q), (m, n, b))?;
    ensure!(mu > 0.0, "FedgeGemmSgd needs a positive momentum");
    // The product is computed transposed, `v'^T = q^T p` (`[n, m]`): the
    // kernel's tile is a column of vectors along its `m` side, which is
    // then `v`'s contiguous axis, so the momentum it reads (a gather) and
    // stores for a tile lie in a few cache lines instead of one per row.
    let gemm = Gemm::tract(n, b, m)?;
    let mut a = gemm.a.new_packed_buffer(b, n)?;
    {
        let (d, pl) = panels_mut(&mut a);
        pack_strided(d, (pl, gemm.a.r), q, (n, b, 0), (1, n));
    }
    let mut bp = gemm.b.new_packed_buffer(b, m)?;
    {
        let (d, pl) = panels_mut(&mut bp);
        pack_strided(d, (pl, gemm.b.r), p, (m, b, 0), (1, m));
        let scale = alpha / mu;
        d.iter_mut().for_each(|x| *x *= scale);
    }
    let mu_t = tensor0(mu);
    let view = v.view();
    let mut scratch = gemm.scratch();
    gemm.run_fused(&mut scratch, (n, m), (&a, &bp), |mmm| {
        // SAFETY: `v` is `[m, n]`, contiguous, and outlives the run; read
        // as `[n, m]` (row stride 1, column stride `n`).
        let vs = unsafe { mmm.c_from_data_and_strides(4, 1, n as isize).wrap(&view) };
        tvec![
            FusedSpec::AddUnicast(vs),
            FusedSpec::BinScalar(&mu_t, BinOp::Mul),
            FusedSpec::Store(vs),
        ]
    })?;
    let mut wv = w.try_as_plain_ram_mut()?;
    for (w, &v) in wv.as_slice_mut::<f32>()?.iter_mut().zip(super::plain(v)?) {
        *w -= lr * v;
    }
    Ok(())
}

/// The `FedgeGemmSgd` op: inputs `(w, v, p, q, lr)`, outputs `(w', v')`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(super) struct GemmSgd {
    pub momentum_bits: u32,
    pub alpha_bits: u32,
}

impl Op for GemmSgd {
    fn name(&self) -> StaticName {
        super::GEMM_SGD.into()
    }

    op_as_typed_op!();
}

impl EvalOp for GemmSgd {
    op_out_of_plan!();

    /// Written over `w` and `v` when the step holds the only references
    /// (as `FedgeSgd`), else over copies.
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 5, "{}: wrong input count", super::GEMM_SGD);
        let [w, v, p, q, lr]: [TValue; 5] = inputs
            .into_iter()
            .collect::<Vec<_>>()
            .try_into()
            .expect("five inputs");
        let (ws, ps, qs) = (w.shape(), p.shape(), q.shape());
        ensure!(
            ws.len() == 2
                && v.shape() == ws
                && ps.len() == 2
                && qs.len() == 2
                && ps[0] == qs[0]
                && ps[1] == ws[0]
                && qs[1] == ws[1]
                && lr.len() == 1,
            "{}: shapes {ws:?} {:?} {ps:?} {qs:?}",
            super::GEMM_SGD,
            v.shape()
        );
        let (m, n, b) = (ws[0], ws[1], ps[0]);
        let lr = super::plain(&lr)?[0];
        let (mut w, mut v) = (w.into_tensor(), v.into_tensor());
        gemm_sgd(
            &mut w,
            &mut v,
            (super::plain(&p)?, super::plain(&q)?),
            (m, n, b),
            (
                f32::from_bits(self.alpha_bits),
                f32::from_bits(self.momentum_bits),
                lr,
            ),
        )?;
        Ok(tvec!(w.into_tvalue(), v.into_tvalue()))
    }
}

impl TypedOp for GemmSgd {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let f = TypedFact::dt_shape(f32::datum_type(), inputs[0].shape.clone());
        Ok(tvec!(f.clone(), f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 8.0)
            .collect()
    }

    type Update = fn(
        &mut Tensor,
        &mut Tensor,
        (&[f32], &[f32]),
        (usize, usize, usize),
        (f32, f32, f32),
    ) -> TractResult<()>;

    /// The dispatched update (the direct kernel where the CPU runs it) and
    /// tract-linalg's.
    #[test]
    fn gemm_sgd_matches_the_definition() {
        check_update(gemm_sgd);
        check_update(gemm_sgd_tract);
    }

    fn check_update(update: Update) {
        for (m, n, b) in [
            (1, 1, 1),
            (5, 3, 2),
            (9, 33, 1),
            (13, 70, 3),
            (17, 33, 7),
            (200, 784, 32),
            (10, 200, 64),
        ] {
            let (w0, v0) = (data(m * n, 1), data(m * n, 2));
            let (p, q) = (data(b * m, 3), data(b * n, 4));
            let (alpha, mu, lr) = (0.5f32, 0.9f32, 0.05f32);
            let mut w = Tensor::from_shape(&[m, n], &w0).unwrap();
            let mut v = Tensor::from_shape(&[m, n], &v0).unwrap();
            update(&mut w, &mut v, (&p, &q), (m, n, b), (alpha, mu, lr)).unwrap();
            let (w, v) = (
                super::super::plain(&w).unwrap(),
                super::super::plain(&v).unwrap(),
            );
            for i in 0..m {
                for j in 0..n {
                    let g: f32 = (0..b).map(|k| p[k * m + i] * q[k * n + j]).sum();
                    let v1 = mu * v0[i * n + j] + alpha * g;
                    let w1 = w0[i * n + j] - lr * v1;
                    let at = i * n + j;
                    assert!(
                        (v[at] - v1).abs() <= 1e-4 * (1.0 + v1.abs()),
                        "{m}x{n}x{b} v[{i},{j}]: {} vs {v1}",
                        v[at]
                    );
                    assert!(
                        (w[at] - w1).abs() <= 1e-4 * (1.0 + w1.abs()),
                        "{m}x{n}x{b} w[{i},{j}]: {} vs {w1}",
                        w[at]
                    );
                }
            }
        }
    }
}
