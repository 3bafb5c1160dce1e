//! What a request costs: a route's [`Cost`] and the ledger [`Charge`] it becomes under a plan
//! at a moment, with the integer price arithmetic every backend shares.
//!
//! Below both the decision and the ledger: each reads it, neither imports the other.

use serde::{Deserialize, Serialize};

use crate::credits::Credits;
use crate::denial::Denial;
use crate::plan::{AllowanceWindow, Meter, Plan};
use crate::time::Timestamp;

/// A fixed cost: `units` of `meter`, each `unit_price` credits beyond the plan's allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// What is counted.
    pub meter: Meter,
    /// Units per request.
    pub units: u64,
    /// Credits per `price_per` units when paid from credit.
    pub unit_price: Credits,
    /// How many units `unit_price` buys (default 1).
    #[serde(default = "one")]
    pub price_per: u64,
    /// Whether the metering layer may reserve fewer units than this estimate, down to one,
    /// when the caller's plan has no overage and less of its allowance for `meter` left: see
    /// [`lower_to_allowance`](Self::lower_to_allowance).
    #[serde(default)]
    pub lower_to_allowance: bool,
}

impl Cost {
    /// `units` of `meter` at `unit_price` each.
    pub fn new(meter: impl AsRef<str>, units: u64, unit_price: Credits) -> Self {
        Cost {
            meter: Meter::new(meter),
            units,
            unit_price,
            price_per: 1,
            lower_to_allowance: false,
        }
    }

    /// Lets the metering layer reserve fewer units than this estimate when the caller's plan
    /// has no overage and has less of its allowance for this meter left: it reserves what is
    /// left (at least one unit, so a used-up allowance is still `402 QUOTA_EXCEEDED`), and
    /// tells the handler in [`Entitlement::reserved_below_estimate`], which must then do no
    /// more work than that (an LLM proxy passes it on as the model's output limit).
    ///
    /// For an estimate that is a ceiling rather than a need (`max_tokens`, with a small
    /// completion expected): a free plan with 200 output tokens left is not refused a request
    /// whose default `max_tokens` is 256; it is served, up to 200 tokens.
    ///
    /// [`Entitlement::reserved_below_estimate`]: crate::Entitlement::reserved_below_estimate
    pub fn lower_to_allowance(mut self) -> Self {
        self.lower_to_allowance = true;
        self
    }

    /// Prices per `n` units instead of per unit: `Cost::new("tokens", 500, Credits::new(150))
    /// .per(1_000_000)` is 500 tokens at 150 credits per million, rounded up to whole credits.
    pub fn per(mut self, n: u64) -> Self {
        self.price_per = n.max(1);
        self
    }

    /// The ledger charge for this cost under `plan` at `now`.
    pub fn charge(&self, plan: &Plan, now: Timestamp) -> Charge {
        Charge {
            meter: self.meter.clone(),
            units: self.units,
            unit_price: self.unit_price,
            price_per: self.price_per,
            allowance: plan.allowance_for(&self.meter).map(|a| a.window(now)),
            overage: plan.overage,
        }
    }
}

/// One meter's part of a reservation: how many units, at what price, against which allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// What is counted.
    pub meter: Meter,
    /// Units (the estimate when reserving).
    pub units: u64,
    /// Credits per `price_per` units beyond the allowance.
    pub unit_price: Credits,
    /// How many units `unit_price` buys (1 for a per-unit price, 1,000,000 for a price per
    /// million tokens). The credit cost of `n` units is `ceil(n × unit_price / price_per)`.
    #[serde(default = "one")]
    pub price_per: u64,
    /// The plan's allowance for this meter in the current window, if any.
    pub allowance: Option<AllowanceWindow>,
    /// Whether units beyond the allowance may be paid from credit.
    pub overage: bool,
}

fn one() -> u64 {
    1
}

/// The credit cost of `units` at `unit_price` per `price_per` units, rounded up; `None` if
/// `units × unit_price` exceeds [`Credits::MAX_EXACT`] or `price_per` is zero. (The bound is
/// on the product, not the quotient, so every backend, Redis's doubles included, computes
/// the same thing exactly.)
pub(crate) fn price(units: u64, unit_price: Credits, price_per: u64) -> Option<Credits> {
    if price_per == 0 {
        return None;
    }
    let total = u128::from(units) * u128::from(unit_price.get());
    if total > u128::from(Credits::MAX_EXACT.get()) {
        return None;
    }
    let credits = total.div_ceil(u128::from(price_per));
    u64::try_from(credits)
        .ok()
        .map(Credits::new)
        .filter(|c| *c <= Credits::MAX_EXACT)
}

/// How a charge's units split between allowance and credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    pub allowance_units: u64,
    pub credits: Credits,
}

impl Charge {
    /// Splits `units` given `taken` units of the allowance already used or held.
    ///
    /// `Err` carries the refusal: the allowance is used up and overage is not allowed (a meter
    /// without allowance and without overage has an allowance of zero), or the price
    /// overflows.
    pub(crate) fn split(&self, units: u64, taken: u64) -> Result<Split, Denial> {
        let limit = self.allowance.map_or(0, |a| a.limit);
        let free = limit.saturating_sub(taken);
        let allowance_units = units.min(free);
        let rest = units - allowance_units;
        if rest == 0 {
            return Ok(Split {
                allowance_units,
                credits: Credits::ZERO,
            });
        }
        if !self.overage {
            if self.allowance.is_none() && self.unit_price.is_zero() {
                // A free meter with no allowance: nothing to count against.
                return Ok(Split {
                    allowance_units,
                    credits: Credits::ZERO,
                });
            }
            return Err(Denial::QuotaExceeded {
                meter: self.meter.clone(),
                limit,
                used: taken,
                resets_at: self.allowance.map(|a| a.resets_at),
                window_secs: self.allowance.map(|a| a.start.secs_until(a.resets_at)),
            });
        }
        match price(rest, self.unit_price, self.price_per) {
            Some(credits) => Ok(Split {
                allowance_units,
                credits,
            }),
            // Priced beyond anything a balance can hold; the caller fills in the balance.
            _ => Err(Denial::InsufficientCredits {
                balance: Credits::ZERO,
                required: Credits::MAX_EXACT,
            }),
        }
    }
}
