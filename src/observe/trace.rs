//! The request span, and the OpenTelemetry GenAI attribute names it uses on LLM routes.

use tracing::field::Empty;
use tracing::Span;

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

/// A request's span and what it records on it.
#[derive(Debug, Clone)]
pub(crate) struct RequestSpan(pub(crate) Span);

/// The span of one request: `route` now, the rest recorded as it becomes known. Costs one
/// disabled-callsite check when no subscriber wants it.
pub(crate) fn request_span(method: &http::Method, path: &str) -> RequestSpan {
    RequestSpan(tracing::info_span!(
        target: "tower_402::metering",
        "tower_402.request",
        route = tracing::field::display(format_args!("{method} {path}")),
        account = Empty,
        decision = Empty,
        credits = Empty,
        { gen_ai::REQUEST_MODEL } = Empty,
        { gen_ai::USAGE_INPUT_TOKENS } = Empty,
        { gen_ai::USAGE_OUTPUT_TOKENS } = Empty,
    ))
}

impl RequestSpan {
    /// Who pays.
    pub(crate) fn account(&self, account: &str) {
        self.0.record("account", account);
    }

    /// The decision's code (`OK` when served).
    pub(crate) fn decision(&self, code: &str) {
        self.0.record("decision", code);
    }

    /// Credits charged at settlement.
    pub(crate) fn credits(&self, credits: u64) {
        self.0.record("credits", credits);
    }

    /// The model an LLM request named.
    pub(crate) fn model(&self, model: &str) {
        self.0.record(gen_ai::REQUEST_MODEL, model);
    }

    /// Token counts an LLM response reported.
    pub(crate) fn tokens(&self, input: Option<u64>, output: Option<u64>) {
        if let Some(i) = input {
            self.0.record(gen_ai::USAGE_INPUT_TOKENS, i);
        }
        if let Some(o) = output {
            self.0.record(gen_ai::USAGE_OUTPUT_TOKENS, o);
        }
    }
}
