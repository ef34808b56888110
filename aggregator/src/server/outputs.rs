//! Acting on the coordinator's outputs, in order: accepted updates to the
//! group being gathered (`server::commit`; their acknowledgements held
//! until it is durable), payload checks to tokio's blocking pool, frames
//! to connections (a device that does not read is dropped), events to the
//! store, logs, metrics and observers, and a leaf's round outcomes to its
//! parent link.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::commit::GroupCommit;
use super::{ServeReport, Writer};
use crate::coordinator::{
    Coordinator, Event, Forward, Output, RoundClose, RoundOutcome, SessionId, Verified,
};
use crate::metrics::Metrics;
use crate::store::Store;

/// Where outputs go besides connections and the store.
pub(super) struct Outlets<'a> {
    pub metrics: &'a Metrics,
    /// A copy of every event ([`super::Server::observe`]).
    pub observer: Option<&'a mpsc::UnboundedSender<Event>>,
    /// A leaf's link with its parent.
    pub forwards: Option<&'a mpsc::Sender<Forward>>,
    /// Accepted updates gathering into groups, and the frames they hold.
    pub commit: &'a mut GroupCommit,
    /// Payload checks running off the coordinator's task.
    pub jobs: &'a mut JoinSet<Verified>,
    /// A round's close running off the coordinator's task, with how long
    /// it took there.
    pub closes: &'a mut JoinSet<(RoundClose, std::time::Duration)>,
}

/// Acts on the coordinator's outputs in order; true when a round closed.
pub(super) async fn drain(
    core: &mut Coordinator,
    writers: &mut HashMap<SessionId, Writer>,
    store: &mut Store,
    report: &mut ServeReport,
    finished_at: &mut Option<Instant>,
    outlets: Outlets<'_>,
) -> anyhow::Result<bool> {
    let Outlets {
        metrics,
        observer,
        forwards,
        commit,
        jobs,
        closes,
    } = outlets;
    let mut closed = false;
    while let Some(out) = core.poll_output() {
        match out {
            Output::Persist(u) => {
                // Durable with its group before the acknowledgement that
                // follows it is sent (`commit::route` holds it).
                for o in commit.make_room().await? {
                    deliver(o, core, writers, metrics);
                }
                commit.add(Instant::now(), *u);
            }
            Output::Verify(job) => {
                // At most `verify_in_flight_max` at once: the coordinator
                // hands out no more.
                jobs.spawn_blocking(move || job.run());
            }
            Output::CloseRound(job) => {
                // One at a time: the coordinator starts no other close
                // until this one's result is back.
                closes.spawn_blocking(move || {
                    let started = Instant::now();
                    let closed = job.run();
                    (closed, started.elapsed())
                });
            }
            o @ (Output::Send { .. } | Output::Close { .. }) => {
                if let Some(o) = commit.route(o) {
                    deliver(o, core, writers, metrics);
                }
            }
            Output::Forward(f) => {
                // A partial counts its updates: they are durable (and
                // their devices acknowledged) before it leaves, or a leaf
                // killed once its parent has it would have lost updates
                // the parent counted.
                for o in commit.flush().await? {
                    deliver(o, core, writers, metrics);
                }
                match forwards {
                    // One a round: the link takes each before the next round opens.
                    Some(tx) if tx.try_send(*f).is_ok() => {}
                    _ => {
                        tracing::error!("a round's outcome could not be handed to the parent link")
                    }
                }
            }
            Output::Event(e) => {
                if matches!(
                    e,
                    Event::ModelPublished { .. }
                        | Event::RoundClosed {
                            outcome: RoundOutcome::Aborted,
                            ..
                        }
                ) {
                    // The round's store writes follow its updates'.
                    for o in commit.flush().await? {
                        deliver(o, core, writers, metrics);
                    }
                }
                match &e {
                    Event::UpdateAccepted { .. } => {
                        metrics.updates_accepted.inc();
                    }
                    Event::Rejected { code, .. } => metrics.reject(code.as_str()),
                    Event::RoundSettled(s) => metrics.settled(s),
                    Event::Evaluated(s) => metrics.evaluated(s),
                    Event::RoundClosed {
                        accepted, outcome, ..
                    } => {
                        closed = true;
                        metrics.round_participants.set(*accepted as i64);
                        match outcome {
                            RoundOutcome::Published(_) | RoundOutcome::Forwarded => {
                                metrics.rounds_published.inc()
                            }
                            RoundOutcome::Aborted => metrics.rounds_aborted.inc(),
                        };
                    }
                    _ => {}
                }
                if let Some(o) = observer {
                    let _ = o.send(e.clone());
                }
                on_event(e, store, report, finished_at).await?
            }
        }
    }
    Ok(closed)
}

/// A frame or close, to its connection's writer.
pub(super) fn deliver(
    out: Output,
    core: &mut Coordinator,
    writers: &mut HashMap<SessionId, Writer>,
    metrics: &Metrics,
) {
    match out {
        Output::Send { session, msg } => {
            if let Some(w) = writers.get(&session)
                && !w.try_frame(msg.encode())
            {
                // A device that does not read its messages is dropped,
                // never allowed to grow our queues.
                tracing::warn!(session, "writer queue full; closing connection");
                metrics.reject("too_slow");
                let w = writers.remove(&session).expect("present");
                w.close("too slow: messages queued for this device were not read".into());
                core.handle_disconnect(Instant::now(), session);
            }
        }
        Output::Close { session, reason } => {
            if let Some(w) = writers.remove(&session) {
                w.close(reason);
            }
        }
        _ => unreachable!("only frames and closes are delivered"),
    }
}

async fn on_event(
    e: Event,
    store: &mut Store,
    report: &mut ServeReport,
    finished_at: &mut Option<Instant>,
) -> anyhow::Result<()> {
    match e {
        Event::RoundOpened {
            round_id,
            model_version,
        } => tracing::info!(round_id, %model_version, "round opened"),
        Event::DeviceSelected { round_id, device } => {
            tracing::debug!(round_id, device = &device[..12], "device selected")
        }
        Event::UpdateAccepted {
            round_id,
            device,
            sample_count,
            payload_bytes,
            staleness,
            ..
        } => tracing::info!(
            round_id,
            device = &device[..12],
            sample_count,
            payload_bytes,
            staleness,
            "update accepted"
        ),
        Event::Rejected {
            device,
            code,
            detail,
        } => {
            *report.rejections.entry(code.to_string()).or_default() += 1;
            let device = device.as_deref().map(|d| &d[..12]);
            if matches!(
                code,
                fedge_proto::RejectCode::RoundClosed | fedge_proto::RejectCode::NotSelected
            ) {
                // Routine with over-selection and eligibility rules.
                tracing::debug!(%code, device, %detail, "rejected");
            } else {
                tracing::warn!(%code, device, %detail, "rejected");
            }
        }
        Event::Contribution(c) => store.record_contribution(&c).await?,
        Event::PenaltyHeld(p) => {
            tracing::warn!(device = %p.device, round_id = p.round_id, kind = p.kind, "penalty held");
            store.hold_penalty(&p).await?
        }
        Event::RoundClosed {
            round_id,
            accepted,
            outcome,
            metrics,
        } => match outcome {
            RoundOutcome::Published(v) => {
                tracing::info!(round_id, accepted, version = %v, ?metrics, "round closed; model published")
            }
            RoundOutcome::Forwarded => {
                tracing::info!(
                    round_id,
                    accepted,
                    ?metrics,
                    "round closed; partial aggregate forwarded to the parent"
                )
            }
            RoundOutcome::Aborted => {
                tracing::warn!(
                    round_id,
                    accepted,
                    "round aborted: too few updates by the deadline"
                );
                // Recorded, so a restart never reuses the round's id (and
                // its acknowledged updates, dropped with it, never come
                // back into a later round under the same id).
                store.skip_round(round_id).await?
            }
        },
        Event::RoundSettled(s) => {
            let paid: u64 = s.entries.iter().map(|e| e.reward).sum();
            tracing::info!(
                round_id = s.round_id,
                participants = s.entries.len(),
                base_loss = ?s.base_loss,
                scoring_cost = s.cost.fraction,
                rewards_paid = paid,
                unscored = ?s.error,
                "round settled"
            );
            // Written to the ledger with the version it publishes.
            store.stage_settlement(*s);
        }
        Event::ModelPublished {
            round_id,
            version,
            blob,
        } => store.publish(round_id, version, &blob).await?,
        Event::Checkpoint { version, state } => store.save_checkpoint(&version, &state)?,
        Event::RolledBack {
            round_id,
            from,
            to,
            diverged,
            accepted,
        } => tracing::warn!(
            round_id,
            %from,
            %to,
            diverged,
            discarded = accepted,
            "most devices diverged on the current model: rolled back"
        ),
        Event::Evaluated(s) => tracing::info!(
            round_id = s.round_id,
            devices = s.devices,
            loss = s.loss,
            accuracy = s.accuracy,
            "federated evaluation"
        ),
        Event::SecureAggregated {
            round_id,
            survivors,
            completed,
            upload_bytes,
        } => tracing::info!(
            round_id,
            survivors,
            ?completed,
            upload_bytes,
            "secure aggregation finished"
        ),
        Event::Finished { final_version } => {
            tracing::info!(%final_version, "all rounds done");
            *finished_at = Some(Instant::now());
        }
    }
    Ok(())
}
