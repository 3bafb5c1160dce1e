//! Property tests of the period arithmetic: every window contains its moment, windows tile
//! time without gaps or overlaps, and boundaries fall where the calendar says (anchors on the
//! 29th, 30th and 31st, leap years, quarter and year boundaries, fixed offsets).

use proptest::prelude::*;
use tower_402::plan::{Calendar, Period};
use tower_402::Timestamp;

const DAY: u64 = 86_400;
/// 1971 to 2200: leap years, century years (2100 is not leap) and 2000 (leap) in range.
const FROM: u64 = 31_536_000;
const TO: u64 = 7_258_118_400;

fn period() -> impl Strategy<Value = Period> {
    prop_oneof![
        Just(Period::Hour),
        Just(Period::Day),
        Just(Period::Week),
        Just(Period::CalendarMonth),
        Just(Period::Quarter),
        Just(Period::Year),
        Just(Period::BillingMonth),
        Just(Period::BillingYear),
    ]
}

fn offset() -> impl Strategy<Value = i32> {
    prop_oneof![
        Just(0),
        -18 * 3600..=18 * 3600,
        (-12..=14i32).prop_map(|h| h * 3600)
    ]
}

/// Anchors biased to the end of the month, where months of different lengths disagree.
fn anchor() -> impl Strategy<Value = Timestamp> {
    (
        1971..2150i32,
        1..=12u32,
        prop_oneof![Just(28u32), Just(29), Just(30), Just(31), 1..=31u32],
        0..DAY,
    )
        .prop_filter_map("a real date", |(y, m, d, tod)| {
            Timestamp::from_utc(y, m, d, 0, 0, 0).map(|t| t.plus_secs(tod))
        })
}

/// Local civil date and seconds into the day of `t` in `offset`.
fn civil(t: Timestamp, offset: i32) -> (i32, u32, u32, u64) {
    let local = Timestamp::from_unix((t.unix() as i64 + i64::from(offset)) as u64);
    let (y, m, d) = local.date();
    (y, m, d, local.unix() % DAY)
}

fn days_in_month(y: i32, m: u32) -> u32 {
    (28..=31)
        .rev()
        .find(|d| Timestamp::from_utc(y, m, *d, 0, 0, 0).is_some())
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn windows_contain_their_moment_and_tile_time(
        p in period(), t in FROM..TO, off in offset(), a in proptest::option::of(anchor())
    ) {
        let mut cal = Calendar::with_offset(off).unwrap();
        cal.anchor = a;
        let now = Timestamp::from_unix(t);
        let (start, end) = p.window_in(now, &cal);
        prop_assert!(start <= now && now < end, "{} <= {} < {}", start, now, end);
        // The next window starts where this one ends; the window is the same from its start.
        prop_assert_eq!(p.window_in(end, &cal).0, end);
        prop_assert_eq!(p.window_in(start, &cal), (start, end));
        prop_assert_eq!(p.window_in(Timestamp::from_unix(end.unix() - 1), &cal), (start, end));

        let len = end.unix() - start.unix();
        let (sy, sm, sd, stod) = civil(start, off);
        let billing = matches!(p, Period::BillingMonth | Period::BillingYear) && a.is_some();
        match p {
            Period::Hour => prop_assert_eq!(len, 3600),
            Period::Day => prop_assert_eq!(len, DAY),
            Period::Week => {
                prop_assert_eq!(len, 7 * DAY);
                // Monday: days since 1970-01-01 (a Thursday) + 3 is a multiple of 7.
                let local_days = (start.unix() as i64 + i64::from(off)).div_euclid(DAY as i64);
                prop_assert_eq!((local_days + 3).rem_euclid(7), 0);
            }
            Period::CalendarMonth | Period::BillingMonth if !billing => {
                prop_assert!((28 * DAY..=31 * DAY).contains(&len));
                prop_assert_eq!((sd, stod), (1, 0));
            }
            Period::Quarter => {
                prop_assert!((90 * DAY..=92 * DAY).contains(&len));
                prop_assert!([1, 4, 7, 10].contains(&sm) && sd == 1 && stod == 0, "{}", start);
            }
            Period::Year | Period::BillingYear if !billing => {
                prop_assert!(len == 365 * DAY || len == 366 * DAY);
                prop_assert_eq!((sm, sd, stod), (1, 1, 0));
            }
            Period::BillingMonth | Period::BillingYear => {
                // On the anchor's day (the last day of shorter months), at its time of day.
                let (_, am, ad, atod) = civil(a.unwrap(), off);
                prop_assert_eq!(stod, atod);
                prop_assert_eq!(sd, ad.min(days_in_month(sy, sm)), "{} for anchor {:?}", start, a);
                if p == Period::BillingYear {
                    prop_assert_eq!(sm, am);
                    prop_assert!((365 * DAY..=366 * DAY).contains(&len));
                } else {
                    prop_assert!((28 * DAY..=31 * DAY).contains(&len));
                }
            }
            _ => unreachable!(),
        }
    }
}

#[test]
fn quarter_boundaries_in_utc() {
    let q = |y, m, d| Period::Quarter.window(Timestamp::from_utc(y, m, d, 12, 0, 0).unwrap());
    for (m, start, end) in [
        (2, "2027-01-01", "2027-04-01"),
        (4, "2027-04-01", "2027-07-01"),
        (9, "2027-07-01", "2027-10-01"),
        (12, "2027-10-01", "2028-01-01"),
    ] {
        let (s, e) = q(2027, m, 1);
        assert_eq!(s.to_string(), format!("{start}T00:00:00Z"));
        assert_eq!(e.to_string(), format!("{end}T00:00:00Z"));
    }
}

#[test]
fn anchors_on_the_29th_and_30th_in_february() {
    for (anchor_day, year, feb_end) in [
        (29, 2026, 28),
        (30, 2026, 28),
        (30, 2028, 29),
        (29, 2028, 29),
    ] {
        let cal =
            Calendar::UTC.anchored(Timestamp::from_utc(2025, 1, anchor_day, 0, 0, 0).unwrap());
        let (s, e) = Period::BillingMonth
            .window_in(Timestamp::from_utc(year, 2, 10, 0, 0, 0).unwrap(), &cal);
        assert_eq!(s.to_string(), format!("{year}-01-{anchor_day}T00:00:00Z"));
        assert_eq!(e.to_string(), format!("{year}-02-{feb_end}T00:00:00Z"));
        let (s2, e2) = Period::BillingMonth.window_in(e, &cal);
        assert_eq!(s2, e);
        assert_eq!(e2.to_string(), format!("{year}-03-{anchor_day}T00:00:00Z"));
    }
}
