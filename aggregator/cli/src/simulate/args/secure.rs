//! `simulate --secagg*`: SecAgg+ rounds, their injected dropouts and
//! distributed DP, as the simulation's configuration says them.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{SimArgs, SimConfig};

/// Fractions of the devices that stop answering in SecAgg+ rounds after
/// sending a stage's message: their keys (they never share), their shares
/// (they never send a masked input) or their masked input (they never help
/// unmask). Dealt by device index, first `keys`, then `shares`, then
/// `input`, so the same devices drop in every round they are drawn for.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggDropout {
    pub keys: f64,
    pub shares: f64,
    pub input: f64,
}

impl SecAggDropout {
    /// `keys:0.3,input:0.1`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut d = SecAggDropout::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (stage, f) = part.split_once(':').with_context(|| {
                format!("--secagg-dropout `{part}`: STAGE:FRACTION, STAGE keys, shares or input")
            })?;
            let f: f64 = f
                .parse()
                .with_context(|| format!("--secagg-dropout `{part}`: a fraction"))?;
            match stage {
                "keys" => d.keys = f,
                "shares" => d.shares = f,
                "input" => d.input = f,
                o => anyhow::bail!("--secagg-dropout stage `{o}`: use keys, shares or input"),
            }
        }
        d.validate()?;
        Ok(d)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let all = [self.keys, self.shares, self.input];
        anyhow::ensure!(
            all.iter().all(|f| (0.0..1.0).contains(f)) && all.iter().sum::<f64>() < 1.0,
            "SecAgg+ dropout fractions must be in [0, 1) and sum below 1, got {self:?}"
        );
        Ok(())
    }

    /// The stage after which device `i` of `n` goes silent, if any.
    pub fn stage_of(&self, i: usize, n: usize) -> Option<fedge_proto::secagg::Stage> {
        use fedge_proto::secagg::Stage;
        let cut = |f: f64| (f * n as f64).round() as usize;
        let (k, s, m) = (cut(self.keys), cut(self.shares), cut(self.input));
        if i < k {
            Some(Stage::AdvertiseKeys)
        } else if i < k + s {
            Some(Stage::ShareKeys)
        } else if i < k + s + m {
            Some(Stage::MaskedInput)
        } else {
            None
        }
    }
}

impl SimConfig {
    /// `--secagg*`: SecAgg+ for every round, with what it cannot be
    /// combined with turned off (the same checks `serve` makes follow).
    pub(super) fn apply_secagg(&mut self, a: &SimArgs) -> anyhow::Result<()> {
        if let Some(d) = &a.secagg_dropout {
            self.secagg_dropout = SecAggDropout::parse(d)?;
        }
        if !a.secagg {
            return Ok(());
        }
        let n = self.devices_per_round.max(2) as u32;
        let spec = self.strategy.secagg.clone().unwrap_or_else(|| {
            let d = fedge_aggregator::privacy::secagg::SecAggSpec::default();
            let k = d.degree.min(n - 1);
            let colluding = (n / 10).max(1);
            fedge_aggregator::privacy::secagg::SecAggSpec {
                degree: k,
                colluding_devices: colluding,
                threshold: (colluding + 1).max(k.div_ceil(3)).min(k),
                // Distributed DP splits the noise over survivors_min
                // devices: the closer it is to who survives, the less a
                // round is over-noised (70% of a round's devices).
                survivors_min: if a.secagg_dp_noise.is_some() {
                    (colluding + 2).max(n * 7 / 10)
                } else {
                    colluding + 2
                },
                advertise_keys_ms: 3_000,
                share_keys_ms: 3_000,
                masked_input_ms: self.round_deadline_ms,
                unmasking_ms: 3_000,
                ..d
            }
        });
        let dp = match a.secagg_dp_noise {
            Some(z) => Some(fedge_aggregator::privacy::secagg::SecAggDp {
                noise_multiplier: z,
                delta: 1e-5,
            }),
            None => spec.dp.clone(),
        };
        let spec = fedge_aggregator::privacy::secagg::SecAggSpec {
            clip: a.secagg_clip.unwrap_or(spec.clip),
            dp,
            ..spec
        };
        spec.validate(n).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.strategy.secagg = Some(spec);
        self.strategy.combine = fedge_aggregator::robust::CombineSpec::Mean;
        self.strategy.clip = None;
        self.update_norm_max = None;
        self.codec = "dense-f32".into();
        self.error_feedback = false;
        Ok(())
    }
}
