//! LoRA: low-rank adapters on the MatMul and Gemm weights of a frozen
//! model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models", arXiv:2106.09685).
//!
//! [`apply`] rewrites an imported model ([`ModelBlob`]) so that it trains
//! adapters only. Every weight `W` the spec's patterns name (a float
//! parameter that is operand B of MatMul, or of Gemm with `transA = 0`
//! and `alpha = 1`) keeps its value and becomes a constant of the graph,
//! and each layer that reads it computes
//!
//! ```text
//! y = x W + (alpha / rank) (x A) B          (Gemm with transB: x W^T + ...)
//! ```
//!
//! with `A` (`in x rank`, `W.lora_A`) and `B` (`rank x out`, `W.lora_B`)
//! new parameters. `A` and `B` are the transposes of PEFT's
//! `lora_A.weight` and `lora_B.weight`, so that both products are plain
//! MatMuls with no Transpose. As in the paper, `A` starts random
//! (Kaiming-uniform like PEFT: `U(-1/sqrt(in), 1/sqrt(in))`, from a seed)
//! and `B` at zero, so the adapted model starts out computing exactly
//! what the model did. The rest of the model's parameters (biases,
//! normalization, embeddings) are frozen too: they become graph constants
//! with the targets. The blob's parameters, the canonical layout that
//! training, the codecs, the wire and aggregation share, are then the
//! adapters alone (in target order, `A` before `B`), while the frozen
//! backbone travels inside the graph, which a device downloads once per
//! model version.
//!
//! The adapted graph is plain ONNX (MatMul, Mul, Add): it trains with the
//! existing gradient rules, runs in tract, and [`import::export_onnx`]
//! writes it as a file any ONNX runtime loads. [`merge`] folds the
//! adapters back, `W' = W + (alpha / rank) A B` (transposed for a Gemm
//! with `transB`), and writes the model as it was, with the adapted
//! weights: the same outputs, no adapter nodes.
//!
//! The spec is recorded in the model's `metadata_props` (key
//! [`META_KEY`]), so a device can check that the model it was given
//! carries the adapters its plan names ([`check`]).
//!
//! [`import::export_onnx`]: super::import::export_onnx

use std::collections::HashMap;
use std::sync::Arc;

use fedge_proto::msg::LoraSpec;
use fedge_proto::{ModelBlob, ParamLayout, Params, ProtoError, TensorSpec};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::pb::{ModelProto, NodeProto, StringStringEntryProto, TensorProto};

use super::TrainError;
use super::compile::pattern_matches;
use super::import::decode_model;
use super::onnx;

/// The `metadata_props` key that holds an adapted model's spec.
pub const META_KEY: &str = "fedge.lora";
/// Prefix of every node and tensor the rewrite adds to the graph.
const PREFIX: &str = "fedge.lora/";
/// Suffix of the adapted layer's own output, renamed so that the sum
/// can take the layer's name.
const BASE: &str = "/base";

/// Why a model cannot be adapted, checked or merged.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(
        "LoRA target pattern `{pattern}` matches no MatMul or Gemm weight; the weights it can adapt are: {candidates}"
    )]
    NoMatch { pattern: String, candidates: String },
    #[error("LoRA target `{weight}`: {reason}")]
    Unsupported { weight: String, reason: String },
    #[error("the model already carries LoRA adapters ({spec}); merge them first")]
    AlreadyAdapted { spec: String },
    #[error("the model carries no LoRA adapters")]
    NotAdapted,
    #[error("the plan trains LoRA adapters {plan}, but the model carries {model}")]
    Mismatch { plan: String, model: String },
    #[error("LoRA spec: {0}")]
    Spec(#[from] ProtoError),
    #[error(transparent)]
    Model(#[from] TrainError),
}

/// One adapted weight: its name, shapes and how the layers read it.
#[derive(Clone, Debug)]
struct Target {
    weight: String,
    /// Rows of `A` (the layer's input features).
    inputs: usize,
    /// Columns of `B` (the layer's output features).
    outputs: usize,
}

fn adapter_a(w: &str) -> String {
    format!("{w}.lora_A")
}

fn adapter_b(w: &str) -> String {
    format!("{w}.lora_B")
}

fn scale_name(w: &str) -> String {
    format!("{PREFIX}{w}/scale")
}

/// The spec recorded in a model graph, if it is adapted.
pub fn spec_of(blob: &ModelBlob) -> Result<Option<LoraSpec>, LoraError> {
    if blob.onnx_graph.is_empty() {
        return Ok(None);
    }
    spec_in(&decode_model(&blob.onnx_graph)?)
}

fn spec_in(model: &ModelProto) -> Result<Option<LoraSpec>, LoraError> {
    match model.metadata_props.iter().find(|p| p.key == META_KEY) {
        None => Ok(None),
        Some(p) => Ok(Some(p.value.parse()?)),
    }
}

/// The model carries exactly the adapters `spec` names: what a device
/// checks before it trains a round whose plan asks for LoRA.
pub fn check(blob: &ModelBlob, spec: &LoraSpec) -> Result<(), LoraError> {
    match spec_of(blob)? {
        Some(s) if s == *spec => Ok(()),
        Some(s) => Err(LoraError::Mismatch {
            plan: spec.to_string(),
            model: s.to_string(),
        }),
        None => Err(LoraError::Mismatch {
            plan: spec.to_string(),
            model: "no adapters".into(),
        }),
    }
}

/// Every use of every parameter: `(node index, input index)` by name.
fn uses(model: &ModelProto, layout: &ParamLayout) -> HashMap<String, Vec<(usize, usize)>> {
    let g = model.graph.as_ref().expect("checked");
    let mut out: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
    for (ni, n) in g.node.iter().enumerate() {
        for (ii, x) in n.input.iter().enumerate() {
            if layout.index_of(x).is_some() {
                out.entry(x.clone()).or_default().push((ni, ii));
            }
        }
    }
    out
}

fn is_operand_b(n: &NodeProto, input: usize) -> bool {
    input == 1 && (n.op_type == "MatMul" || n.op_type == "Gemm")
}

/// How the layers reading `w` (shape `shape`) use it, or why the rewrite
/// cannot adapt it.
fn target(
    w: &str,
    shape: &[usize],
    nodes: &[NodeProto],
    uses: &[(usize, usize)],
) -> Result<Target, LoraError> {
    let bad = |reason: String| LoraError::Unsupported {
        weight: w.to_string(),
        reason,
    };
    if shape.len() != 2 {
        return Err(bad(format!(
            "a {}-D weight; LoRA adapts matrices",
            shape.len()
        )));
    }
    let mut transposed = None;
    for &(ni, ii) in uses {
        let n = &nodes[ni];
        if !is_operand_b(n, ii) {
            return Err(bad(format!(
                "also read by {} node `{}` (input {ii}); an adapter would change only its MatMul/Gemm uses, and merging it would change the others",
                n.op_type, n.name
            )));
        }
        let t = if n.op_type == "Gemm" {
            if onnx::attr_i(n, "transA").unwrap_or(0) != 0 {
                return Err(bad(format!("Gemm node `{}` has transA = 1", n.name)));
            }
            if onnx::attr_f(n, "alpha").unwrap_or(1.0) != 1.0 {
                return Err(bad(format!("Gemm node `{}` has alpha != 1", n.name)));
            }
            onnx::attr_i(n, "transB").unwrap_or(0) != 0
        } else {
            false
        };
        if transposed.is_some_and(|p| p != t) {
            return Err(bad(
                "read both transposed (Gemm transB) and not by different layers".into(),
            ));
        }
        transposed = Some(t);
    }
    let transposed = transposed.unwrap_or(false);
    let (inputs, outputs) = if transposed {
        (shape[1], shape[0])
    } else {
        (shape[0], shape[1])
    };
    Ok(Target {
        weight: w.to_string(),
        inputs,
        outputs,
    })
}

/// Add adapters to the weights `spec` names (see the module doc); `seed`
/// draws `A`. Every pattern must match at least one weight a MatMul or
/// Gemm reads as operand B (else [`LoraError::NoMatch`], naming it).
pub fn apply(blob: &ModelBlob, spec: &LoraSpec, seed: u64) -> Result<ModelBlob, LoraError> {
    spec.validate(u64::from(fedge_proto::Limits::default().string_bytes_max))?;
    if blob.onnx_graph.is_empty() {
        return Err(TrainError::BadModel(
            "this model blob carries no ONNX graph (parameters only)".into(),
        )
        .into());
    }
    let mut model = decode_model(&blob.onnx_graph)?;
    if let Some(s) = spec_in(&model)? {
        return Err(LoraError::AlreadyAdapted {
            spec: s.to_string(),
        });
    }
    let layout = &blob.params.layout;
    let uses = uses(&model, layout);
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| TrainError::BadModel("model has no graph".into()))?;
    // Candidates: parameters some MatMul or Gemm reads as operand B, in
    // layout order.
    let candidates: Vec<&TensorSpec> = layout
        .tensors()
        .iter()
        .filter(|t| {
            uses.get(&t.name)
                .is_some_and(|u| u.iter().any(|&(ni, ii)| is_operand_b(&g.node[ni], ii)))
        })
        .collect();
    let mut chosen = vec![false; candidates.len()];
    for p in &spec.targets {
        let mut any = false;
        for (i, c) in candidates.iter().enumerate() {
            if pattern_matches(p, &c.name) {
                chosen[i] = true;
                any = true;
            }
        }
        if !any {
            let mut names: Vec<String> = candidates
                .iter()
                .take(16)
                .map(|c| format!("`{}`", c.name))
                .collect();
            if candidates.len() > 16 {
                names.push(format!("and {} more", candidates.len() - 16));
            }
            return Err(LoraError::NoMatch {
                pattern: p.clone(),
                candidates: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        }
    }
    let targets = candidates
        .iter()
        .zip(&chosen)
        .filter(|(_, c)| **c)
        .map(|(t, _)| target(&t.name, &t.shape, &g.node, &uses[&t.name]))
        .collect::<Result<Vec<_>, _>>()?;

    // The whole model is frozen: its parameters become constants, ahead
    // of the graph's own (in layout order, so importing the merged model
    // gives the original layout back).
    let mut inits: Vec<TensorProto> = layout
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| onnx::tensor_f32(&t.name, &t.shape, &blob.params.values[layout.range(i)]))
        .collect();
    inits.append(&mut g.initializer);
    g.initializer = inits;

    // The adapter branch after each layer that reads a target.
    let by_weight: HashMap<&str, &Target> =
        targets.iter().map(|t| (t.weight.as_str(), t)).collect();
    let mut nodes = Vec::with_capacity(g.node.len() + 4 * targets.len());
    for mut n in std::mem::take(&mut g.node) {
        let Some(t) = n
            .input
            .get(1)
            .filter(|_| n.op_type == "MatMul" || n.op_type == "Gemm")
            .and_then(|w| by_weight.get(w.as_str()))
        else {
            nodes.push(n);
            continue;
        };
        let y = n.output[0].clone();
        let x = n.input[0].clone();
        let p = |s: &str| format!("{PREFIX}{y}/{s}");
        let base = format!("{PREFIX}{y}{BASE}");
        n.output[0] = base.clone();
        nodes.push(n);
        let (a, b, s) = (
            adapter_a(&t.weight),
            adapter_b(&t.weight),
            scale_name(&t.weight),
        );
        nodes.push(onnx::node(
            "MatMul",
            &p("xa"),
            &[&x, &a],
            &[&p("xa")],
            vec![],
        ));
        nodes.push(onnx::node(
            "Mul",
            &p("xas"),
            &[&p("xa"), &s],
            &[&p("xas")],
            vec![],
        ));
        nodes.push(onnx::node(
            "MatMul",
            &p("delta"),
            &[&p("xas"), &b],
            &[&p("delta")],
            vec![],
        ));
        nodes.push(onnx::node(
            "Add",
            &p("add"),
            &[&base, &p("delta")],
            &[&y],
            vec![],
        ));
    }
    g.node = nodes;
    for t in &targets {
        g.initializer.push(onnx::tensor_f32(
            &scale_name(&t.weight),
            &[],
            &[spec.scale()],
        ));
    }

    // The adapters: the new parameters, A drawn, B zero.
    let r = spec.rank as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut specs = Vec::with_capacity(2 * targets.len());
    let mut values = Vec::new();
    for t in &targets {
        let bound = 1.0 / (t.inputs as f32).sqrt();
        specs.push(TensorSpec::new(adapter_a(&t.weight), &[t.inputs, r]));
        values.extend((0..t.inputs * r).map(|_| rng.random_range(-bound..bound)));
        specs.push(TensorSpec::new(adapter_b(&t.weight), &[r, t.outputs]));
        values.extend(std::iter::repeat_n(0.0f32, r * t.outputs));
    }
    let taken: std::collections::HashSet<&str> = g
        .initializer
        .iter()
        .map(|t| t.name.as_str())
        .chain(
            g.node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str)),
        )
        .collect();
    if let Some(s) = specs.iter().find(|s| taken.contains(s.name.as_str())) {
        return Err(TrainError::BadModel(format!(
            "the model already has a tensor named `{}`",
            s.name
        ))
        .into());
    }
    model.metadata_props.push(StringStringEntryProto {
        key: META_KEY.into(),
        value: spec.to_string(),
    });
    let layout =
        Arc::new(ParamLayout::new(specs).map_err(|e| TrainError::BadModel(e.to_string()))?);
    let params = Params::new(layout, values).map_err(|e| TrainError::BadModel(e.to_string()))?;
    Ok(ModelBlob {
        onnx_graph: model.encode_to_vec().into(),
        params,
    })
}

/// An adapted model as a plain ONNX file with the adapters folded into
/// the weights (`W' = W + (alpha / rank) A B`, transposed for Gemm with
/// `transB`): the graph as it was before [`apply`], every weight an
/// initializer. Works on a blob [`apply`] made (the frozen weights in the
/// graph, the adapters its parameters) and on one imported from the
/// un-merged export (every tensor a parameter).
pub fn merge(blob: &ModelBlob) -> Result<Vec<u8>, LoraError> {
    let mut model = decode_model(&blob.onnx_graph)?;
    let spec = spec_in(&model)?.ok_or(LoraError::NotAdapted)?;
    let layout = &blob.params.layout;
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| TrainError::BadModel("model has no graph".into()))?;
    // Every tensor's value, from the parameters or the graph.
    let mut inits: Vec<TensorProto> = layout
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| onnx::tensor_f32(&t.name, &t.shape, &blob.params.values[layout.range(i)]))
        .collect();
    inits.append(&mut g.initializer);
    let index: HashMap<String, usize> = inits
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let value = |name: &str| -> Result<(Vec<usize>, Vec<f32>), LoraError> {
        let t = index
            .get(name)
            .map(|&i| &inits[i])
            .ok_or_else(|| TrainError::BadModel(format!("adapted model lacks tensor `{name}`")))?;
        Ok((onnx::dims(t)?, onnx::f32_values(t)?))
    };
    // The adapted layers: undo the rename, drop the branch, note each
    // weight's orientation.
    let mut weights: Vec<(String, bool)> = Vec::new();
    let mut nodes = Vec::with_capacity(g.node.len());
    for mut n in std::mem::take(&mut g.node) {
        if n.name.starts_with(PREFIX) {
            continue;
        }
        if let Some(y) = n
            .output
            .first()
            .and_then(|o| o.strip_prefix(PREFIX))
            .and_then(|o| o.strip_suffix(BASE))
        {
            let y = y.to_string();
            let w = n.input.get(1).cloned().unwrap_or_default();
            let t = n.op_type == "Gemm" && onnx::attr_i(&n, "transB").unwrap_or(0) != 0;
            if !weights.iter().any(|(x, _)| *x == w) {
                weights.push((w, t));
            }
            n.output[0] = y;
        }
        nodes.push(n);
    }
    g.node = nodes;
    if weights.is_empty() {
        return Err(TrainError::BadModel(
            "the model's metadata names LoRA adapters but its graph has no adapted layer".into(),
        )
        .into());
    }
    let mut folded: HashMap<String, Vec<f32>> = HashMap::new();
    for (w, transposed) in &weights {
        let (ws, mut wv) = value(w)?;
        let (as_, av) = value(&adapter_a(w))?;
        let (bs, bv) = value(&adapter_b(w))?;
        let (_, sv) = value(&scale_name(w))?;
        let s = sv.first().copied().unwrap_or(spec.scale());
        let (i, r, o) = (as_[0], as_[1], bs[1]);
        let expect = if *transposed { [o, i] } else { [i, o] };
        if bs[0] != r || ws != expect {
            return Err(TrainError::BadModel(format!(
                "adapters of `{w}` are shaped {as_:?} and {bs:?}, the weight {ws:?}"
            ))
            .into());
        }
        for row in 0..i {
            for col in 0..o {
                let d: f32 = (0..r).map(|k| av[row * r + k] * bv[k * o + col]).sum();
                let at = if *transposed {
                    col * i + row
                } else {
                    row * o + col
                };
                wv[at] += s * d;
            }
        }
        folded.insert(w.clone(), wv);
    }
    let drop: std::collections::HashSet<String> = weights
        .iter()
        .flat_map(|(w, _)| [adapter_a(w), adapter_b(w), scale_name(w)])
        .collect();
    g.initializer = inits
        .into_iter()
        .filter(|t| !drop.contains(&t.name))
        .map(|t| match folded.remove(&t.name) {
            Some(v) => onnx::tensor_f32(&t.name, &onnx::dims(&t).unwrap_or_default(), &v),
            None => t,
        })
        .collect();
    model.metadata_props.retain(|p| p.key != META_KEY);
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    //! Errors and the rewrite's shape; training, merging and gradients are
    //! in `tests/lora.rs` and `tests/grad_check.rs`.
    use super::*;
    use crate::train::import::import_onnx;
    use crate::train::onnx::F32;
    use tract_onnx::pb::{GraphProto, OperatorSetIdProto};

    /// x [2, 4] -> MatMul w1 [4, 3] -> Gemm(transB) w2 [5, 3] + c -> y;
    /// `emb` [4, 4] also feeds a Gather and a MatMul.
    fn model() -> ModelBlob {
        let t =
            |n: &str, s: &[usize]| onnx::tensor_f32(n, s, &vec![0.25; s.iter().product::<usize>()]);
        let m = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(GraphProto {
                node: vec![
                    onnx::node("MatMul", "mm", &["x", "w1"], &["h"], vec![]),
                    onnx::node(
                        "Gemm",
                        "fc",
                        &["h", "w2", "c"],
                        &["y"],
                        vec![onnx::int("transB", 1)],
                    ),
                ],
                initializer: vec![t("w1", &[4, 3]), t("w2", &[5, 3]), t("c", &[5])],
                input: vec![onnx::value_info("x", F32, &[2, 4])],
                output: vec![onnx::value_info("y", F32, &[2, 5])],
                ..Default::default()
            }),
            ..Default::default()
        };
        import_onnx(&m.encode_to_vec()).unwrap()
    }

    fn spec(targets: &[&str]) -> LoraSpec {
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn only_adapters_are_parameters() {
        let a = apply(&model(), &spec(&["w*"]), 7).unwrap();
        let names: Vec<_> = a
            .params
            .layout
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shape.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("w1.lora_A", vec![4, 2]),
                ("w1.lora_B", vec![2, 3]),
                ("w2.lora_A", vec![3, 2]),
                ("w2.lora_B", vec![2, 5]),
            ]
        );
        let b = &a.params.values[a.params.layout.range(1)];
        assert!(b.iter().all(|&v| v == 0.0), "B starts at zero");
        let av = &a.params.values[a.params.layout.range(0)];
        assert!(av.iter().all(|v| v.abs() <= 0.5) && av.iter().any(|&v| v != 0.0));
        assert_eq!(spec_of(&a).unwrap(), Some(spec(&["w*"])));
        assert_eq!(apply(&model(), &spec(&["w*"]), 7).unwrap(), a, "seeded");
        check(&a, &spec(&["w*"])).unwrap();
        assert!(matches!(
            check(&a, &spec(&["w1"])),
            Err(LoraError::Mismatch { .. })
        ));
        assert!(matches!(
            check(&model(), &spec(&["w1"])),
            Err(LoraError::Mismatch { .. })
        ));
    }

    #[test]
    fn bad_targets_are_typed_errors_naming_them() {
        let e = apply(&model(), &spec(&["w1", "fc9*"]), 0).unwrap_err();
        assert!(
            matches!(&e, LoraError::NoMatch { pattern, .. } if pattern == "fc9*"),
            "{e}"
        );
        assert!(e.to_string().contains("`w1`, `w2`"), "{e}");
        let a = apply(&model(), &spec(&["w1"]), 0).unwrap();
        assert!(matches!(
            apply(&a, &spec(&["w1"]), 0),
            Err(LoraError::AlreadyAdapted { .. })
        ));
        assert!(matches!(merge(&model()), Err(LoraError::NotAdapted)));
        let bad_rank = LoraSpec {
            rank: 0,
            ..spec(&["w1"])
        };
        assert!(matches!(
            apply(&model(), &bad_rank, 0),
            Err(LoraError::Spec(_))
        ));
    }

    #[test]
    fn a_weight_read_by_another_op_is_refused() {
        // w1 also feeds a Mul: its adapter would not reach that use.
        let mut m = decode_model(&model().onnx_graph).unwrap();
        let g = m.graph.as_mut().unwrap();
        g.node.push(onnx::node(
            "Mul",
            "scale_w",
            &["w1", "w1"],
            &["w1x2"],
            vec![],
        ));
        let blob = ModelBlob {
            onnx_graph: m.encode_to_vec().into(),
            params: model().params,
        };
        let e = apply(&blob, &spec(&["w1"]), 0).unwrap_err().to_string();
        assert!(
            e.contains("`w1`") && e.contains("Mul node `scale_w`"),
            "{e}"
        );
    }

    #[test]
    fn merging_fresh_adapters_gives_the_model_back() {
        // B = 0: W + s A B is W, and the layout is the original one.
        let orig = model();
        let merged =
            import_onnx(&merge(&apply(&orig, &spec(&["w*"]), 3).unwrap()).unwrap()).unwrap();
        assert_eq!(merged.params, orig.params);
        assert_eq!(
            decode_model(&merged.onnx_graph)
                .unwrap()
                .graph
                .unwrap()
                .node,
            decode_model(&orig.onnx_graph).unwrap().graph.unwrap().node
        );
    }
}
