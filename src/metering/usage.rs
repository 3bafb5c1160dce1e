use std::collections::VecDeque;

use http::header::{HeaderName, CONTENT_TYPE};
use http::response::Parts;
use http::HeaderMap;
use serde_json::Value;

use crate::ledger::Usage;
use crate::metering::llm::PriceTable;
use crate::metering::sse::SseScanner;
use crate::metering::tokens::{parse_tokens, TokenMeters};
use crate::plan::Meter;

/// Why no usable usage figure came out of a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// The response carried no usage figure.
    #[error("no usage figure in the response")]
    Missing,
    /// A figure was there but unusable: negative, fractional, not a number, absurdly large.
    #[error("unusable usage figure: {0}")]
    Invalid(String),
}

/// Reads actual usage from a response. One [`UsageScanner`] is made per response.
///
/// Built in: [`HeaderUsage`] (a header the handler sets, stripped before the client sees it),
/// [`BodyBytes`] (response body size) and [`OpenAiUsage`] (the `usage` object of
/// OpenAI-compatible JSON and server-sent-event responses). A [`ReportedUsage`] in the
/// response extensions takes precedence over any extractor.
///
/// [`ReportedUsage`]: crate::ReportedUsage
pub trait UsageExtractor: Send + Sync + 'static {
    /// Looks at the response head (and may remove headers from it); returns the scanner for
    /// its body, or `None` to settle the estimate.
    fn scanner(&self, head: &mut Parts) -> Option<Box<dyn UsageScanner>>;

    /// The meter units of `meter` are counted on when the request reserved no charge on
    /// `meter` itself: [`OpenAiUsage`] counts cached input tokens as input tokens and reasoning
    /// tokens as output tokens for a model without prices of their own for them. `None` (the
    /// default): such units are ignored, as a [`ReportedUsage`] for an unreserved meter is.
    ///
    /// [`ReportedUsage`]: crate::ReportedUsage
    fn counts_as(&self, meter: &Meter) -> Option<Meter> {
        let _ = meter;
        None
    }
}

/// Follows one response body. Must keep its memory bounded whatever the body's length.
pub trait UsageScanner: Send + 'static {
    /// A chunk of the body.
    fn data(&mut self, chunk: &[u8]) {
        let _ = chunk;
    }
    /// The body's trailers.
    fn trailers(&mut self, trailers: &HeaderMap) {
        let _ = trailers;
    }
    /// The body ended: the usage it reported.
    fn finish(&mut self) -> Result<Vec<Usage>, UsageError>;
    /// The body was cut short: the usage seen so far, if this scanner can tell.
    fn so_far(&mut self) -> Option<Vec<Usage>> {
        None
    }
    /// Asks the scanner to count what the body delivers as it goes, for
    /// [`DryStreamPolicy::Cut`](crate::metering::DryStreamPolicy::Cut); `false` (the
    /// default) if it cannot, and the stream is then never cut.
    fn count_delivered(&mut self) -> bool {
        false
    }
    /// What the body delivered so far, counted as it went (after
    /// [`count_delivered`](Self::count_delivered)): a lower bound, per meter. Meters it leaves
    /// out are taken at their reserved estimate.
    fn delivered(&mut self) -> Option<Vec<Usage>> {
        self.so_far()
    }
    /// The last bytes of a stream cut short by a [dry-stream](crate::metering::DryStreamPolicy)
    /// cut: an error event in the body's own format carrying `code`. `None` (the default): the
    /// scanner cannot say one, and the stream is not cut.
    fn end_event(&self, code: &str, message: &str) -> Option<bytes::Bytes> {
        let _ = (code, message);
        None
    }
}

/// Usage from response headers the handler sets, e.g. `x-usage-tokens: 1234`. The headers are
/// removed before the response leaves the layer.
///
/// ```
/// use tower_402::metering::HeaderUsage;
/// let usage = HeaderUsage::new().header("x-usage-images", "images");
/// ```
#[derive(Debug, Clone, Default)]
pub struct HeaderUsage {
    headers: Vec<(HeaderName, Meter)>,
}

impl HeaderUsage {
    /// No headers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `meter` units from `header`.
    ///
    /// # Panics
    ///
    /// If `header` is not a valid header name (configuration written in code).
    #[track_caller]
    pub fn header(mut self, header: &str, meter: impl AsRef<str>) -> Self {
        let name = HeaderName::from_bytes(header.as_bytes())
            .unwrap_or_else(|_| panic!("invalid header name `{header}`"));
        self.headers.push((name, Meter::new(meter)));
        self
    }
}

struct Fixed(Result<Vec<Usage>, UsageError>);

impl UsageScanner for Fixed {
    fn finish(&mut self) -> Result<Vec<Usage>, UsageError> {
        self.0.clone()
    }
    fn so_far(&mut self) -> Option<Vec<Usage>> {
        self.0.clone().ok()
    }
}

impl UsageExtractor for HeaderUsage {
    fn scanner(&self, head: &mut Parts) -> Option<Box<dyn UsageScanner>> {
        let mut usage = Vec::new();
        let mut error = None;
        for (name, meter) in &self.headers {
            let values: Vec<_> = head.headers.get_all(name).iter().cloned().collect();
            head.headers.remove(name);
            match values.as_slice() {
                [] => {}
                [v] => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                    Some(units) => usage.push(Usage {
                        meter: meter.clone(),
                        units,
                    }),
                    None => {
                        error = Some(UsageError::Invalid(format!(
                            "header {name} is not a whole number"
                        )))
                    }
                },
                _ => {
                    error = Some(UsageError::Invalid(format!(
                        "header {name} appears more than once"
                    )))
                }
            }
        }
        let result = match (error, usage.is_empty()) {
            (Some(e), _) => Err(e),
            (None, true) => Err(UsageError::Missing),
            (None, false) => Ok(usage),
        };
        Some(Box::new(Fixed(result)))
    }
}

/// Usage = the number of bytes in the response body, on one meter.
#[derive(Debug, Clone)]
pub struct BodyBytes {
    meter: Meter,
}

impl BodyBytes {
    /// Counts body bytes on `meter`.
    pub fn new(meter: impl AsRef<str>) -> Self {
        BodyBytes {
            meter: Meter::new(meter),
        }
    }
}

struct ByteCounter {
    meter: Meter,
    bytes: u64,
}

impl UsageScanner for ByteCounter {
    fn data(&mut self, chunk: &[u8]) {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
    }
    fn finish(&mut self) -> Result<Vec<Usage>, UsageError> {
        Ok(vec![Usage {
            meter: self.meter.clone(),
            units: self.bytes,
        }])
    }
    fn so_far(&mut self) -> Option<Vec<Usage>> {
        self.finish().ok()
    }
}

impl UsageExtractor for BodyBytes {
    fn scanner(&self, _: &mut Parts) -> Option<Box<dyn UsageScanner>> {
        Some(Box::new(ByteCounter {
            meter: self.meter.clone(),
            bytes: 0,
        }))
    }
}

/// The `usage` of LLM responses: OpenAI Chat Completions, OpenAI Responses and Anthropic
/// Messages, in JSON bodies and server-sent-event streams.
///
/// - `application/json` bodies: the last `"usage"` object within the final
///   [`tail_bytes`](Self::tail_bytes) of the body (default 64 KiB; these APIs put it last).
///   Only that tail is kept in memory.
/// - `text/event-stream` bodies: every `data:` event is parsed as it completes (events longer
///   than [`max_event_bytes`](Self::max_event_bytes), default 256 KiB, are skipped). OpenAI
///   Chat Completions: the last chunk with a non-null `usage`; `data: [DONE]` ends the stream.
///   OpenAI Responses: the `response.usage` of `response.completed` (or
///   `response.incomplete`, `response.failed`). Anthropic Messages: `message_start`'s
///   `message.usage`, then each `message_delta`'s `usage`; their figures are cumulative, so
///   the latest of each is kept (never summed). Memory is one event.
///
/// The figures, each counted on one meter (no meter counts another's tokens):
///
/// | meter (default name) | OpenAI Chat | OpenAI Responses | Anthropic |
/// |---|---|---|---|
/// | input (`input_tokens`) | `prompt_tokens` less cached | `input_tokens` less cached | `input_tokens` |
/// | cached input (`cached_input_tokens`) | `prompt_tokens_details.cached_tokens` | `input_tokens_details.cached_tokens` | `cache_read_input_tokens` |
/// | cache write (`cache_write_tokens`) | | | `cache_creation_input_tokens` |
/// | output (`output_tokens`) | `completion_tokens` less reasoning | `output_tokens` less reasoning | `output_tokens` |
/// | reasoning (`reasoning_tokens`) | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | |
///
/// The detail meters (cached input, cache write, reasoning) are settled on their own meter
/// when the request reserved a charge on it (its model has a price for it in the
/// [`PriceTable`]); otherwise their tokens are counted as input (cached, cache write) or
/// output (reasoning) tokens ([`UsageExtractor::counts_as`]).
///
/// Figures must be non-negative integers, and a part no larger than its total: anything else
/// is [`UsageError::Invalid`]. A response without usage, or whose usage lacks the input
/// figure, is [`UsageError::Missing`] (the estimate is charged).
#[derive(Debug, Clone)]
pub struct OpenAiUsage {
    meters: TokenMeters,
    tail_bytes: usize,
    max_event_bytes: usize,
}

impl Default for OpenAiUsage {
    fn default() -> Self {
        OpenAiUsage {
            meters: TokenMeters::default(),
            tail_bytes: 64 * 1024,
            max_event_bytes: 256 * 1024,
        }
    }
}

impl OpenAiUsage {
    /// Meters `input_tokens`, `output_tokens`, `cached_input_tokens`, `cache_write_tokens`
    /// and `reasoning_tokens`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The meters of a price table (what [`OpenAiPricing`](crate::metering::OpenAiPricing)
    /// reserves on).
    pub fn for_prices(table: &PriceTable) -> Self {
        OpenAiUsage {
            meters: table.token_meters(),
            ..Self::default()
        }
    }

    /// Counts input and output tokens on these meters instead.
    pub fn meters(mut self, input: impl AsRef<str>, output: impl AsRef<str>) -> Self {
        self.meters.input = Meter::new(input);
        self.meters.output = Meter::new(output);
        self
    }

    /// Counts cached input, cache-write and reasoning tokens on these meters instead.
    pub fn detail_meters(
        mut self,
        cached_input: impl AsRef<str>,
        cache_write: impl AsRef<str>,
        reasoning: impl AsRef<str>,
    ) -> Self {
        self.meters.cached_input = Meter::new(cached_input);
        self.meters.cache_write = Meter::new(cache_write);
        self.meters.reasoning = Meter::new(reasoning);
        self
    }

    /// How much of the end of a JSON body is kept to find `usage` in.
    pub fn tail_bytes(mut self, bytes: usize) -> Self {
        self.tail_bytes = bytes.max(64);
        self
    }

    /// The longest server-sent event parsed.
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes.max(64);
        self
    }
}

/// Keeps the last `cap` bytes of a JSON body; finds `usage` in them at the end.
struct JsonTail {
    tail: VecDeque<u8>,
    cap: usize,
    meters: TokenMeters,
}

impl UsageScanner for JsonTail {
    fn data(&mut self, chunk: &[u8]) {
        let chunk = if chunk.len() > self.cap {
            &chunk[chunk.len() - self.cap..]
        } else {
            chunk
        };
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(self.cap);
        self.tail.drain(..overflow);
        self.tail.extend(chunk);
    }

    fn finish(&mut self) -> Result<Vec<Usage>, UsageError> {
        let tail = self.tail.make_contiguous();
        find_usage(tail)
            .map(|v| parse_tokens(&v).map(|t| t.usage(&self.meters)))
            .unwrap_or(Err(UsageError::Missing))
    }
}

/// The value after the last `"usage"` key in `bytes` that parses as JSON.
pub(crate) fn find_usage(bytes: &[u8]) -> Option<Value> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = bytes.len();
    while let Some(pos) = bytes[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        let rest = &bytes[pos + KEY.len()..];
        let rest = trim_start(rest);
        if let Some(rest) = rest.strip_prefix(b":") {
            let rest = trim_start(rest);
            let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
            if let Some(Ok(v)) = values.next() {
                if !v.is_null() {
                    return Some(v);
                }
            }
        }
        end = pos;
    }
    None
}

fn trim_start(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

impl UsageExtractor for OpenAiUsage {
    fn scanner(&self, head: &mut Parts) -> Option<Box<dyn UsageScanner>> {
        let content_type = head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") {
            Some(Box::new(SseScanner::new(
                self.max_event_bytes,
                self.meters.clone(),
            )))
        } else {
            Some(Box::new(JsonTail {
                tail: VecDeque::new(),
                cap: self.tail_bytes,
                meters: self.meters.clone(),
            }))
        }
    }

    fn counts_as(&self, meter: &Meter) -> Option<Meter> {
        self.meters.counts_as(meter).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> TokenMeters {
        TokenMeters {
            input: Meter::new("in"),
            output: Meter::new("out"),
            ..TokenMeters::default()
        }
    }

    fn json_scanner(cap: usize) -> JsonTail {
        JsonTail {
            tail: VecDeque::new(),
            cap,
            meters: meters(),
        }
    }

    fn parse_usage(v: &Value) -> Result<Vec<Usage>, UsageError> {
        parse_tokens(v).map(|t| t.usage(&meters()))
    }

    #[test]
    fn json_usage_in_any_chunking() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": trap"}}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        for split in 1..body.len() {
            let mut s = json_scanner(1024);
            s.data(&body[..split]);
            s.data(&body[split..]);
            let u = s.finish().unwrap();
            assert_eq!((u[0].units, u[1].units), (12, 34), "split at {split}");
        }
    }

    #[test]
    fn json_tail_is_bounded() {
        let mut s = json_scanner(256);
        for _ in 0..10_000 {
            s.data(&[b' '; 100]);
        }
        s.data(br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        assert!(s.tail.len() <= 256);
        assert_eq!(s.finish().unwrap()[1].units, 2);
    }

    #[test]
    fn bad_figures() {
        for bad in [
            r#"{"prompt_tokens":-1,"completion_tokens":2}"#,
            r#"{"prompt_tokens":1.5,"completion_tokens":2}"#,
            r#"{"prompt_tokens":"12","completion_tokens":2}"#,
            r#"{"prompt_tokens":1,"completion_tokens":1e30}"#,
            r#"[1,2]"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(
                matches!(parse_usage(&v), Err(UsageError::Invalid(_))),
                "{bad}"
            );
        }
        let v: Value = serde_json::from_str(r#"{"total_tokens":3}"#).unwrap();
        assert_eq!(parse_usage(&v), Err(UsageError::Missing));
        // Output without input is incomplete: never taken as zero input.
        let v: Value = serde_json::from_str(r#"{"completion_tokens":3}"#).unwrap();
        assert_eq!(parse_usage(&v), Err(UsageError::Missing));
        let v: Value = serde_json::from_str(r#"{"prompt_tokens":7,"total_tokens":7}"#).unwrap();
        assert_eq!(parse_usage(&v).unwrap()[1].units, 0);
    }

    #[test]
    fn missing_and_null_usage() {
        let mut s = json_scanner(1024);
        s.data(br#"{"choices":[],"usage":null}"#);
        assert_eq!(s.finish(), Err(UsageError::Missing));
        let mut s = json_scanner(1024);
        s.data(b"not json at all");
        assert_eq!(s.finish(), Err(UsageError::Missing));
    }

    #[test]
    fn header_usage_is_read_and_stripped() {
        let (mut head, _) = http::Response::builder()
            .header("x-usage-images", "3")
            .body(())
            .unwrap()
            .into_parts();
        let mut s = HeaderUsage::new()
            .header("x-usage-images", "images")
            .scanner(&mut head)
            .unwrap();
        assert!(head.headers.get("x-usage-images").is_none());
        assert_eq!(s.finish().unwrap(), vec![Usage::new("images", 3)]);
        let (mut head, _) = http::Response::builder()
            .header("x-usage-images", "-3")
            .body(())
            .unwrap()
            .into_parts();
        let mut s = HeaderUsage::new()
            .header("x-usage-images", "images")
            .scanner(&mut head)
            .unwrap();
        assert!(matches!(s.finish(), Err(UsageError::Invalid(_))));
    }
}

/// Usage the handler reports, in the response extensions; settled instead of the estimate.
///
/// Units of meters the request did not reserve are ignored (and logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedUsage(pub Vec<Usage>);

impl ReportedUsage {
    /// `units` of one meter.
    pub fn units(meter: impl AsRef<str>, units: u64) -> Self {
        ReportedUsage(vec![Usage::new(meter, units)])
    }
}
