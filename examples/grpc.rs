//! A paid gRPC weather service: tonic, no codegen, behind the three layers, served by hyper.
//!
//! Run it:
//!
//! ```sh
//! cargo run --example grpc                      # listens on 127.0.0.1:50051 (PORT to change)
//! ```
//!
//! Two methods of `weather.v1.Weather`:
//!
//! | method | kind | who | cost |
//! |---|---|---|---|
//! | `/weather.v1.Weather/Forecast` | unary | any plan | 1 credit (or free allowance) |
//! | `/weather.v1.Weather/Hourly` | server streaming | pro (tier 2) | 10 credits, charged once when the stream ends |
//!
//! Keys are the quickstart's (`demo-pro`, `demo-basic`, `demo-broke`, `demo-expired`, ...), sent
//! as `x-api-key` or `authorization: Bearer` metadata. The server has no reflection: give
//! grpcurl the schema as `weather.proto`:
//!
//! ```proto
//! syntax = "proto3";
//! package weather.v1;
//! service Weather {
//!   // Fully qualified: inside the service, a bare `Forecast` names the method.
//!   rpc Forecast(ForecastRequest) returns (.weather.v1.Forecast);
//!   rpc Hourly(ForecastRequest) returns (stream .weather.v1.Forecast);
//! }
//! message ForecastRequest { string city = 1; uint32 hours = 2; }
//! message Forecast { string city = 1; string summary = 2; uint32 hour = 3; string account = 4; }
//! ```
//!
//! ```sh
//! grpcurl -plaintext -proto weather.proto -H 'x-api-key: demo-pro' \
//!     -d '{"city": "Lyon"}' 127.0.0.1:50051 weather.v1.Weather/Forecast        # OK
//! grpcurl -plaintext -proto weather.proto -H 'x-api-key: demo-pro' \
//!     -d '{"city": "Lyon", "hours": 3}' 127.0.0.1:50051 weather.v1.Weather/Hourly  # 3 messages
//! grpcurl -plaintext -proto weather.proto -H 'x-api-key: demo-basic' \
//!     -d '{"city": "Lyon"}' 127.0.0.1:50051 weather.v1.Weather/Hourly
//!     # FailedPrecondition; details: ErrorInfo reason PLAN_UPGRADE_REQUIRED, PreconditionFailure
//! grpcurl -plaintext -proto weather.proto -H 'x-api-key: demo-broke' \
//!     -d '{"city": "Lyon"}' 127.0.0.1:50051 weather.v1.Weather/Forecast
//!     # ResourceExhausted; details: ErrorInfo reason INSUFFICIENT_CREDITS, QuotaFailure, Help
//! grpcurl -plaintext -proto weather.proto \
//!     -d '{"city": "Lyon"}' 127.0.0.1:50051 weather.v1.Weather/Forecast         # Unauthenticated
//! ```
//!
//! `tests/grpc.rs` calls it from a Rust client (tonic, no codegen) and reads the error details
//! with `tonic-types`; `tests/client.rs` through the client layer. `scripts/grpc-check.sh`
//! compiles this schema with `grpcio-tools` (protoc) and calls the example from Python
//! (`grpcio`, `grpcio-status`: tests/sdk/grpc_client.py), decoding `ErrorInfo` and
//! `RetryInfo`.
//!
//! An error of the handler before it served anything is not billed: an empty `city` is
//! `INVALID_ARGUMENT`, released. A stream is billed for what it delivered: an `Hourly` stream
//! of more than 12 hours sends 12 forecasts, then fails with `OUT_OF_RANGE`, and is charged
//! its 10 credits, as a client that hangs up mid-stream is (`Billing::on_stream_error` to
//! release it instead).

#[path = "common/plain.rs"]
mod plain;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Body;
use tonic::server::Grpc;
use tonic::Status;
use tonic_prost::ProstCodec;
use tower::{service_fn, Service, ServiceBuilder};
use tower_402::{Clock, Entitlement, SystemClock};

/// The messages of `weather.v1`, derived by hand (what `prost-build` would generate for
/// them).
pub mod pb {
    /// `message ForecastRequest { string city = 1; uint32 hours = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ForecastRequest {
        /// The city.
        #[prost(string, tag = "1")]
        pub city: String,
        /// How many hourly forecasts to stream (`Hourly` only; 0 means 3).
        #[prost(uint32, tag = "2")]
        pub hours: u32,
    }

    /// `message Forecast { string city = 1; string summary = 2; uint32 hour = 3; string account = 4; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Forecast {
        /// The city.
        #[prost(string, tag = "1")]
        pub city: String,
        /// The weather.
        #[prost(string, tag = "2")]
        pub summary: String,
        /// Hours ahead (0 for `Forecast`).
        #[prost(uint32, tag = "3")]
        pub hour: u32,
        /// The account that paid for it.
        #[prost(string, tag = "4")]
        pub account: String,
    }
}

/// The unary method.
pub const FORECAST: &str = "/weather.v1.Weather/Forecast";
/// The server-streaming method.
pub const HOURLY: &str = "/weather.v1.Weather/Hourly";
/// The most hours `Hourly` forecasts before failing.
pub const MAX_HOURS: u32 = 12;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ForecastStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::Forecast, Status>> + Send>>;

/// `weather.v1.Weather` as a tower service of HTTP requests: what tonic's codegen would write,
/// by hand.
#[derive(Debug, Clone, Default)]
pub struct Weather;

impl<B> Service<http::Request<B>> for Weather
where
    B: Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match req.uri().path() {
            FORECAST => Box::pin(async move {
                let mut grpc =
                    Grpc::new(ProstCodec::<pb::Forecast, pb::ForecastRequest>::default());
                Ok(grpc.unary(service_fn(forecast), req).await)
            }),
            HOURLY => Box::pin(async move {
                let mut grpc =
                    Grpc::new(ProstCodec::<pb::Forecast, pb::ForecastRequest>::default());
                Ok(grpc.server_streaming(service_fn(hourly), req).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The paying account, put in the request extensions by the gate.
fn account<T>(req: &tonic::Request<T>) -> String {
    req.extensions()
        .get::<Entitlement>()
        .map(|e| e.account.as_str().to_owned())
        .unwrap_or_default()
}

fn city(req: &pb::ForecastRequest) -> Result<String, Status> {
    if req.city.trim().is_empty() {
        return Err(Status::invalid_argument("city is required"));
    }
    Ok(req.city.clone())
}

async fn forecast(
    req: tonic::Request<pb::ForecastRequest>,
) -> Result<tonic::Response<pb::Forecast>, Status> {
    let account = account(&req);
    let city = city(req.get_ref())?;
    Ok(tonic::Response::new(pb::Forecast {
        city,
        summary: "sunny, 21°C".into(),
        hour: 0,
        account,
    }))
}

async fn hourly(
    req: tonic::Request<pb::ForecastRequest>,
) -> Result<tonic::Response<ForecastStream>, Status> {
    let account = account(&req);
    let city = city(req.get_ref())?;
    let hours = match req.get_ref().hours {
        0 => 3,
        n => n,
    };
    let forecasts = (1..=hours.min(MAX_HOURS)).map(move |hour| {
        Ok(pb::Forecast {
            city: city.clone(),
            summary: format!("{}°C, wind {} km/h", 18 + hour % 5, 8 + hour % 7),
            hour,
            account: account.clone(),
        })
    });
    let beyond = (hours > MAX_HOURS).then(|| {
        Err(Status::out_of_range(format!(
            "the model forecasts at most {MAX_HOURS} hours ahead"
        )))
    });
    let stream = futures_util::stream::iter(forecasts.chain(beyond));
    Ok(tonic::Response::new(Box::pin(stream) as ForecastStream))
}

/// The billing core, configured with the quickstart's accounts and plans.
pub type Demo = plain::Demo;

/// Builds the demo with every demo account in its documented state at `clock`'s time.
pub async fn demo<C: Clock + Clone>(clock: C) -> Demo {
    plain::billing(clock, |billing| {
        billing
            .route(&format!("POST {FORECAST}"), plain::forecast())
            .route(&format!("POST {HOURLY}"), plain::premium())
    })
    .await
}

/// Serves the demo on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, demo: Demo) {
    let service = ServiceBuilder::new()
        .layer(demo.billing.layer())
        .service(Weather);
    plain::serve(listener, service).await
}

#[allow(dead_code)] // the tests include this file for `demo` and `serve`, not `main`
#[tokio::main]
async fn main() {
    plain::init_tracing();
    let listener = plain::listen(plain::port(50051)).await;
    let addr = listener.local_addr().expect("bound socket");
    println!("tower-402 gRPC example listening on http://{addr}");
    println!("methods: {FORECAST} (unary), {HOURLY} (server streaming, pro plan)");
    println!("demo keys (send as x-api-key or authorization: Bearer metadata):");
    for (key, _, what) in plain::DEMO_KEYS {
        println!("  {key:<16} {what}");
    }
    tokio::select! {
        () = serve(listener, demo(SystemClock).await) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
