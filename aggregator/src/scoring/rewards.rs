//! Rewards from scores: the score that earns one, what a round adds to
//! ratings, and the pool split by `f(stake) x clipped score` with each
//! share capped (see [`super`]).

use super::UpdateScore;

/// The score that earns a reward: `max(score, 0)`, and 0 for a flagged or
/// unscored update.
pub fn clipped_score(u: &UpdateScore) -> f64 {
    match u.score {
        Some(s) if !u.flagged() && s > 0.0 => s,
        _ => 0.0,
    }
}

/// What a round's scores add to its participants' ratings, given each one's
/// score and whether it was flagged: the score, clamped so one absurd score
/// cannot make a rating infinite; a flagged update's at most 0 less the
/// median positive score of the round's unflagged updates (so a free-rider
/// or a copycat loses standing each round instead of decaying toward 0
/// from its last good round); None for an unscored or non-finite one.
pub fn rating_inputs(entries: &[(Option<f64>, bool)]) -> Vec<Option<f64>> {
    let mut good: Vec<f64> = entries
        .iter()
        .filter(|(_, flagged)| !flagged)
        .filter_map(|&(s, _)| s.filter(|x| x.is_finite() && *x > 0.0))
        .collect();
    good.sort_by(f64::total_cmp);
    let typical = good.get(good.len() / 2).copied().unwrap_or(0.0);
    entries
        .iter()
        .map(|&(score, flagged)| {
            let score = score.filter(|x| x.is_finite())?;
            let x = if flagged {
                score.min(0.0) - typical
            } else {
                score
            };
            Some(x.clamp(-1e6, 1e6))
        })
        .collect()
}

/// Each participant's share of the reward pool from its reward weight
/// (`f(stake) x clipped score`, all >= 0). Shares are proportional to the
/// weights, and no share exceeds `max_share`: when at least `1/max_share`
/// participants have a positive weight the excess is water-filled onto the
/// others (as [`crate::weighting::cap_shares`] does for aggregation);
/// with fewer, the capped shares stay at the cap and the rest of the pool
/// is not paid out. Nothing is paid when no weight is positive.
pub fn reward_shares(weights: &[f64], max_share: f64) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return vec![0.0; weights.len()];
    }
    let positive = weights.iter().filter(|&&w| w > 0.0).count();
    let c = max_share.clamp(0.0, 1.0);
    if c >= 1.0 {
        return weights.iter().map(|w| w / total).collect();
    }
    if (positive as f64) * c >= 1.0 {
        let pos: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
        let capped =
            crate::weighting::cap_shares(&pos.iter().map(|&i| weights[i]).collect::<Vec<_>>(), c);
        let t: f64 = capped.iter().sum();
        let mut out = vec![0.0; weights.len()];
        for (k, &i) in pos.iter().enumerate() {
            out[i] = (capped[k] / t).min(c);
        }
        out
    } else {
        weights.iter().map(|w| (w / total).min(c)).collect()
    }
}

/// A participant's reward weight: `f(stake) x clipped score` (0 when not
/// finite).
pub fn reward_weight(f: crate::weighting::Transform, stake: f64, clipped: f64) -> f64 {
    let w = f.apply(stake) * clipped;
    if w.is_finite() { w } else { 0.0 }
}

/// [`rewards`] of [`reward_shares`], computed with the participants in
/// the order of their device keys (`devices`, hex) and returned in the
/// given order: the ledger lists entries by key, so anyone recomputing
/// the rewards from a record adds the same numbers in the same order.
pub fn rewards_in_key_order(
    pool: u64,
    devices: &[&str],
    weights: &[f64],
    max_share: f64,
) -> Vec<u64> {
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| devices[a].cmp(devices[b]));
    let sorted: Vec<f64> = order.iter().map(|&i| weights[i]).collect();
    let paid = rewards(pool, &reward_shares(&sorted, max_share));
    let mut out = vec![0; weights.len()];
    for (k, &i) in order.iter().enumerate() {
        out[i] = paid[k];
    }
    out
}

/// Whole reward units from shares of `pool` (rounded down, so the total
/// never exceeds the pool).
pub fn rewards(pool: u64, shares: &[f64]) -> Vec<u64> {
    shares
        .iter()
        .map(|s| {
            let r = (pool as f64 * s).floor();
            if r.is_finite() && r > 0.0 {
                (r as u64).min(pool)
            } else {
                0
            }
        })
        .collect()
}
