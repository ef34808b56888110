//! The coordinator's configuration: every round rule and bound, validated
//! before a coordinator starts.

use std::time::Duration;

use fedge_proto::Limits;
use fedge_proto::msg::TrainingPlan;

use crate::evaluation::EvaluationConfig;
use crate::scoring::ScoringConfig;
use crate::strategy::StrategyConfig;
use crate::weighting::WeightPolicy;

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Updates that close a round (the target).
    pub devices_per_round: usize,
    /// Selected devices = ceil(devices_per_round * over_selection).
    pub over_selection: f64,
    /// Fewest accepted updates for a round to be aggregated at its deadline.
    pub min_devices: usize,
    /// Rounds to run (round ids 1..=rounds, published or aborted) before
    /// finishing (0 = run forever).
    pub rounds: u64,
    /// Time from a round's opening to its deadline. A round that reaches
    /// its deadline without ever selecting a device stays open for another
    /// period instead (nobody was there to train it).
    pub round_deadline: Duration,
    /// Synchronous rounds: devices that ask for work during this window
    /// after a round opens are candidates, and the selected ones are drawn
    /// among them at random (seeded) when it ends, so being first buys
    /// nothing. Slots still free after the window go to the next eligible
    /// devices to ask. Zero: first come, first served.
    pub selection_window: Duration,
    /// Draw candidates with probability proportional to stake (needs a
    /// stake registry) instead of uniformly.
    pub selection_by_stake: bool,
    /// A selected device that has not begun its download (or its upload)
    /// this long after its offer loses the slot to another device, and
    /// gets no other slot in the round.
    pub slot_timeout: Duration,
    /// Roll back to the model the current one was built from when most
    /// devices that finished a round report that training on it diverged
    /// (and at least `min_devices` do).
    pub rollback_on_divergence: bool,
    /// The federation's name.
    pub federation: String,
    /// Signed into every manifest: `fedge_proto::sign::federation_id` of
    /// `federation` and the aggregator's certificate, set by the server
    /// when it binds. An update signed for another federation is refused.
    pub federation_id: [u8; 32],
    /// Pace-steering window for devices not needed now.
    pub retry_window: (Duration, Duration),
    /// Time a connection may take to authenticate.
    pub auth_timeout: Duration,
    /// Authentications the aggregator completes per second (admission
    /// control, see `coordinator::admission`): connections beyond what it
    /// serves in half of `auth_timeout` are paced away before they
    /// authenticate, told when to come back, instead of timing out.
    pub handshakes_per_sec: f64,
    /// Task requests per second from all devices together that pace
    /// steering aims at: `retry_window` is stretched by the number of
    /// devices connected so that they ask no more often than this (see
    /// `coordinator::admission::request_window`).
    pub task_requests_per_sec: f64,
    /// Devices fetching the final model at once after the last round
    /// (see `coordinator::finish`); the others are paced away and come
    /// back for it.
    pub final_downloads_max: usize,
    /// Chunk size for model downloads.
    pub chunk_bytes: u32,
    /// Most authenticated devices connected at once.
    pub max_sessions: usize,
    /// Most connections still authenticating at once: their own budget,
    /// so a flood of handshakes never takes authenticated capacity.
    pub max_unauthenticated: usize,
    /// Model versions kept for download (the current one and older ones).
    pub versions_kept: usize,
    /// Bytes of uploads in flight, all devices together: each upload
    /// reserves its declared size when it begins, and one that would take
    /// the total past this waits (the device is paced away, keeps its
    /// update and comes back) instead of growing the aggregator's memory.
    pub uploads_in_flight_bytes_max: u64,
    /// Payload checks of complete uploads (hash, decoding, norm) handed
    /// to the driver at once (`coordinator::verify`); each holds one
    /// decoded update (at most 8 bytes a parameter), and complete uploads
    /// past it wait in order, their bytes counted against
    /// `uploads_in_flight_bytes_max`.
    pub verify_in_flight_max: usize,
    /// Training plan sent with each task (the strategy may adjust it).
    pub plan: TrainingPlan,
    /// How participants are weighted (stake, samples, share cap).
    pub weights: WeightPolicy,
    /// How updates are combined and applied.
    pub strategy: StrategyConfig,
    /// Updates with a larger L2 norm are rejected (None: no bound).
    pub update_norm_max: Option<f64>,
    /// Contribution scoring, ratings and rewards.
    pub scoring: ScoringConfig,
    /// Federated evaluation of each round's model (see
    /// [`crate::evaluation`]).
    pub evaluation: EvaluationConfig,
    pub limits: Limits,
    pub seed: u64,
    /// This aggregator's place in a tree of aggregators (see
    /// `coordinator::tree`); the default is a lone aggregator.
    pub tree: TreeRole,
}

/// Where an aggregator sits in a tree of aggregators.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TreeRole {
    /// A leaf: its rounds (ids, models, plans, deadlines) come from its
    /// parent, and a closed round's combined update goes up as a signed
    /// partial aggregate instead of being published.
    pub leaf: bool,
    /// A root (or, with `leaf`, a middle node): it takes partial aggregates
    /// from these leaves only, and no device updates.
    pub leaves: Option<LeafBounds>,
}

/// Who may send partial aggregates to a root, and what one may claim.
#[derive(Clone, Debug, PartialEq)]
pub struct LeafBounds {
    /// Ed25519 keys of the leaves; any other key is refused when it
    /// authenticates.
    pub keys: std::collections::BTreeSet<[u8; 32]>,
    /// Most updates one partial aggregate may combine.
    pub devices_max: u32,
    /// Largest weight one device can carry at a leaf: a partial's total
    /// weight may not exceed its device count times this.
    pub device_weight_max: f64,
}

impl TreeRole {
    /// Whether this aggregator takes partial aggregates (a root or a
    /// middle node) rather than device updates.
    pub fn takes_partials(&self) -> bool {
        self.leaves.is_some()
    }

    /// The largest upload an update of `dim` parameters may announce
    /// here: a partial's float64 encoding where this aggregator takes
    /// partials, otherwise the most any device codec makes.
    pub fn upload_bytes_max(&self, dim: u64) -> u64 {
        if self.takes_partials() {
            fedge_proto::update::partial_payload_bytes_max(dim)
        } else {
            fedge_proto::codec::payload_bytes_max(dim)
        }
    }

    fn validate(&self, cfg: &CoordinatorConfig) -> Result<(), String> {
        if let Some(l) = &self.leaves {
            if l.keys.is_empty() {
                return Err("tree.leaves.keys is empty: no leaf could take part".into());
            }
            if l.devices_max == 0 {
                return Err("tree.leaves.devices_max must be at least 1".into());
            }
            if !(l.device_weight_max.is_finite() && l.device_weight_max > 0.0) {
                return Err(format!(
                    "tree.leaves.device_weight_max must be positive, got {}",
                    l.device_weight_max
                ));
            }
            if cfg.devices_per_round > l.keys.len() {
                return Err(format!(
                    "a root waits for devices_per_round = {} partial aggregates, but only {} \
                     leaves are allowed (tree.leaves.keys)",
                    cfg.devices_per_round,
                    l.keys.len()
                ));
            }
        }
        if self.leaf || self.leaves.is_some() {
            let s = &cfg.strategy;
            let refuse = |what: &str| Err(format!("a tree of aggregators does not support {what}"));
            if s.buffered.is_some() {
                return refuse("FedBuff (strategy.buffered): its rounds are synchronous");
            }
            if s.secagg.is_some() {
                return refuse("SecAgg+ (strategy.secagg)");
            }
            if s.dp.is_some() {
                return refuse(
                    "central DP (strategy.dp): DP-FedAvg clips and counts users, and a partial \
                     aggregate is no user",
                );
            }
        }
        if self.leaf {
            let s = &cfg.strategy;
            if s.server_opt != (crate::strategy::ServerOpt::Avg { lr: 1.0 }) {
                return Err(format!(
                    "a leaf forwards its combined update to its parent, whose server optimizer \
                     applies it: strategy.server_opt must stay fedavg with lr 1 here, got {:?}",
                    s.server_opt
                ));
            }
            if s.downlink_spec()?.is_some() {
                return Err("a leaf publishes its parent's models as they are: remove \
                            strategy.downlink (set it at the root)"
                    .into());
            }
        }
        Ok(())
    }
}

/// Default for [`CoordinatorConfig::verify_in_flight_max`]: enough to
/// keep a few cores checking payloads, each job one decoded update.
pub const VERIFY_IN_FLIGHT_MAX: usize = 8;

/// The most [`CoordinatorConfig::verify_in_flight_max`] may be.
pub const VERIFY_IN_FLIGHT_LIMIT: usize = 1024;

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            devices_per_round: 10,
            over_selection: 1.3,
            min_devices: 1,
            rounds: 10,
            round_deadline: Duration::from_secs(60),
            selection_window: Duration::from_secs(2),
            selection_by_stake: false,
            slot_timeout: Duration::from_secs(10),
            rollback_on_divergence: true,
            federation: "fedge".into(),
            federation_id: [0; 32],
            retry_window: (Duration::from_millis(500), Duration::from_millis(1500)),
            auth_timeout: Duration::from_secs(10),
            handshakes_per_sec: 200.0,
            task_requests_per_sec: 1000.0,
            final_downloads_max: 256,
            chunk_bytes: 256 << 10,
            max_sessions: 10_000,
            max_unauthenticated: 1024,
            versions_kept: 4,
            uploads_in_flight_bytes_max: 256 << 20,
            verify_in_flight_max: VERIFY_IN_FLIGHT_MAX,
            plan: TrainingPlan::default(),
            weights: WeightPolicy::default(),
            strategy: StrategyConfig::default(),
            update_norm_max: None,
            scoring: ScoringConfig::default(),
            evaluation: EvaluationConfig::default(),
            limits: Limits::default(),
            seed: 0,
            tree: TreeRole::default(),
        }
    }
}

impl CoordinatorConfig {
    /// Devices selected per round.
    pub fn selection_target(&self) -> usize {
        ((self.devices_per_round as f64) * self.over_selection).ceil() as usize
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.devices_per_round == 0 {
            return Err("devices_per_round must be at least 1".into());
        }
        if !(self.over_selection >= 1.0 && self.over_selection <= 10.0) {
            return Err(format!(
                "over_selection must be in [1, 10], got {}",
                self.over_selection
            ));
        }
        if self.min_devices == 0 || self.min_devices > self.devices_per_round {
            return Err(format!(
                "min_devices must be in [1, devices_per_round={}], got {}",
                self.devices_per_round, self.min_devices
            ));
        }
        if self.round_deadline.is_zero() || self.slot_timeout.is_zero() {
            return Err("round_deadline and slot_timeout must be positive".into());
        }
        if self.selection_window >= self.round_deadline {
            return Err(format!(
                "selection_window ({:?}) must be shorter than round_deadline ({:?})",
                self.selection_window, self.round_deadline
            ));
        }
        if self.retry_window.0 > self.retry_window.1 {
            return Err("retry window min is above its max".into());
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > self.limits.chunk_bytes_max {
            return Err(format!(
                "chunk_bytes must be in [1, {}], got {}",
                self.limits.chunk_bytes_max, self.chunk_bytes
            ));
        }
        if !(self.task_requests_per_sec.is_finite() && self.task_requests_per_sec > 0.0) {
            return Err(format!(
                "task_requests_per_sec must be a positive number, got {}",
                self.task_requests_per_sec
            ));
        }
        if !(self.handshakes_per_sec.is_finite() && self.handshakes_per_sec > 0.0) {
            return Err(format!(
                "handshakes_per_sec must be a positive number, got {}",
                self.handshakes_per_sec
            ));
        }
        if self.max_sessions == 0 || self.max_unauthenticated == 0 {
            return Err("max_sessions and max_unauthenticated must be at least 1".into());
        }
        if self.uploads_in_flight_bytes_max == 0 {
            return Err("uploads_in_flight_bytes_max must be at least 1".into());
        }
        if !(1..=VERIFY_IN_FLIGHT_LIMIT).contains(&self.verify_in_flight_max) {
            return Err(format!(
                "verify_in_flight_max must be in 1..={VERIFY_IN_FLIGHT_LIMIT}, got {}",
                self.verify_in_flight_max
            ));
        }
        if self.versions_kept == 0 {
            return Err("versions_kept must be at least 1".into());
        }
        if let Some(b) = &self.strategy.buffered
            && self.versions_kept as u64 <= b.max_staleness
        {
            return Err(format!(
                "FedBuff accepts updates {} versions stale, so versions_kept must be at least {}, got {}",
                b.max_staleness,
                b.max_staleness + 1,
                self.versions_kept
            ));
        }
        if let Some(b) = self.update_norm_max
            && !(b > 0.0 && b.is_finite())
        {
            return Err(format!("update_norm_max must be positive, got {b}"));
        }
        self.strategy.validate()?;
        self.strategy.validate_dp(self.devices_per_round)?;
        let selected = (self.devices_per_round as f64 * self.over_selection).ceil() as u32;
        self.strategy.validate_secagg(
            selected,
            self.scoring.validation.is_some(),
            self.update_norm_max.is_some(),
            &self.plan.codec,
        )?;
        if self.strategy.secagg.is_some() && self.selection_window.is_zero() {
            // A secure round's devices are drawn together, at the end of
            // its check-in window.
            return Err("strategy.secagg needs a selection_window above zero".into());
        }
        self.scoring.validate()?;
        self.evaluation.validate()?;
        if self.evaluation.enabled() {
            if self.strategy.buffered.is_some() {
                return Err(
                    "evaluation: federated evaluation runs in synchronous rounds; with FedBuff \
                     (strategy.buffered) set evaluation.devices = 0"
                        .into(),
                );
            }
            if self.tree.leaf || self.tree.leaves.is_some() {
                return Err(
                    "evaluation: a tree of aggregators does not run evaluation tasks yet; set \
                     evaluation.devices = 0"
                        .into(),
                );
            }
            if self.selection_window.is_zero() {
                return Err(
                    "evaluation: evaluation tasks are drawn at the check-in window; set \
                     selection_window above zero"
                        .into(),
                );
            }
        }
        self.tree.validate(self)?;
        self.weights.validate()
    }
}
