//! The Redis backend (feature `redis`).
//!
//! [`RedisLedger`] and [`RedisPlanStore`] let any number of app instances share one Redis.
//!
//! # How the ledger keeps its promises
//!
//! Every ledger operation is **one Lua script**, so Redis runs it atomically: no other
//! command sees an account half-updated, and two instances can never both spend the same
//! credit. The scripts implement exactly the state machine of
//! [`AccountBook`](crate::ledger::AccountBook) (the in-memory and PostgreSQL backends run that
//! Rust code; the conformance suite checks the three agree on random operation sequences).
//! They are sent once and then invoked by `EVALSHA`; after a Redis restart (`NOSCRIPT`) they
//! are sent again automatically.
//!
//! - **Expiry without a sweeper.** Each account keeps its open reservations in a sorted set
//!   by expiry time; every script first releases the account's holds that are due at the
//!   operation's `now`.
//! - **Idempotency records** live as long as the retention time (default
//!   [`DEFAULT_RETENTION_SECS`]) measured in the ledger's `now`, exactly as in the book; Redis
//!   key TTLs (in wall-clock time, never shorter than a day) only collect the garbage of
//!   accounts nobody touches again. A reservation made without an idempotency key
//!   ([`ReserveRequest::idempotent`] false) is deleted when it is settled or released, as in
//!   the book, so a busy API does not keep a record per request for a day. Balances never
//!   expire.
//! - **Amounts.** Redis Lua computes with doubles, exact for integers up to 2^53 − 1. So every
//!   amount is kept at or below [`Credits::MAX_EXACT`]: deposits beyond it and totals that
//!   would pass it are refused with [`LedgerError::AmountOutOfRange`] (as on every backend),
//!   and so are unit counts, prices, allowance limits and TTLs above it in a
//!   [`ReserveRequest`]. Used units reported to `settle` are capped at it. Numbers are written
//!   to Redis with `%d`, never with Lua's lossy `tostring`.
//! - **Failures.** The connection is a multiplexed [`ConnectionManager`], opened on first
//!   use and re-opened by itself after the server comes back; connect and response timeouts
//!   are set (see [`RedisConfig`]). Errors become [`StoreError::Unavailable`] (the driver
//!   error kept as the source) or [`StoreError::Timeout`], which the layers answer with 503
//!   (fail-closed) or let pass (fail-open). A failed command is never retried by the ledger:
//!   after a timeout the script may still have run. `reserve` and `deposit` are idempotent by
//!   key, so the caller may retry them with the same key safely; a retried `settle` answers
//!   [`LedgerError::AlreadySettled`] if the first one landed.
//!
//! # Keys
//!
//! All keys start with the configured prefix (default `tower402:`), so several apps can
//! share one Redis. An account's keys are `{prefix}{<len>:<account>}:…` (balance hash `:bal`,
//! open-reservation set `:open`, records `:r:<key>`, allowance counters `:a:…`, deposit keys
//! `:d:<key>`); subscriptions are `{prefix}sub:<len>:<account>` holding JSON. The length
//! prefix keeps the encoding unambiguous for any account id. There is no bounded `sweep`:
//! expiry is lazy and key TTLs collect old records.
//!
//! # Examples
//!
//! ```no_run
//! use tower_402::store::{RedisConfig, RedisLedger, RedisPlanStore};
//! use tower_402::{Credits, Ledger, Timestamp};
//! use std::time::Duration;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RedisConfig::new("redis://127.0.0.1:6379")?
//!     .prefix("weather-api:")
//!     .response_timeout(Duration::from_millis(500));
//! let ledger = RedisLedger::new(&config);
//! let plans = RedisPlanStore::new(&config);
//!
//! ledger.deposit(&"acme".into(), Credits::new(500), "order-1", Timestamp::now()).await?;
//! // Now hand `ledger` and `plans` to `PaymentGateLayer` / `MeteringLayer`.
//! # let _ = plans;
//! # Ok(())
//! # }
//! ```

mod records;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::OnceCell;

use crate::account::AccountId;
use crate::credits::Credits;
use crate::denial::Denial;
use crate::error::{BoxError, LedgerError, StoreError};
use crate::ledger::{
    AllowanceUsage, Balance, Deposit, Ledger, OverEstimate, Replay, Reservation, ReservationId,
    ReserveOutcome, ReserveRequest, Settlement, Shortfall, Usage, DEFAULT_RETENTION_SECS,
};
use crate::plan::{Meter, PlanStore, Subscription, SyncMark};
use crate::time::Timestamp;

const MAX_EXACT: u64 = Credits::MAX_EXACT.get();
/// Garbage-collection TTLs are never shorter than this many wall-clock seconds.
const MIN_GC_SECS: u64 = 86_400;

/// How to reach Redis and where the keys live: shared by [`RedisLedger`] and
/// [`RedisPlanStore`].
#[derive(Clone)]
pub struct RedisConfig {
    client: redis::Client,
    prefix: String,
    retention_secs: u64,
    connect_timeout: Duration,
    response_timeout: Duration,
    reconnect_attempts: usize,
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
        Ok(RedisConfig {
            client,
            prefix: "tower402:".to_owned(),
            retention_secs: DEFAULT_RETENTION_SECS,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            reconnect_attempts: 2,
        })
    }

    /// The prefix of every key.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
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

    fn connection(&self) -> Conn {
        Conn {
            client: self.client.clone(),
            config: ConnectionManagerConfig::new()
                .set_connection_timeout(self.connect_timeout)
                .set_response_timeout(self.response_timeout)
                .set_number_of_retries(self.reconnect_attempts)
                .set_max_delay(200),
            cell: Arc::new(OnceCell::new()),
        }
    }
}

/// A connection opened on first use; the manager reconnects by itself afterwards.
#[derive(Clone)]
struct Conn {
    client: redis::Client,
    config: ConnectionManagerConfig,
    cell: Arc<OnceCell<ConnectionManager>>,
}

impl Conn {
    async fn get(&self) -> Result<ConnectionManager, StoreError> {
        self.cell
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), self.config.clone())
            })
            .await
            .cloned()
            .map_err(redis_error)
    }
}

fn redis_error(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Unavailable(Box::new(e))
    }
}

fn corrupt(what: &'static str) -> LedgerError {
    LedgerError::Store(StoreError::Corrupt(BoxError::from(what)))
}

fn account_base(prefix: &str, account: &AccountId) -> String {
    let a = account.as_str();
    format!("{prefix}{{{}:{a}}}", a.len())
}

/// Shared by every script: state loading, lazy expiry, the split of a charge.
const PRELUDE: &str = include_str!("redis/prelude.lua");

/// ARGV: 4 key, 5 fingerprint, 6 expires_at, 7 ttl, 8 n, then 9 per charge: meter, units,
/// price, price per, overage, has allowance, limit, window start, resets at; then whether
/// the key is an idempotency key (`1`: keep the record for the retention time once finished;
/// `0`: a key unique to one request, forgotten when settled or released).
const RESERVE: &str = include_str!("redis/reserve.lua");

/// ARGV: 4 key, 5 policy (`draw` or `cap`), 6 m, then m pairs of meter, units.
const SETTLE: &str = include_str!("redis/settle.lua");

/// ARGV: 4 key.
const RELEASE: &str = include_str!("redis/release.lua");

/// ARGV: 4 key, 5 amount.
const DEPOSIT: &str = include_str!("redis/deposit.lua");

const BALANCE: &str = include_str!("redis/balance.lua");

/// ARGV: 4 meter, 5 window start.
const ALLOWANCE: &str = include_str!("redis/allowance.lua");

const OPEN: &str = include_str!("redis/open.lua");

/// ARGV 4 onwards of the reserve script for `req` (see `RESERVE`).
fn reserve_args(req: &ReserveRequest) -> Result<Vec<String>, LedgerError> {
    let ttl = exact(req.ttl_secs)?;
    let expires_at = req.now.plus_secs(ttl);
    let mut args = vec![
        req.key.to_string(),
        req.fingerprint.to_string(),
        exact(expires_at.unix())?.to_string(),
        ttl.to_string(),
        req.charges.len().to_string(),
    ];
    for c in req.charges.iter() {
        let (has, limit, start, resets) = match c.allowance {
            Some(w) => (
                "1",
                exact(w.limit)?,
                exact(w.start.unix())?,
                exact(w.resets_at.unix())?,
            ),
            None => ("0", 0, 0, 0),
        };
        args.extend([
            c.meter.as_str().to_owned(),
            exact(c.units)?.to_string(),
            exact(c.unit_price.get())?.to_string(),
            exact(c.price_per.max(1))?.to_string(),
            if c.overage { "1" } else { "0" }.to_owned(),
            has.to_owned(),
            limit.to_string(),
            start.to_string(),
            resets.to_string(),
        ]);
    }
    args.push(if req.idempotent { "1" } else { "0" }.to_owned());
    Ok(args)
}

struct Scripts {
    reserve: Script,
    settle: Script,
    release: Script,
    deposit: Script,
    balance: Script,
    allowance: Script,
    open: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            reserve: s(RESERVE),
            settle: s(SETTLE),
            release: s(RELEASE),
            deposit: s(DEPOSIT),
            balance: s(BALANCE),
            allowance: s(ALLOWANCE),
            open: s(OPEN),
        }
    }
}

/// Reads a script's reply: a tag, then integers and strings.
struct Reply {
    items: std::vec::IntoIter<Value>,
}

impl Reply {
    fn new(v: Value) -> Result<(String, Reply), LedgerError> {
        let Value::Array(items) = v else {
            return Err(corrupt("script reply is not an array"));
        };
        let mut r = Reply {
            items: items.into_iter(),
        };
        let tag = r.string()?;
        Ok((tag, r))
    }

    fn string(&mut self) -> Result<String, LedgerError> {
        match self.items.next() {
            Some(Value::BulkString(b)) => {
                String::from_utf8(b).map_err(|_| corrupt("script reply is not utf-8"))
            }
            Some(Value::SimpleString(s)) => Ok(s),
            _ => Err(corrupt("script reply: expected a string")),
        }
    }

    fn int(&mut self) -> Result<i64, LedgerError> {
        match self.items.next() {
            Some(Value::Int(i)) => Ok(i),
            _ => Err(corrupt("script reply: expected an integer")),
        }
    }

    fn u64(&mut self) -> Result<u64, LedgerError> {
        u64::try_from(self.int()?).map_err(|_| corrupt("script reply: negative amount"))
    }

    fn credits(&mut self) -> Result<Credits, LedgerError> {
        Ok(Credits::new(self.u64()?))
    }

    fn count(&mut self) -> Result<usize, LedgerError> {
        usize::try_from(self.u64()?).map_err(|_| corrupt("script reply: bad count"))
    }

    fn balance(&mut self) -> Result<Balance, LedgerError> {
        Ok(Balance {
            available: self.credits()?,
            held: self.credits()?,
            settled: self.credits()?,
            deposited: self.credits()?,
        })
    }

    fn settlement(&mut self) -> Result<Settlement, LedgerError> {
        let charged = self.credits()?;
        let available_after = self.credits()?;
        let short_credits = self.credits()?;
        let n = self.count()?;
        let allowance_units = (0..n).map(|_| self.u64()).collect::<Result<_, _>>()?;
        let k = self.count()?;
        let units = (0..k)
            .map(|_| Ok((Meter::new(self.string()?), self.u64()?)))
            .collect::<Result<_, LedgerError>>()?;
        let unspent_after = self.credits()?;
        let allowance_used_after = (0..n)
            .map(|_| self.int().map(|v| u64::try_from(v).ok()))
            .collect::<Result<_, _>>()?;
        Ok(Settlement {
            unspent_after,
            allowance_used_after,
            charged,
            allowance_units,
            shortfall: Shortfall {
                credits: short_credits,
                units,
            },
            available_after,
        })
    }
}

fn unexpected(tag: &str) -> LedgerError {
    tracing::error!(tag, "unexpected reply from a ledger script");
    corrupt("unexpected script reply")
}

fn exact(v: u64) -> Result<u64, LedgerError> {
    if v > MAX_EXACT {
        Err(LedgerError::AmountOutOfRange)
    } else {
        Ok(v)
    }
}

/// The Redis ledger. Clones share the connection. See the [module docs](self).
#[derive(Clone)]
pub struct RedisLedger {
    conn: Conn,
    prefix: String,
    retention_secs: u64,
    scripts: Arc<Scripts>,
    records: records::RedisRecords,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger")
            .field("prefix", &self.prefix)
            .field("retention_secs", &self.retention_secs)
            .finish_non_exhaustive()
    }
}

impl RedisLedger {
    /// A ledger with its own connection, opened on first use: building one succeeds while
    /// Redis is down (operations then fail with [`StoreError`] until it is back).
    pub fn new(config: &RedisConfig) -> Self {
        let conn = config.connection();
        RedisLedger {
            records: records::RedisRecords::new(conn.clone(), config.prefix.clone()),
            conn,
            prefix: config.prefix.clone(),
            retention_secs: config.retention_secs,
            scripts: Arc::new(Scripts::new()),
        }
    }

    fn base(&self, account: &AccountId) -> String {
        account_base(&self.prefix, account)
    }

    async fn run(
        &self,
        script: &Script,
        account: &AccountId,
        now: Timestamp,
        args: &[String],
    ) -> Result<(String, Reply), LedgerError> {
        let mut conn = self.conn.get().await?;
        let mut inv = script.key(self.base(account));
        inv.arg(exact(now.unix())?)
            .arg(self.retention_secs)
            .arg(self.retention_secs.clamp(MIN_GC_SECS, MAX_EXACT));
        for a in args {
            inv.arg(a);
        }
        let v: Value = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        Reply::new(v)
    }

    /// Open reservations of an account after expiring the due ones (for tests and
    /// diagnostics).
    pub async fn open_reservations(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<u64, LedgerError> {
        match self.run(&self.scripts.open, account, now, &[]).await? {
            (tag, mut r) if tag == "open" => r.u64(),
            (tag, _) => Err(unexpected(&tag)),
        }
    }

    /// The server-side id (`CLIENT ID`) of this ledger's current connection, for
    /// diagnostics such as finding it in `CLIENT LIST`.
    pub async fn client_id(&self) -> Result<i64, StoreError> {
        let mut conn = self.conn.get().await?;
        redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)
    }
}

#[async_trait]
impl Ledger for RedisLedger {
    fn records(&self) -> Option<&dyn crate::ledger::ResponseRecords> {
        Some(&self.records)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        req.validate()?;
        let args = reserve_args(req)?;
        let (tag, mut r) = self
            .run(&self.scripts.reserve, &req.account, req.now, &args)
            .await?;
        match tag.as_str() {
            "reserved" => {
                let credits = r.credits()?;
                let expires_at = Timestamp::from_unix(r.u64()?);
                let available_after = r.credits()?;
                let n = r.count()?;
                let allowance_units = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                let allowance_left = (0..n)
                    .map(|_| r.int().map(|v| u64::try_from(v).ok()))
                    .collect::<Result<_, _>>()?;
                Ok(ReserveOutcome::Reserved(Reservation {
                    id: req.id(),
                    credits,
                    allowance_units,
                    expires_at,
                    available_after,
                    allowance_left,
                }))
            }
            "in_progress" => Ok(ReserveOutcome::Replayed(Replay::InProgress)),
            "completed" => Ok(ReserveOutcome::Replayed(Replay::Completed(r.settlement()?))),
            "conflict" => Err(LedgerError::KeyConflict),
            "range" => Err(LedgerError::AmountOutOfRange),
            "insufficient" => Ok(ReserveOutcome::Denied(Denial::InsufficientCredits {
                balance: r.credits()?,
                required: r.credits()?,
            })),
            "quota" => {
                let i = r.count()?;
                let used = r.u64()?;
                let c = i
                    .checked_sub(1)
                    .and_then(|i| req.charges.get(i))
                    .ok_or_else(|| corrupt("script reply: bad charge index"))?;
                Ok(ReserveOutcome::Denied(Denial::QuotaExceeded {
                    meter: c.meter.clone(),
                    limit: c.allowance.map_or(0, |a| a.limit),
                    used,
                    resets_at: c.allowance.map(|a| a.resets_at),
                    window_secs: c.allowance.map(|a| a.start.secs_until(a.resets_at)),
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let mut per_meter: BTreeMap<&str, u64> = BTreeMap::new();
        for u in usage {
            let e = per_meter.entry(u.meter.as_str()).or_default();
            *e = e.saturating_add(u.units).min(MAX_EXACT);
        }
        let policy = match policy {
            OverEstimate::CapAtHold => "cap",
            _ => "draw",
        };
        let mut args = vec![
            id.key.to_string(),
            policy.to_owned(),
            per_meter.len().to_string(),
        ];
        for (m, u) in per_meter {
            args.push(m.to_owned());
            args.push(u.to_string());
        }
        let (tag, mut r) = self
            .run(&self.scripts.settle, &id.account, now, &args)
            .await?;
        match tag.as_str() {
            "settled" => r.settlement(),
            "unknown" => Err(LedgerError::UnknownReservation),
            "already_settled" => Err(LedgerError::AlreadySettled),
            "already_released" => Err(LedgerError::AlreadyReleased),
            other => Err(unexpected(other)),
        }
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        let (tag, _) = self
            .run(
                &self.scripts.release,
                &id.account,
                now,
                &[id.key.to_string()],
            )
            .await?;
        match tag.as_str() {
            "ok" => Ok(()),
            "unknown" => Err(LedgerError::UnknownReservation),
            "already_settled" => Err(LedgerError::AlreadySettled),
            other => Err(unexpected(other)),
        }
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
        let args = [key.to_owned(), amount.get().to_string()];
        let (tag, mut r) = self.run(&self.scripts.deposit, account, now, &args).await?;
        match tag.as_str() {
            "applied" | "unchanged" => Ok(Deposit {
                applied: tag == "applied",
                balance: r.balance()?,
            }),
            "conflict" => Err(LedgerError::KeyConflict),
            "range" => Err(LedgerError::AmountOutOfRange),
            other => Err(unexpected(other)),
        }
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        match self.run(&self.scripts.balance, account, now, &[]).await? {
            (tag, mut r) if tag == "balance" => r.balance(),
            (tag, _) => Err(unexpected(&tag)),
        }
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        let args = [
            meter.as_str().to_owned(),
            exact(window_start.unix())?.to_string(),
        ];
        match self
            .run(&self.scripts.allowance, account, now, &args)
            .await?
        {
            (tag, mut r) if tag == "usage" => Ok(AllowanceUsage {
                used: r.u64()?,
                held: r.u64()?,
            }),
            (tag, _) => Err(unexpected(&tag)),
        }
    }
}

/// Subscriptions in Redis, one JSON string per account. Clones share the connection.
#[derive(Clone)]
pub struct RedisPlanStore {
    conn: Conn,
    prefix: String,
    put_if: Arc<Script>,
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

    fn key(&self, account: &AccountId) -> String {
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
const PUT_SUBSCRIPTION_IF: &str = include_str!("redis/put_subscription_if.lua");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_keys_are_unambiguous() {
        assert_eq!(account_base("p:", &"acme".into()), "p:{4:acme}");
        assert_ne!(
            account_base("p:", &"a:r:x".into()),
            format!("{}:r:x", account_base("p:", &"a".into()))
        );
    }
}
