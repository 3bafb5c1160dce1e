//! The conformance suite and the in-process fleet test on a real Redis Cluster.
//!
//! `TOWER402_REDIS_CLUSTER_URLS`: the nodes, comma separated (`scripts/redis-cluster.sh start`
//! starts a local three-master cluster and prints the line that sets it). Unset or
//! unreachable: skipped loudly, or a failure with `TOWER402_REQUIRE_BACKENDS=1`. Every test
//! uses its own key prefix (`tower402test:<pid>_<n>_…:`). Each script touches the keys of one
//! account, all in one hash slot, so a key outside it would fail here with `CROSSSLOT`.
#![cfg(feature = "redis")]

mod conformance;

use std::time::Duration;

use tower_402::store::{RedisConfig, RedisKeyStore, RedisLedger, RedisPlanStore};
use tower_402::{Ledger, Timestamp};

const VAR: &str = "TOWER402_REDIS_CLUSTER_URLS";

/// The cluster's node URLs, or `None` (after saying so) when the variable is unset.
fn urls() -> Option<Vec<String>> {
    match std::env::var(VAR) {
        Ok(v) if !v.trim().is_empty() => Some(v.split(',').map(|u| u.trim().to_owned()).collect()),
        _ => {
            conformance::skip(
                "Redis Cluster",
                VAR,
                &"the variable is not set: eval \"$(bash scripts/redis-cluster.sh start)\"",
            );
            None
        }
    }
}

/// A config with a fresh prefix, or `None` (after saying so) when there is no cluster.
async fn config() -> Option<RedisConfig> {
    let urls = urls()?;
    static CLEANED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CLEANED
        .get_or_init(|| delete_stale_keys(urls.clone()))
        .await;
    let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
    let config = match RedisConfig::cluster(&nodes) {
        Ok(c) => c.prefix(format!("tower402test:{}:", conformance::unique("rc"))),
        Err(e) => {
            conformance::skip("Redis Cluster", &urls.join(","), &e);
            return None;
        }
    };
    let probe = RedisLedger::new(&config);
    match probe.balance(&"probe".into(), Timestamp::EPOCH).await {
        Ok(_) => Some(config),
        Err(e) => {
            conformance::skip("Redis Cluster", &urls.join(","), &e);
            None
        }
    }
}

/// A plain connection to each node (not through the cluster client): for scans, which a
/// cluster answers node by node.
async fn nodes(urls: &[String]) -> Vec<redis::aio::MultiplexedConnection> {
    let mut out = Vec::new();
    for url in urls {
        let Ok(client) = redis::Client::open(url.as_str()) else {
            continue;
        };
        if let Ok(conn) = client.get_multiplexed_async_connection().await {
            out.push(conn);
        }
    }
    out
}

/// Every key on every node that matches `pattern`.
async fn scan_all(
    urls: &[String],
    pattern: &str,
) -> Vec<(redis::aio::MultiplexedConnection, String)> {
    let mut found = Vec::new();
    for mut conn in nodes(urls).await {
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async::<(u64, Vec<String>)>(&mut conn)
                .await
            else {
                break;
            };
            found.extend(keys.into_iter().map(|k| (conn.clone(), k)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    found
}

/// Deletes the keys earlier test runs left behind on every node (each test has its own key
/// prefix, `tower402test:rc_<pid>_<n>_<created>_…:`), one key at a time: keys of different
/// accounts are in different slots.
async fn delete_stale_keys(urls: Vec<String>) {
    for (mut conn, key) in scan_all(&urls, "tower402test:rc_*").await {
        let stale = key
            .strip_prefix("tower402test:")
            .is_some_and(|rest| conformance::stale(rest, "rc"));
        if stale {
            let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
        }
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

/// Every key name and value under the test's prefix, on every node, as text.
async fn stored_keys(prefix: String) -> String {
    let urls = urls().expect("the cluster the test ran on");
    let mut out = String::new();
    for (mut conn, name) in scan_all(&urls, &format!("{prefix}*")).await {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_four_shares_one_balance() {
    let Some(config) = config().await else { return };
    // Exact counts, not latency: 2,000 scripts queue on a few connections.
    let config = config.response_timeout(Duration::from_secs(30));
    // Four instances: each its own cluster connections.
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

/// The accounts of one test land on more than one node, so the suite above exercises
/// routing, not one node that happens to own every slot.
#[tokio::test]
async fn accounts_spread_over_the_nodes() {
    let Some(config) = config().await else { return };
    let urls = urls().expect("set");
    let ledger = RedisLedger::new(&config);
    for i in 0..32 {
        ledger
            .deposit(
                &format!("spread{i}").into(),
                tower_402::Credits::new(1),
                "d",
                Timestamp::now(),
            )
            .await
            .unwrap();
    }
    let mut holding = 0;
    for mut conn in nodes(&urls).await {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", config.key_prefix()))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            holding += 1;
        }
    }
    assert!(
        holding >= 2,
        "32 accounts all on one node of {}",
        urls.len()
    );
}

/// The journal's entry bound holds on the cluster as on one node.
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
