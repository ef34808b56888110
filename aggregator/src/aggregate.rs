//! Aggregation math as pure functions over `(update, weight)` pairs.
//!
//! **Invariant:** streaming. [`WeightedMean`] accumulates each update as it
//! is accepted, so memory is O(model), not O(model x devices).

/// Running weighted sum of update vectors, accumulated in f64.
#[derive(Clone, Debug)]
pub struct WeightedMean {
    sum: Vec<f64>,
    weight: f64,
    count: usize,
}

impl WeightedMean {
    pub fn new(dimension: usize) -> Self {
        WeightedMean {
            sum: vec![0.0; dimension],
            weight: 0.0,
            count: 0,
        }
    }

    pub fn dimension(&self) -> usize {
        self.sum.len()
    }

    /// Add `update` with `weight` (> 0, finite). Panics on a dimension or
    /// weight that the caller should have validated.
    pub fn add(&mut self, update: &[f32], weight: f64) {
        assert_eq!(update.len(), self.sum.len(), "update dimension");
        assert!(weight.is_finite() && weight > 0.0, "weight {weight}");
        for (s, &u) in self.sum.iter_mut().zip(update) {
            *s += weight * f64::from(u);
        }
        self.weight += weight;
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn total_weight(&self) -> f64 {
        self.weight
    }

    /// The weighted mean; `None` when nothing was added.
    pub fn mean(&self) -> Option<Vec<f32>> {
        if self.count == 0 {
            return None;
        }
        Some(self.sum.iter().map(|s| (s / self.weight) as f32).collect())
    }
}

/// `params + delta`, element-wise.
pub fn apply_delta(params: &[f32], delta: &[f32]) -> Vec<f32> {
    assert_eq!(params.len(), delta.len());
    params.iter().zip(delta).map(|(p, d)| p + d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference: materialise every update, then average.
    fn reference(updates: &[(Vec<f32>, f64)]) -> Vec<f32> {
        let dim = updates[0].0.len();
        let total: f64 = updates.iter().map(|(_, w)| w).sum();
        (0..dim)
            .map(|j| {
                (updates
                    .iter()
                    .map(|(u, w)| f64::from(u[j]) * w)
                    .sum::<f64>()
                    / total) as f32
            })
            .collect()
    }

    type Case = (Vec<(Vec<f32>, f64)>, Vec<f32>);

    #[test]
    fn weighted_mean_table() {
        let cases: Vec<Case> = vec![
            (vec![(vec![1.0, 2.0], 1.0)], vec![1.0, 2.0]),
            (
                vec![(vec![1.0, 0.0], 1.0), (vec![3.0, 4.0], 1.0)],
                vec![2.0, 2.0],
            ),
            (
                vec![(vec![1.0], 100.0), (vec![2.0], 200.0), (vec![3.0], 300.0)],
                vec![14.0 / 6.0],
            ),
            (
                vec![(vec![-1.0, 1.0], 3.0), (vec![1.0, -1.0], 1.0)],
                vec![-0.5, 0.5],
            ),
        ];
        for (updates, expect) in cases {
            let mut m = WeightedMean::new(expect.len());
            for (u, w) in &updates {
                m.add(u, *w);
            }
            let got = m.mean().unwrap();
            assert_eq!(got, expect);
            assert_eq!(got, reference(&updates));
        }
        assert_eq!(WeightedMean::new(3).mean(), None);
        assert_eq!(apply_delta(&[1.0, 2.0], &[0.5, -2.0]), vec![1.5, 0.0]);
    }
}
