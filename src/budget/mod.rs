//! Budgets at every level: an account's key, its team, its organisation (or any chain of
//! parents), each with credit caps and meter caps per period.
//!
//! A paid API sells to organisations. A department may have spent its quarter's budget while
//! the company's balance is full: its callers must be refused with
//! **`402 BUDGET_EXHAUSTED`**, saying which level is out of budget, how much it had, when it
//! resets and who can raise it, and the detail saying plainly that it is a budget, not the
//! balance.
//!
//! - [`Budgets`] is the chart: [`BudgetNode`]s with a level (`key`, `team`, `organisation`,
//!   or your own), a parent, [`Budget`]s (credits or units of a meter, per [`Period`]) and who
//!   manages them; accounts are members of a node. Counted in a [`Calendar`] (UTC or a fixed
//!   offset).
//! - [`BudgetedLedger`] composes over any [`Ledger`], as
//!   [`CachingPlanStore`](crate::store::CachingPlanStore) composes over any plan store. Its
//!   `reserve` makes the inner reservation, then holds what it holds (credits, and the units
//!   of each capped meter) on **every level of the chain at once**, in one atomic
//!   [`BudgetStore::hold`]: if any level has no room, nothing is held on any level, the inner
//!   reservation is released, and the request is refused before its handler runs.
//!   Concurrent requests can never take a level past its budget. Settlement counts what was
//!   charged on every level; a release gives the holds back; a hold that lapses (its instance
//!   died) stops counting when the reservation would have expired.
//! - What counts is what the ledger charges: requests covered by a plan's allowance cost no
//!   credit and use no credit budget. A settlement beyond the estimate (usage-priced routes
//!   under [`OverEstimate::DrawBalance`]) counts in full and can take a level past its
//!   budget by that overage, as it can draw the balance beyond the hold; the next request is
//!   then refused.
//!
//! # Example
//!
//! ```
//! use tower_402::budget::{Budget, BudgetNode, Budgets, BudgetedLedger, MemoryBudgetStore};
//! use tower_402::plan::Period;
//! use tower_402::MemoryLedger;
//!
//! let budgets = Budgets::new()
//!     .node(BudgetNode::new("acme", "organisation").budget(Budget::credits(10_000, Period::Year)))
//!     .node(
//!         BudgetNode::new("research", "team")
//!             .parent("acme")
//!             .budget(Budget::credits(3, Period::Quarter))
//!             .managed_by("Research's budget holder", "https://example.com/teams/research"),
//!     )
//!     .member("acct_dept", "research");
//! let ledger = BudgetedLedger::new(MemoryLedger::new(), MemoryBudgetStore::new(), budgets)
//!     .expect("a valid chart");
//! // Hand `ledger` to `Billing::new` in place of the memory ledger.
//! # let _ = ledger;
//! ```
//!
//! The problem document of a refusal:
//!
//! ```json
//! { "type": "…/budget-exhausted", "title": "Budget exhausted", "status": 402,
//!   "code": "BUDGET_EXHAUSTED", "level": "team", "owner": "research", "budget": 3, "used": 3,
//!   "period": "quarter", "resets_at": "2027-01-01T00:00:00Z",
//!   "manage_url": "https://example.com/teams/research",
//!   "detail": "The team budget of 3 credits per quarter for research is used up (3 used); it resets at 2027-01-01T00:00:00Z. This is a spending limit set for the team, not the account's balance: Research's budget holder can raise it at https://example.com/teams/research." }
//! ```
//!
//! with `Retry-After` set to the seconds until the reset.
//!
//! # Backends
//!
//! [`MemoryBudgetStore`] keeps the counters in this process. A fleet shares them in the
//! ledger's backend: `tower_402::store::RedisBudgetStore` (feature `redis`: one Lua script per
//! operation, on one Redis or a Redis Cluster) or `tower_402::store::PostgresBudgetStore`
//! (feature `postgres`: one transaction per operation, with a `migrate()` of its own).
//! [`BudgetBook`] is the reference semantics every [`BudgetStore`] keeps; `tests/budgets.rs`
//! checks each store against it on random sequences of calls.
//! [`BudgetedLedger`] has no [in-process fast path](crate::in_process): every reservation on
//! it goes through the async methods.

mod store;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::store::{
    BudgetBook, BudgetLine, BudgetStore, CounterUsage, HoldOutcome, MemoryBudgetStore,
    BUDGET_RETENTION_SECS,
};
use crate::account::AccountId;
use crate::credits::Credits;
use crate::denial::{BudgetExhausted, Denial};
use crate::error::LedgerError;
use crate::ledger::{
    AllowanceUsage, Balance, Deposit, Ledger, OverEstimate, ReservationId, ReserveOutcome,
    ReserveRequest, ResponseRecords, Settlement, Usage,
};
use crate::plan::{Calendar, Meter, Period};
use crate::time::Timestamp;

/// The level of an account's own node.
pub const KEY: &str = "key";
/// The level of a team.
pub const TEAM: &str = "team";
/// The level of an organisation.
pub const ORGANISATION: &str = "organisation";

/// The longest chain followed from an account to its root.
pub const MAX_DEPTH: usize = 16;

/// A cap for a period: credits, or units of a meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The meter capped, or `None` for credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<Meter>,
    /// The cap per period.
    pub limit: u64,
    /// The period.
    pub period: Period,
}

impl Budget {
    /// At most `limit` credits charged per `period`.
    pub fn credits(limit: u64, period: Period) -> Self {
        Budget {
            meter: None,
            limit,
            period,
        }
    }

    /// At most `limit` units of `meter` per `period`.
    pub fn units(meter: impl Into<Meter>, limit: u64, period: Period) -> Self {
        Budget {
            meter: Some(meter.into()),
            limit,
            period,
        }
    }
}

/// One node of the chart: a key's account, a team, an organisation, or a level of your own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetNode {
    /// Unique in the chart. A node whose id is an account's id is that account's own node.
    pub id: String,
    /// Its level, as the refusal names it ([`KEY`], [`TEAM`], [`ORGANISATION`], ...).
    pub level: String,
    /// The node above, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its caps.
    #[serde(default)]
    pub budgets: Vec<Budget>,
    /// Who manages its budgets, for the refusal's detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
    /// Where they raise them: the refusal's `manage_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manage_url: Option<String>,
}

impl BudgetNode {
    /// A node with no parent and no budgets.
    pub fn new(id: impl Into<String>, level: impl Into<String>) -> Self {
        BudgetNode {
            id: id.into(),
            level: level.into(),
            parent: None,
            budgets: Vec::new(),
            manager: None,
            manage_url: None,
        }
    }

    /// Sets the node above.
    pub fn parent(mut self, parent: impl Into<String>) -> Self {
        self.parent = Some(parent.into());
        self
    }

    /// Adds a cap.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budgets.push(budget);
        self
    }

    /// Who manages the budgets and where they raise them.
    pub fn managed_by(mut self, manager: impl Into<String>, url: impl Into<String>) -> Self {
        self.manager = Some(manager.into());
        self.manage_url = Some(url.into());
        self
    }
}

/// Why a chart was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// A node's parent, or an account's node, is not in the chart.
    #[error("budget node `{0}` is not in the chart")]
    UnknownNode(String),
    /// Following parents from this node comes back to it, or goes deeper than [`MAX_DEPTH`].
    #[error("budget node `{0}` is in a cycle or deeper than {MAX_DEPTH} levels")]
    Cycle(String),
    /// Two nodes have this id.
    #[error("budget node `{0}` is defined twice")]
    Duplicate(String),
}

/// The chart: nodes, which node each account reports to, and the calendar budgets are
/// counted in. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budgets {
    #[serde(default, with = "node_list")]
    nodes: HashMap<String, BudgetNode>,
    /// Ids given to [`node`](Self::node) more than once, refused by `validate`.
    #[serde(skip)]
    duplicates: Vec<String>,
    /// Account → the node it reports to (when the account has no node of its own).
    #[serde(default)]
    members: HashMap<String, String>,
    #[serde(default)]
    calendar: Calendar,
}

impl Budgets {
    /// An empty chart, counted in UTC.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node.
    pub fn node(mut self, node: BudgetNode) -> Self {
        if let Some(old) = self.nodes.insert(node.id.clone(), node) {
            self.duplicates.push(old.id);
        }
        self
    }

    /// Makes `account` report to `node` (an account with a node of its own reports through
    /// that node's parent instead).
    pub fn member(mut self, account: impl Into<String>, node: impl Into<String>) -> Self {
        self.members.insert(account.into(), node.into());
        self
    }

    /// Counts periods in `calendar` (a fixed offset from UTC).
    pub fn calendar(mut self, calendar: Calendar) -> Self {
        self.calendar = calendar;
        self
    }

    /// Checks that every parent and membership names a node, ids are unique, and no chain
    /// loops or runs deeper than [`MAX_DEPTH`].
    pub fn validate(&self) -> Result<(), BudgetError> {
        if let Some(id) = self.duplicates.first() {
            return Err(BudgetError::Duplicate(id.clone()));
        }
        for n in self.nodes.values() {
            if let Some(p) = &n.parent {
                if !self.nodes.contains_key(p) {
                    return Err(BudgetError::UnknownNode(p.clone()));
                }
            }
            let mut at = Some(n);
            for _ in 0..=MAX_DEPTH {
                at = at
                    .and_then(|n| n.parent.as_deref())
                    .and_then(|p| self.get(p));
            }
            if at.is_some() {
                return Err(BudgetError::Cycle(n.id.clone()));
            }
        }
        for node in self.members.values() {
            if !self.nodes.contains_key(node) {
                return Err(BudgetError::UnknownNode(node.clone()));
            }
        }
        Ok(())
    }

    fn get(&self, id: &str) -> Option<&BudgetNode> {
        self.nodes.get(id)
    }

    /// Whether `account` is in the chart (has a node or reports to one): what
    /// [`chain`](Self::chain) would find, without building it.
    pub fn has_chain(&self, account: &AccountId) -> bool {
        let a = account.as_str();
        self.nodes.contains_key(a)
            || self
                .members
                .get(a)
                .is_some_and(|n| self.nodes.contains_key(n))
    }

    /// The nodes from `account` up to its root: its own node if it has one, then each parent.
    pub fn chain(&self, account: &AccountId) -> Vec<&BudgetNode> {
        let first = self
            .get(account.as_str())
            .or_else(|| self.members.get(account.as_str()).and_then(|n| self.get(n)));
        let mut chain = Vec::new();
        let mut at = first;
        while let Some(n) = at {
            if chain.len() == MAX_DEPTH {
                break;
            }
            chain.push(n);
            at = n.parent.as_deref().and_then(|p| self.get(p));
        }
        chain
    }
}

/// A [`Ledger`] whose reservations also hold against every budget on the account's chain.
/// Clones share the ledger, the store and the chart. See the [module docs](self).
pub struct BudgetedLedger<L, S = MemoryBudgetStore> {
    inner: Arc<L>,
    store: Arc<S>,
    budgets: Arc<Budgets>,
}

impl<L, S> Clone for BudgetedLedger<L, S> {
    fn clone(&self) -> Self {
        BudgetedLedger {
            inner: self.inner.clone(),
            store: self.store.clone(),
            budgets: self.budgets.clone(),
        }
    }
}

impl<L: fmt::Debug, S: fmt::Debug> fmt::Debug for BudgetedLedger<L, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetedLedger")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .field("nodes", &self.budgets.nodes.len())
            .finish()
    }
}

/// What one line of a hold is for: the node and the budget.
struct LineOf<'a> {
    node: &'a BudgetNode,
    budget: &'a Budget,
}

impl<L: Ledger, S: BudgetStore> BudgetedLedger<L, S> {
    /// `inner` with the budgets of `budgets`, counted in `store`. Refuses an invalid chart.
    pub fn new(inner: L, store: S, budgets: Budgets) -> Result<Self, BudgetError> {
        budgets.validate()?;
        Ok(BudgetedLedger {
            inner: Arc::new(inner),
            store: Arc::new(store),
            budgets: Arc::new(budgets),
        })
    }

    /// The ledger inside.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// The budget counters.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The chart.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// How much of `owner`'s `budget` is used and held in the window containing `now`.
    pub async fn usage(
        &self,
        owner: &str,
        budget: &Budget,
        now: Timestamp,
    ) -> Result<CounterUsage, crate::error::StoreError> {
        let (start, _) = budget.period.window_in(now, &self.budgets.calendar);
        self.store
            .usage(owner, budget.meter.as_ref(), start, now)
            .await
    }
}

impl<L: Ledger, S> BudgetedLedger<L, S> {
    /// Releases the inner reservation of a request refused before its handler ran. With
    /// `retry`, a release that fails is retried in the background until it lands: left to
    /// expire, the hold would be charged (the metering layer's holds are `OnExpiry::Charge`)
    /// for work that never ran. Without it (the request failed on an error, which the caller
    /// may retry under the same attempt, getting this very reservation back) a background
    /// release could land under a request that is running by then, and make its work free:
    /// a release that fails is left to the hold's expiry.
    async fn give_back(&self, id: &ReservationId, now: Timestamp, retry: bool) {
        let landed = |r: Result<(), LedgerError>| match r {
            Ok(())
            | Err(LedgerError::UnknownReservation)
            | Err(LedgerError::AlreadyReleased)
            | Err(LedgerError::AlreadySettled) => Ok(()),
            Err(e) => Err(e),
        };
        let Err(e) = landed(self.inner.release(id, now).await) else {
            return;
        };
        if !retry {
            tracing::error!(
                target: "tower_402::budget",
                account = id.account.as_str(),
                error = %e,
                "budget store failed and the reservation could not be released; it expires"
            );
            return;
        }
        tracing::warn!(
            target: "tower_402::budget",
            account = id.account.as_str(),
            error = %e,
            "release of a reservation refused for its budget failed; retrying in the background"
        );
        let (inner, id) = (self.inner.clone(), id.clone());
        retry_in_background(id.account.clone(), "reservation release", move || {
            let (inner, id) = (inner.clone(), id.clone());
            async move { landed(inner.release(&id, now).await) }
        });
    }
}

#[async_trait]
impl<L: Ledger, S: BudgetStore> Ledger for BudgetedLedger<L, S> {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        let chain = self.budgets.chain(&req.account);
        if chain.iter().all(|n| n.budgets.is_empty()) {
            return self.inner.reserve(req).await;
        }
        let reservation = match self.inner.reserve(req).await? {
            ReserveOutcome::Reserved(r) => r,
            // A replay or a refusal is no new work: nothing to hold.
            other => return Ok(other),
        };
        let mut lines = Vec::new();
        let mut of = Vec::new();
        for node in &chain {
            for budget in &node.budgets {
                let (window_start, resets_at) =
                    budget.period.window_in(req.now, &self.budgets.calendar);
                let amount = match &budget.meter {
                    None => reservation.credits.get(),
                    Some(m) => req
                        .charges
                        .iter()
                        .filter(|c| &c.meter == m)
                        .fold(0u64, |acc, c| acc.saturating_add(c.units)),
                };
                // Two budgets of one node on one meter whose windows start together (a month
                // and a year, each January) count the same usage on one counter: hold it once,
                // against the tighter cap, and keep the counter until the later reset.
                if let Some(i) = lines.iter().position(|l: &BudgetLine| {
                    l.owner == node.id && l.meter == budget.meter && l.window_start == window_start
                }) {
                    let line = &mut lines[i];
                    line.resets_at = line.resets_at.max(resets_at);
                    if budget.limit < line.limit {
                        line.limit = budget.limit;
                        of[i] = LineOf { node, budget };
                    }
                    continue;
                }
                lines.push(BudgetLine {
                    owner: node.id.clone(),
                    meter: budget.meter.clone(),
                    window_start,
                    resets_at,
                    limit: budget.limit,
                    amount,
                });
                of.push(LineOf { node, budget });
            }
        }
        let held = self
            .store
            .hold(&reservation.id, &lines, reservation.expires_at, req.now)
            .await;
        match held {
            Ok(HoldOutcome::Held | HoldOutcome::AlreadyHeld) => {
                Ok(ReserveOutcome::Reserved(reservation))
            }
            Ok(HoldOutcome::NoRoom { line, used }) => {
                // A refusal: no retry of this attempt comes back for the reservation.
                self.give_back(&reservation.id, req.now, true).await;
                let LineOf { node, budget } = &of[line];
                // The refused budget's own reset (a merged line keeps the later one).
                let (_, resets_at) = budget.period.window_in(req.now, &self.budgets.calendar);
                tracing::info!(
                    target: "tower_402::budget",
                    account = req.account.as_str(),
                    level = node.level.as_str(),
                    owner = node.id.as_str(),
                    budget = budget.limit,
                    used,
                    "budget exhausted"
                );
                Ok(ReserveOutcome::Denied(Denial::BudgetExhausted(Box::new(
                    BudgetExhausted {
                        level: node.level.clone(),
                        owner: node.id.clone(),
                        meter: budget.meter.clone(),
                        budget: budget.limit,
                        used: used.min(budget.limit),
                        period: budget.period,
                        resets_at,
                        manager: node.manager.clone(),
                        manage_url: node.manage_url.clone(),
                    },
                ))))
            }
            Err(e) => {
                // Unknown whether the hold landed: give the credit back and fail the
                // request; a hold that did land lapses with the reservation's expiry.
                self.give_back(&reservation.id, req.now, false).await;
                Err(LedgerError::Store(e))
            }
        }
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let settlement = self.inner.settle(id, usage, policy, now).await?;
        if self.budgets.has_chain(&id.account) {
            let charged = settlement.charged.get();
            if let Err(e) = self.store.settle(id, charged, usage, now).await {
                // The charge landed; the budgets have not counted it yet. Retried in the
                // background until the store answers (a settlement after the hold lapsed
                // still counts, within `BUDGET_RETENTION_SECS`).
                tracing::warn!(
                    target: "tower_402::budget",
                    account = id.account.as_str(),
                    charged,
                    error = %e,
                    "budget settlement failed; retrying in the background"
                );
                let (store, id, usage) = (self.store.clone(), id.clone(), usage.to_vec());
                retry_in_background(id.account.clone(), "settlement", move || {
                    let (store, id, usage) = (store.clone(), id.clone(), usage.clone());
                    async move { store.settle(&id, charged, &usage, now).await.map(|_| ()) }
                });
            }
        }
        Ok(settlement)
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        self.inner.release(id, now).await?;
        if self.budgets.has_chain(&id.account) {
            if let Err(e) = self.store.release(id, now).await {
                // Until it lands, the hold counts against the budgets (at the latest until
                // the reservation's expiry): retried in the background.
                tracing::warn!(
                    target: "tower_402::budget",
                    account = id.account.as_str(),
                    error = %e,
                    "budget release failed; retrying in the background"
                );
                let (store, id) = (self.store.clone(), id.clone());
                retry_in_background(id.account.clone(), "release", move || {
                    let (store, id) = (store.clone(), id.clone());
                    async move { store.release(&id, now).await.map(|_| ()) }
                });
            }
        }
        Ok(())
    }

    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        self.inner.deposit(account, amount, key, now).await
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        self.inner.balance(account, now).await
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        self.inner
            .allowance_usage(account, meter, window_start, now)
            .await
    }

    fn records(&self) -> Option<&dyn ResponseRecords> {
        self.inner.records()
    }
}

/// Nodes as a list in configuration (each names its id), a map by id in memory.
mod node_list {
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::BudgetNode;

    pub fn serialize<S: Serializer>(
        nodes: &HashMap<String, BudgetNode>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut list: Vec<&BudgetNode> = nodes.values().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<String, BudgetNode>, D::Error> {
        let list = Vec::<BudgetNode>::deserialize(d)?;
        let mut nodes = HashMap::with_capacity(list.len());
        for n in list {
            if nodes.contains_key(&n.id) {
                return Err(serde::de::Error::custom(format!(
                    "budget node `{}` is defined twice",
                    n.id
                )));
            }
            nodes.insert(n.id.clone(), n);
        }
        Ok(nodes)
    }
}

/// The most budget operations retried in the background at once, in this process: beyond
/// it (a long outage under load) a failed operation is logged as lost, as the metering
/// layer's bounded settlement queue drops its newest.
const MAX_RETRYING: usize = 10_000;

/// Budget operations being retried in the background.
static RETRYING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Retries a budget store operation that failed, on a Tokio task, with backoff (50 ms
/// doubling to 5 s) until it answers, for up to half of [`BUDGET_RETENTION_SECS`] (the
/// store keeps what a late settlement needs for all of it); at most [`MAX_RETRYING`] at
/// once. Without a runtime it is logged as lost.
fn retry_in_background<F, Fut, E>(account: AccountId, what: &'static str, mut attempt: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display,
{
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::error!(
            target: "tower_402::budget",
            account = account.as_str(),
            what,
            "no Tokio runtime to retry a budget operation on; it is not counted"
        );
        return;
    };
    use std::sync::atomic::Ordering;
    if RETRYING
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_RETRYING).then_some(n + 1)
        })
        .is_err()
    {
        tracing::error!(
            target: "tower_402::budget",
            account = account.as_str(),
            what,
            retrying = MAX_RETRYING,
            "too many budget operations retrying already; this one is lost"
        );
        return;
    }
    /// Counts the task out however it ends.
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            RETRYING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    handle.spawn(async move {
        let _slot = Slot;
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(BUDGET_RETENTION_SECS / 2);
        let mut wait = std::time::Duration::from_millis(50);
        loop {
            tokio::time::sleep(wait).await;
            match attempt().await {
                Ok(()) => {
                    tracing::info!(target: "tower_402::budget", account = account.as_str(),
                        what, "budget operation landed after a retry");
                    return;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(target: "tower_402::budget", account = account.as_str(),
                        what, error = %e, "budget operation still failing; retrying");
                    wait = (wait * 2).min(std::time::Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(target: "tower_402::budget", account = account.as_str(),
                        what, error = %e, "budget operation never landed; given up");
                    return;
                }
            }
        }
    });
}
