//! Fleets of real processes: four `examples/fleet.rs` servers (`serve`), each its own OS
//! process with its own connections, sharing one balance on Redis, PostgreSQL or a Redis
//! Cluster, with and without leased credit.
//!
//! - 2,000 concurrent requests against 500 credits at 1 credit each: exactly 500 served (the
//!   200s counted by the client and the handler runs counted by the processes), the rest
//!   `402 INSUFFICIENT_CREDITS`, balance 0, `deposited = available + held + settled`.
//! - With leases, one process is killed (`kill -9`) mid-run: nothing is overspent, its lease
//!   comes back when its TTL runs out (polled, with a deadline), the books balance, and the
//!   survivors then serve exactly what came back.
//!
//! The example is built by this test (`cargo build --example fleet --features redis,postgres`,
//! a no-op when it is up to date). Each run has its own Redis key prefix or PostgreSQL schema.
//! Backends unreachable: skipped loudly, or a failure with `TOWER402_REQUIRE_BACKENDS=1`. The
//! cluster tests run when `TOWER402_REDIS_CLUSTER_URLS` is set (`scripts/redis-cluster.sh`).
#![cfg(all(feature = "redis", feature = "postgres"))]

mod conformance;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The example's binary, built with the features it needs.
fn binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--example",
                    "fleet",
                    "--features",
                    "redis,postgres",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build --example fleet");
            assert!(status.success(), "building the fleet example failed");
            // tests run from target/<profile>/deps/; examples are in target/<profile>/examples/.
            let exe = std::env::current_exe().expect("test binary");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile>");
            let path = profile_dir.join("examples").join("fleet");
            assert!(path.exists(), "no example binary at {}", path.display());
            path
        })
        .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One shared backend, as environment for the example.
struct Backend {
    name: &'static str,
    env: Vec<(&'static str, String)>,
}

/// Four servers; killed (and reaped) when dropped, whatever the test's outcome.
struct Fleet {
    children: Vec<Option<Child>>,
    ports: Vec<u16>,
    logs: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped (the servers' logs).
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(super::conformance::unique(tag));
            std::fs::create_dir_all(&path).expect("temp dir");
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.0);
            } else {
                eprintln!("server logs kept in {}", self.0.display());
            }
        }
    }
}

impl Fleet {
    /// Lines of the servers' logs that contain `needle`.
    fn log_lines(&self, needle: &str) -> usize {
        (0..self.ports.len())
            .map(|i| {
                std::fs::read_to_string(self.logs.0.join(format!("server{i}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn command(backend: &Backend, extra: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_remove("TOWER402_REDIS_URL")
        .env_remove("TOWER402_POSTGRES_URL")
        .env_remove("TOWER402_REDIS_CLUSTER")
        .env("RUST_LOG", "info,tower_402=debug")
        .env("BILLING_TIMEOUT_SECS", "60");
    for (k, v) in &backend.env {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// `fleet deposit N --key K`, which exits.
fn deposit(backend: &Backend, credits: u64, key: &str) {
    let out = command(backend, &[])
        .args(["deposit", &credits.to_string(), "--key", key])
        .output()
        .expect("fleet deposit");
    assert!(
        out.status.success(),
        "deposit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("deposit JSON");
    assert_eq!(v["applied"], true, "{v}");
}

async fn start(backend: &Backend, leases: bool) -> Fleet {
    start_with(backend, leases, &[]).await
}

async fn start_with(backend: &Backend, leases: bool, more: &[(&'static str, String)]) -> Fleet {
    let logs = tempdir::Dir::new("fleet_logs");
    let mut fleet = Fleet {
        children: Vec::new(),
        ports: Vec::new(),
        logs,
    };
    for i in 0..4 {
        let port = free_port();
        let mut extra = vec![("PORT", port.to_string())];
        extra.extend(more.iter().cloned());
        if leases {
            extra.push(("LEASES", "1".into()));
            // Short, so the killed process's lease comes back within the test.
            extra.push(("LEASE_TTL_SECS", "4".into()));
            extra.push(("LEASE_IDLE_SECS", "1".into()));
        }
        let log = std::fs::File::create(fleet.logs.0.join(format!("server{i}.log"))).unwrap();
        let child = command(backend, &extra)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("fleet serve");
        fleet.children.push(Some(child));
        fleet.ports.push(port);
    }
    // A real process has to come up: poll, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    for &port in &fleet.ports {
        loop {
            if let Ok((200, _)) = get(port, "/v1/balance").await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} server on {port} did not come up; logs in {}",
                backend.name,
                fleet.logs.0.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    fleet
}

/// One HTTP/1.1 request with the demo key: status and body. `Err` if the server is gone.
async fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: demo\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {text:?}")))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

#[derive(Debug, Default, Clone)]
struct Counts {
    ok: Vec<usize>,
    refused: Vec<usize>,
    failed: Vec<usize>,
}

/// `n` requests for `/v1/work`, spread over `ports` in turn, at most 200 in flight.
async fn hammer(ports: &[u16], n: usize, on_ok: Option<Arc<AtomicUsize>>) -> Counts {
    let limit = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (port, slot) = (ports[i % ports.len()], i % ports.len());
        let limit = limit.clone();
        let on_ok = on_ok.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore");
            let r = get(port, "/v1/work").await;
            if let (Ok((200, _)), Some(c)) = (&r, on_ok) {
                c.fetch_add(1, Ordering::SeqCst);
            }
            (slot, r)
        });
    }
    let mut counts = Counts {
        ok: vec![0; ports.len()],
        refused: vec![0; ports.len()],
        failed: vec![0; ports.len()],
    };
    while let Some(r) = tasks.join_next().await {
        let (slot, r) = r.expect("task");
        match r {
            Ok((200, _)) => counts.ok[slot] += 1,
            Ok((402, body)) if body.contains("INSUFFICIENT_CREDITS") => counts.refused[slot] += 1,
            Ok((status, body)) => panic!("unexpected answer {status}: {body}"),
            Err(_) => counts.failed[slot] += 1,
        }
    }
    counts
}

/// The shared balance and the handler runs of the server on `port`.
async fn balance(port: u16) -> serde_json::Value {
    let (status, body) = get(port, "/v1/balance").await.expect("balance");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("balance JSON");
    let n = |k: &str| v[k].as_u64().expect(k);
    assert_eq!(
        n("deposited"),
        n("available") + n("held") + n("settled"),
        "conservation: {v}"
    );
    v
}

/// Polls `port`'s balance until nothing is held (every lease back), with a deadline.
async fn settled(port: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let b = balance(port).await;
        if b["held"] == 0 {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "still held after {within:?}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn served_here(ports: &[u16]) -> u64 {
    let mut n = 0;
    for &p in ports {
        n += balance(p).await["served_here"]
            .as_u64()
            .expect("served_here");
    }
    n
}

/// One fleet at a time: four servers per test are plenty for two cores. (An async mutex: the
/// guard is held across the whole test.)
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// 2,000 concurrent requests against 500 credits on four processes.
async fn exactly_500(backend: Backend, leases: bool) {
    let _one = one_at_a_time().await;
    deposit(&backend, 500, "seed");
    let fleet = start(&backend, leases).await;
    let counts = hammer(&fleet.ports, 2_000, None).await;
    let ok: usize = counts.ok.iter().sum();
    let refused: usize = counts.refused.iter().sum();
    assert_eq!(
        (ok, refused),
        (500, 1_500),
        "{} leases={leases}: {counts:?}",
        backend.name
    );
    assert_eq!(counts.failed.iter().sum::<usize>(), 0, "{counts:?}");
    assert_eq!(served_here(&fleet.ports).await, 500, "handler runs");
    if leases {
        let taken = fleet.log_lines("lease taken");
        assert!(
            taken > 0,
            "no lease was taken: the leased path was not exercised"
        );
        eprintln!("{} leased: {taken} leases taken, {counts:?}", backend.name);
    }
    // Idle leases come back within a second; without leases nothing is held at all.
    let b = settled(fleet.ports[0], Duration::from_secs(30)).await;
    assert_eq!(
        (&b["available"], &b["settled"], &b["deposited"]),
        (&0.into(), &500.into(), &500.into()),
        "{b}"
    );
}

/// With leases, `kill -9` one of four processes mid-run.
async fn kill_one(backend: Backend) {
    let _one = one_at_a_time().await;
    deposit(&backend, 500, "seed");
    // The victim's direct reservations in flight are held for their own TTL: short here too.
    // Leases of 50, so the victim's lasts a while once taken.
    let more_env = [
        ("HOLD_TTL_SECS", "5".into()),
        ("LEASE_MIN_CREDITS", "50".into()),
    ];
    let mut fleet = start_with(&backend, true, &more_env).await;
    let ports = fleet.ports.clone();
    // A few requests on the victim make it take a lease (in the background, after a miss).
    // It keeps serving one now and then until it holds one: an account idle for a second gives
    // its lease back, and timestamps are whole seconds, so warm-up requests just before a
    // second turns may see their lease returned at once (one CI run in many), and only a miss
    // takes the next.
    let mut warm = hammer(&ports[3..], 5, None).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while balance(ports[3]).await["leased_here"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the victim took no lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
        warm.ok[0] += hammer(&ports[3..], 1, None).await.ok[0];
    }
    let ok_so_far = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let (ports, ok_so_far) = (ports.clone(), ok_so_far.clone());
        async move { hammer(&ports, 1_000, Some(ok_so_far)).await }
    });
    // Mid-run: as soon as the fleet is serving, with the victim's lease open.
    while ok_so_far.load(Ordering::SeqCst) < 10 {
        assert!(!run.is_finished(), "the run ended before the kill");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut victim = fleet.children[3].take().expect("victim");
    victim.kill().expect("kill -9"); // SIGKILL: no shutdown, no settlement
    victim.wait().expect("reaped");
    let counts = run.await.expect("run");
    let survivors = &ports[..3];
    let survivors_ok: usize = counts.ok[..3].iter().sum();
    let victim_ok = counts.ok[3] + warm.ok[0];
    assert_eq!(
        served_here(survivors).await,
        survivors_ok as u64,
        "handler runs"
    );
    // Its lease comes back after its TTL (4 s), its requests in flight after theirs (5 s),
    // the survivors' idle leases after 1 s.
    let b = settled(survivors[0], Duration::from_secs(30)).await;
    let settled_credits = b["settled"].as_u64().unwrap();
    let available = b["available"].as_u64().unwrap();
    assert_eq!(available + settled_credits, 500, "{b}");
    // Nothing overspent: the shared ledger charged the survivors' work in full and never
    // gave out more than was deposited. (What the victim served from its lease and had not
    // settled is not charged: the account lost nothing.) A direct reservation the victim
    // was running when it was killed is charged when its hold expires (`OnExpiry::Charge`:
    // its handler ran on the reply), though its client saw the connection drop: so the
    // charges are at most what was served plus what the kill cut short.
    let victim_cut = counts.failed[3];
    assert!(settled_credits >= survivors_ok as u64, "{b} vs {counts:?}");
    assert!(
        settled_credits <= (survivors_ok + victim_ok + victim_cut) as u64,
        "{b} vs {counts:?}"
    );
    // What came back is served exactly, and no more.
    let more = hammer(survivors, available as usize + 300, None).await;
    assert_eq!(more.ok.iter().sum::<usize>() as u64, available, "{more:?}");
    assert_eq!(more.failed.iter().sum::<usize>(), 0, "{more:?}");
    let b = settled(survivors[0], Duration::from_secs(30)).await;
    assert_eq!(
        (&b["available"], &b["settled"], &b["deposited"]),
        (&0.into(), &500.into(), &500.into()),
        "{b}"
    );
    assert_eq!(
        served_here(survivors).await,
        (survivors_ok as u64) + available,
        "handler runs"
    );
}

// --- Redis -------------------------------------------------------------------------------

fn redis_url() -> String {
    std::env::var("TOWER402_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn redis() -> Option<Backend> {
    let url = redis_url();
    let reachable = async {
        let client = redis::Client::open(url.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    };
    match tokio::time::timeout(Duration::from_secs(2), reachable).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            conformance::skip("Redis", &url, &e);
            return None;
        }
        Err(e) => {
            conformance::skip("Redis", &url, &e);
            return None;
        }
    }
    Some(Backend {
        name: "redis",
        env: vec![
            ("TOWER402_REDIS_URL", url),
            ("TOWER402_PREFIX", conformance::unique("fleetproc")),
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_four_processes_serve_exactly_500() {
    let Some(b) = redis().await else { return };
    exactly_500(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_four_leased_processes_serve_exactly_500() {
    let Some(b) = redis().await else { return };
    exactly_500(b, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_leased_process_loses_nothing() {
    let Some(b) = redis().await else { return };
    kill_one(b).await;
}

// --- Redis Cluster ------------------------------------------------------------------------

fn cluster() -> Option<Backend> {
    let Ok(urls) = std::env::var("TOWER402_REDIS_CLUSTER_URLS") else {
        eprintln!("TOWER402_REDIS_CLUSTER_URLS not set (scripts/redis-cluster.sh): skipped");
        return None;
    };
    Some(Backend {
        name: "redis-cluster",
        env: vec![
            ("TOWER402_REDIS_URL", urls),
            ("TOWER402_REDIS_CLUSTER", "1".into()),
            ("TOWER402_PREFIX", conformance::unique("fleetproc")),
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_four_processes_serve_exactly_500() {
    let Some(b) = cluster() else { return };
    exactly_500(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_four_leased_processes_serve_exactly_500() {
    let Some(b) = cluster() else { return };
    exactly_500(b, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_killed_leased_process_loses_nothing() {
    let Some(b) = cluster() else { return };
    kill_one(b).await;
}

// --- PostgreSQL ---------------------------------------------------------------------------

fn postgres_url() -> String {
    std::env::var("TOWER402_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A backend on a schema of its own, dropped when the guard is.
async fn postgres() -> Option<(Backend, SchemaGuard)> {
    let url = postgres_url();
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await;
    let (client, conn) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            conformance::skip("PostgreSQL", &url, &e);
            return None;
        }
        Err(e) => {
            conformance::skip("PostgreSQL", &url, &e);
            return None;
        }
    };
    tokio::spawn(conn);
    let schema = conformance::unique("fleetproc");
    Some((
        Backend {
            name: "postgres",
            env: vec![
                ("TOWER402_POSTGRES_URL", url),
                ("TOWER402_PREFIX", schema.clone()),
            ],
        },
        SchemaGuard { client, schema },
    ))
}

struct SchemaGuard {
    client: tokio_postgres::Client,
    schema: String,
}

impl SchemaGuard {
    async fn drop_schema(self) {
        let _ = self
            .client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_four_processes_serve_exactly_500() {
    let Some((b, guard)) = postgres().await else {
        return;
    };
    exactly_500(b, false).await;
    guard.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_four_leased_processes_serve_exactly_500() {
    let Some((b, guard)) = postgres().await else {
        return;
    };
    exactly_500(b, true).await;
    guard.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_leased_process_loses_nothing() {
    let Some((b, guard)) = postgres().await else {
        return;
    };
    kill_one(b).await;
    guard.drop_schema().await;
}
