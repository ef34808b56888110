//! Memory planning: temporaries share buffers by liveness.

use std::collections::{HashMap, HashSet};

use super::{Launch, Role, Value};

/// Give every value a buffer; temporaries share buffers of the same size
/// once their last reader has run. A launch's output is taken before its
/// inputs are released, so no launch reads and writes one buffer.
pub fn pack(
    values: &[Value],
    launches: &[Launch],
    pinned: &HashSet<usize>,
) -> (Vec<usize>, Vec<usize>) {
    let temp = |v: usize| values[v].role == Role::Temp && !pinned.contains(&v);
    let mut last = vec![None::<usize>; values.len()];
    for (i, l) in launches.iter().enumerate() {
        for &v in l.inputs.iter().chain([&l.output]) {
            last[v] = Some(i);
        }
    }
    let mut buffer_of = vec![usize::MAX; values.len()];
    let mut words = Vec::new();
    let mut free: HashMap<usize, Vec<usize>> = HashMap::new();
    for (v, val) in values.iter().enumerate() {
        if !temp(v) {
            buffer_of[v] = words.len();
            words.push(val.words.max(1));
        }
    }
    for (i, l) in launches.iter().enumerate() {
        let o = l.output;
        if buffer_of[o] == usize::MAX {
            let w = values[o].words.max(1);
            buffer_of[o] = match free.get_mut(&w).and_then(|f| f.pop()) {
                Some(b) => b,
                None => {
                    words.push(w);
                    words.len() - 1
                }
            };
        }
        let mut released: Vec<usize> = Vec::new();
        for &v in l.inputs.iter().chain([&o]) {
            if temp(v) && last[v] == Some(i) && !released.contains(&v) {
                released.push(v);
                free.entry(values[v].words.max(1))
                    .or_default()
                    .push(buffer_of[v]);
            }
        }
    }
    // Values nothing launches or reads (unused inputs) still get a buffer.
    for (v, b) in buffer_of.iter_mut().enumerate() {
        if *b == usize::MAX {
            *b = words.len();
            words.push(values[v].words.max(1));
        }
    }
    (buffer_of, words)
}
