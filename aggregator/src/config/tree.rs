//! `[tree]`: an aggregator's place in a tree of aggregators (see
//! `coordinator::tree`), and what it turns into: the coordinator's
//! [`TreeRole`](crate::coordinator::TreeRole) and a leaf's
//! [`ParentLink`](crate::uplink::ParentLink).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AggregatorConfig, ConfigError};

/// `[tree]`: `[tree.parent]` makes this aggregator a leaf of another,
/// `[tree.leaves]` a root over others (both: a middle node). Neither: a
/// lone aggregator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TreeConfig {
    pub parent: Option<ParentConfig>,
    pub leaves: Option<LeavesConfig>,
}

/// `[tree.parent]`: where the parent is. The leaf authenticates with the
/// key in its state directory's `leaf.key` (`fedge-aggregator leaf-key`
/// prints its public half for the parent's `tree.leaves.keys`). Rounds,
/// models, plans and deadlines are the parent's: this file's
/// `rounds.rounds` is not used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    /// The parent's QUIC address.
    pub address: SocketAddr,
    /// SHA-256 fingerprint of the parent's certificate, hex
    /// (`fedge-aggregator fingerprint` on the parent's state directory).
    pub pin: String,
    /// Time kept back from the parent's deadline for the partial's upload:
    /// this leaf's round closes that long before it.
    #[serde(default = "default_upload_margin_ms")]
    pub upload_margin_ms: u64,
}

fn default_upload_margin_ms() -> u64 {
    2_000
}

/// `[tree.leaves]`: who may send this root partial aggregates, and what
/// one may claim. `rounds.devices_per_round` is then the partials a round
/// waits for, `rounds.min_devices` its quorum, `weights.max_share` the cap
/// on one leaf's share; a leaf's weight is what its devices weighed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeavesConfig {
    /// The leaves' Ed25519 public keys, hex (each leaf's `leaf.pub`). Any
    /// other key is refused when it authenticates.
    pub keys: Vec<String>,
    /// Largest weight one device can carry at a leaf (with
    /// `weights.samples = linear` at the leaves, the most samples a device
    /// may count): a partial's weight may not exceed its device count
    /// times this.
    pub device_weight_max: f64,
    /// Most devices one partial aggregate may combine.
    #[serde(default = "default_devices_max")]
    pub devices_max: u32,
}

fn default_devices_max() -> u32 {
    10_000
}

impl AggregatorConfig {
    /// The coordinator's place in the tree (`[tree]`), keys parsed.
    pub fn tree_role(&self) -> Result<crate::coordinator::TreeRole, ConfigError> {
        let leaves = match &self.tree.leaves {
            None => None,
            Some(l) => {
                let mut keys = std::collections::BTreeSet::new();
                for k in &l.keys {
                    let key = crate::ledger::parse_public_key(k.trim()).map_err(|e| {
                        ConfigError::Invalid(format!("tree.leaves.keys: `{k}`: {e}"))
                    })?;
                    keys.insert(key.to_bytes());
                }
                Some(crate::coordinator::LeafBounds {
                    keys,
                    devices_max: l.devices_max,
                    device_weight_max: l.device_weight_max,
                })
            }
        };
        Ok(crate::coordinator::TreeRole {
            leaf: self.tree.parent.is_some(),
            leaves,
        })
    }

    /// `[tree.parent]` as the leaf's link needs it.
    pub fn parent_link(&self) -> Result<Option<crate::uplink::ParentLink>, ConfigError> {
        let Some(p) = &self.tree.parent else {
            return Ok(None);
        };
        let clean: String = p.pin.trim().chars().filter(|c| *c != ':').collect();
        let pin: [u8; 32] = hex::decode(&clean)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "tree.parent.pin must be 64 hex digits (the parent's certificate \
                     fingerprint), got `{}`",
                    p.pin
                ))
            })?;
        Ok(Some(crate::uplink::ParentLink {
            address: p.address,
            pin,
            upload_margin: Duration::from_millis(p.upload_margin_ms),
            chunk_bytes: self.rounds.chunk_bytes,
            // A root answers within its check-in window (keep it short).
            reply_timeout: Duration::from_secs(30),
        }))
    }
}
