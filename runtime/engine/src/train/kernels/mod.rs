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
//! - `FedgeConv` (x `[N,C,H,W]`, w `[Co,C,kh,kw]`, optional bias `[Co]`)
//!   -> `[N,Co,Ho,Wo]`: an ungrouped convolution without dilation, per
//!   image one product of tract-linalg's kernel with the patches packed
//!   straight from the image ([`conv`]).
//! - `FedgeConvGradW` (x, gy) -> dW `[Co,C,kh,kw]`: its weight gradient,
//!   `G x im2col(X)^T` per chunk of `images` images, accumulated.
//! - `FedgeConvGradX` (gy, w) -> dX `[N,C,H,W]`: its input gradient; with
//!   stride 1 the forward product on `G` by the turned weight, else
//!   `col2im(W^T x G)` per image.
//! - `FedgeReluGrad` (x, gy) -> `gy` where `x > 0`, else 0, in one pass,
//!   over `gy` itself when the step holds the only reference to it. The
//!   compiler passes the Relu's output as `x` (positive where its input
//!   is).
//! - `FedgeMaxPoolGrad` (x, gy) -> gx for non-overlapping windows: each
//!   window's gradient goes to the first position holding its maximum
//!   (PyTorch's convention), in one pass. With attribute `positive` = 1,
//!   only where that maximum is above zero: the compiler folds the
//!   gradient of a Relu whose output `x` is into it (no `FedgeReluGrad`
//!   pass).
//! - `FedgeSgd` (w, v, g, lr) -> (w', v'): SGD with momentum `mu` and weight
//!   decay `wd` (`v' = mu v + g + wd w`, `w' = w - lr v'`) in one pass.
//! - `FedgeGemmSgd` (w, v, p, q, lr) -> (w', v'): a dense layer's weight
//!   gradient `alpha p^T q` and that update in one matrix product, no
//!   gradient tensor ([`dense`]).
//! - `FedgeLinear` (a `[m, k]`, w, optional bias `[n]`) -> `alpha a op(w)
//!   + bias` `[m, n]`: a dense layer's forward (`op(w) = w^T`) and input
//!   gradient with the weight read in place, not packed ([`linear`]).
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
pub const CONV: &str = "FedgeConv";
pub const CONV_GRAD_W: &str = "FedgeConvGradW";
pub const CONV_GRAD_X: &str = "FedgeConvGradX";
pub const GEMM_SGD: &str = "FedgeGemmSgd";
pub const LINEAR: &str = "FedgeLinear";

/// Whether `op` is one of fedge's ops.
pub fn is_fedge_op(op: &str) -> bool {
    [
        IM2COL,
        COL2IM,
        MAX_POOL,
        MAX_POOL_GRAD,
        RELU_GRAD,
        SGD,
        CONV,
        CONV_GRAD_W,
        CONV_GRAD_X,
        GEMM_SGD,
        LINEAR,
    ]
    .contains(&op)
}

/// The shape of `node`'s outputs (a fedge op) given its first input's.
pub fn output_shape(node: &NodeProto, x: &[usize]) -> Result<Vec<usize>, String> {
    if node.op_type == SGD || node.op_type == RELU_GRAD || node.op_type == GEMM_SGD {
        return Ok(x.to_vec());
    }
    if node.op_type == LINEAR {
        let n = super::onnx::attr_i(node, "n").ok_or("missing `n`")?;
        return match (x, usize::try_from(n)) {
            ([m, _], Ok(n)) => Ok(vec![*m, n]),
            _ => Err(format!("input is {x:?}, expected [m, k]; n = {n}")),
        };
    }
    if let Some(kind) = ConvKind::of(&node.op_type) {
        let op = parse_conv(node, kind).map_err(|e| e.to_string())?;
        let want = op.first_input_shape();
        if x != want.as_slice() {
            return Err(format!("input is {x:?}, the geometry expects {want:?}"));
        }
        return Ok(op.output_shape());
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
    reg.insert(GEMM_SGD, |_, node| {
        let f = |name: &str| super::onnx::attr_f(node, name).unwrap_or(0.0);
        let op = dense::GemmSgd {
            momentum_bits: f("momentum").to_bits(),
            alpha_bits: super::onnx::attr_f(node, "alpha").unwrap_or(1.0).to_bits(),
        };
        Ok((expand(Typed(TypedOpBox(Box::new(op)))), vec![]))
    });
    reg.insert(LINEAR, |_, node| {
        let n = super::onnx::attr_i(node, "n")
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format_err!("{LINEAR} `{}`: missing or bad `n`", node.name))?;
        let op = linear::Linear {
            trans_b: super::onnx::attr_i(node, "trans_b").unwrap_or(0) != 0,
            alpha_bits: super::onnx::attr_f(node, "alpha").unwrap_or(1.0).to_bits(),
            n,
        };
        Ok((expand(Typed(TypedOpBox(Box::new(op)))), vec![]))
    });
    for op in [CONV, CONV_GRAD_W, CONV_GRAD_X] {
        reg.insert(op, |_, n| {
            let kind = ConvKind::of(&n.op_type).expect("registered");
            let op = parse_conv(n, kind)?;
            Ok((expand(Typed(TypedOpBox(Box::new(op)))), vec![]))
        });
    }
}

mod conv;
mod dense;
mod linear;
mod window;

pub use dense::MOMENTUM_MIN as GEMM_SGD_MOMENTUM_MIN;

pub use window::Geometry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Kind {
    Im2Col,
    Col2Im,
    MaxPool,
    MaxPoolGrad,
    /// `MaxPoolGrad` with attribute `positive`: a window whose maximum is
    /// not above zero passes nothing back (the gradient of a Relu before
    /// the pool, folded in).
    MaxPoolGradPositive,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Im2Col => IM2COL,
            Kind::Col2Im => COL2IM,
            Kind::MaxPool => MAX_POOL,
            Kind::MaxPoolGrad | Kind::MaxPoolGradPositive => MAX_POOL_GRAD,
        }
    }

    fn inputs(self) -> usize {
        match self {
            Kind::Im2Col | Kind::Col2Im | Kind::MaxPool => 1,
            Kind::MaxPoolGrad | Kind::MaxPoolGradPositive => 2,
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
    let kind = match kind {
        Kind::MaxPoolGrad if super::onnx::attr_i(node, "positive").unwrap_or(0) != 0 => {
            Kind::MaxPoolGradPositive
        }
        k => k,
    };
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
        let op = self.0.0.as_op();
        Ok(
            if op.downcast_ref::<Sgd>().is_some() || op.downcast_ref::<dense::GemmSgd>().is_some() {
                2
            } else {
                1
            },
        )
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
        } else if let Some(c) = self.0.0.as_op().downcast_ref::<ConvOp>() {
            let arity = match c.kind {
                ConvKind::Forward if c.bias => 3,
                _ => 2,
            };
            check_input_arity(inputs, arity)?;
            check_output_arity(outputs, 1)?;
            let shape: TVec<TDim> = c.output_shape().iter().map(|&d| d.to_dim()).collect();
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(shape))?;
        } else if self.0.0.as_op().downcast_ref::<ReluGrad>().is_some() {
            check_input_arity(inputs, 2)?;
            check_output_arity(outputs, 1)?;
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
            s.equals(&outputs[0].shape, &inputs[0].shape)?;
            s.equals(&inputs[1].shape, &inputs[0].shape)?;
        } else if let Some(l) = self.0.0.as_op().downcast_ref::<linear::Linear>() {
            if inputs.len() != 2 && inputs.len() != 3 {
                bail!("{LINEAR}: {} inputs, expected 2 or 3", inputs.len());
            }
            check_output_arity(outputs, 1)?;
            s.equals(&outputs[0].datum_type, f32::datum_type())?;
            s.equals(&outputs[0].rank, 2)?;
            s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
            s.equals(&outputs[0].shape[1], l.n.to_dim())?;
        } else if self.0.0.as_op().downcast_ref::<dense::GemmSgd>().is_some() {
            check_input_arity(inputs, 5)?;
            check_output_arity(outputs, 2)?;
            for o in outputs {
                s.equals(&o.datum_type, f32::datum_type())?;
                s.equals(&o.shape, &inputs[0].shape)?;
            }
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
            Kind::Col2Im | Kind::MaxPoolGrad | Kind::MaxPoolGradPositive => {
                self.geometry.image_shape().to_vec()
            }
        }
    }

    fn input_shapes(&self) -> Vec<Vec<usize>> {
        let g = &self.geometry;
        match self.kind {
            Kind::Im2Col | Kind::MaxPool => vec![g.image_shape().to_vec()],
            Kind::Col2Im => vec![g.cols_shape().to_vec()],
            Kind::MaxPoolGrad | Kind::MaxPoolGradPositive => {
                vec![g.image_shape().to_vec(), vec![g.n, g.c, g.ho, g.wo]]
            }
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
                Kind::MaxPoolGrad | Kind::MaxPoolGradPositive => {
                    let positive = self.kind == Kind::MaxPoolGradPositive;
                    g.max_pool_grad(plain(&inputs[0])?, plain(&inputs[1])?, o, positive)
                }
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

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum ConvKind {
    Forward,
    GradW,
    GradX,
}

impl ConvKind {
    fn of(op: &str) -> Option<ConvKind> {
        match op {
            CONV => Some(ConvKind::Forward),
            CONV_GRAD_W => Some(ConvKind::GradW),
            CONV_GRAD_X => Some(ConvKind::GradX),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ConvKind::Forward => CONV,
            ConvKind::GradW => CONV_GRAD_W,
            ConvKind::GradX => CONV_GRAD_X,
        }
    }
}

/// `FedgeConv`, `FedgeConvGradW`, `FedgeConvGradX`: attributes `geometry`,
/// `co` (output channels), `bias` (0/1, the forward) and `images` (images
/// per product, the weight gradient).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ConvOp {
    kind: ConvKind,
    geometry: Geometry,
    co: usize,
    bias: bool,
    images: usize,
}

fn parse_conv(node: &NodeProto, kind: ConvKind) -> TractResult<ConvOp> {
    let geometry = Geometry::from_ints(&ints(node, "geometry")?)
        .ok_or_else(|| format_err!("{} `{}`: bad geometry", node.op_type, node.name))?;
    let int = |name: &str| super::onnx::attr_i(node, name).unwrap_or(0).max(0) as usize;
    let co = int("co");
    ensure!(co > 0, "{} `{}` has no `co`", node.op_type, node.name);
    Ok(ConvOp {
        kind,
        geometry,
        co,
        bias: int("bias") != 0,
        images: int("images").max(1),
    })
}

impl ConvOp {
    fn weight_shape(&self) -> Vec<usize> {
        let g = &self.geometry;
        vec![self.co, g.c, g.kh, g.kw]
    }

    fn grad_shape(&self) -> Vec<usize> {
        let g = &self.geometry;
        vec![g.n, self.co, g.ho, g.wo]
    }

    fn first_input_shape(&self) -> Vec<usize> {
        match self.kind {
            ConvKind::Forward | ConvKind::GradW => self.geometry.image_shape().to_vec(),
            ConvKind::GradX => self.grad_shape(),
        }
    }

    fn output_shape(&self) -> Vec<usize> {
        match self.kind {
            ConvKind::Forward => self.grad_shape(),
            ConvKind::GradW => self.weight_shape(),
            ConvKind::GradX => self.geometry.image_shape().to_vec(),
        }
    }

    fn input_shapes(&self) -> Vec<Vec<usize>> {
        let g = &self.geometry;
        match self.kind {
            ConvKind::Forward if self.bias => {
                vec![g.image_shape().to_vec(), self.weight_shape(), vec![self.co]]
            }
            ConvKind::Forward => vec![g.image_shape().to_vec(), self.weight_shape()],
            ConvKind::GradW => vec![g.image_shape().to_vec(), self.grad_shape()],
            ConvKind::GradX => vec![self.grad_shape(), self.weight_shape()],
        }
    }
}

impl Op for ConvOp {
    fn name(&self) -> StaticName {
        self.kind.name().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} co={}", self.geometry, self.co)])
    }

    op_as_typed_op!();
}

impl EvalOp for ConvOp {
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
        let (g, co) = (&self.geometry, self.co);
        let out = match self.kind {
            ConvKind::Forward => conv::forward(
                g,
                co,
                plain(&inputs[0])?,
                plain(&inputs[1])?,
                inputs.get(2).map(|b| &**b),
            )?,
            ConvKind::GradW => {
                conv::grad_weight(g, co, plain(&inputs[0])?, plain(&inputs[1])?, self.images)?
            }
            ConvKind::GradX => conv::grad_input(g, co, plain(&inputs[0])?, plain(&inputs[1])?)?,
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ConvOp {
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
        let [x, gy]: [TValue; 2] = inputs
            .into_iter()
            .collect::<Vec<_>>()
            .try_into()
            .expect("two inputs");
        // The gradient is masked where it lies (copied first only when
        // something else still holds it).
        let mut out = gy.into_tensor();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let o = view.as_slice_mut::<f32>()?;
            for (o, &x) in o.iter_mut().zip(plain(&x)?) {
                *o = if x > 0.0 { *o } else { 0.0 };
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

    /// The update is written over `w` and `v` when the step holds the
    /// only reference to them (the executor hands them over and tract
    /// drops its own after their last use), so a step allocates no second
    /// copy of the parameters and their momentum; else over copies.
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 4, "{SGD}: wrong input count");
        let [w, v, g, lr]: [TValue; 4] = inputs
            .into_iter()
            .collect::<Vec<_>>()
            .try_into()
            .expect("four inputs");
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
        let lr = plain(&lr)?[0];
        let (mut w, mut v) = (w.into_tensor(), v.into_tensor());
        {
            let mut wv = w.try_as_plain_ram_mut()?;
            let mut vv = v.try_as_plain_ram_mut()?;
            let (w, v) = (wv.as_slice_mut::<f32>()?, vv.as_slice_mut::<f32>()?);
            sgd_update(w, v, plain(&g)?, lr, (mu, wd));
        }
        Ok(tvec!(w.into_tvalue(), v.into_tvalue()))
    }
}

/// SGD with momentum `mu` and weight decay `wd`, in place:
/// `v = mu v + g + wd w`, `w = w - lr v`.
///
/// A momentum below the smallest normal float is flushed to zero. The
/// momentum of a weight whose gradient is (nearly) always zero (an MNIST
/// border pixel's) decays by `mu` every step and reaches subnormal values
/// after some 800 steps at 0.9; arithmetic on subnormals takes a slow path
/// on x86 (a microcode assist per element), which made this update take
/// half of the MLP's step. Such a momentum moves its weight by less than
/// `lr x 1.2e-38`: nothing a float32 weight can show.
fn sgd_update(w: &mut [f32], v: &mut [f32], g: &[f32], lr: f32, (mu, wd): (f32, f32)) {
    for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
        let d = mu * *v + (g + wd * *w);
        let d = if d.abs() < f32::MIN_POSITIVE { 0.0 } else { d };
        *v = d;
        *w -= d * lr;
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

    #[test]
    fn sgd_update_matches_the_definition() {
        let (mut w, mut v) = (vec![1.0f32, -2.0, 0.5], vec![0.1f32, 0.0, -0.3]);
        let g = [0.2f32, -0.4, 1.0];
        let (lr, mu, wd) = (0.1f32, 0.9f32, 0.01f32);
        let want: Vec<(f32, f32)> = (0..3)
            .map(|i| {
                let d = mu * v[i] + (g[i] + wd * w[i]);
                (w[i] - d * lr, d)
            })
            .collect();
        sgd_update(&mut w, &mut v, &g, lr, (mu, wd));
        for i in 0..3 {
            assert_eq!((w[i], v[i]), want[i]);
        }
    }

    #[test]
    fn sgd_update_flushes_a_subnormal_momentum() {
        let (mut w, mut v) = (vec![0.5f32, 0.5], vec![2e-38f32, 1e-3]);
        sgd_update(&mut w, &mut v, &[0.0, 0.0], 0.1, (0.5, 0.0));
        assert_eq!(v, [0.0, 5e-4]);
        assert_eq!(w[0], 0.5);
        assert!((w[1] - (0.5 - 5e-5)).abs() < 1e-7);
    }
}
