//! Strides, axis merging and workgroup counts: the arithmetic every
//! kernel's parameter words are built from.

use super::{GROUP_THREADS, RANK_MAX};

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides that read `x` broadcast to `out` (numpy rules): 0 on broadcast
/// axes.
pub fn broadcast_strides(x: &[usize], out: &[usize]) -> Vec<usize> {
    let xs = strides(x);
    let off = out.len() - x.len();
    (0..out.len())
        .map(|i| {
            if i < off || x[i - off] == 1 && out[i] != 1 {
                0
            } else {
                xs[i - off]
            }
        })
        .collect()
}

/// Drop size-1 axes and merge neighbours that are contiguous for every
/// operand, so kernels walk as few axes as possible.
pub fn simplify(dims: &[usize], operands: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut d: Vec<usize> = Vec::new();
    let mut s: Vec<Vec<usize>> = vec![Vec::new(); operands.len()];
    for i in 0..dims.len() {
        if dims[i] == 1 {
            continue;
        }
        let mergeable = !d.is_empty()
            && operands
                .iter()
                .enumerate()
                .all(|(k, st)| s[k][d.len() - 1] == st[i] * dims[i]);
        if mergeable {
            let last = d.len() - 1;
            d[last] *= dims[i];
            for (k, st) in operands.iter().enumerate() {
                s[k][last] = st[i];
            }
        } else {
            d.push(dims[i]);
            for (k, st) in operands.iter().enumerate() {
                s[k].push(st[i]);
            }
        }
    }
    (d, s)
}

/// Pad to `RANK_MAX` words.
pub(super) fn padded(v: &[usize]) -> impl Iterator<Item = u32> + '_ {
    v.iter()
        .map(|&x| x as u32)
        .chain(std::iter::repeat(0))
        .take(RANK_MAX)
}

/// Workgroups for `threads` one-dimensional threads (x capped, spill to y).
pub fn groups_1d(threads: usize) -> [u32; 3] {
    let g = threads.div_ceil(GROUP_THREADS).max(1);
    linear_groups(g)
}

/// Lay `g` workgroups out as x * y with x <= 65535.
pub fn linear_groups(g: usize) -> [u32; 3] {
    let x = g.min(65_535);
    [x as u32, g.div_ceil(x) as u32, 1]
}
