//! Strategies: how a round is configured and how its combined update
//! becomes the next model (Flower's strategy design).
//!
//! A [`Strategy`] configures a round's training plan, provides the
//! [`Combiner`] that folds the round's updates (mean, median, ...), and
//! turns the combined update into new parameters with a server optimizer:
//! FedAvg (step 1), FedAvgM (server momentum), FedAdam / FedYogi /
//! FedAdagrad (Reddi et al. 2021). FedProx is FedAvg whose plan carries the
//! proximal term. Cross-cutting steps are wrappers: [`NormClipped`] clips
//! every update before the inner combiner sees it.

use fedge_proto::msg::TrainingPlan;

use crate::robust::{CombineSpec, Combined, Combiner, StreamingMean, Values};

/// A failed participation, passed to strategies beside the results.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub device: String,
    pub reason: String,
}

pub trait Strategy: Send {
    fn name(&self) -> String;

    /// The plan for `round_id`, from the configured base plan.
    fn configure_round(&mut self, _round_id: u64, base: &TrainingPlan) -> TrainingPlan {
        base.clone()
    }

    /// A fresh combiner for a round of `dim`-parameter updates.
    fn combiner(&mut self, dim: usize, max_share: f64) -> Box<dyn Combiner>;

    /// New parameters from the current ones and the round's combined update.
    fn aggregate_round(
        &mut self,
        round_id: u64,
        params: &[f32],
        combined: &Combined,
        failures: &[Failure],
    ) -> Vec<f32>;

    /// Whether devices should evaluate in this round (fedge evaluates on the
    /// server by default; devices report training metrics with updates).
    fn configure_evaluate(&mut self, _round_id: u64) -> bool {
        false
    }

    /// Combine per-device metrics (weight, [(name, value)]) into the round's.
    fn aggregate_evaluate(&mut self, results: &[(f64, Vec<(String, f64)>)]) -> Vec<(String, f64)> {
        weighted_metrics(results)
    }

    /// State that must survive a restart (server optimizer moments, an
    /// adaptive clipping bound), checkpointed with each published version.
    fn checkpoint(&self, out: &mut Vec<u8>) {
        let _ = out;
    }

    /// Restores what [`Strategy::checkpoint`] wrote; returns the bytes it
    /// did not consume. Refuses state that does not fit.
    fn restore<'a>(&mut self, state: &'a [u8]) -> Result<&'a [u8], String> {
        Ok(state)
    }

    /// Figures about the strategy itself, reported with each closed
    /// round's metrics (the privacy spent, a clipping bound).
    fn report(&self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// The compressed step (an update payload) the last
    /// [`Strategy::aggregate_round`] published, when it compresses its
    /// steps (see [`crate::downlink`]); taken once.
    fn take_published_step(&mut self) -> Option<bytes::Bytes> {
        None
    }

    /// The model was rolled back to an earlier version: state that
    /// describes the discarded steps must go.
    fn on_rollback(&mut self) {}
}

/// Reads a little-endian u64 from the front of `b`.
fn take_u64<'a>(b: &'a [u8], what: &str) -> Result<(u64, &'a [u8]), String> {
    let (head, rest) = b
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("strategy state: {what} is cut short"))?;
    Ok((u64::from_le_bytes(*head), rest))
}

fn take_f64s<'a>(b: &'a [u8], n: usize, what: &str) -> Result<(Vec<f64>, &'a [u8]), String> {
    let bytes = n
        .checked_mul(8)
        .filter(|&l| l <= b.len())
        .ok_or_else(|| format!("strategy state: {what} is cut short"))?;
    let (head, rest) = b.split_at(bytes);
    let v = head
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((v, rest))
}

/// Weighted mean of each metric over the devices that reported it.
pub fn weighted_metrics(results: &[(f64, Vec<(String, f64)>)]) -> Vec<(String, f64)> {
    let mut acc: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for (w, metrics) in results {
        for (name, v) in metrics {
            let e = acc.entry(name.clone()).or_default();
            e.0 += w * v;
            e.1 += w;
        }
    }
    acc.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

/// The server optimizer applied to the combined update (a pseudo-gradient
/// pointing downhill).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ServerOpt {
    /// FedAvg: params + lr x delta (lr 1 is plain averaging).
    Avg { lr: f64 },
    /// FedAvgM: v = beta v + delta; params + lr x v.
    Momentum { lr: f64, beta: f64 },
    /// FedAdam: m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2; params + lr m / (sqrt v + tau).
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
    /// FedYogi: as Adam with v = v - (1-b2) d^2 sign(v - d^2).
    Yogi {
        lr: f64,
        beta1: f64,
        beta2: f64,
        tau: f64,
    },
    /// FedAdagrad: v = v + d^2; params + lr m / (sqrt v + tau), m as Adam.
    Adagrad { lr: f64, beta1: f64, tau: f64 },
}

impl ServerOpt {
    pub fn name(&self) -> &'static str {
        match self {
            ServerOpt::Avg { .. } => "fedavg",
            ServerOpt::Momentum { .. } => "fedavgm",
            ServerOpt::Adam { .. } => "fedadam",
            ServerOpt::Yogi { .. } => "fedyogi",
            ServerOpt::Adagrad { .. } => "fedadagrad",
        }
    }
}

/// FedAvg and the FedOpt family, with a configurable combiner and an
/// optional FedProx term in the plan.
pub struct FedOpt {
    pub opt: ServerOpt,
    pub combine: CombineSpec,
    pub fedprox_mu: f32,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl FedOpt {
    pub fn new(opt: ServerOpt, combine: CombineSpec, fedprox_mu: f32) -> Self {
        FedOpt {
            opt,
            combine,
            fedprox_mu,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    pub fn fedavg() -> Self {
        Self::new(ServerOpt::Avg { lr: 1.0 }, CombineSpec::Mean, 0.0)
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> String {
        let base = if self.fedprox_mu > 0.0 && matches!(self.opt, ServerOpt::Avg { .. }) {
            "fedprox"
        } else {
            self.opt.name()
        };
        match self.combine {
            CombineSpec::Mean => base.to_string(),
            ref c => format!("{base}+{c:?}"),
        }
    }

    fn configure_round(&mut self, _round_id: u64, base: &TrainingPlan) -> TrainingPlan {
        let mut p = base.clone();
        if self.fedprox_mu > 0.0 {
            p.fedprox_mu = self.fedprox_mu;
        }
        p
    }

    fn combiner(&mut self, dim: usize, max_share: f64) -> Box<dyn Combiner> {
        match self.combine {
            CombineSpec::Mean => Box::new(StreamingMean::with_share_cap(dim, max_share)),
            ref c => c.build(dim),
        }
    }

    /// The moments `m` and `v`: their length (0 before the first round),
    /// then both as f64 little-endian.
    fn checkpoint(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.m.len() as u64).to_le_bytes());
        for x in self.m.iter().chain(&self.v) {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }

    fn restore<'a>(&mut self, state: &'a [u8]) -> Result<&'a [u8], String> {
        let (n, rest) = take_u64(state, "the moment length")?;
        let n = usize::try_from(n).map_err(|_| "strategy state: moment length".to_string())?;
        let (m, rest) = take_f64s(rest, n, "the first moment")?;
        let (v, rest) = take_f64s(rest, n, "the second moment")?;
        if m.iter().chain(&v).any(|x| !x.is_finite()) {
            return Err("strategy state: a moment is not finite".into());
        }
        self.m = m;
        self.v = v;
        Ok(rest)
    }

    fn aggregate_round(
        &mut self,
        _round_id: u64,
        params: &[f32],
        combined: &Combined,
        _failures: &[Failure],
    ) -> Vec<f32> {
        let d = &combined.delta;
        assert_eq!(d.len(), params.len(), "delta dimension");
        // Plain averaging keeps no state (and so checkpoints none).
        if self.m.len() != d.len() && !matches!(self.opt, ServerOpt::Avg { .. }) {
            self.m = vec![0.0; d.len()];
            self.v = vec![0.0; d.len()];
        }
        let step: Vec<f64> = match self.opt {
            ServerOpt::Avg { lr } => d.iter().map(|&x| lr * f64::from(x)).collect(),
            ServerOpt::Momentum { lr, beta } => {
                for (m, &x) in self.m.iter_mut().zip(d) {
                    *m = beta * *m + f64::from(x);
                }
                self.m.iter().map(|m| lr * m).collect()
            }
            ServerOpt::Adam {
                lr,
                beta1,
                beta2,
                tau,
            }
            | ServerOpt::Yogi {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let yogi = matches!(self.opt, ServerOpt::Yogi { .. });
                for ((m, v), &x) in self.m.iter_mut().zip(self.v.iter_mut()).zip(d) {
                    let x = f64::from(x);
                    *m = beta1 * *m + (1.0 - beta1) * x;
                    *v = if yogi {
                        *v - (1.0 - beta2) * x * x * (*v - x * x).signum()
                    } else {
                        beta2 * *v + (1.0 - beta2) * x * x
                    };
                }
                self.m
                    .iter()
                    .zip(&self.v)
                    .map(|(m, v)| lr * m / (v.sqrt() + tau))
                    .collect()
            }
            ServerOpt::Adagrad { lr, beta1, tau } => {
                for ((m, v), &x) in self.m.iter_mut().zip(self.v.iter_mut()).zip(d) {
                    let x = f64::from(x);
                    *m = beta1 * *m + (1.0 - beta1) * x;
                    *v += x * x;
                }
                self.m
                    .iter()
                    .zip(&self.v)
                    .map(|(m, v)| lr * m / (v.sqrt() + tau))
                    .collect()
            }
        };
        params
            .iter()
            .zip(step)
            .map(|(&p, s)| (f64::from(p) + s) as f32)
            .collect()
    }
}

/// How [`NormClipped`] bounds update norms.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ClipSpec {
    /// Clip every update to this L2 norm.
    Fixed { bound: f64 },
    /// Clip to `multiplier` x the median norm of the previous round's
    /// updates (no clipping in the first round).
    AdaptiveMedian { multiplier: f64 },
}

/// Wrapper: clip each update's norm before the inner strategy's combiner.
pub struct NormClipped {
    pub inner: Box<dyn Strategy>,
    pub clip: ClipSpec,
    last_median: std::sync::Arc<std::sync::Mutex<Option<f64>>>,
}

impl NormClipped {
    pub fn new(inner: Box<dyn Strategy>, clip: ClipSpec) -> Self {
        NormClipped {
            inner,
            clip,
            last_median: Default::default(),
        }
    }
}

struct ClippingCombiner {
    inner: Box<dyn Combiner>,
    bound: Option<f64>,
    norms: Vec<f64>,
    median_out: std::sync::Arc<std::sync::Mutex<Option<f64>>>,
}

impl Combiner for ClippingCombiner {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn add(&mut self, update: Vec<f32>, weight: f64) {
        self.add_values(Values::F32(update), weight);
    }

    fn add_values(&mut self, mut update: Values, weight: f64) {
        self.norms.push(update.norm());
        if let Some(b) = self.bound {
            update.clip_to_norm(b);
        }
        self.inner.add_values(update, weight);
    }

    fn count(&self) -> usize {
        self.inner.count()
    }

    fn finish(&mut self, max_share: f64) -> Option<Combined> {
        self.note_median();
        self.inner.finish(max_share)
    }

    fn finish_f64(&mut self, max_share: f64) -> Option<Combined<f64>> {
        self.note_median();
        self.inner.finish_f64(max_share)
    }
}

impl ClippingCombiner {
    /// The round's median norm, for the next round's adaptive bound.
    fn note_median(&self) {
        if !self.norms.is_empty() {
            let mut n = self.norms.clone();
            n.sort_by(|a, b| a.total_cmp(b));
            *self.median_out.lock().expect("lock") = Some(n[n.len() / 2]);
        }
    }
}

impl Strategy for NormClipped {
    fn name(&self) -> String {
        format!("{}+clip", self.inner.name())
    }

    fn configure_round(&mut self, round_id: u64, base: &TrainingPlan) -> TrainingPlan {
        self.inner.configure_round(round_id, base)
    }

    fn combiner(&mut self, dim: usize, max_share: f64) -> Box<dyn Combiner> {
        let bound = match self.clip {
            ClipSpec::Fixed { bound } => Some(bound),
            ClipSpec::AdaptiveMedian { multiplier } => self
                .last_median
                .lock()
                .expect("lock")
                .map(|m| m * multiplier),
        };
        Box::new(ClippingCombiner {
            inner: self.inner.combiner(dim, max_share),
            bound,
            norms: Vec::new(),
            median_out: std::sync::Arc::clone(&self.last_median),
        })
    }

    fn aggregate_round(
        &mut self,
        round_id: u64,
        params: &[f32],
        combined: &Combined,
        failures: &[Failure],
    ) -> Vec<f32> {
        self.inner
            .aggregate_round(round_id, params, combined, failures)
    }

    fn aggregate_evaluate(&mut self, results: &[(f64, Vec<(String, f64)>)]) -> Vec<(String, f64)> {
        self.inner.aggregate_evaluate(results)
    }

    /// The last round's median norm (NaN: none yet), then the inner
    /// strategy's state.
    fn checkpoint(&self, out: &mut Vec<u8>) {
        let median = self.last_median.lock().expect("lock").unwrap_or(f64::NAN);
        out.extend_from_slice(&median.to_le_bytes());
        self.inner.checkpoint(out);
    }

    fn restore<'a>(&mut self, state: &'a [u8]) -> Result<&'a [u8], String> {
        let (m, rest) = take_f64s(state, 1, "the clipping median")?;
        let median = match m[0] {
            x if x.is_nan() => None,
            x if x >= 0.0 && x.is_finite() => Some(x),
            x => return Err(format!("strategy state: clipping median {x}")),
        };
        let rest = self.inner.restore(rest)?;
        *self.last_median.lock().expect("lock") = median;
        Ok(rest)
    }
}

/// `[strategy] downlink = "none"`: models are published exactly, as with
/// no `downlink` at all (a config file's way to turn off a default).
pub const DOWNLINK_NONE: &str = "none";

/// Seed of the downlink codec's randomness (stochastic quantizers), mixed
/// with the round: the same on every restart, so a replayed round
/// publishes the same model.
const DOWNLINK_SEED: u64 = 0x646f_776e_6c69_6e6b;

/// A strategy as written in the configuration file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    pub server_opt: ServerOpt,
    pub combine: CombineSpec,
    /// FedProx proximal term sent in the plan (0: off).
    pub fedprox_mu: f32,
    pub clip: Option<ClipSpec>,
    /// FedBuff: asynchronous buffered aggregation (None: synchronous rounds).
    pub buffered: Option<BufferedSpec>,
    /// Central user-level differential privacy (DP-FedAvg; None: off).
    pub dp: Option<crate::privacy::DpSpec>,
    /// Secure aggregation (SecAgg+; None: off).
    pub secagg: Option<crate::privacy::secagg::SecAggSpec>,
    /// Compress each published step with this update codec (e.g.
    /// `topk:0.1`), with server-side error feedback, so the downlink delta
    /// devices fetch shrinks (see [`crate::downlink`]). None (or
    /// [`DOWNLINK_NONE`]): models are published exactly.
    pub downlink: Option<String>,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            server_opt: ServerOpt::Avg { lr: 1.0 },
            combine: CombineSpec::Mean,
            fedprox_mu: 0.0,
            clip: None,
            buffered: None,
            dp: None,
            secagg: None,
            downlink: None,
        }
    }
}

/// FedBuff (Nguyen et al. 2022), applied by the coordinator: it decides
/// which uploads are accepted and with what weight, and the configured
/// strategy turns each full buffer into a version. Devices train whenever they ask, against
/// whatever model is current; the aggregator buffers accepted updates and
/// publishes a new version every `devices_per_round` of them. An update
/// trained on a version `tau` publications old is accepted while
/// `tau <= max_staleness`, its weight multiplied by [`Self::discount`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferedSpec {
    /// Oldest accepted update, in publications behind the current version.
    pub max_staleness: u64,
    /// Staleness discount exponent `a` in `(1 + tau)^-a` (0.5: FedBuff's
    /// `1 / sqrt(1 + tau)`; 0: no discount).
    pub staleness_exponent: f64,
    /// Devices training at once (None: ceil(devices_per_round x over_selection)).
    pub concurrency: Option<usize>,
}

impl Default for BufferedSpec {
    fn default() -> Self {
        BufferedSpec {
            max_staleness: 3,
            staleness_exponent: 0.5,
            concurrency: None,
        }
    }
}

impl BufferedSpec {
    /// The weight multiplier for an update `tau` versions stale.
    pub fn discount(&self, tau: u64) -> f64 {
        (1.0 + tau as f64).powf(-self.staleness_exponent)
    }

    pub fn validate(&self) -> Result<(), String> {
        // At most 16: a discount of a few rounds' staleness stays far
        // above zero (and in every ledger record's range).
        if !(0.0..=16.0).contains(&self.staleness_exponent) {
            return Err(format!(
                "staleness_exponent must be in [0, 16], got {}",
                self.staleness_exponent
            ));
        }
        if self.concurrency == Some(0) {
            return Err("concurrency must be at least 1".into());
        }
        Ok(())
    }
}

impl StrategyConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.combine.validate()?;
        if let Some(b) = &self.buffered {
            b.validate()?;
        }
        self.downlink_spec()?;
        if !(self.fedprox_mu >= 0.0 && self.fedprox_mu.is_finite()) {
            return Err(format!("fedprox_mu must be >= 0, got {}", self.fedprox_mu));
        }
        match self.clip {
            Some(ClipSpec::Fixed { bound }) if bound.is_nan() || bound <= 0.0 => {
                Err("clip bound must be > 0".into())
            }
            Some(ClipSpec::AdaptiveMedian { multiplier })
                if multiplier.is_nan() || multiplier <= 0.0 =>
            {
                Err("clip multiplier must be > 0".into())
            }
            _ => Ok(()),
        }
    }

    /// DP-FedAvg sums clipped updates with equal weight and adds noise:
    /// it needs every update in the clear and treated alike, so it refuses
    /// what would change either. `expected`: participants per round.
    pub fn validate_dp(&self, expected: usize) -> Result<(), String> {
        let Some(dp) = &self.dp else {
            return Ok(());
        };
        if self.combine != CombineSpec::Mean {
            return Err(format!(
                "strategy.dp needs combine = mean: DP-FedAvg adds noise calibrated to the sum of \
                 clipped updates, and a robust combiner ({:?}) has another sensitivity",
                self.combine
            ));
        }
        if self.clip.is_some() {
            return Err(
                "strategy.dp clips every update itself (dp.clip): remove strategy.clip".into(),
            );
        }
        if self.buffered.is_some() {
            return Err(
                "strategy.dp accounts synchronous rounds; FedBuff (strategy.buffered) is not \
                 supported with it"
                    .into(),
            );
        }
        dp.validate(expected)
    }

    /// SecAgg+ hands the aggregator only the sum of the round's updates:
    /// refuse everything that needs one update in the clear. `devices`:
    /// selected per round; `scoring`: per-update contribution scoring is
    /// on; `norm_bound`: the aggregator bounds each update's norm; `codec`:
    /// the plan's update codec.
    pub fn validate_secagg(
        &self,
        devices: u32,
        scoring: bool,
        norm_bound: bool,
        codec: &str,
    ) -> Result<(), String> {
        let Some(spec) = &self.secagg else {
            return Ok(());
        };
        let refuse = |what: &str, why: &str| {
            Err(format!(
                "strategy.secagg cannot be combined with {what}: {why} (the aggregator sees only the sum of masked updates)"
            ))
        };
        if self.combine != CombineSpec::Mean {
            return refuse(
                &format!("combine = {:?}", self.combine),
                "a robust combiner compares individual updates",
            );
        }
        if scoring {
            return refuse(
                "scoring.validation",
                "contribution scoring evaluates each update on its own",
            );
        }
        if norm_bound {
            return refuse(
                "update_norm_max",
                "devices clip to strategy.secagg.clip before masking instead",
            );
        }
        if self.clip.is_some() {
            return refuse(
                "strategy.clip",
                "devices clip to strategy.secagg.clip before masking instead",
            );
        }
        if self.buffered.is_some() {
            return refuse(
                "strategy.buffered (FedBuff)",
                "staleness weights apply to individual updates",
            );
        }
        if self.dp.is_some() {
            return refuse(
                "strategy.dp (central DP)",
                "DP-FedAvg clips and counts individual updates",
            );
        }
        if codec != "dense-f32" {
            return refuse(
                &format!("codec \"{codec}\""),
                "the aggregator would have to decode each update; SecAgg+ quantizes into Z_2^bits itself (use dense-f32)",
            );
        }
        spec.validate(devices)
    }

    /// The strategy this configuration describes; `expected` participants
    /// per round (DP's fixed denominator and sampling rate).
    pub fn build(&self, expected: usize) -> Box<dyn Strategy> {
        let base = Box::new(FedOpt::new(
            self.server_opt.clone(),
            self.combine.clone(),
            self.fedprox_mu,
        ));
        let s: Box<dyn Strategy> = if let Some(dp) = &self.dp {
            Box::new(crate::privacy::DpFedAvg::new(base, dp.clone(), expected))
        } else {
            match &self.clip {
                Some(c) => Box::new(NormClipped::new(base, c.clone())),
                None => base,
            }
        };
        match self.downlink_spec() {
            Ok(Some(spec)) => Box::new(crate::downlink::Downlink::new(s, spec, DOWNLINK_SEED)),
            _ => s,
        }
    }

    /// The downlink codec, parsed (`validate` refuses a bad one first);
    /// `"none"` is the same as no codec (models published exactly).
    pub fn downlink_spec(&self) -> Result<Option<fedge_proto::codec::CodecSpec>, String> {
        self.downlink
            .as_deref()
            .filter(|s| *s != DOWNLINK_NONE)
            .map(|s| {
                fedge_proto::codec::CodecSpec::parse(s)
                    .map_err(|e| format!("strategy.downlink `{s}`: {e}"))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests;
