//! The builder the gradient rules and the compiler emit nodes with: fresh
//! names, constants shared by value, each output's shape inferred as it
//! is emitted.

use super::*;

/// Emits nodes with fresh names, inferring each output's shape.
pub struct Builder {
    pub lowering: Lowering,
    /// The default-domain opset the step graph declares (the model's):
    /// the ops the builder emits take that opset's form.
    pub opset: i64,
    /// See [`CompileOptions::im2col_bytes_max`].
    pub im2col_bytes_max: usize,
    /// Tract lowering: the im2col patches of each forward Conv's input,
    /// by the Conv's output (reused by its weight gradient).
    pub conv_cols: HashMap<String, String>,
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<TensorProto>,
    pub s: Shapes,
    counter: usize,
    i64_consts: HashMap<Vec<i64>, String>,
    f32_consts: HashMap<u32, String>,
}

impl Builder {
    pub fn new(s: Shapes, lowering: Lowering) -> Self {
        Builder {
            lowering,
            opset: crate::train::import::OPSET_MAX,
            im2col_bytes_max: IM2COL_BYTES_MAX,
            conv_cols: HashMap::new(),
            nodes: Vec::new(),
            inits: Vec::new(),
            s,
            counter: 0,
            i64_consts: HashMap::new(),
            f32_consts: HashMap::new(),
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("fedge.{hint}.{}", self.counter)
    }

    /// A tensor's shape, or a typed error for a tensor the graph never
    /// gave one (a malformed model).
    pub fn try_shape(&self, name: &str) -> Result<Vec<usize>, TrainError> {
        self.s.shape(name).map(|s| s.to_vec())
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.s
            .shape(name)
            .expect("builder tensors have shapes")
            .to_vec()
    }

    /// Emit `op(inputs)` and return its output name.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<tract_onnx::pb::AttributeProto>,
    ) -> Result<String, TrainError> {
        let out = self.fresh(&op.to_lowercase());
        self.op_named(op, inputs, attrs, &out)?;
        Ok(out)
    }

    /// Emit `op(inputs)` writing to `out`.
    pub fn op_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<tract_onnx::pb::AttributeProto>,
        out: &str,
    ) -> Result<(), TrainError> {
        let name = format!("{out}.node");
        let node = onnx::node(op, &name, inputs, &[out], attrs);
        infer_node(&node, &mut self.s)?;
        self.nodes.push(node);
        Ok(())
    }

    /// Emit one of fedge's own ops ([`crate::train::kernels`]) with `outputs`
    /// outputs; returns their names.
    pub fn fedge_op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<tract_onnx::pb::AttributeProto>,
        outputs: usize,
    ) -> Result<Vec<String>, TrainError> {
        let outs: Vec<String> = (0..outputs)
            .map(|_| self.fresh(&op.to_lowercase()))
            .collect();
        let refs: Vec<&str> = outs.iter().map(|s| s.as_str()).collect();
        self.fedge_op_named(op, inputs, attrs, &refs)?;
        Ok(outs)
    }

    /// [`Builder::fedge_op`] writing to `outputs`.
    pub fn fedge_op_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<tract_onnx::pb::AttributeProto>,
        outputs: &[&str],
    ) -> Result<(), TrainError> {
        debug_assert_eq!(self.lowering, Lowering::Tract);
        let mut node = onnx::node(op, &format!("{}.node", outputs[0]), inputs, outputs, attrs);
        node.domain = crate::train::kernels::DOMAIN.into();
        infer_node(&node, &mut self.s)?;
        self.nodes.push(node);
        Ok(())
    }

    pub fn const_i64(&mut self, v: &[i64]) -> String {
        if let Some(n) = self.i64_consts.get(v) {
            return n.clone();
        }
        let name = self.fresh("const");
        self.inits.push(onnx::tensor_i64(&name, &[v.len()], v));
        self.s.set(&name, vec![v.len()], I64);
        self.s.consts.insert(name.clone(), v.to_vec());
        self.i64_consts.insert(v.to_vec(), name.clone());
        name
    }

    /// A rank-0 int64 constant.
    pub fn const_i64_scalar(&mut self, v: i64) -> String {
        let name = self.fresh("const");
        self.inits.push(onnx::tensor_i64(&name, &[], &[v]));
        self.s.set(&name, vec![], I64);
        self.s.consts.insert(name.clone(), vec![v]);
        name
    }

    /// A float32 constant of `shape`.
    pub fn const_f32(&mut self, shape: &[usize], values: &[f32]) -> String {
        let name = self.fresh("const");
        self.inits.push(onnx::tensor_f32(&name, shape, values));
        self.s.set(&name, shape.to_vec(), F32);
        name
    }

    /// A rank-0 f32 constant.
    pub fn scalar(&mut self, v: f32) -> String {
        if let Some(n) = self.f32_consts.get(&v.to_bits()) {
            return n.clone();
        }
        let name = self.fresh("scalar");
        self.inits.push(onnx::tensor_f32(&name, &[], &[v]));
        self.s.set(&name, vec![], F32);
        self.f32_consts.insert(v.to_bits(), name.clone());
        name
    }

    pub fn binary(&mut self, op: &str, a: &str, b: &str) -> Result<String, TrainError> {
        self.op(op, &[a, b], vec![])
    }

    pub fn unary(&mut self, op: &str, a: &str) -> Result<String, TrainError> {
        self.op(op, &[a], vec![])
    }

    pub fn scale(&mut self, a: &str, k: f32) -> Result<String, TrainError> {
        if k == 1.0 {
            return Ok(a.to_string());
        }
        let c = self.scalar(k);
        self.binary("Mul", a, &c)
    }

    pub fn transpose(&mut self, a: &str, perm: &[usize]) -> Result<String, TrainError> {
        let p: Vec<i64> = perm.iter().map(|&x| x as i64).collect();
        self.op("Transpose", &[a], vec![onnx::ints("perm", &p)])
    }

    /// Swap the last two axes.
    pub fn transpose_last2(&mut self, a: &str) -> Result<String, TrainError> {
        let r = self.shape(a).len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.transpose(a, &perm)
    }

    pub fn reshape(&mut self, a: &str, shape: &[usize]) -> Result<String, TrainError> {
        if self.try_shape(a)? == shape {
            return Ok(a.to_string());
        }
        let v: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let c = self.const_i64(&v);
        self.op("Reshape", &[a, &c], vec![])
    }

    pub fn reduce_sum(
        &mut self,
        a: &str,
        axes: &[usize],
        keep: bool,
    ) -> Result<String, TrainError> {
        let v: Vec<i64> = axes.iter().map(|&d| d as i64).collect();
        let c = self.const_i64(&v);
        self.op(
            "ReduceSum",
            &[a, &c],
            vec![onnx::int("keepdims", keep as i64)],
        )
    }

    /// Mean over the last axis, kept. ReduceMean takes its axes as an
    /// attribute up to opset 17 and as an input from 18.
    pub fn reduce_mean_last(&mut self, a: &str) -> Result<String, TrainError> {
        if self.opset >= 18 {
            let axes = self.const_i64(&[-1]);
            self.op("ReduceMean", &[a, &axes], vec![onnx::int("keepdims", 1)])
        } else {
            self.op(
                "ReduceMean",
                &[a],
                vec![onnx::ints("axes", &[-1]), onnx::int("keepdims", 1)],
            )
        }
    }

    /// A float tensor of zeros shaped `shape`.
    pub fn zeros(&mut self, shape: &[usize]) -> Result<String, TrainError> {
        let z = self.scalar(0.0);
        let sh: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let sh = self.const_i64(&sh);
        self.op("Expand", &[&z, &sh], vec![])
    }

    /// Sum `g` down to `target` (the inverse of numpy broadcasting).
    pub fn unbroadcast(&mut self, g: &str, target: &[usize]) -> Result<String, TrainError> {
        let gs = self.shape(g);
        if gs == target {
            return Ok(g.to_string());
        }
        let off = gs
            .len()
            .checked_sub(target.len())
            .ok_or_else(|| TrainError::Shape {
                tensor: g.to_string(),
                reason: format!("{gs:?} cannot be summed down to the larger {target:?}"),
            })?;
        let axes: Vec<usize> = (0..gs.len())
            .filter(|&i| i < off || (target[i - off] == 1 && gs[i] != 1))
            .collect();
        let summed = if axes.is_empty() {
            g.to_string()
        } else {
            self.reduce_sum(g, &axes, true)?
        };
        self.reshape(&summed, target)
    }

    pub fn cast(&mut self, a: &str, to: i32) -> Result<String, TrainError> {
        self.op("Cast", &[a], vec![onnx::int("to", to as i64)])
    }
}
