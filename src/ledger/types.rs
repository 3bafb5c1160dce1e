use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::account::AccountId;
use crate::charge::Charge;
use crate::credits::Credits;
use crate::denial::Denial;
use crate::error::LedgerError;
use crate::ledger::PerCharge;
use crate::plan::Meter;
use crate::time::Timestamp;

/// A reservation's key within its account: `idem:` and the request's `Idempotency-Key`, or a
/// key unique to one request.
///
/// Cheap to clone (reference counted): a ledger keeps it in more than one index, and the
/// metering layer holds it until the response body ends, without copying the text.
///
/// ```
/// use tower_402::ledger::ReservationKey;
///
/// let key = ReservationKey::from("idem:order-42");
/// assert_eq!(key.as_str(), "idem:order-42");
/// assert_eq!(&*key, "idem:order-42");
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReservationKey(Arc<str>);

impl ReservationKey {
    /// A key from any string.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        ReservationKey(key.into())
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for ReservationKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ReservationKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets a map keyed by `ReservationKey` be searched with a `&str`.
impl Borrow<str> for ReservationKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ReservationKey {
    fn from(key: &str) -> Self {
        ReservationKey(key.into())
    }
}

impl From<String> for ReservationKey {
    fn from(key: String) -> Self {
        ReservationKey(key.into())
    }
}

impl fmt::Debug for ReservationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ReservationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies a reservation: the account and the key it was made under.
///
/// The key is the request's `Idempotency-Key` when it has one (so a retry finds the same
/// reservation), otherwise a key unique to the request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReservationId {
    /// Who pays.
    pub account: AccountId,
    /// Idempotency scope within the account.
    pub key: ReservationKey,
}

/// What to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Who pays.
    pub account: AccountId,
    /// Idempotency scope within the account.
    pub key: ReservationKey,
    /// A digest of the request; the same key with a different fingerprint is a conflict.
    pub fingerprint: u64,
    /// One entry per meter. Shared, not copied, with the ledger's record of the hold and
    /// with the metering layer that settles it.
    pub charges: Arc<[Charge]>,
    /// How long the hold lives if neither settled nor released.
    pub ttl_secs: u64,
    /// Whether `key` is a client's idempotency key. Then the reservation is remembered for
    /// the retention time after it ends, so a retry is recognized (charged once). Otherwise
    /// the key is unique to one request and can never come back: every backend forgets the
    /// reservation as soon as it is settled or released, keeping storage flat.
    pub idempotent: bool,
    /// What happens to the hold if it is neither settled nor released before `ttl_secs`.
    pub on_expiry: OnExpiry,
    /// A number unique to this attempt (`0`: none). A reserve that finds an open
    /// reservation under its key made by the same attempt (its reply was lost and the call is
    /// tried again) gets that reservation back as [`ReserveOutcome::Reserved`], instead of
    /// [`Replay::InProgress`], which it answers to any other attempt: so a lost reply can be
    /// recovered under a client's idempotency key, never mistaken for a concurrent duplicate.
    pub attempt: u64,
    /// The current time.
    pub now: Timestamp,
}

/// What a reservation that is neither settled nor released becomes when its hold expires.
///
/// The ledger cannot see the work, so whoever reserves says which kind of hold it is. The
/// metering layer reserves right before it calls the handler, so its holds are
/// [`Charge`](OnExpiry::Charge): if the settlement never lands (the instance died, the store
/// was down until the hold expired, a stream stalled past its hold), the work ran and is
/// charged its estimate. When the layer knows the handler never started (the reservation's
/// reply was lost, the request was cancelled first) it releases the hold, and the release
/// lands even after the expiry (it gives the provisional charge back).
///
/// | | settled or released in time | left to expire |
/// |---|---|---|
/// | `Charge` | as asked | charged the estimate (held credit and allowance units); a later `settle` charges the actual usage instead (the difference is drawn or given back), a later `release` gives it all back; a retry under its key is [`Replay::Completed`] |
/// | `Release` | as asked | given back; a later `settle` still charges what it is given, drawing on `available`; a retry under its key reserves afresh |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnExpiry {
    /// The work starts on the reservation's reply: an expired hold is charged its estimate.
    /// What the metering layer reserves.
    #[default]
    Charge,
    /// A hold taken ahead of any work (a lease, a quote): given back when it expires.
    Release,
}

/// [`ReserveRequest::validate`] for any list of charges (a hold's, too).
pub(crate) fn one_charge_per_meter(charges: &[Charge]) -> Result<(), LedgerError> {
    for (i, c) in charges.iter().enumerate() {
        if charges[..i].iter().any(|d| d.meter == c.meter) {
            return Err(LedgerError::DuplicateMeter(c.meter.clone()));
        }
    }
    Ok(())
}

impl ReserveRequest {
    /// Checks what every backend relies on: each meter appears in one charge only (usage is
    /// reported per meter, so two charges on one meter would both be charged all of it).
    pub fn validate(&self) -> Result<(), LedgerError> {
        one_charge_per_meter(&self.charges)
    }

    /// The id the reservation will have.
    pub fn id(&self) -> ReservationId {
        ReservationId {
            account: self.account.clone(),
            key: self.key.clone(),
        }
    }
}

/// A hold that was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its id.
    pub id: ReservationId,
    /// Credits held.
    pub credits: Credits,
    /// Allowance units held, one per charge, in order.
    pub allowance_units: PerCharge<u64>,
    /// When it expires if not settled or released.
    pub expires_at: Timestamp,
    /// `available` after the hold.
    pub available_after: Credits,
    /// Allowance left per charge after the hold (`None` for a meter without allowance).
    pub allowance_left: PerCharge<Option<u64>>,
}

/// A hold without a keyed record, owned by the one request it was made for: what
/// [`AccountBook::hold`](crate::ledger::AccountBook::hold) and the in-process ledgers' fast
/// path answer (see [`InProcessLedger::hold`](crate::in_process::InProcessLedger::hold)).
///
/// Made only by a ledger (`#[non_exhaustive]`): a `Hold` is a claim on held credit, and a
/// made-up one handed to `settle_hold` or `release_hold` would move credit that was never held.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Hold {
    /// Credits held.
    pub credits: Credits,
    /// Allowance units held, one per charge, in order.
    pub allowance_units: PerCharge<u64>,
    /// `available` after the hold.
    pub available_after: Credits,
    /// Allowance left per charge after the hold (`None` for a meter without allowance).
    pub allowance_left: PerCharge<Option<u64>>,
}

/// A retry of an earlier reservation under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replay {
    /// The earlier request still holds its reservation (it is running).
    InProgress,
    /// The earlier request was settled; nothing more is charged.
    Completed(Settlement),
}

/// The answer to [`Ledger::reserve`](crate::Ledger::reserve).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReserveOutcome {
    /// Held.
    Reserved(Reservation),
    /// The key was seen before with the same fingerprint.
    Replayed(Replay),
    /// Not enough credit or allowance: `INSUFFICIENT_CREDITS` or `QUOTA_EXCEEDED`.
    Denied(Denial),
}

/// Units actually used of one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// What was counted.
    pub meter: Meter,
    /// How many.
    pub units: u64,
}

impl Usage {
    /// `units` of `meter`.
    pub fn new(meter: impl AsRef<str>, units: u64) -> Self {
        Usage {
            meter: Meter::new(meter),
            units,
        }
    }
}

/// What to do when the actual cost exceeds what was held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OverEstimate {
    /// Take the difference from `available` as far as it goes; report the rest as a
    /// shortfall. The default: the caller pays for what it used, never below zero.
    #[default]
    DrawBalance,
    /// Never charge more than was held; the difference is a shortfall. (A reservation whose
    /// hold lapsed before it was settled held nothing; it is settled as under `DrawBalance`,
    /// or the work would be free.)
    CapAtHold,
    /// As `DrawBalance`, then charge what `available` cannot pay into a bounded overdraft:
    /// the account may owe up to this many credits in all ([`Balance::overdrawn`]); only
    /// the rest is a shortfall. Credit that comes back later (a deposit, a credit
    /// adjustment, a released hold) repays the overdraft before it can be spent.
    /// `Overdraft(Credits::ZERO)` is `DrawBalance`.
    Overdraft(Credits),
}

/// What could not be charged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    /// Credits that were owed but not available (or beyond the hold under
    /// [`OverEstimate::CapAtHold`]). A cost beyond [`Credits::MAX_EXACT`] (no balance can
    /// ever hold it) is counted as that amount, on every backend.
    pub credits: Credits,
    /// Units beyond an allowance on a plan without overage, per meter with any.
    pub units: Vec<(Meter, u64)>,
}

impl Shortfall {
    /// Whether everything was charged.
    pub fn is_empty(&self) -> bool {
        self.credits.is_zero() && self.units.iter().all(|(_, u)| *u == 0)
    }
}

/// The result of a settlement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// Credits charged.
    pub charged: Credits,
    /// Allowance units consumed, per charge in order.
    pub allowance_units: PerCharge<u64>,
    /// What could not be charged.
    pub shortfall: Shortfall,
    /// `available` afterwards.
    pub available_after: Credits,
    /// `available + held` afterwards: the balance not yet spent, holds included.
    pub unspent_after: Credits,
    /// Allowance units used (settled) in the window afterwards, per charge in order (`None`
    /// for a meter without allowance).
    pub allowance_used_after: PerCharge<Option<u64>>,
}

/// The result of a deposit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deposit {
    /// `false` when the key was seen before and nothing was added this time.
    pub applied: bool,
    /// The account afterwards.
    pub balance: Balance,
}

/// An account's buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Can be reserved.
    pub available: Credits,
    /// Held by open reservations.
    pub held: Credits,
    /// Spent.
    pub settled: Credits,
    /// Everything ever deposited (net of adjustments): always
    /// `deposited + overdrawn = available + held + settled`.
    pub deposited: Credits,
    /// Owed: charged beyond the balance under [`OverEstimate::Overdraft`], not yet repaid.
    /// Never above the overdraft limit the settlement allowed; while it is above zero,
    /// `available` is zero (credit that comes back repays it first). The balance, signed, is
    /// `available - overdrawn`.
    #[serde(default)]
    pub overdrawn: Credits,
}

/// Allowance units of one meter in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowanceUsage {
    /// Consumed by settled requests.
    pub used: u64,
    /// Held by open reservations.
    pub held: u64,
}

impl AllowanceUsage {
    /// `used + held`.
    pub fn taken(&self) -> u64 {
        self.used.saturating_add(self.held)
    }
}
