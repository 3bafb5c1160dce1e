//! What the examples without axum share (`grpc`, `hyper`): the quickstart's demo accounts on
//! the in-memory stores, and a hyper 1 accept loop for any tower service. Not an example of
//! its own; include it with `#[path = "common/plain.rs"] mod plain;`.
#![allow(dead_code)]

use std::error::Error as StdError;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::Service;
use tower_402::budget::{self, Budget, BudgetNode, BudgetedLedger, Budgets, MemoryBudgetStore};
use tower_402::decision::{Cost, Requirement};
use tower_402::plan::{Catalog, Period, Plan, PlanStore, Subscription, SubscriptionStatus};
use tower_402::problem::{Links, ProblemConfig};
use tower_402::{
    Billing, Clock, Credits, Ledger, MemoryLedger, MemoryPlanStore, StaticKeys, Timestamp,
};

/// The quickstart's demo keys, their accounts, and what each shows.
pub const DEMO_KEYS: &[(&str, &str, &str)] = &[
    ("demo-pro", "acct_pro", "pro, active, 1000 credits"),
    ("demo-basic", "acct_basic", "basic, active, 1000 credits"),
    ("demo-free", "acct_free", "free, active, 5 requests a month"),
    ("demo-broke", "acct_broke", "basic, active, 0 credits"),
    ("demo-expired", "acct_expired", "basic, canceled and ended"),
    (
        "demo-grace",
        "acct_grace",
        "basic, past due, inside its grace period",
    ),
    (
        "demo-past-due",
        "acct_past_due",
        "basic, past due, grace over",
    ),
    (
        "demo-trial-over",
        "acct_trial_over",
        "trial ended, no paid plan",
    ),
    (
        "demo-dept",
        "acct_dept",
        "basic, 1000 credits, in team research: 3 credits a quarter",
    ),
];

/// The demo's budget chart: `acct_dept` is in team `research`, whose budget is 3 credits a
/// quarter (its balance has far more).
pub fn budgets() -> Budgets {
    Budgets::new()
        .node(
            BudgetNode::new("research", budget::TEAM)
                .budget(Budget::credits(3, Period::Quarter))
                .managed_by(
                    "Research's budget holder",
                    "https://example.com/teams/research/budget",
                ),
        )
        .member("acct_dept", "research")
}

const DAY: u64 = 86_400;

/// The quickstart's plans: free (5 requests a month), basic (tier 1, pays from credit), pro
/// (tier 2, pays from credit, `premium-models`).
pub fn catalog() -> Catalog {
    Catalog::new()
        .with_plan(Plan::new("free", "Free", 0).allowance("requests", 5, Period::CalendarMonth))
        .with_plan(Plan::new("basic", "Basic", 1).overage(true))
        .with_plan(
            Plan::new("pro", "Pro", 2)
                .overage(true)
                .feature("premium-models"),
        )
}

/// The stores behind a demo, every account of [`DEMO_KEYS`] in its documented state.
pub struct Accounts {
    /// The demo keys.
    pub keys: StaticKeys,
    /// The subscriptions.
    pub plans: MemoryPlanStore,
    /// The balances.
    pub ledger: MemoryLedger,
}

/// Seeds the stores as at `clock`'s current time.
pub async fn accounts<C: Clock>(clock: &C) -> Accounts {
    let now = clock.now();
    let ago = |days: u64| Timestamp::from_unix(now.unix().saturating_sub(days * DAY));
    let plans = MemoryPlanStore::new();
    let ledger = MemoryLedger::new();
    let mut keys = StaticKeys::new();
    for (key, account, _) in DEMO_KEYS {
        keys = keys.with_key(*key, *account);
    }
    let mut subs = vec![
        Subscription::active("acct_pro", "pro"),
        Subscription::active("acct_basic", "basic"),
        Subscription::active("acct_free", "free"),
        Subscription::active("acct_broke", "basic"),
        Subscription::active("acct_dept", "basic"),
    ];
    let mut expired = Subscription::new("acct_expired", "basic", SubscriptionStatus::Canceled);
    expired.canceled_at = Some(ago(40));
    expired.ended_at = Some(ago(10));
    subs.push(expired);
    let mut grace = Subscription::new("acct_grace", "basic", SubscriptionStatus::PastDue);
    grace.past_due_since = Some(ago(1));
    subs.push(grace);
    let mut past_due = Subscription::new("acct_past_due", "basic", SubscriptionStatus::PastDue);
    past_due.past_due_since = Some(ago(10));
    subs.push(past_due);
    let mut trial = Subscription::new("acct_trial_over", "basic", SubscriptionStatus::Trialing);
    trial.trial_end = Some(ago(1));
    subs.push(trial);
    for sub in subs {
        plans.put_subscription(sub).await.expect("memory store");
    }
    for account in [
        "acct_pro",
        "acct_basic",
        "acct_grace",
        "acct_past_due",
        "acct_expired",
        "acct_dept",
    ] {
        ledger
            .deposit(&account.into(), Credits::new(1000), "demo-seed", now)
            .await
            .expect("memory ledger");
    }
    Accounts {
        keys,
        plans,
        ledger,
    }
}

/// The quickstart's problem configuration: documentation type URIs and every link.
pub fn problems() -> ProblemConfig {
    let links = Links::new()
        .billing("https://billing.example.com/portal")
        .upgrade("https://example.com/pricing")
        .top_up("https://billing.example.com/top-up")
        .support("https://example.com/support")
        .docs("https://docs.example.com/errors");
    ProblemConfig::new()
        .type_base("https://docs.example.com/problems/")
        .grpc_domain("weather.example.com")
        .links(links)
}

/// The quickstart's forecast: any plan; 1 credit a call on paid plans, 1 unit of allowance on
/// `free`.
pub fn forecast() -> Requirement {
    Requirement::new().cost(Cost::new("requests", 1, Credits::new(1)))
}

/// The quickstart's premium forecast: the `pro` tier, 10 credits a call.
pub fn premium() -> Requirement {
    Requirement::new()
        .min_tier(2)
        .cost(Cost::new("requests", 1, Credits::new(10)))
}

/// The demo's billing core over the demo accounts, and the stores behind it.
#[derive(Clone)]
pub struct Demo {
    /// Everything the three layers are made of: take `billing.layer()`.
    pub billing: Billing,
    /// The ledger behind it.
    pub ledger: MemoryLedger,
    /// The plan store behind it.
    pub plans: MemoryPlanStore,
}

/// The billing core over freshly seeded demo accounts at `clock`'s time; `routes` adds the
/// example's own route rules.
pub async fn billing<C: Clock + Clone>(clock: C, routes: impl FnOnce(Billing) -> Billing) -> Demo {
    let Accounts {
        keys,
        plans,
        ledger,
    } = accounts(&clock).await;
    // The memory ledger, with the budget chart's holds on top (`acct_dept`'s team budget).
    let budgeted = BudgetedLedger::new(ledger.clone(), MemoryBudgetStore::new(), budgets())
        .expect("the demo's chart is valid");
    let billing = Billing::new(keys, plans.clone(), budgeted, catalog())
        .clock(clock)
        .problem_config(problems());
    Demo {
        billing: routes(billing),
        ledger,
        plans,
    }
}

/// Reads `PORT` (default `default`), exiting with a clear message when it is not a port.
pub fn port(default: u16) -> u16 {
    match std::env::var("PORT") {
        Ok(p) => p.parse().unwrap_or_else(|_| {
            eprintln!("PORT must be a number from 0 to 65535, got {p:?}");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

/// Binds 127.0.0.1:`port`, exiting with a clear message when it cannot.
pub async fn listen(port: u16) -> TcpListener {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        })
}

/// Serves `service` on every connection `listener` accepts, HTTP/1.1 or HTTP/2 (gRPC), with
/// hyper 1 and hyper-util: no framework in between.
pub async fn serve<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let served = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Logs to stderr, `RUST_LOG` to filter (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
