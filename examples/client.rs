//! A Rust client of the quickstart, with the client layer (feature `client`).
//!
//! ```sh
//! cargo run --example client --features client
//! ```
//!
//! It starts the quickstart in process on a loopback port, with a short billing outage in
//! front of it (the first two requests answered `503 SERVICE_UNAVAILABLE, Retry-After: 1`, as
//! the gate answers when the ledger is unreachable), and then:
//!
//! 1. calls `/v1/forecast` as `demo-pro`: the 503s are retried after `Retry-After`, the third
//!    attempt is served;
//! 2. calls `/v1/forecast` as `demo-broke`: a 402, sent once, never retried, turned into a
//!    message for a person with the top-up link;
//! 3. tops up (`POST /v1/topup`, an `Idempotency-Key` added by the layer) and calls again.
//!
//! Every attempt the server sees is printed, with its `Idempotency-Key`.

#[allow(dead_code)]
#[path = "quickstart.rs"]
mod quickstart;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_402::client::{self, BoxError, HttpClient, Refusal, RetryLayer};
use tower_402::decision::Denial;
use tower_402::SystemClock;

/// The quickstart, with `outage` requests answered 503 first; prints every attempt.
#[derive(Clone)]
struct Outage {
    router: Router,
    outage: Arc<AtomicUsize>,
}

impl Service<Request<Body>> for Outage {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let down = self
            .outage
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        println!(
            "  server: {} {} (Idempotency-Key: {key}){}",
            req.method(),
            req.uri().path(),
            if down { " -> 503, billing down" } else { "" }
        );
        let router = self.router.clone();
        Box::pin(async move {
            if down {
                Ok(Denial::Unavailable {
                    retry_after_secs: 1,
                }
                .into_response())
            } else {
                router.oneshot(req).await
            }
        })
    }
}

async fn send(
    http: &mut HttpClient,
    method: Method,
    url: String,
    key: &str,
    body: &'static str,
) -> Result<(), BoxError> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let res = ServiceExt::<Request<Full<Bytes>>>::ready(http)
        .await?
        .call(req)
        .await?;
    let status = res.status();
    match res.extensions().get::<Refusal>().cloned() {
        Some(refusal) => {
            println!("  client: refused ({status}, {}):", refusal.code);
            println!("    {refusal}");
        }
        None => {
            let body = res.into_body().collect().await?.to_bytes();
            println!("  client: {status} {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let demo = quickstart::demo(SystemClock).await;
    let app = Router::new().fallback_service(Outage {
        router: demo.router,
        outage: Arc::new(AtomicUsize::new(2)),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut http = client::http_client(RetryLayer::new());

    println!("1. demo-pro during a billing outage: retried after Retry-After");
    let url = format!("{base}/v1/forecast");
    send(&mut http, Method::GET, url.clone(), "demo-pro", "").await?;

    println!("2. demo-broke: a 402 is sent once and explained");
    send(&mut http, Method::GET, url.clone(), "demo-broke", "").await?;

    println!("3. demo-broke tops up (the layer adds the Idempotency-Key), then calls again");
    let topup = format!("{base}/v1/topup");
    send(
        &mut http,
        Method::POST,
        topup,
        "demo-broke",
        r#"{"credits": 5}"#,
    )
    .await?;
    send(&mut http, Method::GET, url, "demo-broke", "").await?;
    Ok(())
}
