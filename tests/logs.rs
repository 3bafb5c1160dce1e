//! Every decision is logged with account, rule and code, and never with a credential.
//!
//! Alone in its own test binary: `tracing`'s per-callsite interest cache is global, so a test
//! running on another thread without a subscriber could otherwise hide these events.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use common::{request, send};
use http::Method;
use tower_402::decision::Requirement;
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

fn keys() -> StaticKeys {
    StaticKeys::new().with_key("sk_live_TOPSECRET", "acme")
}

fn metered_app(billing: Billing) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(billing.layer())
}

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
async fn every_decision_is_logged_with_account_rule_and_code_and_never_the_key() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
    let ledger = MemoryLedger::new();
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true));
    let billing =
        Billing::new(keys(), plans, ledger, catalog).default_requirement(Requirement::new().cost(
            tower_402::decision::Cost::new("requests", 1, Credits::new(1)),
        ));
    let app = metered_app(billing);
    common::get(&app, "/", "sk_live_TOPSECRET").await;
    common::get(&app, "/", "sk_live_WRONGSECRET").await;
    send(
        &app,
        request(
            Method::GET,
            "/",
            &[("authorization", "Basic c2tfbGl2ZV9UT1BTRUNSRVQ=")],
            "",
        ),
    )
    .await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("account=\"acme\""), "{logs}");
    assert!(logs.contains("rule=\"credit\""), "{logs}");
    assert!(logs.contains("code=\"INSUFFICIENT_CREDITS\""), "{logs}");
    assert!(logs.contains("rule=\"identity\""), "{logs}");
    assert!(!logs.contains("SECRET"), "a key reached the logs:\n{logs}");
    assert!(
        !logs.contains("c2tfbGl2ZV9"),
        "a credential reached the logs:\n{logs}"
    );
}

#[tokio::test]
async fn key_changes_are_logged_by_id_and_never_with_the_key() {
    use tower_402::keys::{KeyHasher, Keys, MemoryKeyStore};
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let keys = Keys::new(KeyHasher::hmac(b"LOGSECRET"), MemoryKeyStore::new());
    keys.add("k1", "sk_live_LOGCHECK_1", "acme").await.unwrap();
    keys.rotate("k1", "k2", "sk_live_LOGCHECK_2", 0)
        .await
        .unwrap();
    let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1));
    let app = metered_app(Billing::new(
        keys.clone(),
        plans,
        MemoryLedger::new(),
        catalog,
    ));
    let ok = common::get(&app, "/", "sk_live_LOGCHECK_2").await;
    assert_eq!(ok.status, 200);
    let old = common::get(&app, "/", "sk_live_LOGCHECK_1").await;
    old.problem(401, "UNAUTHENTICATED");
    keys.revoke("k2").await.unwrap();

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for said in [
        "API key added",
        "API key rotated",
        "API key revoked",
        "k1",
        "k2",
    ] {
        assert!(text.contains(said), "{said} in {text}");
    }
    assert!(!text.contains("LOGCHECK"), "{text}");
    assert!(!text.contains("LOGSECRET"), "{text}");
    assert!(!format!("{keys:?}").contains("LOGSECRET"));
}
