//! The simulated fleet's model and its devices' update pattern.

use std::sync::Arc;

use fedge_proto::{ModelBlob, ParamLayout, Params, TensorSpec};

/// A parameter-only model of `dim` values (`w` and `b`).
pub fn model(dim: usize) -> ModelBlob {
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec::new("w", &[dim - dim / 4]),
            TensorSpec::new("b", &[dim / 4]),
        ])
        .unwrap(),
    );
    ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, (0..dim).map(|i| i as f32 * 0.01).collect()).unwrap(),
    }
}

/// 1.5 or 0.5 for coordinate `j` in round `round_id` (`DeviceSpec::wobble`).
pub fn wobble(round_id: u64, j: usize) -> f32 {
    let h = blake3::hash(&[round_id.to_le_bytes(), (j as u64).to_le_bytes()].concat());
    if h.as_bytes()[0] & 1 == 0 { 1.5 } else { 0.5 }
}
