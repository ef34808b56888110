//! `FedgeLinear`: a dense layer's product with its weight read where it
//! lies, `Y = alpha A op(W) (+ bias per column)`.
//!
//! Inputs `(a [m, k], w, optional bias [n] or [1, n])`, output `[m, n]`;
//! attributes `trans_b` (`op(W) = W^T`, `w` `[n, k]`: PyTorch's Linear in
//! the forward; else `w` `[k, n]`: its input gradient), `alpha` and `n`.
//!
//! tract's MatMul packs both operands into its kernel's panels before
//! every product. For a dense layer the weight is the large one (fc1 of
//! the bench's CNN is 3136 x 512, 6.4 MB) and a step packs it twice, in
//! the forward and in the input gradient: 1.3 and 2.5 ms a step at batch
//! 64, a quarter of the layer's time. On x86_64 with AVX-512F the 32x12
//! kernel of [`super::conv::avx512`] reads the weight in place (twelve
//! rows side by side, or twelve contiguous columns per record) and packs
//! only the activations, which are small; the product's rows are the
//! batch, so its row-major output is `Y` itself. Elsewhere, and for thin
//! products, tract-linalg's kernel with both operands packed.

use tract_onnx::tract_hir::internal::*;

use super::conv::{Gemm, Then, pack_strided, panels_mut};

/// `alpha a op(w) + bias` (see the module docs) as a new `[m, n]` tensor.
pub(super) fn linear(
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    trans_b: bool,
    alpha: f32,
) -> TractResult<Tensor> {
    ensure!(
        a.len() == m * k && w.len() == k * n && bias.is_none_or(|b| b.len() == n),
        "{}: {} and {} values (bias {:?}) for m={m} k={k} n={n}",
        super::LINEAR,
        a.len(),
        w.len(),
        bias.map(<[f32]>::len)
    );
    // Element (kk, j) of op(W) is w[kk * rs + j * cs].
    let (rs, cs) = if trans_b { (1, k) } else { (n, 1) };
    let mut y = unsafe { Tensor::uninitialized::<f32>(&[m, n])? };
    if m == 0 || n == 0 || k == 0 {
        let mut view = y.try_as_plain_ram_mut()?;
        for row in view.as_slice_mut::<f32>()?.chunks_exact_mut(n.max(1)) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return Ok(y);
    }
    #[cfg(target_arch = "x86_64")]
    if super::conv::avx512::suits(m, k, n) {
        use super::conv::avx512::{self, Epilogue, MR, Right};
        let panel = k * MR;
        let mut packed = vec![0.0f32; m.div_ceil(MR) * panel];
        pack_strided(&mut packed, (panel, MR), a, (m, k, 0), (k, 1));
        if alpha != 1.0 {
            packed.iter_mut().for_each(|v| *v *= alpha);
        }
        let then = bias.map_or(Epilogue::Store, Epilogue::AddPerCol);
        let mut view = y.try_as_plain_ram_mut()?;
        let out = view.as_slice_mut::<f32>()?;
        avx512::run(
            k,
            (m, n),
            (&packed, panel),
            Right::Strided { b: w, rs, cs },
            out,
            then,
        )?;
        return Ok(y);
    }
    let gemm = Gemm::tract(m, k, n)?;
    let mut pa = gemm.a.new_packed_buffer(k, m)?;
    {
        let (d, pl) = panels_mut(&mut pa);
        pack_strided(d, (pl, gemm.a.r), a, (m, k, 0), (k, 1));
        if alpha != 1.0 {
            d.iter_mut().for_each(|v| *v *= alpha);
        }
    }
    let mut pb = gemm.b.new_packed_buffer(k, n)?;
    {
        let (d, pl) = panels_mut(&mut pb);
        pack_strided(d, (pl, gemm.b.r), w, (n, k, 0), (cs, rs));
    }
    let mut scratch = gemm.scratch();
    gemm.run(
        &mut scratch,
        (m, n),
        (&pa, &pb),
        &mut y.view_mut(),
        Then::Store,
    )?;
    if let Some(bias) = bias {
        let mut view = y.try_as_plain_ram_mut()?;
        for row in view.as_slice_mut::<f32>()?.chunks_exact_mut(n) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
    Ok(y)
}

/// The `FedgeLinear` op (see the module docs).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(super) struct Linear {
    pub trans_b: bool,
    pub alpha_bits: u32,
    /// The output's columns (for shape inference from the first input).
    pub n: usize,
}

impl Linear {
    /// `(m, k)` of `a`, checked against `w` and the bias.
    fn dims(
        &self,
        a: &[usize],
        w: &[usize],
        bias: Option<&[usize]>,
    ) -> TractResult<(usize, usize)> {
        let n = self.n;
        let k = a.get(1).copied().unwrap_or(0);
        let want_w = if self.trans_b { [n, k] } else { [k, n] };
        let bias_ok = bias.is_none_or(|b| b == [n] || b == [1, n]);
        ensure!(
            a.len() == 2 && w == want_w && bias_ok,
            "{}: shapes {a:?} {w:?} {bias:?} for n={n}, trans_b={}",
            super::LINEAR,
            self.trans_b
        );
        Ok((a[0], k))
    }
}

impl Op for Linear {
    fn name(&self) -> StaticName {
        super::LINEAR.into()
    }

    op_as_typed_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 2 || inputs.len() == 3,
            "{}: {} inputs, expected 2 or 3",
            super::LINEAR,
            inputs.len()
        );
        let bias = inputs.get(2);
        let (m, k) = self.dims(
            inputs[0].shape(),
            inputs[1].shape(),
            bias.map(|b| b.shape()),
        )?;
        let bias = bias.map(|b| super::plain(b)).transpose()?;
        let y = linear(
            super::plain(&inputs[0])?,
            super::plain(&inputs[1])?,
            bias,
            (m, k, self.n),
            self.trans_b,
            f32::from_bits(self.alpha_bits),
        )?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Linear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() >= 2, "{}: too few inputs", super::LINEAR);
        let m = inputs[0]
            .shape
            .first()
            .cloned()
            .unwrap_or_else(|| 0.to_dim());
        let shape: TVec<TDim> = tvec![m, self.n.to_dim()];
        Ok(tvec!(TypedFact::dt_shape(f32::datum_type(), shape)))
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

    /// Both layouts of the weight, with and without a bias and alpha, on
    /// shapes that take the AVX-512 kernel (where there is one: a partial
    /// last panel, two `k` blocks) and shapes that do not (thin ones).
    #[test]
    fn linear_matches_the_definition() {
        for (m, k, n) in [
            (64, 200, 200),
            (32, 1100, 25),
            (20, 37, 12),
            (64, 200, 10),
            (5, 30, 40),
            (64, 7, 20),
            (3, 1, 1),
        ] {
            let a = data(m * k, 1);
            let w = data(k * n, 2);
            let bias = data(n, 3);
            for trans_b in [false, true] {
                let wv = |kk: usize, j: usize| {
                    if trans_b {
                        w[j * k + kk]
                    } else {
                        w[kk * n + j]
                    }
                };
                for (alpha, bias) in [(1.0, None), (0.5, Some(&bias[..]))] {
                    let y = linear(&a, &w, bias, (m, k, n), trans_b, alpha).unwrap();
                    let got = y.try_as_plain_ram().unwrap();
                    let got = got.as_slice::<f32>().unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let s: f64 = (0..k).map(|kk| (a[i * k + kk] * wv(kk, j)) as f64).sum();
                            let want = alpha as f64 * s + bias.map_or(0.0, |b| b[j] as f64);
                            let g = got[i * n + j] as f64;
                            assert!(
                                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{m}x{k}x{n} trans_b {trans_b} [{i}, {j}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        let (a, w) = (data(6, 1), data(6, 2));
        assert!(linear(&a, &w, None, (2, 3, 2), true, 1.0).is_ok());
        assert!(linear(&a, &w[..5], None, (2, 3, 2), true, 1.0).is_err());
        assert!(linear(&a, &w, Some(&[0.0]), (2, 3, 2), true, 1.0).is_err());
        let op = Linear {
            trans_b: true,
            alpha_bits: 1f32.to_bits(),
            n: 2,
        };
        assert!(op.dims(&[2, 3], &[2, 3], Some(&[1, 2])).is_ok());
        assert!(op.dims(&[2, 3], &[3, 2], None).is_err());
        assert!(op.dims(&[2, 3], &[2, 3], Some(&[2, 2])).is_err());
        assert!(op.dims(&[6], &[2, 3], None).is_err());
    }
}
