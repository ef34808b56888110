use super::*;

/// A quadratic "model": the loss of `w` on example `i` is
/// `|w - t_i|^2` with targets `t_i` around `target`.
struct Quadratic {
    targets: Vec<Vec<f32>>,
    calls: usize,
}

impl Quadratic {
    fn new(target: &[f32], n: usize) -> Self {
        let targets = (0..n)
            .map(|i| {
                target
                    .iter()
                    .map(|t| t + 0.01 * ((i % 7) as f32 - 3.0))
                    .collect()
            })
            .collect();
        Quadratic { targets, calls: 0 }
    }
}

impl Evaluator for Quadratic {
    fn len(&self) -> usize {
        self.targets.len()
    }
    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String> {
        self.calls += 1;
        let mut s = 0.0;
        for &i in indices {
            let t = self.targets.get(i).ok_or("index out of range")?;
            s += params
                .iter()
                .zip(t)
                .map(|(p, t)| f64::from(p - t).powi(2))
                .sum::<f64>();
        }
        Ok(s / indices.len() as f64)
    }
}

#[test]
fn indices_are_distinct_sorted_and_seeded() {
    let a = validation_indices(&[1; 32], 1000, 50);
    assert_eq!(a.len(), 50);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert!(a.iter().all(|&i| i < 1000));
    assert_eq!(a, validation_indices(&[1; 32], 1000, 50));
    assert_ne!(a, validation_indices(&[2; 32], 1000, 50));
    assert_eq!(
        validation_indices(&[1; 32], 10, 50),
        (0..10).collect::<Vec<_>>()
    );
    assert!(validation_indices(&[1; 32], 0, 5).is_empty());
    let v = ModelVersion([9; 32]);
    assert_ne!(scoring_seed(0, 1, &v), scoring_seed(0, 2, &v));
    assert_ne!(scoring_seed(0, 1, &v), scoring_seed(1, 1, &v));
}

/// A helpful update scores positive, a harmful one negative, a zero
/// update is a free-rider, and an exact copy is flagged.
#[test]
fn scores_and_flags() {
    let base = vec![0.0f32; 8];
    let target = vec![1.0f32; 8];
    let mut eval = Quadratic::new(&target, 100);
    let good = vec![0.5f32; 8];
    let bad = vec![-0.5f32; 8];
    let zero = vec![0.0f32; 8];
    let mut other = vec![0.4f32; 8];
    other[0] = 0.9;
    let copy = good.clone();
    let deltas: Vec<&[f32]> = vec![&good, &bad, &zero, &other, &copy];
    let cfg = ScoringConfig {
        validation_samples: 20,
        // Eight dimensions: too few for the noise test to mean anything.
        noise_sigmas: 0.0,
        // A quadratic loss has no classes.
        method: ScoreMethod::Direct,
        ..Default::default()
    };
    let r = score_round(&cfg, Some(&mut eval), &[3; 32], &base, 1.0, &deltas, 1000);
    assert_eq!(r.error, None);
    let s: Vec<f64> = r.updates.iter().map(|u| u.score.unwrap()).collect();
    assert!(s[0] > 0.0 && s[3] > 0.0 && s[4] > 0.0, "{s:?}");
    assert!(s[1] < 0.0, "{s:?}");
    assert_eq!(s[2], 0.0);
    assert!(r.updates[2].free_rider);
    assert!(!r.updates[0].free_rider && !r.updates[1].free_rider);
    assert_eq!(r.updates[4].copy_of, Some(0));
    assert_eq!(r.updates[3].copy_of, None);
    assert_eq!(r.updates[0].copy_of, None);
    // 1 base + 5 updates, 20 examples each; 1000 examples trained x 3.
    assert_eq!(eval.calls, 6);
    assert_eq!(r.cost.scoring_passes, 120);
    assert_eq!(r.cost.training_passes, 3000);
    assert!((r.cost.fraction - 0.04).abs() < 1e-12);
    let clipped: Vec<f64> = r.updates.iter().map(clipped_score).collect();
    assert_eq!(clipped[1], 0.0);
    assert_eq!(clipped[2], 0.0);
    assert_eq!(clipped[4], 0.0);
    assert!(clipped[0] > 0.0);
    // Deterministic: the same inputs give the same scores.
    let again = score_round(&cfg, Some(&mut eval), &[3; 32], &base, 1.0, &deltas, 1000);
    assert_eq!(again, r);
    // Without a validation set: flags only.
    let none = score_round(&cfg, None, &[3; 32], &base, 1.0, &deltas, 1000);
    assert!(none.updates.iter().all(|u| u.score.is_none()));
    assert!(none.updates[2].free_rider);
    assert!(none.error.is_some());
}

/// Two updates from skewed shards, each overshooting on its own
/// coordinates and pulling the other's the wrong way: alone each
/// raises the loss (direct scores them negative), together they
/// reach most of the way. The marginal and Shapley scores credit the
/// complement; on a quadratic loss the Shapley scores add up to the
/// round's whole improvement (efficiency), and each is the mean of
/// the direct and marginal scores.
#[test]
fn complementary_skewed_updates_are_credited_by_marginal_and_shapley() {
    let base = vec![0.0f32; 8];
    let target = vec![1.0f32; 8];
    let a: Vec<f32> = (0..8).map(|i| if i < 4 { 2.0 } else { -1.0 }).collect();
    let b: Vec<f32> = (0..8).map(|i| if i < 4 { -1.0 } else { 2.0 }).collect();
    let deltas: Vec<&[f32]> = vec![&a, &b];
    let score = |method| {
        let cfg = ScoringConfig {
            validation_samples: 10,
            noise_sigmas: 0.0,
            method,
            ..Default::default()
        };
        let mut eval = Quadratic::new(&target, 10);
        let r = score_round(&cfg, Some(&mut eval), &[1; 32], &base, 1.0, &deltas, 100);
        assert_eq!(r.error, None);
        let s: Vec<f64> = r.updates.iter().map(|u| u.score.unwrap()).collect();
        (s, eval.calls, r.base_loss.unwrap())
    };
    let (direct, calls, base_loss) = score(ScoreMethod::Direct);
    assert!(direct.iter().all(|&x| x < 0.0), "{direct:?}");
    assert_eq!(calls, 3);
    let (marginal, calls, _) = score(ScoreMethod::Marginal);
    assert!(marginal.iter().all(|&x| x > 0.0), "{marginal:?}");
    assert_eq!(calls, 4);
    let (shapley, calls, _) = score(ScoreMethod::Shapley);
    assert_eq!(calls, 6);
    // The round's step (lr/n each) takes every coordinate to 0.5.
    let all: Vec<usize> = (0..10).collect();
    let whole = base_loss - Quadratic::new(&target, 10).loss(&[0.5; 8], &all).unwrap();
    for i in 0..2 {
        assert!((shapley[i] - 0.5 * (direct[i] + marginal[i])).abs() < 1e-9);
        assert!(shapley[i] > 0.0);
    }
    assert!(
        (shapley.iter().sum::<f64>() - whole).abs() < 1e-6,
        "{shapley:?} vs {whole}"
    );
}

#[test]
fn reward_shares_are_proportional_and_capped() {
    // No cap: proportional.
    assert_eq!(reward_shares(&[1.0, 3.0, 0.0], 1.0), vec![0.25, 0.75, 0.0]);
    // Nothing positive: nothing paid.
    assert_eq!(reward_shares(&[0.0, 0.0], 0.5), vec![0.0, 0.0]);
    // Enough participants: the whale's excess goes to the others.
    let s = reward_shares(&[10.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.25);
    assert!((s[0] - 0.25).abs() < 1e-12, "{s:?}");
    assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(s[1..].iter().all(|x| (x - 0.15).abs() < 1e-12));
    // Too few positive participants: capped, and the rest unpaid.
    let s = reward_shares(&[10.0, 1.0, 0.0, 0.0], 0.25);
    assert_eq!(s[0], 0.25);
    assert!((s[1] - 1.0 / 11.0).abs() < 1e-12);
    assert_eq!(rewards(1000, &[0.25, 1.0 / 11.0]), vec![250, 90]);
    assert_eq!(rewards(10, &[0.5, 0.5, f64::NAN]), vec![5, 5, 0]);
}

/// Noise is orthogonal to the round's sum and to every other update. Near
/// convergence an honest update can be orthogonal to the others' sum (two
/// skewed updates cancelling on its direction) while it shares
/// directions with one of them: it is not noise. A random direction is.
#[test]
fn noise_is_orthogonal_to_every_update_not_just_their_sum() {
    use rand::Rng;
    let d = 10_000;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut random = || -> Vec<f32> { (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (v, w, w2, r) = (random(), random(), random(), random());
    let add = |a: &[f32], s: f32, b: &[f32]| -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x + s * y).collect()
    };
    let honest = v.clone();
    let a = add(&w, 1.0, &v);
    let b = add(&w2, -1.0, &v);
    let deltas: Vec<&[f32]> = vec![&honest, &a, &b, &r];
    let cfg = ScoringConfig::default();
    let s = score_round(&cfg, None, &[1; 32], &vec![0.0; d], 1.0, &deltas, 1);
    let below = cfg.noise_sigmas / (d as f64).sqrt();
    assert!(s.updates[0].alignment.abs() < below, "{:?}", s.updates[0]);
    assert!(!s.updates[0].noise, "{:?}", s.updates[0]);
    assert!(s.updates[3].noise, "{:?}", s.updates[3]);
    assert!(!s.updates[1].noise && !s.updates[2].noise);
    // A free-rider sent along the noise's direction does not vouch for it.
    let tiny: Vec<f32> = r.iter().map(|x| x * 1e-6).collect();
    let deltas: Vec<&[f32]> = vec![&honest, &a, &b, &tiny, &r];
    let s = score_round(&cfg, None, &[1; 32], &vec![0.0; d], 1.0, &deltas, 1);
    assert!(s.updates[3].free_rider);
    assert!(s.updates[4].noise, "{:?}", s.updates[4]);
    // Nor does a second key re-sending the noise: the copy is flagged a
    // copy, the original still noise.
    let deltas: Vec<&[f32]> = vec![&honest, &a, &b, &r, &r];
    let s = score_round(&cfg, None, &[1; 32], &vec![0.0; d], 1.0, &deltas, 1);
    assert!(s.updates[3].noise, "{:?}", s.updates[3]);
    assert_eq!(s.updates[4].copy_of, Some(3));
}

/// The validation sample shrinks to keep scoring within its budget of the
/// round's training compute, never below the floor or above the
/// configured size; a zero budget keeps the configured size.
#[test]
fn the_validation_sample_keeps_scoring_within_its_budget() {
    let cfg = ScoringConfig::default();
    // 10 devices of 3,000 examples: 128 fits (11 x 128 = 1,408 passes
    // against 90,000).
    assert_eq!(budgeted_samples(&cfg, 10, 30_000), 128);
    // 100 devices of 60 examples: 10% of 18,000 passes is 1,800, 17
    // examples for 101 evaluations: the floor (32) binds.
    assert_eq!(budgeted_samples(&cfg, 100, 6_000), 32);
    // In between, the sample is what the budget affords, and within it.
    let n = budgeted_samples(&cfg, 10, 3_000);
    assert_eq!(n, 81);
    assert!((11 * n) as f64 <= 0.1 * 3.0 * 3_000.0);
    let shapley = ScoringConfig {
        method: ScoreMethod::Shapley,
        ..cfg.clone()
    };
    assert_eq!(budgeted_samples(&shapley, 10, 3_000), 40);
    let fixed = ScoringConfig {
        cost_budget: 0.0,
        ..cfg.clone()
    };
    assert_eq!(budgeted_samples(&fixed, 100, 6_000), 128);
    let small = ScoringConfig {
        validation_samples: 16,
        ..cfg
    };
    assert_eq!(budgeted_samples(&small, 100, 6_000), 16);
}
