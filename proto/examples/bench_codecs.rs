//! Update codec benchmark: encode and decode throughput (GB/s of f32 input
//! bytes) and compression ratio against dense f32, for each codec spec, on
//! a seeded Gaussian-ish update. A plain memcpy and a sum over the same
//! bytes are measured in the same run as the baseline.
//!
//! ```text
//! cargo run --release -p fedge-proto --example bench_codecs -- \
//!     [--dimension 1048576] [--min-time-ms 300] [--seed 1] \
//!     [--specs dense-f32,q4,topk:0.01+q4] [--json PATH]
//! ```
//!
//! Prints a table; writes the same rows as JSON to `--json PATH`
//! (default: `bench_codecs.json` in the system temp directory).

use std::hint::black_box;
use std::time::{Duration, Instant};

use fedge_proto::Limits;
use fedge_proto::codec::{self, CodecSpec};
use fedge_proto::wire::UpdatePayload;
use prost::Message;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

const DEFAULT_SPECS: &[&str] = &[
    "dense-f32",
    "dense-f32+zstd",
    "f16",
    "bf16",
    "bf16+zstd",
    "q8",
    "q8+zstd",
    "q4",
    "q4+zstd",
    "q2",
    "q2+zstd",
    "sign",
    "sign+zstd",
    "topk:0.1",
    "topk:0.01",
    "topk:0.01+f16",
    "topk:0.01+q8",
    "topk:0.01+q4",
    "topk:0.01+q4+zstd",
    "topk:0.001+q4",
    "randk:0.05+q8",
    "randk:0.01",
    "randk:0.01+q4+zstd",
];

/// Most timed iterations a measurement runs, whatever `min_time` says.
const ITERATIONS_MAX: u32 = 10_000;

/// One row of results.
struct CodecBench {
    spec: String,
    encoded_bytes: usize,
    zstd_used: bool,
    ratio: f64,
    encode_gb_per_s: f64,
    decode_gb_per_s: f64,
    /// ‖decoded − x‖ / ‖x‖.
    relative_error: f64,
}

struct Args {
    dimension: usize,
    min_time: Duration,
    seed: u64,
    specs: Vec<String>,
    json_path: std::path::PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dimension: 1 << 20,
        min_time: Duration::from_millis(300),
        seed: 1,
        specs: DEFAULT_SPECS.iter().map(|s| s.to_string()).collect(),
        json_path: std::env::temp_dir().join("bench_codecs.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dimension" => {
                args.dimension = value()?.parse().map_err(|e| format!("--dimension: {e}"))?
            }
            "--min-time-ms" => {
                args.min_time = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|e| format!("--min-time-ms: {e}"))?,
                )
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--specs" => args.specs = value()?.split(',').map(str::to_string).collect(),
            "--json" => args.json_path = value()?.into(),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

/// A real-looking update: Gaussian values (Box–Muller) whose standard
/// deviation changes every 64 Ki coordinates, like tensors of a model.
fn update(dimension: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut u = move || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let stds = [1e-3, 3e-4, 2e-3, 5e-4, 1e-4, 8e-4];
    (0..dimension)
        .map(|i| {
            let g = (-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos();
            (g * stds[(i >> 16) % stds.len()]) as f32
        })
        .collect()
}

/// Mean seconds a call of `f`, over at least `min_time` and 3 calls.
fn time(min_time: Duration, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let start = Instant::now();
    let mut n = 0u32;
    while n < 3 || (start.elapsed() < min_time && n < ITERATIONS_MAX) {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

fn bench(spec: &CodecSpec, x: &[f32], seed: u64, min_time: Duration) -> CodecBench {
    let dense_bytes = (x.len() * 4) as f64;
    let limits = Limits::default();
    let encoded = codec::encode(spec, x, seed).expect("finite input");
    let decoded = codec::decode(&encoded, x.len(), &limits).expect("own payload decodes");
    let zstd_used = UpdatePayload::decode(&encoded[..]).expect("payload").zstd;
    let (mut err2, mut norm2) = (0f64, 0f64);
    for (a, b) in x.iter().zip(&decoded) {
        err2 += f64::from(a - b).powi(2);
        norm2 += f64::from(*a).powi(2);
    }
    let encode_s = time(min_time, || {
        black_box(codec::encode(spec, black_box(x), seed).expect("finite input"));
    });
    let decode_s = time(min_time, || {
        black_box(codec::decode(black_box(&encoded), x.len(), &limits).expect("decodes"));
    });
    CodecBench {
        spec: spec.to_string(),
        encoded_bytes: encoded.len(),
        zstd_used,
        ratio: dense_bytes / encoded.len() as f64,
        encode_gb_per_s: dense_bytes / encode_s / 1e9,
        decode_gb_per_s: dense_bytes / decode_s / 1e9,
        relative_error: (err2 / norm2.max(f64::MIN_POSITIVE)).sqrt(),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json(dimension: usize, memcpy: f64, sum: f64, rows: &[CodecBench]) -> String {
    let mut s = format!(
        "{{\n  \"dimension\": {dimension},\n  \"dense_bytes\": {},\n  \"baseline\": {{\"memcpy_gb_per_s\": {memcpy:.3}, \"sum_gb_per_s\": {sum:.3}}},\n  \"codecs\": [\n",
        dimension * 4
    );
    for (i, r) in rows.iter().enumerate() {
        s.push_str(&format!(
            "    {{\"spec\": {}, \"encoded_bytes\": {}, \"zstd_used\": {}, \"ratio\": {:.3}, \"encode_gb_per_s\": {:.4}, \"decode_gb_per_s\": {:.4}, \"relative_error\": {:.6}}}{}\n",
            json_string(&r.spec),
            r.encoded_bytes,
            r.zstd_used,
            r.ratio,
            r.encode_gb_per_s,
            r.decode_gb_per_s,
            r.relative_error,
            if i + 1 < rows.len() { "," } else { "" }
        ));
    }
    s.push_str("  ]\n}\n");
    s
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_codecs: {e}");
            std::process::exit(2);
        }
    };
    let specs: Vec<CodecSpec> = match args.specs.iter().map(|s| CodecSpec::parse(s)).collect() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench_codecs: {e}");
            std::process::exit(2);
        }
    };
    let x = update(args.dimension, args.seed);
    let dense_bytes = (x.len() * 4) as f64;

    let mut dst = vec![0f32; x.len()];
    let memcpy_s = time(args.min_time, || {
        dst.copy_from_slice(black_box(&x));
        black_box(&mut dst);
    });
    let sum_s = time(args.min_time, || {
        black_box(black_box(&x).iter().sum::<f32>());
    });
    let memcpy = dense_bytes / memcpy_s / 1e9;
    let sum = dense_bytes / sum_s / 1e9;

    println!(
        "dimension {} ({:.1} MiB dense f32); baseline memcpy {memcpy:.2} GB/s, sum {sum:.2} GB/s",
        args.dimension,
        dense_bytes / (1 << 20) as f64
    );
    println!(
        "{:<22} {:>11} {:>5} {:>9} {:>10} {:>10} {:>9}",
        "codec", "bytes", "zstd", "ratio", "enc GB/s", "dec GB/s", "rel err"
    );
    let mut rows = Vec::with_capacity(specs.len());
    for spec in &specs {
        let r = bench(spec, &x, args.seed, args.min_time);
        println!(
            "{:<22} {:>11} {:>5} {:>8.1}x {:>10.3} {:>10.3} {:>9.4}",
            r.spec,
            r.encoded_bytes,
            if r.zstd_used { "yes" } else { "no" },
            r.ratio,
            r.encode_gb_per_s,
            r.decode_gb_per_s,
            r.relative_error
        );
        rows.push(r);
    }
    let out = json(args.dimension, memcpy, sum, &rows);
    match std::fs::write(&args.json_path, out) {
        Ok(()) => println!("wrote {}", args.json_path.display()),
        Err(e) => {
            eprintln!("bench_codecs: writing {}: {e}", args.json_path.display());
            std::process::exit(1);
        }
    }
}
