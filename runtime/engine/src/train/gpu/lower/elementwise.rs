//! Kernels of elementwise.wgsl that compute (copies are in `copy`):
//! element-wise ops with broadcasting, Gather and pooling.

use tract_onnx::pb::NodeProto;

use super::layout::{broadcast_strides, groups_1d, padded, simplify, strides};
use super::{Kernel, Lowerer, RANK_MAX, Ty, unsupported_form, word_u32};
use crate::train::TrainError;
use crate::train::onnx::{attr_f, attr_i, attr_ints};
use crate::train::shape::{Window, spatial_attrs};

/// Element-wise op codes (`eltwise` in elementwise.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum EwOp {
    Copy = 0,
    Relu = 1,
    LeakyRelu = 2,
    Sigmoid = 3,
    Tanh = 4,
    Exp = 5,
    Log = 6,
    Neg = 7,
    Sqrt = 8,
    Reciprocal = 9,
    Abs = 10,
    Erf = 11,
    Gelu = 12,
    GeluTanh = 13,
    /// `clamp(alpha x + beta, 0, 1)`.
    HardSigmoid = 14,
    HardSwish = 15,
    /// `min(max(x, alpha), beta)`: Clip with constant bounds.
    Clamp = 16,
    Add = 20,
    Sub = 21,
    Mul = 22,
    Div = 23,
    Pow = 24,
    /// `a` where `a > 0`, else `a b`.
    PRelu = 28,
    Equal = 25,
    Greater = 26,
    Less = 27,
    Where = 30,
}

impl EwOp {
    pub(super) fn from_onnx(op: &str) -> Option<EwOp> {
        Some(match op {
            "Relu" => EwOp::Relu,
            "LeakyRelu" => EwOp::LeakyRelu,
            "Sigmoid" => EwOp::Sigmoid,
            "Tanh" => EwOp::Tanh,
            "Exp" => EwOp::Exp,
            "Log" => EwOp::Log,
            "Neg" => EwOp::Neg,
            "Sqrt" => EwOp::Sqrt,
            "Reciprocal" => EwOp::Reciprocal,
            "Abs" => EwOp::Abs,
            "Erf" => EwOp::Erf,
            "HardSwish" => EwOp::HardSwish,
            "Pow" => EwOp::Pow,
            "PRelu" => EwOp::PRelu,
            "Add" => EwOp::Add,
            "Sub" => EwOp::Sub,
            "Mul" => EwOp::Mul,
            "Div" => EwOp::Div,
            "Equal" => EwOp::Equal,
            "Greater" => EwOp::Greater,
            "Less" => EwOp::Less,
            "Where" => EwOp::Where,
            _ => return None,
        })
    }

    fn arity(self) -> usize {
        match self as u32 {
            0..20 => 1,
            20..30 => 2,
            _ => 3,
        }
    }
}

impl Lowerer {
    pub(super) fn eltwise(
        &mut self,
        node: &NodeProto,
        op: EwOp,
        out_ty: Ty,
    ) -> Result<(), TrainError> {
        let alpha = if op == EwOp::LeakyRelu {
            attr_f(node, "alpha").unwrap_or(0.01)
        } else {
            0.0
        };
        self.eltwise_with(node, op, out_ty, (alpha, 0.0))
    }

    /// [`Lowerer::eltwise`] with the op's two float parameters (LeakyRelu's
    /// slope, HardSigmoid's alpha and beta, Clip's bounds).
    pub(super) fn eltwise_with(
        &mut self,
        node: &NodeProto,
        op: EwOp,
        out_ty: Ty,
        (alpha, beta): (f32, f32),
    ) -> Result<(), TrainError> {
        let n_in = op.arity();
        if node.input.len() < n_in {
            return Err(unsupported_form(node, "missing inputs"));
        }
        let out_shape = self.shape(&node.output[0])?;
        let mut ids = Vec::with_capacity(n_in);
        let mut operands = vec![strides(&out_shape)];
        for name in &node.input[..n_in] {
            ids.push(self.data(name)?);
            operands.push(broadcast_strides(&self.shape(name)?, &out_shape));
        }
        let (d, st) = simplify(&out_shape, &operands);
        if d.len() > RANK_MAX {
            return Err(unsupported_form(node, "more than 6 broadcast axes"));
        }
        let n: usize = out_shape.iter().product();
        let mut p = vec![word_u32(node, "size", n)?, op as u32, d.len() as u32];
        for k in 0..3 {
            p.push(ids.get(k).map(|&i| self.ty(i) as u32).unwrap_or(0));
        }
        p.push(out_ty as u32);
        p.push(alpha.to_bits());
        p.extend(padded(&d));
        for k in 0..3 {
            match st.get(k + 1) {
                Some(s) => p.extend(padded(s)),
                None => p.extend([0; RANK_MAX]),
            }
        }
        p.push(beta.to_bits());
        let out = self.output(node, out_ty)?;
        self.launch(node, Kernel::Eltwise, p, ids, out, groups_1d(n));
        Ok(())
    }

    pub(super) fn pool(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        let ys = self.shape(&node.output[0])?;
        let kernel: Vec<usize> = attr_ints(node, "kernel_shape")
            .unwrap_or_default()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        let Window {
            kernel: kk,
            strides: st,
            pads,
            dilations: dil,
        } = spatial_attrs(node, kernel)?;
        let avg = node.op_type == "AveragePool";
        let include_pad = attr_i(node, "count_include_pad").unwrap_or(0) != 0;
        let n: usize = ys.iter().product();
        let p = [
            n,
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
            avg as usize,
            include_pad as usize,
        ]
        .iter()
        .map(|&v| word_u32(node, "dimension", v))
        .collect::<Result<Vec<_>, _>>()?;
        let x = self.data(&node.input[0])?;
        let out = self.output(node, Ty::F32)?;
        self.launch(node, Kernel::Pool, p, vec![x], out, groups_1d(n));
        Ok(())
    }

    pub(super) fn gather(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let ds = self.shape(&node.input[0])?;
        let is = self.shape(&node.input[1])?;
        let a = Self::norm_axis(node, attr_i(node, "axis").unwrap_or(0), ds.len())?;
        let inner: usize = ds[a + 1..].iter().product();
        let count: usize = is.iter().product();
        let n: usize = self.shape(&node.output[0])?.iter().product();
        let data = self.data(&node.input[0])?;
        let idx = self.data(&node.input[1])?;
        if self.ty(idx) != Ty::I32 {
            return Err(unsupported_form(node, "indices must be integers"));
        }
        let ty = self.ty(data);
        let p = vec![
            word_u32(node, "size", n)?,
            inner as u32,
            ds[a] as u32,
            count as u32,
        ];
        let out = self.output(node, ty)?;
        self.launch(node, Kernel::Gather, p, vec![data, idx], out, groups_1d(n));
        Ok(())
    }

    /// Trilu: the kept triangle of each trailing matrix, zeros elsewhere.
    pub(super) fn trilu(&mut self, node: &NodeProto) -> Result<(), TrainError> {
        let xs = self.shape(&node.input[0])?;
        if xs.len() < 2 {
            return Err(unsupported_form(node, "input of rank below 2"));
        }
        let k = match node.input.get(1).filter(|s| !s.is_empty()) {
            Some(_) => *self
                .konst(node, 1)?
                .first()
                .ok_or_else(|| unsupported_form(node, "empty k"))?,
            None => 0,
        };
        let k = i32::try_from(k).map_err(|_| unsupported_form(node, "k exceeds 32 bits"))?;
        let upper = attr_i(node, "upper").unwrap_or(1) != 0;
        let n: usize = xs.iter().product();
        let (rows, cols) = (xs[xs.len() - 2], xs[xs.len() - 1]);
        let p = vec![
            word_u32(node, "size", n)?,
            word_u32(node, "rows", rows)?,
            word_u32(node, "columns", cols)?,
            k as u32,
            upper as u32,
        ];
        let x = self.data(&node.input[0])?;
        let ty = self.ty(x);
        let out = self.output(node, ty)?;
        self.launch(node, Kernel::Trilu, p, vec![x], out, groups_1d(n));
        Ok(())
    }
}
