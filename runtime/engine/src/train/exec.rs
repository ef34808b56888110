//! Executors run a compiled training step. [`TractExecutor`] is the CPU
//! default; a GPU executor implements the same [`Executor`] trait.

use std::sync::Arc;

use fedge_proto::msg::Optimizer;
use tract_onnx::prelude::*;

use super::TrainError;
use super::compile::{CompileOptions, Mode, TrainingGraph, compile_inference, compile_training};
use super::import::ModelGraph;
use super::onnx::I64;

/// One batch of model inputs, flat in row-major order.
#[derive(Clone, Copy, Debug)]
pub enum Batch<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// One batch of labels: class indices (cross-entropy) or targets (MSE).
#[derive(Clone, Copy, Debug)]
pub enum Labels<'a> {
    Classes(&'a [i64]),
    Targets(&'a [f32]),
}

/// Runs training steps on some hardware.
pub trait Executor: Send {
    /// Human-readable name ("tract-cpu", "wgpu: <adapter>").
    fn name(&self) -> String;
    /// The batch size the step was compiled for.
    fn batch_size(&self) -> usize;
    /// Load every parameter (canonical layout) and reset optimizer state.
    fn load(&mut self, params: &[f32]) -> Result<(), TrainError>;
    /// One training step at learning rate `lr`; returns the batch loss.
    fn step(&mut self, x: Batch<'_>, y: Labels<'_>, lr: f32) -> Result<f32, TrainError>;
    /// The current parameters in the canonical layout.
    fn params(&self) -> Result<Vec<f32>, TrainError>;
}

type Plan = Arc<TypedRunnableModel>;

/// Optimize and plan an ONNX model with tract, on one thread.
pub fn plan(model: &tract_onnx::pb::ModelProto) -> Result<Plan, TrainError> {
    plan_threads(model, 1)
}

/// Optimize and plan an ONNX model with tract; its matrix products spread
/// over `threads` threads (a pool private to the plan) when more than one.
/// fedge's own ops ([`super::kernels`]) are registered.
pub fn plan_threads(
    model: &tract_onnx::pb::ModelProto,
    threads: usize,
) -> Result<Plan, TrainError> {
    #[cfg(feature = "threads")]
    let executor = (threads > 1).then(|| {
        tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread_with_name(
            threads, "fedge",
        )
    });
    #[cfg(not(feature = "threads"))]
    let executor = {
        if threads > 1 {
            tracing::warn!(
                "fedge-engine was built without the `threads` feature: training on one thread"
            );
        }
        None
    };
    let options = RunOptions {
        executor,
        ..RunOptions::default()
    };
    super::kernels::onnx()
        .model_for_proto_model(model)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable_with_options(&options))
        .map_err(TrainError::tract)
}

/// Keep a training step's tensors in glibc's heap, where the next step
/// reuses them, instead of fresh `mmap`s: glibc maps large blocks (its
/// threshold starts at 128 KiB and moves with what is freed) and returns
/// them on free, so each step would fault its large tensors' pages in
/// again, and the heap's top is trimmed and regrown. A fixed 32 MiB
/// threshold (glibc's largest) and a 64 MiB trim threshold make a step's
/// allocations a steady pattern in the heap: resident memory stays at the
/// step's peak, with no page faults after the first step. Process-wide,
/// once; a no-op off glibc. (A binary that installs
/// [`crate::alloc::StepAlloc`] keeps blocks of 256 KiB and more out of
/// the heap altogether.)
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            unsafe extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes allocator tuning parameters;
            // both values are within glibc's accepted ranges.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 64 << 20);
            }
        });
    }
}

/// Time spent in one node of a plan over the profiled steps.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeTime {
    /// The node's name and tract's op.
    pub node: String,
    pub ms: f64,
}

fn tensor_f32(shape: &[usize], data: &[f32]) -> Result<Tensor, TrainError> {
    Tensor::from_shape(shape, data).map_err(TrainError::tract)
}

fn batch_tensor(shape: &[usize], ty: i32, x: Batch<'_>) -> Result<Tensor, TrainError> {
    let n: usize = shape.iter().product();
    let (len, t) = match x {
        Batch::F32(v) => (v.len(), Tensor::from_shape(shape, v)),
        Batch::I64(v) => (v.len(), Tensor::from_shape(shape, v)),
    };
    if len != n {
        return Err(TrainError::BadInput(format!(
            "batch has {len} values, the graph expects {n} ({shape:?})"
        )));
    }
    if matches!(x, Batch::I64(_)) != (ty == I64) {
        return Err(TrainError::BadInput(
            "batch element type does not match the model input".into(),
        ));
    }
    t.map_err(TrainError::tract)
}

fn read_f32(t: &Tensor) -> Result<&[f32], TrainError> {
    t.try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>())
        .map_err(TrainError::tract)
}

/// A training step compiled (and planned by tract) once: every executor
/// of the same model and options can share it ([`TractExecutor::from_compiled`],
/// as a simulation's thousands of devices do), each holding only its own
/// parameters and optimizer state. Compiled per device, the step and its
/// plan were megabytes each.
#[derive(Clone)]
pub struct CompiledStep {
    graph: Arc<TrainingGraph>,
    plan: Plan,
    layout: Arc<fedge_proto::ParamLayout>,
}

impl CompiledStep {
    pub fn new(graph: &ModelGraph, opts: &CompileOptions) -> Result<Self, TrainError> {
        let tg = compile_training(graph, opts)?;
        let plan = plan_threads(&tg.model, opts.threads.max(1))?;
        Ok(CompiledStep {
            graph: Arc::new(tg),
            plan,
            layout: Arc::clone(&graph.layout),
        })
    }
}

/// The training step on CPU through tract.
pub struct TractExecutor {
    graph: Arc<TrainingGraph>,
    plan: Plan,
    layout: Arc<fedge_proto::ParamLayout>,
    params: Vec<Arc<Tensor>>,
    state: Vec<Arc<Tensor>>,
    global: Vec<Arc<Tensor>>,
    opts: CompileOptions,
    t: u64,
    /// A step that failed after the trainable parameters and the state
    /// were handed to it ([`TractExecutor::hand_over`]): they are gone
    /// until the next [`Executor::load`].
    lost: bool,
}

impl TractExecutor {
    pub fn new(graph: &ModelGraph, opts: CompileOptions) -> Result<Self, TrainError> {
        let step = CompiledStep::new(graph, &opts)?;
        Self::from_compiled(&step, opts)
    }

    /// An executor of a step compiled already with the same `opts`.
    pub fn from_compiled(step: &CompiledStep, opts: CompileOptions) -> Result<Self, TrainError> {
        tune_allocator();
        let CompiledStep {
            graph,
            plan,
            layout,
        } = step.clone();
        let mut ex = TractExecutor {
            graph,
            plan,
            params: Vec::new(),
            state: Vec::new(),
            global: Vec::new(),
            layout,
            opts,
            t: 0,
            lost: false,
        };
        let zeros = vec![0.0; ex.layout.dimension()];
        ex.load(&zeros)?;
        Ok(ex)
    }

    pub fn training_graph(&self) -> &TrainingGraph {
        &self.graph
    }

    fn inputs(&self, x: Batch<'_>, y: Labels<'_>, lr: f32) -> Result<TVec<TValue>, TrainError> {
        let g = &self.graph;
        let mut v: TVec<TValue> =
            tvec![batch_tensor(&g.input_shape, g.input_type, x)?.into_tvalue()];
        let labels = match y {
            Labels::Classes(c) if g.label_type == I64 => Tensor::from_shape(&g.label_shape, c),
            Labels::Targets(t) if g.label_type != I64 => Tensor::from_shape(&g.label_shape, t),
            _ => return Err(TrainError::BadInput("labels do not match the loss".into())),
        }
        .map_err(|e| TrainError::BadInput(format!("labels: {e}")))?;
        v.push(labels.into_tvalue());
        if g.mode == Mode::Step {
            let o = &self.opts.optimizer;
            let (lr_eff, wd_step) = match o.kind {
                Optimizer::Sgd => (lr, 0.0),
                Optimizer::Adam | Optimizer::AdamW => {
                    let t = (self.t + 1) as i32;
                    let bc = (1.0 - o.beta2.powi(t)).sqrt() / (1.0 - o.beta1.powi(t));
                    (lr * bc, lr * o.weight_decay)
                }
            };
            v.push(tensor0(lr_eff).into_tvalue());
            v.push(tensor0(wd_step).into_tvalue());
        }
        v.extend(self.params.iter().map(|p| Arc::clone(p).into_tvalue()));
        v.extend(self.state.iter().map(|p| Arc::clone(p).into_tvalue()));
        if g.prox {
            v.extend(self.global.iter().map(|p| Arc::clone(p).into_tvalue()));
        }
        Ok(v)
    }

    fn check_step(&self) -> Result<(), TrainError> {
        if self.graph.mode != Mode::Step {
            return Err(TrainError::BadInput(
                "compiled for gradients, not steps".into(),
            ));
        }
        self.check_not_lost()
    }

    fn check_not_lost(&self) -> Result<(), TrainError> {
        if self.lost {
            return Err(TrainError::BadInput(
                "an earlier step failed and took the parameters with it: load them again".into(),
            ));
        }
        Ok(())
    }

    /// Drop the executor's references to the trainable parameters and the
    /// optimizer state once `inputs` holds them: the step then holds the
    /// only ones, and the fused update (`FedgeSgd`) writes the new values
    /// over the old instead of allocating a second copy. The step's
    /// outputs replace them ([`Self::finish_step`]); a failed step leaves
    /// the executor [`Self::lost`].
    fn hand_over(&mut self) {
        let none = Arc::new(Tensor::zero::<f32>(&[0]).expect("an empty tensor"));
        for &i in &self.graph.trainable {
            self.params[i] = Arc::clone(&none);
        }
        for s in self.state.iter_mut() {
            *s = Arc::clone(&none);
        }
        self.lost = true;
    }

    /// Take a step's outputs: the loss, then the new parameters and state.
    fn finish_step(&mut self, out: TVec<TValue>) -> Result<f32, TrainError> {
        let loss = read_f32(&out[0])?[0];
        let k = self.graph.trainable.len();
        let mut it = out.into_iter().skip(1);
        for &i in &self.graph.trainable {
            self.params[i] = it.next().expect("param output").into_arc_tensor();
        }
        for s in self.state.iter_mut() {
            *s = it.next().expect("state output").into_arc_tensor();
        }
        debug_assert_eq!(self.state.len(), k * self.graph.state_per_param);
        self.lost = false;
        self.t += 1;
        Ok(loss)
    }

    /// One training step like [`Executor::step`], adding the time spent in
    /// each node of tract's plan to `times` (keyed by node, in plan order).
    pub fn step_profiled(
        &mut self,
        x: Batch<'_>,
        y: Labels<'_>,
        lr: f32,
        times: &mut Vec<NodeTime>,
    ) -> Result<f32, TrainError> {
        self.check_step()?;
        let inputs = self.inputs(x, y, lr)?;
        let mut state = self.plan.spawn().map_err(TrainError::tract)?;
        self.hand_over();
        let mut seen = 0usize;
        let out = state
            .run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let start = std::time::Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                let ms = start.elapsed().as_secs_f64() * 1e3;
                // The plan's order is fixed: the n-th node evaluated is the
                // same node every step.
                match times.get_mut(seen) {
                    Some(t) => t.ms += ms,
                    None => times.push(NodeTime {
                        node: format!("{} ({})", node.name, node.op().name()),
                        ms,
                    }),
                }
                seen += 1;
                r
            })
            .map_err(TrainError::tract)?;
        drop(state);
        self.finish_step(out)
    }

    /// Loss and gradients (for a graph compiled with [`Mode::Gradients`]).
    pub fn gradients(
        &mut self,
        x: Batch<'_>,
        y: Labels<'_>,
    ) -> Result<(f32, Vec<Vec<f32>>), TrainError> {
        if self.graph.mode != Mode::Gradients {
            return Err(TrainError::BadInput(
                "compiled for steps, not gradients".into(),
            ));
        }
        let out = self
            .plan
            .run(self.inputs(x, y, 0.0)?)
            .map_err(TrainError::tract)?;
        let loss = read_f32(&out[0])?[0];
        let grads = out[1..]
            .iter()
            .map(|t| read_f32(t).map(|s| s.to_vec()))
            .collect::<Result<_, _>>()?;
        Ok((loss, grads))
    }
}

impl Executor for TractExecutor {
    fn name(&self) -> String {
        "tract-cpu".into()
    }

    fn batch_size(&self) -> usize {
        self.graph.batch
    }

    fn load(&mut self, values: &[f32]) -> Result<(), TrainError> {
        if values.len() != self.layout.dimension() {
            return Err(TrainError::BadInput(format!(
                "{} parameters given, the model has {}",
                values.len(),
                self.layout.dimension()
            )));
        }
        self.params = self
            .layout
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| tensor_f32(&t.shape, &values[self.layout.range(i)]).map(Arc::new))
            .collect::<Result<_, _>>()?;
        // State inputs are ordered per trainable parameter, its states together.
        let mut state = Vec::new();
        for &i in &self.graph.trainable {
            let shape = &self.layout.tensors()[i].shape;
            for _ in 0..self.graph.state_per_param {
                state.push(Arc::new(
                    Tensor::zero::<f32>(shape).map_err(TrainError::tract)?,
                ));
            }
        }
        self.state = state;
        self.global = if self.graph.prox {
            self.graph
                .trainable
                .iter()
                .map(|&i| Arc::clone(&self.params[i]))
                .collect()
        } else {
            Vec::new()
        };
        self.t = 0;
        self.lost = false;
        // Training starts from here: give back what compiling (or an
        // earlier run) left free, so that the steps' blocks are all that
        // [`crate::alloc::StepAlloc`] caches.
        crate::alloc::trim();
        Ok(())
    }

    fn step(&mut self, x: Batch<'_>, y: Labels<'_>, lr: f32) -> Result<f32, TrainError> {
        self.check_step()?;
        let inputs = self.inputs(x, y, lr)?;
        self.hand_over();
        let out = self.plan.run(inputs).map_err(TrainError::tract);
        crate::alloc::step_done();
        self.finish_step(out?)
    }

    fn params(&self) -> Result<Vec<f32>, TrainError> {
        self.check_not_lost()?;
        let mut out = Vec::with_capacity(self.layout.dimension());
        for p in &self.params {
            out.extend_from_slice(read_f32(p)?);
        }
        Ok(out)
    }
}

/// Forward passes with the parameters as inputs (evaluation, inference).
pub struct TractInference {
    plan: Plan,
    batch: usize,
    input_shape: Vec<usize>,
    input_type: i32,
    params: Vec<Arc<Tensor>>,
    layout: Arc<fedge_proto::ParamLayout>,
    pub outputs_per_sample: usize,
    /// The output's last axis: classes, or a language model's vocabulary.
    pub classes: usize,
}

impl TractInference {
    pub fn new(graph: &ModelGraph, batch: usize) -> Result<Self, TrainError> {
        let model = compile_inference(graph, batch)?;
        let out_shape = super::shape::infer(graph, batch)?
            .shape(&graph.output)?
            .to_vec();
        let mut input_shape = vec![batch];
        input_shape.extend(graph.sample_shape());
        Ok(TractInference {
            plan: plan(&model)?,
            batch,
            input_shape,
            input_type: graph.input_type,
            params: Vec::new(),
            layout: Arc::clone(&graph.layout),
            outputs_per_sample: out_shape.iter().skip(1).product(),
            classes: out_shape.last().copied().unwrap_or(1),
        })
    }

    /// Each sample's class scores in `out` (what [`Self::run`] returned):
    /// its whole row for a `[batch, classes]` output, the last position's
    /// for a `[batch, T, vocab]` one (a causal language model's prediction
    /// of the token after the window).
    pub fn class_scores<'a>(&self, out: &'a [f32]) -> impl Iterator<Item = &'a [f32]> {
        let skip = self.outputs_per_sample - self.classes;
        out.chunks_exact(self.outputs_per_sample)
            .map(move |row| &row[skip..])
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    pub fn load(&mut self, values: &[f32]) -> Result<(), TrainError> {
        if values.len() != self.layout.dimension() {
            return Err(TrainError::BadInput("parameter count mismatch".into()));
        }
        self.params = self
            .layout
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| tensor_f32(&t.shape, &values[self.layout.range(i)]).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Outputs for one full batch, flat.
    pub fn run(&self, x: Batch<'_>) -> Result<Vec<f32>, TrainError> {
        if self.params.is_empty() {
            return Err(TrainError::BadInput("no parameters loaded".into()));
        }
        let mut v: TVec<TValue> =
            tvec![batch_tensor(&self.input_shape, self.input_type, x)?.into_tvalue()];
        v.extend(self.params.iter().map(|p| Arc::clone(p).into_tvalue()));
        let out = self.plan.run(v).map_err(TrainError::tract)?;
        Ok(read_f32(&out[0])?.to_vec())
    }
}
