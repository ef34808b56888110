//! Strided copies: Transpose, Expand, Slice and Concat as one
//! `copy_strided` kernel each (Concat: one per input).

use tract_onnx::pb::NodeProto;

use super::layout::{broadcast_strides, groups_1d, padded, simplify, strides};
use super::{Kernel, Lowerer, RANK_MAX, unsupported_form, word_u32};
use crate::train::TrainError;
use crate::train::onnx::{attr_i, attr_ints};

impl Lowerer {
    /// `out[out_base + c . out_strides] = in[in_base + c . in_strides]` for
    /// every coordinate `c` of `dims`.
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        node: &NodeProto,
        input: usize,
        output: usize,
        dims_: &[usize],
        in_strides: Vec<usize>,
        out_strides: Vec<usize>,
        bases: (usize, usize),
    ) -> Result<(), TrainError> {
        let (d, st) = simplify(dims_, &[in_strides, out_strides]);
        if d.len() > RANK_MAX {
            return Err(unsupported_form(node, "more than 6 strided axes"));
        }
        let n: usize = dims_.iter().product();
        let mut p = vec![
            word_u32(node, "size", n)?,
            bases.0 as u32,
            bases.1 as u32,
            d.len() as u32,
        ];
        p.extend(padded(&d));
        p.extend(padded(&st[0]));
        p.extend(padded(&st[1]));
        self.launch(node, Kernel::Copy, p, vec![input], output, groups_1d(n));
        Ok(())
    }

    pub(super) fn transpose(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let perm: Vec<usize> = attr_ints(node, "perm")
            .map(|p| p.into_iter().map(|v| v as usize).collect())
            .unwrap_or_else(|| (0..xs.len()).rev().collect());
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out_shape = self.shape(&node.output[0])?;
        let xst = strides(&xs);
        let in_st: Vec<usize> = perm.iter().map(|&p| xst[p]).collect();
        let out = self.output(node, ty)?;
        self.copy(node, x, out, &out_shape, in_st, strides(&out_shape), (0, 0))
    }

    pub(super) fn expand(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out_shape = self.shape(&node.output[0])?;
        let out = self.output(node, ty)?;
        let in_st = broadcast_strides(&xs, &out_shape);
        self.copy(node, x, out, &out_shape, in_st, strides(&out_shape), (0, 0))
    }

    pub(super) fn slice(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let axes = crate::train::shape::slice_axes(node, &self.s, &xs)
            .map_err(|_| unsupported_form(node, "starts, ends, axes and steps must be constant"))?;
        let xst = strides(&xs);
        let mut in_st = xst.clone();
        let mut base = 0usize;
        for r in axes {
            if r.step < 0 {
                return Err(unsupported_form(node, "a backward step (negative)"));
            }
            base += r.start * xst[r.axis];
            in_st[r.axis] = xst[r.axis] * r.step as usize;
        }
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out_shape = self.shape(&node.output[0])?;
        let out = self.output(node, ty)?;
        if out_shape.contains(&0) {
            return Ok(());
        }
        self.copy(
            node,
            x,
            out,
            &out_shape,
            in_st,
            strides(&out_shape),
            (base, 0),
        )
    }

    pub(super) fn concat(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let out_shape = self.shape(&node.output[0])?;
        let r = out_shape.len() as i64;
        let a = attr_i(node, "axis").unwrap_or(0);
        let a = if a < 0 { a + r } else { a } as usize;
        let first = self.data(&node.input[0])?;
        let ty = self.ty(first);
        let out = self.output(node, ty)?;
        let ost = strides(&out_shape);
        let mut off = 0;
        for name in &node.input {
            let xs = self.shape(name)?;
            let x = self.data(name)?;
            if xs.iter().product::<usize>() > 0 {
                self.copy(
                    node,
                    x,
                    out,
                    &xs,
                    strides(&xs),
                    ost.clone(),
                    (0, off * ost[a]),
                )?;
            }
            off += xs[a];
        }
        Ok(())
    }

    /// Split: one strided copy per output.
    pub(super) fn split(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let sizes = crate::train::shape::split_sizes(node, &self.s, &xs)?;
        let r = xs.len() as i64;
        let a = attr_i(node, "axis").unwrap_or(0);
        let a = if a < 0 { a + r } else { a } as usize;
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let xst = strides(&xs);
        let mut off = 0;
        for (o, len) in node.output.iter().zip(sizes) {
            if !o.is_empty() {
                let out_shape = self.shape(o)?;
                let out = self.add(o, out_shape.iter().product(), ty, super::Role::Temp);
                if len > 0 {
                    self.copy(
                        node,
                        x,
                        out,
                        &out_shape,
                        xst.clone(),
                        strides(&out_shape),
                        (off * xst[a], 0),
                    )?;
                }
            }
            off += len;
        }
        Ok(())
    }
}
