//! Writes the model zoo's ONNX files into `models/`:
//! `cargo run -p fedge-engine --example make_zoo`.
//! The graphs and their initial weights are deterministic (fixed seeds);
//! `runtime/engine/tests/zoo.rs` fails if the committed files differ.

use fedge_engine::data;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let text = data::load_text(&data::shipped_data_dir().join("tinyshakespeare/input.txt"))?;
    let vocab = data::Vocab::of(&text).len();
    for (name, model) in fedge_engine::zoo::all(vocab) {
        let path = dir.join(name);
        std::fs::write(&path, model.encode_to_vec())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
