//! fedge's own ops for tract: the pieces of a training step that ONNX has
//! no op for and tract would otherwise run as many small ops.
//!
//! The training compiler emits them as ONNX nodes of domain [`DOMAIN`]
//! when it lowers for tract ([`super::compile::Lowering::Tract`]);
//! [`onnx`] is tract-onnx with them registered. Each node carries its
//! output shape (`shape`) and, where it needs one, its window geometry
//! (`geometry`), so shape inference here and in tract is a lookup.
//!
//! - `FedgeIm2Col` (x `[N,C,H,W]`) -> `[C*kh*kw, N*Ho*Wo]`: the patches of
//!   a convolution's input, one column per output position, rows in the
//!   weight's `[C, kh, kw]` order. A conv weight gradient is then one
//!   matrix product, `dW = G x im2col(X)^T` with inner dimension `N*Ho*Wo`.
//! - `FedgeCol2Im` (cols `[C*kh*kw, N*Ho*Wo]`) -> `[N,C,H,W]`: the adjoint
//!   of `FedgeIm2Col` (overlapping patches add up). A conv input gradient is
//!   `col2im(W^T x G)`, again one matrix product.
//! - `FedgeMaxPool` (x) -> y: max pooling over non-overlapping windows
//!   (tract's general pooling is several times slower on these).
//! - `FedgeReluGrad` (x, gy) -> `gy` where `x > 0`, else 0, in one pass.
//! - `FedgeMaxPoolGrad` (x, gy) -> gx for non-overlapping windows: each
//!   window's gradient goes to the first position holding its maximum
//!   (PyTorch's convention), in one pass.
//! - `FedgeSgd` (w, v, g, lr) -> (w', v'): SGD with momentum `mu` and weight
//!   decay `wd` (`v' = mu v + g + wd w`, `w' = w - lr v'`) in one pass.
//!
//! **Invariant:** every op here has a portable equivalent in plain ONNX
//! ops (the `Lowering::Portable` rules in `grad` and `compile`), which the
//! GPU executor interprets; its lowering refuses these ops by name.
//! `tests/grad_check.rs` checks both lowerings against finite differences.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// The ONNX domain of fedge's ops.
pub const DOMAIN: &str = "ai.fedge";
pub const IM2COL: &str = "FedgeIm2Col";
pub const COL2IM: &str = "FedgeCol2Im";
pub const MAX_POOL: &str = "FedgeMaxPool";
pub const MAX_POOL_GRAD: &str = "FedgeMaxPoolGrad";
pub const RELU_GRAD: &str = "FedgeReluGrad";
pub const SGD: &str = "FedgeSgd";

/// Whether `op` is one of fedge's ops.
pub fn is_fedge_op(op: &str) -> bool {
    [IM2COL, COL2IM, MAX_POOL, MAX_POOL_GRAD, RELU_GRAD, SGD].contains(&op)
}

/// The shape of `node`'s outputs (a fedge op) given its first input's.
pub fn output_shape(node: &NodeProto, x: &[usize]) -> Result<Vec<usize>, String> {
    if node.op_type == SGD || node.op_type == RELU_GRAD {
        return Ok(x.to_vec());
    }
    let kind = match node.op_type.as_str() {
        IM2COL => Kind::Im2Col,
        COL2IM => Kind::Col2Im,
        MAX_POOL => Kind::MaxPool,
        MAX_POOL_GRAD => Kind::MaxPoolGrad,
        other => return Err(format!("`{other}` is not a fedge op")),
    };
    let geometry = super::onnx::attr_ints(node, "geometry")
        .and_then(|v| Geometry::from_ints(&v))
        .ok_or("missing or bad `geometry`")?;
    let op = WindowOp { kind, geometry };
    let want = &op.input_shapes()[0];
    if x != want.as_slice() {
        return Err(format!("input is {x:?}, the geometry expects {want:?}"));
    }
    Ok(op.output_shape())
}

/// tract-onnx with fedge's ops registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut o = tract_onnx::onnx();
    register(&mut o.op_register);
    o
}

fn register(reg: &mut OnnxOpRegister) {
    reg.insert(IM2COL, |_, n| parse(n, Kind::Im2Col));
    reg.insert(COL2IM, |_, n| parse(n, Kind::Col2Im));
    reg.insert(MAX_POOL, |_, n| parse(n, Kind::MaxPool));
    reg.insert(MAX_POOL_GRAD, |_, n| parse(n, Kind::MaxPoolGrad));
    reg.insert(RELU_GRAD, |_, _| {
        Ok((expand(Typed(TypedOpBox(Box::new(ReluGrad)))), vec![]))
    });
    reg.insert(SGD, parse_sgd);
}

/// The window of a 2-D convolution or pooling: image `[n, c, h, w]`,
/// kernel, strides, leading pads, output size.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geometry {
    pub fn to_ints(&self) -> Vec<i64> {
        [
            self.n, self.c, self.h, self.w, self.kh, self.kw, self.sh, self.sw, self.pt, self.pl,
            self.ho, self.wo,
        ]
        .iter()
        .map(|&v| v as i64)
        .collect()
    }

    pub fn from_ints(v: &[i64]) -> Option<Geometry> {
        if v.len() != 12 || v.iter().any(|&d| d < 0) {
            return None;
        }
        let u = |i: usize| v[i] as usize;
        let g = Geometry {
            n: u(0),
            c: u(1),
            h: u(2),
            w: u(3),
            kh: u(4),
            kw: u(5),
            sh: u(6),
            sw: u(7),
            pt: u(8),
            pl: u(9),
            ho: u(10),
            wo: u(11),
        };
        (g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0).then_some(g)
    }

    /// `[C*kh*kw, N*Ho*Wo]`
    pub fn cols_shape(&self) -> [usize; 2] {
        [self.c * self.kh * self.kw, self.n * self.ho * self.wo]
    }

    pub fn image_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// For kernel offset `i` and output row `o`, the input row, if inside.
    #[inline]
    fn src(o: usize, s: usize, i: usize, p: usize, len: usize) -> Option<usize> {
        (o * s + i).checked_sub(p).filter(|&r| r < len)
    }

    /// The range of output columns `wo` whose input column
    /// `wo * sw + j - pl` falls inside the image.
    fn valid_cols(&self, j: usize) -> std::ops::Range<usize> {
        let lo = self.pl.saturating_sub(j).div_ceil(self.sw);
        let hi = if self.w + self.pl > j {
            ((self.w + self.pl - j - 1) / self.sw + 1).min(self.wo)
        } else {
            0
        };
        lo.min(hi)..hi
    }

    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            sh,
            sw,
            pt,
            pl,
            ho,
            wo,
        } = *self;
        let p = n * ho * wo;
        for ci in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    let row = &mut cols[((ci * kh + i) * kw + j) * p..][..p];
                    let valid = self.valid_cols(j);
                    if valid.is_empty() {
                        row.fill(0.0);
                        continue;
                    }
                    let x0 = valid.start * sw + j - pl;
                    for b in 0..n {
                        let img = &x[(b * c + ci) * h * w..][..h * w];
                        for oy in 0..ho {
                            let out = &mut row[(b * ho + oy) * wo..][..wo];
                            let Some(y) = Self::src(oy, sh, i, pt, h) else {
                                out.fill(0.0);
                                continue;
                            };
                            let line = &img[y * w..][..w];
                            out[..valid.start].fill(0.0);
                            out[valid.end..].fill(0.0);
                            if sw == 1 {
                                out[valid.clone()].copy_from_slice(&line[x0..x0 + valid.len()]);
                            } else {
                                for (k, o) in out[valid.clone()].iter_mut().enumerate() {
                                    *o = line[x0 + k * sw];
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn col2im(&self, cols: &[f32], x: &mut [f32]) {
        let Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            sh,
            sw,
            pt,
            pl,
            ho,
            wo,
        } = *self;
        let p = n * ho * wo;
        x.fill(0.0);
        for ci in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    let row = &cols[((ci * kh + i) * kw + j) * p..][..p];
                    let valid = self.valid_cols(j);
                    if valid.is_empty() {
                        continue;
                    }
                    let x0 = valid.start * sw + j - pl;
                    for b in 0..n {
                        let img = &mut x[(b * c + ci) * h * w..][..h * w];
                        for oy in 0..ho {
                            let Some(y) = Self::src(oy, sh, i, pt, h) else {
                                continue;
                            };
                            let src = &row[(b * ho + oy) * wo..][..wo][valid.clone()];
                            let line = &mut img[y * w..][..w];
                            if sw == 1 {
                                for (d, s) in line[x0..x0 + src.len()].iter_mut().zip(src) {
                                    *d += s;
                                }
                            } else {
                                for (k, s) in src.iter().enumerate() {
                                    line[x0 + k * sw] += s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Index (within the plane) of the first maximum of window (oy, ox):
    /// non-overlapping windows (stride == kernel, no pads, `Ho*kh <= H`).
    /// Strictly greater replaces: the first maximum wins, and a window
    /// holding a NaN keeps its first position.
    #[inline]
    fn argmax(&self, xi: &[f32], oy: usize, ox: usize) -> usize {
        let (w, kh, kw) = (self.w, self.kh, self.kw);
        let mut best = oy * kh * w + ox * kw;
        let mut m = xi[best];
        for i in 0..kh {
            let row = (oy * kh + i) * w + ox * kw;
            for (j, &v) in xi[row..row + kw].iter().enumerate() {
                if v > m {
                    m = v;
                    best = row + j;
                }
            }
        }
        best
    }

    fn max_pool(&self, x: &[f32], y: &mut [f32]) {
        let Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            ho,
            wo,
            ..
        } = *self;
        for plane in 0..n * c {
            let xi = &x[plane * h * w..][..h * w];
            let yo = &mut y[plane * ho * wo..][..ho * wo];
            if kh == 2 && kw == 2 {
                // The common 2x2 case: two rows at a time, no branches.
                for oy in 0..ho {
                    let (r0, r1) = (&xi[2 * oy * w..][..w], &xi[(2 * oy + 1) * w..][..w]);
                    for (ox, o) in yo[oy * wo..][..wo].iter_mut().enumerate() {
                        let a = r0[2 * ox].max(r0[2 * ox + 1]);
                        let b = r1[2 * ox].max(r1[2 * ox + 1]);
                        *o = a.max(b);
                    }
                }
                continue;
            }
            for oy in 0..ho {
                for ox in 0..wo {
                    yo[oy * wo + ox] = xi[self.argmax(xi, oy, ox)];
                }
            }
        }
    }

    fn max_pool_grad(&self, x: &[f32], gy: &[f32], gx: &mut [f32]) {
        let Geometry {
            n, c, h, w, ho, wo, ..
        } = *self;
        gx.fill(0.0);
        for plane in 0..n * c {
            let xi = &x[plane * h * w..][..h * w];
            let gi = &gy[plane * ho * wo..][..ho * wo];
            let go = &mut gx[plane * h * w..][..h * w];
            for oy in 0..ho {
                for ox in 0..wo {
                    go[self.argmax(xi, oy, ox)] += gi[oy * wo + ox];
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Kind {
    Im2Col,
    Col2Im,
    MaxPool,
    MaxPoolGrad,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Im2Col => IM2COL,
            Kind::Col2Im => COL2IM,
            Kind::MaxPool => MAX_POOL,
            Kind::MaxPoolGrad => MAX_POOL_GRAD,
        }
    }

    fn inputs(self) -> usize {
        match self {
            Kind::Im2Col | Kind::Col2Im | Kind::MaxPool => 1,
            Kind::MaxPoolGrad => 2,
        }
    }
}

fn ints(node: &NodeProto, name: &str) -> TractResult<Vec<i64>> {
    super::onnx::attr_ints(node, name)
        .ok_or_else(|| format_err!("{} `{}` has no `{name}`", node.op_type, node.name))
}

fn parse(node: &NodeProto, kind: Kind) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let geometry = Geometry::from_ints(&ints(node, "geometry")?)
        .ok_or_else(|| format_err!("{} `{}`: bad geometry", node.op_type, node.name))?;
    let op = WindowOp { kind, geometry };
    Ok((expand(Typed(TypedOpBox(Box::new(op)))), vec![]))
}

fn parse_sgd(
    _: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let f = |name: &str| super::onnx::attr_f(node, name).unwrap_or(0.0);
    let op = Sgd {
        momentum_bits: f("momentum").to_bits(),
        weight_decay_bits: f("weight_decay").to_bits(),
    };
    Ok((expand(Typed(TypedOpBox(Box::new(op)))), vec![]))
}

/// Adapts one of the typed ops below to the inference model: shape rules
/// from its `output_facts`, wiring itself.
#[derive(Clone, Debug)]
struct Typed(TypedOpBox);

/// A boxed typed op, cloneable.
#[derive(Clone, Debug)]
struct TypedOpBox(Box<dyn TypedOp>);

impl Expansion for Typed {
    fn name(&self) -> StaticName {
        self.0.0.name()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.0.0.as_op().downcast_ref::<Sgd>().is_some() {
            2
        } else {
            1
        })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        if let Some(w) = self.0.0.as_op().downcast_ref::<WindowOp>() {
            check_input_arity(inputs, w.kind.inputs())?;
            check_output_arity(outputs, 1)?;
            let shape: TVec<TDim> = w.output_shape().iter().map(|&d| d.to_dim()).collect();
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(shape))?;
        } else if self.0.0.as_op().downcast_ref::<ReluGrad>().is_some() {
            check_input_arity(inputs, 2)?;
            check_output_arity(outputs, 1)?;
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
            s.equals(&outputs[0].shape, &inputs[0].shape)?;
            s.equals(&inputs[1].shape, &inputs[0].shape)?;
        } else {
            check_input_arity(inputs, 4)?;
            check_output_arity(outputs, 2)?;
            for o in outputs {
                s.equals(&o.datum_type, f32::datum_type())?;
                s.equals(&o.shape, &inputs[0].shape)?;
            }
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.0.clone(), inputs)
    }
}

/// `FedgeIm2Col`, `FedgeCol2Im`, `FedgeMaxPoolGrad`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct WindowOp {
    kind: Kind,
    geometry: Geometry,
}

impl WindowOp {
    fn output_shape(&self) -> Vec<usize> {
        match self.kind {
            Kind::Im2Col => self.geometry.cols_shape().to_vec(),
            Kind::MaxPool => {
                let g = &self.geometry;
                vec![g.n, g.c, g.ho, g.wo]
            }
            Kind::Col2Im | Kind::MaxPoolGrad => self.geometry.image_shape().to_vec(),
        }
    }

    fn input_shapes(&self) -> Vec<Vec<usize>> {
        let g = &self.geometry;
        match self.kind {
            Kind::Im2Col | Kind::MaxPool => vec![g.image_shape().to_vec()],
            Kind::Col2Im => vec![g.cols_shape().to_vec()],
            Kind::MaxPoolGrad => vec![g.image_shape().to_vec(), vec![g.n, g.c, g.ho, g.wo]],
        }
    }
}

impl Op for WindowOp {
    fn name(&self) -> StaticName {
        self.kind.name().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.geometry)])
    }

    op_as_typed_op!();
}

fn plain(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

impl EvalOp for WindowOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let expected = self.input_shapes();
        ensure!(
            inputs.len() == expected.len(),
            "{}: wrong input count",
            self.kind.name()
        );
        for (t, e) in inputs.iter().zip(&expected) {
            ensure!(
                t.shape() == e.as_slice() && t.datum_type() == f32::datum_type(),
                "{}: input is {:?} {:?}, expected f32 {e:?}",
                self.kind.name(),
                t.datum_type(),
                t.shape()
            );
        }
        // Every element is written (fill, copy or accumulate from zero).
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape())? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let o = view.as_slice_mut::<f32>()?;
            let g = &self.geometry;
            match self.kind {
                Kind::Im2Col => g.im2col(plain(&inputs[0])?, o),
                Kind::Col2Im => g.col2im(plain(&inputs[0])?, o),
                Kind::MaxPool => g.max_pool(plain(&inputs[0])?, o),
                Kind::MaxPoolGrad => g.max_pool_grad(plain(&inputs[0])?, plain(&inputs[1])?, o),
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for WindowOp {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(TypedFact::dt_shape(
            f32::datum_type(),
            self.output_shape()
        )))
    }
}

/// `FedgeReluGrad`: inputs (x, gy) -> gy where x > 0, else 0.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ReluGrad;

impl Op for ReluGrad {
    fn name(&self) -> StaticName {
        RELU_GRAD.into()
    }

    op_as_typed_op!();
}

impl EvalOp for ReluGrad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 2 && inputs[0].shape() == inputs[1].shape(),
            "{RELU_GRAD}: needs two inputs of one shape"
        );
        let (x, gy) = (plain(&inputs[0])?, plain(&inputs[1])?);
        let mut out = unsafe { Tensor::uninitialized::<f32>(inputs[0].shape())? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let o = view.as_slice_mut::<f32>()?;
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(gy) {
                *o = if x > 0.0 { g } else { 0.0 };
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ReluGrad {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(TypedFact::dt_shape(
            f32::datum_type(),
            inputs[0].shape.clone()
        )))
    }
}

/// `FedgeSgd`: inputs (w, v, g, lr) -> (w', v').
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Sgd {
    momentum_bits: u32,
    weight_decay_bits: u32,
}

impl Op for Sgd {
    fn name(&self) -> StaticName {
        SGD.into()
    }

    op_as_typed_op!();
}

impl EvalOp for Sgd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 4, "{SGD}: wrong input count");
        let [w, v, g, lr] = [&inputs[0], &inputs[1], &inputs[2], &inputs[3]];
        ensure!(
            w.shape() == v.shape() && w.shape() == g.shape() && lr.len() == 1,
            "{SGD}: shapes {:?} {:?} {:?} {:?}",
            w.shape(),
            v.shape(),
            g.shape(),
            lr.shape()
        );
        let (mu, wd) = (
            f32::from_bits(self.momentum_bits),
            f32::from_bits(self.weight_decay_bits),
        );
        let lr = plain(lr)?[0];
        let (w, v, g) = (plain(w)?, plain(v)?, plain(g)?);
        let mut new_w = unsafe { Tensor::uninitialized::<f32>(inputs[0].shape())? };
        let mut new_v = unsafe { Tensor::uninitialized::<f32>(inputs[0].shape())? };
        {
            let mut nw = new_w.try_as_plain_ram_mut()?;
            let mut nv = new_v.try_as_plain_ram_mut()?;
            let (nw, nv) = (nw.as_slice_mut::<f32>()?, nv.as_slice_mut::<f32>()?);
            for i in 0..w.len() {
                let d = mu * v[i] + (g[i] + wd * w[i]);
                nv[i] = d;
                nw[i] = w[i] - d * lr;
            }
        }
        Ok(tvec!(new_w.into_tvalue(), new_v.into_tvalue()))
    }
}

impl TypedOp for Sgd {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let f = TypedFact::dt_shape(f32::datum_type(), inputs[0].shape.clone());
        Ok(tvec!(f.clone(), f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive definition: cols[(c,i,j), (b,oy,ox)] = x[b,c,oy*sh+i-pt,ox*sw+j-pl].
    fn naive_im2col(g: &Geometry, x: &[f32]) -> Vec<f32> {
        let [rows, p] = g.cols_shape();
        let mut out = vec![0.0; rows * p];
        for c in 0..g.c {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    for b in 0..g.n {
                        for oy in 0..g.ho {
                            for ox in 0..g.wo {
                                let y = (oy * g.sh + i) as isize - g.pt as isize;
                                let xx = (ox * g.sw + j) as isize - g.pl as isize;
                                let v = if y >= 0
                                    && xx >= 0
                                    && (y as usize) < g.h
                                    && (xx as usize) < g.w
                                {
                                    x[((b * g.c + c) * g.h + y as usize) * g.w + xx as usize]
                                } else {
                                    0.0
                                };
                                out[((c * g.kh + i) * g.kw + j) * p
                                    + (b * g.ho + oy) * g.wo
                                    + ox] = v;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn geometries() -> Vec<Geometry> {
        let mut v = Vec::new();
        for (h, w, k, s, p) in [
            (5, 6, 3, 1, 1),
            (5, 6, 3, 2, 0),
            (7, 4, 2, 2, 1),
            (4, 4, 1, 1, 0),
            (6, 7, 5, 1, 2),
            (3, 3, 3, 3, 2),
            (8, 5, 3, 2, 2),
        ] {
            let ho = (h + 2 * p - k) / s + 1;
            let wo = (w + 2 * p - k) / s + 1;
            v.push(Geometry {
                n: 2,
                c: 3,
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
            });
        }
        v
    }

    #[test]
    fn im2col_matches_the_definition() {
        for g in geometries() {
            let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| i as f32 + 1.0).collect();
            let mut cols = vec![f32::NAN; g.cols_shape().iter().product()];
            g.im2col(&x, &mut cols);
            assert_eq!(cols, naive_im2col(&g, &x), "{g:?}");
        }
    }

    /// col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>.
    #[test]
    fn col2im_is_the_adjoint() {
        for g in geometries() {
            let nx = g.n * g.c * g.h * g.w;
            let nc: usize = g.cols_shape().iter().product();
            let x: Vec<f32> = (0..nx).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
            let c: Vec<f32> = (0..nc).map(|i| ((i * 5 % 13) as f32) - 6.0).collect();
            let mut cols = vec![0.0; nc];
            g.im2col(&x, &mut cols);
            let mut back = vec![f32::NAN; nx];
            g.col2im(&c, &mut back);
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert_eq!(lhs, rhs, "{g:?}");
        }
    }

    #[test]
    fn max_pool_grad_routes_to_the_first_maximum() {
        let g = Geometry {
            n: 1,
            c: 1,
            h: 2,
            w: 4,
            kh: 2,
            kw: 2,
            sh: 2,
            sw: 2,
            pt: 0,
            pl: 0,
            ho: 1,
            wo: 2,
        };
        let x = [1.0, 3.0, 5.0, 5.0, 3.0, 2.0, 5.0, 0.0];
        let mut gx = [f32::NAN; 8];
        g.max_pool_grad(&x, &[10.0, 20.0], &mut gx);
        assert_eq!(gx, [0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let mut y = [f32::NAN; 2];
        g.max_pool(&x, &mut y);
        assert_eq!(y, [3.0, 5.0]);
    }

    #[test]
    fn max_pool_matches_the_general_path() {
        for (kh, kw) in [(2, 2), (3, 2), (1, 3)] {
            let (ho, wo) = (3, 2);
            let g = Geometry {
                n: 2,
                c: 2,
                h: ho * kh + 1,
                w: wo * kw,
                kh,
                kw,
                sh: kh,
                sw: kw,
                pt: 0,
                pl: 0,
                ho,
                wo,
            };
            let x: Vec<f32> = (0..g.n * g.c * g.h * g.w)
                .map(|i| ((i * 37 % 23) as f32) - 11.0)
                .collect();
            let mut y = vec![f32::NAN; g.n * g.c * ho * wo];
            g.max_pool(&x, &mut y);
            for plane in 0..g.n * g.c {
                let xi = &x[plane * g.h * g.w..][..g.h * g.w];
                for oy in 0..ho {
                    for ox in 0..wo {
                        assert_eq!(y[(plane * ho + oy) * wo + ox], xi[g.argmax(xi, oy, ox)]);
                    }
                }
            }
        }
    }
}
