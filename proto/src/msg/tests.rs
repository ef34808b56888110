//! Round trips and rejections of every domain message.

use super::*;
use proptest::prelude::*;

fn device_msgs() -> Vec<DeviceMsg> {
    crate::fuzzing::device_msg_samples()
}

fn agg_msgs() -> Vec<AggMsg> {
    crate::fuzzing::agg_msg_samples()
}

#[test]
fn every_message_round_trips() {
    let l = Limits::default();
    for m in device_msgs() {
        assert_eq!(
            DeviceMsg::decode(&m.encode(), &l).unwrap(),
            m,
            "{}",
            m.name()
        );
        assert!(matches!(
            AggMsg::decode(&m.encode(), &l),
            Err(ProtoError::WrongDirection(_))
        ));
    }
    for m in agg_msgs() {
        assert_eq!(AggMsg::decode(&m.encode(), &l).unwrap(), m, "{}", m.name());
        assert!(matches!(
            DeviceMsg::decode(&m.encode(), &l),
            Err(ProtoError::WrongDirection(_))
        ));
    }
    assert_eq!(
        ModelRef::new(ModelVersion([0; 32]), 1000, 300).chunk_count,
        4
    );
    assert_eq!(
        ModelRef::new(ModelVersion([0; 32]), 1000, 300).chunk_range(3),
        900..1000
    );
}

#[test]
fn bad_fields_are_typed_errors() {
    let l = Limits::default();
    let empty = wire::Envelope { body: None }.encode_to_vec();
    assert_eq!(
        DeviceMsg::decode(&empty, &l),
        Err(ProtoError::MissingField("envelope.body"))
    );
    let short_key = wire::Envelope {
        body: Some(Body::Hello(wire::Hello {
            schema_version: 1,
            device_public_key: vec![1, 2, 3].into(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    assert!(matches!(
        DeviceMsg::decode(&short_key, &l),
        Err(ProtoError::BadLength {
            expected: 32,
            got: 3,
            ..
        })
    ));
    let bad_offer = wire::Envelope {
        body: Some(Body::TaskOffer(wire::TaskOffer {
            round_id: 1,
            model_version: vec![0; 32].into(),
            model_bytes: 1000,
            chunk_bytes: 100,
            chunk_count: 3,
            plan: Some(plan_to_wire(&TrainingPlan::default())),
            deadline_ms: 1,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    assert!(matches!(
        AggMsg::decode(&bad_offer, &l),
        Err(ProtoError::Invalid {
            field: "chunk_count",
            ..
        })
    ));
    let mut plan = plan_to_wire(&TrainingPlan::default());
    plan.learning_rate = f32::NAN;
    let nan_plan = wire::Envelope {
        body: Some(Body::TaskOffer(wire::TaskOffer {
            round_id: 1,
            model_version: vec![0; 32].into(),
            model_bytes: 10,
            chunk_bytes: 10,
            chunk_count: 1,
            plan: Some(plan),
            deadline_ms: 1,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    assert!(matches!(
        AggMsg::decode(&nan_plan, &l),
        Err(ProtoError::Invalid {
            field: "plan.learning_rate",
            ..
        })
    ));
    let big_chunk = DeviceMsg::UploadChunk {
        payload_hash: [0; 32],
        index: 0,
        data: vec![0u8; 2000].into(),
    }
    .encode();
    let small = Limits {
        chunk_bytes_max: 1000,
        ..Limits::default()
    };
    assert!(matches!(
        DeviceMsg::decode(&big_chunk, &small),
        Err(ProtoError::LimitExceeded { .. })
    ));
}

fn offer_with(plan: wire::TrainingPlan) -> Vec<u8> {
    wire::Envelope {
        body: Some(Body::TaskOffer(wire::TaskOffer {
            round_id: 1,
            model_version: vec![0; 32].into(),
            model_bytes: 10,
            chunk_bytes: 10,
            chunk_count: 1,
            plan: Some(plan),
            deadline_ms: 1,
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

#[test]
fn lora_plans_round_trip_and_bad_ones_are_refused() {
    let l = Limits::default();
    let spec: LoraSpec = "rank=8,alpha=16,targets=fc*,targets=proj".parse().unwrap();
    assert_eq!(spec.targets, vec!["fc*", "proj"]);
    assert_eq!(spec.scale(), 2.0);
    assert_eq!(spec.to_string().parse::<LoraSpec>().unwrap(), spec);
    let plan = TrainingPlan {
        lora: Some(spec.clone()),
        ..TrainingPlan::default()
    };
    match AggMsg::decode(&offer_with(plan_to_wire(&plan)), &l).unwrap() {
        AggMsg::TaskOffer(t) => assert_eq!(t.plan.lora, Some(spec)),
        other => panic!("{other:?}"),
    }
    // (wire spec, field the refusal names)
    let cases: [(wire::LoraSpec, &str); 5] = [
        (
            wire::LoraSpec {
                rank: 4,
                alpha: 4.0,
                targets: vec!["fc1,fc2".into()],
            },
            "plan.lora.targets",
        ),
        (
            wire::LoraSpec {
                rank: 0,
                alpha: 1.0,
                targets: vec!["*".into()],
            },
            "plan.lora.rank",
        ),
        (
            wire::LoraSpec {
                rank: LORA_RANK_MAX + 1,
                alpha: 1.0,
                targets: vec!["*".into()],
            },
            "plan.lora.rank",
        ),
        (
            wire::LoraSpec {
                rank: 4,
                alpha: f32::NAN,
                targets: vec!["*".into()],
            },
            "plan.lora.alpha",
        ),
        (
            wire::LoraSpec {
                rank: 4,
                alpha: 4.0,
                targets: vec![],
            },
            "plan.lora.targets",
        ),
    ];
    for (bad, field) in cases {
        let mut p = plan_to_wire(&TrainingPlan::default());
        p.lora = Some(bad.clone());
        match AggMsg::decode(&offer_with(p), &l) {
            Err(ProtoError::Invalid { field: f, .. }) => assert_eq!(f, field, "{bad:?}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let mut p = plan_to_wire(&TrainingPlan::default());
    p.lora = Some(wire::LoraSpec {
        rank: 4,
        alpha: 4.0,
        targets: vec!["*".into(); LORA_TARGETS_MAX + 1],
    });
    assert!(matches!(
        AggMsg::decode(&offer_with(p), &l),
        Err(ProtoError::LimitExceeded { .. })
    ));
    for (text, says) in [
        ("alpha=16,targets=*", "rank=R is missing"),
        ("rank=8,alpha=16", "no target pattern"),
        ("rank=eight,targets=*", "not a whole number"),
        ("rank=8,targets=*,dropout=0.1", "unknown key `dropout`"),
    ] {
        let e = text.parse::<LoraSpec>().unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
}

proptest! {
    // Seeded: the suite is deterministic (a failure prints its input).
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0xfed6e),
        ..ProptestConfig::default()
    })]

    #[test]
    fn decoders_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = DeviceMsg::decode(&b, &Limits::default());
        let _ = AggMsg::decode(&b, &Limits::default());
    }
}
