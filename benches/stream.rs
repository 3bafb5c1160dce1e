//! Metering overhead on a streamed response: the same 1 MiB server-sent-event stream served
//! bare, and behind the gate and the metering layer reading `usage` from it.
//!
//! `cargo bench --bench stream`

use axum::body::{Body, Bytes};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_402::metering::{ModelPrice, OpenAiPricing, OpenAiUsage, PriceTable};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

const CHUNKS: usize = 256;
const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

fn stream() -> impl IntoResponse {
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"token\"}}]}\n\n";
    let chunk: Bytes = event.repeat(4096 / event.len()).into();
    let body = futures_util::stream::iter(
        std::iter::repeat_n(chunk, CHUNKS)
            .chain(std::iter::once(Bytes::from(
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n",
            )))
            .map(Ok::<_, std::convert::Infallible>),
    );
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(body),
    )
}

fn bare() -> Router {
    Router::new().route("/v1/chat/completions", post(|| async { stream() }))
}

fn metered(ledger: MemoryLedger) -> Router {
    let mut table = PriceTable::new().model("m", ModelPrice::new(1, 1));
    table.per = 1000;
    bare().layer(
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

fn request() -> http::Request<Body> {
    http::Request::post("/v1/chat/completions")
        .header("x-api-key", "k")
        .body(Body::from(r#"{"model":"m","max_tokens":10,"messages":[]}"#))
        .unwrap()
}

async fn drain(app: &Router) -> usize {
    let res = app.clone().oneshot(request()).await.unwrap();
    res.into_body().collect().await.unwrap().to_bytes().len()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ledger = MemoryLedger::new();
    rt.block_on(ledger.deposit(&"acme".into(), Credits::new(1 << 50), "seed", NOW))
        .unwrap();
    let bare = bare();
    let metered = metered(ledger);
    let bytes = rt.block_on(drain(&bare));
    let mut group = c.benchmark_group("sse_stream_1MiB");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("unmetered", |b| b.to_async(&rt).iter(|| drain(&bare)));
    group.bench_function("metered_openai_usage", |b| {
        b.to_async(&rt).iter(|| drain(&metered))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
