//! Seeing what billing does: metrics, traces and (with the `usage` feature) usage events.
//!
//! # Metrics
//!
//! With the `metrics` feature, every decision and every movement of credit is recorded through
//! the [`metrics`](https://docs.rs/metrics) facade, so any exporter works (Prometheus, StatsD,
//! OpenTelemetry). Nothing is recorded until the application installs a recorder; without the
//! feature the calls compile to nothing.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `tower402_decisions_total` | counter | `outcome` (`allowed`, `denied`, `failed_open`, `replayed`), `code`, `rule` | one per metered request's decision (`code="OK"`, `rule="none"` when allowed) |
//! | `tower402_credits_reserved_total` | counter | | credits held by reservations |
//! | `tower402_credits_settled_total` | counter | | credits charged by settlements |
//! | `tower402_credits_released_total` | counter | | credits given back: released holds, and the unused part of a hold at settlement |
//! | `tower402_shortfalls_total` | counter | | settlements that could not charge everything used |
//! | `tower402_shortfall_credits_total` | counter | | credits owed beyond what could be charged |
//! | `tower402_credits_held` | gauge | | credits held by this instance's requests in flight |
//! | `tower402_credits_leased` | gauge | | credits held for this instance by its open leases ([`LeasedLedger`](crate::store::LeasedLedger)): parked, spent from or not |
//! | `tower402_store_call_seconds` | histogram | `call` (`ledger.reserve`, `plans.subscription`, ...) | latency of each call to a remote store |
//! | `tower402_store_outages_total` | counter | `call` | store calls that failed because the store was unreachable or timed out |
//! | `tower402_settlement_failures_total` | counter | | settlements or releases a ledger refused or could not take |
//! | `tower402_settlement_retries_total` | counter | `result` | settlements and releases queued after an outage ([retried](crate::metering#settlements-that-fail)): `queued`, `landed`, `failed` (refused for good), `dropped` (queue full, or no runtime) |
//! | `tower402_usage_events_dropped_total`, `..._delivered_total`, `..._rejected_total` | counter | | usage events ([`usage`](crate::usage)) the outbox dropped (full), delivered, or saw refused |
//! | `tower402_usage_sink_retries_total` | counter | | usage batches retried while the sink was down |
//! | `tower402_threshold_events_total` | counter | `kind` (`balance`, `allowance`) | soft-limit crossings reported to [`on_threshold`](crate::Billing::on_threshold) |
//!
//! Labels carry no account id by default: one series per customer would grow without bound.
//! A deployment with few accounts can opt in with [`label_accounts`], which adds an
//! `account` label to the decision and credit counters.
//!
//! Call [`describe`] once after installing a recorder to give each metric its help text and
//! unit.
//!
//! # Traces
//!
//! Every metered request runs inside one `tracing` span, `tower_402.request` (target
//! `tower_402::metering`), with the fields `account`, `route` (method and path),
//! `decision` (the code, or `OK`) and, once it is settled, `credits`. On LLM routes the
//! span also carries the OpenTelemetry GenAI attribute names defined in [`gen_ai`]: the
//! model and the token counts. The span never holds an API key or any header value.

mod metrics;
mod trace;

pub use self::metrics::{describe, label_accounts};
pub use self::trace::gen_ai;

#[cfg(feature = "usage")]
pub(crate) use self::metrics::usage_events;
pub(crate) use self::metrics::{
    held_released, held_reserved, leased, settled, settlement_retry, store_call, threshold, Outcome,
};
pub(crate) use self::trace::{record_model, record_settlement, request_span, tracing_request};

/// Counts a metered request's decision and records it on the request span.
pub(crate) fn decision(
    outcome: Outcome,
    denial: Option<&crate::denial::Denial>,
    account: Option<&crate::account::AccountId>,
) {
    trace::record_decision(denial.map_or("OK", |d| d.code()), account);
    metrics::decision(outcome, denial, account);
}
