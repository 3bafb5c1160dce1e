//! [`Entitlement`]: what the gate established about an allowed request, handed to the
//! metering layer and to handlers.

use std::sync::Arc;

use crate::account::AccountId;
use crate::charge::{Charge, Cost};
use crate::credits::Credits;
use crate::decision::Warning;
use crate::ledger::Usage;
use crate::plan::Meter;
use crate::plan::{Plan, Subscription};

/// What the gate established about an allowed request, in the request extensions.
///
/// Read it in an axum handler with `Extension<Entitlement>` (or take `Entitlement` directly
/// with the `axum` feature, which answers a clear 500 when the gate is missing).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Entitlement {
    /// Who pays.
    pub account: AccountId,
    /// The subscription, if the account has one.
    pub subscription: Option<Arc<Subscription>>,
    /// Its plan.
    pub plan: Option<Arc<Plan>>,
    /// The route's fixed cost, which the metering layer reserves.
    pub cost: Option<Cost>,
    /// Credit available after this request's hold, when the request reserved credit (set by
    /// the metering layer before the handler runs).
    pub available: Option<Credits>,
    /// Conditions to tell the caller about.
    pub warnings: Vec<Warning>,
    /// Meters the metering layer reserved fewer units of than the pricing rule estimated,
    /// with the units it reserved: a plan without overage had only that much of its
    /// allowance left ([`Cost::lower_to_allowance`]). The handler must not do more work than
    /// this.
    pub lowered: Vec<Usage>,
}

impl Entitlement {
    /// An entitlement for an account with no plan information: what the gate admits on an
    /// identify-only route for an account without a subscription, and a starting point for
    /// testing a [`Pricing`](crate::metering::Pricing) rule.
    pub fn new(account: AccountId) -> Self {
        Entitlement {
            account,
            subscription: None,
            plan: None,
            cost: None,
            available: None,
            warnings: Vec::new(),
            lowered: Vec::new(),
        }
    }

    /// The units of `meter` reserved, when the metering layer reserved fewer than the
    /// estimate (see [`lowered`](Self::lowered)); `None` when it reserved the estimate.
    pub fn reserved_below_estimate(&self, meter: &Meter) -> Option<u64> {
        self.lowered
            .iter()
            .find(|u| &u.meter == meter)
            .map(|u| u.units)
    }

    /// Sets the plan.
    pub fn with_plan(mut self, plan: Arc<Plan>) -> Self {
        self.plan = Some(plan);
        self
    }

    /// Sets the fixed cost.
    pub fn with_cost(mut self, cost: Cost) -> Self {
        self.cost = Some(cost);
        self
    }
}

#[cfg(feature = "axum")]
mod axum_impl {
    use axum_core::extract::FromRequestParts;
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::StatusCode;

    use super::Entitlement;

    /// Rejection when no [`Entitlement`] is in the request: the gate is not in front of this
    /// handler.
    #[derive(Debug, Clone, Copy)]
    pub struct MissingEntitlement;

    impl IntoResponse for MissingEntitlement {
        fn into_response(self) -> Response {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "missing Entitlement: is the Billing layer (or PaymentGateLayer over MeteringLayer) applied to this route?",
            )
                .into_response()
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Entitlement {
        type Rejection = MissingEntitlement;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Entitlement>()
                .cloned()
                .ok_or(MissingEntitlement)
        }
    }
}

#[cfg(feature = "axum")]
pub use axum_impl::MissingEntitlement;

/// What the gate hands the metering layer along with a request it let through, by value.
///
/// Crate-private, and never in the request extensions: nothing outside the crate can make the
/// metering layer skip a charge.
// `Entitled` is what nearly every request carries: boxing it would add an allocation per
// request on the hot path to shrink the rare variants.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Admission {
    /// A public route: no credential, nothing to meter.
    Public,
    /// The gate could not reach a store and is configured to fail open (logged).
    FailedOpen,
    /// Who pays, and the route's cost as the gate priced it under their plan (`None` when a
    /// pricing rule prices the request, or the route costs nothing).
    Entitled(Entitlement, Option<Charge>),
}
