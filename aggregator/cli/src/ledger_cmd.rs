//! `fedge-aggregator ledger verify | proof | export | ratings`: reading a
//! state directory's contribution ledger (see
//! `fedge_aggregator::ledger`) without changing it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fedge_aggregator::ledger::{self, parse_public_key};
use fedge_aggregator::store::LedgerView;
use fedge_proto::sign::VerifyingKey;

#[derive(Subcommand)]
pub enum LedgerCmd {
    /// Check the whole chain: every record decodes, follows the previous
    /// one (sequence number and hash), carries the aggregator's signature
    /// and a reward root that matches its rewards. Fails naming the first
    /// bad record.
    Verify {
        #[arg(long, default_value = "fedge-aggregator-state")]
        state_dir: PathBuf,
        /// The ledger public key to check against (hex); default: the
        /// state directory's `ledger.pub`. Pin it: whoever can rewrite the
        /// ledger can rewrite that file too.
        #[arg(long)]
        key: Option<String>,
    },
    /// Print a device's inclusion proof for its reward in a round (JSON),
    /// for `fedge-device verify-reward`.
    Proof {
        #[arg(long, default_value = "fedge-aggregator-state")]
        state_dir: PathBuf,
        /// The device's public key (hex).
        #[arg(long)]
        device: String,
        #[arg(long)]
        round: u64,
        #[arg(long)]
        key: Option<String>,
    },
    /// Print the per-round reward roots (JSON), for anchoring elsewhere.
    Export {
        #[arg(long, default_value = "fedge-aggregator-state")]
        state_dir: PathBuf,
        #[arg(long)]
        key: Option<String>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print every device's rating (JSON), best first.
    Ratings {
        #[arg(long, default_value = "fedge-aggregator-state")]
        state_dir: PathBuf,
    },
}

fn key_for(state_dir: &std::path::Path, key: Option<&str>) -> anyhow::Result<VerifyingKey> {
    match key {
        Some(k) => parse_public_key(k).map_err(|e| anyhow::anyhow!("--key: {e}")),
        None => Ok(ledger::public_key(state_dir)?),
    }
}

/// The verified records of a state directory.
fn verified(
    state_dir: &std::path::Path,
    key: Option<&str>,
) -> anyhow::Result<Vec<fedge_proto::ledger::LedgerRecord>> {
    let key = key_for(state_dir, key)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let view = rt
        .block_on(LedgerView::open(state_dir))
        .with_context(|| format!("reading the ledger in {}", state_dir.display()))?;
    Ok(ledger::verify_chain(&view.records, &key)?)
}

pub fn run(cmd: LedgerCmd) -> anyhow::Result<()> {
    match cmd {
        LedgerCmd::Verify { state_dir, key } => {
            let records = verified(&state_dir, key.as_deref())?;
            let paid: u128 = records
                .iter()
                .flat_map(|r| &r.entries)
                .map(|e| u128::from(e.reward))
                .sum();
            let head = records
                .last()
                .map(|r| hex::encode(r.hash()))
                .unwrap_or_else(|| "-".into());
            println!(
                "ledger ok: {} records, {} participations, {paid} reward units paid; head {head}",
                records.len(),
                records.iter().map(|r| r.entries.len()).sum::<usize>(),
            );
        }
        LedgerCmd::Proof {
            state_dir,
            device,
            round,
            key,
        } => {
            let records = verified(&state_dir, key.as_deref())?;
            let device =
                ledger::device_bytes(&device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let proof =
                ledger::reward_proof(&records, &device, round).map_err(anyhow::Error::msg)?;
            proof.verify()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&ledger::proof_json(&proof))?
            );
        }
        LedgerCmd::Export {
            state_dir,
            key,
            out,
        } => {
            let records = verified(&state_dir, key.as_deref())?;
            let json = serde_json::to_string_pretty(&serde_json::json!({
                "ledger_key": hex::encode(key_for(&state_dir, key.as_deref())?.to_bytes()),
                "rounds": ledger::roots(&records),
            }))?;
            match out {
                Some(p) => fedge_proto::io::write_atomic(&p, json.as_bytes(), None)
                    .with_context(|| format!("writing {}", p.display()))?,
                None => println!("{json}"),
            }
        }
        LedgerCmd::Ratings { state_dir } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let view = rt.block_on(LedgerView::open(&state_dir))?;
            println!("{}", serde_json::to_string_pretty(&view.ratings)?);
        }
    }
    Ok(())
}
