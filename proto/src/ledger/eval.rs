//! A record's evaluation section (ledger format 3): the round's federated
//! evaluation of `model_before` and its operator-held evaluation.
//!
//! A record without one encodes in format 2, byte for byte as before, so
//! chains written before evaluation existed still verify; a format-3
//! record carries one, after the reward root:
//! `flags u8 | devices u32 | weight f64 | loss f64 | accuracy f64 |
//! reports_root [32] | validation_examples u32 | validation_loss f64 |
//! validation_accuracy f64`, the numbers little-endian. A part a flag
//! says is absent is all zeros.

use super::{LedgerError, Reader};

/// Flag: devices reported (`devices`, `weight`, `loss`, `accuracy` and
/// `reports_root` are set).
pub const EVAL_FEDERATED: u8 = 1;
/// Flag: the operator's validation set gave a loss.
pub const EVAL_VALIDATION_LOSS: u8 = 2;
/// Flag: ... and an accuracy.
pub const EVAL_VALIDATION_ACCURACY: u8 = 4;
const EVAL_FLAGS_KNOWN: u8 = EVAL_FEDERATED | EVAL_VALIDATION_LOSS | EVAL_VALIDATION_ACCURACY;

/// The evaluation of a round's starting model.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerEvaluation {
    /// `EVAL_*` bits.
    pub flags: u8,
    /// Reports combined, their capped example counts, and the trimmed
    /// weighted means of what they claimed.
    pub devices: u32,
    pub weight: f64,
    pub loss: f64,
    pub accuracy: f64,
    /// [`super::merkle_root`] over the reports' leaves, `device key ||
    /// blake3 of the signed report`, in key order.
    pub reports_root: [u8; 32],
    pub validation_examples: u32,
    pub validation_loss: f64,
    pub validation_accuracy: f64,
}

/// One report's leaf in [`LedgerEvaluation::reports_root`].
pub fn report_leaf(device: &[u8; 32], report_hash: &[u8; 32]) -> Vec<u8> {
    [device.as_slice(), report_hash].concat()
}

impl LedgerEvaluation {
    pub(super) fn encode_into(&self, b: &mut Vec<u8>) {
        b.push(self.flags);
        b.extend_from_slice(&self.devices.to_le_bytes());
        for x in [self.weight, self.loss, self.accuracy] {
            b.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        b.extend_from_slice(&self.reports_root);
        b.extend_from_slice(&self.validation_examples.to_le_bytes());
        for x in [self.validation_loss, self.validation_accuracy] {
            b.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, LedgerError> {
        let flags = r.take(1, "evaluation flags")?[0];
        if flags & !EVAL_FLAGS_KNOWN != 0 {
            return Err(LedgerError::Invalid {
                field: "evaluation flags",
                reason: format!("unknown bits {flags:#04x}"),
            });
        }
        let u32_of = |r: &mut Reader<'_>, what| -> Result<u32, LedgerError> {
            Ok(u32::from_le_bytes(r.take(4, what)?.try_into().expect("4")))
        };
        let e = LedgerEvaluation {
            flags,
            devices: u32_of(r, "evaluation devices")?,
            weight: r.f64("evaluation weight")?,
            loss: r.f64("evaluation loss")?,
            accuracy: r.f64("evaluation accuracy")?,
            reports_root: r.h32("evaluation reports_root")?,
            validation_examples: u32_of(r, "evaluation validation_examples")?,
            validation_loss: r.f64("evaluation validation_loss")?,
            validation_accuracy: r.f64("evaluation validation_accuracy")?,
        };
        e.check()?;
        Ok(e)
    }

    /// What no aggregator writes: a loss below zero, an accuracy outside
    /// [0, 1], a flag without its values, values without their flag.
    fn check(&self) -> Result<(), LedgerError> {
        let bad = |field, reason: &str| {
            Err(LedgerError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        let fed = self.flags & EVAL_FEDERATED != 0;
        if fed != (self.devices > 0) || fed != (self.weight > 0.0) {
            return bad(
                "evaluation devices",
                "the federated flag, the report count and their weight disagree",
            );
        }
        if !fed && (self.loss != 0.0 || self.accuracy != 0.0 || self.reports_root != [0; 32]) {
            return bad("evaluation loss", "set without reports");
        }
        if self.loss < 0.0 || self.validation_loss < 0.0 {
            return bad("evaluation loss", "negative");
        }
        if !(0.0..=1.0).contains(&self.accuracy) || !(0.0..=1.0).contains(&self.validation_accuracy)
        {
            return bad("evaluation accuracy", "not a fraction in [0, 1]");
        }
        let vloss = self.flags & EVAL_VALIDATION_LOSS != 0;
        let vacc = self.flags & EVAL_VALIDATION_ACCURACY != 0;
        if vloss != (self.validation_examples > 0) || (vacc && !vloss) {
            return bad(
                "evaluation validation_examples",
                "the validation flags and the example count disagree",
            );
        }
        if (!vloss && self.validation_loss != 0.0) || (!vacc && self.validation_accuracy != 0.0) {
            return bad("evaluation validation_loss", "set without its flag");
        }
        if self.flags == 0 {
            return bad("evaluation flags", "an empty evaluation is written as none");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_every_byte_counts, record};
    use super::super::{LedgerRecord, merkle_root};
    use super::*;

    fn evaluation() -> LedgerEvaluation {
        LedgerEvaluation {
            flags: EVAL_FEDERATED | EVAL_VALIDATION_LOSS | EVAL_VALIDATION_ACCURACY,
            devices: 2,
            weight: 300.0,
            loss: 0.4,
            accuracy: 0.88,
            reports_root: merkle_root(&[report_leaf(&[1; 32], &[2; 32])]),
            validation_examples: 1000,
            validation_loss: 0.38,
            validation_accuracy: 0.9,
        }
    }

    #[test]
    fn a_record_without_evaluation_is_format_2_and_one_with_it_format_3() {
        let plain = record();
        assert_eq!(&plain.encode()[..8], b"fedgeLR2");
        let mut r = record();
        r.evaluation = Some(evaluation());
        let b = r.encode();
        assert_eq!(&b[..8], b"fedgeLR3");
        // The evaluation is covered by the hash (and so the signature).
        assert_ne!(r.hash(), plain.hash());
        assert_every_byte_counts(&r);
        // A format-2 magic on format-3 bytes leaves trailing bytes.
        let mut v2 = b.clone();
        v2[7] = b'2';
        assert!(LedgerRecord::decode(&v2).is_err());
    }

    #[test]
    fn impossible_evaluations_are_refused() {
        let mut cases = Vec::new();
        let mut e = evaluation();
        e.accuracy = 1.5;
        cases.push(e);
        let mut e = evaluation();
        e.loss = -0.1;
        cases.push(e);
        let mut e = evaluation();
        e.devices = 0;
        cases.push(e);
        let mut e = evaluation();
        e.flags = EVAL_VALIDATION_ACCURACY;
        cases.push(e);
        let mut e = evaluation();
        e.flags = 0x40 | EVAL_FEDERATED;
        cases.push(e);
        let mut e = evaluation();
        e.validation_examples = 0;
        cases.push(e);
        let mut e = evaluation();
        e.flags = EVAL_FEDERATED;
        cases.push(e);
        for (i, e) in cases.into_iter().enumerate() {
            let mut r = record();
            r.evaluation = Some(e);
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
