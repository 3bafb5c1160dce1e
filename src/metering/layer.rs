use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::gate::FailureMode;
use crate::ledger::{Ledger, OverEstimate};
use crate::metering::Metering;
use crate::problem::ProblemConfig;
use crate::time::{Clock, SystemClock};

#[derive(Clone)]
pub(crate) struct MeterConfig {
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) problems: ProblemConfig,
    pub(crate) ttl_secs: u64,
    pub(crate) bill_client_errors: bool,
    pub(crate) over_estimate: OverEstimate,
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
        f.debug_struct("MeteringLayer")
            .field("ttl_secs", &self.config.ttl_secs)
            .field("bill_client_errors", &self.config.bill_client_errors)
            .field("over_estimate", &self.config.over_estimate)
            .field("failure", &self.config.failure)
            .finish_non_exhaustive()
    }
}

impl MeteringLayer {
    /// Meters against `ledger`.
    pub fn new(ledger: impl Ledger) -> Self {
        MeteringLayer {
            config: Arc::new(MeterConfig {
                ledger: Arc::new(ledger),
                clock: Arc::new(SystemClock),
                problems: ProblemConfig::default(),
                ttl_secs: 300,
                bill_client_errors: false,
                over_estimate: OverEstimate::DrawBalance,
                failure: FailureMode::Closed,
                retry_after_secs: 5,
                timeout: Some(Duration::from_secs(5)),
            }),
        }
    }

    fn config(&mut self) -> &mut MeterConfig {
        Arc::make_mut(&mut self.config)
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
    /// Make it longer than your slowest response.
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.config().ttl_secs = ttl.as_secs().max(1);
        self
    }

    /// Whether 4xx responses are charged (default: no, they are released like 5xx).
    pub fn bill_client_errors(mut self, bill: bool) -> Self {
        self.config().bill_client_errors = bill;
        self
    }

    /// What to do when the reported usage costs more than was held (default
    /// [`OverEstimate::DrawBalance`]).
    pub fn over_estimate(mut self, policy: OverEstimate) -> Self {
        self.config().over_estimate = policy;
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
