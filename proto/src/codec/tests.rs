//! Codec tests: spec grammar, round trips, unbiasedness, error feedback,
//! malformed payloads (a table a decoder), and property tests that decoders
//! never panic. All seeded and deterministic.

use super::*;
use crate::codec::sparse::randk_indices;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};

fn spec(s: &str) -> CodecSpec {
    CodecSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn limits() -> Limits {
    Limits::default()
}

/// Every codec shape the tests exercise.
const SPECS: &[&str] = &[
    "dense-f32",
    "dense-f32+zstd",
    "f16",
    "bf16",
    "bf16+zstd",
    "q8",
    "q4",
    "q2",
    "q8/b16",
    "q4/b8",
    "q2/b9",
    "q4+zstd",
    "sign",
    "sign/b10",
    "sign+zstd",
    "topk:0.1",
    "topk:1",
    "topk:0.3+q4",
    "topk:0.05+q8/b8",
    "topk:0.2+f16",
    "topk:0.2+bf16+zstd",
    "topk:0.5+sign",
    "topk:0.1+q2+zstd",
    "randk:0.1",
    "randk:0.25+q8",
    "randk:0.5+q2/b8",
    "randk:0.3+f16+zstd",
];

/// A deterministic update-like vector: a few "tensors" of different scales.
fn sample(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = sparse::rng(seed, Purpose::Rounding);
    use rand_chacha::rand_core::RngCore;
    (0..n)
        .map(|i| {
            let scale = [1e-3f32, 3e-2, 1.0, 5e-4][(i / 17) % 4];
            let u = (rng.next_u32() >> 8) as f32 / 16_777_216.0;
            (u * 2.0 - 1.0) * scale
        })
        .collect()
}

// ---------------------------------------------------------------- spec

#[test]
fn spec_strings_parse_to_their_canonical_form() {
    // (input, canonical Display)
    let cases = [
        ("", "dense-f32"),
        ("dense-f32", "dense-f32"),
        ("f16", "f16"),
        ("bf16+zstd", "bf16+zstd"),
        ("q8", "q8"),
        ("q4/b256", "q4"),
        ("q4/b64", "q4/b64"),
        ("q2/b65536", "q2/b65536"),
        ("sign", "sign"),
        ("sign/b32+zstd", "sign/b32+zstd"),
        ("topk:0.01", "topk:0.01"),
        ("topk:1e-2", "topk:0.01"),
        ("topk:1.0", "topk:1"),
        ("topk:0.01+dense-f32", "topk:0.01"),
        ("topk:0.01+q4", "topk:0.01+q4"),
        ("randk:0.05+q8", "randk:0.05+q8"),
        ("topk:0.01+f16", "topk:0.01+f16"),
        ("topk:0.01+zstd", "topk:0.01+zstd"),
        ("topk:0.01+q4/b32+zstd", "topk:0.01+q4/b32+zstd"),
        (
            "randk:0.000000001+q8/b65536+zstd",
            "randk:0.000000001+q8/b65536+zstd",
        ),
    ];
    for (input, canonical) in cases {
        let s = spec(input);
        assert_eq!(s.to_string(), canonical, "{input}");
        assert_eq!(spec(canonical), s, "{input}: Display round-trips");
        assert_eq!(input.parse::<CodecSpec>(), Ok(s));
    }
    for s in SPECS {
        assert_eq!(spec(s).to_string(), *s, "SPECS entries are canonical");
    }
    assert_eq!(Codec::DenseF32, spec("dense-f32"));
    assert_eq!(CodecSpec::default(), CodecSpec::DENSE_F32);
    // The longest canonical fraction still fits the spec bound.
    let long = CodecSpec {
        sparsifier: Some(Sparsifier::RandK(
            Fraction::new(0.123_456_789_012_345_67e-3).unwrap(),
        )),
        values: ValueCodec::Quant {
            bits: QuantBits::Q8,
            block_len: BlockLen::new(BLOCK_LEN_MAX).unwrap(),
        },
        zstd: true,
    };
    assert_eq!(spec(&long.to_string()), long);
}

use crate::update::Codec;

/// A short name for each `CodecSpecError` variant.
fn spec_error_kind(e: &CodecSpecError) -> &'static str {
    match e {
        CodecSpecError::TooLong { .. } => "too_long",
        CodecSpecError::UnknownStage { .. } => "unknown_stage",
        CodecSpecError::BadFraction { .. } => "bad_fraction",
        CodecSpecError::BadBlockLen { .. } => "bad_block_len",
        CodecSpecError::BadComposition { .. } => "bad_composition",
    }
}

#[test]
fn bad_spec_strings_are_typed() {
    let too_long = format!("topk:0.{}", "1".repeat(80));
    let cases: &[(&str, &str)] = &[
        ("zip", "unknown_stage"),
        ("Q4", "unknown_stage"),
        (" q4", "unknown_stage"),
        ("q3", "unknown_stage"),
        ("dense", "unknown_stage"),
        ("q4+", "unknown_stage"),
        ("+q4", "unknown_stage"),
        ("q4++zstd", "unknown_stage"),
        ("topk:0.1+lz4", "unknown_stage"),
        ("q4/b0", "bad_block_len"),
        ("q4/b7", "bad_block_len"),
        ("q4/b", "bad_block_len"),
        ("q4/bx", "bad_block_len"),
        ("q4/64", "bad_block_len"),
        ("q4/b064", "bad_block_len"),
        ("q4/b65537", "bad_block_len"),
        ("q4/b-1", "bad_block_len"),
        ("topk", "bad_fraction"),
        ("topk:", "bad_fraction"),
        ("topk:0", "bad_fraction"),
        ("topk:1e-10", "bad_fraction"),
        ("topk:1.5", "bad_fraction"),
        ("topk:-0.1", "bad_fraction"),
        ("topk:nan", "bad_fraction"),
        ("topk:inf", "bad_fraction"),
        ("randk:x", "bad_fraction"),
        ("zstd", "bad_composition"),
        ("zstd+q4", "bad_composition"),
        ("q4+zstd+zstd", "bad_composition"),
        ("q4+topk:0.1", "bad_composition"),
        ("topk:0.1+topk:0.1", "bad_composition"),
        ("topk:0.1+randk:0.1", "bad_composition"),
        ("topk:0.1+q4+q8", "bad_composition"),
        ("q4+q8", "bad_composition"),
        ("f16/b16", "bad_composition"),
        ("q4+zstd+q8", "bad_composition"),
        (&too_long, "too_long"),
    ];
    for (input, kind) in cases {
        let e = CodecSpec::parse(input).expect_err(input);
        assert_eq!(spec_error_kind(&e), *kind, "{input}: {e}");
        if *kind != "too_long" {
            assert!(e.to_string().contains(input), "error names the spec: {e}");
        }
        assert_eq!(
            ProtoError::from(e).reject_code(),
            crate::RejectCode::Malformed
        );
    }
}

// ---------------------------------------------------------------- round trips

#[test]
fn lossless_codecs_round_trip_exactly() {
    let vectors = [
        vec![],
        vec![0.0],
        vec![
            1.5,
            -2.25,
            0.0,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
        ],
        sample(1000, 1),
        vec![0.0; 4096],
    ];
    for s in ["dense-f32", "dense-f32+zstd", "topk:1", "topk:1+zstd"] {
        for v in &vectors {
            let b = encode(&spec(s), v, 9).unwrap();
            assert_eq!(&decode(&b, v.len(), &limits()).unwrap(), v, "{s}");
        }
    }
}

#[test]
fn half_precision_is_within_its_precision() {
    // (spec, relative error bound: half an ulp, 2^-11 for f16, 2^-8 for bf16)
    let cases = [("f16", 2f32.powi(-11)), ("bf16", 2f32.powi(-8))];
    // Values inside f16's normal range, so both bounds apply.
    let v: Vec<f32> = sample(2000, 2)
        .iter()
        .map(|x| x * 1000.0)
        .filter(|x| x.abs() >= 1e-4)
        .collect();
    for (s, rel) in cases {
        let back = decode(&encode(&spec(s), &v, 0).unwrap(), v.len(), &limits()).unwrap();
        for (x, y) in v.iter().zip(&back) {
            assert!((x - y).abs() <= x.abs() * rel, "{s}: {x} -> {y}");
        }
    }
    // Out of range saturates to the largest finite value.
    let big = [1e6f32, -1e6, f32::MAX, -f32::MAX];
    let want_f16 = [65504.0f32, -65504.0, 65504.0, -65504.0];
    let got = decode(&encode(&spec("f16"), &big, 0).unwrap(), 4, &limits()).unwrap();
    assert_eq!(got, want_f16);
    let got = decode(&encode(&spec("bf16"), &big, 0).unwrap(), 4, &limits()).unwrap();
    assert!(got.iter().all(|v| v.is_finite()));
    assert_eq!(got[2], half::bf16::MAX.to_f32());
}

#[test]
fn hand_computed_codecs() {
    // (spec, input, seed, decoded). Deterministic codecs only, or inputs on
    // the quantization grid, where stochastic rounding has nothing to do.
    let cases: &[(&str, &[f32], &[f32])] = &[
        ("topk:0.5", &[1.0, -5.0, 3.0, 0.5], &[0.0, -5.0, 3.0, 0.0]),
        ("topk:0.25", &[1.0, -5.0, 3.0, 0.5], &[0.0, -5.0, 0.0, 0.0]),
        // ceil(0.1 * 4) = 1 kept.
        ("topk:0.1", &[1.0, 2.0, -2.0, 0.0], &[0.0, 2.0, 0.0, 0.0]),
        ("sign", &[1.0, -3.0, 0.0, 2.0], &[1.5, -1.5, 1.5, 1.5]),
        (
            "sign/b8",
            &[1.0, -3.0, 1.0, -3.0, 1.0, -3.0, 1.0, -3.0, 0.0, -2.0],
            &[2.0, -2.0, 2.0, -2.0, 2.0, -2.0, 2.0, -2.0, 1.0, -1.0],
        ),
        ("q2", &[1.0, -1.0, 0.0], &[1.0, -1.0, 0.0]),
        (
            "q4/b8",
            &[7.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0],
            &[7.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0],
        ),
        ("q8", &[127.0, -64.0, 1.0], &[127.0, -64.0, 1.0]),
        (
            "topk:0.5+sign",
            &[1.0, -5.0, 3.0, 0.5],
            &[0.0, -4.0, 4.0, 0.0],
        ),
        (
            "topk:0.5+q2",
            &[1.0, -5.0, 5.0, 0.5],
            &[0.0, -5.0, 5.0, 0.0],
        ),
    ];
    for (s, input, want) in cases {
        for seed in [0, 1, 77] {
            let b = encode(&spec(s), input, seed).unwrap();
            assert_eq!(
                decode(&b, input.len(), &limits()).unwrap(),
                *want,
                "{s} seed {seed}"
            );
        }
    }
}

#[test]
fn every_codec_round_trips_every_small_dimension() {
    // Small n is where block and index overheads dominate; encode asserts
    // its body is within `body_bytes_max`, decode that it matches.
    for s in SPECS {
        for n in 0..=40 {
            let v = sample(n, n as u64);
            let (b, t) = encode_with_transmitted(&spec(s), &v, 3).unwrap();
            assert_eq!(decode(&b, n, &limits()).unwrap(), t, "{s} n={n}");
            let bound = spec(s).body_bytes_max(n as u64);
            assert!(bound <= 4 * n as u64 + (n as u64).div_ceil(8) + 16);
        }
    }
}

/// No codec's payload, envelope and zstd frame included, exceeds
/// `payload_bytes_max`, for small dimensions, a block boundary and one past
/// a zstd block, with incompressible (random) and extreme values.
#[test]
fn payloads_stay_within_payload_bytes_max() {
    for s in SPECS {
        for n in (0..=40).chain([255, 256, 257, 40_000]) {
            for v in [sample(n, n as u64), vec![f32::MAX; n]] {
                let (b, _) = encode_with_transmitted(&spec(s), &v, u64::MAX).unwrap();
                let max = payload_bytes_max(n as u64);
                assert!(b.len() as u64 <= max, "{s} n={n}: {} > {max}", b.len());
            }
        }
    }
    assert_eq!(payload_bytes_max(u64::MAX), u64::MAX);
}

#[test]
fn every_codec_handles_extreme_finite_values() {
    let v = [
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        -1e-45,
        0.0,
        -0.0,
        3.0e38,
        1.0,
    ];
    for s in SPECS {
        let (b, t) = encode_with_transmitted(&spec(s), &v, 5).unwrap();
        assert!(t.iter().all(|x| x.is_finite()), "{s}: {t:?}");
        assert_eq!(decode(&b, v.len(), &limits()).unwrap(), t, "{s}");
    }
}

#[test]
fn encode_refuses_non_finite_input() {
    for s in SPECS {
        for (bad, index) in [(f32::NAN, 2), (f32::INFINITY, 0), (f32::NEG_INFINITY, 3)] {
            let mut v = vec![1.0f32; 4];
            v[index] = bad;
            let e = encode(&spec(s), &v, 0).unwrap_err();
            assert!(
                matches!(e, EncodeError::NonFinite { index: i, .. } if i == index as u64),
                "{s}: {e}"
            );
            assert!(encode_with_transmitted(&spec(s), &v, 0).is_err());
        }
    }
}

// ---------------------------------------------------------------- error feedback

#[test]
fn transmitted_is_what_the_aggregator_decodes() {
    let v = sample(777, 3);
    for s in SPECS {
        for seed in [0, 1, 0xdead_beef] {
            let (b, transmitted) = encode_with_transmitted(&spec(s), &v, seed).unwrap();
            assert_eq!(b, encode(&spec(s), &v, seed).unwrap(), "{s}: same bytes");
            let decoded = decode(&b, v.len(), &limits()).unwrap();
            assert_eq!(decoded, transmitted, "{s} seed {seed}");
        }
    }
}

#[test]
fn error_feedback_residual_carries_what_was_not_sent() {
    // With topk and a carried residual, every coordinate is eventually sent:
    // the sum of transmitted vectors over rounds equals the sum of deltas
    // minus the final residual, exactly in the sparse positions' arithmetic.
    let s = spec("topk:0.1+q8");
    let delta = sample(200, 4);
    let mut residual = vec![0f32; delta.len()];
    let mut sent_total = vec![0f64; delta.len()];
    let rounds = 30;
    for round in 0..rounds {
        let corrected: Vec<f32> = delta.iter().zip(&residual).map(|(d, r)| d + r).collect();
        let (_, t) = encode_with_transmitted(&s, &corrected, round).unwrap();
        for i in 0..delta.len() {
            residual[i] = corrected[i] - t[i];
            sent_total[i] += f64::from(t[i]);
        }
    }
    for i in 0..delta.len() {
        let want = f64::from(delta[i]) * rounds as f64 - f64::from(residual[i]);
        assert!((sent_total[i] - want).abs() <= 1e-4, "coordinate {i}");
    }
    // The residual stays bounded (it does not grow with the round count).
    let max_delta = delta.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(residual.iter().all(|r| r.abs() <= 20.0 * max_delta));
}

// ---------------------------------------------------------------- unbiasedness

/// Mean of `trials` decodes of `x` under seeds `0..trials`, each multiplied
/// by `gain`.
fn mean_decoded(s: &str, x: &[f32], trials: u64, gain: f64) -> Vec<f64> {
    let mut sum = vec![0f64; x.len()];
    for seed in 0..trials {
        let b = encode(&spec(s), x, seed).unwrap();
        for (acc, v) in sum.iter_mut().zip(decode(&b, x.len(), &limits()).unwrap()) {
            *acc += f64::from(v) * gain;
        }
    }
    sum.iter().map(|s| s / trials as f64).collect()
}

#[test]
fn stochastic_quantizers_are_unbiased() {
    // Stochastic rounding to a grid of step h = scale/L has per-trial
    // variance at most h²/4, so the mean of T trials has standard error at
    // most h/(2·sqrt(T)). Tolerance: 5 standard errors a coordinate, plus
    // 1e-6·scale for f32 rounding. The seeds are fixed, so the outcome is
    // too; the tolerance says how much slack the fixed outcome was given.
    let x = sample(48, 5);
    let trials = 1500u64;
    for (s, level, block_len) in [
        ("q8/b16", 127.0, 16),
        ("q4/b16", 7.0, 16),
        ("q2/b16", 1.0, 16),
    ] {
        let mean = mean_decoded(s, &x, trials, 1.0);
        for (block, (xs, ms)) in x.chunks(block_len).zip(mean.chunks(block_len)).enumerate() {
            let scale = xs.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let h = scale / level;
            let tol = 5.0 * h / (2.0 * (trials as f64).sqrt()) + 1e-6 * scale;
            for (v, m) in xs.iter().zip(ms) {
                assert!(
                    (f64::from(*v) - m).abs() <= tol,
                    "{s} block {block}: {v} vs mean {m} (tol {tol})"
                );
            }
        }
        // And the quantizer does round: single trials differ from x.
        let one = decode(&encode(&spec(s), &x, 0).unwrap(), x.len(), &limits()).unwrap();
        assert_ne!(one, x, "{s}");
    }
}

#[test]
fn randk_rescaled_by_n_over_k_is_unbiased() {
    // Each coordinate is kept with probability p = k/n, so (n/k)·decoded has
    // mean x and standard deviation |x|·sqrt(1/p - 1) a trial. Tolerance:
    // 5 standard errors of the mean over T trials.
    let x = sample(40, 6);
    let trials = 3000u64;
    for (s, k) in [("randk:0.25", 10usize), ("randk:0.5", 20)] {
        let n = x.len();
        let p = k as f64 / n as f64;
        let mean = mean_decoded(s, &x, trials, 1.0 / p);
        for (i, (v, m)) in x.iter().zip(&mean).enumerate() {
            let sd = f64::from(v.abs()) * (1.0 / p - 1.0).sqrt();
            let tol = 5.0 * sd / (trials as f64).sqrt() + 1e-9;
            assert!(
                (f64::from(*v) - m).abs() <= tol,
                "{s} coordinate {i}: {v} vs {m} (tol {tol})"
            );
        }
    }
    // randk + q8: both stages unbiased, so the product is too (looser: 6
    // standard errors of the randk term plus the quantizer term).
    let trials = 3000u64;
    let mean = mean_decoded("randk:0.5+q8", &x, trials, 2.0);
    let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    for (i, (v, m)) in x.iter().zip(&mean).enumerate() {
        let sd = f64::from(v.abs()) + scale / 127.0;
        let tol = 6.0 * sd / (trials as f64).sqrt();
        assert!(
            (f64::from(*v) - m).abs() <= tol,
            "randk+q8 coordinate {i}: {v} vs {m}"
        );
    }
}

// ---------------------------------------------------------------- zstd

#[test]
fn zstd_is_used_only_when_smaller() {
    // (spec, input, zstd flag expected)
    let cases: Vec<(&str, Vec<f32>, bool)> = vec![
        ("dense-f32+zstd", vec![0.0; 10_000], true),
        ("q8+zstd", vec![0.0; 10_000], true),
        ("dense-f32+zstd", vec![1.0], false),
        ("topk:0.01+zstd", vec![], false),
        ("dense-f32", vec![0.0; 10_000], false),
    ];
    for (s, v, want) in cases {
        let b = encode(&spec(s), &v, 0).unwrap();
        let w = wire::UpdatePayload::decode(&b[..]).unwrap();
        assert_eq!(w.zstd, want, "{s} with {} values", v.len());
        assert_eq!(w.codec, s);
        assert_eq!(decode(&b, v.len(), &limits()).unwrap(), v, "{s}");
    }
}

// ---------------------------------------------------------------- malformed payloads

fn payload(codec: &str, dimension: u64, data: Vec<u8>) -> Vec<u8> {
    wire::UpdatePayload {
        codec: codec.into(),
        dimension,
        data: data.into(),
        seed: 0,
        zstd: false,
    }
    .encode_to_vec()
}

fn zpayload(codec: &str, dimension: u64, frame: Vec<u8>) -> Vec<u8> {
    wire::UpdatePayload {
        codec: codec.into(),
        dimension,
        data: frame.into(),
        seed: 0,
        zstd: true,
    }
    .encode_to_vec()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Blank the free-text parts of an error so tables can compare variants,
/// fields and numbers exactly.
fn norm(e: ProtoError) -> ProtoError {
    match e {
        ProtoError::Invalid { field, .. } => ProtoError::Invalid {
            field,
            reason: String::new(),
        },
        ProtoError::Malformed(_) => ProtoError::Malformed(String::new()),
        e => e,
    }
}

fn inv(field: &'static str) -> ProtoError {
    ProtoError::Invalid {
        field,
        reason: String::new(),
    }
}

fn bad_len(field: &'static str, expected: usize, got: usize) -> ProtoError {
    ProtoError::BadLength {
        field,
        expected,
        got,
    }
}

#[test]
fn malformed_payloads_are_typed_errors() {
    const V: &str = "update.values";
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let one = 1f32.to_le_bytes();
    let randk_first = randk_indices(0, 4, 2)[0] as u64;
    let bomb = entropy::compress(&vec![0u8; 1 << 20]);
    let nan_body_frame =
        entropy::compress(&f32s(&[1.0, nan, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]).repeat(8));
    let mut trailing = entropy::compress(&f32s(&[0.0; 16]));
    trailing.push(0);
    // A frame declaring a 1 GiB window (exponent 20), then an empty last block.
    let big_window = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 20 << 3, 0x01, 0x00, 0x00];
    let mut tiny_limits = limits();
    tiny_limits.update_dimension_max = 8;

    // (name, payload bytes, expected dimension, expected error)
    let cases: Vec<(&str, Vec<u8>, usize, ProtoError)> = vec![
        // Payload level.
        (
            "not protobuf",
            vec![0xff; 7],
            1,
            ProtoError::Malformed(String::new()),
        ),
        (
            "unknown codec",
            payload("zip", 1, f32s(&[1.0])),
            1,
            ProtoError::CodecSpec(CodecSpecError::UnknownStage {
                spec: "zip".into(),
                stage: "zip".into(),
            }),
        ),
        (
            "bad spec: block length 0",
            payload("q4/b0", 1, vec![]),
            1,
            ProtoError::CodecSpec(CodecSpecError::BadBlockLen {
                spec: "q4/b0".into(),
                value: "b0".into(),
            }),
        ),
        (
            "bad spec: too long",
            payload(&"q".repeat(100), 1, vec![]),
            1,
            ProtoError::CodecSpec(CodecSpecError::TooLong { len: 100, max: 64 }),
        ),
        (
            "wrong dimension",
            payload("dense-f32", 2, f32s(&[1.0, 2.0])),
            3,
            ProtoError::DimensionMismatch {
                expected: 3,
                got: 2,
            },
        ),
        (
            "dimension over the limit",
            payload("dense-f32", u64::MAX, vec![]),
            1,
            ProtoError::LimitExceeded {
                what: "update dimension",
                value: u64::MAX,
                max: limits().update_dimension_max,
            },
        ),
        // dense-f32
        (
            "dense truncated",
            payload("dense-f32", 2, f32s(&[1.0, 2.0])[..7].to_vec()),
            2,
            bad_len(V, 8, 7),
        ),
        (
            "dense extra bytes",
            payload("dense-f32", 1, f32s(&[1.0, 2.0])),
            1,
            bad_len(V, 4, 8),
        ),
        (
            "dense NaN",
            payload("dense-f32", 2, f32s(&[1.0, nan])),
            2,
            ProtoError::NonFinite { index: 1 },
        ),
        (
            "dense Inf",
            payload("dense-f32", 2, f32s(&[-inf, 1.0])),
            2,
            ProtoError::NonFinite { index: 0 },
        ),
        // f16 / bf16
        (
            "f16 truncated",
            payload("f16", 2, vec![0, 0x3c, 0]),
            2,
            bad_len(V, 4, 3),
        ),
        (
            "f16 NaN",
            payload("f16", 2, vec![0, 0x3c, 0x00, 0x7e]),
            2,
            ProtoError::NonFinite { index: 1 },
        ),
        (
            "f16 Inf",
            payload("f16", 1, vec![0x00, 0xfc]),
            1,
            ProtoError::NonFinite { index: 0 },
        ),
        (
            "bf16 NaN",
            payload("bf16", 1, vec![0xc0, 0x7f]),
            1,
            ProtoError::NonFinite { index: 0 },
        ),
        (
            "bf16 Inf",
            payload("bf16", 2, vec![0x80, 0x3f, 0x80, 0x7f]),
            2,
            ProtoError::NonFinite { index: 1 },
        ),
        // q8: one scale, then one byte a value.
        (
            "q8 NaN scale",
            payload("q8", 2, cat(&[&f32s(&[nan]), &[127, 127]])),
            2,
            ProtoError::NonFiniteScale { block: 0 },
        ),
        (
            "q8 Inf scale",
            payload("q8", 2, cat(&[&f32s(&[inf]), &[127, 127]])),
            2,
            ProtoError::NonFiniteScale { block: 0 },
        ),
        (
            "q8 negative scale",
            payload("q8", 2, cat(&[&f32s(&[-1.0]), &[127, 127]])),
            2,
            inv("update.scales"),
        ),
        (
            "q8 code past 2L",
            payload("q8", 2, cat(&[&one, &[127, 255]])),
            2,
            inv("update.codes"),
        ),
        (
            "q8 truncated",
            payload("q8", 2, cat(&[&one, &[127]])),
            2,
            bad_len(V, 6, 5),
        ),
        (
            "q8 missing scale",
            payload("q8", 2, vec![127, 127]),
            2,
            bad_len(V, 6, 2),
        ),
        // q4/b8: two scales for 9 values, then 5 bytes of nibbles.
        (
            "q4 code past 2L",
            payload(
                "q4/b8",
                9,
                cat(&[&f32s(&[1.0, 1.0]), &[0x77, 0x77, 0xf7, 0x77, 0x07]]),
            ),
            9,
            inv("update.codes"),
        ),
        (
            "q4 padding",
            payload(
                "q4/b8",
                9,
                cat(&[&f32s(&[1.0, 1.0]), &[0x77, 0x77, 0x77, 0x77, 0x17]]),
            ),
            9,
            inv("update.codes"),
        ),
        (
            "q4 Inf in block 1",
            payload(
                "q4/b8",
                9,
                cat(&[&f32s(&[1.0, inf]), &[0x77, 0x77, 0x77, 0x77, 0x07]]),
            ),
            9,
            ProtoError::NonFiniteScale { block: 1 },
        ),
        (
            "q4 truncated",
            payload(
                "q4/b8",
                9,
                cat(&[&f32s(&[1.0, 1.0]), &[0x77, 0x77, 0x77, 0x77]]),
            ),
            9,
            bad_len(V, 13, 12),
        ),
        // q2: 5 values in 2 bytes.
        (
            "q2 code 3",
            payload("q2", 5, cat(&[&one, &[0b01_01_01_11, 0x01]])),
            5,
            inv("update.codes"),
        ),
        (
            "q2 padding",
            payload("q2", 5, cat(&[&one, &[0x55, 0x05]])),
            5,
            inv("update.codes"),
        ),
        // sign: one scale, 3 bits.
        (
            "sign NaN scale",
            payload("sign", 3, cat(&[&f32s(&[nan]), &[0b101]])),
            3,
            ProtoError::NonFiniteScale { block: 0 },
        ),
        (
            "sign padding",
            payload("sign", 3, cat(&[&one, &[0b1101]])),
            3,
            inv("update.codes"),
        ),
        (
            "sign missing bits",
            payload("sign", 3, one.to_vec()),
            3,
            bad_len(V, 5, 4),
        ),
        // topk:0.02 of 100: k = 2, bitmap would be 13 bytes, so varints.
        (
            "topk ok",
            payload("topk:0.02", 100, cat(&[&[2, 0, 3, 4], &f32s(&[1.0, 2.0])])),
            100,
            ProtoError::Malformed("not an error".into()),
        ),
        (
            "topk index out of range",
            payload("topk:0.02", 100, cat(&[&[2, 0, 3, 97], &f32s(&[1.0, 2.0])])),
            100,
            ProtoError::IndexOutOfRange {
                index: 100,
                dimension: 100,
            },
        ),
        (
            "topk first index out of range",
            payload(
                "topk:0.02",
                100,
                cat(&[&[2, 0, 100, 1], &f32s(&[1.0, 2.0])]),
            ),
            100,
            ProtoError::IndexOutOfRange {
                index: 100,
                dimension: 100,
            },
        ),
        (
            "topk repeated index",
            payload("topk:0.02", 100, cat(&[&[2, 0, 7, 0], &f32s(&[1.0, 2.0])])),
            100,
            ProtoError::IndicesNotIncreasing {
                position: 1,
                index: 7,
                previous: 7,
            },
        ),
        (
            "topk gap overflows",
            payload(
                "topk:0.02",
                100,
                cat(&[&[2, 0, 7], &[0xff; 9], &[1], &f32s(&[1.0, 2.0])]),
            ),
            100,
            ProtoError::IndexOutOfRange {
                index: u64::MAX,
                dimension: 100,
            },
        ),
        (
            "topk declared k too small",
            payload("topk:0.02", 100, cat(&[&[1, 0, 7], &f32s(&[1.0])])),
            100,
            ProtoError::CountMismatch {
                what: "kept coordinates",
                expected: 2,
                got: 1,
            },
        ),
        (
            "topk k over dimension",
            payload("topk:0.02", 100, cat(&[&[101, 0, 7], &f32s(&[1.0])])),
            100,
            ProtoError::LimitExceeded {
                what: "update kept count",
                value: 101,
                max: 100,
            },
        ),
        (
            "topk truncated varint",
            payload("topk:0.02", 100, vec![2, 0, 3, 0x80]),
            100,
            bad_len("update.indices", 5, 4),
        ),
        (
            "topk missing k",
            payload("topk:0.02", 100, vec![]),
            100,
            bad_len("update.kept", 1, 0),
        ),
        (
            "topk unknown index format",
            payload("topk:0.02", 100, cat(&[&[2, 2, 3, 4], &f32s(&[1.0, 2.0])])),
            100,
            ProtoError::UnknownEnum {
                field: "update.indices",
                value: 2,
            },
        ),
        (
            "topk values truncated",
            payload(
                "topk:0.02",
                100,
                cat(&[&[2, 0, 3, 4], &f32s(&[1.0, 2.0])[..7]]),
            ),
            100,
            bad_len(V, 8, 7),
        ),
        (
            "topk values extra",
            payload(
                "topk:0.02",
                100,
                cat(&[&[2, 0, 3, 4], &f32s(&[1.0, 2.0, 3.0])]),
            ),
            100,
            bad_len(V, 8, 12),
        ),
        (
            "topk NaN value",
            payload("topk:0.02", 100, cat(&[&[2, 0, 3, 4], &f32s(&[1.0, nan])])),
            100,
            ProtoError::NonFinite { index: 7 },
        ),
        (
            "topk+q4 NaN scale",
            payload(
                "topk:0.02+q4",
                100,
                cat(&[&[2, 0, 3, 4], &f32s(&[nan]), &[0x77]]),
            ),
            100,
            ProtoError::NonFiniteScale { block: 0 },
        ),
        // topk:0.5 of 4: bitmap (1 byte) beats 2 varints.
        (
            "topk varints longer than bitmap",
            payload("topk:0.5", 4, cat(&[&[2, 0, 0, 1], &f32s(&[1.0, 2.0])])),
            4,
            inv("update.indices"),
        ),
        (
            "topk bitmap count",
            payload("topk:0.5", 4, cat(&[&[2, 1, 0b0111], &f32s(&[1.0, 2.0])])),
            4,
            ProtoError::CountMismatch {
                what: "bitmap set bits",
                expected: 2,
                got: 3,
            },
        ),
        (
            "topk bitmap past dimension",
            payload(
                "topk:0.5",
                4,
                cat(&[&[2, 1, 0b0001_0001], &f32s(&[1.0, 2.0])]),
            ),
            4,
            ProtoError::IndexOutOfRange {
                index: 4,
                dimension: 4,
            },
        ),
        (
            "topk bitmap truncated",
            payload("topk:0.02", 100, vec![2, 1, 0xff]),
            100,
            bad_len("update.indices", 15, 3),
        ),
        // randk:0.5 of 4: k = 2 values, indices from the seed.
        (
            "randk declared k",
            payload("randk:0.5", 4, cat(&[&[3], &f32s(&[1.0, 2.0, 3.0])])),
            4,
            ProtoError::CountMismatch {
                what: "kept coordinates",
                expected: 2,
                got: 3,
            },
        ),
        (
            "randk values truncated",
            payload("randk:0.5", 4, cat(&[&[2], &f32s(&[1.0])])),
            4,
            bad_len(V, 8, 4),
        ),
        (
            "randk NaN value",
            payload("randk:0.5", 4, cat(&[&[2], &f32s(&[nan, 1.0])])),
            4,
            ProtoError::NonFinite { index: randk_first },
        ),
        // zstd
        (
            "zstd bomb",
            zpayload("dense-f32+zstd", 16, bomb.clone()),
            16,
            ProtoError::DecompressedTooLarge { bytes_max: 64 },
        ),
        (
            "zstd bomb under topk",
            zpayload("topk:0.5+zstd", 16, bomb),
            16,
            ProtoError::DecompressedTooLarge {
                bytes_max: 11 + 2 + 32,
            },
        ),
        (
            "zstd flag without +zstd",
            zpayload("dense-f32", 16, entropy::compress(&f32s(&[0.0; 16]))),
            16,
            inv("update.zstd"),
        ),
        (
            "zstd garbage",
            zpayload("dense-f32+zstd", 16, vec![1, 2, 3, 4, 5, 6, 7, 8]),
            16,
            inv("update.data"),
        ),
        (
            "zstd empty",
            zpayload("dense-f32+zstd", 16, vec![]),
            16,
            inv("update.data"),
        ),
        (
            "zstd trailing bytes",
            zpayload("dense-f32+zstd", 16, trailing),
            16,
            inv("update.data"),
        ),
        (
            "zstd 1 GiB window",
            zpayload("dense-f32+zstd", 16, big_window),
            16,
            inv("update.data"),
        ),
        (
            "zstd body NaN",
            zpayload("dense-f32+zstd", 64, nan_body_frame),
            64,
            ProtoError::NonFinite { index: 1 },
        ),
    ];
    let mut checked = 0;
    for (name, bytes, dim, want) in cases {
        let got = decode(&bytes, dim, &limits());
        if name == "topk ok" {
            // The reference payload the topk cases mutate is itself valid.
            let mut want = vec![0f32; 100];
            want[3] = 1.0;
            want[7] = 2.0;
            assert_eq!(got, Ok(want), "{name}");
            continue;
        }
        let e = got.expect_err(name);
        assert_eq!(norm(e.clone()), want, "{name}: {e}");
        assert_ne!(e.reject_code(), crate::RejectCode::Internal);
        checked += 1;
    }
    assert!(checked > 50);
    // The dimension limit is checked before anything is decoded.
    let e = decode(&payload("dense-f32", 9, f32s(&[0.0; 9])), 9, &tiny_limits).unwrap_err();
    assert_eq!(
        e,
        ProtoError::LimitExceeded {
            what: "update dimension",
            value: 9,
            max: 8
        }
    );
}

#[test]
fn reject_codes_for_codec_errors() {
    use crate::RejectCode as R;
    let cases = [
        (
            ProtoError::IndexOutOfRange {
                index: 1,
                dimension: 1,
            },
            R::Malformed,
        ),
        (
            ProtoError::IndicesNotIncreasing {
                position: 1,
                index: 1,
                previous: 1,
            },
            R::Malformed,
        ),
        (
            ProtoError::CountMismatch {
                what: "x",
                expected: 1,
                got: 2,
            },
            R::Malformed,
        ),
        (ProtoError::NonFiniteScale { block: 0 }, R::NonFinite),
        (
            ProtoError::DecompressedTooLarge { bytes_max: 1 },
            R::TooLarge,
        ),
    ];
    for (e, code) in cases {
        assert_eq!(e.reject_code(), code, "{e}");
    }
}

// ---------------------------------------------------------------- properties

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        rng_seed: RngSeed::Fixed(0xfed9e),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_spec() -> impl Strategy<Value = &'static str> {
    prop::sample::select(SPECS)
}

fn finite_vec() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            -1e3f32..1e3,
            Just(0.0f32),
            prop::num::f32::POSITIVE
                | prop::num::f32::NEGATIVE
                | prop::num::f32::NORMAL
                | prop::num::f32::SUBNORMAL
                | prop::num::f32::ZERO,
        ],
        0..300,
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_decoder_round_trips_its_encoder(s in any_spec(), v in finite_vec(), seed in any::<u64>()) {
        let sp = spec(s);
        let (b, transmitted) = encode_with_transmitted(&sp, &v, seed).unwrap();
        let decoded = decode(&b, v.len(), &limits()).unwrap();
        prop_assert_eq!(&decoded, &transmitted);
        prop_assert!(decoded.iter().all(|x| x.is_finite()));
        if matches!(s, "dense-f32" | "dense-f32+zstd" | "topk:1") {
            prop_assert_eq!(&decoded, &v);
        }
        let w = wire::UpdatePayload::decode(&b[..]).unwrap();
        prop_assert!(w.data.len() as u64 <= sp.body_bytes_max(v.len() as u64));
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(
        s in any_spec(),
        data in prop::collection::vec(any::<u8>(), 0..400),
        dim in 0usize..300,
        zstd in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let b = wire::UpdatePayload { codec: s.into(), dimension: dim as u64, data: data.into(), seed, zstd }
            .encode_to_vec();
        let _ = decode(&b, dim, &limits());
    }

    #[test]
    fn decoders_never_panic_on_mutated_payloads(
        s in any_spec(),
        v in finite_vec(),
        seed in any::<u64>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let b = encode(&spec(s), &v, seed).unwrap();
        let mut w = wire::UpdatePayload::decode(&b[..]).unwrap();
        let mut data = w.data.to_vec();
        if !data.is_empty() {
            for (at, x) in &flips {
                let i = at.index(data.len());
                data[i] ^= x;
            }
            if truncate {
                data.truncate(cut.index(data.len()));
            }
        }
        w.data = data.into();
        let _ = decode(&w.encode_to_vec(), v.len(), &limits());
        // And the raw payload bytes, mutated at the protobuf layer.
        let mut raw = b.to_vec();
        if !raw.is_empty() {
            let i = cut.index(raw.len());
            raw[i] ^= flips[0].1;
        }
        let _ = decode(&raw, v.len(), &limits());
    }
}
