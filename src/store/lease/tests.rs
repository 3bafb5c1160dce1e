//! Leases on a manual clock over the in-memory ledger: every refill, settlement and return
//! happens at an explicit `tick`, so each step's balances can be asserted.

use std::time::Duration;

use super::*;
use crate::store::MemoryLedger;
use crate::ManualClock;

const T0: Timestamp = Timestamp::from_unix(1_700_000_000);

fn paid(units: u64) -> Charge {
    Charge {
        meter: Meter::new("requests"),
        units,
        unit_price: Credits::new(1),
        price_per: 1,
        allowance: None,
        overage: true,
    }
}

struct Fixture {
    shared: MemoryLedger,
    clock: ManualClock,
    n: u64,
}

impl Fixture {
    async fn new(credits: u64) -> Self {
        let shared = MemoryLedger::new();
        shared
            .deposit(&"a".into(), Credits::new(credits), "seed", T0)
            .await
            .unwrap();
        Fixture {
            shared,
            clock: ManualClock::new(T0),
            n: 0,
        }
    }

    /// Leases of exactly 10 credits (where the test is not about sizing).
    fn fixed(&self, config: LeaseConfig) -> LeasedLedger<MemoryLedger, ManualClock> {
        self.leased(
            config
                .min_lease(Credits::new(10))
                .max_lease(Credits::new(10)),
        )
    }

    fn leased(&self, config: LeaseConfig) -> LeasedLedger<MemoryLedger, ManualClock> {
        LeasedLedger::with_clock(
            self.shared.clone(),
            config.background(false).recall_wait(Duration::ZERO),
            self.clock.clone(),
        )
    }

    fn request(&mut self, units: u64) -> ReserveRequest {
        self.n += 1;
        ReserveRequest {
            account: "a".into(),
            key: format!("req:{}", self.n).into(),
            fingerprint: 0,
            charges: vec![paid(units)].into(),
            ttl_secs: 60,
            idempotent: false,
            on_expiry: OnExpiry::Release,
            attempt: 0,
            now: self.clock.now(),
        }
    }

    async fn balance(&self) -> Balance {
        let b = self
            .shared
            .balance(&"a".into(), self.clock.now())
            .await
            .unwrap();
        assert_eq!(
            b.deposited.get() + b.overdrawn.get(),
            b.available.get() + b.held.get() + b.settled.get(),
            "conservation: {b:?}"
        );
        b
    }

    /// Reserves and settles one request of `units` at its estimate: whether it was served.
    async fn serve(&mut self, l: &impl Ledger, units: u64) -> bool {
        let req = self.request(units);
        match l.reserve(&req).await.unwrap() {
            ReserveOutcome::Reserved(_) => {
                let usage = [Usage::new("requests", units)];
                l.settle(
                    &req.id(),
                    &usage,
                    OverEstimate::DrawBalance,
                    self.clock.now(),
                )
                .await
                .unwrap();
                true
            }
            ReserveOutcome::Denied(Denial::InsufficientCredits { .. }) => false,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_miss_goes_direct_then_requests_are_paid_from_the_lease() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new());
    assert!(f.serve(&l, 1).await, "no lease yet: a direct reservation");
    assert_eq!(f.balance().await.settled.get(), 1);
    l.tick().await;
    let p = l.parked(&"a".into());
    assert_eq!(
        (p.leased.get(), p.leases),
        (10, 1),
        "min_lease, within 10 % of 999"
    );
    assert_eq!(
        f.balance().await.held.get(),
        10,
        "the lease is a hold in the shared ledger"
    );
    for _ in 0..10 {
        assert!(f.serve(&l, 1).await);
    }
    // Ten requests and not one shared operation: the shared book has not moved.
    let b = f.balance().await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (989, 10, 1)
    );
    assert_eq!(l.parked(&"a".into()).unsettled.get(), 10);
    // The lease is used up: the next request goes direct, and the tick settles it in one batch.
    assert!(f.serve(&l, 1).await);
    l.tick().await;
    let b = f.balance().await;
    assert_eq!(b.settled.get(), 12);
    assert_eq!(l.parked(&"a".into()).unsettled.get(), 0);
    l.shutdown().await;
    let b = f.balance().await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (988, 0, 12)
    );
}

#[tokio::test]
async fn a_lease_never_exceeds_its_share_and_adapts_to_the_rate() {
    let mut f = Fixture::new(100_000).await;
    let l = f.leased(
        LeaseConfig::new()
            .share_percent(5)
            .max_lease(Credits::new(1_000)),
    );
    f.serve(&l, 1).await;
    l.tick().await;
    assert_eq!(
        l.parked(&"a".into()).leased.get(),
        15,
        "1 credit/s for half the TTL"
    );
    // 200 credits a second for one second: the next lease covers half a TTL (15 s) of that,
    // capped at max_lease.
    for _ in 0..200 {
        assert!(f.serve(&l, 1).await);
    }
    f.clock.advance(1);
    l.tick().await;
    let p = l.parked(&"a".into());
    assert_eq!(p.leases, 1);
    assert_eq!(
        p.leased.get(),
        1_000,
        "rate × 15 s = 3,000, capped at max_lease"
    );
    // The share caps it when the balance is smaller.
    let mut g = Fixture::new(2_000).await;
    let l = g.leased(LeaseConfig::new().share_percent(5));
    for _ in 0..100 {
        g.serve(&l, 1).await;
    }
    l.tick().await;
    let p = l.parked(&"a".into());
    assert!(p.leased.get() <= 1_900 * 5 / 100, "{p:?}");
    assert!(p.leased.get() >= 10, "{p:?}");
}

#[tokio::test]
async fn below_the_threshold_every_request_is_direct_and_exact() {
    let mut f = Fixture::new(50).await;
    let l = f.leased(LeaseConfig::new().threshold(Credits::new(100)));
    let mut served = 0;
    for i in 0..60 {
        if f.serve(&l, 1).await {
            served += 1;
        }
        if i % 5 == 0 {
            l.tick().await;
        }
        assert_eq!(l.parked(&"a".into()).leased.get(), 0, "no lease below 100");
    }
    assert_eq!(served, 50);
    let b = f.balance().await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (0, 0, 50)
    );
}

#[tokio::test]
async fn two_instances_never_serve_more_than_the_balance() {
    let mut f = Fixture::new(500).await;
    let config = LeaseConfig::new()
        .threshold(Credits::new(20))
        .share_percent(20);
    let (a, b) = (f.leased(config.clone()), f.leased(config));
    let mut served = 0;
    for i in 0..2_000u64 {
        let l = if i % 2 == 0 { &a } else { &b };
        if f.serve(l, 1 + i % 3).await {
            served += 1 + i % 3;
        }
        if i % 7 == 0 {
            a.tick().await;
        }
        if i % 11 == 0 {
            b.tick().await;
        }
        let bal = f.balance().await;
        let parked = a.parked(&"a".into()).unsettled.get() + b.parked(&"a".into()).unsettled.get();
        assert!(
            bal.settled.get() + parked <= 500,
            "overspent: {bal:?} + {parked}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
    let bal = f.balance().await;
    assert_eq!(bal.settled.get(), served, "every credit served is charged");
    assert_eq!(bal.held.get(), 0);
    assert!(
        bal.available.get() < 3,
        "only what no request could use is left: {bal:?}"
    );
}

#[tokio::test]
async fn a_dead_instances_lease_expires_back() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new().ttl_secs(8));
    f.serve(&l, 1).await;
    l.tick().await;
    for _ in 0..4 {
        assert!(f.serve(&l, 1).await);
    }
    assert_eq!(f.balance().await.held.get(), 10);
    drop(l); // killed: no settlement, no shutdown
    f.clock.advance(7);
    assert_eq!(f.balance().await.held.get(), 10, "parked until the TTL");
    f.clock.advance(1);
    let b = f.balance().await;
    // All of it back: the 4 requests it served but had not settled are not charged.
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (999, 0, 1)
    );
}

#[tokio::test]
async fn a_lease_is_renewed_after_half_its_ttl() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new().ttl_secs(8).idle_secs(100));
    f.serve(&l, 1).await;
    l.tick().await;
    // A long request holds 8 of the 10 leased credits.
    let long = f.request(8);
    assert!(matches!(
        l.reserve(&long).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert!(f.serve(&l, 1).await);
    f.clock.advance(4); // renew_after: a new lease; the old one waits, its credit is held
    l.tick().await;
    assert_eq!(l.parked(&"a".into()).leases, 2);
    assert_eq!(f.balance().await.held.get(), 20);
    f.clock.advance(1); // the new lease covers the request in flight: the old one settles
    l.tick().await;
    let p = l.parked(&"a".into());
    // Settled with the 1 spent; 2 free were left, so a new lease came too.
    assert_eq!(
        (p.leases, p.in_flight.get(), p.unsettled.get()),
        (2, 8, 0),
        "{p:?}"
    );
    assert_eq!(f.balance().await.settled.get(), 2);
    l.settle(
        &long.id(),
        &[Usage::new("requests", 8)],
        OverEstimate::DrawBalance,
        f.clock.now(),
    )
    .await
    .unwrap();
    l.shutdown().await;
    let b = f.balance().await;
    assert_eq!((b.held.get(), b.settled.get()), (0, 10));
}

#[tokio::test]
async fn a_lease_is_settled_before_it_expires_whatever_is_in_flight() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new().ttl_secs(8).idle_secs(100));
    f.serve(&l, 1).await;
    l.tick().await;
    let long = f.request(8);
    assert!(matches!(
        l.reserve(&long).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert!(f.serve(&l, 1).await);
    // Someone else holds most of the balance: no new lease can be had.
    let mut big = f.request(900);
    big.idempotent = true;
    big.key = "idem:big".into();
    assert!(matches!(
        f.shared.reserve(&big).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    f.clock.advance(6); // settle_by (8 - 2): settled with the 8 in flight charged ahead
    l.tick().await;
    let p = l.parked(&"a".into());
    assert_eq!((p.leases, p.in_flight.get()), (0, 8), "{p:?}");
    let b = f.balance().await;
    assert_eq!((b.held.get(), b.settled.get()), (900, 1 + 1 + 8));
    f.clock.advance(2); // past the lease's TTL: nothing was left to lapse
    assert_eq!(f.balance().await.settled.get(), 10);
    // The long request uses 3: the other 5 are refunded when the lease is given back.
    l.settle(
        &long.id(),
        &[Usage::new("requests", 3)],
        OverEstimate::DrawBalance,
        f.clock.now(),
    )
    .await
    .unwrap();
    l.shutdown().await;
    f.shared.release(&big.id(), f.clock.now()).await.unwrap();
    let b = f.balance().await;
    assert_eq!(b.held.get(), 0);
    assert_eq!(b.deposited.get(), 1_005, "5 refunded: {b:?}");
    assert_eq!(
        1_000 - b.available.get(),
        1 + 1 + 3,
        "charged exactly what was used: {b:?}"
    );
}

#[tokio::test]
async fn an_idle_account_gives_its_lease_back() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new().idle_secs(5));
    f.serve(&l, 1).await;
    l.tick().await;
    f.serve(&l, 1).await;
    f.clock.advance(4);
    l.tick().await;
    assert_eq!(l.parked(&"a".into()).leases, 1);
    f.clock.advance(1);
    l.tick().await;
    assert_eq!(l.parked(&"a".into()), Parked::default());
    let b = f.balance().await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (998, 0, 2)
    );
    l.tick().await; // forgotten
    assert!(l.shared.lock().is_empty());
}

#[tokio::test]
async fn keyed_and_allowance_requests_go_direct() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new());
    f.serve(&l, 1).await;
    l.tick().await;
    let mut keyed = f.request(2);
    keyed.idempotent = true;
    keyed.key = "idem:k".into();
    assert!(matches!(
        l.reserve(&keyed).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert_eq!(
        f.balance().await.held.get(),
        12,
        "its own hold in the shared ledger"
    );
    l.settle(
        &keyed.id(),
        &[Usage::new("requests", 2)],
        OverEstimate::DrawBalance,
        f.clock.now(),
    )
    .await
    .unwrap();
    // A retry on another instance is recognized.
    let other = f.leased(LeaseConfig::new());
    assert!(matches!(
        other.reserve(&keyed).await.unwrap(),
        ReserveOutcome::Replayed(Replay::Completed(_))
    ));
    let mut quota = f.request(1);
    quota.charges = vec![Charge {
        allowance: Some(crate::plan::AllowanceWindow {
            limit: 1,
            start: T0,
            resets_at: T0.plus_secs(3600),
        }),
        ..paid(1)
    }]
    .into();
    assert!(matches!(
        l.reserve(&quota).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    let used = f
        .shared
        .allowance_usage(&"a".into(), &Meter::new("requests"), T0, f.clock.now())
        .await
        .unwrap();
    assert_eq!(
        used.held, 1,
        "the allowance is counted in the shared ledger"
    );
    assert_eq!(l.parked(&"a".into()).in_flight.get(), 0);
}

#[tokio::test]
async fn over_estimates_draw_the_lease_then_the_shared_balance() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new());
    f.serve(&l, 1).await;
    l.tick().await;
    let req = f.request(1);
    l.reserve(&req).await.unwrap();
    let s = l
        .settle(
            &req.id(),
            &[Usage::new("requests", 15)],
            OverEstimate::DrawBalance,
            f.clock.now(),
        )
        .await
        .unwrap();
    // 10 from the lease (1 held + 9 free), 5 directly from the shared balance.
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (15, 0));
    let req = f.request(1);
    assert!(matches!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    let s = l
        .settle(
            &req.id(),
            &[Usage::new("requests", 4)],
            OverEstimate::CapAtHold,
            f.clock.now(),
        )
        .await
        .unwrap();
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (1, 3));
    l.shutdown().await;
    let b = f.balance().await;
    assert_eq!((b.held.get(), b.settled.get()), (0, 1 + 15 + 1));
}

#[tokio::test]
async fn a_refused_direct_request_takes_this_instances_lease_back_first() {
    let mut f = Fixture::new(200).await;
    let l = f.fixed(
        LeaseConfig::new()
            .share_percent(50)
            .threshold(Credits::new(10)),
    );
    f.serve(&l, 1).await;
    l.tick().await;
    assert_eq!(l.parked(&"a".into()).leased.get(), 10);
    // A keyed request for everything left: the shared ledger alone cannot pay it.
    let mut keyed = f.request(199);
    keyed.idempotent = true;
    keyed.key = "idem:all".into();
    assert!(matches!(
        l.reserve(&keyed).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert_eq!(l.parked(&"a".into()).leased.get(), 0);
}

/// A cost beyond a local hold under an overdraft is charged in the shared ledger from what is
/// available and then into the debt, and the settlement reports what the shared ledger has
/// left (nothing), not the balance last seen.
#[tokio::test]
async fn beyond_a_lease_hold_an_overdraft_is_charged_and_reported() {
    let mut f = Fixture::new(120).await;
    let l = f.fixed(LeaseConfig::new().threshold(Credits::new(10)));
    assert!(f.serve(&l, 1).await);
    l.tick().await;
    assert_eq!(l.parked(&"a".into()).leased.get(), 10);
    let req = f.request(1);
    assert!(matches!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    let s = l
        .settle(
            &req.id(),
            &[Usage::new("requests", 200)],
            OverEstimate::Overdraft(Credits::new(50)),
            f.clock.now(),
        )
        .await
        .unwrap();
    // 1 from the local hold and the lease's 9 free credits, then in the shared ledger the
    // 109 available and 50 owed; 31 short.
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (169, 31));
    let b = f.balance().await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.overdrawn.get()),
        (0, 10, 50)
    );
    assert_eq!(s.available_after.get(), 0, "nothing left, here or shared");
    assert_eq!(s.unspent_after.get(), 0);
    // The lease is spent: settled whole, the debt stays.
    l.shutdown().await;
    let b = f.balance().await;
    assert_eq!(
        (
            b.available.get(),
            b.held.get(),
            b.settled.get(),
            b.overdrawn.get()
        ),
        (0, 0, 1 + 10 + 159, 50)
    );
}

/// Keyless holds ([`LocalHolds`]), as the metering layer makes them for requests without an
/// `Idempotency-Key`: the same arithmetic as keyed holds paid from a lease, inline while the
/// hold and the lease pay, through the shared ledger beyond them.
#[tokio::test]
async fn local_holds_are_paid_from_the_lease_and_beyond_it_by_the_shared_ledger() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new());
    let a: AccountId = "a".into();
    let charges = [paid(1)];
    let now = f.clock.now();
    // No lease yet: not held here (the layer reserves through `reserve`).
    assert_eq!(l.try_hold(&a, &charges, now), None);
    f.serve(&l, 1).await;
    l.tick().await;
    assert_eq!(l.parked(&a).leased.get(), 10);

    // Held and settled at the estimate in this process.
    let hold = l.try_hold(&a, &charges, now).expect("the lease pays it");
    assert_eq!(hold.credits.get(), 1);
    assert_eq!(l.parked(&a).in_flight.get(), 1);
    let usage = [Usage::new("requests", 1)];
    let s = l
        .try_settle_hold(&a, &hold, &charges, &usage, OverEstimate::DrawBalance, now)
        .expect("inline");
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (1, 0));
    assert_eq!(l.parked(&a).in_flight.get(), 0);

    // Given back: nothing spent.
    let hold = l.try_hold(&a, &charges, now).unwrap();
    l.release_hold(&a, &hold, now);
    assert_eq!(l.parked(&a).in_flight.get(), 0);

    // Beyond what the hold and the lease's 9 free credits pay: not inline, nothing moved.
    let hold = l.try_hold(&a, &charges, now).unwrap();
    let big = [Usage::new("requests", 15)];
    let before = l.parked(&a);
    assert_eq!(
        l.try_settle_hold(&a, &hold, &charges, &big, OverEstimate::DrawBalance, now),
        None
    );
    assert_eq!(
        l.parked(&a),
        before,
        "a refused inline settlement moves nothing"
    );
    // Through the shared ledger: 1 held + 8 free here, 6 from the shared balance.
    let s = l
        .settle_hold(&a, &hold, &charges, &big, OverEstimate::DrawBalance, now)
        .await;
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (15, 0));
    // Capped at the hold, it is inline whatever it costs.
    let hold = l.try_hold(&a, &charges, now);
    assert_eq!(hold, None, "the lease is spent");
    l.tick().await;
    let hold = l.try_hold(&a, &charges, now).expect("refilled");
    let s = l
        .try_settle_hold(&a, &hold, &charges, &big, OverEstimate::CapAtHold, now)
        .expect("capped: inline");
    assert_eq!((s.charged.get(), s.shortfall.credits.get()), (1, 14));

    l.shutdown().await;
    let b = f.balance().await;
    assert_eq!(
        (b.held.get(), b.settled.get()),
        (0, 1 + 1 + 15 + 1),
        "charged exactly what was settled: {b:?}"
    );
}

/// A charge with an allowance (counted by the shared ledger) or without overage is never
/// held here.
#[tokio::test]
async fn local_holds_leave_allowances_to_the_shared_ledger() {
    let mut f = Fixture::new(1_000).await;
    let l = f.fixed(LeaseConfig::new());
    f.serve(&l, 1).await;
    l.tick().await;
    let a: AccountId = "a".into();
    let mut metered = paid(1);
    metered.allowance = Some(crate::plan::AllowanceWindow {
        limit: 10,
        start: T0,
        resets_at: T0.plus_secs(3600),
    });
    assert_eq!(l.try_hold(&a, &[metered], f.clock.now()), None);
    let mut no_overage = paid(1);
    no_overage.overage = false;
    assert_eq!(l.try_hold(&a, &[no_overage], f.clock.now()), None);
    assert!(l.try_hold(&a, &[paid(1)], f.clock.now()).is_some());
}

/// A request the lease cannot hold is counted once toward the account's rate, by the
/// reservation that follows the miss; a keyed hold under a key in flight is `InProgress`.
#[tokio::test]
async fn a_local_miss_counts_once_and_a_key_in_flight_is_in_progress() {
    let mut f = Fixture::new(1_000_000).await;
    let l = f.leased(
        LeaseConfig::new()
            .min_lease(Credits::new(1))
            .max_lease(Credits::new(100_000))
            .share_percent(50),
    );
    let a: AccountId = "a".into();
    // Ten misses of 100 credits in one second: each tried here, then reserved directly.
    for _ in 0..10 {
        assert_eq!(l.try_hold(&a, &[paid(100)], f.clock.now()), None);
        assert!(f.serve(&l, 100).await);
    }
    f.clock.advance(1);
    l.tick().await;
    // The rate is 1,000 credits a second (not 2,000), times half the 30 s TTL.
    assert_eq!(l.parked(&a).leased.get(), 1_000 * 15);

    let req = f.request(1);
    assert!(matches!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert_eq!(
        l.reserve(&req).await.unwrap(),
        ReserveOutcome::Replayed(Replay::InProgress)
    );
    l.release(&req.id(), f.clock.now()).await.unwrap();
    l.shutdown().await;
    let b = f.balance().await;
    assert_eq!((b.held.get(), b.settled.get()), (0, 1_000));
}
