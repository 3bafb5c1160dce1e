//! The PostgreSQL backend (feature `postgres`).
//!
//! [`PostgresLedger`] and [`PostgresPlanStore`] run on a [`deadpool_postgres`] pool, so any
//! number of app instances can share one database. The pool replaces broken connections on
//! its own: after a restart of the server (or a terminated backend) the next operations get a
//! fresh connection, with no restart of the app.
//!
//! # How the ledger keeps its promises
//!
//! Every operation is one transaction that first locks the account's row in the balances
//! table (`INSERT … ON CONFLICT DO UPDATE … RETURNING`, which takes the row lock and creates
//! the row of an account never seen). While the lock is held it loads the rows the operation
//! can touch (the reservation under its key, the account's open reservations that are due,
//! the allowance counters of the charges involved, the deposit under its key), runs the same
//! [`AccountBook`] state machine as the in-memory ledger on them, writes back what changed
//! and commits. Two operations on one account are therefore serialized by the row lock under
//! any isolation level, and nothing can overspend: the balances table also carries
//! `CHECK (deposited = available + held + settled)` and non-negativity checks, so a bug would
//! abort the transaction rather than store a wrong balance.
//!
//! A transaction takes two round trips: `BEGIN`, the lock and the load are pipelined on the
//! connection, then the write (one statement whatever changed) and `COMMIT`. The lock is held
//! for one round trip plus the commit. A transaction that changes nothing (a denial, a replay)
//! rolls back instead. The transaction's `lock_timeout` and `statement_timeout` are the
//! operation's timeout plus a second, so a request that gave up leaves no server process
//! waiting on the lock. On a quiet account, `balance` and `allowance_usage` read without the
//! lock, in one statement (one consistent snapshot); only when the book would change (a due
//! reservation to expire, old records to forget) do they run again under the lock.
//!
//! # Busy accounts: one transaction for many operations
//!
//! The row lock makes an account's operations take turns, so one busy account is limited by
//! how fast transactions on one row can follow each other (each holds the lock for a round
//! trip and a WAL flush). A ledger therefore runs one transaction at a time per account, on a
//! task of its own, and the operations (`reserve`, `settle`, `release`, `deposit`) that arrive
//! meanwhile wait and then share the next transaction, up to 64 of them: loaded together,
//! applied one after the other in arrival order on the same book, written in one statement
//! and committed once. Each is answered only after that commit. This changes nothing of what
//! an operation does, only how many share a commit; a quiet account runs one operation per
//! transaction as before. `balance` and `allowance_usage` on a busy account join its next
//! transaction too, instead of reading beside it.
//!
//! - Clones of a ledger share the queues; separate ledgers (other instances of a fleet) still
//!   take turns on the row lock.
//! - If the transaction fails, every operation in it gets the error and none is kept.
//! - If a result cannot be stored (an amount beyond the table's range) or the server refuses
//!   an operation's data (SQLSTATE classes 22 and 23), the operations run again one per
//!   transaction, so only that one fails.
//! - An operation whose caller stopped waiting (its timeout, a dropped request) before its
//!   transaction began is not run.
//! - [`PostgresLedger::transaction_counts`] says how much sharing happens.
//!
//! Every metered request inserts and deletes a reservation row: keep autovacuum on (the
//! server's default), or the reservations table fills with dead rows and every operation
//! slows down.
//!
//! Idempotency records are rows keyed by `(account, key)` (primary keys, so a key exists at
//! most once). A reservation made without an idempotency key
//! ([`ReserveRequest::idempotent`](crate::ledger::ReserveRequest::idempotent) false) has its
//! row deleted when it is settled or released, as the in-memory ledger forgets it. Expired reservations are released by the next operation on their account; the
//! optional [`PostgresLedger::sweep`] does the same for accounts nobody touches and deletes
//! records older than the retention time, a bounded number per call.
//!
//! If an operation times out or its connection drops before the commit, the transaction is
//! rolled back: nothing is half-applied. (A connection whose operation did not finish is
//! closed, not returned to the pool, so it never carries an open transaction to the next
//! operation.) An operation's timeout also counts the time it waited for its turn; one that
//! gives up while its transaction is already under way may still be committed by it. Whether
//! a commit that raced a lost connection landed cannot be known, so the ledger never retries
//! on its own; `reserve` and `deposit` are idempotent by key, so the caller may retry them
//! with the same key safely.
//!
//! The time an operation acts at is the `now` it is given: pass non-decreasing times (the
//! layers pass their clock's time).
//!
//! # Schema
//!
//! [`PostgresLedger::migrate`] (and [`PostgresPlanStore::migrate`], the same schema) creates,
//! in one transaction and only if missing, the tables `balances`, `reservations`,
//! `allowances`, `deposits` and `subscriptions`, each name prefixed with the configured table
//! prefix (default `tower402_`) in the configured schema (default `public`). Schema and
//! prefix must match `[a-z_][a-z0-9_]*` (at most 40 characters); anything else is refused,
//! since they are spliced into SQL.
//!
//! # Examples
//!
//! ```no_run
//! use tower_402::store::{PostgresLedger, PostgresPlanStore, PostgresConfig};
//! use tower_402::{Credits, Ledger, Timestamp};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PostgresConfig::new("postgres://postgres@127.0.0.1:5432/app")?
//!     .schema("billing")?
//!     .table_prefix("api_")?;
//! let pool = config.pool()?;
//! let ledger = PostgresLedger::new(pool.clone(), config.clone());
//! ledger.migrate().await?;
//! let plans = PostgresPlanStore::new(pool, config);
//!
//! ledger.deposit(&"acme".into(), Credits::new(500), "order-1", Timestamp::now()).await?;
//! // Now hand `ledger` and `plans` to `PaymentGateLayer` / `MeteringLayer`.
//! # let _ = plans;
//! # Ok(())
//! # }
//! ```

mod records;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures_util::future::{try_join, try_join3};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::account::AccountId;
use crate::credits::Credits;
use crate::error::{BoxError, LedgerError, StoreError};
use crate::ledger::{
    AccountBook, AllowanceUsage, Balance, Counter, Deposit, Ledger, OverEstimate, Parts, Record,
    ReservationId, ReservationKey, ReserveOutcome, ReserveRequest, Settlement, State, Usage,
    DEFAULT_RETENTION_SECS,
};
use crate::plan::{Meter, PlanId, PlanStore, Subscription, SubscriptionStatus, SyncMark};
use crate::time::Timestamp;
use crate::FastMap;

/// Where the tables live and how to reach the server: shared by [`PostgresLedger`] and
/// [`PostgresPlanStore`].
#[derive(Clone)]
pub struct PostgresConfig {
    pg: tokio_postgres::Config,
    schema: String,
    prefix: String,
    pool_size: usize,
    connect_timeout: Duration,
    op_timeout: Duration,
    retention_secs: u64,
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

fn valid_identifier(s: &str, allow_empty: bool) -> bool {
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

    fn table(&self, name: &str) -> String {
        format!("\"{}\".\"{}{}\"", self.schema, self.prefix, name)
    }

    fn migration(&self) -> String {
        let p = &self.prefix;
        let bal = self.table("balances");
        let res = self.table("reservations");
        let allow = self.table("allowances");
        let dep = self.table("deposits");
        let subs = self.table("subscriptions");
        format!(
            r#"
CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS {bal} (
    account   text PRIMARY KEY,
    available bigint NOT NULL DEFAULT 0 CHECK (available >= 0),
    held      bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    settled   bigint NOT NULL DEFAULT 0 CHECK (settled >= 0),
    deposited bigint NOT NULL DEFAULT 0 CHECK (deposited >= 0),
    CHECK (deposited = available + held + settled)
);
CREATE TABLE IF NOT EXISTS {res} (
    account         text   NOT NULL,
    key             text   NOT NULL,
    state           text   NOT NULL CHECK (state IN ('open', 'settled', 'released', 'expired')),
    fingerprint     bigint NOT NULL,
    credits         bigint NOT NULL CHECK (credits >= 0),
    allowance_units jsonb  NOT NULL,
    charges         jsonb  NOT NULL,
    settlement      jsonb,
    expires_at      bigint NOT NULL,
    touched_at      bigint NOT NULL,
    PRIMARY KEY (account, key)
);
-- Whether a finished reservation is kept for the retention time (made under an idempotency
-- key) or deleted when settled or released (a key unique to one request). Rows from before
-- the column existed are kept, as they always were. Altered only when missing: ALTER TABLE
-- locks the table even when it has nothing to do.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}reservations'
                   AND column_name = 'retain') THEN
    ALTER TABLE {res} ADD COLUMN retain boolean NOT NULL DEFAULT true;
  END IF;
END $$;
CREATE INDEX IF NOT EXISTS "{p}reservations_due" ON {res} (expires_at) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS "{p}reservations_done" ON {res} (touched_at) WHERE state <> 'open';
CREATE TABLE IF NOT EXISTS {allow} (
    account      text   NOT NULL,
    meter        text   NOT NULL,
    window_start bigint NOT NULL,
    used         bigint NOT NULL CHECK (used >= 0),
    held         bigint NOT NULL CHECK (held >= 0),
    resets_at    bigint NOT NULL,
    PRIMARY KEY (account, meter, window_start)
);
CREATE TABLE IF NOT EXISTS {dep} (
    account text   NOT NULL,
    key     text   NOT NULL,
    amount  bigint NOT NULL CHECK (amount > 0),
    at      bigint NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX IF NOT EXISTS "{p}deposits_at" ON {dep} (at);
CREATE TABLE IF NOT EXISTS {subs} (
    account              text PRIMARY KEY,
    plan                 text NOT NULL,
    status               text NOT NULL,
    current_period_start bigint,
    current_period_end   bigint,
    trial_end            bigint,
    canceled_at          bigint,
    ended_at             bigint,
    past_due_since       bigint,
    grace_until          bigint,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- The payment-processor event a subscription was last written from (webhooks compare it to
-- apply events once and in order). Altered only when missing, as above.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}subscriptions'
                   AND column_name = 'synced') THEN
    ALTER TABLE {subs} ADD COLUMN synced jsonb;
  END IF;
END $$;
"#,
            schema = self.schema,
        )
    }
}

/// Creates the schema and tables if missing, in one transaction, serialized with other
/// instances migrating at the same time by an advisory lock.
async fn migrate(pool: &Pool, config: &PostgresConfig) -> Result<(), StoreError> {
    let sql = config.migration();
    timed(config.op_timeout, async {
        let mut client = pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tower402-migrate'))",
            &[],
        )
        .await
        .map_err(pg_error)?;
        tx.batch_execute(&sql).await.map_err(pg_error)?;
        tx.batch_execute(&records::migration(config))
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    })
    .await
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    // The server gave up waiting (our `lock_timeout` / `statement_timeout`): a timeout, as
    // when the client's own timer fires first.
    match e.code() {
        Some(c) if *c == SqlState::QUERY_CANCELED || *c == SqlState::LOCK_NOT_AVAILABLE => {
            StoreError::Timeout
        }
        _ => StoreError::Unavailable(Box::new(e)),
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(_) => StoreError::Timeout,
        PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(Box::new(other)),
    }
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::Corrupt(BoxError::from(what))
}

async fn timed<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

// Amounts are at most `Credits::MAX_EXACT` and timestamps fit easily; anything beyond `i64`
// is clamped for timestamps (a hold that never expires) and refused for amounts.
fn ts_to_sql(t: Timestamp) -> i64 {
    i64::try_from(t.unix()).unwrap_or(i64::MAX)
}

fn u64_to_sql(v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::AmountOutOfRange)
}

fn from_sql(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt("negative value in a ledger table"))
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Open => "open",
        State::Settled => "settled",
        State::Released => "released",
        State::Expired => "expired",
    }
}

fn state_from(s: &str) -> Result<State, StoreError> {
    Ok(match s {
        "open" => State::Open,
        "settled" => State::Settled,
        "released" => State::Released,
        "expired" => State::Expired,
        _ => return Err(corrupt("unknown reservation state")),
    })
}

/// What operations need loaded besides the buckets and the due reservations.
struct Need<'a> {
    reservations: Vec<&'a str>,
    allowances: Vec<(Meter, Timestamp)>,
    deposits: Vec<&'a str>,
}

impl<'a> Need<'a> {
    /// What all of `needs` need.
    fn of(needs: impl Iterator<Item = &'a OwnedNeed> + Clone) -> Self {
        Need {
            reservations: needs
                .clone()
                .filter_map(|n| n.reservation.as_deref())
                .collect(),
            allowances: needs
                .clone()
                .flat_map(|n| n.allowances.iter().cloned())
                .collect(),
            deposits: needs.filter_map(|n| n.deposit.as_deref()).collect(),
        }
    }

    /// The allowance windows, as the meter and start columns of the load statement.
    fn windows(&self) -> (Vec<&str>, Vec<i64>) {
        self.allowances
            .iter()
            .map(|(m, s)| (m.as_str(), ts_to_sql(*s)))
            .unzip()
    }

    /// The parameters of [`LedgerSql::load`] and [`LedgerSql::peek`], in order.
    fn params<'p>(
        &'p self,
        account: &'p &'p str,
        now: &'p i64,
        windows: &'p (Vec<&'p str>, Vec<i64>),
    ) -> [&'p (dyn ToSql + Sync); 6] {
        [
            account,
            now,
            &self.reservations,
            &windows.0,
            &windows.1,
            &self.deposits,
        ]
    }
}

/// What one queued operation needs loaded (see [`Need`]).
#[derive(Default)]
struct OwnedNeed {
    reservation: Option<ReservationKey>,
    allowances: Vec<(Meter, Timestamp)>,
    deposit: Option<String>,
}

/// Operations on one account wait here for the account's next transaction, so that a busy
/// account takes its row lock, and flushes the WAL, once for many operations instead of once
/// each. Operations on other accounts run in parallel, as before; other instances sharing
/// the database still take turns on the row lock.
#[derive(Clone, Default)]
struct Queues(Arc<Mutex<FastMap<AccountId, Vec<Queued>>>>);

/// The most operations one transaction runs.
const MAX_BATCH: usize = 64;

impl Queues {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<AccountId, Vec<Queued>>> {
        // Nothing is left half-done under this lock: a poisoned one is safe to keep using.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `op`. True if the account had no transaction under way: the caller starts
    /// [`PostgresLedger::drain`].
    fn push(&self, account: &AccountId, op: Queued) -> bool {
        let mut queues = self.lock();
        if let Some(queue) = queues.get_mut(account) {
            queue.push(op);
            return false;
        }
        queues.insert(account.clone(), vec![op]);
        true
    }

    /// The account's next operations, at most [`MAX_BATCH`]; `None`, and the account's
    /// queue gone, when there are none.
    fn next(&self, account: &AccountId) -> Option<Vec<Queued>> {
        let mut queues = self.lock();
        let queue = queues.get_mut(account)?;
        // Operations whose callers stopped waiting take no place in a transaction.
        queue.retain(|q| !q.op.abandoned());
        if queue.is_empty() {
            queues.remove(account);
            return None;
        }
        if queue.len() <= MAX_BATCH {
            return Some(std::mem::take(queue));
        }
        Some(queue.drain(..MAX_BATCH).collect())
    }

    /// Whether the account has a transaction under way: a read then joins the next one
    /// rather than reading beside it.
    fn busy(&self, account: &AccountId) -> bool {
        self.lock().contains_key(account)
    }

    fn abandon(&self, account: &AccountId) {
        self.lock().remove(account);
    }
}

/// Drops an account's queue when dropped: see [`PostgresLedger::drain`].
struct Abandon {
    queues: Queues,
    account: AccountId,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            self.queues.abandon(&self.account);
        }
    }
}

/// An operation waiting for its account's transaction.
struct Queued {
    need: OwnedNeed,
    now: Timestamp,
    op: Box<dyn Pending>,
}

/// A queued operation, whatever it answers.
trait Pending: Send {
    /// Whether its caller has stopped waiting.
    fn abandoned(&self) -> bool;
    /// Runs the operation on the book, unless its caller has stopped waiting.
    fn apply(&mut self, book: &mut AccountBook);
    /// Forgets the result of [`Pending::apply`], to run it again in another transaction.
    fn reset(&mut self);
    /// Answers once the transaction has ended: committed (or had nothing to write), or
    /// failed, in which case nothing the operation did was kept.
    fn answer(self: Box<Self>, ended: Result<(), &Arc<StoreError>>);
    /// Answers that what the operation did could not be stored.
    fn fail(self: Box<Self>, error: LedgerError);
}

struct Op<T, F> {
    run: F,
    out: Option<Result<T, LedgerError>>,
    reply: tokio::sync::oneshot::Sender<Result<Result<T, LedgerError>, StoreError>>,
}

impl<T, F> Pending for Op<T, F>
where
    T: Send,
    F: Fn(&mut AccountBook) -> Result<T, LedgerError> + Send,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn apply(&mut self, book: &mut AccountBook) {
        if !self.abandoned() {
            self.out = Some((self.run)(book));
        }
    }

    fn reset(&mut self) {
        self.out = None;
    }

    fn answer(self: Box<Self>, ended: Result<(), &Arc<StoreError>>) {
        let answer = match (ended, self.out) {
            (Ok(()), Some(out)) => Ok(out),
            // Not run: its caller had stopped waiting.
            (Ok(()), None) => return,
            (Err(e), _) => Err(shared(e)),
        };
        // The caller may have stopped waiting since: then nobody needs the answer.
        let _ = self.reply.send(answer);
    }

    fn fail(self: Box<Self>, error: LedgerError) {
        let _ = self.reply.send(Ok(Err(error)));
    }
}

/// Whether the server refused the data of a statement (SQLSTATE classes 22, data exception,
/// and 23, integrity constraint violation): the fault of one operation's input, not of the
/// connection or the server.
fn refused_data(e: &StoreError) -> bool {
    let StoreError::Unavailable(source) = e else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|code| matches!(code.code().get(..2), Some("22" | "23")))
}

/// The error of a transaction, for each of its operations.
fn shared(e: &Arc<StoreError>) -> StoreError {
    #[derive(Debug)]
    struct Shared(Arc<StoreError>);
    impl fmt::Display for Shared {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(&self.0, f)
        }
    }
    impl std::error::Error for Shared {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            std::error::Error::source(&*self.0)
        }
    }
    match **e {
        StoreError::Timeout => StoreError::Timeout,
        StoreError::Unavailable(_) => StoreError::Unavailable(Box::new(Shared(e.clone()))),
        StoreError::Corrupt(_) => StoreError::Corrupt(Box::new(Shared(e.clone()))),
    }
}

/// The PostgreSQL ledger. Clones share the pool.
#[derive(Clone)]
pub struct PostgresLedger {
    pool: Pool,
    config: PostgresConfig,
    sql: Arc<LedgerSql>,
    queues: Queues,
    counts: Arc<Counts>,
}

/// The atomics behind [`TransactionCounts`].
#[derive(Default)]
struct Counts {
    transactions: AtomicU64,
    operations: AtomicU64,
}

/// How many transactions a [`PostgresLedger`] and its clones have run for `reserve`,
/// `settle`, `release` and `deposit` (and for `balance` and `allowance_usage` on a busy
/// account), and how many of those operations they carried: on a busy account one
/// transaction carries many (see the module docs). For metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransactionCounts {
    /// Transactions run, committed or not.
    pub transactions: u64,
    /// Operations they carried; an operation run again alone after its batch failed to
    /// store counts twice.
    pub operations: u64,
}

/// The statements of the ledger's operations, built once from the configured table names.
/// Each connection prepares them once (deadpool's statement cache), so running one costs a
/// single round trip instead of a Parse/Describe round trip plus an execute round trip.
struct LedgerSql {
    /// `BEGIN`, with the operation's timeout as the transaction's lock and statement
    /// timeouts: an operation that gave up (and closed its connection) must not leave a server
    /// process waiting on the row lock, which it would otherwise do until it got it.
    begin: String,
    lock: String,
    load: String,
    peek: String,
    write: String,
}

impl LedgerSql {
    fn new(config: &PostgresConfig) -> Self {
        let bal = config.table("balances");
        let res = config.table("reservations");
        let allow = config.table("allowances");
        let dep = config.table("deposits");
        // Everything the operations of a transaction read besides the balance, as one row
        // per record, tagged by its kind (see `add_rows`): the reservations under their keys
        // and the due open ones ('r'); the allowance counters of the windows the requests
        // name and of the charges of those reservations ('a'); the deposits under their keys
        // ('d'). Sent right behind `lock` on the same connection, so it runs once the
        // lock is held, with a snapshot taken then.
        let load = format!(
            "WITH r AS ( \
                 SELECT key, state, fingerprint, credits, expires_at, touched_at, \
                        allowance_units, charges, settlement, retain \
                   FROM {res} \
                  WHERE account = $1 \
                    AND ((state = 'open' AND expires_at <= $2) OR key = ANY($3::text[])) \
             ), w (meter, window_start) AS ( \
                 SELECT * FROM unnest($4::text[], $5::bigint[]) \
                 UNION \
                 SELECT c ->> 'meter', (c -> 'allowance' ->> 'start')::bigint \
                   FROM r, jsonb_array_elements(r.charges) AS c \
                  WHERE jsonb_typeof(c -> 'allowance') = 'object' \
             ) \
             SELECT 'r', key, state, fingerprint, credits, expires_at, touched_at, \
                    allowance_units, charges, settlement, retain FROM r \
             UNION ALL \
             SELECT 'a', a.meter, NULL, a.window_start, a.used, a.held, a.resets_at, \
                    NULL, NULL, NULL, NULL \
               FROM {allow} a JOIN w ON a.meter = w.meter AND a.window_start = w.window_start \
              WHERE a.account = $1 \
             UNION ALL \
             SELECT 'd', key, NULL, amount, at, NULL, NULL, NULL, NULL, NULL, NULL \
               FROM {dep} WHERE account = $1 AND key = ANY($6::text[])"
        );
        // The same plus the balance row ('b'), for a read on one snapshot without the lock.
        let peek = format!(
            "{load} UNION ALL \
             SELECT 'b', account, NULL, available, held, settled, deposited, NULL, NULL, NULL, \
                    NULL \
               FROM {bal} WHERE account = $1"
        );
        // A little longer than the client's own timer, which normally fires first: this is
        // the backstop for a server process the client has stopped waiting for.
        let timeout_ms = config.op_timeout.as_millis().saturating_add(1000);
        LedgerSql {
            begin: format!(
                "BEGIN; SET LOCAL lock_timeout = {timeout_ms}; \
                 SET LOCAL statement_timeout = {timeout_ms}"
            ),
            load,
            peek,
            lock: format!(
                "INSERT INTO {bal} (account) VALUES ($1) \
                 ON CONFLICT (account) DO UPDATE SET account = EXCLUDED.account \
                 RETURNING available, held, settled, deposited"
            ),
            // Every write of an operation in one statement, each table's rows passed as
            // column arrays (empty when nothing changed there). Rows deleted and rows
            // upserted are disjoint, so no row is touched twice. A deposit key forgotten after
            // the retention time may still have its old row (the sweep deletes it later): the
            // upsert replaces it. The account's row lock makes all of this exclusive.
            write: format!(
                "WITH balance AS ( \
                     UPDATE {bal} SET available = $2, held = $3, settled = $4, deposited = $5 \
                      WHERE account = $1 AND $6::boolean \
                 ), reservations_gone AS ( \
                     DELETE FROM {res} WHERE account = $1 AND key = ANY($7::text[]) \
                 ), reservations AS ( \
                     INSERT INTO {res} (account, key, state, fingerprint, credits, \
                         allowance_units, charges, settlement, expires_at, touched_at, retain) \
                     SELECT $1::text, * FROM unnest($8::text[], $9::text[], $10::bigint[], \
                         $11::bigint[], $12::jsonb[], $13::jsonb[], $14::jsonb[], \
                         $15::bigint[], $16::bigint[], $28::boolean[]) \
                     ON CONFLICT (account, key) DO UPDATE SET state = EXCLUDED.state, \
                         fingerprint = EXCLUDED.fingerprint, credits = EXCLUDED.credits, \
                         allowance_units = EXCLUDED.allowance_units, \
                         charges = EXCLUDED.charges, settlement = EXCLUDED.settlement, \
                         expires_at = EXCLUDED.expires_at, touched_at = EXCLUDED.touched_at, \
                         retain = EXCLUDED.retain \
                 ), allowances_gone AS ( \
                     DELETE FROM {allow} WHERE account = $1 AND (meter, window_start) IN \
                         (SELECT * FROM unnest($17::text[], $18::bigint[])) \
                 ), allowances AS ( \
                     INSERT INTO {allow} (account, meter, window_start, used, held, resets_at) \
                     SELECT $1::text, * FROM unnest($19::text[], $20::bigint[], \
                         $21::bigint[], $22::bigint[], $23::bigint[]) \
                     ON CONFLICT (account, meter, window_start) DO UPDATE \
                         SET used = EXCLUDED.used, held = EXCLUDED.held, \
                         resets_at = EXCLUDED.resets_at \
                 ), deposits_gone AS ( \
                     DELETE FROM {dep} WHERE account = $1 AND key = ANY($24::text[]) \
                 ), deposits AS ( \
                     INSERT INTO {dep} (account, key, amount, at) \
                     SELECT $1::text, * FROM unnest($25::text[], $26::bigint[], $27::bigint[]) \
                     ON CONFLICT (account, key) DO UPDATE \
                         SET amount = EXCLUDED.amount, at = EXCLUDED.at \
                 ) SELECT 1"
            ),
        }
    }
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresLedger {
    /// A ledger on `pool` (usually [`PostgresConfig::pool`]) with the tables of `config`.
    pub fn new(pool: Pool, config: PostgresConfig) -> Self {
        let sql = Arc::new(LedgerSql::new(&config));
        PostgresLedger {
            pool,
            config,
            sql,
            queues: Queues::default(),
            counts: Arc::default(),
        }
    }

    /// Creates the schema and tables if missing (idempotent, transactional).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate(&self.pool, &self.config).await
    }

    /// The pool, e.g. to share it with a [`PostgresPlanStore`].
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The transactions run so far for this ledger's operations, and the operations they
    /// carried.
    pub fn transaction_counts(&self) -> TransactionCounts {
        TransactionCounts {
            transactions: self.counts.transactions.load(Ordering::Relaxed),
            operations: self.counts.operations.load(Ordering::Relaxed),
        }
    }

    /// Releases the due reservations of up to `limit` accounts and deletes up to `limit`
    /// finished reservations, deposit keys and allowance counters older than the retention
    /// time. Returns how many rows it handled. Not needed for correctness (every operation
    /// expires its account's holds first); run it now and then to keep `held` accurate on
    /// idle accounts and the tables small.
    pub async fn sweep(&self, now: Timestamp, limit: u32) -> Result<u64, LedgerError> {
        let res = self.config.table("reservations");
        let dep = self.config.table("deposits");
        let allow = self.config.table("allowances");
        let now_sql = ts_to_sql(now);
        let horizon = ts_to_sql(Timestamp::from_unix(
            now.unix().saturating_sub(self.config.retention_secs),
        ));
        let limit = i64::from(limit);
        let accounts: Vec<String> = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT DISTINCT account FROM {res} \
                         WHERE state = 'open' AND expires_at <= $1 LIMIT $2"
                    ),
                    &[&now_sql, &limit],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await?;
        let mut handled = 0u64;
        for account in &accounts {
            self.balance(&AccountId::new(account), now).await?;
            handled = handled.saturating_add(1);
        }
        // Forgetting a record past its retention is what every operation would do on reading
        // it, so these deletes need no account lock.
        let deletes = [
            (
                format!(
                    "DELETE FROM {res} WHERE (account, key) IN (SELECT account, key FROM {res} \
                     WHERE state <> 'open' AND touched_at <= $1 LIMIT $2)"
                ),
                horizon,
            ),
            (
                format!(
                    "DELETE FROM {dep} WHERE (account, key) IN (SELECT account, key FROM {dep} \
                     WHERE at <= $1 LIMIT $2)"
                ),
                horizon,
            ),
            (
                format!(
                    "DELETE FROM {allow} WHERE (account, meter, window_start) IN \
                     (SELECT account, meter, window_start FROM {allow} \
                     WHERE resets_at <= $1 AND held = 0 LIMIT $2)"
                ),
                now_sql,
            ),
        ];
        let deleted = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let mut n = 0u64;
            for (sql, at) in &deletes {
                let d = client
                    .execute(sql.as_str(), &[at, &limit])
                    .await
                    .map_err(pg_error)?;
                n = n.saturating_add(d);
            }
            Ok(n)
        })
        .await?;
        Ok(handled.saturating_add(deleted))
    }

    /// Open reservations of an account after expiring the due ones (for tests and
    /// diagnostics).
    pub async fn open_reservations(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<u64, LedgerError> {
        self.balance(account, now).await?;
        let res = self.config.table("reservations");
        let n: i64 = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one(
                    &format!("SELECT count(*) FROM {res} WHERE account = $1 AND state = 'open'"),
                    &[&account.as_str()],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.get(0))
        })
        .await?;
        Ok(from_sql(n)?)
    }

    /// Runs `op` on the account's book inside a transaction holding the account's row lock:
    /// the next one of its account, together with the operations queued with it.
    async fn with_book<T, F>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: OwnedNeed,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&mut AccountBook) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = Queued {
            need,
            now,
            op: Box::new(Op {
                run: op,
                out: None,
                reply,
            }),
        };
        if self.queues.push(account, queued) {
            // The account had no transaction under way: start them. On a task of its own, so
            // a caller that stops waiting cannot abandon the operations queued behind it.
            let abandon = Abandon {
                queues: self.queues.clone(),
                account: account.clone(),
                armed: true,
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(self.clone().drain(abandon))),
                // Dropping `abandon` drops the queue: its callers get an error.
                Err(_) => {
                    drop(abandon);
                    return Err(
                        StoreError::unavailable("no Tokio runtime to run the ledger on").into(),
                    );
                }
            }
        }
        let answer = async {
            answer.await.unwrap_or_else(|_| {
                Err(StoreError::unavailable(
                    "the account's transaction ended without answering",
                ))
            })
        };
        timed(self.config.op_timeout, answer).await?
    }

    /// Runs the account's queued operations, a transaction at a time, until none is left.
    /// Made before the task is spawned, `abandon` goes wherever the task goes: should it end
    /// early or never run (a panic, a runtime shutting down), the account's queue goes with
    /// it, its callers get an error, and the next operation starts anew.
    async fn drain(self, mut abandon: Abandon) {
        while let Some(batch) = self.queues.next(&abandon.account) {
            self.run_batch(&abandon.account, batch).await;
        }
        // `next` removed the queue when it found it empty.
        abandon.armed = false;
    }

    /// One transaction for `batch`, and its answers. Should a result be impossible to store
    /// (an amount beyond the table's range, data the server refuses), the operations run
    /// again one per transaction, so that only the one at fault fails.
    async fn run_batch(&self, account: &AccountId, batch: Vec<Queued>) {
        let n = batch.len();
        let mut needs = Vec::with_capacity(n);
        let mut ops = Vec::with_capacity(n);
        for q in batch {
            needs.push((q.need, q.now));
            ops.push(q.op);
        }
        let result = self.transaction(account, &needs, &mut ops).await;
        if n > 1 {
            tracing::debug!(
                target: "tower_402::store::postgres",
                account = account.as_str(),
                operations = n,
                "operations batched in one transaction"
            );
        }
        match result {
            Ok(Ok(())) => ops.into_iter().for_each(|op| op.answer(Ok(()))),
            Err(e) if n == 1 || !refused_data(&e) => {
                let e = Arc::new(e);
                ops.into_iter().for_each(|op| op.answer(Err(&e)));
            }
            Ok(Err(e)) if n == 1 => {
                if let Some(op) = ops.pop() {
                    op.fail(e);
                }
            }
            // Something one of them did cannot be stored, or the server refused the data:
            // run each alone, so that only the one at fault fails.
            Ok(Err(_)) | Err(_) => {
                for (mut op, need) in ops.into_iter().zip(&needs) {
                    op.reset();
                    let alone = std::slice::from_ref(need);
                    match self
                        .transaction(account, alone, std::slice::from_mut(&mut op))
                        .await
                    {
                        Ok(Ok(())) => op.answer(Ok(())),
                        Ok(Err(e)) => op.fail(e),
                        Err(e) => op.answer(Err(&Arc::new(e))),
                    }
                }
            }
        }
    }

    /// One transaction running `ops` in order; `Ok(Err)` if what they did cannot be stored.
    async fn transaction(
        &self,
        account: &AccountId,
        needs: &[(OwnedNeed, Timestamp)],
        ops: &mut [Box<dyn Pending>],
    ) -> Result<Result<(), LedgerError>, StoreError> {
        // Due reservations are loaded as of the latest `now`: a superset of what each
        // operation, at its own time, expires.
        let now = needs.iter().map(|(_, at)| *at).max().unwrap_or_default();
        let need = Need::of(needs.iter().map(|(n, _)| n));
        self.counts.transactions.fetch_add(1, Ordering::Relaxed);
        let carried = ops.len() as u64;
        self.counts.operations.fetch_add(carried, Ordering::Relaxed);
        let run = |book: &mut AccountBook| {
            ops.iter_mut().for_each(|op| op.apply(book));
            Ok(())
        };
        timed(
            self.config.op_timeout,
            self.locked(account, now, &need, run),
        )
        .await
    }

    /// Runs a read (`op` changes nothing unless records are due to expire or be forgotten).
    /// On a busy account it joins the account's next transaction. Otherwise it reads without
    /// the lock: on one consistent snapshot of the account, which is as good as reading under
    /// the lock at that instant. Only if the book would change does it run again under the
    /// lock, like any other operation.
    async fn read_book<T, F>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: OwnedNeed,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&mut AccountBook) -> Result<T, LedgerError> + Send + Sync + 'static,
    {
        if self.queues.busy(account) {
            return self.with_book(account, now, need, op).await;
        }
        let need = Need::of(std::iter::once(&need));
        let run = async {
            if let Some(out) = self.peek(account, now, &need, &op).await? {
                return Ok(out);
            }
            self.locked(account, now, &need, &op).await
        };
        timed(self.config.op_timeout, run).await?
    }

    /// `op` on a snapshot read in one statement, without a transaction; `None` if it would
    /// change the book.
    async fn peek<T>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: &Need<'_>,
        op: impl FnOnce(&mut AccountBook) -> Result<T, LedgerError>,
    ) -> Result<Option<Result<T, LedgerError>>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let peek = client
            .prepare_cached(&self.sql.peek)
            .await
            .map_err(pg_error)?;
        let acct = account.as_str();
        let windows = need.windows();
        let rows = client
            .query(&peek, &need.params(&acct, &ts_to_sql(now), &windows))
            .await
            .map_err(pg_error)?;
        // An account without a row has a zero balance, as the lock would create it.
        let mut parts = Parts::default();
        add_rows(&mut parts, &rows)?;
        let mut book = AccountBook::from_parts(self.config.retention_secs, parts.clone());
        let out = op(&mut book);
        let after = book.into_parts();
        match Changes::between(&parts, &after) {
            Ok(c) if c.is_empty() => Ok(Some(out)),
            Ok(_) => Ok(None),
            Err(LedgerError::Store(e)) => Err(e),
            Err(e) => Ok(Some(Err(e))),
        }
    }

    /// `op` in a transaction holding the account's row lock, in two round trips: BEGIN, the
    /// lock and the load pipelined; then the write and COMMIT pipelined (or a ROLLBACK when
    /// nothing changed, which spares the commit's WAL flush). The lock is held for one round
    /// trip plus the commit.
    async fn locked<T>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: &Need<'_>,
        op: impl FnOnce(&mut AccountBook) -> Result<T, LedgerError>,
    ) -> Result<Result<T, LedgerError>, StoreError> {
        let sql = &self.sql;
        let tx = OpenTx(Some(self.pool.get().await.map_err(pool_error)?));
        let client = tx.client();
        // All prepared before anything is sent: the pipelines below rely on their order.
        let lock = client.prepare_cached(&sql.lock).await.map_err(pg_error)?;
        let load = client.prepare_cached(&sql.load).await.map_err(pg_error)?;
        let write = client.prepare_cached(&sql.write).await.map_err(pg_error)?;
        let acct = account.as_str();
        let windows = need.windows();
        // Pipelined: tokio-postgres sends a query on its future's first poll and `try_join3`
        // polls in argument order, so BEGIN, `lock` and `load` go out in that order without
        // waiting for answers, and the server runs them in that order. Under read committed,
        // `load` takes its snapshot when it starts, after the lock is granted, so it sees
        // everything the lock's previous holder committed. (One statement doing both would
        // read from a snapshot taken before waiting for the lock.)
        let (_, balance, rows) = try_join3(
            client.batch_execute(&sql.begin),
            client.query_one(&lock, &[&acct]),
            client.query(&load, &need.params(&acct, &ts_to_sql(now), &windows)),
        )
        .await
        .map_err(pg_error)?;
        let mut loaded = Parts {
            balance: balance_from_row(&balance, 0)?,
            ..Parts::default()
        };
        add_rows(&mut loaded, &rows)?;
        let mut book = AccountBook::from_parts(self.config.retention_secs, loaded.clone());
        let out = op(&mut book);
        let after = book.into_parts();
        let changes = match (&out, Changes::between(&loaded, &after)) {
            (Ok(_), Ok(c)) if !c.is_empty() => c,
            // A refused operation or one that changed nothing: nothing to write.
            (_, Ok(_)) => {
                client.batch_execute("ROLLBACK").await.map_err(pg_error)?;
                tx.close();
                return Ok(out);
            }
            (_, Err(LedgerError::Store(e))) => return Err(e),
            (_, Err(e)) => return Ok(Err(e)),
        };
        // Pipelined the same way: the write, then COMMIT. Should the write fail, the server
        // has aborted the transaction and turns the COMMIT into a rollback; `try_join`
        // reports the write's error. If the write never went out (an encoding error on
        // its first poll), `try_join` returns before polling COMMIT and `tx` closes the
        // connection: the transaction is rolled back either way.
        try_join(
            client.execute(&write, &changes.params(&acct)),
            client.batch_execute("COMMIT"),
        )
        .await
        .map_err(pg_error)?;
        tx.close();
        Ok(out)
    }
}

/// A pooled connection inside a transaction. [`OpenTx::close`] hands it back to the pool
/// once the transaction has ended (committed or rolled back). Dropped without that (an
/// error, the operation's timeout, a caller dropping the future), it takes the connection
/// out of the pool and closes it, so the server rolls the transaction back: a connection
/// never goes back to the pool inside a transaction.
struct OpenTx(Option<Object>);

impl OpenTx {
    fn client(&self) -> &Object {
        self.0
            .as_ref()
            .expect("an open transaction has its connection")
    }

    fn close(mut self) {
        // Back to the pool.
        drop(self.0.take());
    }
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

/// What an operation changed, as the parameters of the write statement: the balance if it
/// changed, then per table the keys of the rows to delete and the columns of the rows to
/// insert or update.
#[derive(Default)]
struct Changes<'a> {
    balance_changed: bool,
    balance: [i64; 4],
    reservations_gone: Vec<&'a str>,
    reservations: ReservationColumns<'a>,
    allowances_gone: (Vec<&'a str>, Vec<i64>),
    allowances: AllowanceColumns<'a>,
    deposits_gone: Vec<&'a str>,
    deposits: (Vec<&'a str>, Vec<i64>, Vec<i64>),
}

#[derive(Default)]
struct ReservationColumns<'a> {
    key: Vec<&'a str>,
    state: Vec<&'static str>,
    fingerprint: Vec<i64>,
    credits: Vec<i64>,
    allowance_units: Vec<serde_json::Value>,
    charges: Vec<serde_json::Value>,
    settlement: Vec<Option<serde_json::Value>>,
    expires_at: Vec<i64>,
    touched_at: Vec<i64>,
    retain: Vec<bool>,
}

#[derive(Default)]
struct AllowanceColumns<'a> {
    meter: Vec<&'a str>,
    window_start: Vec<i64>,
    used: Vec<i64>,
    held: Vec<i64>,
    resets_at: Vec<i64>,
}

impl<'a> Changes<'a> {
    fn between(before: &'a Parts, after: &'a Parts) -> Result<Self, LedgerError> {
        let mut c = Changes::default();
        let b = &after.balance;
        if *b != before.balance {
            c.balance_changed = true;
            c.balance = [
                u64_to_sql(b.available.get())?,
                u64_to_sql(b.held.get())?,
                u64_to_sql(b.settled.get())?,
                u64_to_sql(b.deposited.get())?,
            ];
        }
        for key in before.reservations.keys() {
            if !after.reservations.contains_key(key) {
                c.reservations_gone.push(key);
            }
        }
        for (key, rec) in &after.reservations {
            if before.reservations.get(key) == Some(rec) {
                continue;
            }
            let r = &mut c.reservations;
            r.key.push(key);
            r.state.push(state_name(rec.state));
            r.fingerprint
                .push(i64::from_be_bytes(rec.fingerprint.to_be_bytes()));
            r.credits.push(u64_to_sql(rec.credits.get())?);
            r.allowance_units
                .push(serde_json::to_value(&rec.allowance_units).map_err(StoreError::corrupt)?);
            r.charges
                .push(serde_json::to_value(&rec.charges).map_err(StoreError::corrupt)?);
            r.settlement.push(
                rec.settlement
                    .as_ref()
                    .map(serde_json::to_value)
                    .transpose()
                    .map_err(StoreError::corrupt)?,
            );
            r.expires_at.push(ts_to_sql(rec.expires_at));
            r.touched_at.push(ts_to_sql(rec.touched_at));
            r.retain.push(rec.retain);
        }
        for (meter, start) in before.allowances.keys() {
            if !after.allowances.contains_key(&(meter.clone(), *start)) {
                c.allowances_gone.0.push(meter.as_str());
                c.allowances_gone.1.push(ts_to_sql(*start));
            }
        }
        for ((meter, start), counter) in &after.allowances {
            if before.allowances.get(&(meter.clone(), *start)) == Some(counter) {
                continue;
            }
            let a = &mut c.allowances;
            a.meter.push(meter.as_str());
            a.window_start.push(ts_to_sql(*start));
            a.used.push(u64_to_sql(counter.used)?);
            a.held.push(u64_to_sql(counter.held)?);
            a.resets_at.push(ts_to_sql(counter.resets_at));
        }
        for key in before.deposits.keys() {
            if !after.deposits.contains_key(key) {
                c.deposits_gone.push(key);
            }
        }
        for (key, (amount, at)) in &after.deposits {
            if before.deposits.get(key) == Some(&(*amount, *at)) {
                continue;
            }
            c.deposits.0.push(key);
            c.deposits.1.push(u64_to_sql(amount.get())?);
            c.deposits.2.push(ts_to_sql(*at));
        }
        Ok(c)
    }

    fn is_empty(&self) -> bool {
        !self.balance_changed
            && self.reservations_gone.is_empty()
            && self.reservations.key.is_empty()
            && self.allowances_gone.0.is_empty()
            && self.allowances.meter.is_empty()
            && self.deposits_gone.is_empty()
            && self.deposits.0.is_empty()
    }

    /// The parameters of [`LedgerSql::write`], in order.
    fn params<'p>(&'p self, account: &'p &'p str) -> [&'p (dyn ToSql + Sync); 28] {
        let (b, r, a) = (&self.balance, &self.reservations, &self.allowances);
        [
            account,
            &b[0],
            &b[1],
            &b[2],
            &b[3],
            &self.balance_changed,
            &self.reservations_gone,
            &r.key,
            &r.state,
            &r.fingerprint,
            &r.credits,
            &r.allowance_units,
            &r.charges,
            &r.settlement,
            &r.expires_at,
            &r.touched_at,
            &self.allowances_gone.0,
            &self.allowances_gone.1,
            &a.meter,
            &a.window_start,
            &a.used,
            &a.held,
            &a.resets_at,
            &self.deposits_gone,
            &self.deposits.0,
            &self.deposits.1,
            &self.deposits.2,
            &r.retain,
        ]
    }
}

fn balance_from_row(row: &Row, first: usize) -> Result<Balance, StoreError> {
    Ok(Balance {
        available: Credits::new(from_sql(row.get(first))?),
        held: Credits::new(from_sql(row.get(first + 1))?),
        settled: Credits::new(from_sql(row.get(first + 2))?),
        deposited: Credits::new(from_sql(row.get(first + 3))?),
    })
}

/// Adds the rows of [`LedgerSql::load`] to `parts`. Columns: the kind, a key, a state, four
/// integers, three JSON values; which of them a kind uses is in the statement.
fn add_rows(parts: &mut Parts, rows: &[Row]) -> Result<(), StoreError> {
    for row in rows {
        let kind: &str = row.get(0);
        let key: String = row.get(1);
        match kind {
            "r" => {
                let rec = record_from_row(row)?;
                parts.reservations.insert(key.into(), rec);
            }
            "a" => {
                parts.allowances.insert(
                    (Meter::new(key), Timestamp::from_unix(from_sql(row.get(3))?)),
                    Counter {
                        used: from_sql(row.get(4))?,
                        held: from_sql(row.get(5))?,
                        resets_at: Timestamp::from_unix(from_sql(row.get(6))?),
                    },
                );
            }
            "b" => parts.balance = balance_from_row(row, 3)?,
            "d" => {
                let amount = Credits::new(from_sql(row.get(3))?);
                let at = Timestamp::from_unix(from_sql(row.get(4))?);
                parts.deposits.insert(key, (amount, at));
            }
            _ => return Err(corrupt("unknown row kind in the ledger load")),
        }
    }
    Ok(())
}

fn record_from_row(row: &Row) -> Result<Record, StoreError> {
    let state: &str = row.get(2);
    let fingerprint: i64 = row.get(3);
    let units: serde_json::Value = row.get(7);
    let charges: serde_json::Value = row.get(8);
    let settlement: Option<serde_json::Value> = row.get(9);
    Ok(Record {
        fingerprint: u64::from_be_bytes(fingerprint.to_be_bytes()),
        charges: serde_json::from_value(charges).map_err(StoreError::corrupt)?,
        credits: Credits::new(from_sql(row.get(4))?),
        allowance_units: serde_json::from_value(units).map_err(StoreError::corrupt)?,
        expires_at: Timestamp::from_unix(from_sql(row.get(5))?),
        state: state_from(state)?,
        touched_at: Timestamp::from_unix(from_sql(row.get(6))?),
        settlement: settlement
            .map(serde_json::from_value)
            .transpose()
            .map_err(StoreError::corrupt)?,
        retain: row.get(10),
    })
}

#[async_trait]
impl Ledger for PostgresLedger {
    fn records(&self) -> Option<&dyn crate::ledger::ResponseRecords> {
        Some(self)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        let need = OwnedNeed {
            reservation: Some(req.key.clone()),
            allowances: req
                .charges
                .iter()
                .filter_map(|c| c.allowance.map(|w| (c.meter.clone(), w.start)))
                .collect(),
            deposit: None,
        };
        let owned = req.clone();
        self.with_book(&req.account, req.now, need, move |b| b.reserve(&owned))
            .await
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let key = id.key.clone();
        let need = OwnedNeed {
            reservation: Some(key.clone()),
            ..OwnedNeed::default()
        };
        let usage = usage.to_vec();
        self.with_book(&id.account, now, need, move |b| {
            b.settle(&key, &usage, policy, now)
        })
        .await
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        let key = id.key.clone();
        let need = OwnedNeed {
            reservation: Some(key.clone()),
            ..OwnedNeed::default()
        };
        self.with_book(&id.account, now, need, move |b| b.release(&key, now))
            .await
    }

    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        let key = key.to_owned();
        let need = OwnedNeed {
            deposit: Some(key.clone()),
            ..OwnedNeed::default()
        };
        self.with_book(account, now, need, move |b| b.deposit(amount, &key, now))
            .await
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        self.read_book(account, now, OwnedNeed::default(), move |b| {
            Ok(b.balance(now))
        })
        .await
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        let need = OwnedNeed {
            allowances: vec![(meter.clone(), window_start)],
            ..OwnedNeed::default()
        };
        let meter = meter.clone();
        self.read_book(account, now, need, move |b| {
            Ok(b.allowance_usage(&meter, window_start, now))
        })
        .await
    }
}

/// Subscriptions in PostgreSQL, one row per account. Clones share the pool.
#[derive(Clone)]
pub struct PostgresPlanStore {
    pool: Pool,
    config: PostgresConfig,
    sql: Arc<PlanSql>,
}

/// The plan store's statements, built once from the configured table name (prepared once per
/// connection, like [`LedgerSql`]).
struct PlanSql {
    get: String,
    put: String,
    /// `put` only where no subscription, or one without a mark, is stored.
    put_if_unmarked: String,
    /// An update only where the stored mark equals `$11`.
    put_if_marked: String,
}

impl PlanSql {
    fn new(config: &PostgresConfig) -> Self {
        let subs = config.table("subscriptions");
        let upsert = format!(
            "INSERT INTO {subs} (account, plan, status, current_period_start, \
             current_period_end, trial_end, canceled_at, ended_at, past_due_since, \
             grace_until, synced) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (account) DO UPDATE SET plan = $2, status = $3, \
             current_period_start = $4, current_period_end = $5, trial_end = $6, \
             canceled_at = $7, ended_at = $8, past_due_since = $9, \
             grace_until = $10, synced = $11, updated_at = now()"
        );
        PlanSql {
            get: format!(
                "SELECT plan, status, current_period_start, current_period_end, \
                 trial_end, canceled_at, ended_at, past_due_since, grace_until, synced \
                 FROM {subs} WHERE account = $1"
            ),
            put_if_unmarked: format!("{upsert} WHERE {subs}.synced IS NULL"),
            put: upsert,
            put_if_marked: format!(
                "UPDATE {subs} SET plan = $2, status = $3, current_period_start = $4, \
                 current_period_end = $5, trial_end = $6, canceled_at = $7, ended_at = $8, \
                 past_due_since = $9, grace_until = $10, synced = $11, updated_at = now() \
                 WHERE account = $1 AND synced = $12::jsonb"
            ),
        }
    }
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

fn opt_ts(t: Option<Timestamp>) -> Option<i64> {
    t.map(ts_to_sql)
}

fn ts_col(row: &Row, i: usize) -> Result<Option<Timestamp>, StoreError> {
    row.get::<_, Option<i64>>(i)
        .map(|v| from_sql(v).map(Timestamp::from_unix))
        .transpose()
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
    async fn write(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        let c = PostgresConfig::new("postgres://u@localhost/db").expect("url");
        assert!(c.clone().schema("billing_2").is_ok());
        assert!(c.clone().table_prefix("").is_ok());
        for bad in [
            "",
            "2x",
            "a-b",
            "A",
            "a\"b",
            "a;drop",
            "x y",
            &"a".repeat(41),
        ] {
            assert!(c.clone().schema(bad).is_err(), "{bad:?}");
        }
        assert!(c.table_prefix("p\"").is_err());
    }

    /// `LedgerSql::load` finds the allowance windows of loaded reservations in their stored
    /// charges at `c ->> 'meter'` and `c -> 'allowance' ->> 'start'`: keep the JSON that way.
    #[test]
    fn stored_charges_have_the_paths_the_load_reads() {
        use crate::plan::AllowanceWindow;
        let charge = crate::ledger::Charge {
            meter: Meter::new("calls"),
            units: 2,
            unit_price: Credits::new(3),
            price_per: 1,
            allowance: Some(AllowanceWindow {
                limit: 10,
                start: Timestamp::from_unix(60),
                resets_at: Timestamp::from_unix(120),
            }),
            overage: true,
        };
        let json = serde_json::to_value(vec![charge]).expect("charges serialize");
        assert_eq!(json[0]["meter"], serde_json::json!("calls"));
        assert_eq!(json[0]["allowance"]["start"], serde_json::json!(60));
    }
}
