//! [`CodecSpec`]: the parsed form of a codec string, its grammar and its
//! canonical [`Display`](std::fmt::Display).

use std::fmt;
use std::str::FromStr;

/// Longest codec spec string accepted, in bytes. The longest canonical spec
/// (`randk:` + a 17-digit fraction >= 1e-9 + `+q8/b65536+zstd`) is under 50.
pub const SPEC_BYTES_MAX: usize = 64;

/// Block length used when a quantizer spec has no `/bN` suffix.
pub const BLOCK_LEN_DEFAULT: u32 = 256;

/// Smallest block length a spec may ask for. With one f32 scale a block,
/// shorter blocks cost more than f16 and would let a body outgrow the
/// dense size (`q8/b8` is 1.5 bytes a value).
pub const BLOCK_LEN_MIN: u32 = 8;

/// Largest block length a spec may ask for.
pub const BLOCK_LEN_MAX: u32 = 65_536;

/// Why a codec spec string does not parse. Every variant names the spec so
/// a config error or a log line says what to fix.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodecSpecError {
    #[error("codec spec is {len} bytes, over the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error(
        "unknown codec stage `{stage}` in `{spec}`: expected dense-f32, f16, bf16, \
         q8, q4, q2, sign (optionally /b<N>), topk:<F>, randk:<F>, or a final +zstd"
    )]
    UnknownStage { spec: String, stage: String },
    #[error("bad fraction `{value}` in `{spec}`: {reason}")]
    BadFraction {
        spec: String,
        value: String,
        reason: &'static str,
    },
    #[error(
        "bad block length `{value}` in `{spec}`: expected /b<N> with \
         {BLOCK_LEN_MIN} <= N <= {BLOCK_LEN_MAX}"
    )]
    BadBlockLen { spec: String, value: String },
    #[error("bad codec spec `{spec}`: {reason}")]
    BadComposition { spec: String, reason: &'static str },
}

/// Smallest sparsifier fraction. Keeps the canonical decimal (Rust never
/// prints an exponent) within [`SPEC_BYTES_MAX`].
pub const FRACTION_MIN: f64 = 1e-9;

/// A fraction in `[FRACTION_MIN, 1]`, the share of coordinates a
/// sparsifier keeps. Never NaN, so it is `Eq`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Fraction(f64);

impl Fraction {
    /// `None` unless `FRACTION_MIN <= value <= 1`.
    pub fn new(value: f64) -> Option<Self> {
        (FRACTION_MIN..=1.0)
            .contains(&value)
            .then_some(Fraction(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// How many of `dimension` coordinates are kept: `ceil(F * dimension)`,
    /// at least 1 (when `dimension > 0`) and at most `dimension`. Part of the
    /// wire format: the decoder recomputes it and refuses any other count.
    pub fn kept(self, dimension: u64) -> u64 {
        if dimension == 0 {
            return 0;
        }
        let k = (self.0 * dimension as f64).ceil() as u64; // saturating cast
        let k = k.clamp(1, dimension);
        assert!(k >= 1 && k <= dimension);
        k
    }
}

// NaN is excluded by construction, so equality is reflexive.
impl Eq for Fraction {}

impl std::hash::Hash for Fraction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

impl fmt::Display for Fraction {
    /// Shortest decimal that parses back to the same `f64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Values per quantization block, `BLOCK_LEN_MIN..=BLOCK_LEN_MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockLen(u32);

impl BlockLen {
    pub const DEFAULT: BlockLen = BlockLen(BLOCK_LEN_DEFAULT);

    pub fn new(len: u32) -> Option<Self> {
        (BLOCK_LEN_MIN..=BLOCK_LEN_MAX)
            .contains(&len)
            .then_some(BlockLen(len))
    }

    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// Bits per quantized value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantBits {
    Q8,
    Q4,
    Q2,
}

impl QuantBits {
    pub fn bits(self) -> u32 {
        match self {
            QuantBits::Q8 => 8,
            QuantBits::Q4 => 4,
            QuantBits::Q2 => 2,
        }
    }

    /// `L = 2^(bits-1) - 1`: codes run over `0..=2L` and decode to
    /// `(code - L) / L * scale`, so zero is exact and the grid symmetric.
    pub fn level_max(self) -> u32 {
        (1 << (self.bits() - 1)) - 1
    }

    fn name(self) -> &'static str {
        match self {
            QuantBits::Q8 => "q8",
            QuantBits::Q4 => "q4",
            QuantBits::Q2 => "q2",
        }
    }
}

/// How the kept values are coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueCodec {
    /// Little-endian f32; lossless.
    DenseF32,
    /// IEEE half precision, round to nearest, saturating at ±65504.
    F16,
    /// bfloat16, round to nearest, saturating at ±bf16::MAX.
    Bf16,
    /// Unbiased stochastic uniform quantization, one f32 scale (max |x|) a block.
    Quant {
        bits: QuantBits,
        block_len: BlockLen,
    },
    /// One bit a value (its sign), one f32 scale (mean |x|) a block.
    Sign { block_len: BlockLen },
}

/// Which coordinates are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sparsifier {
    /// The `ceil(F·n)` largest in magnitude; indices travel in the payload.
    TopK(Fraction),
    /// `ceil(F·n)` uniformly random ones; indices come from the payload seed.
    RandK(Fraction),
}

impl Sparsifier {
    pub fn fraction(self) -> Fraction {
        match self {
            Sparsifier::TopK(f) | Sparsifier::RandK(f) => f,
        }
    }
}

/// A parsed codec spec: optional sparsifier, a value codec, optional zstd.
/// `Display` writes the canonical string and `parse(display(s)) == s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodecSpec {
    pub sparsifier: Option<Sparsifier>,
    pub values: ValueCodec,
    /// Entropy-code the body with zstd when that makes it smaller.
    pub zstd: bool,
}

impl Default for CodecSpec {
    fn default() -> Self {
        CodecSpec::DENSE_F32
    }
}

impl CodecSpec {
    /// `dense-f32`: plain little-endian f32, 4 bytes a coordinate.
    pub const DENSE_F32: CodecSpec = CodecSpec {
        sparsifier: None,
        values: ValueCodec::DenseF32,
        zstd: false,
    };

    /// The name callers of the former `enum Codec { DenseF32 }` use.
    #[allow(non_upper_case_globals)]
    pub const DenseF32: CodecSpec = CodecSpec::DENSE_F32;

    /// Parse a spec string (grammar in the [`crate::codec`] docs). The empty
    /// string means `dense-f32`.
    pub fn parse(spec: &str) -> Result<CodecSpec, CodecSpecError> {
        if spec.len() > SPEC_BYTES_MAX {
            return Err(CodecSpecError::TooLong {
                len: spec.len(),
                max: SPEC_BYTES_MAX,
            });
        }
        if spec.is_empty() {
            return Ok(CodecSpec::DENSE_F32);
        }
        let composition = |reason| CodecSpecError::BadComposition {
            spec: spec.to_string(),
            reason,
        };
        // At most three stages ever parse; the split is bounded by the
        // length check above.
        let mut stages = spec.split('+').peekable();
        let first = stages.next().expect("split yields at least one item");
        let sparsifier = parse_sparsifier(spec, first)?;
        let values = match sparsifier {
            None if first == "zstd" => {
                return Err(composition(
                    "zstd is a final stage: put a codec before it, e.g. dense-f32+zstd",
                ));
            }
            None => parse_value(spec, first)?,
            Some(_) => match stages.peek() {
                Some(&s) if s != "zstd" => {
                    stages.next();
                    match parse_value(spec, s) {
                        Ok(v) => v,
                        Err(_) if matches!(parse_sparsifier(spec, s), Ok(Some(_))) => {
                            return Err(misplaced(spec, s));
                        }
                        Err(e) => return Err(e),
                    }
                }
                _ => ValueCodec::DenseF32,
            },
        };
        let zstd = match stages.next() {
            None => false,
            Some("zstd") => true,
            Some(s) => return Err(misplaced(spec, s)),
        };
        if let Some(s) = stages.next() {
            return Err(misplaced(spec, s));
        }
        Ok(CodecSpec {
            sparsifier,
            values,
            zstd,
        })
    }
}

/// Classify a stage that parses on its own but sits in the wrong place.
fn misplaced(spec: &str, stage: &str) -> CodecSpecError {
    let composition = |reason| CodecSpecError::BadComposition {
        spec: spec.to_string(),
        reason,
    };
    if stage == "zstd" {
        composition("zstd may appear once, as the last stage")
    } else if matches!(parse_sparsifier(spec, stage), Ok(Some(_))) {
        composition("a sparsifier (topk/randk) may appear once, as the first stage")
    } else if parse_value(spec, stage).is_ok() {
        composition("at most one value codec, after the sparsifier and before zstd")
    } else {
        CodecSpecError::UnknownStage {
            spec: spec.to_string(),
            stage: stage.to_string(),
        }
    }
}

fn parse_sparsifier(spec: &str, stage: &str) -> Result<Option<Sparsifier>, CodecSpecError> {
    let (make, fraction): (fn(Fraction) -> Sparsifier, &str) = match stage.split_once(':') {
        Some(("topk", f)) => (Sparsifier::TopK, f),
        Some(("randk", f)) => (Sparsifier::RandK, f),
        None if stage == "topk" || stage == "randk" => {
            return Err(CodecSpecError::BadFraction {
                spec: spec.to_string(),
                value: String::new(),
                reason: "missing; write e.g. topk:0.01",
            });
        }
        _ => return Ok(None),
    };
    let bad = |reason| CodecSpecError::BadFraction {
        spec: spec.to_string(),
        value: fraction.to_string(),
        reason,
    };
    let value: f64 = fraction.parse().map_err(|_| bad("not a decimal number"))?;
    let f = Fraction::new(value).ok_or_else(|| bad("must be in [1e-9, 1]"))?;
    Ok(Some(make(f)))
}

fn parse_value(spec: &str, stage: &str) -> Result<ValueCodec, CodecSpecError> {
    let (name, block) = match stage.split_once('/') {
        Some((n, b)) => (n, Some(b)),
        None => (stage, None),
    };
    let block_len = || -> Result<BlockLen, CodecSpecError> {
        let Some(b) = block else {
            return Ok(BlockLen::DEFAULT);
        };
        let bad = || CodecSpecError::BadBlockLen {
            spec: spec.to_string(),
            value: b.to_string(),
        };
        let digits = b.strip_prefix('b').ok_or_else(bad)?;
        // Digits only: no sign, no leading zero, so the string is canonical.
        if digits.is_empty()
            || !digits.bytes().all(|c| c.is_ascii_digit())
            || digits.starts_with('0')
        {
            return Err(bad());
        }
        digits.parse().ok().and_then(BlockLen::new).ok_or_else(bad)
    };
    let quant = |bits| -> Result<ValueCodec, CodecSpecError> {
        Ok(ValueCodec::Quant {
            bits,
            block_len: block_len()?,
        })
    };
    let plain = |v| {
        if block.is_some() {
            Err(CodecSpecError::BadComposition {
                spec: spec.to_string(),
                reason: "a block length (/bN) only applies to q8, q4, q2 and sign",
            })
        } else {
            Ok(v)
        }
    };
    match name {
        "dense-f32" => plain(ValueCodec::DenseF32),
        "f16" => plain(ValueCodec::F16),
        "bf16" => plain(ValueCodec::Bf16),
        "q8" => quant(QuantBits::Q8),
        "q4" => quant(QuantBits::Q4),
        "q2" => quant(QuantBits::Q2),
        "sign" => Ok(ValueCodec::Sign {
            block_len: block_len()?,
        }),
        _ => Err(CodecSpecError::UnknownStage {
            spec: spec.to_string(),
            stage: stage.to_string(),
        }),
    }
}

impl FromStr for CodecSpec {
    type Err = CodecSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CodecSpec::parse(s)
    }
}

impl fmt::Display for ValueCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let block = |f: &mut fmt::Formatter<'_>, b: BlockLen| {
            if b == BlockLen::DEFAULT {
                Ok(())
            } else {
                write!(f, "/b{}", b.0)
            }
        };
        match *self {
            ValueCodec::DenseF32 => f.write_str("dense-f32"),
            ValueCodec::F16 => f.write_str("f16"),
            ValueCodec::Bf16 => f.write_str("bf16"),
            ValueCodec::Quant { bits, block_len } => {
                f.write_str(bits.name())?;
                block(f, block_len)
            }
            ValueCodec::Sign { block_len } => {
                f.write_str("sign")?;
                block(f, block_len)
            }
        }
    }
}

impl fmt::Display for CodecSpec {
    /// The canonical spec: default block lengths and a `dense-f32` value
    /// stage after a sparsifier are left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sparsifier {
            None => write!(f, "{}", self.values)?,
            Some(s) => {
                match s {
                    Sparsifier::TopK(fr) => write!(f, "topk:{fr}")?,
                    Sparsifier::RandK(fr) => write!(f, "randk:{fr}")?,
                }
                if self.values != ValueCodec::DenseF32 {
                    write!(f, "+{}", self.values)?;
                }
            }
        }
        if self.zstd {
            f.write_str("+zstd")?;
        }
        Ok(())
    }
}
