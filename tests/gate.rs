//! The gate beyond the quickstart: identity from extensions, features, no
//! subscription, outages (fail-closed and fail-open), custom denials, and logs without secrets.

mod common;

use async_trait::async_trait;
use axum::routing::get;
use axum::Router;
use common::{request, send};
use http::{Method, StatusCode};
use tower_402::decision::{CustomDenial, Requirement};
use tower_402::plan::{Catalog, Plan, PlanStore, Subscription};
use tower_402::*;

struct DownStore;

fn refused() -> StoreError {
    StoreError::unavailable(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "connection refused (10.0.0.7:5432, internal)",
    ))
}

#[async_trait]
impl PlanStore for DownStore {
    async fn subscription(&self, _: &AccountId) -> Result<Option<Subscription>, StoreError> {
        Err(refused())
    }
    async fn put_subscription(&self, _: Subscription) -> Result<(), StoreError> {
        Err(refused())
    }
}

fn catalog() -> Catalog {
    Catalog::new()
        .with_plan(Plan::new("basic", "Basic", 1).overage(true))
        .with_plan(Plan::new("pro", "Pro", 2).feature("gpu"))
}

fn keys() -> StaticKeys {
    StaticKeys::new().with_key("sk_live_TOPSECRET", "acme")
}

/// Billing over `plans` with the test's keys and catalog, on a fresh in-memory ledger.
fn billing(plans: impl PlanStore) -> Billing {
    Billing::new(keys(), plans, MemoryLedger::new(), catalog())
}

fn app(billing: Billing) -> Router {
    router().layer(billing.layer())
}

fn router() -> Router {
    Router::new().route(
        "/",
        get(|e: Option<axum::Extension<Entitlement>>| async move {
            e.map_or("anonymous".to_owned(), |e| e.account.to_string())
        }),
    )
}

#[tokio::test]
async fn an_account_from_an_earlier_auth_layer_skips_the_key() {
    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
    let app = app(billing(plans)).layer(axum::middleware::from_fn(
        |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
            req.extensions_mut().insert(AccountId::new("acme"));
            next.run(req).await
        },
    ));
    let a = send(&app, request(Method::GET, "/", &[], "")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "acme");
}

#[tokio::test]
async fn feature_requirements() {
    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
    let gate = billing(plans).default_requirement(Requirement::new().feature("gpu"));
    let a = common::get(&app(gate), "/", "sk_live_TOPSECRET").await;
    let doc = a.problem(402, "PLAN_UPGRADE_REQUIRED");
    assert_eq!(doc["required_feature"], "gpu");
    assert_eq!(doc["required_plan"], "pro");
}

#[tokio::test]
async fn a_known_account_without_a_subscription_is_pending() {
    let gate = billing(MemoryPlanStore::new());
    let a = common::get(&app(gate), "/", "sk_live_TOPSECRET").await;
    a.problem(402, "SUBSCRIPTION_PENDING");
}

#[tokio::test]
async fn store_outage_fails_closed_with_503_and_no_internal_text() {
    let gate = billing(DownStore);
    let a = common::get(&app(gate), "/", "sk_live_TOPSECRET").await;
    let doc = a.problem(503, "SERVICE_UNAVAILABLE");
    assert_eq!(a.header("retry-after"), Some("5"));
    assert!(!doc.to_string().contains("10.0.0.7"), "{doc}");
}

#[tokio::test]
async fn store_outage_fails_open_when_configured() {
    let gate = billing(DownStore).failure_mode(FailureMode::Open);
    let a = common::get(&app(gate), "/", "sk_live_TOPSECRET").await;
    assert_eq!(a.status, StatusCode::OK);
    // Still no entry without a valid key, even failing open.
    let gate = billing(DownStore).failure_mode(FailureMode::Open);
    let a = common::get(&app(gate), "/", "nope").await;
    a.problem(401, "UNAUTHENTICATED");
}

#[tokio::test]
async fn custom_denials_render_like_built_in_ones() {
    let app = Router::new().route(
        "/",
        get(|| async {
            Denial::Custom(Box::new(
                CustomDenial::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "BUDGET_EXHAUSTED",
                    "Department budget exhausted",
                    "Research has spent its Q4 budget.",
                )
                .member("budget_resets_at", "2027-01-01T00:00:00Z"),
            ))
        }),
    );
    let app = app.layer(ProblemDetailsLayer::new(
        tower_402::problem::ProblemConfig::new().type_base("https://docs.example.com/p/"),
    ));
    let a = send(&app, request(Method::GET, "/", &[], "")).await;
    let doc = a.problem(402, "BUDGET_EXHAUSTED");
    assert_eq!(doc["type"], "https://docs.example.com/p/budget-exhausted");
    assert_eq!(doc["title"], "Department budget exhausted");
    assert_eq!(doc["budget_resets_at"], "2027-01-01T00:00:00Z");
}

#[tokio::test]
async fn credit_is_checked_once_at_the_reservation() {
    use tower_402::decision::Cost;
    // Every read of the ledger goes through this counter (no synchronous fast path).
    let ledger = common::CountingLedger::new(MemoryLedger::new());
    let now = Timestamp::now();
    ledger
        .deposit(&"acme".into(), Credits::new(2), "seed", now)
        .await
        .unwrap();
    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
    let cost = Requirement::new().cost(Cost::new("requests", 1, Credits::new(1)));
    let billing = Billing::new(keys(), plans, ledger.clone(), catalog()).default_requirement(cost);
    let available = Router::new().route(
        "/",
        get(|e: axum::Extension<Entitlement>| async move {
            format!("{:?}", e.available.map(Credits::get))
        }),
    );
    let key = [("x-api-key", "sk_live_TOPSECRET")];

    // One stack: the gate reads no balance; the reservation checks, holds and charges, and
    // the handler sees what is left after this request's hold.
    let once = available.layer(billing.layer());
    let a = send(&once, request(Method::GET, "/", &key, "")).await;
    assert_eq!(
        (a.status, a.body.as_ref()),
        (StatusCode::OK, &b"Some(1)"[..])
    );
    assert_eq!(ledger.reads(), 0, "the gate read the ledger");
    let a = send(&once, request(Method::GET, "/", &key, "")).await;
    assert_eq!(
        (a.status, a.body.as_ref()),
        (StatusCode::OK, &b"Some(0)"[..])
    );
    // The reservation still refuses.
    let broke = send(&once, request(Method::GET, "/", &key, "")).await;
    let p = broke.problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(
        (p["balance"].as_u64(), p["required"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(ledger.reads(), 0);
    let b = ledger
        .inner
        .balance(&"acme".into(), Timestamp::now())
        .await
        .unwrap();
    assert_eq!((b.available, b.settled), (Credits::ZERO, Credits::new(2)));
}
