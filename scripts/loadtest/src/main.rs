//! The servers `scripts/load.sh` compares, one binary:
//!
//! ```text
//! loadtest serve <mode> <port>     mode: bare | layers | governor | floor | redis | postgres,
//!                                  layers-once | redis-once | postgres-once (the same stacks
//!                                  as layers | redis | postgres, see below),
//!                                  and for ablation (one layer or two alone, in memory):
//!                                  problem-only | gate-only | no-problem | once-no-problem,
//!                                  observed (layers with a Prometheus recorder installed
//!                                  and a usage event per request through the outbox),
//!                                  metrics (the recorder alone, no usage events),
//!                                  redis-leased | postgres-leased (redis | postgres through
//!                                  a `LeasedLedger`: requests paid from leases held in this
//!                                  process, refilled and settled in the background)
//! loadtest redis-prepare <file>    seeds the Redis bench account, writes the ledger's reserve
//!                                  script (its `.lua` files) to <file>, prints its KEYS[1] and
//!                                  ARGV for redis-benchmark
//! loadtest postgres-prepare        seeds the PostgreSQL bench account (schema `loadtest`)
//! ```
//!
//! Every mode serves `GET /v1/forecast` → `sunny`. `layers`, `redis` and `postgres` put
//! tower-402's `Billing` layer in front of it (problem layer, gate, metering; 1 credit per
//! call, key `k`), which checks the credit once, by the reservation. The `-once` modes used to
//! compose the gate and the metering layer with `and_metering` so that only the reservation
//! checked the credit; that is what every stack does now, so they are the same stacks as
//! `layers`, `redis` and `postgres`, kept so that `scripts/load.sh` still runs them (expect
//! equal figures). `governor` puts `tower_governor` (a limit never reached) in front instead. `floor` puts a hand-written
//! layer in front: the least any in-process paid-API check does (find the key's account, check
//! its plan, debit one credit under a lock, refund a failed response, say what is left in a
//! header), with no reservation record, no idempotency, no problem documents and no logs. It is
//! not a product; it says how close to the bare app any implementation of the check can get.

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tower::ServiceBuilder;
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Plan, PlanStore, Subscription};
use tower_402::store::{
    LeaseConfig, LeasedLedger, PostgresConfig, PostgresLedger, RedisConfig, RedisLedger,
};
use tower_402::*;

const ACCOUNT: &str = "bench";
const SEED: u64 = 1 << 50;

fn redis_url() -> String {
    std::env::var("TOWER402_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn postgres_url() -> String {
    std::env::var("TOWER402_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn bare() -> Router {
    Router::new().route("/v1/forecast", get(|| async { "sunny" }))
}

/// Which of tower-402's layers a server puts in front of the route.
#[derive(Clone, Copy, PartialEq)]
enum Stack {
    /// Problem layer, gate, metering: `Billing::layer`. (The `-once` modes, once the gate
    /// composed with the metering layer by `and_metering`, are this stack too.)
    Full,
    /// For the ablation lines (`load.sh` does not run them): one layer, or two, alone.
    ProblemOnly,
    /// The gate alone cannot be stacked any more (it wraps only its metering layer): the gate
    /// over a metering layer with nothing to charge (a route without a cost), no problem
    /// layer.
    GateOnly,
    /// Gate and metering, no problem layer (`once-no-problem` too).
    NoProblem,
    /// `Full`, observed: a Prometheus recorder installed (every metric recorded), and a usage
    /// event per request through the outbox to a channel a task drains.
    Observed,
    /// `Full` with the Prometheus recorder only (no usage events): the split of `Observed`.
    Metrics,
}

/// The `Billing` every layered mode uses, over `ledger` (seeded), with in-memory plans.
async fn billing_on(ledger: impl Ledger + Clone) -> Billing {
    ledger
        .deposit(
            &ACCOUNT.into(),
            Credits::new(SEED),
            "loadtest-seed",
            Timestamp::now(),
        )
        .await
        .expect("seed the bench account");
    let plans = MemoryPlanStore::new();
    plans
        .put_subscription(Subscription::active(ACCOUNT, "pro"))
        .await
        .expect("memory store");
    let catalog = Catalog::new().with_plan(Plan::new("pro", "Pro", 2).overage(true));
    Billing::new(
        StaticKeys::new().with_key("k", ACCOUNT),
        plans,
        ledger,
        catalog,
    )
    .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))))
}

/// tower-402's layers on `ledger`, as `stack` says.
async fn layered(ledger: impl Ledger + Clone, stack: Stack) -> Router {
    let billing = billing_on(ledger).await;
    match stack {
        Stack::Full => bare().layer(billing.layer()),
        Stack::Observed => {
            let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("one recorder");
            tower_402::observe::describe();
            let (sink, mut events) = tower_402::usage::ChannelSink::new(4096);
            tokio::spawn(async move { while events.recv().await.is_some() {} });
            let outbox = tower_402::usage::Outbox::start(sink, Default::default());
            let billing = billing.usage_outbox(outbox);
            bare()
                .route(
                    "/metrics",
                    get(move || {
                        let p = prometheus.clone();
                        async move { p.render() }
                    }),
                )
                .layer(billing.layer())
        }
        Stack::Metrics => {
            let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("one recorder");
            tower_402::observe::describe();
            bare()
                .route(
                    "/metrics",
                    get(move || {
                        let p = prometheus.clone();
                        async move { p.render() }
                    }),
                )
                .layer(billing.layer())
        }
        Stack::ProblemOnly => bare().layer(billing.problems()),
        Stack::GateOnly => {
            let free = billing.default_requirement(Requirement::new());
            bare().layer(
                ServiceBuilder::new()
                    .layer(free.gate())
                    .layer(free.metering()),
            )
        }
        Stack::NoProblem => bare().layer(
            ServiceBuilder::new()
                .layer(billing.gate())
                .layer(billing.metering()),
        ),
    }
}

fn governed() -> Router {
    use tower_governor::governor::GovernorConfigBuilder;
    use tower_governor::key_extractor::GlobalKeyExtractor;
    use tower_governor::GovernorLayer;
    // A limit this load never reaches: what is measured is the layer's cost.
    let config = GovernorConfigBuilder::default()
        .key_extractor(GlobalKeyExtractor)
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .expect("valid governor config");
    bare().layer(GovernorLayer::new(Arc::new(config)))
}

mod floor {
    //! The hand-written floor: see the crate docs.
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, RwLock};
    use std::task::{Context, Poll};

    use axum::body::Body;
    use axum::http::{HeaderValue, Request, Response, StatusCode};
    use axum::Router;

    #[derive(Default)]
    struct State {
        keys: HashMap<String, Arc<str>>,
        plans: RwLock<HashMap<Arc<str>, bool>>,
        balances: Mutex<HashMap<Arc<str>, u64>>,
    }

    #[derive(Clone)]
    struct Layer(Arc<State>);

    impl<S> tower::Layer<S> for Layer {
        type Service = Floor<S>;
        fn layer(&self, inner: S) -> Floor<S> {
            Floor {
                inner,
                state: self.0.clone(),
            }
        }
    }

    #[derive(Clone)]
    pub struct Floor<S> {
        inner: S,
        state: Arc<State>,
    }

    fn refuse(status: StatusCode) -> Response<Body> {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = status;
        res
    }

    impl<S> tower::Service<Request<Body>> for Floor<S>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
        S::Future: Send,
    {
        type Response = Response<Body>;
        type Error = S::Error;
        type Future = Charged<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let state = &self.state;
            let key = req.headers().get("x-api-key").and_then(|v| v.to_str().ok());
            let Some(account) = key.and_then(|k| state.keys.get(k)) else {
                return Charged::Refused {
                    res: Some(refuse(StatusCode::UNAUTHORIZED)),
                };
            };
            if !state
                .plans
                .read()
                .unwrap()
                .get(account)
                .copied()
                .unwrap_or(false)
            {
                return Charged::Refused {
                    res: Some(refuse(StatusCode::PAYMENT_REQUIRED)),
                };
            }
            let left = {
                let mut balances = state.balances.lock().unwrap();
                match balances.get_mut(account) {
                    Some(b) if *b >= 1 => {
                        *b -= 1;
                        *b
                    }
                    _ => {
                        return Charged::Refused {
                            res: Some(refuse(StatusCode::PAYMENT_REQUIRED)),
                        }
                    }
                }
            };
            Charged::Served {
                fut: self.inner.call(req),
                state: state.clone(),
                account: account.clone(),
                left,
            }
        }
    }

    pin_project_lite::pin_project! {
        #[project = ChargedProj]
        pub enum Charged<F> {
            Refused { res: Option<Response<Body>> },
            Served {
                #[pin]
                fut: F,
                state: Arc<State>,
                account: Arc<str>,
                left: u64,
            },
        }
    }

    impl<F, E> std::future::Future for Charged<F>
    where
        F: std::future::Future<Output = Result<Response<Body>, E>>,
    {
        type Output = Result<Response<Body>, E>;
        fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let (fut, state, account, left) = match self.project() {
                ChargedProj::Refused { res } => {
                    return Poll::Ready(Ok(res.take().expect("polled after completion")))
                }
                ChargedProj::Served {
                    fut,
                    state,
                    account,
                    left,
                } => (fut, state, account, left),
            };
            let mut res = match std::task::ready!(fut.poll(cx)) {
                Ok(res) => res,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let mut left = *left;
            if !res.status().is_success() {
                let mut balances = state.balances.lock().unwrap();
                if let Some(b) = balances.get_mut(&**account) {
                    *b += 1;
                    left = *b;
                }
            }
            let mut buf = itoa::Buffer::new();
            if let Ok(v) = HeaderValue::from_str(buf.format(left)) {
                res.headers_mut().insert("x-credits-remaining", v);
            }
            Poll::Ready(Ok(res))
        }
    }

    pub fn router() -> Router {
        let mut state = State::default();
        let account: Arc<str> = super::ACCOUNT.into();
        state.keys.insert("k".into(), account.clone());
        state.plans.get_mut().unwrap().insert(account.clone(), true);
        state
            .balances
            .get_mut()
            .unwrap()
            .insert(account, super::SEED);
        super::bare().layer(Layer(Arc::new(state)))
    }
}

async fn postgres_ledger() -> PostgresLedger {
    let config = PostgresConfig::new(&postgres_url())
        .expect("postgres url")
        .schema("loadtest")
        .expect("schema")
        .pool_size(16);
    let ledger = PostgresLedger::new(config.pool().expect("pool"), config);
    ledger.migrate().await.expect("migrate");
    ledger
}

fn redis_ledger() -> RedisLedger {
    RedisLedger::new(
        &RedisConfig::new(&redis_url())
            .expect("redis url")
            .prefix("loadtest:"),
    )
}

/// `inner` behind leases with the default configuration (30 s leases, at most 10 % of the
/// balance each, up to 100,000 credits), maintained every 100 ms as a service would.
fn leased<L: Ledger + Clone>(inner: L) -> LeasedLedger<L> {
    let ledger = LeasedLedger::new(inner, LeaseConfig::new());
    // The task lives as long as the server: it is never aborted.
    drop(ledger.spawn_maintenance(std::time::Duration::from_millis(100)));
    ledger
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => {
            let mode = args.get(2).expect("mode");
            let port: u16 = args.get(3).and_then(|p| p.parse().ok()).expect("port");
            if mode == "layers-around" {
                // The same three layers around the whole router (one service, served as it
                // is) instead of on its routes (`Router::layer`, which boxes the layered
                // route, its future and its response body again per request).
                let billing = billing_on(MemoryLedger::new()).await;
                let app = ServiceBuilder::new()
                    .map_response(axum::response::IntoResponse::into_response)
                    .layer(billing.layer())
                    .service(bare());
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind");
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                println!("ready {mode} {port}");
                axum::serve(listener, tower::make::Shared::new(app))
                    .await
                    .expect("serve");
                return;
            }
            let app = match mode.as_str() {
                "bare" => bare(),
                "layers" => layered(MemoryLedger::new(), Stack::Full).await,
                "layers-once" => layered(MemoryLedger::new(), Stack::Full).await,
                "observed" => layered(MemoryLedger::new(), Stack::Observed).await,
                "metrics" => layered(MemoryLedger::new(), Stack::Metrics).await,
                "problem-only" => layered(MemoryLedger::new(), Stack::ProblemOnly).await,
                "gate-only" => layered(MemoryLedger::new(), Stack::GateOnly).await,
                "no-problem" => layered(MemoryLedger::new(), Stack::NoProblem).await,
                "once-no-problem" => layered(MemoryLedger::new(), Stack::NoProblem).await,
                "governor" => governed(),
                "floor" => floor::router(),
                "redis" => layered(redis_ledger(), Stack::Full).await,
                "redis-once" => layered(redis_ledger(), Stack::Full).await,
                "postgres" => layered(postgres_ledger().await, Stack::Full).await,
                "postgres-once" => layered(postgres_ledger().await, Stack::Full).await,
                "redis-leased" => layered(leased(redis_ledger()), Stack::Full).await,
                "postgres-leased" => layered(leased(postgres_ledger().await), Stack::Full).await,
                other => panic!("unknown mode {other}"),
            };
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind");
            // TCP_NODELAY, as hyper-util and tonic servers default to: without it a response
            // whose last bytes follow a ledger round trip waits for the client's delayed ACK.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            println!("ready {mode} {port}");
            axum::serve(listener, app).await.expect("serve");
        }
        Some("redis-prepare") => {
            // The ledger's own reserve script (src/store/redis/*.lua), for `redis-benchmark`
            // to run beside the ledger: the same text the ledger loads, with the ARGV the
            // ledger passes for one 1-credit charge under a key `redis-benchmark` randomizes
            // (the order is documented in src/store/redis.rs: now, retention, gc, then the
            // reservation's key, fingerprint, expiry, ttl, charge count, each charge's nine
            // fields, whether the key is kept, whether the hold is charged at expiry, the attempt).
            let file = args.get(2).expect("script file");
            redis_ledger()
                .deposit(
                    &ACCOUNT.into(),
                    Credits::new(SEED),
                    "loadtest-seed",
                    Timestamp::now(),
                )
                .await
                .expect("seed");
            let script = concat!(
                include_str!("../../../src/store/redis/prelude.lua"),
                include_str!("../../../src/store/redis/reserve.lua"),
            );
            std::fs::write(file, script).expect("write script");
            let now = Timestamp::now().unix();
            let retention = tower_402::ledger::DEFAULT_RETENTION_SECS;
            let key = format!("loadtest:{{{}:{ACCOUNT}}}", ACCOUNT.len());
            let argv = [
                now.to_string(),
                retention.to_string(),
                retention.to_string(),
                "__rand_int__".into(),
                "1".into(),
                (now + 300).to_string(),
                "300".into(),
                "1".into(),
                "requests".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                "0".into(),
                "0".into(),
                "0".into(),
                "0".into(),
                "0".into(),
                // Charged at expiry (the metering layer's holds), no attempt number.
                "1".into(),
                "0".into(),
                // The journal's bounds, which every script takes last.
                tower_402::ledger::DEFAULT_JOURNAL_RETENTION_SECS.to_string(),
                tower_402::ledger::DEFAULT_JOURNAL_MAX_ENTRIES.to_string(),
            ];
            println!("{key} {}", argv.join(" "));
        }
        Some("redis-probe") => {
            // Ledger operations per second straight from 64 tasks, no HTTP: where does the
            // time go, the ledger or the layers?
            let ledger = redis_ledger();
            let start = std::time::Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let l = ledger.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..200 {
                        l.balance(&ACCOUNT.into(), Timestamp::now())
                            .await
                            .expect("balance");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
            let n = 64.0 * 200.0;
            println!("balance: {:.0} ops/s", n / start.elapsed().as_secs_f64());
        }
        Some("postgres-prepare") => {
            let ledger = postgres_ledger().await;
            ledger
                .deposit(
                    &ACCOUNT.into(),
                    Credits::new(SEED),
                    "loadtest-seed",
                    Timestamp::now(),
                )
                .await
                .expect("seed");
        }
        _ => {
            eprintln!("usage: loadtest serve <bare|layers|layers-once|problem-only|gate-only|no-problem|once-no-problem|governor|floor|redis|redis-once|postgres|postgres-once> <port> | redis-prepare <file> | postgres-prepare");
            std::process::exit(2);
        }
    }
}
