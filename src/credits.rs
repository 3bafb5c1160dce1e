//! [`Credits`]: money as checked integers.
//!
//! Every amount of money in this crate is a whole number of *minor units* (cents, micro-dollars,
//! "credits": whatever the application decides one unit is). There are no floats anywhere money
//! is counted, and every operation that could overflow or go below zero is checked and returns
//! `None` instead of wrapping.
//!
//! ```
//! use tower_402::Credits;
//!
//! let balance = Credits::new(100);
//! assert_eq!(balance.checked_sub(Credits::new(30)), Some(Credits::new(70)));
//! assert_eq!(balance.checked_sub(Credits::new(101)), None);
//! assert_eq!(Credits::new(u64::MAX).checked_add(Credits::new(1)), None);
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// A non-negative amount of prepaid credit, in integer minor units.
///
/// Arithmetic is only offered in checked form; there is deliberately no `Add` or `Sub` impl.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Credits(u64);

impl Credits {
    /// No credit at all.
    pub const ZERO: Credits = Credits(0);

    /// The largest amount that every backend stores exactly (2^53 − 1).
    ///
    /// Redis evaluates its Lua scripts with doubles; to keep one set of semantics across
    /// backends, ledger operations refuse amounts above this value.
    pub const MAX_EXACT: Credits = Credits((1 << 53) - 1);

    /// Wraps a number of minor units.
    pub const fn new(units: u64) -> Self {
        Credits(units)
    }

    /// The number of minor units.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// `self + other`, or `None` on overflow.
    pub const fn checked_add(self, other: Credits) -> Option<Credits> {
        match self.0.checked_add(other.0) {
            Some(v) => Some(Credits(v)),
            None => None,
        }
    }

    /// `self - other`, or `None` if the result would be negative.
    pub const fn checked_sub(self, other: Credits) -> Option<Credits> {
        match self.0.checked_sub(other.0) {
            Some(v) => Some(Credits(v)),
            None => None,
        }
    }

    /// `self × n` (a unit price times a number of units), or `None` on overflow.
    pub const fn checked_mul(self, n: u64) -> Option<Credits> {
        match self.0.checked_mul(n) {
            Some(v) => Some(Credits(v)),
            None => None,
        }
    }

    /// `self - other`, stopping at zero. Used only where "as far as it goes" is the rule.
    pub const fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }

    /// Whether this is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u64> for Credits {
    fn from(units: u64) -> Self {
        Credits(units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_never_wraps() {
        assert_eq!(Credits::new(1).checked_sub(Credits::new(2)), None);
        assert_eq!(Credits::new(u64::MAX).checked_add(Credits::new(1)), None);
        assert_eq!(Credits::new(u64::MAX).checked_mul(2), None);
        assert_eq!(Credits::new(7).checked_mul(3), Some(Credits::new(21)));
        assert_eq!(
            Credits::new(3).saturating_sub(Credits::new(5)),
            Credits::ZERO
        );
    }

    #[test]
    fn serializes_as_a_plain_integer() {
        assert_eq!(serde_json::to_string(&Credits::new(42)).unwrap(), "42");
        let c: Credits = serde_json::from_str("42").unwrap();
        assert_eq!(c, Credits::new(42));
        assert!(serde_json::from_str::<Credits>("-1").is_err());
        assert!(serde_json::from_str::<Credits>("1.5").is_err());
    }
}
