//! Memory stays flat when metering a streamed response of any length: a counting global
//! allocator measures the peak of live heap bytes while 32 MiB bodies (512 times the usage
//! tail bound) stream through the metering layer. Alone in its binary, so no other test's
//! allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_402::metering::{ModelPrice, OpenAiPricing, OpenAiUsage, PriceTable};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const CHUNK: usize = 64 * 1024;
const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

/// An SSE body of `chunks` × 64 KiB: small events, one huge event, usage at the end. Each
/// chunk is made when polled, so the upstream itself holds one chunk at a time.
fn sse_body(chunks: usize) -> Body {
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n";
    let small: Bytes = event.repeat(CHUNK / event.len()).into();
    let stream = futures_util::stream::iter(0..chunks).map(move |i| {
        let bytes = match i {
            // One event far larger than any bound: it must be skipped, not buffered.
            10 => Bytes::from(format!("data: {}", "x".repeat(CHUNK - 6))),
            11 => Bytes::from("\n\n"),
            _ => small.clone(),
        };
        Ok::<_, std::io::Error>(bytes)
    });
    let end = futures_util::stream::iter([Ok(Bytes::from(
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n",
    ))]);
    Body::from_stream(futures_util::StreamExt::chain(stream, end))
}

/// A JSON body of `chunks` × 64 KiB with `usage` at the end.
fn json_body(chunks: usize) -> Body {
    let pad: Bytes = " ".repeat(CHUNK).into();
    let start = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(
        "{\"choices\":[],\"padding\":\"",
    ))]);
    let middle = futures_util::stream::iter(0..chunks).map(move |_| Ok(pad.clone()));
    let end = futures_util::stream::iter([Ok(Bytes::from(
        "\",\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}",
    ))]);
    Body::from_stream(futures_util::StreamExt::chain(
        futures_util::StreamExt::chain(start, middle),
        end,
    ))
}

use futures_util::StreamExt as _;

fn app(ledger: MemoryLedger) -> Router {
    let mut table = PriceTable::new().model("m", ModelPrice::new(1, 1));
    table.per = 1;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|headers: http::HeaderMap| async move {
                let chunks: usize = headers["x-chunks"].to_str().unwrap().parse().unwrap();
                if headers.contains_key("x-json") {
                    ([("content-type", "application/json")], json_body(chunks)).into_response()
                } else {
                    ([("content-type", "text/event-stream")], sse_body(chunks)).into_response()
                }
            }),
        )
        .layer(
            Billing::new(
                StaticKeys::new().with_key("k", "acme"),
                MemoryPlanStore::new().with(Subscription::active("acme", "basic")),
                ledger,
                Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true)),
            )
            .clock(ManualClock::new(NOW))
            .pricing(OpenAiPricing::new(table))
            .usage(OpenAiUsage::new())
            .layer(),
        )
}

/// Streams one response, frame by frame, and returns (peak live bytes above the level before
/// the request, body bytes seen).
async fn stream_once(app: &Router, chunks: usize, json: bool) -> (usize, usize) {
    let mut req = http::Request::post("/v1/chat/completions")
        .header("x-api-key", "k")
        .header("x-chunks", chunks.to_string())
        .body(Body::from(r#"{"model":"m","max_tokens":10,"messages":[]}"#))
        .unwrap();
    if json {
        req.headers_mut().insert("x-json", "1".parse().unwrap());
    }
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut seen = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            seen += data.len();
        }
    }
    (PEAK.load(Ordering::Relaxed).saturating_sub(base), seen)
}

#[tokio::test(flavor = "current_thread")]
async fn peak_memory_does_not_grow_with_the_body() {
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(1_000_000), "seed", NOW)
        .await
        .unwrap();
    let app = app(ledger.clone());
    for json in [false, true] {
        // Warm up (lazy statics, first-use allocations), then a small and a large body.
        stream_once(&app, 16, json).await;
        let (small_peak, small_seen) = stream_once(&app, 16, json).await;
        let (large_peak, large_seen) = stream_once(&app, 512, json).await;
        assert!(large_seen > 30 * 1024 * 1024 && small_seen < 2 * 1024 * 1024);
        eprintln!(
            "json={json}: peak above baseline {small_peak} B for 1 MiB, {large_peak} B for 32 MiB"
        );
        // Flat: the large body's peak is within a few chunks of the small one's.
        assert!(
            large_peak <= small_peak + 4 * CHUNK,
            "json={json}: peak grew from {small_peak} to {large_peak} bytes"
        );
        assert!(
            large_peak < 2 * 1024 * 1024,
            "json={json}: peak {large_peak} bytes"
        );
    }
    // Every response was charged its reported usage, 12 credits.
    let b = ledger.balance(&"acme".into(), NOW).await.unwrap();
    assert_eq!(b.settled, Credits::new(6 * 12));
}
