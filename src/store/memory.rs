use crate::FastMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use async_trait::async_trait;

use crate::account::AccountId;
use crate::charge::Charge;
use crate::credits::Credits;
use crate::denial::Denial;
use crate::error::{LedgerError, StoreError};
use crate::in_process::{InProcessLedger, InProcessPlanStore};
use crate::ledger::{
    AccountBook, AllowanceUsage, Balance, Deposit, Hold, Ledger, OverEstimate, ReservationId,
    ReserveOutcome, ReserveRequest, Settlement, Usage, DEFAULT_RETENTION_SECS,
};
use crate::ledger::{
    Adjusted, Adjustment, Journal, JournalEntry, JournalLimits, JournalQuery, ResponseRecords,
};
use crate::plan::{Meter, PlanStore, Subscription, SyncMark};
use crate::store::records_memory::MemoryRecords;
use crate::time::Timestamp;

const SHARDS: usize = 16;

/// The in-memory ledger: one [`AccountBook`] per account, in sharded mutexes.
///
/// Clones share the same state. Every operation takes one shard lock for the duration of a
/// synchronous update and never across an `.await`, so operations on one account are
/// linearizable and can never overspend.
#[derive(Clone)]
pub struct MemoryLedger {
    shards: Arc<[Mutex<FastMap<AccountId, AccountBook>>; SHARDS]>,
    retention_secs: u64,
    journal: JournalLimits,
    records: MemoryRecords,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLedger")
            .field("retention_secs", &self.retention_secs)
            .finish_non_exhaustive()
    }
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        MemoryLedger {
            shards: Arc::new(std::array::from_fn(|_| Mutex::new(FastMap::default()))),
            retention_secs: DEFAULT_RETENTION_SECS,
            journal: JournalLimits::default(),
            records: MemoryRecords::default(),
        }
    }

    /// How long idempotency records are kept (default 7 days).
    pub fn with_retention(mut self, secs: u64) -> Self {
        self.retention_secs = secs;
        self
    }

    /// How much spend history each account keeps (default: 90 days, 1,000 entries). Set
    /// before the first operation: books already made keep the bound they were made with.
    pub fn with_journal(mut self, limits: JournalLimits) -> Self {
        self.journal = limits;
        self
    }

    fn shard(&self, account: &AccountId) -> MutexGuard<'_, FastMap<AccountId, AccountBook>> {
        let h = account.as_str().bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        // A panic while holding the lock cannot leave a book half-updated: every operation
        // validates before it mutates. So a poisoned lock is safe to keep using.
        self.shards[h % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn with<T>(&self, account: &AccountId, f: impl FnOnce(&mut AccountBook) -> T) -> T {
        let mut shard = self.shard(account);
        // A lookup first: `entry` would take (and drop) a reference to the account id on every
        // operation, a counter that every worker thread serving this account writes to.
        if let Some(book) = shard.get_mut(account) {
            return f(book);
        }
        let book = shard.entry(account.clone()).or_insert_with(|| {
            AccountBook::with_retention(self.retention_secs).with_journal(self.journal)
        });
        f(book)
    }

    /// Open reservations of an account (for tests and diagnostics).
    pub fn open_reservations(&self, account: &AccountId, now: Timestamp) -> usize {
        self.with(account, |b| {
            b.expire(now);
            b.open_reservations()
        })
    }
}

impl InProcessLedger for MemoryLedger {
    fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        self.with(&req.account, |b| b.reserve(req))
    }

    fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        self.with(&id.account, |b| b.settle(&id.key, usage, policy, now))
    }

    fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        self.with(&id.account, |b| b.release(&id.key, now))
    }

    fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        Ok(self.with(account, |b| b.balance(now)))
    }

    fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        Ok(self.with(account, |b| b.allowance_usage(meter, window_start, now)))
    }

    fn hold(
        &self,
        account: &AccountId,
        charges: &[Charge],
        now: Timestamp,
    ) -> Result<Result<Hold, Denial>, LedgerError> {
        self.with(account, |b| b.hold(charges, now))
    }

    fn settle_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        Ok(self.with(account, |b| {
            b.settle_hold(hold, charges, usage, policy, now)
        }))
    }

    fn release_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        self.with(account, |b| b.release_hold(hold, charges, now));
        Ok(())
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    fn in_process(&self) -> Option<&dyn InProcessLedger> {
        Some(self)
    }

    fn records(&self) -> Option<&dyn ResponseRecords> {
        Some(&self.records)
    }

    fn journal(&self) -> Option<&dyn Journal> {
        Some(self)
    }

    // Each async method is its synchronous twin (InProcessLedger), already answered.
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        InProcessLedger::reserve(self, req)
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        InProcessLedger::settle(self, id, usage, policy, now)
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        InProcessLedger::release(self, id, now)
    }

    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        self.with(account, |b| b.deposit(amount, key, now))
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        InProcessLedger::balance(self, account, now)
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        InProcessLedger::allowance_usage(self, account, meter, window_start, now)
    }
}

#[async_trait]
impl Journal for MemoryLedger {
    async fn entries(
        &self,
        account: &AccountId,
        query: &JournalQuery,
        now: Timestamp,
    ) -> Result<Vec<JournalEntry>, LedgerError> {
        Ok(self.with(account, |b| b.journal(query, now)))
    }

    async fn adjust(
        &self,
        account: &AccountId,
        adjustment: &Adjustment,
        now: Timestamp,
    ) -> Result<Adjusted, LedgerError> {
        self.with(account, |b| b.adjust(adjustment, now))
    }
}

/// The in-memory plan store. Clones share the same state.
#[derive(Clone, Default)]
pub struct MemoryPlanStore {
    subs: Arc<RwLock<FastMap<AccountId, Arc<Subscription>>>>,
}

impl fmt::Debug for MemoryPlanStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPlanStore").finish_non_exhaustive()
    }
}

impl MemoryPlanStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, account: &AccountId) -> Option<Arc<Subscription>> {
        self.subs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)
            .cloned()
    }

    /// Adds a subscription (builder style, for setup code).
    pub fn with(self, subscription: Subscription) -> Self {
        self.subs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(subscription.account.clone(), Arc::new(subscription));
        self
    }
}

#[async_trait]
impl PlanStore for MemoryPlanStore {
    async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError> {
        Ok(self.get(account).map(Arc::unwrap_or_clone))
    }

    async fn put_subscription(&self, subscription: Subscription) -> Result<(), StoreError> {
        self.subs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(subscription.account.clone(), Arc::new(subscription));
        Ok(())
    }

    /// Compares and writes under one write lock.
    async fn put_subscription_if(
        &self,
        subscription: Subscription,
        expected: Option<&SyncMark>,
    ) -> Result<bool, StoreError> {
        let mut subs = self.subs.write().unwrap_or_else(PoisonError::into_inner);
        let current = subs
            .get(&subscription.account)
            .and_then(|s| s.synced.as_ref());
        if current != expected {
            return Ok(false);
        }
        subs.insert(subscription.account.clone(), Arc::new(subscription));
        Ok(true)
    }

    fn in_process(&self) -> Option<&dyn InProcessPlanStore> {
        Some(self)
    }
}

impl InProcessPlanStore for MemoryPlanStore {
    fn lookup(&self, account: &AccountId) -> Option<Result<Option<Arc<Subscription>>, StoreError>> {
        Some(Ok(self.get(account)))
    }
}
