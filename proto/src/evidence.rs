//! Evidence of equivocation: two different updates one device signed for
//! the same task. Either manifest alone is an ordinary signed update;
//! together they prove the device said two things where it may say one
//! (the "double signing" evidence of proof-of-stake chains). The
//! aggregator keeps the encoded pair as the evidence of a
//! [`crate::ledger::PENALTY_EQUIVOCATION`] penalty; anyone holding it
//! checks it with [`Equivocation::check`] and nothing else.
//!
//! Encoding: the magic `fedgeEQ1`, then for each manifest its wire bytes
//! (length as u32 little-endian, then the prost encoding) and its 64-byte
//! Ed25519 signature.
//!
//! **Invariant:** decoding is total: any byte string is either a pair of
//! well-formed manifests or a typed [`EvidenceError`].

use prost::Message;

use crate::Limits;
use crate::sign::UpdateManifest;
use crate::wire;

const MAGIC: &[u8; 8] = b"fedgeEQ1";

/// A manifest with the device's signature over it.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedManifest {
    pub manifest: UpdateManifest,
    pub signature: [u8; 64],
}

impl SignedManifest {
    /// [`UpdateManifest::signed_hash`]: what the ledger names.
    pub fn hash(&self) -> [u8; 32] {
        self.manifest.signed_hash(&self.signature)
    }

    /// `len u32 | manifest (canonical wire bytes) | signature [64]`: one
    /// half of an [`Equivocation`], and what an aggregator keeps with an
    /// accepted update so a restart does not forget what was signed.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let m = self.manifest.to_wire().encode_to_vec();
        let len = u32::try_from(m.len()).expect("a manifest under 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&m);
        out.extend_from_slice(&self.signature);
    }

    /// Decodes [`SignedManifest::encode_into`]'s bytes, all of them (the
    /// manifest validated against `limits`; the signature is not checked).
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, EvidenceError> {
        let (s, rest) = signed_manifest(bytes, "signed", limits)?;
        if !rest.is_empty() {
            return Err(EvidenceError::Trailing(rest.len()));
        }
        Ok(s)
    }
}

/// Two signed manifests of one device for one task.
#[derive(Clone, Debug, PartialEq)]
pub struct Equivocation {
    pub first: SignedManifest,
    pub second: SignedManifest,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvidenceError {
    #[error("evidence is truncated: {0}")]
    Truncated(&'static str),
    #[error("evidence does not start with the equivocation magic")]
    BadMagic,
    #[error("evidence has {0} trailing bytes")]
    Trailing(usize),
    #[error("{which} manifest does not decode: {reason}")]
    Manifest { which: &'static str, reason: String },
    #[error("not an equivocation: {0}")]
    NotEquivocation(String),
}

impl Equivocation {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        self.first.encode_into(&mut out);
        self.second.encode_into(&mut out);
        out
    }

    /// Decodes (each manifest validated against `limits`, as when it
    /// arrived); [`Equivocation::check`] says whether it proves anything.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, EvidenceError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(EvidenceError::BadMagic)?;
        let (first, rest) = signed_manifest(rest, "first", limits)?;
        let (second, rest) = signed_manifest(rest, "second", limits)?;
        if !rest.is_empty() {
            return Err(EvidenceError::Trailing(rest.len()));
        }
        Ok(Equivocation { first, second })
    }

    /// Whether the pair proves equivocation: both signatures verify under
    /// the key the manifests name (one key), both are for the same
    /// federation, round and model, and they name different payloads.
    pub fn check(&self) -> Result<(), EvidenceError> {
        let (a, b) = (&self.first.manifest, &self.second.manifest);
        let no = |why: &str| Err(EvidenceError::NotEquivocation(why.into()));
        if a.device_public_key != b.device_public_key {
            return no("the manifests name different devices");
        }
        for (s, which) in [(&self.first, "first"), (&self.second, "second")] {
            if s.manifest.verify(&s.signature).is_err() {
                return Err(EvidenceError::NotEquivocation(format!(
                    "the {which} manifest's signature does not verify"
                )));
            }
        }
        if a.federation_id != b.federation_id {
            return no("the manifests are for different federations");
        }
        if a.round_id != b.round_id || a.model_version != b.model_version {
            return no("the manifests answer different tasks");
        }
        if a.payload_hash == b.payload_hash {
            return no("the manifests name the same payload");
        }
        Ok(())
    }
}

fn signed_manifest<'a>(
    b: &'a [u8],
    which: &'static str,
    limits: &Limits,
) -> Result<(SignedManifest, &'a [u8]), EvidenceError> {
    let truncated = EvidenceError::Truncated(which);
    let (len, b) = b.split_first_chunk::<4>().ok_or(truncated.clone())?;
    let len = u32::from_le_bytes(*len) as usize;
    if b.len() < len + 64 {
        return Err(truncated);
    }
    let (m, b) = b.split_at(len);
    let (sig, b) = b.split_at(64);
    let bad = |reason: String| EvidenceError::Manifest { which, reason };
    let w = wire::UpdateManifest::decode(m).map_err(|e| bad(e.to_string()))?;
    let manifest = UpdateManifest::from_wire(w, limits).map_err(|e| bad(e.to_string()))?;
    // The canonical encoding: bytes that decode but do not re-encode the
    // same would let one manifest take two hashes.
    if manifest.to_wire().encode_to_vec() != m {
        return Err(bad("not in canonical encoding".into()));
    }
    Ok((
        SignedManifest {
            manifest,
            signature: sig.try_into().expect("64 bytes"),
        },
        b,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelVersion;
    use ed25519_dalek::SigningKey;

    fn signed(key: &SigningKey, payload: u8) -> SignedManifest {
        let manifest = UpdateManifest {
            round_id: 4,
            model_version: ModelVersion([9; 32]),
            payload_hash: [payload; 32],
            payload_bytes: 100,
            sample_count: 10,
            metrics: vec![("loss".into(), 0.5)],
            device_public_key: key.verifying_key(),
            federation_id: [3; 32],
            partial: None,
        };
        let signature = manifest.sign(key);
        SignedManifest {
            manifest,
            signature,
        }
    }

    #[test]
    fn two_payloads_for_one_task_prove_equivocation_and_nothing_else_does() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let e = Equivocation {
            first: signed(&key, 1),
            second: signed(&key, 2),
        };
        let limits = Limits::default();
        let bytes = e.encode();
        let back = Equivocation::decode(&bytes, &limits).unwrap();
        assert_eq!(back, e);
        back.check().unwrap();

        // The same payload twice is a resend, not an equivocation.
        let same = Equivocation {
            first: signed(&key, 1),
            second: signed(&key, 1),
        };
        assert!(same.check().is_err());
        // Two devices, or another task, or a forged signature: no proof.
        let other = SigningKey::from_bytes(&[2; 32]);
        let two = Equivocation {
            first: signed(&key, 1),
            second: signed(&other, 2),
        };
        assert!(two.check().is_err());
        let mut later = e.clone();
        later.second.manifest.round_id = 5;
        later.second.signature = later.second.manifest.sign(&key);
        assert!(later.check().is_err());
        let mut forged = e.clone();
        forged.second.signature[0] ^= 1;
        assert!(forged.check().is_err());

        // Every truncation and every flipped byte is refused or no longer
        // proves this equivocation.
        for n in 0..bytes.len() {
            assert!(Equivocation::decode(&bytes[..n], &limits).is_err(), "{n}");
        }
        for i in 0..bytes.len() {
            let mut x = bytes.clone();
            x[i] ^= 0x01;
            if let Ok(d) = Equivocation::decode(&x, &limits) {
                assert!(
                    d.check().is_err()
                        || (d.first.hash(), d.second.hash()) != (e.first.hash(), e.second.hash()),
                    "byte {i}"
                );
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Equivocation::decode(&longer, &limits),
            Err(EvidenceError::Trailing(1))
        );
    }
}
