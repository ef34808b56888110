//! The coordinator driven by random (seeded) sequences of valid and
//! invalid device messages, connects, disconnects, bad frames and
//! timeouts, synchronous and FedBuff. After every step: no panic, bounded
//! state, every acknowledged update made durable first, and at most one
//! accepted update per device per task. A failure names its seed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_aggregator::coordinator::{
    CloseJob, Coordinator, CoordinatorConfig, Event, Output, SessionId, VerifyJob,
};
use fedge_aggregator::strategy::BufferedSpec;
use fedge_proto::msg::{AbandonReason, Capabilities, Hello, ModelRef, UploadBegin};
use fedge_proto::sign::{SigningKey, UpdateManifest, sign_auth};
use fedge_proto::update::{CodecSpec, encode_update};
use fedge_proto::{
    AggMsg, DeviceMsg, ModelBlob, ModelVersion, ParamLayout, Params, ProtoError, SCHEMA_VERSION,
    TensorSpec,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEQUENCES: u64 = 10_000;
const STEPS: usize = 150;
const DEVICES: usize = 8;
const DIM: usize = 16;

fn model() -> ModelBlob {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[DIM])]).unwrap());
    ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.5; DIM]).unwrap(),
    }
}

fn config(seed: u64) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        devices_per_round: 2,
        over_selection: 1.5,
        min_devices: 1,
        rounds: 0,
        round_deadline: Duration::from_secs(5),
        retry_window: (Duration::from_millis(10), Duration::from_millis(50)),
        auth_timeout: Duration::from_secs(2),
        chunk_bytes: 96,
        max_sessions: 4,
        max_unauthenticated: 3,
        versions_kept: 2,
        // First come first served, a short and a long check-in window.
        selection_window: Duration::from_millis([0, 500, 2000][(seed / 2 % 3) as usize]),
        slot_timeout: Duration::from_secs(3),
        // Payload checks queue past two out at once.
        verify_in_flight_max: 2,
        seed,
        ..CoordinatorConfig::default()
    };
    if seed % 2 == 1 {
        c.strategy.buffered = Some(BufferedSpec {
            max_staleness: 1,
            ..BufferedSpec::default()
        });
    }
    c
}

/// What the test device knows of its connection and task.
#[derive(Default)]
struct Dev {
    session: Option<SessionId>,
    nonce: Option<[u8; 32]>,
    authenticated: bool,
    offer: Option<(u64, ModelRef)>,
    upload: Option<Upload>,
}

#[derive(Clone)]
struct Upload {
    payload: Vec<u8>,
    hash: [u8; 32],
    chunk_bytes: u32,
    next: u32,
}

struct Run {
    seed: u64,
    rng: ChaCha8Rng,
    now: Instant,
    c: Coordinator,
    keys: Vec<SigningKey>,
    devs: Vec<Dev>,
    next_session: SessionId,
    owner: HashMap<SessionId, usize>,
    durable: HashSet<(String, [u8; 32])>,
    accepted_tasks: HashSet<(String, u64)>,
    /// Payload checks handed out and not yet answered: answered in a
    /// random order, interleaved with the other inputs.
    checks: Vec<VerifyJob>,
    /// A round's close handed out and not yet answered: answered at a
    /// random later step, other inputs (uploads, checks, requests,
    /// timeouts) arriving meanwhile.
    close: Option<CloseJob>,
    /// Round closes applied.
    closes_applied: usize,
}

impl Run {
    fn new(seed: u64) -> Self {
        let now = Instant::now();
        Run {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now,
            c: Coordinator::new(config(seed), model(), 1, 0).unwrap(),
            keys: (0..DEVICES)
                .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
                .collect(),
            devs: (0..DEVICES).map(|_| Dev::default()).collect(),
            next_session: 1,
            owner: HashMap::new(),
            durable: HashSet::new(),
            accepted_tasks: HashSet::new(),
            checks: Vec::new(),
            close: None,
            closes_applied: 0,
        }
    }

    fn msg(&mut self, i: usize, m: DeviceMsg) {
        if let Some(s) = self.devs[i].session {
            self.c.handle_message(self.now, s, m);
        }
    }

    /// Mostly what an honest device would do next, sometimes anything.
    fn step(&mut self) {
        if self.close.is_some() && self.rng.random_bool(0.1) {
            let job = self.close.take().expect("some");
            let round = job.round_id();
            assert_eq!(
                self.c.round_id(),
                round,
                "seed {}: the round waits",
                self.seed
            );
            self.c.handle_closed(self.now, job.run());
            assert!(
                self.c.round_id() > round || self.c.is_finished(),
                "seed {}: the close of round {round} was applied",
                self.seed
            );
            self.closes_applied += 1;
            return;
        }
        if !self.checks.is_empty() && self.rng.random_bool(0.3) {
            let job = self
                .checks
                .swap_remove(self.rng.random_range(0..self.checks.len()));
            self.c.handle_verified(self.now, job.run());
            return;
        }
        let i = self.rng.random_range(0..DEVICES);
        let d = &self.devs[i];
        let action = if self.rng.random_bool(0.15) {
            self.rng.random_range(0..13)
        } else if d.session.is_none() {
            0
        } else if d.nonce.is_none() {
            2
        } else if !d.authenticated {
            3
        } else if d.offer.is_none() {
            4
        } else if d.upload.is_none() {
            7
        } else {
            8
        };
        self.act(i, action);
    }

    fn act(&mut self, i: usize, action: u32) {
        match action {
            0 => {
                let s = self.next_session;
                self.next_session += 1;
                self.owner.insert(s, i);
                self.devs[i] = Dev {
                    session: Some(s),
                    ..Dev::default()
                };
                self.c.handle_connect(self.now, s, [s as u8; 32]);
            }
            1 => {
                if let Some(s) = self.devs[i].session.take() {
                    self.c.handle_disconnect(self.now, s);
                }
            }
            2 => {
                let schema_version = if self.rng.random_bool(0.9) {
                    SCHEMA_VERSION
                } else {
                    SCHEMA_VERSION + 1
                };
                let hello = Hello {
                    schema_version,
                    device_public_key: self.keys[i].verifying_key(),
                    runtime_version: "test".into(),
                    capabilities: Capabilities::default(),
                };
                self.msg(i, DeviceMsg::Hello(hello));
            }
            3 => {
                let (Some(s), Some(nonce)) = (self.devs[i].session, self.devs[i].nonce) else {
                    return;
                };
                let mut signature = sign_auth(&self.keys[i], &nonce, &[s as u8; 32]);
                if self.rng.random_bool(0.1) {
                    signature[0] ^= 1;
                }
                self.msg(i, DeviceMsg::AuthResponse { signature });
            }
            4 | 5 => self.msg(
                i,
                DeviceMsg::TaskRequest {
                    have_model_version: None,
                },
            ),
            6 => {
                let version = match self.devs[i].offer {
                    Some((_, m)) if self.rng.random_bool(0.8) => m.version,
                    _ => ModelVersion([self.rng.random(); 32]),
                };
                let index = self.rng.random_range(0..12);
                self.msg(
                    i,
                    DeviceMsg::ChunkRequest {
                        model_version: version,
                        index,
                    },
                );
            }
            7 => self.upload_begin(i),
            8 | 9 => self.upload_chunk(i),
            10 => {
                self.now += Duration::from_millis(self.rng.random_range(0..3000));
                self.c.handle_timeout(self.now);
            }
            12 => {
                let round_id = match self.devs[i].offer {
                    Some((r, _)) if self.rng.random_bool(0.8) => r,
                    _ => self.rng.random_range(0..4),
                };
                let reason = [
                    AbandonReason::Diverged,
                    AbandonReason::Failed,
                    AbandonReason::Declined,
                ][self.rng.random_range(0..3)];
                self.msg(
                    i,
                    DeviceMsg::TaskAbandoned {
                        round_id,
                        reason,
                        detail: "test".into(),
                    },
                );
            }
            _ => {
                if let Some(s) = self.devs[i].session {
                    if self.rng.random_bool(0.5) {
                        self.c
                            .handle_bad_frame(self.now, s, &ProtoError::BadSignature);
                    } else {
                        self.c.handle_rate_limited(self.now, s);
                    }
                }
            }
        }
    }

    /// A manifest for the device's task (or a lie about it): wrong round,
    /// wrong model, wrong size, zero or huge sample counts, a bad signature.
    fn upload_begin(&mut self, i: usize) {
        let (round_id, version) = match self.devs[i].offer {
            Some((r, m)) => (r, m.version),
            None => (self.rng.random_range(0..4), ModelVersion([9; 32])),
        };
        // One sequence in four sends only zero updates: rounds that
        // republish the current model.
        let value = match self.seed % 4 {
            0 => 0.0,
            _ => [0.0f32, 0.01, -0.2, 1e30][self.rng.random_range(0..4)],
        };
        let mut payload =
            encode_update(CodecSpec::parse("dense-f32").unwrap(), &[value; DIM]).to_vec();
        if self.rng.random_bool(0.1) {
            payload[3] ^= 0xff;
        }
        let payload_hash = *blake3::hash(&payload).as_bytes();
        let payload_bytes = match self.rng.random_range(0..10) {
            0 => 1 << 40,
            1 => payload.len() as u64 + 7,
            _ => payload.len() as u64,
        };
        let manifest = UpdateManifest {
            round_id: if self.rng.random_bool(0.9) {
                round_id
            } else {
                round_id + 1
            },
            model_version: version,
            payload_hash,
            payload_bytes,
            sample_count: [0, 1, 50, u64::MAX][self.rng.random_range(0..4)],
            metrics: vec![("loss".into(), 1.0)],
            device_public_key: self.keys[i].verifying_key(),
            federation_id: [0; 32],
            partial: None,
        };
        let signer = if self.rng.random_bool(0.95) {
            i
        } else {
            (i + 1) % DEVICES
        };
        let signature = manifest.sign(&self.keys[signer]);
        let chunk_bytes = [32, 64][self.rng.random_range(0..2)];
        self.devs[i].upload = Some(Upload {
            payload,
            hash: payload_hash,
            chunk_bytes,
            next: 0,
        });
        self.msg(
            i,
            DeviceMsg::UploadBegin(Box::new(UploadBegin {
                manifest,
                signature,
                chunk_bytes,
            })),
        );
    }

    fn upload_chunk(&mut self, i: usize) {
        let Some(u) = self.devs[i].upload.clone() else {
            return;
        };
        let size = u.chunk_bytes as usize;
        let chunks = u.payload.len().div_ceil(size) as u32;
        let index = if self.rng.random_bool(0.8) {
            u.next
        } else {
            self.rng.random_range(0..chunks + 1)
        };
        let start = (index as usize * size).min(u.payload.len());
        let end = (start + size).min(u.payload.len());
        let mut data = u.payload[start..end].to_vec();
        if self.rng.random_bool(0.05) {
            data.extend_from_slice(&[0; 9]);
        }
        if index == u.next
            && let Some(u) = &mut self.devs[i].upload
        {
            u.next += 1;
        }
        self.msg(
            i,
            DeviceMsg::UploadChunk {
                payload_hash: u.hash,
                index,
                data: data.into(),
            },
        );
    }

    /// Reads every output, updating what the devices know, and checks the
    /// invariants.
    fn drain(&mut self) {
        let seed = self.seed;
        while let Some(o) = self.c.poll_output() {
            match o {
                Output::Persist(u) => {
                    self.durable.insert((u.device.clone(), u.payload_hash));
                }
                Output::Send { session, msg } => self.on_send(session, msg),
                Output::Close { session, .. } => {
                    if let Some(&i) = self.owner.get(&session)
                        && self.devs[i].session == Some(session)
                    {
                        self.devs[i].session = None;
                    }
                }
                Output::Event(Event::UpdateAccepted {
                    round_id, device, ..
                }) => {
                    // One update per device per version (FedBuff's buffers
                    // included), whatever task it trained.
                    assert!(
                        self.accepted_tasks.insert((device.clone(), round_id)),
                        "seed {seed}: two updates from {device} combined into round {round_id}"
                    );
                }
                Output::Event(_) => {}
                Output::Forward(f) => panic!("seed {seed}: a lone aggregator forwarded {f:?}"),
                Output::Verify(job) => self.checks.push(*job),
                Output::CloseRound(job) => {
                    assert!(
                        self.close.is_none(),
                        "seed {seed}: a second close while one is out"
                    );
                    self.close = Some(*job);
                }
            }
        }
        assert!(
            self.checks.len() == self.c.verify_jobs_out() && self.checks.len() <= 2,
            "seed {seed}: {} payload checks out, the coordinator counts {}",
            self.checks.len(),
            self.c.verify_jobs_out()
        );
        let (_, verify_bytes) = self.c.verify_backlog();
        assert!(
            self.c.session_count() <= 4 + 3,
            "seed {seed}: {} sessions",
            self.c.session_count()
        );
        let bound = DEVICES as u64 * fedge_proto::codec::payload_bytes_max(DIM as u64);
        assert!(
            self.c.upload_bytes_held() + verify_bytes <= bound,
            "seed {seed}: {} upload bytes held",
            self.c.upload_bytes_held()
        );
    }

    fn on_send(&mut self, session: SessionId, msg: AggMsg) {
        let seed = self.seed;
        let Some(&i) = self.owner.get(&session) else {
            panic!("seed {seed}: output to unknown session {session}");
        };
        match msg {
            AggMsg::Challenge { nonce, .. } => self.devs[i].nonce = Some(nonce),
            AggMsg::AuthOk { .. } => self.devs[i].authenticated = true,
            AggMsg::TaskOffer(o) => {
                self.devs[i].offer = Some((o.round_id, o.model));
                self.devs[i].upload = None;
            }
            AggMsg::UploadStatus { next_index, .. } => {
                if let Some(u) = &mut self.devs[i].upload {
                    u.next = next_index;
                }
            }
            AggMsg::Reject { .. } | AggMsg::NoTask { .. } => {
                // Start over: ask for a new task.
                self.devs[i].offer = None;
                self.devs[i].upload = None;
            }
            AggMsg::UpdateAccepted { payload_hash, .. } => {
                self.devs[i].offer = None;
                self.devs[i].upload = None;
                let device = hex::encode(self.keys[i].verifying_key().to_bytes());
                assert!(
                    self.durable.contains(&(device, payload_hash)),
                    "seed {seed}: acknowledged before it was made durable"
                );
            }
            _ => {}
        }
    }
}

#[test]
fn random_message_sequences_keep_the_invariants() {
    let mut accepted = 0;
    let mut max_published = 0;
    let mut closes = 0;
    for seed in 0..SEQUENCES {
        let mut run = Run::new(seed);
        let steps = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for _ in 0..STEPS {
                run.step();
                run.drain();
            }
        }));
        if let Err(e) = steps {
            eprintln!("sequence with seed {seed} failed; replay it with Run::new({seed})");
            std::panic::resume_unwind(e);
        }
        accepted += run.accepted_tasks.len();
        closes += run.closes_applied;
        max_published = max_published.max(run.c.published_rounds());
    }
    eprintln!(
        "accepted {accepted}, {closes} round closes answered out of order, \
         most rounds published in one sequence {max_published}"
    );
    assert!(closes > 10, "only {closes} round closes in all sequences");
    // The sequences reach acceptance, not only rejections.
    assert!(
        accepted > 100,
        "only {accepted} updates accepted in all sequences"
    );
}
