use serde_json::Value;

use crate::ledger::Usage;
use crate::metering::usage::{parse_usage, UsageError, UsageScanner};
use crate::plan::Meter;

const USAGE_KEY: &[u8] = b"\"usage\"";

/// Follows a `text/event-stream` body event by event, keeping at most one event in memory.
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
    usage: Option<Result<Vec<Usage>, UsageError>>,
    skipped_events: u64,
    input: Meter,
    output: Meter,
}

impl SseScanner {
    pub(crate) fn new(max: usize, input: Meter, output: Meter) -> Self {
        SseScanner {
            line: Vec::new(),
            data: Vec::new(),
            overflow_line: false,
            overflow_event: false,
            max,
            last_cr: false,
            done: false,
            usage: None,
            skipped_events: 0,
            input,
            output,
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
        // Most events are content deltas: only parse the ones that can carry usage.
        if !data.windows(USAGE_KEY.len()).any(|w| w == USAGE_KEY) {
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            self.skipped_events += 1;
            return;
        };
        if let Some(usage) = event.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(parse_usage(usage, &self.input, &self.output));
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
        self.usage.clone().unwrap_or(Err(UsageError::Missing))
    }

    fn so_far(&mut self) -> Option<Vec<Usage>> {
        self.usage.clone().and_then(Result::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner() -> SseScanner {
        SseScanner::new(1024, Meter::new("in"), Meter::new("out"))
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
        let mut s = SseScanner::new(64, Meter::new("in"), Meter::new("out"));
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
        let mut s = SseScanner::new(64, Meter::new("in"), Meter::new("out"));
        for _ in 0..100_000 {
            s.data(b"data: x\n");
        }
        assert!(s.data.capacity() <= 128, "{}", s.data.capacity());
        s.data(b"\ndata: {\"usage\":{\"prompt_tokens\":1}}\n\n");
        assert_eq!(s.finish().unwrap()[0].units, 1);
    }
}
