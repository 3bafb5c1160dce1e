use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tower_layer::Layer;
use tower_service::Service;

use super::payment::{NeverFixed, OnPaymentRequired, PaymentOutcome};
use super::policy::{Next, RetryPolicy};
use super::refusal::{Refusal, MAX_BODY};
use crate::body::ResponseBody;

/// The error type of [`RetryService`]: the inner service's error, or a request body that
/// could not be read.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A request body the layer can send again: built from the bytes of the original.
///
/// Implemented for [`Full<Bytes>`] (hyper-util clients), with the `axum` feature for axum's
/// `Body` (an axum `Router` called in process, as in tests), and with the `grpc` feature for
/// `tonic::body::Body` (tonic channels).
pub trait ReplayBody: Body + Sized {
    /// A body holding `data`.
    fn from_bytes(data: Bytes) -> Self;
}

impl ReplayBody for Full<Bytes> {
    fn from_bytes(data: Bytes) -> Self {
        Full::new(data)
    }
}

#[cfg(feature = "axum")]
impl ReplayBody for axum_core::body::Body {
    fn from_bytes(data: Bytes) -> Self {
        axum_core::body::Body::from(data)
    }
}

#[cfg(feature = "grpc")]
impl ReplayBody for tonic::body::Body {
    fn from_bytes(data: Bytes) -> Self {
        tonic::body::Body::new(Full::new(data))
    }
}

/// Retries what can succeed and nothing else, with one `Idempotency-Key` across the retries
/// of a request. See the [module docs](crate::client).
///
/// `B` is the request body the inner service takes ([`Full<Bytes>`] for hyper-util clients;
/// [`for_body`](Self::for_body) to change it, `tonic::body::Body` for a tonic channel).
pub struct RetryLayer<P = NeverFixed, B = Full<Bytes>> {
    policy: RetryPolicy,
    on_payment: P,
    idempotency_keys: bool,
    body: PhantomData<fn() -> B>,
}

impl<P: Clone, B> Clone for RetryLayer<P, B> {
    fn clone(&self) -> Self {
        RetryLayer {
            policy: self.policy.clone(),
            on_payment: self.on_payment.clone(),
            idempotency_keys: self.idempotency_keys,
            body: PhantomData,
        }
    }
}

impl<P, B> std::fmt::Debug for RetryLayer<P, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field("idempotency_keys", &self.idempotency_keys)
            .field("body", &std::any::type_name::<B>())
            .finish_non_exhaustive()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// The default [`RetryPolicy`], no payment hook, `Idempotency-Key`s added.
    pub fn new() -> Self {
        RetryLayer {
            policy: RetryPolicy::default(),
            on_payment: NeverFixed,
            idempotency_keys: true,
            body: PhantomData,
        }
    }
}

impl<P, B> RetryLayer<P, B> {
    /// The retry policy.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Whether a request without an `Idempotency-Key` gets one (default yes), whatever its
    /// method: on a paid API a `GET` is charged per call like a `POST`. The key is sent with
    /// every attempt, so the server charges the request once however many times it is sent.
    /// Without a key, a request that may have been served (a transport error, a gateway's
    /// 502, 504 or 408) is not sent again.
    pub fn idempotency_keys(mut self, on: bool) -> Self {
        self.idempotency_keys = on;
        self
    }

    /// The hook called on a payment refusal; when it reports the condition fixed, the
    /// request is retried once.
    pub fn on_payment_required<Q: OnPaymentRequired>(self, hook: Q) -> RetryLayer<Q, B> {
        RetryLayer {
            policy: self.policy,
            on_payment: hook,
            idempotency_keys: self.idempotency_keys,
            body: PhantomData,
        }
    }

    /// The request body type of the inner service: the layer rebuilds each attempt's body as
    /// a `C` ([`ReplayBody`]).
    pub fn for_body<C: ReplayBody>(self) -> RetryLayer<P, C> {
        RetryLayer {
            policy: self.policy,
            on_payment: self.on_payment,
            idempotency_keys: self.idempotency_keys,
            body: PhantomData,
        }
    }

    /// For a tonic channel: `for_body::<tonic::body::Body>()`.
    #[cfg(feature = "grpc")]
    pub fn for_tonic(self) -> RetryLayer<P, tonic::body::Body> {
        self.for_body()
    }
}

impl<S, P: Clone, B> Layer<S> for RetryLayer<P, B> {
    type Service = RetryService<S, P, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Debug)]
pub struct RetryService<S, P = NeverFixed, B = Full<Bytes>> {
    inner: S,
    layer: RetryLayer<P, B>,
}

impl<S: Clone, P: Clone, B> Clone for RetryService<S, P, B> {
    fn clone(&self) -> Self {
        RetryService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S> RetryService<S> {
    /// Wraps `inner` with the defaults of [`RetryLayer::new`].
    pub fn new(inner: S) -> Self {
        RetryLayer::new().layer(inner)
    }

    /// A [`RetryLayer`] with the defaults.
    pub fn layer() -> RetryLayer {
        RetryLayer::new()
    }
}

impl<S, P, B> RetryService<S, P, B> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The response future of [`RetryService`]. Boxed: the retry loop waits, asks the payment
/// hook and sends again, and this is the client side, where one allocation per call does not
/// show.
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, BoxError>> + Send>>;

impl<S, P, ReqBody, InBody, ResBody> Service<Request<ReqBody>> for RetryService<S, P, InBody>
where
    S: Service<Request<InBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    P: OnPaymentRequired,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    InBody: ReplayBody + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The ready service makes the first attempt; retries use clones made ready again.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(inner, self.layer.clone(), req))
    }
}

async fn run<S, P, ReqBody, InBody, ResBody>(
    mut inner: S,
    layer: RetryLayer<P, InBody>,
    req: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, BoxError>
where
    S: Service<Request<InBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    P: OnPaymentRequired,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
    InBody: ReplayBody,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await.map_err(Into::into)?.to_bytes();
    let keyed = parts.headers.contains_key(&IDEMPOTENCY_KEY)
        || (layer.idempotency_keys && {
            parts
                .headers
                .insert(IDEMPOTENCY_KEY.clone(), new_idempotency_key());
            true
        });
    // Sending a request again after it may have been served is safe only when the server
    // deduplicates it by its key: on a paid API a GET is charged per call like any other
    // method, so an idempotent method is not enough.
    let resend_safe = keyed;
    let mut retries = 0u32;
    let mut paid = false;
    let mut first = true;
    loop {
        if !first {
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
        }
        first = false;
        let attempt = Request::from_parts(parts.clone(), InBody::from_bytes(body.clone()));
        let outcome: Result<_, BoxError> = inner.call(attempt).await.map_err(Into::into);
        let res = match outcome {
            Ok(res) => res,
            Err(e) => {
                let next = if resend_safe {
                    layer.policy.next_after_error(retries, jitter())
                } else {
                    Next::Return
                };
                match next {
                    Next::RetryAfter(delay) => {
                        tracing::debug!(
                            target: "tower_402::client",
                            error = %e,
                            retry = retries + 1,
                            delay_ms = delay.as_millis() as u64,
                            "request failed; retrying"
                        );
                        tokio::time::sleep(delay).await;
                        retries += 1;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
        };
        let (res, refusal) = read_refusal(res).await?;
        let Some(refusal) = refusal else {
            return Ok(res);
        };
        log_refusal(&refusal, &parts.method, parts.uri.path());
        let mut res = res;
        let next = match layer.policy.next(&refusal, retries, jitter()) {
            // A gateway's 502, 504 or 408 may come after the work was done and charged: send
            // again only what the server deduplicates. Refusals that charged nothing (the
            // billing layer's own 503, a rate limit, a key still in use) are safe either way.
            Next::RetryAfter(_) if !resend_safe && !charged_nothing(&refusal) => Next::Return,
            next => next,
        };
        match next {
            Next::AskPayment if !paid => {
                paid = true;
                if layer.on_payment.on_payment_required(&refusal).await == PaymentOutcome::Fixed {
                    tracing::info!(
                        target: "tower_402::client",
                        code = %refusal.code,
                        "payment condition reported fixed; retrying once"
                    );
                    continue;
                }
            }
            Next::RetryAfter(delay) => {
                tracing::info!(
                    target: "tower_402::client",
                    code = %refusal.code,
                    retry = retries + 1,
                    delay_ms = delay.as_millis() as u64,
                    "retrying"
                );
                tokio::time::sleep(delay).await;
                retries += 1;
                continue;
            }
            Next::AskPayment | Next::Return => {}
        }
        res.extensions_mut().insert(refusal);
        return Ok(res);
    }
}

/// A refusal read from a response: gRPC refusals from the headers (trailers-only answers),
/// HTTP ones from the body, which is read (up to [`MAX_BODY`]) and handed on as bytes.
async fn read_refusal<B>(
    res: Response<B>,
) -> Result<(Response<ResponseBody<B>>, Option<Refusal>), BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if let Some(refusal) = Refusal::from_grpc_headers(res.headers()) {
        return Ok((res.map(ResponseBody::inner), Some(refusal)));
    }
    let grpc = res
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if res.status().as_u16() < 400 || grpc {
        return Ok((res.map(ResponseBody::inner), None));
    }
    let (parts, body) = res.into_parts();
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        // Too long to be a problem document: read the status and headers alone.
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Bytes::new(),
        Err(e) => return Err(e),
    };
    let refusal = Refusal::from_http(parts.status, &parts.headers, &bytes);
    Ok((
        Response::from_parts(parts, ResponseBody::full(bytes)),
        refusal,
    ))
}

/// Logged with its code, detail and links; never a header (credentials live there) and
/// never the query.
fn log_refusal(refusal: &Refusal, method: &Method, path: &str) {
    tracing::warn!(
        target: "tower_402::client",
        method = %method,
        path,
        status = refusal.status.map(|s| s.as_u16()),
        grpc_code = refusal.grpc_code.map(|c| c.as_i32()),
        code = %refusal.code,
        detail = %refusal.detail,
        fix = refusal.fix_link(),
        top_up_url = refusal.links.top_up.as_deref(),
        upgrade_url = refusal.links.upgrade.as_deref(),
        billing_url = refusal.links.billing.as_deref(),
        request_id = refusal.request_id.as_deref(),
        retry = ?refusal.retry,
        "request refused"
    );
}

/// A refusal that says the request was not served, so nothing was charged: tower-402's own
/// `SERVICE_UNAVAILABLE` (its stores are down before the handler runs), a rate limit, or a
/// key whose first request is still running.
fn charged_nothing(refusal: &Refusal) -> bool {
    refusal
        .status
        .is_some_and(|s| s == http::StatusCode::TOO_MANY_REQUESTS)
        || matches!(
            refusal.code,
            crate::client::RefusalCode::ServiceUnavailable
                | crate::client::RefusalCode::IdempotencyKeyInUse
        )
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random bits: the standard library's randomly seeded hasher over a process-wide counter
/// (unique per call, unpredictable across processes; not a secret, so no CSPRNG is needed).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A fresh key, 32 hex digits in the UUID layout (version 4, variant 1).
pub(crate) fn new_idempotency_key() -> HeaderValue {
    let hi = random_u64();
    let lo = random_u64();
    let v = (u128::from(hi) << 64 | u128::from(lo)) & !(0xf << 76) & !(0x3 << 62)
        | (0x4 << 76)
        | (0x2 << 62);
    let s = format!("{v:032x}");
    let key = format!(
        "{}-{}-{}-{}-{}",
        &s[..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..]
    );
    HeaderValue::try_from(key).expect("hex digits and dashes are a valid header value")
}

/// Equal jitter: a factor in 0.5–1.0.
fn jitter() -> f64 {
    0.5 + (random_u64() >> 11) as f64 / (1u64 << 53) as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_uuid_v4_and_distinct() {
        let keys: std::collections::HashSet<_> = (0..1000).map(|_| new_idempotency_key()).collect();
        assert_eq!(keys.len(), 1000);
        for k in keys.iter().take(10) {
            let s = k.to_str().unwrap();
            assert_eq!(s.len(), 36);
            assert_eq!(&s[14..15], "4", "{s}");
            assert!("89ab".contains(&s[19..20]), "{s}");
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.5..=1.0).contains(&j), "{j}");
        }
    }
}
