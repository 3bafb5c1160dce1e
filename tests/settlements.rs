//! Settlements that land: a ledger that stops answering between reserve and settle, on a
//! server of the test's own (a `redis-server`, a PostgreSQL cluster made with `initdb`, each
//! on a free port, never the shared ones), killed and started again with its data. Skipped,
//! loudly, where the server cannot be started; failing under `TOWER402_REQUIRE_BACKENDS=1`.
#![cfg(all(feature = "redis", feature = "postgres"))]

mod common;
mod own_servers;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{request, send};
use http::{Method, StatusCode};
use own_servers::{free_port_and_dir, skip, OwnRedis};
use tokio::sync::{Notify, Semaphore};
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::store::{PostgresConfig, PostgresLedger, RedisConfig, RedisLedger};
use tower_402::*;

const KEY: &str = "sk_test_settle";

/// Serves `N` requests of 1 credit against `ledger` (100 credits deposited), breaks the
/// ledger with `crash` once every handler is running, and lets them finish: every response
/// is served, each handler ran once. Then `restart` brings the ledger back, and every
/// settlement (which failed and was queued) must land: `N` charged once, nothing held,
/// conservation.
async fn served_through_an_outage<L, T>(
    ledger: L,
    crash: impl FnOnce() -> T,
    restart: impl FnOnce(T) -> T,
) -> T
where
    L: Ledger + Clone,
{
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
    // Long enough for a commit behind a busy disk (the reservations must land), short
    // enough that the settlements against a stopped server fail soon.
    .timeout(Some(Duration::from_secs(2)))
    .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
    let app = Router::new()
        .route("/work", get(handler))
        .layer(billing.layer());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..N {
        let app = app.clone();
        calls.spawn(async move {
            send(
                &app,
                request(Method::GET, "/work", &[("x-api-key", KEY)], ""),
            )
            .await
        });
    }
    // Every request holds its reservation and is inside its handler: now the ledger breaks.
    // No handler returns before `go`, so a call that ends first was answered without its
    // handler: a failure to report, not a wait that never ends.
    tokio::select! {
        all_in = entered.acquire_many(N as u32) => all_in.unwrap().forget(),
        early = calls.join_next() => panic!(
            "a request was answered before every handler ran: {:?}",
            early.map(|done| done.map(|answer| (answer.status, answer.body)))
        ),
    }
    let b = ledger.balance(&acme, Timestamp::now()).await.unwrap();
    assert_eq!((b.available.get(), b.held.get()), (80, 20));
    let server = crash();
    go.notify_waiters();
    while let Some(answer) = calls.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "served while the ledger is down"
        );
    }
    assert_eq!(ran.load(Ordering::SeqCst), N, "each handler ran once");
    let server = restart(server);
    let b = ledger.balance(&acme, Timestamp::now()).await;
    assert!(
        b.as_ref().map_or(true, |b| b.settled.get() < N as u64),
        "the settlements did not fail: {b:?}"
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
    server
}

/// 20 requests are served while Redis is paused between their reservations and their
/// settlements; then it is killed (the settlements it had not read are lost with it) and
/// started again with its data. Every settlement timed out and was queued, and each lands
/// once Redis answers again: served-and-uncharged = 0, conservation holds, and each handler
/// ran once. Without the queue the holds would sit until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_settlements_land_after_a_crash() {
    let Some(redis) = OwnRedis::start() else {
        return;
    };
    let config = RedisConfig::new(&format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .prefix("settle:")
        .response_timeout(Duration::from_secs(1));
    let ledger = RedisLedger::new(&config);
    let crash = move || {
        redis.signal("-STOP");
        redis
    };
    let redis = served_through_an_outage(ledger, crash, OwnRedis::crash_and_restart).await;
    drop(redis);
}

/// A PostgreSQL cluster of this test's own (`initdb` in a temporary directory, run as the
/// `postgres` user when the test runs as root), stopped when dropped.
struct OwnPostgres {
    dir: std::path::PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn bin(name: &str) -> std::path::PathBuf {
        let found = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin").join(name))
                .find(|p| p.exists())
        });
        found.unwrap_or_else(|| name.into())
    }

    /// Runs a server program, as `postgres` when this process is root (initdb refuses root).
    fn run(name: &str, args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
        let bin = OwnPostgres::bin(name);
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let mut cmd = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    }

    fn start() -> Option<OwnPostgres> {
        let (port, dir) = free_port_and_dir("pg")?;
        let _ = Command::new("chown").arg("postgres").arg(&dir).status();
        let d = dir.to_str()?.to_owned();
        match OwnPostgres::run("initdb", &["-D", &d, "-A", "trust", "-U", "postgres"]) {
            Ok(s) if s.success() => {}
            Ok(s) => {
                skip("initdb", &s);
                return None;
            }
            Err(e) => {
                skip("initdb", &e);
                return None;
            }
        }
        let pg = OwnPostgres { dir, port };
        pg.up();
        Some(pg)
    }

    fn up(&self) {
        let d = self.dir.to_str().unwrap();
        let opts = format!("-p {} -k {d} -c listen_addresses=127.0.0.1", self.port);
        let ok =
            OwnPostgres::run("pg_ctl", &["-D", d, "-o", &opts, "-w", "start"]).expect("pg_ctl");
        assert!(ok.success(), "pg_ctl start");
    }

    /// Stops at once, as a crash does (no shutdown checkpoint; recovery replays the WAL).
    fn crash(self) -> OwnPostgres {
        let d = self.dir.to_str().unwrap();
        let ok = OwnPostgres::run("pg_ctl", &["-D", d, "-m", "immediate", "-w", "stop"])
            .expect("pg_ctl");
        assert!(ok.success(), "pg_ctl stop");
        self
    }

    fn restart(self) -> OwnPostgres {
        self.up();
        self
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let d = self.dir.to_string_lossy().into_owned();
        let _ = OwnPostgres::run("pg_ctl", &["-D", &d, "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The same on PostgreSQL: the cluster is stopped as by a crash while 20 served requests
/// settle, then started again (it recovers their reservations from its WAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_settlements_land_after_a_crash() {
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let config = PostgresConfig::new(&url)
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .op_timeout(Duration::from_secs(1));
    let ledger = PostgresLedger::new(config.pool().unwrap(), config);
    ledger.migrate().await.unwrap();
    let pg = served_through_an_outage(ledger, move || pg.crash(), OwnPostgres::restart).await;
    drop(pg);
}
