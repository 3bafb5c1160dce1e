//! Idempotency as the IETF Idempotency-Key draft and Stripe define it: a retry of a completed
//! request gets the recorded response and the handler does not run again; the same key with
//! another request (another body included) is 409; a response too large to record makes its
//! retry a 409 of its own, never a free re-run; in flight is 409 with `Retry-After`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::{request, send};
use futures_util::StreamExt;
use http::Method;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;

const START: Timestamp = Timestamp::from_unix(1_790_000_000);
const KEY: &str = "sk_live_SECRET123";

/// The in-memory ledger without its in-process fast path: the layers take the path of a
/// shared ledger (Redis, PostgreSQL), with futures for reserve, settle and records. While
/// the counter is above zero, a reservation is made and its reply lost (an outage error),
/// as when a connection drops after the server ran the script.
#[derive(Clone)]
struct Shared(MemoryLedger, Arc<AtomicU64>);

#[async_trait::async_trait]
impl Ledger for Shared {
    async fn reserve(
        &self,
        r: &ledger::ReserveRequest,
    ) -> Result<ledger::ReserveOutcome, LedgerError> {
        let outcome = self.0.reserve(r).await;
        let lose = self
            .1
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lose {
            return Err(LedgerError::Store(StoreError::unavailable("reply lost")));
        }
        outcome
    }
    async fn settle(
        &self,
        id: &ledger::ReservationId,
        usage: &[ledger::Usage],
        policy: ledger::OverEstimate,
        now: Timestamp,
    ) -> Result<ledger::Settlement, LedgerError> {
        self.0.settle(id, usage, policy, now).await
    }
    async fn release(&self, id: &ledger::ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        self.0.release(id, now).await
    }
    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<ledger::Deposit, LedgerError> {
        self.0.deposit(account, amount, key, now).await
    }
    async fn balance(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<ledger::Balance, LedgerError> {
        self.0.balance(account, now).await
    }
    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &plan::Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<ledger::AllowanceUsage, LedgerError> {
        self.0
            .allowance_usage(account, meter, window_start, now)
            .await
    }
    fn records(&self) -> Option<&dyn ledger::ResponseRecords> {
        self.0.records()
    }
}

struct Setup {
    /// Whether the layers see the ledger as shared (no in-process path).
    shared: bool,
    ledger: MemoryLedger,
    clock: ManualClock,
    /// How many times a handler ran.
    runs: Arc<AtomicU64>,
    /// Reservation replies still to lose (with `shared`).
    lose_replies: Arc<AtomicU64>,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

impl Setup {
    async fn new(credits: u64) -> Self {
        let ledger = MemoryLedger::new();
        ledger
            .deposit(&"acme".into(), Credits::new(credits), "seed", START)
            .await
            .unwrap();
        Setup {
            shared: false,
            ledger,
            clock: ManualClock::new(START),
            runs: Arc::new(AtomicU64::new(0)),
            lose_replies: Arc::new(AtomicU64::new(0)),
            entered: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        }
    }

    fn app(&self, billing: impl FnOnce(Billing) -> Billing) -> Router {
        let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true));
        let plans = MemoryPlanStore::new().with(Subscription::active("acme", "basic"));
        let keys = StaticKeys::new().with_key(KEY, "acme");
        let (runs, runs2, runs3, runs4) = (
            self.runs.clone(),
            self.runs.clone(),
            self.runs.clone(),
            self.runs.clone(),
        );
        let (entered, release) = (self.entered.clone(), self.release.clone());
        Router::new()
            // Echoes the body with a number that changes on every run.
            .route(
                "/echo",
                post(move |body: Bytes| async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    (
                        [("x-run", n.to_string())],
                        format!("run {n}: {}", String::from_utf8_lossy(&body)),
                    )
                }),
            )
            // 4 chunks of 1,000 bytes.
            .route(
                "/big",
                post(move || async move {
                    runs2.fetch_add(1, Ordering::SeqCst);
                    let chunks =
                        (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 1000])));
                    Body::from_stream(futures_util::stream::iter(chunks.collect::<Vec<_>>()))
                }),
            )
            // One chunk, then a stream that never ends.
            .route(
                "/endless",
                post(move || async move {
                    runs4.fetch_add(1, Ordering::SeqCst);
                    let first = futures_util::stream::iter([Ok::<_, std::io::Error>(
                        Bytes::from_static(b"first chunk"),
                    )]);
                    Body::from_stream(first.chain(futures_util::stream::pending()))
                }),
            )
            .route(
                "/slow",
                post(move || async move {
                    runs3.fetch_add(1, Ordering::SeqCst);
                    entered.notify_one();
                    release.notified().await;
                    "slow"
                }),
            )
            .layer(
                billing(
                    if self.shared {
                        Billing::new(
                            keys,
                            plans,
                            Shared(self.ledger.clone(), self.lose_replies.clone()),
                            catalog,
                        )
                    } else {
                        Billing::new(keys, plans, self.ledger.clone(), catalog)
                    }
                    .clock(self.clock.clone())
                    .default_requirement(Requirement::new().cost(Cost::new(
                        "units",
                        1,
                        Credits::new(10),
                    ))),
                )
                .layer(),
            )
    }

    async fn available(&self) -> u64 {
        self.ledger
            .balance(&"acme".into(), self.clock.now())
            .await
            .unwrap()
            .available
            .get()
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn post_with(app: &Router, uri: &str, idem: &str, body: &str) -> common::Answer {
    send(
        app,
        request(
            Method::POST,
            uri,
            &[("x-api-key", KEY), ("idempotency-key", idem)],
            body,
        ),
    )
    .await
}

#[tokio::test]
async fn a_retry_gets_the_recorded_response_and_the_handler_runs_once() {
    let s = Setup::new(100).await;
    let app = s.app(|b| b);
    let first = post_with(&app, "/echo", "order-1", "hello").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, "run 0: hello");
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(s.available().await, 90);

    for _ in 0..3 {
        let retry = post_with(&app, "/echo", "order-1", "hello").await;
        assert_eq!(retry.status, 200);
        assert_eq!(retry.body, first.body, "the recorded body");
        assert_eq!(retry.header("x-run"), Some("0"), "the recorded headers");
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        assert_eq!(
            retry.header("x-credits-remaining"),
            None,
            "per-request headers are not recorded"
        );
    }
    assert_eq!(s.runs(), 1, "the handler ran once");
    assert_eq!(s.available().await, 90, "charged once");
}

#[tokio::test]
async fn the_same_key_with_another_body_is_409_reused() {
    let s = Setup::new(100).await;
    let app = s.app(|b| b);
    assert_eq!(post_with(&app, "/echo", "k", "one").await.status, 200);
    for other in ["two", "", "one "] {
        post_with(&app, "/echo", "k", other)
            .await
            .problem(409, "IDEMPOTENCY_KEY_REUSED");
    }
    // Another route with the key.
    post_with(&app, "/big", "k", "one")
        .await
        .problem(409, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(s.runs(), 1);
    assert_eq!(s.available().await, 90);
    // The right body still replays.
    let again = post_with(&app, "/echo", "k", "one").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn a_response_too_large_to_record_makes_its_retry_409_not_recorded() {
    let s = Setup::new(100).await;
    let app = s.app(|b| b.max_recorded_response(3_999));
    let first = post_with(&app, "/big", "big-1", "").await;
    assert_eq!((first.status.as_u16(), first.body.len()), (200, 4000));
    let retry = post_with(&app, "/big", "big-1", "").await;
    let doc = retry.problem(409, "IDEMPOTENCY_RESPONSE_NOT_RECORDED");
    assert_eq!(retry.header("x-should-retry"), Some("false"));
    assert!(doc["detail"].as_str().unwrap().contains("new key"));
    assert_eq!(s.runs(), 1, "never a free re-run");
    assert_eq!(s.available().await, 90, "never a second charge");

    // At the limit it is recorded.
    let app = s.app(|b| b.max_recorded_response(4_000));
    post_with(&app, "/big", "big-2", "").await;
    let retry = post_with(&app, "/big", "big-2", "").await;
    assert_eq!((retry.status.as_u16(), retry.body.len()), (200, 4000));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn in_flight_is_409_in_use_with_retry_after() {
    let s = Setup::new(100).await;
    let app = s.app(|b| b);
    let first = tokio::spawn({
        let app = app.clone();
        async move { post_with(&app, "/slow", "dup", "").await }
    });
    s.entered.notified().await;
    let dup = post_with(&app, "/slow", "dup", "").await;
    dup.problem(409, "IDEMPOTENCY_KEY_IN_USE");
    assert_eq!(dup.header("retry-after"), Some("1"));
    assert_eq!(dup.header("x-should-retry"), Some("true"));
    s.release.notify_one();
    assert_eq!(first.await.unwrap().body, "slow");
    let retry = post_with(&app, "/slow", "dup", "").await;
    assert_eq!(
        (retry.body.as_ref(), retry.header("idempotent-replayed")),
        (&b"slow"[..], Some("true"))
    );
    assert_eq!(s.runs(), 1);
    assert_eq!(s.available().await, 90);
}

#[tokio::test]
async fn records_expire_and_an_account_keeps_a_bounded_number() {
    let s = Setup::new(100).await;
    let app = s.app(|b| {
        b.recorded_response_retention(std::time::Duration::from_secs(60))
            .max_recorded_per_account(2)
    });
    for k in ["a", "b", "c"] {
        post_with(&app, "/echo", k, k).await;
    }
    // "a" was dropped for the cap: refused, not run again.
    post_with(&app, "/echo", "a", "a")
        .await
        .problem(409, "IDEMPOTENCY_RESPONSE_NOT_RECORDED");
    let c = post_with(&app, "/echo", "c", "c").await;
    assert_eq!(c.header("idempotent-replayed"), Some("true"));
    s.clock.advance(60);
    post_with(&app, "/echo", "c", "c")
        .await
        .problem(409, "IDEMPOTENCY_RESPONSE_NOT_RECORDED");
    assert_eq!(s.runs(), 3);
    assert_eq!(s.available().await, 70);
}

#[tokio::test]
async fn a_refused_request_leaves_no_record_and_its_retry_is_a_fresh_attempt() {
    let s = Setup::new(5).await;
    let app = s.app(|b| b);
    post_with(&app, "/echo", "poor", "x")
        .await
        .problem(402, "INSUFFICIENT_CREDITS");
    assert_eq!(s.runs(), 0);
    let records = s.ledger.records().unwrap();
    let id = ledger::ReservationId {
        account: "acme".into(),
        key: "idem:poor".into(),
    };
    assert_eq!(records.get(&id, s.clock.now()).await.unwrap(), None);
    s.ledger
        .deposit(&"acme".into(), Credits::new(10), "top-up", START)
        .await
        .unwrap();
    let served = post_with(&app, "/echo", "poor", "x").await;
    assert_eq!(
        (served.status.as_u16(), served.body.as_ref()),
        (200, &b"run 0: x"[..])
    );
    assert_eq!(s.available().await, 5);
}

#[tokio::test]
async fn a_retry_body_beyond_max_body_is_413() {
    let s = Setup::new(100).await;
    let app = s.app(|b| b.max_body(8));
    post_with(&app, "/echo", "k", "short").await;
    post_with(&app, "/echo", "k", "much longer than eight")
        .await
        .problem(413, "REQUEST_TOO_LARGE");
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_cannot_replay_it_for_free() {
    let s = Setup::new(100).await;
    let app = s.app(|b| b);
    let req = request(
        Method::POST,
        "/endless",
        &[("x-api-key", KEY), ("idempotency-key", "hang-up")],
        "",
    );
    let res = app.clone().oneshot(req).await.unwrap();
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first chunk");
    drop(body);
    assert_eq!(s.available().await, 90, "charged the estimate");
    let retry = post_with(&app, "/endless", "hang-up", "").await;
    retry.problem(409, "IDEMPOTENCY_RESPONSE_NOT_RECORDED");
    assert_eq!(s.runs(), 1, "not run again");
    assert_eq!(s.available().await, 90, "not charged again");
}

#[tokio::test]
async fn on_a_shared_ledger_replays_conflicts_and_settlements_hold_too() {
    let mut s = Setup::new(100).await;
    s.shared = true;
    let app = s.app(|b| b.max_recorded_response(3_999));
    // Without a key: settled, nothing left open.
    let plain = send(
        &app,
        request(Method::POST, "/echo", &[("x-api-key", KEY)], "a"),
    )
    .await;
    assert_eq!(plain.status, 200);
    assert_eq!(s.available().await, 90);
    let first = post_with(&app, "/echo", "k", "hello").await;
    let retry = post_with(&app, "/echo", "k", "hello").await;
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    post_with(&app, "/echo", "k", "other")
        .await
        .problem(409, "IDEMPOTENCY_KEY_REUSED");
    post_with(&app, "/big", "big", "").await;
    post_with(&app, "/big", "big", "")
        .await
        .problem(409, "IDEMPOTENCY_RESPONSE_NOT_RECORDED");
    assert_eq!(s.runs(), 3);
    assert_eq!(s.available().await, 70);
    let b = s
        .ledger
        .balance(&"acme".into(), s.clock.now())
        .await
        .unwrap();
    assert_eq!(b.held, Credits::ZERO, "every hold settled");
    assert_eq!(s.ledger.open_reservations(&"acme".into(), s.clock.now()), 0);
}

/// A reservation made under a client's `Idempotency-Key` whose reply is lost is recovered by
/// the retry of the same attempt: the handler runs once, the request is charged once, and
/// the key is not left locked (a retry by the client replays the response).
#[tokio::test]
async fn a_lost_reservation_reply_under_a_client_key_is_recovered() {
    let mut s = Setup::new(100).await;
    s.shared = true;
    s.lose_replies.store(1, Ordering::SeqCst);
    let app = s.app(|b| b);
    let a = post_with(&app, "/echo", "order-7", "hello").await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        s.lose_replies.load(Ordering::SeqCst),
        0,
        "the reply was lost"
    );
    assert_eq!(s.runs(), 1);
    assert_eq!(s.available().await, 90);
    let again = post_with(&app, "/echo", "order-7", "hello").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, a.body);
    assert_eq!(s.runs(), 1, "never run again");
    assert_eq!(s.available().await, 90, "charged once");
    let b = s.ledger.balance(&"acme".into(), START).await.unwrap();
    assert_eq!(b.held, Credits::ZERO);
}
