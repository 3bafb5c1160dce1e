//! The seams between the layers and the router (issue 11): no request reaches a handler under
//! a weaker rule or a lower price than its route's, whatever its method, path spelling or key;
//! a stack that cannot work is refused when it is built; a rate limiter in the same stack
//! composes.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Method, Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

fn catalog() -> Catalog {
    Catalog::new()
        .with_plan(Plan::new("basic", "Basic", 1).overage(true))
        .with_plan(Plan::new("pro", "Pro", 2).overage(true))
}

fn cost(credits: u64) -> Requirement {
    Requirement::new().cost(Cost::new("requests", 1, Credits::new(credits)))
}

/// The routes of the test app, their rules, and the reference: what each route demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Items,
    ItemsPost,
    Premium,
    Files,
    Forecast,
}

impl Route {
    /// (minimum tier, price) the route's rule demands.
    fn demands(self) -> (u32, u64) {
        match self {
            Route::Items => (2, 50),
            Route::Premium => (2, 10),
            Route::Files => (1, 5),
            // No rule of their own: the default requirement.
            Route::ItemsPost | Route::Forecast => (0, 1),
        }
    }
}

struct App {
    router: Router,
    ledger: MemoryLedger,
    ran: Arc<Mutex<Vec<Route>>>,
}

fn billing(ledger: &MemoryLedger) -> Billing {
    let plans = MemoryPlanStore::new()
        .with(Subscription::active("acct_basic", "basic"))
        .with(Subscription::active("acct_pro", "pro"));
    let keys = StaticKeys::new()
        .with_key("basic", "acct_basic")
        .with_key("pro", "acct_pro");
    Billing::new(keys, plans, ledger.clone(), catalog())
        .clock(ManualClock::new(NOW))
        .route("GET /v1/items/{id}", cost(50).min_tier(2))
        .route("GET /v1/premium", cost(10).min_tier(2))
        .route("/v1/files/{*rest}", cost(5).min_tier(1))
        .default_requirement(cost(1))
}

async fn app() -> App {
    let ledger = MemoryLedger::new();
    for account in ["acct_basic", "acct_pro"] {
        ledger
            .deposit(&account.into(), Credits::new(1 << 30), "seed", NOW)
            .await
            .unwrap();
    }
    let ran = Arc::new(Mutex::new(Vec::new()));
    let record = |route: Route| {
        let ran = ran.clone();
        move || {
            let ran = ran.clone();
            async move {
                ran.lock().unwrap().push(route);
                "served"
            }
        }
    };
    let router = Router::new()
        .route(
            "/v1/items/{id}",
            get(record(Route::Items)).post(record(Route::ItemsPost)),
        )
        .route("/v1/premium", get(record(Route::Premium)))
        .route(
            "/v1/files/{*rest}",
            axum::routing::any(record(Route::Files)),
        )
        .route("/v1/forecast", get(record(Route::Forecast)))
        .layer(billing(&ledger).layer());
    App {
        router,
        ledger,
        ran,
    }
}

fn tier_of(key: &str) -> u32 {
    if key == "pro" {
        2
    } else {
        1
    }
}

async fn spent(ledger: &MemoryLedger, key: &str) -> u64 {
    let b = ledger
        .balance(&AccountId::new(format!("acct_{key}")), NOW)
        .await
        .unwrap();
    b.settled.get()
}

/// A path spelled some way a hostile caller might: trailing or doubled slashes, percent
/// encoding, dot segments.
fn spell(base: &str, how: u8) -> String {
    match how % 6 {
        0 => base.to_owned(),
        1 => format!("{base}/"),
        2 => base.replacen('/', "//", 2),
        3 => base.replacen('v', "%76", 1),
        4 => base.replacen("/v1/", "/v1/./", 1),
        _ => base.replacen("/v1/", "/v1/x/../", 1),
    }
}

/// A parameter a hostile caller fills with what a path normalizer would resolve: the router
/// hands it to the handler as it is.
fn odd_segment(how: u8) -> &'static str {
    match how % 5 {
        0 => ".",
        1 => "..",
        2 => "%2e%2e",
        3 => "%2F",
        _ => "%2e",
    }
}

fn arb_request() -> impl Strategy<Value = (Method, String, &'static str)> {
    let method = prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::POST),
        Just(Method::DELETE),
        Just(Method::from_bytes(b"get").unwrap()),
    ];
    let base = prop_oneof![
        (0u32..1000).prop_map(|id| format!("/v1/items/{id}")),
        Just("/v1/items/special".to_owned()),
        any::<u8>().prop_map(|how| format!("/v1/items/{}", odd_segment(how))),
        any::<u8>().prop_map(|how| format!("/v1/files/a/{}", odd_segment(how))),
        Just("/v1/premium".to_owned()),
        "[a-z]{1,5}(/[a-z]{1,5}){0,2}".prop_map(|rest| format!("/v1/files/{rest}")),
        Just("/v1/forecast".to_owned()),
        Just("/v1/unknown".to_owned()),
    ];
    let key = prop_oneof![Just("basic"), Just("pro")];
    (method, base, any::<u8>(), key).prop_map(|(m, b, how, k)| (m, spell(&b, how), k))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Through an axum router: every handler that runs does so under its route's rule, and
    /// its request was charged at least its route's price.
    #[test]
    fn no_handler_runs_under_a_weaker_rule_on_axum(
        requests in proptest::collection::vec(arb_request(), 1..12)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let app = app().await;
            for (method, path, key) in requests {
                let before = spent(&app.ledger, key).await;
                let ran_before = app.ran.lock().unwrap().len();
                let req = Request::builder()
                    .method(method.clone())
                    .uri(&path)
                    .header("x-api-key", key)
                    .body(Body::empty())
                    .unwrap();
                let res = app.router.clone().oneshot(req).await.unwrap();
                let status = res.status();
                res.into_body().collect().await.unwrap();
                let charged = spent(&app.ledger, key).await - before;
                let ran = app.ran.lock().unwrap()[ran_before..].to_vec();
                prop_assert!(ran.len() <= 1);
                if let Some(route) = ran.first() {
                    let (tier, price) = route.demands();
                    prop_assert!(
                        tier_of(key) >= tier,
                        "{method} {path} as {key} ran {route:?}, which needs tier {tier}"
                    );
                    if status.is_success() {
                        prop_assert!(
                            charged >= price,
                            "{method} {path} as {key} ran {route:?} for {charged}, not {price}"
                        );
                    }
                } else {
                    prop_assert_eq!(charged, 0, "{} {} charged without a handler", method, path);
                }
            }
            Ok(())
        })?;
    }
}

#[path = "../examples/hyper.rs"]
#[allow(dead_code)]
mod hyper_example;

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The bare-hyper example (its own `match` on method and path, no router): whatever the
    /// spelling, premium content goes only to the pro plan, charged 10.
    #[test]
    fn no_handler_runs_under_a_weaker_rule_on_bare_hyper(
        requests in proptest::collection::vec(
            (prop_oneof![Just(Method::GET), Just(Method::HEAD), Just(Method::from_bytes(b"get").unwrap())],
             any::<u8>(),
             prop_oneof![Just("demo-basic"), Just("demo-pro"), Just("demo-broke")]),
            1..10,
        )
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = ManualClock::new(Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap());
            let demo = hyper_example::demo(clock).await;
            let ledger = demo.ledger.clone();
            let service = tower::ServiceBuilder::new()
                .layer(demo.billing.layer())
                .service(tower::service_fn(hyper_example::weather));
            for (method, how, key) in requests {
                let path = spell("/v1/premium", how);
                let account = AccountId::new(key.replace("demo-", "acct_"));
                let before = ledger.balance(&account, NOW).await.unwrap().settled.get();
                let req = Request::builder()
                    .method(method.clone())
                    .uri(&path)
                    .header("x-api-key", key)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let res = service.clone().oneshot(req).await.unwrap();
                let status = res.status();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                let premium = std::str::from_utf8(&body).unwrap_or("").contains("UV 6");
                let charged = ledger.balance(&account, NOW).await.unwrap().settled.get() - before;
                if premium || (status.is_success() && method == Method::HEAD) {
                    prop_assert_eq!(key, "demo-pro", "{} {} served premium to {}", method, path, key);
                    prop_assert_eq!(charged, 10);
                }
                if key != "demo-pro" {
                    prop_assert!(!premium);
                    prop_assert_eq!(charged, 0);
                }
            }
            Ok(())
        })?;
    }
}

#[test]
#[should_panic(expected = "different `Billing` values")]
fn a_gate_and_metering_from_two_billings_are_refused_when_built() {
    let a = billing(&MemoryLedger::new());
    let b = billing(&MemoryLedger::new());
    let _app: Router = Router::new().route("/", get(|| async { "" })).layer(
        tower::ServiceBuilder::new()
            .layer(a.gate())
            .layer(b.metering()),
    );
}

#[test]
#[should_panic(expected = "write `/v1/{*rest}` as in axum")]
fn a_rule_in_the_old_prefix_syntax_is_refused_when_built() {
    let _ = billing(&MemoryLedger::new()).route("/v1/*", Requirement::new());
}

#[test]
#[should_panic(expected = "write `{id}`")]
fn a_rule_in_axum_07_syntax_is_refused_when_built() {
    let _ = billing(&MemoryLedger::new()).route("GET /v1/items/:id", Requirement::new());
}

#[test]
#[should_panic(expected = "already governs the same requests")]
fn a_rule_repeating_another_is_refused_when_built() {
    let _ = billing(&MemoryLedger::new())
        .route("GET /v1/items/{id}", Requirement::new())
        .route("GET /v1/items/{item}", Requirement::new());
}

/// A `tower_governor` rate limit in the same stack: its 429 is a problem document, distinct
/// from 402, and never billed; the handler does not run.
#[tokio::test]
async fn a_rate_limiter_composes_its_429_is_a_problem_and_never_billed() {
    use tower_governor::governor::GovernorConfigBuilder;
    use tower_governor::key_extractor::GlobalKeyExtractor;
    use tower_governor::GovernorLayer;

    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acct_pro".into(), Credits::new(100), "seed", NOW)
        .await
        .unwrap();
    let billing = billing(&ledger);
    let config = GovernorConfigBuilder::default()
        .per_second(3600)
        .burst_size(2)
        .key_extractor(GlobalKeyExtractor)
        .finish()
        .unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let app: Router = Router::new()
        .route(
            "/v1/forecast",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "sunny" }
            }),
        )
        // Chained `Router::layer` calls run last-added first: problems, then the rate
        // limit, then the gate and metering (axum makes each step's response its own `Body`,
        // which is what `tower_governor` answers with).
        .layer(
            tower::ServiceBuilder::new()
                .layer(billing.gate())
                .layer(billing.metering()),
        )
        .layer(GovernorLayer::new(Arc::new(config)))
        .layer(billing.problems());
    for _ in 0..2 {
        let a = common::get(&app, "/v1/forecast", "pro").await;
        assert_eq!(a.status, 200);
    }
    let limited = common::get(&app, "/v1/forecast", "pro").await;
    let doc = limited.problem(429, "TOO_MANY_REQUESTS");
    assert_ne!(limited.status, 402);
    assert!(doc["detail"].is_string());
    assert_eq!(
        ran.load(Ordering::SeqCst),
        2,
        "the limited request ran nothing"
    );
    let b = ledger.balance(&"acct_pro".into(), NOW).await.unwrap();
    assert_eq!(
        b.settled,
        Credits::new(2),
        "two served, two charged; the 429 is free"
    );
    assert_eq!(b.held, Credits::ZERO);
}
