use tower_layer::Layer;

use crate::gate::{PaymentGate, PaymentGateLayer};
use crate::metering::MeteringLayer;
use crate::problem::{ProblemDetailsLayer, ProblemDetailsService};

/// The service [`BillingLayer`] makes: problem rendering around the gate around metering
/// around your service.
pub type BillingService<S> = ProblemDetailsService<PaymentGate<S>>;

/// All three layers of one [`Billing`](crate::Billing), in the order that works. Made by
/// [`Billing::layer`](crate::Billing::layer).
#[derive(Debug, Clone)]
pub struct BillingLayer {
    problems: ProblemDetailsLayer,
    gate: PaymentGateLayer,
    metering: MeteringLayer,
}

impl BillingLayer {
    pub(crate) fn new(
        problems: ProblemDetailsLayer,
        gate: PaymentGateLayer,
        metering: MeteringLayer,
    ) -> Self {
        BillingLayer {
            problems,
            gate,
            metering,
        }
    }
}

impl<S> Layer<S> for BillingLayer {
    type Service = BillingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.problems
            .layer(self.gate.layer(self.metering.layer(inner)))
    }
}
