//! The device session during authentication: the aggregator accepts only
//! the handshake before it completes, so a slow handshake (1,000 devices
//! connecting at once) must not make the device send heartbeats early.

use std::time::{Duration, Instant};

use fedge_device::session::{DeviceEvent, DeviceSession, SessionConfig};
use fedge_proto::sign::SigningKey;
use fedge_proto::{AggMsg, DeviceMsg, SCHEMA_VERSION};

fn drain(s: &mut DeviceSession) -> Vec<DeviceMsg> {
    std::iter::from_fn(|| s.poll_transmit()).collect()
}

fn is_heartbeat(m: &DeviceMsg) -> bool {
    matches!(m, DeviceMsg::Heartbeat { .. })
}

#[test]
fn no_heartbeats_before_authentication_completes_and_then_they_flow() {
    let cfg = SessionConfig {
        heartbeat_interval: Duration::from_secs(1),
        request_timeout: Duration::from_secs(30),
        ..SessionConfig::default()
    };
    let mut s = DeviceSession::new(cfg, SigningKey::from_bytes(&[9; 32]));
    assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
    let t0 = Instant::now();
    s.handle_connected(t0, [0; 32]);
    assert!(matches!(s.poll_transmit(), Some(DeviceMsg::Hello(_))));
    // Waiting for the challenge: five heartbeat intervals pass.
    for i in 1..=5 {
        s.handle_timeout(t0 + Duration::from_secs(i));
    }
    let early = drain(&mut s);
    assert!(!early.iter().any(is_heartbeat), "sent {early:?}");

    let t1 = t0 + Duration::from_secs(5);
    s.handle_message(
        t1,
        AggMsg::Challenge {
            schema_version: SCHEMA_VERSION,
            nonce: [1; 32],
        },
    );
    assert!(matches!(
        s.poll_transmit(),
        Some(DeviceMsg::AuthResponse { .. })
    ));
    // Waiting for the verdict: still none.
    for i in 1..=3 {
        s.handle_timeout(t1 + Duration::from_secs(i));
    }
    let early = drain(&mut s);
    assert!(!early.iter().any(is_heartbeat), "sent {early:?}");

    let t2 = t1 + Duration::from_secs(3);
    let device_id = s.device_id();
    s.handle_message(
        t2,
        AggMsg::AuthOk {
            device_id,
            federation_id: [0; 32],
        },
    );
    for i in 1..=3 {
        s.handle_timeout(t2 + Duration::from_secs(i));
    }
    let after = drain(&mut s);
    assert!(
        after.iter().filter(|m| is_heartbeat(m)).count() >= 2,
        "authenticated sessions keep heartbeats flowing: {after:?}"
    );
}

/// Admission control: an aggregator at its handshake budget answers the
/// connection with `NoTask` before the challenge. The device drops the
/// connection, sends nothing more on it, and connects again inside the
/// window, however many times it is paced: being told to wait is no
/// failed attempt (`reconnect_attempts_max` 1 here).
#[test]
fn paced_before_authenticating_the_device_reconnects_in_the_window() {
    let cfg = SessionConfig {
        reconnect_attempts_max: 1,
        ..SessionConfig::default()
    };
    let mut s = DeviceSession::new(cfg, SigningKey::from_bytes(&[9; 32]));
    assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
    let mut now = Instant::now();
    for _ in 0..5 {
        s.handle_connected(now, [0; 32]);
        assert!(matches!(s.poll_transmit(), Some(DeviceMsg::Hello(_))));
        s.handle_message(
            now,
            AggMsg::NoTask {
                retry_after_ms_min: 2_000,
                retry_after_ms_max: 3_000,
                reason: "busy".into(),
            },
        );
        assert_eq!(s.poll_event(), Some(DeviceEvent::Disconnect));
        assert!(drain(&mut s).is_empty());
        let at = s.poll_timeout().expect("a reconnect is scheduled");
        assert!(
            at >= now + Duration::from_secs(2) && at <= now + Duration::from_secs(3),
            "{:?}",
            at - now
        );
        s.handle_timeout(at - Duration::from_millis(1));
        assert_eq!(s.poll_event(), None, "not before the window");
        s.handle_timeout(at);
        assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
        assert!(!s.is_terminal());
        now = at;
    }
}

/// The first connection's jitter is drawn from the session's seed, within
/// the configured bound; with none, nothing is drawn.
#[test]
fn the_first_connection_is_jittered_within_the_bound() {
    let delay = |jitter_ms: u64, seed: u64| {
        let cfg = SessionConfig {
            first_connect_jitter: Duration::from_millis(jitter_ms),
            seed,
            ..SessionConfig::default()
        };
        DeviceSession::new(cfg, SigningKey::from_bytes(&[9; 32])).first_connect_delay()
    };
    assert_eq!(delay(0, 1), Duration::ZERO);
    let delays: Vec<Duration> = (0..20).map(|seed| delay(1_000, seed)).collect();
    assert!(
        delays.iter().all(|d| *d <= Duration::from_secs(1)),
        "{delays:?}"
    );
    assert!(delays.windows(2).any(|w| w[0] != w[1]), "{delays:?}");
    assert_eq!(delay(1_000, 7), delay(1_000, 7));
}

/// A connection refused at the aggregator's handshake limit is no failed
/// attempt: the device never gives up over refusals, and comes back after
/// a wait drawn in [0, d], d doubling with each refusal in a row from
/// `refused_backoff_min` to `refused_backoff_max`.
#[test]
fn refused_connections_back_off_doubling_and_never_fail_the_device() {
    let cfg = SessionConfig {
        refused_backoff_min: Duration::from_secs(1),
        refused_backoff_max: Duration::from_secs(8),
        reconnect_attempts_max: 2,
        seed: 5,
        ..SessionConfig::default()
    };
    let mut s = DeviceSession::new(cfg, SigningKey::from_bytes(&[9; 32]));
    let mut now = Instant::now();
    for refusal in 1..=10u32 {
        assert_eq!(
            s.poll_event(),
            Some(DeviceEvent::Connect),
            "refusal {refusal}"
        );
        s.handle_refused(now);
        let wait = s.poll_timeout().expect("a reconnect is due") - now;
        let bound = Duration::from_secs(1 << (refusal - 1).min(3));
        assert!(wait <= bound, "refusal {refusal}: {wait:?} > {bound:?}");
        now += wait;
        s.handle_timeout(now);
    }
    // Ten refusals, and the device (which gives up after two failed
    // attempts) is still trying.
    assert_eq!(s.poll_event(), Some(DeviceEvent::Connect));
}
