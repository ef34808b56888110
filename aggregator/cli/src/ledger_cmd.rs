//! `fedge-aggregator ledger verify | proof | export | ratings`: reading a
//! state directory's contribution ledger (see
//! `fedge_aggregator::ledger`) without changing it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use fedge_aggregator::ledger::{self, parse_public_key};
use fedge_aggregator::store::{Database, LedgerView};
use fedge_proto::ledger::LedgerRecord;
use fedge_proto::sign::VerifyingKey;
use fedge_proto::{Limits, ModelBlob};

use crate::evaluator::EngineEvaluator;

/// Where a ledger is: the state directory (keys, models, payloads) and
/// the database its tables are in.
#[derive(clap::Args)]
pub struct Source {
    #[arg(long, default_value = "fedge-aggregator-state")]
    state_dir: PathBuf,
    /// The database the aggregator ran with: `sqlite` (aggregator.db in
    /// the state directory) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, env = "FEDGE_DATABASE", default_value = "sqlite")]
    database: Database,
}

#[derive(Subcommand)]
pub enum LedgerCmd {
    /// Check the whole chain: every record decodes, follows the previous
    /// one (sequence number and hash), carries the aggregator's signature
    /// and a reward root that matches its rewards, the evidence of every
    /// penalty is in the state directory and proves it, and every entry
    /// matches the signed manifest stored with its update (signature,
    /// device, payload, round). Fails naming the first bad record.
    Verify {
        #[command(flatten)]
        src: Source,
        /// The ledger public key to check against (hex); default: the
        /// state directory's `ledger.pub`. Pin it: whoever can rewrite the
        /// ledger can rewrite that file too.
        #[arg(long)]
        key: Option<String>,
        /// Also recompute every score from the published models, the
        /// kept update payloads and this validation set (a data spec, as
        /// `scoring.validation`).
        #[arg(long)]
        validation: Option<String>,
        /// Only these examples of the validation set (`START..END`).
        #[arg(long, requires = "validation")]
        validation_range: Option<String>,
        /// The model the first round started from, if the state
        /// directory does not hold it.
        #[arg(long, requires = "validation")]
        initial_model: Option<PathBuf>,
    },
    /// Print a device's inclusion proof for its reward in a round (JSON),
    /// for `fedge-device verify-reward`.
    Proof {
        #[command(flatten)]
        src: Source,
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
        #[command(flatten)]
        src: Source,
        #[arg(long)]
        key: Option<String>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print every device's rating (JSON), best first.
    Ratings {
        #[command(flatten)]
        src: Source,
    },
}

fn key_for(state_dir: &Path, key: Option<&str>) -> anyhow::Result<VerifyingKey> {
    match key {
        Some(k) => parse_public_key(k).map_err(|e| anyhow::anyhow!("--key: {e}")),
        None => Ok(ledger::public_key(state_dir)?),
    }
}

/// The ledger and ratings of a state directory, read-only.
fn view(src: &Source) -> anyhow::Result<LedgerView> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(LedgerView::open_with(&src.state_dir, &src.database))
        .with_context(|| {
            format!(
                "reading the ledger in {}",
                src.database.label(&src.state_dir)
            )
        })
}

/// The verified records of a state directory.
fn verified(src: &Source, key: Option<&str>) -> anyhow::Result<Vec<LedgerRecord>> {
    let key = key_for(&src.state_dir, key)?;
    Ok(ledger::verify_chain(&view(src)?.records, &key)?)
}

pub fn run(cmd: LedgerCmd) -> anyhow::Result<()> {
    match cmd {
        LedgerCmd::Verify {
            src,
            key,
            validation,
            validation_range,
            initial_model,
        } => {
            let key = key_for(&src.state_dir, key.as_deref())?;
            let view = view(&src)?;
            let records = ledger::verify_chain(&view.records, &key)?;
            let penalties = check_all_evidence(&src.state_dir, &records, initial_model.as_deref())?;
            let manifests = ledger::check_manifests(&records, &view.manifests)?;
            let mut line = format!(
                "manifests checked: {} participations' signed manifests verify (signature, \
                 device, payload and round)",
                manifests.checked
            );
            if manifests.unsigned > 0 {
                line += &format!(
                    "; {} inputs of {} records that say they are secure-aggregation rounds \
                     name none (the aggregator saw only their masked sum)",
                    manifests.unsigned, manifests.secure_records
                );
            }
            if manifests.before_manifests > 0 {
                line += &format!(
                    "; {} participations predate the stored manifests",
                    manifests.before_manifests
                );
            }
            println!("{line}");
            if let Some(spec) = validation {
                let (rounds, scores, flags) = recompute(
                    &src.state_dir,
                    &records,
                    &spec,
                    validation_range.as_deref(),
                    initial_model.as_deref(),
                )?;
                println!("scores recomputed: {scores} scores in {rounds} records agree");
                println!(
                    "flags recomputed: {flags} participations' copy, free-rider, replay and \
                     noise flags agree"
                );
            }
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
                "ledger ok: {} records, {} participations, {paid} reward units paid, \
                 {penalties} penalties with their evidence; head {head}",
                records.len(),
                records.iter().map(|r| r.entries.len()).sum::<usize>(),
            );
        }
        LedgerCmd::Proof {
            src,
            device,
            round,
            key,
        } => {
            // One read: the record quoted is the one verified.
            let stored = view(&src)?.records;
            let records = ledger::verify_chain(&stored, &key_for(&src.state_dir, key.as_deref())?)?;
            let device =
                ledger::device_bytes(&device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let proof =
                ledger::reward_proof(&records, &device, round).map_err(anyhow::Error::msg)?;
            proof.verify()?;
            // The chain verified: the record of that round as stored.
            let seq = records
                .iter()
                .find(|r| r.round_id == round)
                .map(|r| r.seq)
                .expect("the proof came from it");
            let signed = stored
                .iter()
                .find(|s| s.seq == seq)
                .expect("verified records are stored");
            println!(
                "{}",
                serde_json::to_string_pretty(&ledger::proof_json(&proof, signed))?
            );
        }
        LedgerCmd::Export { src, key, out } => {
            let records = verified(&src, key.as_deref())?;
            let json = serde_json::to_string_pretty(&serde_json::json!({
                "ledger_key": hex::encode(key_for(&src.state_dir, key.as_deref())?.to_bytes()),
                "rounds": ledger::roots(&records),
            }))?;
            match out {
                Some(p) => fedge_proto::io::write_atomic(&p, json.as_bytes(), None)
                    .with_context(|| format!("writing {}", p.display()))?,
                None => println!("{json}"),
            }
        }
        LedgerCmd::Ratings { src } => {
            println!("{}", serde_json::to_string_pretty(&view(&src)?.ratings)?);
        }
    }
    Ok(())
}

/// A model by version: from the state directory, or the given initial
/// model file if it is that version.
fn model_of(
    state_dir: &Path,
    version: &[u8; 32],
    initial: Option<&Path>,
) -> anyhow::Result<ModelBlob> {
    let limits = Limits::default();
    let hex_v = hex::encode(version);
    let mut candidates = vec![state_dir.join("models").join(format!("{hex_v}.fedge"))];
    candidates.extend(initial.map(Path::to_path_buf));
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let m = ModelBlob::decode(&bytes, &limits)
            .with_context(|| format!("model {}", path.display()))?;
        if m.version().0 == *version {
            return Ok(m);
        }
    }
    anyhow::bail!("model {hex_v} is not in the state directory: pass it with --initial-model")
}

/// Checks every penalty's evidence in the state directory (see
/// [`ledger::check_evidence`]); fails naming the record. Returns how many
/// penalties were checked.
fn check_all_evidence(
    state_dir: &Path,
    records: &[LedgerRecord],
    initial: Option<&Path>,
) -> anyhow::Result<usize> {
    let limits = Limits::default();
    let mut dimension = None;
    let mut n = 0;
    for r in records {
        for p in &r.penalties {
            let fail = |e: String| {
                anyhow::anyhow!(
                    "ledger record {}: penalty of device {} in round {}: {e}",
                    r.seq,
                    hex::encode(p.device),
                    p.round_id
                )
            };
            if dimension.is_none() {
                dimension = model_of(state_dir, &r.model_before, initial)
                    .ok()
                    .map(|m| m.params.values.len());
            }
            let path = ledger::evidence_path(state_dir, p);
            let bytes = std::fs::read(&path)
                .map_err(|e| fail(format!("evidence {}: {e}", path.display())))?;
            ledger::check_evidence(p, &bytes, dimension, &limits)
                .map_err(|e| fail(format!("evidence {}: {e}", path.display())))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Recomputes every scored record's scores and flags, in chain order (the
/// replay history runs through them); (records, scores, flags) checked.
fn recompute(
    state_dir: &Path,
    records: &[LedgerRecord],
    spec: &str,
    range: Option<&str>,
    initial: Option<&Path>,
) -> anyhow::Result<(usize, usize, usize)> {
    let limits = Limits::default();
    let mut eval: Option<EngineEvaluator> = None;
    let mut history = fedge_aggregator::scoring::replay::History::default();
    let (mut rounds, mut scores, mut flags) = (0, 0, 0);
    for r in records {
        if r.validation_samples == 0 || r.entries.is_empty() {
            continue;
        }
        let fail = |e: String| anyhow::anyhow!("ledger record {}: {e}", r.seq);
        let model =
            model_of(state_dir, &r.model_before, initial).map_err(|e| fail(format!("{e:#}")))?;
        if eval.is_none() {
            eval = Some(EngineEvaluator::from_spec(&model, spec, range)?);
        }
        let ev = eval.as_mut().expect("set above");
        let dim = model.params.values.len();
        let mut deltas = Vec::with_capacity(r.entries.len());
        for e in &r.entries {
            let path = state_dir
                .join("updates")
                .join(r.round_id.to_string())
                .join(format!("{}.bin", hex::encode(e.payload_hash)));
            let bytes = std::fs::read(&path)
                .map_err(|err| fail(format!("update payload {}: {err}", path.display())))?;
            if *blake3::hash(&bytes).as_bytes() != e.payload_hash {
                return Err(fail(format!(
                    "update payload {} does not match its hash",
                    path.display()
                )));
            }
            deltas.push(
                fedge_proto::update::decode_any(&bytes, dim, &limits)
                    .map_err(|err| fail(format!("update payload {}: {err}", path.display())))?,
            );
        }
        let (s, f) = ledger::recompute_scores(r, &model.params.values, &deltas, ev, &mut history)
            .map_err(fail)?;
        (scores, flags) = (scores + s, flags + f);
        rounds += 1;
    }
    Ok((rounds, scores, flags))
}
