//! The consumer side (feature `client`): refusals as typed values, and retries that never
//! pay twice.
//!
//! Half of handling a 402 well happens in the client: read the problem, tell the user what
//! to do with the link it carries, never retry blindly, and retry once the payment problem is
//! fixed. This module does that for Rust clients of a tower-402 API, over HTTP (a hyper-util
//! client, any tower service of HTTP requests) and gRPC (a tonic channel).
//!
//! - [`Refusal`]: a refusal read from an HTTP response ([`Refusal::from_http`]: the RFC 9457
//!   problem, `Retry-After`, `x-should-retry`) or a gRPC status
//!   ([`Refusal::from_grpc_headers`], `Refusal::from_tonic` with `grpc`: `grpc-status`,
//!   `grpc-message`, and the `ErrorInfo`, `QuotaFailure`, `RetryInfo` and `Help` of
//!   `grpc-status-details-bin`). The code is a [`RefusalCode`] (unknown codes kept), amounts
//!   are integer [`Credits`](crate::Credits), links are [`RefusalLinks`], and
//!   [`RetryClass`] says whether a retry can help. `Display` is a message for a person.
//! - [`RetryLayer`]: a tower layer that
//!   - never retries a 402 or a reused `Idempotency-Key` (409 `IDEMPOTENCY_KEY_REUSED`), nor
//!     any other refusal whose `x-should-retry` is `false`;
//!   - retries 429, 503 (and 408, 502, 504, 409 `IDEMPOTENCY_KEY_IN_USE`, gRPC `UNAVAILABLE`
//!     and `ABORTED`) after `Retry-After` or a gRPC `RetryInfo`, else after a capped
//!     exponential backoff with jitter ([`RetryPolicy`]); a `Retry-After` longer than
//!     [`RetryPolicy::max_retry_after`] goes to the caller at once;
//!   - gives every request an `Idempotency-Key` when it has none (a `GET` on a paid API is
//!     charged per call like a `POST`), the same on every retry, so the server charges it
//!     once however many times it is sent;
//!   - on a payment refusal calls an [`OnPaymentRequired`] hook and, if the application
//!     reports the problem fixed (an automatic top-up, a user who paid), retries once;
//!   - logs each refusal (`tracing`, target `tower_402::client`, level `WARN`) with its
//!     status, code, detail, links and request id, and never a header: the credential is
//!     not logged;
//!   - puts the last [`Refusal`] into the response's extensions, with the problem document
//!     still readable as the body.
//!
//! What gets sent again: the request body is read into memory once and replayed
//! ([`ReplayBody`]); a transport error, or a gateway's 502, 504 or 408, is retried only when
//! the request carries an `Idempotency-Key` (the server then charges it once); refusals that
//! charged nothing (tower-402's own 503, a 429, `IDEMPOTENCY_KEY_IN_USE`) are retried either
//! way.
//!
//! # Examples
//!
//! ## Telling a person what to do with a 402
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use tower_402::client::{Refusal, RefusalCode};
//!
//! let body = br#"{"type": "https://docs.example.com/problems/insufficient-credits",
//!   "title": "Insufficient credits", "status": 402, "code": "INSUFFICIENT_CREDITS",
//!   "detail": "This request costs 10 credits but the balance is 3.",
//!   "balance": 3, "required": 10, "top_up_url": "https://example.com/top-up"}"#;
//! let refusal = Refusal::from_http(StatusCode::PAYMENT_REQUIRED, &HeaderMap::new(), body).unwrap();
//! if refusal.code == RefusalCode::InsufficientCredits {
//!     let short = refusal.required.unwrap().get() - refusal.balance.unwrap().get();
//!     println!("{short} credits short. {refusal}");
//! }
//! assert_eq!(refusal.fix_link(), Some("https://example.com/top-up"));
//! ```
//!
//! ## A hyper-util client that retries what can succeed
//!
//! ```no_run
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceExt};
//! use tower_402::client::{self, Refusal, RetryLayer, RetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_402::client::BoxError> {
//! let mut http = client::http_client(RetryLayer::new().policy(RetryPolicy::new().max_retries(2)));
//! let req = http::Request::post("http://127.0.0.1:3000/v1/topup")
//!     .header("x-api-key", "demo-broke")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"credits": 50}"#)))?;
//! let res = ServiceExt::<http::Request<Full<Bytes>>>::ready(&mut http).await?.call(req).await?;
//! if let Some(refusal) = res.extensions().get::<Refusal>() {
//!     eprintln!("refused: {refusal}");
//! } else {
//!     println!("{}", String::from_utf8_lossy(&res.into_body().collect().await?.to_bytes()));
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Retrying once the payment problem is fixed
//!
//! ```
//! use tower_402::client::{PaymentOutcome, Refusal, RefusalCode, RetryLayer};
//!
//! let layer = RetryLayer::new().on_payment_required(|refusal: &Refusal| {
//!     let can_top_up = refusal.code == RefusalCode::InsufficientCredits;
//!     async move {
//!         if can_top_up {
//!             // Charge the saved card, wait for the processor's confirmation...
//!             PaymentOutcome::Fixed
//!         } else {
//!             PaymentOutcome::NotFixed
//!         }
//!     }
//! });
//! # let _ = layer;
//! ```
//!
//! ## A tonic channel
//!
//! With the `grpc` feature, `tonic::body::Body` is a [`ReplayBody`], so the layer wraps a
//! `tonic::transport::Channel` (`RetryLayer::new().layer(channel)`, then
//! `tonic::client::Grpc::new(service)`); a refused call's `tonic::Status` reads with
//! `Refusal::from_tonic`. `tests/client.rs` calls the gRPC example this way.

mod layer;
mod payment;
mod policy;
mod refusal;
mod rpc;

pub use layer::{BoxError, ReplayBody, ResponseFuture, RetryLayer, RetryService};
pub use payment::{NeverFixed, OnPaymentRequired, PaymentFuture, PaymentOutcome};
pub use policy::RetryPolicy;
pub use refusal::{Refusal, RefusalCode, RefusalLinks, RetryClass};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_layer::Layer;

/// A hyper-util HTTP/1 client (plain HTTP) behind a [`RetryLayer`].
pub type HttpClient<P = NeverFixed> = RetryService<Client<HttpConnector, Full<Bytes>>, P>;

/// A hyper-util client for plain HTTP on tokio, behind `layer`. For TLS, build your own
/// `hyper_util::client::legacy::Client` with a TLS connector and wrap it with
/// `layer.layer(client)`.
pub fn http_client<P: Clone>(layer: RetryLayer<P>) -> HttpClient<P> {
    layer.layer(Client::builder(TokioExecutor::new()).build_http())
}
