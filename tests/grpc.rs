//! gRPC (issue 5): the example's tonic service behind the three layers, called by a real tonic
//! client over a real TCP socket. Every denial arrives as the right `tonic::Code` with
//! `ErrorInfo` details; a stream is charged once, at its end; handler errors before any
//! message are not charged; a stream that fails after its messages is.

#[allow(dead_code)]
#[path = "../examples/grpc.rs"]
mod grpc;

use std::net::SocketAddr;

use futures_util::StreamExt;
use grpc::pb::{Forecast, ForecastRequest};
use http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tonic_types::StatusExt;
use tower_402::ledger::Balance;
use tower_402::{AccountId, Ledger, ManualClock, Timestamp};

/// 2026-11-24T12:00:00Z: a week before the month ends (the quickstart tests' time).
fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap())
}

struct Server {
    addr: SocketAddr,
    demo: grpc::Demo,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_with(demo: grpc::Demo) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(grpc::serve(listener, demo.clone()));
    Server { addr, demo, task }
}

async fn start() -> Server {
    start_with(grpc::demo(clock()).await).await
}

impl Server {
    async fn client(&self) -> tonic::client::Grpc<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        tonic::client::Grpc::new(channel)
    }

    async fn balance(&self, account: &str) -> Balance {
        self.demo
            .ledger
            .balance(&AccountId::new(account), Timestamp::from_unix(0))
            .await
            .unwrap()
    }
}

fn request(
    city: &str,
    hours: u32,
    metadata: &[(&'static str, &str)],
) -> tonic::Request<ForecastRequest> {
    let mut req = tonic::Request::new(ForecastRequest {
        city: city.into(),
        hours,
    });
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    req
}

async fn forecast(
    server: &Server,
    key: Option<&str>,
    city: &str,
) -> Result<tonic::Response<Forecast>, Status> {
    let meta: Vec<(&'static str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
    call_forecast(server, request(city, 0, &meta)).await
}

async fn call_forecast(
    server: &Server,
    req: tonic::Request<ForecastRequest>,
) -> Result<tonic::Response<Forecast>, Status> {
    let mut client = server.client().await;
    client.ready().await.unwrap();
    client
        .unary(
            req,
            PathAndQuery::from_static(grpc::FORECAST),
            ProstCodec::default(),
        )
        .await
}

async fn hourly(
    server: &Server,
    req: tonic::Request<ForecastRequest>,
) -> Result<tonic::Streaming<Forecast>, Status> {
    let mut client = server.client().await;
    client.ready().await.unwrap();
    client
        .server_streaming(
            req,
            PathAndQuery::from_static(grpc::HOURLY),
            ProstCodec::default(),
        )
        .await
        .map(tonic::Response::into_inner)
}

/// Asserts the code and the `ErrorInfo` (reason, the demo's domain); returns the metadata.
fn error_info(
    status: &Status,
    code: Code,
    reason: &str,
) -> std::collections::HashMap<String, String> {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason);
    assert_eq!(info.domain, "weather.example.com");
    assert!(!status.message().is_empty());
    info.metadata
}

#[tokio::test]
async fn a_paid_unary_call_is_served_and_charged() {
    let server = start().await;
    let res = forecast(&server, Some("demo-pro"), "Lyon").await.unwrap();
    assert_eq!(res.get_ref().account, "acct_pro");
    assert_eq!(res.get_ref().summary, "sunny, 21°C");
    assert_eq!(res.metadata().get("x-credits-remaining").unwrap(), "999");
    let b = server.balance("acct_pro").await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (999, 0, 1)
    );
}

#[tokio::test]
async fn bearer_metadata_identifies_like_x_api_key() {
    let server = start().await;
    let req = request("Lyon", 0, &[("authorization", "Bearer demo-basic")]);
    let res = call_forecast(&server, req).await.unwrap();
    assert_eq!(res.get_ref().account, "acct_basic");
}

#[tokio::test]
async fn a_server_stream_is_charged_once_when_it_ends() {
    let server = start().await;
    let mut stream = hourly(&server, request("Lyon", 5, &[("x-api-key", "demo-pro")]))
        .await
        .unwrap();
    let first = stream.message().await.unwrap().expect("a first forecast");
    assert_eq!((first.hour, first.account.as_str()), (1, "acct_pro"));
    // Mid-stream the cost is held (or, if the server already sent the whole stream, settled):
    // never both, never twice.
    let b = server.balance("acct_pro").await;
    assert_eq!(b.available.get(), 990);
    assert_eq!(b.held.get() + b.settled.get(), 10);
    let mut hours = vec![first.hour];
    while let Some(f) = stream.message().await.unwrap() {
        hours.push(f.hour);
    }
    assert_eq!(hours, [1, 2, 3, 4, 5]);
    // The trailers arrive after the settlement: charged once, exactly the route's cost.
    let b = server.balance("acct_pro").await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (990, 0, 10)
    );
}

#[tokio::test]
async fn a_handler_error_is_not_charged() {
    let server = start().await;
    let status = forecast(&server, Some("demo-pro"), "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "city is required");
    let b = server.balance("acct_pro").await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (1000, 0, 0)
    );

    let status = hourly(&server, request("", 2, &[("x-api-key", "demo-pro")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let b = server.balance("acct_pro").await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (1000, 0, 0)
    );
}

/// `Hourly` for 13 hours: the forecasts received before the stream's error, and the error.
async fn thirteen_hours(server: &Server) -> (Vec<Forecast>, Status) {
    let mut stream = hourly(server, request("Lyon", 13, &[("x-api-key", "demo-pro")]))
        .await
        .unwrap();
    let mut got = Vec::new();
    let status = loop {
        match stream.next().await {
            Some(Ok(f)) => got.push(f),
            Some(Err(status)) => break status,
            None => panic!("the stream ended without its error"),
        }
    };
    (got, status)
}

/// Issue 12: 12 premium forecasts, then `OUT_OF_RANGE`, used to cost nothing. A stream is
/// billed for what it delivered, like a client hanging up mid-stream: the route's 10 credits.
#[tokio::test]
async fn a_stream_that_fails_after_delivering_messages_is_charged() {
    let server = start().await;
    let (got, status) = thirteen_hours(&server).await;
    assert_eq!(got.len(), 12);
    assert_eq!(got.len() as u32, grpc::MAX_HOURS);
    assert!(got
        .iter()
        .all(|f| f.account == "acct_pro" && f.city == "Lyon"));
    assert_eq!(got.last().unwrap().hour, 12);
    assert_eq!(status.code(), Code::OutOfRange);
    // Settled before the trailers went out.
    let b = server.balance("acct_pro").await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (990, 0, 10)
    );
}

#[tokio::test]
async fn releasing_a_stream_that_fails_is_a_choice() {
    let mut demo = grpc::demo(clock()).await;
    demo.billing = demo
        .billing
        .on_stream_error(tower_402::metering::StreamErrorPolicy::Release);
    let server = start_with(demo).await;
    let (got, status) = thirteen_hours(&server).await;
    assert_eq!((got.len(), status.code()), (12, Code::OutOfRange));
    let b = server.balance("acct_pro").await;
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (1000, 0, 0)
    );
}

#[tokio::test]
async fn billing_grpc_errors_is_a_choice() {
    let mut demo = grpc::demo(clock()).await;
    demo.billing = demo.billing.bill_grpc_errors(true);
    let server = start_with(demo).await;
    let status = forecast(&server, Some("demo-pro"), "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let b = server.balance("acct_pro").await;
    assert_eq!((b.available.get(), b.settled.get()), (999, 1));
    // A stream that fails after its messages is settled as a success.
    let (got, status) = thirteen_hours(&server).await;
    assert_eq!((got.len(), status.code()), (12, Code::OutOfRange));
    let b = server.balance("acct_pro").await;
    assert_eq!((b.available.get(), b.settled.get()), (989, 11));
}

#[tokio::test]
async fn no_key_and_an_unknown_key_are_unauthenticated() {
    let server = start().await;
    let status = forecast(&server, None, "Lyon").await.unwrap_err();
    error_info(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert!(status.message().contains("x-api-key"));
    let www = status.metadata().get("www-authenticate").unwrap();
    assert!(www.to_str().unwrap().starts_with("Bearer realm="));

    let status = forecast(&server, Some("sk_nobody"), "Lyon")
        .await
        .unwrap_err();
    error_info(&status, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(status.message(), "The API key is not valid.");
}

#[tokio::test]
async fn no_credit_is_resource_exhausted_with_a_quota_failure() {
    let server = start().await;
    let status = forecast(&server, Some("demo-broke"), "Lyon")
        .await
        .unwrap_err();
    let meta = error_info(&status, Code::ResourceExhausted, "INSUFFICIENT_CREDITS");
    assert_eq!(meta["balance"], "0");
    assert_eq!(meta["required"], "1");
    assert_eq!(meta["top_up_url"], "https://billing.example.com/top-up");
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "credits");
    let help = status.get_details_help().expect("Help");
    assert!(help
        .links
        .iter()
        .any(|l| l.description == "top_up" && l.url == "https://billing.example.com/top-up"));
}

#[tokio::test]
async fn a_used_up_allowance_is_resource_exhausted_with_a_retry_delay() {
    let server = start().await;
    for _ in 0..5 {
        forecast(&server, Some("demo-free"), "Lyon").await.unwrap();
    }
    let status = forecast(&server, Some("demo-free"), "Lyon")
        .await
        .unwrap_err();
    let meta = error_info(&status, Code::ResourceExhausted, "QUOTA_EXCEEDED");
    assert_eq!(meta["meter"], "requests");
    assert_eq!(meta["limit"], "5");
    assert_eq!(meta["used"], "5");
    assert_eq!(meta["resets_at"], "2026-12-01T00:00:00Z");
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "allowance:requests");
    // A week and twelve hours until the month ends.
    let secs = 6 * 86_400 + 12 * 3600;
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(
        retry.retry_delay,
        Some(std::time::Duration::from_secs(secs))
    );
    assert_eq!(
        status.metadata().get("retry-after").unwrap(),
        secs.to_string().as_str()
    );
}

#[tokio::test]
async fn plan_and_subscription_conditions_are_failed_precondition() {
    let server = start().await;
    let status = hourly(&server, request("Lyon", 2, &[("x-api-key", "demo-basic")]))
        .await
        .unwrap_err();
    let meta = error_info(&status, Code::FailedPrecondition, "PLAN_UPGRADE_REQUIRED");
    assert_eq!(meta["current_plan"], "basic");
    assert_eq!(meta["required_plan"], "pro");
    assert_eq!(meta["upgrade_url"], "https://example.com/pricing");
    let failure = status
        .get_details_precondition_failure()
        .expect("PreconditionFailure");
    assert_eq!(failure.violations[0].r#type, "PLAN_UPGRADE_REQUIRED");
    assert_eq!(failure.violations[0].subject, "plan:pro");

    for (key, reason) in [
        ("demo-expired", "SUBSCRIPTION_EXPIRED"),
        ("demo-past-due", "SUBSCRIPTION_PAST_DUE"),
        ("demo-trial-over", "TRIAL_EXPIRED"),
    ] {
        let status = forecast(&server, Some(key), "Lyon").await.unwrap_err();
        let meta = error_info(&status, Code::FailedPrecondition, reason);
        let failure = status
            .get_details_precondition_failure()
            .expect("PreconditionFailure");
        assert_eq!(failure.violations[0].r#type, reason);
        assert_eq!(failure.violations[0].subject, "subscription");
        assert!(
            meta.contains_key("billing_url") || meta.contains_key("upgrade_url"),
            "{meta:?}"
        );
    }
    // Inside its grace period a past-due account is served.
    forecast(&server, Some("demo-grace"), "Lyon").await.unwrap();
}

#[tokio::test]
async fn idempotency_keys_in_metadata() {
    let server = start().await;
    let keyed = |key: &str| {
        request(
            "Lyon",
            0,
            &[("x-api-key", "demo-pro"), ("idempotency-key", key)],
        )
    };
    let first = call_forecast(&server, keyed("order-1")).await.unwrap();
    let again = call_forecast(&server, keyed("order-1")).await.unwrap();
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    // The recorded message and its trailers (tonic reads `grpc-status` from them).
    assert_eq!(again.get_ref(), first.get_ref());
    assert_eq!(server.balance("acct_pro").await.settled.get(), 1);

    // The same key and method with another message: its digest differs.
    let mut paris = keyed("order-1");
    paris.get_mut().city = "Paris".into();
    let status = call_forecast(&server, paris).await.unwrap_err();
    error_info(&status, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");

    // The same key for another call: the key is taken, retrying with it cannot succeed.
    let mut other = keyed("order-1");
    *other.get_mut() = ForecastRequest {
        city: "Lyon".into(),
        hours: 2,
    };
    let status = hourly(&server, other).await.unwrap_err();
    error_info(&status, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");

    let long = "k".repeat(300);
    let status = call_forecast(&server, keyed(&long)).await.unwrap_err();
    error_info(&status, Code::InvalidArgument, "INVALID_IDEMPOTENCY_KEY");
    assert_eq!(server.balance("acct_pro").await.settled.get(), 1);
}

#[tokio::test]
async fn the_outer_layer_adds_the_request_id() {
    let server = start().await;
    let req = request(
        "Lyon",
        0,
        &[("x-api-key", "demo-broke"), ("x-request-id", "req-42")],
    );
    let status = call_forecast(&server, req).await.unwrap_err();
    let meta = error_info(&status, Code::ResourceExhausted, "INSUFFICIENT_CREDITS");
    assert_eq!(meta["request_id"], "req-42");
}

#[tokio::test]
async fn an_unreachable_plan_store_is_unavailable() {
    use async_trait::async_trait;
    use tower_402::plan::{PlanStore, Subscription};
    use tower_402::{Billing, StaticKeys, StoreError};

    struct Down;
    #[async_trait]
    impl PlanStore for Down {
        async fn subscription(&self, _: &AccountId) -> Result<Option<Subscription>, StoreError> {
            Err(StoreError::unavailable("connection refused"))
        }
        async fn put_subscription(&self, _: Subscription) -> Result<(), StoreError> {
            Err(StoreError::unavailable("connection refused"))
        }
    }
    let mut demo = grpc::demo(clock()).await;
    demo.billing = Billing::new(
        StaticKeys::new().with_key("demo-pro", "acct_pro"),
        Down,
        demo.ledger.clone(),
        tower_402::plan::Catalog::new(),
    )
    .problem_config(tower_402::problem::ProblemConfig::new().grpc_domain("weather.example.com"));
    let server = start_with(demo).await;
    let status = forecast(&server, Some("demo-pro"), "Lyon")
        .await
        .unwrap_err();
    error_info(&status, Code::Unavailable, "SERVICE_UNAVAILABLE");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(5)));
    // Nothing of the backend's error text reaches the client.
    assert!(!format!("{status:?}").contains("connection refused"));
}

#[tokio::test]
async fn on_the_wire_a_denial_is_trailers_only() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let server = start().await;
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{}", server.addr, grpc::FORECAST))
        .header("content-type", "application/grpc+proto")
        .header("te", "trailers")
        .header("x-api-key", "demo-broke")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["grpc-status"], "8");
    assert_eq!(
        h["grpc-message"],
        "This request costs 1 credit but the balance is 0."
    );
    let details = h["grpc-status-details-bin"].to_str().unwrap();
    assert!(!details.ends_with('='), "gRPC binary headers are unpadded");
    assert!(h.get("cache-control").is_none());
    let body = res.into_body().collect().await.unwrap();
    assert!(body.trailers().is_none());
    assert!(body.to_bytes().is_empty());
}

#[cfg(feature = "grpc")]
#[test]
fn a_handler_can_refuse_with_the_same_status() {
    use tower_402::{Credits, Denial};

    let denial = Denial::InsufficientCredits {
        balance: Credits::new(2),
        required: Credits::new(10),
    };
    let status = denial.to_tonic_status(&tower_402::problem::ProblemConfig::new());
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "This request costs 10 credits but the balance is 2."
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
    assert_eq!(info.domain, "tower-402");
    assert_eq!(info.metadata["balance"], "2");
    assert!(status.get_details_quota_failure().is_some());
}
