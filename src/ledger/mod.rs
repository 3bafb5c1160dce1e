//! The [`Ledger`]: balances, allowances and two-phase reservations.
//!
//! The model follows double-entry ledgers that hold money correctly under concurrency
//! (TigerBeetle's pending transfers). Per account the ledger keeps three buckets of
//! [`Credits`]:
//!
//! - `available`: can be reserved;
//! - `held`: the sum of open reservations;
//! - `settled`: spent;
//! - `overdrawn`: owed, charged beyond the balance under [`OverEstimate::Overdraft`] (zero
//!   unless a settlement allowed an overdraft).
//!
//! and the invariant `deposited + overdrawn = available + held + settled` holds after every
//! operation. While anything is owed nothing is available: credit that comes back (a deposit,
//! a credit adjustment, a released or expired hold, the unused part of a settled one) repays
//! the overdraft first. So the balance, signed, is `available - overdrawn`, never below minus
//! the largest overdraft allowed.
//! Allowance usage per meter and period is tracked the same way (`used` and `held` units).
//!
//! # Operations
//!
//! - [`reserve`](Ledger::reserve) an estimate: allowance first, then credit. Refused (a
//!   [`ReserveOutcome::Denied`], not an error) when the allowance is used up on a plan without
//!   overage, or the credit needed exceeds `available`. Idempotent on the key: a retry of an
//!   open reservation answers [`Replay::InProgress`], of a settled one [`Replay::Completed`]
//!   (charge nothing again); a retry after a release reserves afresh; the same key with another
//!   fingerprint is [`LedgerError::KeyConflict`].
//! - [`settle`](Ledger::settle) what was actually used, once. Less than held: the rest goes
//!   back. More than held: see [`OverEstimate`]; a shortfall is reported, never silent, and the
//!   balance never goes below zero, or below minus the limit of an
//!   [`Overdraft`](OverEstimate::Overdraft).
//! - [`release`](Ledger::release): give the hold back (idempotent). Reservations also expire on
//!   their own: every operation on an account first ends that account's expired holds, so no
//!   sweeper is needed for correctness. What an expired hold becomes is the reservation's
//!   [`OnExpiry`]: the metering layer's holds ([`OnExpiry::Charge`]) are **charged** their
//!   estimate, because the handler ran on the reservation's reply and its settlement did not
//!   land in time (the instance died, the store was down, a stream stalled past its hold);
//!   a late settlement then charges the actual usage instead, and a late release (the layer
//!   learned the handler never started) gives it back. Holds taken ahead of work, like
//!   leases, are [`OnExpiry::Release`]: given back.
//! - [`deposit`](Ledger::deposit): idempotent top-up.
//!
//! # Spend history
//!
//! A ledger may keep a [`Journal`] ([`Ledger::journal`]): one [`JournalEntry`] per deposit,
//! settlement, release, expiry, shortfall and [adjustment](Adjustment), readable per account
//! and time range, newest first, and bounded by [`JournalLimits`] (a retention time and a
//! number of entries per account). Entries that move no credit (a request paid entirely from
//! its allowance) are not written. An operator's [`Journal::adjust`] credits or debits an
//! account once per key, with a reason, and lands in the journal like any other entry.
//!
//! ```
//! use tower_402::{AccountId, Credits, Ledger, MemoryLedger, Timestamp};
//! use tower_402::ledger::{Adjustment, Direction, EntryKind, JournalQuery};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ledger = MemoryLedger::new();
//! let acme = AccountId::new("acme");
//! let now = Timestamp::from_unix(1_000);
//! ledger.deposit(&acme, Credits::new(50), "topup-1", now).await.unwrap();
//! let journal = ledger.journal().unwrap();
//! let goodwill = Adjustment {
//!     key: "ticket-7".into(),
//!     direction: Direction::Credit,
//!     credits: Credits::new(5),
//!     reason: "outage on the 3rd".into(),
//! };
//! assert!(journal.adjust(&acme, &goodwill, now).await.unwrap().applied);
//! assert!(!journal.adjust(&acme, &goodwill, now).await.unwrap().applied, "once per key");
//! let entries = journal.entries(&acme, &JournalQuery::default(), now).await.unwrap();
//! assert_eq!(entries[0].kind, EntryKind::Adjustment); // newest first
//! assert_eq!(entries[1].kind, EntryKind::Deposit);
//! assert_eq!(entries[0].available_after, Credits::new(55));
//! # }
//! ```
//!
//! Amounts above [`Credits::MAX_EXACT`](crate::Credits::MAX_EXACT) are refused with
//! [`LedgerError::AmountOutOfRange`] on every backend.
//!
//! # Async traits, and the in-process fast path
//!
//! The traits use `async-trait`: one boxed future per call, which keeps `dyn Ledger`
//! possible (the layers store `Arc<dyn Ledger>`, so one layer type serves every backend) and
//! costs nothing that matters next to a network round trip. For stores that need no I/O the
//! boxing would be most of the cost, so each store trait has one provided method,
//! `in_process()`, that such stores implement to expose a synchronous twin; see
//! [`in_process`](crate::in_process). Native `async fn` in traits would avoid the boxes too,
//! but their futures cannot be named or boxed behind `dyn`, which is why they are not used.
//!
//! # Implementing your own
//!
//! The simplest correct ledger wraps [`AccountBook`], the pure state machine the in-memory
//! and PostgreSQL backends share: load the account's book, apply the operation, store it, all
//! under one lock or transaction.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use async_trait::async_trait;
//! use tower_402::{AccountId, Credits, LedgerError, Timestamp};
//! use tower_402::ledger::*;
//!
//! #[derive(Default)]
//! struct MyLedger(Mutex<HashMap<AccountId, AccountBook>>);
//!
//! impl MyLedger {
//!     // The lock is taken and released inside one synchronous call: never across an await.
//!     fn with<T>(&self, account: &AccountId, f: impl FnOnce(&mut AccountBook) -> T) -> T {
//!         let mut books = self.0.lock().unwrap();
//!         f(books.entry(account.clone()).or_default())
//!     }
//! }
//!
//! #[async_trait]
//! impl Ledger for MyLedger {
//!     async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
//!         self.with(&req.account, |b| b.reserve(req))
//!     }
//!     async fn settle(&self, id: &ReservationId, usage: &[Usage], policy: OverEstimate,
//!                     now: Timestamp) -> Result<Settlement, LedgerError> {
//!         self.with(&id.account, |b| b.settle(&id.key, usage, policy, now))
//!     }
//!     async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
//!         self.with(&id.account, |b| b.release(&id.key, now))
//!     }
//!     async fn deposit(&self, account: &AccountId, amount: Credits, key: &str,
//!                      now: Timestamp) -> Result<Deposit, LedgerError> {
//!         self.with(account, |b| b.deposit(amount, key, now))
//!     }
//!     async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
//!         Ok(self.with(account, |b| b.balance(now)))
//!     }
//!     async fn allowance_usage(&self, account: &AccountId, meter: &tower_402::plan::Meter,
//!                              window_start: Timestamp, now: Timestamp)
//!                              -> Result<AllowanceUsage, LedgerError> {
//!         Ok(self.with(account, |b| b.allowance_usage(meter, window_start, now)))
//!     }
//! }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ledger = MyLedger::default();
//! let acme = AccountId::new("acme");
//! ledger.deposit(&acme, Credits::new(10), "topup-1", Timestamp::EPOCH).await.unwrap();
//! assert_eq!(ledger.balance(&acme, Timestamp::EPOCH).await.unwrap().available, Credits::new(10));
//! # }
//! ```

mod book;
mod journal;
mod per_charge;
mod records;
mod types;
pub(crate) use types::one_charge_per_meter;

pub use book::{AccountBook, DEFAULT_RETENTION_SECS};
pub use journal::{
    Adjusted, Adjustment, Direction, EntryKind, Journal, JournalEntry, JournalLimits, JournalQuery,
    DEFAULT_JOURNAL_MAX_ENTRIES, DEFAULT_JOURNAL_RETENTION_SECS,
};
pub use per_charge::PerCharge;
pub use records::{
    BodyDigest, RecordLimits, RecordedResponse, Recording, ResponseRecord, ResponseRecords,
};

pub use crate::charge::Charge;
#[cfg(feature = "postgres")]
pub(crate) use book::{Counter, Parts, Record, State};
pub use types::{
    AllowanceUsage, Balance, Deposit, Hold, OnExpiry, OverEstimate, Replay, Reservation,
    ReservationId, ReservationKey, ReserveOutcome, ReserveRequest, Settlement, Shortfall, Usage,
};

use std::sync::Arc;

use async_trait::async_trait;

use crate::account::AccountId;
use crate::credits::Credits;
use crate::error::LedgerError;
use crate::in_process::{InProcessLedger, LocalHolds};
use crate::plan::Meter;
use crate::time::Timestamp;

/// Balances, allowances and reservations. See the [module docs](self) for the semantics every
/// implementation must keep.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Holds an estimate: allowance first, then credit.
    async fn reserve(&self, request: &ReserveRequest) -> Result<ReserveOutcome, LedgerError>;

    /// Charges what was actually used and ends the reservation.
    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError>;

    /// Gives the hold back. Releasing a released reservation, or one that expired and was given
    /// back, is a no-op; releasing one that was charged when it expired
    /// ([`OnExpiry::Charge`]) gives that charge back; releasing a settled one is
    /// [`LedgerError::AlreadySettled`].
    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError>;

    /// Adds credit, once per key.
    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError>;

    /// The account's buckets (all zero for an account never seen).
    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError>;

    /// Units of `meter` used and held in the allowance window starting at `window_start`.
    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError>;

    /// The ledger's [in-process fast path](crate::in_process), if it needs no I/O (the
    /// in-memory one): `None` (the default) has the layers call the async methods.
    fn in_process(&self) -> Option<&dyn InProcessLedger> {
        None
    }

    /// The holds this ledger can make [in this process](crate::in_process#sometimes-in-process-local-holds)
    /// although it is shared (a [`LeasedLedger`](crate::store::LeasedLedger)'s leases):
    /// `None` (the default) has every request reserved through [`reserve`](Self::reserve).
    fn local_holds(&self) -> Option<&dyn LocalHolds> {
        None
    }

    /// Where this ledger keeps [recorded responses](ResponseRecords), in its own backend, so
    /// an idempotent retry gets the first answer. `None` (the default): a retry of a settled
    /// request is refused with `409 IDEMPOTENCY_RESPONSE_NOT_RECORDED`, never run again.
    fn records(&self) -> Option<&dyn ResponseRecords> {
        None
    }

    /// The ledger's [spend history](Journal): every deposit, settlement, release, expiry,
    /// shortfall and adjustment per account, written in the same step as the operation.
    /// `None` (the default) for a ledger that keeps none.
    fn journal(&self) -> Option<&dyn Journal> {
        None
    }
}

#[async_trait]
impl<T: Ledger + ?Sized> Ledger for Arc<T> {
    async fn reserve(&self, request: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        (**self).reserve(request).await
    }
    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        (**self).settle(id, usage, policy, now).await
    }
    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        (**self).release(id, now).await
    }
    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        (**self).deposit(account, amount, key, now).await
    }
    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        (**self).balance(account, now).await
    }
    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        (**self)
            .allowance_usage(account, meter, window_start, now)
            .await
    }
    fn in_process(&self) -> Option<&dyn InProcessLedger> {
        (**self).in_process()
    }
    fn local_holds(&self) -> Option<&dyn LocalHolds> {
        (**self).local_holds()
    }
    fn records(&self) -> Option<&dyn ResponseRecords> {
        (**self).records()
    }
    fn journal(&self) -> Option<&dyn Journal> {
        (**self).journal()
    }
}
