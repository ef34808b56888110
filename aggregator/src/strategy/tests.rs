use super::*;
use crate::robust::l2_norm;

fn combined(d: &[f32]) -> Combined {
    Combined::one(d)
}

/// Naive references, written out per step.
#[test]
fn server_optimizers_table() {
    let p0 = [1.0f32, -1.0];
    let deltas = [[0.5f32, -0.25], [0.1, 0.2], [-0.3, 0.4]];
    type Reference = Box<dyn Fn(&[[f32; 2]]) -> [f64; 2]>;
    let cases: Vec<(ServerOpt, Reference)> = vec![
        (
            ServerOpt::Avg { lr: 1.0 },
            Box::new(|ds| {
                let mut p = [1.0, -1.0];
                for d in ds {
                    p[0] += f64::from(d[0]);
                    p[1] += f64::from(d[1]);
                }
                p
            }),
        ),
        (
            ServerOpt::Momentum { lr: 0.5, beta: 0.9 },
            Box::new(|ds| {
                let (mut p, mut v) = ([1.0, -1.0], [0.0, 0.0]);
                for d in ds {
                    for i in 0..2 {
                        v[i] = 0.9 * v[i] + f64::from(d[i]);
                        p[i] += 0.5 * v[i];
                    }
                }
                p
            }),
        ),
        (
            ServerOpt::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            Box::new(|ds| adaptive(ds, |v, x| 0.99 * v + 0.01 * x * x)),
        ),
        (
            ServerOpt::Yogi {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            Box::new(|ds| adaptive(ds, |v, x| v - 0.01 * x * x * (v - x * x).signum())),
        ),
        (
            ServerOpt::Adagrad {
                lr: 0.1,
                beta1: 0.9,
                tau: 1e-3,
            },
            Box::new(|ds| adaptive(ds, |v, x| v + x * x)),
        ),
    ];
    fn adaptive(ds: &[[f32; 2]], upd_v: impl Fn(f64, f64) -> f64) -> [f64; 2] {
        let (mut p, mut m, mut v) = ([1.0, -1.0], [0.0, 0.0], [0.0, 0.0]);
        for d in ds {
            for i in 0..2 {
                let x = f64::from(d[i]);
                m[i] = 0.9 * m[i] + 0.1 * x;
                v[i] = upd_v(v[i], x);
                p[i] += 0.1 * m[i] / (v[i].sqrt() + 1e-3);
            }
        }
        p
    }
    for (opt, reference) in cases {
        let mut s = FedOpt::new(opt.clone(), CombineSpec::Mean, 0.0);
        let mut p = p0.to_vec();
        for d in &deltas {
            p = s.aggregate_round(1, &p, &combined(d), &[]);
        }
        let want = reference(&deltas);
        for (g, w) in p.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() < 1e-5,
                "{opt:?}: {p:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn fedprox_sets_the_plan_and_clipping_wraps_the_combiner() {
    let mut s = FedOpt::new(ServerOpt::Avg { lr: 1.0 }, CombineSpec::Mean, 0.01);
    assert_eq!(
        s.configure_round(1, &TrainingPlan::default()).fedprox_mu,
        0.01
    );
    assert_eq!(s.name(), "fedprox");

    let mut c = NormClipped::new(Box::new(FedOpt::fedavg()), ClipSpec::Fixed { bound: 1.0 });
    let mut comb = c.combiner(2, 1.0);
    comb.add(vec![30.0, 40.0], 1.0); // norm 50 -> clipped to 1
    comb.add(vec![0.0, 0.5], 1.0);
    let out = comb.finish(1.0).unwrap();
    assert!(
        (out.delta[0] - 0.3).abs() < 1e-6 && (out.delta[1] - 0.65).abs() < 1e-6,
        "{out:?}"
    );

    // Adaptive: no bound in the first round, then 1 x the median norm (0.5 here).
    let mut a = NormClipped::new(
        Box::new(FedOpt::fedavg()),
        ClipSpec::AdaptiveMedian { multiplier: 1.0 },
    );
    let mut r1 = a.combiner(2, 1.0);
    r1.add(vec![3.0, 4.0], 1.0);
    r1.add(vec![0.0, 0.5], 1.0);
    r1.add(vec![0.3, 0.4], 1.0);
    assert_eq!(r1.finish(1.0).unwrap().delta[0], 1.1);
    let mut r2 = a.combiner(2, 1.0);
    r2.add(vec![3.0, 4.0], 1.0);
    let d = r2.finish(1.0).unwrap().delta;
    assert!((l2_norm(&d) - 0.5).abs() < 1e-6, "{d:?}");
}

#[test]
fn metrics_are_weighted_by_participant() {
    let m = weighted_metrics(&[
        (1.0, vec![("loss".into(), 2.0)]),
        (3.0, vec![("loss".into(), 1.0), ("acc".into(), 0.5)]),
    ]);
    assert_eq!(m, vec![("acc".into(), 0.5), ("loss".into(), 1.25)]);
}
