//! [`Billing`]: the one value the three layers are made from.
//!
//! Stores, catalog, route rules, clock, problem configuration, failure mode, timeouts and the
//! metering policies are given once, to a `Billing`. Its layers are views of that one value:
//!
//! | method | layer | does |
//! |---|---|---|
//! | [`layer`](Billing::layer) | [`BillingLayer`] | all three below, in the only order that works |
//! | [`problems`](Billing::problems) | [`ProblemDetailsLayer`] | renders refusals and errors (outermost) |
//! | [`gate`](Billing::gate) | [`PaymentGateLayer`] | who is calling, is the subscription in good standing, does the plan include the route |
//! | [`metering`](Billing::metering) | [`MeteringLayer`] | reserves the price (checking allowance and credit, once), runs the handler, settles |
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_402::decision::{Cost, Requirement};
//! use tower_402::plan::{Catalog, Plan, Subscription};
//! use tower_402::*;
//!
//! let catalog = Catalog::new().with_plan(Plan::new("pro", "Pro", 2).overage(true));
//! let billing = Billing::new(
//!     StaticKeys::new().with_key("sk_live_1", "acme"),
//!     MemoryPlanStore::new().with(Subscription::active("acme", "pro")),
//!     MemoryLedger::new(),
//!     catalog,
//! )
//! .route("GET /health", Requirement::public())
//! .route("GET /v1/items/{id}", Requirement::new().min_tier(2).cost(Cost::new("requests", 1, Credits::new(50))))
//! .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
//!
//! let app: Router = Router::new()
//!     .route("/health", get(|| async { "ok" }))
//!     .route("/v1/items/{id}", get(|| async { "an item" }))
//!     .layer(billing.layer());
//! ```
//!
//! # Why one value, and not three configured layers
//!
//! tower-http's habit is "a layer is its configuration": each layer is built on its own and
//! knows nothing of the others. That is right for independent middleware, and wrong for these
//! three, which must agree: the gate decides what a request may cost, the metering layer holds
//! and charges it, the problem layer renders both layers' refusals. Configured separately they
//! could disagree (two clocks, two problem configurations, a gate reading one ledger and a
//! metering layer charging another), and a stack could be missing a part: a gate with no
//! metering behind it checks balances and never debits.
//!
//! So the configuration is one value, and the layers hold nothing but a shared reference to
//! it: each is still `Clone + Debug` configuration in tower's sense, but they cannot disagree.
//! Each request is priced once (the gate's priced charges travel with the request to the
//! metering layer, by value, never through the request extensions) and its credit is checked
//! once, atomically, by the reservation.
//!
//! # A stack that cannot work does not build
//!
//! [`PaymentGateLayer`] only wraps a [`Metering`](crate::metering::Metering) service, and
//! [`Metering`](crate::metering::Metering) is not a `Service` on its own: only the gate calls
//! it, handing over the admitted request. So a gate without metering, metering without a gate,
//! and the two in the reverse order (axum's `Router::layer` calls applied one by one wrap in
//! the reverse order of `ServiceBuilder`) are compile errors, with the fix in the message:
//!
//! ```compile_fail,E0277
//! # use axum::{routing::get, Router};
//! # use tower_402::plan::Catalog;
//! # use tower_402::*;
//! # let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new());
//! // A gate with nothing to charge behind it.
//! let app: Router = Router::new().route("/", get(|| async { "" })).layer(billing.gate());
//! ```
//!
//! ```compile_fail,E0277
//! # use axum::{routing::get, Router};
//! # use tower_402::plan::Catalog;
//! # use tower_402::*;
//! # let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new());
//! // Metering with nobody to say who pays.
//! let app: Router = Router::new().route("/", get(|| async { "" })).layer(billing.metering());
//! ```
//!
//! ```compile_fail,E0277
//! # use axum::{routing::get, Router};
//! # use tower_402::plan::Catalog;
//! # use tower_402::*;
//! # let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new());
//! // Chained `Router::layer` calls: the last one added runs first, so metering would run
//! // before the gate.
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "" }))
//!     .layer(billing.problems())
//!     .layer(billing.gate())
//!     .layer(billing.metering());
//! ```
//!
//! The order that works, spelled out (what [`layer`](Billing::layer) does):
//!
//! ```
//! # use axum::{routing::get, Router};
//! # use tower_402::plan::Catalog;
//! # use tower_402::*;
//! # let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new());
//! let app: Router = Router::new().route("/", get(|| async { "" })).layer(
//!     tower::ServiceBuilder::new()
//!         .layer(billing.problems())
//!         .layer(billing.gate())
//!         .layer(billing.metering()),
//! );
//! ```
//!
//! A gate and a metering layer taken from two different `Billing` values are refused when
//! the service is built (the layer panics, naming the fix), as is a route rule that could
//! never match a request ([`route`](Billing::route)).
//!
//! # Route rules
//!
//! A [`Requirement`] is written once, in axum's own path syntax: `"GET /v1/items/{id}"`,
//! `"/files/{*rest}"` (any method), `"/package.Service/Method"` for a gRPC method. Bare hyper
//! and tonic services, which have no axum router, use the same syntax on the request path.
//!
//! - The most specific rule wins, as in a router: a literal segment over `{param}` over
//!   `{*rest}`; at equal paths a rule naming the method over one that names none.
//! - **`HEAD` follows `GET`'s rule** and is charged like `GET` (axum answers `HEAD` with the
//!   `GET` handler, which runs: its work is paid for), unless a rule names `HEAD` itself.
//! - A method with no rule of its own falls to the
//!   [`default_requirement`](Billing::default_requirement).
//! - Paths are matched segment by segment as a router splits them: `//` and a trailing `/`
//!   are dropped, a literal segment is compared percent-decoded (`/v1/%70remium` is
//!   `/v1/premium`), and `{param}` / `{*rest}` take any segment text, `.`, `..`, `%2e` and
//!   `%2F` included, exactly as axum hands them to the handler. Methods match
//!   case-insensitively. So no spelling of a path reaches a handler under a weaker rule than
//!   its own. (A bare hyper service that resolves dot segments or decodes `%2F` before it
//!   routes must do that before these layers too, or refuse such paths.)

mod layer;
mod rules;

pub use layer::{BillingLayer, BillingService};

pub(crate) use rules::Rules;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::account::IdentityResolver;
use crate::backend::FailureMode;
use crate::decision::Requirement;
use crate::gate::{GateConfig, PaymentGateLayer};
use crate::ledger::{Ledger, OverEstimate, RecordLimits};
use crate::metering::{
    DisconnectPolicy, DryStreamPolicy, MeterConfig, MeteringLayer, Pricing, StreamErrorPolicy,
    Threshold, ThresholdEvent, Thresholds, UsageExtractor,
};
use crate::plan::{Catalog, PlanStore};
use crate::problem::{ProblemConfig, ProblemDetailsLayer};
use crate::time::{Clock, SystemClock};

/// The billing core: stores, catalog, route rules and policies, given once. See the
/// [module docs](self).
///
/// Cheap to clone (two `Arc`s). Configure it with the builder methods, then take its
/// [`layer`](Self::layer) (or its three parts).
#[derive(Clone)]
pub struct Billing {
    gate: Arc<GateConfig>,
    meter: Arc<MeterConfig>,
}

impl fmt::Debug for Billing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Billing")
            .field("rules", &self.gate.rules)
            .field("failure", &self.gate.failure)
            .finish_non_exhaustive()
    }
}

impl Billing {
    /// Billing that identifies callers with `resolver`, reads subscriptions from `plans`,
    /// holds and charges credit in `ledger`, and prices from the plans of `catalog`.
    ///
    /// By default every route needs a plan in good standing and costs nothing; add
    /// [`route`](Self::route)s and a [`default_requirement`](Self::default_requirement).
    pub fn new(
        resolver: impl IdentityResolver,
        plans: impl PlanStore,
        ledger: impl Ledger,
        catalog: Catalog,
    ) -> Self {
        let problems = Arc::new(ProblemConfig::default());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let catalog = Arc::new(catalog);
        let meter = Arc::new(MeterConfig {
            ledger: Arc::new(ledger),
            clock: clock.clone(),
            problems: problems.clone(),
            catalog: catalog.clone(),
            pricing: None,
            usage: None,
            ttl_secs: 300,
            bill_client_errors: false,
            bill_grpc_errors: false,
            over_estimate: OverEstimate::DrawBalance,
            on_disconnect: DisconnectPolicy::ChargeEstimate,
            on_stream_error: StreamErrorPolicy::ChargeDelivered,
            on_dry_stream: DryStreamPolicy::StreamOn,
            max_body: 1024 * 1024,
            max_recorded_response: 1024 * 1024,
            records: RecordLimits {
                retention_secs: 24 * 3600,
                per_account: 1000,
            },
            max_units: 1_000_000_000,
            thresholds: None,
            soft_limit_percent: Some(80),
            failure: FailureMode::Closed,
            retry_after_secs: 5,
            timeout: Some(Duration::from_secs(5)),
            retries: Arc::new(crate::metering::Retries::new(
                crate::metering::DEFAULT_RETRY_CAPACITY,
            )),
            #[cfg(feature = "usage")]
            outbox: None,
        });
        let gate = Arc::new(GateConfig {
            resolver: Arc::new(resolver),
            plans: Arc::new(plans),
            catalog,
            rules: Rules::default(),
            clock,
            problems,
            failure: FailureMode::Closed,
            grace_secs: 3 * 24 * 3600,
            retry_after_secs: 5,
            timeout: Some(Duration::from_secs(5)),
            meter: meter.clone(),
        });
        Billing { gate, meter }
    }

    /// Changes the gate's settings.
    fn gate_mut(&mut self, f: impl FnOnce(&mut GateConfig)) {
        f(Arc::make_mut(&mut self.gate));
    }

    /// Changes the metering settings, and points the gate at the changed value: a gate and a
    /// metering layer agree when they share one.
    fn meter_mut(&mut self, f: impl FnOnce(&mut MeterConfig)) {
        f(Arc::make_mut(&mut self.meter));
        let meter = self.meter.clone();
        Arc::make_mut(&mut self.gate).meter = meter;
    }

    /// The three layers as one, in the order that works: [`problems`](Self::problems)
    /// outermost, then the [`gate`](Self::gate), then [`metering`](Self::metering).
    pub fn layer(&self) -> BillingLayer {
        BillingLayer::new(self.problems(), self.gate(), self.metering())
    }

    /// The problem-details layer, rendering with this billing's
    /// [`problem_config`](Self::problem_config). Put it outermost.
    pub fn problems(&self) -> ProblemDetailsLayer {
        ProblemDetailsLayer::shared(self.gate.problems.clone())
    }

    /// The gate. It wraps only this billing's [`metering`](Self::metering) layer.
    pub fn gate(&self) -> PaymentGateLayer {
        PaymentGateLayer::from_config(self.gate.clone())
    }

    /// The metering layer. Only this billing's [`gate`](Self::gate) can wrap it.
    pub fn metering(&self) -> MeteringLayer {
        MeteringLayer::from_config(self.meter.clone())
    }

    /// A requirement for requests matching `pattern`, in axum's path syntax:
    /// `"GET /v1/items/{id}"` (one method), `"/v1/items/{id}"` (any method),
    /// `"/files/{*rest}"` (everything below `/files/`). See the
    /// [module docs](self#route-rules) for which rule wins.
    ///
    /// # Panics
    ///
    /// When the rule could never govern a request, with how to write it instead: an invalid
    /// method, a path not starting with `/`, 0.1's prefix syntax (`/v1/*`) or axum 0.7's
    /// (`/{:id}`), a trailing slash, an empty segment, `{*rest}` anywhere but last, or a rule
    /// that repeats an earlier one.
    #[track_caller]
    pub fn route(mut self, pattern: &str, requirement: Requirement) -> Self {
        let mut result = Ok(());
        self.gate_mut(|g| result = g.rules.add(pattern, requirement));
        if let Err(e) = result {
            panic!("{}", e.0);
        }
        self
    }

    /// The requirement for requests no rule matches (default: a plan in good standing, no
    /// cost).
    pub fn default_requirement(mut self, requirement: Requirement) -> Self {
        self.gate_mut(|g| g.rules.default = Arc::new(requirement));
        self
    }

    /// Where to read the time (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(clock);
        self.meter_mut(|m| m.clock = clock.clone());
        self.gate_mut(|g| g.clock = clock);
        self
    }

    /// How refusals are rendered, by all three layers.
    pub fn problem_config(mut self, problems: ProblemConfig) -> Self {
        let problems = Arc::new(problems);
        self.meter_mut(|m| m.problems = problems.clone());
        self.gate_mut(|g| g.problems = problems);
        self
    }

    /// Fail closed (503 with `Retry-After`, the default) or open (serve unmetered, logged)
    /// when a store is unreachable.
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.meter_mut(|m| m.failure = mode);
        self.gate_mut(|g| g.failure = mode);
        self
    }

    /// The `Retry-After` of 503 answers (default 5 s).
    pub fn retry_after(mut self, after: Duration) -> Self {
        let secs = after.as_secs().max(1);
        self.meter_mut(|m| m.retry_after_secs = secs);
        self.gate_mut(|g| g.retry_after_secs = secs);
        self
    }

    /// The longest a store call may take (default 5 s; `None` waits forever). Timeouts use
    /// Tokio's timer, so the service must run inside a Tokio runtime with time enabled.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.meter_mut(|m| m.timeout = timeout);
        self.gate_mut(|g| g.timeout = timeout);
        self
    }

    /// How long a `past_due` subscription is served when its plan sets no grace period
    /// (default 3 days).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.gate_mut(|g| g.grace_secs = grace.as_secs());
        self
    }

    /// Warn (`x-payment-warning` header) when a request takes an allowance to this percentage
    /// (default 80; `None` turns the warning off).
    pub fn soft_limit_percent(mut self, percent: Option<u8>) -> Self {
        self.meter_mut(|m| m.soft_limit_percent = percent.map(|p| p.min(100)));
        self
    }

    /// How to estimate a request's cost (default: the route's fixed cost). See
    /// [`Pricing`].
    pub fn pricing(mut self, pricing: impl Pricing) -> Self {
        let pricing: Arc<dyn Pricing> = Arc::new(pricing);
        self.meter_mut(|m| m.pricing = Some(pricing));
        self
    }

    /// How to read actual usage from responses (default: none; settle the estimate or the
    /// [`ReportedUsage`](crate::ReportedUsage)). See [`UsageExtractor`].
    pub fn usage(mut self, extractor: impl UsageExtractor) -> Self {
        let usage: Arc<dyn UsageExtractor> = Arc::new(extractor);
        self.meter_mut(|m| m.usage = Some(usage));
        self
    }

    /// How long a reservation on a shared ledger lives if neither settled nor released
    /// (default 5 minutes). A hold that expires unsettled is **charged its estimate**, not
    /// given back (the handler ran; see [`OnExpiry`](crate::ledger::OnExpiry)), and the
    /// settlement that comes later charges the actual usage instead: a response that streams
    /// for longer than this cannot free its credit for other spending by stalling. Make it
    /// longer than your slowest response, streams included, so the balance shows the estimate
    /// as held (not spent) while it runs.
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.meter_mut(|m| m.ttl_secs = ttl.as_secs().max(1));
        self
    }

    /// How many settlements and releases that did not land (the ledger was unreachable or
    /// timed out) wait at once to be retried (default 10,000). They are retried in the
    /// background with backoff until the ledger answers; the request never waits. Beyond
    /// the bound the newest is dropped and logged, and its hold is charged its estimate when
    /// it expires. See the [metering docs](crate::metering#settlements-that-fail).
    pub fn settlement_retries(mut self, capacity: usize) -> Self {
        self.meter_mut(|m| m.retries = Arc::new(crate::metering::Retries::new(capacity)));
        self
    }

    /// Whether 4xx responses are charged (default: no, they are released like 5xx).
    pub fn bill_client_errors(mut self, bill: bool) -> Self {
        self.meter_mut(|m| m.bill_client_errors = bill);
        self
    }

    /// Whether gRPC calls that end with a non-zero `grpc-status` are charged as if they had
    /// succeeded (default: no).
    ///
    /// A gRPC error travels in an HTTP 200: in the head of a trailers-only answer, or in the
    /// trailers after a stream. By default a trailers-only error, and a stream that fails
    /// before its first message, release the reservation like a 5xx; a stream that fails
    /// after delivering messages is charged for what it delivered, as
    /// [`on_stream_error`](Self::on_stream_error) says. With `true` every such call is
    /// settled as a success.
    pub fn bill_grpc_errors(mut self, bill: bool) -> Self {
        self.meter_mut(|m| m.bill_grpc_errors = bill);
        self
    }

    /// Sends one usage event per settled request to `outbox` (see [`usage`](crate::usage)):
    /// handed over without waiting, delivered off the request path.
    #[cfg(feature = "usage")]
    #[cfg_attr(docsrs, doc(cfg(feature = "usage")))]
    pub fn usage_outbox(mut self, outbox: crate::usage::Outbox) -> Self {
        self.meter_mut(|m| m.outbox = Some(outbox));
        self
    }

    /// What to do when actual usage costs more than was held (default
    /// [`OverEstimate::DrawBalance`]).
    pub fn over_estimate(mut self, policy: OverEstimate) -> Self {
        self.meter_mut(|m| m.over_estimate = policy);
        self
    }

    /// What to charge when the client disconnects mid-body (default
    /// [`DisconnectPolicy::ChargeEstimate`]).
    pub fn on_disconnect(mut self, policy: DisconnectPolicy) -> Self {
        self.meter_mut(|m| m.on_disconnect = policy);
        self
    }

    /// What to charge when a response stream fails after delivering data: an HTTP body that
    /// fails mid-stream, or a gRPC stream that ends with a non-zero `grpc-status` after its
    /// messages (default [`StreamErrorPolicy::ChargeDelivered`]: as for a dropped body, by the
    /// [`on_disconnect`](Self::on_disconnect) policy). A stream that fails before delivering
    /// anything is always released.
    pub fn on_stream_error(mut self, policy: StreamErrorPolicy) -> Self {
        self.meter_mut(|m| m.on_stream_error = policy);
        self
    }

    /// What to do when a stream's usage passes its hold and the balance cannot pay for more
    /// (default [`DryStreamPolicy::StreamOn`]: stream on, draw the balance, log the
    /// shortfall; [`DryStreamPolicy::Cut`] ends the stream with an `INSUFFICIENT_CREDITS`
    /// error event in the stream's own shape and charges what was delivered).
    pub fn on_dry_stream(mut self, policy: DryStreamPolicy) -> Self {
        self.meter_mut(|m| m.on_dry_stream = policy);
        self
    }

    /// The largest request body read to price a request, or to compare an idempotent retry's
    /// body with the first attempt's (default 1 MiB; larger: `413`).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.meter_mut(|m| m.max_body = bytes);
        self
    }

    /// The largest response recorded for idempotent replays (default 1 MiB, body bytes,
    /// streams included). A request with an `Idempotency-Key` whose response is larger is
    /// served and charged once; a retry with its key is refused with
    /// `409 IDEMPOTENCY_RESPONSE_NOT_RECORDED`, never run again. See
    /// [idempotency](crate::metering#idempotency). While a keyed response streams, what is
    /// recorded of it (up to this size) is held in memory, as the frames that were sent.
    pub fn max_recorded_response(mut self, bytes: usize) -> Self {
        self.meter_mut(|m| m.max_recorded_response = bytes);
        self
    }

    /// How long a recorded response is kept for replays (default 24 hours, as Stripe keeps
    /// them). After that a retry with the key is refused
    /// (`409 IDEMPOTENCY_RESPONSE_NOT_RECORDED`).
    pub fn recorded_response_retention(mut self, retention: Duration) -> Self {
        self.meter_mut(|m| m.records.retention_secs = retention.as_secs());
        self
    }

    /// The most recorded responses one account keeps (default 1,000); recording one more
    /// drops the account's oldest. With [`max_recorded_response`](Self::max_recorded_response)
    /// this bounds what one account can make the backend store.
    pub fn max_recorded_per_account(mut self, records: u64) -> Self {
        self.meter_mut(|m| m.records.per_account = records);
        self
    }

    /// The largest usage figure believed for one meter of one request (default
    /// 1,000,000,000). A larger figure is treated as invalid: the estimate is charged and a
    /// warning logged.
    pub fn max_units(mut self, units: u64) -> Self {
        self.meter_mut(|m| m.max_units = units);
        self
    }

    /// Calls `hook` once each time an account's balance or allowance crosses one of `levels`.
    ///
    /// The hook runs inline on the request path: keep it quick (send to a channel, spawn a
    /// task).
    ///
    /// ```
    /// use tower_402::metering::Threshold;
    /// use tower_402::plan::Catalog;
    /// use tower_402::*;
    ///
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new())
    ///     .on_threshold(
    ///         [Threshold::AllowancePercent(80), Threshold::BalanceAtOrBelow(Credits::ZERO)],
    ///         move |event| { let _ = tx.send(event); },
    ///     );
    /// ```
    pub fn on_threshold(
        mut self,
        levels: impl IntoIterator<Item = Threshold>,
        hook: impl Fn(ThresholdEvent) + Send + Sync + 'static,
    ) -> Self {
        let thresholds = Thresholds {
            levels: levels.into_iter().collect(),
            hook: Arc::new(hook),
        };
        self.meter_mut(|m| m.thresholds = Some(thresholds));
        self
    }
}
