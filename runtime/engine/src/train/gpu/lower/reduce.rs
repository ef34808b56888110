//! Kernels of reduce.wgsl: sums and means over axes, Softmax and
//! LogSoftmax, LayerNormalization and CumSum.

use tract_onnx::pb::NodeProto;

use super::layout::{groups_1d, linear_groups, padded, simplify, strides};
use super::{GROUP_REDUCE_MIN, Kernel, Lowerer, RANK_MAX, Ty, unsupported_form, word_u32};
use crate::train::TrainError;
use crate::train::onnx::{attr_f, attr_i};

impl Lowerer {
    pub(super) fn reduce(
        &mut self,
        node: &NodeProto,
        axes: &[usize],
        mean: bool,
    ) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let xst = strides(&xs);
        let kept: Vec<usize> = (0..xs.len()).filter(|i| !axes.contains(i)).collect();
        let (kd, ks) = simplify(
            &kept.iter().map(|&i| xs[i]).collect::<Vec<_>>(),
            &[kept.iter().map(|&i| xst[i]).collect()],
        );
        let (rd, rs) = simplify(
            &axes.iter().map(|&i| xs[i]).collect::<Vec<_>>(),
            &[axes.iter().map(|&i| xst[i]).collect()],
        );
        if kd.len() > RANK_MAX || rd.len() > RANK_MAX {
            return Err(unsupported_form(node, "more than 6 reduced or kept axes"));
        }
        let n_out: usize = kd.iter().product();
        let r: usize = rd.iter().product();
        let mut p = vec![
            word_u32(node, "size", n_out)?,
            word_u32(node, "size", r)?,
            mean as u32,
            kd.len() as u32,
            rd.len() as u32,
        ];
        p.extend(padded(&kd));
        p.extend(padded(&ks[0]));
        p.extend(padded(&rd));
        p.extend(padded(&rs[0]));
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        if ty != Ty::F32 {
            return Err(unsupported_form(node, "reductions of non-float tensors"));
        }
        let out = self.output(node, Ty::F32)?;
        let (kernel, groups) = if r >= GROUP_REDUCE_MIN {
            (Kernel::ReduceGroup, linear_groups(n_out))
        } else {
            (Kernel::ReduceThread, groups_1d(n_out))
        };
        self.launch(node, kernel, p, vec![x], out, groups);
        Ok(())
    }

    /// (rows, length, inner) of an axis of `shape`.
    pub(super) fn along(shape: &[usize], axis: usize) -> (usize, usize, usize) {
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        (outer * inner, shape[axis], inner)
    }

    pub(super) fn norm_axis(node: &NodeProto, a: i64, rank: usize) -> Result<usize, TrainError> {
        let r = rank as i64;
        if a < -r || a >= r {
            return Err(unsupported_form(node, format!("axis {a} out of range")));
        }
        Ok(if a < 0 { a + r } else { a } as usize)
    }

    pub(super) fn softmax(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let a = Self::norm_axis(node, attr_i(node, "axis").unwrap_or(-1), xs.len())?;
        let (rows, len, inner) = Self::along(&xs, a);
        let p = vec![
            word_u32(node, "size", rows)?,
            len as u32,
            inner as u32,
            (node.op_type == "LogSoftmax") as u32,
        ];
        let x = self.data(&node.input[0])?;
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::Softmax, p, vec![x], out, groups_1d(rows));
        Ok(())
    }

    pub(super) fn layer_norm(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let a = Self::norm_axis(node, attr_i(node, "axis").unwrap_or(-1), xs.len())?;
        if a != xs.len() - 1 {
            return Err(unsupported_form(
                node,
                "normalisation over the last axis only",
            ));
        }
        let len = xs[a];
        let rows: usize = xs[..a].iter().product();
        let mut inputs = vec![self.data(&node.input[0])?];
        let has_b = node.input.len() > 2 && !node.input[2].is_empty();
        for i in 1..node.input.len().min(3) {
            if node.input[i].is_empty() {
                continue;
            }
            if self.shape(&node.input[i])?.iter().product::<usize>() != len {
                return Err(unsupported_form(
                    node,
                    "scale and bias must have the normalised axis' length",
                ));
            }
            inputs.push(self.data(&node.input[i])?);
        }
        let eps = attr_f(node, "epsilon").unwrap_or(1e-5);
        let p = vec![
            word_u32(node, "size", rows)?,
            len as u32,
            eps.to_bits(),
            has_b as u32,
        ];
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::LayerNorm, p, inputs, out, groups_1d(rows));
        Ok(())
    }

    pub(super) fn cumsum(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let axis = self.konst(node, 1)?;
        let [axis] = axis[..] else {
            return Err(unsupported_form(node, "axis must hold one value"));
        };
        let a = Self::norm_axis(node, axis, xs.len())?;
        let (lines, len, inner) = Self::along(&xs, a);
        let p = vec![
            word_u32(node, "size", lines)?,
            len as u32,
            inner as u32,
            (attr_i(node, "exclusive").unwrap_or(0) != 0) as u32,
            (attr_i(node, "reverse").unwrap_or(0) != 0) as u32,
        ];
        let x = self.data(&node.input[0])?;
        if self.ty(x) != Ty::F32 {
            return Err(unsupported_form(node, "CumSum of non-float tensors"));
        }
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::CumSum, p, vec![x], out, groups_1d(lines));
        Ok(())
    }
}
