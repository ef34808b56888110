//! Operands that ops take as attributes in one opset and as constant
//! inputs in another (ReduceMean's axes, Split's sizes, Slice's bounds),
//! read the same way for shape inference and the gradient rules.

use super::*;

/// The reduction axes of a Reduce* node: its second input when present
/// (ReduceSum from opset 13, every reduction from opset 18), else its
/// `axes` attribute (the other reductions up to opset 17).
pub fn reduce_axes(node: &NodeProto, s: &Shapes) -> Result<Vec<i64>, TrainError> {
    Ok(match node.input.get(1).filter(|n| !n.is_empty()) {
        Some(_) => s.konst(node, 1)?.to_vec(),
        None => attr_ints(node, "axes").unwrap_or_default(),
    })
}

/// Sizes of Split's outputs along its axis: the `split` input when given,
/// else equal parts, one per output (opset 18 names their count in
/// `num_outputs`). Unequal parts without a `split` input are refused:
/// tract does not make the smaller last part ONNX 18 describes.
pub fn split_sizes(node: &NodeProto, s: &Shapes, x: &[usize]) -> Result<Vec<usize>, TrainError> {
    let a = axis(node, attr_i(node, "axis").unwrap_or(0), x.len())?;
    let outputs = node.output.len();
    if outputs == 0 {
        return Err(err(node, "no outputs"));
    }
    if let Some(n) = attr_i(node, "num_outputs")
        && usize::try_from(n).ok() != Some(outputs)
    {
        return Err(err(node, &format!("num_outputs={n} but {outputs} outputs")));
    }
    let sizes: Vec<usize> = match node.input.get(1).filter(|n| !n.is_empty()) {
        Some(_) => s
            .konst(node, 1)?
            .iter()
            .map(|&v| usize::try_from(v).map_err(|_| err(node, "negative split size")))
            .collect::<Result<_, _>>()?,
        None => {
            if !x[a].is_multiple_of(outputs) {
                return Err(TrainError::UnsupportedForm {
                    op: node.op_type.clone(),
                    node: node.name.clone(),
                    reason: format!(
                        "{} elements do not split into {outputs} equal parts; give the sizes as the `split` input",
                        x[a]
                    ),
                });
            }
            vec![x[a] / outputs; outputs]
        }
    };
    if sizes.len() != outputs
        || sizes.iter().try_fold(0usize, |t, &v| t.checked_add(v)) != Some(x[a])
    {
        return Err(err(
            node,
            &format!(
                "split sizes {sizes:?} do not cover {} elements in {outputs} outputs",
                x[a]
            ),
        ));
    }
    Ok(sizes)
}

/// One sliced axis: the first index taken, how many and the step between
/// them (negative: backwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceAxis {
    pub axis: usize,
    pub start: usize,
    pub len: usize,
    pub step: i64,
}

/// The axes a Slice node takes, with ONNX's clamping of starts and ends
/// (to `[0, dim]`, or `[0, dim - 1]` and `[-1, dim - 1]` stepping
/// backwards). Starts, ends, axes and steps must be constants.
pub fn slice_axes(node: &NodeProto, s: &Shapes, x: &[usize]) -> Result<Vec<SliceAxis>, TrainError> {
    let starts = s.konst(node, 1)?.to_vec();
    let ends = s.konst(node, 2)?.to_vec();
    let present = |i: usize| node.input.get(i).is_some_and(|n| !n.is_empty());
    let axes: Vec<i64> = if present(3) {
        s.konst(node, 3)?.to_vec()
    } else {
        (0..starts.len() as i64).collect()
    };
    let steps: Vec<i64> = if present(4) {
        s.konst(node, 4)?.to_vec()
    } else {
        vec![1; starts.len()]
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(err(node, "starts, ends, axes and steps differ in length"));
    }
    let mut out: Vec<SliceAxis> = Vec::with_capacity(starts.len());
    for i in 0..starts.len() {
        let a = axis(node, axes[i], x.len())?;
        if out.iter().any(|r| r.axis == a) {
            return Err(err(node, "an axis sliced twice"));
        }
        let dim = i64::try_from(x[a]).map_err(|_| err(node, "dimension past i64"))?;
        let step = steps[i];
        // tract reads a few bounds its own (numpy's) way: a backward
        // slice starting before the first element is empty there, and the
        // ends i64::MIN, i64::MIN + 1, i64::MAX and i32::MAX mean "to the
        // end in the step's direction". Where that differs from ONNX's
        // clamping the node is refused rather than trained on a shape
        // that is not the one computed.
        let end_magic_back = [i64::MIN, i64::MIN + 1].contains(&ends[i]);
        let end_magic_forward = [i64::MAX, i64::from(i32::MAX)].contains(&ends[i]);
        if (step < 0 && starts[i].saturating_add(dim) < 0)
            || (step > 0 && end_magic_back)
            || (step < 0 && end_magic_forward)
        {
            return Err(TrainError::UnsupportedForm {
                op: node.op_type.clone(),
                node: node.name.clone(),
                reason: format!(
                    "start {}, end {}, step {step} over {dim} elements: tract and ONNX read these bounds differently",
                    starts[i], ends[i]
                ),
            });
        }
        let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (start, len) = if step == 0 {
            return Err(err(node, "a step of 0"));
        } else if dim == 0 {
            (0, 0)
        } else if step > 0 {
            let (b, e) = (wrap(starts[i]).clamp(0, dim), wrap(ends[i]).clamp(0, dim));
            (b, if e > b { (e - b - 1) / step + 1 } else { 0 })
        } else {
            let (b, e) = (
                wrap(starts[i]).clamp(0, dim - 1),
                wrap(ends[i]).clamp(-1, dim - 1),
            );
            let back = step
                .checked_neg()
                .ok_or_else(|| err(node, "step out of range"))?;
            (b, if b > e { (b - e - 1) / back + 1 } else { 0 })
        };
        out.push(SliceAxis {
            axis: a,
            start: start as usize,
            len: len as usize,
            step,
        });
    }
    Ok(out)
}
