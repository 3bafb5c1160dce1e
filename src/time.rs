//! [`Timestamp`] and [`Clock`]: time as plain Unix seconds, with the clock injected.
//!
//! The decision function and the ledgers never read the clock themselves; the layers read it
//! once per request from a [`Clock`] and pass `now` down. Tests use [`ManualClock`] to move time
//! without sleeping.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time: whole seconds since the Unix epoch, UTC.
///
/// Serialized as an integer, which is what payment processors' webhooks carry
/// (Stripe's `current_period_end`, for one). [`Display`](fmt::Display) renders RFC 3339.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from Unix seconds.
    pub const fn from_unix(secs: u64) -> Self {
        Timestamp(secs)
    }

    /// Unix seconds.
    pub const fn unix(self) -> u64 {
        self.0
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Timestamp(secs)
    }

    /// A timestamp from a UTC calendar date and time of day.
    ///
    /// Returns `None` for an impossible date (month 13, February 30, a year before 1970).
    pub fn from_utc(
        year: i32,
        month: u32,
        day: u32,
        hour: u32,
        min: u32,
        sec: u32,
    ) -> Option<Self> {
        if !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year, month)
            || hour > 23
            || min > 59
            || sec > 59
        {
            return None;
        }
        let days = days_from_civil(year, month, day);
        let secs = days
            .checked_mul(86_400)?
            .checked_add(i64::from(hour * 3600 + min * 60 + sec))?;
        u64::try_from(secs).ok().map(Timestamp)
    }

    /// `self + secs`, saturating at the far future.
    pub const fn plus_secs(self, secs: u64) -> Self {
        Timestamp(self.0.saturating_add(secs))
    }

    /// Seconds from `self` until `later`, zero if `later` is not after `self`.
    pub const fn secs_until(self, later: Timestamp) -> u64 {
        later.0.saturating_sub(self.0)
    }

    /// The UTC calendar date: (year, month 1–12, day 1–31).
    pub fn date(self) -> (i32, u32, u32) {
        civil_from_days((self.0 / 86_400) as i64)
    }

    /// Midnight UTC on the first day of this timestamp's month.
    pub fn start_of_month(self) -> Timestamp {
        let (y, m, _) = self.date();
        Timestamp::from_utc(y, m, 1, 0, 0, 0).unwrap_or(self)
    }

    /// Midnight UTC on the first day of the next month.
    pub fn start_of_next_month(self) -> Timestamp {
        let (y, m, _) = self.date();
        let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Timestamp::from_utc(y, m, 1, 0, 0, 0).unwrap_or(Timestamp(u64::MAX))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d) = self.date();
        let rem = self.0 % 86_400;
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

pub(crate) fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub(crate) fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        _ => 28,
    }
}

// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((y + i64::from(m <= 2)) as i32, m, d)
}

/// Where the layers read the time from.
///
/// Implemented for [`SystemClock`] (the default), [`ManualClock`] (tests, demos) and any
/// `Fn() -> Timestamp`.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

impl<F> Clock for F
where
    F: Fn() -> Timestamp + Send + Sync + 'static,
{
    fn now(&self) -> Timestamp {
        self()
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// ```
/// use tower_402::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_unix(1_000));
/// let seen_by_layer = clock.clone();
/// clock.advance(60);
/// assert_eq!(seen_by_layer.now(), Timestamp::from_unix(1_060));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: Timestamp) -> Self {
        ManualClock(Arc::new(AtomicU64::new(at.unix())))
    }

    /// Sets the time.
    pub fn set(&self, at: Timestamp) {
        self.0.store(at.unix(), Ordering::SeqCst);
    }

    /// Moves the time forward by `secs`.
    pub fn advance(&self, secs: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(secs))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        let t = Timestamp::from_utc(2024, 2, 29, 13, 5, 9).unwrap();
        assert_eq!(t.to_string(), "2024-02-29T13:05:09Z");
        assert_eq!(t.date(), (2024, 2, 29));
        assert_eq!(Timestamp::from_unix(0).to_string(), "1970-01-01T00:00:00Z");
        assert!(Timestamp::from_utc(2023, 2, 29, 0, 0, 0).is_none());
        assert!(Timestamp::from_utc(2023, 13, 1, 0, 0, 0).is_none());
    }

    #[test]
    fn month_boundaries() {
        let t = Timestamp::from_utc(2026, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(t.start_of_month().to_string(), "2026-12-01T00:00:00Z");
        assert_eq!(t.start_of_next_month().to_string(), "2027-01-01T00:00:00Z");
        for day in 0..2000u64 {
            let t = Timestamp::from_unix(day * 86_400 + 4321);
            let (y, m, d) = t.date();
            assert_eq!(Timestamp::from_utc(y, m, d, 1, 12, 1), Some(t));
        }
    }
}
