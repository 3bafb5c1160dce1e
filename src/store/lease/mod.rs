//! Leased credit: requests on a shared ledger paid at memory speed, with zero overspend.
//!
//! [`LeasedLedger`] composes over any [`Ledger`] (as [`CachingPlanStore`](super::CachingPlanStore)
//! composes over any plan store). Per active account each instance holds a **lease**: one
//! ordinary reservation in the shared ledger, under a key of its own (`lease:<instance>:<n>`,
//! on the meter `tower402.lease`). A request without an `Idempotency-Key` whose charges are
//! paid from credit is held against the lease in this process, with no network round trip,
//! and settled there. Through the metering layer such a request is held as the in-memory
//! ledger holds one: by [`LocalHolds`], with no keyed record and no future, settled inline
//! unless its usage goes beyond what the hold and the lease pay (then the rest is charged in
//! the shared ledger). A keyed [`reserve`](Ledger::reserve) of the same request, as your
//! own code may make, is held against the lease under its key. In the background the lease is refilled ahead of need (a new one taken
//! when what is left falls below half the last one), settled back in batches (a lease is
//! settled with what was spent from it when it is used up, after half its TTL, when the
//! account is idle, and on [`shutdown`](LeasedLedger::shutdown)), and returned when idle.
//!
//! # Zero overspend
//!
//! Credit served from a lease was held for this instance by the shared ledger, so no other
//! instance can spend it: the fleet never serves more than the account holds. A lease is
//! settled at the latest a quarter of its TTL before it expires; a request still in flight
//! then has its estimate charged with the lease, and whatever of it is not spent is refunded
//! when the account is idle (a deposit under `lease-refund:<instance>:<n>`). An instance that
//! dies mid-lease loses nothing of the account's: its lease is a hold that expires back within
//! the TTL ([`LeaseConfig::ttl_secs`]). What it had served from the lease but not yet settled
//! is not charged (as with any backend, a request whose settlement never ran is not charged):
//! the provider, never the account, bears the loss, bounded by one lease.
//!
//! # Exactness
//!
//! - Size: a lease is sized to the account's rate (credits spent per second over the last
//!   lease, times half the TTL), between [`min_lease`](LeaseConfig::min_lease) and
//!   [`max_lease`](LeaseConfig::max_lease), and never more than
//!   [`share_percent`](LeaseConfig::share_percent) of the account's available credit.
//! - Small balances: below [`threshold`](LeaseConfig::threshold) available, no lease is
//!   taken; requests are direct reservations in the shared ledger, exactly as without leasing.
//! - A request the lease cannot pay is a direct reservation. If the shared ledger refuses it
//!   for credit, this instance first gives its own leases of the account back and retries;
//!   if credit is still parked (held) elsewhere, the request waits up to
//!   [`recall_wait`](LeaseConfig::recall_wait) for it to be spent or given back before its
//!   402. So a 402 means the credit is gone, or parked by an instance that died.
//!
//! # Idempotency keys, allowances, recorded responses
//!
//! - A request with an `Idempotency-Key` (`idempotent` in the [`ReserveRequest`]) goes
//!   direct: its keyed reservation lives in the shared ledger, so a retry on any instance is
//!   recognized (`Replayed`), conflicts are detected, and it is charged once.
//! - A request with an allowance on any meter (or a meter without overage) goes direct: the
//!   allowance counters are the shared ledger's, so the allowance is never overspent either.
//! - [`records`](Ledger::records) are the inner ledger's: recorded responses of keyed
//!   requests live in the shared backend, untouched.
//!
//! # Balance reads
//!
//! [`balance`](Ledger::balance) is the shared ledger's: credit parked in leases (this
//! instance's and every other's) is in `held`, not `available`, and credit spent from a lease
//! moves to `settled` when the lease is settled. `deposited + overdrawn = available + held + settled`
//! holds throughout. [`parked`](LeasedLedger::parked) shows this instance's share.
//!
//! An account that goes into debt ([`OverEstimate::Overdraft`]) while an instance holds a
//! lease of it is still served from that lease's free credit: it was held, so paid for,
//! before the debt arose. What the lease does not spend comes back when it is settled and
//! repays the debt first; nothing new is leased while nothing is available.
//!
//! # Example
//!
//! ```
//! use tower_402::ledger::{ReserveOutcome, ReserveRequest, Usage};
//! use tower_402::store::{LeaseConfig, LeasedLedger};
//! use tower_402::{Credits, Ledger, ManualClock, MemoryLedger, Timestamp};
//! # use tower_402::decision::Cost;
//! # use tower_402::plan::Plan;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_402::LedgerError> {
//! let shared = MemoryLedger::new();
//! shared.deposit(&"acme".into(), Credits::new(10_000), "top-up", Timestamp::EPOCH).await?;
//! let clock = ManualClock::new(Timestamp::EPOCH);
//! let ledger = LeasedLedger::with_clock(shared.clone(), LeaseConfig::new().background(false), clock);
//! ledger.tick().await; // nothing to do yet
//! let charge = Cost::new("requests", 1, Credits::new(1)).charge(&Plan::new("p", "P", 1).overage(true), Timestamp::EPOCH);
//! let request = |key: &str| ReserveRequest {
//!     account: "acme".into(), key: key.into(), fingerprint: 0,
//!     charges: vec![charge.clone()].into(), ttl_secs: 60, idempotent: false,
//!     on_expiry: Default::default(), attempt: 0, now: Timestamp::EPOCH,
//! };
//! // No lease yet: a direct reservation; the miss asks for a lease at the next tick.
//! assert!(matches!(ledger.reserve(&request("r1")).await?, ReserveOutcome::Reserved(_)));
//! ledger.tick().await;
//! assert!(ledger.parked(&"acme".into()).leased > Credits::ZERO);
//! // Now held and settled in this process.
//! ledger.reserve(&request("r2")).await?;
//! let id = request("r2").id();
//! ledger.settle(&id, &[Usage::new("requests", 1)], Default::default(), Timestamp::EPOCH).await?;
//! ledger.shutdown().await; // everything settled and given back
//! # ledger.release(&request("r1").id(), Timestamp::EPOCH).await?;
//! let b = shared.balance(&"acme".into(), Timestamp::EPOCH).await?;
//! assert_eq!((b.available.get(), b.held.get(), b.settled.get()), (9_999, 0, 1));
//! # Ok(())
//! # }
//! ```

mod config;
#[cfg(test)]
mod tests;

pub use config::LeaseConfig;

use std::collections::VecDeque;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use async_trait::async_trait;

use crate::account::AccountId;
use crate::charge::Charge;
use crate::credits::Credits;
use crate::denial::Denial;
use crate::error::LedgerError;
use crate::in_process::LocalHolds;
use crate::ledger::Hold;
use crate::ledger::{
    AllowanceUsage, Balance, Deposit, Ledger, OnExpiry, OverEstimate, PerCharge, Replay,
    Reservation, ReservationId, ReservationKey, ReserveOutcome, ReserveRequest, ResponseRecords,
    Settlement, Shortfall, Usage,
};
use crate::plan::Meter;
use crate::time::{Clock, SystemClock, Timestamp};
use crate::FastMap;

/// The meter a lease's reservation is made on: one unit per credit.
pub const LEASE_METER: &str = "tower402.lease";

/// One lease: a reservation in the shared ledger.
#[derive(Debug)]
struct Lease {
    id: ReservationId,
    amount: Credits,
    taken_at: Timestamp,
}

/// A request held against this instance's leases.
struct LocalHold {
    credits: Credits,
    charges: Arc<[Charge]>,
}

/// What [`LeasedLedger::take_local`] came to.
enum Taken {
    /// Held; what the account has left, leased here or shared.
    Held { available_after: Credits },
    /// The leases cannot pay it.
    Short,
    /// A keyed hold under this key is in flight.
    InUse,
}

/// What settling a hold in this process came to (see `LeasedLedger::settle_in`).
struct LocalSettled {
    /// How many charges the request had.
    meters: usize,
    charged: Credits,
    /// Not paid by the hold nor the lease.
    rest: Credits,
    shared_available: Credits,
    available: Credits,
    held: Credits,
    /// A maintenance run is to be scheduled.
    schedule: bool,
}

impl LocalSettled {
    fn settlement(&self, shortfall: Credits) -> Settlement {
        let available_after = self
            .shared_available
            .checked_add(self.available)
            .unwrap_or(self.available);
        Settlement {
            charged: self.charged,
            allowance_units: (0..self.meters).map(|_| 0).collect::<PerCharge<u64>>(),
            shortfall: Shortfall {
                credits: shortfall,
                units: Vec::new(),
            },
            available_after,
            unspent_after: available_after
                .checked_add(self.held)
                .unwrap_or(available_after),
            allowance_used_after: (0..self.meters).map(|_| None).collect(),
        }
    }
}

/// One account's leases in this process.
///
/// Invariant: `available + held + spent = Σ lease amounts + prepaid`, and `spent` and
/// `prepaid` are never both above zero.
struct Local {
    leases: VecDeque<Lease>,
    /// Leased, not held, not spent: what requests may take.
    available: Credits,
    /// Held by requests in flight.
    held: Credits,
    /// Spent by requests, not yet settled with a lease.
    spent: Credits,
    /// Settled with a lease ahead of being spent (a lease settled with requests in flight):
    /// paid for, refunded if not spent.
    prepaid: Credits,
    holds: FastMap<ReservationKey, LocalHold>,
    last_active: Timestamp,
    /// Credits asked for by requests a lease may pay since `window_start` (served from the
    /// lease or not), for the rate.
    window_start: Timestamp,
    window_spent: u64,
    /// The last lease's size.
    size: Credits,
    /// A background maintenance run is scheduled.
    scheduled: bool,
    /// No refill before this (after a refusal or a balance below the threshold).
    next_refill: Timestamp,
    /// The shared ledger's `available`, as last seen.
    shared_available: Credits,
}

impl Local {
    fn new(now: Timestamp) -> Self {
        Local {
            leases: VecDeque::new(),
            available: Credits::ZERO,
            held: Credits::ZERO,
            spent: Credits::ZERO,
            prepaid: Credits::ZERO,
            holds: FastMap::default(),
            last_active: now,
            window_start: now,
            window_spent: 0,
            size: Credits::ZERO,
            scheduled: false,
            next_refill: Timestamp::EPOCH,
            shared_available: Credits::ZERO,
        }
    }

    fn leased(&self) -> Credits {
        self.leases
            .iter()
            .fold(Credits::ZERO, |s, l| s.checked_add(l.amount).unwrap_or(s))
    }

    /// Whether requests may be held against the leases at `now`: the oldest is not due to be
    /// settled (a late maintenance run must not leave requests on a hold about to lapse).
    fn usable(&self, now: Timestamp, config: &LeaseConfig) -> bool {
        self.leases
            .front()
            .is_some_and(|l| now < l.taken_at.plus_secs(config.settle_by()))
    }

    /// A request's hold of `credits`, given back unspent.
    fn give_back(&mut self, credits: Credits, now: Timestamp) {
        self.held = self.held.saturating_sub(credits);
        self.available = self
            .available
            .checked_add(credits)
            .unwrap_or(self.available);
        self.last_active = self.last_active.max(now);
    }

    /// What was spent moves to `spent`, or uses up `prepaid` first.
    fn spend(&mut self, credits: Credits) {
        let from_prepaid = credits.min(self.prepaid);
        self.prepaid = self.prepaid.saturating_sub(from_prepaid);
        let rest = credits.saturating_sub(from_prepaid);
        self.spent = self.spent.checked_add(rest).unwrap_or(self.spent);
    }

    /// Where a refill is due: what is left is below half the last lease.
    fn low(&self, config: &LeaseConfig) -> bool {
        let size = if self.size.is_zero() {
            config.min_lease
        } else {
            self.size
        };
        self.available.get() < size.get().div_ceil(2)
    }

    fn idle(&self, now: Timestamp, config: &LeaseConfig) -> bool {
        now >= self.last_active.plus_secs(config.idle_secs)
    }

    /// Whether maintenance has anything to do at `now`.
    fn due(&self, now: Timestamp, config: &LeaseConfig) -> bool {
        let lease_due = self.leases.front().is_some_and(|l| {
            self.spent >= l.amount || now >= l.taken_at.plus_secs(config.renew_after())
        });
        lease_due || (self.low(config) && now >= self.next_refill)
    }

    /// Takes the settlements due at `now` out of the local state: each lease and the
    /// credits to charge with it.
    fn plan(&mut self, now: Timestamp, config: &LeaseConfig, mode: Mode) -> Plan {
        let idle = self.idle(now, config) && self.held.is_zero();
        let returning = mode != Mode::Normal || idle;
        let forced = mode == Mode::Shutdown;
        let mut plan = Plan::default();
        while let Some(lease) = self.leases.front() {
            let amount = lease.amount;
            let exhausted = self.spent >= amount;
            let late = now >= lease.taken_at.plus_secs(config.settle_by());
            let renew = now >= lease.taken_at.plus_secs(config.renew_after());
            // Giving back `amount - spent` must not take credit that requests hold.
            let unspent = amount.saturating_sub(self.spent.min(amount));
            let covered = self.available >= unspent;
            if !(exhausted || late || forced || ((renew || returning) && covered)) {
                break;
            }
            // Charge what was spent, or more if requests in flight hold some of it
            // (prepaid, refunded if not spent).
            let charge = amount.min(self.spent.max(amount.saturating_sub(self.available)));
            self.available = self.available.saturating_sub(amount.saturating_sub(charge));
            let from_spent = charge.min(self.spent);
            self.spent = self.spent.saturating_sub(from_spent);
            self.prepaid = self
                .prepaid
                .checked_add(charge.saturating_sub(from_spent))
                .unwrap_or(self.prepaid);
            let Some(lease) = self.leases.pop_front() else {
                break;
            };
            crate::observe::leased(Credits::ZERO, lease.amount);
            plan.settle.push((lease, charge));
        }
        if self.leases.is_empty() && !self.prepaid.is_zero() && (returning || forced) {
            // No lease left: every local credit is prepaid; give back what nothing holds.
            let refund = self.available.min(self.prepaid);
            self.available = self.available.saturating_sub(refund);
            self.prepaid = self.prepaid.saturating_sub(refund);
            plan.refund = refund;
        }
        plan.refill = mode == Mode::Normal
            && !returning
            && !self.idle(now, config)
            && now >= self.next_refill
            && self.low(config);
        if plan.refill {
            let elapsed = self.window_start.secs_until(now).max(1);
            let rate = self.window_spent / elapsed;
            let want = rate.saturating_mul(config.renew_after().max(1));
            plan.size = Credits::new(want.clamp(config.min_lease.get(), config.max_lease.get()));
            self.window_start = now;
            self.window_spent = 0;
            // A refill that fails or is refused holds the next off for a second
            // (`Shared::hold_off`); one that lands may be followed at once by the next, so a
            // busy account is not left on direct reservations between whole seconds.
        }
        plan
    }

    fn is_empty(&self) -> bool {
        self.leases.is_empty()
            && self.holds.is_empty()
            && self.held.is_zero()
            && self.available.is_zero()
            && self.prepaid.is_zero()
            && self.spent.is_zero()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Refill and settle what is due.
    Normal,
    /// Give back every lease that nothing in flight holds (a recall).
    Return,
    /// Give back everything.
    Shutdown,
}

#[derive(Default)]
struct Plan {
    settle: Vec<(Lease, Credits)>,
    refund: Credits,
    refill: bool,
    size: Credits,
}

/// This instance's leases of one account, as [`LeasedLedger::parked`] reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Parked {
    /// Credits held for this instance by its open leases in the shared ledger.
    pub leased: Credits,
    /// Of that, free for requests.
    pub free: Credits,
    /// Held by requests in flight.
    pub in_flight: Credits,
    /// Spent by requests, to be settled with the leases.
    pub unsettled: Credits,
    /// Open leases.
    pub leases: usize,
}

struct Shared<L, C> {
    inner: L,
    clock: C,
    config: LeaseConfig,
    /// Unique to this instance: lease keys of different instances never collide.
    instance: String,
    seq: AtomicU64,
    accounts: Mutex<FastMap<AccountId, Local>>,
    /// One maintenance run at a time, so a shutdown waits for the one under way.
    maintenance: tokio::sync::Mutex<()>,
}

/// A [`Ledger`] that serves requests from leases of credit held in an inner, shared ledger.
/// See the [module docs](self). Clones share the leases.
pub struct LeasedLedger<L, C = SystemClock> {
    shared: Arc<Shared<L, C>>,
}

impl<L, C> Clone for LeasedLedger<L, C> {
    fn clone(&self) -> Self {
        LeasedLedger {
            shared: self.shared.clone(),
        }
    }
}

impl<L: fmt::Debug, C> fmt::Debug for LeasedLedger<L, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeasedLedger")
            .field("inner", &self.shared.inner)
            .field("config", &self.shared.config)
            .field("instance", &self.shared.instance)
            .finish_non_exhaustive()
    }
}

impl<L: Ledger> LeasedLedger<L> {
    /// Leases from `inner`, timed by the wall clock.
    pub fn new(inner: L, config: LeaseConfig) -> Self {
        LeasedLedger::with_clock(inner, config, SystemClock)
    }
}

impl<L: Ledger, C: Clock> LeasedLedger<L, C> {
    /// Leases from `inner`, timed by `clock` (lease ages, idleness, and the time passed to
    /// the inner ledger by background work).
    pub fn with_clock(inner: L, config: LeaseConfig, clock: C) -> Self {
        let instance = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), Instant::now()));
        LeasedLedger {
            shared: Arc::new(Shared {
                inner,
                clock,
                config,
                instance: format!("{instance:016x}"),
                seq: AtomicU64::new(0),
                accounts: Mutex::new(FastMap::default()),
                maintenance: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The wrapped ledger.
    pub fn get_ref(&self) -> &L {
        &self.shared.inner
    }

    /// This instance's leases of `account`.
    pub fn parked(&self, account: &AccountId) -> Parked {
        let accounts = self.shared.lock();
        accounts.get(account).map_or(Parked::default(), |l| Parked {
            leased: l.leased(),
            free: l.available,
            in_flight: l.held,
            unsettled: l.spent,
            leases: l.leases.len(),
        })
    }

    /// Refills, settles and gives back what is due for every account, at the clock's now.
    /// [`spawn_maintenance`](Self::spawn_maintenance) calls it periodically; call it directly
    /// with [`LeaseConfig::background`] off.
    pub async fn tick(&self) {
        let accounts: Vec<AccountId> = self.shared.lock().keys().cloned().collect();
        for account in accounts {
            self.shared.maintain(&account, Mode::Normal).await;
        }
        let now = self.shared.clock.now();
        let config = &self.shared.config;
        self.shared
            .lock()
            .retain(|_, l| !(l.is_empty() && l.idle(now, config)));
    }

    /// Runs [`tick`](Self::tick) every `every` on the current tokio runtime, until the
    /// returned task is aborted. Idle return and late settlement depend on it; pick well
    /// under a second (the leases' deadlines are whole seconds).
    pub fn spawn_maintenance(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                ledger.tick().await;
            }
        })
    }

    /// Settles every lease and gives back all that is not spent. Call it when the instance
    /// stops, after the server stopped taking requests (a request still in flight is charged
    /// its estimate).
    pub async fn shutdown(&self) {
        let accounts: Vec<AccountId> = self.shared.lock().keys().cloned().collect();
        for account in accounts {
            self.shared.maintain(&account, Mode::Shutdown).await;
        }
    }

    /// The credit cost of `request` if a lease may pay it: no idempotency key, every charge
    /// paid from credit (no allowance, overage allowed).
    fn lease_cost(request: &ReserveRequest) -> Option<Credits> {
        if request.idempotent {
            return None;
        }
        credit_cost(&request.charges)
    }

    /// Holds `request` against the leases: `None` when they cannot pay it.
    fn hold_local(&self, request: &ReserveRequest, cost: Credits) -> Option<ReserveOutcome> {
        let taken = self.take_local(
            &request.account,
            cost,
            request.now,
            Some((&request.key, &request.charges)),
            true,
        );
        match taken {
            Taken::InUse => Some(ReserveOutcome::Replayed(Replay::InProgress)),
            Taken::Short => None,
            Taken::Held { available_after } => Some(ReserveOutcome::Reserved(Reservation {
                id: request.id(),
                credits: cost,
                allowance_units: request.charges.iter().map(|_| 0).collect(),
                expires_at: request.now.plus_secs(request.ttl_secs),
                available_after,
                allowance_left: request.charges.iter().map(|_| None).collect(),
            })),
        }
    }

    /// Takes `cost` from the account's leased credit, if it can pay it; a keyed hold (`key`)
    /// is recorded under its key, and answers `InUse` if one is in flight under it. Counts the
    /// cost toward the account's rate when held, and on a miss too with `count_miss` (a miss
    /// asks for credit a lease may pay); schedules maintenance on a miss or when a lease is
    /// due.
    fn take_local(
        &self,
        account: &AccountId,
        cost: Credits,
        now: Timestamp,
        key: Option<(&ReservationKey, &Arc<[Charge]>)>,
        count_miss: bool,
    ) -> Taken {
        let shared = &self.shared;
        let config = &shared.config;
        let (taken, schedule) = {
            let mut accounts = shared.lock();
            // Looked up before inserting: the common case clones no account id.
            let local = match accounts.get_mut(account) {
                Some(local) => local,
                None => accounts
                    .entry(account.clone())
                    .or_insert_with(|| Local::new(now)),
            };
            local.last_active = local.last_active.max(now);
            if count_miss {
                local.window_spent = local.window_spent.saturating_add(cost.get());
            }
            if key.is_some_and(|(key, _)| local.holds.contains_key(key)) {
                return Taken::InUse;
            }
            let usable = local.usable(now, config) && local.available >= cost;
            let taken = if !usable {
                Taken::Short
            } else {
                if let Some((key, charges)) = key {
                    local.holds.insert(
                        key.clone(),
                        LocalHold {
                            credits: cost,
                            charges: charges.clone(),
                        },
                    );
                }
                if !count_miss {
                    local.window_spent = local.window_spent.saturating_add(cost.get());
                }
                local.available = local.available.saturating_sub(cost);
                local.held = local.held.checked_add(cost).unwrap_or(local.held);
                Taken::Held {
                    available_after: local
                        .shared_available
                        .checked_add(local.available)
                        .unwrap_or(local.available),
                }
            };
            let schedule = config.background
                && !local.scheduled
                && (matches!(taken, Taken::Short) || local.due(now, config));
            if schedule {
                local.scheduled = true;
            }
            (taken, schedule)
        };
        if schedule {
            self.schedule(account);
        }
        taken
    }

    /// The local part of settling a hold of `credits` for `charges` with `usage`: what the
    /// hold and the lease's free credit pay. What they cannot pay is `rest`, for
    /// [`settle_rest`](Self::settle_rest).
    fn settle_in(
        &self,
        local: &mut Local,
        credits: Credits,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> LocalSettled {
        let config = &self.shared.config;
        let cost = usage_cost(charges, usage);
        let from_hold = cost.min(credits);
        let beyond = cost.saturating_sub(from_hold);
        let from_local = match policy {
            OverEstimate::CapAtHold => Credits::ZERO,
            _ => beyond.min(local.available),
        };
        local.held = local.held.saturating_sub(credits);
        local.available = local
            .available
            .checked_add(credits.saturating_sub(from_hold))
            .unwrap_or(local.available)
            .saturating_sub(from_local);
        let charged = from_hold.checked_add(from_local).unwrap_or(from_hold);
        local.spend(charged);
        local.last_active = local.last_active.max(now);
        let schedule = config.background && !local.scheduled && local.due(now, config);
        if schedule {
            local.scheduled = true;
        }
        LocalSettled {
            meters: charges.len(),
            charged,
            rest: beyond.saturating_sub(from_local),
            shared_available: local.shared_available,
            available: local.available,
            held: local.held,
            schedule,
        }
    }

    /// What `settle_in` could not pay (`rest`), charged beyond the lease in the shared
    /// ledger unless the policy caps the charge at the hold; and the settlement.
    async fn settle_rest(
        &self,
        account: &AccountId,
        mut settled: LocalSettled,
        policy: OverEstimate,
        now: Timestamp,
    ) -> Settlement {
        if settled.schedule {
            self.schedule(account);
        }
        let rest = settled.rest;
        let mut shortfall = rest;
        if !rest.is_zero() && policy != OverEstimate::CapAtHold {
            if let Some(s) = self.charge_beyond(account, rest, policy, now).await {
                settled.charged = settled
                    .charged
                    .checked_add(s.charged)
                    .unwrap_or(settled.charged);
                shortfall = rest.saturating_sub(s.charged);
                // What the shared ledger has left now (nothing, if it drew into an overdraft).
                settled.shared_available = s.available_after;
                if let Some(local) = self.shared.lock().get_mut(account) {
                    local.shared_available = s.available_after;
                }
            }
        }
        settled.settlement(shortfall)
    }

    fn schedule(&self, account: &AccountId) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            if let Some(local) = self.shared.lock().get_mut(account) {
                local.scheduled = false;
            }
            return;
        };
        let shared = self.shared.clone();
        let account = account.clone();
        runtime.spawn(async move {
            shared.maintain(&account, Mode::Normal).await;
        });
    }

    /// A reservation in the shared ledger. Refused for credit: first this instance's own
    /// leases of the account are given back; then, while credit is parked elsewhere, it
    /// waits up to the recall time for it.
    async fn direct(&self, request: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        let shared = &self.shared;
        let cost = credit_cost(&request.charges);
        let deadline = Instant::now() + shared.config.recall_wait;
        let mut request = std::borrow::Cow::Borrowed(request);
        let mut recalled = false;
        loop {
            let outcome = shared.inner.reserve(&request).await?;
            let ReserveOutcome::Denied(Denial::InsufficientCredits { .. }) = &outcome else {
                return Ok(outcome);
            };
            let Some(cost) = cost else {
                return Ok(outcome);
            };
            if !recalled {
                recalled = true;
                let had = shared
                    .lock()
                    .get(&request.account)
                    .is_some_and(|l| !l.leases.is_empty() || !l.prepaid.is_zero());
                if had {
                    tracing::debug!(
                        target: "tower_402::lease",
                        account = request.account.as_str(),
                        "shared ledger refused a direct reservation; giving this instance's \
                         leases back and retrying"
                    );
                    shared.maintain(&request.account, Mode::Return).await;
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return Ok(outcome);
            }
            let now = shared.clock.now().max(request.now);
            let balance = shared.inner.balance(&request.account, now).await?;
            if balance.available < cost && balance.held < cost {
                // Nothing parked that could pay it: the credit is gone.
                return Ok(outcome);
            }
            if balance.available < cost {
                tracing::debug!(
                    target: "tower_402::lease",
                    account = request.account.as_str(),
                    held = balance.held.get(),
                    "credit parked in leases or holds; waiting for it before refusing"
                );
                tokio::time::sleep(shared.config.recall_poll).await;
            }
            request.to_mut().now = shared.clock.now().max(request.now);
        }
    }

    /// Charges `rest` credits beyond a local hold directly in the shared ledger, as far as
    /// the account's available credit (and, under [`OverEstimate::Overdraft`], its overdraft)
    /// goes: its settlement (`None`, after a log line, if it failed). A reservation of
    /// nothing, settled with `rest` under `policy`, so the shared ledger draws what it can in
    /// one atomic step.
    async fn charge_beyond(
        &self,
        account: &AccountId,
        rest: Credits,
        policy: OverEstimate,
        now: Timestamp,
    ) -> Option<Settlement> {
        let shared = &self.shared;
        let request = shared.lease_request(account, Credits::ZERO, 60, now, "extra");
        let policy = match policy {
            OverEstimate::Overdraft(limit) => OverEstimate::Overdraft(limit),
            _ => OverEstimate::DrawBalance,
        };
        match shared.inner.reserve(&request).await {
            Ok(ReserveOutcome::Reserved(_)) => {
                let usage = [Usage::new(LEASE_METER, rest.get())];
                match shared
                    .inner
                    .settle(&request.id(), &usage, policy, now)
                    .await
                {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(target: "tower_402::lease", account = account.as_str(),
                            error = %e, "charge beyond a lease hold not settled");
                        None
                    }
                }
            }
            Ok(other) => {
                tracing::error!(target: "tower_402::lease", account = account.as_str(),
                    outcome = ?other, "charge beyond a lease hold refused");
                None
            }
            Err(e) => {
                tracing::error!(target: "tower_402::lease", account = account.as_str(),
                    error = %e, "charge beyond a lease hold failed");
                None
            }
        }
    }
}

impl<L: Ledger, C: Clock> Shared<L, C> {
    fn lock(&self) -> MutexGuard<'_, FastMap<AccountId, Local>> {
        // Every update under the lock is plain arithmetic that cannot panic halfway.
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease_request(
        &self,
        account: &AccountId,
        credits: Credits,
        ttl_secs: u64,
        now: Timestamp,
        kind: &str,
    ) -> ReserveRequest {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        ReserveRequest {
            account: account.clone(),
            key: ReservationKey::from(format!("{kind}:{}:{n}", self.instance)),
            fingerprint: 0,
            charges: Arc::from([lease_charge(credits)]),
            ttl_secs,
            idempotent: false,
            // A lease is taken ahead of work and goes back when it lapses (an instance that
            // died leaves nothing parked); a charge beyond a lease is for work already served.
            on_expiry: if kind == "lease" {
                OnExpiry::Release
            } else {
                OnExpiry::Charge
            },
            attempt: 0,
            now,
        }
    }

    /// One maintenance run for `account`: settle what is due, refund prepaid credit nothing
    /// holds, take a new lease if one is needed.
    async fn maintain(&self, account: &AccountId, mode: Mode) {
        let _one = self.maintenance.lock().await;
        let now = self.clock.now();
        let plan = {
            let mut accounts = self.lock();
            let Some(local) = accounts.get_mut(account) else {
                return;
            };
            local.scheduled = false;
            local.plan(now, &self.config, mode)
        };
        for (lease, charge) in plan.settle {
            self.settle_lease(lease, charge, now).await;
        }
        if !plan.refund.is_zero() {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let key = format!("lease-refund:{}:{n}", self.instance);
            match self.inner.deposit(account, plan.refund, &key, now).await {
                Ok(_) => tracing::info!(target: "tower_402::lease", account = account.as_str(),
                    refunded = plan.refund.get(), "prepaid lease credit not spent; refunded"),
                Err(e) => tracing::error!(target: "tower_402::lease", account = account.as_str(),
                    credits = plan.refund.get(), error = %e, "refund of prepaid lease credit failed"),
            }
        }
        if plan.refill {
            self.refill(account, plan.size, now).await;
        }
    }

    /// Settles one lease with `charge` credits spent; retried a few times on an outage (if
    /// it never lands, the hold expires back and what was spent from it is not charged).
    async fn settle_lease(&self, lease: Lease, charge: Credits, now: Timestamp) {
        let usage = [Usage::new(LEASE_METER, charge.get())];
        let mut delay = std::time::Duration::from_millis(50);
        for attempt in 1..=4 {
            match self
                .inner
                .settle(&lease.id, &usage, OverEstimate::CapAtHold, now)
                .await
            {
                Ok(s) => {
                    tracing::debug!(
                        target: "tower_402::lease",
                        account = lease.id.account.as_str(),
                        leased = lease.amount.get(),
                        charged = s.charged.get(),
                        returned = lease.amount.saturating_sub(s.charged).get(),
                        "lease settled"
                    );
                    if !s.shortfall.is_empty() {
                        tracing::error!(
                            target: "tower_402::lease",
                            account = lease.id.account.as_str(),
                            shortfall = s.shortfall.credits.get(),
                            "lease settled after its hold lapsed; not all of it was charged"
                        );
                    }
                    let mut accounts = self.lock();
                    if let Some(local) = accounts.get_mut(&lease.id.account) {
                        local.shared_available = s.available_after;
                    }
                    return;
                }
                Err(LedgerError::Store(e)) if attempt < 4 => {
                    tracing::warn!(target: "tower_402::lease", account = lease.id.account.as_str(),
                        error = %e, attempt, "lease settlement failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::error!(
                        target: "tower_402::lease",
                        account = lease.id.account.as_str(),
                        credits = charge.get(),
                        error = %e,
                        "lease settlement failed; its hold expires back uncharged"
                    );
                    return;
                }
            }
        }
    }

    /// Takes a new lease of up to `size` credits, if the account's available credit allows;
    /// if not, no refill is tried again for a second.
    async fn refill(&self, account: &AccountId, size: Credits, now: Timestamp) {
        if !self.try_refill(account, size, now).await {
            if let Some(local) = self.lock().get_mut(account) {
                local.next_refill = local.next_refill.max(now.plus_secs(1));
            }
        }
    }

    /// [`refill`](Self::refill): whether a lease was taken.
    async fn try_refill(&self, account: &AccountId, size: Credits, now: Timestamp) -> bool {
        let balance = match self.inner.balance(account, now).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(target: "tower_402::lease", account = account.as_str(),
                    error = %e, "balance unreadable; no lease taken");
                return false;
            }
        };
        self.seen(account, balance.available);
        if balance.available < self.config.threshold {
            tracing::debug!(
                target: "tower_402::lease",
                account = account.as_str(),
                available = balance.available.get(),
                threshold = self.config.threshold.get(),
                "below the lease threshold; direct reservations"
            );
            return false;
        }
        let share =
            u128::from(balance.available.get()) * u128::from(self.config.share_percent) / 100;
        let size = size.min(Credits::new(u64::try_from(share).unwrap_or(u64::MAX)));
        if size.is_zero() {
            return false;
        }
        let request = self.lease_request(account, size, self.config.ttl_secs, now, "lease");
        match self.inner.reserve(&request).await {
            Ok(ReserveOutcome::Reserved(r)) => {
                tracing::debug!(
                    target: "tower_402::lease",
                    account = account.as_str(),
                    credits = r.credits.get(),
                    ttl_secs = self.config.ttl_secs,
                    "lease taken"
                );
                let mut accounts = self.lock();
                let local = accounts
                    .entry(account.clone())
                    .or_insert_with(|| Local::new(now));
                local.available = local
                    .available
                    .checked_add(r.credits)
                    .unwrap_or(local.available);
                local.size = r.credits;
                local.shared_available = r.available_after;
                crate::observe::leased(r.credits, Credits::ZERO);
                local.leases.push_back(Lease {
                    id: r.id,
                    amount: r.credits,
                    taken_at: now,
                });
                true
            }
            Ok(other) => {
                tracing::debug!(target: "tower_402::lease", account = account.as_str(),
                    outcome = ?other, "lease refused; direct reservations for now");
                false
            }
            Err(e) => {
                tracing::warn!(target: "tower_402::lease", account = account.as_str(),
                    error = %e, "lease not taken");
                false
            }
        }
    }

    fn seen(&self, account: &AccountId, available: Credits) {
        if let Some(local) = self.lock().get_mut(account) {
            local.shared_available = available;
        }
    }
}

/// A charge of `credits` on the lease meter: one unit per credit, no allowance.
fn lease_charge(credits: Credits) -> Charge {
    Charge {
        meter: Meter::new(LEASE_METER),
        units: credits.get(),
        unit_price: Credits::new(1),
        price_per: 1,
        allowance: None,
        overage: true,
    }
}

/// The credits `charges` cost if all are paid from credit (no allowance, overage allowed).
fn credit_cost(charges: &[Charge]) -> Option<Credits> {
    let mut total = Credits::ZERO;
    for c in charges {
        if c.allowance.is_some() || !c.overage {
            return None;
        }
        let split = c.split(c.units, 0).ok()?;
        total = total
            .checked_add(split.credits)
            .filter(|t| *t <= Credits::MAX_EXACT)?;
    }
    Some(total)
}

/// The credits `usage` costs under `charges` (all paid from credit), capped at the largest
/// exact amount as every backend counts it.
fn usage_cost(charges: &[Charge], usage: &[Usage]) -> Credits {
    charges.iter().fold(Credits::ZERO, |total, c| {
        let units = usage
            .iter()
            .filter(|u| u.meter == c.meter)
            .fold(0u64, |acc, u| acc.saturating_add(u.units));
        let credits = c.split(units, 0).map_or(Credits::MAX_EXACT, |s| s.credits);
        total
            .checked_add(credits)
            .filter(|t| *t <= Credits::MAX_EXACT)
            .unwrap_or(Credits::MAX_EXACT)
    })
}

#[async_trait]
impl<L: Ledger, C: Clock> Ledger for LeasedLedger<L, C> {
    async fn reserve(&self, request: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        request.validate()?;
        if let Some(cost) = Self::lease_cost(request) {
            if let Some(outcome) = self.hold_local(request, cost) {
                return Ok(outcome);
            }
        }
        self.direct(request).await
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let local = {
            let mut accounts = self.shared.lock();
            accounts.get_mut(&id.account).and_then(|local| {
                let hold = local.holds.remove(&id.key)?;
                let settled =
                    self.settle_in(local, hold.credits, &hold.charges, usage, policy, now);
                Some(settled)
            })
        };
        let Some(settled) = local else {
            return self.shared.inner.settle(id, usage, policy, now).await;
        };
        Ok(self.settle_rest(&id.account, settled, policy, now).await)
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        let released = {
            let mut accounts = self.shared.lock();
            accounts.get_mut(&id.account).is_some_and(|local| {
                let Some(hold) = local.holds.remove(&id.key) else {
                    return false;
                };
                local.give_back(hold.credits, now);
                true
            })
        };
        if released {
            return Ok(());
        }
        self.shared.inner.release(id, now).await
    }

    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        let deposit = self.shared.inner.deposit(account, amount, key, now).await?;
        if let Some(local) = self.shared.lock().get_mut(account) {
            // New credit: a lease may be worth taking again at once.
            local.next_refill = Timestamp::EPOCH;
            local.shared_available = deposit.balance.available;
        }
        Ok(deposit)
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        self.shared.inner.balance(account, now).await
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        self.shared
            .inner
            .allowance_usage(account, meter, window_start, now)
            .await
    }

    fn local_holds(&self) -> Option<&dyn LocalHolds> {
        Some(self)
    }

    fn records(&self) -> Option<&dyn ResponseRecords> {
        self.shared.inner.records()
    }
}

/// A request without an `Idempotency-Key` held against the leases with no keyed record (see
/// [`LocalHolds`]): the same arithmetic as a keyed [`reserve`](Ledger::reserve) paid from a
/// lease, without its key in the map and without a future.
#[async_trait]
impl<L: Ledger, C: Clock> LocalHolds for LeasedLedger<L, C> {
    fn try_hold(&self, account: &AccountId, charges: &[Charge], now: Timestamp) -> Option<Hold> {
        // Two charges on one meter: `reserve` refuses them (`DuplicateMeter`).
        crate::ledger::one_charge_per_meter(charges).ok()?;
        let cost = credit_cost(charges)?;
        // A miss is counted toward the rate by the `reserve` that follows it, not here.
        match self.take_local(account, cost, now, None, false) {
            Taken::Held { available_after } => Some(Hold {
                credits: cost,
                allowance_units: charges.iter().map(|_| 0).collect(),
                available_after,
                allowance_left: charges.iter().map(|_| None).collect(),
            }),
            Taken::Short | Taken::InUse => None,
        }
    }

    fn try_settle_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Option<Settlement> {
        let settled = {
            let mut accounts = self.shared.lock();
            let local = accounts.get_mut(account)?;
            // A cost the hold and the lease cannot pay takes the shared ledger: leave it all
            // to `settle_hold`.
            let cost = usage_cost(charges, usage);
            let beyond = cost.saturating_sub(hold.credits);
            if policy != OverEstimate::CapAtHold && beyond > local.available {
                return None;
            }
            self.settle_in(local, hold.credits, charges, usage, policy, now)
        };
        if settled.schedule {
            self.schedule(account);
        }
        Some(settled.settlement(settled.rest))
    }

    async fn settle_hold(
        &self,
        account: &AccountId,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Settlement {
        let settled = {
            let mut accounts = self.shared.lock();
            match accounts.get_mut(account) {
                Some(local) => self.settle_in(local, hold.credits, charges, usage, policy, now),
                // Nothing held here any more (a hold of nothing outlived its account's
                // leases): all of the cost is beyond the hold.
                None => LocalSettled {
                    meters: charges.len(),
                    charged: Credits::ZERO,
                    rest: usage_cost(charges, usage),
                    shared_available: Credits::ZERO,
                    available: Credits::ZERO,
                    held: Credits::ZERO,
                    schedule: false,
                },
            }
        };
        self.settle_rest(account, settled, policy, now).await
    }

    fn release_hold(&self, account: &AccountId, hold: &Hold, now: Timestamp) {
        let mut accounts = self.shared.lock();
        if let Some(local) = accounts.get_mut(account) {
            local.give_back(hold.credits, now);
        }
    }
}
