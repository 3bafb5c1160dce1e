//! RFC 9457 problem documents: [`ProblemDetails`], their configuration and the
//! [`ProblemDetailsLayer`].
//!
//! Every refusal renders as `application/problem+json`:
//!
//! ```json
//! {
//!   "type": "https://docs.example.com/problems/insufficient-credits",
//!   "title": "Insufficient credits",
//!   "status": 402,
//!   "detail": "This request costs 10 credits but the balance is 3.",
//!   "instance": "urn:request:7f2c",
//!   "code": "INSUFFICIENT_CREDITS",
//!   "balance": 3,
//!   "required": 10,
//!   "top_up_url": "https://example.com/billing/top-up"
//! }
//! ```
//!
//! - `type` is `type_base` + the code in kebab case, one URI per code
//!   ([`ProblemConfig::type_base`]; the default base is the URN `urn:tower-402:problem:`, point
//!   it at your own documentation).
//! - `title` is fixed per type; `status` equals the HTTP status; `detail` describes this
//!   occurrence; `instance` names the request when a request id is known (`x-request-id`).
//! - `code` is the stable machine code; the other members are listed in the crate docs' table.
//! - Links (`billing_url`, `upgrade_url`, `top_up_url`, `support_url`, `docs_url`) appear where
//!   they help and are configured ([`Links`]).
//!
//! Headers: `Cache-Control: no-store` on every problem; `WWW-Authenticate` on 401;
//! `Retry-After` plus the IETF `RateLimit` and `RateLimit-Policy` fields on `QUOTA_EXCEEDED`;
//! `Retry-After` on 503.
//!
//! # The layer
//!
//! The gate and the metering layer already answer with valid problem documents. Put
//! [`ProblemDetailsLayer`] outermost to add what only it knows (your links, `instance`, the
//! trace id from `traceparent`) and to normalize the inner service's own errors: a bare 4xx
//! becomes a problem document for clients that accept JSON, and a 5xx body never reaches the
//! client with internal error text in it.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_402::problem::{Links, ProblemConfig, ProblemDetailsLayer};
//!
//! let problems = ProblemConfig::new()
//!     .type_base("https://docs.example.com/problems/")
//!     .links(Links::new().billing("https://example.com/billing").docs("https://docs.example.com"));
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(ProblemDetailsLayer::new(problems));
//! ```

mod details;
mod grpc;
mod layer;

pub use details::{Links, ProblemConfig, ProblemDetails, PROBLEM_JSON};
pub use grpc::{is_grpc, GrpcCode};
pub use layer::{ProblemDetailsLayer, ProblemDetailsService, ResponseFuture};

pub(crate) use details::denial_response;
pub(crate) use grpc::grpc_status;
