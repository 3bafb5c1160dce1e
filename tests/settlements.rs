//! Settlements that land: a ledger that stops answering between reserve and settle, on a
//! Redis server of the test's own (started here on a free port, paused with `SIGSTOP`,
//! never the shared one). Skipped, loudly, where `redis-server` is not installed; failing
//! under `TOWER402_REQUIRE_BACKENDS=1`.
#![cfg(feature = "redis")]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{request, send};
use http::{Method, StatusCode};
use tokio::sync::{Notify, Semaphore};
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::store::{RedisConfig, RedisLedger};
use tower_402::*;

const KEY: &str = "sk_test_settle";

/// A `redis-server` of this test's own, writing every command to its append-only file in a
/// directory of its own (so it can be killed and started again with its data), killed when
/// dropped.
struct OwnRedis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start() -> Option<OwnRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("tower402-settle-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        OwnRedis::spawn(port, dir)
    }

    fn spawn(port: u16, dir: std::path::PathBuf) -> Option<OwnRedis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .args(["--appendfsync", "always", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("TOWER402_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                    "redis-server could not be started: {e}"
                );
                eprintln!("SKIPPED: redis-server could not be started ({e})");
                return None;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::yield_now();
        }
        Some(OwnRedis { child, port, dir })
    }

    /// `kill -9`, then the server again on the same port with what it had written.
    fn crash_and_restart(mut self) -> OwnRedis {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (port, dir) = (self.port, self.dir.clone());
        std::mem::forget(self);
        OwnRedis::spawn(port, dir).expect("redis-server restarts")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 20 requests are served while Redis is paused between their reservations and their
/// settlements; then it is killed (the settlements it had not read are lost with it) and
/// started again with its data. Every settlement timed out and was queued, and each lands
/// once Redis answers again: served-and-uncharged = 0, conservation holds, and each handler
/// ran once. Without the queue the holds would sit until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_that_time_out_land_after_the_ledger_recovers() {
    let Some(redis) = OwnRedis::start() else {
        return;
    };
    let config = RedisConfig::new(&format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .prefix("settle:")
        .response_timeout(Duration::from_millis(200));
    let ledger = RedisLedger::new(&config);
    let acme: AccountId = "acme".into();
    ledger
        .deposit(&acme, Credits::new(100), "seed", Timestamp::now())
        .await
        .unwrap();

    const N: usize = 20;
    let ran = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(Semaphore::new(0));
    let go = Arc::new(Notify::new());
    let handler = {
        let (ran, entered, go) = (ran.clone(), entered.clone(), go.clone());
        move || async move {
            ran.fetch_add(1, Ordering::SeqCst);
            let wait = go.notified();
            entered.add_permits(1);
            wait.await;
            "done"
        }
    };
    let billing = Billing::new(
        StaticKeys::new().with_key(KEY, "acme"),
        MemoryPlanStore::new().with(Subscription::active("acme", "basic")),
        ledger.clone(),
        Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true)),
    )
    .timeout(Some(Duration::from_millis(300)))
    .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
    let app = Router::new()
        .route("/work", get(handler))
        .layer(billing.layer());

    let mut calls = Vec::new();
    for _ in 0..N {
        let app = app.clone();
        calls.push(tokio::spawn(async move {
            send(
                &app,
                request(Method::GET, "/work", &[("x-api-key", KEY)], ""),
            )
            .await
        }));
    }
    // Every request holds its reservation and is inside its handler: now the ledger stops.
    let all = entered.acquire_many(N as u32).await.unwrap();
    all.forget();
    let b = ledger.balance(&acme, Timestamp::now()).await.unwrap();
    assert_eq!((b.available.get(), b.held.get()), (80, 20));
    redis.signal("-STOP");
    go.notify_waiters();
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "served while the ledger is down"
        );
    }
    assert_eq!(ran.load(Ordering::SeqCst), N, "each handler ran once");
    let redis = redis.crash_and_restart();
    let b = ledger.balance(&acme, Timestamp::now()).await;
    assert!(
        b.as_ref().map_or(true, |b| b.settled.get() < N as u64),
        "the settlements were lost with the server: {b:?}"
    );

    // The queue lands every settlement (polled with a deadline: the retries back off).
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        let b = ledger.balance(&acme, Timestamp::now()).await;
        if let Ok(b) = b {
            if b.settled.get() == N as u64 && b.held.is_zero() {
                break b;
            }
            assert!(b.settled.get() <= N as u64, "charged more than once: {b:?}");
        }
        assert!(Instant::now() < deadline, "settlements did not land: {b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(b.available.get(), 80);
    assert_eq!(
        b.deposited.get(),
        b.available.get() + b.held.get() + b.settled.get()
    );
    drop(redis);
}
