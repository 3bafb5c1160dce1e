//! Backends for the [`Ledger`](crate::Ledger) and the [`PlanStore`](crate::plan::PlanStore).
//!
//! | backend | feature | for |
//! |---|---|---|
//! | [`MemoryLedger`], [`MemoryPlanStore`] | always | one process; the embedded default; tests |
//! | `RedisLedger`, `RedisPlanStore` | `redis` | several instances; one atomic Lua script per ledger operation; see the `redis` module |
//! | `PostgresLedger`, `PostgresPlanStore` | `postgres` | several instances; durable; row lock + the shared state machine in one transaction; an idempotent `migrate()`; see the `postgres` module |
//! | [`CachingPlanStore`] | always | a read-through cache with a TTL in front of any plan store |
//! | [`MemoryKeyStore`](crate::keys::MemoryKeyStore), `RedisKeyStore`, `PostgresKeyStore` | always, `redis`, `postgres` | API key digests for [`Keys`](crate::keys::Keys): many keys per account, rotated and revoked at run time |
//! | [`MemoryBudgetStore`](crate::budget::MemoryBudgetStore), `RedisBudgetStore`, `PostgresBudgetStore` | always, `redis`, `postgres` | budget counters for [`BudgetedLedger`](crate::budget::BudgetedLedger): holds on every level of a chain at once, shared by a fleet |
//! | [`LeasedLedger`] | always | leased credit in front of any shared ledger: requests paid in memory, zero overspend; see the [`lease`] module |
//!
//! Every backend keeps the semantics documented on [`Ledger`](crate::Ledger) exactly; one
//! conformance suite (`tests/conformance/`) runs the same assertions against each.

mod cache;
pub mod lease;
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod records_memory;
#[cfg(feature = "redis")]
pub mod redis;

pub use cache::CachingPlanStore;
pub use lease::{LeaseConfig, LeasedLedger, Parked};
pub use memory::{MemoryLedger, MemoryPlanStore};
#[cfg(feature = "postgres")]
pub use postgres::{
    PostgresBudgetStore, PostgresConfig, PostgresKeyStore, PostgresLedger, PostgresPlanStore,
    TransactionCounts,
};
#[cfg(feature = "redis")]
pub use redis::{RedisBudgetStore, RedisConfig, RedisKeyStore, RedisLedger, RedisPlanStore};
