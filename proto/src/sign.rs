//! What devices sign, and how the aggregator checks it.
//!
//! - Authentication: `"fedge-auth-v1" || nonce || tls_binding`, where
//!   `tls_binding` is exported from the TLS session, so a signature is
//!   worthless on any other connection.
//! - Updates: `"fedge-update-v1" || encoded(UpdateManifest)`; the manifest
//!   names the round, the model version and the payload hash, so a signed
//!   update cannot be moved to another round, model or payload.

use ed25519_dalek::Signer;
pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use prost::Message;

use crate::{Limits, ModelVersion, ProtoError, wire};

const AUTH_DOMAIN: &[u8] = b"fedge-auth-v1";
const UPDATE_DOMAIN: &[u8] = b"fedge-update-v1";

/// TLS exporter label used to bind authentication to the session.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-fedge-auth";

pub fn auth_message(nonce: &[u8; 32], tls_binding: &[u8; 32]) -> Vec<u8> {
    [AUTH_DOMAIN, nonce, tls_binding].concat()
}

pub fn sign_auth(key: &SigningKey, nonce: &[u8; 32], tls_binding: &[u8; 32]) -> [u8; 64] {
    key.sign(&auth_message(nonce, tls_binding)).to_bytes()
}

pub fn verify_auth(
    key: &VerifyingKey,
    nonce: &[u8; 32],
    tls_binding: &[u8; 32],
    signature: &[u8; 64],
) -> Result<(), ProtoError> {
    key.verify_strict(
        &auth_message(nonce, tls_binding),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| ProtoError::BadSignature)
}

/// blake3 (key derivation, `context`) of signed bytes and their
/// signature: what the ledger records of a signed message.
pub(crate) fn signed_message_hash(context: &str, signed: &[u8], signature: &[u8; 64]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(context);
    h.update(signed);
    h.update(signature);
    *h.finalize().as_bytes()
}

/// Strict Ed25519 verification (RFC 8032 plus the checks of
/// `verify_strict`: small-order keys and non-canonical or small-order `R`
/// are refused, so one signature cannot verify for many messages).
pub(crate) fn verify_signed(
    key: &VerifyingKey,
    signed: &[u8],
    signature: &[u8; 64],
) -> Result<(), ProtoError> {
    key.verify_strict(signed, &Signature::from_bytes(signature))
        .map_err(|_| ProtoError::BadSignature)
}

/// Parse a 32-byte Ed25519 public key.
pub fn public_key(field: &'static str, b: &[u8]) -> Result<VerifyingKey, ProtoError> {
    let arr: [u8; 32] = b.try_into().map_err(|_| ProtoError::BadLength {
        field,
        expected: 32,
        got: b.len(),
    })?;
    VerifyingKey::from_bytes(&arr).map_err(|e| ProtoError::Invalid {
        field,
        reason: format!("not an Ed25519 public key: {e}"),
    })
}

pub fn hash32(field: &'static str, b: &[u8]) -> Result<[u8; 32], ProtoError> {
    b.try_into().map_err(|_| ProtoError::BadLength {
        field,
        expected: 32,
        got: b.len(),
    })
}

pub fn signature64(field: &'static str, b: &[u8]) -> Result<[u8; 64], ProtoError> {
    b.try_into().map_err(|_| ProtoError::BadLength {
        field,
        expected: 64,
        got: b.len(),
    })
}

/// The signed description of an update.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateManifest {
    pub round_id: u64,
    pub model_version: ModelVersion,
    pub payload_hash: [u8; 32],
    pub payload_bytes: u64,
    pub sample_count: u64,
    pub metrics: Vec<(String, f64)>,
    pub device_public_key: VerifyingKey,
    /// The federation the update is for (see [`federation_id`]): an update
    /// signed for one aggregator does not verify at another.
    pub federation_id: [u8; 32],
    /// Present when a leaf aggregator signs its round's partial aggregate
    /// for its parent (see [`PartialAggregate`]); None for a device's update.
    pub partial: Option<PartialAggregate>,
}

/// What a leaf aggregator claims about the partial aggregate it forwards:
/// the payload is its devices' combined update (their weighted mean
/// delta), `total_weight` the sum of their final weights, so a parent
/// that weights each partial by it gets the same mean as one aggregator
/// over all the devices. Checked on the way in: the weight finite and
/// positive, at least one device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartialAggregate {
    pub total_weight: f64,
    pub devices: u32,
    /// [`crate::ledger::merkle_root`] of the combined updates'
    /// signed-manifest hashes ([`UpdateManifest::signed_hash`]), in the
    /// order they were combined.
    pub manifests_root: [u8; 32],
}

impl PartialAggregate {
    pub fn to_wire(&self) -> wire::PartialAggregate {
        wire::PartialAggregate {
            total_weight: self.total_weight,
            devices: self.devices,
            manifests_root: self.manifests_root.to_vec().into(),
        }
    }

    pub fn from_wire(w: wire::PartialAggregate) -> Result<Self, ProtoError> {
        if !(w.total_weight.is_finite() && w.total_weight > 0.0) {
            return Err(ProtoError::Invalid {
                field: "manifest.partial.total_weight",
                reason: format!("must be finite and positive, got {}", w.total_weight),
            });
        }
        if w.devices == 0 {
            return Err(ProtoError::Invalid {
                field: "manifest.partial.devices",
                reason: "a partial aggregate combines at least one update".into(),
            });
        }
        Ok(PartialAggregate {
            total_weight: w.total_weight,
            devices: w.devices,
            manifests_root: hash32("manifest.partial.manifests_root", &w.manifests_root)?,
        })
    }
}

/// A federation's id: blake3 (in key-derivation mode, context
/// `"fedge federation v1"`) of its configured name and the SHA-256
/// fingerprint of the aggregator's TLS certificate. Two aggregators serving
/// the same model under different certificates or names have different ids.
pub fn federation_id(name: &str, cert_fingerprint: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("fedge federation v1");
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(cert_fingerprint);
    *h.finalize().as_bytes()
}

impl UpdateManifest {
    pub fn to_wire(&self) -> wire::UpdateManifest {
        wire::UpdateManifest {
            round_id: self.round_id,
            model_version: self.model_version.0.to_vec().into(),
            payload_hash: self.payload_hash.to_vec().into(),
            payload_bytes: self.payload_bytes,
            sample_count: self.sample_count,
            metrics: self
                .metrics
                .iter()
                .map(|(n, v)| wire::Metric {
                    name: n.clone(),
                    value: *v,
                })
                .collect(),
            device_public_key: self.device_public_key.to_bytes().to_vec().into(),
            federation_id: self.federation_id.to_vec().into(),
            partial: self.partial.map(|p| p.to_wire()),
        }
    }

    pub fn from_wire(w: wire::UpdateManifest, limits: &Limits) -> Result<Self, ProtoError> {
        Limits::check(
            "metric count",
            w.metrics.len() as u64,
            limits.metrics_max.into(),
        )?;
        let mut metrics = Vec::with_capacity(w.metrics.len());
        for m in w.metrics {
            Limits::check(
                "metric name length",
                m.name.len() as u64,
                limits.string_bytes_max.into(),
            )?;
            if !m.value.is_finite() {
                return Err(ProtoError::Invalid {
                    field: "manifest.metrics",
                    reason: format!("metric `{}` is not finite", m.name),
                });
            }
            metrics.push((m.name, m.value));
        }
        let max_payload = u64::from(limits.chunk_bytes_max) * u64::from(limits.transfer_chunks_max);
        Limits::check("update payload bytes", w.payload_bytes, max_payload)?;
        Ok(UpdateManifest {
            round_id: w.round_id,
            model_version: ModelVersion::from_slice("manifest.model_version", &w.model_version)?,
            payload_hash: hash32("manifest.payload_hash", &w.payload_hash)?,
            payload_bytes: w.payload_bytes,
            sample_count: w.sample_count,
            metrics,
            device_public_key: public_key("manifest.device_public_key", &w.device_public_key)?,
            federation_id: hash32("manifest.federation_id", &w.federation_id)?,
            partial: w.partial.map(PartialAggregate::from_wire).transpose()?,
        })
    }

    fn signing_bytes(&self) -> Vec<u8> {
        [UPDATE_DOMAIN, &self.to_wire().encode_to_vec()].concat()
    }

    pub fn sign(&self, key: &SigningKey) -> [u8; 64] {
        key.sign(&self.signing_bytes()).to_bytes()
    }

    /// blake3 of the signed manifest (the signed bytes, then the
    /// signature): what the contribution ledger records as the evidence of
    /// what a device sent.
    pub fn signed_hash(&self, signature: &[u8; 64]) -> [u8; 32] {
        signed_message_hash("fedge signed manifest v1", &self.signing_bytes(), signature)
    }

    /// Verify against the key named in the manifest, strictly (see
    /// [`verify_signed`]).
    pub fn verify(&self, signature: &[u8; 64]) -> Result<(), ProtoError> {
        verify_signed(&self.device_public_key, &self.signing_bytes(), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn manifest(k: &SigningKey) -> UpdateManifest {
        UpdateManifest {
            round_id: 3,
            model_version: ModelVersion([7; 32]),
            payload_hash: [9; 32],
            payload_bytes: 100,
            sample_count: 42,
            metrics: vec![("loss".into(), 0.5)],
            device_public_key: k.verifying_key(),
            federation_id: [5; 32],
            partial: None,
        }
    }

    #[test]
    fn manifest_signature_binds_every_field() {
        let k = key(1);
        let m = manifest(&k);
        let sig = m.sign(&k);
        assert_eq!(m.verify(&sig), Ok(()));
        let back = UpdateManifest::from_wire(m.to_wire(), &Limits::default()).unwrap();
        assert_eq!(back.verify(&sig), Ok(()));
        for tamper in [
            |m: &mut UpdateManifest| m.round_id += 1,
            |m: &mut UpdateManifest| m.model_version.0[0] ^= 1,
            |m: &mut UpdateManifest| m.payload_hash[0] ^= 1,
            |m: &mut UpdateManifest| m.sample_count += 1,
            |m: &mut UpdateManifest| m.federation_id[31] ^= 1,
            |m: &mut UpdateManifest| {
                m.partial = Some(PartialAggregate {
                    total_weight: 1.0,
                    devices: 1,
                    manifests_root: [0; 32],
                })
            },
        ] {
            let mut t = m.clone();
            tamper(&mut t);
            assert_eq!(t.verify(&sig), Err(ProtoError::BadSignature));
        }
        let mut other = m.clone();
        other.device_public_key = key(2).verifying_key();
        assert_eq!(other.verify(&sig), Err(ProtoError::BadSignature));
    }

    #[test]
    fn federation_ids_differ_by_name_and_certificate() {
        let a = federation_id("mnist", &[1; 32]);
        assert_eq!(a, federation_id("mnist", &[1; 32]));
        assert_ne!(a, federation_id("mnist", &[2; 32]));
        assert_ne!(a, federation_id("mnist2", &[1; 32]));
        // The name's length is hashed: no name/fingerprint boundary games.
        assert_ne!(
            federation_id("", &[1; 32]),
            federation_id("\u{1}", &[1; 32])
        );
    }

    #[test]
    fn auth_is_bound_to_nonce_and_session() {
        let k = key(4);
        let sig = sign_auth(&k, &[1; 32], &[2; 32]);
        assert!(verify_auth(&k.verifying_key(), &[1; 32], &[2; 32], &sig).is_ok());
        assert!(verify_auth(&k.verifying_key(), &[1; 32], &[3; 32], &sig).is_err());
        assert!(verify_auth(&k.verifying_key(), &[0; 32], &[2; 32], &sig).is_err());
    }

    /// A small-order public key (the identity point) with the signature
    /// R = identity, s = 0 "verifies" any message under cofactorless
    /// non-strict verification (Chalkias, Garillot, Nikolaenko, "Taming the
    /// many EdDSAs", SSR 2020, test vector 0). Both checks must refuse it.
    #[test]
    fn small_order_keys_are_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).expect("the identity point decodes");
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&identity);
        assert!(
            weak.verify(b"any message", &Signature::from_bytes(&sig))
                .is_ok(),
            "the vector verifies non-strictly"
        );
        assert_eq!(
            verify_auth(&weak, &[3; 32], &[4; 32], &sig),
            Err(ProtoError::BadSignature)
        );
        let mut m = manifest(&key(1));
        m.device_public_key = weak;
        assert_eq!(m.verify(&sig), Err(ProtoError::BadSignature));
    }
}
