use http::request::Parts;

use crate::decision::{Cost, Denial};
use crate::gate::Entitlement;

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
/// Without a pricing rule the metering layer reserves the route's fixed
/// [`Cost`] from the [`Entitlement`] (set by the gate's route requirements). A rule replaces
/// that: [`OpenAiPricing`](crate::metering::OpenAiPricing) prices LLM requests from their
/// body; a closure `Fn(&PricingRequest) -> Result<Vec<Cost>, Denial>` prices anything else.
///
/// Returning no costs means "nothing to meter"; a [`Denial`] refuses the request (a 400 for a
/// request that cannot be priced, say).
///
/// ```
/// use tower_402::decision::Cost;
/// use tower_402::metering::{MeteringLayer, PricingRequest};
/// use tower_402::{Credits, MemoryLedger};
///
/// // One credit per 10 rows asked for, from the `rows` query parameter.
/// let layer = MeteringLayer::new(MemoryLedger::new()).pricing(|req: &PricingRequest<'_>| {
///     let rows: u64 = req.parts.uri.query()
///         .and_then(|q| q.strip_prefix("rows="))
///         .and_then(|n| n.parse().ok())
///         .unwrap_or(10);
///     Ok(vec![Cost::new("rows", rows, Credits::new(1)).per(10)])
/// });
/// ```
pub trait Pricing: Send + Sync + 'static {
    /// Whether [`estimate`](Self::estimate) needs the request body. The layer then reads it
    /// whole, up to [`MeteringLayer::max_body`](crate::MeteringLayer::max_body) bytes (413
    /// beyond), and hands it on intact.
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
