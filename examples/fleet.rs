//! Two app instances sharing one balance through Redis.
//!
//! Run it (Redis on 127.0.0.1:6379, or set `REDIS_URL`):
//!
//! ```sh
//! cargo run --example fleet --features redis   # instances on :3001 and :3002
//! ```
//!
//! Each instance has its own router, its own layers and its own Redis connection, as two
//! processes would. Account `acct_demo` (key `demo`) starts with 5 credits; each request
//! costs 1, whichever instance serves it. Then try:
//!
//! ```sh
//! curl -i localhost:3001/v1/work -H 'x-api-key: demo'    # 200, x-credits-remaining: 4
//! curl -i localhost:3002/v1/work -H 'x-api-key: demo'    # 200, x-credits-remaining: 3
//! for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\n' \
//!     localhost:300$((i % 2 + 1))/v1/work -H 'x-api-key: demo'; done   # 200 200 200 402
//! curl -i localhost:3001/v1/work -H 'x-api-key: demo'    # 402 INSUFFICIENT_CREDITS
//! redis-cli hgetall 'tower402-fleet:{9:acct_demo}:bal'    # the shared balance
//! ```
//!
//! Stop Redis (or `redis-cli client pause 10000`) and the instances answer 503 with
//! `Retry-After`; start it again and they serve again, without a restart.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, PlanStore, Subscription};
use tower_402::store::{CachingPlanStore, RedisConfig, RedisLedger, RedisPlanStore};
use tower_402::{Billing, Credits, Ledger, StaticKeys, Timestamp};

fn instance(config: &RedisConfig) -> Router {
    // Its own connections, as in a separate process.
    let ledger = RedisLedger::new(config);
    let plans = CachingPlanStore::new(RedisPlanStore::new(config), 30);
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true));
    let keys = StaticKeys::new().with_key("demo", "acct_demo");
    let billing = Billing::new(keys, plans, ledger, catalog).route(
        "GET /v1/work",
        Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))),
    );
    Router::new()
        .route("/v1/work", get(|| async { "work done\n" }))
        .layer(billing.layer())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = RedisConfig::new(&url)?
        .prefix("tower402-fleet:")
        .response_timeout(Duration::from_millis(500));

    // Setup, as a billing webhook would do it: a subscription and a top-up (idempotent by
    // key, so restarting the example does not add credits again).
    RedisPlanStore::new(&config)
        .put_subscription(Subscription::active("acct_demo", "basic"))
        .await?;
    let seeded = RedisLedger::new(&config)
        .deposit(
            &"acct_demo".into(),
            Credits::new(5),
            "seed",
            Timestamp::now(),
        )
        .await?;
    println!("acct_demo: {} credits available", seeded.balance.available);

    let mut servers = Vec::new();
    for port in [3001u16, 3002] {
        let app = instance(&config);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("instance listening on http://127.0.0.1:{port}");
        servers.push(tokio::spawn(async move {
            // TCP_NODELAY: see examples/common/mod.rs `serve`.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app).await
        }));
    }
    for s in servers {
        s.await??;
    }
    Ok(())
}
