//! [`PostgresPlanStore`]: subscriptions, one row per account.

use super::*;

/// Subscriptions in PostgreSQL, one row per account. Clones share the pool.
#[derive(Clone)]
pub struct PostgresPlanStore {
    pub(super) pool: Pool,
    pub(super) config: PostgresConfig,
    pub(super) sql: Arc<PlanSql>,
}

impl fmt::Debug for PostgresPlanStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresPlanStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresPlanStore {
    /// A plan store on `pool` with the tables of `config`.
    pub fn new(pool: Pool, config: PostgresConfig) -> Self {
        let sql = Arc::new(PlanSql::new(&config));
        PostgresPlanStore { pool, config, sql }
    }

    /// Creates the schema and tables if missing (the same migration as
    /// [`PostgresLedger::migrate`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate(&self.pool, &self.config).await
    }
}

#[async_trait]
impl PlanStore for PostgresPlanStore {
    async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError> {
        timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let get = client
                .prepare_cached(&self.sql.get)
                .await
                .map_err(pg_error)?;
            let row = client
                .query_opt(&get, &[&account.as_str()])
                .await
                .map_err(pg_error)?;
            let Some(row) = row else { return Ok(None) };
            let plan: String = row.get(0);
            let status: String = row.get(1);
            let status: SubscriptionStatus =
                serde_json::from_value(serde_json::Value::String(status))
                    .map_err(StoreError::corrupt)?;
            let mut sub = Subscription::new(account.clone(), plan.as_str(), status);
            sub.plan = PlanId::new(plan);
            sub.current_period_start = ts_col(&row, 2)?;
            sub.current_period_end = ts_col(&row, 3)?;
            sub.trial_end = ts_col(&row, 4)?;
            sub.canceled_at = ts_col(&row, 5)?;
            sub.ended_at = ts_col(&row, 6)?;
            sub.past_due_since = ts_col(&row, 7)?;
            sub.grace_until = ts_col(&row, 8)?;
            sub.synced = row
                .get::<_, Option<serde_json::Value>>(9)
                .map(serde_json::from_value)
                .transpose()
                .map_err(StoreError::corrupt)?;
            Ok(Some(sub))
        })
        .await
    }

    async fn put_subscription(&self, s: Subscription) -> Result<(), StoreError> {
        self.write(&self.sql.put, &s, None).await.map(|_| ())
    }

    /// One statement: an upsert that only updates an unmarked row, or an update that only
    /// matches the expected mark.
    async fn put_subscription_if(
        &self,
        s: Subscription,
        expected: Option<&SyncMark>,
    ) -> Result<bool, StoreError> {
        let n = match expected {
            None => self.write(&self.sql.put_if_unmarked, &s, None).await?,
            Some(mark) => {
                let mark = serde_json::to_value(mark).map_err(StoreError::corrupt)?;
                self.write(&self.sql.put_if_marked, &s, Some(&mark)).await?
            }
        };
        Ok(n == 1)
    }
}

impl PostgresPlanStore {
    /// Runs one of the plan statements with the subscription's columns as `$1`..`$11` (and
    /// `$12` when given); the number of rows written.
    pub(super) async fn write(
        &self,
        sql: &str,
        s: &Subscription,
        expected: Option<&serde_json::Value>,
    ) -> Result<u64, StoreError> {
        let synced = s
            .synced
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(StoreError::corrupt)?;
        timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
            let (account, plan, status) = (s.account.as_str(), s.plan.as_str(), s.status.as_str());
            let (start, end, trial, canceled, ended, since, grace) = (
                opt_ts(s.current_period_start),
                opt_ts(s.current_period_end),
                opt_ts(s.trial_end),
                opt_ts(s.canceled_at),
                opt_ts(s.ended_at),
                opt_ts(s.past_due_since),
                opt_ts(s.grace_until),
            );
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
                &account, &plan, &status, &start, &end, &trial, &canceled, &ended, &since, &grace,
                &synced,
            ];
            if let Some(mark) = expected {
                params.push(mark);
            }
            client.execute(&statement, &params).await.map_err(pg_error)
        })
        .await
    }
}
