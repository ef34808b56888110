//! Domain messages and their conversion from and to the wire.
//!
//! **API boundary:** the state machines consume [`DeviceMsg`] / [`AggMsg`]
//! only. `decode` validates lengths, enums and limits; anything that fails
//! is a [`ProtoError`] with the reject code to send back.

use bytes::Bytes;
use prost::Message;

use crate::sign::{UpdateManifest, VerifyingKey, hash32, public_key, signature64};
use crate::wire::envelope::Body;
use crate::{Limits, ModelVersion, ProtoError, RejectCode, wire};

mod eval;
mod plan;
pub mod secagg;
#[cfg(test)]
mod tests;

pub use eval::{EvalManifest, EvalReport};
pub use plan::{LORA_RANK_MAX, LORA_TARGETS_MAX, LoraSpec, Loss, Optimizer, TrainingPlan};
use plan::{plan_from_wire, plan_to_wire};

/// What a device reports about itself at hello.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Capabilities {
    pub executors: Vec<String>,
    pub memory_bytes: u64,
    pub charging: bool,
    pub idle: bool,
    pub unmetered: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub schema_version: u32,
    pub device_public_key: VerifyingKey,
    pub runtime_version: String,
    pub capabilities: Capabilities,
}

/// A model as offered for download in chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelRef {
    pub version: ModelVersion,
    pub model_bytes: u64,
    pub chunk_bytes: u32,
    pub chunk_count: u32,
}

impl ModelRef {
    pub fn new(version: ModelVersion, model_bytes: u64, chunk_bytes: u32) -> Self {
        let chunk_count = model_bytes.div_ceil(chunk_bytes.into()) as u32;
        ModelRef {
            version,
            model_bytes,
            chunk_bytes,
            chunk_count,
        }
    }

    /// Byte range of chunk `index` in the blob.
    pub fn chunk_range(&self, index: u32) -> std::ops::Range<usize> {
        let start = u64::from(index) * u64::from(self.chunk_bytes);
        let end = (start + u64::from(self.chunk_bytes)).min(self.model_bytes);
        start as usize..end as usize
    }

    fn check(&self, limits: &Limits) -> Result<(), ProtoError> {
        Limits::check("model bytes", self.model_bytes, limits.model_bytes_max)?;
        Limits::check(
            "chunk bytes",
            self.chunk_bytes.into(),
            limits.chunk_bytes_max.into(),
        )?;
        Limits::check(
            "chunk count",
            self.chunk_count.into(),
            limits.transfer_chunks_max.into(),
        )?;
        if self.chunk_bytes == 0 {
            return Err(ProtoError::Invalid {
                field: "chunk_bytes",
                reason: "zero".into(),
            });
        }
        let expected = self.model_bytes.div_ceil(self.chunk_bytes.into());
        if u64::from(self.chunk_count) != expected {
            return Err(ProtoError::Invalid {
                field: "chunk_count",
                reason: format!("{} chunks declared, {expected} implied", self.chunk_count),
            });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskOffer {
    pub round_id: u64,
    pub model: ModelRef,
    pub plan: TrainingPlan,
    pub deadline_ms: u64,
    /// A smaller download for a device that holds `base`: the lossless
    /// delta base -> model, fetched in chunks by its own id.
    pub delta: Option<DeltaRef>,
    /// The round combines updates with SecAgg+: the device's part in it.
    pub secagg: Option<SecAggOffer>,
    /// An evaluation task: evaluate the model on the device's own held-out
    /// data and send an [`EvalReport`], instead of training.
    pub evaluate: bool,
}

/// A device's part in a round's SecAgg+: the round's public parameters and
/// the device's index among those selected (assigned by the aggregator,
/// which maps the index back to the authenticated session: a device cannot
/// choose it).
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggOffer {
    pub params: crate::secagg::SecAggParams,
    pub index: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaRef {
    pub base: ModelVersion,
    pub blob: ModelRef,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UploadBegin {
    pub manifest: UpdateManifest,
    pub signature: [u8; 64],
    pub chunk_bytes: u32,
}

/// Why a device gives up a task it was offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbandonReason {
    /// Local training produced a non-finite update: the model it was given
    /// may be poisoned (the aggregator counts these; see rollback).
    Diverged,
    /// Local training failed for another reason.
    Failed,
    /// The device's policy says it may not work now.
    Declined,
}

impl AbandonReason {
    pub fn name(self) -> &'static str {
        match self {
            AbandonReason::Diverged => "diverged",
            AbandonReason::Failed => "failed",
            AbandonReason::Declined => "declined",
        }
    }

    fn to_wire(self) -> wire::AbandonReason {
        match self {
            AbandonReason::Diverged => wire::AbandonReason::AbandonDiverged,
            AbandonReason::Failed => wire::AbandonReason::AbandonFailed,
            AbandonReason::Declined => wire::AbandonReason::AbandonDeclined,
        }
    }

    fn from_wire(v: i32) -> Result<Self, ProtoError> {
        match wire::AbandonReason::try_from(v) {
            Ok(wire::AbandonReason::AbandonDiverged) => Ok(AbandonReason::Diverged),
            Ok(wire::AbandonReason::AbandonFailed) => Ok(AbandonReason::Failed),
            Ok(wire::AbandonReason::AbandonDeclined) => Ok(AbandonReason::Declined),
            _ => Err(ProtoError::Invalid {
                field: "task_abandoned.reason",
                reason: format!("unknown abandon reason {v}"),
            }),
        }
    }
}

/// Device -> aggregator.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceMsg {
    Hello(Hello),
    AuthResponse {
        signature: [u8; 64],
    },
    TaskRequest {
        have_model_version: Option<ModelVersion>,
    },
    ChunkRequest {
        model_version: ModelVersion,
        index: u32,
    },
    UploadBegin(Box<UploadBegin>),
    UploadChunk {
        payload_hash: [u8; 32],
        index: u32,
        data: Bytes,
    },
    Heartbeat {
        seq: u64,
    },
    /// The device gives up its task for `round_id`.
    TaskAbandoned {
        round_id: u64,
        reason: AbandonReason,
        detail: String,
    },
    /// A SecAgg+ stage of round `round_id`; `bits` is the round's ring (a
    /// masked input's packing; 0 for the other stages once decoded).
    SecAgg {
        round_id: u64,
        bits: u32,
        msg: crate::secagg::DeviceSecAgg,
    },
    /// The result of an evaluation task.
    EvalReport(Box<EvalReport>),
}

/// Aggregator -> device.
#[derive(Clone, Debug, PartialEq)]
pub enum AggMsg {
    Challenge {
        schema_version: u32,
        nonce: [u8; 32],
    },
    AuthOk {
        device_id: String,
        /// What the device signs into every manifest here.
        federation_id: [u8; 32],
    },
    TaskOffer(Box<TaskOffer>),
    NoTask {
        retry_after_ms_min: u64,
        retry_after_ms_max: u64,
        reason: String,
    },
    ModelChunk {
        model_version: ModelVersion,
        index: u32,
        data: Bytes,
    },
    UploadStatus {
        payload_hash: [u8; 32],
        next_index: u32,
    },
    UpdateAccepted {
        round_id: u64,
        payload_hash: [u8; 32],
    },
    Reject {
        code: RejectCode,
        detail: String,
        fatal: bool,
    },
    HeartbeatAck {
        seq: u64,
    },
    Finished(ModelRef),
    /// A SecAgg+ stage of round `round_id`.
    SecAgg {
        round_id: u64,
        msg: crate::secagg::AggSecAgg,
    },
    /// The evaluation report for `round_id` was recorded.
    EvalAccepted {
        round_id: u64,
    },
}

impl DeviceMsg {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceMsg::Hello(_) => "hello",
            DeviceMsg::AuthResponse { .. } => "auth_response",
            DeviceMsg::TaskRequest { .. } => "task_request",
            DeviceMsg::ChunkRequest { .. } => "chunk_request",
            DeviceMsg::UploadBegin(_) => "upload_begin",
            DeviceMsg::UploadChunk { .. } => "upload_chunk",
            DeviceMsg::Heartbeat { .. } => "heartbeat",
            DeviceMsg::TaskAbandoned { .. } => "task_abandoned",
            DeviceMsg::SecAgg { .. } => "secagg_device",
            DeviceMsg::EvalReport(_) => "eval_report",
        }
    }

    pub fn encode(&self) -> Bytes {
        let body = match self {
            DeviceMsg::Hello(h) => Body::Hello(wire::Hello {
                schema_version: h.schema_version,
                device_public_key: h.device_public_key.to_bytes().to_vec().into(),
                runtime_version: h.runtime_version.clone(),
                capabilities: Some(wire::Capabilities {
                    executors: h.capabilities.executors.clone(),
                    memory_bytes: h.capabilities.memory_bytes,
                    charging: h.capabilities.charging,
                    idle: h.capabilities.idle,
                    unmetered: h.capabilities.unmetered,
                }),
            }),
            DeviceMsg::AuthResponse { signature } => Body::AuthResponse(wire::AuthResponse {
                signature: signature.to_vec().into(),
            }),
            DeviceMsg::TaskRequest { have_model_version } => Body::TaskRequest(wire::TaskRequest {
                have_model_version: have_model_version
                    .map(|v| Bytes::from(v.0.to_vec()))
                    .unwrap_or_default(),
            }),
            DeviceMsg::ChunkRequest {
                model_version,
                index,
            } => Body::ChunkRequest(wire::ChunkRequest {
                model_version: model_version.0.to_vec().into(),
                index: *index,
            }),
            DeviceMsg::UploadBegin(b) => Body::UploadBegin(wire::UploadBegin {
                manifest: Some(b.manifest.to_wire()),
                signature: b.signature.to_vec().into(),
                chunk_bytes: b.chunk_bytes,
            }),
            DeviceMsg::UploadChunk {
                payload_hash,
                index,
                data,
            } => Body::UploadChunk(wire::UploadChunk {
                payload_hash: payload_hash.to_vec().into(),
                index: *index,
                data: data.clone(),
            }),
            DeviceMsg::Heartbeat { seq } => Body::Heartbeat(wire::Heartbeat { seq: *seq }),
            DeviceMsg::TaskAbandoned {
                round_id,
                reason,
                detail,
            } => Body::TaskAbandoned(wire::TaskAbandoned {
                round_id: *round_id,
                reason: reason.to_wire() as i32,
                detail: detail.clone(),
            }),
            DeviceMsg::SecAgg {
                round_id,
                bits,
                msg,
            } => Body::SecaggDevice(secagg::device_to_wire(*round_id, *bits, msg)),
            DeviceMsg::EvalReport(r) => Body::EvalReport(r.to_wire()),
        };
        wire::Envelope { body: Some(body) }.encode_to_vec().into()
    }

    /// Decode one frame body sent by a device.
    pub fn decode(frame: &[u8], limits: &Limits) -> Result<Self, ProtoError> {
        Limits::check(
            "frame bytes",
            frame.len() as u64,
            limits.frame_bytes_max.into(),
        )?;
        let env = wire::Envelope::decode(frame)?;
        let body = env.body.ok_or(ProtoError::MissingField("envelope.body"))?;
        let str_max = u64::from(limits.string_bytes_max);
        Ok(match body {
            Body::Hello(h) => {
                Limits::check(
                    "runtime_version length",
                    h.runtime_version.len() as u64,
                    str_max,
                )?;
                let c = h.capabilities.unwrap_or_default();
                Limits::check("executor count", c.executors.len() as u64, 16)?;
                for e in &c.executors {
                    Limits::check("executor name length", e.len() as u64, str_max)?;
                }
                DeviceMsg::Hello(Hello {
                    schema_version: h.schema_version,
                    device_public_key: public_key("hello.device_public_key", &h.device_public_key)?,
                    runtime_version: h.runtime_version,
                    capabilities: Capabilities {
                        executors: c.executors,
                        memory_bytes: c.memory_bytes,
                        charging: c.charging,
                        idle: c.idle,
                        unmetered: c.unmetered,
                    },
                })
            }
            Body::AuthResponse(a) => DeviceMsg::AuthResponse {
                signature: signature64("auth_response.signature", &a.signature)?,
            },
            Body::TaskRequest(t) => DeviceMsg::TaskRequest {
                have_model_version: if t.have_model_version.is_empty() {
                    None
                } else {
                    Some(ModelVersion::from_slice(
                        "task_request.have_model_version",
                        &t.have_model_version,
                    )?)
                },
            },
            Body::ChunkRequest(c) => {
                Limits::check(
                    "chunk index",
                    c.index.into(),
                    limits.transfer_chunks_max.into(),
                )?;
                DeviceMsg::ChunkRequest {
                    model_version: ModelVersion::from_slice(
                        "chunk_request.model_version",
                        &c.model_version,
                    )?,
                    index: c.index,
                }
            }
            Body::UploadBegin(b) => {
                let manifest = UpdateManifest::from_wire(
                    b.manifest
                        .ok_or(ProtoError::MissingField("upload_begin.manifest"))?,
                    limits,
                )?;
                Limits::check(
                    "upload chunk bytes",
                    b.chunk_bytes.into(),
                    limits.chunk_bytes_max.into(),
                )?;
                if b.chunk_bytes == 0 {
                    return Err(ProtoError::Invalid {
                        field: "upload_begin.chunk_bytes",
                        reason: "zero".into(),
                    });
                }
                let chunks = manifest.payload_bytes.div_ceil(b.chunk_bytes.into());
                Limits::check(
                    "upload chunk count",
                    chunks,
                    limits.transfer_chunks_max.into(),
                )?;
                DeviceMsg::UploadBegin(Box::new(UploadBegin {
                    manifest,
                    signature: signature64("upload_begin.signature", &b.signature)?,
                    chunk_bytes: b.chunk_bytes,
                }))
            }
            Body::UploadChunk(c) => {
                Limits::check(
                    "upload chunk bytes",
                    c.data.len() as u64,
                    limits.chunk_bytes_max.into(),
                )?;
                Limits::check(
                    "chunk index",
                    c.index.into(),
                    limits.transfer_chunks_max.into(),
                )?;
                DeviceMsg::UploadChunk {
                    payload_hash: hash32("upload_chunk.payload_hash", &c.payload_hash)?,
                    index: c.index,
                    data: c.data,
                }
            }
            Body::Heartbeat(h) => DeviceMsg::Heartbeat { seq: h.seq },
            Body::TaskAbandoned(a) => {
                Limits::check("detail length", a.detail.len() as u64, str_max)?;
                DeviceMsg::TaskAbandoned {
                    round_id: a.round_id,
                    reason: AbandonReason::from_wire(a.reason)?,
                    detail: a.detail,
                }
            }
            Body::SecaggDevice(m) => {
                let (round_id, bits, msg) = secagg::device_from_wire(m, limits)?;
                DeviceMsg::SecAgg {
                    round_id,
                    bits,
                    msg,
                }
            }
            Body::EvalReport(r) => DeviceMsg::EvalReport(Box::new(EvalReport::from_wire(r)?)),
            other => return Err(ProtoError::WrongDirection(body_name(&other))),
        })
    }
}

impl AggMsg {
    pub fn name(&self) -> &'static str {
        match self {
            AggMsg::Challenge { .. } => "challenge",
            AggMsg::AuthOk { .. } => "auth_ok",
            AggMsg::TaskOffer(_) => "task_offer",
            AggMsg::NoTask { .. } => "no_task",
            AggMsg::ModelChunk { .. } => "model_chunk",
            AggMsg::UploadStatus { .. } => "upload_status",
            AggMsg::UpdateAccepted { .. } => "update_accepted",
            AggMsg::Reject { .. } => "reject",
            AggMsg::HeartbeatAck { .. } => "heartbeat_ack",
            AggMsg::Finished(_) => "finished",
            AggMsg::SecAgg { .. } => "secagg_agg",
            AggMsg::EvalAccepted { .. } => "eval_accepted",
        }
    }

    pub fn reject(code: RejectCode, detail: impl Into<String>, fatal: bool) -> Self {
        AggMsg::Reject {
            code,
            detail: detail.into(),
            fatal,
        }
    }

    pub fn encode(&self) -> Bytes {
        let body = match self {
            AggMsg::Challenge {
                schema_version,
                nonce,
            } => Body::Challenge(wire::Challenge {
                schema_version: *schema_version,
                nonce: nonce.to_vec().into(),
            }),
            AggMsg::AuthOk {
                device_id,
                federation_id,
            } => Body::AuthOk(wire::AuthOk {
                device_id: device_id.clone(),
                federation_id: federation_id.to_vec().into(),
            }),
            AggMsg::TaskOffer(t) => Body::TaskOffer(wire::TaskOffer {
                round_id: t.round_id,
                model_version: t.model.version.0.to_vec().into(),
                model_bytes: t.model.model_bytes,
                chunk_bytes: t.model.chunk_bytes,
                chunk_count: t.model.chunk_count,
                plan: Some(plan_to_wire(&t.plan)),
                deadline_ms: t.deadline_ms,
                delta_base_version: t
                    .delta
                    .map(|d| Bytes::from(d.base.0.to_vec()))
                    .unwrap_or_default(),
                delta_id: t
                    .delta
                    .map(|d| Bytes::from(d.blob.version.0.to_vec()))
                    .unwrap_or_default(),
                delta_bytes: t.delta.map_or(0, |d| d.blob.model_bytes),
                delta_chunk_count: t.delta.map_or(0, |d| d.blob.chunk_count),
                secagg: t.secagg.as_ref().map(secagg::offer_to_wire),
                evaluate: t.evaluate,
            }),
            AggMsg::NoTask {
                retry_after_ms_min,
                retry_after_ms_max,
                reason,
            } => Body::NoTask(wire::NoTask {
                retry_after_ms_min: *retry_after_ms_min,
                retry_after_ms_max: *retry_after_ms_max,
                reason: reason.clone(),
            }),
            AggMsg::ModelChunk {
                model_version,
                index,
                data,
            } => Body::ModelChunk(wire::ModelChunk {
                model_version: model_version.0.to_vec().into(),
                index: *index,
                data: data.clone(),
            }),
            AggMsg::UploadStatus {
                payload_hash,
                next_index,
            } => Body::UploadStatus(wire::UploadStatus {
                payload_hash: payload_hash.to_vec().into(),
                next_index: *next_index,
            }),
            AggMsg::UpdateAccepted {
                round_id,
                payload_hash,
            } => Body::UpdateAccepted(wire::UpdateAccepted {
                round_id: *round_id,
                payload_hash: payload_hash.to_vec().into(),
            }),
            AggMsg::Reject {
                code,
                detail,
                fatal,
            } => Body::Reject(wire::Reject {
                code: code.to_wire() as i32,
                detail: detail.clone(),
                fatal: *fatal,
            }),
            AggMsg::HeartbeatAck { seq } => Body::HeartbeatAck(wire::HeartbeatAck { seq: *seq }),
            AggMsg::Finished(m) => Body::Finished(wire::Finished {
                final_model_version: m.version.0.to_vec().into(),
                model_bytes: m.model_bytes,
                chunk_bytes: m.chunk_bytes,
                chunk_count: m.chunk_count,
            }),
            AggMsg::SecAgg { round_id, msg } => {
                Body::SecaggAgg(secagg::agg_to_wire(*round_id, msg))
            }
            AggMsg::EvalAccepted { round_id } => Body::EvalAccepted(wire::EvalAccepted {
                round_id: *round_id,
            }),
        };
        wire::Envelope { body: Some(body) }.encode_to_vec().into()
    }

    /// Decode one frame body sent by an aggregator.
    pub fn decode(frame: &[u8], limits: &Limits) -> Result<Self, ProtoError> {
        Limits::check(
            "frame bytes",
            frame.len() as u64,
            limits.frame_bytes_max.into(),
        )?;
        let env = wire::Envelope::decode(frame)?;
        let body = env.body.ok_or(ProtoError::MissingField("envelope.body"))?;
        let str_max = u64::from(limits.string_bytes_max);
        Ok(match body {
            Body::Challenge(c) => AggMsg::Challenge {
                schema_version: c.schema_version,
                nonce: hash32("challenge.nonce", &c.nonce)?,
            },
            Body::AuthOk(a) => {
                Limits::check("device_id length", a.device_id.len() as u64, str_max)?;
                AggMsg::AuthOk {
                    device_id: a.device_id,
                    federation_id: hash32("auth_ok.federation_id", &a.federation_id)?,
                }
            }
            Body::TaskOffer(t) => {
                let model = ModelRef {
                    version: ModelVersion::from_slice(
                        "task_offer.model_version",
                        &t.model_version,
                    )?,
                    model_bytes: t.model_bytes,
                    chunk_bytes: t.chunk_bytes,
                    chunk_count: t.chunk_count,
                };
                model.check(limits)?;
                let delta = if t.delta_id.is_empty() {
                    None
                } else {
                    let blob = ModelRef {
                        version: ModelVersion::from_slice("task_offer.delta_id", &t.delta_id)?,
                        model_bytes: t.delta_bytes,
                        chunk_bytes: t.chunk_bytes,
                        chunk_count: t.delta_chunk_count,
                    };
                    blob.check(limits)?;
                    Some(DeltaRef {
                        base: ModelVersion::from_slice(
                            "task_offer.delta_base_version",
                            &t.delta_base_version,
                        )?,
                        blob,
                    })
                };
                AggMsg::TaskOffer(Box::new(TaskOffer {
                    round_id: t.round_id,
                    model,
                    plan: plan_from_wire(
                        t.plan.ok_or(ProtoError::MissingField("task_offer.plan"))?,
                        limits,
                    )?,
                    deadline_ms: t.deadline_ms,
                    delta,
                    secagg: t
                        .secagg
                        .map(|o| secagg::offer_from_wire(o, t.round_id, limits))
                        .transpose()?,
                    evaluate: t.evaluate,
                }))
            }
            Body::NoTask(n) => {
                Limits::check("reason length", n.reason.len() as u64, str_max)?;
                if n.retry_after_ms_min > n.retry_after_ms_max {
                    return Err(ProtoError::Invalid {
                        field: "no_task.retry_after_ms",
                        reason: "min is above max".into(),
                    });
                }
                AggMsg::NoTask {
                    retry_after_ms_min: n.retry_after_ms_min,
                    retry_after_ms_max: n.retry_after_ms_max,
                    reason: n.reason,
                }
            }
            Body::ModelChunk(c) => {
                Limits::check(
                    "model chunk bytes",
                    c.data.len() as u64,
                    limits.chunk_bytes_max.into(),
                )?;
                AggMsg::ModelChunk {
                    model_version: ModelVersion::from_slice(
                        "model_chunk.model_version",
                        &c.model_version,
                    )?,
                    index: c.index,
                    data: c.data,
                }
            }
            Body::UploadStatus(s) => AggMsg::UploadStatus {
                payload_hash: hash32("upload_status.payload_hash", &s.payload_hash)?,
                next_index: s.next_index,
            },
            Body::UpdateAccepted(a) => AggMsg::UpdateAccepted {
                round_id: a.round_id,
                payload_hash: hash32("update_accepted.payload_hash", &a.payload_hash)?,
            },
            Body::Reject(r) => {
                Limits::check("detail length", r.detail.len() as u64, str_max)?;
                AggMsg::Reject {
                    code: RejectCode::from_wire(r.code)?,
                    detail: r.detail,
                    fatal: r.fatal,
                }
            }
            Body::HeartbeatAck(h) => AggMsg::HeartbeatAck { seq: h.seq },
            Body::Finished(f) => {
                let m = ModelRef {
                    version: ModelVersion::from_slice(
                        "finished.final_model_version",
                        &f.final_model_version,
                    )?,
                    model_bytes: f.model_bytes,
                    chunk_bytes: f.chunk_bytes,
                    chunk_count: f.chunk_count,
                };
                m.check(limits)?;
                AggMsg::Finished(m)
            }
            Body::SecaggAgg(m) => {
                let (round_id, msg) = secagg::agg_from_wire(m)?;
                AggMsg::SecAgg { round_id, msg }
            }
            Body::EvalAccepted(a) => AggMsg::EvalAccepted {
                round_id: a.round_id,
            },
            other => return Err(ProtoError::WrongDirection(body_name(&other))),
        })
    }
}

fn body_name(b: &Body) -> &'static str {
    match b {
        Body::Hello(_) => "hello",
        Body::AuthResponse(_) => "auth_response",
        Body::TaskRequest(_) => "task_request",
        Body::ChunkRequest(_) => "chunk_request",
        Body::UploadBegin(_) => "upload_begin",
        Body::UploadChunk(_) => "upload_chunk",
        Body::Heartbeat(_) => "heartbeat",
        Body::TaskAbandoned(_) => "task_abandoned",
        Body::Challenge(_) => "challenge",
        Body::AuthOk(_) => "auth_ok",
        Body::TaskOffer(_) => "task_offer",
        Body::NoTask(_) => "no_task",
        Body::ModelChunk(_) => "model_chunk",
        Body::UploadStatus(_) => "upload_status",
        Body::UpdateAccepted(_) => "update_accepted",
        Body::Reject(_) => "reject",
        Body::HeartbeatAck(_) => "heartbeat_ack",
        Body::Finished(_) => "finished",
        Body::SecaggDevice(_) => "secagg_device",
        Body::SecaggAgg(_) => "secagg_agg",
        Body::EvalReport(_) => "eval_report",
        Body::EvalAccepted(_) => "eval_accepted",
    }
}
