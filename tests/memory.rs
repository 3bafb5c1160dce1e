//! Memory stays flat when metering a streamed response of any length: a counting global
//! allocator measures the peak of live heap bytes while 32 MiB bodies (512 times the usage
//! tail bound) stream through the metering layer, in each shape (OpenAI Chat Completions,
//! OpenAI Responses and Anthropic Messages streams, and a JSON body), and with the dry-stream
//! watch on (which holds back an unfinished event). Alone in its binary, so no other test's
//! allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_402::metering::{DryStreamPolicy, ModelPrice, OpenAiPricing, OpenAiUsage, PriceTable};
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

/// The stream shapes: their small content event, and the events that carry usage (5 input
/// and 7 output tokens) before and after the content.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Chat,
    Responses,
    Anthropic,
}

impl Shape {
    fn from(name: &str) -> Self {
        match name {
            "responses" => Shape::Responses,
            "anthropic" => Shape::Anthropic,
            _ => Shape::Chat,
        }
    }

    fn content_event(self) -> &'static str {
        match self {
            Shape::Chat => "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n",
            Shape::Responses => "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"tok\"}\n\n",
            Shape::Anthropic => "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tok\"}}\n\n",
        }
    }

    fn start(self) -> &'static str {
        match self {
            Shape::Chat => "",
            Shape::Responses => "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
            Shape::Anthropic => "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
        }
    }

    fn end(self) -> &'static str {
        match self {
            Shape::Chat => "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n",
            Shape::Responses => "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}}\n\n",
            Shape::Anthropic => "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        }
    }
}

/// An SSE body of `chunks` × 64 KiB in `shape`: small events, one huge event, usage at the
/// start and end as the shape has it. Each chunk is made when polled, so the upstream itself
/// holds one chunk at a time.
fn sse_body(chunks: usize, shape: Shape) -> Body {
    let event = shape.content_event();
    let text = event.repeat(CHUNK / event.len());
    // The first chunk begins with the shape's start event, one content event fewer.
    let first: Bytes = format!("{}{}", shape.start(), &text[event.len()..]).into();
    let small: Bytes = text.into();
    let stream = futures_util::stream::iter(0..chunks).map(move |i| {
        let bytes = match i {
            0 => first.clone(),
            // One event far larger than any bound: it must be skipped, not buffered.
            10 => Bytes::from(format!("data: {}", "x".repeat(CHUNK - 6))),
            11 => Bytes::from("\n\n"),
            _ => small.clone(),
        };
        Ok::<_, std::io::Error>(bytes)
    });
    let end = futures_util::stream::iter([Ok(Bytes::from_static(shape.end().as_bytes()))]);
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

fn app(ledger: MemoryLedger, dry: DryStreamPolicy) -> Router {
    let mut table = PriceTable::new().model("m", ModelPrice::new(1, 1));
    table.per = 1;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|headers: http::HeaderMap| async move {
                let chunks: usize = headers["x-chunks"].to_str().unwrap().parse().unwrap();
                let shape = headers["x-shape"].to_str().unwrap();
                if shape == "json" {
                    ([("content-type", "application/json")], json_body(chunks)).into_response()
                } else {
                    let body = sse_body(chunks, Shape::from(shape));
                    ([("content-type", "text/event-stream")], body).into_response()
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
            .on_dry_stream(dry)
            .layer(),
        )
}

/// Streams one response, frame by frame, and returns (peak live bytes above the level before
/// the request, body bytes seen).
async fn stream_once(app: &Router, chunks: usize, shape: &str) -> (usize, usize) {
    let req = http::Request::post("/v1/chat/completions")
        .header("x-api-key", "k")
        .header("x-chunks", chunks.to_string())
        .header("x-shape", shape)
        .body(Body::from(r#"{"model":"m","max_tokens":10,"messages":[]}"#))
        .unwrap();
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
        .deposit(&"acme".into(), Credits::new(1 << 40), "seed", NOW)
        .await
        .unwrap();
    let plain = app(ledger.clone(), DryStreamPolicy::StreamOn);
    // Watching for a dry stream parses every event: a shorter large body keeps the test quick.
    let watched = app(ledger.clone(), DryStreamPolicy::Cut);
    let mut responses = 0;
    for (app, shape, large) in [
        (&plain, "chat", 512),
        (&plain, "responses", 512),
        (&plain, "anthropic", 512),
        (&plain, "json", 512),
        (&watched, "chat", 128),
        (&watched, "responses", 128),
        (&watched, "anthropic", 128),
    ] {
        // Warm up (lazy statics, first-use allocations), then a small and a large body.
        stream_once(app, 16, shape).await;
        let (small_peak, small_seen) = stream_once(app, 16, shape).await;
        let (large_peak, large_seen) = stream_once(app, large, shape).await;
        responses += 3;
        assert!(
            large_seen > (large - 2) * CHUNK && small_seen < 2 * 1024 * 1024,
            "{shape}: {large_seen}"
        );
        eprintln!(
            "{shape}: peak above baseline {small_peak} B for 1 MiB, {large_peak} B for {} MiB",
            large / 16
        );
        // Flat: the large body's peak is within a few chunks of the small one's.
        assert!(
            large_peak <= small_peak + 4 * CHUNK,
            "{shape}: peak grew from {small_peak} to {large_peak} bytes"
        );
        assert!(
            large_peak < 2 * 1024 * 1024,
            "{shape}: peak {large_peak} bytes"
        );
    }
    // Every response was charged its reported usage, 12 credits (5 input, 7 output): none was
    // cut, and none charged the estimate.
    let b = ledger.balance(&"acme".into(), NOW).await.unwrap();
    assert_eq!(b.settled, Credits::new(responses * 12));
}
