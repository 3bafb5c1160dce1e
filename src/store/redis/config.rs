//! Where Redis is and where the keys live, and the connection opened on first use.

use super::*;

/// How to reach Redis and where the keys live: shared by [`RedisLedger`] and
/// [`RedisPlanStore`].
#[derive(Clone)]
pub struct RedisConfig {
    pub(super) client: Target,
    pub(super) prefix: String,
    pub(super) retention_secs: u64,
    pub(super) journal: crate::ledger::JournalLimits,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
    pub(super) reconnect_attempts: usize,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL can hold a password: leave it out.
        f.debug_struct("RedisConfig")
            .field("prefix", &self.prefix)
            .field("retention_secs", &self.retention_secs)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// Parses a URL (`redis://host:port/db`). Nothing connects yet. Defaults: prefix
    /// `tower402:`, [`DEFAULT_RETENTION_SECS`], 2 s to connect, 2 s per response.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::unavailable)?;
        Ok(RedisConfig::with_target(Target::Single(client)))
    }

    /// A Redis Cluster reached through any of `nodes` (`redis://host:port` each; the others
    /// are discovered). Nothing connects yet. The ledger and plan store run unchanged on it:
    /// every key of an account carries the hash tag `{<len>:<account>}`, so an account's
    /// keys live in one hash slot and each script runs on the one node that owns them.
    /// Commands are routed by key and follow `MOVED`/`ASK` redirections when slots move.
    pub fn cluster(nodes: &[&str]) -> Result<Self, StoreError> {
        let client =
            redis::cluster::ClusterClient::new(nodes.to_vec()).map_err(StoreError::unavailable)?;
        Ok(RedisConfig::with_target(Target::Cluster(client)))
    }

    fn with_target(client: Target) -> Self {
        RedisConfig {
            client,
            prefix: "tower402:".to_owned(),
            retention_secs: DEFAULT_RETENTION_SECS,
            journal: crate::ledger::JournalLimits::default(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            reconnect_attempts: 2,
        }
    }

    /// The prefix of every key.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The prefix of every key this configuration writes.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// How long finished reservations and deposit keys are remembered for idempotency.
    pub fn retention_secs(mut self, secs: u64) -> Self {
        self.retention_secs = secs.min(MAX_EXACT);
        self
    }

    /// How long one connection attempt may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How much spend history each account keeps (default: 90 days, 1,000 entries): one
    /// list per account, trimmed by every write and read against the ledger's `now`.
    pub fn journal(mut self, limits: crate::ledger::JournalLimits) -> Self {
        self.journal = crate::ledger::JournalLimits {
            retention_secs: limits.retention_secs.min(MAX_EXACT),
            max_entries: limits.max_entries.min(1 << 32),
        };
        self
    }

    /// How long to wait for the answer to one command before [`StoreError::Timeout`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many times one (re)connection is retried, with backoff, before an operation fails
    /// with [`StoreError::Unavailable`] (default 2).
    pub fn reconnect_attempts(mut self, attempts: usize) -> Self {
        self.reconnect_attempts = attempts;
        self
    }

    pub(super) fn connection(&self) -> Conn {
        Conn {
            client: self.client.clone(),
            config: ConnectionManagerConfig::new()
                .set_connection_timeout(self.connect_timeout)
                .set_response_timeout(self.response_timeout)
                .set_number_of_retries(self.reconnect_attempts)
                .set_max_delay(200),
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            cell: Arc::new(OnceCell::new()),
        }
    }
}

/// One server, or a cluster.
#[derive(Clone)]
pub(super) enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection opened on first use; the manager (or the cluster connection) reconnects by
/// itself afterwards.
#[derive(Clone)]
pub(super) struct Conn {
    client: Target,
    config: ConnectionManagerConfig,
    connect_timeout: Duration,
    response_timeout: Duration,
    cell: Arc<OnceCell<Connection>>,
}

impl Conn {
    pub(super) async fn get(&self) -> Result<Connection, StoreError> {
        self.cell
            .get_or_try_init(|| async {
                match &self.client {
                    Target::Single(client) => {
                        ConnectionManager::new_with_config(client.clone(), self.config.clone())
                            .await
                            .map(Connection::Single)
                    }
                    Target::Cluster(client) => {
                        let config = redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(self.connect_timeout)
                            .set_response_timeout(self.response_timeout);
                        client
                            .get_async_connection_with_config(config)
                            .await
                            .map(Connection::Cluster)
                    }
                }
            })
            .await
            .cloned()
            .map_err(redis_error)
    }
}

/// A connection to one server or to a cluster: commands are routed by their first key.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}
