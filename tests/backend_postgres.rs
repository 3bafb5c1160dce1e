//! The conformance suite, the fleet test and the fault tests on a real PostgreSQL.
//!
//! `TOWER402_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Unreachable:
//! skipped loudly, or a failure with `TOWER402_REQUIRE_BACKENDS=1`. Every test migrates its
//! own schema (`t_<pid>_<n>_…`).
#![cfg(feature = "postgres")]

mod conformance;

use std::time::Duration;

use http::StatusCode;
use tokio_postgres::NoTls;
use tower_402::plan::{PlanStore, Subscription};
use tower_402::store::{PostgresConfig, PostgresKeyStore, PostgresLedger, PostgresPlanStore};
use tower_402::{Credits, Ledger, LedgerError, MemoryPlanStore, StoreError, Timestamp};

fn url() -> String {
    std::env::var("TOWER402_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A config on a fresh, migrated schema, or `None` (after saying so) when PostgreSQL is
/// unreachable.
async fn config() -> Option<PostgresConfig> {
    let url = url();
    static CLEANED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CLEANED.get_or_init(drop_stale_schemas).await;
    let schema = conformance::unique("t");
    let config = PostgresConfig::new(&url)
        .expect("url")
        .schema(&schema)
        .expect("schema")
        .application_name(&schema)
        .pool_size(8)
        .connect_timeout(Duration::from_secs(2));
    let pool = config.pool().expect("pool");
    match PostgresLedger::new(pool, config.clone()).migrate().await {
        Ok(()) => Some(config),
        Err(e) => {
            conformance::skip("PostgreSQL", &url, &e);
            None
        }
    }
}

async fn ledger() -> Option<PostgresLedger> {
    let c = config().await?;
    Some(PostgresLedger::new(c.pool().ok()?, c))
}

async fn plans() -> Option<PostgresPlanStore> {
    let c = config().await?;
    Some(PostgresPlanStore::new(c.pool().ok()?, c))
}

async fn keys() -> Option<(PostgresKeyStore, String)> {
    let c = config().await?;
    let table = format!(
        "\"{}\".\"{}api_keys\"",
        c.schema_name(),
        c.table_prefix_name()
    );
    let store = PostgresKeyStore::new(c.pool().ok()?, c);
    store.migrate().await.expect("key table");
    Some((store, table))
}

/// Every row of the key table, as PostgreSQL prints it.
async fn stored_keys(table: String) -> String {
    let rows = admin()
        .await
        .query(&format!("SELECT k::text FROM {table} k"), &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, String>(0) + "\n").collect()
}

conformance_tests!(ledger().await, plans().await, keys().await, stored_keys);

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&url(), NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    client
}

/// Drops the schemas earlier test runs left behind (each test migrates its own), once they
/// are six hours old.
async fn drop_stale_schemas() {
    let Ok((client, conn)) = tokio_postgres::connect(&url(), NoTls).await else {
        return; // unreachable: `config` says so
    };
    tokio::spawn(conn);
    let Ok(rows) = client
        .query(
            "SELECT schema_name::text FROM information_schema.schemata \
             WHERE schema_name LIKE 't\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let schema: String = row.get(0);
        if conformance::stale(&schema, "t") {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await;
        }
    }
}

async fn drop_schema(config: &PostgresConfig, schema: &str) {
    let _ = config;
    admin()
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .expect("drop schema");
}

#[tokio::test]
async fn migrate_is_idempotent_and_names_are_validated() {
    let Some(config) = config().await else { return };
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    // Twice more, concurrently: the advisory lock serializes them.
    let (a, b) = tokio::join!(ledger.migrate(), ledger.migrate());
    a.unwrap();
    b.unwrap();
    assert!(PostgresConfig::new(&url())
        .unwrap()
        .schema("x\"; DROP TABLE y; --")
        .is_err());
}

#[tokio::test]
async fn sweep_releases_idle_accounts_and_forgets_old_records() {
    let Some(config) = config().await else { return };
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    let a = "idle".into();
    let t0 = conformance::at(0);
    ledger.deposit(&a, Credits::new(10), "d", t0).await.unwrap();
    let mut req = conformance::request("idle", "k", vec![conformance::paid("req", 4, 1)], t0);
    req.ttl_secs = 5;
    ledger.reserve(&req).await.unwrap();
    let swept = ledger.sweep(conformance::at(10), 100).await.unwrap();
    assert!(swept >= 1);
    assert_eq!(
        ledger
            .open_reservations(&a, conformance::at(10))
            .await
            .unwrap(),
        0
    );
    let late = conformance::at(10).plus_secs(tower_402::ledger::DEFAULT_RETENTION_SECS);
    let deleted = ledger.sweep(late, 100).await.unwrap();
    assert!(
        deleted >= 2,
        "the expired record and the deposit key: {deleted}"
    );
    let b = conformance::conserved(&ledger, "idle", late).await;
    assert_eq!(b.available, Credits::new(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_four_shares_one_balance() {
    let Some(config) = config().await else { return };
    let config = config.op_timeout(Duration::from_secs(60));
    // Four instances: each its own pool.
    let instances = (0..4)
        .map(|_| {
            let pool = config.pool().unwrap();
            (
                PostgresLedger::new(pool.clone(), config.clone()),
                PostgresPlanStore::new(pool, config.clone()),
            )
        })
        .collect();
    conformance::fleet::run(instances).await;
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    let open = ledger
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
    let down = PostgresConfig::new("postgres://postgres@127.0.0.1:1/test")
        .unwrap()
        .connect_timeout(Duration::from_millis(200));
    let ledger = PostgresLedger::new(down.pool().unwrap(), down.clone());
    let err = ledger
        .balance(&"a".into(), Timestamp::now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::Store(StoreError::Unavailable(_))),
        "{err:?}"
    );
    let plans = PostgresPlanStore::new(down.pool().unwrap(), down);
    assert!(plans.subscription(&"a".into()).await.is_err());
    let memory_plans =
        MemoryPlanStore::new().with(Subscription::active(conformance::fleet::ACCOUNT, "basic"));
    let (status, headers, body) =
        conformance::fleet::call(conformance::fleet::app(ledger, memory_plans)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key(http::header::RETRY_AFTER));
    assert!(body.contains("SERVICE_UNAVAILABLE"), "{body}");
}

#[tokio::test]
async fn terminated_connections_recover_without_double_applying() {
    let Some(config) = config().await else { return };
    let app_name = conformance::unique("kill");
    let config = config.application_name(&app_name);
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    let a = "killed".into();
    let now = Timestamp::now();
    ledger
        .deposit(&a, Credits::new(10), "d1", now)
        .await
        .unwrap();
    let killed = admin()
        .await
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app_name],
        )
        .await
        .unwrap();
    assert!(!killed.is_empty());
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
    assert!(
        !ledger
            .deposit(&a, Credits::new(5), "d2", now)
            .await
            .unwrap()
            .applied
    );
    assert_eq!(
        ledger.balance(&a, now).await.unwrap().available,
        Credits::new(15)
    );
    drop_schema(&config, &schema_of(&config)).await;
}

fn schema_of(config: &PostgresConfig) -> String {
    config.schema_name().to_owned()
}

#[tokio::test]
async fn a_locked_account_times_out_and_nothing_is_half_applied() {
    let Some(config) = config().await else { return };
    let a = "locked".into();
    let now = Timestamp::now();
    // The seed under the default timeout: only the deposit behind the lock is meant to time
    // out, not a first connection on a busy machine.
    PostgresLedger::new(config.pool().unwrap(), config.clone())
        .deposit(&a, Credits::new(10), "d1", now)
        .await
        .unwrap();
    let config = config.op_timeout(Duration::from_millis(200));
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    // Another session holds the account's row lock.
    let mut blocker = admin().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM \"{}\".tower402_balances WHERE account = 'locked' FOR UPDATE",
            schema_of(&config)
        ),
        &[],
    )
    .await
    .unwrap();
    let err = ledger
        .deposit(&a, Credits::new(7), "d2", now)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LedgerError::Store(StoreError::Timeout)),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match ledger.deposit(&a, Credits::new(7), "d2", now).await {
            Ok(_) => break,
            Err(LedgerError::Store(_)) if attempts < 50 => continue,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        ledger.balance(&a, now).await.unwrap().available,
        Credits::new(17)
    );
    drop_schema(&config, &schema_of(&config)).await;
}

/// A row from before the `retain` column existed has it set to true by `migrate()`.
#[tokio::test]
async fn rows_from_before_the_retain_column_are_kept() {
    let Some(config) = config().await else { return };
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    let update = format!(
        "UPDATE \"{}\".tower402_reservations SET retain = true WHERE key = 'u1'",
        schema_of(&config)
    );
    conformance::records_from_before_the_flag_are_kept(&ledger, async {
        // What `ADD COLUMN … DEFAULT true` gives the rows that were already there.
        assert_eq!(admin().await.execute(&update, &[]).await.unwrap(), 1);
    })
    .await;
}

/// A fresh ledger with `credits` deposited to `account`, and the time it was done at.
async fn funded(account: &str, credits: u64) -> Option<(PostgresLedger, Timestamp)> {
    let ledger = ledger().await?;
    let now = Timestamp::now();
    ledger
        .deposit(&account.into(), Credits::new(credits), "seed", now)
        .await
        .unwrap();
    Some((ledger, now))
}

/// Polls each of `queued` once (which queues its operation) and checks none has finished.
async fn poll_once<F: std::future::Future + Unpin>(queued: &mut [F]) {
    std::future::poll_fn(|cx| {
        for f in queued.iter_mut() {
            assert!(std::pin::Pin::new(&mut *f).poll(cx).is_pending());
        }
        std::task::Poll::Ready(())
    })
    .await;
}

/// Operations queued on a busy account share one transaction. One whose result cannot be
/// stored (an allowance count beyond PostgreSQL's `bigint`) fails alone: the batch runs again
/// one operation per transaction, and the others succeed.
#[tokio::test(flavor = "current_thread")]
async fn a_busy_account_shares_transactions_and_a_bad_operation_fails_alone() {
    use conformance::{paid, request, window};
    use tower_402::ledger::ReserveOutcome;
    let Some((ledger, now)) = funded("busy", 100).await else {
        return;
    };

    // All polled once before the account's transaction task first runs (one thread): they
    // are queued together.
    let start = ledger.transaction_counts();
    let good = |k: usize| request("busy", &format!("g{k}"), vec![paid("calls", 1, 1)], now);
    let requests: Vec<_> = (0..20).map(good).collect();
    let outcomes = futures_util::future::join_all(requests.iter().map(|r| ledger.reserve(r))).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(ReserveOutcome::Reserved(_)))));
    let counts = ledger.transaction_counts();
    assert_eq!(counts.transactions - start.transactions, 1, "{counts:?}");
    assert_eq!(counts.operations - start.operations, 20);

    let mut huge = paid("tokens", (1 << 63) + 1, 1);
    huge.allowance = Some(window(now, u64::MAX));
    let bad = request("busy", "bad", vec![huge], now);
    let start = ledger.transaction_counts();
    let (g20, g21) = (good(20), good(21));
    let (before, bad, after) = tokio::join!(
        ledger.reserve(&g20),
        ledger.reserve(&bad),
        ledger.reserve(&g21),
    );
    assert!(
        matches!(before, Ok(ReserveOutcome::Reserved(_))),
        "{before:?}"
    );
    assert!(
        matches!(after, Ok(ReserveOutcome::Reserved(_))),
        "{after:?}"
    );
    assert!(matches!(bad, Err(LedgerError::AmountOutOfRange)), "{bad:?}");
    let counts = ledger.transaction_counts();
    // The batch of three, then each alone.
    assert_eq!(counts.transactions - start.transactions, 4, "{counts:?}");
    let b = conformance::conserved(&ledger, "busy", now).await;
    assert_eq!((b.available, b.held), (Credits::new(78), Credits::new(22)));
}

/// An operation whose caller stopped waiting before its transaction began is not run.
#[tokio::test(flavor = "current_thread")]
async fn an_abandoned_operation_is_not_run() {
    use conformance::{id, paid, request};
    let Some((ledger, now)) = funded("gone", 10).await else {
        return;
    };
    let abandoned = request("gone", "abandoned", vec![paid("calls", 4, 1)], now);
    // Queued by its first poll; its transaction cannot have begun (one thread, not yielded).
    poll_once(&mut [ledger.reserve(&abandoned)]).await;
    let kept = request("gone", "kept", vec![paid("calls", 1, 1)], now);
    ledger.reserve(&kept).await.unwrap();
    let b = conformance::conserved(&ledger, "gone", now).await;
    assert_eq!((b.available, b.held), (Credits::new(9), Credits::new(1)));
    assert!(matches!(
        ledger.release(&id("gone", "abandoned"), now).await,
        Err(LedgerError::UnknownReservation)
    ));
}

/// Operations whose callers stopped waiting take no place in a transaction.
#[tokio::test(flavor = "current_thread")]
async fn abandoned_operations_cost_no_transaction() {
    use conformance::{paid, request};
    let Some((ledger, now)) = funded("many", 1000).await else {
        return;
    };
    let start = ledger.transaction_counts();
    let requests: Vec<_> = (0..200)
        .map(|k| request("many", &format!("k{k}"), vec![paid("calls", 1, 1)], now))
        .collect();
    let mut queued: Vec<_> = requests.iter().map(|r| ledger.reserve(r)).collect();
    poll_once(&mut queued).await;
    drop(queued);
    let live = request("many", "live", vec![paid("calls", 1, 1)], now);
    ledger.reserve(&live).await.unwrap();
    let counts = ledger.transaction_counts();
    assert_eq!(counts.transactions - start.transactions, 1, "{counts:?}");
    assert_eq!(counts.operations - start.operations, 1, "{counts:?}");
    let b = conformance::conserved(&ledger, "many", now).await;
    assert_eq!(b.held, Credits::new(1));
}

/// Data the server refuses from one operation (a NUL in a deposit key) fails that operation
/// only, not the others sharing its transaction.
#[tokio::test(flavor = "current_thread")]
async fn data_the_server_refuses_fails_only_its_operation() {
    use conformance::{paid, request};
    use tower_402::ledger::ReserveOutcome;
    let Some((ledger, now)) = funded("nul", 10).await else {
        return;
    };
    let account = "nul".into();
    let good = request("nul", "good", vec![paid("calls", 1, 1)], now);
    let (reserved, refused) = tokio::join!(
        ledger.reserve(&good),
        ledger.deposit(&account, Credits::new(1), "bad\0key", now),
    );
    assert!(
        matches!(reserved, Ok(ReserveOutcome::Reserved(_))),
        "{reserved:?}"
    );
    assert!(matches!(refused, Err(LedgerError::Store(_))), "{refused:?}");
    let b = conformance::conserved(&ledger, "nul", now).await;
    assert_eq!((b.available, b.held), (Credits::new(9), Credits::new(1)));
}

/// An account's transaction task that never ran (its runtime shut down first) leaves no queue
/// behind: the account keeps working on another runtime.
#[test]
fn a_transaction_task_that_never_ran_leaves_no_queue() {
    use conformance::{paid, request};
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let Some(ledger) = first.block_on(async {
        let config = config().await?.op_timeout(Duration::from_secs(5));
        Some(PostgresLedger::new(config.pool().ok()?, config))
    }) else {
        return;
    };
    let now = Timestamp::now();
    first.block_on(async {
        ledger
            .deposit(&"orphan".into(), Credits::new(10), "seed", now)
            .await
            .unwrap();
        let r = request("orphan", "a", vec![paid("calls", 1, 1)], now);
        poll_once(&mut [ledger.reserve(&r)]).await;
    });
    drop(first);
    runtime().block_on(async {
        let r = request("orphan", "b", vec![paid("calls", 1, 1)], now);
        ledger.reserve(&r).await.unwrap();
        let b = conformance::conserved(&ledger, "orphan", now).await;
        assert_eq!(b.held, Credits::new(1));
    });
}

/// The journal keeps at most `max_entries` per account (trimmed in the transaction that
/// writes it), and none at all with `max_entries: 0`.
#[tokio::test]
async fn the_journal_is_bounded_by_its_entry_count() {
    let (Some(bounded), Some(off)) = (config().await, config().await) else {
        return;
    };
    let bounded = bounded.journal(conformance::BOUNDED);
    let off = off.journal(conformance::OFF);
    conformance::journal_bound(
        &PostgresLedger::new(bounded.pool().unwrap(), bounded),
        &PostgresLedger::new(off.pool().unwrap(), off),
    )
    .await;
}

/// A balances table from before the overdraft (no `overdrawn` column, the old conservation
/// check) is brought up to date by `migrate`: the column added, the old check replaced by
/// the one that counts what is owed, so an overdraft can be written.
#[tokio::test]
async fn migrate_adds_the_overdraft_to_old_tables() {
    let Some(config) = config().await else { return };
    let table = format!("\"{}\".tower402_balances", schema_of(&config));
    let old = format!(
        "ALTER TABLE {table} DROP CONSTRAINT tower402_balances_conserved; \
         ALTER TABLE {table} DROP COLUMN overdrawn; \
         ALTER TABLE {table} ADD CHECK (deposited = available + held + settled)"
    );
    admin().await.batch_execute(&old).await.unwrap();
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    ledger.migrate().await.unwrap();
    ledger.migrate().await.unwrap(); // idempotent
    let checks: Vec<String> = admin()
        .await
        .query(
            &format!(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
                  WHERE conrelid = '{table}'::regclass AND contype = 'c'"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !checks.iter().any(|c| c.contains("deposited = ((available")),
        "the old check is gone: {checks:?}"
    );
    conformance::overdraft(&ledger).await;
}
