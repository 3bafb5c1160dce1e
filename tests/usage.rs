//! Usage events (issue 16): one CloudEvent per settled request, through the bounded outbox to
//! each sink. The HTTP sink runs against a local collector that can be taken down: batches,
//! retries with backoff, the bound and the dropped count.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use common::{request, send};
use http::Method;
use tokio::sync::mpsc;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::usage::*;
use tower_402::*;

const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

/// A paid API (1 credit per request) whose usage goes to `outbox`, and how often its handler ran.
async fn app(outbox: &Outbox) -> (Router, MemoryLedger, Arc<AtomicUsize>) {
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(1000), "seed", NOW)
        .await
        .unwrap();
    let billing = Billing::new(
        StaticKeys::new().with_key("k", "acme"),
        MemoryPlanStore::new().with(Subscription::active("acme", "pro")),
        ledger.clone(),
        Catalog::new().with_plan(Plan::new("pro", "Pro", 1).overage(true)),
    )
    .clock(ManualClock::new(NOW))
    .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))))
    .usage_outbox(outbox.clone());
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    let router = Router::new()
        .route(
            "/v1/forecast",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "sunny" }
            }),
        )
        .layer(billing.layer());
    (router, ledger, ran)
}

async fn forecast(app: &Router, headers: &[(&str, &str)]) {
    let mut all = vec![("x-api-key", "k")];
    all.extend_from_slice(headers);
    let a = send(app, request(Method::GET, "/v1/forecast", &all, "")).await;
    assert_eq!(a.status, 200);
}

async fn available(ledger: &MemoryLedger) -> u64 {
    ledger
        .balance(&"acme".into(), NOW)
        .await
        .unwrap()
        .available
        .get()
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn the_channel_sink_gets_one_cloudevent_per_settled_request() {
    let (sink, mut events) = ChannelSink::new(16);
    let outbox = Outbox::start(sink, OutboxConfig::default());
    let (app, ledger, ran) = app(&outbox).await;
    forecast(&app, &[("x-request-id", "req-1")]).await;
    forecast(&app, &[("idempotency-key", "order-42-secret")]).await;
    // A replay of the keyed request is not settled again: no second event for it.
    forecast(&app, &[("idempotency-key", "order-42-secret")]).await;
    assert_eq!(
        ran.load(Ordering::SeqCst),
        2,
        "the replay did not run the handler"
    );
    assert_eq!(available(&ledger).await, 998);

    let first = events.recv().await.unwrap();
    let second = events.recv().await.unwrap();
    outbox.drained().await;
    assert!(events.try_recv().is_err(), "one event per settlement");
    for e in [&first, &second] {
        assert_eq!(e.specversion, "1.0");
        assert_eq!(e.source, "tower-402");
        assert_eq!(e.kind, "tower402.request");
        assert_eq!(e.subject, "acme");
        assert_eq!(e.datacontenttype, "application/json");
        assert_eq!(e.id.len(), 32);
        assert_eq!(e.data.credits, Credits::new(1));
        assert_eq!(e.data.meters["requests"], 1);
        assert_eq!(e.data.route, "GET /v1/forecast");
        assert_eq!(e.data.model, None);
        assert_eq!(e.time, e.data.ended_at);
        assert_eq!(e.data.started_at, NOW.to_string());
    }
    assert_ne!(first.id, second.id);
    assert_eq!(first.data.request_id.as_deref(), Some("req-1"));
    assert_eq!(
        second.data.idempotency_key_sha256.as_deref(),
        Some(sha256_hex("order-42-secret").as_str())
    );
    // The JSON is the CloudEvents structured form, and never carries the key or the API key.
    let json = serde_json::to_value(&second).unwrap();
    assert_eq!(json["type"], "tower402.request");
    assert_eq!(json["data"]["meters"]["requests"], 1);
    let text = json.to_string();
    assert!(
        !text.contains("order-42-secret") && !text.contains("\"k\""),
        "{text}"
    );
}

#[tokio::test]
async fn the_file_sink_appends_json_lines() {
    let dir = std::env::temp_dir().join(format!("tower402-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("usage.jsonl");
    let _ = std::fs::remove_file(&path);
    let outbox = Outbox::start(FileSink::new(&path), OutboxConfig::default());
    let (app, _, ran) = app(&outbox).await;
    for _ in 0..3 {
        forecast(&app, &[]).await;
    }
    outbox.drained().await;
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<CloudEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().all(|e| e.data.credits == Credits::new(1)));
    let mut ids: Vec<_> = lines.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_eq!(outbox.stats().delivered, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A collector that answers 503 while `up` is false, and reports every POST it gets.
#[derive(Clone)]
struct Collector {
    up: Arc<AtomicBool>,
    posts: mpsc::UnboundedSender<(String, Vec<CloudEvent>, StatusCode)>,
}

async fn collect(
    State(c): State<Collector>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let status = if c.up.load(Ordering::SeqCst) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let events = serde_json::from_slice(&body).unwrap_or_default();
    let _ = c.posts.send((content_type, events, status));
    status
}

async fn collector(
    up: bool,
) -> (
    http::Uri,
    Arc<AtomicBool>,
    mpsc::UnboundedReceiver<(String, Vec<CloudEvent>, StatusCode)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = Arc::new(AtomicBool::new(up));
    let state = Collector {
        up: up.clone(),
        posts: tx,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/api/v1/events", post(collect))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let uri = format!("http://{addr}/api/v1/events").parse().unwrap();
    (uri, up, rx)
}

fn fast_retries(capacity: usize, batch_size: usize) -> OutboxConfig {
    OutboxConfig {
        capacity,
        batch_size,
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(4),
        ..OutboxConfig::default()
    }
}

#[tokio::test]
async fn the_http_sink_posts_batches_and_retries_a_collector_that_is_down() {
    let (uri, up, mut posts) = collector(false).await;
    let sink = HttpSink::new(uri).bearer_token("collector-token").unwrap();
    assert!(
        !format!("{sink:?}").contains("collector-token"),
        "the token is never shown"
    );
    let outbox = Outbox::start(sink, fast_retries(100, 2));
    let (app, _, ran) = app(&outbox).await;
    forecast(&app, &[]).await;
    // The first batch is refused, and retried.
    let (content_type, first, status) = posts.recv().await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(content_type, CLOUDEVENTS_BATCH);
    assert_eq!(first.len(), 1);
    let (_, again, status) = posts.recv().await.unwrap();
    assert_eq!(
        (again.clone(), status),
        (first.clone(), StatusCode::SERVICE_UNAVAILABLE)
    );
    // Meanwhile requests go on, never waiting for the sink.
    for _ in 0..4 {
        forecast(&app, &[]).await;
    }
    assert_eq!(ran.load(Ordering::SeqCst), 5);
    up.store(true, Ordering::SeqCst);
    outbox.drained().await;
    let stats = outbox.stats();
    assert_eq!((stats.enqueued, stats.delivered, stats.dropped), (5, 5, 0));
    assert!(stats.retries >= 1);
    // Every event arrived, in batches of at most 2, the retried one under the same id.
    let mut delivered = Vec::new();
    while let Ok((_, batch, status)) = posts.try_recv() {
        assert!(batch.len() <= 2, "{batch:?}");
        if status == StatusCode::ACCEPTED {
            delivered.extend(batch);
        }
    }
    assert_eq!(delivered.len(), 5);
    assert_eq!(delivered[0].id, first[0].id, "a retry is the same event");
    let mut ids: Vec<_> = delivered.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn a_full_outbox_drops_and_counts_and_requests_never_wait() {
    let (uri, up, mut posts) = collector(false).await;
    let outbox = Outbox::start(HttpSink::new(uri), fast_retries(2, 1));
    let (app, ledger, ran) = app(&outbox).await;
    forecast(&app, &[]).await;
    // The outbox's task holds that event and retries it: the queue behind it holds 2 more.
    let (_, held, _) = posts.recv().await.unwrap();
    assert_eq!(held.len(), 1);
    for _ in 0..10 {
        forecast(&app, &[]).await;
    }
    assert_eq!(ran.load(Ordering::SeqCst), 11, "every request was served");
    assert_eq!(available(&ledger).await, 1000 - 11, "and charged");
    let stats = outbox.stats();
    assert_eq!((stats.enqueued, stats.dropped), (3, 8), "{stats:?}");
    up.store(true, Ordering::SeqCst);
    outbox.drained().await;
    let stats = outbox.stats();
    assert_eq!((stats.delivered, stats.dropped, stats.rejected), (3, 8, 0));
}

#[tokio::test]
async fn a_collector_that_refuses_for_good_rejects_the_batch() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app400 = Router::new().route("/api/v1/events", post(|| async { StatusCode::BAD_REQUEST }));
    tokio::spawn(async move { axum::serve(listener, app400).await.unwrap() });
    let uri: http::Uri = format!("http://{addr}/api/v1/events").parse().unwrap();
    let outbox = Outbox::start(HttpSink::new(uri), fast_retries(10, 10));
    let (app, _, _) = app(&outbox).await;
    forecast(&app, &[]).await;
    outbox.drained().await;
    let stats = outbox.stats();
    assert_eq!((stats.delivered, stats.rejected, stats.retries), (0, 1, 0));
}
