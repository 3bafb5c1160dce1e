//! [`MeteringLayer`]: reserve an estimate, run the handler, settle what was used.
//!
//! For every request the [gate](crate::gate) of the same [`Billing`](crate::Billing) admitted
//! with a cost (the route's, priced by the gate, or a [`Pricing`] rule's estimate), the
//! metering layer
//!
//! 1. **reserves** the cost in the [`Ledger`](crate::Ledger): allowance first, then credit.
//!    Not enough: the request is refused with the same 402 problems as the gate's
//!    (`QUOTA_EXCEEDED`, `INSUFFICIENT_CREDITS`), and the handler never runs;
//! 2. **runs** the inner service;
//! 3. **settles** when the response body ends (not when the head is sent): the estimate, or
//!    what the handler reported by putting a [`ReportedUsage`] in the response extensions.
//!
//! Non-billable outcomes give the hold back: a 5xx, and a 4xx unless
//! [`bill_client_errors`](crate::Billing::bill_client_errors) is set. A body dropped before
//! its end (client disconnect) is settled by the [`DisconnectPolicy`], and so is a stream
//! that fails after delivering data (an HTTP body that errors mid-stream, a gRPC stream that
//! ends with an error status after its messages): a stream is billed for what it delivered.
//! One that fails before delivering anything is released. On a shared ledger a settlement
//! after a drop or a failure runs on a spawned Tokio task. On an in-process ledger a request
//! without an `Idempotency-Key` is held without a keyed record and settled in place (see
//! [`in_process`](crate::in_process)).
//!
//! # Settlements that fail
//!
//! Work that was served is never free by accident, and work that never ran is never charged:
//!
//! - A settle or release that fails because the ledger is unreachable is **queued and
//!   retried** in the background with backoff until it lands (a bounded queue per
//!   [`Billing`](crate::Billing), [`settlement_retries`](crate::Billing::settlement_retries));
//!   the response is not held up by it.
//! - The layer's reservations are [`OnExpiry::Charge`](crate::ledger::OnExpiry): the ledger
//!   itself charges a hold its estimate if no settlement reaches it before the hold expires
//!   ([`reservation_ttl`](crate::Billing::reservation_ttl), default 5 minutes), because its
//!   handler ran. That covers an instance that died, an outage longer than the hold, and a
//!   stream that stalls past its hold: its credit is not freed for other spending. The
//!   settlement that arrives later charges the actual usage instead (the difference drawn or
//!   given back).
//! - A reservation whose reply was lost (the ledger timed out or the connection dropped) is
//!   retried once at once, on a fresh connection, under the same key. If it turns out the
//!   first attempt went through, that hold is released (queued like any release) and the
//!   request is refused with `503` and `Retry-After`; the handler never ran, so nothing is
//!   charged.
//! - A request cancelled before its handler ran releases its hold.
//!
//! # Estimates: pricing rules
//!
//! The estimate comes from a [`Pricing`] rule: by default the route's fixed
//! [`Cost`](crate::decision::Cost) from the gate; [`OpenAiPricing`] prices OpenAI-compatible
//! requests from their JSON body (`model`, `max_tokens`/`max_completion_tokens`, `n`) with a
//! per-model [`PriceTable`] (input and output prices per 1,000 or per million tokens); a
//! closure prices anything else. A rule that needs the body gets it whole (bounded by
//! [`max_body`](crate::Billing::max_body), `413 REQUEST_TOO_LARGE` beyond) and the handler
//! still receives it intact. Prices per N units are rounded **up** to whole credits, per
//! meter, per request: `ceil(units × price / N)`, in integers.
//!
//! An estimate may span several meters (input and output tokens priced differently); each
//! meter uses the plan's allowance for it first, then credit.
//!
//! # Actual usage
//!
//! What is settled, in order of precedence:
//!
//! 1. a [`ReportedUsage`] the handler put in the response extensions;
//! 2. what the [`UsageExtractor`] reads from the response: [`HeaderUsage`] (a header the
//!    handler sets, stripped before the client sees it), [`BodyBytes`] (body size),
//!    [`OpenAiUsage`] (the `usage` object of a JSON body or of a server-sent-event stream);
//! 3. the estimate.
//!
//! Extractors keep bounded memory whatever the body's length (a tail of a JSON body, one
//! event of a stream). A usage figure that is missing, negative, fractional, not a number, or
//! above [`max_units`](crate::Billing::max_units) is logged as a warning and the **estimate is
//! charged**: a response is never free because its usage could not be read.
//!
//! # Policies
//!
//! | situation | default | alternatives |
//! |---|---|---|
//! | 5xx response | release | |
//! | 4xx response | release | [`bill_client_errors`](crate::Billing::bill_client_errors) |
//! | usage costs more than the hold | draw the difference from the balance, report any shortfall ([`OverEstimate::DrawBalance`](crate::ledger::OverEstimate::DrawBalance)) | cap at the hold ([`CapAtHold`](crate::ledger::OverEstimate::CapAtHold)) |
//! | client disconnects mid-body | charge the estimate ([`DisconnectPolicy::ChargeEstimate`]) | usage seen so far ([`DisconnectPolicy::ChargeUsageSoFar`]) |
//! | response body fails mid-stream, after delivering data | as a disconnect: the estimate, or the usage seen so far, by the [`DisconnectPolicy`] ([`StreamErrorPolicy::ChargeDelivered`]) | release ([`StreamErrorPolicy::Release`]) |
//! | response body fails on its first frame, before any data | release | |
//! | gRPC stream ends with a non-zero `grpc-status` after delivering messages | as a disconnect ([`StreamErrorPolicy::ChargeDelivered`]) | release ([`StreamErrorPolicy::Release`]); charge as a success ([`bill_grpc_errors`](crate::Billing::bill_grpc_errors)) |
//! | gRPC error before any message (trailers-only, or trailers right after the head) | release | charge as a success ([`bill_grpc_errors`](crate::Billing::bill_grpc_errors)) |
//! | a stream's usage passes the hold and the balance cannot pay for more | stream on; the settlement draws the balance and logs any shortfall ([`DryStreamPolicy::StreamOn`]) | end the stream with a provider-shaped `INSUFFICIENT_CREDITS` error event, charge what was delivered ([`DryStreamPolicy::Cut`]) |
//! | request cancelled before its response | release | |
//! | reservation neither settled nor released | expires after the TTL and is charged its estimate; a late settlement corrects it | [`OnExpiry`](crate::ledger::OnExpiry) on your own reservations |
//! | a response streams longer than the TTL | the hold lapses mid-stream; the late settlement draws what is available, the rest is a logged shortfall | set [`reservation_ttl`](crate::Billing::reservation_ttl) above your longest stream |
//!
//! The balance never goes below zero.
//!
//! # Thresholds
//!
//! [`on_threshold`](crate::Billing::on_threshold) calls your hook once each time an account's
//! spent balance or an allowance crosses a configured level ([`Threshold`]), so the
//! application can warn its user before the hard stop.
//!
//! # gRPC
//!
//! A gRPC call is metered like any request, unary or streaming: a server stream is settled
//! once, when its trailers go out. A gRPC error travels in an HTTP 200, so the layer reads
//! `grpc-status`: a non-zero status in the head of a trailers-only answer, or in trailers
//! that follow no message, releases the reservation like a 5xx; in the trailers after a
//! stream delivered messages, it is charged for what it delivered, as a dropped body is
//! ([`on_stream_error`](crate::Billing::on_stream_error) to release it instead). With
//! [`bill_grpc_errors`](crate::Billing::bill_grpc_errors) every such call is settled as a
//! success. The [problem module](crate::problem#billing-grpc-calls) has the whole table. The
//! `x-credits-remaining` and `x-allowance-*` headers arrive as response metadata, and an
//! `idempotency-key` metadata entry works as the header does.
//!
//! # Idempotency
//!
//! As the IETF Idempotency-Key draft and Stripe define it. A request with an `Idempotency-Key`
//! header reserves under that key, with a **fingerprint** of the account (the key's scope),
//! method, path, query, the priced charges and a digest of the whole request body:
//!
//! - a **retry of a completed request** (same fingerprint, settled) gets **the recorded
//!   response**: status, headers, body and trailers as they were sent, with
//!   `idempotent-replayed: true`. The handler does not run again and nothing is charged again;
//! - **in flight** (the first attempt still holds its reservation): `409
//!   IDEMPOTENCY_KEY_IN_USE` with `Retry-After: 1` (`x-should-retry: true`);
//! - **another request with the key** (another method, path, query or body, on any route):
//!   `409 IDEMPOTENCY_KEY_REUSED`;
//! - a response **larger than
//!   [`max_recorded_response`](crate::Billing::max_recorded_response)** (default 1 MiB of body,
//!   streams included) is served and charged once but not recorded; its retry is `409
//!   IDEMPOTENCY_RESPONSE_NOT_RECORDED` (`x-should-retry: false`): never a free re-run, never a
//!   second charge. The same answer when the record is gone (expired, dropped for the
//!   per-account cap, not written because the client went away mid-body or the write failed);
//! - a request refused before its handler ran (402, 409, 413, 503), and a response that was
//!   not billable (a 5xx; a 4xx unless billed; a failed gRPC call), is released and leaves no
//!   record: its retry is a fresh attempt;
//! - a malformed key (empty, over 255 characters, anything but visible ASCII) is
//!   `400 INVALID_IDEMPOTENCY_KEY`.
//!
//! **The body digest** is SHA-256 (the `sha2` crate): the digest decides whether a caller gets
//! a recorded response, so it must be collision resistant. On a route whose pricing reads the
//! body it is taken of the bytes read; otherwise it is computed **while the handler reads the
//! body** (nothing is buffered before the handler), and stored with the record when the
//! response ends. A handler that stops reading early is fingerprinted by the bytes it read.
//! A retry's body is read whole (bounded by [`max_body`](crate::Billing::max_body),
//! `413 REQUEST_TOO_LARGE` beyond) and compared before it is answered.
//!
//! **Recording** captures the status, the headers and the body frames as they stream, up to
//! the size limit, and writes the record when the body has ended and the reservation is
//! settled (before the last frame is handed out). Not recorded: hop-by-hop headers
//! (`connection`, `transfer-encoding`, ...), `content-length` and `date` (written afresh), and
//! the per-request `x-credits-remaining`, `x-allowance-*` and `x-payment-warning`, which
//! describe the balance at the first attempt; a replay carries none of them.
//!
//! **Records** live in the ledger's own backend ([`Ledger::records`](crate::Ledger::records),
//! [`ResponseRecords`](crate::ledger::ResponseRecords)): in memory, in Redis, or in a
//! PostgreSQL table made by `migrate`. Each is kept for
//! [`recorded_response_retention`](crate::Billing::recorded_response_retention) (default 24
//! hours), at most [`max_recorded_per_account`](crate::Billing::max_recorded_per_account)
//! (default 1,000) per account, the oldest dropped first. A ledger without records answers
//! every retry of a completed request with `409 IDEMPOTENCY_RESPONSE_NOT_RECORDED`. If the
//! records cannot be read the retry is `503`, even when the layer fails open: failing open
//! there would run the request again for free.
//!
//! Requests without an `Idempotency-Key` are untouched by all this: no digest, no record, no
//! allocation on the in-process fast path.
//!
//! ```
//! # use axum::{routing::post, Router};
//! # use tower::ServiceExt;
//! # use tower_402::decision::{Cost, Requirement};
//! # use tower_402::plan::{Catalog, Plan, Subscription};
//! # use tower_402::*;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ledger = MemoryLedger::new();
//! ledger.deposit(&"acme".into(), Credits::new(10), "seed", Timestamp::now()).await.unwrap();
//! let billing = Billing::new(
//!     StaticKeys::new().with_key("sk_test", "acme"),
//!     MemoryPlanStore::new().with(Subscription::active("acme", "basic")),
//!     ledger.clone(),
//!     Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true)),
//! )
//! .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(3))));
//! let app = Router::new()
//!     .route("/v1/orders", post(|body: String| async move { format!("ordered {body}") }))
//!     .layer(billing.layer());
//! let order = |body: &'static str| {
//!     http::Request::post("/v1/orders")
//!         .header("x-api-key", "sk_test")
//!         .header("idempotency-key", "order-42")
//!         .body(axum::body::Body::from(body))
//!         .unwrap()
//! };
//! let body = |res: http::Response<_>| axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1 << 20);
//! // The record is written when the body has been sent.
//! let first = app.clone().oneshot(order("2 pizzas")).await.unwrap();
//! assert_eq!(body(first).await.unwrap(), "ordered 2 pizzas");
//! let retry = app.clone().oneshot(order("2 pizzas")).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(body(retry).await.unwrap(), "ordered 2 pizzas");
//! let other = app.clone().oneshot(order("3 pizzas")).await.unwrap();
//! assert_eq!(other.status(), 409); // IDEMPOTENCY_KEY_REUSED
//! let balance = ledger.balance(&"acme".into(), Timestamp::now()).await.unwrap();
//! assert_eq!(balance.available, Credits::new(7)); // charged once
//! # }
//! ```
//!
//! # Response headers
//!
//! | header | value |
//! |---|---|
//! | `x-credits-remaining` | credit available after this request's hold |
//! | `x-allowance-remaining` | allowance units left in the period, when the meter has one |
//! | `x-allowance-reset` | when the allowance resets (RFC 3339) |
//! | `idempotent-replayed` | `true` on a replayed recorded response (not charged again) |
//!
//! # Example
//!
//! ```
//! use axum::{routing::post, Router, Extension};
//! use tower_402::decision::{Cost, Requirement};
//! use tower_402::plan::Catalog;
//! use tower_402::*;
//!
//! let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new())
//!     .route("POST /v1/render", Requirement::new().cost(Cost::new("images", 4, Credits::new(5))));
//! let app: Router = Router::new()
//!     .route("/v1/render", post(|| async {
//!         // Charge for the 3 images actually rendered instead of the route's estimate of 4.
//!         (Extension(ReportedUsage::units("images", 3)), "done")
//!     }))
//!     .layer(billing.layer());
//! ```

mod billable;
mod body;
mod future;
mod guard;
mod headers;
mod idempotency;
mod layer;
mod llm;
mod pricing;
mod replay;
mod request_body;
mod retry;
mod service;
mod sse;
mod threshold;
mod tokens;
mod usage;

pub use body::MeteredBody;
pub use future::ResponseFuture;
pub use idempotency::{idempotency_key, MAX_IDEMPOTENCY_KEY_LEN};
pub use layer::{DisconnectPolicy, DryStreamPolicy, MeteringLayer, StreamErrorPolicy};
pub use llm::{ModelPrice, OpenAiPricing, PriceTable};
pub use pricing::{Pricing, PricingRequest};
pub use request_body::RequestBody;
pub(crate) use retry::{Retries, DEFAULT_RETRY_CAPACITY};
pub use service::Metering;
pub use threshold::{Crossing, Threshold, ThresholdEvent};
pub use usage::{
    BodyBytes, HeaderUsage, OpenAiUsage, ReportedUsage, UsageError, UsageExtractor, UsageScanner,
};

pub(crate) use layer::MeterConfig;
pub(crate) use threshold::Thresholds;

/// Text assembled on the stack: formatting a key or a header value this way writes it to the
/// heap once, into its final home, instead of growing a `String` and copying it.
pub(crate) struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    pub(crate) fn new() -> Self {
        StackText {
            buf: [0; N],
            len: 0,
        }
    }

    /// Appends `s`; `false`, with nothing appended, if it does not fit.
    pub(crate) fn push(&mut self, s: &str) -> bool {
        let end = self.len + s.len();
        let Some(dst) = self.buf.get_mut(self.len..end) else {
            return false;
        };
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        true
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only whole `&str`s were appended, so this is valid UTF-8.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl<const N: usize> std::fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.push(s) {
            Ok(())
        } else {
            Err(std::fmt::Error)
        }
    }
}
