//! One of every message (the `device_msg` and `agg_msg` seeds, and what
//! the round-trip tests check).

use bytes::Bytes;

use super::{secagg, seed_key};
use crate::msg::{Capabilities, DeltaRef, Hello, ModelRef, TaskOffer, TrainingPlan, UploadBegin};
use crate::sign::UpdateManifest;
use crate::{AggMsg, DeviceMsg, ModelVersion, RejectCode};

/// One of every device message, with every optional part set somewhere:
/// the seeds of the `device_msg` target and the messages the round-trip
/// tests check.
pub fn device_msg_samples() -> Vec<DeviceMsg> {
    let k = seed_key();
    let manifest = UpdateManifest {
        round_id: 1,
        model_version: ModelVersion([1; 32]),
        payload_hash: [2; 32],
        payload_bytes: 10,
        sample_count: 5,
        metrics: vec![("loss".into(), 1.5), ("acc".into(), 0.5)],
        device_public_key: k.verifying_key(),
        federation_id: [6; 32],
        partial: None,
    };
    let eval = crate::msg::EvalManifest {
        round_id: 5,
        model_version: ModelVersion([1; 32]),
        examples: 40,
        loss: 0.25,
        accuracy: 0.75,
        device_public_key: k.verifying_key(),
        federation_id: [6; 32],
    };
    [
        DeviceMsg::Hello(Hello {
            schema_version: crate::SCHEMA_VERSION,
            device_public_key: k.verifying_key(),
            runtime_version: "0.1.0".into(),
            capabilities: Capabilities {
                executors: vec!["tract-cpu".into(), "wgpu".into()],
                memory_bytes: 1 << 30,
                charging: true,
                idle: true,
                unmetered: false,
            },
        }),
        DeviceMsg::AuthResponse { signature: [3; 64] },
        DeviceMsg::TaskRequest {
            have_model_version: None,
        },
        DeviceMsg::TaskRequest {
            have_model_version: Some(ModelVersion([4; 32])),
        },
        DeviceMsg::ChunkRequest {
            model_version: ModelVersion([4; 32]),
            index: 7,
        },
        DeviceMsg::UploadBegin(Box::new(UploadBegin {
            signature: manifest.sign(&k),
            manifest,
            chunk_bytes: 4,
        })),
        DeviceMsg::UploadChunk {
            payload_hash: [2; 32],
            index: 1,
            data: Bytes::from_static(b"abcd"),
        },
        DeviceMsg::Heartbeat { seq: 9 },
        DeviceMsg::TaskAbandoned {
            round_id: 3,
            reason: crate::msg::AbandonReason::Diverged,
            detail: "loss is NaN".into(),
        },
        DeviceMsg::EvalReport(Box::new(crate::msg::EvalReport {
            signature: eval.sign(&k),
            manifest: eval,
        })),
    ]
    .into_iter()
    .chain(
        secagg::secagg_device_msg_samples()
            .into_iter()
            .map(|(bits, msg)| DeviceMsg::SecAgg {
                round_id: 9,
                // Decoding names the ring of a masked input only.
                bits: if matches!(msg, crate::secagg::DeviceSecAgg::MaskedInput(_)) {
                    bits
                } else {
                    0
                },
                msg,
            }),
    )
    .collect()
}

/// One of every aggregator message (the `agg_msg` seeds; see
/// [`device_msg_samples`]).
pub fn agg_msg_samples() -> Vec<AggMsg> {
    let m = ModelRef::new(ModelVersion([6; 32]), 1000, 300);
    let plan = TrainingPlan {
        codec: "topk:0.01+q4+zstd".into(),
        error_feedback: true,
        freeze: vec!["conv*".into()],
        lora: Some(crate::msg::LoraSpec {
            rank: 8,
            alpha: 16.0,
            targets: vec!["fc*".into()],
        }),
        ..TrainingPlan::default()
    };
    let mut msgs = vec![
        AggMsg::Challenge {
            schema_version: crate::SCHEMA_VERSION,
            nonce: [8; 32],
        },
        AggMsg::AuthOk {
            device_id: "ab".into(),
            federation_id: [7; 32],
        },
        AggMsg::TaskOffer(Box::new(TaskOffer {
            round_id: 2,
            model: m,
            plan,
            deadline_ms: 5000,
            delta: Some(DeltaRef {
                base: ModelVersion([9; 32]),
                blob: ModelRef::new(ModelVersion([3; 32]), 500, 300),
            }),
            secagg: None,
            evaluate: false,
        })),
        AggMsg::TaskOffer(Box::new(TaskOffer {
            round_id: 3,
            model: m,
            plan: TrainingPlan::default(),
            deadline_ms: 1,
            delta: None,
            secagg: None,
            evaluate: false,
        })),
        AggMsg::TaskOffer(Box::new(TaskOffer {
            round_id: 4,
            model: m,
            plan: TrainingPlan::default(),
            deadline_ms: 1,
            delta: None,
            secagg: Some(crate::msg::SecAggOffer {
                params: crate::secagg::SecAggParams {
                    round: 4,
                    seed: [3; 32],
                    devices: 10,
                    degree: 4,
                    threshold: 3,
                    bits: 32,
                    clip: 1.0,
                    dimension: 100,
                    noise: Some(crate::secagg::DistributedNoise {
                        multiplier: 1.5,
                        survivors: 6,
                    }),
                },
                index: 7,
            }),
            evaluate: false,
        })),
        AggMsg::TaskOffer(Box::new(TaskOffer {
            round_id: 5,
            model: m,
            plan: TrainingPlan::default(),
            deadline_ms: 1,
            delta: None,
            secagg: None,
            evaluate: true,
        })),
        AggMsg::NoTask {
            retry_after_ms_min: 10,
            retry_after_ms_max: 20,
            reason: "full".into(),
        },
        AggMsg::ModelChunk {
            model_version: ModelVersion([6; 32]),
            index: 3,
            data: Bytes::from_static(b"xyz"),
        },
        AggMsg::UploadStatus {
            payload_hash: [1; 32],
            next_index: 2,
        },
        AggMsg::UpdateAccepted {
            round_id: 2,
            payload_hash: [1; 32],
        },
        AggMsg::HeartbeatAck { seq: 4 },
        AggMsg::Finished(m),
        AggMsg::EvalAccepted { round_id: 5 },
    ];
    msgs.extend(
        secagg::secagg_agg_msg_samples()
            .into_iter()
            .map(|msg| AggMsg::SecAgg { round_id: 9, msg }),
    );
    msgs.extend(
        [
            RejectCode::Malformed,
            RejectCode::TooLarge,
            RejectCode::Replay,
        ]
        .map(|code| AggMsg::reject(code, "why", code == RejectCode::TooLarge)),
    );
    msgs
}
