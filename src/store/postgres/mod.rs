//! The PostgreSQL backend (feature `postgres`).
//!
//! [`PostgresLedger`] and [`PostgresPlanStore`] run on a [`deadpool_postgres`] pool, so any
//! number of app instances can share one database. The pool replaces broken connections on
//! its own: after a restart of the server (or a terminated backend) the next operations get a
//! fresh connection, with no restart of the app. [`PostgresKeyStore`] keeps API key digests
//! and [`PostgresBudgetStore`] the budget counters of
//! [`BudgetedLedger`](crate::budget::BudgetedLedger), each with tables and a `migrate()` of
//! its own.
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
//! `CHECK (deposited + overdrawn = available + held + settled)` and non-negativity checks, so a bug would
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

mod batching;
mod budgets;
mod config;
mod keys;
mod ledger;
mod plan_store;
mod records;
mod rows;
mod schema;
#[cfg(test)]
mod tests;
mod transactions;

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
use futures_util::future::{try_join, try_join3, try_join4};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::account::AccountId;
use crate::credits::Credits;
use crate::error::{BoxError, LedgerError, StoreError};
use crate::ledger::{
    AccountBook, Adjusted, Adjustment, AllowanceUsage, Balance, Counter, Deposit, Direction,
    EntryKind, Journal, JournalEntry, JournalQuery, Ledger, OverEstimate, Parts, Record,
    ReservationId, ReservationKey, ReserveOutcome, ReserveRequest, Settlement, State, Usage,
    DEFAULT_RETENTION_SECS,
};
use crate::plan::{Meter, PlanId, PlanStore, Subscription, SubscriptionStatus, SyncMark};
use crate::time::Timestamp;
use crate::FastMap;

use self::batching::*;
use self::rows::*;
use self::schema::*;

pub use self::budgets::PostgresBudgetStore;
pub use self::config::{InvalidIdentifier, PostgresConfig};
pub use self::keys::PostgresKeyStore;
pub use self::ledger::{PostgresLedger, TransactionCounts};
pub use self::plan_store::PostgresPlanStore;

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
