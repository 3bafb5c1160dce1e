//! Pricing rules: the estimate a request reserves.

use std::sync::Arc;

use http::request::Parts;

use crate::charge::{Charge, Cost};
use crate::denial::Denial;
use crate::entitlement::Entitlement;
use crate::ledger::Usage;
use crate::metering::guard::Charges;
use crate::metering::MeterConfig;
use crate::plan::Catalog;
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
    /// The plans on offer (the [`Billing`](crate::Billing)'s catalog): where to find the plan
    /// to suggest in an upgrade prompt.
    pub catalog: &'a Catalog,
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
) -> Result<Option<Priced>, Denial> {
    let Some(pricing) = &config.pricing else {
        return Ok(gate_charge.cloned().map(|c| Priced {
            charges: Charges::One(c),
            lowerable: 0,
        }));
    };
    let costs = pricing.estimate(&PricingRequest {
        parts,
        body,
        entitlement,
        catalog: &config.catalog,
    })?;
    if costs.is_empty() {
        return Ok(None);
    }
    let mut lowerable = 0u64;
    let charges: Arc<[Charge]> = costs
        .iter()
        .enumerate()
        .map(|(i, cost)| {
            let charge = match &entitlement.plan {
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
            };
            // Only a plan without overage, with an allowance for the meter, lowers it.
            if cost.lower_to_allowance
                && i < 64
                && !charge.overage
                && charge.allowance.is_some()
                && charge.units > 1
            {
                lowerable |= 1 << i;
            }
            charge
        })
        .collect();
    Ok(Some(Priced {
        charges: Charges::Many(charges),
        lowerable,
    }))
}

/// A request's charges, and which of them may be lowered to what is left of their allowance
/// ([`Cost::lower_to_allowance`]), as a bit per charge.
pub(crate) struct Priced {
    pub(crate) charges: Charges,
    pub(crate) lowerable: u64,
}

impl Priced {
    /// The charges to look up the allowance of: `(index, charge)`.
    pub(crate) fn to_lower(&self) -> impl Iterator<Item = (usize, &Charge)> {
        let mask = self.lowerable;
        self.charges
            .as_slice()
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & (1u64 << i) != 0)
    }

    /// Lowers the charges whose allowance has less left than they estimate (`left`: what is
    /// left, by charge index) to that, at least one unit. The charges as estimated, for the
    /// idempotency fingerprint (a retry must match whatever was left when it comes), and the
    /// units of each lowered meter.
    pub(crate) fn lower(self, left: &[(usize, u64)]) -> (Charges, Charges, Vec<Usage>) {
        let estimated = self.charges.clone();
        let slice = self.charges.as_slice();
        let needs = left
            .iter()
            .any(|(i, left)| slice.get(*i).is_some_and(|c| c.units > (*left).max(1)));
        if !needs {
            return (self.charges, estimated, Vec::new());
        }
        let mut lowered = Vec::new();
        let charges: Arc<[Charge]> = slice
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                if let Some((_, left)) = left.iter().find(|(j, _)| *j == i) {
                    let units = (*left).max(1);
                    if c.units > units {
                        tracing::info!(
                            target: "tower_402::metering",
                            meter = c.meter.as_str(),
                            estimate = c.units,
                            reserved = units,
                            "estimate lowered to what the plan's allowance has left (no overage)"
                        );
                        c.units = units;
                        lowered.push(Usage {
                            meter: c.meter.clone(),
                            units,
                        });
                    }
                }
                c
            })
            .collect();
        (Charges::Many(charges), estimated, lowered)
    }
}
