//! Token figures of LLM responses in their three shapes: OpenAI Chat Completions, OpenAI
//! Responses and Anthropic Messages, with cached input and reasoning tokens split out.

use serde_json::{Map, Value};

use crate::ledger::Usage;
use crate::metering::usage::UsageError;
use crate::plan::Meter;

/// The meters token usage is counted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenMeters {
    /// Input tokens not read from or written to a cache.
    pub(crate) input: Meter,
    /// Output tokens other than reasoning tokens.
    pub(crate) output: Meter,
    /// Input tokens read from the provider's prompt cache.
    pub(crate) cached_input: Meter,
    /// Input tokens written to the provider's prompt cache (Anthropic's cache creation).
    pub(crate) cache_write: Meter,
    /// Reasoning ("thinking") output tokens.
    pub(crate) reasoning: Meter,
}

impl Default for TokenMeters {
    fn default() -> Self {
        TokenMeters {
            input: Meter::new("input_tokens"),
            output: Meter::new("output_tokens"),
            cached_input: Meter::new("cached_input_tokens"),
            cache_write: Meter::new("cache_write_tokens"),
            reasoning: Meter::new("reasoning_tokens"),
        }
    }
}

impl TokenMeters {
    /// The meter a detail meter is counted on when the request did not reserve it (its model
    /// has no price of its own for it): cached and cache-write tokens as input, reasoning
    /// tokens as output.
    pub(crate) fn counts_as(&self, meter: &Meter) -> Option<&Meter> {
        if meter == &self.cached_input || meter == &self.cache_write {
            Some(&self.input)
        } else if meter == &self.reasoning {
            Some(&self.output)
        } else {
            None
        }
    }
}

/// Token counts of one response, each in exactly one bucket (no bucket includes another).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tokens {
    pub(crate) input: u64,
    pub(crate) output: u64,
    pub(crate) cached_input: u64,
    pub(crate) cache_write: u64,
    pub(crate) reasoning: u64,
}

impl Tokens {
    /// As usage: input and output always, the detail meters when non-zero.
    pub(crate) fn usage(&self, meters: &TokenMeters) -> Vec<Usage> {
        let mut usage = Vec::with_capacity(5);
        usage.push(Usage {
            meter: meters.input.clone(),
            units: self.input,
        });
        usage.push(Usage {
            meter: meters.output.clone(),
            units: self.output,
        });
        for (meter, units) in [
            (&meters.cached_input, self.cached_input),
            (&meters.cache_write, self.cache_write),
            (&meters.reasoning, self.reasoning),
        ] {
            if units > 0 {
                usage.push(Usage {
                    meter: meter.clone(),
                    units,
                });
            }
        }
        usage
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A non-negative integer figure at `obj[name]`; `None` if absent or null.
fn figure(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, UsageError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            UsageError::Invalid(format!(
                "usage.{name} is not a non-negative integer: {}",
                truncate(&v.to_string())
            ))
        }),
    }
}

/// A figure inside a details object: `obj[parent][name]`.
fn detail(obj: &Map<String, Value>, parent: &str, name: &str) -> Result<Option<u64>, UsageError> {
    match obj.get(parent) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(details)) => figure(details, name)
            .map_err(|_| UsageError::Invalid(format!("usage.{parent}.{name} is not a count"))),
        Some(_) => Err(UsageError::Invalid(format!(
            "usage.{parent} is not an object"
        ))),
    }
}

/// The first of `names` present.
fn first(obj: &Map<String, Value>, names: &[&str]) -> Result<Option<u64>, UsageError> {
    for name in names {
        if let Some(n) = figure(obj, name)? {
            return Ok(Some(n));
        }
    }
    Ok(None)
}

/// Anthropic's usage figures, cumulative across a stream's events: each event's figures
/// replace the earlier ones (never added to them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AnthropicFigures {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
}

impl AnthropicFigures {
    /// Takes the figures `usage` carries; those it lacks keep their earlier value.
    pub(crate) fn merge(&mut self, usage: &Value) -> Result<(), UsageError> {
        let Value::Object(obj) = usage else {
            return Err(UsageError::Invalid("usage is not an object".into()));
        };
        let latest = |slot: &mut Option<u64>, name: &str| -> Result<(), UsageError> {
            if let Some(n) = figure(obj, name)? {
                *slot = Some(n);
            }
            Ok(())
        };
        latest(&mut self.input, "input_tokens")?;
        latest(&mut self.output, "output_tokens")?;
        latest(&mut self.cache_read, "cache_read_input_tokens")?;
        latest(&mut self.cache_creation, "cache_creation_input_tokens")?;
        Ok(())
    }

    /// The tokens so far; [`UsageError::Missing`] without an input figure.
    pub(crate) fn tokens(&self) -> Result<Tokens, UsageError> {
        let input = self.input.ok_or(UsageError::Missing)?;
        Ok(Tokens {
            input,
            output: self.output.unwrap_or(0),
            cached_input: self.cache_read.unwrap_or(0),
            cache_write: self.cache_creation.unwrap_or(0),
            reasoning: 0,
        })
    }
}

/// Whether a `usage` object is Anthropic's: its cache figures are named its own way.
fn is_anthropic(obj: &Map<String, Value>) -> bool {
    obj.contains_key("cache_read_input_tokens") || obj.contains_key("cache_creation_input_tokens")
}

/// Reads one `usage` object of any of the three shapes.
///
/// - OpenAI Chat Completions: `prompt_tokens` (which include
///   `prompt_tokens_details.cached_tokens`), `completion_tokens` (which include
///   `completion_tokens_details.reasoning_tokens`);
/// - OpenAI Responses: `input_tokens` (including `input_tokens_details.cached_tokens`),
///   `output_tokens` (including `output_tokens_details.reasoning_tokens`);
/// - Anthropic Messages: `input_tokens` (excluding the cache), `output_tokens`,
///   `cache_read_input_tokens`, `cache_creation_input_tokens`.
///
/// Without an input figure the usage is incomplete ([`UsageError::Missing`]): an incomplete
/// figure is never taken as zero. A part larger than its whole is [`UsageError::Invalid`].
pub(crate) fn parse_tokens(usage: &Value) -> Result<Tokens, UsageError> {
    let Value::Object(obj) = usage else {
        return Err(UsageError::Invalid("usage is not an object".into()));
    };
    if is_anthropic(obj) {
        let mut figures = AnthropicFigures::default();
        figures.merge(usage)?;
        return figures.tokens();
    }
    let prompt = first(obj, &["prompt_tokens", "input_tokens"])?;
    let completion = first(obj, &["completion_tokens", "output_tokens"])?;
    let cached = match detail(obj, "prompt_tokens_details", "cached_tokens")? {
        Some(n) => Some(n),
        None => detail(obj, "input_tokens_details", "cached_tokens")?,
    }
    .unwrap_or(0);
    let reasoning = match detail(obj, "completion_tokens_details", "reasoning_tokens")? {
        Some(n) => Some(n),
        None => detail(obj, "output_tokens_details", "reasoning_tokens")?,
    }
    .unwrap_or(0);
    let Some(prompt) = prompt else {
        return Err(UsageError::Missing);
    };
    let completion = completion.unwrap_or(0);
    let input = prompt.checked_sub(cached).ok_or_else(|| {
        UsageError::Invalid(format!(
            "{cached} cached tokens are more than the {prompt} input tokens"
        ))
    })?;
    let output = completion.checked_sub(reasoning).ok_or_else(|| {
        UsageError::Invalid(format!(
            "{reasoning} reasoning tokens are more than the {completion} output tokens"
        ))
    })?;
    Ok(Tokens {
        input,
        output,
        cached_input: cached,
        cache_write: 0,
        reasoning,
    })
}

/// The shape of a stream, as its events show it: what a provider-shaped error event looks
/// like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Shape {
    /// OpenAI Chat Completions (and legacy completions): `data:` chunks, `[DONE]`.
    #[default]
    OpenAiChat,
    /// OpenAI Responses: typed `response.*` events.
    OpenAiResponses,
    /// Anthropic Messages: `message_start`, `content_block_delta`, `message_delta`...
    Anthropic,
}

impl Shape {
    /// The shape an event's `type` shows, if any.
    pub(crate) fn of(kind: &str) -> Option<Shape> {
        if kind.starts_with("response.") {
            Some(Shape::OpenAiResponses)
        } else if kind.starts_with("message_")
            || kind.starts_with("content_block")
            || kind == "ping"
        {
            Some(Shape::Anthropic)
        } else {
            None
        }
    }

    /// A server-sent error event in this shape, carrying `code`, that ends the stream.
    pub(crate) fn error_event(self, code: &str, message: &str) -> String {
        match self {
            Shape::OpenAiChat => format!(
                "data: {}\n\n",
                serde_json::json!({"error": {
                    "message": message, "type": "insufficient_quota", "param": null, "code": code,
                }})
            ),
            Shape::OpenAiResponses => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({
                    "type": "error", "code": code, "message": message, "param": null,
                })
            ),
            Shape::Anthropic => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "error": {
                    "type": "billing_error", "message": message, "code": code,
                }})
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokens(v: Value) -> Result<Tokens, UsageError> {
        parse_tokens(&v)
    }

    #[test]
    fn openai_chat_cached_and_reasoning_are_parts_of_their_totals() {
        let t = tokens(json!({
            "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 60, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 20},
        }))
        .unwrap();
        assert_eq!(
            t,
            Tokens {
                input: 40,
                output: 30,
                cached_input: 60,
                cache_write: 0,
                reasoning: 20
            }
        );
        // Null details are no details.
        let t = tokens(json!({"prompt_tokens": 7, "completion_tokens": 1,
            "prompt_tokens_details": null}))
        .unwrap();
        assert_eq!((t.input, t.output, t.cached_input), (7, 1, 0));
    }

    #[test]
    fn openai_responses_details() {
        let t = tokens(json!({
            "input_tokens": 328, "input_tokens_details": {"cached_tokens": 128},
            "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 12},
            "total_tokens": 380,
        }))
        .unwrap();
        assert_eq!(
            (t.input, t.cached_input, t.output, t.reasoning),
            (200, 128, 40, 12)
        );
    }

    #[test]
    fn anthropic_cache_figures_are_beside_input() {
        let t = tokens(json!({
            "input_tokens": 25, "output_tokens": 12,
            "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000},
        }))
        .unwrap();
        assert_eq!(
            (t.input, t.cache_write, t.cached_input, t.output),
            (25, 1000, 2000, 12)
        );
    }

    #[test]
    fn impossible_parts_and_bad_details_are_invalid() {
        for bad in [
            json!({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 6}}),
            json!({"input_tokens": 5, "output_tokens": 1,
                "output_tokens_details": {"reasoning_tokens": 2}}),
            json!({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": -1}}),
            json!({"prompt_tokens": 5, "prompt_tokens_details": 3}),
            json!({"input_tokens": 5, "cache_read_input_tokens": 1.5}),
        ] {
            assert!(
                matches!(tokens(bad.clone()), Err(UsageError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(
            tokens(json!({"output_tokens": 3, "cache_read_input_tokens": 0})),
            Err(UsageError::Missing)
        );
    }

    #[test]
    fn anthropic_figures_are_cumulative_the_latest_wins() {
        let mut f = AnthropicFigures::default();
        f.merge(&json!({"input_tokens": 472, "output_tokens": 2,
            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}))
            .unwrap();
        f.merge(&json!({"output_tokens": 10})).unwrap();
        f.merge(&json!({"output_tokens": 89})).unwrap();
        let t = f.tokens().unwrap();
        assert_eq!((t.input, t.output), (472, 89));
        let mut f = AnthropicFigures::default();
        f.merge(&json!({"output_tokens": 5})).unwrap();
        assert_eq!(f.tokens(), Err(UsageError::Missing));
    }

    #[test]
    fn detail_meters_fall_back_to_input_and_output() {
        let m = TokenMeters::default();
        assert_eq!(m.counts_as(&m.cached_input), Some(&m.input));
        assert_eq!(m.counts_as(&m.cache_write), Some(&m.input));
        assert_eq!(m.counts_as(&m.reasoning), Some(&m.output));
        assert_eq!(m.counts_as(&m.input), None);
        let usage = Tokens {
            input: 1,
            output: 2,
            cached_input: 0,
            cache_write: 0,
            reasoning: 3,
        }
        .usage(&m);
        assert_eq!(
            usage,
            vec![
                Usage::new("input_tokens", 1),
                Usage::new("output_tokens", 2),
                Usage::new("reasoning_tokens", 3)
            ]
        );
    }
}
