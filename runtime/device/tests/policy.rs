//! Device policy: decisions over fake `/sys/class/power_supply` trees,
//! and the session path: an ineligible device asks for no task, declines
//! offers, trains nothing, and honours the aggregator's pace steering
//! once it is eligible again.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_device::policy::{
    Battery, Conditions, EligibilitySource, Gate, Policy, PolicyError, PowerSupplySysfs, Reported,
};
use fedge_device::session::{DeviceEvent, DeviceSession, SessionConfig, Status};
use fedge_proto::msg::{AbandonReason, ModelRef, TaskOffer, TrainingPlan};
use fedge_proto::sign::SigningKey;
use fedge_proto::{AggMsg, DeviceMsg, ModelVersion, SCHEMA_VERSION};

/// One power supply: a directory of attribute files.
fn supply(root: &Path, name: &str, attrs: &[(&str, &str)]) {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (k, v) in attrs {
        std::fs::write(d.join(k), format!("{v}\n")).unwrap();
    }
}

fn conditions(root: &Path) -> Conditions {
    PowerSupplySysfs::new(root).conditions().unwrap()
}

const CHARGING_AND_FLOOR: Policy = Policy {
    require_charging: true,
    require_idle: false,
    require_unmetered: false,
    battery_floor_percent: Some(20),
};

#[test]
fn a_laptop_on_ac_with_a_charging_battery_is_eligible() {
    let root = tempfile::tempdir().unwrap();
    supply(root.path(), "AC", &[("type", "Mains"), ("online", "1")]);
    supply(
        root.path(),
        "BAT0",
        &[
            ("type", "Battery"),
            ("status", "Charging"),
            ("capacity", "80"),
        ],
    );
    let c = conditions(root.path());
    assert_eq!(
        (c.external_power, c.battery),
        (Some(true), Battery::Percent(80))
    );
    assert_eq!(c.idle, None, "idle is not in the power-supply class");
    assert!(CHARGING_AND_FLOOR.decide(&c).eligible);
}

#[test]
fn a_discharging_battery_below_the_floor_is_ineligible_on_both_counts() {
    let root = tempfile::tempdir().unwrap();
    supply(root.path(), "AC", &[("type", "Mains"), ("online", "0")]);
    supply(
        root.path(),
        "BAT0",
        &[
            ("type", "Battery"),
            ("status", "Discharging"),
            ("capacity", "15"),
        ],
    );
    let c = conditions(root.path());
    assert_eq!(
        (c.external_power, c.battery),
        (Some(false), Battery::Percent(15))
    );
    let d = CHARGING_AND_FLOOR.decide(&c);
    assert!(!d.eligible);
    assert_eq!(
        d.reasons,
        vec![
            "not on external power".to_string(),
            "battery at 15%, floor 20%".to_string()
        ]
    );
    // Charging alone is not required: still below the floor.
    let floor_only = Policy {
        battery_floor_percent: Some(15),
        ..Policy::default()
    };
    assert!(floor_only.decide(&c).eligible, "the floor is inclusive");
}

#[test]
fn no_battery_at_all_is_a_mains_powered_device() {
    // A Raspberry Pi: no power-supply entries at all.
    let root = tempfile::tempdir().unwrap();
    let c = conditions(root.path());
    assert_eq!((c.external_power, c.battery), (Some(true), Battery::Absent));
    assert!(CHARGING_AND_FLOOR.decide(&c).eligible);
    // A board whose only entry is a USB port that reads offline (it is
    // powered through another input): no battery, so it runs on mains.
    supply(root.path(), "usb", &[("type", "USB"), ("online", "0")]);
    let c = conditions(root.path());
    assert_eq!((c.external_power, c.battery), (Some(true), Battery::Absent));
}

#[test]
fn a_peripheral_battery_is_not_the_device_battery() {
    let root = tempfile::tempdir().unwrap();
    supply(
        root.path(),
        "hidpp_battery_0",
        &[
            ("type", "Battery"),
            ("scope", "Device"),
            ("status", "Discharging"),
            ("capacity", "5"),
        ],
    );
    let c = conditions(root.path());
    assert_eq!((c.external_power, c.battery), (Some(true), Battery::Absent));
}

#[test]
fn several_batteries_report_the_lowest_and_any_charging_one_means_powered() {
    let root = tempfile::tempdir().unwrap();
    supply(
        root.path(),
        "BAT0",
        &[("type", "Battery"), ("status", "Full"), ("capacity", "90")],
    );
    supply(
        root.path(),
        "BAT1",
        &[
            ("type", "Battery"),
            ("status", "Discharging"),
            ("capacity", "40"),
        ],
    );
    let c = conditions(root.path());
    assert_eq!(
        (c.external_power, c.battery),
        (Some(true), Battery::Percent(40))
    );
}

#[test]
fn unreadable_or_garbled_values_are_unknown_and_unknown_is_not_eligible() {
    let root = tempfile::tempdir().unwrap();
    supply(root.path(), "AC", &[("type", "Mains")]); // no `online`
    supply(
        root.path(),
        "BAT0",
        &[("type", "Battery"), ("status", "Not charging")],
    );
    // `capacity` that cannot be read (a directory where a file should be).
    std::fs::create_dir_all(root.path().join("BAT0/capacity")).unwrap();
    let c = conditions(root.path());
    assert_eq!((c.external_power, c.battery), (None, Battery::Unknown));
    assert!(
        c.notes.iter().any(|n| n.contains("BAT0/capacity")),
        "{:?}",
        c.notes
    );
    let d = CHARGING_AND_FLOOR.decide(&c);
    assert!(!d.eligible);
    assert!(
        d.reasons
            .contains(&"cannot tell whether the device is on external power".to_string())
    );
    assert!(d.reasons.contains(&"battery level unknown".to_string()));
    assert!(
        d.reasons.iter().any(|r| r.contains("BAT0/capacity")),
        "the unreadable file is named: {:?}",
        d.reasons
    );

    for garbage in ["abc", "150", "-3"] {
        supply(
            root.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Charging")],
        );
        std::fs::remove_dir_all(root.path().join("BAT0/capacity")).ok();
        std::fs::write(root.path().join("BAT0/capacity"), garbage).unwrap();
        let c = conditions(root.path());
        assert_eq!(c.battery, Battery::Unknown, "{garbage}");
        assert_eq!(c.external_power, Some(true), "{garbage}");
    }

    // A supply whose type cannot be read might be a battery: the battery
    // level is then unknown, not "absent".
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("mystery/type")).unwrap();
    let c = conditions(root.path());
    assert_eq!((c.external_power, c.battery), (None, Battery::Unknown));
}

#[test]
fn a_missing_power_supply_root_is_a_clear_error_and_makes_the_gate_say_no() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("no-such-class");
    let err = PowerSupplySysfs::new(&missing).conditions().unwrap_err();
    assert!(matches!(err, PolicyError::PowerSupplyRoot { .. }), "{err}");
    assert!(err.to_string().contains("--power-supply-root"), "{err}");
    let gate = Gate::new(
        Arc::new(PowerSupplySysfs::new(&missing)),
        CHARGING_AND_FLOOR,
        Duration::from_secs(60),
    );
    let d = gate.check();
    assert!(!d.eligible);
    assert!(d.reasons[0].contains("no-such-class"), "{:?}", d.reasons);
    // A policy that requires nothing never consults the source.
    let open = Gate::new(
        Arc::new(PowerSupplySysfs::new(&missing)),
        Policy::default(),
        Duration::from_secs(60),
    );
    assert!(open.check().eligible);
}

#[test]
fn idle_and_unmetered_requirements_need_a_source_that_knows() {
    let policy = Policy {
        require_idle: true,
        require_unmetered: true,
        ..Policy::default()
    };
    let src = Reported::new(Conditions::unknown());
    let gate = Gate::new(Arc::new(src.clone()), policy, Duration::from_secs(1));
    let d = gate.check();
    assert_eq!(
        d.reasons,
        vec![
            "cannot tell whether the device is idle".to_string(),
            "cannot tell whether the network is metered".to_string()
        ]
    );
    src.set(Conditions {
        idle: Some(true),
        unmetered: Some(false),
        ..Conditions::unknown()
    });
    assert_eq!(gate.check().reasons, vec!["network is metered".to_string()]);
    src.set(Conditions {
        idle: Some(true),
        unmetered: Some(true),
        ..Conditions::unknown()
    });
    assert!(gate.check().eligible);
    assert!(
        Policy {
            battery_floor_percent: Some(101),
            ..Policy::default()
        }
        .validate()
        .is_err()
    );
}

// ------------------------------------------------------------ session

/// A session taken through the handshake to "authenticated".
fn authenticated(now: Instant, eligible: bool) -> DeviceSession {
    let mut s = DeviceSession::new(SessionConfig::default(), SigningKey::from_bytes(&[7; 32]));
    assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
    s.handle_eligibility(now, eligible);
    s.handle_connected(now, [0; 32]);
    assert!(matches!(s.poll_transmit(), Some(DeviceMsg::Hello(_))));
    s.handle_message(
        now,
        AggMsg::Challenge {
            schema_version: SCHEMA_VERSION,
            nonce: [1; 32],
        },
    );
    assert!(matches!(
        s.poll_transmit(),
        Some(DeviceMsg::AuthResponse { .. })
    ));
    let device_id = s.device_id();
    s.handle_message(
        now,
        AggMsg::AuthOk {
            device_id,
            federation_id: [0; 32],
        },
    );
    s
}

/// Everything the session sends, heartbeats left out.
fn sent(s: &mut DeviceSession) -> Vec<DeviceMsg> {
    std::iter::from_fn(|| s.poll_transmit())
        .filter(|m| !matches!(m, DeviceMsg::Heartbeat { .. }))
        .collect()
}

fn offer() -> AggMsg {
    let version = ModelVersion::of(b"a model");
    AggMsg::TaskOffer(Box::new(TaskOffer {
        round_id: 3,
        model: ModelRef::new(version, 1000, 500),
        plan: TrainingPlan::default(),
        deadline_ms: 60_000,
        delta: None,
        secagg: None,
        evaluate: false,
    }))
}

#[test]
fn an_ineligible_device_asks_for_nothing_until_it_is_eligible() {
    let t0 = Instant::now();
    let mut s = authenticated(t0, false);
    assert_eq!(sent(&mut s), vec![], "no TaskRequest while ineligible");
    assert_eq!(s.status(), Status::Ineligible);
    // An hour of timers: heartbeats only.
    let mut t = t0;
    while t < t0 + Duration::from_secs(3600) {
        t = s.poll_timeout().expect("heartbeats keep a timer");
        s.handle_timeout(t);
        assert_eq!(sent(&mut s), vec![]);
    }
    assert!(std::iter::from_fn(|| s.poll_event()).all(|e| !matches!(e, DeviceEvent::Train { .. })));
    s.handle_eligibility(t, true);
    assert!(matches!(
        sent(&mut s).as_slice(),
        [DeviceMsg::TaskRequest { .. }]
    ));
    assert_eq!(s.status(), Status::Idle);
}

#[test]
fn an_offer_that_arrives_after_the_device_became_ineligible_is_declined() {
    let t0 = Instant::now();
    let mut s = authenticated(t0, true);
    assert!(matches!(
        sent(&mut s).as_slice(),
        [DeviceMsg::TaskRequest { .. }]
    ));
    // Unplugged while the request was in flight.
    s.handle_eligibility(t0, false);
    s.handle_message(t0, offer());
    // No model download; the slot is given back at once.
    assert!(
        matches!(
            sent(&mut s).as_slice(),
            [DeviceMsg::TaskAbandoned {
                reason: AbandonReason::Declined,
                ..
            }]
        ),
        "the task is given back, nothing downloaded"
    );
    let events: Vec<DeviceEvent> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, DeviceEvent::Train { .. })),
        "{events:?}"
    );
    assert_eq!(s.status(), Status::Ineligible);
    // Plugged back in: asks again (for a later round: the slot it gave
    // back is not its to take again in this one).
    s.handle_eligibility(t0 + Duration::from_secs(5), true);
    assert!(matches!(
        sent(&mut s).as_slice(),
        [DeviceMsg::TaskRequest { .. }]
    ));
    s.handle_message(t0 + Duration::from_secs(5), offer());
    assert!(matches!(
        sent(&mut s).first(),
        Some(DeviceMsg::ChunkRequest { .. })
    ));
}

#[test]
fn pace_steering_holds_even_when_eligibility_returns_early() {
    let t0 = Instant::now();
    let mut s = authenticated(t0, true);
    assert_eq!(sent(&mut s).len(), 1);
    s.handle_message(
        t0,
        AggMsg::NoTask {
            retry_after_ms_min: 60_000,
            retry_after_ms_max: 60_000,
            reason: "round is full".into(),
        },
    );
    // Unplugged and plugged back in within the window: no early request.
    s.handle_eligibility(t0 + Duration::from_secs(1), false);
    s.handle_eligibility(t0 + Duration::from_secs(2), true);
    assert_eq!(sent(&mut s), vec![]);
    s.handle_timeout(t0 + Duration::from_secs(59));
    assert_eq!(sent(&mut s), vec![]);
    let back = t0 + Duration::from_secs(60);
    assert_eq!(s.poll_timeout(), Some(back));
    s.handle_timeout(back);
    assert!(matches!(
        sent(&mut s).as_slice(),
        [DeviceMsg::TaskRequest { .. }]
    ));

    // Ineligible when the window ends: it waits for eligibility, then asks.
    s.handle_message(
        back,
        AggMsg::NoTask {
            retry_after_ms_min: 10_000,
            retry_after_ms_max: 10_000,
            reason: "round is full".into(),
        },
    );
    s.handle_eligibility(back + Duration::from_secs(1), false);
    s.handle_timeout(back + Duration::from_secs(10));
    assert_eq!(sent(&mut s), vec![]);
    assert_eq!(s.status(), Status::Ineligible);
    s.handle_eligibility(back + Duration::from_secs(300), true);
    assert!(matches!(
        sent(&mut s).as_slice(),
        [DeviceMsg::TaskRequest { .. }]
    ));
}
