//! Recorded responses on PostgreSQL: one row per record in `{prefix}responses`, created by
//! [`PostgresLedger::migrate`](super::PostgresLedger::migrate). A write, the account's expired
//! rows and those beyond its cap go in one transaction, serialized per account by an advisory
//! lock so the cap is exact.

use async_trait::async_trait;

use super::{pg_error, pool_error, timed, PostgresConfig, PostgresLedger};
use crate::error::LedgerError;
use crate::ledger::{RecordLimits, ReservationId, ResponseRecord, ResponseRecords};
use crate::time::Timestamp;

/// The table's DDL, run by `migrate` after the ledger's own tables (idempotent).
pub(super) fn migration(config: &PostgresConfig) -> String {
    let t = config.table("responses");
    let p = &config.prefix;
    format!(
        r#"
CREATE TABLE IF NOT EXISTS {t} (
    account    text   NOT NULL,
    key        text   NOT NULL,
    written_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    seq        bigserial,
    record     bytea  NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX IF NOT EXISTS "{p}responses_written" ON {t} (account, written_at, seq);
"#
    )
}

fn to_sql(v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::AmountOutOfRange)
}

#[async_trait]
impl ResponseRecords for PostgresLedger {
    async fn put(
        &self,
        id: &ReservationId,
        record: &ResponseRecord,
        limits: RecordLimits,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let t = self.config.table("responses");
        let written = to_sql(now.unix())?;
        let expires = to_sql(now.unix().saturating_add(limits.retention_secs))?;
        let cap = to_sql(limits.per_account)?;
        let bytes = record.to_bytes();
        let account = id.account.as_str();
        let key = id.key.as_str();
        timed(self.config.op_timeout, async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tower402-responses'), hashtext($1))",
                &[&account],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                &format!(
                    "INSERT INTO {t} (account, key, written_at, expires_at, record) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (account, key) DO UPDATE SET written_at = EXCLUDED.written_at, \
                     expires_at = EXCLUDED.expires_at, seq = EXCLUDED.seq, \
                     record = EXCLUDED.record"
                ),
                &[&account, &key, &written, &expires, &bytes],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                &format!("DELETE FROM {t} WHERE account = $1 AND expires_at <= $2"),
                &[&account, &written],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                &format!(
                    "DELETE FROM {t} WHERE account = $1 AND key IN (SELECT key FROM {t} \
                     WHERE account = $1 ORDER BY written_at DESC, seq DESC OFFSET $2)"
                ),
                &[&account, &cap],
            )
            .await
            .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)
        })
        .await?;
        Ok(())
    }

    async fn get(
        &self,
        id: &ReservationId,
        now: Timestamp,
    ) -> Result<Option<ResponseRecord>, LedgerError> {
        let t = self.config.table("responses");
        let now = to_sql(now.unix())?;
        let account = id.account.as_str();
        let key = id.key.as_str();
        let row = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .query_opt(
                    &format!(
                        "SELECT record FROM {t} WHERE account = $1 AND key = $2 \
                         AND expires_at > $3"
                    ),
                    &[&account, &key, &now],
                )
                .await
                .map_err(pg_error)
        })
        .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let bytes: Vec<u8> = row
                    .try_get(0)
                    .map_err(|e| LedgerError::Store(crate::error::StoreError::corrupt(e)))?;
                ResponseRecord::from_bytes(&bytes).map(Some)
            }
        }
    }
}
