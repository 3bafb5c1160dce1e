//! The conformance suite, the fleet test and the fault tests on a real Redis.
//!
//! `TOWER402_REDIS_URL` (default `redis://127.0.0.1:6379`). Unreachable: skipped loudly, or a
//! failure with `TOWER402_REQUIRE_BACKENDS=1`. Every test uses its own key prefix
//! (`tower402test:<pid>_<n>_…:`); the test that stops a server starts one of its own.
#![cfg(feature = "redis")]

mod conformance;
mod own_servers;

use std::time::Duration;

use http::StatusCode;
use tower_402::store::{RedisConfig, RedisKeyStore, RedisLedger, RedisPlanStore};
use tower_402::{Credits, Ledger, LedgerError, MemoryPlanStore, StoreError, Timestamp};

fn url() -> String {
    std::env::var("TOWER402_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A config with a fresh prefix, or `None` (after saying so) when Redis is unreachable.
async fn config() -> Option<RedisConfig> {
    let url = url();
    static CLEANED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CLEANED.get_or_init(delete_stale_keys).await;
    let config = match RedisConfig::new(&url) {
        Ok(c) => c.prefix(format!("tower402test:{}:", conformance::unique("r"))),
        Err(e) => {
            conformance::skip("Redis", &url, &e);
            return None;
        }
    };
    let probe = RedisLedger::new(&config);
    match probe.balance(&"probe".into(), Timestamp::EPOCH).await {
        Ok(_) => Some(config),
        Err(e) => {
            conformance::skip("Redis", &url, &e);
            None
        }
    }
}

/// Deletes the keys earlier test runs left behind (each test has its own key prefix,
/// `tower402test:r_<pid>_<n>_<created>_…:`), with `SCAN` so a shared Redis is not blocked.
async fn delete_stale_keys() {
    let Ok(client) = redis::Client::open(url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return; // unreachable: `config` says so
    };
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("tower402test:*")
            .arg("COUNT")
            .arg(1000)
            .query_async::<(u64, Vec<String>)>(&mut conn)
            .await
        else {
            return;
        };
        let stale: Vec<&String> = keys
            .iter()
            .filter(|k| {
                k.strip_prefix("tower402test:")
                    .is_some_and(|rest| conformance::stale(rest, "r"))
            })
            .collect();
        if !stale.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(stale).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

async fn ledger() -> Option<RedisLedger> {
    config().await.map(|c| RedisLedger::new(&c))
}

async fn plans() -> Option<RedisPlanStore> {
    config().await.map(|c| RedisPlanStore::new(&c))
}

async fn keys() -> Option<(RedisKeyStore, String)> {
    let c = config().await?;
    Some((RedisKeyStore::new(&c), c.key_prefix().to_owned()))
}

/// Every key name and value under the test's prefix, as text.
async fn stored_keys(prefix: String) -> String {
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = String::new();
    for name in names {
        let kind: String = redis::cmd("TYPE")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<String> = match kind.as_str() {
            "hash" => redis::cmd("HGETALL")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "string" => vec![redis::cmd("GET")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap()],
            other => vec![other.to_owned()],
        };
        out.push_str(&name);
        out.push_str(&values.join(" "));
        out.push('\n');
    }
    out
}

conformance_tests!(ledger().await, plans().await, keys().await, stored_keys);

async fn admin() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_four_shares_one_balance() {
    let Some(config) = config().await else { return };
    // Exact counts, not latency: 2,000 scripts queue on a few connections.
    let config = config.response_timeout(Duration::from_secs(30));
    // Four instances: each its own connections.
    let instances = (0..4)
        .map(|_| (RedisLedger::new(&config), RedisPlanStore::new(&config)))
        .collect();
    conformance::fleet::run(instances).await;
    let open = RedisLedger::new(&config)
        .open_reservations(&conformance::fleet::ACCOUNT.into(), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(open, 0);
}

#[tokio::test]
async fn connection_refused_is_a_store_error_and_a_503() {
    if config().await.is_none() {
        return;
    }
    let down = RedisConfig::new("redis://127.0.0.1:1")
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .reconnect_attempts(0);
    let ledger = RedisLedger::new(&down);
    let err = ledger
        .balance(&"a".into(), Timestamp::now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::Store(StoreError::Unavailable(_))),
        "{err:?}"
    );
    let plans = RedisPlanStore::new(&down);
    use tower_402::plan::PlanStore;
    assert!(plans.subscription(&"a".into()).await.is_err());

    let memory_plans = MemoryPlanStore::new().with(tower_402::plan::Subscription::active(
        conformance::fleet::ACCOUNT,
        "basic",
    ));
    let (status, headers, body) =
        conformance::fleet::call(conformance::fleet::app(ledger, memory_plans)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key(http::header::RETRY_AFTER));
    assert!(body.contains("SERVICE_UNAVAILABLE"), "{body}");
}

#[tokio::test]
async fn a_killed_connection_recovers_without_double_applying() {
    let Some(config) = config().await else { return };
    let ledger = RedisLedger::new(&config);
    let a = "killed".into();
    let now = Timestamp::now();
    ledger
        .deposit(&a, Credits::new(10), "d1", now)
        .await
        .unwrap();
    let id = ledger.client_id().await.unwrap();
    let mut admin = admin().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    // The first operation after the kill may fail; a retry under the same key is safe.
    let mut attempts = 0;
    let d = loop {
        attempts += 1;
        match ledger.deposit(&a, Credits::new(5), "d2", now).await {
            Ok(d) => break d,
            Err(LedgerError::Store(_)) if attempts < 20 => continue,
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(d.balance.available, Credits::new(15));
    let again = ledger
        .deposit(&a, Credits::new(5), "d2", now)
        .await
        .unwrap();
    assert!(!again.applied);
    assert_ne!(ledger.client_id().await.unwrap(), id, "a new connection");
    assert_eq!(
        ledger.balance(&a, now).await.unwrap().available,
        Credits::new(15)
    );
}

/// On a `redis-server` of the test's own (stopping the shared one would stall every other
/// test): stopped (`SIGSTOP`) with the deposit's script unread in its socket, so the call
/// times out; started again (`SIGCONT`), it may still run that script, and the retry under
/// the same key must add the credits exactly once.
#[tokio::test]
async fn a_paused_server_times_out_and_a_retry_applies_once() {
    let Some(redis) = own_servers::OwnRedis::start() else {
        return;
    };
    let config = RedisConfig::new(&format!("redis://127.0.0.1:{}", redis.port))
        .expect("url")
        .prefix("paused:")
        .response_timeout(Duration::from_millis(500));
    let ledger = RedisLedger::new(&config);
    let a = "paused".into();
    let now = Timestamp::now();
    ledger
        .deposit(&a, Credits::new(10), "d1", now)
        .await
        .unwrap();
    redis.signal("-STOP");
    let err = ledger
        .deposit(&a, Credits::new(7), "d2", now)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::Store(StoreError::Timeout)),
        "{err:?}"
    );
    redis.signal("-CONT");
    // The timed-out script may run now that the server is back; retrying with the same key
    // (each attempt bounded by the response timeout) must add the 7 credits exactly once.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match ledger.deposit(&a, Credits::new(7), "d2", now).await {
            Ok(_) => break,
            Err(LedgerError::Store(_)) if attempts < 200 => continue,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        ledger.balance(&a, now).await.unwrap().available,
        Credits::new(17)
    );
}

/// A reservation record written before the scripts stored whether its key is an
/// idempotency key has no `k` field.
#[tokio::test]
async fn records_from_before_the_keep_flag_are_kept() {
    if config().await.is_none() {
        return;
    }
    let prefix = format!("tower402test:{}:", conformance::unique("r"));
    let ledger = RedisLedger::new(&RedisConfig::new(&url()).expect("url").prefix(&prefix));
    let record = format!("{prefix}{{3:old}}:r:u1");
    conformance::records_from_before_the_flag_are_kept(&ledger, async {
        let removed: i64 = redis::cmd("HDEL")
            .arg(&record)
            .arg("k")
            .query_async(&mut admin().await)
            .await
            .unwrap();
        assert_eq!(removed, 1, "the record carries the flag");
    })
    .await;
}

/// The journal keeps at most `max_entries` per account (the list is trimmed by the scripts
/// that write it), and none at all with `max_entries: 0`.
#[tokio::test]
async fn the_journal_is_bounded_by_its_entry_count() {
    let (Some(bounded), Some(off)) = (config().await, config().await) else {
        return;
    };
    conformance::journal_bound(
        &RedisLedger::new(&bounded.journal(conformance::BOUNDED)),
        &RedisLedger::new(&off.journal(conformance::OFF)),
    )
    .await;
}
