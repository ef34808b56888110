//! What a verifier recomputes of a record from the updates it names: the
//! scores, and with the record's flag rules every flag (see
//! [`recompute_scores`]).

use fedge_proto::ledger::{self, LedgerRecord};

use crate::scoring::{Evaluator, ScoreMethod, ScoringConfig, score_round};

/// A record's updates (`deltas`, in entry order) as the aggregator scored
/// them: in acceptance order when the record says it (else entry order),
/// each scaled by its staleness discount at float32, as `Values::scale`
/// does. Returns the entry index of each, and the scaled updates.
pub fn as_scored<'a>(
    r: &LedgerRecord,
    deltas: &'a [Vec<f32>],
) -> (Vec<usize>, Vec<std::borrow::Cow<'a, [f32]>>) {
    let order: Vec<usize> = match &r.flag_rules {
        Some(f) => f.order.iter().map(|&i| i as usize).collect(),
        None => (0..deltas.len()).collect(),
    };
    let scaled = order
        .iter()
        .map(|&i| {
            let s = r.staleness.as_ref().map_or(1.0, |st| st.discount_of(i)) as f32;
            if s == 1.0 {
                std::borrow::Cow::Borrowed(deltas[i].as_slice())
            } else {
                std::borrow::Cow::Owned(deltas[i].iter().map(|x| x * s).collect())
            }
        })
        .collect();
    (order, scaled)
}

/// Recomputes the scores of record `r` from the model its round started
/// from (`model_before`), the round's updates (`deltas`, decoded, in entry
/// order, each scaled by its staleness discount as the aggregator scaled
/// it before combining) and the validation set behind `evaluator`, as the
/// aggregator computed them ([`crate::scoring::score_round`] with the
/// record's seed, sample size, method and server learning rate). Unscored
/// entries' scores are skipped. Scores must agree to a relative 1e-9.
///
/// With the record's flag rules (format 4), the updates are scored in the
/// order they were accepted, and every entry's copy, free-rider and noise
/// flags are recomputed with the record's thresholds, stale replays of
/// the rounds in `history` included (pass one history through the records
/// in chain order; this round's updates join it). Returns how many scores
/// and flags were checked.
pub fn recompute_scores(
    r: &LedgerRecord,
    model_before: &[f32],
    deltas: &[Vec<f32>],
    evaluator: &mut dyn Evaluator,
    history: &mut crate::scoring::replay::History,
) -> Result<(usize, usize), String> {
    if deltas.len() != r.entries.len() {
        return Err(format!(
            "{} updates for {} entries",
            deltas.len(),
            r.entries.len()
        ));
    }
    if let Some(d) = deltas.iter().find(|d| d.len() != model_before.len()) {
        return Err(format!(
            "an update has {} values, the model {}",
            d.len(),
            model_before.len()
        ));
    }
    let mut cfg = ScoringConfig {
        validation_samples: r.validation_samples as usize,
        method: match r.score_method {
            ledger::METHOD_LEAVE_ONE_OUT => ScoreMethod::LeaveOneOut,
            ledger::METHOD_MARGINAL => ScoreMethod::Marginal,
            ledger::METHOD_SHAPLEY => ScoreMethod::Shapley,
            ledger::METHOD_CLASS_GAIN => ScoreMethod::ClassGain,
            _ => ScoreMethod::Direct,
        },
        ..ScoringConfig::default()
    };
    if let Some(f) = &r.flag_rules {
        cfg.copy_cosine_min = f.copy_cosine_min;
        cfg.free_rider_norm_ratio = f.free_rider_norm_ratio;
        cfg.noise_sigmas = f.noise_sigmas;
    }
    let (order, scaled) = as_scored(r, deltas);
    let refs: Vec<&[f32]> = scaled.iter().map(|d| &**d).collect();
    let mut scores = score_round(
        &cfg,
        Some(evaluator),
        &r.scoring_seed,
        model_before,
        r.server_lr,
        &refs,
        0,
    );
    if let Some(e) = scores.error {
        return Err(format!("scoring failed: {e}"));
    }
    if r.flag_rules.is_some() {
        history.flag_and_keep(&mut scores.updates, &refs, cfg.copy_cosine_min);
    }
    let (mut checked, mut flags) = (0, 0);
    for (&i, u) in order.iter().zip(&scores.updates) {
        let e = &r.entries[i];
        let device = hex::encode(e.device);
        if r.flag_rules.is_some() {
            let bit = |on: bool, b: u8| if on { b } else { 0 };
            // Unscored too: in a scored round every update has a score,
            // and the flag would zero a reward without a reason.
            let want = bit(u.copy_of.is_some(), ledger::FLAG_COPY)
                | bit(u.free_rider, ledger::FLAG_FREE_RIDER)
                | bit(u.noise, ledger::FLAG_NOISE)
                | bit(u.score.is_none(), ledger::FLAG_UNSCORED);
            let mask = ledger::FLAG_COPY
                | ledger::FLAG_FREE_RIDER
                | ledger::FLAG_NOISE
                | ledger::FLAG_UNSCORED;
            if e.flags & mask != want {
                return Err(format!(
                    "device {device}: recorded flags {:#04x}, recomputed {want:#04x} \
                     (1 copy, 2 free-rider or replay, 4 unscored, 8 noise)",
                    e.flags & mask
                ));
            }
            flags += 1;
        }
        if e.flags & ledger::FLAG_UNSCORED != 0 {
            continue;
        }
        let got = u.score.unwrap_or(f64::NAN);
        // Relative, with an absolute floor: a score near zero (a tiny
        // update's) must not fail on a last-bit difference.
        let close =
            got == e.score || (got - e.score).abs() <= 1e-9 * got.abs().max(e.score.abs()) + 1e-15;
        if !close {
            return Err(format!(
                "device {device}: recorded score {}, recomputed {got}",
                e.score
            ));
        }
        checked += 1;
    }
    Ok((checked, flags))
}
