//! A record's flag rules (ledger format 4): the thresholds the aggregator
//! flagged copies, free-riders and noise with, and the order it accepted
//! the updates in (a copy is a copy of an *earlier* update of the round,
//! and entries are ordered by device key), so a verifier holding the
//! updates recomputes every flag, not only the scores.
//!
//! Layout, after the sections before it: `copy_cosine_min f64 |
//! free_rider_norm_ratio f64 | noise_sigmas f64 | order u32 x entries`,
//! little-endian: `order[k]` is the entry index of the `k`-th update
//! accepted, a permutation of the entries.

use super::{LedgerError, Reader};

/// How a round's flags were computed.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerFlagRules {
    /// Cosine at or above which an update copies an earlier one (or, with
    /// any update of the last rounds, replays it), in (0, 1].
    pub copy_cosine_min: f64,
    /// Norm below this fraction of the round's median: a free-rider, in
    /// [0, 1).
    pub free_rider_norm_ratio: f64,
    /// The noise band in standard deviations of a random cosine (0: no
    /// noise flag).
    pub noise_sigmas: f64,
    /// Entry indices in acceptance order.
    pub order: Vec<u32>,
}

impl LedgerFlagRules {
    pub(super) fn encode_into(&self, b: &mut Vec<u8>) {
        for x in [
            self.copy_cosine_min,
            self.free_rider_norm_ratio,
            self.noise_sigmas,
        ] {
            b.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        for i in &self.order {
            b.extend_from_slice(&i.to_le_bytes());
        }
    }

    /// Decodes the section of a record with `entries` entries.
    pub(super) fn decode(r: &mut Reader<'_>, entries: usize) -> Result<Self, LedgerError> {
        let bad = |field, reason: String| LedgerError::Invalid { field, reason };
        let copy_cosine_min = r.f64("flags copy_cosine_min")?;
        if !(copy_cosine_min > 0.0 && copy_cosine_min <= 1.0) {
            return Err(bad(
                "flags copy_cosine_min",
                format!("{copy_cosine_min} is not in (0, 1]"),
            ));
        }
        let free_rider_norm_ratio = r.f64("flags free_rider_norm_ratio")?;
        if !(0.0..1.0).contains(&free_rider_norm_ratio) {
            return Err(bad(
                "flags free_rider_norm_ratio",
                format!("{free_rider_norm_ratio} is not in [0, 1)"),
            ));
        }
        let noise_sigmas = r.f64("flags noise_sigmas")?;
        if noise_sigmas < 0.0 {
            return Err(bad(
                "flags noise_sigmas",
                format!("{noise_sigmas} is negative"),
            ));
        }
        let mut seen = vec![false; entries];
        let mut order = Vec::with_capacity(entries);
        for _ in 0..entries {
            let i = u32::from_le_bytes(r.take(4, "flags order")?.try_into().expect("4"));
            match seen.get_mut(i as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(bad(
                        "flags order",
                        format!("{i} is not an entry index left in a permutation of {entries}"),
                    ));
                }
            }
            order.push(i);
        }
        Ok(LedgerFlagRules {
            copy_cosine_min,
            free_rider_norm_ratio,
            noise_sigmas,
            order,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_every_byte_counts, record};
    use super::super::{LedgerRecord, LedgerStaleness, StaleEntry};
    use super::*;

    fn rules() -> LedgerFlagRules {
        LedgerFlagRules {
            copy_cosine_min: 0.99,
            free_rider_norm_ratio: 0.05,
            noise_sigmas: 3.0,
            order: vec![2, 0, 1],
        }
    }

    #[test]
    fn flag_rules_are_format_4_alone_or_with_staleness() {
        for stale in [false, true] {
            let mut r = record();
            r.flag_rules = Some(rules());
            r.staleness = stale.then(|| LedgerStaleness {
                exponent: 0.5,
                entries: vec![StaleEntry {
                    entry: 0,
                    task_round: 8,
                    discount: 0.5f64.sqrt(),
                }],
            });
            assert_eq!(&r.encode()[..8], b"fedgeLR4");
            assert_ne!(r.hash(), record().hash());
            assert_every_byte_counts(&r);
        }
    }

    #[test]
    fn impossible_rules_are_refused() {
        let cases: [fn(&mut LedgerFlagRules); 6] = [
            |f| f.copy_cosine_min = 0.0,
            |f| f.copy_cosine_min = 1.5,
            |f| f.free_rider_norm_ratio = 1.0,
            |f| f.noise_sigmas = -1.0,
            |f| f.order = vec![0, 0, 1],
            |f| f.order = vec![0, 1, 3],
        ];
        for (i, edit) in cases.into_iter().enumerate() {
            let mut r = record();
            let mut f = rules();
            edit(&mut f);
            r.flag_rules = Some(f);
            assert!(
                matches!(
                    LedgerRecord::decode(&r.encode()),
                    Err(LedgerError::Invalid { .. })
                ),
                "case {i}"
            );
        }
    }
}
