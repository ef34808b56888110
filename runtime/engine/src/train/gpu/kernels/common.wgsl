// Shared by every fedge kernel module. Every tensor is a run of 32-bit
// words (f32 bits, i32, or a 0/1 bool); `prm` holds the launch's
// parameter words, fixed when the step is lowered.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read> in0: array<u32>;
@group(0) @binding(2) var<storage, read> in1: array<u32>;
@group(0) @binding(3) var<storage, read> in2: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst: array<u32>;

const TY_F32: u32 = 0u;
const TY_I32: u32 = 1u;
const TY_BOOL: u32 = 2u;
const THREADS: u32 = 256u;

fn to_f32(w: u32, ty: u32) -> f32 {
    if (ty == TY_I32) {
        return f32(bitcast<i32>(w));
    }
    if (ty == TY_BOOL) {
        return f32(w);
    }
    return bitcast<f32>(w);
}

fn from_f32(v: f32, ty: u32) -> u32 {
    if (ty == TY_I32) {
        return bitcast<u32>(i32(v));
    }
    if (ty == TY_BOOL) {
        return select(0u, 1u, v != 0.0);
    }
    return bitcast<u32>(v);
}

// A parameter word read as f32.
fn pf(i: u32) -> f32 {
    return bitcast<f32>(prm[i]);
}

// Thread index of a 1-D launch laid out as (x, y) workgroups of THREADS.
fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * THREADS;
}
