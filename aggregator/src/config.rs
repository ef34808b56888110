//! The aggregator's configuration file (TOML). Every field has a default;
//! unknown fields are an error, so a typo is caught rather than ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedge_proto::Limits;
use fedge_proto::msg::{Loss, Optimizer, TrainingPlan};
use serde::{Deserialize, Serialize};

use crate::coordinator::CoordinatorConfig;
use crate::server::ServerConfig;
use crate::strategy::StrategyConfig;
use crate::weighting::WeightPolicy;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where keys, models and the resume point live.
    pub state_dir: PathBuf,
    /// Initial model (a `.fedge` blob); ignored when the state directory
    /// already holds a published model.
    pub model: Option<PathBuf>,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsConfig {
    pub rounds: u64,
    pub devices_per_round: usize,
    pub over_selection: f64,
    pub min_devices: usize,
    pub round_deadline_ms: u64,
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
    pub max_devices: usize,
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
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            listen: "127.0.0.1:4433".parse().expect("addr"),
            state_dir: PathBuf::from("fedge-aggregator-state"),
            model: None,
            seed: 0,
            rounds: RoundsConfig::default(),
            plan: PlanConfig::default(),
            limits: LimitsConfig::default(),
            server: ServerLimits::default(),
            strategy: StrategyConfig::default(),
            weights: WeightPolicy::default(),
            stakes: None,
            update_norm_max: None,
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
            min_devices: c.min_devices,
            round_deadline_ms: c.round_deadline.as_millis() as u64,
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

impl Default for ServerLimits {
    fn default() -> Self {
        let s = ServerConfig::default();
        ServerLimits {
            max_devices: CoordinatorConfig::default().max_sessions,
            rate_per_sec: s.rate_per_sec,
            rate_burst: s.rate_burst,
            idle_timeout_ms: s.idle_timeout.as_millis() as u64,
            auth_timeout_ms: CoordinatorConfig::default().auth_timeout.as_millis() as u64,
            finish_grace_ms: 10_000,
            serve_forever: false,
            metrics_listen: None,
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

    /// The server configuration this file describes, validated.
    pub fn server_config(&self) -> Result<ServerConfig, ConfigError> {
        let r = &self.rounds;
        let limits = self.limits();
        if limits.frame_bytes_max < limits.chunk_bytes_max + 1024 {
            return Err(ConfigError::Invalid(
                "limits.frame_bytes_max must exceed chunk_bytes_max by at least 1024".into(),
            ));
        }
        let coordinator = CoordinatorConfig {
            devices_per_round: r.devices_per_round,
            over_selection: r.over_selection,
            min_devices: r.min_devices,
            rounds: r.rounds,
            round_deadline: Duration::from_millis(r.round_deadline_ms),
            retry_window: (
                Duration::from_millis(r.retry_window_ms[0]),
                Duration::from_millis(r.retry_window_ms[1]),
            ),
            auth_timeout: Duration::from_millis(self.server.auth_timeout_ms),
            chunk_bytes: r.chunk_bytes,
            max_sessions: self.server.max_devices,
            versions_kept: 4,
            plan: self.plan()?,
            weights: self.weights.clone(),
            strategy: self.strategy.clone(),
            update_norm_max: self.update_norm_max,
            limits,
            seed: self.seed,
        };
        coordinator.validate().map_err(ConfigError::Invalid)?;
        if !(self.server.rate_per_sec > 0.0 && self.server.rate_burst >= 1.0) {
            return Err(ConfigError::Invalid(
                "server.rate_per_sec must be positive and server.rate_burst at least 1".into(),
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = AggregatorConfig::default();
        c.server_config().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: AggregatorConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let typo = toml::from_str::<AggregatorConfig>("[rounds]\nround = 3\n");
        assert!(
            typo.unwrap_err()
                .to_string()
                .contains("unknown field `round`")
        );
        let mut c = AggregatorConfig::default();
        c.rounds.min_devices = 50;
        let e = c.server_config().unwrap_err().to_string();
        assert!(e.contains("min_devices"), "{e}");
        let mut c = AggregatorConfig::default();
        c.plan.optimizer = "lion".into();
        assert!(c.server_config().unwrap_err().to_string().contains("lion"));
        let mut c = AggregatorConfig::default();
        c.plan.codec = "zip".into();
        assert!(c.server_config().unwrap_err().to_string().contains("zip"));
    }
}
