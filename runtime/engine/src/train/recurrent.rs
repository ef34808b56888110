//! LSTM and GRU, unrolled over their sequence into elementary ops when a
//! model is loaded ([`super::import::ModelGraph::from_blob`]): every op
//! of the unrolled form has a gradient rule and a GPU kernel, so
//! recurrent models train on both executors without rules of their own.
//! The sequence length is static (shapes are inferred for a fixed batch),
//! so the unrolled graph is finite; it grows with the sequence, which is
//! what training a recurrent net by backpropagation through time costs
//! anyway.
//!
//! ONNX's gate layouts: LSTM `W` is `[1, 4H, I]` in gate order i, o, f, c;
//! GRU `W` is `[1, 3H, I]` in order z, r, h. Per step, with `x` the step's
//! input `[B, I]` and `h`, `c` the state `[B, H]`:
//!
//! - LSTM: `i, o, f, g = split(x W^T + h R^T + Wb + Rb)`,
//!   `c' = sigmoid(f) c + sigmoid(i) tanh(g)`, `h' = sigmoid(o) tanh(c')`;
//! - GRU: `z = sigmoid(x Wz^T + h Rz^T + Wbz + Rbz)`, `r` likewise,
//!   `n = tanh(x Wh^T + Wbh + r (h Rh^T + Rbh))` with
//!   `linear_before_reset=1` (PyTorch's), else
//!   `n = tanh(x Wh^T + Wbh + (r h) Rh^T + Rbh)`; `h' = n + z (h - n)`.
//!
//! Supported: every direction (forward, reverse, bidirectional: the
//! reverse one runs from the last step to the first and its outputs are
//! stored in time order), default activations, no clip, no peepholes, no
//! `sequence_lens`, `layout=0`, LSTM's `input_forget=0`; anything else is
//! refused naming the node. A missing initial state is zeros.

use tract_onnx::pb::{NodeProto, TensorProto};

use super::TrainError;
use super::onnx::{self, attr, attr_i, attr_s};
use super::shape::Shapes;

/// Emits nodes and constants under one node's name.
struct Emit<'a> {
    base: String,
    nodes: &'a mut Vec<NodeProto>,
    inits: &'a mut Vec<TensorProto>,
    counter: usize,
}

impl Emit<'_> {
    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{}/{hint}.{}", self.base, self.counter)
    }

    fn op_to(&mut self, op: &str, ins: &[&str], attrs: Vec<onnx::pb::AttributeProto>, out: &str) {
        let name = format!("{out}.node");
        self.nodes.push(onnx::node(op, &name, ins, &[out], attrs));
    }

    fn op(&mut self, op: &str, ins: &[&str]) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.op_to(op, ins, vec![], &out);
        out
    }

    fn op_attrs(&mut self, op: &str, ins: &[&str], attrs: Vec<onnx::pb::AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.op_to(op, ins, attrs, &out);
        out
    }

    fn i64s(&mut self, v: &[i64]) -> String {
        let name = self.fresh("const");
        self.inits.push(onnx::tensor_i64(&name, &[v.len()], v));
        name
    }

    fn zeros(&mut self, shape: &[usize]) -> String {
        let name = self.fresh("zeros");
        let n = shape.iter().product();
        self.inits
            .push(onnx::tensor_f32(&name, shape, &vec![0.0; n]));
        name
    }

    /// `t[.., lo..hi]` along `axis`.
    fn slice(&mut self, t: &str, axis: i64, lo: usize, hi: usize) -> String {
        let (lo, hi, ax) = (
            self.i64s(&[lo as i64]),
            self.i64s(&[hi as i64]),
            self.i64s(&[axis]),
        );
        self.op("Slice", &[t, &lo, &hi, &ax])
    }

    /// Split `t` along axis 1 into `parts` parts of `h` columns.
    fn split(&mut self, t: &str, parts: usize, h: usize) -> Vec<String> {
        let sizes = self.i64s(&vec![h as i64; parts]);
        let outs: Vec<String> = (0..parts).map(|_| self.fresh("gate")).collect();
        let refs: Vec<&str> = outs.iter().map(|s| s.as_str()).collect();
        let name = format!("{}.node", outs[0]);
        self.nodes.push(onnx::node(
            "Split",
            &name,
            &[t, &sizes],
            &refs,
            vec![onnx::int("axis", 1)],
        ));
        outs
    }
}

fn input(node: &NodeProto, i: usize) -> Option<&str> {
    node.input
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// Append the unrolled form of `node` (an LSTM or a GRU) to `nodes`, its
/// constants to `inits`; `s` knows the shapes of its inputs.
pub fn unroll(
    node: &NodeProto,
    s: &Shapes,
    nodes: &mut Vec<NodeProto>,
    inits: &mut Vec<TensorProto>,
) -> Result<(), TrainError> {
    let refuse = |reason: String| TrainError::UnsupportedForm {
        op: node.op_type.clone(),
        node: node.name.clone(),
        reason,
    };
    let lstm = node.op_type == "LSTM";
    let gates = if lstm { 4 } else { 3 };
    // One entry per direction: whether it runs backwards in time.
    let directions: &[bool] = match attr_s(node, "direction").as_deref() {
        None | Some("forward") => &[false],
        Some("reverse") => &[true],
        Some("bidirectional") => &[false, true],
        Some(d) => return Err(refuse(format!("direction \"{d}\""))),
    };
    let dirs = directions.len();
    if attr_i(node, "layout").unwrap_or(0) != 0 {
        return Err(refuse("layout=1 is not supported".into()));
    }
    if attr(node, "clip").is_some() {
        return Err(refuse("cell clipping is not supported".into()));
    }
    if lstm && attr_i(node, "input_forget").unwrap_or(0) != 0 {
        return Err(refuse("input_forget=1 is not supported".into()));
    }
    if let Some(a) = attr(node, "activations") {
        let default: &[&str] = if lstm {
            &["Sigmoid", "Tanh", "Tanh"]
        } else {
            &["Sigmoid", "Tanh"]
        };
        let given: Vec<String> = a
            .strings
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if given != default {
            return Err(refuse(format!(
                "activations {given:?}: only the default {default:?}"
            )));
        }
    }
    if input(node, 4).is_some() {
        return Err(refuse(
            "sequence_lens is not supported: every sequence has the full length".into(),
        ));
    }
    if lstm && input(node, 7).is_some() {
        return Err(refuse("peepholes are not supported".into()));
    }
    let (x, w, r) = match (input(node, 0), input(node, 1), input(node, 2)) {
        (Some(x), Some(w), Some(r)) => (x, w, r),
        _ => return Err(refuse("X, W and R are required".into())),
    };
    let (xs, ws, rs) = (s.shape(x)?, s.shape(w)?, s.shape(r)?);
    if xs.len() != 3 || ws.len() != 3 || rs.len() != 3 || ws[0] != dirs || rs[0] != dirs {
        return Err(refuse(format!(
            "shapes X {xs:?}, W {ws:?}, R {rs:?}: expected [T, B, I], [{dirs}, {gates}H, I], [{dirs}, {gates}H, H]"
        )));
    }
    let h = match attr_i(node, "hidden_size") {
        Some(v) => usize::try_from(v).map_err(|_| refuse(format!("hidden_size {v}")))?,
        None => ws[1] / gates,
    };
    let (t_len, i_len) = (xs[0], xs[2]);
    if h == 0 || ws[1] != gates * h || ws[2] != i_len || rs[1] != gates * h || rs[2] != h {
        return Err(refuse(format!(
            "W {ws:?} and R {rs:?} do not fit hidden_size {h} and {i_len} inputs"
        )));
    }
    if t_len == 0 {
        return Err(refuse("an empty sequence".into()));
    }
    let base = if node.name.is_empty() {
        node.output.first().cloned().unwrap_or_default()
    } else {
        node.name.clone()
    };
    let mut e = Emit {
        base,
        nodes,
        inits,
        counter: 0,
    };
    let gh = gates * h;
    let ax0 = e.i64s(&[0]);
    let lbr = attr_i(node, "linear_before_reset").unwrap_or(0) != 0;
    // Direction d's slice of a [dirs, ..] tensor, without that axis.
    let of_direction = |e: &mut Emit, t: &str, d: usize| {
        let one = if dirs == 1 {
            t.to_string()
        } else {
            e.slice(t, 0, d, d + 1)
        };
        e.op("Squeeze", &[&one, &ax0])
    };
    let step_input = |e: &mut Emit, t: usize| {
        let one = e.slice(x, 0, t, t + 1);
        e.op("Squeeze", &[&one, &ax0])
    };
    let xts: Vec<String> = (0..t_len).map(|t| step_input(&mut e, t)).collect();
    // Per direction: each step's h ([B, H], in time order), the last h
    // and c.
    let mut ys_by_dir: Vec<Vec<String>> = Vec::with_capacity(dirs);
    let mut last_h = Vec::with_capacity(dirs);
    let mut last_c = Vec::with_capacity(dirs);
    for (d, &backwards) in directions.iter().enumerate() {
        let perm = vec![onnx::ints("perm", &[1, 0])];
        let w2 = of_direction(&mut e, w, d);
        let wt = e.op_attrs("Transpose", &[&w2], perm.clone());
        let r2 = of_direction(&mut e, r, d);
        let rt = e.op_attrs("Transpose", &[&r2], perm);
        let biases = match input(node, 3) {
            Some(b) => {
                let b1 = of_direction(&mut e, b, d);
                Some((e.slice(&b1, 0, 0, gh), e.slice(&b1, 0, gh, 2 * gh)))
            }
            None => None,
        };
        let zero_state = |e: &mut Emit| {
            let z = e.zeros(&[i_len, h]);
            e.op("MatMul", &[&xts[0], &z])
        };
        let mut hs = match input(node, 5) {
            Some(h0) => of_direction(&mut e, h0, d),
            None => zero_state(&mut e),
        };
        let mut cs = if lstm {
            match input(node, 6) {
                Some(c0) => of_direction(&mut e, c0, d),
                None => zero_state(&mut e),
            }
        } else {
            String::new()
        };
        let add_bias = |e: &mut Emit, t: String, bias: Option<&String>| match bias {
            Some(b) => e.op("Add", &[&t, b]),
            None => t,
        };
        let (wb, rb) = match &biases {
            Some((wb, rb)) => (Some(wb), Some(rb)),
            None => (None, None),
        };
        let mut ys = vec![String::new(); t_len];
        for k in 0..t_len {
            let t = if backwards { t_len - 1 - k } else { k };
            let gx = e.op("MatMul", &[&xts[t], &wt]);
            let gx = add_bias(&mut e, gx, wb);
            if lstm {
                let ghh = e.op("MatMul", &[&hs, &rt]);
                let ghh = add_bias(&mut e, ghh, rb);
                let g = e.op("Add", &[&gx, &ghh]);
                let parts = e.split(&g, 4, h);
                let i = e.op("Sigmoid", &[&parts[0]]);
                let o = e.op("Sigmoid", &[&parts[1]]);
                let f = e.op("Sigmoid", &[&parts[2]]);
                let g = e.op("Tanh", &[&parts[3]]);
                let fc = e.op("Mul", &[&f, &cs]);
                let ig = e.op("Mul", &[&i, &g]);
                cs = e.op("Add", &[&fc, &ig]);
                let tc = e.op("Tanh", &[&cs]);
                hs = e.op("Mul", &[&o, &tc]);
            } else {
                let xp = e.split(&gx, 3, h);
                let (z, n) = if lbr {
                    let ghh = e.op("MatMul", &[&hs, &rt]);
                    let ghh = add_bias(&mut e, ghh, rb);
                    let hp = e.split(&ghh, 3, h);
                    let zs = e.op("Add", &[&xp[0], &hp[0]]);
                    let z = e.op("Sigmoid", &[&zs]);
                    let rs_ = e.op("Add", &[&xp[1], &hp[1]]);
                    let rg = e.op("Sigmoid", &[&rs_]);
                    let rh = e.op("Mul", &[&rg, &hp[2]]);
                    let ns = e.op("Add", &[&xp[2], &rh]);
                    (z, e.op("Tanh", &[&ns]))
                } else {
                    let rt_zr = e.slice(&rt, 1, 0, 2 * h);
                    let rt_n = e.slice(&rt, 1, 2 * h, 3 * h);
                    let (rb_zr, rb_n) = match rb {
                        Some(rb) => (
                            Some(e.slice(rb, 0, 0, 2 * h)),
                            Some(e.slice(rb, 0, 2 * h, 3 * h)),
                        ),
                        None => (None, None),
                    };
                    let ghh = e.op("MatMul", &[&hs, &rt_zr]);
                    let ghh = add_bias(&mut e, ghh, rb_zr.as_ref());
                    let hp = e.split(&ghh, 2, h);
                    let zs = e.op("Add", &[&xp[0], &hp[0]]);
                    let z = e.op("Sigmoid", &[&zs]);
                    let rs_ = e.op("Add", &[&xp[1], &hp[1]]);
                    let rg = e.op("Sigmoid", &[&rs_]);
                    let rh = e.op("Mul", &[&rg, &hs]);
                    let rhr = e.op("MatMul", &[&rh, &rt_n]);
                    let rhr = add_bias(&mut e, rhr, rb_n.as_ref());
                    let ns = e.op("Add", &[&xp[2], &rhr]);
                    (z, e.op("Tanh", &[&ns]))
                };
                let dd = e.op("Sub", &[&hs, &n]);
                let zd = e.op("Mul", &[&z, &dd]);
                hs = e.op("Add", &[&n, &zd]);
            }
            ys[t] = hs.clone();
        }
        ys_by_dir.push(ys);
        last_h.push(hs);
        last_c.push(cs);
    }
    // `out` = [dirs, B, H] from one [B, H] per direction.
    let stack = |e: &mut Emit, parts: &[String], out: &str| {
        let ups: Vec<String> = parts
            .iter()
            .map(|p| e.op("Unsqueeze", &[p, &ax0]))
            .collect();
        let refs: Vec<&str> = ups.iter().map(|s| s.as_str()).collect();
        e.op_to("Concat", &refs, vec![onnx::int("axis", 0)], out);
    };
    if let Some(y) = node.output.first().filter(|o| !o.is_empty()) {
        // Y: [T, dirs, B, H].
        let steps: Vec<String> = (0..t_len)
            .map(|t| {
                let at_t: Vec<String> = ys_by_dir.iter().map(|ys| ys[t].clone()).collect();
                let st = e.fresh("stack");
                stack(&mut e, &at_t, &st);
                e.op("Unsqueeze", &[&st, &ax0])
            })
            .collect();
        let refs: Vec<&str> = steps.iter().map(|s| s.as_str()).collect();
        e.op_to("Concat", &refs, vec![onnx::int("axis", 0)], y);
    }
    if let Some(yh) = node.output.get(1).filter(|o| !o.is_empty()) {
        stack(&mut e, &last_h, yh);
    }
    if lstm && let Some(yc) = node.output.get(2).filter(|o| !o.is_empty()) {
        stack(&mut e, &last_c, yc);
    }
    Ok(())
}
