//! The llm_proxy example's contract: OpenAI-compatible completions, plain and streamed,
//! charged exactly what the `usage` says.

#[allow(dead_code)]
#[path = "../examples/llm_proxy.rs"]
mod llm_proxy;

mod common;

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
