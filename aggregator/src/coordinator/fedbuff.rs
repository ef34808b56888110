//! FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
//! Aggregation", AISTATS 2022) as a round policy: no round barrier. Any
//! eligible device asking for work gets the current model while fewer than
//! `concurrency` are training, and may ask again once its update is in. A
//! "round" is one buffer that publishes after `devices_per_round` accepted
//! updates. Updates trained on an older version are accepted up to
//! `max_staleness` publications behind, weighted by `(1 + staleness)^-a`;
//! uploads in flight survive a publication.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use fedge_proto::sign::UpdateManifest;
use fedge_proto::{ModelVersion, RejectCode};

use super::policy::{
    Refusal, RoundPolicy, RoundView, TaskDecision, check_model_held, check_not_ahead,
};
use super::sessions::DeviceKey;
use super::transfers::TransferManager;
use crate::strategy::BufferedSpec;

pub(super) struct FedBuff {
    spec: BufferedSpec,
    concurrency: usize,
    /// Devices training now, and the round (buffer) whose model they train.
    inflight: HashMap<DeviceKey, u64>,
    /// The model each recent round trains, within the staleness window.
    round_versions: VecDeque<(u64, ModelVersion)>,
    /// Tasks and payloads already accepted (replays), kept for the
    /// staleness window.
    accepted_tasks: HashSet<(DeviceKey, u64)>,
    accepted_hashes: VecDeque<(u64, [u8; 32])>,
    /// Devices with an update in the open buffer: at most one each.
    in_buffer: HashSet<DeviceKey>,
}

impl FedBuff {
    /// `selection_target` is the default concurrency.
    pub fn new(
        spec: BufferedSpec,
        selection_target: usize,
        first_round: u64,
        version: ModelVersion,
    ) -> Self {
        FedBuff {
            concurrency: spec.concurrency.unwrap_or(selection_target),
            spec,
            inflight: HashMap::new(),
            round_versions: VecDeque::from([(first_round, version)]),
            accepted_tasks: HashSet::new(),
            accepted_hashes: VecDeque::new(),
            in_buffer: HashSet::new(),
        }
    }
}

impl RoundPolicy for FedBuff {
    fn describe(&self, strategy: &str) -> String {
        format!(
            "fedbuff(max_staleness={}, a={})+{strategy}",
            self.spec.max_staleness, self.spec.staleness_exponent
        )
    }

    fn existing_task(&self, key: &DeviceKey, round: &RoundView) -> Option<TaskDecision> {
        if self.in_buffer.contains(key) {
            // One update per device per version: its share cap is per
            // device, and a second task for this version would only be
            // refused as a replay.
            return Some(TaskDecision::PaceAway(
                "already contributed to this version",
            ));
        }
        // Reconnected while training: the same offer again.
        (self.inflight.get(key) == Some(&round.id)).then_some(TaskDecision::Offer)
    }

    fn select(&mut self, key: DeviceKey, round: &RoundView) -> TaskDecision {
        // A device asking again has given up its older task.
        self.inflight.remove(&key);
        if self.inflight.len() >= self.concurrency {
            return TaskDecision::PaceAway("enough devices are training");
        }
        self.inflight.insert(key, round.id);
        TaskDecision::Offer
    }

    fn windowed(&self) -> bool {
        // Work is handed out continuously: there is no moment to draw at.
        false
    }

    fn release(&mut self, key: &DeviceKey, task_round: u64) -> bool {
        if self.inflight.get(key) == Some(&task_round) {
            self.inflight.remove(key);
            return true;
        }
        false
    }

    fn all_done(&self) -> bool {
        // A buffer fills from whoever comes; it never waits on a fixed set.
        false
    }

    fn slot_free(&self) -> bool {
        self.inflight.len() < self.concurrency
    }

    fn idle(&self) -> bool {
        self.inflight.is_empty() && self.in_buffer.is_empty()
    }

    fn offer_deadline(&self, now: Instant, _round: &RoundView, task_time: Duration) -> Instant {
        // Each task has its own time budget.
        now + task_time
    }

    /// The task was handed out here, is within the staleness window,
    /// trained the model of its round, and was not accepted before.
    fn check_task(
        &self,
        key: &DeviceKey,
        m: &UpdateManifest,
        round: &RoundView,
        _now: Instant,
        models: &TransferManager,
    ) -> Result<(), Refusal> {
        check_not_ahead(m, round)?;
        self.check_staleness(m, round)?;
        check_model_held(m, models)?;
        let trained = self
            .round_versions
            .iter()
            .find(|(r, _)| *r == m.round_id)
            .map(|(_, v)| *v);
        if trained != Some(m.model_version) {
            return Err((
                RejectCode::UnknownModelVersion,
                format!(
                    "update is against model {}, not the model of round {}",
                    m.model_version, m.round_id
                ),
            ));
        }
        if self.accepted_tasks.contains(&(*key, m.round_id))
            || self
                .accepted_hashes
                .iter()
                .any(|(_, h)| *h == m.payload_hash)
        {
            return Err((
                RejectCode::Replay,
                format!(
                    "an update from this device for round {} was already accepted",
                    m.round_id
                ),
            ));
        }
        if self.in_buffer.contains(key) {
            return Err((
                RejectCode::Replay,
                format!(
                    "this device already has an update in version {}'s buffer",
                    round.id
                ),
            ));
        }
        if self.inflight.get(key) != Some(&m.round_id) {
            return Err((
                RejectCode::NotSelected,
                format!("no task of round {} is open for this device", m.round_id),
            ));
        }
        Ok(())
    }

    /// Staleness is checked again at completion: an upload begun in the
    /// window may finish after it has moved on.
    fn check_completion(
        &self,
        m: &UpdateManifest,
        round: &RoundView,
        _now: Instant,
    ) -> Result<(), Refusal> {
        self.check_staleness(m, round)
    }

    fn discount(&self, staleness: u64) -> f64 {
        self.spec.discount(staleness)
    }

    fn on_accepted(&mut self, key: DeviceKey, task_round: u64, open: u64, payload_hash: [u8; 32]) {
        self.in_buffer.insert(key);
        self.inflight.remove(&key);
        self.accepted_tasks.insert((key, task_round));
        self.accepted_hashes.push_back((open, payload_hash));
    }

    fn on_restored(
        &mut self,
        key: DeviceKey,
        task_round: u64,
        model_version: Option<ModelVersion>,
        hash: [u8; 32],
        _round: &RoundView,
    ) -> Result<(), String> {
        let trained = self
            .round_versions
            .iter()
            .find(|(r, _)| *r == task_round)
            .map(|(_, v)| *v);
        match (trained, model_version) {
            (None, _) => {
                return Err(format!(
                    "update for the task of round {task_round}, outside the staleness window"
                ));
            }
            (Some(t), Some(v)) if t != v => {
                return Err(format!(
                    "update trained against model {v}, round {task_round} trained {t}"
                ));
            }
            _ => {}
        }
        let round = self.round_versions.back().map_or(task_round, |(r, _)| *r);
        if !self.in_buffer.insert(key) {
            return Err(format!("device {} restored twice", hex::encode(key)));
        }
        self.accepted_tasks.insert((key, task_round));
        self.accepted_hashes.push_back((round, hash));
        Ok(())
    }

    /// The model of each round in the window and the replay records (the
    /// tasks in flight are not kept: their devices ask again).
    fn checkpoint(&self) -> Vec<u8> {
        let state = FedBuffState {
            round_versions: self
                .round_versions
                .iter()
                .map(|(r, v)| (*r, v.to_hex()))
                .collect(),
            accepted_tasks: self
                .accepted_tasks
                .iter()
                .map(|(k, r)| (hex::encode(k), *r))
                .collect(),
            accepted_hashes: self
                .accepted_hashes
                .iter()
                .map(|(r, h)| (*r, hex::encode(h)))
                .collect(),
        };
        serde_json::to_vec(&state).expect("serialisable")
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let bad = |what: &str| format!("FedBuff state: bad {what}");
        let s: FedBuffState =
            serde_json::from_slice(state).map_err(|e| format!("FedBuff state: {e}"))?;
        let hash = |h: &str| -> Option<[u8; 32]> { hex::decode(h).ok()?.try_into().ok() };
        let mut versions = VecDeque::new();
        for (r, v) in &s.round_versions {
            versions.push_back((*r, ModelVersion::from_hex(v).ok_or_else(|| bad("version"))?));
        }
        if versions.is_empty() {
            return Err(bad("round list (empty)"));
        }
        let mut tasks = HashSet::new();
        for (k, r) in &s.accepted_tasks {
            tasks.insert((hash(k).ok_or_else(|| bad("device key"))?, *r));
        }
        let mut hashes = VecDeque::new();
        for (r, h) in &s.accepted_hashes {
            hashes.push_back((*r, hash(h).ok_or_else(|| bad("payload hash"))?));
        }
        self.round_versions = versions;
        self.accepted_tasks = tasks;
        self.accepted_hashes = hashes;
        Ok(())
    }

    /// Tasks, replay records and model versions older than the staleness
    /// window go; uploads in flight go on.
    fn on_round_closed(&mut self, next: u64, next_version: ModelVersion) -> u64 {
        let oldest = next.saturating_sub(self.spec.max_staleness);
        self.inflight.retain(|_, r| *r >= oldest);
        self.accepted_tasks.retain(|(_, r)| *r >= oldest);
        while self
            .accepted_hashes
            .front()
            .is_some_and(|(r, _)| *r < oldest)
        {
            self.accepted_hashes.pop_front();
        }
        self.round_versions.push_back((next, next_version));
        while self
            .round_versions
            .front()
            .is_some_and(|(r, _)| *r < oldest)
        {
            self.round_versions.pop_front();
        }
        self.in_buffer.clear();
        // Uploads of tasks the window has left can never be combined.
        oldest
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FedBuffState {
    round_versions: Vec<(u64, String)>,
    accepted_tasks: Vec<(String, u64)>,
    accepted_hashes: Vec<(u64, String)>,
}

impl FedBuff {
    fn check_staleness(&self, m: &UpdateManifest, round: &RoundView) -> Result<(), Refusal> {
        let staleness = round.id.saturating_sub(m.round_id);
        let max = self.spec.max_staleness;
        if staleness > max {
            return Err((
                RejectCode::RoundClosed,
                format!("update is {staleness} versions stale; at most {max} are accepted"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_proto::sign::SigningKey;

    /// An upload begun within the staleness window but completed after the
    /// window moved on is refused at completion, not combined.
    #[test]
    fn staleness_is_checked_again_at_completion() {
        let spec = BufferedSpec {
            max_staleness: 1,
            ..BufferedSpec::default()
        };
        let p = FedBuff::new(spec, 4, 1, ModelVersion([0; 32]));
        let m = UpdateManifest {
            round_id: 1,
            model_version: ModelVersion([0; 32]),
            payload_hash: [0; 32],
            payload_bytes: 1,
            sample_count: 1,
            metrics: vec![],
            device_public_key: SigningKey::from_bytes(&[1; 32]).verifying_key(),
            federation_id: [0; 32],
            partial: None,
        };
        let view = |id| RoundView {
            id,
            model_version: ModelVersion([0; 32]),
            deadline: None,
            finished: false,
        };
        let now = Instant::now();
        assert_eq!(p.check_completion(&m, &view(2), now), Ok(()));
        let (code, detail) = p.check_completion(&m, &view(7), now).unwrap_err();
        assert_eq!(code, RejectCode::RoundClosed);
        assert!(detail.contains("6 versions stale"), "{detail}");
    }
}
