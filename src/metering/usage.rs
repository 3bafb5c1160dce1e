use std::collections::VecDeque;

use http::header::{HeaderName, CONTENT_TYPE};
use http::response::Parts;
use http::HeaderMap;
use serde_json::Value;

use crate::ledger::Usage;
use crate::metering::sse::SseScanner;
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

/// The `usage` object of OpenAI-compatible responses.
///
/// - `application/json` bodies: the last `"usage"` object within the final
///   [`tail_bytes`](Self::tail_bytes) of the body (default 64 KiB; OpenAI-compatible servers
///   put it last). Only that tail is kept in memory.
/// - `text/event-stream` bodies: every `data:` event is parsed as it completes (events longer
///   than [`max_event_bytes`](Self::max_event_bytes), default 256 KiB, are skipped); the last
///   event with a non-null `usage` wins; `data: [DONE]` ends the stream. Memory is one event.
///
/// `prompt_tokens` (or `input_tokens`) are counted on the input meter and `completion_tokens`
/// (or `output_tokens`) on the output meter; an embeddings `usage` without completion tokens
/// counts zero output. Figures must be non-negative integers: anything else is
/// [`UsageError::Invalid`]. A response without usage, or whose usage lacks the input figure,
/// is [`UsageError::Missing`] (the estimate is charged).
#[derive(Debug, Clone)]
pub struct OpenAiUsage {
    input_meter: Meter,
    output_meter: Meter,
    tail_bytes: usize,
    max_event_bytes: usize,
}

impl Default for OpenAiUsage {
    fn default() -> Self {
        OpenAiUsage {
            input_meter: Meter::new("input_tokens"),
            output_meter: Meter::new("output_tokens"),
            tail_bytes: 64 * 1024,
            max_event_bytes: 256 * 1024,
        }
    }
}

impl OpenAiUsage {
    /// Meters `input_tokens` and `output_tokens`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts on these meters instead.
    pub fn meters(mut self, input: impl AsRef<str>, output: impl AsRef<str>) -> Self {
        self.input_meter = Meter::new(input);
        self.output_meter = Meter::new(output);
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

/// Reads an OpenAI-style `usage` object into usage on two meters.
pub(crate) fn parse_usage(
    usage: &Value,
    input: &Meter,
    output: &Meter,
) -> Result<Vec<Usage>, UsageError> {
    let Value::Object(obj) = usage else {
        return Err(UsageError::Invalid("usage is not an object".into()));
    };
    let figure = |names: &[&str]| -> Result<Option<u64>, UsageError> {
        for name in names {
            if let Some(v) = obj.get(*name) {
                return match v.as_u64() {
                    Some(n) => Ok(Some(n)),
                    None => Err(UsageError::Invalid(format!(
                        "usage.{name} is not a non-negative integer: {}",
                        truncate(&v.to_string())
                    ))),
                };
            }
        }
        Ok(None)
    };
    let prompt = figure(&["prompt_tokens", "input_tokens"])?;
    let completion = figure(&["completion_tokens", "output_tokens"])?;
    // Input is always reported (embeddings report nothing else); without it the usage is
    // incomplete, and an incomplete figure is never taken as zero.
    let Some(prompt) = prompt else {
        return Err(UsageError::Missing);
    };
    Ok(vec![
        Usage {
            meter: input.clone(),
            units: prompt,
        },
        Usage {
            meter: output.clone(),
            units: completion.unwrap_or(0),
        },
    ])
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Keeps the last `cap` bytes of a JSON body; finds `usage` in them at the end.
struct JsonTail {
    tail: VecDeque<u8>,
    cap: usize,
    input: Meter,
    output: Meter,
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
            .map(|v| parse_usage(&v, &self.input, &self.output))
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
                self.input_meter.clone(),
                self.output_meter.clone(),
            )))
        } else {
            Some(Box::new(JsonTail {
                tail: VecDeque::new(),
                cap: self.tail_bytes,
                input: self.input_meter.clone(),
                output: self.output_meter.clone(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters() -> (Meter, Meter) {
        (Meter::new("in"), Meter::new("out"))
    }

    fn json_scanner(cap: usize) -> JsonTail {
        let (input, output) = meters();
        JsonTail {
            tail: VecDeque::new(),
            cap,
            input,
            output,
        }
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
        let (i, o) = meters();
        for bad in [
            r#"{"prompt_tokens":-1,"completion_tokens":2}"#,
            r#"{"prompt_tokens":1.5,"completion_tokens":2}"#,
            r#"{"prompt_tokens":"12","completion_tokens":2}"#,
            r#"{"prompt_tokens":1,"completion_tokens":1e30}"#,
            r#"[1,2]"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(
                matches!(parse_usage(&v, &i, &o), Err(UsageError::Invalid(_))),
                "{bad}"
            );
        }
        let v: Value = serde_json::from_str(r#"{"total_tokens":3}"#).unwrap();
        assert_eq!(parse_usage(&v, &i, &o), Err(UsageError::Missing));
        // Output without input is incomplete: never taken as zero input.
        let v: Value = serde_json::from_str(r#"{"completion_tokens":3}"#).unwrap();
        assert_eq!(parse_usage(&v, &i, &o), Err(UsageError::Missing));
        let v: Value = serde_json::from_str(r#"{"prompt_tokens":7,"total_tokens":7}"#).unwrap();
        assert_eq!(parse_usage(&v, &i, &o).unwrap()[1].units, 0);
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
