//! The quickstart: a paid weather API on the in-memory stores.
//!
//! Run it:
//!
//! ```sh
//! cargo run --example quickstart            # listens on 127.0.0.1:3000 (PORT to change)
//! ```
//!
//! Then try (README.md lists every answer):
//!
//! ```sh
//! curl -i localhost:3000/v1/forecast -H 'x-api-key: demo-pro'        # 200, x-credits-remaining
//! curl -i localhost:3000/v1/premium  -H 'x-api-key: demo-basic'      # 402 PLAN_UPGRADE_REQUIRED
//! curl -i localhost:3000/v1/forecast -H 'Authorization: Bearer demo-broke'   # 402 INSUFFICIENT_CREDITS
//! curl -i localhost:3000/v1/topup -H 'x-api-key: demo-broke' \
//!      -H 'Idempotency-Key: order-1' -H 'content-type: application/json' -d '{"credits": 50}'
//! curl -i localhost:3000/v1/balance  -H 'x-api-key: demo-free'
//! ```

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceBuilder;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Period, Plan, PlanStore, Subscription, SubscriptionStatus};
use tower_402::problem::{Links, ProblemConfig};
use tower_402::{
    Clock, Credits, Entitlement, Ledger, MemoryLedger, MemoryPlanStore, MeteringLayer,
    PaymentGateLayer, ProblemDetailsLayer, StaticKeys, SystemClock, Timestamp,
};

/// The demo keys, their accounts, and what each shows.
pub const DEMO_KEYS: &[(&str, &str, &str)] = &[
    ("demo-pro", "acct_pro", "pro, active, 1000 credits"),
    ("demo-basic", "acct_basic", "basic, active, 1000 credits"),
    ("demo-free", "acct_free", "free, active, 5 requests a month"),
    ("demo-broke", "acct_broke", "basic, active, 0 credits"),
    ("demo-expired", "acct_expired", "basic, canceled and ended"),
    (
        "demo-grace",
        "acct_grace",
        "basic, past due, inside its grace period",
    ),
    (
        "demo-past-due",
        "acct_past_due",
        "basic, past due, grace over",
    ),
    (
        "demo-trial-over",
        "acct_trial_over",
        "trial ended, no paid plan",
    ),
];

const DAY: u64 = 86_400;

/// The demo app and handles on its stores.
pub struct Demo {
    /// The router with all three layers.
    pub router: Router,
    /// The ledger behind it.
    pub ledger: MemoryLedger,
    /// The plan store behind it.
    pub plans: MemoryPlanStore,
}

/// The plans on offer.
pub fn catalog() -> Catalog {
    Catalog::new()
        .with_plan(Plan::new("free", "Free", 0).allowance("requests", 5, Period::CalendarMonth))
        .with_plan(Plan::new("basic", "Basic", 1).overage(true))
        .with_plan(
            Plan::new("pro", "Pro", 2)
                .overage(true)
                .feature("premium-models"),
        )
}

/// Builds the demo with every account of [`DEMO_KEYS`] in its documented state at `clock`'s
/// current time.
pub async fn demo<C: Clock + Clone>(clock: C) -> Demo {
    let now = clock.now();
    let ago = |days: u64| Timestamp::from_unix(now.unix().saturating_sub(days * DAY));
    let plans = MemoryPlanStore::new();
    let ledger = MemoryLedger::new();
    let mut keys = StaticKeys::new();
    for (key, account, _) in DEMO_KEYS {
        keys = keys.with_key(*key, *account);
    }
    let mut subs = vec![
        Subscription::active("acct_pro", "pro"),
        Subscription::active("acct_basic", "basic"),
        Subscription::active("acct_free", "free"),
        Subscription::active("acct_broke", "basic"),
    ];
    let mut expired = Subscription::new("acct_expired", "basic", SubscriptionStatus::Canceled);
    expired.canceled_at = Some(ago(40));
    expired.ended_at = Some(ago(10));
    subs.push(expired);
    let mut grace = Subscription::new("acct_grace", "basic", SubscriptionStatus::PastDue);
    grace.past_due_since = Some(ago(1));
    subs.push(grace);
    let mut past_due = Subscription::new("acct_past_due", "basic", SubscriptionStatus::PastDue);
    past_due.past_due_since = Some(ago(10));
    subs.push(past_due);
    let mut trial = Subscription::new("acct_trial_over", "basic", SubscriptionStatus::Trialing);
    trial.trial_end = Some(ago(1));
    subs.push(trial);
    for sub in subs {
        plans.put_subscription(sub).await.expect("memory store");
    }
    for account in [
        "acct_pro",
        "acct_basic",
        "acct_grace",
        "acct_past_due",
        "acct_expired",
    ] {
        ledger
            .deposit(&account.into(), Credits::new(1000), "demo-seed", now)
            .await
            .expect("memory ledger");
    }

    let links = Links::new()
        .billing("https://billing.example.com/portal")
        .upgrade("https://example.com/pricing")
        .top_up("https://billing.example.com/top-up")
        .support("https://example.com/support")
        .docs("https://docs.example.com/errors");
    let problems = ProblemConfig::new()
        .type_base("https://docs.example.com/problems/")
        .links(links);
    let gate = PaymentGateLayer::new(keys, plans.clone(), catalog())
        .ledger(ledger.clone())
        .clock(clock.clone())
        .problems(problems.clone())
        .route("GET /health", Requirement::public())
        .route("GET /v1/balance", Requirement::identify_only())
        .route("POST /v1/topup", Requirement::identify_only())
        .route(
            "GET /v1/premium",
            Requirement::new()
                .min_tier(2)
                .cost(Cost::new("requests", 1, Credits::new(10))),
        )
        .route(
            "GET /v1/forecast",
            Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))),
        );
    let metering = MeteringLayer::new(ledger.clone())
        .clock(clock.clone())
        .problems(problems.clone());

    let state = common::Billing {
        ledger: Arc::new(ledger.clone()),
        catalog: catalog(),
        clock,
    };
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/forecast", get(forecast))
        .route("/v1/premium", get(premium))
        .route("/v1/balance", get(common::balance::<C>))
        .route("/v1/topup", post(common::top_up::<C>))
        .layer(DefaultBodyLimit::max(1024))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(ProblemDetailsLayer::new(problems))
                .layer(gate)
                .layer(metering),
        );
    Demo {
        router,
        ledger,
        plans,
    }
}

async fn forecast(entitlement: Entitlement) -> Json<serde_json::Value> {
    Json(json!({
        "account": entitlement.account,
        "forecast": "sunny, 21°C",
    }))
}

async fn premium(entitlement: Entitlement) -> Json<serde_json::Value> {
    Json(json!({
        "account": entitlement.account,
        "forecast": "sunny, 21°C; UV 6 from 11:00; pollen low; wind 12 km/h NW",
    }))
}

#[allow(dead_code)] // the tests include this file for `demo` and do not call `main`
#[tokio::main]
async fn main() {
    common::init_tracing();
    let listener = common::listen(common::port(3000)).await;
    let app = demo(SystemClock).await.router;
    let addr = listener.local_addr().expect("bound socket");
    println!("tower-402 quickstart listening on http://{addr}");
    println!("demo keys (send as x-api-key or Authorization: Bearer):");
    for (key, _, what) in DEMO_KEYS {
        println!("  {key:<16} {what}");
    }
    common::serve(listener, app).await;
}
