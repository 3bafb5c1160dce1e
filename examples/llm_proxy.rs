//! An OpenAI-compatible endpoint billed per token, streaming included.
//!
//! ```sh
//! cargo run --example llm_proxy             # listens on 127.0.0.1:3001 (PORT to change)
//! ```
//!
//! A deterministic stand-in model answers `POST /v1/chat/completions` (plain and
//! `"stream": true`) with a realistic `usage` object; the metering layer reserves an estimate
//! from the request (model prices × input size and `max_tokens`), and settles what the
//! `usage` says when the response body ends. The stand-in never produces more output tokens
//! than the request was priced for (`OpenAiPricing::output_tokens`: `max_completion_tokens`,
//! else `max_tokens`, else 256, at most 4096), and makes a stream's events one at a time as
//! they are sent, so a large request streams in memory bounded by its own size. Try:
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
    // One pricing rule: the metering layer reserves by it, the model is limited by it.
    let pricing = OpenAiPricing::new(prices());
    let paid = Billing::new(keys, plans, ledger.clone(), catalog.clone())
        .clock(clock.clone())
        .problem_config(problems)
        .route("GET /v1/balance", Requirement::identify_only())
        .route("POST /v1/topup", Requirement::identify_only())
        .pricing(pricing.clone())
        .usage(OpenAiUsage::new());
    let billing = common::Billing {
        ledger: Arc::new(ledger.clone()),
        catalog,
        clock,
    };
    let router = Router::new()
        .route(
            "/v1/chat/completions",
            post({
                let pricing = Arc::new(pricing);
                move |body: Bytes| chat(pricing.clone(), body)
            }),
        )
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
    stream: bool,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

/// The text parts of a message's content (a string, or an array of `{"text": ...}` parts).
fn texts(content: &Value) -> impl Iterator<Item = &str> {
    let (one, parts) = match content {
        Value::String(s) => (Some(s.as_str()), &[][..]),
        Value::Array(parts) => (None, parts.as_slice()),
        _ => (None, &[][..]),
    };
    one.into_iter().chain(
        parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str)),
    )
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// The stand-in model's answer to one request: `You said:` and the words of the last user
/// message, one token per word, never more tokens than `limit` (what the request was priced
/// for).
///
/// It holds the last user message and a cursor, nothing else: the streamed events are made
/// one at a time, as the body is polled, so memory does not grow with the answer
/// ([`held_bytes`](Self::held_bytes) says how much it holds).
pub struct Reply {
    stream: bool,
    id: String,
    model: String,
    created: u64,
    /// The last user message, whose words are echoed.
    text: String,
    /// Where the next word starts in `text`.
    pos: usize,
    /// Tokens produced so far.
    sent: u64,
    /// Tokens of the whole answer: at most `limit`.
    tokens: u64,
    prompt_tokens: u64,
    finish_reason: &'static str,
    next: Step,
}

/// A token of the answer.
enum Token {
    /// `You said:`.
    First,
    /// A word of the echoed message, by its place in it.
    Word(std::ops::Range<usize>),
}

/// What a stream sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Role,
    Tokens,
    Usage,
    Done,
    End,
}

impl Reply {
    /// The answer to a chat completion `request` (the JSON body), at most `limit` output
    /// tokens; `None` if it is not a chat completion request.
    pub fn new(request: Value, limit: u64) -> Option<Self> {
        let req: ChatRequest = serde_json::from_value(request).ok()?;
        Some(Self::answer(req, limit))
    }

    fn answer(req: ChatRequest, limit: u64) -> Self {
        // 4 tokens per message plus its words, plus 3.
        let prompt_tokens = req
            .messages
            .iter()
            .map(|m| {
                texts(&m.content)
                    .map(|t| t.split_whitespace().count() as u64)
                    .sum::<u64>()
                    + 4
            })
            .sum::<u64>()
            + 3;
        let text = req
            .messages
            .into_iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| match m.content {
                Value::String(s) => s,
                other => texts(&other).collect::<Vec<_>>().join(" "),
            })
            .unwrap_or_default();
        let words = 1 + text.split_whitespace().count() as u64;
        Reply {
            stream: req.stream,
            id: format!("chatcmpl-{}", IDS.fetch_add(1, Ordering::Relaxed)),
            model: req.model,
            created: 1_767_225_600,
            text,
            pos: 0,
            sent: 0,
            tokens: words.min(limit),
            prompt_tokens,
            finish_reason: if words > limit { "length" } else { "stop" },
            next: Step::Role,
        }
    }

    /// Whether the request asked for a stream of events.
    pub fn streamed(&self) -> bool {
        self.stream
    }

    /// The bytes this reply holds on the heap: the echoed message, the id and the model name.
    /// The same from the first event to the last.
    pub fn held_bytes(&self) -> usize {
        self.text.capacity() + self.id.capacity() + self.model.capacity()
    }

    /// Where the next token's text is (a word, without the space before it), or `None`
    /// after the last.
    fn next_token(&mut self) -> Option<Token> {
        if self.sent >= self.tokens {
            return None;
        }
        self.sent += 1;
        if self.sent == 1 {
            return Some(Token::First);
        }
        let rest = &self.text[self.pos..];
        let start = self.pos + (rest.len() - rest.trim_start().len());
        let len = self.text[start..]
            .find(char::is_whitespace)
            .unwrap_or(self.text.len() - start);
        self.pos = start + len;
        Some(Token::Word(start..self.pos))
    }

    fn text_of(&self, token: &Token) -> &str {
        match token {
            Token::First => "You said:",
            Token::Word(range) => &self.text[range.clone()],
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    /// The whole answer as one `chat.completion` document.
    fn completion(mut self) -> Value {
        let mut content = String::new();
        while let Some(token) = self.next_token() {
            if !content.is_empty() {
                content.push(' ');
            }
            content.push_str(self.text_of(&token));
        }
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
        })
    }
}

/// The server-sent events of a streamed answer, made as they are asked for.
impl Iterator for Reply {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let event = match self.next {
            Step::Role => {
                self.next = Step::Tokens;
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            Step::Tokens => match self.next_token() {
                Some(token @ Token::First) => {
                    self.chunk(json!({ "content": self.text_of(&token) }), None)
                }
                Some(token) => {
                    let text = format!(" {}", self.text_of(&token));
                    self.chunk(json!({ "content": text }), None)
                }
                None => {
                    self.next = Step::Usage;
                    self.chunk(json!({}), Some(self.finish_reason))
                }
            },
            // The usage chunk (what `stream_options.include_usage` asks an OpenAI upstream
            // for; this stand-in always sends it, since the metering needs it).
            Step::Usage => {
                self.next = Step::Done;
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [], "usage": self.usage(),
                })
            }
            Step::Done => {
                self.next = Step::End;
                return Some(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Step::End => return None,
        };
        Some(Bytes::from(format!("data: {event}\n\n")))
    }
}

fn invalid_request() -> Response {
    Denial::BadRequest {
        code: "INVALID_REQUEST",
        detail: "The body must be a chat completion request with `model` and `messages`.".into(),
    }
    .into_response()
}

async fn chat(pricing: Arc<OpenAiPricing>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return invalid_request();
    };
    // What the metering layer reserved for: the model produces no more than that.
    let limit = match pricing.output_tokens(&request) {
        Ok(limit) => limit,
        Err(denial) => return denial.into_response(),
    };
    let Some(reply) = Reply::new(request, limit) else {
        return invalid_request();
    };
    if !reply.streamed() {
        return Json(reply.completion()).into_response();
    }
    let events = futures_util::stream::iter(reply.map(Ok::<_, Infallible>));
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(events))
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
