//! What the driver calls to train locally.

use fedge_proto::ModelBlob;
use fedge_proto::msg::TrainingPlan;

use crate::TrainOutput;

/// Local training, run by the driver on a blocking thread.
pub trait Trainer: Send + 'static {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput>;
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

/// Trains the aggregator's ONNX model on local data with the chosen
/// executor (tract by default; see [`OnnxTrainer::with_executor`]). The
/// compiled step is kept across rounds and recompiled only when the graph
/// or the plan's compile-time settings change.
pub struct OnnxTrainer {
    data: crate::data::Dataset,
    seed: u64,
    executor: crate::train::gpu::ExecutorKind,
    cache: Option<(CacheKey, Box<dyn crate::train::exec::Executor>)>,
}

#[derive(Clone, Debug, PartialEq)]
struct CacheKey {
    graph: [u8; 32],
    opts: String,
}

/// Compile options for a training plan.
pub fn compile_options(plan: &TrainingPlan) -> crate::train::compile::CompileOptions {
    use crate::train::compile::{CompileOptions, Mode, OptimizerSpec};
    CompileOptions {
        batch: plan.batch_size as usize,
        loss: plan.loss,
        optimizer: OptimizerSpec {
            kind: plan.optimizer,
            momentum: plan.momentum,
            weight_decay: plan.weight_decay,
            ..OptimizerSpec::default()
        },
        freeze: plan.freeze.clone(),
        fedprox_mu: plan.fedprox_mu,
        mode: Mode::Step,
    }
}

impl OnnxTrainer {
    pub fn new(data: crate::data::Dataset, seed: u64) -> Self {
        OnnxTrainer {
            data,
            seed,
            executor: crate::train::gpu::ExecutorKind::Cpu,
            cache: None,
        }
    }

    /// Train with `kind`: cpu (tract), gpu (wgpu; training fails without a
    /// usable GPU) or auto (a hardware GPU when usable, else tract, logged).
    pub fn with_executor(mut self, kind: crate::train::gpu::ExecutorKind) -> Self {
        self.executor = kind;
        self
    }

    pub fn data(&self) -> &crate::data::Dataset {
        &self.data
    }
}

impl Trainer for OnnxTrainer {
    fn train(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<TrainOutput> {
        let opts = compile_options(plan);
        let key = CacheKey {
            graph: *blake3::hash(&model.onnx_graph).as_bytes(),
            opts: format!("{opts:?}"),
        };
        if self.cache.as_ref().map(|(k, _)| k) != Some(&key) {
            let graph = crate::train::import::ModelGraph::from_blob(model)?;
            let ex = crate::train::gpu::select_executor(self.executor, &graph, opts)?;
            tracing::info!(executor = %ex.name(), "training step compiled");
            self.cache = Some((key, ex));
        }
        let (_, ex) = self.cache.as_mut().expect("just set");
        ex.load(&model.params.values)?;
        let stats = crate::train::local::train(
            ex.as_mut(),
            &self.data,
            plan,
            self.seed ^ round_id,
            |_, _, _| {},
        )?;
        let new = ex.params()?;
        let delta: Vec<f32> = new
            .iter()
            .zip(&model.params.values)
            .map(|(n, o)| n - o)
            .collect();
        Ok(TrainOutput {
            delta,
            sample_count: self.data.len() as u64,
            metrics: vec![
                ("train_loss".into(), stats.mean_loss),
                ("steps".into(), stats.steps as f64),
            ],
        })
    }
}
