//! The three LLM shapes against a controllable upstream: OpenAI Chat Completions, OpenAI
//! Responses and Anthropic Messages, in JSON and streamed; exact balances after N requests
//! with known usage, cached and reasoning tokens priced by their own entries, and the
//! dry-stream cut (the client sees a well-formed error event, the ledger charges what was
//! delivered).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{request, send};
use http::Method;
use serde_json::{json, Value};
use tower_402::decision::Requirement;
use tower_402::metering::*;
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

/// What the upstream answers, and how many times it ran.
#[derive(Clone, Default)]
struct Upstream {
    /// Content type and body; the body goes out in chunks of `chunk` bytes.
    reply: Arc<Mutex<(String, String, usize)>>,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    fn answer(&self, content_type: &str, body: String, chunk: usize) {
        *self.reply.lock().unwrap() = (content_type.to_owned(), body, chunk.max(1));
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

async fn upstream(State(up): State<Upstream>) -> Response {
    up.calls.fetch_add(1, Ordering::Relaxed);
    let (content_type, body, chunk) = up.reply.lock().unwrap().clone();
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .into_bytes()
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    (
        [("content-type", content_type)],
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
        .into_response()
}

/// Prices per 1,000 tokens: `m` costs 1 credit per input token and 2 per output token, no
/// detail prices; `c` also prices cached input at 0.1, cache writes at 1.25 and reasoning at 3
/// credits per token.
fn table() -> PriceTable {
    let mut c = ModelPrice::new(1000, 2000).cached_input(100);
    c.cache_write = Some(Credits::new(1250));
    c.reasoning = Some(Credits::new(3000));
    let mut t = PriceTable::new()
        .model("m", ModelPrice::new(1000, 2000))
        .model("c", c);
    t.per = 1000;
    t
}

struct Setup {
    ledger: MemoryLedger,
    up: Upstream,
    app: Router,
}

impl Setup {
    async fn new(credits: u64, policy: DryStreamPolicy) -> Self {
        let ledger = MemoryLedger::new();
        ledger
            .deposit(&"acme".into(), Credits::new(credits), "seed", NOW)
            .await
            .unwrap();
        let up = Upstream::default();
        let billing = Billing::new(
            StaticKeys::new().with_key("k", "acme"),
            MemoryPlanStore::new().with(Subscription::active("acme", "basic")),
            ledger.clone(),
            Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true)),
        )
        .clock(ManualClock::new(NOW))
        .default_requirement(Requirement::new())
        .pricing(OpenAiPricing::new(table()))
        .usage(OpenAiUsage::new())
        .on_dry_stream(policy);
        let app = Router::new()
            .route("/v1/chat/completions", post(upstream))
            .route("/v1/responses", post(upstream))
            .route("/v1/messages", post(upstream))
            .with_state(up.clone())
            .layer(billing.layer());
        Setup { ledger, up, app }
    }

    async fn balance(&self) -> tower_402::ledger::Balance {
        self.ledger.balance(&"acme".into(), NOW).await.unwrap()
    }

    async fn call(&self, path: &str, body: &str) -> common::Answer {
        send(
            &self.app,
            request(
                Method::POST,
                path,
                &[("x-api-key", "k"), ("content-type", "application/json")],
                body,
            ),
        )
        .await
    }
}

fn chat_sse(usage: &Value, contents: usize) -> String {
    let mut s = String::from(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    );
    for i in 0..contents {
        s.push_str(&format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}}}}],\"usage\":null}}\n\n"
        ));
    }
    s.push_str(&format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\n"));
    s.push_str("data: [DONE]\n\n");
    s
}

fn responses_sse(usage: &Value, contents: usize) -> String {
    let mut s = String::from(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
    );
    for i in 0..contents {
        s.push_str(&format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"t{i} \"}}\n\n"
        ));
    }
    s.push_str(&format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"status\":\"completed\",\"usage\":{usage}}}}}\n\n"
    ));
    s
}

/// An Anthropic stream: `message_start` with `start` usage, the content events, then
/// cumulative `message_delta`s with these output counts.
fn anthropic_sse(start: &Value, contents: usize, deltas: &[u64]) -> String {
    let mut s = format!(
        "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{start}}}}}\n\n\
         event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n"
    );
    for i in 0..contents {
        s.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"t{i} \"}}}}\n\n"
        ));
    }
    s.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    );
    for out in deltas {
        s.push_str(&format!(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{out}}}}}\n\n"
        ));
    }
    s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s
}

const CHAT: &str =
    r#"{"model":"MODEL","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSES: &str = r#"{"model":"MODEL","max_output_tokens":1000,"input":"hi"}"#;
const MESSAGES: &str =
    r#"{"model":"MODEL","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

/// Every shape, JSON and streamed, in chunks of 1 to 7 bytes: N requests are charged exactly
/// N times their usage, and the upstream ran N times.
#[tokio::test]
async fn each_shape_is_charged_exactly_its_usage_after_n_requests() {
    // 12 input and 5 output tokens: 12 + 2 × 5 = 22 credits on `m`.
    let openai = json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17});
    let responses = json!({"input_tokens": 12, "output_tokens": 5, "total_tokens": 17});
    let anthropic = json!({"input_tokens": 12, "output_tokens": 1,
        "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0});
    let cases = [
        (
            "/v1/chat/completions",
            CHAT,
            "application/json",
            json!({"object": "chat.completion", "choices": [], "usage": openai}).to_string(),
        ),
        (
            "/v1/chat/completions",
            CHAT,
            "text/event-stream",
            chat_sse(&openai, 5),
        ),
        (
            "/v1/responses",
            RESPONSES,
            "application/json",
            json!({"object": "response", "output": [], "usage": responses}).to_string(),
        ),
        (
            "/v1/responses",
            RESPONSES,
            "text/event-stream",
            responses_sse(&responses, 5),
        ),
        (
            "/v1/messages",
            MESSAGES,
            "application/json",
            json!({"type": "message", "content": [],
                "usage": {"input_tokens": 12, "output_tokens": 5}})
            .to_string(),
        ),
        // Cumulative output counts 2, then 5: 5 is charged, not 1 + 2 + 5.
        (
            "/v1/messages",
            MESSAGES,
            "text/event-stream",
            anthropic_sse(&anthropic, 5, &[2, 5]),
        ),
    ];
    for (path, body, content_type, reply) in cases {
        let s = Setup::new(10_000, DryStreamPolicy::StreamOn).await;
        let body = body.replace("MODEL", "m");
        for n in 1..=7 {
            s.up.answer(content_type, reply.clone(), n);
            let a = s.call(path, &body).await;
            assert_eq!(a.status, 200, "{path} {content_type}: {:?}", a.body);
            assert_eq!(a.body, reply.as_bytes(), "delivered as sent");
        }
        assert_eq!(s.up.calls(), 7);
        let b = s.balance().await;
        assert_eq!(
            (b.available.get(), b.held.get(), b.settled.get()),
            (10_000 - 7 * 22, 0, 7 * 22),
            "{path} {content_type}"
        );
    }
}

/// Cached input, cache writes and reasoning tokens: at their own prices on a model that has
/// them, as ordinary input and output tokens on one that does not.
#[tokio::test]
async fn cached_and_reasoning_tokens_are_priced_by_their_own_entry_else_as_input_and_output() {
    // 1,000 prompt tokens of which 800 cached; 100 completion tokens of which 40 reasoning.
    let openai = json!({"prompt_tokens": 1000, "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 800},
        "completion_tokens_details": {"reasoning_tokens": 40}});
    let responses = json!({"input_tokens": 1000, "output_tokens": 100,
        "input_tokens_details": {"cached_tokens": 800},
        "output_tokens_details": {"reasoning_tokens": 40}});
    // `c`: 200 input + 800 × 0.1 cached + 60 × 2 output + 40 × 3 reasoning = 520.
    // `m`: 1,000 input + 100 × 2 output = 1,200.
    let openai_cases = [
        (
            "/v1/chat/completions",
            CHAT,
            "application/json",
            json!({"usage": openai}).to_string(),
        ),
        (
            "/v1/chat/completions",
            CHAT,
            "text/event-stream",
            chat_sse(&openai, 3),
        ),
        (
            "/v1/responses",
            RESPONSES,
            "application/json",
            json!({"object": "response", "usage": responses}).to_string(),
        ),
        (
            "/v1/responses",
            RESPONSES,
            "text/event-stream",
            responses_sse(&responses, 3),
        ),
    ];
    // Anthropic: 50 input, 1,000 read from the cache, 200 written to it, 10 output.
    // `c`: 50 + 100 + 250 + 20 = 420; `m`: 1,250 input + 20 = 1,270.
    let start = json!({"input_tokens": 50, "output_tokens": 1,
        "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200});
    let anthropic_cases = [
        (
            "/v1/messages",
            MESSAGES,
            "application/json",
            json!({"type": "message", "usage": {"input_tokens": 50, "output_tokens": 10,
                "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}})
            .to_string(),
        ),
        (
            "/v1/messages",
            MESSAGES,
            "text/event-stream",
            anthropic_sse(&start, 10, &[10]),
        ),
    ];
    for (cases, with_details, without) in [
        (&openai_cases[..], 520, 1200),
        (&anthropic_cases[..], 420, 1270),
    ] {
        for (path, body, content_type, reply) in cases {
            for (model, expected) in [("c", with_details), ("m", without)] {
                let s = Setup::new(10_000, DryStreamPolicy::StreamOn).await;
                s.up.answer(content_type, reply.clone(), 5);
                let a = s.call(path, &body.replace("MODEL", model)).await;
                assert_eq!(a.status, 200);
                assert_eq!(s.up.calls(), 1);
                let b = s.balance().await;
                assert_eq!(
                    (b.settled.get(), b.held.get()),
                    (expected, 0),
                    "{model} {path} {content_type}"
                );
            }
        }
    }
}

/// A stream without usage (or with an Anthropic `message_delta` but no `message_start`) is
/// charged the estimate, never nothing.
#[tokio::test]
async fn streams_without_usage_are_charged_the_estimate() {
    let estimate = |body: &str| (body.len() as u64).div_ceil(4) + 2 * 1000;
    let no_start = anthropic_sse(&json!({}), 2, &[7]).replace(",\"usage\":{}", "");
    for (path, body, reply) in [
        (
            "/v1/chat/completions",
            CHAT,
            "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n".to_owned(),
        ),
        ("/v1/responses", RESPONSES, responses_sse(&Value::Null, 2)),
        ("/v1/messages", MESSAGES, no_start),
    ] {
        let s = Setup::new(10_000, DryStreamPolicy::StreamOn).await;
        let body = body.replace("MODEL", "m");
        s.up.answer("text/event-stream", reply, 3);
        assert_eq!(s.call(path, &body).await.status, 200);
        assert_eq!(s.balance().await.settled.get(), estimate(&body), "{path}");
    }
}

/// The upstream ignores `max_tokens` (10) and streams 100 content events. The account has the
/// estimate and 6 credits more: 3 output tokens beyond the hold. Cut: the client gets the
/// first 13 content events, then an `INSUFFICIENT_CREDITS` error event in the stream's own
/// shape, and the ledger charges those 13 tokens; the balance is exactly used up.
#[tokio::test]
async fn a_stream_that_runs_dry_is_cut_with_a_provider_shaped_error_event() {
    let anthropic_start = json!({"input_tokens": 5, "output_tokens": 1});
    for (path, template, reply) in [
        (
            "/v1/chat/completions",
            CHAT,
            chat_sse(&json!({"prompt_tokens": 5, "completion_tokens": 100}), 100),
        ),
        (
            "/v1/responses",
            RESPONSES,
            responses_sse(&json!({"input_tokens": 5, "output_tokens": 100}), 100),
        ),
        (
            "/v1/messages",
            MESSAGES,
            anthropic_sse(&anthropic_start, 100, &[100]),
        ),
    ] {
        let body = template.replace("MODEL", "m").replace("1000", "10");
        let input_estimate = (body.len() as u64).div_ceil(4);
        let estimate = input_estimate + 2 * 10;
        let s = Setup::new(estimate + 6, DryStreamPolicy::Cut).await;
        s.up.answer("text/event-stream", reply, 7);
        let a = s.call(path, &body).await;
        assert_eq!(a.status, 200);
        assert_eq!(s.up.calls(), 1);
        let text = std::str::from_utf8(&a.body).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        let last = *events.last().unwrap();
        let delivered = (0..100)
            .filter(|i| text.contains(&format!("\"t{i} \"")))
            .count();
        assert_eq!(delivered, 13, "{path}: {text}");
        // The stream ended right after the error event: no usage, no [DONE].
        assert!(!text.contains("[DONE]") && !text.contains("message_stop"));
        let data: Value = serde_json::from_str(last.rsplit("data: ").next().unwrap()).unwrap();
        let b = s.balance().await;
        match path {
            "/v1/chat/completions" => {
                assert!(last.starts_with("data: {"), "{last}");
                assert_eq!(data["error"]["code"], "INSUFFICIENT_CREDITS");
                assert_eq!(data["error"]["type"], "insufficient_quota");
                assert!(data["error"]["message"].is_string());
                // Input unreported when cut: the estimate; 13 output tokens.
                assert_eq!(b.settled.get(), input_estimate + 2 * 13);
            }
            "/v1/responses" => {
                assert!(last.starts_with("event: error\ndata: "), "{last}");
                assert_eq!(data["type"], "error");
                assert_eq!(data["code"], "INSUFFICIENT_CREDITS");
                assert_eq!(b.settled.get(), input_estimate + 2 * 13);
            }
            _ => {
                assert!(last.starts_with("event: error\ndata: "), "{last}");
                assert_eq!(data["type"], "error");
                assert_eq!(data["error"]["type"], "billing_error");
                assert_eq!(data["error"]["code"], "INSUFFICIENT_CREDITS");
                // message_start reported 5 input tokens: those, and 13 output tokens.
                assert_eq!(b.settled.get(), 5 + 2 * 13);
            }
        }
        assert_eq!(b.held.get(), 0);
        assert_eq!(b.available.get(), estimate + 6 - b.settled.get());
    }
}

/// The default policy streams on: everything is delivered, the balance is drawn to zero and
/// the rest is a logged shortfall (never a negative balance).
#[tokio::test]
async fn by_default_a_stream_that_runs_dry_streams_on_and_draws_the_balance() {
    let body = CHAT.replace("MODEL", "m").replace("1000", "10");
    let estimate = (body.len() as u64).div_ceil(4) + 2 * 10;
    let s = Setup::new(estimate + 6, DryStreamPolicy::StreamOn).await;
    let reply = chat_sse(&json!({"prompt_tokens": 5, "completion_tokens": 100}), 100);
    s.up.answer("text/event-stream", reply.clone(), 7);
    let a = s.call("/v1/chat/completions", &body).await;
    assert_eq!(a.body, reply.as_bytes());
    let b = s.balance().await;
    assert_eq!((b.available.get(), b.held.get()), (0, 0));
    assert_eq!(b.settled.get(), estimate + 6);
    assert_eq!(s.up.calls(), 1);
}

/// A stream that stays within its hold is never cut, whatever the policy.
#[tokio::test]
async fn a_stream_within_its_hold_is_not_cut() {
    let body = CHAT.replace("MODEL", "m").replace("1000", "10");
    let estimate = (body.len() as u64).div_ceil(4) + 2 * 10;
    let s = Setup::new(estimate, DryStreamPolicy::Cut).await;
    let reply = chat_sse(&json!({"prompt_tokens": 5, "completion_tokens": 10}), 10);
    s.up.answer("text/event-stream", reply.clone(), 3);
    let a = s.call("/v1/chat/completions", &body).await;
    assert_eq!(a.body, reply.as_bytes());
    assert_eq!(s.balance().await.settled.get(), 5 + 2 * 10);
}
