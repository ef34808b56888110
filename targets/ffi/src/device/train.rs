//! Local training on the host's samples: checking them and the options,
//! and running the compiled training step.

use fedge_engine::data::{Dataset, Features};
use fedge_engine::train::exec::{Executor, TractExecutor};
use fedge_engine::train::{TrainError, local};
use fedge_engine::trainer::compile_options;
use fedge_proto::msg::{Optimizer, TrainingPlan};

use super::model::check_tokens;
use super::{InputKind, Loaded, Samples, TrainOptions, TrainReport};
use crate::{FedgeError, SAMPLES_MAX, TRAIN_BATCH_MAX, TRAIN_EPOCHS_MAX, TRAIN_STEPS_MAX};

/// Build a data set of `samples` shaped as `sample_shape` for a model
/// whose input is `kind`, checking every length, bound, token and label.
pub(super) fn dataset(
    samples: Samples,
    sample_shape: Vec<usize>,
    classes: usize,
    kind: InputKind,
) -> Result<Dataset, FedgeError> {
    let n = samples.labels.len();
    if n == 0 {
        return Err(FedgeError::bad_input("no samples given"));
    }
    if n > SAMPLES_MAX as usize {
        return Err(FedgeError::bad_input(format!(
            "{n} samples given, at most {SAMPLES_MAX} per call"
        )));
    }
    let per_sample: usize = sample_shape.iter().product();
    let (given, other, field, other_field) = match kind {
        InputKind::F32 => (
            samples.inputs.len(),
            samples.tokens.len(),
            "inputs",
            "tokens",
        ),
        InputKind::Tokens { .. } => (
            samples.tokens.len(),
            samples.inputs.len(),
            "tokens",
            "inputs",
        ),
    };
    if other != 0 {
        return Err(FedgeError::bad_input(format!(
            "this model takes {} inputs in `{field}`; `{other_field}` must be empty",
            kind.name()
        )));
    }
    if given != n * per_sample {
        return Err(FedgeError::bad_input(format!(
            "{given} {field} values for {n} labels; the model takes {per_sample} values per sample ({sample_shape:?})"
        )));
    }
    if let Some((i, l)) = samples
        .labels
        .iter()
        .enumerate()
        .find(|(_, l)| !(0..classes as i64).contains(l))
    {
        return Err(FedgeError::bad_input(format!(
            "label {l} (sample {i}) is not a class index in 0..{classes}"
        )));
    }
    if let Some(i) = samples.inputs.iter().position(|v| !v.is_finite()) {
        return Err(FedgeError::bad_input(format!(
            "input value {i} is not finite"
        )));
    }
    let features = match kind {
        InputKind::F32 => Features::F32(samples.inputs),
        InputKind::Tokens { limit } => {
            check_tokens(&samples.tokens, limit)?;
            Features::I64(samples.tokens)
        }
    };
    Ok(Dataset {
        features,
        sample_shape,
        labels: samples.labels,
        classes,
    })
}

fn training_plan(o: &TrainOptions) -> Result<TrainingPlan, FedgeError> {
    let optimizer = match o.optimizer.as_str() {
        "sgd" => Optimizer::Sgd,
        "adam" => Optimizer::Adam,
        "adamw" => Optimizer::AdamW,
        other => {
            return Err(FedgeError::bad_input(format!(
                "optimizer `{other}`: expected sgd, adam or adamw"
            )));
        }
    };
    if !(1..=TRAIN_BATCH_MAX).contains(&o.batch_size) {
        return Err(FedgeError::bad_input(format!(
            "batch size {} is not in 1..={TRAIN_BATCH_MAX}",
            o.batch_size
        )));
    }
    if o.steps == 0 && o.epochs == 0 {
        return Err(FedgeError::bad_input(
            "nothing to do: steps and epochs are both 0",
        ));
    }
    if o.steps > TRAIN_STEPS_MAX || o.epochs > TRAIN_EPOCHS_MAX {
        return Err(FedgeError::bad_input(format!(
            "at most {TRAIN_STEPS_MAX} steps or {TRAIN_EPOCHS_MAX} epochs per call"
        )));
    }
    for (name, v) in [
        ("learning rate", o.learning_rate),
        ("momentum", o.momentum),
        ("weight decay", o.weight_decay),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(FedgeError::bad_input(format!(
                "{name} {v} must be finite and not negative"
            )));
        }
    }
    Ok(TrainingPlan {
        local_steps: o.steps,
        local_epochs: o.epochs,
        batch_size: o.batch_size,
        learning_rate: o.learning_rate,
        optimizer,
        momentum: o.momentum,
        weight_decay: o.weight_decay,
        ..TrainingPlan::default()
    })
}

impl Loaded {
    pub(super) fn train(
        &mut self,
        samples: Samples,
        o: &TrainOptions,
    ) -> Result<TrainReport, FedgeError> {
        let plan = training_plan(o)?;
        let data = dataset(
            samples,
            self.graph.sample_shape(),
            self.info.outputs_per_sample as usize,
            self.kind,
        )?;
        let opts = compile_options(&plan);
        let key = format!("{opts:?}");
        if self.executor.as_ref().map(|(k, _)| k) != Some(&key) {
            self.executor = Some((key, TractExecutor::new(&self.graph, opts)?));
        }
        let (_, ex) = self.executor.as_mut().expect("just compiled");
        ex.load(&self.params)?;
        let training = |e: TrainError| FedgeError::Training {
            detail: e.to_string(),
        };
        let stats = local::train(ex, &data, &plan, o.seed, |_, _, _| {}).map_err(training)?;
        let params = ex.params().map_err(training)?;
        if let Some(i) = params.iter().position(|v| !v.is_finite()) {
            return Err(FedgeError::Training {
                detail: format!("parameter {i} became non-finite; lower the learning rate"),
            });
        }
        self.params = params;
        self.samples_since_load += stats.samples;
        self.last_mean_loss = Some(stats.mean_loss);
        Ok(TrainReport {
            steps: stats.steps,
            samples: stats.samples,
            mean_loss: stats.mean_loss,
            last_loss: stats.last_loss,
            samples_since_load: self.samples_since_load,
        })
    }
}
