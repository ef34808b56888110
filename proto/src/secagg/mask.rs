//! Key agreement, key derivation, mask expansion and the share channel.
//!
//! - **Key agreement**: X25519 (RFC 7748) through `x25519-dalek`. Each
//!   device has two key pairs per round, as in Bell et al. (and Bonawitz et
//!   al., CCS 2017): `c` keys the pairwise channel its shares travel on,
//!   `s` keys the pairwise masks. Only `s` secrets are ever reconstructed
//!   (for devices that drop after sharing), so the server never learns a
//!   channel key. A shared secret that is not contributory (the peer sent
//!   a low-order point) is refused.
//! - **Key derivation**: BLAKE3 in key-derivation mode
//!   (`blake3::derive_key`, a context string per purpose), binding the
//!   round and the two device indices, so no derived key is used for two
//!   purposes, two rounds or two directions.
//! - **Mask expansion** (the PRG of the papers): ChaCha20 (RFC 8439's
//!   block function, through `rand_chacha::ChaCha20Rng`) keyed by the
//!   derived key; each coordinate takes the low b bits of one 64-bit
//!   output, which is exactly uniform on Z_{2^b}.
//! - **Share channel**: ChaCha20-Poly1305 (RFC 8439) keyed per (round,
//!   sender, recipient); each key seals exactly one message, so the nonce
//!   is fixed at zero.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use super::SecAggError;

/// An X25519 key pair.
pub struct KeyPair {
    pub secret: StaticSecret,
    pub public: [u8; 32],
}

impl KeyPair {
    /// A key pair from 32 bytes of the device's randomness (clamped by
    /// X25519 itself).
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }
}

/// X25519(secret, peer): the shared secret, refused when not contributory.
pub fn agree(
    secret: &StaticSecret,
    peer_public: &[u8; 32],
    peer: u32,
) -> Result<[u8; 32], SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(SecAggError::NonContributoryKey { peer });
    }
    Ok(shared.to_bytes())
}

fn derive(context: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(context);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// The seed of the pairwise mask between devices `a` and `b` (symmetric).
pub fn pairwise_seed(shared: &[u8; 32], round: u64, a: u32, b: u32) -> [u8; 32] {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    derive(
        "fedge secagg v1 pairwise mask",
        &[
            shared,
            &round.to_le_bytes(),
            &lo.to_le_bytes(),
            &hi.to_le_bytes(),
        ],
    )
}

/// The seed of a device's self mask, from its secret self-mask seed.
pub fn self_seed(seed: &[u8; 32], round: u64) -> [u8; 32] {
    derive("fedge secagg v1 self mask", &[seed, &round.to_le_bytes()])
}

/// The AEAD key for the one message `from` sends `to` in `round`.
pub fn channel_key(shared: &[u8; 32], round: u64, from: u32, to: u32) -> [u8; 32] {
    derive(
        "fedge secagg v1 share channel",
        &[
            shared,
            &round.to_le_bytes(),
            &from.to_le_bytes(),
            &to.to_le_bytes(),
        ],
    )
}

/// `2^bits - 1` (bits in 1..=64).
pub fn ring_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Add (or subtract, with `negate`) the mask expanded from `seed` to
/// `values`, in Z_{2^bits}.
pub fn apply_mask(seed: &[u8; 32], bits: u32, negate: bool, values: &mut [u64]) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let m = ring_mask(bits);
    for v in values {
        let r = rng.next_u64();
        *v = if negate {
            v.wrapping_sub(r)
        } else {
            v.wrapping_add(r)
        } & m;
    }
}

/// Seal `plaintext` under a one-use `key`.
pub fn seal(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(Nonce::from_slice(&[0u8; 12]), plaintext)
        .expect("ChaCha20-Poly1305 seals any message under 256 GiB")
}

/// Open what [`seal`] made; a wrong key or a changed byte is an error.
pub fn open(key: &[u8; 32], ciphertext: &[u8], from: u32) -> Result<Vec<u8>, SecAggError> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(Nonce::from_slice(&[0u8; 12]), ciphertext)
        .map_err(|_| SecAggError::ShareUnreadable { from })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// RFC 7748, section 6.1 (Curve25519 Diffie-Hellman), through our
    /// wrappers.
    #[test]
    fn x25519_matches_rfc7748_section_6_1() {
        let alice = KeyPair::from_bytes(unhex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = KeyPair::from_bytes(unhex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            alice.public,
            unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            bob.public,
            unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let k = unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(agree(&alice.secret, &bob.public, 1).unwrap(), k);
        assert_eq!(agree(&bob.secret, &alice.public, 0).unwrap(), k);
    }

    #[test]
    fn low_order_points_are_refused() {
        let a = KeyPair::from_bytes([9; 32]);
        // The identity (u = 0) and u = 1 are of small order.
        assert_eq!(
            agree(&a.secret, &[0; 32], 3),
            Err(SecAggError::NonContributoryKey { peer: 3 })
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            agree(&a.secret, &one, 4),
            Err(SecAggError::NonContributoryKey { peer: 4 })
        );
    }

    #[test]
    fn masks_cancel_and_the_channel_authenticates() {
        let seed = [5u8; 32];
        let mut v = vec![1u64, 2, 3, 1 << 20];
        apply_mask(&seed, 20, false, &mut v);
        assert!(v.iter().all(|&x| x < 1 << 20));
        apply_mask(&seed, 20, true, &mut v);
        assert_eq!(v, vec![1, 2, 3, 0]);
        assert_eq!(pairwise_seed(&seed, 1, 2, 9), pairwise_seed(&seed, 1, 9, 2));
        assert_ne!(channel_key(&seed, 1, 2, 9), channel_key(&seed, 1, 9, 2));
        let key = channel_key(&seed, 1, 2, 9);
        let mut ct = seal(&key, b"share");
        assert_eq!(open(&key, &ct, 2).unwrap(), b"share");
        ct[0] ^= 1;
        assert_eq!(
            open(&key, &ct, 2),
            Err(SecAggError::ShareUnreadable { from: 2 })
        );
    }
}
