//! The model zoo, built as plain ONNX graphs of the shape PyTorch exports
//! (Gemm with transB=1, Conv with explicit pads, weights as initializers,
//! PyTorch's default uniform initialisation), from a seed. `models/*.onnx`
//! are these graphs; `cargo run -p fedge-engine --example make_zoo`
//! rewrites them and a test checks they are current.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
        classes: usize,
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
                output: vec![batch_value_info("logits", F32, &[classes])],
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
    m.finish("mlp", F32, &[1, 28, 28], &out, 10)
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
    m.finish("cnn", F32, &[1, 28, 28], &out, 10)
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
    m.finish("small_cnn", F32, &[1, 28, 28], &out, 10)
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
    m.finish("char_model", I64, &[CHAR_CONTEXT], &out, vocab)
}

/// Every zoo model with its file name; the character model's vocabulary
/// size comes from the shipped text.
pub fn all(char_vocab: usize) -> Vec<(&'static str, ModelProto)> {
    vec![
        ("mlp.onnx", mlp(1)),
        ("cnn.onnx", cnn(2)),
        ("small_cnn.onnx", small_cnn(3)),
        ("char_model.onnx", char_model(4, char_vocab)),
    ]
}
