//! An OpenAI-compatible endpoint billed per token, streaming included.
//!
//! ```sh
//! cargo run --example llm_proxy             # listens on 127.0.0.1:3001 (PORT to change)
//! ```
//!
//! A deterministic stand-in model answers `POST /v1/chat/completions` (plain and
//! `"stream": true`) with a realistic `usage` object; the metering layer reserves an estimate
//! from the request (model prices × input size and `max_tokens`), and settles what the
//! `usage` says when the response body ends. Try:
//!
//! ```sh
//! curl -s localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-pro' \
//!   -H 'content-type: application/json' \
//!   -d '{"model":"large-model","max_tokens":200,"messages":[{"role":"user","content":"hello there"}]}'
//! curl -N localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-pro' \
//!   -H 'content-type: application/json' \
//!   -d '{"model":"small-model","stream":true,"messages":[{"role":"user","content":"stream please"}]}'
//! curl -s localhost:3001/v1/balance -H 'Authorization: Bearer demo-pro'
//! curl -i localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-broke' \
//!   -H 'content-type: application/json' -d '{"model":"small-model","messages":[]}'   # 402
//! ```
//!
//! Or point an OpenAI SDK at it: `OpenAI(base_url="http://127.0.0.1:3001/v1", api_key="demo-pro")`.

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower_402::decision::{Denial, Requirement};
use tower_402::metering::{ModelPrice, OpenAiPricing, OpenAiUsage, PriceTable};
use tower_402::plan::{Catalog, Plan, PlanStore, Subscription};
use tower_402::problem::{Links, ProblemConfig};
use tower_402::{
    Billing, Clock, Credits, Ledger, MemoryLedger, MemoryPlanStore, StaticKeys, SystemClock,
};

/// Prices per 1,000 tokens: the README works an example through them.
pub fn prices() -> PriceTable {
    let mut small = ModelPrice::new(1, 2);
    small.default_output_tokens = Some(256);
    small.max_output_tokens = Some(4096);
    let mut large = ModelPrice::new(10, 30);
    large.default_output_tokens = Some(256);
    large.max_output_tokens = Some(4096);
    let mut table = PriceTable::new()
        .model("small-model", small)
        .model("large-model", large);
    table.per = 1000;
    table
}

/// The demo app and its ledger.
pub struct Demo {
    /// Router with all three layers.
    pub router: Router,
    /// The ledger behind it.
    pub ledger: MemoryLedger,
}

/// Builds the demo: `demo-pro` with 100,000 credits, `demo-broke` with none.
pub async fn demo<C: Clock + Clone>(clock: C) -> Demo {
    let now = clock.now();
    let catalog = Catalog::new().with_plan(Plan::new("pro", "Pro", 2).overage(true));
    let plans = MemoryPlanStore::new();
    plans
        .put_subscription(Subscription::active("acct_pro", "pro"))
        .await
        .expect("memory store");
    plans
        .put_subscription(Subscription::active("acct_broke", "pro"))
        .await
        .expect("memory store");
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acct_pro".into(), Credits::new(100_000), "demo-seed", now)
        .await
        .expect("memory ledger");
    let keys = StaticKeys::new()
        .with_key("demo-pro", "acct_pro")
        .with_key("demo-broke", "acct_broke");
    let problems = ProblemConfig::new()
        .type_base("https://docs.example.com/problems/")
        // An `error` member in the shape the OpenAI SDKs read, beside the problem's own.
        .openai_errors(true)
        .links(
            Links::new()
                .top_up("https://billing.example.com/top-up")
                .billing("https://billing.example.com/portal"),
        );
    let paid = Billing::new(keys, plans, ledger.clone(), catalog.clone())
        .clock(clock.clone())
        .problem_config(problems)
        .route("GET /v1/balance", Requirement::identify_only())
        .route("POST /v1/topup", Requirement::identify_only())
        .pricing(OpenAiPricing::new(prices()))
        .usage(OpenAiUsage::new());
    let billing = common::Billing {
        ledger: Arc::new(ledger.clone()),
        catalog,
        clock,
    };
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/balance", get(common::balance::<C>))
        .route("/v1/topup", post(common::top_up::<C>))
        .with_state(billing)
        .layer(paid.layer());
    Demo { router, ledger }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The stand-in model: echoes the last user message, one token per word.
struct Completion {
    words: Vec<String>,
    prompt_tokens: u64,
    finish_reason: &'static str,
}

fn complete(req: &ChatRequest) -> Completion {
    let prompt_tokens = req
        .messages
        .iter()
        .map(|m| text_of(&m.content).split_whitespace().count() as u64 + 4)
        .sum::<u64>()
        + 3;
    let last = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| text_of(&m.content))
        .unwrap_or_default();
    let mut words: Vec<String> = std::iter::once("You said:".to_owned())
        .chain(last.split_whitespace().map(str::to_owned))
        .collect();
    let limit = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256) as usize;
    let finish_reason = if words.len() > limit {
        "length"
    } else {
        "stop"
    };
    words.truncate(limit);
    Completion {
        words,
        prompt_tokens,
        finish_reason,
    }
}

static IDS: AtomicU64 = AtomicU64::new(1);

async fn chat(body: Bytes) -> Response {
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return Denial::BadRequest {
                code: "INVALID_REQUEST",
                detail: "The body must be a chat completion request with `model` and `messages`."
                    .into(),
            }
            .into_response()
        }
    };
    let c = complete(&req);
    let id = format!("chatcmpl-{}", IDS.fetch_add(1, Ordering::Relaxed));
    let created = 1_767_225_600u64;
    let usage = json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.words.len(),
        "total_tokens": c.prompt_tokens + c.words.len() as u64,
    });
    if !req.stream {
        return Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": c.words.join(" "), "refusal": null},
                "logprobs": null,
                "finish_reason": c.finish_reason,
            }],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    for (i, w) in c.words.iter().enumerate() {
        let text = if i == 0 { w.clone() } else { format!(" {w}") };
        events.push(chunk(json!({"content": text}), None));
    }
    events.push(chunk(json!({}), Some(c.finish_reason)));
    // The usage chunk (what `stream_options.include_usage` asks an OpenAI upstream for; this
    // stand-in always sends it, since the metering needs it).
    events.push(json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
        "choices": [], "usage": usage,
    }));
    let frames = events
        .into_iter()
        .map(|e| format!("data: {e}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
        .map(|s| Ok::<_, Infallible>(Bytes::from(s)));
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .expect("valid response")
}

async fn models() -> Json<Value> {
    let data: Vec<Value> = prices()
        .models
        .keys()
        .map(|m| json!({"id": m, "object": "model", "created": 1_767_225_600u64, "owned_by": "tower-402"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[allow(dead_code)] // the tests include this file for `demo` and do not call `main`
#[tokio::main]
async fn main() {
    common::init_tracing();
    let listener = common::listen(common::port(3001)).await;
    let app = demo(SystemClock).await.router;
    let addr = listener.local_addr().expect("bound socket");
    println!("tower-402 llm_proxy listening on http://{addr}/v1");
    println!("demo keys: demo-pro (100000 credits), demo-broke (0 credits)");
    println!("models: small-model (1/2 credits per 1K input/output tokens), large-model (10/30)");
    common::serve(listener, app).await;
}
