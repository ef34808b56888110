//! The session table: connections, their authentication state, which
//! connection speaks for which device key, and the authentication timers.
//!
//! Timers live in one ordered set keyed by deadline, so finding the next
//! one and expiring the due ones costs O(log n) per timer, never a scan of
//! every session. The coordinator's half of authentication (challenge,
//! signed answer bound to the TLS session) is here too.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use fedge_proto::sign::{self, VerifyingKey};
use fedge_proto::{AggMsg, RejectCode, SCHEMA_VERSION};
use rand::Rng;

use super::{Coordinator, Output, SessionId};

/// A device key's raw bytes, the table's key for devices.
pub(super) type DeviceKey = [u8; 32];

pub(super) fn device_id(k: &VerifyingKey) -> String {
    hex::encode(k.to_bytes())
}

pub(super) enum SessionState {
    AwaitHello,
    AwaitAuth { key: VerifyingKey, nonce: [u8; 32] },
    Ready { key: VerifyingKey },
}

struct Session {
    tls_binding: [u8; 32],
    /// When an unauthenticated session times out (None once authenticated).
    auth_deadline: Option<Instant>,
    state: SessionState,
}

/// Every connection the coordinator knows of.
pub(super) struct SessionTable {
    sessions: HashMap<SessionId, Session>,
    by_device: HashMap<DeviceKey, SessionId>,
    /// Authentication deadlines of unauthenticated sessions, earliest first.
    auth_timers: BTreeSet<(Instant, SessionId)>,
    auth_timeout: Duration,
    max_sessions: usize,
    max_unauthenticated: usize,
    /// Devices seen by this process (authenticated or restored) and those
    /// already told the run is finished: the driver waits for the rest.
    known: HashSet<DeviceKey>,
    told_finished: HashSet<DeviceKey>,
}

impl SessionTable {
    pub fn new(auth_timeout: Duration, max_sessions: usize, max_unauthenticated: usize) -> Self {
        SessionTable {
            sessions: HashMap::new(),
            by_device: HashMap::new(),
            auth_timers: BTreeSet::new(),
            auth_timeout,
            max_sessions,
            max_unauthenticated,
            known: HashSet::new(),
            told_finished: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    pub fn max_unauthenticated(&self) -> usize {
        self.max_unauthenticated
    }

    /// Connections still authenticating.
    pub fn authenticating(&self) -> usize {
        self.auth_timers.len()
    }

    /// Registers a new connection; false when the authentication budget is
    /// spent (authenticated devices do not count against it).
    pub fn connect(&mut self, now: Instant, session: SessionId, tls_binding: [u8; 32]) -> bool {
        if self.auth_timers.len() >= self.max_unauthenticated {
            return false;
        }
        let deadline = now + self.auth_timeout;
        self.auth_timers.insert((deadline, session));
        self.sessions.insert(
            session,
            Session {
                tls_binding,
                auth_deadline: Some(deadline),
                state: SessionState::AwaitHello,
            },
        );
        true
    }

    pub fn state(&self, session: SessionId) -> Option<&SessionState> {
        self.sessions.get(&session).map(|s| &s.state)
    }

    pub fn tls_binding(&self, session: SessionId) -> Option<&[u8; 32]> {
        self.sessions.get(&session).map(|s| &s.tls_binding)
    }

    /// The device said hello: it must now sign `nonce`.
    pub fn await_auth(&mut self, session: SessionId, key: VerifyingKey, nonce: [u8; 32]) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.state = SessionState::AwaitAuth { key, nonce };
        }
    }

    /// Whether a device with `key` may become authenticated now: there is
    /// room, or it replaces its own older connection.
    pub fn has_room_for(&self, key: &VerifyingKey) -> bool {
        // `by_device` holds exactly the authenticated sessions.
        self.by_device.len() < self.max_sessions || self.by_device.contains_key(key.as_bytes())
    }

    /// The device proved its key. Returns the device's previous connection,
    /// now forgotten, which the caller must close.
    pub fn authenticate(&mut self, session: SessionId, key: VerifyingKey) -> Option<SessionId> {
        let s = self.sessions.get_mut(&session)?;
        s.state = SessionState::Ready { key };
        if let Some(d) = s.auth_deadline.take() {
            self.auth_timers.remove(&(d, session));
        }
        self.known.insert(key.to_bytes());
        let old = self.by_device.insert(key.to_bytes(), session)?;
        if old == session {
            return None;
        }
        self.forget(old);
        Some(old)
    }

    /// The device's current authenticated connection.
    pub fn session_of(&self, key: &DeviceKey) -> Option<SessionId> {
        self.by_device.get(key).copied()
    }

    /// Removes a session (disconnected or closed by the coordinator).
    pub fn remove(&mut self, session: SessionId) {
        let Some(key) = self.forget(session) else {
            return;
        };
        if self.by_device.get(&key) == Some(&session) {
            self.by_device.remove(&key);
        }
    }

    /// Removes a session's entry and timer; returns its key if authenticated.
    fn forget(&mut self, session: SessionId) -> Option<DeviceKey> {
        let s = self.sessions.remove(&session)?;
        if let Some(d) = s.auth_deadline {
            self.auth_timers.remove(&(d, session));
        }
        match s.state {
            SessionState::Ready { key } => Some(key.to_bytes()),
            _ => None,
        }
    }

    /// The device a session speaks for, once it has named its key.
    pub fn device_of(&self, session: SessionId) -> Option<String> {
        match &self.sessions.get(&session)?.state {
            SessionState::AwaitAuth { key, .. } | SessionState::Ready { key } => {
                Some(device_id(key))
            }
            SessionState::AwaitHello => None,
        }
    }

    /// The earliest authentication deadline.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.auth_timers.first().map(|(t, _)| *t)
    }

    /// Sessions whose authentication deadline is at or before `now`, in
    /// deadline order (ties by session id). They stay in the table until
    /// the caller removes them.
    pub fn auth_expired(&self, now: Instant) -> Vec<SessionId> {
        self.auth_timers
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, s)| *s)
            .collect()
    }

    /// A device restored from disk counts as known.
    pub fn note_known(&mut self, key: DeviceKey) {
        self.known.insert(key);
    }

    pub fn note_told_finished(&mut self, key: DeviceKey) {
        self.known.insert(key);
        self.told_finished.insert(key);
    }

    pub fn was_told_finished(&self, key: &DeviceKey) -> bool {
        self.told_finished.contains(key)
    }

    /// Devices this process knows of that have not been told the run is
    /// finished. O(1): the server asks after every event of the finish,
    /// and a count of the set difference was a scan of every device.
    pub fn awaiting_finish(&self) -> usize {
        debug_assert!(self.told_finished.len() <= self.known.len());
        self.known.len() - self.told_finished.len()
    }
}

/// Authentication: the challenge, and the signed answer bound to the TLS
/// session.
impl Coordinator {
    pub(super) fn on_hello(&mut self, session: SessionId, schema_version: u32, key: VerifyingKey) {
        if schema_version != SCHEMA_VERSION {
            let detail = format!(
                "schema version mismatch: aggregator speaks {SCHEMA_VERSION}, device sent {schema_version}"
            );
            self.reject(session, None, RejectCode::SchemaMismatch, detail, true);
            return;
        }
        let mut nonce = [0u8; 32];
        self.rng.fill(&mut nonce);
        self.sessions.await_auth(session, key, nonce);
        self.send(
            session,
            AggMsg::Challenge {
                schema_version: SCHEMA_VERSION,
                nonce,
            },
        );
    }

    pub(super) fn on_auth_response(
        &mut self,
        session: SessionId,
        key: VerifyingKey,
        nonce: [u8; 32],
        signature: &[u8; 64],
    ) {
        let binding = self
            .sessions
            .tls_binding(session)
            .copied()
            .unwrap_or([0; 32]);
        if sign::verify_auth(&key, &nonce, &binding, signature).is_err() {
            self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::AuthFailed,
                "challenge signature does not verify for this key and TLS session".into(),
                true,
            );
            return;
        }
        if !self.admits_key(&key) {
            self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::AuthFailed,
                "this aggregator is a root and this key is not one of its leaves (tree.leaves.keys)"
                    .into(),
                true,
            );
            return;
        }
        if !self.sessions.has_room_for(&key) {
            let max = self.sessions.max_sessions();
            self.reject(
                session,
                Some(device_id(&key)),
                RejectCode::TooManyDevices,
                format!("aggregator is at its limit of {max} devices"),
                true,
            );
            return;
        }
        // A device that reconnects replaces its old connection.
        if let Some(old) = self.sessions.authenticate(session, key) {
            self.out.push_back(Output::Close {
                session: old,
                reason: "device reconnected on another connection".into(),
            });
        }
        self.send(
            session,
            AggMsg::AuthOk {
                device_id: device_id(&key),
                federation_id: self.cfg.federation_id,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_proto::sign::SigningKey;

    /// Authentication timers expire in deadline order, and go away when a
    /// session authenticates or disconnects.
    #[test]
    fn auth_timers_follow_sessions() {
        let t0 = Instant::now();
        let mut t = SessionTable::new(Duration::from_secs(10), 2, 3);
        assert!(t.connect(t0, 5, [0; 32]));
        assert!(t.connect(t0 + Duration::from_secs(1), 2, [0; 32]));
        assert!(t.connect(t0 + Duration::from_secs(2), 9, [0; 32]));
        assert!(
            !t.connect(t0, 4, [0; 32]),
            "the authentication budget is spent"
        );
        assert_eq!(t.next_timeout(), Some(t0 + Duration::from_secs(10)));
        let key = SigningKey::from_bytes(&[1; 32]).verifying_key();
        t.await_auth(5, key, [0; 32]);
        assert_eq!(t.authenticate(5, key), None);
        t.remove(2);
        assert_eq!(t.next_timeout(), Some(t0 + Duration::from_secs(12)));
        assert_eq!(
            t.auth_expired(t0 + Duration::from_secs(11)),
            Vec::<u64>::new()
        );
        assert_eq!(t.auth_expired(t0 + Duration::from_secs(12)), vec![9]);
        // The same key on a new connection replaces the old one.
        assert!(t.connect(t0, 6, [0; 32]));
        assert!(t.has_room_for(&key));
        assert_eq!(t.authenticate(6, key), Some(5));
        assert_eq!(t.len(), 2);
        // Authenticated devices do not spend the authentication budget,
        // and have their own.
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key();
        let third = SigningKey::from_bytes(&[3; 32]).verifying_key();
        assert!(t.connect(t0, 7, [0; 32]) && t.connect(t0, 8, [0; 32]));
        assert!(t.has_room_for(&other));
        t.authenticate(7, other);
        assert!(!t.has_room_for(&third), "two devices are the limit");
        assert!(
            t.has_room_for(&other),
            "a device may replace its own connection"
        );
        t.remove(7);
        assert!(t.has_room_for(&third));
        assert_eq!(t.awaiting_finish(), 2, "both keys seen");
        t.note_told_finished(key.to_bytes());
        assert_eq!(t.awaiting_finish(), 1);
    }
}
