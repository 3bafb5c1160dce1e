//! Budget stores on every backend (memory, Redis, Redis Cluster, PostgreSQL):
//!
//! - a property test per backend: random sequences of hold / settle / release / usage with a
//!   manual `now` answer exactly as [`BudgetBook`] does, amounts at the edges of `u64`
//!   included;
//! - the race per backend: 1,000 concurrent requests through `Billing` + `BudgetedLedger`
//!   over the backend's ledger and budget store, by four keys of two teams under one
//!   organisation: no level overshoots, exactly as many are served as the tightest budgets
//!   allow, the handler ran that many times, and the balances went down by what was served;
//! - the budget stores keep no raw API key.
//!
//! Service URLs as in the backend tests (`TOWER402_REDIS_URL`, `TOWER402_POSTGRES_URL`,
//! `TOWER402_REDIS_CLUSTER_URLS`); an unreachable one is skipped loudly, or fails with
//! `TOWER402_REQUIRE_BACKENDS=1`. Every test (and every property case) uses its own key prefix
//! or schema and deletes it when it passes.

mod conformance;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_402::budget::{
    Budget, BudgetBook, BudgetLine, BudgetNode, BudgetStore, BudgetedLedger, Budgets,
    MemoryBudgetStore, BUDGET_RETENTION_SECS,
};
use tower_402::decision::{Cost, Requirement};
use tower_402::ledger::{ReservationId, Usage};
use tower_402::plan::{Catalog, Meter, Period, Plan, PlanStore, Subscription};
use tower_402::{Billing, Credits, Ledger, MemoryLedger, MemoryPlanStore, StaticKeys, Timestamp};

// ---------------------------------------------------------------------------------------
// The property test: every store answers as the book.

const T0: u64 = 1_700_000_000;
/// A start near the end of time: windows end at the top, and sums with the retention time
/// and later times saturate.
const LATE: u64 = u64::MAX - 3 * WINDOW;
const WINDOW: u64 = 1_000;
const OWNERS: [&str; 2] = ["org", "team:a"];

/// The counters a case plays with: owner × (credits, tokens) × two windows from `base`.
fn counter(i: usize, base: u64) -> (&'static str, Option<Meter>, Timestamp, Timestamp) {
    let owner = OWNERS[i % 2];
    let meter = (i / 2 % 2 == 1).then(|| Meter::new("tokens"));
    let start = base + (i / 4) as u64 * WINDOW;
    (
        owner,
        meter,
        Timestamp::from_unix(start),
        Timestamp::from_unix(start + WINDOW),
    )
}
const COUNTERS: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    /// Lines: (counter, limit, amount).
    Hold {
        key: u8,
        lines: Vec<(usize, u64, u64)>,
        ttl: u64,
    },
    Settle {
        key: u8,
        charged: u64,
        tokens: Vec<u64>,
    },
    Release {
        key: u8,
    },
    Usage {
        counter: usize,
    },
    Wait {
        secs: u64,
    },
}

const EXACT: u64 = (1 << 53) - 1;

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..4u64,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(EXACT + 2),
        1 => Just(1u64 << 32),
    ]
}

fn limit() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..10u64,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(EXACT + 3),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let lines =
        proptest::collection::vec((0..COUNTERS, limit(), amount()), 0..=3).prop_map(|mut lines| {
            // A counter a hold hits twice gets small amounts: the book checks each line
            // alone and then adds them unchecked.
            let counters: Vec<usize> = lines.iter().map(|l| l.0).collect();
            for l in &mut lines {
                if counters.iter().filter(|&&c| c == l.0).count() > 1 {
                    l.2 %= 4;
                }
            }
            lines
        });
    prop_oneof![
        4 => (0..4u8, lines, prop_oneof![Just(0u64), 1..100u64, Just(3 * BUDGET_RETENTION_SECS)])
            .prop_map(|(key, lines, ttl)| Op::Hold { key, lines, ttl }),
        3 => (0..4u8, amount(), proptest::collection::vec(amount(), 0..3))
            .prop_map(|(key, charged, tokens)| Op::Settle { key, charged, tokens }),
        2 => (0..4u8).prop_map(|key| Op::Release { key }),
        2 => (0..COUNTERS).prop_map(|counter| Op::Usage { counter }),
        2 => prop_oneof![
            Just(0u64),
            1..40u64,
            Just(WINDOW),
            Just(BUDGET_RETENTION_SECS),
            Just(BUDGET_RETENTION_SECS + WINDOW),
        ]
        .prop_map(|secs| Op::Wait { secs }),
    ]
}

/// A start time and the calls.
#[derive(Debug, Clone)]
struct Case {
    base: u64,
    ops: Vec<Op>,
}

fn ops() -> impl Strategy<Value = Case> {
    (
        prop_oneof![4 => Just(T0), 1 => Just(LATE)],
        proptest::collection::vec(op(), 1..40),
    )
        .prop_map(|(base, ops)| Case { base, ops })
}

fn hold_id(key: u8) -> ReservationId {
    ReservationId {
        account: "acct:x".into(),
        key: format!("req|{key}").into(),
    }
}

/// Plays `ops` on `store` and on a [`BudgetBook`], comparing every answer and, at the end,
/// every counter.
async fn agrees(store: &impl BudgetStore, case: &Case) -> Result<(), TestCaseError> {
    let mut book = BudgetBook::default();
    let base = case.base;
    let mut now = Timestamp::from_unix(base);
    for (step, op) in case.ops.iter().enumerate() {
        match op {
            Op::Hold { key, lines, ttl } => {
                let lines: Vec<BudgetLine> = lines
                    .iter()
                    .map(|&(c, limit, amount)| {
                        let (owner, meter, window_start, resets_at) = counter(c, base);
                        BudgetLine {
                            owner: owner.to_owned(),
                            meter,
                            window_start,
                            resets_at,
                            limit,
                            amount,
                        }
                    })
                    .collect();
                let id = hold_id(*key);
                let expires_at = now.plus_secs(*ttl);
                let want = book.hold(&id, &lines, expires_at, now);
                let got = store.hold(&id, &lines, expires_at, now).await;
                prop_assert_eq!(got.ok(), Some(want), "step {}: {:?}", step, op);
            }
            Op::Settle {
                key,
                charged,
                tokens,
            } => {
                let mut usage: Vec<Usage> =
                    tokens.iter().map(|&u| Usage::new("tokens", u)).collect();
                usage.push(Usage::new("other", 5));
                let id = hold_id(*key);
                let want = book.settle(&id, *charged, &usage, now);
                let got = store.settle(&id, *charged, &usage, now).await;
                prop_assert_eq!(got.ok(), Some(want), "step {}: {:?}", step, op);
            }
            Op::Release { key } => {
                let id = hold_id(*key);
                let want = book.release(&id, now);
                let got = store.release(&id, now).await;
                prop_assert_eq!(got.ok(), Some(want), "step {}: {:?}", step, op);
            }
            Op::Usage { counter: c } => {
                let (owner, meter, start, _) = counter(*c, base);
                let want = book.usage(owner, meter.as_ref(), start, now);
                let got = store.usage(owner, meter.as_ref(), start, now).await;
                prop_assert_eq!(got.ok(), Some(want), "step {}: {:?}", step, op);
            }
            Op::Wait { secs } => now = now.plus_secs(*secs),
        }
    }
    for c in 0..COUNTERS {
        let (owner, meter, start, _) = counter(c, base);
        let want = book.usage(owner, meter.as_ref(), start, now);
        let got = store.usage(owner, meter.as_ref(), start, now).await;
        prop_assert_eq!(got.ok(), Some(want), "final usage of counter {}", c);
    }
    Ok(())
}

/// One runtime for every property case (proptest's cases are synchronous).
fn block_on<F: Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
    .block_on(f)
}

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn the_memory_store_answers_as_the_book(case in ops()) {
        block_on(agrees(&MemoryBudgetStore::new(), &case))?;
    }
}

// ---------------------------------------------------------------------------------------
// The race: 1,000 requests, four keys, two teams, one organisation.

/// The chart: `k0`, `k1` in team `team-a` (50 a year), `k2`, `k3` in `team-b` (30), both
/// under `org` (200); the keys' own budgets are 10, 100, 20 and 20. Every balance is 1,000.
/// So team A can spend 50 (k0 alone cannot: 10), team B 30 (its keys could take 40), and
/// the organisation 80 of its 200: exactly 80 requests can be served.
const KEY_BUDGETS: [u64; 4] = [10, 100, 20, 20];
const TEAM_BUDGETS: [(&str, u64); 2] = [("team-a", 50), ("team-b", 30)];
const ORG_BUDGET: u64 = 200;
const SERVED: u64 = 80;
const BALANCE: u64 = 1_000;
const REQUESTS: usize = 1_000;

fn account(i: usize) -> String {
    format!("acct_k{i}")
}

fn chart() -> Budgets {
    let mut b = Budgets::new().node(
        BudgetNode::new("org", tower_402::budget::ORGANISATION)
            .budget(Budget::credits(ORG_BUDGET, Period::Year)),
    );
    for (team, limit) in TEAM_BUDGETS {
        b = b.node(
            BudgetNode::new(team, tower_402::budget::TEAM)
                .parent("org")
                .budget(Budget::credits(limit, Period::Year)),
        );
    }
    for (i, limit) in KEY_BUDGETS.into_iter().enumerate() {
        b = b.node(
            BudgetNode::new(account(i), tower_402::budget::KEY)
                .parent(TEAM_BUDGETS[i / 2].0)
                .budget(Budget::credits(limit, Period::Year)),
        );
    }
    b
}

/// The four API keys: secrets unique to this run, so the scans below can look for them.
fn secrets() -> [String; 4] {
    let run = conformance::unique("secret");
    std::array::from_fn(|i| format!("sk_live_{run}_{i}"))
}

/// Runs the race and checks every level; returns how many requests each key had served.
async fn race<L, S>(ledger: L, store: S, secrets: &[String; 4]) -> [u64; 4]
where
    L: Ledger + Clone,
    S: BudgetStore,
{
    let now = Timestamp::now();
    let plans = MemoryPlanStore::new();
    let mut keys = StaticKeys::new();
    for (i, secret) in secrets.iter().enumerate() {
        keys = keys.with_key(secret.clone(), account(i));
        plans
            .put_subscription(Subscription::active(account(i), "basic"))
            .await
            .expect("subscription");
        ledger
            .deposit(&account(i).into(), Credits::new(BALANCE), "seed", now)
            .await
            .expect("deposit");
    }
    let budgeted = BudgetedLedger::new(ledger.clone(), store, chart()).expect("a valid chart");
    let catalog = Catalog::new().with_plan(Plan::new("basic", "Basic", 1).overage(true));
    // Exact counts, not latency: every request queues on the organisation's counter.
    let billing = Billing::new(keys, plans, budgeted.clone(), catalog)
        .timeout(Some(Duration::from_secs(120)))
        .route(
            "GET /work",
            Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))),
        );
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/work",
            get(move || {
                let runs = counted.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    "done"
                }
            }),
        )
        .layer(billing.layer());

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..REQUESTS {
        let (app, key) = (app.clone(), n % 4);
        let req = Request::get("/work")
            .header("x-api-key", secrets[key].as_str())
            .body(Body::empty())
            .expect("request");
        tasks.spawn(async move {
            let res = app.oneshot(req).await.expect("infallible");
            let status = res.status();
            let body = res.into_body().collect().await.expect("body").to_bytes();
            (key, status, String::from_utf8_lossy(&body).into_owned())
        });
    }
    let mut served = [0u64; 4];
    let mut other = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (key, status, body) = done.expect("task");
        match status {
            StatusCode::OK => served[key] += 1,
            StatusCode::PAYMENT_REQUIRED if body.contains("BUDGET_EXHAUSTED") => {}
            s => other.push((s, body)),
        }
    }
    assert!(
        other.is_empty(),
        "answers other than 200 and BUDGET_EXHAUSTED: {} of them, e.g. {:?}",
        other.len(),
        &other[..other.len().min(3)]
    );
    let total: u64 = served.iter().sum();
    assert_eq!(total, SERVED, "served per key: {served:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst) as u64,
        total,
        "the handler ran once per 200"
    );

    // No level overshoots; nothing is left held.
    let now = Timestamp::now();
    let used = |owner: String, limit: u64| {
        let budgeted = &budgeted;
        async move {
            let u = budgeted
                .usage(&owner, &Budget::credits(limit, Period::Year), now)
                .await
                .expect("usage");
            assert_eq!(u.held, 0, "{owner}: nothing held after the race");
            assert!(u.used <= limit, "{owner} overshot: {} of {limit}", u.used);
            u.used
        }
    };
    assert_eq!(used("org".into(), ORG_BUDGET).await, SERVED);
    let mut teams = HashMap::new();
    for (team, limit) in TEAM_BUDGETS {
        teams.insert(team, used(team.into(), limit).await);
    }
    assert_eq!(teams["team-a"], 50, "team A is the tightest on its side");
    assert_eq!(teams["team-b"], 30, "team B is the tightest on its side");
    for (i, limit) in KEY_BUDGETS.into_iter().enumerate() {
        assert_eq!(used(account(i), limit).await, served[i], "key {i}");
        let b = ledger
            .balance(&account(i).into(), now)
            .await
            .expect("balance");
        assert_eq!(
            b.settled,
            Credits::new(served[i]),
            "key {i}: charged once per 200"
        );
        assert_eq!(b.available, Credits::new(BALANCE - served[i]), "key {i}");
        assert_eq!(b.held, Credits::ZERO, "key {i}");
        assert_eq!(b.deposited, Credits::new(BALANCE), "key {i}");
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_race_on_memory() {
    race(MemoryLedger::new(), MemoryBudgetStore::new(), &secrets()).await;
}

/// Fails if any text in `dump` holds one of the secrets.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn assert_no_secret(dump: &str, secrets: &[String; 4], what: &str) {
    for s in secrets {
        assert!(
            !dump.contains(s.as_str()),
            "{what} holds the raw API key {s}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Redis and Redis Cluster.

#[cfg(feature = "redis")]
mod redis_stores {
    use super::*;
    use tower_402::store::{RedisBudgetStore, RedisConfig, RedisLedger};

    fn url() -> String {
        std::env::var("TOWER402_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    fn cluster_urls() -> Option<Vec<String>> {
        match std::env::var("TOWER402_REDIS_CLUSTER_URLS") {
            Ok(v) if !v.trim().is_empty() => {
                Some(v.split(',').map(|u| u.trim().to_owned()).collect())
            }
            _ => {
                conformance::skip(
                    "Redis Cluster",
                    "TOWER402_REDIS_CLUSTER_URLS",
                    &"the variable is not set: eval \"$(bash scripts/redis-cluster.sh start)\"",
                );
                None
            }
        }
    }

    /// A config with a fresh prefix, and the URLs of the nodes to scan; `None` (after saying
    /// so) when the server is unreachable.
    async fn config(cluster: bool) -> Option<(RedisConfig, Vec<String>)> {
        let (config, urls) = if cluster {
            let urls = cluster_urls()?;
            let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
            (RedisConfig::cluster(&nodes), urls)
        } else {
            (RedisConfig::new(&url()), vec![url()])
        };
        let config = match config {
            Ok(c) => c.prefix(format!("tower402test:{}:", conformance::unique("rb"))),
            Err(e) => {
                conformance::skip("Redis", &urls.join(","), &e);
                return None;
            }
        };
        let probe = RedisBudgetStore::new(&config);
        match probe.release(&hold_id(0), Timestamp::EPOCH).await {
            Ok(_) => Some((config, urls)),
            Err(e) => {
                conformance::skip("Redis", &urls.join(","), &e);
                None
            }
        }
    }

    /// Every key under `prefix` on every node, with the node's connection.
    async fn scan(
        urls: &[String],
        prefix: &str,
    ) -> Vec<(redis::aio::MultiplexedConnection, String)> {
        let mut out = Vec::new();
        for url in urls {
            let client = redis::Client::open(url.as_str()).expect("url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("node");
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .expect("scan");
                out.extend(keys.into_iter().map(|k| (conn.clone(), k)));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        out
    }

    /// Every key of the budget store under `prefix`, with its contents as text.
    async fn dump(urls: &[String], prefix: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (mut conn, key) in scan(urls, &format!("{prefix}{{budgets}}:")).await {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("type");
            let values: Vec<String> = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await,
                "zset" => {
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn)
                        .await
                }
                other => panic!("unexpected {other} in the budget store: {key}"),
            }
            .expect("read");
            out.push((key, values.join("\n")));
        }
        out
    }

    async fn delete(urls: &[String], prefix: &str) {
        for (mut conn, key) in scan(urls, prefix).await {
            let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
        }
    }

    fn property(cluster: bool, case: &Case) -> Result<(), TestCaseError> {
        block_on(async {
            let Some((config, urls)) = config(cluster).await else {
                return Ok(());
            };
            agrees(&RedisBudgetStore::new(&config), case).await?;
            delete(&urls, config.key_prefix()).await;
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(cases())]

        #[test]
        fn the_redis_store_answers_as_the_book(case in ops()) {
            property(false, &case)?;
        }

        #[test]
        fn the_redis_cluster_store_answers_as_the_book(case in ops()) {
            property(true, &case)?;
        }
    }

    async fn race_on(cluster: bool) {
        let Some((config, urls)) = config(cluster).await else {
            return;
        };
        // Exact counts, not latency: a thousand scripts queue on a few connections.
        let config = config.response_timeout(Duration::from_secs(30));
        let secrets = secrets();
        race(
            RedisLedger::new(&config),
            RedisBudgetStore::new(&config),
            &secrets,
        )
        .await;
        // The budget store's keys hold no raw API key (it never sees one).
        let budget_keys = dump(&urls, config.key_prefix()).await;
        assert!(
            budget_keys.iter().any(|(k, _)| k.contains(":c:")),
            "the scan found the counters: {budget_keys:?}"
        );
        for (key, values) in &budget_keys {
            assert_no_secret(&format!("{key}\n{values}"), &secrets, key);
        }
        delete(&urls, config.key_prefix()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_race_on_redis() {
        race_on(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_race_on_redis_cluster() {
        race_on(true).await;
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL.

#[cfg(feature = "postgres")]
mod postgres_store {
    use super::*;
    use tokio_postgres::NoTls;
    use tower_402::store::{PostgresBudgetStore, PostgresConfig, PostgresLedger};

    fn url() -> String {
        std::env::var("TOWER402_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    async fn admin() -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&url(), NoTls)
            .await
            .expect("admin connection");
        tokio::spawn(conn);
        client
    }

    /// A config on a fresh schema holding the budget tables, or `None` (after saying so)
    /// when PostgreSQL is unreachable.
    async fn config() -> Option<PostgresConfig> {
        let schema = conformance::unique("tb");
        let config = PostgresConfig::new(&url())
            .expect("url")
            .schema(&schema)
            .expect("schema")
            .application_name(&schema)
            .pool_size(16)
            // Exact counts, not latency: the race's requests queue on one counter's lock.
            .op_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(2));
        let store = PostgresBudgetStore::new(config.pool().expect("pool"), config.clone());
        match store.migrate().await {
            Ok(()) => Some(config),
            Err(e) => {
                conformance::skip("PostgreSQL", &url(), &e);
                None
            }
        }
    }

    async fn drop_schema(config: &PostgresConfig) {
        admin()
            .await
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                config.schema_name()
            ))
            .await
            .expect("drop schema");
    }

    proptest! {
        #![proptest_config(cases())]

        #[test]
        fn the_postgres_store_answers_as_the_book(case in ops()) {
            block_on(async {
                let Some(config) = config().await else {
                    return Ok::<(), TestCaseError>(());
                };
                let store = PostgresBudgetStore::new(config.pool().expect("pool"), config.clone());
                // Migrating twice is harmless.
                store.migrate().await.expect("migrate again");
                agrees(&store, &case).await?;
                drop_schema(&config).await;
                Ok(())
            })?;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_race_on_postgres() {
        let Some(config) = config().await else {
            return;
        };
        let ledger = PostgresLedger::new(config.pool().expect("pool"), config.clone());
        ledger.migrate().await.expect("ledger tables");
        let store = PostgresBudgetStore::new(config.pool().expect("pool"), config.clone());
        let secrets = secrets();
        let served = race(ledger, store, &secrets).await;
        // The budget tables hold no raw API key (the store never sees one).
        let client = admin().await;
        // `expr` (text) of every row `t` of one of the budget tables.
        let column = |expr: &'static str, table: &'static str| {
            let sql = format!(
                "SELECT {expr} FROM \"{}\".\"{}{table}\" t",
                config.schema_name(),
                config.table_prefix_name()
            );
            let client = &client;
            async move {
                let rows = client.query(&sql, &[]).await.expect(table);
                rows.iter().map(|r| r.get(0)).collect::<Vec<String>>()
            }
        };
        for table in ["budget_counters", "budget_holds", "budget_hold_lines"] {
            let dump = column("t::text", table).await;
            assert_no_secret(&dump.join("\n"), &secrets, table);
        }
        // The scan saw the counters: one per level that held something. A key refused
        // every time (k0 can lose all its tries to k1 on team A's 50) never gets a row, as
        // a refused hold creates none.
        let owners: std::collections::BTreeSet<String> = column("owner", "budget_counters")
            .await
            .into_iter()
            .collect();
        let mut expected: std::collections::BTreeSet<String> =
            ["org", "team-a", "team-b"].map(String::from).into();
        expected.extend((0..4).filter(|&i| served[i] > 0).map(account));
        assert_eq!(owners, expected, "the counters, served per key {served:?}");
        drop_schema(&config).await;
    }
}

/// A chart of one team, `research`, with `budgets`, and account `acct` in it.
fn research_team(budgets: &[Budget]) -> Budgets {
    let team = budgets.iter().cloned().fold(
        BudgetNode::new("research", tower_402::budget::TEAM),
        BudgetNode::budget,
    );
    Budgets::new().node(team).member("acct", "research")
}

/// A request of `acct` under `key` for `units` credits (a charge on `requests`), as the
/// metering layer makes it (charged at expiry).
fn acct_request(key: &str, units: u64, now: Timestamp) -> tower_402::ledger::ReserveRequest {
    tower_402::ledger::ReserveRequest {
        account: "acct".into(),
        key: key.into(),
        fingerprint: 0,
        charges: vec![tower_402::ledger::Charge {
            meter: Meter::new("requests"),
            units,
            unit_price: Credits::new(1),
            price_per: 1,
            allowance: None,
            overage: true,
        }]
        .into(),
        ttl_secs: 60,
        idempotent: false,
        on_expiry: tower_402::ledger::OnExpiry::Charge,
        attempt: 0,
        now,
    }
}

/// Two budgets of one node whose windows start together (a month and a year, in January)
/// share one counter: each request counts once against it, the tighter cap refuses, and the
/// refusal names that budget and its own reset.
#[tokio::test]
async fn a_month_and_a_year_starting_together_count_each_request_once() {
    use tower_402::ledger::ReserveOutcome;
    let jan = Timestamp::from_utc(2027, 1, 10, 12, 0, 0).unwrap();
    let chart = research_team(&[
        Budget::credits(3, Period::CalendarMonth),
        Budget::credits(100, Period::Year),
    ]);
    let inner = MemoryLedger::new();
    inner
        .deposit(&"acct".into(), Credits::new(50), "seed", jan)
        .await
        .unwrap();
    let ledger = BudgetedLedger::new(inner.clone(), MemoryBudgetStore::new(), chart).unwrap();
    let request = |n: u32| acct_request(&format!("r{n}"), 1, jan);
    for n in 0..3 {
        let r = ledger.reserve(&request(n)).await.unwrap();
        assert!(
            matches!(r, ReserveOutcome::Reserved(_)),
            "request {n}: {r:?}"
        );
        ledger
            .settle(
                &request(n).id(),
                &[Usage::new("requests", 1)],
                Default::default(),
                jan,
            )
            .await
            .unwrap();
    }
    let refused = ledger.reserve(&request(3)).await.unwrap();
    let ReserveOutcome::Denied(tower_402::Denial::BudgetExhausted(b)) = refused else {
        panic!("the month's cap refuses the fourth: {refused:?}");
    };
    assert_eq!((b.budget, b.used, b.period), (3, 3, Period::CalendarMonth));
    assert_eq!(
        b.resets_at,
        Timestamp::from_utc(2027, 2, 1, 0, 0, 0).unwrap()
    );
    let year = ledger
        .usage("research", &Budget::credits(100, Period::Year), jan)
        .await
        .unwrap();
    assert_eq!(year.used, 3, "each request counted once for the year too");
    assert_eq!(
        inner
            .balance(&"acct".into(), jan)
            .await
            .unwrap()
            .settled
            .get(),
        3
    );
}

/// The memory store, with its first `fail` settlements failing as an outage would.
struct Flaky {
    store: MemoryBudgetStore,
    fail: AtomicUsize,
}

#[async_trait::async_trait]
impl BudgetStore for Flaky {
    async fn hold(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<tower_402::budget::HoldOutcome, tower_402::StoreError> {
        self.store.hold(key, lines, expires_at, now).await
    }
    async fn settle(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, tower_402::StoreError> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(tower_402::StoreError::unavailable("budget store down"));
        }
        self.store.settle(key, charged, usage, now).await
    }
    async fn release(
        &self,
        key: &ReservationId,
        now: Timestamp,
    ) -> Result<bool, tower_402::StoreError> {
        self.store.release(key, now).await
    }
    async fn usage(
        &self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<tower_402::budget::CounterUsage, tower_402::StoreError> {
        self.store.usage(owner, meter, window_start, now).await
    }
}

/// A budget settlement that fails is retried until it lands: the charge is counted against
/// the budget, not only logged.
#[tokio::test(start_paused = true)]
async fn a_failed_budget_settlement_is_retried_until_it_counts() {
    use tower_402::ledger::ReserveOutcome;
    let now = Timestamp::from_utc(2027, 1, 10, 12, 0, 0).unwrap();
    let chart = research_team(&[Budget::credits(10, Period::CalendarMonth)]);
    let inner = MemoryLedger::new();
    inner
        .deposit(&"acct".into(), Credits::new(50), "seed", now)
        .await
        .unwrap();
    let store = Arc::new(Flaky {
        store: MemoryBudgetStore::new(),
        fail: AtomicUsize::new(3),
    });
    let ledger = BudgetedLedger::new(inner, store.clone(), chart).unwrap();
    let request = acct_request("r1", 4, now);
    assert!(matches!(
        ledger.reserve(&request).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    ledger
        .settle(
            &request.id(),
            &[Usage::new("requests", 4)],
            Default::default(),
            now,
        )
        .await
        .unwrap();
    let month = Budget::credits(10, Period::CalendarMonth);
    let before = ledger.usage("research", &month, now).await.unwrap();
    assert_eq!(
        (before.used, before.held),
        (0, 4),
        "not counted yet: still held"
    );
    // The retries run on the paused clock: 50 + 100 + 200 ms.
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let after = ledger.usage("research", &month, now).await.unwrap();
    assert_eq!((after.used, after.held), (4, 0), "counted once it landed");
    assert_eq!(store.fail.load(Ordering::SeqCst), 0);
}

/// The memory ledger, with its first `fail` releases failing as an outage would.
#[derive(Clone)]
struct FlakyRelease(MemoryLedger, Arc<AtomicUsize>);

#[async_trait::async_trait]
impl Ledger for FlakyRelease {
    async fn reserve(
        &self,
        r: &tower_402::ledger::ReserveRequest,
    ) -> Result<tower_402::ledger::ReserveOutcome, tower_402::LedgerError> {
        self.0.reserve(r).await
    }
    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: tower_402::ledger::OverEstimate,
        now: Timestamp,
    ) -> Result<tower_402::ledger::Settlement, tower_402::LedgerError> {
        self.0.settle(id, usage, policy, now).await
    }
    async fn release(
        &self,
        id: &ReservationId,
        now: Timestamp,
    ) -> Result<(), tower_402::LedgerError> {
        if self
            .1
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(tower_402::LedgerError::Store(
                tower_402::StoreError::unavailable("ledger down"),
            ));
        }
        self.0.release(id, now).await
    }
    async fn deposit(
        &self,
        account: &tower_402::AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<tower_402::ledger::Deposit, tower_402::LedgerError> {
        self.0.deposit(account, amount, key, now).await
    }
    async fn balance(
        &self,
        account: &tower_402::AccountId,
        now: Timestamp,
    ) -> Result<tower_402::ledger::Balance, tower_402::LedgerError> {
        self.0.balance(account, now).await
    }
    async fn allowance_usage(
        &self,
        account: &tower_402::AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<tower_402::ledger::AllowanceUsage, tower_402::LedgerError> {
        self.0
            .allowance_usage(account, meter, window_start, now)
            .await
    }
}

/// A request refused for its budget has its reservation released even when the ledger is
/// down at that moment (retried until it lands): left to expire, the metering layer's hold
/// would be charged for work that never ran.
#[tokio::test(start_paused = true)]
async fn a_budget_refusal_gives_the_hold_back_even_through_an_outage() {
    use tower_402::ledger::ReserveOutcome;
    let now = Timestamp::from_utc(2027, 1, 10, 12, 0, 0).unwrap();
    let chart = research_team(&[Budget::credits(2, Period::CalendarMonth)]);
    let memory = MemoryLedger::new();
    memory
        .deposit(&"acct".into(), Credits::new(50), "seed", now)
        .await
        .unwrap();
    let failing = Arc::new(AtomicUsize::new(2));
    let inner = FlakyRelease(memory.clone(), failing.clone());
    let ledger = BudgetedLedger::new(inner, MemoryBudgetStore::new(), chart).unwrap();
    let request = acct_request("r1", 5, now);
    let refused = ledger.reserve(&request).await.unwrap();
    assert!(
        matches!(
            refused,
            ReserveOutcome::Denied(tower_402::Denial::BudgetExhausted(_))
        ),
        "{refused:?}"
    );
    let b = memory.balance(&"acct".into(), now).await.unwrap();
    assert_eq!(b.held.get(), 5, "the release failed: still held");
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(failing.load(Ordering::SeqCst), 0);
    // Long after the hold's expiry: given back, never charged.
    let b = memory
        .balance(&"acct".into(), now.plus_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        (b.available.get(), b.held.get(), b.settled.get()),
        (50, 0, 0)
    );
}
