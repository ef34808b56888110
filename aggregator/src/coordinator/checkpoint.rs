//! Server state that must survive a restart besides the model and the open
//! round's updates: the strategy's (FedAdam/FedYogi moments, the adaptive
//! clipping bound) and the round policy's (FedBuff's replay records and the
//! models of the rounds in its staleness window). Emitted as
//! [`Event::Checkpoint`] after every published version and restored before
//! the open round's updates, so a restarted aggregator continues the same
//! model sequence instead of silently starting its optimizer afresh.
//!
//! Layout: `MAGIC`, the model version it belongs to (32 bytes), then two
//! sections, each a u64 little-endian length and its bytes: the policy's
//! state (JSON) and the strategy's (see `Strategy::checkpoint`).

use super::{Coordinator, Event};
use bytes::Bytes;
use fedge_proto::ModelVersion;

const MAGIC: &[u8; 16] = b"fedge-ckpt-v1\0\0\0";

fn section<'a>(b: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    let (len, rest) = b
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("checkpoint: {what} section is cut short"))?;
    let len = usize::try_from(u64::from_le_bytes(*len))
        .ok()
        .filter(|&l| l <= rest.len())
        .ok_or_else(|| format!("checkpoint: {what} section is cut short"))?;
    Ok(rest.split_at(len))
}

impl Coordinator {
    /// The state to keep with the current version.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.current_version.0);
        let policy = self.policy.checkpoint();
        out.extend_from_slice(&(policy.len() as u64).to_le_bytes());
        out.extend_from_slice(&policy);
        let mut strategy = Vec::new();
        self.strategy.checkpoint(&mut strategy);
        out.extend_from_slice(&(strategy.len() as u64).to_le_bytes());
        out.extend_from_slice(&strategy);
        out
    }

    /// Restores a [`Coordinator::checkpoint`] taken at the current version.
    /// Call it before restoring any update. On error the coordinator may
    /// hold part of the state: do not run it (the server refuses to start).
    pub fn restore_checkpoint(&mut self, state: &[u8]) -> Result<(), String> {
        let rest = state
            .strip_prefix(MAGIC.as_slice())
            .ok_or("checkpoint: not a fedge checkpoint (or another version of one)")?;
        let (version, rest) = rest
            .split_first_chunk::<32>()
            .ok_or("checkpoint: cut short")?;
        let version = ModelVersion(*version);
        if version != self.current_version {
            return Err(format!(
                "checkpoint is for model {version}, the current model is {}",
                self.current_version
            ));
        }
        if self.round.combiner.count() > 0 {
            return Err("checkpoint: restore it before the open round's updates".into());
        }
        let (policy, rest) = section(rest, "policy")?;
        let (strategy, rest) = section(rest, "strategy")?;
        if !rest.is_empty() {
            return Err("checkpoint: trailing bytes".into());
        }
        self.policy.restore(policy)?;
        if !self.strategy.restore(strategy)?.is_empty() {
            return Err("checkpoint: the strategy's state has trailing bytes".into());
        }
        // The round's combiner depends on the strategy's state (the
        // adaptive clipping bound).
        let dim = self.current.params.values.len();
        self.round.combiner = self.strategy.combiner(dim, self.cfg.weights.max_share);
        Ok(())
    }

    /// Emits the checkpoint of the version just published.
    pub(super) fn emit_checkpoint(&mut self) {
        let state = Bytes::from(self.checkpoint());
        self.event(Event::Checkpoint {
            version: self.current_version,
            state,
        });
    }
}
