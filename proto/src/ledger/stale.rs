//! A record's staleness section (ledger format 4): which entries were
//! stale FedBuff updates, the round whose task each answered, and the
//! discount its delta was scaled by before it was combined and scored.
//!
//! Without it a verifier could not recompute a stale update's score: the
//! aggregator scores the discounted delta (what it applied), and neither
//! the discount nor the task's round was in the record.
//!
//! Layout, after the reward root and the sections byte of format 4 (and
//! the evaluation, when its bit is set; the flag rules follow it):
//! `exponent f64 | count u32 |
//! (entry u32 | task_round u64 | discount f64) x count`, little-endian.
//! Entries are indices into the record's entries, strictly increasing;
//! each task round is before the record's round; each discount is in
//! (0, 1]. The discount is `(1 + round_id - task_round)^-exponent`
//! (FedBuff, Nguyen et al. 2022); the decoder checks ranges, a verifier
//! checks the formula ([`LedgerStaleness::check_discounts`]).

use super::{LedgerError, Reader};

/// One stale entry.
#[derive(Clone, Debug, PartialEq)]
pub struct StaleEntry {
    /// Index into [`super::LedgerRecord::entries`].
    pub entry: u32,
    /// The round whose task the update answered (before the record's).
    pub task_round: u64,
    /// What its delta was scaled by, in (0, 1].
    pub discount: f64,
}

/// The stale entries of a record and the discount's exponent.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerStaleness {
    /// `a` in `(1 + tau)^-a`.
    pub exponent: f64,
    /// At least one; ordered by entry index.
    pub entries: Vec<StaleEntry>,
}

impl LedgerStaleness {
    pub(super) fn encode_into(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.exponent.to_bits().to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for s in &self.entries {
            b.extend_from_slice(&s.entry.to_le_bytes());
            b.extend_from_slice(&s.task_round.to_le_bytes());
            b.extend_from_slice(&s.discount.to_bits().to_le_bytes());
        }
    }

    /// Decodes the section of a record with `entries` entries of round
    /// `round_id`.
    pub(super) fn decode(
        r: &mut Reader<'_>,
        entries: usize,
        round_id: u64,
    ) -> Result<Self, LedgerError> {
        let bad = |field, reason: String| LedgerError::Invalid { field, reason };
        let exponent = r.f64("staleness exponent")?;
        if exponent < 0.0 {
            return Err(bad("staleness exponent", format!("{exponent} is negative")));
        }
        let n = u32::from_le_bytes(r.take(4, "stale count")?.try_into().expect("4")) as usize;
        if n == 0 || n > entries {
            return Err(bad(
                "stale count",
                format!("{n} stale entries of {entries}; a section has 1 to all of them"),
            ));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let entry = u32::from_le_bytes(r.take(4, "stale entry")?.try_into().expect("4"));
            let task_round = r.u64("stale task_round")?;
            let discount = r.f64("stale discount")?;
            if entry as usize >= entries {
                return Err(bad(
                    "stale entry",
                    format!("index {entry} of {entries} entries"),
                ));
            }
            if out.last().is_some_and(|p: &StaleEntry| p.entry >= entry) {
                return Err(bad("stale entry", "not in increasing order".into()));
            }
            if task_round >= round_id {
                return Err(bad(
                    "stale task_round",
                    format!("{task_round} is not before the record's round {round_id}"),
                ));
            }
            if !(discount > 0.0 && discount <= 1.0) {
                return Err(bad(
                    "stale discount",
                    format!("{discount} is not in (0, 1]"),
                ));
            }
            out.push(StaleEntry {
                entry,
                task_round,
                discount,
            });
        }
        Ok(LedgerStaleness {
            exponent,
            entries: out,
        })
    }

    /// The discount of entry `i` (1 when it was fresh).
    pub fn discount_of(&self, i: usize) -> f64 {
        self.entries
            .iter()
            .find(|s| s.entry as usize == i)
            .map_or(1.0, |s| s.discount)
    }

    /// Each discount is `(1 + round_id - task_round)^-exponent`, to a
    /// relative 1e-12 (`powf` may differ in its last bit across
    /// platforms); names the first entry that is not.
    pub fn check_discounts(&self, round_id: u64) -> Result<(), String> {
        for s in &self.entries {
            let tau = round_id - s.task_round;
            let want = (1.0 + tau as f64).powf(-self.exponent);
            if (s.discount - want).abs() > 1e-12 * want {
                return Err(format!(
                    "entry {} answered round {}'s task {tau} rounds late: discount {}, \
                     the exponent {} gives {want}",
                    s.entry, s.task_round, s.discount, self.exponent
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_every_byte_counts, record};
    use super::super::{EVAL_VALIDATION_LOSS, LedgerEvaluation, LedgerRecord};
    use super::*;

    /// Entry 1 answered round 7's task in round 9 (two rounds late).
    fn staleness() -> LedgerStaleness {
        LedgerStaleness {
            exponent: 0.5,
            entries: vec![StaleEntry {
                entry: 1,
                task_round: 7,
                discount: 3f64.powf(-0.5),
            }],
        }
    }

    #[test]
    fn stale_entries_are_format_4_with_or_without_an_evaluation() {
        let plain = record();
        for eval in [false, true] {
            let mut r = record();
            r.staleness = Some(staleness());
            r.evaluation = eval.then_some(LedgerEvaluation {
                flags: EVAL_VALIDATION_LOSS,
                devices: 0,
                weight: 0.0,
                loss: 0.0,
                accuracy: 0.0,
                reports_root: [0; 32],
                validation_examples: 100,
                validation_loss: 0.5,
                validation_accuracy: 0.0,
            });
            let b = r.encode();
            assert_eq!(&b[..8], b"fedgeLR4");
            assert_ne!(r.hash(), plain.hash());
            assert_every_byte_counts(&r);
            let s = r.staleness.as_ref().unwrap();
            s.check_discounts(r.round_id).unwrap();
            assert_eq!(s.discount_of(1), 3f64.powf(-0.5));
            assert_eq!(s.discount_of(0), 1.0);
        }
    }

    #[test]
    fn impossible_staleness_is_refused() {
        let cases: [fn(&mut LedgerStaleness); 7] = [
            |s| s.exponent = -1.0,
            |s| s.entries.clear(),
            |s| s.entries[0].entry = 3,
            |s| s.entries[0].task_round = 9,
            |s| s.entries[0].discount = 0.0,
            |s| s.entries[0].discount = 1.5,
            |s| s.entries.push(s.entries[0].clone()),
        ];
        for (i, edit) in cases.into_iter().enumerate() {
            let mut r = record();
            let mut s = staleness();
            edit(&mut s);
            r.staleness = Some(s);
            assert!(
                matches!(
                    LedgerRecord::decode(&r.encode()),
                    Err(LedgerError::Invalid { .. })
                ),
                "case {i}"
            );
        }
        // A sections byte without the staleness bit, or with unknown bits.
        let mut r = record();
        r.staleness = Some(staleness());
        let b = r.encode();
        let at = b.len() - (8 + 4 + 20) - 1;
        for sections in [0u8, 1, 8] {
            let mut x = b.clone();
            x[at] = sections;
            assert!(
                matches!(
                    LedgerRecord::decode(&x),
                    Err(LedgerError::Invalid {
                        field: "sections",
                        ..
                    })
                ),
                "sections {sections}"
            );
        }
    }

    #[test]
    fn a_discount_off_the_formula_is_named() {
        let mut s = staleness();
        s.entries[0].discount = 0.5;
        let e = s.check_discounts(9).unwrap_err();
        assert!(e.contains("entry 1") && e.contains("2 rounds late"), "{e}");
    }
}
