//! A SecAgg+ round over real QUIC on loopback (the case): 100
//! devices, 30% dropping after the key exchange (their shares sent, no
//! masked input) and 10% after uploading (no unmasking answer). The
//! unmasked sum equals the sum of the survivors' quantized updates
//! exactly, and every masked input the aggregator held was uniformly
//! random (chi-square on their top bytes) and unlike the update it hid.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_aggregator::privacy::secagg::{SecAggServer, StageDeadlines};
use fedge_aggregator::privacy::secagg_quic::serve_round;
use fedge_aggregator::tls::TlsIdentity;
use fedge_device::secagg::{QuicRoundEnd, SecAggClient, run_over_quic};
use fedge_device::transport::{QuicTiming, Trust, client_config};
use fedge_proto::Limits;
use fedge_proto::secagg::mask::ring_mask;
use fedge_proto::secagg::{SecAggParams, Stage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DEVICES: u32 = 100;
const DIM: u32 = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_devices_over_quic_thirty_percent_drop_after_keys_ten_after_upload() {
    let seed = 100;
    let dir = tempfile::tempdir().unwrap();
    let identity = TlsIdentity::load_or_create(dir.path()).unwrap();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config().unwrap())
        .unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let params = SecAggParams {
        round: 1,
        seed: [7; 32],
        devices: DEVICES,
        degree: 40,
        threshold: 12,
        bits: 32,
        clip: 4.0,
        dimension: DIM,
        noise: None,
    };
    // Stages whose devices all answer end at once; the two with dropouts
    // wait out their deadline.
    let deadlines = StageDeadlines {
        advertise_keys: Duration::from_secs(30),
        share_keys: Duration::from_secs(30),
        masked_input: Duration::from_secs(4),
        unmasking: Duration::from_secs(4),
    };
    let server = SecAggServer::new(params.clone(), deadlines, 20, Instant::now()).unwrap();
    let limits = Limits::default();
    let (otx, mut orx) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn({
        let endpoint = endpoint.clone();
        let limits = limits.clone();
        async move { serve_round(&endpoint, server, limits, Some(otx)).await }
    });

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..DEVICES).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut drop_at = vec![None; DEVICES as usize];
    for &d in &order[..30] {
        drop_at[d as usize] = Some(Stage::MaskedInput);
    }
    for &d in &order[30..40] {
        drop_at[d as usize] = Some(Stage::Unmasking);
    }
    let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client_ep.set_default_client_config(
        client_config(
            &Trust::Pinned(identity.fingerprint()),
            &QuicTiming::default(),
        )
        .unwrap(),
    );
    let mut devices = Vec::new();
    let mut quantized = BTreeMap::new();
    for i in 0..DEVICES {
        let update: Vec<f32> = (0..DIM).map(|_| rng.random_range(-0.3f32..0.3)).collect();
        let mut r = [0u8; 32];
        r[..4].copy_from_slice(&i.to_le_bytes());
        let mut client = SecAggClient::new(params.clone(), i, r).unwrap();
        client.set_update(&update).unwrap();
        quantized.insert(i, client.quantized().unwrap().to_vec());
        let (ep, limits, drop) = (client_ep.clone(), limits.clone(), drop_at[i as usize]);
        devices.push(tokio::spawn(async move {
            let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
            let end = run_over_quic(&conn, client, &limits, drop).await;
            conn.close(0u32.into(), b"done");
            (i, end)
        }));
    }
    let outcome = tokio::time::timeout(Duration::from_secs(120), serving)
        .await
        .expect("the round ends by its deadlines")
        .unwrap()
        .expect("enough survivors");
    for d in devices {
        let (i, end) = d.await.unwrap();
        let end = end.unwrap_or_else(|e| panic!("device {i}: {e}"));
        match drop_at[i as usize] {
            Some(s) => assert_eq!(end, QuicRoundEnd::Dropped(s), "device {i}"),
            None => assert_eq!(end, QuicRoundEnd::Finished, "device {i}"),
        }
    }
    assert_eq!(outcome.completed, [100, 100, 70, 60]);
    let expect_survivors: Vec<u32> = (0..DEVICES)
        .filter(|&d| drop_at[d as usize] != Some(Stage::MaskedInput))
        .collect();
    assert_eq!(outcome.survivors, expect_survivors);
    let mut plain = vec![0u64; DIM as usize];
    for u in &outcome.survivors {
        for (s, &v) in plain.iter_mut().zip(&quantized[u]) {
            *s = s.wrapping_add(v) & ring_mask(32);
        }
    }
    assert_eq!(
        outcome.sum, plain,
        "the unmasked sum is the survivors' quantized sum"
    );

    // What the aggregator held: 70 masked inputs, none an update, all
    // uniform. Chi-square on the top byte over 256 bins, 255 degrees of
    // freedom: P(chi2 > 340) ~ 3e-4.
    let mut seen = BTreeMap::new();
    while let Ok((d, v)) = orx.try_recv() {
        seen.insert(d, v);
    }
    assert_eq!(seen.len(), 70);
    let mut bins = [0f64; 256];
    for (d, v) in &seen {
        assert_ne!(v, &quantized[d], "device {d}'s update arrived unmasked");
        for &x in v {
            bins[(x >> 24) as usize] += 1.0;
        }
    }
    let e = (70 * DIM) as f64 / 256.0;
    let chi2: f64 = bins.iter().map(|&o| (o - e) * (o - e) / e).sum();
    assert!(chi2 < 340.0, "chi2 {chi2}");
    // The same statistic on the plain updates is far from uniform.
    let mut plain_bins = [0f64; 256];
    for d in seen.keys() {
        for &x in &quantized[d] {
            plain_bins[(x >> 24) as usize] += 1.0;
        }
    }
    let plain_chi2: f64 = plain_bins.iter().map(|&o| (o - e) * (o - e) / e).sum();
    assert!(plain_chi2 > 1e4, "control chi2 {plain_chi2}");
}
