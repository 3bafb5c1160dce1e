//! One conformance suite for every [`Ledger`] and [`PlanStore`] backend.
//!
//! Each function takes a fresh store (its own key prefix or schema) and asserts the semantics
//! documented on `tower_402::ledger`. Time is the `now` passed to the ledger: expiry and
//! retention are tested by passing later times, never by sleeping. The backend files call
//! [`conformance_tests!`] once with a constructor, which makes one `#[tokio::test]` per check.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tower_402::ledger::*;
use tower_402::plan::{
    AllowanceWindow, Meter, PlanStore, Subscription, SubscriptionStatus, SyncMark,
};
use tower_402::{AccountId, Credits, Denial, LedgerError, Timestamp};

/// A name unique to this process and call, for key prefixes and schemas:
/// `<tag>_<pid>_<n>_<unix seconds>_<nanos>`.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{tag}_{}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        now.as_secs(),
        now.subsec_nanos() % 100_000
    )
}

/// Whether `name`, made by [`unique`] with `tag`, is more than six hours old, so its schema
/// or keys are left over from an earlier run and may be deleted. Age, not whether the
/// process still runs: the servers may be shared with test runs on other hosts. (A name in
/// the older format, without its creation time, counts as old.)
pub fn stale(name: &str, tag: &str) -> bool {
    let Some(created) = name
        .strip_prefix(tag)
        .and_then(|rest| rest.strip_prefix('_'))
        .and_then(|rest| rest.split(['_', ':']).nth(2))
        .and_then(|secs| secs.parse::<u64>().ok())
    else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    created.saturating_add(6 * 3600) < now
}

/// Whether tests must fail (instead of skip) when a backend is unreachable.
pub fn required() -> bool {
    std::env::var("TOWER402_REQUIRE_BACKENDS").is_ok_and(|v| v == "1")
}

/// Says loudly that a backend test is skipped, or panics when backends are required.
pub fn skip(backend: &str, url: &str, why: &dyn std::fmt::Display) {
    if required() {
        panic!("{backend} at {url} is unreachable ({why}) and TOWER402_REQUIRE_BACKENDS=1");
    }
    eprintln!(
        "\n********\nSKIPPED: {backend} at {url} is unreachable ({why}); \
         set TOWER402_REQUIRE_BACKENDS=1 to make this a failure\n********"
    );
}

pub const T0: Timestamp = Timestamp::from_unix(1_700_000_000);

pub fn at(secs: u64) -> Timestamp {
    T0.plus_secs(secs)
}

pub fn acct(name: &str) -> AccountId {
    AccountId::new(name)
}

pub fn paid(meter: &str, units: u64, price: u64) -> Charge {
    Charge {
        meter: Meter::new(meter),
        units,
        unit_price: Credits::new(price),
        price_per: 1,
        allowance: None,
        overage: true,
    }
}

pub fn window(start: Timestamp, limit: u64) -> AllowanceWindow {
    AllowanceWindow {
        limit,
        start,
        resets_at: start.plus_secs(3600),
    }
}

pub fn request(account: &str, key: &str, charges: Vec<Charge>, now: Timestamp) -> ReserveRequest {
    ReserveRequest {
        account: acct(account),
        key: key.into(),
        fingerprint: 7,
        charges: charges.into(),
        ttl_secs: 60,
        idempotent: true,
        // The suite's older cases are about holds that come back; the ones charged at expiry
        // set `OnExpiry::Charge` themselves.
        on_expiry: OnExpiry::Release,
        attempt: 0,
        now,
    }
}

pub fn id(account: &str, key: &str) -> ReservationId {
    ReservationId {
        account: acct(account),
        key: key.into(),
    }
}

fn reserved(o: ReserveOutcome) -> Reservation {
    match o {
        ReserveOutcome::Reserved(r) => r,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

pub async fn conserved(l: &impl Ledger, account: &str, now: Timestamp) -> Balance {
    let b = l.balance(&acct(account), now).await.expect("balance");
    let sum = b
        .available
        .checked_add(b.held)
        .and_then(|s| s.checked_add(b.settled))
        .expect("no overflow");
    let owed = b.deposited.checked_add(b.overdrawn).expect("no overflow");
    assert_eq!(owed, sum, "conservation broken: {b:?}");
    assert!(
        b.overdrawn.is_zero() || b.available.is_zero(),
        "spendable credit while overdrawn: {b:?}"
    );
    b
}

/// A bounded overdraft: a cost beyond the hold is charged from the balance, then into the
/// overdraft up to its limit, the rest a shortfall; credit that comes back (a released hold,
/// a deposit) repays it before anything can be spent; conservation counts what is owed.
pub async fn overdraft(l: &impl Ledger) {
    let a = acct("ovd");
    l.deposit(&a, Credits::new(10), "top-1", at(1))
        .await
        .unwrap();
    reserved(
        l.reserve(&request("ovd", "a", vec![paid("calls", 2, 1)], at(1)))
            .await
            .unwrap(),
    );
    reserved(
        l.reserve(&request("ovd", "b", vec![paid("calls", 3, 1)], at(1)))
            .await
            .unwrap(),
    );
    // 20 used against a hold of 3: 3 from the hold, the 5 available, 6 owed, 6 short.
    let s = l
        .settle(
            &id("ovd", "b"),
            &[Usage::new("calls", 20)],
            OverEstimate::Overdraft(Credits::new(6)),
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(s.charged, Credits::new(14));
    assert_eq!(s.shortfall.credits, Credits::new(6));
    assert_eq!(s.available_after, Credits::ZERO);
    let b = conserved(l, "ovd", at(2)).await;
    assert_eq!(
        (
            b.available.get(),
            b.held.get(),
            b.settled.get(),
            b.overdrawn.get()
        ),
        (0, 2, 14, 6)
    );
    // At the limit: nothing more is owed, all of it is short.
    reserved(
        l.reserve(&request("ovd", "c", vec![paid("calls", 0, 1)], at(2)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(
            &id("ovd", "c"),
            &[Usage::new("calls", 3)],
            OverEstimate::Overdraft(Credits::new(6)),
            at(2),
        )
        .await
        .unwrap();
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (0, 3));
    // A released hold repays the debt first.
    l.release(&id("ovd", "a"), at(3)).await.unwrap();
    let b = conserved(l, "ovd", at(3)).await;
    assert_eq!((b.available.get(), b.overdrawn.get()), (0, 4));
    // Nothing to spend while in debt.
    let refused = l
        .reserve(&request("ovd", "d", vec![paid("calls", 1, 1)], at(3)))
        .await
        .unwrap();
    assert!(
        matches!(
            refused,
            ReserveOutcome::Denied(Denial::InsufficientCredits { .. })
        ),
        "{refused:?}"
    );
    // A deposit repays the rest, then is spendable.
    let d = l
        .deposit(&a, Credits::new(5), "top-2", at(4))
        .await
        .unwrap();
    assert_eq!(
        (d.balance.available.get(), d.balance.overdrawn.get()),
        (1, 0)
    );
    let b = conserved(l, "ovd", at(4)).await;
    assert_eq!((b.deposited.get(), b.settled.get()), (15, 14));
    // A plain draw never owes.
    reserved(
        l.reserve(&request("ovd", "e", vec![paid("calls", 0, 1)], at(4)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(
            &id("ovd", "e"),
            &[Usage::new("calls", 9)],
            OverEstimate::DrawBalance,
            at(4),
        )
        .await
        .unwrap();
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (1, 8));
    assert_eq!(conserved(l, "ovd", at(4)).await.overdrawn, Credits::ZERO);
}

pub async fn deposits(l: &impl Ledger) {
    let a = acct("dep");
    let d = l.deposit(&a, Credits::new(100), "k1", at(0)).await.unwrap();
    assert!(d.applied);
    assert_eq!(d.balance.available, Credits::new(100));
    let again = l.deposit(&a, Credits::new(100), "k1", at(1)).await.unwrap();
    assert!(!again.applied);
    assert_eq!(again.balance, d.balance);
    assert!(matches!(
        l.deposit(&a, Credits::new(50), "k1", at(1)).await,
        Err(LedgerError::KeyConflict)
    ));
    assert!(matches!(
        l.deposit(&a, Credits::ZERO, "k2", at(1)).await,
        Err(LedgerError::AmountOutOfRange)
    ));
    let too_much = Credits::MAX_EXACT.checked_add(Credits::new(1)).unwrap();
    assert!(matches!(
        l.deposit(&a, too_much, "k3", at(1)).await,
        Err(LedgerError::AmountOutOfRange)
    ));
    let rest = Credits::MAX_EXACT.checked_sub(Credits::new(100)).unwrap();
    assert!(l.deposit(&a, rest, "k4", at(2)).await.unwrap().applied);
    assert!(matches!(
        l.deposit(&a, Credits::new(1), "k5", at(2)).await,
        Err(LedgerError::AmountOutOfRange)
    ));
    let b = conserved(l, "dep", at(3)).await;
    assert_eq!(b.available, Credits::MAX_EXACT);
    // Unknown accounts are all zero.
    assert_eq!(
        l.balance(&acct("nobody"), at(3)).await.unwrap(),
        Balance::default()
    );
}

pub async fn reserve_settle_release(l: &impl Ledger) {
    let a = acct("rsr");
    l.deposit(&a, Credits::new(100), "d", at(0)).await.unwrap();
    let r = reserved(
        l.reserve(&request("rsr", "k1", vec![paid("req", 10, 1)], at(1)))
            .await
            .unwrap(),
    );
    assert_eq!(r.credits, Credits::new(10));
    assert_eq!(r.available_after, Credits::new(90));
    assert_eq!(r.expires_at, at(61));
    assert_eq!(r.allowance_left, vec![None]);
    let b = conserved(l, "rsr", at(2)).await;
    assert_eq!((b.available, b.held), (Credits::new(90), Credits::new(10)));
    let s = l
        .settle(
            &id("rsr", "k1"),
            &[Usage::new("req", 7)],
            OverEstimate::DrawBalance,
            at(3),
        )
        .await
        .unwrap();
    assert_eq!(s.charged, Credits::new(7));
    assert_eq!(s.available_after, Credits::new(93));
    assert!(s.shortfall.is_empty());
    assert!(matches!(
        l.settle(&id("rsr", "k1"), &[], OverEstimate::DrawBalance, at(4))
            .await,
        Err(LedgerError::AlreadySettled)
    ));
    assert!(matches!(
        l.release(&id("rsr", "k1"), at(4)).await,
        Err(LedgerError::AlreadySettled)
    ));
    reserved(
        l.reserve(&request("rsr", "k2", vec![paid("req", 5, 1)], at(5)))
            .await
            .unwrap(),
    );
    l.release(&id("rsr", "k2"), at(6)).await.unwrap();
    l.release(&id("rsr", "k2"), at(6)).await.unwrap();
    assert!(matches!(
        l.settle(&id("rsr", "k2"), &[], OverEstimate::DrawBalance, at(7))
            .await,
        Err(LedgerError::AlreadyReleased)
    ));
    assert!(matches!(
        l.release(&id("rsr", "nope"), at(7)).await,
        Err(LedgerError::UnknownReservation)
    ));
    assert!(matches!(
        l.settle(&id("rsr", "nope"), &[], OverEstimate::DrawBalance, at(7))
            .await,
        Err(LedgerError::UnknownReservation)
    ));
    let b = conserved(l, "rsr", at(8)).await;
    assert_eq!(
        (b.available, b.held, b.settled),
        (Credits::new(93), Credits::ZERO, Credits::new(7))
    );
}

pub async fn over_estimates_and_denials(l: &impl Ledger) {
    let a = acct("over");
    l.deposit(&a, Credits::new(20), "d", at(0)).await.unwrap();
    // Not enough: a denial, not an error.
    match l
        .reserve(&request("over", "big", vec![paid("req", 25, 1)], at(1)))
        .await
        .unwrap()
    {
        ReserveOutcome::Denied(Denial::InsufficientCredits { balance, required }) => {
            assert_eq!((balance, required), (Credits::new(20), Credits::new(25)));
        }
        other => panic!("{other:?}"),
    }
    // Draw the difference from the balance.
    reserved(
        l.reserve(&request("over", "a", vec![paid("req", 5, 1)], at(1)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(
            &id("over", "a"),
            &[Usage::new("req", 8)],
            OverEstimate::DrawBalance,
            at(2),
        )
        .await
        .unwrap();
    assert_eq!(
        (s.charged, s.available_after),
        (Credits::new(8), Credits::new(12))
    );
    // Cap at the hold.
    reserved(
        l.reserve(&request("over", "b", vec![paid("req", 5, 1)], at(3)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(
            &id("over", "b"),
            &[Usage::new("req", 9)],
            OverEstimate::CapAtHold,
            at(4),
        )
        .await
        .unwrap();
    assert_eq!(s.charged, Credits::new(5));
    assert_eq!(s.shortfall.credits, Credits::new(4));
    // Draw as far as it goes, never below zero.
    reserved(
        l.reserve(&request("over", "c", vec![paid("req", 5, 1)], at(5)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(
            &id("over", "c"),
            &[Usage::new("req", 100)],
            OverEstimate::DrawBalance,
            at(6),
        )
        .await
        .unwrap();
    assert_eq!(s.charged, Credits::new(7));
    assert_eq!(s.shortfall.credits, Credits::new(93));
    let b = conserved(l, "over", at(7)).await;
    assert_eq!((b.available, b.settled), (Credits::ZERO, Credits::new(20)));
}

pub async fn idempotent_reserve(l: &impl Ledger) {
    let a = acct("idem");
    l.deposit(&a, Credits::new(50), "d", at(0)).await.unwrap();
    let req = request("idem", "k", vec![paid("req", 3, 2)], at(1));
    reserved(l.reserve(&req).await.unwrap());
    assert_eq!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Replayed(Replay::InProgress)
    );
    let mut other = req.clone();
    other.fingerprint = 8;
    assert!(matches!(
        l.reserve(&other).await,
        Err(LedgerError::KeyConflict)
    ));
    let s = l
        .settle(
            &id("idem", "k"),
            &[Usage::new("req", 2)],
            OverEstimate::DrawBalance,
            at(2),
        )
        .await
        .unwrap();
    let mut retry = req.clone();
    retry.now = at(3);
    assert_eq!(
        l.reserve(&retry).await.unwrap(),
        ReserveOutcome::Replayed(Replay::Completed(s))
    );
    // Released: a retry reserves afresh.
    let r2 = request("idem", "k2", vec![paid("req", 1, 4)], at(4));
    reserved(l.reserve(&r2).await.unwrap());
    l.release(&id("idem", "k2"), at(5)).await.unwrap();
    let mut r2b = r2.clone();
    r2b.now = at(6);
    let again = reserved(l.reserve(&r2b).await.unwrap());
    assert_eq!(again.credits, Credits::new(4));
    let b = conserved(l, "idem", at(7)).await;
    assert_eq!(
        (b.available, b.held, b.settled),
        (Credits::new(42), Credits::new(4), Credits::new(4))
    );
}

pub async fn expiry(l: &impl Ledger) {
    let a = acct("exp");
    l.deposit(&a, Credits::new(30), "d", at(0)).await.unwrap();
    let mut req = request("exp", "k", vec![paid("req", 10, 1)], at(0));
    req.ttl_secs = 10;
    reserved(l.reserve(&req).await.unwrap());
    assert_eq!(conserved(l, "exp", at(9)).await.held, Credits::new(10));
    let b = conserved(l, "exp", at(10)).await;
    assert_eq!((b.available, b.held), (Credits::new(30), Credits::ZERO));
    // Settling after expiry charges as if nothing were held.
    let s = l
        .settle(
            &id("exp", "k"),
            &[Usage::new("req", 4)],
            OverEstimate::DrawBalance,
            at(11),
        )
        .await
        .unwrap();
    assert_eq!(
        (s.charged, s.available_after),
        (Credits::new(4), Credits::new(26))
    );
    // An expired key reserves afresh; releasing an expired one is a no-op.
    let mut r2 = request("exp", "k2", vec![paid("req", 6, 1)], at(20));
    r2.ttl_secs = 5;
    reserved(l.reserve(&r2).await.unwrap());
    l.release(&id("exp", "k2"), at(30)).await.unwrap();
    r2.now = at(31);
    assert_eq!(
        reserved(l.reserve(&r2).await.unwrap()).credits,
        Credits::new(6)
    );
    let b = conserved(l, "exp", at(40)).await;
    assert_eq!(
        (b.available, b.held, b.settled),
        (Credits::new(26), Credits::ZERO, Credits::new(4))
    );
}

/// `OnExpiry::Charge`: a hold whose settlement never came is charged its estimate when it
/// expires (credit and allowance units); a late settlement charges the actual usage instead,
/// a late release gives it all back, and a retry under the key does not run the work again.
pub async fn expiry_charges_started_work(l: &impl Ledger) {
    let a = acct("exc");
    l.deposit(&a, Credits::new(100), "d", at(0)).await.unwrap();
    let start = at(0);
    let mut with_allowance = paid("tok", 10, 1);
    with_allowance.allowance = Some(window(start, 4));
    let mut req = request("exc", "k1", vec![paid("req", 10, 1), with_allowance], at(0));
    req.ttl_secs = 10;
    req.on_expiry = OnExpiry::Charge;
    let r = reserved(l.reserve(&req).await.unwrap());
    // 10 credits for `req`, 4 allowance units and 6 credits for `tok`.
    assert_eq!(r.credits, Credits::new(16));
    let b = conserved(l, "exc", at(10)).await;
    assert_eq!(
        (b.available, b.held, b.settled),
        (Credits::new(84), Credits::ZERO, Credits::new(16)),
        "charged at expiry, not given back"
    );
    let tok = Meter::new("tok");
    let u = l.allowance_usage(&a, &tok, start, at(10)).await.unwrap();
    assert_eq!((u.used, u.held), (4, 0), "its allowance units are used");
    // A retry under the key: the work ran (or may be running); it is not run again.
    let mut retry = req.clone();
    retry.now = at(11);
    match l.reserve(&retry).await.unwrap() {
        ReserveOutcome::Replayed(Replay::Completed(s)) => {
            assert_eq!(s.charged, Credits::new(16));
            assert_eq!(&s.allowance_units[..], &[0, 4]);
        }
        other => panic!("a retry of work charged at expiry: {other:?}"),
    }
    // The late settlement has the last word: 3 of `req`, 2 of `tok` (all from the allowance).
    let s = l
        .settle(
            &id("exc", "k1"),
            &[Usage::new("req", 3), Usage::new("tok", 2)],
            OverEstimate::DrawBalance,
            at(12),
        )
        .await
        .unwrap();
    assert_eq!(
        (s.charged, s.available_after),
        (Credits::new(3), Credits::new(97))
    );
    let u = l.allowance_usage(&a, &tok, start, at(12)).await.unwrap();
    assert_eq!((u.used, u.held), (2, 0));
    assert!(matches!(
        l.settle(&id("exc", "k1"), &[], OverEstimate::DrawBalance, at(13))
            .await,
        Err(LedgerError::AlreadySettled)
    ));
    // More than the estimate, settled late: drawn from the balance like an open hold's.
    let mut r2 = request("exc", "k2", vec![paid("req", 10, 1)], at(20));
    (r2.ttl_secs, r2.on_expiry, r2.idempotent) = (5, OnExpiry::Charge, false);
    reserved(l.reserve(&r2).await.unwrap());
    assert_eq!(conserved(l, "exc", at(25)).await.settled, Credits::new(13));
    let s = l
        .settle(
            &id("exc", "k2"),
            &[Usage::new("req", 25)],
            OverEstimate::CapAtHold,
            at(26),
        )
        .await
        .unwrap();
    assert_eq!(s.charged, Credits::new(10), "capped at the hold it had");
    assert_eq!(s.shortfall.credits, Credits::new(15));
    // A late release (the work never started): the charge comes back, and a retry is new.
    let mut r3 = request("exc", "k3", vec![paid("req", 7, 1)], at(30));
    (r3.ttl_secs, r3.on_expiry) = (5, OnExpiry::Charge);
    reserved(l.reserve(&r3).await.unwrap());
    let before = conserved(l, "exc", at(35)).await;
    l.release(&id("exc", "k3"), at(36)).await.unwrap();
    let after = conserved(l, "exc", at(36)).await;
    assert_eq!(
        after.available,
        before.available.checked_add(Credits::new(7)).unwrap()
    );
    assert_eq!(
        after.settled,
        before.settled.checked_sub(Credits::new(7)).unwrap()
    );
    l.release(&id("exc", "k3"), at(37)).await.unwrap();
    assert_eq!(conserved(l, "exc", at(37)).await, after, "released once");
    r3.now = at(38);
    assert!(matches!(
        l.reserve(&r3).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    l.release(&id("exc", "k3"), at(39)).await.unwrap();
    // `OnExpiry::Release` beside it: given back at expiry.
    let mut r4 = request("exc", "k4", vec![paid("req", 9, 1)], at(40));
    r4.ttl_secs = 5;
    reserved(l.reserve(&r4).await.unwrap());
    let b = conserved(l, "exc", at(45)).await;
    assert_eq!((b.available, b.settled), (after.available, after.settled));
}

pub async fn allowances(l: &impl Ledger) {
    let w = window(at(0), 3);
    let free = Charge {
        meter: Meter::new("calls"),
        units: 2,
        unit_price: Credits::ZERO,
        price_per: 1,
        allowance: Some(w),
        overage: false,
    };
    let r = reserved(
        l.reserve(&request("allow", "a", vec![free.clone()], at(1)))
            .await
            .unwrap(),
    );
    assert_eq!(
        (r.allowance_units.clone(), r.allowance_left.clone()),
        ([2].into(), [Some(1)].into())
    );
    match l
        .reserve(&request("allow", "b", vec![free.clone()], at(2)))
        .await
        .unwrap()
    {
        ReserveOutcome::Denied(Denial::QuotaExceeded {
            limit,
            used,
            resets_at,
            ..
        }) => assert_eq!((limit, used, resets_at), (3, 2, Some(w.resets_at))),
        other => panic!("{other:?}"),
    }
    let s = l
        .settle(
            &id("allow", "a"),
            &[Usage::new("calls", 1)],
            OverEstimate::DrawBalance,
            at(3),
        )
        .await
        .unwrap();
    assert_eq!(s.allowance_units, vec![1]);
    let u = l
        .allowance_usage(&acct("allow"), &Meter::new("calls"), w.start, at(4))
        .await
        .unwrap();
    assert_eq!((u.used, u.held), (1, 0));
    // Beyond the allowance without overage: consumed up to the limit, the rest a shortfall.
    reserved(
        l.reserve(&request("allow", "c", vec![free.clone()], at(5)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(
            &id("allow", "c"),
            &[Usage::new("calls", 5)],
            OverEstimate::DrawBalance,
            at(6),
        )
        .await
        .unwrap();
    assert_eq!(s.allowance_units, vec![2]);
    assert_eq!(s.shortfall.units, vec![(Meter::new("calls"), 3)]);
    // The next window starts empty.
    let w2 = window(w.resets_at, 3);
    let next = Charge {
        allowance: Some(w2),
        ..free.clone()
    };
    let r = reserved(
        l.reserve(&request("allow", "d", vec![next], w2.start))
            .await
            .unwrap(),
    );
    assert_eq!(r.allowance_left, vec![Some(1)]);
    // With overage, units beyond the allowance are paid from credit.
    l.deposit(&acct("allow"), Credits::new(10), "d", at(7))
        .await
        .unwrap();
    let over = Charge {
        meter: Meter::new("tokens"),
        units: 5,
        unit_price: Credits::new(2),
        price_per: 1,
        allowance: Some(window(at(0), 2)),
        overage: true,
    };
    let r = reserved(
        l.reserve(&request("allow", "e", vec![over], at(8)))
            .await
            .unwrap(),
    );
    assert_eq!(
        (r.credits, r.allowance_units),
        (Credits::new(6), [2].into())
    );
    // The old window is forgotten once it is over and holds nothing.
    let u = l
        .allowance_usage(&acct("allow"), &Meter::new("calls"), w.start, w.resets_at)
        .await
        .unwrap();
    assert_eq!((u.used, u.held), (0, 0));
    conserved(l, "allow", at(9)).await;
}

/// A request that pays from credit because its window's allowance is used up, settled after
/// the window reset (its hold still open, or lapsed): it pays; it does not draw on an
/// allowance that no longer exists.
pub async fn allowance_window_rollover(l: &impl Ledger) {
    let w = window(at(0), 1);
    l.deposit(&acct("roll"), Credits::new(100), "seed", at(0))
        .await
        .unwrap();
    let c = Charge {
        meter: Meter::new("calls"),
        units: 1,
        unit_price: Credits::new(10),
        price_per: 1,
        allowance: Some(w),
        overage: true,
    };
    let one = [Usage::new("calls", 1)];
    reserved(
        l.reserve(&request("roll", "free", vec![c.clone()], at(1)))
            .await
            .unwrap(),
    );
    let s = l
        .settle(&id("roll", "free"), &one, OverEstimate::DrawBalance, at(2))
        .await
        .unwrap();
    assert_eq!(s.charged, Credits::ZERO, "the allowance pays the first");
    let mut open = request("roll", "open", vec![c.clone()], at(3));
    open.ttl_secs = 7200;
    let r = reserved(l.reserve(&open).await.unwrap());
    assert_eq!(r.credits, Credits::new(10));
    let lapsed = reserved(
        l.reserve(&request("roll", "lapsed", vec![c], at(4)))
            .await
            .unwrap(),
    );
    assert_eq!(lapsed.credits, Credits::new(10));
    let after = w.resets_at.plus_secs(1);
    for key in ["open", "lapsed"] {
        let s = l
            .settle(&id("roll", key), &one, OverEstimate::DrawBalance, after)
            .await
            .unwrap();
        assert_eq!(s.charged, Credits::new(10), "{key}: paid after the reset");
    }
    let b = conserved(l, "roll", after).await;
    assert_eq!((b.settled, b.held), (Credits::new(20), Credits::ZERO));
}

pub async fn retention(l: &impl Ledger) {
    let a = acct("ret");
    l.deposit(&a, Credits::new(10), "d", at(0)).await.unwrap();
    let req = request("ret", "k", vec![paid("req", 1, 1)], at(1));
    reserved(l.reserve(&req).await.unwrap());
    l.settle(&id("ret", "k"), &[], OverEstimate::DrawBalance, at(2))
        .await
        .unwrap();
    let later = at(2).plus_secs(DEFAULT_RETENTION_SECS);
    let mut again = req.clone();
    again.now = later.plus_secs(1);
    // Forgotten after the retention time: a new reservation.
    reserved(l.reserve(&again).await.unwrap());
    let d = l.deposit(&a, Credits::new(10), "d", later).await.unwrap();
    assert!(d.applied, "deposit key forgotten after retention");
}

/// A reservation made without an idempotency key (its key unique to one request) is
/// forgotten once it is settled or released: nothing keeps it for the retention time, and
/// the key, should it ever come back, starts a new reservation. Made under an idempotency
/// key, the same sequence is recognized as a retry.
pub async fn unique_keys_are_forgotten(l: &impl Ledger) {
    let a = acct("once");
    l.deposit(&a, Credits::new(10), "d", at(0)).await.unwrap();
    for (key, idempotent) in [("u1", false), ("i1", true)] {
        let mut req = request("once", key, vec![paid("req", 1, 1)], at(1));
        req.idempotent = idempotent;
        reserved(l.reserve(&req).await.unwrap());
        l.settle(&id("once", key), &[], OverEstimate::DrawBalance, at(2))
            .await
            .unwrap();
        req.now = at(3);
        match l.reserve(&req).await.unwrap() {
            ReserveOutcome::Reserved(_) => assert!(!idempotent, "a retry reserved again"),
            ReserveOutcome::Replayed(Replay::Completed(_)) => {
                assert!(idempotent, "a unique key was kept after settling")
            }
            other => panic!("{other:?}"),
        }
    }
    let mut req = request("once", "u2", vec![paid("req", 1, 1)], at(4));
    req.idempotent = false;
    reserved(l.reserve(&req).await.unwrap());
    l.release(&id("once", "u2"), at(5)).await.unwrap();
    assert!(
        matches!(
            l.settle(&id("once", "u2"), &[], OverEstimate::DrawBalance, at(6))
                .await,
            Err(LedgerError::UnknownReservation)
        ),
        "a released unique key is forgotten"
    );
    conserved(l, "once", at(6)).await;
}

/// A record written before backends stored whether its key is an idempotency key is kept
/// after settling, as it always was, so a retry under its key is still recognized.
/// `mark_old` makes the record of account `old`, key `u1` look like one.
pub async fn records_from_before_the_flag_are_kept<F>(l: &impl Ledger, mark_old: F)
where
    F: std::future::Future<Output = ()>,
{
    l.deposit(&acct("old"), Credits::new(10), "d", at(0))
        .await
        .unwrap();
    let mut req = request("old", "u1", vec![paid("req", 1, 1)], at(1));
    req.idempotent = false;
    reserved(l.reserve(&req).await.unwrap());
    mark_old.await;
    l.settle(&id("old", "u1"), &[], OverEstimate::DrawBalance, at(2))
        .await
        .unwrap();
    req.now = at(3);
    assert!(matches!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Replayed(Replay::Completed(_))
    ));
}

/// Operations of the random sequence.
#[derive(Debug, Clone)]
enum Op {
    Deposit(usize, u64, usize),
    Reserve(ReserveRequest),
    Settle(usize, usize, Vec<Usage>, OverEstimate),
    Release(usize, usize),
    Balance(usize),
    Allowance(usize, u64),
}

/// A small deterministic generator (xorshift64*), so runs are reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const ACCOUNTS: [&str; 3] = ["r0", "r1", "r2"];
const KEYS: [&str; 6] = ["k0", "k1", "k2", "k3", "k4", "k5"];

/// With `huge`, amounts and prices sit near 2^53 (the largest exact credit amount), so sums
/// and products overflow on several meters at once: every backend must refuse, or shortfall,
/// exactly as the book does.
fn random_ops(seed: u64, n: usize, huge: bool) -> Vec<(Timestamp, Op)> {
    let mut rng = Rng(seed | 1);
    let max = Credits::MAX_EXACT.get();
    let amount = |rng: &mut Rng, small: u64| {
        if !huge {
            small
        } else if rng.below(2) == 0 {
            max - rng.below(4)
        } else {
            rng.below(max / 3)
        }
    };
    let mut now = 0u64;
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        now += rng.below(8);
        let t = at(now);
        let a = rng.below(3) as usize;
        let k = rng.below(6) as usize;
        // Windows of 50 s, so several pass during a run.
        let start = at(now - now % 50);
        let op = match rng.below(10) {
            0 | 1 => {
                let small = 1 + rng.below(30);
                Op::Deposit(a, amount(&mut rng, small).max(1), rng.below(4) as usize)
            }
            2..=4 => {
                let (units, small) = (rng.below(6), rng.below(3));
                let mut charges = vec![paid("req", units, amount(&mut rng, small))];
                if rng.below(2) == 0 {
                    charges.push(Charge {
                        meter: Meter::new("calls"),
                        units: rng.below(4),
                        unit_price: Credits::new({
                            let small = rng.below(3);
                            amount(&mut rng, small)
                        }),
                        // Prices per 1, 3 or 1,000 units: rounding up must agree everywhere.
                        price_per: [1, 3, 1000][rng.below(3) as usize],
                        allowance: Some(AllowanceWindow {
                            limit: 5,
                            start,
                            resets_at: start.plus_secs(50),
                        }),
                        overage: rng.below(2) == 0,
                    });
                }
                Op::Reserve(ReserveRequest {
                    account: acct(ACCOUNTS[a]),
                    key: KEYS[k].into(),
                    fingerprint: rng.below(2),
                    charges: charges.into(),
                    ttl_secs: 1 + rng.below(30),
                    // Most keys are idempotency keys; the others are forgotten once finished.
                    idempotent: rng.below(4) != 0,
                    on_expiry: if rng.below(2) == 0 {
                        OnExpiry::Charge
                    } else {
                        OnExpiry::Release
                    },
                    // None, or one of two attempts: the same attempt again gets its open
                    // reservation back, another is told it is in progress.
                    attempt: rng.below(3),
                    now: t,
                })
            }
            5 | 6 => {
                let policy = match rng.below(3) {
                    0 => OverEstimate::DrawBalance,
                    1 => OverEstimate::CapAtHold,
                    // Near the largest amounts too: the limit is clamped as every backend
                    // clamps it.
                    _ => OverEstimate::Overdraft(Credits::new(amount(&mut rng, 7))),
                };
                let usage = vec![
                    Usage::new("req", rng.below(10)),
                    Usage::new("calls", rng.below(6)),
                ];
                Op::Settle(a, k, usage, policy)
            }
            7 => Op::Release(a, k),
            8 => Op::Balance(a),
            _ => Op::Allowance(a, start.unix()),
        };
        ops.push((t, op));
    }
    ops
}

/// Runs a few hundred random operations on the ledger and on [`AccountBook`]s side by side:
/// every answer must be the same and every account must stay conserved.
pub async fn matches_the_book(l: &impl Ledger, seed: u64, huge: bool) {
    let mut books: HashMap<usize, AccountBook> = HashMap::new();
    for (i, (now, op)) in random_ops(seed, 300, huge).into_iter().enumerate() {
        let (a, got, want) = match &op {
            Op::Deposit(a, amount, k) => {
                let key = format!("dep{k}");
                let amount = Credits::new(*amount);
                let got = l.deposit(&acct(ACCOUNTS[*a]), amount, &key, now).await;
                let want = books.entry(*a).or_default().deposit(amount, &key, now);
                (*a, format!("{got:?}"), format!("{want:?}"))
            }
            Op::Reserve(req) => {
                let a = ACCOUNTS
                    .iter()
                    .position(|n| *n == req.account.as_str())
                    .unwrap();
                let got = l.reserve(req).await;
                let want = books.entry(a).or_default().reserve(req);
                (a, format!("{got:?}"), format!("{want:?}"))
            }
            Op::Settle(a, k, usage, policy) => {
                let got = l
                    .settle(&id(ACCOUNTS[*a], KEYS[*k]), usage, *policy, now)
                    .await;
                let want = books
                    .entry(*a)
                    .or_default()
                    .settle(KEYS[*k], usage, *policy, now);
                (*a, format!("{got:?}"), format!("{want:?}"))
            }
            Op::Release(a, k) => {
                let got = l.release(&id(ACCOUNTS[*a], KEYS[*k]), now).await;
                let want = books.entry(*a).or_default().release(KEYS[*k], now);
                (*a, format!("{got:?}"), format!("{want:?}"))
            }
            Op::Balance(a) => {
                let got = l.balance(&acct(ACCOUNTS[*a]), now).await.unwrap();
                let want = books.entry(*a).or_default().balance(now);
                (*a, format!("{got:?}"), format!("{want:?}"))
            }
            Op::Allowance(a, start) => {
                let m = Meter::new("calls");
                let s = Timestamp::from_unix(*start);
                let got = l
                    .allowance_usage(&acct(ACCOUNTS[*a]), &m, s, now)
                    .await
                    .unwrap();
                let want = books.entry(*a).or_default().allowance_usage(&m, s, now);
                (*a, format!("{got:?}"), format!("{want:?}"))
            }
        };
        assert_eq!(got, want, "op #{i} {op:?} at {now} (seed {seed})");
        let b = conserved(l, ACCOUNTS[a], now).await;
        assert_eq!(b, books.entry(a).or_default().balance(now), "op #{i}");
    }
}

/// A reserve retried by the same attempt (its reply was lost) gets its open reservation back;
/// another attempt under the key is told it is in progress; nothing is held twice.
pub async fn a_lost_reply_is_recovered_by_its_attempt(l: &impl Ledger) {
    let a = acct("att");
    l.deposit(&a, Credits::new(10), "top", at(1)).await.unwrap();
    let mut req = request("att", "client-key", vec![paid("calls", 3, 1)], at(1));
    req.attempt = 7;
    let first = reserved(l.reserve(&req).await.unwrap());
    let again = reserved(l.reserve(&req).await.unwrap());
    assert_eq!(again.credits, first.credits);
    assert_eq!(again.expires_at, first.expires_at);
    assert_eq!(again.available_after, Credits::new(7));
    let b = conserved(l, "att", at(1)).await;
    assert_eq!((b.available.get(), b.held.get()), (7, 3), "held once");
    let mut other = req.clone();
    other.attempt = 8;
    assert_eq!(
        l.reserve(&other).await.unwrap(),
        ReserveOutcome::Replayed(Replay::InProgress)
    );
    other.attempt = 0;
    assert_eq!(
        l.reserve(&other).await.unwrap(),
        ReserveOutcome::Replayed(Replay::InProgress)
    );
    l.settle(
        &id("att", "client-key"),
        &[Usage::new("calls", 3)],
        OverEstimate::DrawBalance,
        at(2),
    )
    .await
    .unwrap();
    // Settled: the same attempt is a completed replay like any other.
    assert!(matches!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Replayed(Replay::Completed(_))
    ));
    assert_eq!(conserved(l, "att", at(2)).await.settled, Credits::new(3));
}

/// The journal keeps at most `max_entries` per account, the oldest going first; with
/// `max_entries: 0` it keeps none, and the credit is still counted. `bounded` is a fresh
/// ledger built with [`BOUNDED`], `off` one built with [`OFF`].
pub async fn journal_bound(bounded: &impl Ledger, off: &impl Ledger) {
    let acme = acct("jrn-bound");
    for i in 0..5u64 {
        let key = format!("top-{i}");
        bounded
            .deposit(&acme, Credits::new(i + 1), &key, at(i))
            .await
            .unwrap();
    }
    let q = JournalQuery::default();
    let now = at(10);
    let kept = bounded
        .journal()
        .expect("this backend keeps a journal")
        .entries(&acme, &q, now)
        .await
        .unwrap();
    let refs: Vec<_> = kept
        .iter()
        .map(|e| e.reference.as_deref().unwrap())
        .collect();
    assert_eq!(refs, ["top-4", "top-3", "top-2"]);
    assert_eq!(
        bounded.balance(&acme, now).await.unwrap().available,
        Credits::new(15)
    );
    off.deposit(&acme, Credits::new(1), "top", now)
        .await
        .unwrap();
    assert!(off
        .journal()
        .expect("this backend keeps a journal")
        .entries(&acme, &q, now)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        off.balance(&acme, now).await.unwrap().available,
        Credits::new(1)
    );
}

/// The bound [`journal_bound`] checks: three entries per account.
pub const BOUNDED: JournalLimits = JournalLimits {
    retention_secs: 3600,
    max_entries: 3,
};

/// No journal at all.
pub const OFF: JournalLimits = JournalLimits {
    retention_secs: 3600,
    max_entries: 0,
};

/// The spend history (issue 16): one entry per deposit, settlement, release, expiry,
/// shortfall and adjustment, newest first, per account and time range; adjustments once per
/// key, never below zero; entries past the retention time are gone.
pub async fn journal(l: &impl Ledger) {
    let j = l.journal().expect("this backend keeps a journal");
    let a = acct("jrn");
    let q = JournalQuery::default();
    l.deposit(&a, Credits::new(100), "top-1", at(1))
        .await
        .unwrap();
    reserved(
        l.reserve(&request("jrn", "a", vec![paid("req", 30, 1)], at(2)))
            .await
            .unwrap(),
    );
    l.settle(
        &id("jrn", "a"),
        &[Usage::new("req", 20)],
        OverEstimate::DrawBalance,
        at(3),
    )
    .await
    .unwrap();
    reserved(
        l.reserve(&request("jrn", "b", vec![paid("req", 10, 1)], at(4)))
            .await
            .unwrap(),
    );
    l.release(&id("jrn", "b"), at(5)).await.unwrap();
    // Held at 6, expires at 66 (ttl 60), found expired by the next operation at 100.
    reserved(
        l.reserve(&request("jrn", "c", vec![paid("req", 5, 1)], at(6)))
            .await
            .unwrap(),
    );
    reserved(
        l.reserve(&request("jrn", "d", vec![paid("req", 1, 1)], at(100)))
            .await
            .unwrap(),
    );
    // 200 used against a hold of 1 with 79 available: 80 charged, 120 short.
    let s = l
        .settle(
            &id("jrn", "d"),
            &[Usage::new("req", 200)],
            OverEstimate::DrawBalance,
            at(101),
        )
        .await
        .unwrap();
    assert_eq!(
        (s.charged, s.shortfall.credits),
        (Credits::new(80), Credits::new(120))
    );
    // An allowance-free request paid in full moved credit; one that moved none is not written.
    let goodwill = Adjustment {
        key: "ticket-7".into(),
        direction: Direction::Credit,
        credits: Credits::new(7),
        reason: "outage on the 3rd".into(),
    };
    let done = j.adjust(&a, &goodwill, at(102)).await.unwrap();
    assert_eq!(
        (done.applied, done.available_after),
        (true, Credits::new(7))
    );
    let again = j.adjust(&a, &goodwill, at(103)).await.unwrap();
    assert_eq!(
        (again.applied, again.available_after),
        (false, Credits::new(7))
    );
    let flipped = Adjustment {
        direction: Direction::Debit,
        ..goodwill.clone()
    };
    assert!(matches!(
        j.adjust(&a, &flipped, at(103)).await,
        Err(LedgerError::KeyConflict)
    ));
    let too_much = Adjustment {
        key: "chargeback-1".into(),
        direction: Direction::Debit,
        credits: Credits::new(8),
        reason: "chargeback".into(),
    };
    assert!(matches!(
        j.adjust(&a, &too_much, at(104)).await,
        Err(LedgerError::AmountOutOfRange)
    ));
    let zero = Adjustment {
        key: "zero".into(),
        credits: Credits::ZERO,
        ..goodwill.clone()
    };
    assert!(matches!(
        j.adjust(&a, &zero, at(104)).await,
        Err(LedgerError::AmountOutOfRange)
    ));
    let debit = Adjustment {
        credits: Credits::new(2),
        ..too_much.clone()
    };
    assert!(j.adjust(&a, &debit, at(105)).await.unwrap().applied);
    let b = conserved(l, "jrn", at(106)).await;
    assert_eq!(b.available, Credits::new(5));

    let entries = j.entries(&a, &q, at(106)).await.unwrap();
    let got: Vec<_> = entries
        .iter()
        .map(|e| (e.kind, e.credits.get(), e.available_after.get(), e.at))
        .collect();
    assert_eq!(
        got,
        [
            (EntryKind::Adjustment, 2, 5, at(105)),
            (EntryKind::Adjustment, 7, 7, at(102)),
            (EntryKind::Shortfall, 120, 0, at(101)),
            (EntryKind::Settle, 80, 0, at(101)),
            (EntryKind::Expiry, 5, 80, at(66)),
            (EntryKind::Release, 10, 80, at(5)),
            (EntryKind::Settle, 20, 80, at(3)),
            (EntryKind::Deposit, 100, 100, at(1)),
        ],
        "{entries:#?}"
    );
    assert!(
        entries.windows(2).all(|w| w[0].seq > w[1].seq),
        "newest first"
    );
    assert_eq!(entries[0].direction, Some(Direction::Debit));
    assert_eq!(entries[0].reason.as_deref(), Some("chargeback"));
    assert_eq!(entries[0].reference.as_deref(), Some("chargeback-1"));
    assert_eq!(entries[1].direction, Some(Direction::Credit));
    assert_eq!(entries[7].reference.as_deref(), Some("top-1"));
    assert_eq!(entries[7].direction, None);

    // A time range and a limit.
    let range = JournalQuery {
        since: Some(at(3)),
        until: Some(at(101)),
        limit: 100,
    };
    let kinds: Vec<_> = j
        .entries(&a, &range, at(106))
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [EntryKind::Expiry, EntryKind::Release, EntryKind::Settle]
    );
    let two = JournalQuery { limit: 2, ..q };
    assert_eq!(j.entries(&a, &two, at(106)).await.unwrap().len(), 2);
    // Another account's journal is its own.
    assert!(j
        .entries(&acct("jrn-other"), &q, at(106))
        .await
        .unwrap()
        .is_empty());
    // Past the retention time (90 days by default) the entries are gone.
    let later = at(101).plus_secs(DEFAULT_JOURNAL_RETENTION_SECS);
    let kept: Vec<_> = j.entries(&a, &q, later).await.unwrap();
    assert_eq!(
        kept.len(),
        2,
        "the two adjustments, younger than 90 days: {kept:#?}"
    );
    assert!(kept.iter().all(|e| e.kind == EntryKind::Adjustment));
    // An entry moving no credit is not written: a request paid from its allowance.
    let free = Charge {
        allowance: Some(window(later, 10)),
        ..paid("free", 1, 1)
    };
    reserved(
        l.reserve(&request("jrn", "e", vec![free], later))
            .await
            .unwrap(),
    );
    l.settle(
        &id("jrn", "e"),
        &[Usage::new("free", 1)],
        OverEstimate::DrawBalance,
        later,
    )
    .await
    .unwrap();
    assert_eq!(j.entries(&a, &q, later).await.unwrap().len(), 2);
}

pub async fn plan_store(p: &impl PlanStore) {
    let a = acct("sub");
    assert_eq!(p.subscription(&a).await.unwrap(), None);
    p.put_subscription(Subscription::active("sub", "basic"))
        .await
        .unwrap();
    assert_eq!(
        p.subscription(&a).await.unwrap(),
        Some(Subscription::active("sub", "basic"))
    );
    let mut full = Subscription::new("sub", "pro", SubscriptionStatus::PastDue);
    full.current_period_start = Some(at(1));
    full.current_period_end = Some(at(2));
    full.trial_end = Some(at(3));
    full.canceled_at = Some(at(4));
    full.ended_at = Some(at(5));
    full.past_due_since = Some(at(6));
    full.grace_until = Some(at(7));
    p.put_subscription(full.clone()).await.unwrap();
    assert_eq!(p.subscription(&a).await.unwrap(), Some(full));
    for status in [
        SubscriptionStatus::Trialing,
        SubscriptionStatus::Unpaid,
        SubscriptionStatus::Canceled,
        SubscriptionStatus::Paused,
        SubscriptionStatus::Incomplete,
        SubscriptionStatus::Expired,
    ] {
        let s = Subscription::new("sub2", "free", status);
        p.put_subscription(s.clone()).await.unwrap();
        assert_eq!(p.subscription(&acct("sub2")).await.unwrap(), Some(s));
    }
}

/// `put_subscription_if`: written only over the expected mark (none, or equal), and the mark
/// read back as written; concurrent writers over the same mark: exactly one wins.
pub async fn plan_store_conditional_put(p: &(impl PlanStore + Clone)) {
    let a = acct("cas");
    let mark = |secs: u64, id: &str| SyncMark::new("stripe:sub_1", at(secs), id);
    let marked = |plan: &str, m: &SyncMark| {
        let mut s = Subscription::active("cas", plan);
        s.current_period_end = Some(at(1_000));
        s.synced = Some(m.clone());
        s
    };
    let (m1, m2, m3) = (mark(10, "evt_a"), mark(20, "evt_b"), mark(20, "evt_c"));
    // No subscription: only `None` matches.
    assert!(!p
        .put_subscription_if(marked("pro", &m1), Some(&m1))
        .await
        .unwrap());
    assert_eq!(p.subscription(&a).await.unwrap(), None);
    assert!(p
        .put_subscription_if(marked("pro", &m1), None)
        .await
        .unwrap());
    assert_eq!(p.subscription(&a).await.unwrap(), Some(marked("pro", &m1)));
    // Marked: `None` and any other mark (source, created or id differing) are refused.
    assert!(!p
        .put_subscription_if(marked("basic", &m2), None)
        .await
        .unwrap());
    let other_source = SyncMark::new("stripe:sub_2", at(10), "evt_a");
    for wrong in [&m2, &mark(10, "evt_x"), &other_source] {
        assert!(!p
            .put_subscription_if(marked("basic", &m2), Some(wrong))
            .await
            .unwrap());
    }
    assert_eq!(
        p.subscription(&a).await.unwrap().unwrap().plan.as_str(),
        "pro"
    );
    assert!(p
        .put_subscription_if(marked("basic", &m2), Some(&m1))
        .await
        .unwrap());
    assert_eq!(
        p.subscription(&a).await.unwrap(),
        Some(marked("basic", &m2))
    );
    // Two writers that read the same mark: one wins, the other is told to read again.
    let (x, y) = (p.clone(), p.clone());
    let (free, pro) = (marked("free", &m3), marked("pro", &m3));
    let (m2x, m2y) = (m2.clone(), m2.clone());
    let (one, two) = tokio::join!(
        async move { x.put_subscription_if(free, Some(&m2x)).await },
        async move { y.put_subscription_if(pro, Some(&m2y)).await },
    );
    assert_eq!(u8::from(one.unwrap()) + u8::from(two.unwrap()), 1);
    // An application write without a mark clears it; `None` matches again.
    p.put_subscription(Subscription::active("cas", "free"))
        .await
        .unwrap();
    assert!(p
        .put_subscription_if(marked("pro", &m1), None)
        .await
        .unwrap());
    // The largest created second a mark can hold on every backend.
    let far = SyncMark::new("stripe:sub_1", Timestamp::from_unix((1 << 53) - 1), "evt_z");
    assert!(p
        .put_subscription_if(marked("pro", &far), Some(&m1))
        .await
        .unwrap());
    assert!(p
        .put_subscription_if(marked("basic", &m1), Some(&far))
        .await
        .unwrap());
}

/// A recorded response with every kind of content: binary body, repeated headers, trailers.
fn sample_record(body: &[u8], status: u16) -> ResponseRecord {
    ResponseRecord {
        body: BodyDigest::of(b"{\"model\":\"m\"}"),
        recording: Recording::Response(RecordedResponse {
            status,
            headers: vec![
                (
                    "content-type".into(),
                    bytes::Bytes::from_static(b"application/json"),
                ),
                ("set-cookie".into(), bytes::Bytes::from_static(b"a=1")),
                ("set-cookie".into(), bytes::Bytes::from_static(b"b=2")),
            ],
            body: bytes::Bytes::copy_from_slice(body),
            trailers: vec![("grpc-status".into(), bytes::Bytes::from_static(b"0"))],
        }),
    }
}

/// Recorded responses: written, read back exactly, replaced, kept per account, expired.
pub async fn recorded_responses(l: &impl Ledger) {
    let records = l.records().expect("every backend keeps recorded responses");
    let limits = RecordLimits {
        retention_secs: 100,
        per_account: 10,
    };
    let a = id("acme", "idem:order-1");
    assert_eq!(records.get(&a, at(0)).await.unwrap(), None);
    // Every byte value, and more than one network packet.
    let body: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();
    let first = sample_record(&body, 201);
    records.put(&a, &first, limits, at(10)).await.unwrap();
    assert_eq!(records.get(&a, at(10)).await.unwrap(), Some(first.clone()));
    assert_eq!(records.get(&a, at(109)).await.unwrap(), Some(first));
    assert_eq!(records.get(&a, at(110)).await.unwrap(), None, "expired");
    // Another account's key of the same name is another record.
    assert_eq!(
        records
            .get(&id("globex", "idem:order-1"), at(10))
            .await
            .unwrap(),
        None
    );
    // Replaced, and the too-large marker.
    let too_large = ResponseRecord {
        body: BodyDigest {
            complete: false,
            ..BodyDigest::of(b"")
        },
        recording: Recording::TooLarge,
    };
    records.put(&a, &too_large, limits, at(200)).await.unwrap();
    records
        .put(&a, &sample_record(b"", 200), limits, at(201))
        .await
        .unwrap();
    records.put(&a, &too_large, limits, at(202)).await.unwrap();
    assert_eq!(records.get(&a, at(250)).await.unwrap(), Some(too_large));
}

/// An account keeps at most `per_account` records: writing one more drops the oldest; other
/// accounts are untouched.
pub async fn recorded_responses_are_bounded(l: &impl Ledger) {
    let records = l.records().expect("every backend keeps recorded responses");
    let limits = RecordLimits {
        retention_secs: 1000,
        per_account: 3,
    };
    let other = id("globex", "idem:keep");
    records
        .put(&other, &sample_record(b"globex", 200), limits, at(0))
        .await
        .unwrap();
    for i in 0..5u64 {
        let key = format!("idem:k{i}");
        records
            .put(
                &id("acme", &key),
                &sample_record(key.as_bytes(), 200),
                limits,
                at(1 + i),
            )
            .await
            .unwrap();
    }
    for i in 0..5u64 {
        let got = records
            .get(&id("acme", &format!("idem:k{i}")), at(10))
            .await
            .unwrap();
        assert_eq!(got.is_some(), i >= 2, "k{i}");
    }
    assert!(records.get(&other, at(10)).await.unwrap().is_some());
    // Rewriting a kept key makes it the newest: the next write drops k3, the oldest left.
    records
        .put(
            &id("acme", "idem:k2"),
            &sample_record(b"again", 200),
            limits,
            at(20),
        )
        .await
        .unwrap();
    records
        .put(
            &id("acme", "idem:k5"),
            &sample_record(b"k5", 200),
            limits,
            at(21),
        )
        .await
        .unwrap();
    let kept: Vec<bool> = futures_util::future::join_all((2..6u64).map(|i| {
        let id = id("acme", &format!("idem:k{i}"));
        async move { records.get(&id, at(22)).await.unwrap().is_some() }
    }))
    .await;
    assert_eq!(
        kept,
        [true, false, true, true],
        "k2 (rewritten), k4 and k5 are kept"
    );
}

/// One `#[tokio::test]` per check. `$ledger` and `$plans` are async expressions giving
/// `Option<store>` (`None`: the backend is unreachable and the test was skipped).
#[macro_export]
macro_rules! conformance_tests {
    ($ledger:expr, $plans:expr) => {
        conformance_tests!($ledger, $plans, None::<(tower_402::keys::MemoryKeyStore, ())>, |_| async {
            String::from("-")
        });
    };
    ($ledger:expr, $plans:expr, $keys:expr, $scan:expr) => {
        conformance_tests!(@one $ledger, deposits, deposits);
        conformance_tests!(@one $ledger, reserve_settle_release, reserve_settle_release);
        conformance_tests!(@one $ledger, over_estimates_and_denials, over_estimates_and_denials);
        conformance_tests!(@one $ledger, idempotent_reserve, idempotent_reserve);
        conformance_tests!(@one $ledger, expiry, expiry);
        conformance_tests!(@one $ledger, expiry_charges_started_work, expiry_charges_started_work);
        conformance_tests!(@one $ledger, allowances, allowances);
        conformance_tests!(@one $ledger, allowance_window_rollover, allowance_window_rollover);
        conformance_tests!(@one $ledger, retention, retention);
        conformance_tests!(@one $ledger, unique_keys_are_forgotten, unique_keys_are_forgotten);
        conformance_tests!(@one $ledger, recorded_responses, recorded_responses);
        conformance_tests!(@one $ledger, recorded_responses_are_bounded, recorded_responses_are_bounded);
        conformance_tests!(@one $ledger, journal, journal);
        conformance_tests!(@one $ledger, overdraft, overdraft);
        conformance_tests!(@one $ledger, a_lost_reply_is_recovered_by_its_attempt, a_lost_reply_is_recovered_by_its_attempt);

        #[tokio::test]
        async fn matches_the_book_on_random_sequences() {
            for seed in [1u64, 42, 0xdead_beef] {
                let Some(l) = $ledger else { return };
                conformance::matches_the_book(&l, seed, false).await;
            }
        }

        /// Amounts near 2^53 and several meters overflowing at once.
        #[tokio::test]
        async fn matches_the_book_near_the_largest_amounts() {
            for seed in [7u64, 99, 0xfeed] {
                let Some(l) = $ledger else { return };
                conformance::matches_the_book(&l, seed, true).await;
            }
        }

        #[tokio::test]
        async fn key_store() {
            // `$keys`: the store and what `$scan` needs to read everything it wrote.
            let Some((store, ctx)) = $keys else { return };
            conformance::keys::key_store(store).await;
            let stored = $scan(ctx).await;
            for raw in conformance::keys::RAW_KEYS {
                assert!(!stored.contains(raw), "the raw key {raw} is stored");
            }
            assert!(!stored.is_empty(), "the scan found the stored keys");
        }

        #[tokio::test]
        async fn plan_store_reads_and_writes() {
            let Some(p) = $plans else { return };
            conformance::plan_store(&p).await;
        }

        #[tokio::test]
        async fn plan_store_conditional_put() {
            let Some(p) = $plans else { return };
            conformance::plan_store_conditional_put(&p).await;
        }
    };
    (@one $ledger:expr, $name:ident, $check:ident) => {
        #[tokio::test]
        async fn $name() {
            let Some(l) = $ledger else { return };
            conformance::$check(&l).await;
        }
    };
}

pub mod fleet;
pub mod keys;
