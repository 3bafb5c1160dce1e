//! Several app instances sharing one backend, under real concurrency.

use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, PlanStore, Subscription};
use tower_402::{Billing, Credits, Ledger, StaticKeys, Timestamp};

/// The account every fleet request pays from.
pub const ACCOUNT: &str = "fleet";

/// One app instance: its own layers and router around its own store clients.
pub fn app(ledger: impl Ledger + Clone, plans: impl PlanStore) -> Router {
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true));
    let keys = StaticKeys::new().with_key("fleet-key", ACCOUNT);
    // This test is about exact counts, not latency: 2,000 requests queue on one hot account
    // (on PostgreSQL, one row lock), so store calls get a minute instead of the default 5 s.
    let patience = Some(Duration::from_secs(60));
    let billing = Billing::new(keys, plans, ledger, catalog)
        .timeout(patience)
        .route(
            "GET /work",
            Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))),
        );
    Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(billing.layer())
}

/// One request through `app`, body read to the end: the status and the body.
pub async fn call(app: Router) -> (StatusCode, http::HeaderMap, String) {
    let req = Request::get("/work")
        .header("x-api-key", "fleet-key")
        .body(Body::empty())
        .expect("request");
    let res = app.oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Four instances (one per `(ledger, plans)` pair), 2,000 concurrent requests against one
/// account holding 500 credits at 1 credit each: exactly 500 served, the rest refused with
/// `INSUFFICIENT_CREDITS`, and the books balance.
pub async fn run<L, P>(instances: Vec<(L, P)>)
where
    L: Ledger + Clone,
    P: PlanStore + Clone,
{
    let (ledger, plans) = instances.first().cloned().expect("one instance at least");
    plans
        .put_subscription(Subscription::active(ACCOUNT, "basic"))
        .await
        .expect("subscription");
    ledger
        .deposit(&ACCOUNT.into(), Credits::new(500), "seed", Timestamp::now())
        .await
        .expect("deposit");
    let apps: Vec<Router> = instances.into_iter().map(|(l, p)| app(l, p)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2_000 {
        let app = apps[i % apps.len()].clone();
        tasks.spawn(call(app));
    }
    let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
    while let Some(res) = tasks.join_next().await {
        let (status, _, body) = res.expect("task");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::PAYMENT_REQUIRED if body.contains("INSUFFICIENT_CREDITS") => refused += 1,
            s => other.push((s, body)),
        }
    }
    assert!(
        other.is_empty(),
        "unexpected answers: {:?}",
        &other[..other.len().min(3)]
    );
    assert_eq!((ok, refused), (500, 1_500));
    let b = ledger
        .balance(&ACCOUNT.into(), Timestamp::now())
        .await
        .expect("balance");
    assert_eq!(b.available, Credits::ZERO);
    assert_eq!(b.settled, Credits::new(500));
    assert_eq!(b.held, Credits::ZERO);
    assert_eq!(b.deposited, Credits::new(500));
}
