//! The loss a training step minimises and its gradient with respect to
//! the model's output.
//!
//! Softmax cross-entropy reads the model's output as logits over the
//! classes: `[batch, classes]` with one class label per sample, or, for a
//! causal language model, `[batch, T, vocab]` over an int64 input
//! `[batch, T]`. Position `t` of such a model predicts token `t + 1`, so
//! the targets are the input shifted left by one with the sample's label
//! (the token after the window) last: one training signal per position
//! instead of one per window, from the same data and labels a model of
//! the last position takes. Every position weighs the same. The model
//! must be causal (position `t` must not see the tokens after it);
//! fedge cannot check that, and a model that peeks learns to copy.

use super::*;

/// Labels' shape and element type, given the model's output shape.
pub(super) fn label_spec(
    loss: Loss,
    graph: &ModelGraph,
    batch: usize,
    out_shape: &[usize],
) -> Result<(Vec<usize>, i32), TrainError> {
    match loss {
        Loss::SoftmaxCrossEntropy => {
            if out_shape.len() != 2 && next_token_length(graph, batch, out_shape).is_none() {
                return Err(TrainError::BadInput(format!(
                    "softmax cross-entropy needs [batch, classes] outputs, or [batch, T, vocab] over an int64 [batch, T] input (a causal language model), got {out_shape:?}"
                )));
            }
            Ok((vec![batch], I64))
        }
        Loss::Mse => Ok((out_shape.to_vec(), F32)),
    }
}

/// `T` when the output is `[batch, T, vocab]` over an int64 `[batch, T]`
/// input: a causal language model.
fn next_token_length(graph: &ModelGraph, batch: usize, out_shape: &[usize]) -> Option<usize> {
    let sample = graph.sample_shape();
    (graph.input_type == I64
        && out_shape.len() == 3
        && out_shape[0] == batch
        && sample.len() == 1
        && sample[0] == out_shape[1])
        .then_some(out_shape[1])
}

/// Emit the loss and the gradient of the loss with respect to the output;
/// returns their names.
pub(super) fn emit(
    b: &mut Builder,
    loss: Loss,
    graph: &ModelGraph,
    batch: usize,
    last_op: Option<&str>,
) -> Result<(String, String), TrainError> {
    let out = graph.output.as_str();
    let out_shape = b.shape(out);
    match loss {
        Loss::SoftmaxCrossEntropy => {
            let (targets, positions) = match next_token_length(graph, batch, &out_shape) {
                Some(t) => (next_tokens(b, &graph.input, t)?, batch * t),
                None => (LABELS.to_string(), batch),
            };
            let classes = *out_shape.last().expect("rank checked");
            let axis = out_shape.len() - 1;
            let range: Vec<i64> = (0..classes as i64).collect();
            let range = b.const_i64(&range);
            let last = b.const_i64(&[axis as i64]);
            let lab = b.op("Unsqueeze", &[&targets, &last], vec![])?;
            let eq = b.binary("Equal", &lab, &range)?;
            let onehot = b.cast(&eq, F32)?;
            let inv = 1.0 / positions as f32;
            let all: Vec<usize> = (0..out_shape.len()).collect();
            if last_op == Some("LogSoftmax") {
                // The model already ends in log-probabilities: NLL.
                let prod = b.binary("Mul", &onehot, out)?;
                let sum = b.reduce_sum(&prod, &all, false)?;
                let loss = b.scale(&sum, -inv)?;
                let g_out = b.scale(&onehot, -inv)?;
                Ok((loss, g_out))
            } else {
                let logsm = b.op("LogSoftmax", &[out], vec![onnx::int("axis", axis as i64)])?;
                let prod = b.binary("Mul", &onehot, &logsm)?;
                let sum = b.reduce_sum(&prod, &all, false)?;
                let loss = b.scale(&sum, -inv)?;
                let sm = b.unary("Exp", &logsm)?;
                let diff = b.binary("Sub", &sm, &onehot)?;
                let g_out = b.scale(&diff, inv)?;
                Ok((loss, g_out))
            }
        }
        Loss::Mse => {
            let n: usize = out_shape.iter().product();
            let diff = b.binary("Sub", out, LABELS)?;
            let sq = b.binary("Mul", &diff, &diff)?;
            let all: Vec<usize> = (0..out_shape.len()).collect();
            let sum = b.reduce_sum(&sq, &all, false)?;
            let loss = b.scale(&sum, 1.0 / n as f32)?;
            let g_out = b.scale(&diff, 2.0 / n as f32)?;
            Ok((loss, g_out))
        }
    }
}

/// The next token at every position of `input` (`[batch, t]`): the input
/// shifted left by one, the label (the token after the window) last.
fn next_tokens(b: &mut Builder, input: &str, t: usize) -> Result<String, TrainError> {
    let axis1 = b.const_i64(&[1]);
    let label = b.op("Unsqueeze", &[LABELS, &axis1], vec![])?;
    if t == 1 {
        return Ok(label);
    }
    let (starts, ends) = (b.const_i64(&[1]), b.const_i64(&[t as i64]));
    let shifted = b.op("Slice", &[input, &starts, &ends, &axis1], vec![])?;
    b.op("Concat", &[&shifted, &label], vec![onnx::int("axis", 1)])
}
