//! The request span, and the OpenTelemetry GenAI attribute names it uses on LLM routes.

use tracing::field::Empty;
use tracing::Span;

use crate::account::AccountId;

/// OpenTelemetry GenAI semantic-convention attribute names, defined here because the
/// semantic-conventions crate deprecates its `gen_ai` constants.
pub mod gen_ai {
    /// The model the request asked for.
    pub const REQUEST_MODEL: &str = "gen_ai.request.model";
    /// Tokens in the prompt.
    pub const USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    /// Tokens in the completion.
    pub const USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
}

/// The span of one billed request, `tower_402.request`: `route` now, the other fields
/// recorded as they become known. With no subscriber interested it is a disabled span, and
/// the route is never formatted.
pub(crate) fn request_span(method: &http::Method, path: &str) -> Span {
    tracing::info_span!(
        target: "tower_402::metering",
        "tower_402.request",
        route = tracing::field::display(format_args!("{method} {path}")),
        account = Empty,
        decision = Empty,
        credits = Empty,
        { gen_ai::REQUEST_MODEL } = Empty,
        { gen_ai::USAGE_INPUT_TOKENS } = Empty,
        { gen_ai::USAGE_OUTPUT_TOKENS } = Empty,
    )
}

/// Whether the current span records anything (else the values need not be computed).
pub(crate) fn tracing_request() -> bool {
    !Span::current().is_disabled()
}

/// Who pays, and the decision's code (`OK` when served), on the current request span.
pub(crate) fn record_decision(code: &str, account: Option<&AccountId>) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    if let Some(a) = account {
        span.record("account", a.as_str());
    }
    span.record("decision", code);
}

/// Credits charged at settlement, and an LLM request's token counts (the `input_tokens`
/// and `output_tokens` meters of [`OpenAiUsage`](crate::metering::OpenAiUsage)).
pub(crate) fn record_settlement(credits: u64, usage: Option<&[crate::ledger::Usage]>) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    span.record("credits", credits);
    for u in usage.unwrap_or_default() {
        match u.meter.as_str() {
            "input_tokens" => span.record(gen_ai::USAGE_INPUT_TOKENS, u.units),
            "output_tokens" => span.record(gen_ai::USAGE_OUTPUT_TOKENS, u.units),
            _ => continue,
        };
    }
}

/// The model an LLM request names.
pub(crate) fn record_model(model: &str) {
    Span::current().record(gen_ai::REQUEST_MODEL, model);
}
