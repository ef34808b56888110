//! Combining a round's updates: the weighted mean (streaming) and robust
//! aggregators that limit what a malicious minority can do, all usable with
//! stake weights.
//!
//! **Invariant:** the mean streams: memory is O(model x (1 + 1/max_share)),
//! not O(model x devices). Robust aggregators need every update at once
//! (they compare updates with each other), so they hold O(model x devices).

use crate::weighting::cap_shares;

/// A round's combined update, with each participant's final weight (after
/// share capping), in the order they were added. `T` is `f64` where a leaf
/// forwards it as a partial aggregate ([`Combiner::finish_f64`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Combined<T = f32> {
    pub delta: Vec<T>,
    pub weights: Vec<f64>,
}

/// An update's values as a combiner takes them: a device's as decoded
/// (float32), or a partial aggregate's at the float64 it travelled in.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `sum[i] += w x self[i]`, in float64.
    fn add_scaled_to(&self, sum: &mut [f64], w: f64) {
        match self {
            Values::F32(v) => {
                for (s, &x) in sum.iter_mut().zip(v) {
                    *s += w * f64::from(x);
                }
            }
            Values::F64(v) => {
                for (s, &x) in sum.iter_mut().zip(v) {
                    *s += w * x;
                }
            }
        }
    }

    pub fn norm(&self) -> f64 {
        match self {
            Values::F32(v) => l2_norm(v),
            Values::F64(v) => v.iter().map(|x| x * x).sum::<f64>().sqrt(),
        }
    }

    /// Multiplies every value by `s`.
    pub fn scale(&mut self, s: f64) {
        match self {
            Values::F32(v) => {
                let s = s as f32;
                v.iter_mut().for_each(|x| *x *= s);
            }
            Values::F64(v) => v.iter_mut().for_each(|x| *x *= s),
        }
    }

    /// Scales the values down to norm `bound` if they are longer.
    pub fn clip_to_norm(&mut self, bound: f64) -> bool {
        match self {
            Values::F32(v) => clip_to_norm(v, bound),
            Values::F64(_) => {
                let n = self.norm();
                let clipped = n > bound && n > 0.0;
                if clipped {
                    self.scale(bound / n);
                }
                clipped
            }
        }
    }

    /// The values at float32 (a partial's rounded).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Values::F32(v) => std::borrow::Cow::Borrowed(v),
            Values::F64(v) => std::borrow::Cow::Owned(v.iter().map(|&x| x as f32).collect()),
        }
    }

    /// The values at float32, taken.
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Values::F32(v) => v,
            Values::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        }
    }
}

#[cfg(test)]
impl Combined {
    /// One participant's update, at weight 1 (for strategy tests).
    pub(crate) fn one(d: &[f32]) -> Self {
        Combined {
            delta: d.to_vec(),
            weights: vec![1.0],
        }
    }
}

/// Accumulates accepted updates and combines them at round close.
pub trait Combiner: Send {
    fn dimension(&self) -> usize;
    fn add(&mut self, update: Vec<f32>, weight: f64);
    fn count(&self) -> usize;
    /// The combined update; `None` when nothing was added.
    fn finish(&mut self, max_share: f64) -> Option<Combined>;

    /// Adds an update of either precision. The streaming mean sums a
    /// float64 one as it is; combiners that hold float32 updates (the
    /// robust ones) round it.
    fn add_values(&mut self, update: Values, weight: f64) {
        self.add(update.into_f32(), weight);
    }

    /// [`Combiner::finish`] before the final rounding to float32: what a
    /// leaf forwards as its partial aggregate. The streaming mean's is its
    /// float64 mean; by default, `finish`'s result widened.
    fn finish_f64(&mut self, max_share: f64) -> Option<Combined<f64>> {
        self.finish(max_share).map(|c| Combined {
            delta: c.delta.into_iter().map(f64::from).collect(),
            weights: c.weights,
        })
    }
}

/// Which combiner a round uses.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CombineSpec {
    Mean,
    /// Weighted coordinate-wise median.
    Median,
    /// Weighted trimmed mean: drop `trim` of the weight at each end, per coordinate.
    TrimmedMean {
        trim: f64,
    },
    /// Multi-Krum: score each update by its squared distances to its
    /// n - f - 2 nearest neighbours, average the `keep` best (weighted).
    MultiKrum {
        byzantine: usize,
        keep: usize,
    },
    /// Centered clipping (Karimireddy et al. 2021): start at the median,
    /// then `iters` times move by the weighted mean of the clipped
    /// differences (radius `tau`).
    CenteredClipping {
        tau: f64,
        iters: usize,
    },
}

impl CombineSpec {
    pub fn build(&self, dim: usize) -> Box<dyn Combiner> {
        match self {
            CombineSpec::Mean => Box::new(StreamingMean::new(dim)),
            other => Box::new(Buffered {
                dim,
                updates: Vec::new(),
                weights: Vec::new(),
                rule: other.clone(),
            }),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match *self {
            CombineSpec::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => Err(format!(
                "trimmed mean: trim must be in [0, 0.5), got {trim}"
            )),
            CombineSpec::MultiKrum { keep: 0, .. } => Err("multi-krum: keep must be >= 1".into()),
            CombineSpec::CenteredClipping { tau, iters }
                if tau.is_nan() || tau <= 0.0 || iters == 0 =>
            {
                Err("centered clipping: tau > 0 and iters >= 1".into())
            }
            _ => Ok(()),
        }
    }
}

/// The weighted mean, streaming. To cap shares exactly it keeps the
/// heaviest `ceil(1/max_share)` updates aside (only they can be capped) and
/// sums the rest as they arrive.
pub struct StreamingMean {
    dim: usize,
    sum: Vec<f64>,
    sum_weight: f64,
    summed: Vec<usize>,
    heavy: Vec<(usize, f64, Values)>,
    heavy_max: usize,
    weights: Vec<f64>,
}

impl StreamingMean {
    pub fn new(dim: usize) -> Self {
        StreamingMean {
            dim,
            sum: vec![0.0; dim],
            sum_weight: 0.0,
            summed: Vec::new(),
            heavy: Vec::new(),
            heavy_max: usize::MAX,
            weights: Vec::new(),
        }
    }

    /// Declare the share cap up front so at most `ceil(1/max_share) + 1`
    /// updates are held (the default holds all of them until `finish`).
    pub fn with_share_cap(dim: usize, max_share: f64) -> Self {
        let mut m = Self::new(dim);
        if max_share < 1.0 {
            m.heavy_max = (1.0 / max_share).ceil() as usize + 1;
        } else {
            m.heavy_max = 0;
        }
        m
    }

    fn spill(&mut self, idx: usize, w: f64, u: &Values) {
        u.add_scaled_to(&mut self.sum, w);
        self.sum_weight += w;
        self.summed.push(idx);
    }

    /// The weighted mean at float64 and the final weights.
    fn mean(&mut self, max_share: f64) -> Option<Combined<f64>> {
        if self.weights.is_empty() {
            return None;
        }
        let final_w = cap_shares(&self.weights, max_share);
        let total: f64 = final_w.iter().sum();
        let mut sum = std::mem::take(&mut self.sum);
        // Summed updates were never capped (they are not among the
        // heaviest), but the total weight changed.
        let spilled_scale: f64 = if self.sum_weight > 0.0 {
            let w_final: f64 = self.summed.iter().map(|&i| final_w[i]).sum();
            w_final / self.sum_weight
        } else {
            0.0
        };
        for s in &mut sum {
            *s *= spilled_scale;
        }
        for (i, _, u) in &self.heavy {
            u.add_scaled_to(&mut sum, final_w[*i]);
        }
        for s in &mut sum {
            *s /= total;
        }
        Some(Combined {
            delta: sum,
            weights: final_w,
        })
    }
}

impl Combiner for StreamingMean {
    fn dimension(&self) -> usize {
        self.dim
    }

    fn add(&mut self, update: Vec<f32>, weight: f64) {
        self.add_values(Values::F32(update), weight);
    }

    fn add_values(&mut self, update: Values, weight: f64) {
        assert_eq!(update.len(), self.dim, "update dimension");
        assert!(weight.is_finite() && weight > 0.0, "weight {weight}");
        let idx = self.weights.len();
        self.weights.push(weight);
        self.heavy.push((idx, weight, update));
        if self.heavy.len() > self.heavy_max {
            let (pos, _) = self
                .heavy
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
                .expect("non-empty");
            let (i, w, u) = self.heavy.swap_remove(pos);
            self.spill(i, w, &u);
        }
    }

    fn count(&self) -> usize {
        self.weights.len()
    }

    fn finish(&mut self, max_share: f64) -> Option<Combined> {
        self.mean(max_share).map(|c| Combined {
            delta: c.delta.iter().map(|&s| s as f32).collect(),
            weights: c.weights,
        })
    }

    fn finish_f64(&mut self, max_share: f64) -> Option<Combined<f64>> {
        self.mean(max_share)
    }
}

/// Robust rules that need every update at once.
struct Buffered {
    dim: usize,
    updates: Vec<Vec<f32>>,
    weights: Vec<f64>,
    rule: CombineSpec,
}

impl Combiner for Buffered {
    fn dimension(&self) -> usize {
        self.dim
    }

    fn add(&mut self, update: Vec<f32>, weight: f64) {
        assert_eq!(update.len(), self.dim, "update dimension");
        assert!(weight.is_finite() && weight > 0.0, "weight {weight}");
        self.updates.push(update);
        self.weights.push(weight);
    }

    fn count(&self) -> usize {
        self.updates.len()
    }

    fn finish(&mut self, max_share: f64) -> Option<Combined> {
        if self.updates.is_empty() {
            return None;
        }
        let w = cap_shares(&self.weights, max_share);
        let delta = match self.rule {
            CombineSpec::Mean => weighted_mean(&self.updates, &w),
            CombineSpec::Median => weighted_quantile_mean(&self.updates, &w, 0.0, true),
            CombineSpec::TrimmedMean { trim } => {
                weighted_quantile_mean(&self.updates, &w, trim, false)
            }
            CombineSpec::MultiKrum { byzantine, keep } => {
                let chosen = multi_krum(&self.updates, byzantine, keep);
                let ups: Vec<Vec<f32>> = chosen.iter().map(|&i| self.updates[i].clone()).collect();
                let ws: Vec<f64> = chosen.iter().map(|&i| w[i]).collect();
                weighted_mean(&ups, &ws)
            }
            CombineSpec::CenteredClipping { tau, iters } => {
                centered_clip(&self.updates, &w, tau, iters)
            }
        };
        Some(Combined { delta, weights: w })
    }
}

/// Plain weighted mean (the naive reference the streaming one is tested against).
pub fn weighted_mean(updates: &[Vec<f32>], w: &[f64]) -> Vec<f32> {
    let total: f64 = w.iter().sum();
    let dim = updates[0].len();
    (0..dim)
        .map(|j| {
            (updates
                .iter()
                .zip(w)
                .map(|(u, wi)| wi * f64::from(u[j]))
                .sum::<f64>()
                / total) as f32
        })
        .collect()
}

/// Per coordinate: sort values, drop `trim` of the total weight from each
/// end, average what is left by weight. With `median`, return the weighted
/// median instead (the value where the cumulative weight crosses half;
/// the mean of the two middle values on an exact tie).
pub fn weighted_quantile_mean(
    updates: &[Vec<f32>],
    w: &[f64],
    trim: f64,
    median: bool,
) -> Vec<f32> {
    let dim = updates[0].len();
    let total: f64 = w.iter().sum();
    let mut col: Vec<(f32, f64)> = Vec::with_capacity(updates.len());
    (0..dim)
        .map(|j| {
            col.clear();
            col.extend(updates.iter().zip(w).map(|(u, &wi)| (u[j], wi)));
            col.sort_by(|a, b| a.0.total_cmp(&b.0));
            if median {
                let half = total / 2.0;
                let mut acc = 0.0;
                for (k, &(v, wi)) in col.iter().enumerate() {
                    acc += wi;
                    if (acc - half).abs() <= 1e-12 * total && k + 1 < col.len() {
                        return ((f64::from(v) + f64::from(col[k + 1].0)) / 2.0) as f32;
                    }
                    if acc > half {
                        return v;
                    }
                }
                col.last().expect("non-empty").0
            } else {
                let (lo, hi) = (trim * total, (1.0 - trim) * total);
                let (mut acc, mut s, mut sw) = (0.0, 0.0, 0.0);
                for &(v, wi) in &col {
                    // The part of this value's weight inside [lo, hi].
                    let inside = (acc + wi).min(hi) - acc.max(lo);
                    if inside > 0.0 {
                        s += inside * f64::from(v);
                        sw += inside;
                    }
                    acc += wi;
                }
                (s / sw) as f32
            }
        })
        .collect()
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum()
}

/// Indices of the `keep` updates with the lowest Krum scores.
pub fn multi_krum(updates: &[Vec<f32>], byzantine: usize, keep: usize) -> Vec<usize> {
    let n = updates.len();
    let neighbours = n.saturating_sub(byzantine + 2).max(1);
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| sq_dist(&updates[i], &updates[j]))
                .collect();
            d.sort_by(|a, b| a.total_cmp(b));
            (d.iter().take(neighbours).sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<usize> = scores.iter().take(keep.min(n)).map(|s| s.1).collect();
    chosen.sort_unstable();
    chosen
}

/// Centered clipping from the weighted median.
pub fn centered_clip(updates: &[Vec<f32>], w: &[f64], tau: f64, iters: usize) -> Vec<f32> {
    let total: f64 = w.iter().sum();
    let mut v: Vec<f64> = weighted_quantile_mean(updates, w, 0.0, true)
        .into_iter()
        .map(f64::from)
        .collect();
    for _ in 0..iters {
        let mut step = vec![0.0; v.len()];
        for (u, &wi) in updates.iter().zip(w) {
            let norm = u
                .iter()
                .zip(&v)
                .map(|(x, c)| (f64::from(*x) - c).powi(2))
                .sum::<f64>()
                .sqrt();
            let scale = if norm > tau { tau / norm } else { 1.0 };
            for ((s, x), c) in step.iter_mut().zip(u).zip(&v) {
                *s += wi * scale * (f64::from(*x) - c);
            }
        }
        for (c, s) in v.iter_mut().zip(&step) {
            *c += s / total;
        }
    }
    v.into_iter().map(|x| x as f32).collect()
}

/// L2 norm of an update.
pub fn l2_norm(u: &[f32]) -> f64 {
    u.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

/// Scale `u` down to norm `bound` if it is longer.
pub fn clip_to_norm(u: &mut [f32], bound: f64) -> bool {
    let n = l2_norm(u);
    if n > bound && n > 0.0 {
        let s = (bound / n) as f32;
        for x in u.iter_mut() {
            *x *= s;
        }
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: CombineSpec, updates: &[Vec<f32>], w: &[f64], cap: f64) -> Combined {
        let mut c = spec.build(updates[0].len());
        for (u, &wi) in updates.iter().zip(w) {
            c.add(u.clone(), wi);
        }
        c.finish(cap).unwrap()
    }

    #[test]
    fn streaming_mean_equals_the_naive_reference_with_and_without_caps() {
        let updates: Vec<Vec<f32>> = (0..12)
            .map(|i| vec![i as f32, (i * i) as f32 * 0.1, -1.0])
            .collect();
        let w: Vec<f64> = (0..12).map(|i| 1.0 + (i % 5) as f64 * 3.0).collect();
        for cap in [1.0, 0.3, 0.15, 0.1] {
            let mut s = StreamingMean::with_share_cap(3, cap);
            for (u, &wi) in updates.iter().zip(&w) {
                s.add(u.clone(), wi);
            }
            assert!(
                s.heavy.len() <= (1.0f64 / cap).ceil() as usize + 1,
                "bounded memory"
            );
            let got = s.finish(cap).unwrap();
            let want = weighted_mean(&updates, &cap_shares(&w, cap));
            for (g, e) in got.delta.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "cap {cap}: {got:?} vs {want:?}");
            }
        }
    }

    /// Two partial aggregates at float64, each a group's mean weighted by
    /// the group's weight, combine to the mean over all the updates to
    /// float64 rounding; the same partials rounded to float32 do not.
    #[test]
    fn float64_partials_combine_to_the_mean_over_their_updates() {
        let updates: Vec<Vec<f32>> = (0..6)
            .map(|i| vec![0.1 * i as f32 + 0.013, 1.0 / (i as f32 + 3.0)])
            .collect();
        let w: Vec<f64> = (0..6).map(|i| 3.0 + 2.0 * i as f64).collect();
        let mut all = StreamingMean::new(2);
        for (u, &wi) in updates.iter().zip(&w) {
            all.add(u.clone(), wi);
        }
        let want = all.finish_f64(1.0).unwrap().delta;
        let mut root = StreamingMean::new(2);
        let mut rounded = StreamingMean::new(2);
        for group in [0..2, 2..6] {
            let mut leaf = StreamingMean::new(2);
            for i in group.clone() {
                leaf.add(updates[i].clone(), w[i]);
            }
            let partial = leaf.finish_f64(1.0).unwrap();
            let weight: f64 = partial.weights.iter().sum();
            rounded.add_values(
                Values::F32(Values::F64(partial.delta.clone()).into_f32()),
                weight,
            );
            root.add_values(Values::F64(partial.delta), weight);
        }
        let got = root.finish_f64(1.0).unwrap().delta;
        let off = |v: &[f64]| {
            v.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
        };
        assert!(off(&got) < 1e-15, "{got:?} vs {want:?}");
        assert!(off(&rounded.finish_f64(1.0).unwrap().delta) > 1e-10);
    }

    #[test]
    fn robust_rules_table() {
        let honest = vec![
            vec![1.0f32, 1.0],
            vec![1.2, 0.8],
            vec![0.9, 1.1],
            vec![1.1, 0.9],
        ];
        let mut all = honest.clone();
        all.push(vec![100.0, -100.0]); // attacker
        let w = vec![1.0; 5];
        let cases: Vec<(CombineSpec, [f32; 2], f32)> = vec![
            (CombineSpec::Median, [1.1, 0.9], 1e-6),
            (CombineSpec::TrimmedMean { trim: 0.2 }, [1.1, 0.9], 1e-5),
            (
                CombineSpec::MultiKrum {
                    byzantine: 1,
                    keep: 3,
                },
                [1.0, 1.0],
                0.15,
            ),
            (
                CombineSpec::CenteredClipping { tau: 0.5, iters: 3 },
                [1.0, 1.0],
                0.6,
            ),
        ];
        for (spec, expect, tol) in cases {
            let got = run(spec.clone(), &all, &w, 1.0).delta;
            for (g, e) in got.iter().zip(expect) {
                assert!((g - e).abs() <= tol, "{spec:?}: {got:?} vs {expect:?}");
            }
        }
        // The plain mean is dragged far away.
        assert!(run(CombineSpec::Mean, &all, &w, 1.0).delta[0] > 10.0);
        assert_eq!(
            multi_krum(&all, 1, 3).iter().filter(|&&i| i == 4).count(),
            0
        );
    }

    #[test]
    fn weighted_median_and_trim_respect_weights() {
        let u = vec![vec![0.0f32], vec![1.0], vec![10.0]];
        // Heavy middle value wins the median.
        assert_eq!(
            weighted_quantile_mean(&u, &[1.0, 5.0, 1.0], 0.0, true),
            vec![1.0]
        );
        // A heavy outlier owns the median.
        assert_eq!(
            weighted_quantile_mean(&u, &[1.0, 1.0, 5.0], 0.0, true),
            vec![10.0]
        );
        // Trimming 25% of weight from each end of weights [1,2,1] keeps the middle.
        assert_eq!(
            weighted_quantile_mean(&u, &[1.0, 2.0, 1.0], 0.25, false),
            vec![1.0]
        );
        // Exact tie between two halves: average of the middle values.
        assert_eq!(
            weighted_quantile_mean(&u[..2], &[1.0, 1.0], 0.0, true),
            vec![0.5]
        );
    }

    #[test]
    fn clipping() {
        let mut u = vec![3.0f32, 4.0];
        assert!(clip_to_norm(&mut u, 1.0));
        assert!((l2_norm(&u) - 1.0).abs() < 1e-6);
        assert!(!clip_to_norm(&mut u, 2.0));
        for bad in [
            CombineSpec::TrimmedMean { trim: 0.5 },
            CombineSpec::MultiKrum {
                byzantine: 0,
                keep: 0,
            },
            CombineSpec::CenteredClipping { tau: 0.0, iters: 1 },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
