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
use tower_402::store::{PostgresConfig, PostgresLedger, PostgresPlanStore};
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

conformance_tests!(ledger().await, plans().await);

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
    let config = config.op_timeout(Duration::from_millis(200));
    let ledger = PostgresLedger::new(config.pool().unwrap(), config.clone());
    let a = "locked".into();
    let now = Timestamp::now();
    ledger
        .deposit(&a, Credits::new(10), "d1", now)
        .await
        .unwrap();
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
