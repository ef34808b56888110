//! `fedge-aggregator bench-secagg`: one SecAgg+ round per fleet size,
//! in process and without sockets (the real `SecAggServer` and
//! `SecAggClient`s, every message through its wire encoding), with
//! dropouts injected after the key exchange and after the upload. It
//! checks the unmasked sum against the survivors' quantized updates and
//! writes, per fleet size, the bytes each device sends and receives (wire
//! encodings plus frame headers) beside the same quantized update sent in
//! the clear, and the aggregator's time beside a plain sum of the same
//! quantized updates (decoding included in both), as JSON.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use fedge_aggregator::privacy::secagg::{SecAggServer, StageDeadlines};
use fedge_device::secagg::SecAggClient;
use fedge_proto::Limits;
use fedge_proto::frame::HEADER_BYTES;
use fedge_proto::msg::secagg::{decode_device, encode_agg, encode_device};
use fedge_proto::secagg::mask::ring_mask;
use fedge_proto::secagg::{DeviceSecAgg, SecAggParams, Stage};
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct SecAggBenchArgs {
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-secagg.json")]
    out: PathBuf,
    /// Fleet sizes (devices selected per round), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    devices: Vec<u32>,
    /// Coordinates per update.
    #[arg(long, default_value_t = 10_000)]
    dimension: u32,
    /// Neighbours per device (0: 4 ceil(log2 n), at most n - 1).
    #[arg(long, default_value_t = 0)]
    degree: u32,
    /// Ring bits.
    #[arg(long, default_value_t = 32)]
    bits: u32,
    /// Fraction of devices that drop after advertising their keys (no
    /// shares sent).
    #[arg(long, default_value_t = 0.0)]
    drop_after_advertise: f64,
    /// Fraction of devices that drop after the key exchange (shares sent,
    /// no masked input).
    #[arg(long, default_value_t = 0.0)]
    drop_after_keys: f64,
    /// Fraction that drop after uploading (no unmasking answer).
    #[arg(long, default_value_t = 0.0)]
    drop_after_upload: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also run each round over loopback QUIC (the `privacy::secagg_quic`
    /// driver and the devices' `run_over_quic`) and report its wall time.
    #[arg(long)]
    quic: bool,
    /// Every stage's deadline (virtual in process, real over QUIC).
    #[arg(long, default_value_t = 2000)]
    stage_deadline_ms: u64,
}

pub fn run(a: SecAggBenchArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &n in &a.devices {
        let row = one(&a, n).with_context(|| format!("{n} devices"))?;
        println!("{}", serde_json::to_string(&row)?);
        rows.push(row);
    }
    let report = serde_json::json!({
        "dimension": a.dimension,
        "bits": a.bits,
        "drop_after_advertise": a.drop_after_advertise,
        "drop_after_keys": a.drop_after_keys,
        "drop_after_upload": a.drop_after_upload,
        "rounds": rows,
    });
    crate::bench::write_report(&a.out, &report)
}

fn one(a: &SecAggBenchArgs, n: u32) -> anyhow::Result<serde_json::Value> {
    let degree = if a.degree > 0 {
        a.degree
    } else {
        4 * (n.max(2) as f64).log2().ceil() as u32
    };
    let mut params = SecAggParams {
        round: 1,
        seed: [a.seed as u8; 32],
        devices: n,
        degree,
        threshold: 1,
        bits: a.bits,
        clip: 1.0,
        dimension: a.dimension,
        noise: None,
    };
    let k = params.graph().degree();
    params.threshold = k / 3 + 1;
    let limits = Limits {
        frame_bytes_max: u32::MAX,
        ..Limits::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let drop_at: Vec<Option<Stage>> = (0..n)
        .map(|_| {
            let r: f64 = rng.random();
            let (adv, keys) = (a.drop_after_advertise, a.drop_after_keys);
            if r < adv {
                Some(Stage::ShareKeys)
            } else if r < adv + keys {
                Some(Stage::MaskedInput)
            } else if r < adv + keys + a.drop_after_upload {
                Some(Stage::Unmasking)
            } else {
                None
            }
        })
        .collect();
    let mut device_time = Duration::ZERO;
    let mut clients: Vec<Option<SecAggClient>> = Vec::with_capacity(n as usize);
    let mut quantized = Vec::with_capacity(n as usize);
    // Each device's randomness and update, to build it again for QUIC.
    let mut makings = Vec::with_capacity(n as usize);
    for i in 0..n {
        let update: Vec<f32> = (0..a.dimension)
            .map(|_| rng.random_range(-0.01f32..0.01))
            .collect();
        let mut r = [0u8; 32];
        rng.fill(&mut r);
        let t = Instant::now();
        let mut c = SecAggClient::new(params.clone(), i, r)?;
        c.set_update(&update)?;
        device_time += t.elapsed();
        quantized.push(c.quantized().expect("set").to_vec());
        clients.push(Some(c));
        makings.push((r, update));
    }
    let stage = Duration::from_millis(a.stage_deadline_ms);
    let deadlines = StageDeadlines {
        advertise_keys: stage,
        share_keys: stage,
        masked_input: stage,
        unmasking: stage,
    };
    // Virtual time: stages end when their devices have answered or at
    // their deadline; real time is measured only around the server calls.
    let mut now = Instant::now();
    let mut server_time = Duration::ZERO;
    let mut server = SecAggServer::new(params.clone(), deadlines, params.threshold, now)?;
    let (mut up, mut down) = (vec![0u64; n as usize], vec![0u64; n as usize]);
    let outcome = loop {
        let mut moved = false;
        for (i, slot) in clients.iter_mut().enumerate() {
            while let Some(m) = slot.as_mut().and_then(|c| c.poll_transmit()) {
                if drop_at[i].is_some_and(|d| d <= m.stage()) {
                    *slot = None;
                    break;
                }
                moved = true;
                let frame = encode_device(1, a.bits, &m);
                up[i] += (frame.len() + HEADER_BYTES) as u64;
                let t = Instant::now();
                let (_, msg) = decode_device(&frame, &limits)?;
                server.handle_message(now, i as u32, msg)?;
                server_time += t.elapsed();
            }
        }
        let t = Instant::now();
        let mut out = Vec::new();
        while let Some((d, m)) = server.poll_transmit() {
            let frame = encode_agg(1, &m);
            down[d as usize] += (frame.len() + HEADER_BYTES) as u64;
            out.push((d, m));
        }
        server_time += t.elapsed();
        for (d, m) in out {
            moved = true;
            if let Some(c) = clients[d as usize].as_mut() {
                let t = Instant::now();
                let r = c.handle_message(m);
                device_time += t.elapsed();
                if r.is_err() {
                    clients[d as usize] = None;
                }
            }
        }
        if let Some(o) = server.take_outcome() {
            break o?;
        }
        if !moved {
            now = server.poll_timeout().expect("running");
            let t = Instant::now();
            server.handle_timeout(now);
            server_time += t.elapsed();
        }
    };
    let m = ring_mask(a.bits);
    let plain = survivors_sum(&quantized, &outcome.survivors, a.bits);
    ensure!(
        plain == outcome.sum,
        "the unmasked sum differs from the survivors' sum"
    );

    // Without SecAgg: the same quantized updates in the clear, decoded and
    // summed by the aggregator.
    let frames: Vec<bytes::Bytes> = outcome
        .survivors
        .iter()
        .map(|&u| {
            encode_device(
                1,
                a.bits,
                &DeviceSecAgg::MaskedInput(quantized[u as usize].clone()),
            )
        })
        .collect();
    let plain_up = (frames[0].len() + HEADER_BYTES) as f64;
    let t = Instant::now();
    let mut sum = vec![0u64; a.dimension as usize];
    for f in &frames {
        let (_, msg) = decode_device(f, &limits)?;
        let DeviceSecAgg::MaskedInput(v) = msg else {
            unreachable!("encoded above")
        };
        for (s, x) in sum.iter_mut().zip(v) {
            *s = s.wrapping_add(x) & m;
        }
    }
    let plain_time = t.elapsed();
    ensure!(sum == plain, "the plain sum");

    let quic = if a.quic {
        let t = Instant::now();
        let o = quic_round(&params, deadlines, &makings, &drop_at)?;
        ensure!(
            survivors_sum(&quantized, &o.survivors, a.bits) == o.sum,
            "over QUIC, the unmasked sum differs from the survivors' sum"
        );
        serde_json::json!({
            "round_ms": t.elapsed().as_secs_f64() * 1e3,
            "completed": o.completed,
            "survivors": o.survivors.len(),
        })
    } else {
        serde_json::Value::Null
    };

    // Per device that completed the round (sent its unmasking shares).
    let finishers: Vec<usize> = (0..n as usize).filter(|&i| drop_at[i].is_none()).collect();
    let mean =
        |v: &[u64]| finishers.iter().map(|&i| v[i] as f64).sum::<f64>() / finishers.len() as f64;
    let (up_mean, down_mean) = (mean(&up), mean(&down));
    Ok(serde_json::json!({
        "devices": n,
        "degree": k,
        "threshold": params.threshold,
        "survivors": outcome.survivors.len(),
        "completed": outcome.completed,
        "upload_bytes_per_device": up_mean,
        "download_bytes_per_device": down_mean,
        "plain_upload_bytes_per_device": plain_up,
        "upload_expansion": up_mean / plain_up,
        "server_ms": server_time.as_secs_f64() * 1e3,
        "plain_server_ms": plain_time.as_secs_f64() * 1e3,
        "server_overhead": server_time.as_secs_f64() / plain_time.as_secs_f64(),
        "device_ms_mean": device_time.as_secs_f64() * 1e3 / n as f64,
        "quic": quic,
    }))
}

/// Σ_{u ∈ survivors} quantized[u] in Z_2^bits: what unmasking must give.
fn survivors_sum(quantized: &[Vec<u64>], survivors: &[u32], bits: u32) -> Vec<u64> {
    let m = ring_mask(bits);
    let mut sum = vec![0u64; quantized.first().map_or(0, Vec::len)];
    for &u in survivors {
        for (s, &v) in sum.iter_mut().zip(&quantized[u as usize]) {
            *s = s.wrapping_add(v) & m;
        }
    }
    sum
}

/// The same round over loopback QUIC: an aggregator endpoint with a fresh
/// TLS identity, each device on its own connection, dropouts as given.
fn quic_round(
    params: &SecAggParams,
    deadlines: StageDeadlines,
    makings: &[([u8; 32], Vec<f32>)],
    drop_at: &[Option<Stage>],
) -> anyhow::Result<fedge_aggregator::privacy::secagg::SecAggOutcome> {
    use fedge_aggregator::privacy::secagg_quic::serve_round;
    use fedge_device::secagg::run_over_quic;
    use fedge_device::transport::{QuicTiming, Trust, client_config};
    let dir = tempfile::tempdir()?;
    let identity = fedge_aggregator::tls::TlsIdentity::load_or_create(dir.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config()?)?;
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(std::sync::Arc::new(quic)),
            "127.0.0.1:0".parse()?,
        )?;
        let addr = endpoint.local_addr()?;
        let server =
            SecAggServer::new(params.clone(), deadlines, params.threshold, Instant::now())?;
        let limits = Limits::default();
        let serving = tokio::spawn({
            let (endpoint, limits) = (endpoint.clone(), limits.clone());
            async move { serve_round(&endpoint, server, limits, None).await }
        });
        let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client_ep.set_default_client_config(client_config(
            &Trust::Pinned(identity.fingerprint()),
            &QuicTiming::default(),
        )?);
        for (i, (r, update)) in makings.iter().enumerate() {
            let mut c = SecAggClient::new(params.clone(), i as u32, *r)?;
            c.set_update(update)?;
            let (ep, limits, drop) = (client_ep.clone(), limits.clone(), drop_at[i]);
            tokio::spawn(async move {
                let conn = ep.connect(addr, "localhost")?.await?;
                let end = run_over_quic(&conn, c, &limits, drop).await;
                conn.close(0u32.into(), b"done");
                end
            });
        }
        Ok::<_, anyhow::Error>(serving.await??)
    })
}
