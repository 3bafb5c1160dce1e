use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::account::IdentityResolver;
use crate::backend::FailureMode;
use crate::billing::Rules;
use crate::gate::PaymentGate;
use crate::metering::{MeterConfig, Metering};
use crate::plan::{Catalog, PlanStore};
use crate::problem::ProblemConfig;
use crate::time::Clock;

/// The gate's part of a [`Billing`](crate::Billing).
#[derive(Clone)]
pub(crate) struct GateConfig {
    pub(crate) resolver: Arc<dyn IdentityResolver>,
    pub(crate) plans: Arc<dyn PlanStore>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) rules: Rules,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) problems: Arc<ProblemConfig>,
    pub(crate) failure: FailureMode,
    pub(crate) grace_secs: u64,
    pub(crate) retry_after_secs: u64,
    pub(crate) timeout: Option<Duration>,
    /// The metering settings of the same billing: the only ones this gate may wrap.
    pub(crate) meter: Arc<MeterConfig>,
}

/// Applies [`PaymentGate`] to the [`Metering`] service of the same
/// [`Billing`](crate::Billing). See the [module docs](crate::gate).
///
/// Made by [`Billing::gate`](crate::Billing::gate); holds a shared reference to the billing's
/// configuration only (clones are cheap).
#[derive(Clone)]
pub struct PaymentGateLayer {
    pub(crate) config: Arc<GateConfig>,
}

impl fmt::Debug for PaymentGateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaymentGateLayer")
            .field("rules", &self.config.rules)
            .field("failure", &self.config.failure)
            .field("grace_secs", &self.config.grace_secs)
            .finish_non_exhaustive()
    }
}

impl PaymentGateLayer {
    pub(crate) fn from_config(config: Arc<GateConfig>) -> Self {
        PaymentGateLayer { config }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A service the gate can wrap: the [`Metering`] service of the same
/// [`Billing`](crate::Billing). Sealed; implemented for [`Metering`] only.
#[diagnostic::on_unimplemented(
    message = "the payment gate must wrap the metering layer of the same `Billing`, not `{Self}`",
    label = "no metering layer right inside the gate",
    note = "use `.layer(billing.layer())`, or `ServiceBuilder::new().layer(billing.problems()).layer(billing.gate()).layer(billing.metering())`",
    note = "chained `Router::layer` calls wrap in the reverse order: the last one added runs first"
)]
pub trait Metered: sealed::Sealed {
    /// The service inside the metering layer.
    type Inner;
    #[doc(hidden)]
    fn into_metering(self) -> Metering<Self::Inner>;
}

impl<S> sealed::Sealed for Metering<S> {}

impl<S> Metered for Metering<S> {
    type Inner = S;
    fn into_metering(self) -> Metering<S> {
        self
    }
}

impl<M: Metered> Layer<M> for PaymentGateLayer {
    type Service = PaymentGate<M::Inner>;

    /// # Panics
    ///
    /// When `metering` comes from another [`Billing`](crate::Billing) than this gate: the two
    /// would price, clock and render differently.
    fn layer(&self, metering: M) -> Self::Service {
        let metering = metering.into_metering();
        assert!(
            Arc::ptr_eq(&self.config.meter, &metering.config),
            "the payment gate and the metering layer come from different `Billing` values \
             (or the `Billing` was changed after one of them was taken): take both from one, \
             `billing.gate()` and `billing.metering()`, or use `billing.layer()`"
        );
        PaymentGate {
            inner: metering,
            config: self.config.clone(),
        }
    }
}
