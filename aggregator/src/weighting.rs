//! Token-weighted contributions: a participant's weight is
//! `f(stake) x g(samples)`, participants under a minimum stake are refused,
//! and no one participant's share of a round's total weight may exceed a
//! cap.
//!
//! What this buys against the two classic stake attacks (tested below and
//! described in the README):
//! - **Sybil splitting** (one stake spread over k keys): with a concave
//!   `f` (sqrt, log) splitting *raises* the attacker's total weight
//!   (k x f(s/k) >= f(s)), so concave `f` must be paired with a minimum
//!   stake, which bounds k; with linear `f` splitting gains nothing.
//! - **Whale concentration** (one key with a large stake): linear `f`
//!   hands a whale a share proportional to its stake; the share cap (and a
//!   concave `f`) bound it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A monotone transform of stake or sample count.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Transform {
    /// Every participant counts 1.
    Constant,
    Linear,
    Sqrt,
    /// ln(1 + x).
    Log,
    /// min(x, cap).
    Capped {
        cap: f64,
    },
}

impl Transform {
    /// The transform as the ledger records it (`fedge_proto::ledger::STAKE_*`
    /// and its parameter).
    pub fn ledger_code(self) -> (u8, f64) {
        use fedge_proto::ledger::*;
        match self {
            Transform::Constant => (STAKE_CONSTANT, 0.0),
            Transform::Linear => (STAKE_LINEAR, 0.0),
            Transform::Sqrt => (STAKE_SQRT, 0.0),
            Transform::Log => (STAKE_LOG, 0.0),
            Transform::Capped { cap } => (STAKE_CAPPED, cap),
        }
    }

    /// The transform a ledger record names.
    pub fn from_ledger_code(kind: u8, param: f64) -> Option<Self> {
        use fedge_proto::ledger::*;
        Some(match kind {
            STAKE_CONSTANT => Transform::Constant,
            STAKE_LINEAR => Transform::Linear,
            STAKE_SQRT => Transform::Sqrt,
            STAKE_LOG => Transform::Log,
            STAKE_CAPPED => Transform::Capped { cap: param },
            _ => return None,
        })
    }

    pub fn apply(self, x: f64) -> f64 {
        let x = x.max(0.0);
        match self {
            Transform::Constant => 1.0,
            Transform::Linear => x,
            Transform::Sqrt => x.sqrt(),
            Transform::Log => x.ln_1p(),
            Transform::Capped { cap } => x.min(cap),
        }
    }
}

/// How participants are weighted.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightPolicy {
    pub stake: Transform,
    pub samples: Transform,
    /// Participants with less stake are refused.
    pub min_stake: f64,
    /// Largest share of a round's total weight one participant may have
    /// (1.0: no cap).
    pub max_share: f64,
    /// Whether a device missing from the registry may take part (with
    /// stake 0, so only when `min_stake` is 0).
    pub allow_unknown: bool,
    /// Ratings fed back into aggregation weights (the operator's choice;
    /// None, the default: they are not): a device whose rating (the moving
    /// average of its scores, computed by the aggregator) is at or below
    /// zero after at least `rating_rounds` scored rounds weighs this
    /// fraction of its weight, in (0, 1] (it is still scored, so its
    /// rating can recover).
    pub rating_floor: Option<f64>,
    /// Scored rounds before a rating can lower a weight.
    pub rating_rounds: u64,
}

impl Default for WeightPolicy {
    fn default() -> Self {
        WeightPolicy {
            stake: Transform::Constant,
            samples: Transform::Linear,
            min_stake: 0.0,
            max_share: 1.0,
            allow_unknown: true,
            rating_floor: None,
            rating_rounds: 3,
        }
    }
}

/// Why a participant gets no weight.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WeightError {
    #[error("device is not in the stake registry")]
    Unknown,
    #[error("stake {stake} is below the minimum {min}")]
    BelowMinimum { stake: f64, min: f64 },
}

impl WeightPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.max_share > 0.0 && self.max_share <= 1.0) {
            return Err(format!(
                "max_share must be in (0, 1], got {}",
                self.max_share
            ));
        }
        if !(self.min_stake >= 0.0 && self.min_stake.is_finite()) {
            return Err(format!("min_stake must be >= 0, got {}", self.min_stake));
        }
        if let Some(f) = self.rating_floor
            && !(f > 0.0 && f <= 1.0)
        {
            // 0 would refuse the device's updates, so they could never be
            // scored again and its rating never recover.
            return Err(format!("rating_floor must be in (0, 1], got {f}"));
        }
        for t in [self.stake, self.samples] {
            if let Transform::Capped { cap } = t
                && !(cap > 0.0 && cap.is_finite())
            {
                return Err(format!(
                    "a capped transform needs a positive cap, got {cap}"
                ));
            }
        }
        Ok(())
    }

    /// The raw (uncapped) weight of a participant, or why it has none.
    pub fn raw_weight(&self, stake: Option<f64>, samples: u64) -> Result<f64, WeightError> {
        let stake = match stake {
            Some(s) => s,
            None if self.allow_unknown => 0.0,
            None => return Err(WeightError::Unknown),
        };
        if stake < self.min_stake {
            return Err(WeightError::BelowMinimum {
                stake,
                min: self.min_stake,
            });
        }
        Ok(self.stake.apply(stake) * self.samples.apply(samples as f64))
    }
}

/// Cap every weight's share of the total at `max_share` by water-filling:
/// capped participants get exactly `max_share` of the new total, the rest
/// keep their proportions. With n participants the cap cannot go below
/// 1/n (everyone equal); it is raised to that.
pub fn cap_shares(weights: &[f64], max_share: f64) -> Vec<f64> {
    let n = weights.len();
    if n == 0 || max_share >= 1.0 {
        return weights.to_vec();
    }
    let c = max_share.max(1.0 / n as f64);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let total: f64 = weights.iter().sum();
    let mut rest = total;
    // Find m, the number of capped participants (the m largest).
    for m in 0..n {
        let w_total = rest / (1.0 - m as f64 * c);
        if weights[order[m]] <= c * w_total + 1e-12 * w_total {
            let mut out = weights.to_vec();
            for &i in &order[..m] {
                out[i] = c * w_total;
            }
            return out;
        }
        rest -= weights[order[m]];
    }
    vec![1.0; n]
}

/// Where stake comes from.
pub trait StakeRegistry: Send {
    /// Stake of a device (hex public key), if registered.
    fn stake(&self, device: &str) -> Option<f64>;

    /// Pick up changes from the source; `Ok(true)` when something changed.
    /// On error the previous stakes stay in force.
    fn reload(&mut self) -> Result<bool, String> {
        Ok(false)
    }
}

impl StakeRegistry for HashMap<String, f64> {
    fn stake(&self, device: &str) -> Option<f64> {
        self.get(device).copied()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read stake file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stake file {path} line {line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The embedded default: a text file of `<hex public key> <stake>` lines
/// (`#` comments). [`FileRegistry::reload`] swaps in a new table only if the
/// whole file parses, so a half-written file never takes effect.
#[derive(Debug)]
pub struct FileRegistry {
    path: PathBuf,
    table: HashMap<String, f64>,
    modified: Option<std::time::SystemTime>,
}

impl FileRegistry {
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let mut r = FileRegistry {
            path: path.to_path_buf(),
            table: HashMap::new(),
            modified: None,
        };
        r.reload()?;
        Ok(r)
    }

    pub fn parse(path: &Path, text: &str) -> Result<HashMap<String, f64>, RegistryError> {
        let mut table = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |reason: String| RegistryError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let mut parts = line.split_whitespace();
            let (Some(key), Some(stake), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(err("expected `<hex public key> <stake>`".into()));
            };
            let key = key.to_ascii_lowercase();
            if key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(err(format!("`{key}` is not a 64-digit hex public key")));
            }
            let stake: f64 = stake
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| err(format!("stake `{stake}` is not a non-negative number")))?;
            if table.insert(key.clone(), stake).is_some() {
                return Err(err(format!("key {key} appears twice")));
            }
        }
        Ok(table)
    }

    /// Re-read the file if it changed. On error the old table stays.
    pub fn reload(&mut self) -> Result<bool, RegistryError> {
        let read = |source| RegistryError::Read {
            path: self.path.clone(),
            source,
        };
        let modified = std::fs::metadata(&self.path).map_err(read)?.modified().ok();
        if modified.is_some() && modified == self.modified {
            return Ok(false);
        }
        let text = std::fs::read_to_string(&self.path).map_err(|source| RegistryError::Read {
            path: self.path.clone(),
            source,
        })?;
        self.table = Self::parse(&self.path, &text)?;
        self.modified = modified;
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl StakeRegistry for FileRegistry {
    fn stake(&self, device: &str) -> Option<f64> {
        self.table.get(device).copied()
    }

    fn reload(&mut self) -> Result<bool, String> {
        FileRegistry::reload(self).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(w: &[f64]) -> Vec<f64> {
        let t: f64 = w.iter().sum();
        w.iter().map(|x| x / t).collect()
    }

    #[test]
    fn capping_table() {
        // (weights, cap, expected shares)
        let cases: Vec<(Vec<f64>, f64, Vec<f64>)> = vec![
            (vec![1.0, 1.0, 1.0, 1.0], 0.5, vec![0.25; 4]),
            (
                vec![97.0, 1.0, 1.0, 1.0],
                0.5,
                vec![0.5, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0],
            ),
            (vec![50.0, 40.0, 5.0, 5.0], 0.3, vec![0.3, 0.3, 0.2, 0.2]),
            (vec![10.0, 1.0], 0.2, vec![0.5, 0.5]),
            (vec![3.0, 1.0], 1.0, vec![0.75, 0.25]),
        ];
        for (w, cap, expect) in cases {
            let got = shares(&cap_shares(&w, cap));
            for (g, e) in got.iter().zip(&expect) {
                assert!(
                    (g - e).abs() < 1e-9,
                    "{w:?} cap {cap}: {got:?} != {expect:?}"
                );
            }
        }
    }

    #[test]
    fn transforms_and_minimum_stake() {
        let p = WeightPolicy {
            stake: Transform::Sqrt,
            samples: Transform::Capped { cap: 100.0 },
            min_stake: 4.0,
            max_share: 1.0,
            allow_unknown: false,
            ..WeightPolicy::default()
        };
        assert_eq!(p.raw_weight(Some(16.0), 50), Ok(4.0 * 50.0));
        assert_eq!(p.raw_weight(Some(16.0), 500), Ok(4.0 * 100.0));
        assert_eq!(
            p.raw_weight(Some(1.0), 50),
            Err(WeightError::BelowMinimum {
                stake: 1.0,
                min: 4.0
            })
        );
        assert_eq!(p.raw_weight(None, 50), Err(WeightError::Unknown));
        assert!((Transform::Log.apply(std::f64::consts::E - 1.0) - 1.0).abs() < 1e-12);
    }

    /// Share of the round an attacker with total stake `s_att` gets when it
    /// spreads it over `k` keys, against `honest` participants of stake 1.
    fn attacker_share(p: &WeightPolicy, s_att: f64, k: usize, honest: usize) -> f64 {
        let mut w = Vec::new();
        for _ in 0..k {
            if let Ok(x) = p.raw_weight(Some(s_att / k as f64), 100) {
                w.push(x);
            }
        }
        let att = w.len();
        for _ in 0..honest {
            w.push(p.raw_weight(Some(1.0), 100).unwrap());
        }
        let capped = cap_shares(&w, p.max_share);
        let t: f64 = capped.iter().sum();
        capped[..att].iter().sum::<f64>() / t
    }

    #[test]
    fn sybil_splitting_and_whales() {
        let linear = WeightPolicy {
            stake: Transform::Linear,
            max_share: 1.0,
            ..WeightPolicy::default()
        };
        // Linear stake: splitting 10 stake over 1 or 10 keys gives the same share.
        let one = attacker_share(&linear, 10.0, 1, 10);
        let ten = attacker_share(&linear, 10.0, 10, 10);
        assert!(
            (one - 0.5).abs() < 1e-9 && (ten - one).abs() < 1e-9,
            "{one} {ten}"
        );

        // Sqrt stake: splitting pays (k x sqrt(s/k) = sqrt(k s))...
        let sqrt = WeightPolicy {
            stake: Transform::Sqrt,
            ..WeightPolicy::default()
        };
        let s1 = attacker_share(&sqrt, 16.0, 1, 10);
        let s16 = attacker_share(&sqrt, 16.0, 16, 10);
        assert!(s16 > s1 * 2.0, "sqrt rewards splitting: {s1} -> {s16}");
        // ...unless a minimum stake bounds the number of keys.
        let sqrt_min = WeightPolicy {
            min_stake: 4.0,
            ..sqrt.clone()
        };
        let s16_min = attacker_share(&sqrt_min, 16.0, 16, 0); // all keys under the minimum
        assert!(s16_min.is_nan() || s16_min == 0.0);
        let s4 = attacker_share(
            &WeightPolicy {
                min_stake: 1.0,
                ..sqrt.clone()
            },
            16.0,
            4,
            10,
        );
        assert!(s4 <= 16.0f64.sqrt() * 2.0 / (16.0f64.sqrt() * 2.0 + 10.0) + 1e-9);

        // Whale: linear stake 1000 vs 10 honest of 1 -> 99%; capped at 20%.
        let whale = attacker_share(&linear, 1000.0, 1, 10);
        assert!(whale > 0.98);
        let capped = attacker_share(
            &WeightPolicy {
                max_share: 0.2,
                ..linear
            },
            1000.0,
            1,
            10,
        );
        assert!((capped - 0.2).abs() < 1e-9, "{capped}");
    }

    #[test]
    fn registry_file_parses_and_reload_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stakes.txt");
        let k1 = "ab".repeat(32);
        let k2 = "cd".repeat(32);
        std::fs::write(&path, format!("# stakes\n{k1} 10\n{k2} 2.5 # comment\n")).unwrap();
        let mut r = FileRegistry::open(&path).unwrap();
        assert_eq!(r.stake(&k1), Some(10.0));
        assert_eq!(r.stake(&k2), Some(2.5));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, format!("{k1} 10\n{k2} lots\n")).unwrap();
        let e = r.reload().unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("lots"), "{e}");
        assert_eq!(r.stake(&k2), Some(2.5), "old table kept");
        for bad in [
            "zz 1",
            &format!("{k1} -1"),
            &format!("{k1} 1\n{k1} 2"),
            &k1.to_string(),
        ] {
            assert!(FileRegistry::parse(&path, bad).is_err(), "{bad}");
        }
    }
}
