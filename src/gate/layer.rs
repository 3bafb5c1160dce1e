use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tower_layer::Layer;

use crate::account::IdentityResolver;
use crate::decision::Requirement;
use crate::gate::PaymentGate;
use crate::ledger::Ledger;
use crate::metering::{Metering, MeteringLayer};
use crate::plan::{Catalog, PlanStore};
use crate::problem::ProblemConfig;
use crate::time::{Clock, SystemClock};

/// What to do when a store cannot be reached or times out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureMode {
    /// Refuse with 503 and `Retry-After`. The default: unpaid work is never done by accident.
    #[default]
    Closed,
    /// Serve the request anyway and log a warning: availability over revenue.
    Open,
}

#[derive(Clone)]
pub(crate) struct Route {
    method: Option<Method>,
    path: Box<str>,
    prefix: bool,
    pub(crate) requirement: Arc<Requirement>,
}

impl Route {
    fn parse(pattern: &str, requirement: Requirement) -> Route {
        let (method, path) = match pattern.split_once(' ') {
            Some((m, p)) => (
                Some(
                    Method::from_bytes(m.trim().as_bytes())
                        .unwrap_or_else(|_| panic!("invalid method in route `{pattern}`")),
                ),
                p.trim(),
            ),
            None => (None, pattern.trim()),
        };
        assert!(
            path.starts_with('/'),
            "route path must start with `/`: `{pattern}`"
        );
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p, true),
            None => (path, false),
        };
        Route {
            method,
            path: path.into(),
            prefix,
            requirement: Arc::new(requirement),
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && if self.prefix {
                path.starts_with(&*self.path)
            } else {
                path == &*self.path
            }
    }
}

#[derive(Clone)]
pub(crate) struct GateConfig {
    pub(crate) resolver: Arc<dyn IdentityResolver>,
    pub(crate) plans: Arc<dyn PlanStore>,
    pub(crate) ledger: Option<Arc<dyn Ledger>>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) routes: Vec<Route>,
    pub(crate) default: Arc<Requirement>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) problems: ProblemConfig,
    pub(crate) failure: FailureMode,
    pub(crate) grace_secs: u64,
    pub(crate) soft_limit_percent: Option<u8>,
    pub(crate) retry_after_secs: u64,
    pub(crate) timeout: Option<Duration>,
    /// Set by [`PaymentGateLayer::and_metering`]: the reservation checks allowance and credit.
    pub(crate) credit_at_reservation: bool,
}

impl GateConfig {
    pub(crate) fn requirement(&self, method: &Method, path: &str) -> &Arc<Requirement> {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .map_or(&self.default, |r| &r.requirement)
    }
}

/// Applies [`PaymentGate`] to a service. See the [module docs](crate::gate).
///
/// Holds configuration only; clones are cheap (one `Arc`).
#[derive(Clone)]
pub struct PaymentGateLayer {
    pub(crate) config: Arc<GateConfig>,
}

impl fmt::Debug for PaymentGateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaymentGateLayer")
            .field("routes", &self.config.routes.len())
            .field("ledger", &self.config.ledger.is_some())
            .field("failure", &self.config.failure)
            .field("grace_secs", &self.config.grace_secs)
            .finish_non_exhaustive()
    }
}

impl PaymentGateLayer {
    /// A gate that identifies callers with `resolver`, reads subscriptions from `plans` and
    /// plans from `catalog`. By default every route needs a plan in good standing and has no
    /// cost; add [`route`](Self::route)s and a [`ledger`](Self::ledger) for more.
    pub fn new(resolver: impl IdentityResolver, plans: impl PlanStore, catalog: Catalog) -> Self {
        PaymentGateLayer {
            config: Arc::new(GateConfig {
                resolver: Arc::new(resolver),
                plans: Arc::new(plans),
                ledger: None,
                catalog: Arc::new(catalog),
                routes: Vec::new(),
                default: Arc::new(Requirement::default()),
                clock: Arc::new(SystemClock),
                problems: ProblemConfig::default(),
                failure: FailureMode::Closed,
                grace_secs: 3 * 24 * 3600,
                soft_limit_percent: Some(80),
                retry_after_secs: 5,
                timeout: Some(Duration::from_secs(5)),
                credit_at_reservation: false,
            }),
        }
    }

    fn config(&mut self) -> &mut GateConfig {
        Arc::make_mut(&mut self.config)
    }

    /// The ledger to read balances and allowances from, for routes with a cost.
    pub fn ledger(mut self, ledger: impl Ledger) -> Self {
        self.config().ledger = Some(Arc::new(ledger));
        self
    }

    /// A requirement for requests matching `pattern`: `"GET /v1/forecast"` (one method, exact
    /// path), `"/v1/forecast"` (any method) or `"/v1/*"` (a prefix). The first matching route
    /// wins.
    ///
    /// # Panics
    ///
    /// On a pattern with an invalid method or a path not starting with `/`.
    #[track_caller]
    pub fn route(mut self, pattern: &str, requirement: Requirement) -> Self {
        let route = Route::parse(pattern, requirement);
        self.config().routes.push(route);
        self
    }

    /// The requirement for requests no route matches.
    pub fn default_requirement(mut self, requirement: Requirement) -> Self {
        self.config().default = Arc::new(requirement);
        self
    }

    /// Where to read the time (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.config().clock = Arc::new(clock);
        self
    }

    /// How refusals are rendered.
    pub fn problems(mut self, problems: ProblemConfig) -> Self {
        self.config().problems = problems;
        self
    }

    /// Fail closed (default) or open when a store is unreachable.
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.config().failure = mode;
        self
    }

    /// How long a `past_due` subscription is served when its plan sets no grace period
    /// (default 3 days).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.config().grace_secs = grace.as_secs();
        self
    }

    /// Warn (header and event) when an allowance reaches this percentage (default 80;
    /// `None` turns the warning off).
    pub fn soft_limit_percent(mut self, percent: Option<u8>) -> Self {
        self.config().soft_limit_percent = percent.map(|p| p.min(100));
        self
    }

    /// The `Retry-After` of 503 answers (default 5 s).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config().retry_after_secs = after.as_secs().max(1);
        self
    }

    /// The longest a store lookup may take (default 5 s; `None` waits forever). Timeouts use
    /// Tokio's timer, so the service must run inside a Tokio runtime with time enabled.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config().timeout = timeout;
        self
    }
}

impl PaymentGateLayer {
    /// This gate followed by `metering`, as one layer, checking allowance and credit once.
    ///
    /// Stacked separately, both layers check that the caller can pay for the route: the gate
    /// reads the balance and allowance from its [`ledger`](Self::ledger) to refuse early, then
    /// the metering layer's reservation checks the same thing again, atomically. Composed
    /// with this method the gate skips its reads and leaves that refusal to the reservation:
    /// one ledger operation fewer per request (a round trip on Redis or PostgreSQL, a lock on
    /// the in-memory ledger). Callers see the same refusals, `402 INSUFFICIENT_CREDITS` and
    /// `402 QUOTA_EXCEEDED`, now from the metering layer, before the handler runs.
    ///
    /// What changes with it:
    ///
    /// - What is checked is what the metering layer reserves: the route's cost, or, with a
    ///   [`pricing`](MeteringLayer::pricing) rule, its estimate (so a rule that prices a
    ///   request at nothing lets it through, and a rule that reads the body reads it before
    ///   refusing). Stacked separately, the gate checks the route's cost as well.
    /// - A ledger outage is handled by the metering layer's
    ///   [`failure_mode`](MeteringLayer::failure_mode), not the gate's.
    /// - [`Entitlement::available`] is `None`, and there is no
    ///   `x-payment-warning: soft-limit` (the gate needs the allowance used to warn).
    ///
    /// Status and entitlement checks are unchanged. Because the metering layer is part of this
    /// one layer, a route with a cost is never served without a reservation.
    ///
    /// [`Entitlement::available`]: crate::Entitlement::available
    ///
    /// ```
    /// use tower_402::{Credits, MemoryLedger, MemoryPlanStore, MeteringLayer, PaymentGateLayer, StaticKeys};
    /// use tower_402::decision::{Cost, Requirement};
    /// use tower_402::plan::{Catalog, Plan};
    ///
    /// let ledger = MemoryLedger::new();
    /// let catalog = Catalog::new().with_plan(Plan::new("pro", "Pro", 2).overage(true));
    /// let billing = PaymentGateLayer::new(StaticKeys::new(), MemoryPlanStore::new(), catalog)
    ///     .ledger(ledger.clone())
    ///     .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))))
    ///     .and_metering(MeteringLayer::new(ledger));
    /// let app: axum::Router = axum::Router::new()
    ///     .route("/v1/forecast", axum::routing::get(|| async { "sunny" }))
    ///     .layer(billing);
    /// ```
    pub fn and_metering(mut self, metering: MeteringLayer) -> GateAndMeteringLayer {
        self.config().credit_at_reservation = true;
        GateAndMeteringLayer {
            gate: self,
            metering,
        }
    }
}

/// A [`PaymentGateLayer`] and the [`MeteringLayer`] behind it, checking allowance and credit
/// once, at the reservation. Made by [`PaymentGateLayer::and_metering`].
#[derive(Clone, Debug)]
pub struct GateAndMeteringLayer {
    gate: PaymentGateLayer,
    metering: MeteringLayer,
}

impl<S> Layer<S> for GateAndMeteringLayer {
    type Service = PaymentGate<Metering<S>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.gate.layer(self.metering.layer(inner))
    }
}

impl<S> Layer<S> for PaymentGateLayer {
    type Service = PaymentGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PaymentGate {
            inner,
            config: self.config.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_patterns() {
        let r = Route::parse("GET /v1/forecast", Requirement::new());
        assert!(r.matches(&Method::GET, "/v1/forecast"));
        assert!(!r.matches(&Method::POST, "/v1/forecast"));
        assert!(!r.matches(&Method::GET, "/v1/forecast/x"));
        let r = Route::parse("/v1/*", Requirement::new());
        assert!(r.matches(&Method::DELETE, "/v1/anything"));
        assert!(!r.matches(&Method::GET, "/v2/x"));
    }

    #[test]
    #[should_panic(expected = "must start with")]
    fn bad_pattern_panics_at_configuration() {
        let _ = Route::parse("GET v1", Requirement::new());
    }
}
