//! The client layer (feature `client`) against the real example routers: the quickstart and
//! `llm_proxy` in process and over sockets, the gRPC example over a tonic channel. Every test
//! counts the attempts the server saw and the `Idempotency-Key` each carried.

// The three examples each include examples/common: one test binary calls all three.
#![allow(clippy::duplicate_mod)]

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

#[allow(dead_code)]
#[path = "../examples/llm_proxy.rs"]
mod llm_proxy;

#[allow(dead_code)]
#[path = "../examples/grpc.rs"]
mod grpc;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_402::client::{
    self, PaymentOutcome, Refusal, RefusalCode, RetryClass, RetryLayer, RetryPolicy,
};
use tower_402::decision::{CustomDenial, Denial};
use tower_402::{AccountId, Credits, Ledger, ManualClock, Timestamp};
use tower_layer::Layer;

/// 2026-11-24T12:00:00Z.
fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap())
}

/// What the server saw of one attempt.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    key: Option<String>,
    credential: bool,
}

/// The example's router, with a record of every attempt and, in front of it, a queue of
/// outages: each queued denial answers one attempt as the billing layers render it (a 503
/// from an unreachable ledger, a 429), then the router answers again.
#[derive(Clone)]
struct Upstream {
    router: Router,
    seen: Arc<Mutex<Vec<Seen>>>,
    outages: Arc<Mutex<VecDeque<Denial>>>,
}

impl Upstream {
    fn new(router: Router) -> Self {
        Upstream {
            router,
            seen: Arc::default(),
            outages: Arc::default(),
        }
    }

    fn fail_next(&self, denial: Denial, times: usize) {
        let mut q = self.outages.lock().unwrap();
        q.extend(std::iter::repeat_n(denial, times));
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Serves on a loopback socket; returns the base URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback_service(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let h = req.headers();
        self.seen.lock().unwrap().push(Seen {
            path: req.uri().path().to_owned(),
            key: h
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned()),
            credential: h.contains_key("x-api-key") || h.contains_key("authorization"),
        });
        let outage = self.outages.lock().unwrap().pop_front();
        let router = self.router.clone();
        Box::pin(async move {
            match outage {
                Some(denial) => Ok(denial.into_response()),
                None => router.oneshot(req).await,
            }
        })
    }
}

fn req(method: Method, uri: &str, key: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn call<S>(svc: &mut S, r: Request<Body>) -> (Response<Bytes>, Option<Refusal>)
where
    S: Service<Request<Body>, Error = client::BoxError>,
    S::Response: Into<Response<tower_402::body::ResponseBody<Body>>>,
{
    let res: Response<_> = svc.ready().await.unwrap().call(r).await.unwrap().into();
    let refusal = res.extensions().get::<Refusal>().cloned();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, bytes), refusal)
}

fn in_process(
    up: &Upstream,
    layer: RetryLayer,
) -> impl Service<
    Request<Body>,
    Response = Response<tower_402::body::ResponseBody<Body>>,
    Error = client::BoxError,
> {
    layer.for_body::<Body>().layer(up.clone())
}

async fn hcall(
    http: &mut client::HttpClient,
    r: Request<Full<Bytes>>,
) -> Result<Response<tower_402::body::ResponseBody<hyper::body::Incoming>>, client::BoxError> {
    ServiceExt::<Request<Full<Bytes>>>::ready(http)
        .await?
        .call(r)
        .await
}

async fn balance(ledger: &impl Ledger, account: &str) -> u64 {
    ledger
        .balance(&AccountId::new(account), Timestamp::from_unix(0))
        .await
        .unwrap()
        .available
        .get()
}

#[tokio::test(start_paused = true)]
async fn a_402_is_not_retried_and_reads_as_a_message_with_the_top_up_link() {
    let demo = quickstart::demo(clock()).await;
    let up = Upstream::new(demo.router);
    let mut svc = in_process(&up, RetryLayer::new());
    let (res, refusal) = call(&mut svc, req(Method::GET, "/v1/forecast", "demo-broke", "")).await;
    assert_eq!(res.status(), 402);
    assert_eq!(up.seen().len(), 1, "a 402 is sent once");
    let r = refusal.expect("the refusal in the extensions");
    assert_eq!(r.code, RefusalCode::InsufficientCredits);
    assert_eq!(r.retry, RetryClass::AfterPayment);
    assert_eq!(
        (r.balance, r.required),
        (Some(Credits::new(0)), Some(Credits::new(1)))
    );
    let link = r.links.top_up.clone().expect("top_up_url");
    assert!(r.to_string().contains(&link), "{r}");
    // The problem is still the body, for whoever reads it.
    let doc: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
    assert_eq!(doc["code"], "INSUFFICIENT_CREDITS");
    assert_eq!(r.problem.unwrap().members["top_up_url"], link.as_str());
    assert_eq!(res.headers()["x-should-retry"], "false");
}

#[tokio::test(start_paused = true)]
async fn a_503_is_retried_after_retry_after_with_one_key_and_pays_once() {
    let demo = quickstart::demo(clock()).await;
    let up = Upstream::new(demo.router);
    up.fail_next(
        Denial::Unavailable {
            retry_after_secs: 2,
        },
        2,
    );
    let mut svc = in_process(&up, RetryLayer::new());
    let before = balance(&demo.ledger, "acct_broke").await;
    let start = tokio::time::Instant::now();
    // A top-up needs an Idempotency-Key: the layer adds one, and keeps it.
    let (res, refusal) = call(
        &mut svc,
        req(
            Method::POST,
            "/v1/topup",
            "demo-broke",
            r#"{"credits": 50}"#,
        ),
    )
    .await;
    assert_eq!(res.status(), 200, "{:?}", res.body());
    assert!(refusal.is_none());
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(4),
        "Retry-After: 2, twice"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 3, "two refusals, one success");
    let key = seen[0].key.clone().expect("a key was added");
    assert!(
        seen.iter().all(|s| s.key.as_deref() == Some(&key)),
        "{seen:?}"
    );
    assert!(seen.iter().all(|s| s.credential && s.path == "/v1/topup"));
    assert_eq!(balance(&demo.ledger, "acct_broke").await, before + 50);

    // Another request gets another key.
    call(
        &mut svc,
        req(Method::POST, "/v1/topup", "demo-broke", r#"{"credits": 1}"#),
    )
    .await;
    assert_ne!(up.seen()[3].key.as_deref(), Some(key.as_str()));
}

#[tokio::test(start_paused = true)]
async fn a_429_is_retried_with_capped_jittered_backoff_then_handed_over() {
    let demo = quickstart::demo(clock()).await;
    let up = Upstream::new(demo.router);
    let slow_down = Denial::Custom(Box::new(CustomDenial::new(
        StatusCode::TOO_MANY_REQUESTS,
        "SLOW_DOWN",
        "Slow down",
        "too many requests this second",
    )));
    up.fail_next(slow_down, 10);
    let policy = RetryPolicy::new()
        .max_retries(3)
        .base_delay(Duration::from_millis(100))
        .max_delay(Duration::from_millis(300));
    let mut svc = in_process(&up, RetryLayer::new().policy(policy));
    let start = tokio::time::Instant::now();
    let (res, refusal) = call(&mut svc, req(Method::GET, "/v1/forecast", "demo-pro", "")).await;
    assert_eq!(res.status(), 429);
    assert_eq!(up.seen().len(), 4, "the first attempt and 3 retries");
    assert_eq!(
        refusal.unwrap().code,
        RefusalCode::Other("SLOW_DOWN".into())
    );
    // 100, 200, 300 (capped) ms, each scaled by a jitter in 0.5–1.0.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited <= Duration::from_millis(600),
        "{waited:?}"
    );
    // A GET is charged per call on a paid API: it gets a key, the same on every attempt.
    let seen = up.seen();
    assert!(seen[0].key.is_some());
    assert!(seen.iter().all(|s| s.key == seen[0].key));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_too_long_is_handed_to_the_caller_at_once() {
    let demo = quickstart::demo(clock()).await;
    let up = Upstream::new(demo.router);
    up.fail_next(
        Denial::Unavailable {
            retry_after_secs: 3600,
        },
        1,
    );
    let mut svc = in_process(&up, RetryLayer::new());
    let start = tokio::time::Instant::now();
    let (res, refusal) = call(&mut svc, req(Method::GET, "/v1/forecast", "demo-pro", "")).await;
    assert_eq!((res.status().as_u16(), up.seen().len()), (503, 1));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        refusal.unwrap().retry_after,
        Some(Duration::from_secs(3600))
    );
}

#[tokio::test(start_paused = true)]
async fn a_402_is_retried_once_after_the_application_tops_up() {
    let demo = quickstart::demo(clock()).await;
    let up = Upstream::new(demo.router);
    let ledger = demo.ledger.clone();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let layer = RetryLayer::new().on_payment_required(move |r: &Refusal| {
        log.lock().unwrap().push(r.code.clone());
        let ledger = ledger.clone();
        async move {
            ledger
                .deposit(
                    &"acct_broke".into(),
                    Credits::new(5),
                    "auto-top-up-1",
                    Timestamp::from_unix(0),
                )
                .await
                .unwrap();
            PaymentOutcome::Fixed
        }
    });
    let mut svc = layer.for_body::<Body>().layer(up.clone());
    let (res, refusal) = call(&mut svc, req(Method::GET, "/v1/forecast", "demo-broke", "")).await;
    assert_eq!(res.status(), 200);
    assert!(refusal.is_none());
    assert_eq!(*asked.lock().unwrap(), [RefusalCode::InsufficientCredits]);
    assert_eq!(up.seen().len(), 2);
    assert_eq!(
        balance(&demo.ledger, "acct_broke").await,
        4,
        "5 topped up, 1 paid"
    );

    // A hook that says "fixed" without fixing gets one retry, not a loop.
    let up = Upstream::new(quickstart::demo(clock()).await.router);
    let layer =
        RetryLayer::new().on_payment_required(|_: &Refusal| async { PaymentOutcome::Fixed });
    let mut svc = layer.for_body::<Body>().layer(up.clone());
    let (res, refusal) = call(&mut svc, req(Method::GET, "/v1/forecast", "demo-broke", "")).await;
    assert_eq!((res.status().as_u16(), up.seen().len()), (402, 2));
    assert_eq!(refusal.unwrap().code, RefusalCode::InsufficientCredits);
}

fn chat(key: &str, idempotency_key: &str, content: &str) -> Request<Body> {
    let body = serde_json::json!({
        "model": "small-model",
        "messages": [{"role": "user", "content": content}],
    });
    let mut r = req(Method::POST, "/v1/chat/completions", key, &body.to_string());
    r.headers_mut()
        .insert("idempotency-key", idempotency_key.parse().unwrap());
    r
}

#[tokio::test(start_paused = true)]
async fn a_reused_key_is_sent_once_and_a_replay_is_not_charged() {
    let demo = llm_proxy::demo(ManualClock::new(Timestamp::from_unix(1_790_000_000))).await;
    let up = Upstream::new(demo.router);
    let mut svc = in_process(&up, RetryLayer::new());
    let (res, _) = call(&mut svc, chat("demo-pro", "conv-1", "hello")).await;
    assert_eq!(res.status(), 200);
    let paid = balance(&demo.ledger, "acct_pro").await;
    // Same key, same request: not charged a second time.
    let (again, _) = call(&mut svc, chat("demo-pro", "conv-1", "hello")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(balance(&demo.ledger, "acct_pro").await, paid);
    // Same key, another request: 409, never retried.
    let (res, refusal) = call(&mut svc, chat("demo-pro", "conv-1", "something else")).await;
    assert_eq!(res.status(), 409);
    assert_eq!(res.headers()["x-should-retry"], "false");
    let r = refusal.unwrap();
    assert_eq!(
        (r.code, r.retry),
        (RefusalCode::IdempotencyKeyReused, RetryClass::Never)
    );
    assert_eq!(up.seen().len(), 3, "each request sent once");
    assert!(
        up.seen().iter().all(|s| s.key.as_deref() == Some("conv-1")),
        "the caller's key is kept"
    );
    assert_eq!(balance(&demo.ledger, "acct_pro").await, paid);
}

#[tokio::test]
async fn over_sockets_with_the_hyper_util_client() {
    let demo = quickstart::demo(clock()).await;
    let up = Upstream::new(demo.router);
    let base = up.serve().await;
    let mut http = client::http_client(
        RetryLayer::new().policy(RetryPolicy::new().base_delay(Duration::from_millis(1))),
    );
    let send = |method: Method, path: &str, key: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };

    let res = hcall(
        &mut http,
        send(Method::GET, "/v1/premium", "demo-basic", ""),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 402);
    let r = res.extensions().get::<Refusal>().unwrap().clone();
    assert_eq!(r.code, RefusalCode::PlanUpgradeRequired);
    assert!(r.fix_link().is_some_and(|l| l.starts_with("http")), "{r:?}");
    assert_eq!(up.seen().len(), 1);

    // A 503 with `Retry-After: 0` twice, then the top-up lands, once.
    up.fail_next(
        Denial::Unavailable {
            retry_after_secs: 0,
        },
        2,
    );
    let before = balance(&demo.ledger, "acct_free").await;
    let res = hcall(
        &mut http,
        send(Method::POST, "/v1/topup", "demo-free", r#"{"credits": 7}"#),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["applied"], true);
    let seen = &up.seen()[1..];
    assert_eq!(seen.len(), 3);
    assert!(seen[0].key.is_some() && seen.iter().all(|s| s.key == seen[0].key));
    assert_eq!(balance(&demo.ledger, "acct_free").await, before + 7);

    // Nothing listening: a GET is retried (safe), then the error is the caller's.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let req = Request::get(format!("http://127.0.0.1:{port}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(hcall(&mut http, req).await.is_err());
}

#[tokio::test]
async fn llm_proxy_over_sockets_a_409_is_tried_once() {
    let demo = llm_proxy::demo(ManualClock::new(Timestamp::from_unix(1_790_000_000))).await;
    let up = Upstream::new(demo.router);
    let base = up.serve().await;
    let mut http = client::http_client(RetryLayer::new());
    for (content, status) in [("one", 200), ("two", 409)] {
        let body = serde_json::json!({
            "model": "small-model",
            "messages": [{"role": "user", "content": content}],
        });
        let r = Request::post(format!("{base}/v1/chat/completions"))
            .header("authorization", "Bearer demo-pro")
            .header("content-type", "application/json")
            .header("idempotency-key", "k-409")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let res = hcall(&mut http, r).await.unwrap();
        assert_eq!(res.status(), status);
    }
    assert_eq!(up.seen().len(), 2);
}

mod over_grpc {
    use super::*;
    use http::uri::PathAndQuery;
    use tonic::transport::Endpoint;
    use tonic_prost::ProstCodec;

    /// The gRPC example's stack, with a record of the attempts and queued outages in front.
    #[derive(Clone)]
    struct Counted<S> {
        inner: S,
        seen: Arc<Mutex<Vec<Option<String>>>>,
        outages: Arc<Mutex<VecDeque<Denial>>>,
    }

    impl<S, B> Service<Request<B>> for Counted<S>
    where
        S: Service<Request<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Response: IntoResponse,
        B: Send + 'static,
    {
        type Response = axum::response::Response;
        type Error = S::Error;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            self.seen.lock().unwrap().push(
                req.headers()
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            let outage = self.outages.lock().unwrap().pop_front();
            let fut = self.inner.call(req);
            Box::pin(async move {
                match outage {
                    Some(denial) => Ok(denial
                        .to_tonic_status_at(
                            &tower_402::problem::ProblemConfig::new(),
                            Timestamp::from_unix(0),
                        )
                        .into_http::<Body>()
                        .into_response()),
                    None => fut.await.map(IntoResponse::into_response),
                }
            })
        }
    }

    async fn start() -> (
        String,
        Arc<Mutex<Vec<Option<String>>>>,
        Arc<Mutex<VecDeque<Denial>>>,
    ) {
        let demo = grpc::demo(clock()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::<Mutex<Vec<_>>>::default();
        let outages = Arc::<Mutex<VecDeque<_>>>::default();
        let stack = tower::ServiceBuilder::new()
            .layer(demo.billing.layer())
            .service(grpc::Weather);
        let counted = Counted {
            inner: stack,
            seen: seen.clone(),
            outages: outages.clone(),
        };
        let app = Router::new().fallback_service(counted);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), seen, outages)
    }

    async fn forecast(
        base: &str,
        key: &str,
    ) -> Result<tonic::Response<grpc::pb::Forecast>, tonic::Status> {
        let channel = Endpoint::from_shared(base.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let svc = RetryLayer::new()
            .policy(RetryPolicy::new().base_delay(Duration::from_millis(1)))
            .for_tonic()
            .layer(channel);
        let mut client = tonic::client::Grpc::new(svc);
        client.ready().await.unwrap();
        let mut req = tonic::Request::new(grpc::pb::ForecastRequest {
            city: "Lyon".into(),
            hours: 0,
        });
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
        client
            .unary(
                req,
                PathAndQuery::from_static(grpc::FORECAST),
                ProstCodec::default(),
            )
            .await
    }

    #[tokio::test]
    async fn resource_exhausted_is_not_retried_and_decodes() {
        let (base, seen, _) = start().await;
        let status = forecast(&base, "demo-broke").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let r = Refusal::from_tonic(&status).unwrap();
        assert_eq!(r.code, RefusalCode::InsufficientCredits);
        assert_eq!(r.retry, RetryClass::AfterPayment);
        assert_eq!(r.balance, Some(Credits::new(0)));
        assert!(r.links.top_up.is_some(), "{r:?}");
        assert_eq!(r.quota_subjects, ["credits"]);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unavailable_is_retried_with_one_key() {
        let (base, seen, outages) = start().await;
        outages.lock().unwrap().extend([
            Denial::Unavailable {
                retry_after_secs: 0,
            },
            Denial::Unavailable {
                retry_after_secs: 0,
            },
        ]);
        let res = forecast(&base, "demo-pro").await.unwrap();
        assert_eq!(res.get_ref().summary, "sunny, 21°C");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        assert!(
            seen[0].is_some() && seen.iter().all(|k| *k == seen[0]),
            "{seen:?}"
        );
    }
}

/// An upstream that answers 504 once (a gateway timing out after the work was done), then 200,
/// and records the `Idempotency-Key` of every attempt.
#[derive(Clone, Default)]
struct GatewayTimeoutOnce {
    keys: Arc<Mutex<Vec<Option<String>>>>,
}

impl Service<Request<Body>> for GatewayTimeoutOnce {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let key = req
            .headers()
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned());
        let mut keys = self.keys.lock().unwrap();
        keys.push(key);
        let status = if keys.len() == 1 {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::OK
        };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(Body::empty())
            .unwrap()))
    }
}

/// Found in review: a request that may have been served (a gateway's 504) is sent again only
/// with a key the server deduplicates by; without one it goes back to the caller.
#[tokio::test(start_paused = true)]
async fn an_unkeyed_request_is_not_sent_again_after_a_gateway_timeout() {
    let upstream = GatewayTimeoutOnce::default();
    let svc = RetryLayer::new()
        .idempotency_keys(false)
        .for_body::<Body>()
        .layer(upstream.clone());
    let res = svc
        .oneshot(
            Request::post("http://api/v1/render")
                .body(Body::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(*upstream.keys.lock().unwrap(), vec![None], "sent once");
}

/// A paid GET is charged per call too: it gets a key, the same on the retry.
#[tokio::test(start_paused = true)]
async fn a_get_is_keyed_and_its_retry_carries_the_same_key() {
    let upstream = GatewayTimeoutOnce::default();
    let svc = RetryLayer::new().for_body::<Body>().layer(upstream.clone());
    let res = svc
        .oneshot(
            Request::get("http://api/v1/items/1")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let keys = upstream.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 2, "retried once");
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
}
