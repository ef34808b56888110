//! Dense products' gradients: Gemm (with the tract lowering, the input
//! gradient is `FedgeLinear`, the weight read in place) and MatMul.

use super::*;

pub(super) fn gemm(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let alpha = attr_f(node, "alpha").unwrap_or(1.0);
    let beta = attr_f(node, "beta").unwrap_or(1.0);
    if attr_i(node, "transA").unwrap_or(0) != 0 {
        return Err(unsupported(node, "transA=1 has no gradient rule"));
    }
    let tb = attr_i(node, "transB").unwrap_or(0) != 0;
    let (a, w) = (node.input[0].as_str(), node.input[1].as_str());
    if needs[0] {
        // dA = alpha * G * B'^T
        out[0] = Some(if b.lowering == Lowering::Tract {
            // The weight read in place, not packed (FedgeLinear).
            let k = b.try_shape(a)?.get(1).copied().unwrap_or(0);
            let attrs = vec![
                onnx::int("trans_b", (!tb) as i64),
                onnx::float("alpha", alpha),
                onnx::int("n", k as i64),
            ];
            b.fedge_op(kernels::LINEAR, &[gy, w], attrs, 1)?.remove(0)
        } else {
            b.op(
                "Gemm",
                &[gy, w],
                vec![
                    onnx::float("alpha", alpha),
                    onnx::int("transB", (!tb) as i64),
                ],
            )?
        });
    }
    if needs[1] {
        out[1] = Some(if tb {
            // B is [N, K]: dB = alpha * G^T A
            b.op(
                "Gemm",
                &[gy, a],
                vec![onnx::float("alpha", alpha), onnx::int("transA", 1)],
            )?
        } else {
            b.op(
                "Gemm",
                &[a, gy],
                vec![onnx::float("alpha", alpha), onnx::int("transA", 1)],
            )?
        });
    }
    if needs.len() > 2 && needs[2] {
        let cs = b.shape(&node.input[2]);
        let g = b.scale(gy, beta)?;
        out[2] = Some(b.unbroadcast(&g, &cs)?);
    }
    Ok(())
}

pub(super) fn matmul(
    b: &mut Builder,
    node: &NodeProto,
    gy: &str,
    needs: &[bool],
    out: &mut [Option<String>],
) -> Result<(), TrainError> {
    let (a, w) = (node.input[0].as_str(), node.input[1].as_str());
    let (sa, sb) = (b.shape(a), b.shape(w));
    if needs[0] {
        let bt = b.transpose_last2(w)?;
        let g = b.binary("MatMul", gy, &bt)?;
        out[0] = Some(b.unbroadcast(&g, &sa)?);
    }
    if needs[1] {
        let g = if sb.len() == 2 && sa.len() > 2 {
            let k = sa[sa.len() - 1];
            let n = sb[1];
            let rows: usize = sa[..sa.len() - 1].iter().product();
            let a2 = b.reshape(a, &[rows, k])?;
            let g2 = b.reshape(gy, &[rows, n])?;
            let at = b.transpose(&a2, &[1, 0])?;
            b.binary("MatMul", &at, &g2)?
        } else {
            let at = b.transpose_last2(a)?;
            let g = b.binary("MatMul", &at, gy)?;
            b.unbroadcast(&g, &sb)?
        };
        out[1] = Some(g);
    }
    Ok(())
}
