//! The training plan a task carries, and its validating wire conversion.

use crate::{Limits, ProtoError, wire};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Optimizer {
    #[default]
    Sgd,
    Adam,
    AdamW,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Loss {
    #[default]
    SoftmaxCrossEntropy,
    Mse,
}

/// How to train this round. Part of the task offer, so the aggregator
/// decides it per round.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPlan {
    pub local_steps: u32,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub optimizer: Optimizer,
    pub momentum: f32,
    pub weight_decay: f32,
    pub loss: Loss,
    pub fedprox_mu: f32,
    pub codec: String,
    pub error_feedback: bool,
    pub freeze: Vec<String>,
    /// LoRA adapters the round trains (None: the model's parameters as
    /// they are). The model itself carries the adapters as its parameters;
    /// this tells every device which ones, so that it can check.
    pub lora: Option<LoraSpec>,
}

/// Most LoRA rank a plan may ask for.
pub const LORA_RANK_MAX: u32 = 1024;
/// Most target patterns in a [`LoraSpec`].
pub const LORA_TARGETS_MAX: usize = 64;

/// Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
/// Language Models") on the MatMul/Gemm weights whose names match
/// `targets` (`*` wildcards): each such weight `W` stays frozen and the
/// layer adds `(alpha / rank) x A B` to it, with `A` (`in x rank`) and
/// `B` (`rank x out`) trained.
///
/// Written `rank=8,alpha=16,targets=PATTERN[,targets=PATTERN...]` on
/// command lines (`alpha` defaults to the rank: scale 1).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: u32,
    pub alpha: f32,
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// What the adapters' product is multiplied by: `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Rank in `1..=LORA_RANK_MAX`, a finite positive alpha, 1 to
    /// `LORA_TARGETS_MAX` non-empty patterns without commas, of at most
    /// `str_max` bytes.
    pub fn validate(&self, str_max: u64) -> Result<(), ProtoError> {
        if !(1..=LORA_RANK_MAX).contains(&self.rank) {
            return Err(ProtoError::Invalid {
                field: "plan.lora.rank",
                reason: format!("{} is outside 1..={LORA_RANK_MAX}", self.rank),
            });
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(ProtoError::Invalid {
                field: "plan.lora.alpha",
                reason: format!("{} is not a finite positive number", self.alpha),
            });
        }
        if self.targets.is_empty() {
            return Err(ProtoError::Invalid {
                field: "plan.lora.targets",
                reason: "no target pattern: name the weights to adapt (`*` matches all)".into(),
            });
        }
        Limits::check(
            "lora target count",
            self.targets.len() as u64,
            LORA_TARGETS_MAX as u64,
        )?;
        for t in &self.targets {
            Limits::check("lora target length", t.len() as u64, str_max)?;
            // Commas separate the written form's keys (and the spec is
            // written into the model's metadata that way).
            if t.is_empty() || t.contains(',') {
                return Err(ProtoError::Invalid {
                    field: "plan.lora.targets",
                    reason: format!("`{t}`: a pattern is non-empty and has no comma"),
                });
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for LoraSpec {
    type Err = ProtoError;

    /// `rank=8,alpha=16,targets=fc*,targets=proj*`, checked as
    /// [`LoraSpec::validate`] with the default string bound.
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let bad = |reason: String| ProtoError::Invalid {
            field: "lora",
            reason,
        };
        let (mut rank, mut alpha, mut targets) = (None, None, Vec::new());
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}`: expected key=value")))?;
            match k.trim() {
                "rank" | "r" => {
                    rank = Some(
                        v.trim()
                            .parse::<u32>()
                            .map_err(|_| bad(format!("rank `{v}` is not a whole number")))?,
                    )
                }
                "alpha" => {
                    alpha = Some(
                        v.trim()
                            .parse::<f32>()
                            .map_err(|_| bad(format!("alpha `{v}` is not a number")))?,
                    )
                }
                "targets" | "target" => targets.push(v.trim().to_string()),
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}` (expected rank, alpha, targets)"
                    )));
                }
            }
        }
        let rank = rank.ok_or_else(|| bad("rank=R is missing".into()))?;
        let spec = LoraSpec {
            rank,
            alpha: alpha.unwrap_or(rank as f32),
            targets,
        };
        spec.validate(u64::from(Limits::default().string_bytes_max))?;
        Ok(spec)
    }
}

impl std::fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank={},alpha={}", self.rank, self.alpha)?;
        for t in &self.targets {
            write!(f, ",targets={t}")?;
        }
        Ok(())
    }
}

impl Default for TrainingPlan {
    fn default() -> Self {
        TrainingPlan {
            local_steps: 0,
            local_epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            optimizer: Optimizer::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            loss: Loss::SoftmaxCrossEntropy,
            fedprox_mu: 0.0,
            codec: "dense-f32".into(),
            error_feedback: false,
            freeze: Vec::new(),
            lora: None,
        }
    }
}

pub(super) fn plan_to_wire(p: &TrainingPlan) -> wire::TrainingPlan {
    wire::TrainingPlan {
        local_steps: p.local_steps,
        local_epochs: p.local_epochs,
        batch_size: p.batch_size,
        learning_rate: p.learning_rate,
        optimizer: match p.optimizer {
            Optimizer::Sgd => wire::Optimizer::Sgd,
            Optimizer::Adam => wire::Optimizer::Adam,
            Optimizer::AdamW => wire::Optimizer::Adamw,
        } as i32,
        momentum: p.momentum,
        weight_decay: p.weight_decay,
        loss: match p.loss {
            Loss::SoftmaxCrossEntropy => wire::Loss::SoftmaxCrossEntropy,
            Loss::Mse => wire::Loss::Mse,
        } as i32,
        fedprox_mu: p.fedprox_mu,
        compression: Some(wire::CompressionSpec {
            codec: p.codec.clone(),
            error_feedback: p.error_feedback,
        }),
        freeze: p.freeze.clone(),
        lora: p.lora.as_ref().map(|l| wire::LoraSpec {
            rank: l.rank,
            alpha: l.alpha,
            targets: l.targets.clone(),
        }),
    }
}

pub(super) fn plan_from_wire(
    p: wire::TrainingPlan,
    limits: &Limits,
) -> Result<TrainingPlan, ProtoError> {
    let optimizer = match wire::Optimizer::try_from(p.optimizer) {
        Ok(wire::Optimizer::Sgd) => Optimizer::Sgd,
        Ok(wire::Optimizer::Adam) => Optimizer::Adam,
        Ok(wire::Optimizer::Adamw) => Optimizer::AdamW,
        _ => {
            return Err(ProtoError::UnknownEnum {
                field: "plan.optimizer",
                value: p.optimizer,
            });
        }
    };
    let loss = match wire::Loss::try_from(p.loss) {
        Ok(wire::Loss::SoftmaxCrossEntropy) => Loss::SoftmaxCrossEntropy,
        Ok(wire::Loss::Mse) => Loss::Mse,
        _ => {
            return Err(ProtoError::UnknownEnum {
                field: "plan.loss",
                value: p.loss,
            });
        }
    };
    for (field, v) in [
        ("plan.learning_rate", p.learning_rate),
        ("plan.momentum", p.momentum),
        ("plan.weight_decay", p.weight_decay),
        ("plan.fedprox_mu", p.fedprox_mu),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(ProtoError::Invalid {
                field,
                reason: format!("{v} is not a finite non-negative number"),
            });
        }
    }
    if p.batch_size == 0 {
        return Err(ProtoError::Invalid {
            field: "plan.batch_size",
            reason: "zero".into(),
        });
    }
    let c = p.compression.unwrap_or_default();
    let str_max = u64::from(limits.string_bytes_max);
    Limits::check("codec length", c.codec.len() as u64, str_max)?;
    Limits::check("freeze pattern count", p.freeze.len() as u64, 256)?;
    for f in &p.freeze {
        Limits::check("freeze pattern length", f.len() as u64, str_max)?;
    }
    let lora = match p.lora {
        None => None,
        Some(l) => {
            let spec = LoraSpec {
                rank: l.rank,
                alpha: l.alpha,
                targets: l.targets,
            };
            spec.validate(str_max)?;
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
        codec: c.codec,
        error_feedback: c.error_feedback,
        freeze: p.freeze,
        lora,
    })
}
