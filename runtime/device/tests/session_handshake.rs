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
