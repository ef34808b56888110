//! Rényi differential privacy of the sampled Gaussian mechanism, and its
//! conversion to (epsilon, delta).
//!
//! - RDP of the Poisson-sampled Gaussian mechanism (sampling rate `q`,
//!   noise multiplier `z` = noise stddev / L2 sensitivity): Mironov, Talwar
//!   and Zhang, "Rényi Differential Privacy of the Sampled Gaussian
//!   Mechanism" (2019), Section 3.3: for integer orders the binomial
//!   expansion of A_alpha, for fractional orders the two series with erfc
//!   terms split at z0 = z^2 ln(1/q - 1) + 1/2. RDP(alpha) = ln(A_alpha) /
//!   (alpha - 1), and it composes additively over rounds.
//! - RDP to (epsilon, delta): Balle, Barthe, Gaboardi, Hsu and Sato,
//!   "Hypothesis Testing Interpretations and Renyi Differential Privacy"
//!   (AISTATS 2020), Theorem 21: epsilon = rdp + ln((alpha - 1) / alpha) -
//!   (ln delta + ln alpha) / (alpha - 1), minimised over the orders.
//!
//! - RDP of the (multi-dimensional, symmetric) Skellam mechanism, the
//!   noise of distributed DP under SecAgg+: Agarwal, Kairouz and Liu,
//!   "The Skellam Mechanism for Differentially Private Federated
//!   Learning" (NeurIPS 2021), Theorem 3.5, written with the noise's
//!   variance v (Sk(mu) = Poisson(mu) - Poisson(mu) has v = 2 mu): for
//!   integer alpha > 1, alpha D2^2 / (2 v) + min(((2 alpha - 1) D2^2 + 6
//!   D1) / (4 v^2), 3 D1 / (2 v)), with D1, D2 the L1 and L2 sensitivities
//!   (the Gaussian's RDP plus a correction that vanishes as v grows).
//!
//! Everything is computed in log space, so large orders and small rates
//! neither overflow nor underflow. The tests compare with the published
//! values in TensorFlow Privacy's accountant tests.

/// The orders the accountant evaluates: fine steps near 1 (where small
/// epsilons are decided), every integer to 64, then a few large ones.
pub fn default_orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..=40).map(|i| 1.0 + f64::from(i) * 0.25).collect();
    o.extend((12..=64).map(f64::from));
    o.extend([80.0, 96.0, 128.0, 192.0, 256.0, 512.0]);
    o
}

/// ln(exp(a) + exp(b)).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln(exp(a) - exp(b)) for a >= b.
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// ln(erfc(x)), accurate where erfc underflows (x beyond ~26).
fn log_erfc(x: f64) -> f64 {
    let e = libm::erfc(x);
    if e > 1e-300 {
        return e.ln();
    }
    // Asymptotic expansion: erfc(x) ~ exp(-x^2) / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4)).
    let x2 = x * x;
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln() + (-0.5 / x2 + 0.75 / (x2 * x2)).ln_1p()
}

/// ln of the generalised binomial coefficient |C(alpha, i)| and its sign.
fn log_binom(alpha: f64, i: u64) -> (f64, f64) {
    let (mut log, mut sign) = (0.0, 1.0);
    for k in 0..i {
        let num = alpha - k as f64;
        let den = (k + 1) as f64;
        if num == 0.0 {
            return (f64::NEG_INFINITY, 0.0);
        }
        if num < 0.0 {
            sign = -sign;
        }
        log += num.abs().ln() - den.ln();
    }
    (log, sign)
}

/// ln(A_alpha) for an integer order.
fn log_a_int(q: f64, z: f64, alpha: u64) -> f64 {
    let mut acc = f64::NEG_INFINITY;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    for k in 0..=alpha {
        let (lb, _) = log_binom(alpha as f64, k);
        let kf = k as f64;
        let term = lb + kf * lq + (alpha - k) as f64 * l1q + (kf * kf - kf) / (2.0 * z * z);
        acc = log_add(acc, term);
    }
    acc
}

/// ln(A_alpha) for a fractional order (the two erfc series).
fn log_a_frac(q: f64, z: f64, alpha: f64) -> f64 {
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let s2 = std::f64::consts::SQRT_2 * z;
    for i in 0u64..100_000 {
        let (lb, sign) = log_binom(alpha, i);
        let fi = i as f64;
        let j = alpha - fi;
        let t0 = lb + fi * lq + j * l1q;
        let t1 = lb + j * lq + fi * l1q;
        let e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let s0 = t0 + (fi * fi - fi) / (2.0 * z * z) + e0;
        let s1 = t1 + (j * j - j) / (2.0 * z * z) + e1;
        if sign > 0.0 {
            a0 = log_add(a0, s0);
            a1 = log_add(a1, s1);
        } else {
            a0 = log_sub(a0, s0);
            a1 = log_sub(a1, s1);
        }
        if s0.max(s1) < -30.0 {
            break;
        }
    }
    log_add(a0, a1)
}

/// RDP at order `alpha` (> 1) of one round of the Gaussian mechanism with
/// noise multiplier `z`, each participant present with probability `q`.
pub fn sampled_gaussian(q: f64, z: f64, alpha: f64) -> f64 {
    debug_assert!(alpha > 1.0 && (0.0..=1.0).contains(&q) && z > 0.0);
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * z * z);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, z, alpha as u64)
    } else {
        log_a_frac(q, z, alpha)
    };
    log_a / (alpha - 1.0)
}

/// RDP at each order of `steps` rounds.
pub fn compute_rdp(q: f64, z: f64, steps: u64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&a| sampled_gaussian(q, z, a) * steps as f64)
        .collect()
}

/// RDP at integer order `alpha` > 1 of Skellam noise of variance
/// `variance` (per coordinate) on a query with L1 and L2 sensitivities
/// `l1` and `l2` (Agarwal, Kairouz and Liu 2021, Theorem 3.5).
pub fn skellam(alpha: u32, l1: f64, l2: f64, variance: f64) -> f64 {
    debug_assert!(alpha > 1 && variance > 0.0);
    let a = f64::from(alpha);
    let v = variance;
    let correction =
        (((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * v * v)).min(3.0 * l1 / (2.0 * v));
    a * l2 * l2 / (2.0 * v) + correction
}

/// The integer orders the Skellam bound is evaluated at.
pub fn integer_orders() -> Vec<u32> {
    let mut o: Vec<u32> = (2..=64).collect();
    o.extend([80, 96, 128, 192, 256, 512]);
    o
}

/// The smallest epsilon at `delta` over the orders, and the order that
/// gives it (Balle et al. 2020, Theorem 21).
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        if a <= 1.0 || a.is_nan() || !r.is_finite() {
            continue;
        }
        let eps = r + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0);
        let eps = eps.max(0.0);
        if eps < best.0 {
            best = (eps, a);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, tol: f64) {
        assert!(
            (got - want).abs() <= tol,
            "got {got}, want {want} (tolerance {tol})"
        );
    }

    /// TensorFlow Privacy, `rdp_accountant_test.py`,
    /// `test_compute_rdp_scalar`: compute_rdp(q=0.1, z=2, steps=10,
    /// order=5) = 0.07737.
    #[test]
    fn matches_tf_privacy_scalar() {
        close(compute_rdp(0.1, 2.0, 10, &[5.0])[0], 0.07737, 1e-5);
    }

    /// TensorFlow Privacy, `test_compute_rdp_sequence`: q=0.01, z=2.5,
    /// 50 steps at orders 1.5, 2.5, 5, 50, 100 (fractional and integer).
    #[test]
    fn matches_tf_privacy_sequence() {
        let orders = [1.5, 2.5, 5.0, 50.0, 100.0];
        let want = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307];
        let got = compute_rdp(0.01, 2.5, 50, &orders);
        for (g, w) in got.iter().zip(want) {
            // TF Privacy checks to 1e-5 absolute.
            close(*g, w, 1e-5);
        }
        assert_eq!(
            compute_rdp(0.01, 2.5, 50, &[f64::INFINITY])[0],
            f64::INFINITY
        );
    }

    /// TensorFlow Privacy, `test_get_privacy_spent_check_target_delta`:
    /// constant RDP 1.1 at orders 2..=32 gives epsilon 1.32783806176 at
    /// delta 1e-5, at order 32; and the unsampled Gaussian with z =
    /// 4.530877117 is (1, 1e-6)-DP over a fine grid of orders.
    #[test]
    fn matches_tf_privacy_conversion() {
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let (eps, order) = epsilon(&orders, &vec![1.1; orders.len()], 1e-5);
        close(eps, 1.327_838_061_76, 1e-9);
        assert_eq!(order, 32.0);
        let fine: Vec<f64> = (1000..100_000).map(|i| 0.001 * f64::from(i)).collect();
        let fine: Vec<f64> = fine.into_iter().filter(|a| *a > 1.0).collect();
        let rdp = compute_rdp(1.0, 4.530_877_117, 1, &fine);
        close(epsilon(&fine, &rdp, 1e-6).0, 1.0, 1e-3);
    }

    /// The Skellam bound holds for, and is close to, the exact Rényi
    /// divergence between Sk(mu) shifted by one and Sk(mu), computed from
    /// the distribution itself (the Poisson pmfs convolved); and it tends
    /// to the Gaussian's alpha / (2 v) as the variance grows.
    #[test]
    fn skellam_bound_holds_against_the_exact_divergence() {
        for mu in [3.0f64, 10.0, 40.0] {
            let kmax = (mu + 40.0 * mu.sqrt() + 40.0) as i64;
            let ln_pois = |j: i64| -> f64 {
                (j as f64) * mu.ln() - mu - (1..=j).map(|i| (i as f64).ln()).sum::<f64>()
            };
            let lp: Vec<f64> = (0..=kmax).map(ln_pois).collect();
            // ln P(X - Y = k) for |k| <= kmax + 1.
            let ln_pmf = |k: i64| -> f64 {
                (0..=kmax)
                    .filter(|j| j + k >= 0 && j + k <= kmax)
                    .map(|j| lp[(j + k) as usize] + lp[j as usize])
                    .fold(f64::NEG_INFINITY, log_add)
            };
            let p: Vec<f64> = (-kmax - 1..=kmax + 1).map(ln_pmf).collect();
            let v = 2.0 * mu;
            for alpha in [2u32, 3, 5, 8] {
                let a = f64::from(alpha);
                // ln sum_k P(k - 1)^a P(k)^(1 - a), over the support.
                let s = (1..p.len())
                    .filter(|&i| p[i].is_finite() && p[i - 1].is_finite())
                    .map(|i| a * p[i - 1] + (1.0 - a) * p[i])
                    .fold(f64::NEG_INFINITY, log_add);
                let exact = s / (a - 1.0);
                let bound = skellam(alpha, 1.0, 1.0, v);
                assert!(bound >= exact, "mu {mu} alpha {alpha}: {bound} < {exact}");
                // Tight: well within the Gaussian-equivalent term's size.
                assert!(
                    bound - exact <= 0.5 * a / (2.0 * v),
                    "mu {mu} alpha {alpha}: bound {bound}, exact {exact}"
                );
            }
        }
        let gaussian = 8.0 / (2.0 * 1e6);
        close(skellam(8, 1.0, 1.0, 1e6), gaussian, 1e-9);
    }

    /// No sampling: RDP is alpha / (2 z^2) exactly; no participants: 0.
    #[test]
    fn edge_rates() {
        assert_eq!(compute_rdp(1.0, 10.0, 1, &[20.0])[0], 0.1);
        assert_eq!(compute_rdp(0.0, 10.0, 1, &[20.0])[0], 0.0);
    }

    /// The integer and fractional formulas agree where they meet, and RDP
    /// grows with the order, the rate and the rounds.
    #[test]
    fn monotone_and_consistent() {
        for (q, z) in [(0.01, 1.0), (0.1, 0.8), (0.5, 2.0)] {
            let int = log_a_int(q, z, 3);
            let frac = log_a_frac(q, z, 3.0);
            close(frac, int, 1e-6 * int.abs().max(1e-9));
            let orders = default_orders();
            let r = compute_rdp(q, z, 1, &orders);
            assert!(r.windows(2).all(|w| w[1] >= w[0] - 1e-12), "{q} {z}");
            let more = compute_rdp((q * 2.0f64).min(1.0), z, 1, &orders);
            assert!(r.iter().zip(&more).all(|(a, b)| b >= a));
        }
    }
}
