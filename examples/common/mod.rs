//! Handlers the examples share: the caller's own balance, and a top-up endpoint that stands in
//! for a payment processor's confirmation. Not an example of its own.
#![allow(dead_code)]

use std::sync::Arc;

#[path = "plain.rs"]
pub mod plain;
#[cfg(feature = "stripe")]
#[path = "webhook.rs"]
pub mod webhook;
pub use plain::port;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tower_402::decision::Denial;
use tower_402::metering::idempotency_key;
use tower_402::plan::Catalog;
use tower_402::{Clock, Credits, Entitlement, Ledger, LedgerError};

/// The largest top-up accepted in one call.
pub const MAX_TOP_UP: u64 = 1_000_000_000;

/// What the billing handlers need.
#[derive(Clone)]
pub struct Billing<C> {
    pub ledger: Arc<dyn Ledger>,
    pub catalog: Catalog,
    pub clock: C,
}

fn internal(e: LedgerError) -> Response {
    tracing::error!(error = %e, "ledger failed");
    Denial::Unavailable {
        retry_after_secs: 5,
    }
    .into_response()
}

fn bad_request(code: &'static str, detail: &'static str) -> Response {
    Denial::BadRequest {
        code,
        detail: detail.into(),
    }
    .into_response()
}

/// `GET /v1/balance`: plan, status, balance, allowance left and reset time of the caller.
pub async fn balance<C: Clock>(
    State(state): State<Billing<C>>,
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
        "balance": signed(&balance),
        "held": balance.held,
        "allowances": allowances,
    })))
}

/// `POST /v1/topup` with `{"credits": N}` and an `Idempotency-Key`: deposits once per key.
/// Any other body is a `400` problem, and nothing is deposited.
pub async fn top_up<C: Clock>(
    State(state): State<Billing<C>>,
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
    // An object and nothing else: serde's derive would also read a struct from an array
    // (`[5]` deposited 5).
    let parsed = match serde_json::from_slice(&body) {
        Ok(value @ serde_json::Value::Object(_)) => serde_json::from_value::<TopUp>(value),
        _ => Err(serde::de::Error::custom("not a JSON object")),
    };
    let Ok(TopUp { credits }) = parsed else {
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
                "balance": signed(&deposit.balance),
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

/// Logs to stderr, `RUST_LOG` to filter (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Binds 127.0.0.1:`port`, exiting with a clear message when it cannot.
pub async fn listen(port: u16) -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        })
}

/// Serves `app` until Ctrl-C, with `TCP_NODELAY` on every connection.
///
/// The metering layer settles with the ledger before it hands out a response's last bytes,
/// so with a networked ledger (Redis, PostgreSQL) those bytes leave a little after the rest.
/// Without `TCP_NODELAY`, Nagle's algorithm holds such a small late segment until the client
/// acknowledges the previous one, and clients delay acknowledgements by up to 40 ms.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("server");
}

/// The balance as a caller reads it: what is available, or minus what is owed (an
/// overdraft, [`Balance::overdrawn`](tower_402::ledger::Balance::overdrawn)).
pub fn signed(b: &tower_402::ledger::Balance) -> i64 {
    // Both are at most 2^53 - 1, and one of them is zero.
    b.available.get() as i64 - b.overdrawn.get() as i64
}

/// The largest `limit` of `GET /v1/history`.
pub const MAX_HISTORY: usize = 1000;

/// `GET /v1/history?limit=N&since=UNIX_SECONDS`: the caller's own spend history (deposits,
/// settlements, releases, expiries, shortfalls, adjustments), newest first.
pub async fn history<C: Clock>(
    State(state): State<Billing<C>>,
    entitlement: Entitlement,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<serde_json::Value>, Response> {
    let mut q = tower_402::ledger::JournalQuery::default();
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = value.parse::<u64>().ok();
        match (name, number) {
            ("limit", Some(n)) if (1..=MAX_HISTORY as u64).contains(&n) => q.limit = n as usize,
            ("since", Some(s)) => q.since = Some(tower_402::Timestamp::from_unix(s)),
            ("limit", _) => {
                return Err(bad_request(
                    "INVALID_REQUEST",
                    "limit must be a whole number from 1 to 1000.",
                ))
            }
            ("since", _) => {
                return Err(bad_request(
                    "INVALID_REQUEST",
                    "since must be a time in whole seconds since the Unix epoch.",
                ))
            }
            _ => {}
        }
    }
    let Some(journal) = state.ledger.journal() else {
        return Err(bad_request(
            "HISTORY_UNAVAILABLE",
            "This ledger keeps no spend history.",
        ));
    };
    let account = &entitlement.account;
    let entries = journal
        .entries(account, &q, state.clock.now())
        .await
        .map_err(internal)?;
    Ok(Json(json!({
        "account": account,
        "entries": entries,
    })))
}

/// The process's Prometheus recorder, installed on first use (metrics recorders are
/// process-wide), with tower-402's metrics described.
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("no other metrics recorder in this process");
        tower_402::observe::describe();
        handle
    })
}

/// `GET /metrics`: every metric in the Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    let handle = prometheus();
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}
