//! What scoring and rewards made of a simulation: per participation
//! (honest or adversarial), the share scored at or below zero, the share
//! paid nothing, the honest share of all rewards paid, the flags, and
//! scoring's cost against training. Written into results.json as
//! `rewards` and printed as one line.

use std::collections::{BTreeMap, HashSet};

use fedge_aggregator::coordinator::Settlement;
use serde::Serialize;

/// Participations of one kind of device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Side {
    pub participations: u64,
    /// Scored at or below zero, or flagged (a flagged update's score
    /// counts as at most 0).
    pub score_at_or_below_zero: u64,
    /// Paid no reward.
    pub unrewarded: u64,
    pub flagged_copy: u64,
    pub flagged_free_rider: u64,
    pub flagged_noise: u64,
    pub unscored: u64,
    pub reward: u64,
}

impl Side {
    fn fraction(n: u64, of: u64) -> f64 {
        if of == 0 { 0.0 } else { n as f64 / of as f64 }
    }
}

/// One device's totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceTotal {
    pub adversarial: bool,
    pub participations: u64,
    pub reward: u64,
    pub mean_score: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RewardSummary {
    pub rounds_settled: usize,
    pub honest: Side,
    pub adversarial: Side,
    /// Fractions of each side's participations.
    pub honest_score_at_or_below_zero: f64,
    pub honest_unrewarded: f64,
    pub adversarial_score_at_or_below_zero: f64,
    pub adversarial_unrewarded: f64,
    /// Honest devices' share of every reward paid.
    pub honest_reward_share: f64,
    pub reward_paid: u64,
    pub reward_pool_total: u64,
    /// Scoring forward passes over the rounds' training compute (3 forward
    /// passes per example trained), mean and largest over rounds.
    pub scoring_cost_fraction_mean: f64,
    pub scoring_cost_fraction_max: f64,
    pub devices: BTreeMap<String, DeviceTotal>,
    /// Every participation: round, device (first 12 hex digits), whether it
    /// attacked, score, flags, reward.
    pub participations: Vec<Participation>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Participation {
    pub round: u64,
    pub device: String,
    pub adversarial: bool,
    pub score: Option<f64>,
    pub norm: f64,
    pub similarity: f64,
    pub alignment: f64,
    pub flags: u8,
    pub reward: u64,
}

/// Sums the settled rounds up; `adversarial` holds the attackers' ids.
pub fn summarize(settled: &[Settlement], adversarial: &HashSet<String>) -> RewardSummary {
    let mut s = RewardSummary {
        rounds_settled: settled.len(),
        ..Default::default()
    };
    let mut score_sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut costs = Vec::new();
    for round in settled {
        s.reward_pool_total = s.reward_pool_total.saturating_add(round.reward_pool);
        if !round.entries.is_empty() && round.error.is_none() {
            costs.push(round.cost.fraction);
        }
        for e in &round.entries {
            let adv = adversarial.contains(&e.device);
            let side = if adv {
                &mut s.adversarial
            } else {
                &mut s.honest
            };
            side.participations += 1;
            let flagged = e.flagged();
            if e.score.is_none_or(|x| x <= 0.0) || flagged {
                side.score_at_or_below_zero += 1;
            }
            if e.reward == 0 {
                side.unrewarded += 1;
            }
            side.flagged_copy += u64::from(e.copy_of.is_some());
            side.flagged_free_rider += u64::from(e.free_rider);
            side.flagged_noise += u64::from(e.noise);
            side.unscored += u64::from(e.score.is_none());
            side.reward = side.reward.saturating_add(e.reward);
            let key = e.device[..12].to_string();
            s.participations.push(Participation {
                round: round.round_id,
                device: key.clone(),
                adversarial: adv,
                score: e.score,
                norm: e.norm,
                similarity: e.similarity,
                alignment: e.alignment,
                flags: e.flags(),
                reward: e.reward,
            });
            let d = s.devices.entry(key.clone()).or_default();
            d.adversarial = adv;
            d.participations += 1;
            d.reward = d.reward.saturating_add(e.reward);
            *score_sums.entry(key).or_default() += e.score.unwrap_or(0.0);
        }
    }
    for (k, d) in &mut s.devices {
        d.mean_score = score_sums[k] / d.participations.max(1) as f64;
    }
    s.reward_paid = s.honest.reward.saturating_add(s.adversarial.reward);
    s.honest_reward_share = Side::fraction(s.honest.reward, s.reward_paid);
    s.honest_score_at_or_below_zero =
        Side::fraction(s.honest.score_at_or_below_zero, s.honest.participations);
    s.honest_unrewarded = Side::fraction(s.honest.unrewarded, s.honest.participations);
    s.adversarial_score_at_or_below_zero = Side::fraction(
        s.adversarial.score_at_or_below_zero,
        s.adversarial.participations,
    );
    s.adversarial_unrewarded =
        Side::fraction(s.adversarial.unrewarded, s.adversarial.participations);
    if !costs.is_empty() {
        s.scoring_cost_fraction_mean = costs.iter().sum::<f64>() / costs.len() as f64;
        s.scoring_cost_fraction_max = costs.iter().copied().fold(0.0, f64::max);
    }
    s
}

impl RewardSummary {
    /// One line for the terminal.
    pub fn line(&self) -> String {
        format!(
            "rewards: honest share {:.3} of {} paid; honest <=0 {:.3}, unrewarded {:.3} ({} participations); adversarial <=0 {:.3}, unrewarded {:.3} ({}); scoring cost {:.4} of training (max {:.4})",
            self.honest_reward_share,
            self.reward_paid,
            self.honest_score_at_or_below_zero,
            self.honest_unrewarded,
            self.honest.participations,
            self.adversarial_score_at_or_below_zero,
            self.adversarial_unrewarded,
            self.adversarial.participations,
            self.scoring_cost_fraction_mean,
            self.scoring_cost_fraction_max,
        )
    }
}
