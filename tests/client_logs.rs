//! The client layer logs each refusal with its code and links, and never the credential.
//!
//! Alone in its own test binary, like tests/logs.rs: `tracing`'s per-callsite interest cache
//! is global.

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use http::Request;
use tower::{Service, ServiceExt};
use tower_402::client::RetryLayer;
use tower_402::{ManualClock, Timestamp};
use tower_layer::Layer;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_refusal_is_logged_with_code_and_links_and_never_the_key() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let clock = ManualClock::new(Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap());
    let demo = quickstart::demo(clock).await;
    let mut svc = RetryLayer::new().for_body::<Body>().layer(demo.router);
    for key in ["demo-broke", "demo-basic"] {
        let path = if key == "demo-broke" {
            "/v1/forecast"
        } else {
            "/v1/premium"
        };
        let req = Request::get(path)
            .header("authorization", format!("Bearer {key}"))
            .header("x-request-id", "req-42")
            .body(Body::empty())
            .unwrap();
        let res = ServiceExt::<Request<Body>>::ready(&mut svc)
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap();
        assert_eq!(res.status(), 402);
    }
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let client: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("tower_402::client"))
        .collect();
    assert_eq!(client.len(), 2, "{logs}");
    assert!(
        client[0].contains("code=INSUFFICIENT_CREDITS"),
        "{}",
        client[0]
    );
    assert!(client[0].contains("top_up_url=\"https://"), "{}", client[0]);
    assert!(client[0].contains("request_id=\"req-42\""), "{}", client[0]);
    assert!(
        client[1].contains("code=PLAN_UPGRADE_REQUIRED"),
        "{}",
        client[1]
    );
    assert!(
        client[1].contains("upgrade_url=\"https://"),
        "{}",
        client[1]
    );
    assert!(
        !logs.contains("demo-broke") && !logs.contains("demo-basic"),
        "{logs}"
    );
}
