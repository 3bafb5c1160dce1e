//! The gauges through a real Prometheus recorder: `tower402_credits_leased` follows the
//! credit this instance holds in leases (up when a lease is taken, down when it is settled or
//! given back), and `tower402_credits_held` comes back to zero once a request is settled.
//! One test: a metrics recorder is process-wide.
#![cfg(feature = "metrics")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tower::ServiceExt;
use tower_402::decision::{Cost, Requirement};
use tower_402::ledger::{Charge, ReserveOutcome, ReserveRequest, Usage};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::store::{LeaseConfig, LeasedLedger};
use tower_402::*;

/// The value of an unlabelled gauge or counter in a Prometheus scrape (0 when absent).
fn value(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

fn request(key: &str, charge: &Charge) -> ReserveRequest {
    ReserveRequest {
        account: "acme".into(),
        key: key.into(),
        fingerprint: 0,
        charges: vec![charge.clone()].into(),
        ttl_secs: 60,
        idempotent: false,
        on_expiry: Default::default(),
        attempt: 0,
        now: Timestamp::EPOCH,
    }
}

#[tokio::test]
async fn gauges_follow_leases_and_holds() {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder in this test binary");
    let scrape = || {
        prometheus.run_upkeep();
        prometheus.render()
    };

    // Leases: taken at a tick after a miss, parked in the gauge, gone after shutdown.
    let shared = MemoryLedger::new();
    shared
        .deposit(
            &"acme".into(),
            Credits::new(10_000),
            "top-up",
            Timestamp::EPOCH,
        )
        .await
        .unwrap();
    let clock = ManualClock::new(Timestamp::EPOCH);
    let ledger =
        LeasedLedger::with_clock(shared.clone(), LeaseConfig::new().background(false), clock);
    let charge = Cost::new("requests", 1, Credits::new(1))
        .charge(&Plan::new("p", "P", 1).overage(true), Timestamp::EPOCH);
    let first = ledger.reserve(&request("r1", &charge)).await.unwrap();
    assert!(matches!(first, ReserveOutcome::Reserved(_)));
    assert_eq!(value(&scrape(), "tower402_credits_leased"), 0.0);
    ledger.tick().await;
    let parked = ledger.parked(&"acme".into()).leased.get();
    assert!(parked > 0, "a lease was taken");
    assert_eq!(value(&scrape(), "tower402_credits_leased"), parked as f64);
    ledger.reserve(&request("r2", &charge)).await.unwrap();
    ledger
        .settle(
            &request("r2", &charge).id(),
            &[Usage::new("requests", 1)],
            Default::default(),
            Timestamp::EPOCH,
        )
        .await
        .unwrap();
    ledger.shutdown().await;
    assert_eq!(ledger.parked(&"acme".into()).leased, Credits::ZERO);
    assert_eq!(value(&scrape(), "tower402_credits_leased"), 0.0);
    ledger
        .release(&request("r1", &charge).id(), Timestamp::EPOCH)
        .await
        .unwrap();

    // Holds: a served request's hold is counted while it runs and settled after.
    let runs = Arc::new(AtomicUsize::new(0));
    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "pro"));
    let billing = Billing::new(
        StaticKeys::new().with_key("k", "acme"),
        plans,
        shared.clone(),
        Catalog::new().with_plan(Plan::new("pro", "Pro", 2).overage(true)),
    )
    .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(3))));
    let seen_held = Arc::new(std::sync::Mutex::new(None));
    let app = {
        let (runs, seen_held, prometheus) = (runs.clone(), seen_held.clone(), prometheus.clone());
        Router::new()
            .route(
                "/",
                get(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    prometheus.run_upkeep();
                    *seen_held.lock().unwrap() =
                        Some(value(&prometheus.render(), "tower402_credits_held"));
                    "ok"
                }),
            )
            .layer(billing.layer())
    };
    let res = app
        .oneshot(
            http::Request::get("/")
                .header("x-api-key", "k")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Settled when the body has been sent.
    let body = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(&body[..], b"ok");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        *seen_held.lock().unwrap(),
        Some(3.0),
        "held while the handler ran"
    );
    let after = scrape();
    assert_eq!(value(&after, "tower402_credits_held"), 0.0);
    assert!(value(&after, "tower402_credits_settled_total") >= 3.0);
    let b = shared
        .balance(&"acme".into(), Timestamp::EPOCH)
        .await
        .unwrap();
    assert_eq!((b.held.get(), b.settled.get()), (0, 1 + 3));
}
