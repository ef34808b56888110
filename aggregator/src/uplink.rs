//! A leaf aggregator's link with its parent (a tree of aggregators; see
//! `coordinator::tree`): a QUIC client over the same transport devices
//! use, speaking the device protocol. The leaf authenticates with its own
//! Ed25519 key (`leaf.key` in the state directory; the parent lists the
//! public half), asks for the parent's round, fetches the parent's model,
//! hands the round to the coordinator ([`FromParent::Round`]) and uploads
//! the [`Partial`] the coordinator forwards when the round closes, signed,
//! with its [`PartialAggregate`] claims in the manifest. Then it asks for
//! the next round, however often the parent paces it away, until the
//! parent says its run is finished ([`FromParent::Finished`]).
//!
//! A thin driver, like `server`: the protocol it follows is the parent's
//! coordinator's, and what a leaf does with a round is its own
//! coordinator's. A lost connection is reconnected with backoff and the
//! partial still pending is offered again (the parent resumes the upload,
//! or refuses it as a replay once it has it).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fedge_proto::io::{read_frame, write_frame};
use fedge_proto::msg::{Capabilities, Hello, ModelRef, UploadBegin};
use fedge_proto::sign::{
    PartialAggregate, SigningKey, TLS_EXPORTER_LABEL, UpdateManifest, sign_auth,
};
use fedge_proto::update::encode_partial;
use fedge_proto::{AggMsg, DeviceMsg, Limits, ModelBlob, ModelVersion, SCHEMA_VERSION};
use rand::Rng;
use tokio::sync::mpsc;

use crate::coordinator::{Forward, ParentRound, Partial};

/// The leaf's key file in its state directory, and its public half (hex),
/// which the parent's `tree.leaves.keys` lists.
pub const LEAF_KEY_FILE: &str = "leaf.key";
pub const LEAF_PUBLIC_KEY_FILE: &str = "leaf.pub";

/// Loads the leaf key of the state directory `dir`, creating it on first use.
pub fn leaf_key(dir: &Path) -> Result<SigningKey, crate::ledger::LedgerKeyError> {
    crate::ledger::load_or_create_key(dir, LEAF_KEY_FILE, LEAF_PUBLIC_KEY_FILE)
}

/// Where the parent is and how to talk to it.
#[derive(Clone, Debug)]
pub struct ParentLink {
    pub address: SocketAddr,
    /// SHA-256 fingerprint of the parent's certificate.
    pub pin: [u8; 32],
    /// Time kept back from the parent's deadline for the partial's upload:
    /// the leaf's round closes this long before it.
    pub upload_margin: Duration,
    /// Chunk size of the partial's upload.
    pub chunk_bytes: u32,
    /// Time the parent may take to answer one request (its check-in window
    /// included) before the connection is given up and made again.
    pub reply_timeout: Duration,
}

/// What the link tells the leaf's coordinator.
#[derive(Debug)]
pub enum FromParent {
    /// The parent's next round, to run now.
    Round(ParentRound),
    /// The parent's run is over; its final model.
    Finished(ModelBlob),
}

/// The link's memory across connections.
struct LinkState {
    key: SigningKey,
    /// The model the leaf holds (the last the parent sent, or its initial one).
    model: (ModelVersion, ModelBlob),
    /// The last round handed to the coordinator.
    given: Option<u64>,
    /// What the coordinator forwarded and the parent has not yet answered.
    pending: Option<Forward>,
}

/// Runs the link until the parent finishes (or `to_core` is dropped).
/// `initial` is the leaf's model when it starts.
pub async fn run(
    link: ParentLink,
    key: SigningKey,
    initial: ModelBlob,
    limits: Limits,
    mut forwards: mpsc::Receiver<Forward>,
    to_core: mpsc::Sender<FromParent>,
) {
    let mut state = LinkState {
        key,
        model: (initial.version(), initial),
        given: None,
        pending: None,
    };
    let bind: SocketAddr = if link.address.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let endpoint = match quinn::Endpoint::client(bind) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot open a QUIC endpoint for the parent link");
            return;
        }
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = Session {
            link: &link,
            limits: &limits,
            state: &mut state,
            forwards: &mut forwards,
            to_core: &to_core,
        };
        match session.run(&endpoint, &mut backoff).await {
            Ok(()) => break,
            Err(e) if to_core.is_closed() => {
                tracing::debug!(error = %e, "parent link stops: the aggregator is gone");
                break;
            }
            Err(e) => {
                let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "parent link lost");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    endpoint.close(0u32.into(), b"leaf stopping");
}

/// One connection to the parent.
struct Session<'a> {
    link: &'a ParentLink,
    limits: &'a Limits,
    state: &'a mut LinkState,
    forwards: &'a mut mpsc::Receiver<Forward>,
    to_core: &'a mpsc::Sender<FromParent>,
}

/// The parent's stream, framed.
struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    limits: Limits,
    reply_timeout: Duration,
}

impl Stream {
    async fn send(&mut self, msg: &DeviceMsg) -> anyhow::Result<()> {
        write_frame(&mut self.send, &msg.encode())
            .await
            .context("sending to the parent")
    }

    /// The parent's next message (heartbeat answers skipped).
    async fn recv(&mut self) -> anyhow::Result<AggMsg> {
        loop {
            let frame = tokio::time::timeout(
                self.reply_timeout,
                read_frame(&mut self.recv, self.limits.frame_bytes_max),
            )
            .await
            .context("the parent did not answer in time")??
            .context("the parent closed the stream")?;
            match AggMsg::decode(&frame, &self.limits)? {
                AggMsg::HeartbeatAck { .. } => continue,
                AggMsg::Reject {
                    code,
                    detail,
                    fatal: true,
                } => anyhow::bail!("the parent refused this leaf ({code}): {detail}"),
                m => return Ok(m),
            }
        }
    }
}

impl Session<'_> {
    async fn run(self, endpoint: &quinn::Endpoint, backoff: &mut Duration) -> anyhow::Result<()> {
        let Session {
            link,
            limits,
            state,
            forwards,
            to_core,
        } = self;
        let cfg = crate::tls::client_config(link.pin, Duration::from_secs(60))?;
        let conn = endpoint
            .connect_with(cfg, link.address, "localhost")?
            .await
            .with_context(|| format!("connecting to the parent at {}", link.address))?;
        let mut binding = [0u8; 32];
        conn.export_keying_material(&mut binding, TLS_EXPORTER_LABEL, b"")
            .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
        let (send, recv) = conn.open_bi().await?;
        let mut s = Stream {
            send,
            recv,
            limits: limits.clone(),
            reply_timeout: link.reply_timeout,
        };
        let federation_id = authenticate(&mut s, &state.key, &binding).await?;
        tracing::info!(parent = %link.address, "authenticated to the parent");
        *backoff = Duration::from_millis(200);
        loop {
            if let Some(f) = state.pending.clone() {
                send_forward(&mut s, link, state, f, federation_id).await?;
                state.pending = None;
            }
            s.send(&DeviceMsg::TaskRequest {
                have_model_version: Some(state.model.0),
            })
            .await?;
            match s.recv().await? {
                AggMsg::TaskOffer(offer) => {
                    if state.given.is_none_or(|g| offer.round_id > g) {
                        let model = fetch_model(&mut s, state, offer.model).await?;
                        let left = Duration::from_millis(offer.deadline_ms);
                        let round = ParentRound {
                            round_id: offer.round_id,
                            model,
                            plan: offer.plan.clone(),
                            deadline: Instant::now() + left.saturating_sub(link.upload_margin),
                        };
                        tracing::info!(round_id = offer.round_id, "the parent opened a round");
                        to_core.send(FromParent::Round(round)).await?;
                        state.given = Some(offer.round_id);
                    }
                    // The leaf's round runs; its outcome comes back here.
                    let f = wait_forward(&mut s, forwards, offer.round_id).await?;
                    state.pending = Some(f);
                }
                AggMsg::NoTask {
                    retry_after_ms_min,
                    retry_after_ms_max,
                    ..
                } => {
                    let hi = retry_after_ms_max.max(retry_after_ms_min);
                    let ms = rand::rng().random_range(retry_after_ms_min..=hi);
                    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                }
                AggMsg::Finished(mref) => {
                    let model = fetch_model(&mut s, state, mref).await?;
                    tracing::info!(version = %mref.version, "the parent finished its run");
                    to_core.send(FromParent::Finished(model)).await?;
                    let _ = s.send.finish();
                    return Ok(());
                }
                AggMsg::Reject { code, detail, .. } => {
                    tracing::warn!(%code, %detail, "the parent refused a request");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => tracing::debug!(?other, "unexpected message from the parent"),
            }
        }
    }
}

/// Hello, the signed challenge, `AuthOk`: returns the parent's federation id.
async fn authenticate(
    s: &mut Stream,
    key: &SigningKey,
    binding: &[u8; 32],
) -> anyhow::Result<[u8; 32]> {
    s.send(&DeviceMsg::Hello(Hello {
        schema_version: SCHEMA_VERSION,
        device_public_key: key.verifying_key(),
        runtime_version: concat!("fedge-aggregator-leaf/", env!("CARGO_PKG_VERSION")).into(),
        capabilities: Capabilities::default(),
    }))
    .await?;
    let nonce = match s.recv().await? {
        AggMsg::Challenge { nonce, .. } => nonce,
        AggMsg::NoTask {
            retry_after_ms_min, ..
        } => {
            tokio::time::sleep(Duration::from_millis(retry_after_ms_min.min(60_000))).await;
            anyhow::bail!("the parent paced this leaf away before authenticating");
        }
        m => anyhow::bail!("expected a challenge from the parent, got {m:?}"),
    };
    s.send(&DeviceMsg::AuthResponse {
        signature: sign_auth(key, &nonce, binding),
    })
    .await?;
    match s.recv().await? {
        AggMsg::AuthOk { federation_id, .. } => Ok(federation_id),
        m => anyhow::bail!("expected AuthOk from the parent, got {m:?}"),
    }
}

/// The model `mref` names: the one held, or downloaded in chunks and
/// checked against its version.
async fn fetch_model(
    s: &mut Stream,
    state: &mut LinkState,
    mref: ModelRef,
) -> anyhow::Result<ModelBlob> {
    if mref.version == state.model.0 {
        return Ok(state.model.1.clone());
    }
    anyhow::ensure!(
        mref.model_bytes <= s.limits.model_bytes_max
            && mref.chunk_count <= s.limits.transfer_chunks_max,
        "the parent offers a model of {} bytes in {} chunks, over this leaf's limits",
        mref.model_bytes,
        mref.chunk_count
    );
    let mut blob = Vec::with_capacity(mref.model_bytes as usize);
    for index in 0..mref.chunk_count {
        s.send(&DeviceMsg::ChunkRequest {
            model_version: mref.version,
            index,
        })
        .await?;
        match s.recv().await? {
            AggMsg::ModelChunk {
                model_version,
                index: i,
                data,
            } if model_version == mref.version && i == index => {
                anyhow::ensure!(
                    (blob.len() + data.len()) as u64 <= mref.model_bytes,
                    "the parent's model chunks exceed its announced size"
                );
                blob.extend_from_slice(&data);
            }
            m => anyhow::bail!(
                "expected chunk {index} of model {}, got {m:?}",
                mref.version
            ),
        }
    }
    anyhow::ensure!(
        ModelVersion::of(&blob) == mref.version,
        "the parent's model does not hash to its version {}",
        mref.version
    );
    let model = ModelBlob::decode(&blob, &s.limits)?;
    state.model = (mref.version, model.clone());
    Ok(model)
}

/// Waits for the coordinator's outcome of round `round_id`, keeping the
/// connection alive with heartbeats.
async fn wait_forward(
    s: &mut Stream,
    forwards: &mut mpsc::Receiver<Forward>,
    round_id: u64,
) -> anyhow::Result<Forward> {
    let mut beat = tokio::time::interval(Duration::from_secs(5));
    let mut seq = 0;
    loop {
        tokio::select! {
            f = forwards.recv() => {
                let f = f.context("the aggregator stopped")?;
                let r = match &f {
                    Forward::Partial(p) => p.round_id,
                    Forward::Abandoned { round_id, .. } => *round_id,
                };
                if r >= round_id {
                    return Ok(f);
                }
            }
            _ = beat.tick() => {
                seq += 1;
                s.send(&DeviceMsg::Heartbeat { seq }).await?;
            }
        }
    }
}

/// Sends what the coordinator forwarded: a partial's upload (until the
/// parent accepts or refuses it), or the round given up.
async fn send_forward(
    s: &mut Stream,
    link: &ParentLink,
    state: &LinkState,
    f: Forward,
    federation_id: [u8; 32],
) -> anyhow::Result<()> {
    let p = match f {
        Forward::Abandoned {
            round_id,
            reason,
            detail,
        } => {
            tracing::warn!(round_id, %detail, "round given up to the parent");
            return s
                .send(&DeviceMsg::TaskAbandoned {
                    round_id,
                    reason,
                    detail,
                })
                .await;
        }
        Forward::Partial(p) => p,
    };
    let (begin, payload) = sign_partial(
        &state.key,
        &p,
        federation_id,
        link.chunk_bytes,
        s.limits.metrics_max,
    );
    let hash = begin.manifest.payload_hash;
    s.send(&DeviceMsg::UploadBegin(Box::new(begin))).await?;
    let chunk = link.chunk_bytes as usize;
    loop {
        match s.recv().await? {
            AggMsg::UploadStatus {
                payload_hash,
                next_index,
            } if payload_hash == hash => {
                for (i, data) in payload.chunks(chunk).enumerate().skip(next_index as usize) {
                    s.send(&DeviceMsg::UploadChunk {
                        payload_hash: hash,
                        index: i as u32,
                        data: Bytes::copy_from_slice(data),
                    })
                    .await?;
                }
            }
            AggMsg::UpdateAccepted { round_id, .. } => {
                tracing::info!(
                    round_id,
                    devices = p.devices,
                    weight = p.total_weight,
                    "partial aggregate accepted by the parent"
                );
                return Ok(());
            }
            AggMsg::Reject { code, detail, .. } => {
                // Late, a replay (it has it already) or refused: either way
                // the parent has decided, and the leaf goes on.
                tracing::warn!(round_id = p.round_id, %code, %detail, "partial aggregate refused by the parent");
                return Ok(());
            }
            AggMsg::NoTask {
                retry_after_ms_min, ..
            } => {
                // The parent's upload budget is full: offer it again later.
                tokio::time::sleep(Duration::from_millis(retry_after_ms_min.min(60_000))).await;
                anyhow::bail!("the parent paced the partial's upload away");
            }
            m => tracing::debug!(?m, "unexpected message during the partial's upload"),
        }
    }
}

/// The partial's signed upload manifest and its payload (the combined
/// update at float64, `dense-f64`).
///
/// # Panics
/// If the partial's update is not finite in float32's range (the leaf's
/// coordinator forwards none that is not).
pub fn sign_partial(
    key: &SigningKey,
    p: &Partial,
    federation_id: [u8; 32],
    chunk_bytes: u32,
    metrics_max: u32,
) -> (UploadBegin, Bytes) {
    let payload = encode_partial(&p.delta)
        .unwrap_or_else(|e| panic!("sign_partial precondition violated: {e}"));
    let manifest = UpdateManifest {
        round_id: p.round_id,
        model_version: p.model_version,
        payload_hash: *blake3::hash(&payload).as_bytes(),
        payload_bytes: payload.len() as u64,
        sample_count: p.samples.max(1),
        metrics: p
            .metrics
            .iter()
            .take(metrics_max as usize)
            .cloned()
            .collect(),
        device_public_key: key.verifying_key(),
        federation_id,
        partial: Some(PartialAggregate {
            total_weight: p.total_weight,
            devices: p.devices,
            manifests_root: p.manifests_root,
        }),
    };
    let signature = manifest.sign(key);
    let begin = UploadBegin {
        manifest,
        signature,
        chunk_bytes,
    };
    (begin, payload)
}
