//! One instance of a fleet sharing one balance through Redis or PostgreSQL, as a real process.
//!
//! ```sh
//! # Redis (127.0.0.1:6379) or PostgreSQL: whichever URL is set (Redis if both).
//! export TOWER402_REDIS_URL=redis://127.0.0.1:6379
//! cargo run --example fleet --features redis,postgres -- deposit 5 --key seed   # once; idempotent
//! PORT=3001 cargo run --example fleet --features redis,postgres -- serve &
//! PORT=3002 LEASES=1 cargo run --example fleet --features redis,postgres -- serve &
//! curl -i localhost:3001/v1/work -H 'x-api-key: demo'     # 200, 1 credit
//! curl -s localhost:3002/v1/balance -H 'x-api-key: demo'  # the shared balance, leases in `held`
//! ```
//!
//! `serve` answers `GET /v1/work` at 1 credit for the key `demo` (account `acct_demo`) and
//! `GET /v1/balance` (free): the shared balance, what this process has parked in leases, and
//! how many times the work handler ran here. `deposit N --key K` deposits N credits under the
//! idempotency key K (the same key again adds nothing) and exits.
//!
//! Environment:
//!
//! | variable | default | what |
//! |---|---|---|
//! | `PORT` | 3000 | where `serve` listens (127.0.0.1) |
//! | `TOWER402_REDIS_URL` | | the shared Redis |
//! | `TOWER402_POSTGRES_URL` | | the shared PostgreSQL (when no Redis URL is set) |
//! | `TOWER402_PREFIX` | `tower402-fleet` | Redis key prefix, or PostgreSQL schema |
//! | `TOWER402_REDIS_CLUSTER` | | `1`: the Redis URL(s, comma separated) are a Redis Cluster |
//! | `LEASES` | | `1`: serve from leased credit (`LeasedLedger`) |
//! | `LEASE_TTL_SECS` | 30 | a lease's TTL: how long a killed instance's lease stays parked |
//! | `LEASE_IDLE_SECS` | 5 | an idle account's lease is given back after this |
//! | `LEASE_MIN_CREDITS` | 10 | the smallest lease |
//! | `BILLING_TIMEOUT_SECS` | 5 | the layers' patience with the shared store |
//! | `HOLD_TTL_SECS` | 300 | a direct reservation's TTL: how long a killed instance's requests in flight stay held |
//! | `RUST_LOG` | `info` | `tracing` filter (`tower_402=debug` shows every lease) |
//!
//! Stopped with SIGTERM or Ctrl-C, an instance stops taking requests, settles its leases and
//! gives back what it did not spend. Killed (`kill -9`), its lease expires back to the account
//! after `LEASE_TTL_SECS`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, PlanStore, Subscription};
use tower_402::store::{LeaseConfig, LeasedLedger};
use tower_402::{AccountId, Billing, Credits, Entitlement, Ledger, StaticKeys, Timestamp};

const ACCOUNT: &str = "acct_demo";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The shared stores, on whichever backend the environment names.
async fn stores() -> Result<(Arc<dyn Ledger>, Arc<dyn PlanStore>), Error> {
    let prefix = std::env::var("TOWER402_PREFIX").unwrap_or_else(|_| "tower402-fleet".into());
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("TOWER402_REDIS_URL") {
        use tower_402::store::{RedisConfig, RedisLedger, RedisPlanStore};
        let cluster = std::env::var("TOWER402_REDIS_CLUSTER").is_ok_and(|v| v == "1");
        let config = if cluster {
            let urls: Vec<&str> = url.split(',').collect();
            RedisConfig::cluster(&urls)?
        } else {
            RedisConfig::new(&url)?
        }
        .prefix(format!("{prefix}:"))
        .response_timeout(Duration::from_secs(2));
        tracing::info!(backend = "redis", cluster, prefix = %prefix, "shared stores");
        return Ok((
            Arc::new(RedisLedger::new(&config)),
            Arc::new(RedisPlanStore::new(&config)),
        ));
    }
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("TOWER402_POSTGRES_URL") {
        use tower_402::store::{PostgresConfig, PostgresLedger, PostgresPlanStore};
        let config = PostgresConfig::new(&url)?.schema(&prefix.replace('-', "_"))?;
        let pool = config.pool()?;
        let ledger = PostgresLedger::new(pool.clone(), config.clone());
        ledger.migrate().await?;
        tracing::info!(backend = "postgres", schema = %config.schema_name(), "shared stores");
        return Ok((
            Arc::new(ledger),
            Arc::new(PostgresPlanStore::new(pool, config)),
        ));
    }
    Err("set TOWER402_REDIS_URL or TOWER402_POSTGRES_URL".into())
}

fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    match std::env::var(name) {
        Ok(v) => Ok(v
            .parse()
            .map_err(|_| format!("{name}: not a number: {v}"))?),
        Err(_) => Ok(default),
    }
}

#[derive(Clone)]
struct AppState {
    ledger: Arc<dyn Ledger>,
    leases: Option<LeasedLedger<Arc<dyn Ledger>>>,
    served: Arc<AtomicU64>,
}

/// The routes and layers of one instance.
fn app(state: AppState, plans: Arc<dyn PlanStore>, timeout: Duration, hold: Duration) -> Router {
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true));
    let keys = StaticKeys::new().with_key("demo", ACCOUNT);
    let billing = Billing::new(keys, plans, state.ledger.clone(), catalog)
        .timeout(Some(timeout))
        .reservation_ttl(hold)
        .route(
            "GET /v1/work",
            Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))),
        )
        .route("GET /v1/balance", Requirement::new());
    Router::new()
        .route("/v1/work", get(work))
        .route("/v1/balance", get(balance))
        .with_state(state)
        .layer(billing.layer())
}

async fn work(State(state): State<AppState>) -> &'static str {
    state.served.fetch_add(1, Ordering::SeqCst);
    "work done\n"
}

async fn balance(
    State(state): State<AppState>,
    entitlement: Entitlement,
) -> Result<Json<serde_json::Value>, (http::StatusCode, String)> {
    let account = &entitlement.account;
    let b = state
        .ledger
        .balance(account, Timestamp::now())
        .await
        .map_err(|e| (http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let parked = state.leases.as_ref().map(|l| l.parked(account));
    Ok(Json(json!({
        "account": account.as_str(),
        "available": b.available.get(),
        "held": b.held.get(),
        "settled": b.settled.get(),
        "deposited": b.deposited.get(),
        "overdrawn": b.overdrawn.get(),
        "served_here": state.served.load(Ordering::SeqCst),
        "leased_here": parked.map(|p| p.leased.get()),
        "unsettled_here": parked.map(|p| p.unsettled.get()),
    })))
}

async fn serve() -> Result<(), Error> {
    let port = env_u64("PORT", 3000)?;
    let port = u16::try_from(port).map_err(|_| "PORT out of range")?;
    let timeout = Duration::from_secs(env_u64("BILLING_TIMEOUT_SECS", 5)?);
    let hold = Duration::from_secs(env_u64("HOLD_TTL_SECS", 300)?);
    let (shared, plans) = stores().await?;
    plans
        .put_subscription(Subscription::active(ACCOUNT, "basic"))
        .await?;
    let leases = if std::env::var("LEASES").is_ok_and(|v| v == "1") {
        let config = LeaseConfig::new()
            .ttl_secs(env_u64("LEASE_TTL_SECS", 30)?)
            .idle_secs(env_u64("LEASE_IDLE_SECS", 5)?)
            .min_lease(Credits::new(env_u64("LEASE_MIN_CREDITS", 10)?));
        tracing::info!(?config, "serving from leased credit");
        Some(LeasedLedger::new(shared.clone(), config))
    } else {
        None
    };
    let ledger: Arc<dyn Ledger> = match &leases {
        Some(l) => Arc::new(l.clone()),
        None => shared,
    };
    let maintenance = leases
        .as_ref()
        .map(|l| l.spawn_maintenance(Duration::from_millis(100)));
    let state = AppState {
        ledger,
        leases: leases.clone(),
        served: Arc::new(AtomicU64::new(0)),
    };
    let app = app(state, plans, timeout, hold);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(port, "listening");
    // TCP_NODELAY: see examples/common/mod.rs `serve`.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped())
        .await?;
    if let Some(leases) = leases {
        if let Some(m) = maintenance {
            m.abort();
        }
        leases.shutdown().await;
        tracing::info!("leases settled and given back");
    }
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: no new connections, requests in flight finish");
}

async fn deposit(amount: &str, key: &str) -> Result<(), Error> {
    let amount: u64 = amount
        .parse()
        .map_err(|_| format!("not a number of credits: {amount}"))?;
    let (ledger, plans) = stores().await?;
    plans
        .put_subscription(Subscription::active(ACCOUNT, "basic"))
        .await?;
    let d = ledger
        .deposit(
            &AccountId::new(ACCOUNT),
            Credits::new(amount),
            key,
            Timestamp::now(),
        )
        .await?;
    tracing::info!(amount, applied = d.applied, "deposit");
    println!(
        "{}",
        json!({
            "account": ACCOUNT,
            "applied": d.applied,
            "available": d.balance.available.get(),
            "deposited": d.balance.deposited.get(),
        })
    );
    Ok(())
}

fn usage() -> Error {
    "usage: fleet serve | fleet deposit N --key K".into()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve"] => serve().await,
        ["deposit", amount, "--key", key] => deposit(amount, key).await,
        _ => Err(usage()),
    }
}
