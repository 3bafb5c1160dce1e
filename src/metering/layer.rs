use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::backend::FailureMode;
use crate::ledger::{Ledger, OverEstimate, RecordLimits};
use crate::metering::threshold::Thresholds;
use crate::metering::{Metering, Pricing, UsageExtractor};
use crate::plan::Catalog;
use crate::problem::ProblemConfig;
use crate::time::Clock;

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

/// What to charge when a response stream ends in an error after it began: an HTTP body that
/// fails mid-stream (an upstream reset), or a gRPC stream whose trailers carry a non-zero
/// `grpc-status` after its messages.
///
/// A stream that fails before it delivered any data (a body that fails on its first frame, a
/// gRPC error with no message before it) is always released: nothing was served. A
/// trailers-only gRPC error never reaches this policy either: it is released like a 5xx
/// (unless [`bill_grpc_errors`](crate::Billing::bill_grpc_errors) is set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamErrorPolicy {
    /// Charge what the stream delivered, exactly as for a body dropped mid-stream: the
    /// [`DisconnectPolicy`] decides (the estimate by default, or the usage seen so far), and a
    /// [`ReportedUsage`](crate::ReportedUsage) is settled as reported. The default: the
    /// caller received paid work, and a stream cannot be made free by ending it in an error.
    #[default]
    ChargeDelivered,
    /// Release the reservation, whatever the stream delivered.
    Release,
}

/// What to do when a streamed response's usage passes what was held and the balance cannot
/// pay for more of it (a model that ignores `max_tokens`, an estimate below the actual cost).
///
/// Judged as the stream goes, from what the [`UsageScanner`](crate::metering::UsageScanner)
/// counts (for LLM streams, [`OpenAiUsage`](crate::metering::OpenAiUsage): each content
/// event counts as at least one output token, and usage figures are taken as they come),
/// against the credit the account had left after the request's hold (and the allowance left,
/// on a plan without overage). Other requests on the same account meanwhile are not seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DryStreamPolicy {
    /// Stream on: the settlement draws the difference from the balance, as far as it goes, and
    /// logs any shortfall (by the [`OverEstimate`] policy). The default.
    #[default]
    StreamOn,
    /// End the stream before the first event the balance cannot pay for: the client gets an
    /// error event in the stream's own shape carrying `INSUFFICIENT_CREDITS` (OpenAI Chat: a
    /// `data: {"error": {...}}` chunk; OpenAI Responses: an `error` event; Anthropic: an
    /// `event: error`) and the stream ends; the ledger charges what was delivered before it
    /// (the counted output tokens, the usage figures seen, and the estimate for what the
    /// stream has not reported, such as OpenAI's input tokens). A scanner that cannot count
    /// (a custom one, a JSON body) never cuts.
    Cut,
}

#[derive(Clone)]
pub(crate) struct MeterConfig {
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) problems: Arc<ProblemConfig>,
    /// The plans on offer, shared with the gate: for pricing rules' upgrade prompts.
    pub(crate) catalog: Arc<Catalog>,
    /// `None`: the route's fixed cost from the entitlement.
    pub(crate) pricing: Option<Arc<dyn Pricing>>,
    pub(crate) usage: Option<Arc<dyn UsageExtractor>>,
    pub(crate) ttl_secs: u64,
    pub(crate) bill_client_errors: bool,
    pub(crate) bill_grpc_errors: bool,
    pub(crate) over_estimate: OverEstimate,
    pub(crate) on_disconnect: DisconnectPolicy,
    pub(crate) on_stream_error: StreamErrorPolicy,
    pub(crate) on_dry_stream: DryStreamPolicy,
    pub(crate) max_body: usize,
    /// Responses of keyed requests larger than this are not recorded.
    pub(crate) max_recorded_response: usize,
    /// How long recorded responses live and how many an account keeps.
    pub(crate) records: RecordLimits,
    pub(crate) max_units: u64,
    pub(crate) thresholds: Option<Thresholds>,
    /// Warn when a request takes an allowance to this percentage.
    pub(crate) soft_limit_percent: Option<u8>,
    pub(crate) failure: FailureMode,
    pub(crate) retry_after_secs: u64,
    pub(crate) timeout: Option<Duration>,
    /// Settlements and releases that did not land, retried until they do (shared by every
    /// clone of the configuration).
    pub(crate) retries: Arc<crate::metering::retry::Retries>,
    /// Where usage events go.
    #[cfg(feature = "usage")]
    pub(crate) outbox: Option<crate::usage::Outbox>,
}

/// Applies [`Metering`] to a service. See the [module docs](crate::metering).
///
/// Made by [`Billing::metering`](crate::Billing::metering), and wrapped by the gate of the
/// same [`Billing`](crate::Billing): on its own it makes no `Service`.
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
            .field("on_dry_stream", &c.on_dry_stream)
            .field("max_body", &c.max_body)
            .field("max_recorded_response", &c.max_recorded_response)
            .field("records", &c.records)
            .field("failure", &c.failure)
            .finish_non_exhaustive()
    }
}

impl MeteringLayer {
    pub(crate) fn from_config(config: Arc<MeterConfig>) -> Self {
        MeteringLayer { config }
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
