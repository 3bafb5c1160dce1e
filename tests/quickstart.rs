//! The quickstart's contract (issue 2): every route and demo key, every denial reachable in the
//! core slice, and bad input, through the real example's router.

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

mod common;

use common::{get, request, send};
use http::Method;
use tower_402::{AccountId, Ledger, ManualClock, Timestamp};

/// 2026-11-24T12:00:00Z: a week before the month ends.
fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap())
}

async fn demo() -> (quickstart::Demo, ManualClock) {
    let clock = clock();
    (quickstart::demo(clock.clone()).await, clock)
}

async fn available(demo: &quickstart::Demo, account: &str) -> u64 {
    demo.ledger
        .balance(&AccountId::new(account), Timestamp::from_unix(0))
        .await
        .unwrap()
        .available
        .get()
}

#[tokio::test]
async fn health_needs_no_key() {
    let (demo, _) = demo().await;
    let a = send(&demo.router, request(Method::GET, "/health", &[], "")).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], b"ok");
}

#[tokio::test]
async fn pro_gets_forecast_and_premium_and_pays_for_them() {
    let (demo, _) = demo().await;
    let a = get(&demo.router, "/v1/forecast", "demo-pro").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("999"));
    let a = get(&demo.router, "/v1/premium", "demo-pro").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("989"));
    assert_eq!(available(&demo, "acct_pro").await, 989);
}

#[tokio::test]
async fn bearer_works_like_x_api_key() {
    let (demo, _) = demo().await;
    let a = send(
        &demo.router,
        request(
            Method::GET,
            "/v1/forecast",
            &[("authorization", "Bearer demo-pro")],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn basic_needs_an_upgrade_for_premium() {
    let (demo, _) = demo().await;
    assert_eq!(
        get(&demo.router, "/v1/forecast", "demo-basic").await.status,
        200
    );
    let a = get(&demo.router, "/v1/premium", "demo-basic").await;
    let doc = a.problem(402, "PLAN_UPGRADE_REQUIRED");
    assert_eq!(doc["current_plan"], "basic");
    assert_eq!(doc["required_plan"], "pro");
    assert_eq!(doc["upgrade_url"], "https://example.com/pricing");
    assert_eq!(
        doc["type"],
        "https://docs.example.com/problems/plan-upgrade-required"
    );
    assert_eq!(doc["title"], "Plan upgrade required");
    // Refused before the handler: nothing charged.
    assert_eq!(available(&demo, "acct_basic").await, 999);
}

#[tokio::test]
async fn free_gets_five_then_quota_exceeded_until_the_month_resets() {
    let (demo, clock) = demo().await;
    for left in (0..5).rev() {
        let a = get(&demo.router, "/v1/forecast", "demo-free").await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("x-allowance-remaining"),
            Some(left.to_string().as_str())
        );
        assert_eq!(a.header("x-allowance-reset"), Some("2026-12-01T00:00:00Z"));
    }
    let a = get(&demo.router, "/v1/forecast", "demo-free").await;
    let doc = a.problem(402, "QUOTA_EXCEEDED");
    assert_eq!(doc["meter"], "requests");
    assert_eq!(doc["limit"], 5);
    assert_eq!(doc["used"], 5);
    assert_eq!(doc["resets_at"], "2026-12-01T00:00:00Z");
    assert_eq!(doc["upgrade_url"], "https://example.com/pricing");
    // 6 days 12 hours until the reset.
    let secs = (6 * 86_400 + 12 * 3600).to_string();
    assert_eq!(a.header("retry-after"), Some(secs.as_str()));
    assert_eq!(
        a.header("ratelimit-policy"),
        Some("\"requests\";q=5;w=2592000")
    );
    assert_eq!(
        a.header("ratelimit"),
        Some(format!("\"requests\";r=0;t={secs}").as_str())
    );
    // The free plan never touches credit.
    assert_eq!(available(&demo, "acct_free").await, 0);

    clock.set(Timestamp::from_utc(2026, 12, 1, 0, 0, 0).unwrap());
    assert_eq!(
        get(&demo.router, "/v1/forecast", "demo-free").await.status,
        200
    );
}

#[tokio::test]
async fn soft_limit_warns_before_the_hard_stop() {
    let (demo, _) = demo().await;
    let mut warned = Vec::new();
    for _ in 0..5 {
        let a = get(&demo.router, "/v1/forecast", "demo-free").await;
        warned.push(a.header("x-payment-warning").map(str::to_owned));
    }
    assert_eq!(warned[..3], [None, None, None]);
    assert_eq!(
        warned[3].as_deref(),
        Some("soft-limit; meter=\"requests\"; used=4; limit=5")
    );
}

#[tokio::test]
async fn broke_gets_insufficient_credits_then_tops_up() {
    let (demo, _) = demo().await;
    let a = get(&demo.router, "/v1/forecast", "demo-broke").await;
    let doc = a.problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(doc["balance"], 0);
    assert_eq!(doc["required"], 1);
    assert_eq!(doc["top_up_url"], "https://billing.example.com/top-up");
    assert_eq!(doc["support_url"], "https://example.com/support");
    assert_eq!(doc["docs_url"], "https://docs.example.com/errors");

    let top_up = |key: &'static str, body: &'static str| {
        request(
            Method::POST,
            "/v1/topup",
            &[
                ("x-api-key", "demo-broke"),
                ("idempotency-key", key),
                ("content-type", "application/json"),
            ],
            body,
        )
    };
    let a = send(&demo.router, top_up("order-1", r#"{"credits": 3}"#)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["balance"], 3);
    assert_eq!(a.json()["applied"], true);
    // The same key again: applied once.
    let a = send(&demo.router, top_up("order-1", r#"{"credits": 3}"#)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["applied"], false);
    assert_eq!(a.json()["balance"], 3);
    // The same key with another amount: a conflict.
    let a = send(&demo.router, top_up("order-1", r#"{"credits": 4}"#)).await;
    a.problem(409, "IDEMPOTENCY_KEY_REUSED");

    let a = get(&demo.router, "/v1/forecast", "demo-broke").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("2"));
}

#[tokio::test]
async fn dept_is_refused_by_its_team_budget_while_credit_remains() {
    let (demo, clock) = demo().await;
    for _ in 0..3 {
        let a = get(&demo.router, "/v1/forecast", "demo-dept").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["account"], "acct_dept", "the handler ran");
    }
    let a = get(&demo.router, "/v1/forecast", "demo-dept").await;
    let doc = a.problem(402, "BUDGET_EXHAUSTED");
    assert_eq!(doc["level"], "team");
    assert_eq!(doc["owner"], "research");
    assert_eq!(doc["budget"], 3);
    assert_eq!(doc["used"], 3);
    assert_eq!(doc["period"], "quarter");
    assert_eq!(doc["resets_at"], "2027-01-01T00:00:00Z");
    assert_eq!(
        doc["manage_url"],
        "https://example.com/teams/research/budget"
    );
    let detail = doc["detail"].as_str().unwrap();
    assert!(detail.contains("not the account's balance"), "{detail}");
    assert!(detail.contains("Research's budget holder"), "{detail}");
    // 37 days 12 hours until the next quarter.
    let secs = (37 * 86_400 + 12 * 3600).to_string();
    assert_eq!(a.header("retry-after"), Some(secs.as_str()));

    // The balance is untouched by the refusal, and says so.
    assert_eq!(available(&demo, "acct_dept").await, 997);
    let b = get(&demo.router, "/v1/balance", "demo-dept").await;
    assert_eq!(b.status, 200);
    assert_eq!(b.json()["balance"], 997, "{}", b.json());
    // Other accounts are not in the chart.
    assert_eq!(
        get(&demo.router, "/v1/forecast", "demo-basic").await.status,
        200
    );

    // A new quarter, a whole budget.
    clock.set(Timestamp::from_utc(2027, 1, 1, 0, 0, 0).unwrap());
    assert_eq!(
        get(&demo.router, "/v1/forecast", "demo-dept").await.status,
        200
    );
    assert_eq!(available(&demo, "acct_dept").await, 996);
}

#[tokio::test]
async fn expired_subscription() {
    let (demo, _) = demo().await;
    let doc = get(&demo.router, "/v1/forecast", "demo-expired")
        .await
        .problem(402, "SUBSCRIPTION_EXPIRED");
    assert_eq!(doc["plan"], "basic");
    assert_eq!(doc["ended_at"], "2026-11-14T12:00:00Z");
    assert_eq!(doc["billing_url"], "https://billing.example.com/portal");
}

#[tokio::test]
async fn grace_period_serves_with_a_warning() {
    let (demo, _) = demo().await;
    let a = get(&demo.router, "/v1/forecast", "demo-grace").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("x-payment-warning"),
        Some("past-due; grace-until=\"2026-11-26T12:00:00Z\"")
    );
}

#[tokio::test]
async fn past_due_after_grace() {
    let (demo, _) = demo().await;
    let doc = get(&demo.router, "/v1/forecast", "demo-past-due")
        .await
        .problem(402, "SUBSCRIPTION_PAST_DUE");
    assert_eq!(doc["grace_until"], "2026-11-17T12:00:00Z");
    assert_eq!(doc["billing_url"], "https://billing.example.com/portal");
}

#[tokio::test]
async fn trial_over() {
    let (demo, _) = demo().await;
    let doc = get(&demo.router, "/v1/forecast", "demo-trial-over")
        .await
        .problem(402, "TRIAL_EXPIRED");
    assert_eq!(doc["trial_ended_at"], "2026-11-23T12:00:00Z");
    assert_eq!(doc["upgrade_url"], "https://example.com/pricing");
}

#[tokio::test]
async fn unknown_and_missing_keys_are_401_and_indistinguishable_from_each_other_by_account() {
    let (demo, _) = demo().await;
    for uri in ["/v1/forecast", "/v1/premium", "/v1/balance"] {
        let a = get(&demo.router, uri, "demo-nobody").await;
        let doc = a.problem(401, "UNAUTHENTICATED");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"api\", error=\"invalid_token\"")
        );
        assert!(
            !doc.to_string().contains("demo-nobody"),
            "key echoed: {doc}"
        );
        let a = send(&demo.router, request(Method::GET, uri, &[], "")).await;
        a.problem(401, "UNAUTHENTICATED");
        assert_eq!(a.header("www-authenticate"), Some("Bearer realm=\"api\""));
    }
    // A key that looks like a real one is answered exactly like any other unknown key.
    let a = get(&demo.router, "/v1/forecast", "demo-pro-x").await;
    let b = get(&demo.router, "/v1/forecast", "zzz").await;
    assert_eq!(a.body, b.body);
}

#[tokio::test]
async fn malformed_credentials_are_401_and_change_nothing() {
    let (demo, _) = demo().await;
    let long = "k".repeat(300);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("x-api-key", "")],
        vec![("x-api-key", long.as_str())],
        vec![("x-api-key", "demo-pro"), ("x-api-key", "demo-basic")],
        vec![("authorization", "Basic ZGVtby1wcm86")],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Bearer demo-pro extra")],
        vec![
            ("x-api-key", "demo-pro"),
            ("authorization", "Bearer demo-basic"),
        ],
    ];
    for headers in cases {
        let a = send(
            &demo.router,
            request(Method::GET, "/v1/forecast", &headers, ""),
        )
        .await;
        a.problem(401, "UNAUTHENTICATED");
    }
    // Non-UTF-8 header bytes.
    let mut req = request(Method::GET, "/v1/forecast", &[], "");
    req.headers_mut().insert(
        "x-api-key",
        http::HeaderValue::from_bytes(b"demo-pro\xff").unwrap(),
    );
    send(&demo.router, req)
        .await
        .problem(401, "UNAUTHENTICATED");
    assert_eq!(available(&demo, "acct_pro").await, 1000);
    assert_eq!(available(&demo, "acct_basic").await, 1000);
}

#[tokio::test]
async fn balance_shows_plan_status_balance_and_allowance() {
    let (demo, _) = demo().await;
    get(&demo.router, "/v1/forecast", "demo-free").await;
    let a = get(&demo.router, "/v1/balance", "demo-free").await;
    assert_eq!(a.status, 200);
    let doc = a.json();
    assert_eq!(doc["account"], "acct_free");
    assert_eq!(doc["plan"], "free");
    assert_eq!(doc["status"], "active");
    assert_eq!(doc["balance"], 0);
    assert_eq!(doc["allowances"][0]["meter"], "requests");
    assert_eq!(doc["allowances"][0]["remaining"], 4);
    assert_eq!(doc["allowances"][0]["resets_at"], "2026-12-01T00:00:00Z");
    // An expired account still sees its own balance (and can top up).
    let a = get(&demo.router, "/v1/balance", "demo-expired").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["status"], "canceled");
    assert_eq!(a.json()["balance"], 1000);
}

#[tokio::test]
async fn top_up_bad_input_is_a_clear_4xx_and_changes_nothing() {
    let (demo, _) = demo().await;
    let post = |headers: Vec<(&'static str, String)>, body: String| {
        let mut req = request(
            Method::POST,
            "/v1/topup",
            &[("x-api-key", "demo-broke")],
            "",
        );
        for (k, v) in headers {
            req.headers_mut().append(k, v.parse().unwrap());
        }
        *req.body_mut() = axum::body::Body::from(body);
        req
    };
    let key = |k: &str| vec![("idempotency-key", k.to_owned())];
    let ok_body = || r#"{"credits": 5}"#.to_owned();
    let cases = vec![
        (vec![], ok_body(), 400, "IDEMPOTENCY_KEY_REQUIRED"),
        (key(""), ok_body(), 400, "INVALID_IDEMPOTENCY_KEY"),
        (
            key(&"k".repeat(256)),
            ok_body(),
            400,
            "INVALID_IDEMPOTENCY_KEY",
        ),
        (
            vec![
                ("idempotency-key", "a".into()),
                ("idempotency-key", "b".into()),
            ],
            ok_body(),
            400,
            "INVALID_IDEMPOTENCY_KEY",
        ),
        (key("k1"), r#"{"credits": 0}"#.into(), 400, "INVALID_AMOUNT"),
        (
            key("k2"),
            r#"{"credits": -5}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            key("k3"),
            r#"{"credits": 1.5}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            key("k4"),
            r#"{"credits": "5"}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            key("k5"),
            r#"{"credits": 18446744073709551616}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            key("k6"),
            r#"{"credits": 1000000001}"#.into(),
            400,
            "INVALID_AMOUNT",
        ),
        (key("k7"), "not json".into(), 400, "INVALID_REQUEST"),
        (
            key("k8"),
            r#"{"credits": 5, "bonus": 1}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (key("k9"), "".into(), 400, "INVALID_REQUEST"),
        // Issue 12: serde reads a struct from an array too, and `[5]` deposited 5. Only an
        // object is a top-up.
        (key("k11"), "[5]".into(), 400, "INVALID_REQUEST"),
        (key("k12"), "[5, 1]".into(), 400, "INVALID_REQUEST"),
        (key("k13"), "[]".into(), 400, "INVALID_REQUEST"),
        (key("k14"), "5".into(), 400, "INVALID_REQUEST"),
        (
            key("k15"),
            r#""{\"credits\": 5}""#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (key("k16"), "null".into(), 400, "INVALID_REQUEST"),
        (
            key("k17"),
            r#"{"credits": [5]}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            key("k18"),
            r#"{"credits": 5} {"credits": 5}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
    ];
    for (headers, body, status, code) in cases {
        let a = send(&demo.router, post(headers.clone(), body.clone())).await;
        a.problem(status, code);
    }
    // An oversized body is refused by the body limit, as a problem document.
    let big = format!(r#"{{"credits": 5, "pad": "{}"}}"#, "x".repeat(4096));
    let a = send(&demo.router, post(key("k10"), big)).await;
    a.problem(413, "PAYLOAD_TOO_LARGE");
    // Control characters cannot even be put in a header value; a key with one is refused by
    // http itself, so the next best thing: a key with non-ASCII bytes.
    let mut req = post(vec![], ok_body());
    req.headers_mut().insert(
        "idempotency-key",
        http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
    );
    send(&demo.router, req)
        .await
        .problem(400, "INVALID_IDEMPOTENCY_KEY");
    assert_eq!(available(&demo, "acct_broke").await, 0);
}

#[tokio::test]
async fn unknown_routes_are_problem_documents_too() {
    let (demo, _) = demo().await;
    let a = get(&demo.router, "/v1/nothing", "demo-pro").await;
    let doc = a.problem(404, "NOT_FOUND");
    assert_eq!(doc["title"], "Not Found");
    // Nothing charged for a route that does not exist (it has no cost).
    assert_eq!(available(&demo, "acct_pro").await, 1000);
}

#[tokio::test]
async fn problems_carry_request_and_trace_ids() {
    let (demo, _) = demo().await;
    let a = send(
        &demo.router,
        request(
            Method::GET,
            "/v1/forecast",
            &[
                ("x-api-key", "demo-broke"),
                ("x-request-id", "req-42"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ],
            "",
        ),
    )
    .await;
    let doc = a.problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(doc["instance"], "urn:request:req-42");
    assert_eq!(doc["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn the_example_serves_over_a_real_socket() {
    let (demo, _) = demo().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, demo.router).await });
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            b"GET /v1/premium HTTP/1.1\r\nhost: x\r\nx-api-key: demo-basic\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 402"), "{out}");
    assert!(out.contains("PLAN_UPGRADE_REQUIRED"));
    server.abort();
}

/// HEAD is governed by GET's rule and charged like GET: axum answers it with the GET handler,
/// which runs, so its work is paid for. It never walks around a rule.
#[tokio::test]
async fn head_follows_get_refused_where_get_is_and_charged_like_get() {
    let (demo, _) = demo().await;
    let head = |key: &'static str, uri: &'static str| {
        send(
            &demo.router,
            request(Method::HEAD, uri, &[("x-api-key", key)], ""),
        )
    };
    // A basic plan is refused the premium route, with the problem's headers (HEAD: no body).
    let a = head("demo-basic", "/v1/premium").await;
    assert_eq!(a.status, 402);
    assert_eq!(a.header("content-type"), Some("application/problem+json"));
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert!(a.body.is_empty(), "a HEAD answer has no body");
    assert_eq!(
        available(&demo, "acct_basic").await,
        1000,
        "nothing charged"
    );
    // No credit, no HEAD.
    let a = head("demo-broke", "/v1/forecast").await;
    assert_eq!(a.status, 402);
    assert_eq!(a.header("content-type"), Some("application/problem+json"));
    // Pro pays for a HEAD of the premium route as for a GET.
    let a = head("demo-pro", "/v1/premium").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("990"));
    assert_eq!(available(&demo, "acct_pro").await, 990);
    // Spellings of the path, and the method's case, reach the same rule.
    for uri in ["/v1/premium/", "//v1/premium", "/v1/%70remium"] {
        let a = send(
            &demo.router,
            request(Method::HEAD, uri, &[("x-api-key", "demo-basic")], ""),
        )
        .await;
        assert_eq!(a.status, 402, "{uri}");
    }
}

#[tokio::test]
async fn head_uses_the_free_allowance_exactly_like_get() {
    let (demo, _) = demo().await;
    for left in (0..5).rev() {
        let a = send(
            &demo.router,
            request(
                Method::HEAD,
                "/v1/forecast",
                &[("x-api-key", "demo-free")],
                "",
            ),
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-allowance-remaining"), Some(&*left.to_string()));
    }
    let a = get(&demo.router, "/v1/forecast", "demo-free").await;
    let doc = a.problem(402, "QUOTA_EXCEEDED");
    assert_eq!(doc["used"], 5);
    let a = send(
        &demo.router,
        request(
            Method::HEAD,
            "/v1/forecast",
            &[("x-api-key", "demo-free")],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 402);
}

#[tokio::test]
async fn one_idempotency_key_replays_its_forecast_and_refuses_another_query() {
    let (demo, _) = demo().await;
    let before = available(&demo, "acct_pro").await;
    let forecast = |uri: &'static str| {
        request(
            Method::GET,
            uri,
            &[("x-api-key", "demo-pro"), ("idempotency-key", "f-1")],
            "",
        )
    };
    let first = send(&demo.router, forecast("/v1/forecast?day=1")).await;
    assert_eq!(first.status, 200);
    let retry = send(&demo.router, forecast("/v1/forecast?day=1")).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    let other = send(&demo.router, forecast("/v1/forecast?day=2")).await;
    other.problem(409, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(other.header("x-should-retry"), Some("false"));
    assert_eq!(
        before - available(&demo, "acct_pro").await,
        1,
        "charged once"
    );
}

/// One request over a fresh connection: the status and the body.
async fn over_socket(addr: std::net::SocketAddr, path: &str, key: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    let head = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{key}connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The value of the first sample of `metric` whose labels contain every one of `labels`.
fn sample(scrape: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Issue 16's quickstart contract: `GET /metrics` in the Prometheus text format counts the
/// refusal and the settlement; `GET /v1/history` is the caller's own journal, newest first,
/// with `limit` and `since`.
#[tokio::test]
async fn metrics_and_history_over_a_real_socket() {
    let (demo, clock) = demo().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, demo.router).await });
    // Other tests in this process count too (the recorder is process-wide): compare with
    // what the counters were before, which they can only exceed.
    let refusals = [
        "code=\"INSUFFICIENT_CREDITS\"",
        "outcome=\"denied\"",
        "rule=\"credit\"",
    ];
    let (_, before) = over_socket(addr, "/metrics", None).await;
    let refused_before = sample(&before, "tower402_decisions_total", &refusals).unwrap_or(0.0);
    let settled_before = sample(&before, "tower402_credits_settled_total", &[]).unwrap_or(0.0);

    let (status, body) = over_socket(addr, "/v1/forecast", Some("demo-broke")).await;
    assert_eq!(status, 402);
    assert!(body.contains("INSUFFICIENT_CREDITS"), "{body}");
    clock.advance(10);
    let (status, body) = over_socket(addr, "/v1/forecast", Some("demo-pro")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("sunny"), "the handler ran: {body}");

    let (status, scrape) = over_socket(addr, "/metrics", None).await;
    assert_eq!(status, 200);
    let refused = sample(&scrape, "tower402_decisions_total", &refusals);
    assert!(
        refused.is_some_and(|n| n >= 1.0 && n >= refused_before + 1.0),
        "{scrape}"
    );
    let settled = sample(&scrape, "tower402_credits_settled_total", &[]);
    assert!(
        settled.is_some_and(|n| n >= 1.0 && n >= settled_before + 1.0),
        "{scrape}"
    );
    assert!(scrape.contains("# TYPE tower402_decisions_total counter"));
    assert!(
        !scrape.contains("acct_"),
        "no account label by default: {scrape}"
    );

    let (status, body) = over_socket(addr, "/v1/history", Some("demo-pro")).await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["account"], "acct_pro");
    let entries = doc["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        2,
        "the demo deposit, then the forecast: {doc}"
    );
    assert_eq!(entries[0]["kind"], "settle", "newest first: {doc}");
    assert_eq!(entries[0]["credits"], 1);
    assert_eq!(entries[0]["available_after"], 999);
    assert_eq!(entries[1]["kind"], "deposit");
    let settled_at = entries[0]["at"].as_u64().unwrap();

    let (_, body) = over_socket(addr, "/v1/history?limit=1", Some("demo-pro")).await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["entries"].as_array().unwrap().len(), 1);
    assert_eq!(doc["entries"][0]["kind"], "settle");
    let (_, body) = over_socket(
        addr,
        &format!("/v1/history?since={settled_at}"),
        Some("demo-pro"),
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let kinds: Vec<_> = doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["kind"])
        .collect();
    assert_eq!(kinds, ["settle"], "only what happened since: {doc}");

    // Another caller sees only their own journal; bad parameters are a 400 problem.
    let (_, body) = over_socket(addr, "/v1/history", Some("demo-broke")).await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["kind"] != "settle"));
    let (status, body) = over_socket(addr, "/v1/history?limit=0", Some("demo-pro")).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = over_socket(addr, "/v1/history?since=yesterday", Some("demo-pro")).await;
    assert_eq!(status, 400);
    let (status, _) = over_socket(addr, "/v1/history", None).await;
    assert_eq!(status, 401);
    server.abort();
}
