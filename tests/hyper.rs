//! Bare hyper (issue 5): the example's `service_fn` behind the three layers, served by
//! hyper-util, called by a hyper client over a real TCP socket.

#[allow(dead_code)]
#[path = "../examples/hyper.rs"]
mod example;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tower_402::{AccountId, Ledger, ManualClock, Timestamp};

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap())
}

struct Server {
    addr: SocketAddr,
    demo: example::Demo,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Server {
    let demo = example::demo(clock()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(example::serve(listener, demo.clone()));
    Server { addr, demo, task }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "{:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(self.header("cache-control"), Some("no-store"));
        let doc = self.json();
        assert_eq!(doc["status"], status);
        assert_eq!(doc["code"], code, "{doc}");
        doc
    }
}

impl Server {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::get(path).header("host", self.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn available(&self, account: &str) -> u64 {
        self.demo
            .ledger
            .balance(&AccountId::new(account), Timestamp::from_unix(0))
            .await
            .unwrap()
            .available
            .get()
    }
}

#[tokio::test]
async fn health_needs_no_key() {
    let server = start().await;
    let a = server.get("/health", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], b"ok");
}

#[tokio::test]
async fn pro_gets_forecast_and_premium_and_pays_for_them() {
    let server = start().await;
    let a = server
        .get("/v1/forecast", &[("x-api-key", "demo-pro")])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("999"));
    assert_eq!(a.json()["account"], "acct_pro");
    let a = server
        .get("/v1/premium", &[("authorization", "Bearer demo-pro")])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-credits-remaining"), Some("989"));
    assert_eq!(server.available("acct_pro").await, 989);
}

#[tokio::test]
async fn denials_are_problem_documents() {
    let server = start().await;
    let doc = server
        .get("/v1/premium", &[("x-api-key", "demo-basic")])
        .await
        .problem(402, "PLAN_UPGRADE_REQUIRED");
    assert_eq!(doc["required_plan"], "pro");
    assert_eq!(doc["upgrade_url"], "https://example.com/pricing");

    let doc = server
        .get("/v1/forecast", &[("x-api-key", "demo-broke")])
        .await
        .problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(doc["balance"], 0);
    assert_eq!(doc["top_up_url"], "https://billing.example.com/top-up");

    server
        .get("/v1/forecast", &[("x-api-key", "demo-expired")])
        .await
        .problem(402, "SUBSCRIPTION_EXPIRED");

    let a = server.get("/v1/forecast", &[]).await;
    a.problem(401, "UNAUTHENTICATED");
    assert!(a.header("www-authenticate").unwrap().starts_with("Bearer"));
    server
        .get("/v1/forecast", &[("x-api-key", "sk_nobody")])
        .await
        .problem(401, "UNAUTHENTICATED");
    assert_eq!(server.available("acct_basic").await, 1000);
}

#[tokio::test]
async fn the_free_allowance_runs_out() {
    let server = start().await;
    for _ in 0..5 {
        let a = server
            .get("/v1/forecast", &[("x-api-key", "demo-free")])
            .await;
        assert_eq!(a.status, 200);
    }
    let a = server
        .get("/v1/forecast", &[("x-api-key", "demo-free")])
        .await;
    let doc = a.problem(402, "QUOTA_EXCEEDED");
    assert_eq!(doc["limit"], 5);
    assert!(a.header("retry-after").is_some());
}

#[tokio::test]
async fn a_bare_404_from_the_handler_becomes_a_problem() {
    let server = start().await;
    let a = server
        .get("/v1/nowhere", &[("x-api-key", "demo-pro")])
        .await;
    a.problem(404, "NOT_FOUND");
}

#[tokio::test]
async fn a_grpc_request_gets_grpc_answers_even_from_a_plain_handler() {
    let server = start().await;
    let grpc = ("content-type", "application/grpc");
    // A denial from the gate.
    let a = server
        .get("/v1/premium", &[("x-api-key", "demo-basic"), grpc])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/grpc"));
    assert_eq!(a.header("grpc-status"), Some("9"));
    assert!(a.header("grpc-status-details-bin").is_some());
    assert!(a.body.is_empty());
    // The handler's bare 404: the outer layer maps it, and never forwards the body.
    let a = server
        .get("/v1/nowhere", &[("x-api-key", "demo-pro"), grpc])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("grpc-status"), Some("5"));
    assert!(a.body.is_empty());
}
