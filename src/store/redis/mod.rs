//! The Redis backend (feature `redis`).
//!
//! [`RedisLedger`] and [`RedisPlanStore`] let any number of app instances share one Redis;
//! [`RedisKeyStore`] keeps API key digests and [`RedisBudgetStore`] the budget counters of
//! [`BudgetedLedger`](crate::budget::BudgetedLedger) beside them.
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
//! - **Spend history.** Each script that moves credit appends its
//!   [`JournalEntry`] to the account's list `:j` in the same atomic step (numbers written
//!   with `%d`, strings JSON-encoded), trimmed to the configured
//!   [`JournalLimits`](crate::ledger::JournalLimits) by count and, against the ledger's
//!   `now`, by age.
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

mod budgets;
mod config;
mod keys;
mod ledger;
mod plan_store;
mod records;
mod scripts;

use self::config::Conn;
use self::scripts::*;

pub use self::budgets::RedisBudgetStore;
pub use self::config::RedisConfig;
pub use self::keys::RedisKeyStore;
pub use self::ledger::RedisLedger;
pub use self::plan_store::RedisPlanStore;

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
    Adjusted, Adjustment, AllowanceUsage, Balance, Deposit, Direction, EntryKind, Journal,
    JournalEntry, JournalQuery, Ledger, OverEstimate, Replay, Reservation, ReservationId,
    ReserveOutcome, ReserveRequest, Settlement, Shortfall, Usage, DEFAULT_RETENTION_SECS,
};
use crate::plan::{Meter, PlanStore, Subscription, SyncMark};
use crate::time::Timestamp;

const MAX_EXACT: u64 = Credits::MAX_EXACT.get();
/// Garbage-collection TTLs are never shorter than this many wall-clock seconds.
const MIN_GC_SECS: u64 = 86_400;

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
