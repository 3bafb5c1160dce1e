//! Metering (behind the gate of the same `Billing`): reserve, run, settle on billable responses, release on failures, charge an
//! idempotent retry once, never leak a reservation.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use common::{request, send};
use http::Method;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_402::decision::{Cost, Requirement};
use tower_402::ledger::OverEstimate;
use tower_402::metering::{BodyBytes, DisconnectPolicy, StreamErrorPolicy};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

const START: Timestamp = Timestamp::from_unix(1_790_000_000);

struct Setup {
    ledger: MemoryLedger,
    clock: ManualClock,
    release_handler: Arc<Notify>,
    entered_handler: Arc<Notify>,
    /// How many times `/report/{n}` ran.
    reports: Arc<std::sync::atomic::AtomicUsize>,
}

impl Setup {
    async fn new(credits: u64) -> Self {
        let ledger = MemoryLedger::new();
        ledger
            .deposit(&"acme".into(), Credits::new(credits), "seed", START)
            .await
            .unwrap();
        Setup {
            ledger,
            clock: ManualClock::new(START),
            release_handler: Arc::new(Notify::new()),
            entered_handler: Arc::new(Notify::new()),
            reports: Arc::default(),
        }
    }

    fn app(&self, metering: impl FnOnce(Billing) -> Billing) -> Router {
        self.app_on(Plan::new("basic", "Basic", 1).overage(true), metering)
    }

    /// [`app`](Self::app) with `acme` on `plan` (its id must be `basic`).
    fn app_on(&self, plan: Plan, metering: impl FnOnce(Billing) -> Billing) -> Router {
        let catalog = Catalog::new().with_plan(plan);
        let reports = self.reports.clone();
        let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
        let keys = StaticKeys::new().with_key("sk_live_SECRET123", "acme");
        let entered = self.entered_handler.clone();
        let release = self.release_handler.clone();
        Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route(
                "/status/{code}",
                get(|Path(code): Path<u16>| async move {
                    (
                        StatusCode::from_u16(code).unwrap(),
                        "internal detail: db password wrong",
                    )
                }),
            )
            .route(
                "/report/{n}",
                get(move |Path(n): Path<u64>| async move {
                    reports.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (Extension(ReportedUsage::units("units", n)), "reported")
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    let chunks = (0..4)
                        .map(|i| Ok::<_, std::io::Error>(Bytes::from(format!("chunk {i}\n"))));
                    Body::from_stream(futures_util::stream::iter(chunks.collect::<Vec<_>>()))
                }),
            )
            .route(
                "/slow",
                get(move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "slow"
                }),
            )
            .layer(
                metering(
                    Billing::new(keys, plans, self.ledger.clone(), catalog)
                        .clock(self.clock.clone())
                        .default_requirement(Requirement::new().cost(Cost::new(
                            "units",
                            5,
                            Credits::new(2),
                        ))),
                )
                .layer(),
            )
    }

    async fn available(&self) -> u64 {
        self.ledger
            .balance(&"acme".into(), self.clock.now())
            .await
            .unwrap()
            .available
            .get()
    }

    /// Credit held by requests still running. A request without an `Idempotency-Key` on the
    /// in-memory ledger holds without a keyed record, so it shows here, not in `open`.
    async fn held(&self) -> u64 {
        self.ledger
            .balance(&"acme".into(), self.clock.now())
            .await
            .unwrap()
            .held
            .get()
    }

    /// Keyed reservations still open.
    fn open(&self) -> usize {
        self.ledger
            .open_reservations(&"acme".into(), self.clock.now())
    }

    /// Lets spawned settlement tasks run (current-thread runtime: they run when we yield).
    async fn drain(&self) {
        for _ in 0..100 {
            if self.open() == 0 && self.held().await == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("reservation or hold still open");
    }
}

const KEY: &str = "sk_live_SECRET123";

async fn call(app: &Router, uri: &str, headers: &[(&str, &str)]) -> common::Answer {
    let mut h = vec![("x-api-key", KEY)];
    h.extend_from_slice(headers);
    send(app, request(Method::GET, uri, &h, "")).await
}

#[tokio::test]
async fn a_billable_response_is_charged_the_estimate() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let a = call(&app, "/ok", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("90"));
    assert_eq!(s.available().await, 90);
    assert_eq!((s.open(), s.held().await), (0, 0));
}

#[tokio::test]
async fn server_errors_are_released_and_their_text_never_reaches_the_client() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    for code in [500, 502, 503] {
        let a = call(&app, &format!("/status/{code}"), &[]).await;
        assert_eq!(a.status.as_u16(), code);
        assert!(!String::from_utf8_lossy(&a.body).contains("password"));
        a.problem(code, a.json()["code"].as_str().unwrap());
    }
    assert_eq!(s.available().await, 100);
    assert_eq!((s.open(), s.held().await), (0, 0));
}

#[tokio::test]
async fn client_errors_are_released_unless_configured_billable() {
    let s = Setup::new(100).await;
    let a = call(&s.app(|m| m), "/status/422", &[]).await;
    assert_eq!(a.status, 422);
    assert_eq!(s.available().await, 100);
    let a = call(&s.app(|m| m.bill_client_errors(true)), "/status/422", &[]).await;
    assert_eq!(a.status, 422);
    assert_eq!(s.available().await, 90);
}

#[tokio::test]
async fn reported_usage_is_settled_instead_of_the_estimate() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    call(&app, "/report/2", &[]).await;
    assert_eq!(s.available().await, 96, "2 units × 2 credits");
    call(&app, "/report/8", &[]).await;
    assert_eq!(
        s.available().await,
        80,
        "8 units × 2 credits, 6 beyond the hold drawn"
    );
    let capped = s.app(|m| m.over_estimate(OverEstimate::CapAtHold));
    call(&capped, "/report/8", &[]).await;
    assert_eq!(s.available().await, 70, "capped at the 10 credits held");
    call(&app, "/report/0", &[]).await;
    assert_eq!(s.available().await, 70);
}

/// A plan's overdraft: a request that used more than its hold is charged into a negative
/// balance down to the plan's limit instead of leaving the rest unpaid; while the account owes,
/// the next request is refused before its handler runs; a deposit repays the debt first.
#[tokio::test]
async fn a_plans_overdraft_charges_past_zero_down_to_its_limit() {
    let runs = |s: &Setup| s.reports.load(std::sync::atomic::Ordering::SeqCst);
    // Without one: 10 held, 4 more available, 10 of the 24 used go unpaid.
    let s = Setup::new(14).await;
    let a = call(&s.app(|m| m), "/report/12", &[]).await;
    assert_eq!(a.status, 200);
    let b = s.ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!(
        (b.available.get(), b.settled.get(), b.overdrawn.get()),
        (0, 14, 0)
    );

    let s = Setup::new(14).await;
    let plan = Plan::new("basic", "Basic", 1)
        .overage(true)
        .overdraft(Credits::new(10));
    let app = s.app_on(plan, |m| m);
    let a = call(&app, "/report/12", &[]).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"reported"[..]));
    let b = s.ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!(
        (b.available.get(), b.settled.get(), b.overdrawn.get()),
        (0, 24, 10),
        "all 24 charged: 10 held, 4 available, 10 owed"
    );
    assert_eq!(runs(&s), 1);
    // In debt: refused, the handler not run.
    let a = call(&app, "/report/1", &[]).await;
    a.problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(runs(&s), 1);
    // A deposit pays the debt first; what is left is spendable.
    let d = s
        .ledger
        .deposit(&"acme".into(), Credits::new(25), "top-up", START)
        .await
        .unwrap();
    assert_eq!(
        (d.balance.available.get(), d.balance.overdrawn.get()),
        (15, 0)
    );
    let a = call(&app, "/report/1", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(runs(&s), 2);
    assert_eq!(s.available().await, 13);
}

#[tokio::test]
async fn insufficient_credit_is_refused_before_the_handler_runs() {
    let s = Setup::new(9).await;
    let a = call(&s.app(|m| m), "/ok", &[]).await;
    let doc = a.problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(doc["balance"], 9);
    assert_eq!(doc["required"], 10);
}

#[tokio::test]
async fn an_idempotent_retry_is_charged_once() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let first = call(&app, "/ok", &[("idempotency-key", "retry-1")]).await;
    assert_eq!(first.status, 200);
    let retry = call(&app, "/ok", &[("idempotency-key", "retry-1")]).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.available().await, 90);
    // The same key on another request is a conflict.
    let other = call(&app, "/report/1", &[("idempotency-key", "retry-1")]).await;
    other.problem(409, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(s.available().await, 90);
}

#[tokio::test]
async fn a_retry_after_a_refund_is_a_fresh_attempt() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let a = call(&app, "/status/500", &[("idempotency-key", "k")]).await;
    assert_eq!(a.status, 500);
    assert_eq!(s.available().await, 100);
    let a = call(&app, "/status/500", &[("idempotency-key", "k")]).await;
    assert_eq!(a.status, 500);
    assert_eq!(s.available().await, 100);
}

#[tokio::test]
async fn malformed_idempotency_keys_are_400() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let long = "x".repeat(256);
    for key in ["", long.as_str(), "\"\""] {
        call(&app, "/ok", &[("idempotency-key", key)])
            .await
            .problem(400, "INVALID_IDEMPOTENCY_KEY");
    }
    assert_eq!(s.available().await, 100);
}

#[tokio::test]
async fn a_concurrent_duplicate_is_409_in_use() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let first = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "/slow", &[("idempotency-key", "dup")]).await }
    });
    s.entered_handler.notified().await;
    let dup = call(&app, "/slow", &[("idempotency-key", "dup")]).await;
    dup.problem(409, "IDEMPOTENCY_KEY_IN_USE");
    s.release_handler.notify_one();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(s.available().await, 90);
}

#[tokio::test]
async fn a_body_dropped_mid_stream_is_settled_not_leaked() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let res = app
        .clone()
        .oneshot(request(Method::GET, "/stream", &[("x-api-key", KEY)], ""))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk 0\n");
    assert_eq!(s.held().await, 10, "held while streaming");
    drop(body);
    s.drain().await;
    assert_eq!(
        s.available().await,
        90,
        "settled with the usage known at the drop"
    );
}

#[tokio::test]
async fn a_streamed_body_read_to_the_end_is_settled_before_its_last_frame() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let a = call(&app, "/stream", &[]).await;
    assert_eq!(a.body, "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
    assert_eq!((s.open(), s.held().await), (0, 0));
    assert_eq!(s.available().await, 90);
}

#[tokio::test]
async fn a_cancelled_request_releases_its_hold() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m);
    let fut = app
        .clone()
        .oneshot(request(Method::GET, "/slow", &[("x-api-key", KEY)], ""));
    let task = tokio::spawn(fut);
    s.entered_handler.notified().await;
    assert_eq!(s.held().await, 10);
    task.abort();
    let _ = task.await;
    s.drain().await;
    assert_eq!(s.available().await, 100);
}

/// On the in-memory ledger only a keyed reservation (a request with an `Idempotency-Key`) has
/// a TTL; a request without one holds without a record, which its guard settles on every exit
/// path but which does not expire. A keyed hold whose stream stalls past its TTL is charged
/// its estimate when it expires (the handler ran): the credit is not freed for other spending,
/// and the settlement when the stream does end has the last word.
#[tokio::test]
async fn a_stalled_stream_is_charged_when_its_hold_expires() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m.reservation_ttl(std::time::Duration::from_secs(60)));
    let res = app
        .clone()
        .oneshot(request(
            Method::GET,
            "/stream",
            &[("x-api-key", KEY), ("idempotency-key", "expires")],
            "",
        ))
        .await
        .unwrap();
    // Keep the body alive but unread: the hold is open.
    assert_eq!(s.available().await, 90);
    assert_eq!(s.open(), 1);
    s.clock.advance(60);
    let b = s
        .ledger
        .balance(&"acme".into(), s.clock.now())
        .await
        .unwrap();
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (90, 0, 10),
        "charged at expiry, not given back"
    );
    // The client reads on: the stream is delivered and settled once, at its price.
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
    s.drain().await;
    let b = s
        .ledger
        .balance(&"acme".into(), s.clock.now())
        .await
        .unwrap();
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (90, 0, 10)
    );
}

/// Credit-only billing for `acme` (a plan with overage, no allowance) at `START`, each
/// request to any route costing 2 credits, with the account put in the request extensions by
/// an earlier authentication layer rather than found from an API key.
fn credit_only(ledger: &MemoryLedger, cost: Cost) -> Billing {
    let catalog = Catalog::new().with_plan(Plan::new("credit", "Credit", 0).overage(true));
    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "credit"));
    Billing::new(StaticKeys::new(), plans, ledger.clone(), catalog)
        .clock(ManualClock::new(START))
        .default_requirement(Requirement::new().cost(cost))
}

#[tokio::test]
async fn metering_with_an_account_from_an_earlier_layer() {
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(3), "seed", START)
        .await
        .unwrap();
    let billing = credit_only(&ledger, Cost::new("calls", 1, Credits::new(2)));
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(billing.layer())
        .layer(axum::middleware::from_fn(
            |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                req.extensions_mut().insert(AccountId::new("acme"));
                next.run(req).await
            },
        ));
    assert_eq!(
        send(&app, request(Method::GET, "/", &[], "")).await.status,
        200
    );
    let a = send(&app, request(Method::GET, "/", &[], "")).await;
    a.problem(402, "INSUFFICIENT_CREDITS");
    let b = ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!(b.available, Credits::new(1));
}

/// Metering without a gate no longer builds (see `tower_402::billing`); what is left to test
/// is that an `Entitlement` planted by an earlier layer, with no account or key, is no free
/// ride: the gate identifies the caller itself.
#[tokio::test]
async fn an_entitlement_without_an_account_is_not_a_free_ride() {
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(3), "seed", START)
        .await
        .unwrap();
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let billing = credit_only(&ledger, Cost::new("calls", 1, Credits::new(2)));
    let app = Router::new()
        .route(
            "/",
            get({
                let ran = ran.clone();
                move || async move {
                    ran.store(true, std::sync::atomic::Ordering::SeqCst);
                    "ok"
                }
            }),
        )
        .layer(billing.layer())
        .layer(axum::middleware::from_fn(
            |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                req.extensions_mut().insert(Entitlement::new("acme".into()));
                next.run(req).await
            },
        ));
    let a = send(&app, request(Method::GET, "/", &[], "")).await;
    a.problem(401, "UNAUTHENTICATED");
    assert!(
        !ran.load(std::sync::atomic::Ordering::SeqCst),
        "the handler ran"
    );
    let b = ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!(b.available, Credits::new(3));
}

#[tokio::test]
async fn absurd_reported_usage_is_charged_the_estimate() {
    let s = Setup::new(100).await;
    let app = s.app(|m| m.max_units(1_000));
    call(&app, "/report/5000", &[]).await;
    assert_eq!(
        s.available().await,
        90,
        "the estimate, not 5,000 × 2 credits"
    );
}

/// A gRPC call answered with a trailers-only error that carries no `content-type` (a
/// hand-built or middleware answer) is still a gRPC error: released, not billed.
#[tokio::test]
async fn a_grpc_error_without_a_content_type_is_not_billed() {
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(10), "seed", START)
        .await
        .unwrap();
    let billing = credit_only(&ledger, Cost::new("requests", 1, Credits::new(1)));
    let svc = ServiceBuilder::new()
        .layer(billing.layer())
        .service(tower::service_fn(|_req: http::Request<_>| async {
            let mut res = http::Response::new(http_body_util::Empty::<Bytes>::new());
            res.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("14"));
            Ok::<_, std::convert::Infallible>(res)
        }));
    let mut req = http::Request::post("/weather.Forecast/Get")
        .header("content-type", "application/grpc")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    // The account, as an earlier authentication layer would have put it.
    req.extensions_mut().insert(AccountId::new("acme"));
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    let b = ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!((b.available, b.settled), (Credits::new(10), Credits::ZERO));
}

/// A frame of a scripted response body.
#[derive(Debug, Clone, Copy)]
enum Out {
    Data(&'static str),
    /// Trailers with this `grpc-status`.
    GrpcStatus(&'static str),
    /// The body fails (an upstream reset).
    Fail,
}

/// What a client got from a scripted response, and what it cost.
#[derive(Debug, PartialEq)]
struct Ran {
    /// The data that reached the client.
    received: String,
    /// The body ended in an error.
    failed: bool,
    /// The `grpc-status` of the trailers, if any reached the client.
    grpc_status: Option<String>,
    /// Credits settled; nothing is left held.
    charged: u64,
}

/// One call, costing 4 credits (of 100), to a service that answers 200 with `frames` (a gRPC
/// response if `grpc`), read to its end.
async fn scripted(
    frames: &'static [Out],
    grpc: bool,
    cost: Cost,
    configure: impl FnOnce(Billing) -> Billing,
) -> Ran {
    use http_body::Frame;

    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(100), "seed", START)
        .await
        .unwrap();
    let billing = configure(credit_only(&ledger, cost));
    let svc = ServiceBuilder::new()
        .layer(billing.layer())
        .service(tower::service_fn(
            move |_req: http::Request<_>| async move {
                let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = frames
                    .iter()
                    .map(|f| match *f {
                        Out::Data(d) => Ok(Frame::data(Bytes::from_static(d.as_bytes()))),
                        Out::GrpcStatus(code) => {
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", http::HeaderValue::from_static(code));
                            Ok(Frame::trailers(t))
                        }
                        Out::Fail => Err(std::io::Error::other("upstream reset")),
                    })
                    .collect();
                let mut res = http::Response::new(http_body_util::StreamBody::new(
                    futures_util::stream::iter(frames),
                ));
                if grpc {
                    res.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/grpc"),
                    );
                }
                Ok::<_, std::convert::Infallible>(res)
            },
        ));
    let mut req = http::Request::post("/weather.Forecast/Hourly")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    if grpc {
        req.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
    }
    req.extensions_mut().insert(AccountId::new("acme"));
    let mut body = svc.oneshot(req).await.unwrap().into_body();
    let mut ran = Ran {
        received: String::new(),
        failed: false,
        grpc_status: None,
        charged: 0,
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => ran.received.push_str(std::str::from_utf8(&data).unwrap()),
                Err(frame) => {
                    let trailers = frame.into_trailers().unwrap();
                    ran.grpc_status = Some(trailers["grpc-status"].to_str().unwrap().into());
                }
            },
            Err(_) => {
                ran.failed = true;
                break;
            }
        }
    }
    drop(body);
    // The in-memory ledger settles in place: nothing to wait for.
    let b = ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!(b.held, Credits::ZERO, "nothing left held");
    assert_eq!(b.available.get() + b.settled.get(), 100);
    ran.charged = b.settled.get();
    ran
}

fn four_credits() -> Cost {
    Cost::new("calls", 1, Credits::new(4))
}

/// Issue 12: a body that fails after delivering data is billed for what it delivered, by the
/// disconnect policy, not released.
#[tokio::test]
async fn a_body_that_fails_after_delivering_data_is_charged_as_a_disconnect() {
    const FRAMES: &[Out] = &[Out::Data("part 1 "), Out::Data("part 2"), Out::Fail];
    let ran = scripted(FRAMES, false, four_credits(), |b| b).await;
    assert_eq!((ran.received.as_str(), ran.failed), ("part 1 part 2", true));
    assert_eq!(ran.charged, 4, "the estimate, as for a dropped body");

    // With usage seen so far as the policy: the 13 bytes that went out, not the estimate.
    let ran = scripted(
        FRAMES,
        false,
        Cost::new("bytes", 64, Credits::new(1)),
        |b| {
            b.usage(BodyBytes::new("bytes"))
                .on_disconnect(DisconnectPolicy::ChargeUsageSoFar)
        },
    )
    .await;
    assert_eq!((ran.received.len(), ran.failed), (13, true));
    assert_eq!(ran.charged, 13);

    // Releasing is a choice.
    let ran = scripted(FRAMES, false, four_credits(), |b| {
        b.on_stream_error(StreamErrorPolicy::Release)
    })
    .await;
    assert_eq!((ran.received.as_str(), ran.failed), ("part 1 part 2", true));
    assert_eq!(ran.charged, 0);
}

#[tokio::test]
async fn a_body_that_fails_on_its_first_frame_is_released() {
    let ran = scripted(&[Out::Fail], false, four_credits(), |b| b).await;
    assert_eq!((ran.received.as_str(), ran.failed), ("", true));
    assert_eq!(ran.charged, 0, "nothing was delivered");
}

/// Issue 12: a gRPC stream whose trailers carry an error after its messages is billed for
/// what it delivered; one that fails before any message is released.
#[tokio::test]
async fn a_grpc_stream_that_fails_after_its_messages_is_charged_what_it_delivered() {
    const FRAMES: &[Out] = &[
        Out::Data("msg 1"),
        Out::Data("msg 2"),
        Out::GrpcStatus("11"),
    ];
    let ran = scripted(FRAMES, true, four_credits(), |b| b).await;
    assert_eq!(ran.received, "msg 1msg 2");
    assert_eq!(ran.grpc_status.as_deref(), Some("11"));
    assert_eq!(ran.charged, 4);

    let ran = scripted(FRAMES, true, four_credits(), |b| {
        b.on_stream_error(StreamErrorPolicy::Release)
    })
    .await;
    assert_eq!((ran.received.as_str(), ran.charged), ("msg 1msg 2", 0));

    let ran = scripted(FRAMES, true, four_credits(), |b| b.bill_grpc_errors(true)).await;
    assert_eq!((ran.received.as_str(), ran.charged), ("msg 1msg 2", 4));
}

#[tokio::test]
async fn a_grpc_stream_that_fails_before_any_message_is_released() {
    let ran = scripted(&[Out::GrpcStatus("11")], true, four_credits(), |b| b).await;
    assert_eq!(
        (ran.received.as_str(), ran.grpc_status.as_deref()),
        ("", Some("11"))
    );
    assert_eq!(ran.charged, 0);
    // Released under either stream-error policy: nothing was delivered.
    let ran = scripted(&[Out::GrpcStatus("11")], true, four_credits(), |b| {
        b.on_stream_error(StreamErrorPolicy::ChargeDelivered)
    })
    .await;
    assert_eq!(ran.charged, 0);
    // An empty stream that ends `OK` is a success: charged.
    let ran = scripted(&[Out::GrpcStatus("0")], true, four_credits(), |b| b).await;
    assert_eq!((ran.grpc_status.as_deref(), ran.charged), (Some("0"), 4));
}

/// `acme` (key [`KEY`]) on a `basic` plan with overage, billed on `ledger`.
fn acme_basic(ledger: impl Ledger + 'static, clock: &ManualClock) -> Billing {
    Billing::new(
        StaticKeys::new().with_key(KEY, "acme"),
        MemoryPlanStore::new().with(Subscription::active("acme", "basic")),
        ledger,
        Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true)),
    )
    .clock(clock.clone())
}

/// A shared in-memory ledger with 1,000 credits for `acme`, and a `LeasedLedger` over it on
/// a manual clock, maintained only when the test ticks it.
async fn seeded_lease(
    config: tower_402::store::LeaseConfig,
) -> (
    MemoryLedger,
    ManualClock,
    tower_402::store::LeasedLedger<MemoryLedger, ManualClock>,
) {
    let shared = MemoryLedger::new();
    shared
        .deposit(&"acme".into(), Credits::new(1_000), "seed", START)
        .await
        .unwrap();
    let clock = ManualClock::new(START);
    let leased = tower_402::store::LeasedLedger::with_clock(
        shared.clone(),
        config.background(false),
        clock.clone(),
    );
    (shared, clock, leased)
}

/// On a leased ledger ([`LeasedLedger`](tower_402::store::LeasedLedger)) a request without an
/// `Idempotency-Key` is held against the lease in this process and settled there; a failed
/// response gives its hold back; usage beyond the hold and the lease is charged in the shared
/// ledger. Every handler that ran is charged exactly once, once the leases are settled.
#[tokio::test]
async fn leased_requests_are_held_and_settled_in_process_and_charged_exactly() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tower_402::store::LeaseConfig;
    let (shared, clock, leased) = seeded_lease(
        LeaseConfig::new()
            .min_lease(Credits::new(10))
            .max_lease(Credits::new(10)),
    )
    .await;
    let acme: AccountId = "acme".into();
    // Counts keyed reservations; forwards the lease's local holds.
    let counted = common::CountingLedger::new(leased.clone());
    // What ran, in credits at 1 per unit: `/ok` 1, `/report/{n}` n, `/fail` 0 (released).
    let ran = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok_ran, report_ran, fail_ran) = (ran.clone(), ran.clone(), failed.clone());
    let app = Router::new()
        .route(
            "/ok",
            get(move || async move {
                ok_ran.fetch_add(1, SeqCst);
                "ok"
            }),
        )
        .route(
            "/report/{n}",
            get(move |Path(n): Path<u64>| async move {
                report_ran.fetch_add(n, SeqCst);
                (Extension(ReportedUsage::units("units", n)), "reported")
            }),
        )
        .route(
            "/fail",
            get(move || async move {
                fail_ran.fetch_add(1, SeqCst);
                (StatusCode::INTERNAL_SERVER_ERROR, "failed")
            }),
        )
        .layer(
            acme_basic(counted.clone(), &clock)
                .default_requirement(Requirement::new().cost(Cost::new(
                    "units",
                    1,
                    Credits::new(1),
                )))
                .layer(),
        );
    // No lease yet: a keyed reservation in the shared ledger.
    assert_eq!(call(&app, "/ok", &[]).await.status, 200);
    assert_eq!(counted.reserves(), 1);
    leased.tick().await;
    assert_eq!(leased.parked(&acme).leased.get(), 10, "a lease was taken");
    let shared_balance = || async { shared.balance(&acme, START).await.unwrap() };
    let before = shared_balance().await;
    // Paid from the lease: the shared ledger sees none of these.
    for _ in 0..4 {
        assert_eq!(call(&app, "/ok", &[]).await.status, 200);
    }
    assert_eq!(call(&app, "/fail", &[]).await.status, 500);
    assert_eq!(call(&app, "/report/3", &[]).await.status, 200);
    assert_eq!(
        shared_balance().await,
        before,
        "held and settled in this process"
    );
    assert_eq!(
        counted.reserves(),
        1,
        "no keyed reservation, not even a local one: held without a record or a future"
    );
    // With an `Idempotency-Key` a request is a keyed reservation in the shared ledger
    // (recognized on any instance), charged there.
    let keyed = call(&app, "/ok", &[("idempotency-key", "order-1")]).await;
    assert_eq!(keyed.status, 200);
    assert_eq!(counted.reserves(), 2);
    let parked = leased.parked(&acme);
    assert_eq!(
        (parked.in_flight.get(), parked.unsettled.get()),
        (0, 4 + 3),
        "the failed request gave its hold back: {parked:?}"
    );
    // 1 held + the lease's 2 free credits here; 9 from the shared balance (after the keyed
    // request's 1).
    assert_eq!(call(&app, "/report/12", &[]).await.status, 200);
    assert_eq!(
        shared_balance().await.available.get(),
        before.available.get() - 1 - 9
    );
    leased.shutdown().await;
    let b = shared_balance().await;
    assert_eq!(b.held.get(), 0);
    assert_eq!(failed.load(SeqCst), 1, "the failed handler ran");
    assert_eq!(
        b.settled.get(),
        ran.load(SeqCst),
        "every credit of work that ran is charged, once: {b:?}"
    );
    assert_eq!(b.available.get() + b.settled.get(), 1_000);
}

/// A pricing rule that prices one meter twice is refused before its handler runs, on the
/// in-memory ledger and on a leased one (both hold such requests without a keyed record):
/// settling it would charge each charge all of the meter's usage.
#[tokio::test]
async fn two_costs_on_one_meter_are_refused_not_charged_twice() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tower_402::store::LeaseConfig;
    let (shared, clock, leased) = seeded_lease(LeaseConfig::new()).await;
    let acme: AccountId = "acme".into();
    let ran = Arc::new(AtomicU64::new(0));
    let app = |ledger: Arc<dyn Ledger>| {
        let ran = ran.clone();
        let twice = |_: &tower_402::metering::PricingRequest<'_>| {
            Ok(vec![
                Cost::new("rows", 5, Credits::new(1)),
                Cost::new("rows", 5, Credits::new(1)),
            ])
        };
        Router::new()
            .route(
                "/ok",
                get(move || async move {
                    ran.fetch_add(1, SeqCst);
                    "ok"
                }),
            )
            .layer(acme_basic(ledger, &clock).pricing(twice).layer())
    };
    let in_memory = app(Arc::new(shared.clone()));
    assert_eq!(call(&in_memory, "/ok", &[]).await.status, 503);
    // A lease taken first (a miss, then a tick), so the request could be held from it.
    let single = [tower_402::ledger::Charge {
        meter: tower_402::plan::Meter::new("rows"),
        units: 1,
        unit_price: Credits::new(1),
        price_per: 1,
        allowance: None,
        overage: true,
    }];
    use tower_402::in_process::LocalHolds;
    assert!(leased.try_hold(&acme, &single, START).is_none());
    leased.tick().await;
    assert!(leased.parked(&acme).leased.get() > 0, "a lease was taken");
    let on_lease = app(Arc::new(leased.clone()));
    assert_eq!(call(&on_lease, "/ok", &[]).await.status, 503);
    assert_eq!(ran.load(SeqCst), 0, "no handler ran");
    leased.shutdown().await;
    let b = shared.balance(&acme, START).await.unwrap();
    assert_eq!(
        (b.available.get(), b.held.get()),
        (1_000, 0),
        "nothing charged: {b:?}"
    );
}
