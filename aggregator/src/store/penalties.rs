//! Penalties between their refusal and the ledger record that names them
//! (table `pending_penalties`, evidence under `evidence/`): a penalty the
//! coordinator holds is durable as soon as it is held, so an aggregator
//! killed before the next publication still records it after a restart.

use bytes::Bytes;
use sqlx::Row;

use super::{Store, StoreError};
use crate::coordinator::Penalty;

fn hash32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

impl Store {
    pub(super) fn evidence_path(&self, payload_hash: &[u8; 32]) -> std::path::PathBuf {
        self.dir
            .join("evidence")
            .join(format!("{}.bin", hex::encode(payload_hash)))
    }

    /// Writes a penalty's evidence (fsynced; a copy's is already among the
    /// round's updates) and then its row.
    pub async fn hold_penalty(&self, p: &Penalty) -> Result<(), StoreError> {
        self.fence.check()?;
        if !p.payload.is_empty() {
            let path = self.evidence_path(&p.payload_hash);
            fedge_proto::io::write_atomic(&path, &p.payload, None).map_err(|source| {
                StoreError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO pending_penalties
                (device, round_id, manifest_hash, payload_hash, kind, slashed)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (device, manifest_hash, kind) DO NOTHING",
        )
        .bind(&p.device)
        .bind(p.round_id as i64)
        .bind(hex::encode(p.manifest_hash))
        .bind(hex::encode(p.payload_hash))
        .bind(i64::from(p.kind))
        .bind(p.slashed)
        .execute(&mut *tx)
        .await
        .map_err(self.db())?;
        tx.commit().await.map_err(self.db())?;
        Ok(())
    }

    /// The penalties held and not yet in a ledger record, oldest round
    /// first, each with its evidence read back (empty for a copy).
    pub async fn pending_penalties(&self) -> Result<Vec<Penalty>, StoreError> {
        let rows = sqlx::query(
            "SELECT device, round_id, manifest_hash, payload_hash, kind, slashed
             FROM pending_penalties ORDER BY round_id, device, kind",
        )
        .fetch_all(&self.db.pool)
        .await
        .map_err(self.db())?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let bad = |what: &str| self.corrupt(format!("pending penalty: bad {what}"));
            let device: String = r.try_get("device").map_err(self.db())?;
            let round_id: i64 = r.try_get("round_id").map_err(self.db())?;
            let manifest: String = r.try_get("manifest_hash").map_err(self.db())?;
            let payload: String = r.try_get("payload_hash").map_err(self.db())?;
            let kind: i64 = r.try_get("kind").map_err(self.db())?;
            let slashed: f64 = r.try_get("slashed").map_err(self.db())?;
            let payload_hash = hash32(&payload).ok_or_else(|| bad("payload hash"))?;
            let kind = u8::try_from(kind).map_err(|_| bad("kind"))?;
            let evidence = if kind == fedge_proto::ledger::PENALTY_COPY {
                Bytes::new()
            } else {
                let path = self.evidence_path(&payload_hash);
                let b = std::fs::read(&path).map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?;
                if *blake3::hash(&b).as_bytes() != payload_hash {
                    return Err(StoreError::Corrupt {
                        path,
                        reason: "evidence does not match its hash".into(),
                    });
                }
                Bytes::from(b)
            };
            out.push(Penalty {
                round_id: u64::try_from(round_id).map_err(|_| bad("round"))?,
                device,
                manifest_hash: hash32(&manifest).ok_or_else(|| bad("manifest hash"))?,
                payload_hash,
                kind,
                slashed: Some(slashed)
                    .filter(|s| (0.0..=1.0).contains(s))
                    .ok_or_else(|| bad("slashed fraction"))?,
                payload: evidence,
            });
        }
        Ok(out)
    }
}
