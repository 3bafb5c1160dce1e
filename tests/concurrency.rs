//! Concurrency must never overspend: many requests racing against a small balance.

mod common;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use http::StatusCode;
use tower::ServiceBuilder;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Period, Plan, Subscription};
use tower_402::*;

/// The billing stack, as one layer or (`parts`) as its three parts spelled out in a
/// `ServiceBuilder`. Either way only the reservation checks the credit (the old
/// `and_metering` composition is what every stack now does).
fn app(ledger: MemoryLedger, plans: MemoryPlanStore, clock: ManualClock, parts: bool) -> Router {
    let catalog = Catalog::new()
        .with_plan(Plan::new("basic", "Basic", 1).overage(true))
        .with_plan(Plan::new("free", "Free", 0).allowance("requests", 100, Period::Day));
    let keys = StaticKeys::new()
        .with_key("k-basic", "racer")
        .with_key("k-free", "freeloader");
    let billing = Billing::new(keys, plans, ledger, catalog)
        .clock(clock)
        .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
    let router = Router::new().route("/work", get(|| async { "done" }));
    if parts {
        return router.layer(
            ServiceBuilder::new()
                .layer(billing.problems())
                .layer(billing.gate())
                .layer(billing.metering()),
        );
    }
    router.layer(billing.layer())
}

async fn race(app: Router, key: &'static str, n: usize) -> (usize, usize, usize) {
    let mut tasks = Vec::with_capacity(n);
    let start = Arc::new(tokio::sync::Barrier::new(n));
    for _ in 0..n {
        let app = app.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            common::get(&app, "/work", key).await
        }));
    }
    let (mut ok, mut denied, mut other) = (0, 0, 0);
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED => denied += 1,
            s => {
                eprintln!("unexpected {s}: {:?}", a.body);
                other += 1
            }
        }
    }
    (ok, denied, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_against_a_hundred_credits() {
    for parts in [false, true] {
        let clock = ManualClock::new(Timestamp::from_utc(2026, 11, 24, 0, 0, 0).unwrap());
        let ledger = MemoryLedger::new();
        let plans = MemoryPlanStore::new().with(Subscription::active("racer", "basic"));
        let racer = AccountId::new("racer");
        ledger
            .deposit(&racer, Credits::new(100), "seed", clock.now())
            .await
            .unwrap();
        let app = app(ledger.clone(), plans, clock.clone(), parts);
        let (ok, denied, other) = race(app, "k-basic", 1000).await;
        assert_eq!((ok, denied, other), (100, 900, 0), "parts: {parts}");
        let b = ledger.balance(&racer, clock.now()).await.unwrap();
        assert_eq!(b.available, Credits::ZERO);
        assert_eq!(b.held, Credits::ZERO);
        assert_eq!(b.settled, Credits::new(100));
        assert_eq!(b.deposited, Credits::new(100));
        assert_eq!(ledger.open_reservations(&racer, clock.now()), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_against_an_allowance_of_a_hundred() {
    for parts in [false, true] {
        let clock = ManualClock::new(Timestamp::from_utc(2026, 11, 24, 0, 0, 0).unwrap());
        let ledger = MemoryLedger::new();
        let plans = MemoryPlanStore::new().with(Subscription::active("freeloader", "free"));
        let app = app(ledger.clone(), plans, clock.clone(), parts);
        let (ok, denied, other) = race(app, "k-free", 1000).await;
        assert_eq!((ok, denied, other), (100, 900, 0), "parts: {parts}");
        let who = AccountId::new("freeloader");
        let window = Period::Day.window(clock.now()).0;
        let usage = ledger
            .allowance_usage(&who, &"requests".into(), window, clock.now())
            .await
            .unwrap();
        assert_eq!((usage.used, usage.held), (100, 0));
    }
}
