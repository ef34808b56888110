//! The aggregator's configuration file (TOML). Every field has a default;
//! unknown fields are an error, so a typo is caught rather than ignored.
//!
//! The defaults are chosen for an open network, where every number a device
//! sends is a claim: a share cap per device (`weights.max_share = 0.2`),
//! weight from stake alone (a claimed sample count buys none:
//! `weights.samples = constant`), no weight for devices missing from the
//! stake registry, adaptive norm clipping, a robust combiner (20% trimmed
//! mean) and at least 2 updates per round. A
//! configuration that lets one participant dominate a round is refused at
//! start with the reason ([`AggregatorConfig::dominance_risks`]) unless
//! `i_know_this_is_unsafe = true`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedge_proto::Limits;
use fedge_proto::msg::{LoraSpec, Loss, Optimizer, TrainingPlan};
use serde::{Deserialize, Serialize};

use crate::coordinator::CoordinatorConfig;
use crate::evaluation::EvaluationConfig;
use crate::robust::CombineSpec;
use crate::scoring::ScoringConfig;
use crate::server::ServerConfig;
use crate::store::Database;
use crate::strategy::{ClipSpec, StrategyConfig};
use crate::weighting::{Transform, WeightPolicy};

mod tree;
pub use tree::{LeavesConfig, ParentConfig, TreeConfig};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where keys, models and update payloads live (and the SQLite
    /// database, the default).
    pub state_dir: PathBuf,
    /// Where the tables (resume point, updates, contributions, ledger,
    /// ratings) live: `"sqlite"` (the default: `aggregator.db` in
    /// `state_dir`) or `"postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"`
    /// (the database must exist; its tables are created on first use).
    pub database: Database,
    /// Initial model (a `.fedge` blob); ignored when the state directory
    /// already holds a published model.
    pub model: Option<PathBuf>,
    /// The federation's name. With the aggregator's certificate it makes
    /// the federation id every device signs into its updates, so an update
    /// signed here verifies nowhere else.
    pub federation: String,
    pub seed: u64,
    pub rounds: RoundsConfig,
    pub plan: PlanConfig,
    pub limits: LimitsConfig,
    pub server: ServerLimits,
    pub strategy: StrategyConfig,
    pub weights: WeightPolicy,
    /// Stake registry file (`<hex public key> <stake>` lines); reloaded
    /// when it changes. None: every device has stake 0.
    pub stakes: Option<PathBuf>,
    /// Reject updates whose L2 norm exceeds this.
    pub update_norm_max: Option<f64>,
    /// Contribution scoring, ratings and rewards (see
    /// [`crate::scoring`]); `scoring.validation` names the operator's
    /// validation set.
    pub scoring: ScoringConfig,
    /// Federated evaluation (see [`crate::evaluation`]): devices without a
    /// training slot evaluate the round's model on their own data.
    pub evaluation: EvaluationConfig,
    /// Start even when one participant could dominate a round (see
    /// [`AggregatorConfig::dominance_risks`]). For closed test fleets only.
    pub i_know_this_is_unsafe: bool,
    /// `[tree]`: this aggregator's place in a tree of aggregators.
    pub tree: TreeConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsConfig {
    pub rounds: u64,
    pub devices_per_round: usize,
    pub over_selection: f64,
    pub min_devices: usize,
    /// From a round's opening to its deadline.
    pub round_deadline_ms: u64,
    /// Check-in window at a round's opening: the selected devices are
    /// drawn at random among those that asked during it (0: first come,
    /// first served, which lets the fastest keys take every slot).
    pub selection_window_ms: u64,
    /// Draw candidates in proportion to stake instead of uniformly.
    pub selection_by_stake: bool,
    /// A selected device that has not begun its download this long after
    /// its offer loses the slot.
    pub slot_timeout_ms: u64,
    /// Roll back to the previous model when most devices of a round report
    /// that training diverged.
    pub rollback_on_divergence: bool,
    pub retry_window_ms: [u64; 2],
    pub chunk_bytes: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanConfig {
    pub local_steps: u32,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// "sgd", "adam" or "adamw".
    pub optimizer: String,
    pub momentum: f32,
    pub weight_decay: f32,
    /// "softmax-cross-entropy" or "mse".
    pub loss: String,
    pub fedprox_mu: f32,
    pub codec: String,
    pub error_feedback: bool,
    pub freeze: Vec<String>,
    /// `[plan.lora]`: train LoRA adapters on a frozen model. The model the
    /// aggregator starts from gets the adapters (seeded by `seed`), and
    /// every task's plan names them.
    pub lora: Option<LoraConfig>,
}

/// `[plan.lora]`: `rank`, `alpha` (default: the rank) and `targets`,
/// weight-name patterns (`*` wildcards) of MatMul/Gemm weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: u32,
    pub alpha: Option<f32>,
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn spec(&self) -> LoraSpec {
        LoraSpec {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(self.rank as f32),
            targets: self.targets.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub frame_bytes_max: u32,
    pub chunk_bytes_max: u32,
    pub transfer_chunks_max: u32,
    pub model_bytes_max: u64,
    pub update_dimension_max: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// Most authenticated devices connected at once.
    pub max_devices: usize,
    /// Most connections authenticating at once (their own budget: a
    /// handshake flood never takes authenticated capacity).
    pub max_authenticating: usize,
    /// Authentications completed per second (admission control): a burst
    /// of connections past what this serves in half of `auth_timeout_ms`
    /// is told to come back later, each at its place in the queue.
    pub handshakes_per_sec: f64,
    /// Task requests per second from all devices together: devices not
    /// needed now are told to come back after a window stretched by how
    /// many are connected, so that they ask no more often than this.
    pub task_requests_per_sec: f64,
    /// Devices fetching the final model at once after the last round; the
    /// others are paced away and come back for it.
    pub final_downloads_max: usize,
    /// TLS handshakes run at once; a new connection waits for a turn at
    /// most `handshake_queue_wait_ms` and is refused at the QUIC level
    /// past it (the device backs off and comes back).
    pub handshakes_in_flight_max: usize,
    pub handshake_queue_wait_ms: u64,
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    pub idle_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    /// After the last round, serve this long for final-model downloads
    /// (0: exit at once; omit the section to keep the default).
    pub finish_grace_ms: u64,
    /// Keep serving after the last round instead of exiting.
    pub serve_forever: bool,
    /// HTTP address for `/metrics` and `/status` (None: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Bytes queued for one connection that it has not read yet; a device
    /// over it is dropped.
    pub writer_queue_bytes_max: usize,
    /// Bytes of uploads in flight, all devices together (each upload
    /// reserves its declared size when it begins). When full, a device
    /// that begins an upload is told to come back later and keeps its
    /// update: memory stays bounded however many devices upload slowly.
    /// Must hold the largest upload of the model (dense float32).
    pub uploads_in_flight_bytes_max: u64,
    /// Complete uploads whose payloads (hash, decoding, norm) are checked
    /// at once, off the coordinator's task; each holds one decoded
    /// update, and the others wait in order (1 to 1024).
    pub verify_in_flight_max: usize,
    /// Accepted updates made durable together (group commit): payloads
    /// fsynced, rows in one transaction, and only then is each
    /// acknowledged. 1 writes each update alone (1 to 4096).
    pub commit_group_max: usize,
    /// How long the first update of a group waits for others to join it
    /// before the group is written, in milliseconds (0 to 1000; while a
    /// group is being written the next one gathers anyway).
    pub commit_wait_ms: u64,
    /// With PostgreSQL, how often the server asks the database whether
    /// it still holds its lock (one small query on the lock's own
    /// connection), in milliseconds (10 to 60000). A lost lock (the
    /// server ended that session: restart, `pg_terminate_backend`, a cut
    /// network) stops the aggregator with an error, having written
    /// nothing more; writes are fenced meanwhile, so a second aggregator
    /// that took the database is never written over.
    pub lock_check_ms: u64,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            listen: "127.0.0.1:4433".parse().expect("addr"),
            state_dir: PathBuf::from("fedge-aggregator-state"),
            database: Database::Sqlite,
            model: None,
            federation: "fedge".into(),
            seed: 0,
            rounds: RoundsConfig::default(),
            plan: PlanConfig::default(),
            limits: LimitsConfig::default(),
            server: ServerLimits::default(),
            strategy: StrategyConfig {
                combine: CombineSpec::TrimmedMean { trim: 0.2 },
                clip: Some(ClipSpec::AdaptiveMedian { multiplier: 2.0 }),
                ..StrategyConfig::default()
            },
            weights: WeightPolicy {
                stake: Transform::Sqrt,
                // A sample count is a claim nothing here can check: on an
                // open network it buys no weight (see `dominance_risks`).
                samples: Transform::Constant,
                min_stake: 0.0,
                max_share: 0.2,
                allow_unknown: false,
                ..WeightPolicy::default()
            },
            stakes: None,
            update_norm_max: None,
            scoring: ScoringConfig::default(),
            evaluation: EvaluationConfig::default(),
            i_know_this_is_unsafe: false,
            tree: TreeConfig::default(),
        }
    }
}

impl Default for RoundsConfig {
    fn default() -> Self {
        let c = CoordinatorConfig::default();
        RoundsConfig {
            rounds: c.rounds,
            devices_per_round: c.devices_per_round,
            over_selection: c.over_selection,
            // One update alone never makes a version.
            min_devices: c.min_devices.max(2),
            round_deadline_ms: c.round_deadline.as_millis() as u64,
            selection_window_ms: c.selection_window.as_millis() as u64,
            selection_by_stake: c.selection_by_stake,
            slot_timeout_ms: c.slot_timeout.as_millis() as u64,
            rollback_on_divergence: c.rollback_on_divergence,
            retry_window_ms: [
                c.retry_window.0.as_millis() as u64,
                c.retry_window.1.as_millis() as u64,
            ],
            chunk_bytes: c.chunk_bytes,
        }
    }
}

impl Default for PlanConfig {
    fn default() -> Self {
        let p = TrainingPlan::default();
        PlanConfig {
            local_steps: p.local_steps,
            local_epochs: p.local_epochs,
            batch_size: p.batch_size,
            learning_rate: p.learning_rate,
            optimizer: "sgd".into(),
            momentum: p.momentum,
            weight_decay: p.weight_decay,
            loss: "softmax-cross-entropy".into(),
            fedprox_mu: p.fedprox_mu,
            codec: p.codec,
            error_feedback: p.error_feedback,
            freeze: p.freeze,
            lora: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        LimitsConfig {
            frame_bytes_max: l.frame_bytes_max,
            chunk_bytes_max: l.chunk_bytes_max,
            transfer_chunks_max: l.transfer_chunks_max,
            model_bytes_max: l.model_bytes_max,
            update_dimension_max: l.update_dimension_max,
        }
    }
}

impl ServerLimits {
    fn commit_limits(&self) -> crate::server::CommitLimits {
        crate::server::CommitLimits {
            group_max: self.commit_group_max,
            wait: Duration::from_millis(self.commit_wait_ms),
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        let s = ServerConfig::default();
        ServerLimits {
            max_devices: CoordinatorConfig::default().max_sessions,
            max_authenticating: CoordinatorConfig::default().max_unauthenticated,
            handshakes_per_sec: CoordinatorConfig::default().handshakes_per_sec,
            task_requests_per_sec: CoordinatorConfig::default().task_requests_per_sec,
            final_downloads_max: CoordinatorConfig::default().final_downloads_max,
            handshakes_in_flight_max: s.handshakes.in_flight_max,
            handshake_queue_wait_ms: s.handshakes.queue_wait.as_millis() as u64,
            rate_per_sec: s.rate_per_sec,
            rate_burst: s.rate_burst,
            idle_timeout_ms: s.idle_timeout.as_millis() as u64,
            auth_timeout_ms: CoordinatorConfig::default().auth_timeout.as_millis() as u64,
            finish_grace_ms: 10_000,
            serve_forever: false,
            metrics_listen: None,
            writer_queue_bytes_max: s.writer_queue_bytes_max,
            uploads_in_flight_bytes_max: CoordinatorConfig::default().uploads_in_flight_bytes_max,
            verify_in_flight_max: CoordinatorConfig::default().verify_in_flight_max,
            commit_group_max: s.commit.group_max,
            commit_wait_ms: s.commit.wait.as_millis() as u64,
            lock_check_ms: s.lock_check.as_millis() as u64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl AggregatorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn plan(&self) -> Result<TrainingPlan, ConfigError> {
        let p = &self.plan;
        let optimizer = match p.optimizer.as_str() {
            "sgd" => Optimizer::Sgd,
            "adam" => Optimizer::Adam,
            "adamw" => Optimizer::AdamW,
            o => {
                return Err(ConfigError::Invalid(format!(
                    "plan.optimizer `{o}`: expected sgd, adam or adamw"
                )));
            }
        };
        let loss = match p.loss.as_str() {
            "softmax-cross-entropy" => Loss::SoftmaxCrossEntropy,
            "mse" => Loss::Mse,
            l => {
                return Err(ConfigError::Invalid(format!(
                    "plan.loss `{l}`: expected softmax-cross-entropy or mse"
                )));
            }
        };
        fedge_proto::update::Codec::parse(&p.codec)
            .map_err(|e| ConfigError::Invalid(format!("plan.codec: {e}")))?;
        if !(p.learning_rate.is_finite() && p.learning_rate > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "plan.learning_rate must be positive, got {}",
                p.learning_rate
            )));
        }
        if p.batch_size == 0 {
            return Err(ConfigError::Invalid(
                "plan.batch_size must be at least 1".into(),
            ));
        }
        let lora = match &p.lora {
            None => None,
            Some(l) => {
                let spec = l.spec();
                spec.validate(u64::from(self.limits().string_bytes_max))
                    .map_err(|e| ConfigError::Invalid(format!("[plan.lora]: {e}")))?;
                Some(spec)
            }
        };
        Ok(TrainingPlan {
            local_steps: p.local_steps,
            local_epochs: p.local_epochs,
            batch_size: p.batch_size,
            learning_rate: p.learning_rate,
            optimizer,
            momentum: p.momentum,
            weight_decay: p.weight_decay,
            loss,
            fedprox_mu: p.fedprox_mu,
            codec: p.codec.clone(),
            error_feedback: p.error_feedback,
            freeze: p.freeze.clone(),
            lora,
        })
    }

    pub fn limits(&self) -> Limits {
        let l = &self.limits;
        Limits {
            frame_bytes_max: l.frame_bytes_max,
            chunk_bytes_max: l.chunk_bytes_max,
            transfer_chunks_max: l.transfer_chunks_max,
            model_bytes_max: l.model_bytes_max,
            update_dimension_max: l.update_dimension_max,
            ..Limits::default()
        }
    }

    /// Ways this configuration lets one participant (or one key that
    /// lies about its sample count) dominate a round. Empty for the
    /// defaults; `server_config` refuses a non-empty list unless
    /// `i_know_this_is_unsafe` is set.
    pub fn dominance_risks(&self) -> Vec<String> {
        let mut risks = Vec::new();
        let w = &self.weights;
        let dpr = self.rounds.devices_per_round.max(1) as f64;
        // cap_shares raises a cap below 1/n to 1/n.
        let cap = w.max_share.max(1.0 / dpr);
        if cap > 0.5 {
            risks.push(format!(
                "one participant may hold {:.0}% of a round's weight (weights.max_share = {}, \
                 devices_per_round = {}): keep it at or below 50%",
                cap * 100.0,
                w.max_share,
                self.rounds.devices_per_round
            ));
        }
        if self.rounds.min_devices < 2 {
            risks.push(
                "rounds.min_devices = 1 publishes a version from a single device's update".into(),
            );
        }
        // DP-FedAvg clips every update and gives each the same weight; so
        // does SecAgg+ (devices clip before masking; the secure sum has
        // no per-update weights).
        let dp = self.strategy.dp.is_some() || self.strategy.secagg.is_some();
        let no_norm_bound = self.strategy.clip.is_none() && self.update_norm_max.is_none() && !dp;
        if no_norm_bound && self.strategy.combine == CombineSpec::Mean {
            risks.push(
                "a plain mean with no norm bound (strategy.clip, update_norm_max) lets one scaled \
                 update replace the model"
                    .into(),
            );
        }
        // A root weighs its leaves by their partials' bounded claims
        // (`tree.leaves.device_weight_max`), not by samples.
        let root = self.tree.leaves.is_some();
        if w.max_share >= 1.0
            && !dp
            && !root
            && matches!(
                w.samples,
                Transform::Linear | Transform::Sqrt | Transform::Log
            )
        {
            risks.push(
                "sample counts are a device's claim: with no share cap (weights.max_share = 1) \
                 and an uncapped samples transform, one device claiming 10^12 samples owns \
                 the round"
                    .into(),
            );
        }
        if w.samples != Transform::Constant && self.plan.local_steps == 0 && !dp && !root {
            risks.push(format!(
                "weights.samples ({:?}) counts each device's claimed sample count, and with \
                 plan.local_steps = 0 the plan bounds no claim: devices that lie buy weight up \
                 to what the transform allows (four liars of 20, each counted at a 1000-sample \
                 cap against honest shards of about 400, took the model to 9% accuracy). Use \
                 weights.samples = {{ kind = \"constant\" }}, or a plan with local_steps \
                 (claims then count for at most local_steps x batch_size)",
                w.samples
            ));
        }
        risks
    }

    /// The server configuration this file describes, validated.
    pub fn server_config(&self) -> Result<ServerConfig, ConfigError> {
        let r = &self.rounds;
        let limits = self.limits();
        if (self.server.writer_queue_bytes_max as u64) < u64::from(limits.frame_bytes_max) {
            return Err(ConfigError::Invalid(format!(
                "server.writer_queue_bytes_max ({}) must hold at least one frame (limits.frame_bytes_max = {})",
                self.server.writer_queue_bytes_max, limits.frame_bytes_max
            )));
        }
        self.server
            .commit_limits()
            .validate()
            .map_err(ConfigError::Invalid)?;
        let lock_check = Duration::from_millis(self.server.lock_check_ms);
        crate::store::check_lock_interval(lock_check).map_err(ConfigError::Invalid)?;
        if limits.frame_bytes_max < limits.chunk_bytes_max + 1024 {
            return Err(ConfigError::Invalid(
                "limits.frame_bytes_max must exceed chunk_bytes_max by at least 1024".into(),
            ));
        }
        if self.federation.is_empty() || self.federation.len() > 128 {
            return Err(ConfigError::Invalid(format!(
                "federation must be a name of 1 to 128 bytes, got {} bytes",
                self.federation.len()
            )));
        }
        if r.selection_by_stake && self.stakes.is_none() {
            return Err(ConfigError::Invalid(
                "rounds.selection_by_stake needs a stake registry (stakes = \"FILE\")".into(),
            ));
        }
        let coordinator = CoordinatorConfig {
            devices_per_round: r.devices_per_round,
            over_selection: r.over_selection,
            min_devices: r.min_devices,
            rounds: r.rounds,
            round_deadline: Duration::from_millis(r.round_deadline_ms),
            selection_window: Duration::from_millis(r.selection_window_ms),
            selection_by_stake: r.selection_by_stake,
            slot_timeout: Duration::from_millis(r.slot_timeout_ms),
            rollback_on_divergence: r.rollback_on_divergence,
            federation: self.federation.clone(),
            federation_id: [0; 32],
            retry_window: (
                Duration::from_millis(r.retry_window_ms[0]),
                Duration::from_millis(r.retry_window_ms[1]),
            ),
            auth_timeout: Duration::from_millis(self.server.auth_timeout_ms),
            chunk_bytes: r.chunk_bytes,
            max_sessions: self.server.max_devices,
            max_unauthenticated: self.server.max_authenticating,
            handshakes_per_sec: self.server.handshakes_per_sec,
            task_requests_per_sec: self.server.task_requests_per_sec,
            final_downloads_max: self.server.final_downloads_max,
            versions_kept: 4,
            uploads_in_flight_bytes_max: self.server.uploads_in_flight_bytes_max,
            verify_in_flight_max: self.server.verify_in_flight_max,
            plan: self.plan()?,
            weights: self.weights.clone(),
            strategy: self.strategy.clone(),
            update_norm_max: self.update_norm_max,
            scoring: self.scoring.clone(),
            evaluation: self.evaluation.clone(),
            limits,
            seed: self.seed,
            tree: self.tree_role()?,
        };
        let mut coordinator = coordinator;
        if coordinator.tree.leaf {
            // A leaf runs its parent's rounds, until its parent is done.
            coordinator.rounds = 0;
        }
        coordinator.validate().map_err(ConfigError::Invalid)?;
        if !(self.server.rate_per_sec > 0.0 && self.server.rate_burst >= 1.0) {
            return Err(ConfigError::Invalid(
                "server.rate_per_sec must be positive and server.rate_burst at least 1".into(),
            ));
        }
        let risks = self.dominance_risks();
        if !risks.is_empty() && !self.i_know_this_is_unsafe {
            return Err(ConfigError::Invalid(format!(
                "refusing a configuration in which one participant can dominate a round:\n  - {}\n\
                 fix the settings above, or set i_know_this_is_unsafe = true \
                 (--i-know-this-is-unsafe) for a closed fleet you trust",
                risks.join("\n  - ")
            )));
        }
        // A root's participants are the leaves it names (tree.leaves.keys):
        // its stake registry and enrolment rules do not apply.
        let root = self.tree.leaves.is_some();
        if !root && self.weights.allow_unknown && self.weights.stake.apply(0.0) <= 0.0 {
            return Err(ConfigError::Invalid(format!(
                "weights.allow_unknown = true gives unknown devices stake 0, which weights.stake \
                 = {:?} turns into weight 0: use stake = {{ kind = \"constant\" }} for open \
                 enrolment",
                self.weights.stake
            )));
        }
        if !root && self.stakes.is_none() && !self.weights.allow_unknown {
            return Err(ConfigError::Invalid(
                "no stake registry: every device would be refused. Set stakes = \"FILE\" \
                 (lines `<hex public key> <stake>`; --stakes FILE), or weights.allow_unknown = true \
                 with weights.stake = { kind = \"constant\" } to let any key take part with equal \
                 stake (open enrolment: free keys are Sybils)"
                    .into(),
            ));
        }
        Ok(ServerConfig {
            listen: self.listen,
            coordinator,
            rate_per_sec: self.server.rate_per_sec,
            rate_burst: self.server.rate_burst,
            idle_timeout: Duration::from_millis(self.server.idle_timeout_ms),
            finish_grace: (!self.server.serve_forever)
                .then(|| Duration::from_millis(self.server.finish_grace_ms)),
            stakes: self.stakes.clone(),
            metrics_listen: self.server.metrics_listen,
            writer_queue_bytes_max: self.server.writer_queue_bytes_max,
            handshakes: crate::server::HandshakeLimits {
                in_flight_max: self.server.handshakes_in_flight_max,
                queue_wait: Duration::from_millis(self.server.handshake_queue_wait_ms),
                ..Default::default()
            },
            commit: self.server.commit_limits(),
            lock_check,
        })
    }
}

#[cfg(test)]
mod tests;
