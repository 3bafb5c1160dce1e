//! An LLM endpoint billed per token, streaming included, in three shapes: OpenAI Chat
//! Completions, OpenAI Responses and Anthropic Messages.
//!
//! ```sh
//! cargo run --example llm_proxy             # listens on 127.0.0.1:3001 (PORT to change)
//! ```
//!
//! A deterministic stand-in model answers `POST /v1/chat/completions`, `POST /v1/responses`
//! and `POST /v1/messages` (plain and `"stream": true`) with a realistic `usage`; the
//! metering layer reserves an estimate from the request (model prices × input size and
//! `max_tokens` / `max_output_tokens`), and settles what the `usage` says when the response
//! body ends. The stand-in never produces more output tokens than the request was priced for
//! (`OpenAiPricing::output_limit`: `max_completion_tokens`, else `max_output_tokens`, else
//! `max_tokens`, else 256, at most 4096, and no more than a free plan's allowance has left),
//! and makes a stream's events one at a time as they are sent, so a large request streams in
//! memory bounded by its own size.
//!
//! Keys: `demo-pro` (plan `pro`, 100,000 credits), `demo-broke` (plan `pro`, 0 credits),
//! `demo-basic` (plan `basic`, 100,000 credits: `large-model` needs `pro`), `demo-free` (plan
//! `free`, 0 credits, 200 output tokens and 100,000 input tokens a month, no overage). Try:
//!
//! ```sh
//! curl -s localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-pro' \
//!   -H 'content-type: application/json' \
//!   -d '{"model":"large-model","max_tokens":200,"messages":[{"role":"user","content":"hello there"}]}'
//! curl -N localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-pro' \
//!   -H 'content-type: application/json' \
//!   -d '{"model":"small-model","stream":true,"messages":[{"role":"user","content":"stream please"}]}'
//! curl -s localhost:3001/v1/messages -H 'x-api-key: demo-pro' -H 'content-type: application/json' \
//!   -d '{"model":"small-model","max_tokens":100,"messages":[{"role":"user","content":"hi claude"}]}'
//! curl -s localhost:3001/v1/responses -H 'Authorization: Bearer demo-pro' \
//!   -H 'content-type: application/json' -d '{"model":"small-model","input":"hi responses"}'
//! curl -s localhost:3001/v1/balance -H 'Authorization: Bearer demo-pro'
//! curl -i localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-broke' \
//!   -H 'content-type: application/json' -d '{"model":"small-model","messages":[]}'   # 402
//! curl -i localhost:3001/v1/chat/completions -H 'Authorization: Bearer demo-basic' \
//!   -H 'content-type: application/json' -d '{"model":"large-model","messages":[]}'   # 402 PLAN_UPGRADE_REQUIRED
//! ```
//!
//! Or point an SDK at it: `OpenAI(base_url="http://127.0.0.1:3001/v1", api_key="demo-pro")`,
//! `Anthropic(base_url="http://127.0.0.1:3001", api_key="demo-pro")`.

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
use serde_json::{json, Value};
use tower_402::decision::{Denial, Requirement};
use tower_402::metering::{ModelPrice, OpenAiPricing, OpenAiUsage, PriceTable};
use tower_402::plan::{Catalog, Period, Plan, PlanStore, Subscription};
use tower_402::problem::{Links, ProblemConfig};
use tower_402::{
    Billing, Clock, Credits, Entitlement, Ledger, MemoryLedger, MemoryPlanStore, StaticKeys,
    SystemClock,
};

/// Prices per 1,000 tokens: the README works an example through them. `large-model` is on
/// the `pro` plan (tier 2) and up, and prices cached input tokens at half its input price.
pub fn prices() -> PriceTable {
    let mut small = ModelPrice::new(1, 2);
    small.default_output_tokens = Some(256);
    small.max_output_tokens = Some(4096);
    let mut large = ModelPrice::new(10, 30).required_tier(2).cached_input(5);
    large.default_output_tokens = Some(256);
    large.max_output_tokens = Some(4096);
    let mut table = PriceTable::new()
        .model("small-model", small)
        .model("large-model", large);
    table.per = 1000;
    table
}

/// The plans: `free` (tier 0: 200 output and 100,000 input tokens a month, no overage),
/// `basic` (tier 1) and `pro` (tier 2), both paid from credit.
pub fn catalog() -> Catalog {
    Catalog::new()
        .with_plan(
            Plan::new("free", "Free", 0)
                .allowance("output_tokens", 200, Period::CalendarMonth)
                .allowance("input_tokens", 100_000, Period::CalendarMonth),
        )
        .with_plan(Plan::new("basic", "Basic", 1).overage(true))
        .with_plan(Plan::new("pro", "Pro", 2).overage(true))
}

/// The demo app and its ledger.
pub struct Demo {
    /// Router with all three layers.
    pub router: Router,
    /// The ledger behind it.
    pub ledger: MemoryLedger,
    /// Answers the stand-in model produced.
    pub served: Arc<AtomicU64>,
}

/// Builds the demo: `demo-pro` and `demo-basic` with 100,000 credits, `demo-broke` and
/// `demo-free` with none.
pub async fn demo<C: Clock + Clone>(clock: C) -> Demo {
    let now = clock.now();
    let catalog = catalog();
    let plans = MemoryPlanStore::new();
    for (account, plan) in [
        ("acct_pro", "pro"),
        ("acct_broke", "pro"),
        ("acct_basic", "basic"),
        ("acct_free", "free"),
    ] {
        plans
            .put_subscription(Subscription::active(account, plan))
            .await
            .expect("memory store");
    }
    let ledger = MemoryLedger::new();
    for account in ["acct_pro", "acct_basic"] {
        ledger
            .deposit(&account.into(), Credits::new(100_000), "demo-seed", now)
            .await
            .expect("memory ledger");
    }
    let keys = StaticKeys::new()
        .with_key("demo-pro", "acct_pro")
        .with_key("demo-broke", "acct_broke")
        .with_key("demo-basic", "acct_basic")
        .with_key("demo-free", "acct_free");
    let problems = ProblemConfig::new()
        .type_base("https://docs.example.com/problems/")
        // An `error` member in the shape the OpenAI SDKs read, beside the problem's own.
        .openai_errors(true)
        .links(
            Links::new()
                .top_up("https://billing.example.com/top-up")
                .billing("https://billing.example.com/portal")
                .upgrade("https://billing.example.com/upgrade"),
        );
    // One pricing rule: the metering layer reserves by it, the model is limited by it.
    let pricing = OpenAiPricing::new(prices());
    let paid = Billing::new(keys, plans, ledger.clone(), catalog.clone())
        .clock(clock.clone())
        .problem_config(problems)
        .route("GET /v1/balance", Requirement::identify_only())
        .route("POST /v1/topup", Requirement::identify_only())
        .usage(OpenAiUsage::for_prices(pricing.table()))
        .pricing(pricing.clone());
    let billing = common::Billing {
        ledger: Arc::new(ledger.clone()),
        catalog,
        clock,
    };
    let pricing = Arc::new(pricing);
    let served = Arc::new(AtomicU64::new(0));
    let route = |api: Api| {
        let (pricing, served) = (pricing.clone(), served.clone());
        post(move |entitlement: Entitlement, body: Bytes| {
            answer(api, pricing.clone(), served.clone(), entitlement, body)
        })
    };
    let router = Router::new()
        .route("/v1/chat/completions", route(Api::Chat))
        .route("/v1/responses", route(Api::Responses))
        .route("/v1/messages", route(Api::Messages))
        .route("/v1/models", get(models))
        .route("/v1/balance", get(common::balance::<C>))
        .route("/v1/topup", post(common::top_up::<C>))
        .with_state(billing)
        .layer(paid.layer());
    Demo {
        router,
        ledger,
        served,
    }
}

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI Chat Completions (`POST /v1/chat/completions`).
    Chat,
    /// OpenAI Responses (`POST /v1/responses`).
    Responses,
    /// Anthropic Messages (`POST /v1/messages`).
    Messages,
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

/// A message of any of the three request shapes: its role and content.
struct Message {
    role: String,
    content: Value,
}

/// The messages of a request, in its API's shape (the system prompt or instructions as a
/// message of their own); `None` if it is not one.
fn messages(api: Api, request: &mut Value) -> Option<Vec<Message>> {
    let take = |v: &mut Value, key: &str| v.get_mut(key).map(Value::take);
    let mut out = Vec::new();
    let system = match api {
        Api::Chat => None,
        Api::Messages => take(request, "system"),
        Api::Responses => take(request, "instructions"),
    };
    if let Some(system) = system.filter(|s| !s.is_null()) {
        out.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    let list = match (
        api,
        take(
            request,
            if api == Api::Responses {
                "input"
            } else {
                "messages"
            },
        ),
    ) {
        (Api::Responses, Some(Value::String(text))) => {
            vec![json!({"role": "user", "content": text})]
        }
        (_, Some(Value::Array(list))) => list,
        _ => return None,
    };
    for mut m in list {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let content = take(&mut m, "content").unwrap_or(Value::Null);
        out.push(Message { role, content });
    }
    Some(out)
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// The stand-in model's answer to one request: `You said:` and the words of the last user
/// message, one token per word, never more tokens than `limit` (what the request was priced
/// for), in the shape of the API it came in on.
///
/// It holds the last user message and a cursor, nothing else: the streamed events are made
/// one at a time, as the body is polled, so memory does not grow with the answer
/// ([`held_bytes`](Self::held_bytes) says how much it holds).
pub struct Reply {
    api: Api,
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
    /// The answer was cut at `limit`.
    truncated: bool,
    /// Events sent so far (Responses' `sequence_number`).
    seq: u64,
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
    Start,
    Tokens,
    Finish,
    Usage,
    Done,
    End,
}

impl Reply {
    /// The answer to a chat completion `request` (the JSON body), at most `limit` output
    /// tokens; `None` if it is not a chat completion request.
    pub fn new(request: Value, limit: u64) -> Option<Self> {
        Self::for_api(Api::Chat, request, limit)
    }

    /// The answer to a request on `api`, at most `limit` output tokens; `None` if the body is
    /// not a request of that API.
    pub fn for_api(api: Api, mut request: Value, limit: u64) -> Option<Self> {
        let model = request.get("model")?.as_str()?.to_owned();
        let stream = match request.get("stream") {
            None | Some(Value::Null) => false,
            Some(v) => v.as_bool()?,
        };
        let messages = messages(api, &mut request)?;
        // 4 tokens per message plus its words, plus 3.
        let prompt_tokens = messages
            .iter()
            .map(|m| {
                texts(&m.content)
                    .map(|t| t.split_whitespace().count() as u64)
                    .sum::<u64>()
                    + 4
            })
            .sum::<u64>()
            + 3;
        let text = messages
            .into_iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| match m.content {
                Value::String(s) => s,
                other => texts(&other).collect::<Vec<_>>().join(" "),
            })
            .unwrap_or_default();
        let words = 1 + text.split_whitespace().count() as u64;
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Responses => "resp",
            Api::Messages => "msg",
        };
        Some(Reply {
            api,
            stream,
            id: format!("{prefix}-{}", IDS.fetch_add(1, Ordering::Relaxed)),
            model,
            created: 1_767_225_600,
            text,
            pos: 0,
            sent: 0,
            tokens: words.min(limit),
            prompt_tokens,
            truncated: words > limit,
            seq: 0,
            next: Step::Start,
        })
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

    /// The next token's text as it is streamed: a space before each word after the first.
    fn next_delta(&mut self) -> Option<String> {
        let token = self.next_token()?;
        Some(match token {
            Token::First => self.text_of(&token).to_owned(),
            token => format!(" {}", self.text_of(&token)),
        })
    }

    /// The whole answer's text (what the `done` events of a Responses stream repeat): the
    /// first `tokens` tokens, made afresh from the request's text.
    fn full_text(&self) -> String {
        let text = &self.text;
        let mut content = String::new();
        let mut pos = 0;
        for i in 0..self.tokens {
            if i == 0 {
                content.push_str("You said:");
                continue;
            }
            let rest = &text[pos..];
            let start = pos + (rest.len() - rest.trim_start().len());
            let len = text[start..]
                .find(char::is_whitespace)
                .unwrap_or(text.len() - start);
            pos = start + len;
            content.push(' ');
            content.push_str(&text[start..pos]);
        }
        content
    }

    fn chat_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        })
    }

    fn responses_usage(&self) -> Value {
        json!({
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + self.tokens,
        })
    }

    fn anthropic_usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output,
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    fn finish_reason(&self) -> &'static str {
        match (self.api, self.truncated) {
            (Api::Chat, true) => "length",
            (Api::Chat, false) => "stop",
            (Api::Messages, true) => "max_tokens",
            (Api::Messages, false) => "end_turn",
            (Api::Responses, true) => "incomplete",
            (Api::Responses, false) => "completed",
        }
    }

    fn output_message(&self, text: &str, status: &str) -> Value {
        json!({
            "type": "message", "id": format!("msg_{}", self.id), "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        })
    }

    /// A Responses `response` object; `output` and `usage` when it is complete.
    fn response(&self, output: Option<&str>) -> Value {
        let status = if output.is_some() {
            self.finish_reason()
        } else {
            "in_progress"
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model,
            "output": output.map_or_else(Vec::new, |t| vec![self.output_message(t, "completed")]),
            "usage": output.map(|_| self.responses_usage()),
            "incomplete_details": (output.is_some() && self.truncated)
                .then(|| json!({"reason": "max_output_tokens"})),
            "error": null, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
            "text": {"format": {"type": "text"}},
        })
    }

    /// The whole answer as one document, in its API's shape.
    fn document(mut self) -> Value {
        let mut content = String::new();
        while let Some(delta) = self.next_delta() {
            content.push_str(&delta);
        }
        match self.api {
            Api::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": null},
                    "logprobs": null,
                    "finish_reason": self.finish_reason(),
                }],
                "usage": self.chat_usage(),
            }),
            Api::Responses => self.response(Some(&content)),
            Api::Messages => json!({
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [{"type": "text", "text": content}],
                "stop_reason": self.finish_reason(), "stop_sequence": null,
                "usage": self.anthropic_usage(self.tokens),
            }),
        }
    }

    /// A typed event (Responses, Anthropic): an `event:` line and its data.
    fn typed(&mut self, kind: &str, mut data: Value) -> Bytes {
        data["type"] = kind.into();
        if self.api == Api::Responses {
            data["sequence_number"] = self.seq.into();
        }
        self.seq += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    }

    fn next_chat(&mut self) -> Option<Bytes> {
        let event = match self.next {
            Step::Start => {
                self.next = Step::Tokens;
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            Step::Tokens => match self.next_delta() {
                Some(text) => self.chunk(json!({ "content": text }), None),
                None => {
                    self.next = Step::Usage;
                    self.chunk(json!({}), Some(self.finish_reason()))
                }
            },
            // The usage chunk (what `stream_options.include_usage` asks an OpenAI upstream
            // for; this stand-in always sends it, since the metering needs it).
            Step::Finish | Step::Usage => {
                self.next = Step::Done;
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [], "usage": self.chat_usage(),
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

    fn next_messages(&mut self) -> Option<Bytes> {
        Some(match self.next {
            Step::Start => {
                self.next = Step::Tokens;
                let message = json!({
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": self.anthropic_usage(1),
                });
                let start = self.typed("message_start", json!({ "message": message }));
                let block = self.typed(
                    "content_block_start",
                    json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
                );
                [start, block].concat().into()
            }
            Step::Tokens => match self.next_delta() {
                Some(text) => self.typed(
                    "content_block_delta",
                    json!({"index": 0, "delta": {"type": "text_delta", "text": text}}),
                ),
                None => {
                    self.next = Step::Usage;
                    self.typed("content_block_stop", json!({"index": 0}))
                }
            },
            Step::Finish | Step::Usage => {
                self.next = Step::Done;
                let reason = self.finish_reason();
                let usage = json!({ "output_tokens": self.tokens });
                self.typed(
                    "message_delta",
                    json!({"delta": {"stop_reason": reason, "stop_sequence": null}, "usage": usage}),
                )
            }
            Step::Done => {
                self.next = Step::End;
                self.typed("message_stop", json!({}))
            }
            Step::End => return None,
        })
    }

    fn next_responses(&mut self) -> Option<Bytes> {
        let item_id = format!("msg_{}", self.id);
        Some(match self.next {
            Step::Start => {
                self.next = Step::Tokens;
                let created =
                    self.typed("response.created", json!({"response": self.response(None)}));
                let item = json!({"type": "message", "id": item_id, "status": "in_progress",
                    "role": "assistant", "content": []});
                let added = self.typed(
                    "response.output_item.added",
                    json!({"output_index": 0, "item": item}),
                );
                let part = self.typed(
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}}),
                );
                [created, added, part].concat().into()
            }
            Step::Tokens => match self.next_delta() {
                Some(delta) => self.typed(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                        "delta": delta, "logprobs": []}),
                ),
                None => {
                    self.next = Step::Finish;
                    let text = self.full_text();
                    let done = self.typed(
                        "response.output_text.done",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                            "text": text, "logprobs": []}),
                    );
                    let part = self.typed(
                        "response.content_part.done",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                            "part": {"type": "output_text", "text": text, "annotations": []}}),
                    );
                    let item = self.output_message(&text, "completed");
                    let item = self.typed(
                        "response.output_item.done",
                        json!({"output_index": 0, "item": item}),
                    );
                    [done, part, item].concat().into()
                }
            },
            Step::Finish | Step::Usage => {
                self.next = Step::End;
                let text = self.full_text();
                let kind = if self.truncated {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                let response = self.response(Some(&text));
                self.typed(kind, json!({ "response": response }))
            }
            Step::Done | Step::End => return None,
        })
    }
}

/// The server-sent events of a streamed answer, made as they are asked for.
impl Iterator for Reply {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        match self.api {
            Api::Chat => self.next_chat(),
            Api::Messages => self.next_messages(),
            Api::Responses => self.next_responses(),
        }
    }
}

fn invalid_request(api: Api) -> Response {
    let what = match api {
        Api::Chat => "a chat completion request with `model` and `messages`",
        Api::Responses => "a Responses request with `model` and `input`",
        Api::Messages => "a Messages request with `model` and `messages`",
    };
    Denial::BadRequest {
        code: "INVALID_REQUEST",
        detail: format!("The body must be {what}.").into(),
    }
    .into_response()
}

async fn answer(
    api: Api,
    pricing: Arc<OpenAiPricing>,
    served: Arc<AtomicU64>,
    entitlement: Entitlement,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return invalid_request(api);
    };
    // What the metering layer reserved for: the model produces no more than that.
    let limit = match pricing.output_limit(&request, &entitlement) {
        Ok(limit) => limit,
        Err(denial) => return denial.into_response(),
    };
    let Some(reply) = Reply::for_api(api, request, limit) else {
        return invalid_request(api);
    };
    served.fetch_add(1, Ordering::Relaxed);
    if !reply.streamed() {
        return Json(reply.document()).into_response();
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
    println!(
        "demo keys: demo-pro (100000 credits), demo-broke (0 credits), demo-basic (plan basic, \
         100000 credits), demo-free (plan free: 200 output tokens a month)"
    );
    println!(
        "models: small-model (1/2 credits per 1K input/output tokens), large-model (10/30, \
         pro plan)"
    );
    println!("routes: /v1/chat/completions, /v1/responses, /v1/messages (Anthropic)");
    common::serve(listener, app).await;
}
