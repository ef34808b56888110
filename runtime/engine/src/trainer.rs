//! One round of local training on the aggregator's model: what a device
//! runs when it takes a task. The device crate wraps [`OnnxTrainer`] in
//! its `Trainer` trait; nothing here knows the protocol or the network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fedge_proto::ModelBlob;
use fedge_proto::msg::TrainingPlan;

use crate::data::Dataset;
use crate::train::compile::CompileOptions;
use crate::train::exec::Executor;
use crate::train::gpu::ExecutorKind;

/// What one round of local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalUpdate {
    /// New parameters minus the received ones, in the canonical layout.
    pub delta: Vec<f32>,
    /// Samples the update was trained on (the local data set's size).
    pub sample_count: u64,
    /// Named training metrics (`train_loss`, `steps`).
    pub metrics: Vec<(String, f64)>,
}

/// Trains the aggregator's ONNX model on local data with the chosen
/// executor (tract by default; see [`OnnxTrainer::with_executor`]). The
/// compiled step is kept across rounds and recompiled only when the graph
/// or the plan's compile-time settings change.
pub struct OnnxTrainer {
    data: Dataset,
    /// The device's own held-out data, for evaluation tasks.
    holdout: Option<Dataset>,
    /// Inference for evaluation, kept while the graph is the same.
    inference: Option<([u8; 32], crate::train::exec::TractInference)>,
    seed: u64,
    executor: ExecutorKind,
    threads: usize,
    cache: Option<(CacheKey, Box<dyn Executor>)>,
    shared: Option<SharedSteps>,
}

/// Training steps compiled once for every trainer of a process that
/// shares them ([`OnnxTrainer::with_shared_steps`]; a simulation's
/// devices): one per model graph and compile options. Such a trainer
/// compiles nothing of its own and keeps no executor between rounds: its
/// parameters and optimizer state live while it trains. A step per device
/// was megabytes for each device that ever trained. Tract (CPU) only.
#[derive(Clone, Default)]
pub struct SharedSteps(Arc<Mutex<HashMap<CacheKey, crate::train::exec::CompiledStep>>>);

/// Steps a [`SharedSteps`] keeps (a model and its plan's settings each);
/// past it the oldest are forgotten (compiled again when asked for).
const SHARED_STEPS_MAX: usize = 8;

impl SharedSteps {
    /// The step for `key`, compiled by `compile` the first time (under the
    /// lock: trainers asking meanwhile wait for it rather than compile it
    /// too).
    fn get(
        &self,
        key: &CacheKey,
        compile: impl FnOnce() -> anyhow::Result<crate::train::exec::CompiledStep>,
    ) -> anyhow::Result<crate::train::exec::CompiledStep> {
        let mut steps = self.0.lock().expect("shared steps lock");
        if let Some(s) = steps.get(key) {
            return Ok(s.clone());
        }
        let step = compile()?;
        if steps.len() >= SHARED_STEPS_MAX {
            steps.clear();
        }
        steps.insert(key.clone(), step.clone());
        Ok(step)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    graph: [u8; 32],
    opts: String,
}

/// Compile options for a training plan.
pub fn compile_options(plan: &TrainingPlan) -> CompileOptions {
    use crate::train::compile::{Mode, OptimizerSpec};
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
        ..CompileOptions::default()
    }
}

impl OnnxTrainer {
    pub fn new(data: Dataset, seed: u64) -> Self {
        OnnxTrainer {
            data,
            holdout: None,
            inference: None,
            seed,
            executor: ExecutorKind::Cpu,
            threads: 1,
            cache: None,
            shared: None,
        }
    }

    /// Train (with tract) on steps compiled once and shared with the other
    /// trainers holding `steps` (see [`SharedSteps`]); another executor
    /// kind compiles its own.
    pub fn with_shared_steps(mut self, steps: SharedSteps) -> Self {
        self.shared = Some(steps);
        self
    }

    /// Train with `kind`: cpu (tract), gpu (wgpu; training fails without a
    /// usable GPU) or auto (a hardware GPU when usable, else tract, logged).
    pub fn with_executor(mut self, kind: ExecutorKind) -> Self {
        self.executor = kind;
        self
    }

    /// CPU threads for the training step's matrix products (at least 1;
    /// the GPU executor ignores it).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    pub fn data(&self) -> &Dataset {
        &self.data
    }

    /// Keep `holdout` (never trained on) for evaluation tasks; an empty
    /// set is none.
    pub fn with_holdout(mut self, holdout: Dataset) -> Self {
        self.holdout = (!holdout.is_empty()).then_some(holdout);
        self
    }

    /// Whether it keeps held-out data.
    pub fn has_holdout(&self) -> bool {
        self.holdout.is_some()
    }

    /// Evaluates `model` on the held-out data (with tract, on the CPU):
    /// None when this trainer has none.
    pub fn evaluate_model(
        &mut self,
        model: &ModelBlob,
    ) -> anyhow::Result<Option<crate::train::local::EvalStats>> {
        let Some(holdout) = &self.holdout else {
            return Ok(None);
        };
        let graph_hash = *blake3::hash(&model.onnx_graph).as_bytes();
        if self.inference.as_ref().map(|(h, _)| h) != Some(&graph_hash) {
            let graph = crate::train::import::ModelGraph::from_blob(model)?;
            let inf = crate::train::exec::TractInference::new(&graph, 64)?;
            self.inference = Some((graph_hash, inf));
        }
        let (_, inf) = self.inference.as_mut().expect("just set");
        inf.load(&model.params.values)?;
        Ok(Some(crate::train::local::evaluate(inf, holdout)?))
    }

    /// Train round `round_id` of `model` under `plan` on the local data,
    /// starting from the model's parameters; the round's seed is
    /// `seed ^ round_id`.
    pub fn train_round(
        &mut self,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<LocalUpdate> {
        let opts = CompileOptions {
            threads: self.threads,
            ..compile_options(plan)
        };
        let key = CacheKey {
            graph: *blake3::hash(&model.onnx_graph).as_bytes(),
            // The LoRA spec too: a graph is checked against it once.
            opts: format!("{opts:?} {:?}", plan.lora),
        };
        if let (Some(shared), ExecutorKind::Cpu) = (&self.shared, self.executor) {
            let step = shared.get(&key, || {
                let graph = checked_graph(model, plan)?;
                let step = crate::train::exec::CompiledStep::new(&graph, &opts)?;
                tracing::info!("training step compiled (shared)");
                Ok(step)
            })?;
            let mut ex = crate::train::exec::TractExecutor::from_compiled(&step, opts)?;
            return self.train_on(&mut ex, round_id, model, plan);
        }
        if self.cache.as_ref().map(|(k, _)| k) != Some(&key) {
            let graph = checked_graph(model, plan)?;
            let ex = crate::train::gpu::select_executor(self.executor, &graph, opts)?;
            tracing::info!(executor = %ex.name(), "training step compiled");
            self.cache = Some((key, ex));
        }
        let (key, mut ex) = self.cache.take().expect("just set");
        let out = self.train_on(ex.as_mut(), round_id, model, plan);
        self.cache = Some((key, ex));
        out
    }

    /// One round on `ex`, from the model's parameters.
    fn train_on(
        &self,
        ex: &mut dyn Executor,
        round_id: u64,
        model: &ModelBlob,
        plan: &TrainingPlan,
    ) -> anyhow::Result<LocalUpdate> {
        ex.load(&model.params.values)?;
        let stats =
            crate::train::local::train(ex, &self.data, plan, self.seed ^ round_id, |_, _, _| {})?;
        let new = ex.params()?;
        let delta: Vec<f32> = new
            .iter()
            .zip(&model.params.values)
            .map(|(n, o)| n - o)
            .collect();
        Ok(LocalUpdate {
            delta,
            sample_count: self.data.len() as u64,
            metrics: vec![
                ("train_loss".into(), stats.mean_loss),
                ("steps".into(), stats.steps as f64),
            ],
        })
    }
}

/// The model's graph, checked against the LoRA adapters the plan names
/// (every device trains those: a model without them, or with others, is
/// not this round's).
fn checked_graph(
    model: &ModelBlob,
    plan: &TrainingPlan,
) -> anyhow::Result<crate::train::import::ModelGraph> {
    if let Some(spec) = &plan.lora {
        crate::train::lora::check(model, spec)?;
    }
    Ok(crate::train::import::ModelGraph::from_blob(model)?)
}
