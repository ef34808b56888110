//! What lowering produces: values, kernel launches and the program that
//! holds them.

/// How a value's words are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    F32 = 0,
    I32 = 1,
    Bool = 2,
}

/// A WGSL entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Eltwise,
    Copy,
    Gather,
    Pool,
    ReduceThread,
    ReduceGroup,
    Softmax,
    LayerNorm,
    CumSum,
    GemmSmall,
    GemmBig,
    ConvSmall,
    ConvBig,
    Trilu,
}

/// The WGSL module a kernel lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    Reduce,
    Gemm,
    Conv,
}

impl Kernel {
    pub fn module(self) -> Module {
        match self {
            Kernel::Eltwise | Kernel::Copy | Kernel::Gather | Kernel::Pool | Kernel::Trilu => {
                Module::Elementwise
            }
            Kernel::ReduceThread
            | Kernel::ReduceGroup
            | Kernel::Softmax
            | Kernel::LayerNorm
            | Kernel::CumSum => Module::Reduce,
            Kernel::GemmSmall | Kernel::GemmBig => Module::Gemm,
            Kernel::ConvSmall | Kernel::ConvBig => Module::Conv,
        }
    }

    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::Eltwise => "eltwise",
            Kernel::Copy => "copy_strided",
            Kernel::Gather => "gather",
            Kernel::Pool => "pool",
            Kernel::Trilu => "trilu",
            Kernel::ReduceThread => "reduce_thread",
            Kernel::ReduceGroup => "reduce_group",
            Kernel::Softmax => "softmax",
            Kernel::LayerNorm => "layer_norm",
            Kernel::CumSum => "cumsum",
            Kernel::GemmSmall | Kernel::ConvSmall => "mm_small",
            Kernel::GemmBig | Kernel::ConvBig => "mm_big",
        }
    }
}

/// Where a value's words come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// Written by a launch of this step.
    Temp,
    /// The model input batch.
    Input,
    Labels,
    Lr,
    WdStep,
    /// Parameter `i` of the layout.
    Param(usize),
    /// Optimizer state input `i`.
    State(usize),
    /// FedProx anchor `i` (per trainable parameter).
    Prox(usize),
    /// Uploaded once.
    Const(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub words: usize,
    pub ty: Ty,
    pub role: Role,
}

/// One dispatch: `kernel` over `inputs` (at most three) into `output`.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: Kernel,
    pub params: Vec<u32>,
    pub inputs: Vec<usize>,
    pub output: usize,
    /// Workgroups in x, y, z.
    pub groups: [u32; 3],
    /// The ONNX node this launch computes (for messages).
    pub node: String,
}

/// A training step as launches over values packed into buffers.
#[derive(Clone, Debug)]
pub struct Program {
    pub values: Vec<Value>,
    pub launches: Vec<Launch>,
    pub input: usize,
    pub labels: usize,
    pub lr: usize,
    pub wd_step: usize,
    /// Per layout tensor.
    pub params: Vec<usize>,
    pub states: Vec<usize>,
    pub prox: Vec<usize>,
    pub loss: usize,
    /// Per trainable parameter, the value holding its new weights.
    pub new_params: Vec<usize>,
    /// Per state input, the value holding its new state.
    pub new_states: Vec<usize>,
    /// Buffer of each value.
    pub buffer_of: Vec<usize>,
    /// Size of each buffer in words.
    pub buffer_words: Vec<usize>,
    /// When the model input is used as Gather indices: the smallest axis
    /// length it indexes (inputs are checked against it before upload).
    pub input_index_bound: Option<usize>,
}

impl Program {
    /// The launches' kernels, each once.
    pub fn kernels(&self) -> Vec<Kernel> {
        let mut seen = Vec::new();
        for l in &self.launches {
            if !seen.contains(&l.kernel) {
                seen.push(l.kernel);
            }
        }
        seen
    }
}
