//! What the driver calls to train locally: the [`Trainer`] trait,
//! [`KnownUpdate`] for protocol tests, and (feature `engine`) the engine's
//! `OnnxTrainer` as a `Trainer`.

use fedge_proto::ModelBlob;
use fedge_proto::msg::TrainingPlan;

use crate::{EvalOutput, TrainOutput};

/// Local training, run by the driver on a blocking thread.
pub trait Trainer: Send + 'static {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput>;

    /// Evaluates `model` on the device's own held-out data (an evaluation
    /// task); None when the device keeps none, and declines such tasks.
    fn evaluate(&mut self, _model: &ModelBlob) -> anyhow::Result<Option<EvalOutput>> {
        Ok(None)
    }

    /// Whether [`Trainer::evaluate`] has held-out data to evaluate on (the
    /// session then takes evaluation tasks).
    fn can_evaluate(&self) -> bool {
        false
    }
}

/// Sends the same known update every round: `delta = value` on every
/// coordinate, with `sample_count` samples. For protocol tests and
/// end-to-end checks whose aggregate must equal a hand-computed value; real
/// devices train with the ONNX training engine.
#[derive(Clone, Debug)]
pub struct KnownUpdate {
    pub value: f32,
    pub sample_count: u64,
}

impl Trainer for KnownUpdate {
    fn train(
        &mut self,
        _round_id: u64,
        model: &ModelBlob,
        _plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        anyhow::ensure!(self.value.is_finite(), "known update value must be finite");
        Ok(TrainOutput {
            delta: vec![self.value; model.params.values.len()],
            sample_count: self.sample_count,
            metrics: vec![("known_update".into(), f64::from(self.value))],
        })
    }
}

/// The engine's trainer, which runs real local training; with the
/// `engine` feature it is a [`Trainer`].
#[cfg(feature = "engine")]
pub use fedge_engine::trainer::OnnxTrainer;

#[cfg(feature = "engine")]
impl From<fedge_engine::trainer::LocalUpdate> for TrainOutput {
    fn from(u: fedge_engine::trainer::LocalUpdate) -> Self {
        TrainOutput {
            delta: u.delta,
            sample_count: u.sample_count,
            metrics: u.metrics,
        }
    }
}

#[cfg(feature = "engine")]
impl Trainer for OnnxTrainer {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        Ok(self.train_round(round_id, model, plan)?.into())
    }

    fn can_evaluate(&self) -> bool {
        self.has_holdout()
    }

    fn evaluate(&mut self, model: &ModelBlob) -> anyhow::Result<Option<EvalOutput>> {
        Ok(self.evaluate_model(model)?.map(|s| EvalOutput {
            examples: s.samples as u64,
            loss: s.loss,
            accuracy: s.accuracy,
        }))
    }
}
