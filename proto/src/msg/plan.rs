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
    })
}
