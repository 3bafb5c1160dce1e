//! Tower middleware for paid APIs: refuse work that isn't paid for, and say so clearly.
//!
//! `tower-402` answers **402 Payment Required** the way a well-run paid API should, from inside
//! any tower service (axum, hyper, tonic), without a separate gateway. Three layers compose:
//!
//! ```text
//! client ─▶ ProblemDetailsLayer ─▶ PaymentGateLayer ─▶ MeteringLayer ─▶ your handler
//!             renders problems      who? allowed?       reserve → run → settle/release
//! ```
//!
//! - [`PaymentGateLayer`] ([`gate`]): who is calling, is their subscription in good standing,
//!   does their plan include this route.
//! - [`MeteringLayer`] ([`metering`]): reserves the price before the handler runs (checking
//!   allowance and credit, once), settles it when the response body ends, refunds failures,
//!   charges an idempotent retry once.
//! - [`ProblemDetailsLayer`] ([`problem`]): every refusal and error as an RFC 9457
//!   `application/problem+json` document with a stable machine code.
//!
//! All three are made from one [`Billing`] value ([`billing`]): stores, catalog, route rules,
//! clock, problem configuration and policies are given once, so the layers cannot disagree,
//! and a stack with a part missing or out of order does not build.
//!
//! The layers are plain tower middleware: they serve axum, bare hyper (`examples/hyper.rs`)
//! and tonic alike. A gRPC request (`content-type: application/grpc...`) is refused in gRPC's
//! own terms: a trailers-only status (`RESOURCE_EXHAUSTED`, `FAILED_PRECONDITION`,
//! `UNAUTHENTICATED`, ...) whose `google.rpc.Status` details carry an `ErrorInfo` with the
//! denial code; see [`problem`](problem#grpc) for the mapping and `examples/grpc.rs`. gRPC
//! metadata are HTTP/2 headers, so `x-api-key` and `authorization: Bearer` identify gRPC
//! callers too.
//!
//! Balances and subscriptions live behind two small async traits, [`Ledger`] and
//! [`PlanStore`](plan::PlanStore), with in-memory implementations ([`MemoryLedger`],
//! [`MemoryPlanStore`]) as the embedded default.
//!
//! # Example
//!
//! One request, refused: the caller's balance cannot pay for it, so it gets a 402 whose body
//! says why and where to top up.
//!
//! ```
//! use axum::{body::Body, routing::get, Router};
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_402::decision::{Cost, Requirement};
//! use tower_402::plan::{Catalog, Period, Plan, Subscription};
//! use tower_402::problem::{Links, ProblemConfig};
//! use tower_402::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let catalog = Catalog::new()
//!     .with_plan(Plan::new("free", "Free", 0).allowance("requests", 1000, Period::CalendarMonth))
//!     .with_plan(Plan::new("pro", "Pro", 2).overage(true));
//! let billing = Billing::new(
//!     StaticKeys::new().with_key("sk_test_acme", "acme"),
//!     MemoryPlanStore::new().with(Subscription::active("acme", "pro")),
//!     MemoryLedger::new(), // acme has no credit yet
//!     catalog,
//! )
//! .problem_config(ProblemConfig::new().links(Links::new().top_up("https://example.com/top-up")))
//! .route("GET /health", Requirement::public())
//! .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
//!
//! let app: Router = Router::new()
//!     .route("/v1/forecast", get(|| async { "sunny" }))
//!     .layer(billing.layer());
//!
//! let request = Request::get("/v1/forecast")
//!     .header("x-api-key", "sk_test_acme")
//!     .body(Body::empty())
//!     .unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 402);
//! assert_eq!(response.headers()["content-type"], "application/problem+json");
//! let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
//! let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(problem["code"], "INSUFFICIENT_CREDITS");
//! assert_eq!(problem["top_up_url"], "https://example.com/top-up");
//! # }
//! ```
//!
//! # Status codes and denial codes
//!
//! Identity unknown is never 402. Every refusal carries a stable `code`:
//!
//! | status | code | when | extra members |
//! |---|---|---|---|
//! | 400 | `INVALID_IDEMPOTENCY_KEY`, `INVALID_REQUEST` | malformed billing input | |
//! | 401 | `UNAUTHENTICATED` | no, unknown or malformed credential (`WWW-Authenticate` set) | |
//! | 402 | `INSUFFICIENT_CREDITS` | balance below the cost of this request | `balance`, `required`, `top_up_url` |
//! | 402 | `QUOTA_EXCEEDED` | allowance used up, no paid overage | `meter`, `limit`, `used`, `resets_at`, `upgrade_url` |
//! | 402 | `PLAN_UPGRADE_REQUIRED` | higher tier or missing feature | `current_plan`, `required_plan`/`required_feature`, `upgrade_url` |
//! | 402 | `SUBSCRIPTION_EXPIRED` | canceled or ended | `plan`, `ended_at`, `billing_url` |
//! | 402 | `SUBSCRIPTION_PAST_DUE` | renewal failed, grace over | `grace_until`, `billing_url` |
//! | 402 | `TRIAL_EXPIRED` | trial over, no paid plan | `trial_ended_at`, `upgrade_url` |
//! | 402 | `SUBSCRIPTION_PENDING` | not active yet, or no subscription | `billing_url` |
//! | 402 | `PAYMENT_DECLINED` | a direct charge failed | `decline_code` |
//! | 402 | `BUDGET_EXHAUSTED` | a key's, team's or organisation's budget for the period is spent (credit may remain; `Retry-After`) | `level`, `owner`, `budget`, `used`, `period`, `resets_at`, `meter` (unit budgets), `manage_url` |
//! | 409 | `IDEMPOTENCY_KEY_REUSED`, `IDEMPOTENCY_KEY_IN_USE`, `IDEMPOTENCY_RESPONSE_NOT_RECORDED` | key reused for another request (another method, path, query or body) / still running (`Retry-After`) / served, but its response was too large to record: use a new key | |
//! | 503 | `SERVICE_UNAVAILABLE` | ledger or plan store unreachable (`Retry-After`) | |
//!
//! Applications add their own with [`Denial::Custom`].
//!
//! # Logs
//!
//! Every decision emits a `tracing` event with the account, the rule (`identity`,
//! `subscription_status`, `entitlement`, `allowance`, `credit`, `backend`) and the code, under
//! the targets `tower_402::gate` and `tower_402::metering`. API keys are never logged:
//! [`ApiKey`]'s `Debug` is redacted.
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `axum` | yes | [`Entitlement`] as an axum extractor; `IntoResponse` for [`Denial`] and [`ProblemDetails`](problem::ProblemDetails) |
//! | `redis` | no | `RedisLedger` and `RedisPlanStore` (`store::redis`): several instances on one Redis, one atomic Lua script per ledger operation |
//! | `grpc` | no | `Denial::to_tonic_status` and `ProblemDetails::to_tonic_status` (tonic 0.14, Rust 1.88) for tonic handlers that refuse by themselves; gRPC requests get gRPC answers without it |
//! | `client` | no | the consumer side ([`client`]): refusals read into typed values from HTTP responses and gRPC statuses, and a retry layer for hyper-util clients and tonic channels that never retries a 402 and keeps one `Idempotency-Key` across retries |
//! | `postgres` | no | `PostgresLedger` and `PostgresPlanStore` (`store::postgres`): several instances on one durable database, an idempotent `migrate()` |
//! | `stripe` | yes | `webhook`: Stripe's webhook as a tower service (`Stripe-Signature` verified with HMAC-SHA256) that keeps subscriptions and credit in sync |
//!
//! [`CachingPlanStore`](store::CachingPlanStore) (always available) puts a read-through cache
//! with a TTL in front of any plan store. Stores that need no I/O expose a synchronous twin
//! ([`in_process`]) so the in-memory hot path allocates no futures.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod account;
mod backend;
pub mod billing;
pub mod body;
pub mod budget;
mod charge;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod credits;
pub mod decision;
pub mod decline;
mod denial;
mod entitlement;
pub mod error;
pub mod gate;
pub mod in_process;
pub mod keys;
pub mod ledger;
pub mod metering;
pub mod observe;
pub mod plan;
pub mod problem;
pub mod store;
pub mod time;
#[cfg(feature = "usage")]
#[cfg_attr(docsrs, doc(cfg(feature = "usage")))]
pub mod usage;
#[cfg(feature = "stripe")]
pub mod webhook;

/// The hash map behind every in-process table on the request path (accounts, keys, plans,
/// reservations). `foldhash` hashes a short key several times faster than the standard
/// library's SipHash (which was 7 % of a request's instructions). It is seeded at random per
/// map, as hashbrown's default hasher is, which keeps colliding keys from being computed in
/// advance; it makes no stronger claim against collision attacks. The keys a client chooses
/// (idempotency keys) only reach a map of their own account's book, after the gate has let
/// the account in. It is already in the dependency tree through serde_json.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use account::{AccountId, ApiKey, IdentityResolver, StaticKeys};
pub use backend::FailureMode;
pub use billing::{Billing, BillingLayer};
pub use credits::Credits;
pub use decision::Denial;
pub use entitlement::Entitlement;
#[cfg(feature = "axum")]
pub use entitlement::MissingEntitlement;
pub use error::{LedgerError, StoreError};
pub use gate::PaymentGateLayer;
pub use ledger::Ledger;
pub use metering::{MeteringLayer, ReportedUsage};
pub use problem::ProblemDetailsLayer;
pub use store::{MemoryLedger, MemoryPlanStore};
#[cfg(feature = "postgres")]
pub use store::{PostgresLedger, PostgresPlanStore};
#[cfg(feature = "redis")]
pub use store::{RedisLedger, RedisPlanStore};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
