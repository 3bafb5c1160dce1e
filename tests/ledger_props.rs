//! Property tests of the ledger state machine: conservation, no overspend and idempotency over
//! random operation sequences.

use proptest::prelude::*;
use tower_402::ledger::*;
use tower_402::plan::{AllowanceWindow, Meter};
use tower_402::{AccountId, Credits, LedgerError, Timestamp};

#[derive(Debug, Clone)]
enum Op {
    Deposit {
        key: u8,
        amount: u64,
    },
    Reserve {
        key: u8,
        fp: u8,
        units: u64,
        price: u64,
        allowance: bool,
    },
    Settle {
        key: u8,
        units: u64,
        /// 0: draw the balance, 1: cap at the hold, 2: draw, then the overdraft.
        policy: u8,
    },
    Release {
        key: u8,
    },
    Advance {
        secs: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 0u64..60).prop_map(|(key, amount)| Op::Deposit { key, amount }),
        (0u8..8, 0u8..2, 0u64..12, 0u64..6, any::<bool>()).prop_map(
            |(key, fp, units, price, allowance)| Op::Reserve {
                key,
                fp,
                units,
                price,
                allowance
            }
        ),
        (0u8..8, 0u64..20, 0u8..3).prop_map(|(key, units, policy)| Op::Settle {
            key,
            units,
            policy
        }),
        (0u8..8).prop_map(|key| Op::Release { key }),
        (0u64..200).prop_map(|secs| Op::Advance { secs }),
    ]
}

const TTL: u64 = 300;

fn window(now: Timestamp) -> AllowanceWindow {
    let start = now.unix() - now.unix() % 1000;
    AllowanceWindow {
        limit: 10,
        start: Timestamp::from_unix(start),
        resets_at: Timestamp::from_unix(start + 1000),
    }
}

fn reserve_request(
    key: u8,
    fp: u8,
    units: u64,
    price: u64,
    allowance: bool,
    now: Timestamp,
) -> ReserveRequest {
    ReserveRequest {
        account: AccountId::new("acme"),
        key: format!("r{key}").into(),
        fingerprint: u64::from(fp),
        charges: vec![Charge {
            meter: Meter::new("units"),
            units,
            unit_price: Credits::new(price),
            price_per: 1,
            allowance: allowance.then(|| window(now)),
            overage: true,
        }]
        .into(),
        ttl_secs: TTL,
        idempotent: true,
        on_expiry: OnExpiry::Release,
        attempt: 0,
        now,
    }
}

/// The overdraft the property test's `Overdraft` settlements allow.
const OVERDRAFT: u64 = 25;

fn check(book: &mut AccountBook, now: Timestamp, deposited: u64) {
    let b = book.balance(now);
    let sum = b.available.get() + b.held.get() + b.settled.get();
    assert_eq!(
        b.deposited.get() + b.overdrawn.get(),
        sum,
        "conservation: {b:?}"
    );
    assert_eq!(b.deposited.get(), deposited, "deposits counted once: {b:?}");
    // The balance, signed, never goes below minus the overdraft.
    assert!(b.overdrawn.get() <= OVERDRAFT, "past the overdraft: {b:?}");
    assert!(
        b.overdrawn.is_zero() || b.available.is_zero(),
        "spendable credit while overdrawn: {b:?}"
    );
    assert!(b.settled.get() <= deposited + OVERDRAFT, "overspend: {b:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn conservation_and_idempotency(ops in prop::collection::vec(op(), 1..120)) {
        let mut book = AccountBook::default();
        let mut now = Timestamp::from_unix(1_000_000);
        let mut deposits: std::collections::HashMap<u8, u64> = Default::default();
        for op in ops {
            match op {
                Op::Deposit { key, amount } => {
                    let k = format!("d{key}");
                    let r = book.deposit(Credits::new(amount), &k, now);
                    match (r, deposits.get(&key)) {
                        (Ok(d), None) => {
                            prop_assert!(d.applied);
                            deposits.insert(key, amount);
                        }
                        (Ok(d), Some(earlier)) => {
                            prop_assert!(!d.applied);
                            prop_assert_eq!(*earlier, amount);
                        }
                        (Err(LedgerError::AmountOutOfRange), _) => prop_assert_eq!(amount, 0),
                        (Err(LedgerError::KeyConflict), Some(earlier)) => {
                            prop_assert_ne!(*earlier, amount)
                        }
                        (Err(e), _) => prop_assert!(false, "deposit: {e}"),
                    }
                }
                Op::Reserve { key, fp, units, price, allowance } => {
                    let req = reserve_request(key, fp, units, price, allowance, now);
                    let before = book.balance(now);
                    let first = book.reserve(&req);
                    let after = book.balance(now);
                    if let Ok(ReserveOutcome::Reserved(r)) = &first {
                        prop_assert!(r.credits <= before.available, "reserved more than available");
                        // A retry changes nothing and is reported as in progress.
                        let again = book.reserve(&req).unwrap();
                        prop_assert_eq!(again, ReserveOutcome::Replayed(Replay::InProgress));
                        prop_assert_eq!(book.balance(now), after);
                    }
                    if let Ok(ReserveOutcome::Denied(_)) | Err(_) = &first {
                        prop_assert_eq!(before, after, "a refusal changes nothing");
                    }
                }
                Op::Settle { key, units, policy } => {
                    let policy = match policy {
                        0 => OverEstimate::DrawBalance,
                        1 => OverEstimate::CapAtHold,
                        _ => OverEstimate::Overdraft(Credits::new(OVERDRAFT)),
                    };
                    let before = book.balance(now);
                    match book.settle(&format!("r{key}"), &[Usage::new("units", units)], policy, now) {
                        Ok(s) => {
                            let after = book.balance(now);
                            prop_assert_eq!(after.settled.get(), before.settled.get() + s.charged.get());
                            prop_assert_eq!(s.available_after, after.available);
                            // Settling twice is refused.
                            let key = format!("r{key}");
                            let twice = book.settle(&key, &[], policy, now);
                            prop_assert!(matches!(twice, Err(LedgerError::AlreadySettled)));
                        }
                        Err(LedgerError::UnknownReservation)
                        | Err(LedgerError::AlreadySettled)
                        | Err(LedgerError::AlreadyReleased) => {
                            prop_assert_eq!(before, book.balance(now));
                        }
                        Err(e) => prop_assert!(false, "settle: {e}"),
                    }
                }
                Op::Release { key } => {
                    let _ = book.release(&format!("r{key}"), now);
                }
                Op::Advance { secs } => now = now.plus_secs(secs),
            }
            check(&mut book, now, deposits.values().sum());
        }
        // Every hold comes back once its reservation expires.
        now = now.plus_secs(TTL);
        let b = book.balance(now);
        prop_assert_eq!(b.held, Credits::ZERO);
        prop_assert_eq!(book.open_reservations(), 0);
        check(&mut book, now, deposits.values().sum());
    }
}

#[test]
fn settle_below_estimate_returns_the_rest() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(100), "d", now).unwrap();
    let req = reserve_request(1, 0, 10, 2, false, now);
    assert!(
        matches!(book.reserve(&req).unwrap(), ReserveOutcome::Reserved(r) if r.credits == Credits::new(20))
    );
    let s = book
        .settle(
            "r1",
            &[Usage::new("units", 3)],
            OverEstimate::DrawBalance,
            now,
        )
        .unwrap();
    assert_eq!(s.charged, Credits::new(6));
    assert_eq!(book.balance(now).available, Credits::new(94));
}

#[test]
fn settle_above_estimate_draws_or_caps_and_reports_the_shortfall() {
    let now = Timestamp::from_unix(1_000_000);
    for (policy, charged, shortfall, available) in [
        (OverEstimate::DrawBalance, 12, 0, 18),
        (OverEstimate::CapAtHold, 4, 8, 26),
    ] {
        let mut book = AccountBook::default();
        book.deposit(Credits::new(30), "d", now).unwrap();
        book.reserve(&reserve_request(1, 0, 2, 2, false, now))
            .unwrap();
        let s = book
            .settle("r1", &[Usage::new("units", 6)], policy, now)
            .unwrap();
        assert_eq!(s.charged.get(), charged, "{policy:?}");
        assert_eq!(s.shortfall.credits.get(), shortfall, "{policy:?}");
        assert_eq!(book.balance(now).available.get(), available, "{policy:?}");
    }
    // Drawing stops at zero: never negative, the rest is a shortfall.
    let mut book = AccountBook::default();
    book.deposit(Credits::new(5), "d", now).unwrap();
    book.reserve(&reserve_request(1, 0, 1, 2, false, now))
        .unwrap();
    let s = book
        .settle(
            "r1",
            &[Usage::new("units", 100)],
            OverEstimate::DrawBalance,
            now,
        )
        .unwrap();
    assert_eq!(s.charged, Credits::new(5));
    assert_eq!(s.shortfall.credits, Credits::new(195));
    assert_eq!(book.balance(now).available, Credits::ZERO);
}

#[test]
fn expiry_releases_and_a_late_settlement_still_charges_what_is_there() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(10), "d", now).unwrap();
    book.reserve(&reserve_request(1, 0, 4, 1, false, now))
        .unwrap();
    assert_eq!(book.balance(now).held, Credits::new(4));
    let later = now.plus_secs(TTL);
    assert_eq!(book.balance(later).held, Credits::ZERO);
    assert_eq!(book.balance(later).available, Credits::new(10));
    let s = book
        .settle(
            "r1",
            &[Usage::new("units", 4)],
            OverEstimate::DrawBalance,
            later,
        )
        .unwrap();
    assert_eq!(s.charged, Credits::new(4));
    assert_eq!(book.balance(later).available, Credits::new(6));
}

#[test]
fn a_released_reservation_can_be_retried_under_the_same_key() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(10), "d", now).unwrap();
    let req = reserve_request(1, 0, 4, 1, false, now);
    book.reserve(&req).unwrap();
    book.release("r1", now).unwrap();
    assert!(matches!(
        book.reserve(&req).unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    book.settle(
        "r1",
        &[Usage::new("units", 4)],
        OverEstimate::DrawBalance,
        now,
    )
    .unwrap();
    // After settlement a retry is a replay, charged nothing more.
    assert!(matches!(
        book.reserve(&req).unwrap(),
        ReserveOutcome::Replayed(Replay::Completed(s)) if s.charged == Credits::new(4)
    ));
    assert_eq!(book.balance(now).available, Credits::new(6));
    // Another request under the same key is a conflict.
    let other = reserve_request(1, 1, 4, 1, false, now);
    assert!(matches!(
        book.reserve(&other),
        Err(LedgerError::KeyConflict)
    ));
}

#[test]
fn allowance_is_used_before_credit_and_refunded_on_release() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(10), "d", now).unwrap();
    // 12 units against an allowance of 10: 10 from the allowance, 2 × 3 credits.
    let r = match book
        .reserve(&reserve_request(1, 0, 12, 3, true, now))
        .unwrap()
    {
        ReserveOutcome::Reserved(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(r.allowance_units, vec![10]);
    assert_eq!(r.credits, Credits::new(6));
    book.release("r1", now).unwrap();
    let w = window(now);
    assert_eq!(
        book.allowance_usage(&Meter::new("units"), w.start, now)
            .taken(),
        0
    );
    assert_eq!(book.balance(now).available, Credits::new(10));
}

#[test]
fn amounts_beyond_exact_range_are_refused() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    assert!(matches!(
        book.deposit(Credits::new(Credits::MAX_EXACT.get() + 1), "d", now),
        Err(LedgerError::AmountOutOfRange)
    ));
    book.deposit(Credits::MAX_EXACT, "d1", now).unwrap();
    assert!(matches!(
        book.deposit(Credits::new(1), "d2", now),
        Err(LedgerError::AmountOutOfRange)
    ));
}

#[test]
fn reservations_without_an_idempotency_key_are_forgotten_once_finished() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(1_000_000), "d", now).unwrap();
    for i in 0..10_000u32 {
        let mut req = reserve_request(0, 0, 1, 1, false, now);
        req.key = format!("req:{i}").into();
        req.idempotent = false;
        book.reserve(&req).unwrap();
        if i % 2 == 0 {
            book.settle(
                &req.key,
                &[Usage::new("units", 1)],
                OverEstimate::DrawBalance,
                now,
            )
            .unwrap();
        } else {
            book.release(&req.key, now).unwrap();
        }
    }
    // Nothing is kept for keys that can never come back; the money is all accounted for.
    assert_eq!(book.open_reservations(), 0);
    assert_eq!(book.retained_reservations(), 0);
    let b = book.balance(now);
    assert_eq!(b.settled, Credits::new(5_000));
    assert_eq!(b.available, Credits::new(995_000));
    // An idempotent one is kept for the retention time, then forgotten.
    let req = reserve_request(1, 0, 1, 1, false, now);
    book.reserve(&req).unwrap();
    book.settle("r1", &[], OverEstimate::DrawBalance, now)
        .unwrap();
    assert_eq!(book.retained_reservations(), 1);
    book.expire(now.plus_secs(DEFAULT_RETENTION_SECS));
    assert_eq!(book.retained_reservations(), 0);
}

#[test]
fn a_lapsed_hold_is_settled_by_drawing_even_under_cap_at_hold() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(10), "d", now).unwrap();
    book.reserve(&reserve_request(1, 0, 4, 1, false, now))
        .unwrap();
    let later = now.plus_secs(TTL);
    let s = book
        .settle(
            "r1",
            &[Usage::new("units", 4)],
            OverEstimate::CapAtHold,
            later,
        )
        .unwrap();
    assert_eq!(
        s.charged,
        Credits::new(4),
        "capping at a lapsed hold would make the work free"
    );
}

#[test]
fn two_charges_on_one_meter_are_refused() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::new(10), "d", now).unwrap();
    let mut req = reserve_request(1, 0, 1, 1, false, now);
    req.charges = vec![req.charges[0].clone(), req.charges[0].clone()].into();
    assert!(matches!(
        book.reserve(&req),
        Err(LedgerError::DuplicateMeter(_))
    ));
    assert_eq!(book.balance(now).available, Credits::new(10));
}

#[test]
fn prices_beyond_exact_products_are_refused_the_same_way_everywhere() {
    let mut book = AccountBook::default();
    let now = Timestamp::from_unix(1_000_000);
    book.deposit(Credits::MAX_EXACT, "d", now).unwrap();
    // 10^9 units at 10^7 credits per million: the quotient (10^10) fits, the product
    // (10^16) does not; refused rather than computed differently by different backends.
    let mut req = reserve_request(1, 0, 1_000_000_000, 10_000_000, false, now);
    let mut charge = req.charges[0].clone();
    charge.price_per = 1_000_000;
    req.charges = vec![charge].into();
    assert!(matches!(
        book.reserve(&req).unwrap(),
        ReserveOutcome::Denied(tower_402::Denial::InsufficientCredits { .. })
    ));
}

/// One request's part in an interleaving: it starts (reserves under its key, a retry if the
/// key was used before), its handler's settlement lands or is lost, time passes, a lost
/// settlement lands late, or the client retries under the same key.
#[derive(Debug, Clone)]
enum Step {
    Start { key: u8 },
    Finish { key: u8, units: u64, lands: bool },
    LateLand { key: u8 },
    Advance { secs: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..6).prop_map(|key| Step::Start { key }),
        (0u8..6, 0u64..10, any::<bool>()).prop_map(|(key, units, lands)| Step::Finish {
            key,
            units,
            lands
        }),
        (0u8..6).prop_map(|key| Step::LateLand { key }),
        (0u64..120).prop_map(|secs| Step::Advance { secs }),
    ]
}

/// What the test knows of one key.
#[derive(Debug, Default, Clone)]
struct Run {
    /// Times its handler ran (reserved and started).
    ran: u32,
    running: bool,
    /// A settlement that did not land yet: its units.
    lost: Option<u64>,
    /// The last word on what it costs: the units settled (or lost, to land later).
    units: Option<u64>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random interleavings of requests, retries under the same key, lost settlements, late
    /// ones and expiries on a manual clock, with the metering layer's holds
    /// (`OnExpiry::Charge`, estimate 5 at 1 credit a unit, TTL 60 s). Every request whose
    /// handler ran is charged exactly once (its estimate while its settlement is lost past
    /// the hold, its usage once it lands), a retry never runs the work again, nothing is
    /// charged for work that never ran, and the balance never goes below zero.
    #[test]
    fn every_run_is_charged_exactly_once(steps in proptest::collection::vec(step(), 1..60)) {
        const ESTIMATE: u64 = 5;
        let mut book = AccountBook::default();
        let mut now = Timestamp::from_unix(1_000_000);
        book.deposit(Credits::new(1_000), "seed", now).unwrap();
        let mut runs = vec![Run::default(); 6];
        let request = |key: u8, now: Timestamp| ReserveRequest {
            account: AccountId::new("acme"),
            key: format!("idem:k{key}").into(),
            fingerprint: 1,
            charges: vec![Charge {
                meter: Meter::new("units"),
                units: ESTIMATE,
                unit_price: Credits::new(1),
                price_per: 1,
                allowance: None,
                overage: true,
            }]
            .into(),
            ttl_secs: 60,
            idempotent: true,
            on_expiry: OnExpiry::Charge,
            attempt: 0,
            now,
        };
        for s in &steps {
            match *s {
                Step::Start { key } => {
                    let r = &mut runs[usize::from(key)];
                    match book.reserve(&request(key, now)).unwrap() {
                        ReserveOutcome::Reserved(_) => {
                            prop_assert_eq!(r.ran, 0, "a retry ran the work again");
                            r.ran += 1;
                            r.running = true;
                        }
                        ReserveOutcome::Replayed(_) => prop_assert!(r.ran == 1),
                        ReserveOutcome::Denied(d) => prop_assert!(false, "denied: {d:?}"),
                        _ => {}
                    }
                }
                Step::Finish { key, units, lands } => {
                    let r = &mut runs[usize::from(key)];
                    if !r.running {
                        continue;
                    }
                    r.running = false;
                    r.units = Some(units);
                    let id = format!("idem:k{key}");
                    if lands {
                        let s = book
                            .settle(&id, &[Usage::new("units", units)], OverEstimate::DrawBalance, now)
                            .unwrap();
                        prop_assert_eq!(s.charged, Credits::new(units));
                    } else {
                        r.lost = Some(units);
                    }
                }
                Step::LateLand { key } => {
                    let r = &mut runs[usize::from(key)];
                    if let Some(units) = r.lost.take() {
                        let id = format!("idem:k{key}");
                        let s = book
                            .settle(&id, &[Usage::new("units", units)], OverEstimate::DrawBalance, now)
                            .unwrap();
                        prop_assert_eq!(s.charged, Credits::new(units));
                    }
                }
                Step::Advance { secs } => now = now.plus_secs(secs),
            }
            // Charged so far: the usage of every landed run, and the estimate of every run
            // whose hold expired before its settlement landed (running or lost).
            let b = book.balance(now);
            prop_assert_eq!(b.deposited.checked_add(b.overdrawn).unwrap(), b.available.checked_add(b.held).unwrap().checked_add(b.settled).unwrap());
            let mut settled = 0;
            let mut held = 0;
            for r in &runs {
                if r.ran == 0 {
                    continue;
                }
                let landed = !r.running && r.lost.is_none();
                if landed {
                    settled += r.units.unwrap_or(0);
                } else {
                    // Open: held; expired: charged its estimate. Either way, no more.
                    held += ESTIMATE;
                }
            }
            prop_assert_eq!(b.settled.get() + b.held.get(), settled + held);
            prop_assert!(b.held.get() <= held);
        }
        // Everything lands in the end, long after every hold expired: each run's usage, once.
        for (key, r) in runs.iter_mut().enumerate() {
            let units = r.lost.take().or(if r.running { Some(ESTIMATE) } else { None });
            if let Some(units) = units {
                let id = format!("idem:k{key}");
                book.settle(&id, &[Usage::new("units", units)], OverEstimate::DrawBalance, now.plus_secs(3600))
                    .unwrap();
                r.running = false;
                r.units = Some(units);
            }
        }
        let b = book.balance(now.plus_secs(3600));
        let expected: u64 = runs.iter().filter(|r| r.ran > 0).map(|r| r.units.unwrap_or(0)).sum();
        prop_assert_eq!(b.settled.get(), expected);
        prop_assert_eq!(b.held.get(), 0);
    }
}
