//! The process-wide wgpu device, its bind-group layout and the compiled
//! kernel pipelines (built on first use, shared by every executor).

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::GpuError;
use super::lower::{Kernel, Module};

const COMMON: &str = include_str!("kernels/common.wgsl");
const ELEMENTWISE: &str = include_str!("kernels/elementwise.wgsl");
const REDUCE: &str = include_str!("kernels/reduce.wgsl");
const MATMUL: &str = include_str!("kernels/matmul.wgsl");
const GEMM: &str = include_str!("kernels/gemm.wgsl");
const CONV: &str = include_str!("kernels/conv.wgsl");

/// How long a read-back may wait for its mapping after the queue is idle.
const READBACK_MAX: Duration = Duration::from_secs(60);

/// Storage bindings per kernel: parameters, three inputs, the output.
pub const BINDINGS: u32 = 5;

/// Which adapter the GPU executor runs on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// A CPU implementation (lavapipe, WARP, SwiftShader).
    pub software: bool,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.device_type)
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub limits: wgpu::Limits,
    pub bind_layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    modules: Mutex<HashMap<Module, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<Kernel, wgpu::ComputePipeline>>,
    /// Errors wgpu reported outside any call that returns one.
    errors: Arc<Mutex<Vec<String>>>,
}

/// Drive a future that wgpu's native backends resolve without waking.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

static SHARED: OnceLock<Result<Arc<Gpu>, GpuError>> = OnceLock::new();

/// The shared device, created on first use. `WGPU_BACKEND`,
/// `WGPU_ADAPTER_NAME` and `WGPU_POWER_PREF` steer the choice.
pub fn shared() -> Result<Arc<Gpu>, GpuError> {
    SHARED.get_or_init(|| open().map(Arc::new)).clone()
}

/// The adapter the GPU executor would use.
pub fn adapter() -> Result<AdapterSummary, GpuError> {
    shared().map(|g| g.adapter.clone())
}

fn open() -> Result<Gpu, GpuError> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference:
            wgpu::PowerPreference::from_env().unwrap_or(wgpu::PowerPreference::HighPerformance),
        ..Default::default()
    }))
    .map_err(|e| GpuError::NoAdapter {
        reason: e.to_string(),
    })?;
    let info = adapter.get_info();
    let limits = adapter.limits();
    if limits.max_storage_buffers_per_shader_stage < BINDINGS {
        return Err(GpuError::NoAdapter {
            reason: format!(
                "adapter `{}` allows {} storage buffers per shader, the kernels need {BINDINGS}",
                info.name, limits.max_storage_buffers_per_shader_stage
            ),
        });
    }
    let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("fedge"),
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| GpuError::Device(format!("cannot open `{}`: {e}", info.name)))?;
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&errors);
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        tracing::error!("wgpu: {e}");
        sink.lock().expect("error sink").push(e.to_string());
    }));
    let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..BINDINGS)
        .map(|binding| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: binding + 1 < BINDINGS,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let bind_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("fedge kernel bindings"),
        entries: &entries,
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("fedge kernels"),
        bind_group_layouts: &[Some(&bind_layout)],
        immediate_size: 0,
    });
    let gpu = Gpu {
        device,
        queue,
        adapter: AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            software: info.device_type == wgpu::DeviceType::Cpu,
        },
        limits,
        bind_layout,
        pipeline_layout,
        modules: Mutex::new(HashMap::new()),
        pipelines: Mutex::new(HashMap::new()),
        errors,
    };
    gpu.check()?;
    tracing::info!("GPU executor on {}", gpu.adapter);
    Ok(gpu)
}

fn source(m: Module) -> String {
    match m {
        Module::Elementwise => [COMMON, ELEMENTWISE].concat(),
        Module::Reduce => [COMMON, REDUCE].concat(),
        Module::Gemm => [COMMON, GEMM, MATMUL].concat(),
        Module::Conv => [COMMON, CONV, MATMUL].concat(),
    }
}

impl Gpu {
    /// Errors wgpu reported since the last check (validation, device loss).
    pub fn check(&self) -> Result<(), GpuError> {
        let mut errors = self.errors.lock().expect("error sink");
        if errors.is_empty() {
            return Ok(());
        }
        let msg = errors.join("; ");
        errors.clear();
        Err(GpuError::Device(msg))
    }

    /// The compiled pipeline of `k`.
    pub fn pipeline(&self, k: Kernel) -> Result<wgpu::ComputePipeline, GpuError> {
        if let Some(p) = self.pipelines.lock().expect("pipelines").get(&k) {
            return Ok(p.clone());
        }
        let module = {
            let mut modules = self.modules.lock().expect("modules");
            modules
                .entry(k.module())
                .or_insert_with(|| {
                    self.device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(&format!("fedge {:?}", k.module())),
                            source: wgpu::ShaderSource::Wgsl(source(k.module()).into()),
                        })
                })
                .clone()
        };
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(k.entry_point()),
                layout: Some(&self.pipeline_layout),
                module: &module,
                entry_point: Some(k.entry_point()),
                compilation_options: Default::default(),
                cache: None,
            });
        self.check()?;
        self.pipelines
            .lock()
            .expect("pipelines")
            .insert(k, p.clone());
        Ok(p)
    }

    /// Wait until the queue is idle.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Device(e.to_string()))?;
        self.check()
    }

    /// Read `bytes` bytes of `buffer` (a MAP_READ buffer) after the work
    /// submitted so far.
    pub fn read(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, ..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        // Another thread polling the shared device may be the one that
        // runs this callback, a moment after our wait returned.
        let start = Instant::now();
        let mapped = loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Timeout) if start.elapsed() < READBACK_MAX => {
                    self.device
                        .poll(wgpu::PollType::Poll)
                        .map_err(|e| GpuError::Device(e.to_string()))?;
                }
                Err(_) => {
                    return Err(GpuError::Device(format!(
                        "read-back did not complete within {READBACK_MAX:?}"
                    )));
                }
            }
        };
        mapped.map_err(|e| GpuError::Device(format!("reading back: {e}")))?;
        let out = buffer
            .get_mapped_range(..bytes)
            .map_err(|e| GpuError::Device(format!("reading back: {e}")))?
            .to_vec();
        buffer.unmap();
        Ok(out)
    }
}
