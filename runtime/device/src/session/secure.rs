//! The session's part in a SecAgg+ round (the state machine is
//! [`crate::secagg::SecAggClient`]): joined when a task offer carries the
//! round's parameters and this device's index, fed the aggregator's
//! stage messages whatever the task's phase, given the trained update in
//! place of an upload. Nothing is retried: a device that loses its
//! connection or its keys is a dropout, which the protocol survives.

use std::time::Instant;

use fedge_proto::DeviceMsg;
use fedge_proto::msg::SecAggOffer;
use fedge_proto::secagg::{AggSecAgg, SecAggError};

use super::DeviceSession;
use crate::secagg::SecAggClient;

pub(super) struct SecureTask {
    round_id: u64,
    bits: u32,
    client: SecAggClient,
}

impl DeviceSession {
    /// Take part in round `round_id`'s SecAgg+: fresh keys and seeds from
    /// the operating system, the device's keys advertised at once.
    pub(super) fn join_secure(
        &mut self,
        round_id: u64,
        offer: &SecAggOffer,
    ) -> Result<(), SecAggError> {
        let mut randomness = [0u8; 32];
        getrandom::fill(&mut randomness)
            .map_err(|e| SecAggError::Params(format!("no randomness: {e}")))?;
        let client = SecAggClient::new(offer.params.clone(), offer.index, randomness)?;
        self.secure = Some(SecureTask {
            round_id,
            bits: offer.params.bits,
            client,
        });
        self.pump_secure();
        Ok(())
    }

    pub(super) fn on_secagg(&mut self, round_id: u64, msg: AggSecAgg) {
        let Some(t) = self.secure.as_mut().filter(|t| t.round_id == round_id) else {
            tracing::debug!(
                round_id,
                msg = msg.name(),
                "SecAgg+ message for no part held"
            );
            return;
        };
        if let Err(e) = t.client.handle_message(msg) {
            tracing::warn!(round_id, %e, "leaving the round's SecAgg+");
            self.secure = None;
            return;
        }
        self.pump_secure();
    }

    /// The trained update goes into the SecAgg+ round (clipped, quantized
    /// and masked there, never sent in the clear); the device then asks
    /// for its next task and answers the unmasking when it comes.
    pub(super) fn send_masked(&mut self, now: Instant, round_id: u64, delta: &[f32]) {
        let result = match self.secure.as_mut().filter(|t| t.round_id == round_id) {
            Some(t) => t.client.set_update(delta),
            None => {
                // The connection (and the keys) went while training.
                tracing::info!(round_id, "trained after leaving the round's SecAgg+");
                self.after_round(now);
                return;
            }
        };
        if let Err(e) = result {
            self.secure = None;
            let detail = format!("update not maskable: {e}");
            self.give_up(now, round_id, fedge_proto::RejectCode::NonFinite, detail);
            return;
        }
        self.pump_secure();
        self.after_round(now);
    }

    /// What the client has to send goes out (and, in a simulation told to
    /// drop after a stage, nothing more).
    fn pump_secure(&mut self) {
        let Some(t) = self.secure.as_mut() else {
            return;
        };
        let mut dropped = false;
        while let Some(msg) = t.client.poll_transmit() {
            let stage = msg.stage();
            self.transmit.push_back(DeviceMsg::SecAgg {
                round_id: t.round_id,
                bits: t.bits,
                msg,
            });
            if self.cfg.secagg_drop_after == Some(stage) {
                dropped = true;
                break;
            }
        }
        if dropped {
            tracing::info!(round_id = t.round_id, "simulated SecAgg+ dropout");
            self.secure = None;
        }
    }
}
