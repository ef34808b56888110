//! The model zoo, built as plain ONNX graphs of the shape PyTorch exports
//! (Gemm with transB=1, Conv with explicit pads, weights as initializers,
//! PyTorch's default uniform initialisation), from a seed. `models/*.onnx`
//! are these graphs; `cargo run -p fedge-engine --example make_zoo`
//! rewrites them and a test checks they are current.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{Tensor as TypeTensor, Value as TypeValue};
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

use crate::train::onnx::{self, F32, I64};

/// Opset of the zoo's graphs.
pub const OPSET: i64 = 17;

/// Context window of the character model.
pub const CHAR_CONTEXT: usize = 32;

struct Maker {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    rng: ChaCha8Rng,
    n: usize,
}

impl Maker {
    fn new(seed: u64) -> Self {
        Maker {
            nodes: vec![],
            inits: vec![],
            rng: ChaCha8Rng::seed_from_u64(seed),
            n: 0,
        }
    }

    fn uniform(&mut self, name: &str, shape: &[usize], bound: f32) -> String {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        self.inits.push(onnx::tensor_f32(name, shape, &v));
        name.into()
    }

    fn normal(&mut self, name: &str, shape: &[usize], std: f32) -> String {
        let n: usize = shape.iter().product();
        let d = Normal::new(0.0f32, std).expect("positive std");
        let v: Vec<f32> = (0..n).map(|_| d.sample(&mut self.rng)).collect();
        self.inits.push(onnx::tensor_f32(name, shape, &v));
        name.into()
    }

    fn constant(&mut self, name: &str, shape: &[usize], value: f32) -> String {
        let n: usize = shape.iter().product();
        self.inits
            .push(onnx::tensor_f32(name, shape, &vec![value; n]));
        name.into()
    }

    fn op(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<tract_onnx::pb::AttributeProto>,
    ) -> String {
        self.n += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.n);
        self.nodes.push(onnx::node(
            op,
            &format!("/{op}_{}", self.n),
            inputs,
            &[&out],
            attrs,
        ));
        out
    }

    /// PyTorch `nn.Linear`: y = x W^T + b, W and b ~ U(-1/sqrt(in), 1/sqrt(in)).
    fn linear(&mut self, name: &str, x: &str, inp: usize, out: usize) -> String {
        let bound = 1.0 / (inp as f32).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[out, inp], bound);
        let b = self.uniform(&format!("{name}.bias"), &[out], bound);
        self.op("Gemm", &[x, &w, &b], vec![onnx::int("transB", 1)])
    }

    /// PyTorch `nn.Conv2d` with 'same' padding for odd kernels.
    fn conv(&mut self, name: &str, x: &str, cin: usize, cout: usize, k: usize) -> String {
        let bound = 1.0 / ((cin * k * k) as f32).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[cout, cin, k, k], bound);
        let b = self.uniform(&format!("{name}.bias"), &[cout], bound);
        let p = (k / 2) as i64;
        self.op(
            "Conv",
            &[x, &w, &b],
            vec![
                onnx::ints("kernel_shape", &[k as i64, k as i64]),
                onnx::ints("pads", &[p, p, p, p]),
                onnx::ints("strides", &[1, 1]),
            ],
        )
    }

    /// A node with `outputs` outputs (Split).
    fn op_multi(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<tract_onnx::pb::AttributeProto>,
        outputs: usize,
    ) -> Vec<String> {
        self.n += 1;
        let outs: Vec<String> = (0..outputs)
            .map(|i| format!("{}_{}_{i}", op.to_lowercase(), self.n))
            .collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.nodes.push(onnx::node(
            op,
            &format!("/{op}_{}", self.n),
            inputs,
            &refs,
            attrs,
        ));
        outs
    }

    /// A rank-0 float literal (what the dynamo exporter lifts; fedge keeps
    /// it a constant).
    fn scalar(&mut self, name: &str, value: f32) -> String {
        self.inits.push(onnx::tensor_f32(name, &[], &[value]));
        name.into()
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> String {
        self.inits
            .push(onnx::tensor_i64(name, &[values.len()], values));
        name.into()
    }

    /// `nn.Linear` on a sequence, as both exporters write it for a 3-D
    /// input: MatMul by the transposed weight (stored `[in, out]`), then
    /// Add of the bias. The exporters name the transposed weight
    /// `onnx::MatMul_N` or `val_N`; the zoo keeps the module's name.
    fn seq_linear(&mut self, name: &str, x: &str, inp: usize, out: usize) -> String {
        let bound = 1.0 / (inp as f32).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[inp, out], bound);
        let b = self.uniform(&format!("{name}.bias"), &[out], bound);
        let h = self.op("MatMul", &[x, &w], vec![]);
        self.op("Add", &[&h, &b], vec![])
    }

    /// `nn.LayerNorm(d)` over the last axis (ones and zeros, epsilon 1e-5).
    fn layer_norm(&mut self, name: &str, x: &str, d: usize) -> String {
        let g = self.constant(&format!("{name}.weight"), &[d], 1.0);
        let b = self.constant(&format!("{name}.bias"), &[d], 0.0);
        self.op(
            "LayerNormalization",
            &[x, &g, &b],
            vec![onnx::int("axis", -1), onnx::float("epsilon", 1e-5)],
        )
    }

    fn max_pool(&mut self, x: &str, k: i64) -> String {
        self.op(
            "MaxPool",
            &[x],
            vec![
                onnx::ints("kernel_shape", &[k, k]),
                onnx::ints("strides", &[k, k]),
            ],
        )
    }

    fn finish(
        mut self,
        name: &str,
        input_type: i32,
        sample: &[usize],
        out: &str,
        out_sample: &[usize],
    ) -> ModelProto {
        // Rename the last node's output to "logits".
        let last = self.nodes.last_mut().expect("nodes");
        assert_eq!(last.output[0], out);
        last.output[0] = "logits".into();
        ModelProto {
            ir_version: 8,
            producer_name: "fedge-zoo".into(),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            graph: Some(GraphProto {
                name: name.into(),
                node: self.nodes,
                initializer: self.inits,
                input: vec![batch_value_info("input", input_type, sample)],
                output: vec![batch_value_info("logits", F32, out_sample)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A value info with a symbolic batch dimension `N`.
fn batch_value_info(name: &str, ty: i32, sample: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension {
        value: Some(dimension::Value::DimParam("N".into())),
        ..Default::default()
    }];
    dim.extend(sample.iter().map(|&d| Dimension {
        value: Some(dimension::Value::DimValue(d as i64)),
        ..Default::default()
    }));
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TypeTensor {
                elem_type: ty,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// McMahan et al. 2017's MLP: 784-200-200-10 with ReLU (199,210 parameters).
pub fn mlp(seed: u64) -> ModelProto {
    let mut m = Maker::new(seed);
    let flat = m.op("Flatten", &["input"], vec![onnx::int("axis", 1)]);
    let h = m.linear("fc1", &flat, 784, 200);
    let h = m.op("Relu", &[&h], vec![]);
    let h = m.linear("fc2", &h, 200, 200);
    let h = m.op("Relu", &[&h], vec![]);
    let out = m.linear("fc3", &h, 200, 10);
    m.finish("mlp", F32, &[1, 28, 28], &out, &[10])
}

/// McMahan et al. 2017's CNN: 5x5 conv 32, 2x2 max pool, 5x5 conv 64,
/// 2x2 max pool, FC 512, ReLU, FC 10 (1,663,370 parameters).
pub fn cnn(seed: u64) -> ModelProto {
    let mut m = Maker::new(seed);
    let h = m.conv("conv1", "input", 1, 32, 5);
    let h = m.op("Relu", &[&h], vec![]);
    let h = m.max_pool(&h, 2);
    let h = m.conv("conv2", &h, 32, 64, 5);
    let h = m.op("Relu", &[&h], vec![]);
    let h = m.max_pool(&h, 2);
    let h = m.op("Flatten", &[&h], vec![onnx::int("axis", 1)]);
    let h = m.linear("fc1", &h, 64 * 7 * 7, 512);
    let h = m.op("Relu", &[&h], vec![]);
    let out = m.linear("fc2", &h, 512, 10);
    m.finish("cnn", F32, &[1, 28, 28], &out, &[10])
}

/// A small, fast CNN for tests: 3x3 conv 8, pool, 3x3 conv 16, pool, FC 10.
pub fn small_cnn(seed: u64) -> ModelProto {
    let mut m = Maker::new(seed);
    let h = m.conv("conv1", "input", 1, 8, 3);
    let h = m.op("Relu", &[&h], vec![]);
    let h = m.max_pool(&h, 2);
    let h = m.conv("conv2", &h, 8, 16, 3);
    let h = m.op("Relu", &[&h], vec![]);
    let h = m.max_pool(&h, 2);
    let h = m.op("Flatten", &[&h], vec![onnx::int("axis", 1)]);
    let out = m.linear("fc", &h, 16 * 7 * 7, 10);
    m.finish("small_cnn", F32, &[1, 28, 28], &out, &[10])
}

/// Next-character model: embedding of a `CHAR_CONTEXT`-character window,
/// flattened, FC 256 with LayerNorm and ReLU, FC over the vocabulary.
pub fn char_model(seed: u64, vocab: usize) -> ModelProto {
    let (e, hidden) = (16usize, 256usize);
    let mut m = Maker::new(seed);
    let emb = m.uniform("embed.weight", &[vocab, e], 1.0);
    let h = m.op("Gather", &[&emb, "input"], vec![onnx::int("axis", 0)]);
    let h = m.op("Flatten", &[&h], vec![onnx::int("axis", 1)]);
    let h = m.linear("fc1", &h, CHAR_CONTEXT * e, hidden);
    let g = m.constant("ln.weight", &[hidden], 1.0);
    let b = m.constant("ln.bias", &[hidden], 0.0);
    let h = m.op(
        "LayerNormalization",
        &[&h, &g, &b],
        vec![onnx::int("axis", -1)],
    );
    let h = m.op("Relu", &[&h], vec![]);
    let out = m.linear("fc2", &h, hidden, vocab);
    m.finish("char_model", I64, &[CHAR_CONTEXT], &out, &[vocab])
}

/// Shape of a decoder-only character transformer ([`char_transformer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerConfig {
    pub vocab: usize,
    /// Context window (tokens per sample).
    pub context: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    /// Hidden width of each block's MLP.
    pub d_mlp: usize,
}

impl TransformerConfig {
    /// The zoo's transformer: 4 layers of width 128, 4 heads, MLP 512,
    /// over a 32-character window (the character model's).
    pub fn zoo(vocab: usize) -> Self {
        TransformerConfig {
            vocab,
            context: CHAR_CONTEXT,
            d_model: 128,
            heads: 4,
            layers: 4,
            d_mlp: 512,
        }
    }

    /// Trainable parameters of the model this shape makes.
    pub fn parameters(&self) -> usize {
        let (v, t, d, f) = (self.vocab, self.context, self.d_model, self.d_mlp);
        let block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d);
        v * d + t * d + self.layers * block + 2 * d + d * v + v
    }
}

/// A decoder-only character transformer (GPT-2's shape, nanoGPT's layout)
/// as PyTorch's exporters write one: token embedding (`Gather`) plus a
/// learned position embedding, `layers` pre-norm blocks of causal
/// multi-head self-attention (`Split` of a fused QKV projection, heads by
/// `Reshape` and `Transpose`, batched `MatMul`, scaled, the future masked
/// to -inf with `Where` and a constant mask, `Softmax`) and an MLP with
/// exact GELU (`Erf`, as the legacy exporter writes `nn.GELU` at opset 17),
/// each added to the residual stream; a final LayerNorm and a linear head.
/// Input `[N, T]` int64, output `[N, T, vocab]`: position `t` predicts
/// token `t + 1`, so fedge trains it on the next token at every position
/// (see [`crate::train::compile`]) and evaluates the last one.
///
/// Initialisation is PyTorch's default: `nn.Embedding` N(0, 1), `nn.Linear`
/// U(-1/sqrt(in), 1/sqrt(in)), LayerNorm ones and zeros; the position
/// embedding (an `nn.Parameter`) N(0, 0.02), as GPT-2 initialises it.
pub fn char_transformer(seed: u64, c: &TransformerConfig) -> ModelProto {
    assert!(
        c.heads > 0 && c.d_model.is_multiple_of(c.heads),
        "heads divide d_model"
    );
    let (t, d, h) = (c.context, c.d_model, c.heads);
    let dh = d / h;
    let mut m = Maker::new(seed);
    let tok = m.normal("tok.weight", &[c.vocab, d], 1.0);
    let pos = m.normal("pos", &[1, t, d], 0.02);
    // Constants every block shares.
    let split = m.ints("qkv_split", &[d as i64, d as i64, d as i64]);
    let heads_shape = m.ints("heads_shape", &[0, t as i64, h as i64, dh as i64]);
    let merged_shape = m.ints("merged_shape", &[0, t as i64, d as i64]);
    let scale = m.scalar("attn_scale", 1.0 / (dh as f32).sqrt());
    let future: Vec<bool> = (0..t * t).map(|i| i % t > i / t).collect();
    m.inits
        .push(onnx::tensor_bool("causal_mask", &[1, 1, t, t], &future));
    let neg_inf = m.scalar("neg_inf", f32::NEG_INFINITY);
    let sqrt2 = m.scalar("sqrt2", std::f32::consts::SQRT_2);
    let one = m.scalar("one", 1.0);
    let half = m.scalar("half", 0.5);

    let e = m.op("Gather", &[&tok, "input"], vec![onnx::int("axis", 0)]);
    let mut x = m.op("Add", &[&e, &pos], vec![]);
    for l in 0..c.layers {
        let p = format!("blocks.{l}");
        // Attention.
        let a = m.layer_norm(&format!("{p}.ln1"), &x, d);
        let qkv = m.seq_linear(&format!("{p}.attn.qkv"), &a, d, 3 * d);
        let parts = m.op_multi("Split", &[&qkv, &split], vec![onnx::int("axis", 2)], 3);
        let mut heads = Vec::with_capacity(3);
        for (part, perm) in parts.iter().zip([[0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]]) {
            let r = m.op("Reshape", &[part, &heads_shape], vec![]);
            heads.push(m.op("Transpose", &[&r], vec![onnx::ints("perm", &perm)]));
        }
        let s = m.op("MatMul", &[&heads[0], &heads[1]], vec![]);
        let s = m.op("Mul", &[&s, &scale], vec![]);
        let s = m.op("Where", &["causal_mask", &neg_inf, &s], vec![]);
        let s = m.op("Softmax", &[&s], vec![onnx::int("axis", -1)]);
        let y = m.op("MatMul", &[&s, &heads[2]], vec![]);
        let y = m.op("Transpose", &[&y], vec![onnx::ints("perm", &[0, 2, 1, 3])]);
        let y = m.op("Reshape", &[&y, &merged_shape], vec![]);
        let y = m.seq_linear(&format!("{p}.attn.proj"), &y, d, d);
        x = m.op("Add", &[&x, &y], vec![]);
        // MLP.
        let f = m.layer_norm(&format!("{p}.ln2"), &x, d);
        let f = m.seq_linear(&format!("{p}.fc"), &f, d, c.d_mlp);
        let g = m.op("Div", &[&f, &sqrt2], vec![]);
        let g = m.op("Erf", &[&g], vec![]);
        let g = m.op("Add", &[&g, &one], vec![]);
        let g = m.op("Mul", &[&f, &g], vec![]);
        let g = m.op("Mul", &[&g, &half], vec![]);
        let f = m.seq_linear(&format!("{p}.out"), &g, c.d_mlp, d);
        x = m.op("Add", &[&x, &f], vec![]);
    }
    let x = m.layer_norm("ln", &x, d);
    let out = m.seq_linear("head", &x, d, c.vocab);
    m.finish("char_transformer", I64, &[t], &out, &[t, c.vocab])
}

/// Every zoo model with its file name; the character model's vocabulary
/// size comes from the shipped text.
pub fn all(char_vocab: usize) -> Vec<(&'static str, ModelProto)> {
    vec![
        ("mlp.onnx", mlp(1)),
        ("cnn.onnx", cnn(2)),
        ("small_cnn.onnx", small_cnn(3)),
        ("char_model.onnx", char_model(4, char_vocab)),
        (
            "char_transformer.onnx",
            char_transformer(5, &TransformerConfig::zoo(char_vocab)),
        ),
    ]
}
