//! Gemm and MatMul on the tiled matrix-multiply kernels (gemm.wgsl), and
//! the launch that convolutions share.

use tract_onnx::pb::NodeProto;

use super::layout::broadcast_strides;
use super::{Kernel, Lowerer, Ty, unsupported_form, word_u32};
use crate::train::TrainError;
use crate::train::onnx::{attr_f, attr_i};

impl Lowerer {
    pub(super) fn matmul_launch(
        &mut self,
        node: &NodeProto,
        (m, n, k, batch): (usize, usize, usize, usize),
        params: Vec<u32>,
        inputs: Vec<usize>,
        conv: bool,
    ) -> Result<(), TrainError> {
        let big = m >= 64 && n >= 64;
        let tile = if big { 64 } else { 16 };
        let groups = [n.div_ceil(tile), m.div_ceil(tile), batch];
        if groups.iter().any(|&g| g > 65_535) || k > u32::MAX as usize {
            return Err(unsupported_form(node, "product too large for one dispatch"));
        }
        let kernel = match (conv, big) {
            (false, false) => Kernel::GemmSmall,
            (false, true) => Kernel::GemmBig,
            (true, false) => Kernel::ConvSmall,
            (true, true) => Kernel::ConvBig,
        };
        let out = self.output(node, Ty::F32)?;
        self.launch(
            node,
            kernel,
            params,
            inputs,
            out,
            [groups[0] as u32, groups[1] as u32, groups[2] as u32],
        );
        Ok(())
    }

    pub(super) fn gemm(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let (a, b) = (self.shape(&node.input[0])?, self.shape(&node.input[1])?);
        let ta = attr_i(node, "transA").unwrap_or(0) != 0;
        let tb = attr_i(node, "transB").unwrap_or(0) != 0;
        let alpha = attr_f(node, "alpha").unwrap_or(1.0);
        let beta = attr_f(node, "beta").unwrap_or(1.0);
        let (m, k) = if ta { (a[1], a[0]) } else { (a[0], a[1]) };
        let n = if tb { b[0] } else { b[1] };
        let (a_sm, a_sk) = if ta { (1, a[1]) } else { (a[1], 1) };
        let (b_sk, b_sn) = if tb { (1, b[1]) } else { (b[1], 1) };
        let mut inputs = vec![self.data(&node.input[0])?, self.data(&node.input[1])?];
        let has_c = node.input.len() > 2 && !node.input[2].is_empty();
        let (c_sm, c_sn) = if has_c {
            let cs = self.shape(&node.input[2])?;
            if cs.len() > 2 {
                return Err(unsupported_form(node, "C of rank > 2"));
            }
            inputs.push(self.data(&node.input[2])?);
            let st = broadcast_strides(&cs, &[m, n]);
            (st[0], st[1])
        } else {
            (0, 0)
        };
        let p = [
            m,
            n,
            k,
            0,
            a_sm,
            a_sk,
            0,
            b_sk,
            b_sn,
            has_c as usize,
            c_sm,
            c_sn,
        ]
        .iter()
        .map(|&v| word_u32(node, "dimension", v))
        .chain([Ok(alpha.to_bits()), Ok(beta.to_bits())])
        .collect::<Result<Vec<_>, _>>()?;
        self.matmul_launch(node, (m, n, k, 1), p, inputs, false)
    }

    pub(super) fn matmul(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let (a, b) = (self.shape(&node.input[0])?, self.shape(&node.input[1])?);
        let out_shape = self.shape(&node.output[0])?;
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let n = b[b.len() - 1];
        let batch: usize = out_shape[..out_shape.len() - 2].iter().product();
        let ba: usize = a[..a.len() - 2].iter().product();
        let bb: usize = b[..b.len() - 2].iter().product();
        let side = |bx: usize, rank: usize, per: usize| -> Option<usize> {
            if bx == 1 {
                Some(0)
            } else if bx == batch && rank == out_shape.len() {
                Some(per)
            } else {
                None
            }
        };
        let (Some(a_sb), Some(b_sb)) = (side(ba, a.len(), m * k), side(bb, b.len(), k * n)) else {
            return Err(unsupported_form(
                node,
                "batch broadcasting other than equal batches or a shared operand",
            ));
        };
        let inputs = vec![self.data(&node.input[0])?, self.data(&node.input[1])?];
        let p = [m, n, k, a_sb, k, 1, b_sb, n, 1, 0, 0, 0]
            .iter()
            .map(|&v| word_u32(node, "dimension", v))
            .chain([Ok(1f32.to_bits()), Ok(0f32.to_bits())])
            .collect::<Result<Vec<_>, _>>()?;
        self.matmul_launch(node, (m, n, k, batch), p, inputs, false)
    }
}
