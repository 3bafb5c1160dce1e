//! The Stripe webhook (issue 14): the quickstart contract over a real socket, every event
//! type, every refusal, duplicates, out-of-order delivery, rotation, the tolerance, outages,
//! and plan changes with requests in flight.
//!
//! The app is the quickstart's own router (`examples/quickstart.rs`: its demo accounts
//! behind the three layers, with `examples/common/webhook.rs` merged in), served on
//! 127.0.0.1:0. Time is a
//! `ManualClock`, never a sleep.
#![cfg(feature = "stripe")]

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

use quickstart::common as examples;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use tower_402::plan::{PlanStore, SubscriptionStatus};
use tower_402::store::CachingPlanStore;
use tower_402::webhook::{sign_stripe, Stripe, WebhookService};
use tower_402::{
    AccountId, Billing, Ledger, ManualClock, MemoryLedger, MemoryPlanStore, Timestamp,
};

use examples::{plain, webhook};

const SECRET: &str = webhook::DEFAULT_SECRET;
const DAY: u64 = 86_400;

/// 2026-11-24T12:00:00Z.
fn start() -> Timestamp {
    Timestamp::from_utc(2026, 11, 24, 12, 0, 0).unwrap()
}

struct App {
    addr: SocketAddr,
    clock: ManualClock,
    plans: MemoryPlanStore,
    ledger: MemoryLedger,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The quickstart itself (its demo accounts, paid routes and webhook), on a real socket.
async fn app() -> App {
    let clock = ManualClock::new(start());
    let demo = quickstart::demo(clock.clone()).await;
    serve(demo.router, clock, demo.plans, demo.ledger).await
}

async fn serve(
    router: Router,
    clock: ManualClock,
    plans: MemoryPlanStore,
    ledger: MemoryLedger,
) -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    App {
        addr,
        clock,
        plans,
        ledger,
        server,
    }
}

/// A response read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Asserts a problem document; returns it.
    fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(self.header("cache-control"), Some("no-store"));
        let doc = self.json();
        assert_eq!(
            (doc["status"].as_u64(), doc["code"].as_str()),
            (Some(u64::from(status)), Some(code))
        );
        assert!(doc["type"]
            .as_str()
            .unwrap()
            .starts_with("https://docs.example.com/problems/"));
        assert!(doc["title"].is_string() && doc["detail"].is_string());
        doc
    }

    /// Asserts a 200 receipt with this outcome.
    fn received(&self, outcome: &str) {
        assert_eq!(self.status, 200, "{}", self.body);
        assert_eq!(self.json()["outcome"], outcome, "{}", self.body);
    }
}

/// One HTTP/1.1 request on a fresh connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    let status = head[9..12].parse().unwrap();
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

impl App {
    fn now(&self) -> Timestamp {
        use tower_402::Clock;
        self.clock.now()
    }

    async fn get(&self, path: &str, key: &str) -> Answer {
        http(self.addr, "GET", path, &[("x-api-key", key.to_owned())], "").await
    }

    /// Delivers `event` signed with the quickstart's secret, now.
    async fn deliver(&self, event: &Value) -> Answer {
        self.deliver_signed(event, SECRET, self.now()).await
    }

    async fn deliver_signed(&self, event: &Value, secret: &str, at: Timestamp) -> Answer {
        let body = event.to_string();
        let sig = sign_stripe(secret, at, body.as_bytes());
        self.post(&body, &[("stripe-signature", sig)]).await
    }

    async fn post(&self, body: &str, headers: &[(&str, String)]) -> Answer {
        let mut h = vec![("content-type", "application/json".to_owned())];
        h.extend(headers.iter().cloned());
        http(self.addr, "POST", "/webhooks/stripe", &h, body).await
    }

    async fn balance(&self, key: &str) -> u64 {
        let a = self.get("/v1/balance", key).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()["balance"].as_u64().unwrap()
    }

    async fn status(&self, account: &str) -> SubscriptionStatus {
        self.plans
            .subscription(&AccountId::new(account))
            .await
            .unwrap()
            .unwrap()
            .status
    }
}

fn event(id: &str, kind: &str, created: Timestamp, object: Value) -> Value {
    json!({
        "id": id, "object": "event", "api_version": "2025-03-31.basil", "livemode": false,
        "created": created.unix(), "type": kind, "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "data": { "object": object, "previous_attributes": {} }
    })
}

fn subscription(
    sub_id: &str,
    account: &str,
    status: &str,
    plan: &str,
    period_end: Timestamp,
) -> Value {
    json!({
        "id": sub_id, "object": "subscription", "customer": "cus_demo", "status": status,
        "metadata": { "account_id": account },
        "cancel_at_period_end": false, "canceled_at": null, "ended_at": null, "trial_end": null,
        "items": { "object": "list", "data": [{
            "id": "si_1", "object": "subscription_item",
            "current_period_start": period_end.unix() - 30 * DAY, "current_period_end": period_end.unix(),
            "price": { "id": "price_1", "object": "price", "lookup_key": plan, "unit_amount": 900 }
        }] }
    })
}

fn checkout(account: &str, credits: &str, payment_intent: &str) -> Value {
    json!({
        "id": "cs_test_1", "object": "checkout.session", "mode": "payment",
        "payment_status": "paid", "status": "complete", "payment_intent": payment_intent,
        "amount_total": 2500, "currency": "usd",
        "metadata": { "account_id": account, "credits": credits }
    })
}

fn invoice(account: &str, sub_id: &str) -> Value {
    json!({
        "id": "in_1", "object": "invoice", "customer": "cus_demo", "billing_reason": "subscription_cycle",
        "parent": { "type": "subscription_details",
                    "subscription_details": { "subscription": sub_id, "metadata": { "account_id": account } } }
    })
}

// ---- the quickstart contract ----

#[tokio::test]
async fn quickstart_contract_over_a_socket() {
    let app = app().await;
    let now = app.now();

    // acct_expired becomes active on basic: demo-expired is served.
    app.get("/v1/forecast", "demo-expired")
        .await
        .problem(402, "SUBSCRIPTION_EXPIRED");
    let renewed = event(
        "evt_expired_1",
        "customer.subscription.updated",
        now,
        subscription(
            "sub_expired",
            "acct_expired",
            "active",
            "basic",
            now.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&renewed).await.received("applied");
    let a = app.get("/v1/forecast", "demo-expired").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body.contains("\"account\":\"acct_expired\""),
        "{}",
        a.body
    );

    // acct_broke buys 25 credits, once however often it is delivered.
    assert_eq!(app.balance("demo-broke").await, 0);
    let bought = event(
        "evt_broke_1",
        "checkout.session.completed",
        now,
        checkout("acct_broke", "25", "pi_broke"),
    );
    app.deliver(&bought).await.received("applied");
    assert_eq!(app.balance("demo-broke").await, 25);
    app.deliver(&bought).await.received("duplicate");
    assert_eq!(app.balance("demo-broke").await, 25);

    // acct_basic: an older past_due event after a newer active one is ignored.
    let active = event(
        "evt_basic_2",
        "customer.subscription.updated",
        now,
        subscription(
            "sub_basic",
            "acct_basic",
            "active",
            "basic",
            now.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&active).await.received("applied");
    let older = event(
        "evt_basic_1",
        "customer.subscription.updated",
        Timestamp::from_unix(now.unix() - 60),
        subscription(
            "sub_basic",
            "acct_basic",
            "past_due",
            "basic",
            now.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&older).await.received("stale");
    assert_eq!(app.status("acct_basic").await, SubscriptionStatus::Active);
    assert_eq!(app.get("/v1/forecast", "demo-basic").await.status, 200);

    // Refusals: another secret, no header, ten minutes old. None changes anything.
    let topup = event(
        "evt_refused",
        "checkout.session.completed",
        now,
        checkout("acct_broke", "1000", "pi_refused"),
    );
    let doc = app
        .deliver_signed(&topup, "whsec_someone_else", now)
        .await
        .problem(400, "INVALID_SIGNATURE");
    assert!(
        doc["detail"]
            .as_str()
            .unwrap()
            .contains("no signature matches"),
        "{doc}"
    );
    app.post(&topup.to_string(), &[])
        .await
        .problem(400, "INVALID_SIGNATURE");
    let ten_minutes_ago = Timestamp::from_unix(now.unix() - 600);
    let doc = app
        .deliver_signed(&topup, SECRET, ten_minutes_ago)
        .await
        .problem(400, "INVALID_SIGNATURE");
    assert!(
        doc["detail"].as_str().unwrap().contains("tolerance"),
        "{doc}"
    );
    assert_eq!(app.balance("demo-broke").await, 25);
}

// ---- each event type ----

#[tokio::test]
async fn subscription_lifecycle_created_paused_resumed_deleted() {
    let app = app().await;
    let now = app.now();
    let end = now.plus_secs(30 * DAY);
    let sub = |status: &str| subscription("sub_9", "acct_trial_over", status, "pro", end);
    app.get("/v1/premium", "demo-trial-over")
        .await
        .problem(402, "TRIAL_EXPIRED");

    let mut trial = sub("trialing");
    trial["trial_end"] = json!(now.unix() + 7 * DAY);
    app.deliver(&event("evt_1", "customer.subscription.created", now, trial))
        .await
        .received("applied");
    assert_eq!(
        app.status("acct_trial_over").await,
        SubscriptionStatus::Trialing
    );
    // On pro now (tier 2): premium is served. acct_trial_over has no credit, though.
    app.get("/v1/premium", "demo-trial-over")
        .await
        .problem(402, "INSUFFICIENT_CREDITS");

    app.deliver(&event(
        "evt_2",
        "customer.subscription.paused",
        now.plus_secs(1),
        sub("paused"),
    ))
    .await
    .received("applied");
    assert_eq!(
        app.status("acct_trial_over").await,
        SubscriptionStatus::Paused
    );
    app.get("/v1/premium", "demo-trial-over")
        .await
        .problem(402, "SUBSCRIPTION_PENDING");
    assert_eq!(app.get("/v1/balance", "demo-trial-over").await.status, 200);

    app.deliver(&event(
        "evt_3",
        "customer.subscription.resumed",
        now.plus_secs(2),
        sub("active"),
    ))
    .await
    .received("applied");
    assert_eq!(
        app.status("acct_trial_over").await,
        SubscriptionStatus::Active
    );

    let mut deleted = sub("canceled");
    deleted["canceled_at"] = json!(now.unix() + 3);
    deleted["ended_at"] = json!(now.unix() + 3);
    app.deliver(&event(
        "evt_4",
        "customer.subscription.deleted",
        now.plus_secs(3),
        deleted,
    ))
    .await
    .received("applied");
    let doc = app
        .get("/v1/forecast", "demo-trial-over")
        .await
        .problem(402, "SUBSCRIPTION_EXPIRED");
    assert_eq!(doc["plan"], "pro");
    let stored = app
        .plans
        .subscription(&"acct_trial_over".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.ended_at, Some(now.plus_secs(3)));
    assert_eq!(stored.current_period_end, Some(end));
}

#[tokio::test]
async fn a_failed_renewal_is_past_due_with_grace_and_a_paid_invoice_restores_it() {
    let app = app().await;
    let now = app.now();
    app.deliver(&event(
        "evt_1",
        "customer.subscription.updated",
        now,
        subscription("sub_p", "acct_pro", "active", "pro", now.plus_secs(DAY)),
    ))
    .await
    .received("applied");
    app.deliver(&event(
        "evt_2",
        "invoice.payment_failed",
        now.plus_secs(10),
        invoice("acct_pro", "sub_p"),
    ))
    .await
    .received("applied");
    let stored = app
        .plans
        .subscription(&"acct_pro".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.status, stored.past_due_since),
        (SubscriptionStatus::PastDue, Some(now.plus_secs(10)))
    );
    // Inside the grace period (the gate's default, 3 days): served, with a warning.
    let a = app.get("/v1/premium", "demo-pro").await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("x-payment-warning")
            .unwrap()
            .starts_with("past-due"),
        "{}",
        a.head
    );
    // Stripe retries the charge and it fails again: still past due since the first failure.
    app.clock.advance(2 * DAY);
    app.deliver(&event(
        "evt_3",
        "invoice.payment_failed",
        app.now(),
        invoice("acct_pro", "sub_p"),
    ))
    .await
    .received("applied");
    app.clock.advance(DAY + 11);
    app.get("/v1/premium", "demo-pro")
        .await
        .problem(402, "SUBSCRIPTION_PAST_DUE");
    // Paid: served again at once.
    app.deliver(&event(
        "evt_4",
        "invoice.paid",
        app.now(),
        invoice("acct_pro", "sub_p"),
    ))
    .await
    .received("applied");
    assert_eq!(app.get("/v1/premium", "demo-pro").await.status, 200);
    // The failure of evt_3, delivered again late, is stale.
    app.deliver(&event(
        "evt_3",
        "invoice.payment_failed",
        now.plus_secs(2 * DAY),
        invoice("acct_pro", "sub_p"),
    ))
    .await
    .received("stale");
    assert_eq!(app.status("acct_pro").await, SubscriptionStatus::Active);
}

#[tokio::test]
async fn payment_intents_deposit_once_per_payment() {
    let app = app().await;
    let now = app.now();
    let intent = json!({ "id": "pi_7", "object": "payment_intent", "status": "succeeded", "amount": 500,
                         "metadata": { "account_id": "acct_broke", "credits": "50" } });
    app.deliver(&event("evt_pi", "payment_intent.succeeded", now, intent))
        .await
        .received("applied");
    assert_eq!(app.balance("demo-broke").await, 50);
    // The Checkout Session of the same payment: the same deposit, not a second one.
    app.deliver(&event(
        "evt_cs",
        "checkout.session.completed",
        now,
        checkout("acct_broke", "50", "pi_7"),
    ))
    .await
    .received("duplicate");
    assert_eq!(app.balance("demo-broke").await, 50);
    // Paid by a delayed method: nothing at completion, the credits when it succeeds.
    let mut pending = checkout("acct_broke", "5", "pi_8");
    pending["payment_status"] = json!("unpaid");
    app.deliver(&event(
        "evt_p1",
        "checkout.session.completed",
        now,
        pending.clone(),
    ))
    .await
    .received("ignored");
    assert_eq!(app.balance("demo-broke").await, 50);
    app.deliver(&event(
        "evt_p2",
        "checkout.session.async_payment_succeeded",
        now,
        pending,
    ))
    .await
    .received("applied");
    assert_eq!(app.balance("demo-broke").await, 55);
    // The broke account can pay for a forecast now.
    assert_eq!(app.get("/v1/forecast", "demo-broke").await.status, 200);
}

#[tokio::test]
async fn ignored_and_refused_events() {
    let app = app().await;
    let now = app.now();
    app.deliver(&event(
        "evt_c",
        "customer.created",
        now,
        json!({ "id": "cus_1", "object": "customer" }),
    ))
    .await
    .received("ignored");
    // Not ours: no account in the metadata.
    let mut foreign = subscription("sub_x", "acct_basic", "canceled", "basic", now);
    foreign["metadata"] = json!({});
    app.deliver(&event(
        "evt_f",
        "customer.subscription.deleted",
        now,
        foreign,
    ))
    .await
    .received("ignored");
    assert_eq!(app.status("acct_basic").await, SubscriptionStatus::Active);
    // A plan the catalog does not have: 422, so that Stripe keeps retrying until it does.
    let gold = subscription("sub_g", "acct_basic", "active", "gold", now.plus_secs(DAY));
    let doc = app
        .deliver(&event("evt_g", "customer.subscription.updated", now, gold))
        .await
        .problem(422, "UNKNOWN_PLAN");
    assert_eq!(doc["plan"], "gold");
    // Signed but malformed.
    let bad = event(
        "evt_b",
        "checkout.session.completed",
        now,
        checkout("acct_broke", "2.5", "pi_b"),
    );
    app.deliver(&bad).await.problem(400, "INVALID_EVENT");
    let not_json = "{not json";
    let sig = sign_stripe(SECRET, now, not_json.as_bytes());
    app.post(not_json, &[("stripe-signature", sig)])
        .await
        .problem(400, "INVALID_EVENT");
    // A malformed header, a body too large, a GET.
    app.post("{}", &[("stripe-signature", "t=now,v1=zz".to_owned())])
        .await
        .problem(400, "INVALID_SIGNATURE");
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
    let sig = sign_stripe(SECRET, now, huge.as_bytes());
    app.post(&huge, &[("stripe-signature", sig)])
        .await
        .problem(413, "PAYLOAD_TOO_LARGE");
    let a = http(app.addr, "GET", "/webhooks/stripe", &[], "").await;
    a.problem(405, "METHOD_NOT_ALLOWED");
    assert_eq!(a.header("allow"), Some("POST"));
    assert_eq!(app.balance("demo-broke").await, 0);
}

#[tokio::test]
async fn the_tolerance_is_measured_on_the_clock() {
    let app = app().await;
    let e = event(
        "evt_t",
        "checkout.session.completed",
        app.now(),
        checkout("acct_broke", "1", "pi_t"),
    );
    let signed_at = app.now();
    app.clock.advance(301);
    app.deliver_signed(&e, SECRET, signed_at)
        .await
        .problem(400, "INVALID_SIGNATURE");
    app.clock.set(signed_at.plus_secs(300));
    app.deliver_signed(&e, SECRET, signed_at)
        .await
        .received("applied");
}

// ---- rotation, outages, logs (the service on its own) ----

async fn oneshot(
    service: &WebhookService<Stripe>,
    body: &str,
    signature: Option<String>,
) -> (u16, Value) {
    let mut req = http::Request::post("/webhooks/stripe");
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let res = service
        .clone()
        .oneshot(req.body(axum::body::Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let mut doc: Value = serde_json::from_slice(&bytes).unwrap();
    if let Some(r) = retry_after {
        doc["retry_after_header"] = json!(r);
    }
    (status, doc)
}

#[tokio::test]
async fn two_secrets_during_a_rotation() {
    let clock = ManualClock::new(start());
    let ledger = MemoryLedger::new();
    let service = WebhookService::new(
        Stripe::new("whsec_old").also_accept("whsec_new"),
        MemoryPlanStore::new(),
        ledger.clone(),
        plain::catalog(),
    )
    .clock(clock.clone());
    let now = start();
    for (i, secret) in ["whsec_old", "whsec_new"].iter().enumerate() {
        let body = event(
            &format!("evt_{i}"),
            "checkout.session.completed",
            now,
            checkout("acme", "10", &format!("pi_{i}")),
        )
        .to_string();
        let (status, doc) = oneshot(
            &service,
            &body,
            Some(sign_stripe(secret, now, body.as_bytes())),
        )
        .await;
        assert_eq!(
            (status, doc["outcome"].as_str()),
            (200, Some("applied")),
            "{secret}"
        );
    }
    let body = event(
        "evt_x",
        "checkout.session.completed",
        now,
        checkout("acme", "10", "pi_x"),
    )
    .to_string();
    let (status, doc) = oneshot(
        &service,
        &body,
        Some(sign_stripe("whsec_retired", now, body.as_bytes())),
    )
    .await;
    assert_eq!(
        (status, doc["code"].as_str()),
        (400, Some("INVALID_SIGNATURE"))
    );
    assert_eq!(
        ledger
            .balance(&"acme".into(), now)
            .await
            .unwrap()
            .available
            .get(),
        20
    );
}

/// A real Redis store on a port nothing listens on: the webhook answers 503 so that Stripe
/// delivers again, and applies the event once the store is back.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_store_outage_is_503_so_that_stripe_retries() {
    use std::time::Duration;
    use tower_402::store::{RedisConfig, RedisLedger, RedisPlanStore};
    let down = RedisConfig::new("redis://127.0.0.1:1")
        .unwrap()
        .connect_timeout(Duration::from_millis(200));
    let now = start();
    let clock = ManualClock::new(now);
    let service = WebhookService::new(
        Stripe::new(SECRET),
        RedisPlanStore::new(&down),
        RedisLedger::new(&down),
        plain::catalog(),
    )
    .clock(clock.clone());
    let sub = event(
        "evt_s",
        "customer.subscription.updated",
        now,
        subscription("sub_1", "acme", "active", "basic", now.plus_secs(DAY)),
    )
    .to_string();
    let (status, doc) = oneshot(
        &service,
        &sub,
        Some(sign_stripe(SECRET, now, sub.as_bytes())),
    )
    .await;
    assert_eq!(
        (status, doc["code"].as_str()),
        (503, Some("SERVICE_UNAVAILABLE")),
        "{doc}"
    );
    assert_eq!(doc["retry_after_header"], "5");
    let buy = event(
        "evt_b",
        "checkout.session.completed",
        now,
        checkout("acme", "10", "pi_1"),
    )
    .to_string();
    let (status, _) = oneshot(
        &service,
        &buy,
        Some(sign_stripe(SECRET, now, buy.as_bytes())),
    )
    .await;
    assert_eq!(status, 503);
    // The retry reaches working stores (the same event, re-signed as Stripe does): applied.
    let (plans, ledger) = (MemoryPlanStore::new(), MemoryLedger::new());
    let service = WebhookService::new(
        Stripe::new(SECRET),
        plans.clone(),
        ledger.clone(),
        plain::catalog(),
    )
    .clock(clock);
    for body in [&sub, &buy] {
        let (status, doc) = oneshot(
            &service,
            body,
            Some(sign_stripe(SECRET, now, body.as_bytes())),
        )
        .await;
        assert_eq!((status, doc["outcome"].as_str()), (200, Some("applied")));
    }
    assert_eq!(
        plans
            .subscription(&"acme".into())
            .await
            .unwrap()
            .unwrap()
            .plan
            .as_str(),
        "basic"
    );
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_name_the_event_and_never_the_secret_or_signature() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let now = start();
    let secret = "whsec_TOPSECRET";
    let service = WebhookService::new(
        Stripe::new(secret),
        MemoryPlanStore::new(),
        MemoryLedger::new(),
        plain::catalog(),
    )
    .clock(ManualClock::new(now));
    let body = event(
        "evt_logged",
        "checkout.session.completed",
        now,
        checkout("acme", "10", "pi_l"),
    )
    .to_string();
    let good = sign_stripe(secret, now, body.as_bytes());
    let forged = sign_stripe("whsec_FORGED", now, body.as_bytes());
    assert_eq!(oneshot(&service, &body, Some(good.clone())).await.0, 200);
    assert_eq!(oneshot(&service, &body, Some(forged.clone())).await.0, 400);
    assert_eq!(oneshot(&service, &body, None).await.0, 400);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("evt_logged") && logs.contains("applied"),
        "{logs}"
    );
    assert!(
        logs.contains("no signature matches") && logs.contains("no signature header"),
        "{logs}"
    );
    for secret_part in ["TOPSECRET", "FORGED", &good[16..], &forged[16..]] {
        assert!(!logs.contains(secret_part), "{secret_part} in {logs}");
    }
}

// ---- plan changes without a gap ----

/// Upgrades and downgrades land while a paying caller keeps calling: every call is served,
/// and with a `CachingPlanStore` (60 s TTL) in front of the gate the next call already sees
/// the new plan, because the webhook writes through the same cache.
#[tokio::test]
async fn plan_changes_refuse_no_paying_caller_and_show_at_once_through_the_cache() {
    let clock = ManualClock::new(start());
    let accounts = plain::accounts(&clock).await;
    let cached = CachingPlanStore::new(accounts.plans.clone(), 60).clock(clock.clone());
    let problems = plain::problems();
    let billing = Billing::new(
        accounts.keys,
        cached.clone(),
        accounts.ledger.clone(),
        plain::catalog(),
    )
    .clock(clock.clone())
    .problem_config(problems)
    .route("GET /v1/forecast", plain::forecast())
    .route("GET /v1/premium", plain::premium());
    let paid = Router::new()
        .route("/v1/forecast", get(|| async { "sunny" }))
        .route("/v1/premium", get(|| async { "sunny, UV 6" }))
        .layer(billing.layer());
    let hook = WebhookService::new(
        Stripe::new(SECRET),
        cached.clone(),
        accounts.ledger.clone(),
        plain::catalog(),
    )
    .clock(clock.clone())
    .problems(plain::problems());
    let router = paid.merge(Router::new().route_service("/webhooks/stripe", hook));
    let app = serve(router, clock, accounts.plans, accounts.ledger).await;
    let now = app.now();
    let end = now.plus_secs(30 * DAY);

    // Warm the cache on basic: premium needs pro.
    assert_eq!(app.get("/v1/forecast", "demo-basic").await.status, 200);
    app.get("/v1/premium", "demo-basic")
        .await
        .problem(402, "PLAN_UPGRADE_REQUIRED");

    let plans = ["pro", "basic", "pro", "basic", "pro"];
    let caller = async {
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(app.get("/v1/forecast", "demo-basic").await.status);
        }
        statuses
    };
    let changes = async {
        for (i, plan) in plans.iter().enumerate() {
            let e = event(
                &format!("evt_{i}"),
                "customer.subscription.updated",
                now.plus_secs(i as u64),
                subscription("sub_b", "acct_basic", "active", plan, end),
            );
            app.deliver(&e).await.received("applied");
        }
    };
    let (statuses, ()) = tokio::join!(caller, changes);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    // Last change: pro. Seen at once, well inside the cache's TTL.
    assert_eq!(app.get("/v1/premium", "demo-basic").await.status, 200);
    // A renewal: the period moves on, the caller never notices.
    let renewed = event(
        "evt_renew",
        "customer.subscription.updated",
        now.plus_secs(100),
        subscription(
            "sub_b",
            "acct_basic",
            "active",
            "pro",
            end.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&renewed).await.received("applied");
    assert_eq!(app.get("/v1/premium", "demo-basic").await.status, 200);
    // Downgrade: premium refused at once, forecast still served.
    let down = event(
        "evt_down",
        "customer.subscription.updated",
        now.plus_secs(200),
        subscription(
            "sub_b",
            "acct_basic",
            "active",
            "basic",
            end.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&down).await.received("applied");
    app.get("/v1/premium", "demo-basic")
        .await
        .problem(402, "PLAN_UPGRADE_REQUIRED");
    assert_eq!(app.get("/v1/forecast", "demo-basic").await.status, 200);

    // An upgrade made as "create the new subscription, cancel the old one": the old one's
    // deletion, delivered last, does not end the new one.
    let new_sub = event(
        "evt_new",
        "customer.subscription.created",
        now.plus_secs(300),
        subscription("sub_new", "acct_basic", "active", "pro", end),
    );
    app.deliver(&new_sub).await.received("applied");
    let mut old = subscription("sub_b", "acct_basic", "canceled", "basic", end);
    old["ended_at"] = json!(now.unix() + 301);
    app.deliver(&event(
        "evt_old_gone",
        "customer.subscription.deleted",
        now.plus_secs(301),
        old,
    ))
    .await
    .received("ignored");
    assert_eq!(app.get("/v1/premium", "demo-basic").await.status, 200);
}

/// Allowances are counted per meter and calendar window: a change of plan inside the month
/// carries the units used over to the new plan's limit.
#[tokio::test]
async fn allowances_carry_over_a_plan_change_inside_the_window() {
    let app = app().await;
    for _ in 0..5 {
        assert_eq!(app.get("/v1/forecast", "demo-free").await.status, 200);
    }
    app.get("/v1/forecast", "demo-free")
        .await
        .problem(402, "QUOTA_EXCEEDED");
    // Upgraded to basic (no allowance, pays from credit): the next call is paid from credit,
    // of which acct_free has none; a top-up later, it is served.
    let now = app.now();
    let e = event(
        "evt_up",
        "customer.subscription.updated",
        now,
        subscription(
            "sub_f",
            "acct_free",
            "active",
            "basic",
            now.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&e).await.received("applied");
    app.get("/v1/forecast", "demo-free")
        .await
        .problem(402, "INSUFFICIENT_CREDITS");
    let buy = event(
        "evt_buy",
        "checkout.session.completed",
        now,
        checkout("acct_free", "3", "pi_f"),
    );
    app.deliver(&buy).await.received("applied");
    assert_eq!(app.get("/v1/forecast", "demo-free").await.status, 200);
    // Back on free within the month: the five used still count.
    let e = event(
        "evt_down",
        "customer.subscription.updated",
        now.plus_secs(1),
        subscription(
            "sub_f",
            "acct_free",
            "active",
            "free",
            now.plus_secs(30 * DAY),
        ),
    );
    app.deliver(&e).await.received("applied");
    app.get("/v1/forecast", "demo-free")
        .await
        .problem(402, "QUOTA_EXCEEDED");
    let used = app
        .ledger
        .allowance_usage(
            &"acct_free".into(),
            &"requests".into(),
            now.start_of_month(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(used.taken(), 5);
}
