//! `fedge-aggregator bench-commit`: accepted updates made durable per
//! second, written one at a time (`commit_group_max = 1`, what every
//! update cost before group commit) and in groups of the default size,
//! in the same run on the same disk and database; writes JSON with the
//! ratio. Groups are written one after another, as the server's
//! committer writes them (the next gathers while one is written), so the
//! rate is what the durable writes allow the server to acknowledge.

use std::path::PathBuf;
use std::time::Instant;

use fedge_aggregator::coordinator::DurableUpdate;
use fedge_aggregator::server::COMMIT_GROUP_MAX;
use fedge_aggregator::store::{Database, Store};
use fedge_proto::update::{Codec, encode_update};

#[derive(clap::Args)]
pub struct CommitBenchArgs {
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-commit.json")]
    out: PathBuf,
    /// Accepted updates written in each configuration.
    #[arg(long, default_value_t = 256)]
    updates: usize,
    /// Parameters per update (dense float32 payloads).
    #[arg(long, default_value_t = 10_000)]
    dimension: usize,
    /// Group size to compare with one update at a time.
    #[arg(long, default_value_t = COMMIT_GROUP_MAX)]
    group: usize,
    /// Directory for the state directories (default: the system's
    /// temporary directory; put it on the disk the aggregator uses).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// `sqlite` (default) or a `postgres://` URL (an empty database).
    #[arg(long, default_value = "sqlite")]
    database: Database,
}

fn updates(n: usize, dim: usize, round_id: u64) -> Vec<DurableUpdate> {
    (0..n)
        .map(|i| {
            let values: Vec<f32> = (0..dim)
                .map(|j| ((i * 31 + j) % 97) as f32 * 1e-3)
                .collect();
            let payload = encode_update(Codec::DenseF32, &values);
            let mut device = [0u8; 32];
            device[..8].copy_from_slice(&(i as u64).to_le_bytes());
            DurableUpdate {
                round_id,
                task_round: round_id,
                model_version: None,
                device: hex::encode(device),
                payload_hash: *blake3::hash(&payload).as_bytes(),
                manifest_hash: [0; 32],
                signed_manifest: bytes::Bytes::new(),
                sample_count: 1,
                raw_weight: 1.0,
                discount: 1.0,
                stake: None,
                metrics: Vec::new(),
                payload,
            }
        })
        .collect()
}

/// Updates made durable per second, in groups of `group`, one group
/// after another.
async fn rate(store: &Store, us: &[DurableUpdate], group: usize) -> anyhow::Result<f64> {
    let writer = store.update_writer();
    let start = Instant::now();
    for g in us.chunks(group) {
        writer.persist_group(g).await?;
    }
    Ok(us.len() as f64 / start.elapsed().as_secs_f64())
}

pub fn run(a: CommitBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.updates > 0 && a.group > 0,
        "--updates and --group must be positive"
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let base = match &a.dir {
            Some(d) => tempfile::tempdir_in(d)?,
            None => tempfile::tempdir()?,
        };
        let store = Store::open_with(base.path(), &a.database).await?;
        // Rounds 1 and 2 keep the two runs' rows and files apart.
        let one = rate(&store, &updates(a.updates, a.dimension, 1), 1).await?;
        let grouped = rate(&store, &updates(a.updates, a.dimension, 2), a.group).await?;
        store.close().await;
        let payload_bytes = updates(1, a.dimension, 0)[0].payload.len();
        println!("one update at a time: {one:>10.1} updates/s");
        println!("groups of {:<4}        {grouped:>10.1} updates/s", a.group);
        println!("ratio:                {:>10.2}x", grouped / one);
        let report = serde_json::json!({
            "database": if matches!(a.database, Database::Sqlite) { "sqlite" } else { "postgres" },
            "updates": a.updates,
            "payload_bytes": payload_bytes,
            "group": a.group,
            "one_at_a_time_updates_per_s": one,
            "grouped_updates_per_s": grouped,
            "ratio": grouped / one,
        });
        crate::bench::write_report(&a.out, &report)
    })
}
