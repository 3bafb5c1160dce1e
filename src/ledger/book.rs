use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use crate::FastMap;

use crate::charge::Charge;
use crate::credits::Credits;
use crate::denial::Denial;
use crate::error::LedgerError;
use crate::ledger::journal::{
    Adjusted, Adjustment, Direction, Entries, EntryKind, JournalEntry, JournalLimits, JournalQuery,
};
use crate::ledger::types::*;
use crate::ledger::PerCharge;
use crate::plan::Meter;
use crate::time::Timestamp;

/// How long finished reservations and deposit keys are remembered for idempotency: 7 days,
/// longer than payment processors retry their webhooks.
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 24 * 3600;

/// The life of a reservation record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Open,
    Settled,
    Released,
    Expired,
}

/// One reservation as the book keeps it (persisted piecewise by the SQL store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) fingerprint: u64,
    pub(crate) charges: Arc<[Charge]>,
    pub(crate) credits: Credits,
    pub(crate) allowance_units: PerCharge<u64>,
    pub(crate) expires_at: Timestamp,
    pub(crate) state: State,
    pub(crate) touched_at: Timestamp,
    pub(crate) settlement: Option<Settlement>,
    /// Kept after it ends, for the retention time, so a retry under its key is recognized
    /// (`ReserveRequest::idempotent`). Otherwise forgotten when settled or released.
    pub(crate) retain: bool,
    /// [`OnExpiry::Charge`]: when the hold expires it is charged, not given back; the record
    /// is then `Expired` with its `credits` and `allowance_units` settled (provisionally: a
    /// late settlement or release has the last word).
    pub(crate) charge_on_expiry: bool,
    /// The attempt that made it ([`ReserveRequest::attempt`]; `0`: none).
    pub(crate) attempt: u64,
}

impl Record {
    /// What a charge at expiry settled, as a retry under the key sees it.
    fn provisional_settlement(&self) -> Settlement {
        let mut allowance_used_after = PerCharge::with_capacity(self.charges.len());
        for _ in self.charges.iter() {
            allowance_used_after.push(None);
        }
        Settlement {
            charged: self.credits,
            allowance_units: self.allowance_units.clone(),
            allowance_used_after,
            ..Settlement::default()
        }
    }
}

/// Allowance units of one meter in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counter {
    pub(crate) used: u64,
    pub(crate) held: u64,
    pub(crate) resets_at: Timestamp,
}

/// A part of an account's state: its buckets plus whichever records an operation needs.
///
/// A store that keeps records in rows loads the rows an operation can touch, builds a book
/// with [`AccountBook::from_parts`], applies the operation, and writes back what
/// [`AccountBook::into_parts`] returns (a record missing from the result was forgotten).
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    pub(crate) balance: Balance,
    pub(crate) reservations: FastMap<ReservationKey, Record>,
    pub(crate) allowances: FastMap<(Meter, Timestamp), Counter>,
    pub(crate) deposits: FastMap<String, (Credits, Timestamp)>,
    pub(crate) adjustments: FastMap<String, (Direction, Credits, Timestamp)>,
    /// Journal entries the operation wrote (on the way out of [`AccountBook::into_parts`]).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) journal: Vec<JournalEntry>,
}

/// One account's ledger as a pure state machine: no I/O, no clock, no locks.
///
/// The in-memory ledger keeps one per account behind a mutex; any store that can load an
/// account, apply one operation and write it back atomically can do the same. Every method
/// first releases the account's expired reservations and forgets idempotency records older
/// than the retention time, then applies the operation whole or not at all.
#[derive(Debug, Clone)]
pub struct AccountBook {
    available: Credits,
    held: Credits,
    settled: Credits,
    deposited: Credits,
    /// Charged beyond the balance under [`OverEstimate::Overdraft`]: owed, repaid first by
    /// any credit that comes back (see [`Balance::overdrawn`]).
    overdrawn: Credits,
    allowances: FastMap<(Meter, Timestamp), Counter>,
    reservations: FastMap<ReservationKey, Record>,
    deposits: FastMap<String, (Credits, Timestamp)>,
    retention_secs: u64,
    /// Open reservations by expiry: expiring the due ones costs O(log n), not a scan.
    open: BTreeSet<(Timestamp, ReservationKey)>,
    /// Finished reservations and deposits in the order they finished, for retention.
    finished: VecDeque<(Timestamp, ReservationKey)>,
    deposited_at: VecDeque<(Timestamp, String)>,
    /// Adjustment keys, for idempotency, forgotten after the retention time like deposits.
    adjustments: FastMap<String, (Direction, Credits, Timestamp)>,
    adjusted_at: VecDeque<(Timestamp, String)>,
    /// The spend history.
    journal: Entries,
}

impl Default for AccountBook {
    fn default() -> Self {
        AccountBook::with_retention(DEFAULT_RETENTION_SECS)
    }
}

impl AccountBook {
    /// An empty book that remembers idempotency keys for `retention_secs`.
    pub fn with_retention(retention_secs: u64) -> Self {
        AccountBook {
            available: Credits::ZERO,
            held: Credits::ZERO,
            settled: Credits::ZERO,
            deposited: Credits::ZERO,
            overdrawn: Credits::ZERO,
            allowances: FastMap::default(),
            reservations: FastMap::default(),
            deposits: FastMap::default(),
            retention_secs,
            open: BTreeSet::new(),
            finished: VecDeque::new(),
            deposited_at: VecDeque::new(),
            adjustments: FastMap::default(),
            adjusted_at: VecDeque::new(),
            journal: Entries::new(JournalLimits::default()),
        }
    }

    /// The same book with another journal bound ([`JournalLimits`]).
    pub fn with_journal(mut self, limits: JournalLimits) -> Self {
        self.journal.set_limits(limits);
        self
    }

    /// The account's journal entries matching `query`, newest first.
    pub fn journal(&mut self, query: &JournalQuery, now: Timestamp) -> Vec<JournalEntry> {
        self.expire(now);
        self.journal.read(query)
    }

    /// A book made of a subset of an account's records. Operations give the same answers as
    /// on the whole book as long as `parts` holds every record the operation reads: the
    /// reservation under its key, every open reservation due at `now`, the allowance counters
    /// of the charges involved, and the deposit under its key.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn from_parts(retention_secs: u64, parts: Parts) -> Self {
        let mut open = BTreeSet::new();
        let mut finished: Vec<(Timestamp, ReservationKey)> = Vec::new();
        for (key, rec) in &parts.reservations {
            if rec.state == State::Open {
                open.insert((rec.expires_at, key.clone()));
            } else {
                finished.push((rec.touched_at, key.clone()));
            }
        }
        finished.sort();
        let mut deposited_at: Vec<(Timestamp, String)> = parts
            .deposits
            .iter()
            .map(|(k, (_, at))| (*at, k.clone()))
            .collect();
        deposited_at.sort();
        let mut adjusted_at: Vec<(Timestamp, String)> = parts
            .adjustments
            .iter()
            .map(|(k, (_, _, at))| (*at, k.clone()))
            .collect();
        adjusted_at.sort();
        AccountBook {
            available: parts.balance.available,
            held: parts.balance.held,
            settled: parts.balance.settled,
            deposited: parts.balance.deposited,
            overdrawn: parts.balance.overdrawn,
            allowances: parts.allowances,
            reservations: parts.reservations,
            deposits: parts.deposits,
            retention_secs,
            open,
            finished: finished.into(),
            deposited_at: deposited_at.into(),
            adjustments: parts.adjustments,
            adjusted_at: adjusted_at.into(),
            // Only what this operation writes: the store keeps the rest.
            journal: Entries::new(JournalLimits {
                retention_secs: u64::MAX,
                max_entries: usize::MAX,
            }),
        }
    }

    /// The state, to write back after [`AccountBook::from_parts`].
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn into_parts(self) -> Parts {
        Parts {
            balance: Balance {
                available: self.available,
                held: self.held,
                settled: self.settled,
                deposited: self.deposited,
                overdrawn: self.overdrawn,
            },
            reservations: self.reservations,
            allowances: self.allowances,
            deposits: self.deposits,
            adjustments: self.adjustments,
            journal: self.journal.entries.into(),
        }
    }

    /// Releases expired holds and forgets old records and allowance windows.
    ///
    /// Costs O(log n) per expired reservation and O(1) per forgotten record: open
    /// reservations are indexed by expiry and finished ones queued in the order they finished.
    pub fn expire(&mut self, now: Timestamp) {
        while self.open.first().is_some_and(|(at, _)| *at <= now) {
            let Some((at, key)) = self.open.pop_first() else {
                break;
            };
            let Some(rec) = self.reservations.get_mut(&key) else {
                continue;
            };
            if rec.state != State::Open || rec.expires_at != at {
                continue;
            }
            let charge = rec.charge_on_expiry;
            for (c, units) in rec.charges.iter().zip(&rec.allowance_units) {
                if let Some(w) = c.allowance {
                    if let Some(c) = self.allowances.get_mut(&(c.meter.clone(), w.start)) {
                        c.held = c.held.saturating_sub(*units);
                        if charge {
                            c.used = c.used.saturating_add(*units);
                        }
                    }
                }
            }
            rec.state = State::Expired;
            rec.touched_at = rec.expires_at;
            // An expired hold is remembered even without `retain`: a late settlement must
            // still find it and charge (see `settle`).
            self.finished.push_back((rec.expires_at, key));
            let (credits, at) = (rec.credits, rec.expires_at);
            // A part of `held` moves to `settled` (charged) or back to `available`: neither
            // operation can fail, both stay within `deposited`.
            self.held = self.held.saturating_sub(credits);
            let kind = if charge {
                self.settled = self.settled.checked_add(credits).unwrap_or(self.settled);
                EntryKind::Settle
            } else {
                self.credit(credits);
                EntryKind::Expiry
            };
            if !credits.is_zero() {
                let available = self.available;
                self.journal
                    .push(at, kind, credits, None, available, None, None);
            }
        }
        self.journal.expire(now);
        let retention = self.retention_secs;
        while self
            .finished
            .front()
            .is_some_and(|(at, _)| at.plus_secs(retention) <= now)
        {
            let Some((at, key)) = self.finished.pop_front() else {
                break;
            };
            // Skip stale entries: the key was reserved again, or touched later.
            if self
                .reservations
                .get(&key)
                .is_some_and(|r| r.state != State::Open && r.touched_at == at)
            {
                self.reservations.remove(&key);
            }
        }
        while self
            .deposited_at
            .front()
            .is_some_and(|(at, _)| at.plus_secs(retention) <= now)
        {
            let Some((at, key)) = self.deposited_at.pop_front() else {
                break;
            };
            if self.deposits.get(&key).is_some_and(|(_, t)| *t == at) {
                self.deposits.remove(&key);
            }
        }
        while self
            .adjusted_at
            .front()
            .is_some_and(|(at, _)| at.plus_secs(retention) <= now)
        {
            let Some((at, key)) = self.adjusted_at.pop_front() else {
                break;
            };
            if self.adjustments.get(&key).is_some_and(|(_, _, t)| *t == at) {
                self.adjustments.remove(&key);
            }
        }
        if self
            .allowances
            .values()
            .any(|c| c.resets_at <= now && c.held == 0)
        {
            self.allowances
                .retain(|_, c| c.resets_at > now || c.held > 0);
        }
    }

    /// Puts a finished reservation back: queued for retention, or forgotten right away when
    /// it was not made under an idempotency key.
    fn finish(&mut self, key: ReservationKey, rec: Record, now: Timestamp) {
        // Moved in and out of the tuple: no extra reference to the key.
        let entry = (rec.expires_at, key);
        self.open.remove(&entry);
        let key = entry.1;
        if rec.retain {
            self.finished.push_back((now, key.clone()));
            self.reservations.insert(key, rec);
        }
    }

    /// The buckets.
    pub fn balance(&mut self, now: Timestamp) -> Balance {
        self.expire(now);
        Balance {
            available: self.available,
            held: self.held,
            settled: self.settled,
            deposited: self.deposited,
            overdrawn: self.overdrawn,
        }
    }

    /// Puts `credits` back where requests can spend them, repaying what is overdrawn first:
    /// an overdrawn account has nothing available until its debt is paid.
    fn credit(&mut self, credits: Credits) {
        let repaid = credits.min(self.overdrawn);
        self.overdrawn = self.overdrawn.saturating_sub(repaid);
        // Within `deposited + overdrawn`, which is bounded: cannot overflow.
        self.available = self
            .available
            .checked_add(credits.saturating_sub(repaid))
            .unwrap_or(self.available);
    }

    /// Allowance units of `meter` taken in the window starting at `window_start`.
    pub fn allowance_usage(
        &mut self,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> AllowanceUsage {
        self.expire(now);
        self.allowances
            .get(&(meter.clone(), window_start))
            .map(|c| AllowanceUsage {
                used: c.used,
                held: c.held,
            })
            .unwrap_or_default()
    }

    /// Allowance units of the charge's window already used or held. A window that is over
    /// and was forgotten (nothing held it any more) has nothing left to give: a request
    /// settled after its window reset pays from credit for what its hold did not cover,
    /// instead of drawing on an allowance that no longer exists.
    fn taken(&self, charge: &Charge, now: Timestamp) -> u64 {
        let Some(w) = charge.allowance else {
            return 0;
        };
        match self.allowances.get(&(charge.meter.clone(), w.start)) {
            Some(c) => c.used.saturating_add(c.held),
            None if w.resets_at <= now => w.limit,
            None => 0,
        }
    }

    /// Holds an estimate. See [`Ledger::reserve`](crate::Ledger::reserve).
    pub fn reserve(&mut self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        req.validate()?;
        self.expire(req.now);
        if let Some(rec) = self.reservations.get(&req.key) {
            if rec.fingerprint != req.fingerprint {
                return Err(LedgerError::KeyConflict);
            }
            match rec.state {
                // The same attempt again: its reply was lost. It gets its reservation back.
                State::Open if req.attempt != 0 && rec.attempt == req.attempt => {
                    let rec = rec.clone();
                    return Ok(ReserveOutcome::Reserved(self.reservation_of(req, &rec)));
                }
                State::Open => return Ok(ReserveOutcome::Replayed(Replay::InProgress)),
                State::Settled => {
                    let settlement = rec.settlement.clone().unwrap_or_default();
                    return Ok(ReserveOutcome::Replayed(Replay::Completed(settlement)));
                }
                // The earlier attempt's work was charged when its hold expired: it ran (or
                // may still be running), so a retry does not run it again.
                State::Expired if rec.charge_on_expiry => {
                    let settlement = rec.provisional_settlement();
                    return Ok(ReserveOutcome::Replayed(Replay::Completed(settlement)));
                }
                // The earlier attempt was refunded: this retry is a new attempt.
                State::Released | State::Expired => {}
            }
        }
        let taken = match self.take(&req.charges, req.now)? {
            Ok(t) => t,
            Err(denial) => return Ok(ReserveOutcome::Denied(denial)),
        };
        let Hold {
            credits,
            allowance_units,
            available_after,
            allowance_left,
        } = taken;
        let expires_at = req.now.plus_secs(req.ttl_secs);
        self.open.insert((expires_at, req.key.clone()));
        self.reservations.insert(
            req.key.clone(),
            Record {
                fingerprint: req.fingerprint,
                charges: req.charges.clone(),
                credits,
                allowance_units: allowance_units.clone(),
                expires_at,
                state: State::Open,
                touched_at: req.now,
                settlement: None,
                retain: req.idempotent,
                charge_on_expiry: req.on_expiry == OnExpiry::Charge,
                attempt: req.attempt,
            },
        );
        Ok(ReserveOutcome::Reserved(Reservation {
            id: req.id(),
            credits,
            allowance_units,
            expires_at,
            available_after,
            allowance_left,
        }))
    }

    /// An open record as the reservation its attempt made, for a retry of that attempt.
    fn reservation_of(&self, req: &ReserveRequest, rec: &Record) -> Reservation {
        let mut allowance_left = PerCharge::with_capacity(rec.charges.len());
        for charge in rec.charges.iter() {
            allowance_left.push(charge.allowance.map(|w| {
                let c = self
                    .allowances
                    .get(&(charge.meter.clone(), w.start))
                    .copied()
                    .unwrap_or_default();
                w.limit.saturating_sub(c.used.saturating_add(c.held))
            }));
        }
        Reservation {
            id: req.id(),
            credits: rec.credits,
            allowance_units: rec.allowance_units.clone(),
            expires_at: rec.expires_at,
            available_after: self.available,
            allowance_left,
        }
    }

    /// Moves what `charges` need from `available` (and the allowances) into `held`, or says
    /// why not. No record is made: the caller owns the hold. Shared by [`reserve`] and
    /// [`hold`].
    ///
    /// [`reserve`]: Self::reserve
    /// [`hold`]: Self::hold
    fn take(
        &mut self,
        charges: &[Charge],
        now: Timestamp,
    ) -> Result<Result<Hold, Denial>, LedgerError> {
        let mut credits = Credits::ZERO;
        let mut allowance_units = PerCharge::with_capacity(charges.len());
        for charge in charges {
            let split = match charge.split(charge.units, self.taken(charge, now)) {
                Ok(s) => s,
                Err(Denial::InsufficientCredits { required, .. }) => {
                    return Ok(Err(Denial::InsufficientCredits {
                        balance: self.available,
                        required,
                    }))
                }
                Err(d) => return Ok(Err(d)),
            };
            credits = credits
                .checked_add(split.credits)
                .filter(|c| *c <= Credits::MAX_EXACT)
                .ok_or(LedgerError::AmountOutOfRange)?;
            allowance_units.push(split.allowance_units);
        }
        if credits > self.available {
            return Ok(Err(Denial::InsufficientCredits {
                balance: self.available,
                required: credits,
            }));
        }
        // Checked above: credits <= available, and held + credits <= deposited.
        self.available = self.available.saturating_sub(credits);
        self.held = self
            .held
            .checked_add(credits)
            .ok_or(LedgerError::AmountOutOfRange)?;
        let mut allowance_left = PerCharge::with_capacity(charges.len());
        for (charge, units) in charges.iter().zip(&allowance_units) {
            match charge.allowance {
                Some(w) => {
                    let c = self
                        .allowances
                        .entry((charge.meter.clone(), w.start))
                        .or_insert(Counter {
                            resets_at: w.resets_at,
                            ..Counter::default()
                        });
                    c.held = c.held.saturating_add(*units);
                    allowance_left
                        .push(Some(w.limit.saturating_sub(c.used.saturating_add(c.held))));
                }
                None => allowance_left.push(None),
            }
        }
        Ok(Ok(Hold {
            credits,
            allowance_units,
            available_after: self.available,
            allowance_left,
        }))
    }

    /// Holds `charges` for one request without a keyed record: the in-process fast path for
    /// requests without an `Idempotency-Key`, whose hold lives exactly as long as the
    /// request's guard (the book dies with the process, so there is nothing to expire or to
    /// recognize a retry by). Finish it with [`settle_hold`](Self::settle_hold) or
    /// [`release_hold`](Self::release_hold), exactly once, with the same charges.
    pub fn hold(
        &mut self,
        charges: &[Charge],
        now: Timestamp,
    ) -> Result<Result<Hold, Denial>, LedgerError> {
        // As `reserve` refuses: two charges on one meter would both be charged its usage.
        super::types::one_charge_per_meter(charges)?;
        self.expire(now);
        self.take(charges, now)
    }

    /// Charges `usage` against a [`hold`](Self::hold) and ends it: the same arithmetic as
    /// [`settle`](Self::settle) on an open reservation.
    pub fn settle_hold(
        &mut self,
        hold: &Hold,
        charges: &[Charge],
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Settlement {
        self.expire(now);
        self.charge_usage(
            charges,
            Some((hold.credits, &hold.allowance_units)),
            usage,
            policy,
            now,
        )
    }

    /// Gives a [`hold`](Self::hold) back.
    pub fn release_hold(&mut self, hold: &Hold, charges: &[Charge], now: Timestamp) {
        self.expire(now);
        self.give_back(charges, hold.credits, &hold.allowance_units, now);
    }

    /// Charges actual usage. See [`Ledger::settle`](crate::Ledger::settle).
    pub fn settle(
        &mut self,
        key: &str,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        self.expire(now);
        // Take the record out while it is worked on (no copy), put it back if it is kept.
        let (key, mut rec) = self
            .reservations
            .remove_entry(key)
            .ok_or(LedgerError::UnknownReservation)?;
        let was_open = match rec.state {
            State::Open => true,
            // The hold was charged when it expired: that charge becomes a hold again, and the
            // settlement below charges the actual usage against it as if it had never lapsed.
            State::Expired if rec.charge_on_expiry => {
                self.uncharge(&rec, true, now);
                true
            }
            // The hold lapsed and came back while the work ran: charge as if nothing had
            // been held.
            State::Expired => false,
            State::Settled => {
                self.reservations.insert(key, rec);
                return Err(LedgerError::AlreadySettled);
            }
            State::Released => {
                self.reservations.insert(key, rec);
                return Err(LedgerError::AlreadyReleased);
            }
        };
        let settlement = if was_open {
            self.charge_usage(
                &rec.charges,
                Some((rec.credits, &rec.allowance_units)),
                usage,
                policy,
                now,
            )
        } else {
            self.charge_usage(&rec.charges, None, usage, policy, now)
        };
        rec.state = State::Settled;
        rec.touched_at = now;
        if rec.retain {
            rec.settlement = Some(settlement.clone());
        }
        self.finish(key, rec, now);
        Ok(settlement)
    }

    /// The arithmetic of a settlement: gives back what was held (`held`: the credits, and the
    /// allowance units per charge; `None` for a hold that lapsed and held nothing), then
    /// charges `usage`.
    fn charge_usage(
        &mut self,
        charges: &[Charge],
        held: Option<(Credits, &[u64])>,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Settlement {
        let was_open = held.is_some();
        let (held_credits, held_units) = held.unwrap_or((Credits::ZERO, &[]));
        // Give the allowance holds back, then consume what was used.
        let mut cost = Credits::ZERO;
        let mut consumed = PerCharge::with_capacity(charges.len());
        let mut used_after = PerCharge::with_capacity(charges.len());
        let mut unit_shortfall = Vec::new();
        for (i, charge) in charges.iter().enumerate() {
            let held = &held_units.get(i).copied().unwrap_or(0);
            let units = usage
                .iter()
                .filter(|u| u.meter == charge.meter)
                .fold(0u64, |acc, u| acc.saturating_add(u.units));
            let taken = self.taken(charge, now).saturating_sub(*held);
            let (allowance_units, credits, over) = match charge.split(units, taken) {
                Ok(s) => (s.allowance_units, s.credits, 0),
                Err(Denial::QuotaExceeded { .. }) => {
                    // No overage on this plan: consume what is left of the allowance and
                    // record the rest as a shortfall.
                    let free = charge
                        .allowance
                        .map_or(0, |w| w.limit.saturating_sub(taken));
                    let within = units.min(free);
                    (within, Credits::ZERO, units - within)
                }
                Err(_) => (0, Credits::MAX_EXACT, 0),
            };
            if let Some(w) = charge.allowance {
                let c = self
                    .allowances
                    .entry((charge.meter.clone(), w.start))
                    .or_insert(Counter {
                        resets_at: w.resets_at,
                        ..Counter::default()
                    });
                c.held = c.held.saturating_sub(*held);
                c.used = c.used.saturating_add(allowance_units);
                used_after.push(Some(c.used));
            } else {
                used_after.push(None);
            }
            if over > 0 {
                unit_shortfall.push((charge.meter.clone(), over));
            }
            consumed.push(allowance_units);
            // A cost beyond the largest exact amount can never be paid from any balance:
            // it is counted as that amount, so every backend (Lua's numbers are doubles)
            // reports the same shortfall.
            cost = cost
                .checked_add(credits)
                .filter(|c| *c <= Credits::MAX_EXACT)
                .unwrap_or(Credits::MAX_EXACT);
        }
        let from_hold = cost.min(held_credits);
        let beyond = cost.saturating_sub(from_hold);
        // held -= hold; available += hold - from_hold (repaying any overdraft first), then
        // available -= from_available, overdrawn += from_overdraft; settled += charged.
        // Every step stays within `deposited + overdrawn`, so none can overflow.
        self.held = self.held.saturating_sub(held_credits);
        self.credit(held_credits.saturating_sub(from_hold));
        // A lapsed hold held nothing: capping at it would make the work free, so a late
        // settlement draws what it can whatever the policy.
        let from_available = match policy {
            OverEstimate::CapAtHold if was_open => Credits::ZERO,
            _ => beyond.min(self.available),
        };
        self.available = self.available.saturating_sub(from_available);
        let rest = beyond.saturating_sub(from_available);
        // Owed up to the limit, and never so much that `deposited + overdrawn` (what the
        // buckets add up to) passes the largest exact amount.
        let from_overdraft = match policy {
            OverEstimate::Overdraft(limit) => {
                let total = self.deposited.checked_add(self.overdrawn);
                let headroom =
                    total.map_or(Credits::ZERO, |t| Credits::MAX_EXACT.saturating_sub(t));
                rest.min(limit.min(Credits::MAX_EXACT).saturating_sub(self.overdrawn))
                    .min(headroom)
            }
            _ => Credits::ZERO,
        };
        self.overdrawn = self
            .overdrawn
            .checked_add(from_overdraft)
            .unwrap_or(self.overdrawn);
        let charged = from_hold
            .checked_add(from_available)
            .and_then(|c| c.checked_add(from_overdraft))
            .unwrap_or(from_hold);
        self.settled = self.settled.checked_add(charged).unwrap_or(self.settled);
        let short = rest.saturating_sub(from_overdraft);
        let available = self.available;
        if !charged.is_zero() {
            let j = &mut self.journal;
            j.push(now, EntryKind::Settle, charged, None, available, None, None);
        }
        if !short.is_zero() {
            let j = &mut self.journal;
            j.push(
                now,
                EntryKind::Shortfall,
                short,
                None,
                available,
                None,
                None,
            );
        }
        Settlement {
            charged,
            allowance_units: consumed,
            shortfall: Shortfall {
                credits: short,
                units: unit_shortfall,
            },
            available_after: self.available,
            unspent_after: self
                .available
                .checked_add(self.held)
                .unwrap_or(self.available),
            allowance_used_after: used_after,
        }
    }

    /// Gives back `credits` and the allowance `units` per charge that a hold took.
    fn give_back(&mut self, charges: &[Charge], credits: Credits, units: &[u64], now: Timestamp) {
        for (charge, units) in charges.iter().zip(units) {
            if let Some(w) = charge.allowance {
                if let Some(c) = self.allowances.get_mut(&(charge.meter.clone(), w.start)) {
                    c.held = c.held.saturating_sub(*units);
                }
            }
        }
        self.held = self.held.saturating_sub(credits);
        self.credit(credits);
        if !credits.is_zero() {
            let available = self.available;
            let j = &mut self.journal;
            j.push(
                now,
                EntryKind::Release,
                credits,
                None,
                available,
                None,
                None,
            );
        }
    }

    /// Undoes a charge at expiry: the record's credits and allowance units leave `settled`
    /// (and the allowance's `used`) for `held` again (`rehold`, before a late settlement) or
    /// for `available` (a late release). Journaled as a release of the provisional charge.
    fn uncharge(&mut self, rec: &Record, rehold: bool, now: Timestamp) {
        for (c, units) in rec.charges.iter().zip(&rec.allowance_units) {
            if let Some(w) = c.allowance {
                if let Some(c) = self.allowances.get_mut(&(c.meter.clone(), w.start)) {
                    c.used = c.used.saturating_sub(*units);
                    if rehold {
                        c.held = c.held.saturating_add(*units);
                    }
                }
            }
        }
        // The credits were moved into `settled` by the expiry: moving them out stays within
        // `deposited`.
        self.settled = self.settled.saturating_sub(rec.credits);
        if rehold {
            self.held = self.held.checked_add(rec.credits).unwrap_or(self.held);
        } else {
            self.credit(rec.credits);
        }
        if !rec.credits.is_zero() {
            let available = self.available;
            self.journal.push(
                now,
                EntryKind::Release,
                rec.credits,
                None,
                available,
                None,
                None,
            );
        }
    }

    /// Gives a hold back. See [`Ledger::release`](crate::Ledger::release).
    pub fn release(&mut self, key: &str, now: Timestamp) -> Result<(), LedgerError> {
        self.expire(now);
        let (key, mut rec) = self
            .reservations
            .remove_entry(key)
            .ok_or(LedgerError::UnknownReservation)?;
        match rec.state {
            State::Open => {}
            // The work never ran after all: the charge at expiry comes back.
            State::Expired if rec.charge_on_expiry => {
                self.uncharge(&rec, false, now);
                rec.state = State::Released;
                rec.touched_at = now;
                self.finish(key, rec, now);
                return Ok(());
            }
            State::Released | State::Expired => {
                self.reservations.insert(key, rec);
                return Ok(());
            }
            State::Settled => {
                self.reservations.insert(key, rec);
                return Err(LedgerError::AlreadySettled);
            }
        }
        rec.state = State::Released;
        rec.touched_at = now;
        self.give_back(&rec.charges, rec.credits, &rec.allowance_units, now);
        self.finish(key, rec, now);
        Ok(())
    }

    /// Adds credit once per key. See [`Ledger::deposit`](crate::Ledger::deposit).
    pub fn deposit(
        &mut self,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        self.expire(now);
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        if let Some((earlier, _)) = self.deposits.get(key) {
            if *earlier != amount {
                return Err(LedgerError::KeyConflict);
            }
            return Ok(Deposit {
                applied: false,
                balance: self.balance(now),
            });
        }
        let deposited = self
            .deposited
            .checked_add(amount)
            .filter(|d| *d <= Credits::MAX_EXACT)
            .ok_or(LedgerError::AmountOutOfRange)?;
        self.deposited = deposited;
        self.credit(amount);
        self.deposits.insert(key.to_owned(), (amount, now));
        self.deposited_at.push_back((now, key.to_owned()));
        let available = self.available;
        self.journal.push(
            now,
            EntryKind::Deposit,
            amount,
            None,
            available,
            Some(key),
            None,
        );
        Ok(Deposit {
            applied: true,
            balance: self.balance(now),
        })
    }

    /// Credits or debits the account once per key, with a journal entry. See
    /// [`Journal::adjust`](crate::ledger::Journal::adjust).
    pub fn adjust(
        &mut self,
        adjustment: &Adjustment,
        now: Timestamp,
    ) -> Result<Adjusted, LedgerError> {
        self.expire(now);
        let Adjustment {
            key,
            direction,
            credits,
            reason,
        } = adjustment;
        let (direction, amount) = (*direction, *credits);
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        if let Some((d, c, _)) = self.adjustments.get(key.as_str()) {
            if (*d, *c) != (direction, amount) {
                return Err(LedgerError::KeyConflict);
            }
            return Ok(Adjusted {
                applied: false,
                available_after: self.available,
            });
        }
        // `deposited` is what was put in net of adjustments: conservation still holds. A
        // credit repays an overdraft first, as a deposit does.
        let (deposited, available) = match direction {
            Direction::Credit => (
                self.deposited
                    .checked_add(amount)
                    .filter(|d| *d <= Credits::MAX_EXACT),
                Some(self.available),
            ),
            Direction::Debit => (
                self.deposited.checked_sub(amount),
                self.available.checked_sub(amount),
            ),
        };
        let (Some(deposited), Some(available)) = (deposited, available) else {
            return Err(LedgerError::AmountOutOfRange);
        };
        self.deposited = deposited;
        self.available = available;
        if direction == Direction::Credit {
            self.credit(amount);
        }
        let available = self.available;
        self.adjustments
            .insert(key.clone(), (direction, amount, now));
        self.adjusted_at.push_back((now, key.clone()));
        self.journal.push(
            now,
            EntryKind::Adjustment,
            amount,
            Some(direction),
            available,
            Some(key),
            Some(reason),
        );
        Ok(Adjusted {
            applied: true,
            available_after: available,
        })
    }

    /// Reservations remembered, open or finished (for tests and diagnostics).
    pub fn retained_reservations(&self) -> usize {
        self.reservations.len()
    }

    /// Open reservations (for tests and diagnostics).
    pub fn open_reservations(&self) -> usize {
        self.reservations
            .values()
            .filter(|r| r.state == State::Open)
            .count()
    }
}
