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
const PRELUDE: &str = r#"
local B = KEYS[1]
local NOW = tonumber(ARGV[1])
local RETENTION = tonumber(ARGV[2])
local GC = tonumber(ARGV[3])
local MAX = 9007199254740991
local function s(n) return string.format('%d', n) end
local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local bal = {available = 0, held = 0, settled = 0, deposited = 0}
do
  local t = hgetall(B .. ':bal')
  if t then
    bal.available = tonumber(t.available); bal.held = tonumber(t.held)
    bal.settled = tonumber(t.settled); bal.deposited = tonumber(t.deposited)
  end
end
local dirty = false
local function done(reply)
  if dirty then
    redis.call('HSET', B .. ':bal', 'available', s(bal.available), 'held', s(bal.held),
      'settled', s(bal.settled), 'deposited', s(bal.deposited))
  end
  return reply
end
local function ckey(meter, start) return B .. ':a:' .. string.len(meter) .. ':' .. meter .. ':' .. start end
local function get_counter(meter, start)
  local c = hgetall(ckey(meter, start))
  if not c then return nil end
  return {used = tonumber(c.used), held = tonumber(c.held), re = tonumber(c.re)}
end
local function put_counter(meter, start, c)
  local k = ckey(meter, start)
  redis.call('HSET', k, 'used', s(c.used), 'held', s(c.held), 're', s(c.re))
  redis.call('EXPIRE', k, s(math.max(c.re - NOW, 0) + GC))
end
-- Forgets a counter whose window is over and holds nothing (done once, before reading).
local function prune_counter(meter, start)
  local c = get_counter(meter, start)
  if c and c.re <= NOW and c.held == 0 then redis.call('DEL', ckey(meter, start)) end
end
local function charge(rec, i)
  return {m = rec['m' .. i], p = tonumber(rec['p' .. i]), pp = tonumber(rec['pp' .. i] or '1'),
    o = rec['o' .. i] == '1',
    a = rec['l' .. i] ~= nil, l = tonumber(rec['l' .. i] or '0'), ws = rec['ws' .. i],
    re = tonumber(rec['re' .. i] or '0')}
end
local function release_units(rec)
  for i = 1, tonumber(rec.n) do
    if rec['l' .. i] then
      local c = get_counter(rec['m' .. i], rec['ws' .. i])
      if c then
        c.held = math.max(c.held - tonumber(rec['u' .. i]), 0)
        redis.call('HSET', ckey(rec['m' .. i], rec['ws' .. i]), 'held', s(c.held))
      end
    end
  end
end
local function expire_due()
  local due = redis.call('ZRANGEBYSCORE', B .. ':open', '-inf', s(NOW))
  if #due == 0 then return end
  local released = 0
  for _, k in ipairs(due) do
    local rk = B .. ':r:' .. k
    local rec = hgetall(rk)
    if rec and rec.st == 'o' then
      released = released + tonumber(rec.cr)
      release_units(rec)
      redis.call('HSET', rk, 'st', 'e', 'tt', rec.ex)
      redis.call('EXPIRE', rk, s(GC))
    end
  end
  bal.held = math.max(bal.held - released, 0)
  bal.available = bal.available + released
  dirty = true
  redis.call('ZREMRANGEBYSCORE', B .. ':open', '-inf', s(NOW))
end
-- A reservation record, or nil if absent or finished longer ago than the retention time.
local function load_rec(k)
  local rk = B .. ':r:' .. k
  local rec = hgetall(rk)
  if rec and rec.st ~= 'o' and tonumber(rec.tt) + RETENTION <= NOW then
    redis.call('DEL', rk)
    return nil, rk
  end
  return rec, rk
end
-- ceil(p × units / pp), or nil above MAX. Every operand is an integer ≤ 2^53 − 1, so the
-- product is exact whenever it is ≤ MAX; the quotient is corrected to the exact ceiling.
local function price(p, units, pp)
  local a = p * units
  if a > MAX or pp < 1 then return nil end
  local q = math.floor(a / pp)
  if q * pp > a then q = q - 1 end
  if q * pp < a then q = q + 1 end
  return q
end
-- Charge::split: 'ok', allowance units, credits | 'quota', limit, taken | 'max'
local function split(c, units, taken)
  local limit = 0
  if c.a then limit = c.l end
  local free = math.max(limit - taken, 0)
  local au = math.min(units, free)
  local rest = units - au
  if rest == 0 then return 'ok', au, 0 end
  if not c.o then
    if (not c.a) and c.p == 0 then return 'ok', au, 0 end
    return 'quota', limit, taken
  end
  local cr = price(c.p, rest, c.pp)
  if cr then return 'ok', au, cr end
  return 'max'
end
local function taken_of(c)
  if not c.a then return 0 end
  local t = get_counter(c.m, c.ws)
  if not t then return 0 end
  return t.used + t.held
end
local function settlement_reply(tag, rec)
  local r = {tag, tonumber(rec.sc), tonumber(rec.saa), tonumber(rec.ssc), tonumber(rec.n)}
  for i = 1, tonumber(rec.n) do r[#r + 1] = tonumber(rec['sa' .. i]) end
  r[#r + 1] = tonumber(rec.sk)
  for j = 1, tonumber(rec.sk) do
    r[#r + 1] = rec['skm' .. j]; r[#r + 1] = tonumber(rec['sku' .. j])
  end
  r[#r + 1] = tonumber(rec.sun or '0')
  for i = 1, tonumber(rec.n) do r[#r + 1] = tonumber(rec['su' .. i] or '-1') end
  return r
end
local function bal_reply(tag)
  return {tag, bal.available, bal.held, bal.settled, bal.deposited}
end
"#;

/// ARGV: 4 key, 5 fingerprint, 6 expires_at, 7 ttl, 8 n, then 9 per charge: meter, units,
/// price, price per, overage, has allowance, limit, window start, resets at; then whether
/// the key is an idempotency key (`1`: keep the record for the retention time once finished;
/// `0`: a key unique to one request, forgotten when settled or released).
const RESERVE: &str = r#"
local key, fp, ex, ttl, n = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local keep = ARGV[9 + n * 9] or '1'
local ch = {}
for i = 1, n do
  local b = 8 + (i - 1) * 9
  ch[i] = {m = ARGV[b + 1], units = tonumber(ARGV[b + 2]), p = tonumber(ARGV[b + 3]),
    pp = tonumber(ARGV[b + 4]), o = ARGV[b + 5] == '1', a = ARGV[b + 6] == '1',
    l = tonumber(ARGV[b + 7]), ws = ARGV[b + 8], re = tonumber(ARGV[b + 9])}
end
expire_due()
local rec, rk = load_rec(key)
if rec then
  if rec.fp ~= fp then return done({'conflict'}) end
  if rec.st == 'o' then return done({'in_progress'}) end
  if rec.st == 's' then return done(settlement_reply('completed', rec)) end
end
for i = 1, n do if ch[i].a then prune_counter(ch[i].m, ch[i].ws) end end
local credits = 0
local units = {}
for i = 1, n do
  local c = ch[i]
  local kind, x, y = split(c, c.units, taken_of(c))
  if kind == 'quota' then return done({'quota', i, y}) end
  if kind == 'max' then return done({'insufficient', bal.available, MAX}) end
  credits = credits + y
  if credits > MAX then return done({'range'}) end
  units[i] = x
end
if credits > bal.available then return done({'insufficient', bal.available, credits}) end
bal.available = bal.available - credits
bal.held = bal.held + credits
dirty = true
local left = {}
for i = 1, n do
  local c = ch[i]
  if c.a then
    local t = get_counter(c.m, c.ws) or {used = 0, held = 0, re = c.re}
    t.held = t.held + units[i]
    put_counter(c.m, c.ws, t)
    left[i] = math.max(c.l - (t.used + t.held), 0)
  else
    left[i] = -1
  end
end
redis.call('DEL', rk)
local f = {'fp', fp, 'st', 'o', 'cr', s(credits), 'ex', s(ex), 'tt', s(NOW), 'n', s(n), 'k', keep}
for i = 1, n do
  local c = ch[i]
  local j = tostring(i)
  for _, v in ipairs({'m' .. j, c.m, 'p' .. j, s(c.p), 'pp' .. j, s(c.pp), 'o' .. j, c.o and '1' or '0', 'u' .. j, s(units[i])}) do
    f[#f + 1] = v
  end
  if c.a then
    for _, v in ipairs({'l' .. j, s(c.l), 'ws' .. j, c.ws, 're' .. j, s(c.re)}) do f[#f + 1] = v end
  end
end
redis.call('HSET', rk, unpack(f))
-- No expiry on an open record: only it knows what to give back when its hold lapses, so it
-- lives until it is settled, released or expired by a later operation (which set one).
redis.call('ZADD', B .. ':open', s(ex), key)
local r = {'reserved', credits, ex, bal.available, n}
for i = 1, n do r[#r + 1] = units[i] end
for i = 1, n do r[#r + 1] = left[i] end
return done(r)
"#;

/// ARGV: 4 key, 5 policy (`draw` or `cap`), 6 m, then m pairs of meter, units.
const SETTLE: &str = r#"
local key, policy, m = ARGV[4], ARGV[5], tonumber(ARGV[6])
local usage = {}
for j = 1, m do usage[ARGV[5 + 2 * j]] = tonumber(ARGV[6 + 2 * j]) end
expire_due()
local rec, rk = load_rec(key)
if not rec then return done({'unknown'}) end
local n = tonumber(rec.n)
local held_credits = 0
local held_units = {}
if rec.st == 'o' then
  held_credits = tonumber(rec.cr)
  for i = 1, n do held_units[i] = tonumber(rec['u' .. i]) end
elseif rec.st == 'e' then
  for i = 1, n do held_units[i] = 0 end
elseif rec.st == 's' then
  return done({'already_settled'})
else
  return done({'already_released'})
end
for i = 1, n do if rec['l' .. i] then prune_counter(rec['m' .. i], rec['ws' .. i]) end end
local cost = 0
local f = {'st', 's', 'tt', s(NOW)}
local short = {}
for i = 1, n do
  local c = charge(rec, i)
  local units = usage[c.m] or 0
  local taken = math.max(taken_of(c) - held_units[i], 0)
  local kind, au, cr = split(c, units, taken)
  local over = 0
  if kind == 'quota' then
    local free = 0
    if c.a then free = math.max(c.l - taken, 0) end
    au = math.min(units, free)
    cr = 0
    over = units - au
  elseif kind == 'max' then
    au = 0
    cr = MAX
  end
  if c.a then
    local t = get_counter(c.m, c.ws) or {used = 0, held = 0, re = c.re}
    t.held = math.max(t.held - held_units[i], 0)
    t.used = t.used + au
    put_counter(c.m, c.ws, t)
    f[#f + 1] = 'su' .. i; f[#f + 1] = s(t.used)
  end
  if over > 0 then short[#short + 1] = {c.m, over} end
  f[#f + 1] = 'sa' .. i; f[#f + 1] = s(au)
  cost = cost + cr
end
local from_hold = math.min(cost, held_credits)
local beyond = cost - from_hold
local from_available = 0
-- A lapsed hold held nothing: its late settlement draws what it can, whatever the policy.
if policy == 'draw' or rec.st == 'e' then from_available = math.min(beyond, bal.available) end
bal.held = math.max(bal.held - held_credits, 0)
bal.available = math.max(bal.available + (held_credits - from_hold) - from_available, 0)
local charged = from_hold + from_available
bal.settled = bal.settled + charged
dirty = true
for _, v in ipairs({'sc', s(charged), 'saa', s(bal.available), 'sun', s(bal.available + bal.held), 'ssc', s(beyond - from_available), 'sk', s(#short)}) do
  f[#f + 1] = v
end
for j, p in ipairs(short) do
  f[#f + 1] = 'skm' .. j; f[#f + 1] = p[1]; f[#f + 1] = 'sku' .. j; f[#f + 1] = s(p[2])
end
redis.call('HSET', rk, unpack(f))
redis.call('ZREM', B .. ':open', key)
local reply = settlement_reply('settled', hgetall(rk))
-- A key unique to one request never comes back: forget it now (records written before
-- the flag existed have none and are kept, as they always were).
if rec.k == '0' then redis.call('DEL', rk) else redis.call('EXPIRE', rk, s(GC)) end
return done(reply)
"#;

/// ARGV: 4 key.
const RELEASE: &str = r#"
local key = ARGV[4]
expire_due()
local rec, rk = load_rec(key)
if not rec then return done({'unknown'}) end
if rec.st == 's' then return done({'already_settled'}) end
if rec.st ~= 'o' then return done({'ok'}) end
release_units(rec)
if rec.k == '0' then
  redis.call('DEL', rk)
else
  redis.call('HSET', rk, 'st', 'r', 'tt', s(NOW))
  redis.call('EXPIRE', rk, s(GC))
end
redis.call('ZREM', B .. ':open', key)
local cr = tonumber(rec.cr)
bal.held = math.max(bal.held - cr, 0)
bal.available = bal.available + cr
dirty = true
return done({'ok'})
"#;

/// ARGV: 4 key, 5 amount.
const DEPOSIT: &str = r#"
local key, amount = ARGV[4], tonumber(ARGV[5])
expire_due()
local dk = B .. ':d:' .. key
local d = hgetall(dk)
if d and tonumber(d.at) + RETENTION <= NOW then
  redis.call('DEL', dk)
  d = nil
end
if d then
  if tonumber(d.amount) ~= amount then return done({'conflict'}) end
  return done(bal_reply('unchanged'))
end
if bal.deposited + amount > MAX then return done({'range'}) end
bal.deposited = bal.deposited + amount
bal.available = bal.available + amount
dirty = true
redis.call('HSET', dk, 'amount', s(amount), 'at', s(NOW))
redis.call('EXPIRE', dk, s(GC))
return done(bal_reply('applied'))
"#;

const BALANCE: &str = r#"
expire_due()
return done(bal_reply('balance'))
"#;

/// ARGV: 4 meter, 5 window start.
const ALLOWANCE: &str = r#"
expire_due()
prune_counter(ARGV[4], ARGV[5])
local c = get_counter(ARGV[4], ARGV[5])
if not c then return done({'usage', 0, 0}) end
return done({'usage', c.used, c.held})
"#;

const OPEN: &str = r#"
expire_due()
return done({'open', redis.call('ZCARD', B .. ':open')})
"#;

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

/// For the load script (`scripts/load.sh`): the exact reserve script and its arguments, so
/// `redis-benchmark` can run the same script the ledger runs. Not part of the API.
#[doc(hidden)]
pub fn bench_reserve_invocation(
    prefix: &str,
    req: &ReserveRequest,
) -> Result<(String, String, Vec<String>), LedgerError> {
    let mut argv = vec![
        exact(req.now.unix())?.to_string(),
        DEFAULT_RETENTION_SECS.to_string(),
        DEFAULT_RETENTION_SECS
            .clamp(MIN_GC_SECS, MAX_EXACT)
            .to_string(),
    ];
    argv.extend(reserve_args(req)?);
    Ok((
        format!("{PRELUDE}{RESERVE}"),
        account_base(prefix, &req.account),
        argv,
    ))
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
        RedisLedger {
            conn: config.connection(),
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
const PUT_SUBSCRIPTION_IF: &str = r#"
local cur = redis.call('GET', KEYS[1])
local mark = nil
if cur then
  local ok, sub = pcall(cjson.decode, cur)
  if not ok or type(sub) ~= 'table' then
    return redis.error_reply('tower-402: unreadable subscription')
  end
  if type(sub.synced) == 'table' then mark = sub.synced end
end
if ARGV[2] == '0' then
  if mark ~= nil then return 0 end
else
  if mark == nil then return 0 end
  if mark.source ~= ARGV[3] or mark.event_id ~= ARGV[5] then return 0 end
  if type(mark.event_created) ~= 'number' then return 0 end
  if string.format('%d', mark.event_created) ~= ARGV[4] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

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
