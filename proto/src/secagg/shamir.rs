//! Shamir secret sharing (Shamir, "How to share a secret", CACM 1979) of
//! 32-byte secrets, byte by byte over GF(2^8).
//!
//! **Why our own and not `vsss-rs`.** SecAgg+ shares two 32-byte secrets
//! per device (its self-mask seed and its X25519 mask key) among at most
//! k ~ O(log n) neighbours. `vsss-rs` shares elements of an elliptic-curve
//! scalar field (one share per field element, generic over `elliptic-curve`
//! traits), which would need a 32-byte secret mapped into and out of a
//! ~252-bit field and the `elliptic-curve` stack for nothing we use. The
//! byte-wise GF(2^8) construction (as HashiCorp Vault's `shamir` package
//! does) shares any 32 bytes exactly, limits a dealer to 255 holders (the
//! x-coordinates 1..=255; our neighbourhoods are far smaller), and is short
//! enough to read in full. Multiplication is a constant-time shift-and-add
//! (no log/exp tables whose lookups leak through the cache), inversion is
//! `a^254`.
//!
//! Field: GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1 (0x11b).

use rand_chacha::rand_core::RngCore;

/// Bytes in a shared secret.
pub const SECRET_BYTES: usize = 32;

/// One holder's share: its x-coordinate (1..=255) and the 32 evaluations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub x: u8,
    pub y: [u8; SECRET_BYTES],
}

/// Why shares did not reconstruct.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("{have} shares, {threshold} needed")]
    TooFewShares { have: usize, threshold: usize },
    #[error("share x-coordinate {x} is 0 or repeated")]
    BadX { x: u8 },
    #[error("threshold {threshold} is not in 1..={holders} (holders)")]
    BadThreshold { threshold: usize, holders: usize },
}

/// Constant-time multiplication in GF(2^8) mod 0x11b.
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (carry & 0x1b);
        b >>= 1;
    }
    p
}

/// a^-1 = a^254 (a != 0), by square and multiply with a fixed exponent.
fn inv(a: u8) -> u8 {
    let a2 = mul(a, a);
    let a4 = mul(a2, a2);
    let a8 = mul(a4, a4);
    let a16 = mul(a8, a8);
    let a32 = mul(a16, a16);
    let a64 = mul(a32, a32);
    let a128 = mul(a64, a64);
    // 254 = 128 + 64 + 32 + 16 + 8 + 4 + 2
    mul(mul(mul(mul(mul(mul(a128, a64), a32), a16), a8), a4), a2)
}

/// Split `secret` so that any `threshold` of the shares at `xs` rebuild it
/// and fewer reveal nothing about it (each byte's polynomial of degree
/// `threshold - 1` has uniformly random coefficients from `rng`).
pub fn split(
    secret: &[u8; SECRET_BYTES],
    threshold: usize,
    xs: &[u8],
    rng: &mut impl RngCore,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(ShamirError::BadThreshold {
            threshold,
            holders: xs.len(),
        });
    }
    check_xs(xs.iter().copied())?;
    // coefficients[j][byte] for j in 1..threshold
    let mut coefficients = vec![[0u8; SECRET_BYTES]; threshold - 1];
    for c in &mut coefficients {
        rng.fill_bytes(c);
    }
    let shares = xs
        .iter()
        .map(|&x| {
            let mut y = [0u8; SECRET_BYTES];
            for (i, yi) in y.iter_mut().enumerate() {
                // Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + secret
                let mut acc = 0u8;
                for c in coefficients.iter().rev() {
                    acc = mul(acc, x) ^ c[i];
                }
                *yi = mul(acc, x) ^ secret[i];
            }
            Share { x, y }
        })
        .collect();
    Ok(shares)
}

/// Rebuild a secret from at least `threshold` shares (the first
/// `threshold` are used), by Lagrange interpolation at 0.
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; SECRET_BYTES], ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::BadThreshold {
            threshold,
            holders: shares.len(),
        });
    }
    if shares.len() < threshold {
        return Err(ShamirError::TooFewShares {
            have: shares.len(),
            threshold,
        });
    }
    let used = &shares[..threshold];
    check_xs(used.iter().map(|s| s.x))?;
    let mut secret = [0u8; SECRET_BYTES];
    for (i, si) in used.iter().enumerate() {
        // l_i(0) = prod_{j != i} x_j / (x_j - x_i); subtraction is xor.
        let mut num = 1u8;
        let mut den = 1u8;
        for (j, sj) in used.iter().enumerate() {
            if i != j {
                num = mul(num, sj.x);
                den = mul(den, sj.x ^ si.x);
            }
        }
        let l = mul(num, inv(den));
        for (b, y) in secret.iter_mut().zip(si.y) {
            *b ^= mul(l, y);
        }
    }
    Ok(secret)
}

fn check_xs(xs: impl Iterator<Item = u8>) -> Result<(), ShamirError> {
    let mut seen = [false; 256];
    for x in xs {
        if x == 0 || seen[x as usize] {
            return Err(ShamirError::BadX { x });
        }
        seen[x as usize] = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn field_matches_the_aes_examples() {
        // FIPS 197, section 4.2: {57} x {83} = {c1}, {57} x {13} = {fe}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "a = {a}");
        }
    }

    #[test]
    fn any_threshold_subset_rebuilds_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let xs: Vec<u8> = (1..=9).collect();
        let shares = split(&secret, 5, &xs, &mut rng).unwrap();
        for start in 0..5 {
            let subset: Vec<Share> = shares[start..start + 5].to_vec();
            assert_eq!(reconstruct(&subset, 5).unwrap(), secret);
        }
        let reversed: Vec<Share> = shares.iter().rev().copied().collect();
        assert_eq!(reconstruct(&reversed, 5).unwrap(), secret);
        // Four shares interpolated as if the threshold were four: not it.
        assert_ne!(reconstruct(&shares[..4], 4).unwrap(), secret);
        assert_eq!(
            reconstruct(&shares[..4], 5),
            Err(ShamirError::TooFewShares {
                have: 4,
                threshold: 5
            })
        );
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let s = [3u8; 32];
        assert!(matches!(
            split(&s, 3, &[1, 2], &mut rng),
            Err(ShamirError::BadThreshold { .. })
        ));
        assert_eq!(
            split(&s, 2, &[1, 1], &mut rng),
            Err(ShamirError::BadX { x: 1 })
        );
        assert_eq!(
            split(&s, 1, &[0], &mut rng),
            Err(ShamirError::BadX { x: 0 })
        );
        let shares = split(&s, 1, &[4], &mut rng).unwrap();
        assert_eq!(shares[0].y, s, "threshold 1 is the secret itself");
    }
}
