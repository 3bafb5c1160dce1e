//! The llm_proxy example's contract: OpenAI-compatible completions, plain and streamed,
//! charged exactly what the `usage` says.

#[allow(dead_code)]
#[path = "../examples/llm_proxy.rs"]
mod llm_proxy;

mod common;

use bytes::Bytes;
use common::{request, send};
use http::Method;
use serde_json::{json, Value};
use tower_402::{AccountId, Ledger, ManualClock, Timestamp};

const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

async fn demo() -> llm_proxy::Demo {
    llm_proxy::demo(ManualClock::new(NOW)).await
}

async fn available(demo: &llm_proxy::Demo) -> u64 {
    demo.ledger
        .balance(&AccountId::new("acct_pro"), NOW)
        .await
        .unwrap()
        .available
        .get()
}

fn chat(key: &str, body: &Value, extra: &[(&str, &str)]) -> http::Request<axum::body::Body> {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    request(
        Method::POST,
        "/v1/chat/completions",
        &headers,
        &body.to_string(),
    )
}

/// The stand-in model's usage: 4 tokens per message plus its words, plus 3; the reply is
/// "You said:" and the last user message.
fn body(model: &str, words: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": words}],
    })
}

/// Credits for `prompt` and `completion` tokens at `(input, output)` credits per 1,000 tokens,
/// each rounded up.
fn cost(prompt: u64, completion: u64, (input, output): (u64, u64)) -> u64 {
    (prompt * input).div_ceil(1000) + (completion * output).div_ceil(1000)
}

#[tokio::test]
async fn completions_are_charged_exactly_their_usage() {
    let demo = demo().await;
    let before = available(&demo).await;
    // 200 words: prompt 207 tokens; completion "You said:" + 200 words = 201 tokens, capped at
    // max_tokens 100.
    let words = vec!["word"; 200].join(" ");
    let mut expected = 0;
    for _ in 0..5 {
        let a = send(
            &demo.router,
            chat("demo-pro", &body("large-model", &words, false), &[]),
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let doc = a.json();
        assert_eq!(doc["object"], "chat.completion");
        assert_eq!(doc["usage"]["prompt_tokens"], 207);
        assert_eq!(doc["usage"]["completion_tokens"], 100);
        assert_eq!(doc["choices"][0]["finish_reason"], "length");
        expected += cost(207, 100, (10, 30));
    }
    assert_eq!(expected, 5 * (3 + 3));
    assert_eq!(before - available(&demo).await, expected);
}

#[tokio::test]
async fn streams_are_charged_their_final_usage_chunk() {
    let demo = demo().await;
    let before = available(&demo).await;
    let words = vec!["token"; 500].join(" ");
    let a = send(
        &demo.router,
        chat("demo-pro", &body("small-model", &words, true), &[]),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(a.body.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(text.contains(r#""usage":{"prompt_tokens":507,"completion_tokens":100"#));
    assert_eq!(before - available(&demo).await, cost(507, 100, (1, 2)));
}

#[tokio::test]
async fn a_broke_caller_gets_a_402_problem_the_sdks_surface_as_an_api_error() {
    let demo = demo().await;
    let a = send(
        &demo.router,
        chat("demo-broke", &body("small-model", "hi", false), &[]),
    )
    .await;
    let doc = a.problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(doc["balance"], 0);
    assert_eq!(doc["top_up_url"], "https://billing.example.com/top-up");
}

#[tokio::test]
async fn unknown_models_and_bad_bodies_are_400_before_anything_is_held() {
    let demo = demo().await;
    let before = available(&demo).await;
    let a = send(
        &demo.router,
        chat("demo-pro", &body("gpt-99", "hi", false), &[]),
    )
    .await;
    let doc = a.problem(400, "UNKNOWN_MODEL");
    assert_eq!(doc["model"], "gpt-99");
    let bad = request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", "Bearer demo-pro")],
        "{not json",
    );
    send(&demo.router, bad)
        .await
        .problem(400, "INVALID_REQUEST");
    for (field, value) in [
        ("max_tokens", json!(-1)),
        ("max_tokens", json!("9")),
        ("n", json!(0)),
    ] {
        let mut b = body("small-model", "hi", false);
        b[field] = value;
        let a = send(&demo.router, chat("demo-pro", &b, &[])).await;
        a.problem(400, "INVALID_REQUEST");
    }
    let huge = json!({"model": "small-model", "messages": [{"role": "user", "content": "x".repeat(2 << 20)}]});
    let a = send(&demo.router, chat("demo-pro", &huge, &[])).await;
    a.problem(413, "REQUEST_TOO_LARGE");
    assert_eq!(available(&demo).await, before);
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_charged_once_and_another_body_is_409() {
    let demo = demo().await;
    let before = available(&demo).await;
    let b = body("large-model", "same request", false);
    let key = [("idempotency-key", "chat-42")];
    let first = send(&demo.router, chat("demo-pro", &b, &key)).await;
    assert_eq!(first.status, 200);
    let retry = send(&demo.router, chat("demo-pro", &b, &key)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    // The recorded completion, not a second run.
    assert_eq!(retry.json()["id"], first.json()["id"]);
    assert_eq!(retry.body, first.body);
    assert_eq!(before - available(&demo).await, cost(9, 4, (10, 30)));
    let other = body("large-model", "another request", false);
    let a = send(&demo.router, chat("demo-pro", &other, &key)).await;
    a.problem(409, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(before - available(&demo).await, cost(9, 4, (10, 30)));
}

#[tokio::test]
async fn the_models_list_and_balance_work_for_sdk_clients() {
    let demo = demo().await;
    let a = send(
        &demo.router,
        request(
            Method::GET,
            "/v1/models",
            &[("authorization", "Bearer demo-pro")],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["data"].as_array().unwrap().len(), 2);
}

/// The events of a streamed answer: the JSON of each `data:` line (`[DONE]` left out).
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// Issue 12: the stand-in produced as many tokens as `max_tokens` asked for, beyond the
/// model's `max_output_tokens` that the estimate is capped at, so it delivered output that
/// was never held.
#[tokio::test]
async fn the_model_never_produces_more_output_than_the_request_was_priced_for() {
    let demo = demo().await;
    // 5,000 words: an echo of 5,001 tokens if nothing limited it.
    let words = vec!["word"; 5000].join(" ");
    let prompt = 5000 + 4 + 3;
    for (limits, priced) in [
        // Capped at small-model's max_output_tokens, like the estimate.
        (json!({"max_tokens": 1_000_000}), 4096),
        // max_completion_tokens wins over max_tokens.
        (json!({"max_completion_tokens": 50, "max_tokens": 1000}), 50),
        // Neither: the model's default output estimate.
        (json!({}), 256),
    ] {
        for stream in [false, true] {
            let mut b = json!({
                "model": "small-model",
                "stream": stream,
                "messages": [{"role": "user", "content": words}],
            });
            for (k, v) in limits.as_object().unwrap() {
                b[k] = v.clone();
            }
            let before = available(&demo).await;
            let a = send(&demo.router, chat("demo-pro", &b, &[])).await;
            assert_eq!(a.status, 200, "{:?}", a.body);
            let (usage, finish, content) = if stream {
                let text = String::from_utf8(a.body.to_vec()).unwrap();
                assert!(text.ends_with("data: [DONE]\n\n"));
                let events = events(&text);
                let content: Vec<&str> = events
                    .iter()
                    .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                    .filter(|c| !c.is_empty())
                    .collect();
                let finish = events
                    .iter()
                    .find_map(|e| e["choices"][0]["finish_reason"].as_str())
                    .unwrap()
                    .to_owned();
                let usage = events.last().unwrap()["usage"].clone();
                (usage, finish, content.concat())
            } else {
                let doc = a.json();
                let content = doc["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let finish = doc["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                (doc["usage"].clone(), finish, content)
            };
            // What ran: "You said:" and priced - 1 words, no more.
            assert_eq!(
                content.split_whitespace().count() as u64,
                priced + 1,
                "{limits} stream={stream}"
            );
            assert!(content.starts_with("You said: word word"));
            assert_eq!(
                usage["completion_tokens"], priced,
                "{limits} stream={stream}"
            );
            assert_eq!(usage["prompt_tokens"], prompt);
            assert_eq!(finish, "length");
            assert_eq!(
                before - available(&demo).await,
                cost(prompt, priced, (1, 2)),
                "{limits} stream={stream}"
            );
        }
    }
}

/// Issue 12: an 800 KB request took the stand-in from 9 MB to 959 MB, every event of the
/// answer built before the first was sent. It now goes out one small event per frame.
#[tokio::test]
async fn a_large_request_streams_one_small_event_per_frame() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let demo = demo().await;
    let before = available(&demo).await;
    let words = "token ".repeat(140_000);
    let b = json!({
        "model": "small-model",
        "stream": true,
        "max_tokens": 1_000_000_000u64,
        "messages": [{"role": "user", "content": words}],
    });
    assert!(b.to_string().len() > 800_000);
    let res = demo
        .router
        .clone()
        .oneshot(chat("demo-pro", &b, &[]))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let (mut frames, mut largest, mut last) = (0usize, 0usize, Bytes::new());
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        frames += 1;
        largest = largest.max(data.len());
        last = data;
    }
    // The role, 4,096 tokens, the finish reason, the usage, [DONE]: one frame each.
    assert_eq!(frames, 1 + 4096 + 1 + 1 + 1);
    assert!(largest < 512, "an event of {largest} bytes");
    assert_eq!(last, "data: [DONE]\n\n");
    assert_eq!(
        before - available(&demo).await,
        cost(140_000 + 4 + 3, 4096, (1, 2))
    );
}

/// The stream is made as it is read: the reply holds its request's text and a cursor, the
/// same bytes from the first event to the last, never more than the request itself.
#[test]
fn a_reply_holds_only_its_request_while_it_streams() {
    let words = "token ".repeat(140_000);
    let request = json!({
        "model": "small-model",
        "stream": true,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": words}],
    });
    let size = request.to_string().len();
    let mut reply = llm_proxy::Reply::new(request, 4096).unwrap();
    assert!(reply.streamed());
    let held = reply.held_bytes();
    assert!(held <= size, "holds {held} bytes for a request of {size}");
    let mut events = 0;
    while let Some(event) = reply.next() {
        events += 1;
        assert!(event.len() < 512);
        assert_eq!(reply.held_bytes(), held, "after {events} events");
    }
    assert_eq!(events, 4096 + 4);
    // Not a chat request: no reply.
    assert!(llm_proxy::Reply::new(json!([5]), 10).is_none());
}

fn served(demo: &llm_proxy::Demo) -> u64 {
    demo.served.load(std::sync::atomic::Ordering::Relaxed)
}

async fn available_of(demo: &llm_proxy::Demo, account: &str) -> u64 {
    demo.ledger
        .balance(&AccountId::new(account), NOW)
        .await
        .unwrap()
        .available
        .get()
}

/// A request on `path` with the key in `x-api-key`, as the Anthropic SDKs send it.
fn post(path: &str, key: &str, body: &Value) -> http::Request<axum::body::Body> {
    request(
        Method::POST,
        path,
        &[
            ("x-api-key", key),
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ],
        &body.to_string(),
    )
}

/// The `(event, data)` pairs of a stream with `event:` lines.
fn typed_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (event, data) = e.split_once('\n').unwrap();
            let event = event.strip_prefix("event: ").unwrap().to_owned();
            let data = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            (event, data)
        })
        .collect()
}

#[tokio::test]
async fn a_basic_plan_is_served_the_small_model_and_refused_the_large_one_before_any_work() {
    let demo = demo().await;
    let before = available_of(&demo, "acct_basic").await;
    let a = send(
        &demo.router,
        chat(
            "demo-basic",
            &body("small-model", "hello there", false),
            &[],
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(served(&demo), 1);
    let charged = cost(9, 3, (1, 2));
    assert_eq!(before - available_of(&demo, "acct_basic").await, charged);
    let large = body("large-model", "hello there", false);
    let anthropic = json!({"model": "large-model", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]});
    let responses = json!({"model": "large-model", "input": "hi", "stream": true});
    for req in [
        chat("demo-basic", &large, &[]),
        post("/v1/messages", "demo-basic", &anthropic),
        post("/v1/responses", "demo-basic", &responses),
    ] {
        let a = send(&demo.router, req).await;
        let doc = a.problem(402, "PLAN_UPGRADE_REQUIRED");
        assert_eq!(doc["model"], "large-model");
        assert_eq!(doc["current_plan"], "basic");
        assert_eq!(doc["required_plan"], "pro");
        assert_eq!(doc["upgrade_url"], "https://billing.example.com/upgrade");
        assert_eq!(doc["error"]["code"], "PLAN_UPGRADE_REQUIRED");
        assert!(doc["detail"].as_str().unwrap().contains("large-model"));
    }
    // Refused before the model ran and before anything was held.
    assert_eq!(served(&demo), 1);
    assert_eq!(before - available_of(&demo, "acct_basic").await, charged);
    // The pro plan has it.
    let a = send(&demo.router, chat("demo-pro", &large, &[])).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn a_free_plan_is_served_until_its_output_tokens_are_used_then_quota_exceeded() {
    let demo = demo().await;
    // 13 words: an answer of 14 tokens, no max_tokens (the default estimate, 256, is more than
    // the 200 the month allows: the reservation is lowered to what is left, not refused).
    let words = "one two three four five six seven eight nine ten eleven twelve thirteen";
    let b = json!({"model": "small-model", "messages": [{"role": "user", "content": words}]});
    let mut outputs = Vec::new();
    loop {
        let a = send(&demo.router, chat("demo-free", &b, &[])).await;
        if a.status != 200 {
            let doc = a.problem(402, "QUOTA_EXCEEDED");
            assert_eq!(doc["meter"], "output_tokens");
            assert_eq!(doc["limit"], 200);
            assert_eq!(doc["used"], 200);
            assert!(doc["resets_at"].is_string());
            assert_eq!(
                a.header("ratelimit-policy"),
                Some(r#""output_tokens";q=200;qu="output_tokens";w=2592000"#)
            );
            assert!(a
                .header("ratelimit")
                .unwrap()
                .starts_with(r#""output_tokens";r=0;t="#));
            assert!(a.header("retry-after").is_some());
            break;
        }
        outputs.push(a.json()["usage"]["completion_tokens"].as_u64().unwrap());
        assert!(outputs.len() < 100, "never refused");
    }
    // 14 answers of 14 tokens, then the 4 tokens left: every one of the 200 served, no more.
    let mut expected = vec![14; 14];
    expected.push(4);
    assert_eq!(outputs, expected);
    assert_eq!(outputs.iter().sum::<u64>(), 200);
    assert_eq!(served(&demo), 15);
    // Another shape on the same plan: refused as well, the model not run.
    let a = send(
        &demo.router,
        post(
            "/v1/messages",
            "demo-free",
            &json!({"model": "small-model", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    assert_eq!(a.problem(402, "QUOTA_EXCEEDED")["meter"], "output_tokens");
    assert_eq!(served(&demo), 15);
    // Nothing was paid from credit: there is none, and the allowance covered it all.
    let b = demo
        .ledger
        .balance(&AccountId::new("acct_free"), NOW)
        .await
        .unwrap();
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (0, 0, 0)
    );
    // The large model is not on the free plan at all.
    let a = send(
        &demo.router,
        chat("demo-free", &body("large-model", "hi", false), &[]),
    )
    .await;
    assert_eq!(
        a.problem(402, "PLAN_UPGRADE_REQUIRED")["required_plan"],
        "pro"
    );
}

#[tokio::test]
async fn anthropic_messages_plain_and_streamed_are_charged_their_usage() {
    let demo = demo().await;
    let before = available(&demo).await;
    let words = vec!["word"; 300].join(" ");
    let b = json!({"model": "small-model", "max_tokens": 100, "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": words}]}]});
    let a = send(&demo.router, post("/v1/messages", "demo-pro", &b)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let doc = a.json();
    assert_eq!(doc["type"], "message");
    assert_eq!(doc["role"], "assistant");
    assert_eq!(doc["stop_reason"], "max_tokens");
    let text = doc["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("You said: word word"));
    // The system prompt (2 words + 4) and the message (300 + 4), plus 3.
    assert_eq!(doc["usage"]["input_tokens"], 313);
    assert_eq!(doc["usage"]["output_tokens"], 100);
    let plain = cost(313, 100, (1, 2));
    assert_eq!(before - available(&demo).await, plain);

    let mut b = b;
    b["stream"] = true.into();
    b["max_tokens"] = 1000.into();
    let a = send(&demo.router, post("/v1/messages", "demo-pro", &b)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("text/event-stream"));
    let events = typed_events(std::str::from_utf8(&a.body).unwrap());
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        kinds[..3],
        [
            "message_start",
            "content_block_start",
            "content_block_delta"
        ]
    );
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    for (event, data) in &events {
        assert_eq!(data["type"], event.as_str());
    }
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 313);
    let delta = &events[kinds.len() - 2].1;
    assert_eq!(delta["usage"]["output_tokens"], 301);
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    let streamed: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(streamed.split_whitespace().count(), 302);
    assert_eq!(
        before - available(&demo).await,
        plain + cost(313, 301, (1, 2))
    );
    assert_eq!(served(&demo), 2);
}

#[tokio::test]
async fn openai_responses_plain_and_streamed_are_charged_their_usage() {
    let demo = demo().await;
    let before = available(&demo).await;
    let b = json!({"model": "large-model", "input": "hello responses api", "max_output_tokens": 3});
    let a = send(&demo.router, chat_at("/v1/responses", &b)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let doc = a.json();
    assert_eq!(doc["object"], "response");
    assert_eq!(doc["status"], "incomplete");
    assert_eq!(doc["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(
        doc["output"][0]["content"][0]["text"],
        "You said: hello responses"
    );
    assert_eq!(doc["usage"]["input_tokens"], 10);
    assert_eq!(doc["usage"]["output_tokens"], 3);
    let plain = cost(10, 3, (10, 30));
    assert_eq!(before - available(&demo).await, plain);

    let b = json!({"model": "small-model", "stream": true, "instructions": "be kind",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "stream it please"}]}]});
    let a = send(&demo.router, chat_at("/v1/responses", &b)).await;
    assert_eq!(a.status, 200);
    let events = typed_events(std::str::from_utf8(&a.body).unwrap());
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds[0], "response.created");
    assert_eq!(*kinds.last().unwrap(), "response.completed");
    for (i, (event, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], event.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    let deltas: String = events
        .iter()
        .filter(|(e, _)| e == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "You said: stream it please");
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], deltas);
    // instructions (2 + 4) and the message (3 + 4), plus 3; "You said:" and 3 words.
    assert_eq!(done["usage"]["input_tokens"], 16);
    assert_eq!(done["usage"]["output_tokens"], 4);
    assert_eq!(before - available(&demo).await, plain + cost(16, 4, (1, 2)));
    assert_eq!(served(&demo), 2);
}

fn chat_at(path: &str, body: &Value) -> http::Request<axum::body::Body> {
    request(
        Method::POST,
        path,
        &[
            ("authorization", "Bearer demo-pro"),
            ("content-type", "application/json"),
        ],
        &body.to_string(),
    )
}
