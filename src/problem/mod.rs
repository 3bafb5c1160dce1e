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
//!
//! # gRPC
//!
//! A request whose `content-type` is `application/grpc` (or `application/grpc+proto`, ...;
//! see [`is_grpc`]) is answered in gRPC's own terms by every layer, so that a gRPC client sees
//! the reason instead of `UNKNOWN`: **HTTP 200, trailers-only** (everything in the headers, an
//! empty body), with
//!
//! - `content-type: application/grpc`;
//! - `grpc-status`: the code from the table below ([`GrpcCode`]);
//! - `grpc-message`: the problem's `detail`, percent-encoded as the gRPC HTTP/2 protocol
//!   requires (bytes outside 0x20–0x7E, and `%`, as `%XX`);
//! - `grpc-status-details-bin`: a `google.rpc.Status { code, message, details }`, base64
//!   without padding, whose details are
//!   - an `ErrorInfo`: `reason` = the denial code (`INSUFFICIENT_CREDITS`, ...), `domain` =
//!     [`ProblemConfig::grpc_domain`] (default `tower-402`), `metadata` = the problem's
//!     extension members as strings (`balance`, `required`, `top_up_url`, `request_id`, ...);
//!   - a `QuotaFailure` for `INSUFFICIENT_CREDITS` (subject `credits`), `QUOTA_EXCEEDED`
//!     (subject `allowance:<meter>`) and `BUDGET_EXHAUSTED` (`budget:<level>:<owner>`), or a `PreconditionFailure` for the plan, subscription
//!     and payment conditions (type = the code, subject `plan:<id>`, `feature:<name>`,
//!     `subscription` or `payment`);
//!   - a `RetryInfo` when a retry delay is known (`QUOTA_EXCEEDED` until the reset,
//!     `SERVICE_UNAVAILABLE`);
//!   - a `Help` with the problem's links (`top_up_url`, `upgrade_url`, `billing_url`, ...).
//!
//! `www-authenticate`, `retry-after` and the rate-limit fields stay in the headers, where
//! gRPC clients read them as response metadata.
//!
//! | denial code | HTTP | gRPC status |
//! |---|---|---|
//! | `INSUFFICIENT_CREDITS`, `QUOTA_EXCEEDED`, `BUDGET_EXHAUSTED` | 402 | `RESOURCE_EXHAUSTED` (8) |
//! | `PLAN_UPGRADE_REQUIRED`, `SUBSCRIPTION_EXPIRED`, `SUBSCRIPTION_PAST_DUE`, `TRIAL_EXPIRED`, `SUBSCRIPTION_PENDING`, `PAYMENT_DECLINED` | 402 | `FAILED_PRECONDITION` (9) |
//! | `UNAUTHENTICATED` | 401 | `UNAUTHENTICATED` (16) |
//! | `SERVICE_UNAVAILABLE` | 503 | `UNAVAILABLE` (14) |
//! | `INVALID_IDEMPOTENCY_KEY`, `INVALID_REQUEST` | 400 | `INVALID_ARGUMENT` (3) |
//! | `IDEMPOTENCY_KEY_REUSED` | 409 | `ALREADY_EXISTS` (6): the key belongs to another request; retrying with it can never succeed |
//! | `IDEMPOTENCY_KEY_IN_USE` | 409 | `ABORTED` (10): the first attempt is still running; retry the call later |
//! | `IDEMPOTENCY_RESPONSE_NOT_RECORDED` | 409 | `FAILED_PRECONDITION` (9): the first attempt was served and charged but its response was too large to record (or is no longer kept); use a new key |
//! | custom denials, an inner service's bare HTTP errors | by status | 400 `INVALID_ARGUMENT`, 401 `UNAUTHENTICATED`, 402 and 412 `FAILED_PRECONDITION`, 403 `PERMISSION_DENIED`, 404 `NOT_FOUND`, 408 and 504 `DEADLINE_EXCEEDED`, 409 `ABORTED`, 413 and 429 `RESOURCE_EXHAUSTED`, 499 `CANCELLED`, 500 `INTERNAL`, 501 `UNIMPLEMENTED`, 502 and 503 `UNAVAILABLE`, others `UNKNOWN` |
//!
//! [`ProblemDetailsLayer`] keeps gRPC answers gRPC: it re-renders a denial with its links,
//! request id and trace id as a gRPC status, turns an inner service's bare HTTP error into the
//! matching gRPC status (never forwarding its body), and passes gRPC responses of the inner
//! service (`grpc-status` from your handler) through untouched.
//!
//! ## Billing gRPC calls
//!
//! The metering layer reads `grpc-status` too, since a gRPC error travels in an HTTP 200.
//! What a call is charged ("as a disconnect" is the
//! [`on_disconnect`](crate::Billing::on_disconnect) policy: the estimate by default, or the
//! usage seen so far):
//!
//! | how the call ends | default | settings |
//! |---|---|---|
//! | `OK` (unary, or a stream's trailers) | settled: the usage, or the estimate | |
//! | refused by a denial above | nothing held, the handler never ran | |
//! | trailers-only error (`grpc-status` in the head: the handler returned `Err`) | released | charged as a success with [`bill_grpc_errors`](crate::Billing::bill_grpc_errors) |
//! | a stream's trailers carry a non-zero `grpc-status` before any message | released | [`bill_grpc_errors`](crate::Billing::bill_grpc_errors) as above |
//! | a stream's trailers carry a non-zero `grpc-status` after it delivered messages | charged as a disconnect: a stream is billed for what it delivered | released with [`on_stream_error`](crate::Billing::on_stream_error)`(StreamErrorPolicy::Release)`; charged as a success with [`bill_grpc_errors`](crate::Billing::bill_grpc_errors) |
//! | the client cancels mid-stream | charged as a disconnect | |
//!
//! Reading the details from a Rust client with `tonic-types`:
//!
//! ```
//! use tonic_types::StatusExt;
//!
//! /// What to tell the user about a failed call.
//! fn explain(status: &tonic::Status) -> String {
//!     let Some(info) = status.get_details_error_info() else {
//!         return status.message().to_owned();
//!     };
//!     match (status.code(), info.reason.as_str()) {
//!         (tonic::Code::ResourceExhausted, "INSUFFICIENT_CREDITS") => format!(
//!             "out of credit ({} left, {} needed): top up at {}",
//!             info.metadata["balance"], info.metadata["required"], info.metadata["top_up_url"],
//!         ),
//!         (tonic::Code::FailedPrecondition, "PLAN_UPGRADE_REQUIRED") => {
//!             format!("needs the {} plan", info.metadata["required_plan"])
//!         }
//!         _ => status.message().to_owned(),
//!     }
//! }
//! ```
//!
//! A tonic handler that refuses by itself can answer the same way: with the `grpc` feature,
//! `Denial::to_tonic_status` builds the identical `tonic::Status`.

mod details;
mod grpc;
mod layer;
pub(crate) mod rpc;

pub use details::{Links, ProblemConfig, ProblemDetails, PROBLEM_JSON};
pub use grpc::{is_grpc, GrpcCode};
pub use layer::{ProblemDetailsLayer, ProblemDetailsService, ResponseFuture};

pub(crate) use details::{denial_response, sf_key};
pub(crate) use grpc::grpc_status;
