use std::fmt;
use std::sync::Arc;

use crate::account::AccountId;
use crate::credits::Credits;
use crate::ledger::{Charge, Settlement};
use crate::plan::Meter;

/// A level worth telling the application about before the hard stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Threshold {
    /// The available balance fell to this level or below (`BalanceAtOrBelow(Credits::ZERO)`:
    /// the account ran dry).
    BalanceAtOrBelow(Credits),
    /// This percentage of an allowance is used (80: "80 % used", 100: "used up").
    AllowancePercent(u8),
}

/// What crossed, in a [`ThresholdEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Crossing {
    /// The unspent balance (available plus held) went from above `level` to at or below it.
    Balance {
        /// The configured level.
        level: Credits,
        /// The unspent balance right after the crossing.
        available: Credits,
    },
    /// An allowance went from below `percent` used to at or above it.
    Allowance {
        /// Which meter.
        meter: Meter,
        /// The configured percentage.
        percent: u8,
        /// Units used right after the crossing.
        used: u64,
        /// The allowance.
        limit: u64,
    },
}

/// A threshold was crossed. Crossings are judged on what is *spent* (settled), not on holds:
/// a reservation that is later released never reports one. Each crossing is reported once:
/// the settlement that moved the balance (or allowance) across the level reports it, and
/// ledger operations on one account are atomic, so concurrent requests cannot both report the
/// same crossing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThresholdEvent {
    /// Whose balance or allowance.
    pub account: AccountId,
    /// What crossed.
    pub crossing: Crossing,
}

pub(crate) type Hook = Arc<dyn Fn(ThresholdEvent) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Thresholds {
    pub(crate) levels: Arc<[Threshold]>,
    pub(crate) hook: Hook,
}

impl fmt::Debug for Thresholds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Thresholds")
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

fn crossed_down(before: Credits, after: Credits, level: Credits) -> bool {
    before > level && after <= level
}

fn crossed_percent(before: u64, after: u64, limit: u64, percent: u8) -> bool {
    let mark = u128::from(limit) * u128::from(percent);
    limit > 0 && u128::from(before) * 100 < mark && u128::from(after) * 100 >= mark
}

impl Thresholds {
    fn emit(&self, account: &AccountId, crossing: Crossing) {
        tracing::info!(
            target: "tower_402::metering",
            account = account.as_str(),
            crossing = ?crossing,
            "threshold crossed"
        );
        crate::observe::threshold(match crossing {
            Crossing::Balance { .. } => "balance",
            _ => "allowance",
        });
        (self.hook)(ThresholdEvent {
            account: account.clone(),
            crossing,
        });
    }

    /// Crossings caused by a settlement: what was actually spent, so a hold that is given
    /// back never reports a crossing.
    pub(crate) fn after_settle(&self, account: &AccountId, charges: &[Charge], s: &Settlement) {
        let after = s.unspent_after;
        let before = after.checked_add(s.charged).unwrap_or(Credits::MAX_EXACT);
        for t in self.levels.iter() {
            match *t {
                Threshold::BalanceAtOrBelow(level) => {
                    if crossed_down(before, after, level) {
                        self.emit(
                            account,
                            Crossing::Balance {
                                level,
                                available: after,
                            },
                        );
                    }
                }
                Threshold::AllowancePercent(percent) => {
                    for ((charge, used), units) in charges
                        .iter()
                        .zip(&s.allowance_used_after)
                        .zip(&s.allowance_units)
                    {
                        let (Some(w), Some(used)) = (charge.allowance, used) else {
                            continue;
                        };
                        let before = used.saturating_sub(*units);
                        if crossed_percent(before, *used, w.limit, percent) {
                            self.emit(
                                account,
                                Crossing::Allowance {
                                    meter: charge.meter.clone(),
                                    percent,
                                    used: *used,
                                    limit: w.limit,
                                },
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_arithmetic() {
        assert!(crossed_down(
            Credits::new(5),
            Credits::new(0),
            Credits::ZERO
        ));
        assert!(!crossed_down(
            Credits::new(0),
            Credits::new(0),
            Credits::ZERO
        ));
        assert!(crossed_percent(3, 4, 5, 80));
        assert!(!crossed_percent(4, 5, 5, 80));
        assert!(crossed_percent(4, 5, 5, 100));
        assert!(!crossed_percent(0, 0, 0, 80));
    }
}
