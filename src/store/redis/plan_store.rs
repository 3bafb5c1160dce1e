//! [`RedisPlanStore`]: subscriptions on Redis, with a conditional write for plan changes.

use super::*;

/// Subscriptions in Redis, one JSON string per account. Clones share the connection.
#[derive(Clone)]
pub struct RedisPlanStore {
    pub(super) conn: Conn,
    pub(super) prefix: String,
    pub(super) put_if: Arc<Script>,
}

impl fmt::Debug for RedisPlanStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPlanStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisPlanStore {
    /// A plan store with its own connection, opened on first use.
    pub fn new(config: &RedisConfig) -> Self {
        RedisPlanStore {
            conn: config.connection(),
            prefix: config.prefix.clone(),
            put_if: Arc::new(Script::new(PUT_SUBSCRIPTION_IF)),
        }
    }

    pub(super) fn key(&self, account: &AccountId) -> String {
        let a = account.as_str();
        format!("{}sub:{}:{a}", self.prefix, a.len())
    }
}

#[async_trait]
impl PlanStore for RedisPlanStore {
    async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError> {
        let mut conn = self.conn.get().await?;
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(account))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        raw.map(|b| serde_json::from_slice(&b).map_err(StoreError::corrupt))
            .transpose()
    }

    async fn put_subscription(&self, subscription: Subscription) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&subscription).map_err(StoreError::corrupt)?;
        let mut conn = self.conn.get().await?;
        redis::cmd("SET")
            .arg(self.key(&subscription.account))
            .arg(json)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    /// One script: decode the stored JSON's `synced`, compare, `SET`.
    async fn put_subscription_if(
        &self,
        subscription: Subscription,
        expected: Option<&SyncMark>,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_vec(&subscription).map_err(StoreError::corrupt)?;
        let mut conn = self.conn.get().await?;
        let mut inv = self.put_if.key(self.key(&subscription.account));
        inv.arg(json);
        match expected {
            None => inv.arg("0"),
            Some(m) => inv
                .arg("1")
                .arg(&m.source)
                .arg(m.event_created.unix())
                .arg(&m.event_id),
        };
        let written: i64 = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(written == 1)
    }
}

/// `PlanStore::put_subscription_if`: `SET KEYS[1] ARGV[1]` only if the stored subscription's
/// `synced` mark is absent (`ARGV[2] == "0"`) or equals `ARGV[3..5]` (source, created,
/// event id). `event_created` is below 2^53, so cjson's double holds it exactly; it is
/// compared as `%d` text, never through `tostring`.
pub(super) const PUT_SUBSCRIPTION_IF: &str = include_str!("put_subscription_if.lua");
