//! One reserve + settle cycle per backend: memory always; Redis and PostgreSQL when built with
//! their features and the services answer (otherwise a loud SKIPPED line).
//!
//! `cargo bench --bench ledger --all-features`

use criterion::{criterion_group, criterion_main, Criterion};
use tower_402::ledger::{Charge, OnExpiry, OverEstimate, ReserveRequest, Usage};
use tower_402::plan::Meter;
use tower_402::{Credits, Ledger, MemoryLedger, Timestamp};

fn request(n: u64) -> ReserveRequest {
    ReserveRequest {
        account: "bench".into(),
        key: format!("b:{n}").into(),
        fingerprint: 1,
        charges: vec![Charge {
            meter: Meter::new("requests"),
            units: 1,
            unit_price: Credits::new(1),
            price_per: 1,
            allowance: None,
            overage: true,
        }]
        .into(),
        ttl_secs: 300,
        idempotent: false,
        on_expiry: OnExpiry::Charge,
        attempt: 0,
        now: Timestamp::now(),
    }
}

fn cycle<L: Ledger>(c: &mut Criterion, name: &str, rt: &tokio::runtime::Runtime, ledger: L) {
    rt.block_on(ledger.deposit(
        &"bench".into(),
        Credits::new(1 << 50),
        "bench-seed",
        Timestamp::now(),
    ))
    .expect("seed");
    let usage = [Usage::new("requests", 1)];
    let mut n = 0u64;
    c.bench_function(&format!("ledger/{name}/reserve_settle"), |b| {
        b.to_async(rt).iter(|| {
            n += 1;
            let req = request(n);
            let ledger = &ledger;
            let usage = &usage;
            async move {
                ledger.reserve(&req).await.expect("reserve");
                ledger
                    .settle(&req.id(), usage, OverEstimate::DrawBalance, req.now)
                    .await
                    .expect("settle");
            }
        })
    });
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    cycle(c, "memory", &rt, MemoryLedger::new());

    #[cfg(feature = "redis")]
    {
        let url =
            std::env::var("TOWER402_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let ledger = tower_402::store::RedisLedger::new(
            &tower_402::store::RedisConfig::new(&url)
                .expect("url")
                .prefix(format!("bench{}:", std::process::id())),
        );
        match rt.block_on(ledger.balance(&"bench".into(), Timestamp::now())) {
            Ok(_) => cycle(c, "redis", &rt, ledger),
            Err(e) => eprintln!("SKIPPED: Redis at {url} unreachable ({e})"),
        }
    }
    #[cfg(not(feature = "redis"))]
    eprintln!("SKIPPED: ledger/redis (built without the `redis` feature)");

    #[cfg(feature = "postgres")]
    {
        let url = std::env::var("TOWER402_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let config = tower_402::store::PostgresConfig::new(&url)
            .expect("url")
            .schema("bench")
            .expect("schema");
        let ready = config
            .pool()
            .map(|pool| tower_402::store::PostgresLedger::new(pool, config));
        match ready {
            Ok(ledger) => match rt.block_on(ledger.migrate()) {
                Ok(()) => cycle(c, "postgres", &rt, ledger),
                Err(e) => eprintln!("SKIPPED: PostgreSQL at {url} unreachable ({e})"),
            },
            Err(e) => eprintln!("SKIPPED: PostgreSQL at {url} unreachable ({e})"),
        }
    }
    #[cfg(not(feature = "postgres"))]
    eprintln!("SKIPPED: ledger/postgres (built without the `postgres` feature)");
}

criterion_group!(benches, bench);
criterion_main!(benches);
