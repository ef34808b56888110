//! Evaluation tasks: what a device reports after evaluating a model on its
//! own held-out data, and how it is signed.
//!
//! The device signs `"fedge-eval-v1" || encoded(EvalManifest)`: the
//! manifest names the round, the model evaluated and the federation, so a
//! signed report cannot be moved to another round, model or aggregator,
//! and an update signature (another domain) is never a valid report.
//! Every number in it is a claim; decoding refuses what no honest device
//! can claim (a non-finite or negative loss, an accuracy outside [0, 1],
//! no examples), and the aggregator bounds the weight of the rest.

use ed25519_dalek::Signer;
use prost::Message;

use crate::sign::{
    SigningKey, VerifyingKey, hash32, public_key, signature64, signed_message_hash, verify_signed,
};
use crate::{ModelVersion, ProtoError, wire};

const EVAL_DOMAIN: &[u8] = b"fedge-eval-v1";

/// The signed result of one evaluation task.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalManifest {
    pub round_id: u64,
    pub model_version: ModelVersion,
    /// Held-out examples evaluated (a claim).
    pub examples: u64,
    /// Their mean loss.
    pub loss: f64,
    /// The fraction of them predicted right.
    pub accuracy: f64,
    pub device_public_key: VerifyingKey,
    pub federation_id: [u8; 32],
}

/// A device's evaluation report: the manifest and its signature.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub manifest: EvalManifest,
    pub signature: [u8; 64],
}

impl EvalManifest {
    pub fn to_wire(&self) -> wire::EvalManifest {
        wire::EvalManifest {
            round_id: self.round_id,
            model_version: self.model_version.0.to_vec().into(),
            examples: self.examples,
            loss: self.loss,
            accuracy: self.accuracy,
            device_public_key: self.device_public_key.to_bytes().to_vec().into(),
            federation_id: self.federation_id.to_vec().into(),
        }
    }

    pub fn from_wire(w: wire::EvalManifest) -> Result<Self, ProtoError> {
        let invalid = |reason: String| ProtoError::Invalid {
            field: "eval_manifest",
            reason,
        };
        if !(w.loss.is_finite() && w.loss >= 0.0) {
            return Err(invalid(format!(
                "loss {} is not a finite, non-negative number",
                w.loss
            )));
        }
        if !(0.0..=1.0).contains(&w.accuracy) {
            return Err(invalid(format!(
                "accuracy {} is not a fraction in [0, 1]",
                w.accuracy
            )));
        }
        if w.examples == 0 {
            return Err(invalid("evaluated on no examples".into()));
        }
        Ok(EvalManifest {
            round_id: w.round_id,
            model_version: ModelVersion::from_slice(
                "eval_manifest.model_version",
                &w.model_version,
            )?,
            examples: w.examples,
            loss: w.loss,
            accuracy: w.accuracy,
            device_public_key: public_key("eval_manifest.device_public_key", &w.device_public_key)?,
            federation_id: hash32("eval_manifest.federation_id", &w.federation_id)?,
        })
    }

    fn signing_bytes(&self) -> Vec<u8> {
        [EVAL_DOMAIN, &self.to_wire().encode_to_vec()].concat()
    }

    pub fn sign(&self, key: &SigningKey) -> [u8; 64] {
        key.sign(&self.signing_bytes()).to_bytes()
    }

    /// blake3 of the signed report (the signed bytes, then the signature):
    /// what the ledger records of it.
    pub fn signed_hash(&self, signature: &[u8; 64]) -> [u8; 32] {
        signed_message_hash(
            "fedge signed evaluation v1",
            &self.signing_bytes(),
            signature,
        )
    }

    /// Strict Ed25519 verification against the key named in the manifest.
    pub fn verify(&self, signature: &[u8; 64]) -> Result<(), ProtoError> {
        verify_signed(&self.device_public_key, &self.signing_bytes(), signature)
    }
}

impl EvalReport {
    pub(super) fn to_wire(&self) -> wire::EvalReport {
        wire::EvalReport {
            manifest: Some(self.manifest.to_wire()),
            signature: self.signature.to_vec().into(),
        }
    }

    pub(super) fn from_wire(w: wire::EvalReport) -> Result<Self, ProtoError> {
        Ok(EvalReport {
            manifest: EvalManifest::from_wire(
                w.manifest
                    .ok_or(ProtoError::MissingField("eval_report.manifest"))?,
            )?,
            signature: signature64("eval_report.signature", &w.signature)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::UpdateManifest;

    fn manifest(k: &SigningKey) -> EvalManifest {
        EvalManifest {
            round_id: 4,
            model_version: ModelVersion([3; 32]),
            examples: 200,
            loss: 0.31,
            accuracy: 0.9,
            device_public_key: k.verifying_key(),
            federation_id: [5; 32],
        }
    }

    #[test]
    fn a_report_verifies_and_any_change_breaks_it() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let m = manifest(&k);
        let sig = m.sign(&k);
        assert_eq!(m.verify(&sig), Ok(()));
        let mut lie = m.clone();
        lie.accuracy = 0.99;
        assert_eq!(lie.verify(&sig), Err(ProtoError::BadSignature));
        let mut other_round = m.clone();
        other_round.round_id = 5;
        assert_eq!(other_round.verify(&sig), Err(ProtoError::BadSignature));
        let mut other_fed = m.clone();
        other_fed.federation_id = [6; 32];
        assert_eq!(other_fed.verify(&sig), Err(ProtoError::BadSignature));
        // Another key cannot sign for this device.
        let forged = m.sign(&SigningKey::from_bytes(&[2; 32]));
        assert_eq!(m.verify(&forged), Err(ProtoError::BadSignature));
    }

    #[test]
    fn an_update_signature_is_not_a_report() {
        // Domain separation: the same key signing an update whose wire bytes
        // were crafted to equal a report's still fails as a report.
        let k = SigningKey::from_bytes(&[1; 32]);
        let m = manifest(&k);
        let as_update = UpdateManifest {
            round_id: m.round_id,
            model_version: m.model_version,
            payload_hash: [0; 32],
            payload_bytes: 0,
            sample_count: 0,
            metrics: vec![],
            device_public_key: m.device_public_key,
            federation_id: m.federation_id,
            partial: None,
        };
        let sig = as_update.sign(&k);
        assert_eq!(m.verify(&sig), Err(ProtoError::BadSignature));
    }

    #[test]
    fn impossible_claims_are_refused_when_decoded() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let good = manifest(&k).to_wire();
        assert!(EvalManifest::from_wire(good.clone()).is_ok());
        for (loss, accuracy, examples) in [
            (f64::NAN, 0.5, 10),
            (f64::INFINITY, 0.5, 10),
            (-0.1, 0.5, 10),
            (0.3, 1.5, 10),
            (0.3, -0.01, 10),
            (0.3, f64::NAN, 10),
            (0.3, 0.5, 0),
        ] {
            let w = wire::EvalManifest {
                loss,
                accuracy,
                examples,
                ..good.clone()
            };
            let e = EvalManifest::from_wire(w).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProtoError::Invalid {
                        field: "eval_manifest",
                        ..
                    }
                ),
                "{loss} {accuracy} {examples}: {e}"
            );
        }
        let short = wire::EvalManifest {
            model_version: vec![1; 5].into(),
            ..good
        };
        assert!(matches!(
            EvalManifest::from_wire(short),
            Err(ProtoError::BadLength { .. })
        ));
    }
}
