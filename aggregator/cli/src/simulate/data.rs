//! The model and the data a simulation trains on: a zoo model or an ONNX
//! file, the shipped MNIST digits or Shakespeare, and the devices' shards.

use anyhow::Context;
use fedge_engine::data::{self, Dataset, Partition};
use fedge_engine::train::import::{ModelGraph, import_onnx};
use fedge_proto::ModelBlob;
use prost::Message;

use super::args::SimConfig;

/// The model a simulation trains.
pub struct SimModel {
    /// The initial model the aggregator publishes.
    pub blob: ModelBlob,
    /// Its graph, for held-out evaluation.
    pub graph: ModelGraph,
    /// The first dimension of a sample (a text model's context length).
    pub context: usize,
    /// Parameters of the model as imported (with LoRA: the frozen
    /// model's, not the adapters'): the bytes an update is measured
    /// against.
    pub model_params: usize,
}

/// The configured model: a zoo name or an ONNX file, imported.
pub fn load_model(c: &SimConfig) -> anyhow::Result<SimModel> {
    let vocab = if c.data == "shakespeare" { 65 } else { 0 };
    let blob = import_onnx(&zoo(&c.model, vocab)?)?;
    let model_params = blob.params.layout.dimension();
    let lora = c.lora.as_ref().map(|l| l.spec());
    let blob = crate::with_adapters(blob, lora.as_ref(), c.seed)?;
    let graph = ModelGraph::from_blob(&blob)?;
    let context = graph.sample_shape().first().copied().unwrap_or(1);
    Ok(SimModel {
        blob,
        graph,
        context,
        model_params,
    })
}

fn zoo(name: &str, vocab: usize) -> anyhow::Result<Vec<u8>> {
    Ok(match name {
        "mlp" => fedge_engine::zoo::mlp(1).encode_to_vec(),
        "cnn" => fedge_engine::zoo::cnn(2).encode_to_vec(),
        "small_cnn" => fedge_engine::zoo::small_cnn(3).encode_to_vec(),
        "char" => fedge_engine::zoo::char_model(4, vocab).encode_to_vec(),
        "transformer" => fedge_engine::zoo::char_transformer(
            5,
            &fedge_engine::zoo::TransformerConfig::zoo(vocab),
        )
        .encode_to_vec(),
        path => std::fs::read(path)
            .with_context(|| format!("model `{path}`: not a zoo name nor a readable file"))?,
    })
}

/// Training data, held-out data, and the devices' shards.
pub fn load_data(
    c: &SimConfig,
    context: usize,
) -> anyhow::Result<(Dataset, Dataset, Vec<Vec<usize>>)> {
    let dir = data::shipped_data_dir();
    if c.partition == "role" {
        anyhow::ensure!(
            c.data == "shakespeare",
            "partition `role` splits a play by speaking role: use it with --data shakespeare"
        );
        let text = data::load_text(&dir.join("tinyshakespeare/input.txt"))?;
        let vocab = data::Vocab::of(&text);
        let per_role = c.train_samples.div_ceil(c.devices);
        let split = data::split_by_role(&text, &vocab, context, 7, c.devices, 0.1, per_role)?;
        // At most `held_out` samples, spread evenly over every role's tail.
        let n = split.test.len();
        let keep: Vec<usize> = (0..c.held_out.min(n))
            .map(|i| i * n / c.held_out.min(n))
            .collect();
        println!(
            "one device per speaking role: {} ... {} ({} training windows, {} held out)",
            split.roles.first().map(String::as_str).unwrap_or("-"),
            split.roles.last().map(String::as_str).unwrap_or("-"),
            split.train.len(),
            keep.len()
        );
        return Ok((split.train, split.test.subset(&keep), split.shards));
    }
    let partition = Partition::parse(&c.partition)?;
    let (train, test) = load_split(c, &dir, context)?;
    let shards = partition.split(&train, c.devices, c.seed);
    Ok((train, test, shards))
}

fn load_split(
    c: &SimConfig,
    dir: &std::path::Path,
    context: usize,
) -> anyhow::Result<(Dataset, Dataset)> {
    match c.data.as_str() {
        "mnist" => {
            let d = data::load_mnist(dir)?;
            anyhow::ensure!(
                c.train_samples + c.held_out <= d.len(),
                "not enough MNIST samples"
            );
            Ok((
                d.slice(0..c.train_samples),
                d.slice(d.len() - c.held_out..d.len()),
            ))
        }
        "shakespeare" => {
            let text = data::load_text(&dir.join("tinyshakespeare/input.txt"))?;
            let vocab = data::Vocab::of(&text);
            let d = data::char_windows(&text, &vocab, context, 7)?;
            anyhow::ensure!(
                c.train_samples + c.held_out <= d.len(),
                "not enough text windows"
            );
            Ok((
                d.slice(0..c.train_samples),
                d.slice(d.len() - c.held_out..d.len()),
            ))
        }
        other => anyhow::bail!("data `{other}`: use mnist or shakespeare"),
    }
}
