//! The tokio + quinn driver of one SecAgg+ round: the sans-IO
//! [`SecAggServer`] is owned by one task; each connection's reader feeds
//! it decoded messages through a bounded queue and its writer sends what
//! it polls. Deadlines are `tokio::time::sleep_until` the server's
//! `poll_timeout`.
//!
//! Each device opens one bi stream and names its round index first (4
//! bytes, little-endian), then speaks `fedge_proto::msg::secagg` frames.
//! **This driver does not authenticate the index**: inside the
//! coordinator the index is the slot an authenticated session was
//! selected for; here (tests, benchmarks) any peer may claim any free
//! index. A device whose frame does not decode, names another round or is
//! refused by the state machine is disconnected and becomes a dropout.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use fedge_proto::Limits;
use fedge_proto::io::{read_frame, write_frame};
use fedge_proto::msg::secagg::{decode_device, encode_agg};
use fedge_proto::secagg::DeviceSecAgg;
use tokio::sync::mpsc;

use super::secagg::{RoundFailure, SecAggOutcome, SecAggServer};

/// Frames queued for one device's writer before it is dropped as slow.
const WRITER_QUEUE_FRAMES: usize = 8;
/// Decoded frames waiting for the round task, from all devices together.
const INBOX_FRAMES: usize = 1024;

enum Event {
    Joined(u32, mpsc::Sender<Bytes>),
    Frame(u32, Bytes),
    Gone(u32),
}

/// Serve one round on `endpoint` until it ends. `observe` receives every
/// masked input as it arrives (what the aggregator holds, for tests that
/// check it is uniformly random).
pub async fn serve_round(
    endpoint: &quinn::Endpoint,
    mut server: SecAggServer,
    limits: Limits,
    observe: Option<mpsc::UnboundedSender<(u32, Vec<u64>)>>,
) -> Result<SecAggOutcome, RoundFailure> {
    let round = server.params().round;
    let devices = server.params().devices;
    let (tx, mut rx) = mpsc::channel::<Event>(INBOX_FRAMES);
    let acceptor = tokio::spawn(accept(
        endpoint.clone(),
        tx,
        limits.frame_bytes_max,
        devices,
    ));
    let mut writers: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let outcome = loop {
        while let Some((d, m)) = server.poll_transmit() {
            if let Some(w) = writers.get(&d)
                && w.try_send(encode_agg(round, &m)).is_err()
            {
                writers.remove(&d);
            }
        }
        if let Some(o) = server.take_outcome() {
            break o;
        }
        let deadline = server
            .poll_timeout()
            .expect("a running round has a deadline");
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Joined(d, w)) => {
                    writers.insert(d, w);
                }
                Some(Event::Frame(d, frame)) => {
                    let refused = match decode_device(&frame, &limits) {
                        Ok((r, msg)) if r == round => {
                            if let (Some(o), DeviceSecAgg::MaskedInput(v)) = (&observe, &msg) {
                                let _ = o.send((d, v.clone()));
                            }
                            server.handle_message(Instant::now(), d, msg).err().map(|e| e.to_string())
                        }
                        Ok((r, _)) => Some(format!("a message for round {r}")),
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(why) = refused {
                        tracing::debug!(device = d, %why, "secagg message refused");
                        writers.remove(&d);
                    }
                }
                Some(Event::Gone(d)) => {
                    writers.remove(&d);
                }
                None => {}
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                server.handle_timeout(Instant::now());
            }
        }
    };
    acceptor.abort();
    // Dropping the writers finishes every stream: devices see the end.
    drop(writers);
    outcome
}

async fn accept(
    endpoint: quinn::Endpoint,
    tx: mpsc::Sender<Event>,
    frame_bytes_max: u32,
    devices: u32,
) {
    // Indices claimed so far: a second claim is closed.
    let claimed = Arc::new(Mutex::new(HashSet::new()));
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        let claimed = Arc::clone(&claimed);
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let index = match read_frame(&mut recv, frame_bytes_max).await {
                Ok(Some(b)) if b.len() == 4 => {
                    u32::from_le_bytes(b[..].try_into().expect("4 bytes"))
                }
                _ => return,
            };
            if index >= devices || !claimed.lock().expect("lock").insert(index) {
                return;
            }
            let (wtx, mut wrx) = mpsc::channel::<Bytes>(WRITER_QUEUE_FRAMES);
            if tx.send(Event::Joined(index, wtx)).await.is_err() {
                return;
            }
            let writer = tokio::spawn(async move {
                while let Some(frame) = wrx.recv().await {
                    if write_frame(&mut send, &frame).await.is_err() {
                        return;
                    }
                }
                let _ = send.finish();
                let _ = send.stopped().await;
            });
            while let Ok(Some(frame)) = read_frame(&mut recv, frame_bytes_max).await {
                if tx.send(Event::Frame(index, frame)).await.is_err() {
                    break;
                }
            }
            let _ = tx.send(Event::Gone(index)).await;
            let _ = writer.await;
            conn.close(0u32.into(), b"round over");
        });
    }
}
