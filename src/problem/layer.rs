use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::decision::Denial;
use crate::problem::details::set_problem_headers;
use crate::problem::grpc::grpc_response;
use crate::problem::{is_grpc, ProblemConfig, ProblemDetails, PROBLEM_JSON};

/// Renders every refusal and error as an RFC 9457 problem document. See the
/// [module docs](crate::problem).
#[derive(Debug, Clone, Default)]
pub struct ProblemDetailsLayer {
    config: Arc<ProblemConfig>,
}

impl ProblemDetailsLayer {
    /// A layer rendering with `config`.
    pub fn new(config: ProblemConfig) -> Self {
        ProblemDetailsLayer {
            config: Arc::new(config),
        }
    }

    /// A layer rendering with a configuration it shares with a [`Billing`](crate::Billing).
    pub(crate) fn shared(config: Arc<ProblemConfig>) -> Self {
        ProblemDetailsLayer { config }
    }
}

impl<S> Layer<S> for ProblemDetailsLayer {
    type Service = ProblemDetailsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProblemDetailsService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service made by [`ProblemDetailsLayer`].
#[derive(Debug, Clone)]
pub struct ProblemDetailsService<S> {
    inner: S,
    config: Arc<ProblemConfig>,
}

impl<S> ProblemDetailsService<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: ProblemConfig) -> Self {
        ProblemDetailsService {
            inner,
            config: Arc::new(config),
        }
    }

    /// A [`ProblemDetailsLayer`] with this configuration.
    pub fn layer(config: ProblemConfig) -> ProblemDetailsLayer {
        ProblemDetailsLayer::new(config)
    }

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

// Parsed once: a lookup by `&str` would parse the name on every request.
static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
static X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

/// What the layer remembers of the request to render its response.
///
/// Raw header values (reference-counted clones, not copies): they are parsed only when a
/// problem is rendered, so a successful request pays for a few lookups and nothing else.
#[derive(Debug, Default)]
struct RequestFacts {
    grpc: bool,
    accepts_json: Accepts,
    request_id: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
}

/// The `Accept` header, decided when a problem needs it.
#[derive(Debug, Default)]
enum Accepts {
    /// No `Accept` header: anything goes.
    #[default]
    Anything,
    /// One header, parsed when needed.
    One(HeaderValue),
    /// Several headers (rare), decided while they were at hand.
    Decided(bool),
}

impl Accepts {
    fn json(&self) -> bool {
        match self {
            Accepts::Anything => true,
            Accepts::One(v) => accepts_json([v]),
            Accepts::Decided(yes) => *yes,
        }
    }
}

impl RequestFacts {
    fn read(headers: &HeaderMap) -> Self {
        let mut accept = headers.get_all(ACCEPT).iter();
        let accepts_json = match (accept.next(), accept.next()) {
            (None, _) => Accepts::Anything,
            (Some(v), None) => Accepts::One(v.clone()),
            (Some(_), Some(_)) => Accepts::Decided(accepts_json(headers.get_all(ACCEPT))),
        };
        RequestFacts {
            grpc: is_grpc(headers),
            accepts_json,
            request_id: headers.get(&X_REQUEST_ID).cloned(),
            traceparent: headers.get(&TRACEPARENT).cloned(),
        }
    }

    /// The client's `X-Request-Id`, if it is a sane token to echo back.
    fn request_id(&self) -> Option<&str> {
        self.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= 128
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            })
    }

    fn trace_id(&self) -> Option<String> {
        self.traceparent
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id_from_traceparent)
    }
}

/// Whether `Accept` headers allow a JSON answer (the caller handles an absent header).
fn accepts_json<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> bool {
    for value in values {
        let Ok(s) = value.to_str() else { continue };
        for range in s.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=").is_some_and(|q| {
                    let q = q.trim();
                    !q.is_empty() && q.chars().all(|c| c == '0' || c == '.')
                })
            });
            if refused {
                continue;
            }
            let is = |m: &str| media.eq_ignore_ascii_case(m);
            if is("*/*") || is("application/*") || is("application/json") || is(PROBLEM_JSON) {
                return true;
            }
            let suffix = media.len().checked_sub(5).and_then(|i| media.get(i..));
            if suffix.is_some_and(|s| s.eq_ignore_ascii_case("+json")) {
                return true;
            }
        }
    }
    false
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id_from_traceparent(tp: &str) -> Option<String> {
    let mut parts = tp.trim().split('-');
    let _version = parts.next().filter(|v| v.len() == 2)?;
    let trace = parts.next()?;
    if trace.len() == 32
        && trace.bytes().all(|b| b.is_ascii_hexdigit())
        && trace.bytes().any(|b| b != b'0')
    {
        Some(trace.to_ascii_lowercase())
    } else {
        None
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ProblemDetailsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let facts = RequestFacts::read(req.headers());
        ResponseFuture {
            inner: self.inner.call(req),
            facts: Some(facts),
            config: self.config.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`ProblemDetailsService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        facts: Option<RequestFacts>,
        config: Arc<ProblemConfig>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let facts = this.facts.take().unwrap_or_default();
        Poll::Ready(Ok(render(res, &facts, this.config)))
    }
}

fn render<B>(
    res: Response<B>,
    facts: &RequestFacts,
    config: &ProblemConfig,
) -> Response<ResponseBody<B>> {
    if facts.grpc {
        return render_grpc(res, facts, config);
    }
    let status = res.status();
    let problem = if let Some(denial) = res.extensions().get::<Arc<Denial>>() {
        // A refusal from the gate or the metering layer: re-render with our links.
        Some(ProblemDetails::from_denial(denial, config))
    } else if status.is_client_error() || status.is_server_error() {
        let is_json = res
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("application/json") || ct.starts_with(PROBLEM_JSON)
            });
        if status.is_server_error() && !(is_json && is_problem(&res)) {
            // Never forward an inner 5xx body: it may carry internal error text.
            if facts.accepts_json.json() {
                Some(ProblemDetails::for_status(status, config))
            } else {
                return plain_status(res);
            }
        } else if !is_json && facts.accepts_json.json() {
            Some(ProblemDetails::for_status(status, config))
        } else {
            None
        }
    } else {
        None
    };
    let Some(mut problem) = problem else {
        let (mut parts, body) = res.into_parts();
        if parts.status == StatusCode::PAYMENT_REQUIRED {
            parts
                .headers
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        return Response::from_parts(parts, ResponseBody::inner(body));
    };
    add_request_facts(&mut problem, facts, config);
    let (mut parts, _dropped) = res.into_parts();
    // A bare error from the inner service says whether a retry can help, as denials do.
    if !parts.headers.contains_key(&X_SHOULD_RETRY) {
        let retry = matches!(status.as_u16(), 408 | 429 | 500..=599);
        parts.headers.insert(
            &X_SHOULD_RETRY,
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
    }
    set_problem_headers(&mut parts.headers);
    Response::from_parts(parts, ResponseBody::full(problem.to_bytes()))
}

fn add_request_facts(problem: &mut ProblemDetails, facts: &RequestFacts, config: &ProblemConfig) {
    if let Some(id) = facts.request_id() {
        problem.instance = Some(config.instance_uri(id));
        problem.members.insert("request_id".into(), id.into());
    }
    if let Some(trace) = facts.trace_id() {
        problem.members.insert("trace_id".into(), trace.into());
    }
}

/// A gRPC request is answered in gRPC terms: a denial is re-rendered as a trailers-only gRPC
/// status with our links, an HTTP error from an inner service becomes the matching gRPC
/// status (never its body), and a gRPC response passes untouched.
fn render_grpc<B>(
    res: Response<B>,
    facts: &RequestFacts,
    config: &ProblemConfig,
) -> Response<ResponseBody<B>> {
    let status = res.status();
    let (parts, body) = res.into_parts();
    let denial = parts.extensions.get::<Arc<Denial>>().cloned();
    let mut problem = match &denial {
        Some(denial) => ProblemDetails::from_denial(denial, config),
        None if status.is_client_error() || status.is_server_error() => {
            ProblemDetails::for_status(status, config)
        }
        None => return Response::from_parts(parts, ResponseBody::inner(body)),
    };
    add_request_facts(&mut problem, facts, config);
    let mut extra = HeaderMap::new();
    // Keep what the denial added (`www-authenticate`, `retry-after`, rate limits) as metadata.
    for name in [
        http::header::WWW_AUTHENTICATE,
        http::header::RETRY_AFTER,
        http::HeaderName::from_static("ratelimit"),
        http::HeaderName::from_static("ratelimit-policy"),
    ] {
        if let Some(v) = parts.headers.get(&name) {
            extra.insert(name, v.clone());
        }
    }
    let mut out = grpc_response(&problem, denial.as_deref(), config, extra);
    *out.extensions_mut() = parts.extensions;
    out
}

fn is_problem<B>(res: &Response<B>) -> bool {
    res.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with(PROBLEM_JSON))
}

fn plain_status<B>(res: Response<B>) -> Response<ResponseBody<B>> {
    let (mut parts, _dropped) = res.into_parts();
    let text = parts.status.canonical_reason().unwrap_or("Error");
    parts.headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, ResponseBody::full(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let json = |h: &HeaderMap| RequestFacts::read(h).accepts_json.json();
        let mut h = HeaderMap::new();
        assert!(json(&h));
        h.insert(ACCEPT, HeaderValue::from_static("text/html"));
        assert!(!json(&h));
        h.insert(
            ACCEPT,
            HeaderValue::from_static("text/html, application/json;q=0.5"),
        );
        assert!(json(&h));
        h.insert(ACCEPT, HeaderValue::from_static("application/json;q=0"));
        assert!(!json(&h));
        h.insert(ACCEPT, HeaderValue::from_static("application/problem+json"));
        assert!(json(&h));
        h.insert(ACCEPT, HeaderValue::from_static("Application/Vnd.Api+JSON"));
        assert!(json(&h));
        h.insert(ACCEPT, HeaderValue::from_static("text/html"));
        h.append(ACCEPT, HeaderValue::from_static("APPLICATION/JSON"));
        assert!(json(&h), "any of several Accept headers");
        h.insert(ACCEPT, HeaderValue::from_static("json"));
        assert!(!json(&h), "too short for a +json suffix");
    }

    #[test]
    fn traceparent() {
        assert_eq!(
            trace_id_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".into())
        );
        assert_eq!(trace_id_from_traceparent("garbage"), None);
        assert_eq!(
            trace_id_from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }
}
