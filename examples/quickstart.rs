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
//! curl -s 'localhost:3000/v1/history?limit=10' -H 'x-api-key: demo-pro'   # spend history
//! curl -s localhost:3000/metrics | grep tower402_                # Prometheus metrics
//! # An Idempotency-Key: the retry gets the recorded answer (idempotent-replayed: true), charged
//! # once; the same key on another query is 409 IDEMPOTENCY_KEY_REUSED.
//! curl -i 'localhost:3000/v1/forecast?day=1' -H 'x-api-key: demo-pro' -H 'Idempotency-Key: f-1'
//! curl -i 'localhost:3000/v1/forecast?day=1' -H 'x-api-key: demo-pro' -H 'Idempotency-Key: f-1'
//! curl -i 'localhost:3000/v1/forecast?day=2' -H 'x-api-key: demo-pro' -H 'Idempotency-Key: f-1'
//! ```

#[path = "common/mod.rs"]
pub mod common;

use common::plain;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_402::decision::Requirement;
use tower_402::{Clock, Entitlement, MemoryLedger, MemoryPlanStore, SystemClock};

/// The demo app and handles on its stores.
pub struct Demo {
    /// The router with all three layers.
    pub router: Router,
    /// The ledger behind it.
    pub ledger: MemoryLedger,
    /// The plan store behind it.
    pub plans: MemoryPlanStore,
}

/// Builds the demo with every demo account (`plain::DEMO_KEYS`) in its documented state at `clock`'s
/// current time.
pub async fn demo<C: Clock + Clone>(clock: C) -> Demo {
    // Metrics go to a Prometheus recorder, scraped at GET /metrics.
    common::prometheus();
    // The demo accounts and layers, shared with the hyper and gRPC examples:
    // examples/common/plain.rs. The routes are this example's.
    let plain::Demo {
        billing,
        ledger,
        plans,
    } = plain::billing(clock.clone(), |billing| {
        billing
            .route("GET /health", Requirement::public())
            .route("GET /metrics", Requirement::public())
            .route("GET /v1/history", Requirement::identify_only())
            .route("/webhooks/stripe", Requirement::public())
            .route("GET /v1/balance", Requirement::identify_only())
            .route("POST /v1/topup", Requirement::identify_only())
            .route("GET /v1/premium", plain::premium())
            .route("GET /v1/forecast", plain::forecast())
    })
    .await;

    let state = common::Billing {
        ledger: Arc::new(ledger.clone()),
        catalog: plain::catalog(),
        clock: clock.clone(),
    };
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(common::metrics))
        .route("/v1/history", get(common::history::<C>))
        .route("/v1/forecast", get(forecast))
        .route("/v1/premium", get(premium))
        .route("/v1/balance", get(common::balance::<C>))
        .route("/v1/topup", post(common::top_up::<C>))
        .layer(DefaultBodyLimit::max(1024))
        .with_state(state)
        // Stripe's webhook: a public rule (Stripe signs its requests; it has no API key).
        .merge(common::webhook::stripe_webhook_with(
            plans.clone(),
            ledger.clone(),
            plain::catalog(),
            clock.clone(),
            &common::webhook::secret(),
        ))
        // All three layers, from one billing core: problems, gate, metering.
        .layer(billing.layer());
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
    println!("{}", common::webhook::announce());
    println!("demo keys (send as x-api-key or Authorization: Bearer):");
    for (key, _, what) in plain::DEMO_KEYS {
        println!("  {key:<16} {what}");
    }
    common::serve(listener, app).await;
}
