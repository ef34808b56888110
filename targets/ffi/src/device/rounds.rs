//! What `run_rounds` hands the device loop: a trainer that shapes the
//! host's samples for whatever model arrives and stops at the round limit,
//! the flag guard, and the mapping of driver errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use fedge_device::TrainOutput;
use fedge_device::driver::DriverError;
use fedge_device::trainer::Trainer;
use fedge_engine::train::import::ModelGraph;
use fedge_engine::trainer::OnnxTrainer;
use fedge_proto::ModelBlob;
use fedge_proto::msg::TrainingPlan;

use super::Samples;
use super::model::{input_kind, outputs_per_sample};
use super::train::dataset;
use crate::FedgeError;

pub(super) fn driver_error(e: DriverError) -> FedgeError {
    let detail = e.to_string();
    match e {
        DriverError::Persist { .. } => FedgeError::Storage { detail },
        _ => FedgeError::Network { detail },
    }
}

/// Clears the `running` flag when `run_rounds` ends, however it ends.
pub(super) struct ClearOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The trainer `run_rounds` gives the device loop: the host's samples,
/// shaped for whatever model the aggregator sends, and the round limit.
pub(super) struct RoundTrainer {
    pub(super) samples: Samples,
    pub(super) seed: u64,
    pub(super) rounds_max: u32,
    pub(super) trained: Arc<AtomicU32>,
    pub(super) stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The trainer for the current model's sample shape.
    pub(super) inner: Option<(Vec<usize>, OnnxTrainer)>,
}

impl Trainer for RoundTrainer {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        if self.rounds_max > 0 && self.trained.load(Ordering::SeqCst) >= self.rounds_max {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            anyhow::bail!(
                "round limit of {} reached; not training round {round_id}",
                self.rounds_max
            );
        }
        let graph = ModelGraph::from_blob(model)?;
        let shape = graph.sample_shape();
        if self.inner.as_ref().map(|(s, _)| s) != Some(&shape) {
            let classes = outputs_per_sample(&graph)?;
            let kind = input_kind(&graph)?;
            let data = dataset(self.samples.clone(), shape.clone(), classes, kind)?;
            self.inner = Some((shape, OnnxTrainer::new(data, self.seed)));
        }
        let (_, inner) = self.inner.as_mut().expect("just set");
        let out = inner.train(round_id, model, plan)?;
        self.trained.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }
}
