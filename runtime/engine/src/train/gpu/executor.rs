//! [`GpuExecutor`]: a lowered training step on the shared wgpu device.

use std::sync::Arc;

use fedge_proto::ParamLayout;
use fedge_proto::msg::Optimizer;

use super::GpuError;
use super::device::{BINDINGS, Gpu, shared};
use super::lower::{Program, Role, lower};
use crate::train::TrainError;
use crate::train::compile::{CompileOptions, Lowering, TrainingGraph, compile_training};
use crate::train::exec::{Batch, Executor, Labels};
use crate::train::import::ModelGraph;
use crate::train::onnx::I64;

struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
}

/// The training step as WGSL kernels. Parameters and optimizer state stay
/// in GPU buffers between steps.
pub struct GpuExecutor {
    gpu: Arc<Gpu>,
    graph: TrainingGraph,
    program: Program,
    layout: Arc<ParamLayout>,
    opts: CompileOptions,
    buffers: Vec<wgpu::Buffer>,
    dispatches: Vec<Dispatch>,
    loss_readback: wgpu::Buffer,
    t: u64,
}

fn words_to_bytes(w: impl IntoIterator<Item = u32>) -> Vec<u8> {
    w.into_iter().flat_map(u32::to_le_bytes).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    words_to_bytes(v.iter().map(|x| x.to_bits()))
}

fn i64_words(v: &[i64], what: &str, bound: Option<usize>) -> Result<Vec<u8>, TrainError> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for &x in v {
        let w = i32::try_from(x)
            .map_err(|_| TrainError::BadInput(format!("{what} value {x} exceeds 32 bits")))?;
        if let Some(b) = bound
            && (x < -(b as i64) || x >= b as i64)
        {
            return Err(TrainError::BadInput(format!(
                "{what} value {x} is outside the embedding's {b} rows"
            )));
        }
        out.extend_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

impl GpuExecutor {
    /// Compile the training step for `graph` and prepare it on the GPU.
    pub fn new(graph: &ModelGraph, mut opts: CompileOptions) -> Result<Self, TrainError> {
        // The GPU interprets standard ONNX ops, not fedge's tract kernels.
        opts.lowering = Lowering::Portable;
        let tg = compile_training(graph, &opts)?;
        let program = lower(&tg, graph.layout.tensors().len())?;
        let gpu = shared()?;
        let max_binding = gpu.limits.max_storage_buffer_binding_size;
        let buffers = program
            .buffer_words
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let bytes = 4 * w as u64;
                if bytes > max_binding {
                    return Err(GpuError::Device(format!(
                        "a {bytes}-byte tensor exceeds the adapter's {max_binding}-byte storage binding limit; lower the batch size"
                    )));
                }
                Ok(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("fedge buffer {i}")),
                    size: bytes,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }))
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        for (v, val) in program.values.iter().enumerate() {
            if let Role::Const(words) = &val.role {
                gpu.queue.write_buffer(
                    &buffers[program.buffer_of[v]],
                    0,
                    &words_to_bytes(words.iter().copied()),
                );
            }
        }
        let unused = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("fedge unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut dispatches = Vec::with_capacity(program.launches.len());
        for l in &program.launches {
            let pipeline = gpu.pipeline(l.kernel)?;
            let params = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("fedge params {}", l.node)),
                size: 4 * l.params.len().max(1) as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            gpu.queue
                .write_buffer(&params, 0, &words_to_bytes(l.params.iter().copied()));
            let buf = |v: usize| &buffers[program.buffer_of[v]];
            let entries: Vec<wgpu::BindGroupEntry> = (0..BINDINGS)
                .map(|b| {
                    let resource = match b {
                        0 => params.as_entire_binding(),
                        4 => buf(l.output).as_entire_binding(),
                        i => match l.inputs.get(i as usize - 1) {
                            Some(&v) => buf(v).as_entire_binding(),
                            None => unused.as_entire_binding(),
                        },
                    };
                    wgpu::BindGroupEntry {
                        binding: b,
                        resource,
                    }
                })
                .collect();
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&l.node),
                layout: &gpu.bind_layout,
                entries: &entries,
            });
            dispatches.push(Dispatch {
                pipeline,
                bind_group,
                groups: l.groups,
            });
        }
        let loss_readback = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("fedge loss read-back"),
            size: 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.check()?;
        let mut ex = GpuExecutor {
            gpu,
            graph: tg,
            program,
            layout: Arc::clone(&graph.layout),
            opts,
            buffers,
            dispatches,
            loss_readback,
            t: 0,
        };
        let zeros = vec![0.0; ex.layout.dimension()];
        ex.load(&zeros)?;
        Ok(ex)
    }

    fn buffer(&self, value: usize) -> &wgpu::Buffer {
        &self.buffers[self.program.buffer_of[value]]
    }

    /// The adapter this executor runs on.
    pub fn adapter(&self) -> &super::AdapterSummary {
        &self.gpu.adapter
    }

    /// Kernel launches per step.
    pub fn launches_per_step(&self) -> usize {
        self.dispatches.len()
    }

    fn upload_batch(&self, x: Batch<'_>, y: Labels<'_>) -> Result<(), TrainError> {
        let g = &self.graph;
        let n: usize = g.input_shape.iter().product();
        let (len, is_int) = match x {
            Batch::F32(v) => (v.len(), false),
            Batch::I64(v) => (v.len(), true),
        };
        if len != n {
            return Err(TrainError::BadInput(format!(
                "batch has {len} values, the graph expects {n} ({:?})",
                g.input_shape
            )));
        }
        if is_int != (g.input_type == I64) {
            return Err(TrainError::BadInput(
                "batch element type does not match the model input".into(),
            ));
        }
        let xb = match x {
            Batch::F32(v) => f32_bytes(v),
            Batch::I64(v) => i64_words(v, "input", self.program.input_index_bound)?,
        };
        let labels: usize = g.label_shape.iter().product();
        let yb = match y {
            Labels::Classes(c) if g.label_type == I64 && c.len() == labels => {
                i64_words(c, "label", None)?
            }
            Labels::Targets(t) if g.label_type != I64 && t.len() == labels => f32_bytes(t),
            _ => {
                return Err(TrainError::BadInput(format!(
                    "labels do not match the loss (expected {labels} {})",
                    if g.label_type == I64 {
                        "class indices"
                    } else {
                        "targets"
                    }
                )));
            }
        };
        let q = &self.gpu.queue;
        q.write_buffer(self.buffer(self.program.input), 0, &xb);
        q.write_buffer(self.buffer(self.program.labels), 0, &yb);
        Ok(())
    }
}

impl Executor for GpuExecutor {
    fn name(&self) -> String {
        format!("wgpu: {}", self.gpu.adapter)
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
        let q = &self.gpu.queue;
        for (i, &v) in self.program.params.iter().enumerate() {
            q.write_buffer(self.buffer(v), 0, &f32_bytes(&values[self.layout.range(i)]));
        }
        for (j, &v) in self.program.prox.iter().enumerate() {
            let i = self.graph.trainable[j];
            q.write_buffer(self.buffer(v), 0, &f32_bytes(&values[self.layout.range(i)]));
        }
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fedge load"),
            });
        for &v in &self.program.states {
            enc.clear_buffer(self.buffer(v), 0, None);
        }
        q.submit([enc.finish()]);
        self.gpu.check()?;
        self.t = 0;
        Ok(())
    }

    fn step(&mut self, x: Batch<'_>, y: Labels<'_>, lr: f32) -> Result<f32, TrainError> {
        self.upload_batch(x, y)?;
        let o = &self.opts.optimizer;
        let (lr_eff, wd_step) = match o.kind {
            Optimizer::Sgd => (lr, 0.0),
            Optimizer::Adam | Optimizer::AdamW => {
                let t = (self.t + 1) as i32;
                let bc = (1.0 - o.beta2.powi(t)).sqrt() / (1.0 - o.beta1.powi(t));
                (lr * bc, lr * o.weight_decay)
            }
        };
        let q = &self.gpu.queue;
        q.write_buffer(self.buffer(self.program.lr), 0, &f32_bytes(&[lr_eff]));
        q.write_buffer(self.buffer(self.program.wd_step), 0, &f32_bytes(&[wd_step]));
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fedge step"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fedge step"),
                timestamp_writes: None,
            });
            for d in &self.dispatches {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
        }
        // New parameters and state replace the old ones on the GPU.
        let p = &self.program;
        let trainable_params = self.graph.trainable.iter().map(|&i| p.params[i]);
        for (src, dst) in p
            .new_params
            .iter()
            .copied()
            .zip(trainable_params)
            .chain(p.new_states.iter().copied().zip(p.states.iter().copied()))
        {
            let (s, d) = (p.buffer_of[src], p.buffer_of[dst]);
            if s != d {
                let bytes = 4 * p.values[dst].words as u64;
                enc.copy_buffer_to_buffer(&self.buffers[s], 0, &self.buffers[d], 0, bytes);
            }
        }
        enc.copy_buffer_to_buffer(self.buffer(p.loss), 0, &self.loss_readback, 0, 4);
        q.submit([enc.finish()]);
        let bytes = self.gpu.read(&self.loss_readback, 4)?;
        self.t += 1;
        Ok(f32::from_le_bytes(
            bytes[..4].try_into().expect("4 bytes read back"),
        ))
    }

    fn params(&self) -> Result<Vec<f32>, TrainError> {
        let total = 4 * self.layout.dimension() as u64;
        let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("fedge params read-back"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("fedge params"),
            });
        for (i, &v) in self.program.params.iter().enumerate() {
            let r = self.layout.range(i);
            let bytes = 4 * r.len() as u64;
            if bytes > 0 {
                enc.copy_buffer_to_buffer(self.buffer(v), 0, &staging, 4 * r.start as u64, bytes);
            }
        }
        self.gpu.queue.submit([enc.finish()]);
        let bytes = self.gpu.read(&staging, total.max(4))?;
        Ok(bytes
            .chunks_exact(4)
            .take(self.layout.dimension())
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
}
