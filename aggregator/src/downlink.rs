//! Downlink compression with server-side error feedback: the published
//! model moves by a compressed step, and what the compression dropped is
//! carried into the next one.
//!
//! With `[strategy] downlink = "topk:0.1"` (any update codec spec), a
//! round's new parameters are not the strategy's `x + s` but
//! `x + C(s + e)`, where `C(v)` is what the codec transmits of `v`
//! (`decode(encode(v))`) and the residual `e <- s + e - C(s + e)` is kept
//! (and checkpointed) for the next round. This is the server half of
//! DoubleSqueeze (Tang et al. 2019, "DoubleSqueeze: Parallel Stochastic
//! Gradient Descent with Double-Pass Error-Compensated Compression",
//! Algorithm 1): every participant, the server included, holds the same
//! compressed model, so devices' copies never drift from the server's, and
//! the error feedback makes the compressed steps add up to the true ones
//! over rounds.
//!
//! What travels: a device holding one of the last versions fetches the
//! compressed steps from its version to the current one (the codec's
//! payloads, `fedge_proto::delta::encode_steps`; the coordinator keeps
//! the last `versions_kept` of them), which it decodes and adds with
//! [`fedge_proto::delta::apply_step`], the very function the server
//! published them with, so it gets the same bits (the content hash proves
//! it). A device holding an older version gets the lossless XOR delta, or
//! the whole model.

use fedge_proto::codec::{self, CodecSpec};

use fedge_proto::msg::TrainingPlan;

use crate::robust::{Combined, Combiner};
use crate::strategy::{Failure, Strategy};

/// A strategy whose published steps are compressed with error feedback.
pub struct Downlink {
    inner: Box<dyn Strategy>,
    spec: CodecSpec,
    /// What earlier rounds' compression left out (empty until the first).
    residual: Vec<f32>,
    seed: u64,
    /// The last published step's payload, until the coordinator takes it.
    published: Option<bytes::Bytes>,
}

impl Downlink {
    pub fn new(inner: Box<dyn Strategy>, spec: CodecSpec, seed: u64) -> Self {
        Downlink {
            inner,
            spec,
            residual: Vec::new(),
            seed,
            published: None,
        }
    }
}

impl Strategy for Downlink {
    fn name(&self) -> String {
        format!("{} (downlink {})", self.inner.name(), self.spec)
    }

    fn configure_round(&mut self, round_id: u64, base: &TrainingPlan) -> TrainingPlan {
        self.inner.configure_round(round_id, base)
    }

    fn combiner(&mut self, dim: usize, max_share: f64) -> Box<dyn Combiner> {
        self.inner.combiner(dim, max_share)
    }

    fn aggregate_round(
        &mut self,
        round_id: u64,
        params: &[f32],
        combined: &Combined,
        failures: &[Failure],
    ) -> Vec<f32> {
        let target = self
            .inner
            .aggregate_round(round_id, params, combined, failures);
        if self.residual.len() != params.len() {
            self.residual = vec![0.0; params.len()];
        }
        let step: Vec<f32> = target
            .iter()
            .zip(params)
            .zip(&self.residual)
            .map(|((&t, &p), &e)| (t - p) + e)
            .collect();
        // A step that is not finite is published as is: the coordinator
        // refuses to publish it and keeps the model, and the residual
        // stays as it was.
        self.published = None;
        let Ok((payload, sent)) =
            codec::encode_with_transmitted(&self.spec, &step, self.seed ^ round_id)
        else {
            return target;
        };
        for ((e, &s), &c) in self.residual.iter_mut().zip(&step).zip(&sent) {
            *e = s - c;
        }
        self.published = Some(payload);
        let mut next = params.to_vec();
        fedge_proto::delta::apply_step(&mut next, &sent);
        next
    }

    fn take_published_step(&mut self) -> Option<bytes::Bytes> {
        self.published.take()
    }

    fn configure_evaluate(&mut self, round_id: u64) -> bool {
        self.inner.configure_evaluate(round_id)
    }

    fn aggregate_evaluate(&mut self, results: &[(f64, Vec<(String, f64)>)]) -> Vec<(String, f64)> {
        self.inner.aggregate_evaluate(results)
    }

    /// The inner strategy's state, then the residual (a u64 count and
    /// that many little-endian f32s).
    fn checkpoint(&self, out: &mut Vec<u8>) {
        self.inner.checkpoint(out);
        out.extend_from_slice(&(self.residual.len() as u64).to_le_bytes());
        for v in &self.residual {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn restore<'a>(&mut self, state: &'a [u8]) -> Result<&'a [u8], String> {
        let rest = self.inner.restore(state)?;
        let (n, rest) = rest
            .split_first_chunk::<8>()
            .ok_or("strategy state: the downlink residual is cut short")?;
        let n = usize::try_from(u64::from_le_bytes(*n))
            .ok()
            .filter(|n| n.checked_mul(4).is_some_and(|b| b <= rest.len()))
            .ok_or("strategy state: the downlink residual is cut short")?;
        let (body, rest) = rest.split_at(4 * n);
        let residual: Vec<f32> = body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if residual.iter().any(|v| !v.is_finite()) {
            return Err("strategy state: the downlink residual is not finite".into());
        }
        self.residual = residual;
        Ok(rest)
    }

    fn report(&self) -> Vec<(String, f64)> {
        let mut r = self.inner.report();
        let norm = self
            .residual
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        r.push(("downlink_residual_norm".into(), norm));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::StrategyConfig;

    fn combined(d: &[f32]) -> Combined {
        Combined {
            delta: d.to_vec(),
            weights: vec![1.0],
        }
    }

    /// Top-1 of 4 coordinates: each round moves one coordinate, the
    /// largest of step + residual; what is left over is sent later, so
    /// the published model catches up with the uncompressed one.
    #[test]
    fn compressed_steps_move_few_coordinates_and_catch_up() {
        let spec = CodecSpec::parse("topk:0.25").unwrap();
        let mut plain = StrategyConfig::default().build(1);
        let mut d = Downlink::new(StrategyConfig::default().build(1), spec, 7);
        let step = [1.0f32, 0.5, 0.25, 0.125];
        let (mut x, mut y) = (vec![0.0f32; 4], vec![0.0f32; 4]);
        for round in 1..=12 {
            let before = y.clone();
            x = plain.aggregate_round(round, &x, &combined(&step), &[]);
            y = d.aggregate_round(round, &y, &combined(&step), &[]);
            let moved = y.iter().zip(&before).filter(|(a, b)| a != b).count();
            assert!(moved <= 1, "round {round}: {moved} coordinates moved");
            // The published model plus what is still owed is the
            // uncompressed model.
            for i in 0..4 {
                assert!((y[i] + d.residual[i] - x[i]).abs() < 1e-5, "round {round}");
            }
        }
        // Nothing is owed for long: the residual stays within a few steps.
        assert!(d.residual.iter().all(|r| r.abs() < 2.0), "{:?}", d.residual);
    }

    #[test]
    fn the_residual_survives_a_checkpoint_and_bad_state_is_refused() {
        let spec = CodecSpec::parse("topk:0.5").unwrap();
        let mut d = Downlink::new(StrategyConfig::default().build(1), spec, 1);
        d.aggregate_round(1, &[0.0; 4], &combined(&[1.0, 2.0, 3.0, 4.0]), &[]);
        let mut state = Vec::new();
        d.checkpoint(&mut state);
        let mut back = Downlink::new(StrategyConfig::default().build(1), spec, 1);
        assert_eq!(back.restore(&state).unwrap(), &[] as &[u8]);
        assert_eq!(back.residual, d.residual);
        assert!(back.restore(&state[..state.len() - 1]).is_err());
        let mut nan = state.clone();
        let n = nan.len();
        nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(back.restore(&nan).is_err());
    }
}
