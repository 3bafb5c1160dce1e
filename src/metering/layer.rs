use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::gate::FailureMode;
use crate::ledger::{Ledger, OverEstimate};
use crate::metering::threshold::Thresholds;
use crate::metering::{Metering, Pricing, Threshold, ThresholdEvent, UsageExtractor};
use crate::problem::ProblemConfig;
use crate::time::{Clock, SystemClock};

/// What to charge when the client goes away before the response body ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectPolicy {
    /// Charge the reserved estimate (or the usage the handler reported up front). The default:
    /// the work was done, and a client cannot dodge the bill by hanging up.
    #[default]
    ChargeEstimate,
    /// Charge what the usage extractor saw so far (bytes sent, the last `usage` seen in a
    /// stream); the estimate where it saw nothing.
    ChargeUsageSoFar,
}

/// What to do when the response body fails mid-stream (an upstream error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamErrorPolicy {
    /// Release the reservation: the caller did not get what it paid for. The default.
    #[default]
    Release,
    /// Charge what the usage extractor saw so far (nothing if it saw nothing).
    ChargeUsageSoFar,
}

#[derive(Clone)]
pub(crate) struct MeterConfig {
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) problems: ProblemConfig,
    /// `None`: the route's fixed cost from the entitlement.
    pub(crate) pricing: Option<Arc<dyn Pricing>>,
    pub(crate) usage: Option<Arc<dyn UsageExtractor>>,
    pub(crate) ttl_secs: u64,
    pub(crate) bill_client_errors: bool,
    pub(crate) bill_grpc_errors: bool,
    pub(crate) over_estimate: OverEstimate,
    pub(crate) on_disconnect: DisconnectPolicy,
    pub(crate) on_stream_error: StreamErrorPolicy,
    pub(crate) max_body: usize,
    pub(crate) max_units: u64,
    pub(crate) thresholds: Option<Thresholds>,
    pub(crate) failure: FailureMode,
    pub(crate) retry_after_secs: u64,
    pub(crate) timeout: Option<Duration>,
}

/// Applies [`Metering`] to a service. See the [module docs](crate::metering).
#[derive(Clone)]
pub struct MeteringLayer {
    pub(crate) config: Arc<MeterConfig>,
}

impl fmt::Debug for MeteringLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("MeteringLayer")
            .field("ttl_secs", &c.ttl_secs)
            .field("bill_client_errors", &c.bill_client_errors)
            .field("bill_grpc_errors", &c.bill_grpc_errors)
            .field("over_estimate", &c.over_estimate)
            .field("on_disconnect", &c.on_disconnect)
            .field("on_stream_error", &c.on_stream_error)
            .field("max_body", &c.max_body)
            .field("failure", &c.failure)
            .finish_non_exhaustive()
    }
}

impl MeteringLayer {
    /// Meters against `ledger`: the route's fixed cost, settled as the estimate unless the
    /// handler reports usage.
    pub fn new(ledger: impl Ledger) -> Self {
        MeteringLayer {
            config: Arc::new(MeterConfig {
                ledger: Arc::new(ledger),
                clock: Arc::new(SystemClock),
                problems: ProblemConfig::default(),
                pricing: None,
                usage: None,
                ttl_secs: 300,
                bill_client_errors: false,
                bill_grpc_errors: false,
                over_estimate: OverEstimate::DrawBalance,
                on_disconnect: DisconnectPolicy::ChargeEstimate,
                on_stream_error: StreamErrorPolicy::Release,
                max_body: 1024 * 1024,
                max_units: 1_000_000_000,
                thresholds: None,
                failure: FailureMode::Closed,
                retry_after_secs: 5,
                timeout: Some(Duration::from_secs(5)),
            }),
        }
    }

    fn config(&mut self) -> &mut MeterConfig {
        Arc::make_mut(&mut self.config)
    }

    /// How to estimate a request's cost (default: the route's fixed cost).
    pub fn pricing(mut self, pricing: impl Pricing) -> Self {
        self.config().pricing = Some(Arc::new(pricing));
        self
    }

    /// How to read actual usage from responses (default: none, settle the estimate or the
    /// [`ReportedUsage`](crate::ReportedUsage)).
    pub fn usage(mut self, extractor: impl UsageExtractor) -> Self {
        self.config().usage = Some(Arc::new(extractor));
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

    /// How long a reservation lives if neither settled nor released (default 5 minutes).
    /// Make it longer than your slowest response, streams included.
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.config().ttl_secs = ttl.as_secs().max(1);
        self
    }

    /// Whether 4xx responses are charged (default: no, they are released like 5xx).
    pub fn bill_client_errors(mut self, bill: bool) -> Self {
        self.config().bill_client_errors = bill;
        self
    }

    /// Whether gRPC calls that end with a non-zero `grpc-status` are charged (default: no).
    ///
    /// A gRPC error travels in an HTTP 200: in the head of a trailers-only answer, or in the
    /// trailers after a stream. By default either releases the reservation, like a 5xx; with
    /// `true` the call is settled as if it had succeeded.
    pub fn bill_grpc_errors(mut self, bill: bool) -> Self {
        self.config().bill_grpc_errors = bill;
        self
    }

    /// What to do when actual usage costs more than was held (default
    /// [`OverEstimate::DrawBalance`]).
    pub fn over_estimate(mut self, policy: OverEstimate) -> Self {
        self.config().over_estimate = policy;
        self
    }

    /// What to charge when the client disconnects mid-body (default
    /// [`DisconnectPolicy::ChargeEstimate`]).
    pub fn on_disconnect(mut self, policy: DisconnectPolicy) -> Self {
        self.config().on_disconnect = policy;
        self
    }

    /// What to do when the response body fails mid-stream (default
    /// [`StreamErrorPolicy::Release`]).
    pub fn on_stream_error(mut self, policy: StreamErrorPolicy) -> Self {
        self.config().on_stream_error = policy;
        self
    }

    /// The largest request body read to price a request (default 1 MiB; larger: `413`).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config().max_body = bytes;
        self
    }

    /// The largest usage figure believed for one meter of one request (default
    /// 1,000,000,000). A larger figure is treated as invalid: the estimate is charged and a
    /// warning logged.
    pub fn max_units(mut self, units: u64) -> Self {
        self.config().max_units = units;
        self
    }

    /// Calls `hook` once each time an account's balance or allowance crosses one of `levels`.
    ///
    /// The hook runs inline on the request path: keep it quick (send to a channel, spawn a
    /// task).
    ///
    /// ```
    /// use tower_402::metering::{MeteringLayer, Threshold};
    /// use tower_402::{Credits, MemoryLedger};
    ///
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let layer = MeteringLayer::new(MemoryLedger::new()).on_threshold(
    ///     [Threshold::AllowancePercent(80), Threshold::BalanceAtOrBelow(Credits::ZERO)],
    ///     move |event| { let _ = tx.send(event); },
    /// );
    /// ```
    pub fn on_threshold(
        mut self,
        levels: impl IntoIterator<Item = Threshold>,
        hook: impl Fn(ThresholdEvent) + Send + Sync + 'static,
    ) -> Self {
        self.config().thresholds = Some(Thresholds {
            levels: levels.into_iter().collect(),
            hook: Arc::new(hook),
        });
        self
    }

    /// Fail closed (503, the default) or open (serve unmetered, logged) when the ledger is
    /// unreachable.
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.config().failure = mode;
        self
    }

    /// The `Retry-After` of 503 answers (default 5 s).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config().retry_after_secs = after.as_secs().max(1);
        self
    }

    /// The longest a ledger call may take (default 5 s; `None` waits forever).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config().timeout = timeout;
        self
    }
}

impl<S> Layer<S> for MeteringLayer {
    type Service = Metering<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metering {
            inner,
            config: self.config.clone(),
        }
    }
}
