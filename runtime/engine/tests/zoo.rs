//! The committed zoo models are what the generator makes, and each one
//! imports, compiles into a training step and runs.

use fedge_engine::data;
use fedge_engine::train::compile::CompileOptions;
use fedge_engine::train::exec::TractExecutor;
use fedge_engine::train::import::{ModelGraph, import_onnx};
use prost::Message;

#[test]
fn committed_models_match_the_generator() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let text =
        data::load_text(&data::shipped_data_dir().join("tinyshakespeare/input.txt")).unwrap();
    let vocab = data::Vocab::of(&text).len();
    assert_eq!(vocab, 65);
    let expected_params = [
        ("mlp.onnx", 199_210),
        ("cnn.onnx", 1_663_370),
        ("small_cnn.onnx", 9_098),
        ("char_model.onnx", 149_585),
        ("char_transformer.onnx", 814_145),
    ];
    for ((name, model), (name2, params)) in fedge_engine::zoo::all(vocab)
        .into_iter()
        .zip(expected_params)
    {
        assert_eq!(name, name2);
        let committed = std::fs::read(dir.join(name)).unwrap_or_default();
        assert!(
            committed == model.encode_to_vec(),
            "models/{name} is stale: run `cargo run -p fedge-engine --example make_zoo`"
        );
        let blob = import_onnx(&committed).unwrap();
        assert_eq!(blob.params.values.len(), params, "{name} parameter count");
        let graph = ModelGraph::from_blob(&blob).unwrap();
        TractExecutor::new(
            &graph,
            CompileOptions {
                batch: 4,
                ..CompileOptions::default()
            },
        )
        .unwrap();
    }
}
