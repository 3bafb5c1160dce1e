//! The in-process fast path: stores that answer without I/O, and how the layers use them.
//!
//! Every store trait is async ([`Ledger`](crate::Ledger), [`PlanStore`](crate::plan::PlanStore),
//! [`IdentityResolver`](crate::IdentityResolver)), which costs one boxed future per call: nothing
//! next to a network round trip, most of the cost for a store that lives in the process. So
//! each trait has one provided method, `in_process()`, returning `None` by default; a store
//! that needs no I/O returns its synchronous twin from this module instead:
//!
//! | store trait | `in_process()` returns |
//! |---|---|
//! | [`Ledger`](crate::Ledger) | [`InProcessLedger`] |
//! | [`PlanStore`](crate::plan::PlanStore) | [`InProcessPlanStore`] |
//! | [`IdentityResolver`](crate::IdentityResolver) | [`InProcessResolver`] |
//!
//! The twin must apply each operation exactly as the async method would. With all three in
//! process (the in-memory defaults), the gate's check and the metering layer's hold and
//! settlement run inline in `call` and in the response body: no future is allocated, nothing
//! is spawned.
//!
//! # Holds without records
//!
//! A request without an `Idempotency-Key` on an in-process ledger needs no keyed reservation
//! record: the ledger dies with the process, so there is no other instance to coordinate with,
//! no retry to recognize and nothing to expire. [`InProcessLedger::hold`] moves the estimate
//! into `held` and hands the [`Hold`] to the request's guard, which settles or releases it
//! exactly once on every exit path (end of body, error, client gone, cancellation). A request
//! with an `Idempotency-Key`, and every request on a shared ledger, reserves a keyed record as
//! before.
//!
//! # Sometimes in process: local holds
//!
//! A shared ledger may still answer some requests without I/O: a
//! [`LeasedLedger`](crate::store::LeasedLedger) holds a request against credit it already
//! leased from the shared ledger, in this process. Such a ledger returns [`LocalHolds`] from
//! [`Ledger::local_holds`](crate::Ledger::local_holds). For a request without an
//! `Idempotency-Key` and without a body to read, the metering layer first asks
//! [`LocalHolds::try_hold`]; a hold it gets is settled the same way, inline when
//! [`LocalHolds::try_settle_hold`] can and through the async
//! [`LocalHolds::settle_hold`] when it cannot. A `None` from `try_hold` (no lease, not enough
//! leased, an allowance to count) sends the request down the async path, a keyed reservation,
//! exactly as without the trait (as [`InProcessPlanStore::lookup`] answers `None` on a cache
//! miss).

use std::sync::Arc;

use crate::account::AccountId;
use crate::charge::Charge;
use crate::denial::Denial;
use crate::error::{LedgerError, StoreError};
use crate::ledger::{
    AllowanceUsage, Balance, Hold, OverEstimate, ReservationId, ReserveOutcome, ReserveRequest,
    Settlement, Usage,
};
use crate::plan::{Meter, Subscription};
use crate::time::Timestamp;

/// The synchronous twin of a [`Ledger`](crate::Ledger) that needs no I/O. See the
/// [module docs](self).
pub trait InProcessLedger: Send + Sync {
    /// [`Ledger::reserve`](crate::Ledger::reserve), synchronously.
    fn reserve(&self, request: &ReserveRequest) -> Result<ReserveOutcome, LedgerError>;
    /// [`Ledger::settle`](crate::Ledger::settle), synchronously.
    fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError>;
    /// [`Ledger::release`](crate::Ledger::release), synchronously.
    fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError>;
    /// [`Ledger::balance`](crate::Ledger::balance), synchronously.
    fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError>;
    /// [`Ledger::allowance_usage`](crate::Ledger::allowance_usage), synchronously.
    fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError>;
    /// Holds `charges` for one request without a keyed record (see the
    /// [module docs](self#holds-without-records)): `Ok(Err(denial))` when the allowance or
    /// credit does not cover them, as [`reserve`](Self::reserve) would refuse.
    fn hold(
        &self,
        account: &AccountId,
        charges: &[Charge],
        now: Timestamp,
    ) -> Result<Result<Hold, Denial>, LedgerError>;
    /// Charges `usage` against a [`hold`](Self::hold) and ends it; called exactly once per
    /// hold (or [`release_hold`](Self::release_hold) instead), with the same charges.
    fn settle_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError>;
    /// Gives a [`hold`](Self::hold) back.
    fn release_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        now: Timestamp,
    ) -> Result<(), LedgerError>;
}

/// Holds a shared ledger can make and settle in this process (see the
/// [module docs](self#sometimes-in-process-local-holds)).
///
/// Each hold [`try_hold`](Self::try_hold) makes is ended exactly once, by
/// [`try_settle_hold`](Self::try_settle_hold) answering `Some`, by
/// [`settle_hold`](Self::settle_hold), or by [`release_hold`](Self::release_hold), always with
/// the same account and charges it was made with.
#[async_trait::async_trait]
pub trait LocalHolds: Send + Sync {
    /// Holds `charges` for one request without I/O and without a keyed record, if this
    /// ledger can; `None` when the request must be reserved through
    /// [`Ledger::reserve`](crate::Ledger::reserve) instead. Never refuses: a request it cannot
    /// pay here is for the async path to pay or refuse.
    fn try_hold(&self, account: &AccountId, charges: &[Charge], now: Timestamp) -> Option<Hold>;
    /// Charges `usage` against `hold` and ends it, without I/O, if that needs none; `None`
    /// (nothing done) when it takes the shared ledger: then call
    /// [`settle_hold`](Self::settle_hold).
    fn try_settle_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Option<Settlement>;
    /// Charges `usage` against `hold` and ends it, with the shared ledger where the hold does
    /// not cover it.
    async fn settle_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Settlement;
    /// Gives `hold` back, without I/O.
    fn release_hold(&self, account: &AccountId, hold: &Hold, now: Timestamp);
}

/// The synchronous twin of a [`PlanStore`](crate::plan::PlanStore) that needs no I/O. See the
/// [module docs](self).
pub trait InProcessPlanStore: Send + Sync {
    /// [`PlanStore::subscription`](crate::plan::PlanStore::subscription), synchronously, shared
    /// rather than copied; `None` when this particular answer needs I/O after all (a cache
    /// miss in [`CachingPlanStore`](crate::store::CachingPlanStore)), and the gate calls the
    /// async method.
    fn lookup(&self, account: &AccountId) -> Option<Result<Option<Arc<Subscription>>, StoreError>>;
}

/// The synchronous twin of an [`IdentityResolver`](crate::IdentityResolver) that needs no I/O.
/// See the [module docs](self).
pub trait InProcessResolver: Send + Sync {
    /// [`IdentityResolver::resolve`](crate::IdentityResolver::resolve), synchronously, on the
    /// key as read from the request (already validated like an [`ApiKey`](crate::ApiKey)).
    fn resolve(&self, key: &str) -> Result<Option<AccountId>, StoreError>;
}
