//! Period arithmetic: the window of a [`Period`] that contains a moment, in UTC or a fixed
//! offset, and anchored to a billing date where the period says so.

use serde::{Deserialize, Serialize};

use super::Period;
use crate::time::{civil_from_days, days_from_civil, days_in_month, Timestamp};

const DAY: i64 = 86_400;

/// The largest offset from UTC accepted, in seconds (±18 hours, as ISO 8601 and RFC 3339
/// allow; real zones stay within −12 h and +14 h).
pub const MAX_UTC_OFFSET_SECS: i32 = 18 * 3600;

/// Where periods are counted: a fixed offset from UTC, and the billing anchor of
/// [`Period::BillingMonth`] and [`Period::BillingYear`].
///
/// ```
/// use tower_402::plan::{Calendar, Period};
/// use tower_402::Timestamp;
///
/// // A subscription that started on 31 January: its months end on the last day of shorter
/// // months, at the time of day it started.
/// let start = Timestamp::from_utc(2025, 1, 31, 9, 30, 0).unwrap();
/// let cal = Calendar::UTC.anchored(start);
/// let now = Timestamp::from_utc(2025, 3, 1, 0, 0, 0).unwrap();
/// let (from, to) = Period::BillingMonth.window_in(now, &cal);
/// assert_eq!(from.to_string(), "2025-02-28T09:30:00Z");
/// assert_eq!(to.to_string(), "2025-03-31T09:30:00Z");
///
/// // Quarters counted in UTC+02:00.
/// let cal = Calendar::with_offset(7_200).unwrap();
/// let (from, to) = Period::Quarter.window_in(now, &cal);
/// assert_eq!(from.to_string(), "2024-12-31T22:00:00Z");
/// assert_eq!(to.to_string(), "2025-03-31T22:00:00Z");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Calendar {
    /// Seconds east of UTC (`3600` is UTC+01:00, `-18000` UTC−05:00). Fixed: no daylight
    /// saving time, so every day has 24 hours and windows never move.
    #[serde(default)]
    pub utc_offset_secs: i32,
    /// The billing anchor: when the subscription's first period began. Billing periods start
    /// on its day of the month (the last day of shorter months) at its time of day, in the
    /// calendar's offset. Without an anchor they are calendar months and years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Timestamp>,
}

/// An offset from UTC beyond [`MAX_UTC_OFFSET_SECS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("UTC offset of {0} seconds is beyond ±18 hours")]
pub struct InvalidOffset(pub i32);

impl Calendar {
    /// UTC, no anchor.
    pub const UTC: Calendar = Calendar {
        utc_offset_secs: 0,
        anchor: None,
    };

    /// A fixed offset from UTC, in seconds east.
    pub fn with_offset(utc_offset_secs: i32) -> Result<Self, InvalidOffset> {
        if utc_offset_secs.abs() > MAX_UTC_OFFSET_SECS {
            return Err(InvalidOffset(utc_offset_secs));
        }
        Ok(Calendar {
            utc_offset_secs,
            anchor: None,
        })
    }

    /// The same calendar, with billing periods anchored at `anchor`.
    pub fn anchored(mut self, anchor: Timestamp) -> Self {
        self.anchor = Some(anchor);
        self
    }

    fn offset(&self) -> i64 {
        i64::from(
            self.utc_offset_secs
                .clamp(-MAX_UTC_OFFSET_SECS, MAX_UTC_OFFSET_SECS),
        )
    }
}

/// The last second of year 9999: later timestamps are counted as this one, so the civil
/// arithmetic below stays in range (and the anchored search in a few steps).
const LAST: i64 = 253_402_300_799;

/// Seconds since the epoch in local time, for a timestamp.
fn local(t: Timestamp, offset: i64) -> i64 {
    i64::try_from(t.unix()).unwrap_or(LAST).min(LAST) + offset
}

/// Back from local seconds to a timestamp; moments before the epoch are the epoch.
fn utc(local: i64, offset: i64) -> Timestamp {
    Timestamp::from_unix(u64::try_from(local - offset).unwrap_or(0))
}

/// Local midnight, as local seconds, of a civil date whose day may exceed the month (clamped
/// to its last day).
fn midnight(y: i32, m: u32, d: u32) -> i64 {
    days_from_civil(y, m, d.min(days_in_month(y, m))) * DAY
}

/// `(year, month)` moved by `k` months.
fn add_months(y: i32, m: u32, k: i64) -> (i32, u32) {
    let idx = i64::from(y) * 12 + i64::from(m) - 1 + k;
    // Years stay in i32 for every timestamp `local` can produce.
    (idx.div_euclid(12) as i32, (idx.rem_euclid(12) + 1) as u32)
}

impl Period {
    /// The window containing `now`, counted in `calendar`: its start and the moment it resets.
    /// `start <= now < resets_at`, and the next window starts at `resets_at`.
    pub fn window_in(self, now: Timestamp, calendar: &Calendar) -> (Timestamp, Timestamp) {
        let off = calendar.offset();
        let t = local(now, off);
        let days = t.div_euclid(DAY);
        let (y, m, _) = civil_from_days(days);
        let (start, end) = match self {
            Period::Hour => {
                let s = t - t.rem_euclid(3600);
                (s, s + 3600)
            }
            Period::Day => (days * DAY, (days + 1) * DAY),
            Period::Week => {
                // 1970-01-01 was a Thursday: weeks start on Monday, ISO 8601's first day.
                let monday = days - (days + 3).rem_euclid(7);
                (monday * DAY, (monday + 7) * DAY)
            }
            Period::CalendarMonth => {
                let (ny, nm) = add_months(y, m, 1);
                (midnight(y, m, 1), midnight(ny, nm, 1))
            }
            Period::Quarter => {
                let qm = (m - 1) / 3 * 3 + 1;
                let (ny, nm) = add_months(y, qm, 3);
                (midnight(y, qm, 1), midnight(ny, nm, 1))
            }
            Period::Year => (midnight(y, 1, 1), midnight(y + 1, 1, 1)),
            Period::BillingMonth | Period::BillingYear => {
                let step = if self == Period::BillingMonth { 1 } else { 12 };
                match calendar.anchor {
                    Some(anchor) => anchored(t, local(anchor, off), step),
                    None if step == 1 => {
                        return Period::CalendarMonth.window_in(now, calendar);
                    }
                    None => return Period::Year.window_in(now, calendar),
                }
            }
        };
        (utc(start, off), utc(end, off))
    }

    /// The period's name as configuration and problem documents spell it (`"quarter"`).
    pub fn name(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::CalendarMonth => "calendar_month",
            Period::Quarter => "quarter",
            Period::Year => "year",
            Period::BillingMonth => "billing_month",
            Period::BillingYear => "billing_year",
        }
    }
}

/// The anchored window of `step` months containing local time `t`, for a local anchor `a`.
fn anchored(t: i64, a: i64, step: i64) -> (i64, i64) {
    let a_days = a.div_euclid(DAY);
    let a_tod = a.rem_euclid(DAY);
    let (ay, am, ad) = civil_from_days(a_days);
    let start = |k: i64| {
        let (y, m) = add_months(ay, am, k * step);
        midnight(y, m, ad) + a_tod
    };
    let (ty, tm, _) = civil_from_days(t.div_euclid(DAY));
    let months = (i64::from(ty) - i64::from(ay)) * 12 + i64::from(tm) - i64::from(am);
    let mut k = months.div_euclid(step);
    // The guess is at most one period off either way.
    while start(k) > t {
        k -= 1;
    }
    while start(k + 1) <= t {
        k += 1;
    }
    (start(k), start(k + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> Timestamp {
        Timestamp::from_utc(y, m, d, h, 0, 0).unwrap()
    }

    fn window(p: Period, now: Timestamp, cal: &Calendar) -> (String, String) {
        let (s, e) = p.window_in(now, cal);
        (s.to_string(), e.to_string())
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-12-02 is a Wednesday.
        let w = window(Period::Week, at(2026, 12, 2, 15), &Calendar::UTC);
        assert_eq!(w.0, "2026-11-30T00:00:00Z");
        assert_eq!(w.1, "2026-12-07T00:00:00Z");
    }

    #[test]
    fn quarters_and_years() {
        let q = window(Period::Quarter, at(2026, 12, 2, 0), &Calendar::UTC);
        assert_eq!(
            q,
            ("2026-10-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        let y = window(Period::Year, at(2024, 2, 29, 0), &Calendar::UTC);
        assert_eq!(
            y,
            ("2024-01-01T00:00:00Z".into(), "2025-01-01T00:00:00Z".into())
        );
    }

    #[test]
    fn a_31st_anchor_ends_on_the_last_day_of_shorter_months() {
        let cal = Calendar::UTC.anchored(at(2024, 1, 31, 0));
        let feb = window(Period::BillingMonth, at(2024, 2, 15, 0), &cal);
        assert_eq!(
            feb,
            ("2024-01-31T00:00:00Z".into(), "2024-02-29T00:00:00Z".into())
        );
        let mar = window(Period::BillingMonth, at(2024, 3, 5, 0), &cal);
        assert_eq!(
            mar,
            ("2024-02-29T00:00:00Z".into(), "2024-03-31T00:00:00Z".into())
        );
        let apr = window(Period::BillingMonth, at(2024, 4, 30, 12), &cal);
        assert_eq!(
            apr,
            ("2024-04-30T00:00:00Z".into(), "2024-05-31T00:00:00Z".into())
        );
    }

    #[test]
    fn a_leap_day_anchor_falls_on_the_28th_in_other_years() {
        let cal = Calendar::UTC.anchored(at(2024, 2, 29, 6));
        let y = window(Period::BillingYear, at(2025, 6, 1, 0), &cal);
        assert_eq!(
            y,
            ("2025-02-28T06:00:00Z".into(), "2026-02-28T06:00:00Z".into())
        );
        let y = window(Period::BillingYear, at(2028, 2, 29, 6), &cal);
        assert_eq!(y.0, "2028-02-29T06:00:00Z");
    }

    #[test]
    fn offsets_move_every_boundary() {
        let cal = Calendar::with_offset(-5 * 3600).unwrap();
        // 03:00 UTC on the 1st is still the 31st in UTC−05:00.
        let d = window(Period::Day, at(2026, 1, 1, 3), &cal);
        assert_eq!(
            d,
            ("2025-12-31T05:00:00Z".into(), "2026-01-01T05:00:00Z".into())
        );
        let m = window(Period::CalendarMonth, at(2026, 1, 1, 3), &cal);
        assert_eq!(m.0, "2025-12-01T05:00:00Z");
        assert!(Calendar::with_offset(18 * 3600 + 1).is_err());
        assert!(Calendar::with_offset(-18 * 3600).is_ok());
        // A half-hour zone counts hours from the half hour.
        let cal = Calendar::with_offset(5 * 3600 + 1800).unwrap();
        let h = window(Period::Hour, at(2026, 1, 1, 3), &cal);
        assert_eq!(
            h,
            ("2026-01-01T02:30:00Z".into(), "2026-01-01T03:30:00Z".into())
        );
    }

    #[test]
    fn the_epoch_and_the_far_future_do_not_panic() {
        let cal = Calendar::with_offset(MAX_UTC_OFFSET_SECS).unwrap();
        for p in [
            Period::Hour,
            Period::Day,
            Period::Week,
            Period::CalendarMonth,
            Period::Quarter,
            Period::Year,
            Period::BillingMonth,
            Period::BillingYear,
        ] {
            let _ = p.window_in(Timestamp::EPOCH, &cal);
            let _ = p.window_in(Timestamp::from_unix(u64::MAX), &cal);
            let _ = p.window_in(
                Timestamp::from_unix(u64::MAX),
                &cal.anchored(Timestamp::EPOCH),
            );
        }
    }
}
