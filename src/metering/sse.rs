use serde_json::Value;

use crate::ledger::Usage;
use crate::metering::tokens::{parse_tokens, AnthropicFigures, Shape, TokenMeters, Tokens};
use crate::metering::usage::{UsageError, UsageScanner};

const USAGE_KEY: &[u8] = b"\"usage\"";

/// Follows a `text/event-stream` body event by event, keeping at most one event in memory.
///
/// Reads the usage of the three LLM stream shapes: OpenAI Chat Completions (the last chunk
/// with a non-null `usage`), OpenAI Responses (`response.usage` of `response.completed`,
/// `response.incomplete` or `response.failed`: the last non-null one), Anthropic Messages
/// (`message_start`'s `message.usage`, then each `message_delta`'s `usage`: cumulative
/// figures, the latest of each kept, never summed).
pub(crate) struct SseScanner {
    /// The current line, up to `max` bytes.
    line: Vec<u8>,
    /// The current event's `data`, up to `max` bytes.
    data: Vec<u8>,
    /// The current line or event grew past `max`: drop it.
    overflow_line: bool,
    overflow_event: bool,
    max: usize,
    last_cr: bool,
    done: bool,
    /// The latest OpenAI-shaped usage (chat chunks, Responses events).
    usage: Option<Result<Tokens, UsageError>>,
    /// Anthropic's cumulative figures, once a `message_start` or `message_delta` carried any.
    anthropic: Option<Result<AnthropicFigures, UsageError>>,
    shape: Shape,
    /// Count content events as they pass (for the dry-stream cut): one token each at least.
    counting: bool,
    counted: u64,
    skipped_events: u64,
    meters: TokenMeters,
}

impl SseScanner {
    pub(crate) fn new(max: usize, meters: TokenMeters) -> Self {
        SseScanner {
            line: Vec::new(),
            data: Vec::new(),
            overflow_line: false,
            overflow_event: false,
            max,
            last_cr: false,
            done: false,
            usage: None,
            anthropic: None,
            shape: Shape::default(),
            counting: false,
            counted: 0,
            skipped_events: 0,
            meters,
        }
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.overflow_line || self.line.len() + bytes.len() > self.max {
            self.overflow_line = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self) {
        if std::mem::take(&mut self.overflow_line) {
            self.line.clear();
            self.overflow_event = true;
            return;
        }
        if self.line.is_empty() {
            self.dispatch();
            return;
        }
        // The line buffer is reused from line to line: no allocation per line.
        let line = std::mem::take(&mut self.line);
        self.data_line(&line);
        self.line = line;
        self.line.clear();
    }

    fn data_line(&mut self, line: &[u8]) {
        if self.overflow_event {
            // Already too long: the rest of the event is dropped, separators included.
            return;
        }
        if let Some(value) = line.strip_prefix(b"data") {
            let value = match value {
                [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
                [] => &[][..],
                _ => return, // a field named e.g. `datax`
            };
            if !self.data.is_empty() {
                self.data.push(b'\n');
            }
            if self.data.len() + value.len() > self.max {
                self.overflow_event = true;
            } else {
                self.data.extend_from_slice(value);
            }
        }
        // Comments (`:`) and other fields (`event`, `id`, `retry`) carry no usage.
    }

    fn dispatch(&mut self) {
        let overflow = std::mem::take(&mut self.overflow_event);
        let data = std::mem::take(&mut self.data);
        self.handle_event(&data, overflow);
        // Keep the buffer's capacity for the next event.
        self.data = data;
        self.data.clear();
    }

    fn handle_event(&mut self, data: &[u8], overflow: bool) {
        if overflow {
            self.skipped_events += 1;
            return;
        }
        if data.is_empty() {
            return;
        }
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        // Most events are content deltas: unless they are counted, only parse the ones that
        // can carry usage.
        if !self.counting && !data.windows(USAGE_KEY.len()).any(|w| w == USAGE_KEY) {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            self.skipped_events += 1;
            return;
        };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        if let Some(shape) = Shape::of(kind) {
            self.shape = shape;
        }
        if self.counting {
            self.counted = self.counted.saturating_add(content_events(&event, kind));
        }
        let non_null = |v: Option<&Value>| v.filter(|u| !u.is_null()).cloned();
        match kind {
            "message_start" | "message_delta" => {
                let usage = if kind == "message_start" {
                    event.get("message").and_then(|m| m.get("usage"))
                } else {
                    event.get("usage")
                };
                if let Some(usage) = non_null(usage) {
                    let figures = self
                        .anthropic
                        .get_or_insert(Ok(AnthropicFigures::default()));
                    // A broken figure stays broken: later events cannot mend a cumulative
                    // count.
                    if let Ok(f) = figures {
                        if let Err(e) = f.merge(&usage) {
                            *figures = Err(e);
                        }
                    }
                }
            }
            k if k.starts_with("response.") => {
                if let Some(usage) = non_null(event.get("response").and_then(|r| r.get("usage"))) {
                    self.usage = Some(parse_tokens(&usage));
                }
            }
            _ => {
                if let Some(usage) = non_null(event.get("usage")) {
                    self.usage = Some(parse_tokens(&usage));
                }
            }
        }
    }

    /// The figures so far: Anthropic's once seen, else the latest OpenAI-shaped one.
    fn tokens(&self) -> Option<Result<Tokens, UsageError>> {
        match &self.anthropic {
            Some(Ok(f)) => Some(f.tokens()),
            Some(Err(e)) => Some(Err(e.clone())),
            None => self.usage.clone(),
        }
    }
}

/// Content events in one event: each carries at least one output token.
fn content_events(event: &Value, kind: &str) -> u64 {
    match Shape::of(kind) {
        Some(Shape::Anthropic) => u64::from(kind == "content_block_delta"),
        Some(Shape::OpenAiResponses) => u64::from(kind.ends_with(".delta")),
        _ => {
            let Some(choices) = event.get("choices").and_then(Value::as_array) else {
                return 0;
            };
            let filled = |v: Option<&Value>| match v {
                Some(Value::String(s)) => !s.is_empty(),
                Some(Value::Array(a)) => !a.is_empty(),
                _ => false,
            };
            choices
                .iter()
                .filter(|c| {
                    let delta = c.get("delta");
                    filled(c.get("text"))
                        || delta.is_some_and(|d| {
                            filled(d.get("content"))
                                || filled(d.get("reasoning_content"))
                                || filled(d.get("reasoning"))
                                || filled(d.get("tool_calls"))
                        })
                })
                .count() as u64
        }
    }
}

impl UsageScanner for SseScanner {
    fn data(&mut self, mut chunk: &[u8]) {
        // Whole runs between line breaks are copied at once; only the breaks are looked at.
        while !chunk.is_empty() {
            if self.last_cr {
                self.last_cr = false;
                if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                    continue;
                }
            }
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    self.push_line(&chunk[..i]);
                    self.last_cr = chunk[i] == b'\r';
                    self.end_line();
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.push_line(chunk);
                    break;
                }
            }
        }
    }

    fn finish(&mut self) -> Result<Vec<Usage>, UsageError> {
        if !self.line.is_empty() {
            self.end_line();
        }
        self.dispatch();
        if self.skipped_events > 0 {
            tracing::debug!(
                target: "tower_402::metering",
                skipped = self.skipped_events,
                "server-sent events skipped (oversized or not JSON)"
            );
        }
        match self.tokens() {
            Some(Ok(t)) => Ok(t.usage(&self.meters)),
            Some(Err(e)) => Err(e),
            None => Err(UsageError::Missing),
        }
    }

    fn so_far(&mut self) -> Option<Vec<Usage>> {
        self.tokens()
            .and_then(Result::ok)
            .map(|t| t.usage(&self.meters))
    }

    fn count_delivered(&mut self) -> bool {
        self.counting = true;
        true
    }

    fn delivered(&mut self) -> Option<Vec<Usage>> {
        let known = self.tokens().and_then(Result::ok);
        let counted = self.counted;
        match known {
            Some(mut t) => {
                // A count of content events beyond the figures so far (a `message_start`
                // says 1 output token): the count is the better lower bound.
                let output = t.output.saturating_add(t.reasoning);
                if counted > output {
                    t.output = counted - t.reasoning;
                }
                Some(t.usage(&self.meters))
            }
            None if counted > 0 => Some(vec![Usage {
                meter: self.meters.output.clone(),
                units: counted,
            }]),
            None => None,
        }
    }

    fn end_event(&self, code: &str, message: &str) -> Option<bytes::Bytes> {
        Some(self.shape.error_event(code, message).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Meter;

    fn meters() -> TokenMeters {
        TokenMeters {
            input: Meter::new("in"),
            output: Meter::new("out"),
            ..TokenMeters::default()
        }
    }

    fn scanner() -> SseScanner {
        SseScanner::new(1024, meters())
    }

    const STREAM: &str =
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n\
        : keep-alive\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn usage_from_the_final_chunk_whatever_the_chunking() {
        let bytes = STREAM.as_bytes();
        for size in 1..40 {
            let mut s = scanner();
            for chunk in bytes.chunks(size) {
                s.data(chunk);
            }
            let u = s.finish().unwrap();
            assert_eq!((u[0].units, u[1].units), (9, 2), "chunks of {size}");
            assert!(s.done);
        }
    }

    #[test]
    fn crlf_line_endings() {
        let mut s = scanner();
        s.data(STREAM.replace('\n', "\r\n").as_bytes());
        assert_eq!(s.finish().unwrap()[0].units, 9);
    }

    #[test]
    fn a_stream_without_usage_is_missing() {
        let mut s = scanner();
        s.data(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(s.finish(), Err(UsageError::Missing));
    }

    #[test]
    fn oversized_events_are_skipped_and_memory_stays_bounded() {
        let mut s = SseScanner::new(64, meters());
        s.data(b"data: ");
        for _ in 0..10_000 {
            s.data(&[b'x'; 100]);
        }
        s.data(b"\n\n");
        assert!(s.line.capacity() <= 128 && s.data.capacity() <= 128);
        s.data(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n");
        assert_eq!(s.finish().unwrap()[1].units, 1);
        assert_eq!(s.skipped_events, 1);
    }

    #[test]
    fn bad_figures_in_a_stream() {
        let mut s = scanner();
        s.data(b"data: {\"usage\":{\"prompt_tokens\":-4,\"completion_tokens\":2}}\n\n");
        assert!(matches!(s.finish(), Err(UsageError::Invalid(_))));
    }

    #[test]
    fn an_event_of_endless_data_lines_stays_bounded() {
        let mut s = SseScanner::new(64, meters());
        for _ in 0..100_000 {
            s.data(b"data: x\n");
        }
        assert!(s.data.capacity() <= 128, "{}", s.data.capacity());
        s.data(b"\ndata: {\"usage\":{\"prompt_tokens\":1}}\n\n");
        assert_eq!(s.finish().unwrap()[0].units, 1);
    }

    /// An Anthropic Messages stream as the API sends it: `event:` lines, cumulative usage in
    /// `message_start` and `message_delta`.
    const ANTHROPIC: &str = "event: message_start\n\
        data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"m\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n\
        event: content_block_start\n\
        data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
        event: ping\ndata: {\"type\": \"ping\"}\n\n\
        event: content_block_delta\n\
        data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
        event: content_block_delta\n\
        data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" \\\"usage\\\": 9\"}}\n\n\
        event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
        event: message_delta\n\
        data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n\
        event: message_delta\n\
        data: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n\
        event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn units(usage: &[Usage], meter: &str) -> Option<u64> {
        usage
            .iter()
            .find(|u| u.meter.as_str() == meter)
            .map(|u| u.units)
    }

    #[test]
    fn anthropic_usage_is_cumulative_whatever_the_chunking() {
        let bytes = ANTHROPIC.as_bytes();
        for size in [1, 2, 3, 7, 13, 64, 1000] {
            let mut s = scanner();
            for chunk in bytes.chunks(size) {
                s.data(chunk);
            }
            let u = s.finish().unwrap();
            // The latest output figure (15), not the sum of 1 + 7 + 15.
            assert_eq!(units(&u, "in"), Some(25), "chunks of {size}");
            assert_eq!(units(&u, "out"), Some(15), "chunks of {size}");
            assert_eq!(units(&u, "cached_input_tokens"), Some(100));
            assert_eq!(units(&u, "cache_write_tokens"), None);
            assert_eq!(s.shape, Shape::Anthropic);
        }
    }

    #[test]
    fn anthropic_without_message_start_usage_is_missing() {
        let mut s = scanner();
        s.data(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n");
        assert_eq!(s.finish(), Err(UsageError::Missing));
        let mut s = scanner();
        s.data(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert_eq!(s.finish(), Err(UsageError::Missing));
        // A broken cumulative figure is not mended by a later one.
        let mut s = scanner();
        s.data(
            ANTHROPIC
                .replace("\"output_tokens\":7", "\"output_tokens\":-7")
                .as_bytes(),
        );
        assert!(matches!(s.finish(), Err(UsageError::Invalid(_))));
    }

    /// An OpenAI Responses stream: typed events, usage in `response.completed`.
    fn responses(terminal: &str, usage: &str) -> String {
        format!(
            "event: response.created\n\
            data: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}}}\n\n\
            event: response.output_text.delta\n\
            data: {{\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}}\n\n\
            event: response.output_text.delta\n\
            data: {{\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"delta\":\" there\"}}\n\n\
            event: {terminal}\n\
            data: {{\"type\":\"{terminal}\",\"sequence_number\":3,\"response\":{{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{usage}}}}}\n\n"
        )
    }

    #[test]
    fn responses_usage_from_the_terminal_event_whatever_the_chunking() {
        let usage = r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":16},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":80},"total_tokens":123}"#;
        for terminal in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            let text = responses(terminal, usage);
            for size in [1, 5, 17, 4096] {
                let mut s = scanner();
                for chunk in text.as_bytes().chunks(size) {
                    s.data(chunk);
                }
                let u = s.finish().unwrap();
                assert_eq!(units(&u, "in"), Some(20), "{terminal} chunks of {size}");
                assert_eq!(units(&u, "cached_input_tokens"), Some(16));
                assert_eq!(units(&u, "out"), Some(7));
                assert_eq!(units(&u, "reasoning_tokens"), Some(80));
                assert_eq!(s.shape, Shape::OpenAiResponses);
            }
        }
        // Only `response.created`'s null usage: missing.
        let mut s = scanner();
        s.data(responses("response.completed", "null").as_bytes());
        assert_eq!(s.finish(), Err(UsageError::Missing));
    }

    #[test]
    fn counting_content_events_gives_a_lower_bound_of_what_was_delivered() {
        let mut s = scanner();
        assert!(s.count_delivered());
        let (start, rest) =
            ANTHROPIC.split_at(ANTHROPIC.find("event: content_block_stop").unwrap());
        s.data(start.as_bytes());
        // message_start said 1 output token; two deltas went out.
        let d = s.delivered().unwrap();
        assert_eq!((units(&d, "in"), units(&d, "out")), (Some(25), Some(2)));
        s.data(rest.as_bytes());
        assert_eq!(units(&s.delivered().unwrap(), "out"), Some(15));
        let mut s = scanner();
        s.count_delivered();
        s.data(
            STREAM
                .split("data: {\"choices\":[],")
                .next()
                .unwrap()
                .as_bytes(),
        );
        // No usage yet: the output counted, input left to the estimate.
        assert_eq!(s.delivered().unwrap(), vec![Usage::new("out", 2)]);
        assert!(s
            .end_event("INSUFFICIENT_CREDITS", "x")
            .unwrap()
            .starts_with(b"data: {\"error\""));
    }
}
