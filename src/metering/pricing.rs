//! Pricing rules: the estimate a request reserves.

use std::sync::Arc;

use http::request::Parts;

use crate::charge::{Charge, Cost};
use crate::denial::Denial;
use crate::entitlement::Entitlement;
use crate::metering::guard::Charges;
use crate::metering::MeterConfig;
use crate::time::Timestamp;

/// What a pricing rule sees of a request.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PricingRequest<'a> {
    /// Method, URI, headers, extensions.
    pub parts: &'a Parts,
    /// The whole body, when [`Pricing::needs_body`] asked for it.
    pub body: Option<&'a [u8]>,
    /// Who pays, on which plan.
    pub entitlement: &'a Entitlement,
}

/// How much to reserve for a request: the estimate.
///
/// Without a pricing rule the metering layer reserves the route's fixed [`Cost`], priced by
/// the gate under the caller's plan (set by the [route rules](crate::Billing::route)). A rule replaces
/// that: [`OpenAiPricing`](crate::metering::OpenAiPricing) prices LLM requests from their
/// body; a closure `Fn(&PricingRequest) -> Result<Vec<Cost>, Denial>` prices anything else.
///
/// Returning no costs means "nothing to meter"; a [`Denial`] refuses the request (a 400 for a
/// request that cannot be priced, say).
///
/// ```
/// use tower_402::decision::Cost;
/// use tower_402::metering::PricingRequest;
/// use tower_402::plan::Catalog;
/// use tower_402::*;
///
/// // One credit per 10 rows asked for, from the `rows` query parameter.
/// let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), Catalog::new())
///     .pricing(|req: &PricingRequest<'_>| {
///     let rows: u64 = req.parts.uri.query()
///         .and_then(|q| q.strip_prefix("rows="))
///         .and_then(|n| n.parse().ok())
///         .unwrap_or(10);
///     Ok(vec![Cost::new("rows", rows, Credits::new(1)).per(10)])
/// });
/// ```
pub trait Pricing: Send + Sync + 'static {
    /// Whether [`estimate`](Self::estimate) needs the request body. The layer then reads it
    /// whole, up to [`Billing::max_body`](crate::Billing::max_body) bytes (413 beyond), and
    /// hands it on intact.
    fn needs_body(&self, parts: &Parts) -> bool {
        let _ = parts;
        false
    }

    /// The costs to reserve.
    fn estimate(&self, request: &PricingRequest<'_>) -> Result<Vec<Cost>, Denial>;
}

impl<F> Pricing for F
where
    F: Fn(&PricingRequest<'_>) -> Result<Vec<Cost>, Denial> + Send + Sync + 'static,
{
    fn estimate(&self, request: &PricingRequest<'_>) -> Result<Vec<Cost>, Denial> {
        self(request)
    }
}

/// The charges a request reserves, priced once: the gate's route cost, or the pricing rule's
/// estimate under the caller's plan. `None`: nothing to meter.
pub(crate) fn price(
    config: &MeterConfig,
    parts: &Parts,
    body: Option<&[u8]>,
    entitlement: &Entitlement,
    gate_charge: Option<&Charge>,
    now: Timestamp,
) -> Result<Option<Charges>, Denial> {
    let Some(pricing) = &config.pricing else {
        return Ok(gate_charge.cloned().map(Charges::One));
    };
    let costs = pricing.estimate(&PricingRequest {
        parts,
        body,
        entitlement,
    })?;
    if costs.is_empty() {
        return Ok(None);
    }
    let charges: Arc<[Charge]> = costs
        .iter()
        .map(|cost| match &entitlement.plan {
            Some(plan) => cost.charge(plan, now),
            // No plan known (an identify-only route): credit only.
            None => Charge {
                meter: cost.meter.clone(),
                units: cost.units,
                unit_price: cost.unit_price,
                price_per: cost.price_per,
                allowance: None,
                overage: true,
            },
        })
        .collect();
    Ok(Some(Charges::Many(charges)))
}
