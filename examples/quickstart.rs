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

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceBuilder;
use tower_402::decision::{Cost, Denial, Requirement};
use tower_402::metering::idempotency_key;
use tower_402::plan::{Catalog, Period, Plan, PlanStore, Subscription, SubscriptionStatus};
use tower_402::problem::{Links, ProblemConfig};
use tower_402::{
    Clock, Credits, Entitlement, Ledger, LedgerError, MemoryLedger, MemoryPlanStore, MeteringLayer,
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
/// The largest top-up accepted in one call.
const MAX_TOP_UP: u64 = 1_000_000_000;

/// Shared state of the demo handlers.
#[derive(Clone)]
pub struct AppState<C> {
    ledger: MemoryLedger,
    catalog: Catalog,
    clock: C,
}

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

    let state = AppState {
        ledger: ledger.clone(),
        catalog: catalog(),
        clock,
    };
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/forecast", get(forecast))
        .route("/v1/premium", get(premium))
        .route("/v1/balance", get(balance::<C>))
        .route("/v1/topup", post(top_up::<C>))
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

fn internal(e: LedgerError) -> Response {
    tracing::error!(error = %e, "ledger failed");
    Denial::Unavailable {
        retry_after_secs: 5,
    }
    .into_response()
}

async fn balance<C: Clock>(
    State(state): State<AppState<C>>,
    entitlement: Entitlement,
) -> Result<Json<serde_json::Value>, Response> {
    let now = state.clock.now();
    let account = &entitlement.account;
    let balance = state.ledger.balance(account, now).await.map_err(internal)?;
    let mut allowances = Vec::new();
    let plan = entitlement
        .plan
        .as_ref()
        .and_then(|p| state.catalog.get(p.id.as_str()));
    if let Some(plan) = plan {
        for a in &plan.allowances {
            let window = a.window(now);
            let usage = state
                .ledger
                .allowance_usage(account, &a.meter, window.start, now)
                .await
                .map_err(internal)?;
            allowances.push(json!({
                "meter": a.meter,
                "limit": a.limit,
                "used": usage.taken(),
                "remaining": a.limit.saturating_sub(usage.taken()),
                "resets_at": window.resets_at.to_string(),
            }));
        }
    }
    Ok(Json(json!({
        "account": account,
        "plan": entitlement.plan.as_ref().map(|p| p.id.clone()),
        "status": entitlement.subscription.as_ref().map(|s| s.status.as_str()),
        "balance": balance.available,
        "held": balance.held,
        "allowances": allowances,
    })))
}

fn bad_request(code: &'static str, detail: &'static str) -> Response {
    Denial::BadRequest {
        code,
        detail: detail.into(),
    }
    .into_response()
}

async fn top_up<C: Clock>(
    State(state): State<AppState<C>>,
    entitlement: Entitlement,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, Response> {
    let key = match idempotency_key(&headers) {
        Ok(Some(key)) => key,
        Ok(None) => {
            return Err(bad_request(
                "IDEMPOTENCY_KEY_REQUIRED",
                "A top-up needs an Idempotency-Key header, so that a retry is not paid twice.",
            ))
        }
        Err(denial) => return Err(denial.into_response()),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TopUp {
        credits: u64,
    }
    let Ok(TopUp { credits }) = serde_json::from_slice::<TopUp>(&body) else {
        return Err(bad_request(
            "INVALID_REQUEST",
            "The body must be a JSON object {\"credits\": N} with N a whole number from 1 to 1000000000.",
        ));
    };
    if credits == 0 || credits > MAX_TOP_UP {
        return Err(bad_request(
            "INVALID_AMOUNT",
            "credits must be a whole number from 1 to 1000000000.",
        ));
    }
    let now = state.clock.now();
    match state
        .ledger
        .deposit(&entitlement.account, Credits::new(credits), key, now)
        .await
    {
        Ok(deposit) => {
            tracing::info!(
                account = entitlement.account.as_str(),
                credits,
                applied = deposit.applied,
                "top-up"
            );
            Ok(Json(json!({
                "account": entitlement.account,
                "applied": deposit.applied,
                "balance": deposit.balance.available,
            })))
        }
        Err(LedgerError::KeyConflict) => {
            Err(Denial::IdempotencyConflict { in_progress: false }.into_response())
        }
        Err(LedgerError::AmountOutOfRange) => Err(bad_request(
            "INVALID_AMOUNT",
            "This top-up would take the balance beyond what an account can hold.",
        )),
        Err(e) => Err(internal(e)),
    }
}

#[allow(dead_code)] // the tests include this file for `demo` and do not call `main`
#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_402=info".into()),
        )
        .init();
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().unwrap_or_else(|_| {
            eprintln!("PORT must be a number from 0 to 65535, got {p:?}");
            std::process::exit(2)
        }),
        Err(_) => 3000,
    };
    let app = demo(SystemClock).await.router;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        });
    let addr = listener.local_addr().expect("bound socket");
    println!("tower-402 quickstart listening on http://{addr}");
    println!("demo keys (send as x-api-key or Authorization: Bearer):");
    for (key, _, what) in DEMO_KEYS {
        println!("  {key:<16} {what}");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("server");
}
