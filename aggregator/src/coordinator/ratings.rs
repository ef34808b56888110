//! Ratings fed back into aggregation weights, when the operator turns it
//! on (`weights.rating_floor`; off by default). A device's rating is the
//! moving average of its scores that the store keeps with the ledger
//! ([`crate::store::Rating`]); the coordinator mirrors it in memory,
//! restored from the store at startup and moved by each settlement as the
//! store moves it ([`scoring::rating_inputs`]). A device whose rating is at
//! or below zero after `weights.rating_rounds` scored rounds weighs
//! `rating_floor` of its weight. Ratings come from the aggregator's own
//! scores, never from what a device says, so no claim raises a weight; a
//! new key starts at full weight (what weight costs is stake's business).

use std::collections::HashMap;

use super::Coordinator;
use super::output::SettledEntry;
use crate::scoring;
use crate::store::Rating;

/// Each device's rating and scored rounds.
#[derive(Default)]
pub(super) struct Ratings {
    by_device: HashMap<String, (f64, u64)>,
}

impl Ratings {
    /// Moves the ratings of a settled round's participants.
    pub(super) fn settle(&mut self, alpha: f64, entries: &[SettledEntry]) {
        let scored: Vec<(Option<f64>, bool)> =
            entries.iter().map(|e| (e.score, e.flagged())).collect();
        for (e, x) in entries.iter().zip(scoring::rating_inputs(&scored)) {
            let Some(x) = x else {
                continue;
            };
            let r = self.by_device.entry(e.device.clone()).or_insert((0.0, 0));
            r.0 = if r.1 == 0 {
                alpha * x
            } else {
                alpha * x + (1.0 - alpha) * r.0
            };
            r.1 += 1;
        }
    }
}

impl Coordinator {
    /// Restores the ratings the store kept (at startup).
    pub fn restore_ratings(&mut self, rows: &[Rating]) {
        for r in rows {
            self.ratings
                .by_device
                .insert(r.device.clone(), (r.rating, r.rounds));
        }
    }

    /// What `device`'s rating leaves of its aggregation weight.
    pub(super) fn rating_factor(&self, device: &str) -> f64 {
        let w = &self.cfg.weights;
        match (w.rating_floor, self.ratings.by_device.get(device)) {
            (Some(floor), Some(&(rating, rounds)))
                if rounds >= w.rating_rounds && rating <= 0.0 =>
            {
                floor
            }
            _ => 1.0,
        }
    }
}
