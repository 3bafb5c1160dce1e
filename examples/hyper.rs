//! The quickstart's paid weather API on bare hyper 1 + hyper-util: a `service_fn` wrapped in the
//! three layers with `tower::ServiceBuilder`, no axum anywhere in its code (run it without the
//! crate's default `axum` feature to see).
//!
//! Run it:
//!
//! ```sh
//! cargo run --example hyper --no-default-features      # listens on 127.0.0.1:3002 (PORT to change)
//! ```
//!
//! Then try:
//!
//! ```sh
//! curl -i localhost:3002/health                                        # 200, no key needed
//! curl -i localhost:3002/v1/forecast -H 'x-api-key: demo-pro'          # 200, x-credits-remaining
//! curl -i localhost:3002/v1/premium  -H 'x-api-key: demo-basic'        # 402 PLAN_UPGRADE_REQUIRED
//! curl -i localhost:3002/v1/forecast -H 'Authorization: Bearer demo-broke'   # 402 INSUFFICIENT_CREDITS
//! curl -i localhost:3002/v1/forecast                                   # 401 UNAUTHENTICATED
//! ```
//!
//! `tests/hyper.rs` drives the same paths with a hyper client over a real socket.

#[path = "common/plain.rs"]
mod plain;

use std::convert::Infallible;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tower::{service_fn, Service, ServiceBuilder};
use tower_402::decision::Requirement;
use tower_402::metering::RequestBody;
use tower_402::{Clock, Entitlement, SystemClock};

/// The handler: a plain async function of the request, as hyper's `service_fn` takes it. The
/// metering layer hands it the body as a [`RequestBody`].
pub async fn weather<B>(req: Request<RequestBody<B>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let account = req
        .extensions()
        .get::<Entitlement>()
        .map(|e| e.account.as_str().to_owned());
    let json = |status: StatusCode, body: serde_json::Value| {
        let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
        *res.status_mut() = status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        res
    };
    let res = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => Response::new(Full::new(Bytes::from_static(b"ok"))),
        (&Method::GET, "/v1/forecast") => json(
            StatusCode::OK,
            json!({ "account": account, "forecast": "sunny, 21°C" }),
        ),
        (&Method::GET, "/v1/premium") => json(
            StatusCode::OK,
            json!({
                "account": account,
                "forecast": "sunny, 21°C; UV 6 from 11:00; pollen low; wind 12 km/h NW",
            }),
        ),
        _ => {
            // A bare 404: the problem layer turns it into a problem document.
            let mut res = Response::new(Full::new(Bytes::new()));
            *res.status_mut() = StatusCode::NOT_FOUND;
            res
        }
    };
    Ok(res)
}

/// The billing core and the stores behind it.
pub type Demo = plain::Demo;

/// Builds the demo with every demo account in its documented state at `clock`'s time: the
/// quickstart's rules for `/health`, `/v1/forecast` and `/v1/premium`.
pub async fn demo<C: Clock + Clone>(clock: C) -> Demo {
    plain::billing(clock, |billing| {
        billing
            .route("GET /health", Requirement::public())
            .route("GET /v1/premium", plain::premium())
            .route("GET /v1/forecast", plain::forecast())
    })
    .await
}

/// The handler wrapped in the three layers: a tower service of hyper requests.
pub fn service(
    demo: Demo,
) -> impl Service<
    Request<hyper::body::Incoming>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(demo.billing.layer())
        .service(service_fn(weather))
}

/// Serves the demo on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, demo: Demo) {
    plain::serve(listener, service(demo)).await
}

#[allow(dead_code)] // the tests include this file for `demo` and `serve`, not `main`
#[tokio::main]
async fn main() {
    plain::init_tracing();
    let listener = plain::listen(plain::port(3002)).await;
    let addr = listener.local_addr().expect("bound socket");
    println!("tower-402 on bare hyper listening on http://{addr}");
    println!("demo keys (send as x-api-key or Authorization: Bearer):");
    for (key, _, what) in plain::DEMO_KEYS {
        println!("  {key:<16} {what}");
    }
    tokio::select! {
        () = serve(listener, demo(SystemClock).await) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
