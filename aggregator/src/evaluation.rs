//! Federated evaluation (`[evaluation]` in the TOML file): devices
//! evaluate the round's model on their own held-out data and send a
//! signed report (`fedge_proto::msg::EvalReport`); the round's reports are
//! combined robustly when it closes.
//!
//! Who evaluates: devices that ask for work when the round has no
//! training slot for them (not drawn at the check-in window, or late) are
//! offered an evaluation task instead of being paced away, up to
//! `devices` per round, one task per key. An evaluation costs the round no
//! training slot, and a device cannot choose to evaluate rather than
//! train: the draw decides.
//!
//! Every number in a report is a claim. Decoding refuses impossible ones
//! (see `fedge_proto::msg::EvalManifest`). A report weighs what the
//! device's update would (`[weights]`: the stake transform, and the
//! sample transform applied to one example), no report more than
//! `weights.max_share` of the round's total (the same water-filling cap):
//! by default a claimed example count buys nothing. With `count_examples`
//! (an explicit opt-in for fleets whose claims are trusted) the sample
//! transform counts the claim, capped at `examples_max`. The round's loss and accuracy are weighted means trimmed by
//! `trim` of the total weight at each end (by value): liars holding less
//! than `trim` of the weight cannot move them past the honest reports'
//! range.

use fedge_proto::ledger;
use serde::{Deserialize, Serialize, Serializer};

/// `[evaluation]`: federated evaluation of each round's model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Evaluation tasks offered per round (0: no federated evaluation).
    pub devices: usize,
    /// Count a report's claimed example count under `weights.samples` (up
    /// to `examples_max`). Off by default: a device's claim then buys no
    /// weight. Unsafe on an open network, where claims cost nothing.
    pub count_examples: bool,
    pub examples_max: u64,
    /// Fraction of the total weight trimmed at each end before the means.
    pub trim: f64,
    /// The operator-held evaluation: each round's model is also evaluated
    /// on the first this many examples of the operator's validation set
    /// (`[scoring] validation`), when one is configured (0: not).
    pub validation_examples: usize,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        EvaluationConfig {
            devices: 0,
            count_examples: false,
            examples_max: 500,
            trim: 0.3,
            validation_examples: 1000,
        }
    }
}

impl EvaluationConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.examples_max == 0 {
            return Err("evaluation.examples_max must be at least 1".into());
        }
        if !(0.0..0.5).contains(&self.trim) {
            return Err(format!(
                "evaluation.trim = {} must be in [0, 0.5): it is trimmed at both ends",
                self.trim
            ));
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.devices > 0
    }
}

/// One accepted report, as the round keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalClaim {
    /// The device's public key.
    pub key: [u8; 32],
    /// Its weight (before the share cap).
    pub weight: f64,
    pub loss: f64,
    pub accuracy: f64,
    /// blake3 of the signed report.
    pub report_hash: [u8; 32],
}

/// A round's federated evaluation, combined.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalSummary {
    pub round_id: u64,
    /// Hex of the model version evaluated (the round's base model).
    pub model_version: String,
    /// Reports combined.
    pub devices: usize,
    /// Their weights, summed.
    pub weight: f64,
    /// Merkle root over the reports (`fedge_proto::ledger::report_leaf`,
    /// in key order); zeros without reports.
    #[serde(serialize_with = "hex_bytes")]
    pub reports_root: [u8; 32],
    /// Trimmed weighted means (None without reports).
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    /// The same model on the operator's validation set (None without one).
    pub validation_examples: usize,
    pub validation_loss: Option<f64>,
    pub validation_accuracy: Option<f64>,
}

fn hex_bytes<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

/// The weighted mean of `values` after trimming `trim` of the total
/// weight from each end by value (a weight straddling a cut counts in
/// part). `values` are (value, weight) with positive weights. None when
/// empty.
pub fn trimmed_mean(values: &[(f64, f64)], trim: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<(f64, f64)> = values.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = v.iter().map(|p| p.1).sum();
    let (lo, hi) = (total * trim, total * (1.0 - trim));
    // Each value's weight covers [at, at + w]; its part in [lo, hi] counts.
    let mut at = 0.0f64;
    let parts: Vec<f64> = v
        .iter()
        .map(|&(_, w)| {
            let part = ((at + w).min(hi) - at.max(lo)).max(0.0);
            at += w;
            part
        })
        .collect();
    let kept: f64 = parts.iter().sum();
    if !(kept > 0.0 && kept.is_finite()) {
        // trim < 0.5 keeps a positive width; only rounding gets here: the
        // value at the middle of the weight.
        let mut at = 0.0;
        return v.iter().find_map(|&(x, w)| {
            at += w;
            (at >= total / 2.0).then_some(x)
        });
    }
    // A convex combination (each part over the total kept, then times its
    // value), so the mean never leaves the kept values' range: no finite
    // claim, however large, overflows it.
    Some(
        v.iter()
            .zip(&parts)
            .map(|(&(x, _), p)| (p / kept) * x)
            .sum(),
    )
}

/// Combines a round's reports: weights capped at `max_share` of their
/// total, then trimmed weighted means.
pub fn summarise(
    round_id: u64,
    model_version: &fedge_proto::ModelVersion,
    claims: &[EvalClaim],
    trim: f64,
    max_share: f64,
) -> EvalSummary {
    let raw: Vec<f64> = claims.iter().map(|c| c.weight).collect();
    let w = crate::weighting::cap_shares(&raw, max_share);
    let loss: Vec<(f64, f64)> = claims.iter().zip(&w).map(|(c, &w)| (c.loss, w)).collect();
    let acc: Vec<(f64, f64)> = claims
        .iter()
        .zip(&w)
        .map(|(c, &w)| (c.accuracy, w))
        .collect();
    let mut leaves: Vec<(&[u8; 32], Vec<u8>)> = claims
        .iter()
        .map(|c| (&c.key, ledger::report_leaf(&c.key, &c.report_hash)))
        .collect();
    leaves.sort_by(|a, b| a.0.cmp(b.0));
    let leaves: Vec<Vec<u8>> = leaves.into_iter().map(|(_, l)| l).collect();
    EvalSummary {
        round_id,
        model_version: hex::encode(model_version.0),
        devices: claims.len(),
        weight: w.iter().sum(),
        reports_root: if leaves.is_empty() {
            [0; 32]
        } else {
            ledger::merkle_root(&leaves)
        },
        loss: trimmed_mean(&loss, trim),
        accuracy: trimmed_mean(&acc, trim),
        validation_examples: 0,
        validation_loss: None,
        validation_accuracy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_trim_it_is_the_weighted_mean() {
        let m = trimmed_mean(&[(1.0, 1.0), (2.0, 3.0)], 0.0).unwrap();
        assert!((m - 1.75).abs() < 1e-12, "{m}");
        assert_eq!(trimmed_mean(&[], 0.2), None);
        assert_eq!(trimmed_mean(&[(0.4, 2.0)], 0.2), Some(0.4));
    }

    #[test]
    fn a_trim_cuts_weight_not_reports() {
        // Five equal weights, 20% trimmed each end: the outer two go.
        let v = [(0.0, 1.0), (0.5, 1.0), (0.6, 1.0), (0.7, 1.0), (1.0, 1.0)];
        let m = trimmed_mean(&v, 0.2).unwrap();
        assert!((m - 0.6).abs() < 1e-12, "{m}");
        // A straddling weight counts in part: 10% trim of 4 units = 0.4.
        let v = [(0.0, 1.0), (1.0, 1.0), (1.0, 1.0), (2.0, 1.0)];
        let m = trimmed_mean(&v, 0.1).unwrap();
        assert!((m - 1.0).abs() < 1e-12, "{m}");
    }

    #[test]
    fn liars_within_the_trim_stay_inside_the_honest_range() {
        // 16 honest devices report accuracy 0.80..0.95; 4 liars (20%) claim
        // 1.0 with the most weight they can get (the cap).
        let cap = 500.0;
        let mut v: Vec<(f64, f64)> = (0..16)
            .map(|i| (0.80 + 0.01 * i as f64, 100.0 + 10.0 * i as f64))
            .collect();
        let honest_max = 0.95;
        v.extend((0..4).map(|_| (1.0, cap)));
        // Liars hold 2000 of 5200 weight units (38%): a 0.2 trim does not
        // absorb them, so the cap matters too; with a 0.4 trim it does.
        let m = trimmed_mean(&v, 0.4).unwrap();
        assert!(m <= honest_max, "{m}");
        // With equal weights (the cap binding everyone), a 0.2 trim holds.
        let mut eq: Vec<(f64, f64)> = (0..16).map(|i| (0.80 + 0.01 * i as f64, cap)).collect();
        eq.extend((0..4).map(|_| (1.0, cap)));
        let m = trimmed_mean(&eq, 0.2).unwrap();
        assert!(m <= honest_max, "{m}");
    }

    #[test]
    fn huge_finite_claims_do_not_overflow_the_mean() {
        let v = [(f64::MAX, 1.0), (f64::MAX, 1.0), (1.0, 1.0), (2.0, 1.0)];
        for trim in [0.0, 0.1, 0.3] {
            let m = trimmed_mean(&v, trim).unwrap();
            assert!(m.is_finite() && m <= f64::MAX, "{trim}: {m}");
        }
        let weights = [(f64::MAX, f64::MAX), (1.0, f64::MAX)];
        assert!(trimmed_mean(&weights, 0.3).unwrap().is_finite());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(EvaluationConfig::default().validate().is_ok());
        for (examples_max, trim) in [(0, 0.2), (10, 0.5), (10, -0.1), (10, f64::NAN)] {
            let c = EvaluationConfig {
                devices: 3,
                examples_max,
                trim,
                ..EvaluationConfig::default()
            };
            assert!(c.validate().is_err(), "{examples_max} {trim}");
        }
    }
}
