//! Where budget counters live: [`BudgetStore`], its reference semantics [`BudgetBook`], and
//! [`MemoryBudgetStore`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::ledger::{ReservationId, Usage};
use crate::plan::Meter;
use crate::time::Timestamp;

/// How long a finished hold is remembered (so a settlement that arrives after its hold lapsed
/// still counts what was charged), and how long a counter outlives its window.
pub const BUDGET_RETENTION_SECS: u64 = 86_400;

/// One budget a hold counts against: the counter of `owner`'s budget on `meter` (credits when
/// `None`) for the window starting at `window_start`, and what this request holds on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLine {
    /// The chain node the budget belongs to (`"research"`).
    pub owner: String,
    /// The meter it caps, or `None` for credits.
    pub meter: Option<Meter>,
    /// Start of the budget's current window (identifies the counter).
    pub window_start: Timestamp,
    /// When the window ends.
    pub resets_at: Timestamp,
    /// The budget for the window.
    pub limit: u64,
    /// What this request holds on it.
    pub amount: u64,
}

impl BudgetLine {
    /// What a settled request used of this line's budget: the credits charged, or the units of
    /// the line's meter.
    pub fn used_by(&self, charged: u64, usage: &[Usage]) -> u64 {
        match &self.meter {
            None => charged,
            Some(m) => usage
                .iter()
                .filter(|u| &u.meter == m)
                .fold(0u64, |acc, u| acc.saturating_add(u.units)),
        }
    }
}

/// What [`BudgetStore::hold`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Held on every line.
    Held,
    /// A hold under this key is already open; nothing changed.
    AlreadyHeld,
    /// Line `line` has no room: `used` (used and held) plus the amount is above its limit.
    /// Nothing was held.
    NoRoom {
        /// Index of the first line without room.
        line: usize,
        /// Used and held on it.
        used: u64,
    },
}

/// Budget counters shared by every instance: implemented by [`MemoryBudgetStore`] and, for
/// fleets, by `RedisBudgetStore` and `PostgresBudgetStore` in `tower_402::store`. Every method is atomic across all the lines
/// it touches: concurrent holds can never take a level past its budget.
///
/// [`BudgetBook`] is the reference: a store must answer every sequence of calls as it does.
#[async_trait]
pub trait BudgetStore: Send + Sync + 'static {
    /// Holds each line's `amount`, on all lines or none: a line has room when used + held +
    /// amount ≤ limit. The hold lapses at `expires_at` (its amounts are no longer held).
    async fn hold(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<HoldOutcome, StoreError>;

    /// Ends the hold under `key`, counting what was used of each line
    /// ([`BudgetLine::used_by`]), even if the hold had lapsed. `false` if there is no hold
    /// to settle (never made, already settled or released, or forgotten).
    async fn settle(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Gives the hold under `key` back. `false` if there was no open hold.
    async fn release(&self, key: &ReservationId, now: Timestamp) -> Result<bool, StoreError>;

    /// Used and held on one counter.
    async fn usage(
        &self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<CounterUsage, StoreError>;
}

#[async_trait]
impl<T: BudgetStore + ?Sized> BudgetStore for Arc<T> {
    async fn hold(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<HoldOutcome, StoreError> {
        (**self).hold(key, lines, expires_at, now).await
    }
    async fn settle(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        (**self).settle(key, charged, usage, now).await
    }
    async fn release(&self, key: &ReservationId, now: Timestamp) -> Result<bool, StoreError> {
        (**self).release(key, now).await
    }
    async fn usage(
        &self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<CounterUsage, StoreError> {
        (**self).usage(owner, meter, window_start, now).await
    }
}

/// One counter: what was used (settled) and what is held this window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterUsage {
    /// Settled.
    pub used: u64,
    /// Held by requests in flight.
    pub held: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct CounterKey {
    owner: String,
    meter: Option<Meter>,
    window_start: Timestamp,
}

impl CounterKey {
    fn of(line: &BudgetLine) -> Self {
        CounterKey {
            owner: line.owner.clone(),
            meter: line.meter.clone(),
            window_start: line.window_start,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    usage: CounterUsage,
    resets_at: Timestamp,
}

#[derive(Debug, Clone)]
struct HoldRecord {
    lines: Vec<BudgetLine>,
    /// While open: its place in [`BudgetBook::open`] (expiry, sequence number).
    open_until: Option<(Timestamp, u64)>,
    /// When it was made or last finished: forgotten [`BUDGET_RETENTION_SECS`] later.
    touched: Timestamp,
}

/// The budget semantics every [`BudgetStore`] keeps, as a plain value with no I/O.
/// [`MemoryBudgetStore`] is this behind a mutex.
#[derive(Debug, Clone, Default)]
pub struct BudgetBook {
    counters: BTreeMap<CounterKey, Counter>,
    holds: HashMap<ReservationId, HoldRecord>,
    /// Open holds by expiry, for lapsing them in order.
    open: BTreeMap<(Timestamp, u64), ReservationId>,
    seq: u64,
}

impl BudgetBook {
    /// Lapses the holds due at `now` and forgets finished holds and past counters.
    fn expire(&mut self, now: Timestamp) {
        while let Some(entry) = self.open.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (expired_at, _) = *entry.key();
            let id = entry.remove();
            if let Some(rec) = self.holds.get_mut(&id) {
                rec.open_until = None;
                // Retained from when it lapsed, however late this sweep runs.
                rec.touched = expired_at;
                let lines = rec.lines.clone();
                self.give_back(&lines);
            }
        }
        self.holds.retain(|_, r| {
            r.open_until.is_some() || r.touched.plus_secs(BUDGET_RETENTION_SECS) > now
        });
        self.counters
            .retain(|_, c| c.resets_at.plus_secs(BUDGET_RETENTION_SECS) > now || c.usage.held > 0);
    }

    fn give_back(&mut self, lines: &[BudgetLine]) {
        for line in lines {
            if let Some(c) = self.counters.get_mut(&CounterKey::of(line)) {
                c.usage.held = c.usage.held.saturating_sub(line.amount);
            }
        }
    }

    /// [`BudgetStore::hold`].
    pub fn hold(
        &mut self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> HoldOutcome {
        self.expire(now);
        if self.holds.get(key).is_some_and(|r| r.open_until.is_some()) {
            return HoldOutcome::AlreadyHeld;
        }
        for (i, line) in lines.iter().enumerate() {
            let u = self
                .counters
                .get(&CounterKey::of(line))
                .map(|c| c.usage)
                .unwrap_or_default();
            let taken = u.used.saturating_add(u.held);
            let fits = taken
                .checked_add(line.amount)
                .is_some_and(|t| t <= line.limit);
            if !fits {
                return HoldOutcome::NoRoom {
                    line: i,
                    used: taken,
                };
            }
        }
        for line in lines {
            let c = self
                .counters
                .entry(CounterKey::of(line))
                .or_insert(Counter {
                    usage: CounterUsage::default(),
                    resets_at: line.resets_at,
                });
            // Checked above: used + held + amount ≤ limit, for each line alone (two lines on
            // one counter are checked apart: `BudgetedLedger` never makes them).
            c.usage.held = c.usage.held.saturating_add(line.amount);
        }
        self.seq += 1;
        let slot = (expires_at, self.seq);
        self.open.insert(slot, key.clone());
        self.holds.insert(
            key.clone(),
            HoldRecord {
                lines: lines.to_vec(),
                open_until: Some(slot),
                touched: now,
            },
        );
        HoldOutcome::Held
    }

    /// [`BudgetStore::settle`].
    pub fn settle(
        &mut self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> bool {
        self.expire(now);
        let Some(rec) = self.holds.remove(key) else {
            return false;
        };
        if let Some(slot) = rec.open_until {
            self.give_back(&rec.lines);
            self.open.remove(&slot);
        }
        for line in &rec.lines {
            let c = self
                .counters
                .entry(CounterKey::of(line))
                .or_insert(Counter {
                    usage: CounterUsage::default(),
                    resets_at: line.resets_at,
                });
            // Charged work counts in full: a settlement beyond the estimate can take a level
            // past its budget, as it can draw the balance beyond the hold.
            c.usage.used = c.usage.used.saturating_add(line.used_by(charged, usage));
        }
        true
    }

    /// [`BudgetStore::release`].
    pub fn release(&mut self, key: &ReservationId, now: Timestamp) -> bool {
        self.expire(now);
        match self.holds.get(key) {
            Some(r) if r.open_until.is_some() => {}
            _ => return false,
        }
        if let Some(rec) = self.holds.remove(key) {
            self.give_back(&rec.lines);
            if let Some(slot) = rec.open_until {
                self.open.remove(&slot);
            }
        }
        true
    }

    /// [`BudgetStore::usage`].
    pub fn usage(
        &mut self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> CounterUsage {
        self.expire(now);
        self.counters
            .get(&CounterKey {
                owner: owner.to_owned(),
                meter: meter.cloned(),
                window_start,
            })
            .map(|c| c.usage)
            .unwrap_or_default()
    }
}

/// Budget counters in this process's memory: one instance, tests, demos. Clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemoryBudgetStore {
    book: Arc<Mutex<BudgetBook>>,
}

impl MemoryBudgetStore {
    /// No counters yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn book(&self) -> std::sync::MutexGuard<'_, BudgetBook> {
        // Every book method checks before it changes anything: a poisoned lock holds a
        // consistent book.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl BudgetStore for MemoryBudgetStore {
    async fn hold(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<HoldOutcome, StoreError> {
        Ok(self.book().hold(key, lines, expires_at, now))
    }
    async fn settle(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        Ok(self.book().settle(key, charged, usage, now))
    }
    async fn release(&self, key: &ReservationId, now: Timestamp) -> Result<bool, StoreError> {
        Ok(self.book().release(key, now))
    }
    async fn usage(
        &self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<CounterUsage, StoreError> {
        Ok(self.book().usage(owner, meter, window_start, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> Timestamp {
        Timestamp::from_unix(1_000_000 + s)
    }

    fn id(key: &str) -> ReservationId {
        ReservationId {
            account: "acct".into(),
            key: key.into(),
        }
    }

    fn line(owner: &str, limit: u64, amount: u64) -> BudgetLine {
        BudgetLine {
            owner: owner.into(),
            meter: None,
            window_start: t(0),
            resets_at: t(1_000),
            limit,
            amount,
        }
    }

    fn used(b: &mut BudgetBook, owner: &str, now: Timestamp) -> CounterUsage {
        b.usage(owner, None, t(0), now)
    }

    #[test]
    fn a_hold_is_all_or_nothing() {
        let mut b = BudgetBook::default();
        let lines = [line("team", 3, 2), line("org", 10, 2)];
        assert_eq!(b.hold(&id("a"), &lines, t(60), t(0)), HoldOutcome::Held);
        // The team has 1 left: the next hold of 2 fails on the team and holds nothing on the org.
        assert_eq!(
            b.hold(&id("b"), &lines, t(60), t(0)),
            HoldOutcome::NoRoom { line: 0, used: 2 }
        );
        assert_eq!(used(&mut b, "org", t(0)), CounterUsage { used: 0, held: 2 });
        assert_eq!(
            b.hold(&id("a"), &lines, t(60), t(0)),
            HoldOutcome::AlreadyHeld
        );
        assert_eq!(
            used(&mut b, "team", t(0)).held,
            2,
            "a second hold under a key holds nothing"
        );
    }

    #[test]
    fn settle_counts_what_was_charged_and_release_gives_back() {
        let mut b = BudgetBook::default();
        let lines = [line("team", 10, 4)];
        b.hold(&id("a"), &lines, t(60), t(0));
        b.hold(&id("b"), &lines, t(60), t(0));
        assert!(b.settle(&id("a"), 3, &[], t(1)));
        assert!(!b.settle(&id("a"), 3, &[], t(1)), "once");
        assert!(b.release(&id("b"), t(1)));
        assert!(!b.release(&id("b"), t(1)));
        assert_eq!(
            used(&mut b, "team", t(1)),
            CounterUsage { used: 3, held: 0 }
        );
        // A meter line counts units of its meter, not credits.
        let mut units = line("team", 100, 5);
        units.meter = Some(Meter::new("tokens"));
        b.hold(&id("c"), &[units], t(60), t(1));
        let usage = [Usage::new("tokens", 7), Usage::new("other", 50)];
        assert!(b.settle(&id("c"), 1, &usage, t(2)));
        assert_eq!(
            b.usage("team", Some(&Meter::new("tokens")), t(0), t(2))
                .used,
            7
        );
    }

    #[test]
    fn a_lapsed_hold_stops_counting_but_a_late_settlement_still_counts() {
        let mut b = BudgetBook::default();
        let lines = [line("team", 3, 3)];
        b.hold(&id("a"), &lines, t(60), t(0));
        assert!(matches!(
            b.hold(&id("b"), &lines, t(60), t(59)),
            HoldOutcome::NoRoom { .. }
        ));
        // At its expiry the hold is given back: another request fits.
        assert_eq!(b.hold(&id("b"), &lines, t(120), t(60)), HoldOutcome::Held);
        assert!(
            !b.release(&id("a"), t(61)),
            "a lapsed hold has nothing to give back"
        );
        // The first request was served after all: its charge counts, over the budget.
        assert!(b.settle(&id("a"), 3, &[], t(62)));
        assert_eq!(
            used(&mut b, "team", t(62)),
            CounterUsage { used: 3, held: 3 }
        );
        // A lapsed hold's key can hold again (a new attempt).
        let mut c = BudgetBook::default();
        c.hold(&id("x"), &[line("team", 9, 1)], t(5), t(0));
        assert_eq!(
            c.hold(&id("x"), &[line("team", 9, 1)], t(20), t(10)),
            HoldOutcome::Held
        );
        assert_eq!(used(&mut c, "team", t(10)).held, 1);
    }

    #[test]
    fn finished_holds_and_old_counters_are_forgotten() {
        let mut b = BudgetBook::default();
        b.hold(&id("a"), &[line("team", 9, 1)], t(60), t(0));
        b.hold(&id("b"), &[line("team", 9, 1)], t(60), t(0));
        b.settle(&id("a"), 1, &[], t(1));
        // `b` lapses at 60 and is kept for the retention time, then forgotten with the counter.
        let later = t(1_000 + BUDGET_RETENTION_SECS);
        assert_eq!(used(&mut b, "team", later), CounterUsage::default());
        assert!(b.holds.is_empty() && b.counters.is_empty() && b.open.is_empty());
        assert!(!b.settle(&id("b"), 1, &[], later));
    }

    #[test]
    fn amounts_near_the_top_never_wrap() {
        let mut b = BudgetBook::default();
        let big = [line("team", u64::MAX, u64::MAX - 1)];
        assert_eq!(b.hold(&id("a"), &big, t(60), t(0)), HoldOutcome::Held);
        assert!(matches!(
            b.hold(&id("b"), &[line("team", u64::MAX, 2)], t(60), t(0)),
            HoldOutcome::NoRoom { .. }
        ));
        assert!(b.settle(&id("a"), u64::MAX, &[], t(1)));
        assert!(!b.settle(&id("a"), u64::MAX, &[], t(1)));
        assert_eq!(used(&mut b, "team", t(1)).used, u64::MAX);
    }
}
