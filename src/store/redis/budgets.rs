//! [`RedisBudgetStore`]: budget counters on Redis, for
//! [`BudgetedLedger`](crate::budget::BudgetedLedger).

use super::*;
use crate::budget::{BudgetLine, BudgetStore, CounterUsage, HoldOutcome, BUDGET_RETENTION_SECS};

const PRELUDE: &str = include_str!("budget_prelude.lua");
const HOLD: &str = include_str!("budget_hold.lua");
const SETTLE: &str = include_str!("budget_settle.lua");
const RELEASE: &str = include_str!("budget_release.lua");
const USAGE: &str = include_str!("budget_usage.lua");

/// Budget counters in Redis, shared by every instance. Clones share the connection.
///
/// Each operation is **one Lua script**, so it is atomic: a hold checks every line of the
/// chain (key, team, organisation, ...) and holds on all of them or on none, and two
/// concurrent holds can never take a level past its budget. The scripts mirror
/// [`BudgetBook`](crate::budget::BudgetBook) function by function (each `.lua` file names
/// the one it mirrors); the property test in `tests/budgets.rs` checks they answer every
/// sequence of calls as it does.
///
/// - **Lapsing without a sweeper.** Open holds sit in a sorted set by expiry; each script
///   first lapses the holds due at its `now`, gives their amounts back, and forgets lapsed
///   holds and old counters [`BUDGET_RETENTION_SECS`] after their time, as the book does.
///   A settlement that arrives after its hold lapsed still counts what was charged.
/// - **Times are the caller's.** Every time is the `now` (or expiry, window) passed in,
///   never Redis's clock, and no key has a Redis TTL.
/// - **Exact over all of `u64`.** Redis Lua counts in doubles (exact up to 2^53), so the
///   scripts compute on amounts, limits and times as two 32-bit halves and keep them as
///   decimal strings: nothing is refused or rounded; sums saturate at `u64::MAX` exactly
///   where the book's do.
/// - **Redis Cluster.** Every key carries the hash tag `{budgets}`, so all of them live in
///   one hash slot and each script runs on the node that owns it. (That node serializes all
///   budget operations of the prefix, as one Redis does.)
///
/// # Keys
///
/// | key | type | holds |
/// |---|---|---|
/// | `{prefix}{budgets}:c:<counter>` | hash | `used`, `held` (decimal), `re` (the window's end) |
/// | `{prefix}{budgets}:h:<hold>` | hash | `st` (`o` open, `e` lapsed), `ex` (expiry), `n`, and per line `c<i>` (counter), `a<i>` (amount), `r<i>` (window end), `m<i>` (meter, absent for credits) |
/// | `{prefix}{budgets}:open` | sorted set | open holds, `<expiry, 20 digits>\|<hold>` |
/// | `{prefix}{budgets}:lapsed` | sorted set | lapsed holds, by when they are forgotten |
/// | `{prefix}{budgets}:counters` | sorted set | counters, by when they are forgotten once nothing is held |
///
/// `<counter>` is `<len>:<owner>:<meter>:<window start>` with `<meter>` `-` for credits or
/// `<len>:<name>`; `<hold>` is `<len>:<account>:<reservation key>`. The lengths keep both
/// unambiguous for any string. No API key is ever written: only budget node ids and the
/// ledger's reservation ids (account and key).
///
/// # Examples
///
/// Nothing connects until the first operation:
///
/// ```
/// use tower_402::budget::{Budget, BudgetNode, Budgets, BudgetedLedger};
/// use tower_402::plan::Period;
/// use tower_402::store::{RedisBudgetStore, RedisConfig, RedisLedger};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = RedisConfig::new("redis://127.0.0.1:6379")?.prefix("weather-api:");
/// let budgets = Budgets::new()
///     .node(BudgetNode::new("acme", "organisation").budget(Budget::credits(10_000, Period::Year)))
///     .member("acct_research", "acme");
/// let ledger = BudgetedLedger::new(
///     RedisLedger::new(&config),
///     RedisBudgetStore::new(&config),
///     budgets,
/// )?;
/// // Hand `ledger` to `Billing::new`: every instance shares the counters.
/// # let _ = ledger;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBudgetStore {
    conn: Conn,
    base: String,
    scripts: Arc<[Script; 4]>,
}

impl fmt::Debug for RedisBudgetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudgetStore")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// `<len>:<s>`: a length-prefixed part of a key.
fn part(s: &str) -> String {
    format!("{}:{s}", s.len())
}

fn counter_id(owner: &str, meter: Option<&Meter>, window_start: Timestamp) -> String {
    let m = match meter {
        None => "-".to_owned(),
        Some(m) => part(m.as_str()),
    };
    format!("{}:{m}:{}", part(owner), window_start.unix())
}

fn hold_id(key: &ReservationId) -> String {
    format!("{}:{}", part(key.account.as_str()), key.key.as_str())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn amount(v: Option<&Value>) -> Result<u64, StoreError> {
    v.and_then(text)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::corrupt("budget script reply: expected an amount"))
}

impl RedisBudgetStore {
    /// A budget store with its own connection, opened on first use, under the prefix of
    /// `config` (the same configuration as the ledger's is fine: the keys do not collide).
    pub fn new(config: &RedisConfig) -> Self {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        RedisBudgetStore {
            conn: config.connection(),
            base: format!("{}{{budgets}}:", config.prefix),
            scripts: Arc::new([s(HOLD), s(SETTLE), s(RELEASE), s(USAGE)]),
        }
    }

    async fn run(
        &self,
        script: usize,
        now: Timestamp,
        args: Vec<String>,
    ) -> Result<Value, StoreError> {
        let mut conn = self.conn.get().await?;
        let mut inv = self.scripts[script].key(&self.base);
        inv.arg(now.unix().to_string())
            .arg(BUDGET_RETENTION_SECS.to_string());
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut conn).await.map_err(redis_error)
    }
}

#[async_trait]
impl BudgetStore for RedisBudgetStore {
    async fn hold(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<HoldOutcome, StoreError> {
        let mut args = vec![
            hold_id(key),
            expires_at.unix().to_string(),
            lines.len().to_string(),
        ];
        for l in lines {
            args.extend([
                counter_id(&l.owner, l.meter.as_ref(), l.window_start),
                match &l.meter {
                    None => "-".to_owned(),
                    Some(m) => format!("+{}", m.as_str()),
                },
                l.resets_at.unix().to_string(),
                l.limit.to_string(),
                l.amount.to_string(),
            ]);
        }
        let reply = self.run(0, now, args).await?;
        let Value::Array(items) = reply else {
            return Err(StoreError::corrupt("budget hold reply is not an array"));
        };
        match items.first().and_then(text).as_deref() {
            Some("held") => Ok(HoldOutcome::Held),
            Some("already") => Ok(HoldOutcome::AlreadyHeld),
            Some("noroom") => {
                let line = match items.get(1) {
                    Some(Value::Int(i)) => usize::try_from(*i).ok(),
                    _ => None,
                }
                .filter(|i| *i < lines.len())
                .ok_or_else(|| StoreError::corrupt("budget hold reply: bad line"))?;
                Ok(HoldOutcome::NoRoom {
                    line,
                    used: amount(items.get(2))?,
                })
            }
            _ => Err(StoreError::corrupt("unexpected budget hold reply")),
        }
    }

    async fn settle(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        // Units per meter, summed as BudgetLine::used_by sums them (saturating).
        let mut units: BTreeMap<&str, u64> = BTreeMap::new();
        for u in usage {
            let sum = units.entry(u.meter.as_str()).or_default();
            *sum = sum.saturating_add(u.units);
        }
        let mut args = vec![hold_id(key), charged.to_string(), units.len().to_string()];
        for (m, n) in units {
            args.extend([m.to_owned(), n.to_string()]);
        }
        match self.run(1, now, args).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            _ => Err(StoreError::corrupt("unexpected budget settle reply")),
        }
    }

    async fn release(&self, key: &ReservationId, now: Timestamp) -> Result<bool, StoreError> {
        match self.run(2, now, vec![hold_id(key)]).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            _ => Err(StoreError::corrupt("unexpected budget release reply")),
        }
    }

    async fn usage(
        &self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<CounterUsage, StoreError> {
        let reply = self
            .run(3, now, vec![counter_id(owner, meter, window_start)])
            .await?;
        let Value::Array(items) = reply else {
            return Err(StoreError::corrupt("budget usage reply is not an array"));
        };
        Ok(CounterUsage {
            used: amount(items.first())?,
            held: amount(items.get(1))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_and_hold_ids_are_unambiguous() {
        let t = Timestamp::from_unix(7);
        assert_eq!(counter_id("acme", None, t), "4:acme:-:7");
        assert_eq!(
            counter_id("acme", Some(&Meter::new("tokens")), t),
            "4:acme:6:tokens:7"
        );
        assert_ne!(
            counter_id("a:-", None, t),
            counter_id("a", Some(&Meter::new("-")), t)
        );
        let id = ReservationId {
            account: "a:b".into(),
            key: "c".into(),
        };
        assert_eq!(hold_id(&id), "3:a:b:c");
    }
}
