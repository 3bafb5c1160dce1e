//! Helpers shared by the integration tests.
#![allow(dead_code)]

use axum::body::Body;
use axum::Router;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// A response read to its end.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    /// Asserts a problem document with this status and code, and the members every problem
    /// carries; returns the document.
    pub fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "status; body {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "content-type"
        );
        assert_eq!(self.header("cache-control"), Some("no-store"));
        let doc = self.json();
        assert_eq!(doc["status"], status, "status member equals HTTP status");
        assert_eq!(doc["code"], code, "{doc}");
        for member in ["type", "title", "detail"] {
            assert!(doc[member].is_string(), "missing `{member}` in {doc}");
        }
        let type_uri = doc["type"].as_str().unwrap();
        assert!(
            type_uri.starts_with("https://") || type_uri.starts_with("urn:"),
            "type must be an absolute URI: {type_uri}"
        );
        doc
    }
}

pub fn request(method: Method, uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body.to_owned())).expect("request")
}

pub async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(app: &Router, uri: &str, key: &str) -> Answer {
    send(app, request(Method::GET, uri, &[("x-api-key", key)], "")).await
}

/// A ledger that forwards every call to `inner` and counts some of them: keyed reservations
/// (`reserve`) and reads (`balance`, `allowance_usage`). It forwards `inner`'s local holds and
/// recorded responses but not its synchronous fast path (`in_process`), so on the in-memory
/// ledger every call goes through here.
#[derive(Clone)]
pub struct CountingLedger<L> {
    pub inner: L,
    reserves: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<L> CountingLedger<L> {
    pub fn new(inner: L) -> Self {
        CountingLedger {
            inner,
            reserves: Default::default(),
            reads: Default::default(),
        }
    }

    /// `reserve` calls so far.
    pub fn reserves(&self) -> usize {
        self.reserves.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `balance` and `allowance_usage` calls so far.
    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl<L: tower_402::Ledger> tower_402::Ledger for CountingLedger<L> {
    async fn reserve(
        &self,
        req: &tower_402::ledger::ReserveRequest,
    ) -> Result<tower_402::ledger::ReserveOutcome, tower_402::LedgerError> {
        self.reserves
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.reserve(req).await
    }
    async fn settle(
        &self,
        id: &tower_402::ledger::ReservationId,
        usage: &[tower_402::ledger::Usage],
        policy: tower_402::ledger::OverEstimate,
        now: tower_402::Timestamp,
    ) -> Result<tower_402::ledger::Settlement, tower_402::LedgerError> {
        self.inner.settle(id, usage, policy, now).await
    }
    async fn release(
        &self,
        id: &tower_402::ledger::ReservationId,
        now: tower_402::Timestamp,
    ) -> Result<(), tower_402::LedgerError> {
        self.inner.release(id, now).await
    }
    async fn deposit(
        &self,
        account: &tower_402::AccountId,
        amount: tower_402::Credits,
        key: &str,
        now: tower_402::Timestamp,
    ) -> Result<tower_402::ledger::Deposit, tower_402::LedgerError> {
        self.inner.deposit(account, amount, key, now).await
    }
    async fn balance(
        &self,
        account: &tower_402::AccountId,
        now: tower_402::Timestamp,
    ) -> Result<tower_402::ledger::Balance, tower_402::LedgerError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.balance(account, now).await
    }
    async fn allowance_usage(
        &self,
        account: &tower_402::AccountId,
        meter: &tower_402::plan::Meter,
        window_start: tower_402::Timestamp,
        now: tower_402::Timestamp,
    ) -> Result<tower_402::ledger::AllowanceUsage, tower_402::LedgerError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .allowance_usage(account, meter, window_start, now)
            .await
    }
    fn local_holds(&self) -> Option<&dyn tower_402::in_process::LocalHolds> {
        self.inner.local_holds()
    }
    fn records(&self) -> Option<&dyn tower_402::ledger::ResponseRecords> {
        self.inner.records()
    }
}
