use super::super::*;
use super::*;

const K: usize = 3;
const D: usize = 3;

/// Multinomial logistic regression on `n` examples of 3 overlapping
/// classes (`x = e_y + u`, `u` uniform in [-0.8, 0.8]^3 from a fixed
/// generator); parameters `W` (3 x 3, row-major) then `b` (3).
struct Softmax {
    x: Vec<[f64; D]>,
    y: Vec<u32>,
}

impl Softmax {
    fn new(n: usize) -> Self {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 1.6 - 0.8
        };
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % K;
            let mut v = [next(), next(), next()];
            v[c] += 1.0;
            x.push(v);
            y.push(c as u32);
        }
        Softmax { x, y }
    }

    fn logits(&self, p: &[f32], i: usize) -> [f64; K] {
        let mut z = [0.0; K];
        for (c, zc) in z.iter_mut().enumerate() {
            *zc = f64::from(p[K * D + c])
                + (0..D)
                    .map(|j| f64::from(p[c * D + j]) * self.x[i][j])
                    .sum::<f64>();
        }
        z
    }

    /// The gradient of the mean cross-entropy over the examples of
    /// `classes` only.
    fn gradient(&self, p: &[f32], classes: &[u32]) -> Vec<f64> {
        let mut g = vec![0.0; K * D + K];
        let picked: Vec<usize> = (0..self.x.len())
            .filter(|&i| classes.contains(&self.y[i]))
            .collect();
        for &i in &picked {
            let z = self.logits(p, i);
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
            for c in 0..K {
                let e = (z[c] - m).exp() / s - f64::from(u8::from(self.y[i] as usize == c));
                for j in 0..D {
                    g[c * D + j] += e * self.x[i][j] / picked.len() as f64;
                }
                g[K * D + c] += e / picked.len() as f64;
            }
        }
        g
    }
}

impl Softmax {
    /// What an honest device holding only `class` sends: three times the
    /// negated gradient of its examples' loss.
    fn skewed_step(&self, p: &[f32], class: u32) -> Vec<f32> {
        self.gradient(p, &[class])
            .iter()
            .map(|g| (-3.0 * g) as f32)
            .collect()
    }
}

impl Evaluator for Softmax {
    fn len(&self) -> usize {
        self.x.len()
    }
    fn loss(&mut self, p: &[f32], indices: &[usize]) -> Result<f64, String> {
        let s = self.class_scores(p, indices)?.unwrap();
        plain_loss(&s)
    }
    fn class_scores(&mut self, p: &[f32], idx: &[usize]) -> Result<Option<ClassScores>, String> {
        let mut scores = Vec::new();
        for &i in idx {
            scores.extend(self.logits(p, i).iter().map(|&v| v as f32));
        }
        Ok(Some(ClassScores {
            classes: K,
            scores,
            labels: idx.iter().map(|&i| self.y[i]).collect(),
        }))
    }
}

/// A model trained to near the optimum of the balanced loss.
fn trained(eval: &Softmax) -> Vec<f32> {
    let mut p = vec![0.0f32; K * D + K];
    for _ in 0..400 {
        let g = eval.gradient(&p, &[0, 1, 2]);
        for (w, gi) in p.iter_mut().zip(g) {
            *w -= (2.0 * gi) as f32;
        }
    }
    p
}

fn scores(method: ScoreMethod, eval: &mut Softmax, base: &[f32], deltas: &[&[f32]]) -> Vec<f64> {
    let cfg = ScoringConfig {
        validation_samples: 300,
        noise_sigmas: 0.0,
        method,
        ..Default::default()
    };
    let r = score_round(&cfg, Some(eval), &[5; 32], base, 1.0, deltas, 1000);
    assert_eq!(r.error, None);
    r.updates.iter().map(|u| u.score.unwrap()).collect()
}

/// At the optimum of the balanced loss, an honest device that holds only
/// class 0 sends a gradient step on its data: on balanced data it raises
/// the loss (`direct` scores it negative), yet it lowers class 0's, and
/// `class-gain` pays it. A pure shift of class 0's prior (its output bias
/// up, nothing learned) lowers class 0's plain loss as well, but gains
/// nothing once the priors are refitted; a zero update gains nothing.
#[test]
fn skewed_updates_gain_and_prior_shifts_do_not() {
    let mut eval = Softmax::new(300);
    let base = trained(&eval);
    let skewed: Vec<f32> = eval.skewed_step(&base, 0);
    let mut shift = vec![0.0f32; K * D + K];
    shift[K * D] = 1.0;
    let zero = vec![0.0f32; K * D + K];
    let deltas: Vec<&[f32]> = vec![&skewed, &shift, &zero];
    // One update per round would be applied whole; three share the step.
    let direct = scores(ScoreMethod::Direct, &mut eval, &base, &deltas);
    assert!(direct[0] < 0.0 && direct[1] < 0.0, "{direct:?}");
    let gain = scores(ScoreMethod::ClassGain, &mut eval, &base, &deltas);
    assert!(gain[0] > 1e-4, "{gain:?}");
    // The refit's fixed steps leave a residue far below a real gain.
    assert!(gain[1].abs() < 1e-3 * gain[0], "{gain:?}");
    assert_eq!(gain[2], 0.0);
    // Without the refit the shift would gain on class 0.
    let all: Vec<usize> = (0..300).collect();
    let class0 = |p: &[f32], e: &mut Softmax| {
        let s = e.class_scores(p, &all).unwrap().unwrap();
        let rows: Vec<usize> = (0..300).filter(|i| i % K == 0).collect();
        let sub = ClassScores {
            classes: K,
            scores: rows
                .iter()
                .flat_map(|&i| s.scores[i * K..i * K + K].to_vec())
                .collect(),
            labels: vec![0; rows.len()],
        };
        plain_loss(&sub).unwrap()
    };
    let shifted: Vec<f32> = base.iter().zip(&shift).map(|(b, d)| b + d / 3.0).collect();
    assert!(class0(&shifted, &mut eval) < class0(&base, &mut eval) - 1e-3);
    // Deterministic: the same inputs, the same scores, to the bit.
    assert_eq!(
        scores(ScoreMethod::ClassGain, &mut eval, &base, &deltas),
        gain
    );
}

/// A model broken by an update scores the worst there is; a broken current
/// model, malformed class scores and an evaluator without class scores
/// are errors that leave the round unscored.
#[test]
fn broken_models_and_evaluators_are_errors() {
    let mut eval = Softmax::new(30);
    let base = trained(&eval);
    let mut nan = vec![0.0f32; K * D + K];
    nan[0] = f32::NAN;
    let huge = vec![f32::MAX; K * D + K];
    let s = scores(ScoreMethod::ClassGain, &mut eval, &base, &[&nan, &huge]);
    assert_eq!(s, vec![NON_FINITE_SCORE, NON_FINITE_SCORE]);
    let cfg = ScoringConfig {
        validation_samples: 30,
        noise_sigmas: 0.0,
        ..Default::default()
    };
    assert_eq!(cfg.method, ScoreMethod::ClassGain);
    let broken = vec![f32::INFINITY; K * D + K];
    let r = score_round(&cfg, Some(&mut eval), &[5; 32], &broken, 1.0, &[&nan], 1);
    assert!(r.error.unwrap().contains("current model"));
    assert!(r.updates[0].score.is_none());
    struct Plain;
    impl Evaluator for Plain {
        fn len(&self) -> usize {
            10
        }
        fn loss(&mut self, _: &[f32], _: &[usize]) -> Result<f64, String> {
            Ok(1.0)
        }
    }
    let r = score_round(&cfg, Some(&mut Plain), &[5; 32], &base, 1.0, &[&nan], 1);
    assert!(r.error.unwrap().contains("class-gain"));
    let bad = |classes, scores: Vec<f32>, labels| ClassScores {
        classes,
        scores,
        labels,
    };
    assert!(prior_free_class_losses(&bad(3, vec![0.0; 5], vec![0, 1])).is_err());
    assert!(prior_free_class_losses(&bad(3, vec![0.0; 6], vec![0, 3])).is_err());
    assert!(prior_free_class_losses(&bad(0, vec![], vec![])).is_err());
    assert_eq!(
        prior_free_class_losses(&bad(2, vec![0.0, f32::NAN], vec![1])),
        Ok(None)
    );
}

/// An update that wins class 0 by wiping out what the model knows of
/// classes 1 and 2 scores below zero: its losses count at a tenth, and
/// they are more than ten times its gain.
#[test]
fn winning_a_class_by_wrecking_the_others_does_not_pay() {
    let mut eval = Softmax::new(300);
    let base = trained(&eval);
    let mut wreck: Vec<f32> = eval.skewed_step(&base, 0);
    // Applied at a third, this zeroes the weights of classes 1 and 2.
    for c in 1..K {
        for j in 0..D {
            wreck[c * D + j] = -3.0 * base[c * D + j];
        }
    }
    let s = scores(
        ScoreMethod::ClassGain,
        &mut eval,
        &base,
        &[&wreck, &wreck, &wreck],
    );
    assert!(s[0] < 0.0, "{s:?}");
}

/// Shifting the scores of classes the sample does not hold, or holds once,
/// gains nothing: absent classes are left out of the softmax, and the
/// refit runs until every class's mean probability matches its share (20
/// classes, 128 examples: 6 classes absent and 3 seen once).
#[test]
fn shifts_of_absent_and_rare_classes_gain_nothing() {
    use rand::{Rng, SeedableRng};
    let (k, n) = (20, 128);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    // Classes 0..11 often, 11, 12 and 13 once each, 14..20 never.
    let labels: Vec<u32> = (0..n as u32)
        .map(|i| if i < 125 { i % 11 } else { 11 + i - 125 })
        .collect();
    let scores: Vec<f32> = (0..n * k).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    let before = ClassScores {
        classes: k,
        scores: scores.clone(),
        labels: labels.clone(),
    };
    let counts: Vec<usize> = (0..k as u32)
        .map(|c| labels.iter().filter(|&&l| l == c).count())
        .collect();
    assert!(counts[14..].iter().all(|&c| c == 0));
    let rare = (0..14)
        .find(|&c| counts[c] == 1)
        .expect("a class seen once");
    let mut shifted = scores.clone();
    for row in shifted.chunks_exact_mut(k) {
        for v in &mut row[14..] {
            *v -= 7.0;
        }
        row[rare] += 4.0;
        row[0] -= 2.0;
    }
    let after = ClassScores {
        classes: k,
        scores: shifted,
        labels,
    };
    let b = prior_free_class_losses(&before).unwrap().unwrap();
    let a = prior_free_class_losses(&after).unwrap().unwrap();
    let g = gain(&b, &a);
    // Zero but for the float32 rounding of the shifted scores; an honest
    // update gains 1e-3 to 1e-2 on MNIST.
    assert!(g.abs() < 1e-7, "{g}");
    // Without the refit the shift would move the rare class's loss.
    let plain = |s: &ClassScores| plain_loss(s).unwrap();
    assert!((plain(&before) - plain(&after)).abs() > 1e-3);
}

/// Scaling an update up buys no larger score: each is scored at no more
/// than the round's median norm.
#[test]
fn a_scaled_up_update_scores_no_more() {
    let mut eval = Softmax::new(300);
    let base = trained(&eval);
    let u: Vec<f32> = eval.skewed_step(&base, 0);
    let v: Vec<f32> = eval.skewed_step(&base, 1);
    let norm = |x: &[f32]| crate::robust::l2_norm(x);
    // v at u's norm, so the median norm is u's.
    let v: Vec<f32> = v.iter().map(|x| x * (norm(&u) / norm(&v)) as f32).collect();
    let big: Vec<f32> = u.iter().map(|x| 10.0 * x).collect();
    let s = scores(ScoreMethod::ClassGain, &mut eval, &base, &[&u, &v, &big]);
    assert!(s[0] > 0.0, "{s:?}");
    // Equal but for the float32 rounding of the scaled parameters.
    assert!((s[2] - s[0]).abs() < 1e-6 * s[0], "{s:?}");
}

/// Malformed class scores from an evaluator are an error for the round,
/// never a panic.
#[test]
fn malformed_class_scores_are_errors() {
    struct Bad(usize, u32);
    impl Evaluator for Bad {
        fn len(&self) -> usize {
            10
        }
        fn loss(&mut self, _: &[f32], _: &[usize]) -> Result<f64, String> {
            Ok(1.0)
        }
        fn class_scores(
            &mut self,
            _: &[f32],
            idx: &[usize],
        ) -> Result<Option<ClassScores>, String> {
            Ok(Some(ClassScores {
                classes: self.0,
                scores: vec![0.0; idx.len() * self.0],
                labels: vec![self.1; idx.len()],
            }))
        }
    }
    let cfg = ScoringConfig {
        validation_samples: 5,
        noise_sigmas: 0.0,
        ..Default::default()
    };
    let d = vec![0.1f32; 4];
    for (classes, label) in [(0, 0), (3, 3)] {
        let r = score_round(
            &cfg,
            Some(&mut Bad(classes, label)),
            &[1; 32],
            &[0.0; 4],
            1.0,
            &[&d],
            1,
        );
        assert!(r.error.is_some(), "{classes} {label}");
        assert!(r.updates[0].score.is_none());
    }
}
