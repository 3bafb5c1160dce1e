//! Where the tables live and how to reach the server.

use super::*;

/// Where the tables live and how to reach the server: shared by [`PostgresLedger`] and
/// [`PostgresPlanStore`].
#[derive(Clone)]
pub struct PostgresConfig {
    pub(super) pg: tokio_postgres::Config,
    pub(super) schema: String,
    pub(super) prefix: String,
    pub(super) pool_size: usize,
    pub(super) connect_timeout: Duration,
    pub(super) op_timeout: Duration,
    pub(super) retention_secs: u64,
    pub(super) journal: crate::ledger::JournalLimits,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection config can hold a password: leave it out.
        f.debug_struct("PostgresConfig")
            .field("schema", &self.schema)
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("op_timeout", &self.op_timeout)
            .field("retention_secs", &self.retention_secs)
            .finish_non_exhaustive()
    }
}

/// A schema name or table prefix that is not a plain identifier.
#[derive(Debug, thiserror::Error)]
#[error("invalid SQL identifier (expected [a-z_][a-z0-9_]*, at most 40 characters)")]
pub struct InvalidIdentifier;

pub(super) fn valid_identifier(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    s.len() <= 40
        && s.bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_lowercase() || (i > 0 && b.is_ascii_digit()))
}

impl PostgresConfig {
    /// Parses a connection URL (`postgres://user@host:port/db`) or key-value string. Defaults:
    /// schema `public`, table prefix `tower402_`, 16 connections, 5 s to connect, 10 s per
    /// operation, [`DEFAULT_RETENTION_SECS`].
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let mut pg = tokio_postgres::Config::from_str(url).map_err(StoreError::unavailable)?;
        if pg.get_application_name().is_none() {
            pg.application_name("tower-402");
        }
        Ok(PostgresConfig {
            pg,
            schema: "public".to_owned(),
            prefix: "tower402_".to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(10),
            retention_secs: DEFAULT_RETENTION_SECS,
            journal: crate::ledger::JournalLimits::default(),
        })
    }

    /// The schema holding the tables (created by `migrate` if missing).
    pub fn schema(mut self, schema: &str) -> Result<Self, InvalidIdentifier> {
        if !valid_identifier(schema, false) {
            return Err(InvalidIdentifier);
        }
        self.schema = schema.to_owned();
        Ok(self)
    }

    /// A prefix for every table name, so several apps can share one schema (may be empty).
    pub fn table_prefix(mut self, prefix: &str) -> Result<Self, InvalidIdentifier> {
        if !valid_identifier(prefix, true) {
            return Err(InvalidIdentifier);
        }
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// How much spend history each account keeps (default: 90 days, 1,000 entries): rows of
    /// `{prefix}journal`, trimmed by count when written, and by age when read and by
    /// [`sweep`](crate::store::PostgresLedger::sweep).
    pub fn journal(mut self, limits: crate::ledger::JournalLimits) -> Self {
        self.journal = crate::ledger::JournalLimits {
            retention_secs: limits.retention_secs.min(i64::MAX as u64 / 2),
            max_entries: limits.max_entries.min(i64::MAX as usize),
        };
        self
    }

    /// The most connections the pool opens.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long to wait for a connection to be established.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most time one operation may take, waiting for a pooled connection included. On
    /// expiry the operation fails with [`StoreError::Timeout`] and its transaction is rolled
    /// back.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The `application_name` the connections report (visible in `pg_stat_activity`).
    pub fn application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self
    }

    /// How long finished reservations and deposit keys are remembered for idempotency.
    pub fn retention_secs(mut self, secs: u64) -> Self {
        self.retention_secs = secs;
        self
    }

    /// A pool for this configuration. No connection is made until one is needed, so this
    /// succeeds while the server is down.
    pub fn pool(&self) -> Result<Pool, StoreError> {
        let mut pg = self.pg.clone();
        pg.connect_timeout(self.connect_timeout);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.op_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(StoreError::unavailable)
    }

    /// The schema the tables live in.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// The table-name prefix.
    pub fn table_prefix_name(&self) -> &str {
        &self.prefix
    }

    pub(super) fn table(&self, name: &str) -> String {
        format!("\"{}\".\"{}{}\"", self.schema, self.prefix, name)
    }
}
