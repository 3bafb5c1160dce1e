//! [`WebhookService`]: the tower service a processor's webhook is mounted as.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use serde_json::json;

use crate::decision::{CustomDenial, Denial};
use crate::error::{BoxError, LedgerError, StoreError};
use crate::ledger::Ledger;
use crate::plan::{Catalog, PlanId, PlanStore};
use crate::problem::{ProblemConfig, ProblemDetails, PROBLEM_JSON};
use crate::time::{Clock, SystemClock};
use crate::webhook::apply::{next, Outcome, Step, UnknownPlan};
use crate::webhook::{Change, Event, EventError, Processor, SignatureError, Stripe};

/// The largest body read by default: 256 KiB, far above any Stripe event.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// How often a write that lost a race with another delivery is decided again.
const ATTEMPTS: usize = 5;

/// `Retry-After` on a 503; Stripe retries on its own schedule anyway.
const RETRY_AFTER_SECS: u64 = 5;

const TARGET: &str = "tower_402::webhook";

/// A payment processor's webhook endpoint as a tower service: mount it on a route
/// (`Router::route_service("/webhooks/stripe", ...)`).
///
/// For each `POST` it reads the raw body (at most
/// [`max_body_bytes`](Self::max_body_bytes)), has the [`Processor`] verify the signature
/// and read the event, then applies it with [`apply`](Self::apply). See the
/// [module docs](crate::webhook) for every answer. Clones share everything.
///
/// A webhook is not on the request path of the paid API, so the response future is boxed.
pub struct WebhookService<P> {
    processor: Arc<P>,
    plans: Arc<dyn PlanStore>,
    ledger: Arc<dyn Ledger>,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    max_body_bytes: usize,
    problems: Arc<ProblemConfig>,
}

impl<P> Clone for WebhookService<P> {
    fn clone(&self) -> Self {
        WebhookService {
            processor: self.processor.clone(),
            plans: self.plans.clone(),
            ledger: self.ledger.clone(),
            catalog: self.catalog.clone(),
            clock: self.clock.clone(),
            max_body_bytes: self.max_body_bytes,
            problems: self.problems.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for WebhookService<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookService")
            .field("processor", &self.processor)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl WebhookService<Stripe> {
    /// A Stripe webhook with the endpoint's signing secret and the defaults of [`Stripe`].
    pub fn stripe(
        secret: impl AsRef<[u8]>,
        plans: impl PlanStore,
        ledger: impl Ledger,
        catalog: Catalog,
    ) -> Self {
        WebhookService::new(Stripe::new(secret), plans, ledger, catalog)
    }
}

impl<P: Processor> WebhookService<P> {
    /// A webhook for `processor` that writes subscriptions to `plans` (plans checked
    /// against `catalog`) and credit purchases to `ledger`.
    pub fn new(processor: P, plans: impl PlanStore, ledger: impl Ledger, catalog: Catalog) -> Self {
        WebhookService {
            processor: Arc::new(processor),
            plans: Arc::new(plans),
            ledger: Arc::new(ledger),
            catalog: Arc::new(catalog),
            clock: Arc::new(SystemClock),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            problems: Arc::new(ProblemConfig::default()),
        }
    }

    /// The clock the signature tolerance is measured on (default: the wall clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The largest body read; a larger one is refused with 413 before it is all read.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// How refusals are rendered (type URI base, links).
    pub fn problems(mut self, config: ProblemConfig) -> Self {
        self.problems = Arc::new(config);
        self
    }

    /// The processor.
    pub fn get_ref(&self) -> &P {
        &self.processor
    }

    /// Applies a verified event: the part of the service after the signature and the
    /// parse, for events that arrive some other way (a queue, a replay from the processor's
    /// event list).
    ///
    /// Subscription and payment events are compare-and-written with
    /// [`PlanStore::put_subscription_if`] (decided again when another delivery wrote first);
    /// credit purchases are deposits idempotent on the payment.
    pub async fn apply(&self, event: &Event) -> Result<(Outcome, Cow<'static, str>), ApplyError> {
        let account = match &event.change {
            Change::Ignored(why) => return Ok((Outcome::Ignored, why.clone())),
            Change::Credits {
                account,
                credits,
                payment,
            } => {
                let now = self.clock.now();
                let deposit = self.ledger.deposit(account, *credits, payment, now).await?;
                return Ok(if deposit.applied {
                    (Outcome::Applied, "deposited".into())
                } else {
                    (
                        Outcome::Duplicate,
                        "this payment was deposited before".into(),
                    )
                });
            }
            Change::Subscription(s) => &s.account,
            Change::PaymentFailed { account, .. } | Change::PaymentSucceeded { account, .. } => {
                account
            }
        };
        for _ in 0..ATTEMPTS {
            let current = self.plans.subscription(account).await?;
            match next(current.as_ref(), event, &self.catalog) {
                Err(UnknownPlan(plan)) => return Err(ApplyError::UnknownPlan(plan)),
                Ok(Step::Skip(outcome, why)) => return Ok((outcome, why)),
                Ok(Step::Write(sub)) => {
                    let expected = current.as_ref().and_then(|c| c.synced.as_ref());
                    if self.plans.put_subscription_if(sub, expected).await? {
                        return Ok((Outcome::Applied, "subscription written".into()));
                    }
                }
            }
        }
        Err(ApplyError::Contention)
    }

    async fn serve<B>(self, req: Request<B>) -> Response<WebhookBody>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        if parts.method != Method::POST {
            let mut res = self.problem(Denial::Custom(Box::new(CustomDenial::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "Method not allowed",
                "A webhook endpoint only accepts POST.",
            ))));
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return res;
        }
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = match read_body(body, declared, self.max_body_bytes).await {
            Ok(body) => body,
            Err(denial) => return self.problem(denial),
        };
        let now = self.clock.now();
        if let Err(e) = self.processor.verify(&parts.headers, &body, now) {
            // The reason only: never the header, the secret or the body.
            tracing::warn!(target: TARGET, reason = %e, "webhook signature refused");
            return self.problem(invalid_signature(&e));
        }
        let event = match self.processor.parse(&body) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, "webhook event unreadable");
                return self.problem(invalid_event(&e));
            }
        };
        match self.apply(&event).await {
            Ok((outcome, why)) => {
                tracing::info!(
                    target: TARGET,
                    event = event.id.as_str(),
                    kind = event.kind.as_str(),
                    outcome = outcome.as_str(),
                    why = why.as_ref(),
                    "webhook event"
                );
                received(&event, outcome)
            }
            Err(e) => {
                tracing::error!(
                    target: TARGET,
                    event = event.id.as_str(),
                    kind = event.kind.as_str(),
                    error = %e,
                    "webhook event not applied"
                );
                self.problem(e.denial())
            }
        }
    }

    fn problem(&self, denial: Denial) -> Response<WebhookBody> {
        let p = ProblemDetails::from_denial(&denial, &self.problems);
        let mut res = Response::new(WebhookBody::new(p.to_bytes()));
        *res.status_mut() = p.status;
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Denial::Unavailable { retry_after_secs } = denial {
            h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        res
    }
}

/// An event could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The plan store failed: answered 503, so that the processor delivers again.
    #[error("plan store failed")]
    Store(#[from] StoreError),
    /// The ledger failed or refused the deposit.
    #[error("ledger refused the deposit")]
    Ledger(#[from] LedgerError),
    /// A live subscription names a plan that is not in the catalog (answered 422, so the
    /// delivery shows as failing until the catalog has it).
    #[error("the subscription's plan is not in the catalog")]
    UnknownPlan(Option<PlanId>),
    /// Other deliveries kept writing the same subscription first.
    #[error("the subscription kept changing while this event was applied")]
    Contention,
}

impl ApplyError {
    fn denial(&self) -> Denial {
        let unavailable = Denial::Unavailable {
            retry_after_secs: RETRY_AFTER_SECS,
        };
        match self {
            ApplyError::Store(_) | ApplyError::Contention => unavailable,
            ApplyError::Ledger(LedgerError::KeyConflict) => custom(
                StatusCode::CONFLICT,
                "PAYMENT_ALREADY_CREDITED",
                "Payment already credited",
                "This payment was already credited with a different amount.".into(),
            ),
            ApplyError::Ledger(LedgerError::AmountOutOfRange) => custom(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_AMOUNT",
                "Invalid amount",
                "This deposit would take the balance beyond what an account can hold.".into(),
            ),
            ApplyError::Ledger(_) => unavailable,
            ApplyError::UnknownPlan(plan) => {
                let (detail, plan) = match plan {
                    Some(p) => (
                        format!("The subscription's plan `{p}` is not in the catalog."),
                        Some(p.as_str().to_owned()),
                    ),
                    None => (
                        "The subscription names no plan (the first item's price has no \
                         lookup key)."
                            .to_owned(),
                        None,
                    ),
                };
                let mut d = CustomDenial::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "UNKNOWN_PLAN",
                    "Unknown plan",
                    detail,
                );
                if let Some(plan) = plan {
                    d = d.member("plan", plan);
                }
                Denial::Custom(Box::new(d))
            }
        }
    }
}

fn custom(status: StatusCode, code: &'static str, title: &'static str, detail: String) -> Denial {
    Denial::Custom(Box::new(CustomDenial::new(status, code, title, detail)))
}

fn invalid_signature(e: &SignatureError) -> Denial {
    Denial::BadRequest {
        code: "INVALID_SIGNATURE",
        detail: format!("The webhook signature was refused: {e}.").into(),
    }
}

fn invalid_event(e: &EventError) -> Denial {
    Denial::BadRequest {
        code: "INVALID_EVENT",
        detail: format!("The body is signed but not an event this endpoint can apply: {e}.").into(),
    }
}

fn too_large(limit: usize) -> Denial {
    custom(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "Payload too large",
        format!("A webhook body may have at most {limit} bytes."),
    )
}

/// The raw body, refused early when it declares or reaches more than `limit` bytes.
async fn read_body<B>(body: B, declared: Option<u64>, limit: usize) -> Result<Vec<u8>, Denial>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    if declared.is_some_and(|n| n > limit_u64) || body.size_hint().lower() > limit_u64 {
        return Err(too_large(limit));
    }
    let mut body = pin!(body);
    let mut buf = Vec::new();
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|_| Denial::BadRequest {
            code: "INVALID_REQUEST",
            detail: "The request body could not be read.".into(),
        })?;
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers
        };
        while data.has_remaining() {
            let chunk = data.chunk();
            if buf.len().saturating_add(chunk.len()) > limit {
                return Err(too_large(limit));
            }
            buf.extend_from_slice(chunk);
            let n = chunk.len();
            data.advance(n);
        }
    }
    Ok(buf)
}

fn received(event: &Event, outcome: Outcome) -> Response<WebhookBody> {
    let body = json!({
        "received": true,
        "id": event.id,
        "type": event.kind,
        "outcome": outcome.as_str(),
    });
    let mut res = Response::new(WebhookBody::new(body.to_string()));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

impl<P, B> tower_service::Service<Request<B>> for WebhookService<P>
where
    P: Processor,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<WebhookBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let this = self.clone();
        ResponseFuture {
            inner: Box::pin(async move { Ok(this.serve(req).await) }),
        }
    }
}

/// The response future of [`WebhookService`].
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<WebhookBody>, Infallible>> + Send>>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("webhook::ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<WebhookBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// The body of the webhook's answers: one complete chunk.
#[derive(Debug, Clone, Default)]
pub struct WebhookBody {
    data: Option<Bytes>,
}

impl WebhookBody {
    fn new(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        WebhookBody {
            data: (!data.is_empty()).then_some(data),
        }
    }
}

impl Body for WebhookBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
