//! The engine behind the aggregator library's [`Evaluator`] trait: a
//! model's mean loss on examples of the operator's validation set, with
//! tract inference. `serve` loads the set named by `scoring.validation`;
//! `simulate` passes its held-out split.

use anyhow::Context;
use fedge_aggregator::scoring::{ClassScores, Evaluator};
use fedge_engine::data::Dataset;
use fedge_engine::train::exec::TractInference;
use fedge_engine::train::import::ModelGraph;
use fedge_engine::train::local::{evaluate, for_each_scored};
use fedge_proto::ModelBlob;

/// Validation examples evaluated per inference batch.
const BATCH: usize = 64;

pub struct EngineEvaluator {
    inf: TractInference,
    data: Dataset,
}

impl EngineEvaluator {
    pub fn new(graph: &ModelGraph, data: Dataset) -> anyhow::Result<Self> {
        anyhow::ensure!(!data.is_empty(), "the validation set is empty");
        Ok(EngineEvaluator {
            inf: TractInference::new(graph, BATCH)?,
            data,
        })
    }

    /// The evaluator for `model` on the validation set named by `spec`
    /// (a data spec: `mnist[:DIR]`, `idx:IMAGES,LABELS`, `text:FILE`),
    /// restricted to the examples in `range` (`START..END`) if given.
    pub fn from_spec(model: &ModelBlob, spec: &str, range: Option<&str>) -> anyhow::Result<Self> {
        let graph = ModelGraph::from_blob(model).context("the model's graph")?;
        let context = graph.sample_shape().first().copied().unwrap_or(1);
        let mut data = fedge_device::dataspec::DataSpec::parse(spec)
            .and_then(|d| d.load(context, 1))
            .with_context(|| format!("scoring.validation = `{spec}`"))?;
        if let Some(r) = range {
            let r = fedge_device::dataspec::parse_range(r)
                .with_context(|| format!("scoring.validation_range = `{r}`"))?;
            anyhow::ensure!(
                r.end <= data.len(),
                "scoring.validation_range {}..{} is outside the {} examples of `{spec}`",
                r.start,
                r.end,
                data.len()
            );
            data = data.slice(r);
        }
        Self::new(&graph, data)
    }
}

impl EngineEvaluator {
    fn check(&self, indices: &[usize]) -> Result<(), String> {
        match indices.iter().find(|&&i| i >= self.data.len()) {
            Some(&i) => Err(format!(
                "validation index {i} is outside the set of {} examples",
                self.data.len()
            )),
            None => Ok(()),
        }
    }
}

impl Evaluator for EngineEvaluator {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String> {
        Ok(self.loss_and_accuracy(params, indices)?.0)
    }

    fn loss_and_accuracy(
        &mut self,
        params: &[f32],
        indices: &[usize],
    ) -> Result<(f64, Option<f64>), String> {
        self.check(indices)?;
        self.inf.load(params).map_err(|e| e.to_string())?;
        let stats = evaluate(&self.inf, &self.data.subset(indices)).map_err(|e| e.to_string())?;
        Ok((stats.loss, Some(stats.accuracy)))
    }

    fn class_scores(
        &mut self,
        params: &[f32],
        indices: &[usize],
    ) -> Result<Option<ClassScores>, String> {
        self.check(indices)?;
        self.inf.load(params).map_err(|e| e.to_string())?;
        let mut s = ClassScores {
            classes: 0,
            scores: Vec::new(),
            labels: Vec::new(),
        };
        for_each_scored(&self.inf, &self.data.subset(indices), |row, label| {
            s.classes = row.len();
            s.scores.extend_from_slice(row);
            s.labels.push(label as u32);
        })
        .map_err(|e| e.to_string())?;
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn mlp() -> ModelBlob {
        fedge_engine::train::import::import_onnx(&fedge_engine::zoo::mlp(1).encode_to_vec())
            .unwrap()
    }

    /// The shipped MNIST as a validation set: losses are finite, a bad
    /// index or data spec is an error, and a model without a graph cannot
    /// be scored.
    #[test]
    fn scores_on_a_data_spec() {
        let m = mlp();
        let mut e = EngineEvaluator::from_spec(&m, "mnist", None).unwrap();
        assert!(e.len() >= 1000);
        let l = e.loss(&m.params.values, &[0, 5, 999]).unwrap();
        assert!(l.is_finite() && l > 0.0, "{l}");
        assert_eq!(l, e.loss(&m.params.values, &[0, 5, 999]).unwrap());
        let n = e.len();
        assert!(
            e.loss(&m.params.values, &[n])
                .unwrap_err()
                .contains("outside")
        );
        let part = EngineEvaluator::from_spec(&m, "mnist", Some("10..20")).unwrap();
        assert_eq!(part.len(), 10);
        assert!(EngineEvaluator::from_spec(&m, "mnist", Some("0..99999999")).is_err());
        let bad = EngineEvaluator::from_spec(&m, "floppy:/dev/fd0", None)
            .err()
            .unwrap();
        assert!(format!("{bad:#}").contains("scoring.validation"), "{bad:#}");
        let bare = ModelBlob {
            onnx_graph: Default::default(),
            params: m.params.clone(),
        };
        assert!(EngineEvaluator::from_spec(&bare, "mnist", None).is_err());
    }
}
