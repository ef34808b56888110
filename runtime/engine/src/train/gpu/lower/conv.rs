//! Conv and ConvTranspose as an implicit matrix multiply (conv.wgsl).

use tract_onnx::pb::NodeProto;

use super::{Lowerer, unsupported_form, word_u32};
use crate::train::TrainError;
use crate::train::onnx::attr_i;
use crate::train::shape::{Window, spatial_attrs};

impl Lowerer {
    pub(super) fn conv(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let transpose = node.op_type == "ConvTranspose";
        let (xs, ws) = (self.shape(&node.input[0])?, self.shape(&node.input[1])?);
        let ys = self.shape(&node.output[0])?;
        let Window {
            kernel: kk,
            strides: st,
            pads,
            dilations: dil,
        } = spatial_attrs(node, ws[2..].to_vec())?;
        let groups = attr_i(node, "group").unwrap_or(1).max(1) as usize;
        if transpose && groups != 1 {
            return Err(unsupported_form(node, "grouped ConvTranspose"));
        }
        // A grouped Conv: one product per group (the launch's batch).
        let cout = ys[1];
        let m = cout / groups;
        let n = ys[0] * ys[2] * ys[3];
        let k = xs[1] / groups * kk[0] * kk[1];
        let mut inputs = vec![self.data(&node.input[0])?, self.data(&node.input[1])?];
        let has_b = node.input.len() > 2 && !node.input[2].is_empty();
        if has_b {
            inputs.push(self.data(&node.input[2])?);
        }
        let p = [
            m,
            n,
            k,
            transpose as usize,
            xs[0],
            xs[1],
            xs[2],
            xs[3],
            ys[2],
            ys[3],
            kk[0],
            kk[1],
            st[0],
            st[1],
            pads[0],
            pads[1],
            dil[0],
            dil[1],
            has_b as usize,
            groups,
        ]
        .iter()
        .map(|&v| word_u32(node, "dimension", v))
        .collect::<Result<Vec<_>, _>>()?;
        self.matmul_launch(node, (m, n, k, groups), p, inputs, true)
    }
}
