//! Recorded responses on Redis: one hash per record in the account's hash slot, written with
//! `records_put.lua` (write, expire, cap in one script), read with one `HMGET`.

use async_trait::async_trait;
use redis::Script;

use super::{account_base, exact, redis_error, Conn};
use crate::error::{LedgerError, StoreError};
use crate::ledger::{RecordLimits, ReservationId, ResponseRecord, ResponseRecords};
use crate::time::Timestamp;

const PUT: &str = include_str!("records_put.lua");

/// The recorded responses of a [`RedisLedger`](super::RedisLedger), on its connection.
#[derive(Clone)]
pub(super) struct RedisRecords {
    conn: Conn,
    prefix: String,
    put: std::sync::Arc<Script>,
}

impl RedisRecords {
    pub(super) fn new(conn: Conn, prefix: String) -> Self {
        RedisRecords {
            conn,
            prefix,
            put: std::sync::Arc::new(Script::new(PUT)),
        }
    }
}

#[async_trait]
impl ResponseRecords for RedisRecords {
    async fn put(
        &self,
        id: &ReservationId,
        record: &ResponseRecord,
        limits: RecordLimits,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let mut conn = self.conn.get().await?;
        let now = exact(now.unix())?;
        let retention = exact(limits.retention_secs)?;
        // The expiry, now + retention, is computed in Lua: both below 2^52 keep it exact.
        if now > (1 << 52) || retention > (1 << 52) {
            return Err(LedgerError::AmountOutOfRange);
        }
        let mut inv = self.put.key(account_base(&self.prefix, &id.account));
        inv.arg(now)
            .arg(retention)
            .arg(exact(limits.per_account)?)
            .arg(id.key.as_str())
            .arg(record.to_bytes());
        let _: String = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(())
    }

    async fn get(
        &self,
        id: &ReservationId,
        now: Timestamp,
    ) -> Result<Option<ResponseRecord>, LedgerError> {
        let mut conn = self.conn.get().await?;
        let key = format!("{}:rr:{}", account_base(&self.prefix, &id.account), id.key);
        let (exp, data): (Option<String>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(key)
            .arg("exp")
            .arg("data")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let (Some(exp), Some(data)) = (exp, data) else {
            return Ok(None);
        };
        let exp: u64 = exp
            .parse()
            .map_err(|_| LedgerError::Store(StoreError::corrupt("unreadable record expiry")))?;
        if exp <= now.unix() {
            return Ok(None);
        }
        ResponseRecord::from_bytes(&data).map(Some)
    }
}
