//! Usage-based metering against a controllable upstream: JSON and SSE usage (split across
//! chunk boundaries, missing, nonsense), disconnects, upstream failures, estimates below the
//! actual cost, several meters with an allowance, and threshold events.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{request, send};
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;
use tower_402::decision::Requirement;
use tower_402::metering::*;
use tower_402::plan::{Catalog, Meter, Period, Plan, Subscription};
use tower_402::*;

const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

/// Builds an SSE body whose usage chunk says `usage` (raw JSON text, so nonsense can be sent).
fn sse(usage: Option<&str>) -> String {
    let mut s = String::new();
    for w in ["Hello", " world"] {
        s.push_str(&format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}}}}]}}\n\n"
        ));
    }
    if let Some(u) = usage {
        s.push_str(&format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{u}}}\n\n"
        ));
    }
    s.push_str("data: [DONE]\n\n");
    s
}

fn chunked(text: String, size: usize) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = text
        .into_bytes()
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures_util::stream::iter(chunks))
}

/// The upstream: `x-scenario` says what to answer.
async fn upstream(headers: HeaderMap) -> Response {
    let scenario = headers
        .get("x-scenario")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("json")
        .to_owned();
    let (kind, usage) = scenario.split_once('=').unwrap_or((&scenario, ""));
    let usage = (!usage.is_empty()).then_some(usage);
    match kind {
        "json" => (
            [("content-type", "application/json")],
            format!(
                r#"{{"object":"chat.completion","choices":[{{"message":{{"content":"hi"}}}}],"usage":{}}}"#,
                usage.unwrap_or("null")
            ),
        )
            .into_response(),
        "sse" => ([("content-type", "text/event-stream")], chunked(sse(usage), 1)).into_response(),
        // The upstream resets: after an event without usage, after the usage chunk (and
        // before `[DONE]`), or before anything.
        "sse-error" | "sse-error-after-usage" | "sse-error-first" => {
            let sent = match kind {
                "sse-error" => "data: {\"choices\":[]}\n\n".to_owned(),
                "sse-error-after-usage" => sse(Some(r#"{"prompt_tokens":3,"completion_tokens":1}"#))
                    .replace("data: [DONE]\n\n", ""),
                _ => String::new(),
            };
            let mut items: Vec<Result<Bytes, std::io::Error>> = sent
                .into_bytes()
                .chunks(16)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            items.push(Err(std::io::Error::other("upstream reset")));
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(futures_util::stream::iter(items)),
            )
                .into_response()
        }
        "sse-endless" => {
            let first = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(
                sse(Some(r#"{"prompt_tokens":3,"completion_tokens":1}"#)).replace("data: [DONE]\n\n", ""),
            ))]);
            let never = futures_util::stream::pending();
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(futures_util::StreamExt::chain(first, never)),
            )
                .into_response()
        }
        "500" => (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response(),
        other => panic!("unknown scenario {other}"),
    }
}

struct Setup {
    ledger: MemoryLedger,
    events: Arc<Mutex<Vec<ThresholdEvent>>>,
}

/// Prices per 1,000 tokens: `m` costs 1 credit per 1K input and 2 per 1K output; the
/// estimate for the standard request body below is input ceil(len/4) tokens, output 1,000.
fn table() -> PriceTable {
    let mut t = PriceTable::new().model("m", ModelPrice::new(1000, 2000));
    t.per = 1000;
    t
}

const BODY: &str = r#"{"model":"m","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

fn estimate() -> u64 {
    // 1 credit per input token, 2 per output token.
    (BODY.len() as u64).div_ceil(4) + 2 * 1000
}

impl Setup {
    async fn new(credits: u64) -> Self {
        let ledger = MemoryLedger::new();
        if credits > 0 {
            ledger
                .deposit(&"acme".into(), Credits::new(credits), "seed", NOW)
                .await
                .unwrap();
        }
        Setup {
            ledger,
            events: Arc::default(),
        }
    }

    fn app(&self, plan: Plan, metering: impl FnOnce(Billing) -> Billing) -> Router {
        let plans = MemoryPlanStore::new().with(Subscription::active("acme", plan.id.as_str()));
        let catalog = Catalog::new().with_plan(plan);
        let events = self.events.clone();
        let billing = metering(
            Billing::new(
                StaticKeys::new().with_key("k", "acme"),
                plans,
                self.ledger.clone(),
                catalog,
            )
            .clock(ManualClock::new(NOW))
            .default_requirement(Requirement::new())
            .pricing(OpenAiPricing::new(table()))
            .usage(OpenAiUsage::new())
            .on_threshold(
                [
                    Threshold::BalanceAtOrBelow(Credits::new(2500)),
                    Threshold::AllowancePercent(80),
                ],
                move |e| events.lock().unwrap().push(e),
            ),
        );
        Router::new()
            .route("/v1/chat/completions", post(upstream))
            .layer(billing.layer())
    }

    fn basic(&self) -> Router {
        self.app(Plan::new("basic", "Basic", 1).overage(true), |m| m)
    }

    async fn available(&self) -> u64 {
        self.ledger
            .balance(&"acme".into(), NOW)
            .await
            .unwrap()
            .available
            .get()
    }

    /// Credit held by requests still running. A request without an `Idempotency-Key` on the
    /// in-memory ledger holds without a keyed record, so it shows here, not in `open`.
    async fn held(&self) -> u64 {
        self.ledger
            .balance(&"acme".into(), NOW)
            .await
            .unwrap()
            .held
            .get()
    }

    /// Keyed reservations still open.
    fn open(&self) -> usize {
        self.ledger.open_reservations(&"acme".into(), NOW)
    }

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

fn call(scenario: &str) -> http::Request<Body> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[("x-api-key", "k"), ("x-scenario", scenario)],
        BODY,
    )
}

#[tokio::test]
async fn json_usage_is_charged() {
    let s = Setup::new(100_000).await;
    let a = send(
        &s.basic(),
        call(r#"json={"prompt_tokens":120,"completion_tokens":45}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(100_000 - s.available().await, 120 + 2 * 45);
    assert_eq!((s.open(), s.held().await), (0, 0));
}

#[tokio::test]
async fn sse_usage_split_into_one_byte_chunks_is_charged() {
    let s = Setup::new(100_000).await;
    let a = send(
        &s.basic(),
        call(r#"sse={"prompt_tokens":7,"completion_tokens":300}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(100_000 - s.available().await, 7 + 600);
}

#[tokio::test]
async fn a_stream_without_usage_is_charged_the_estimate_never_free() {
    let s = Setup::new(100_000).await;
    send(&s.basic(), call("sse")).await;
    assert_eq!(100_000 - s.available().await, estimate());
    send(&s.basic(), call("json")).await;
    assert_eq!(100_000 - s.available().await, 2 * estimate());
}

#[tokio::test]
async fn nonsense_usage_figures_are_charged_the_estimate() {
    for usage in [
        r#"{"prompt_tokens":-5,"completion_tokens":2}"#,
        r#"{"prompt_tokens":"many","completion_tokens":2}"#,
        r#"{"prompt_tokens":1.5,"completion_tokens":2}"#,
        r#"{"prompt_tokens":1,"completion_tokens":99999999999999}"#,
        r#""lots""#,
    ] {
        for kind in ["json", "sse"] {
            let s = Setup::new(100_000).await;
            let a = send(&s.basic(), call(&format!("{kind}={usage}"))).await;
            assert_eq!(a.status, 200);
            assert_eq!(100_000 - s.available().await, estimate(), "{kind} {usage}");
        }
    }
}

#[tokio::test]
async fn usage_above_the_estimate_draws_the_balance_or_caps_by_policy() {
    let usage = r#"json={"prompt_tokens":10,"completion_tokens":5000}"#;
    let s = Setup::new(100_000).await;
    send(&s.basic(), call(usage)).await;
    assert_eq!(100_000 - s.available().await, 10 + 10_000);

    let s = Setup::new(100_000).await;
    let capped = s.app(Plan::new("basic", "Basic", 1).overage(true), |m| {
        m.over_estimate(tower_402::ledger::OverEstimate::CapAtHold)
    });
    send(&capped, call(usage)).await;
    assert_eq!(100_000 - s.available().await, estimate());

    // Drawing stops at zero: never a negative balance.
    let s = Setup::new(estimate() + 100).await;
    send(&s.basic(), call(usage)).await;
    assert_eq!(s.available().await, 0);
}

#[tokio::test]
async fn an_upstream_5xx_is_refunded() {
    let s = Setup::new(100_000).await;
    let a = send(&s.basic(), call("500")).await;
    assert_eq!(a.status, 500);
    assert_eq!(s.available().await, 100_000);
    assert_eq!((s.open(), s.held().await), (0, 0));
}

/// Reads a response body until it ends or fails: the text that arrived, and whether it failed.
async fn read(res: Response) -> (String, bool) {
    let mut body = res.into_body();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

/// Issue 12: an upstream that fails mid-stream, after events went out, is charged what the
/// stream delivered, under the disconnect policy (it used to be released).
#[tokio::test]
async fn a_stream_that_errors_after_some_events_is_charged_what_it_delivered() {
    for (scenario, policy, charged) in [
        (
            "sse-error-after-usage",
            DisconnectPolicy::ChargeUsageSoFar,
            3 + 2,
        ),
        (
            "sse-error-after-usage",
            DisconnectPolicy::ChargeEstimate,
            estimate(),
        ),
        // No usage seen before the failure: the estimate, never free.
        ("sse-error", DisconnectPolicy::ChargeUsageSoFar, estimate()),
        ("sse-error", DisconnectPolicy::ChargeEstimate, estimate()),
    ] {
        let s = Setup::new(100_000).await;
        let app = s.app(Plan::new("basic", "Basic", 1).overage(true), |m| {
            m.on_disconnect(policy)
        });
        let (text, failed) = read(app.oneshot(call(scenario)).await.unwrap()).await;
        assert!(
            failed,
            "{scenario}: the body must end in the upstream's error"
        );
        assert!(text.starts_with("data: {"), "{scenario}: {text:?}");
        if scenario == "sse-error-after-usage" {
            assert!(text.contains(r#""content":" world""#), "{text:?}");
            assert!(text.contains(r#""usage":{"prompt_tokens":3"#), "{text:?}");
        }
        s.drain().await;
        assert_eq!(
            100_000 - s.available().await,
            charged,
            "{scenario} {policy:?}"
        );
    }
}

#[tokio::test]
async fn a_stream_that_errors_before_any_event_or_by_policy_is_released() {
    let s = Setup::new(100_000).await;
    let (text, failed) = read(s.basic().oneshot(call("sse-error-first")).await.unwrap()).await;
    assert_eq!((text.as_str(), failed), ("", true));
    s.drain().await;
    assert_eq!(s.available().await, 100_000);

    let s = Setup::new(100_000).await;
    let app = s.app(Plan::new("basic", "Basic", 1).overage(true), |m| {
        m.on_stream_error(StreamErrorPolicy::Release)
    });
    let (text, failed) = read(app.oneshot(call("sse-error-after-usage")).await.unwrap()).await;
    assert!(failed && text.contains("usage"), "{text:?}");
    s.drain().await;
    assert_eq!(s.available().await, 100_000);
}

#[tokio::test]
async fn a_client_disconnecting_mid_stream_is_charged_by_policy() {
    for (policy, charged) in [
        (DisconnectPolicy::ChargeEstimate, estimate()),
        (DisconnectPolicy::ChargeUsageSoFar, 3 + 2),
    ] {
        let s = Setup::new(100_000).await;
        let app = s.app(Plan::new("basic", "Basic", 1).overage(true), |m| {
            m.on_disconnect(policy)
        });
        let res = app.oneshot(call("sse-endless")).await.unwrap();
        let mut body = res.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert_eq!(s.held().await, estimate());
        drop(body);
        s.drain().await;
        assert_eq!(100_000 - s.available().await, charged, "{policy:?}");
    }
}

#[tokio::test]
async fn several_meters_with_an_allowance_on_one_of_them() {
    let s = Setup::new(100_000).await;
    // 1,000 input tokens a day included; output always paid.
    let plan = Plan::new("hybrid", "Hybrid", 1)
        .allowance("input_tokens", 1000, Period::Day)
        .overage(true);
    let app = s.app(plan, |m| m);
    send(
        &app,
        call(r#"json={"prompt_tokens":900,"completion_tokens":10}"#),
    )
    .await;
    assert_eq!(
        100_000 - s.available().await,
        20,
        "input from the allowance"
    );
    send(
        &app,
        call(r#"json={"prompt_tokens":300,"completion_tokens":10}"#),
    )
    .await;
    assert_eq!(
        100_000 - s.available().await,
        20 + 200 + 20,
        "100 from the allowance, 200 paid"
    );
    let window = Period::Day.window(NOW).0;
    let used = s
        .ledger
        .allowance_usage(&"acme".into(), &Meter::new("input_tokens"), window, NOW)
        .await
        .unwrap();
    assert_eq!((used.used, used.held), (1000, 0));
}

#[tokio::test]
async fn threshold_events_fire_once_per_crossing_of_what_is_spent() {
    let s = Setup::new(2700).await;
    let app = s.basic();
    // A hold of ~2,020 dips below 2,500 but is given back: no event.
    send(
        &app,
        call(r#"json={"prompt_tokens":0,"completion_tokens":0}"#),
    )
    .await;
    assert!(s.events.lock().unwrap().is_empty());
    // 210 spent: 2,700 → 2,490, crossing 2,500 once.
    let usage = r#"json={"prompt_tokens":120,"completion_tokens":45}"#;
    send(&app, call(usage)).await;
    send(&app, call(usage)).await;
    let events = s.events.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].crossing,
        Crossing::Balance {
            level: Credits::new(2500),
            available: Credits::new(2490)
        }
    );
    assert_eq!(events[0].account, AccountId::new("acme"));
}

#[tokio::test]
async fn allowance_threshold_at_80_percent() {
    let s = Setup::new(100_000).await;
    let plan = Plan::new("hybrid", "Hybrid", 1)
        .allowance("output_tokens", 2500, Period::Day)
        .overage(true);
    let app = s.app(plan, |m| m);
    let usage = r#"json={"prompt_tokens":0,"completion_tokens":1000}"#;
    send(&app, call(usage)).await; // uses 1,000 of 2,500: 40 %
    send(&app, call(usage)).await; // 2,000: 80 % crossed
    send(&app, call(usage)).await; // 2,500: already past 80 %
    let events = s.events.lock().unwrap().clone();
    let allowance: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.crossing, Crossing::Allowance { .. }))
        .collect();
    assert_eq!(allowance.len(), 1, "{events:?}");
    assert!(matches!(
        &allowance[0].crossing,
        Crossing::Allowance {
            percent: 80,
            used: 2000,
            limit: 2500,
            ..
        }
    ));
}

#[tokio::test]
async fn the_handler_still_receives_the_body_intact() {
    let s = Setup::new(100_000).await;
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|body: Bytes| async move { body }),
        )
        .layer(
            Billing::new(
                StaticKeys::new().with_key("k", "acme"),
                MemoryPlanStore::new().with(Subscription::active("acme", "basic")),
                s.ledger.clone(),
                Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true)),
            )
            .clock(ManualClock::new(NOW))
            .pricing(OpenAiPricing::new(table()))
            .layer(),
        );
    let a = send(&app, call("echo")).await;
    assert_eq!(a.body, BODY);
    let _ = json!(null);
}

/// Issue 16: a streamed request the client abandons still produces its usage event, with the
/// credits actually charged (not $0), the model, and the tokens seen.
#[cfg(feature = "usage")]
#[tokio::test]
async fn an_abandoned_stream_still_exports_its_usage_event_with_what_was_charged() {
    use tower_402::usage::{ChannelSink, Outbox, OutboxConfig};
    let s = Setup::new(100_000).await;
    let (sink, mut events) = ChannelSink::new(16);
    let outbox = Outbox::start(sink, OutboxConfig::default());
    let app = s.app(Plan::new("basic", "Basic", 1).overage(true), |m| {
        m.on_disconnect(DisconnectPolicy::ChargeUsageSoFar)
            .usage_outbox(outbox.clone())
    });
    let res = app.oneshot(call("sse-endless")).await.unwrap();
    let mut body = res.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    drop(body); // the client goes away mid-stream
    s.drain().await;
    let charged = 100_000 - s.available().await;
    assert_eq!(charged, 3 + 2);
    let event = events.recv().await.expect("one usage event");
    assert_eq!(event.data.credits.get(), charged, "{event:?}");
    assert_eq!(event.data.model.as_deref(), Some("m"));
    assert_eq!(event.data.meters["input_tokens"], 3, "{event:?}");
    assert_eq!(event.data.meters["output_tokens"], 1, "{event:?}");
    assert_eq!(event.data.route, "POST /v1/chat/completions");
    assert_eq!(event.subject, "acme");
    outbox.drained().await;
    assert_eq!(outbox.stats().delivered, 1);
    assert!(events.try_recv().is_err(), "exactly one event");
}
