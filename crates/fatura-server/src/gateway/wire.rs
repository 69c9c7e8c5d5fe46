//! Reading OpenAI/OpenRouter responses: usage extraction and SSE framing. Pure functions
//! over bytes and JSON, so they can be unit- and fuzz-tested.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

/// Token usage reported by an upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    /// `prompt_tokens` (includes cached and cache-write tokens).
    pub prompt: u64,
    /// `completion_tokens` (includes reasoning tokens).
    pub completion: u64,
    /// `prompt_tokens_details.cached_tokens`.
    pub cached: u64,
    /// OpenRouter's `prompt_tokens_details.cache_write_tokens` (or top-level).
    pub cache_write: u64,
    /// `completion_tokens_details.reasoning_tokens`.
    pub reasoning: u64,
    /// OpenRouter's `usage.cost` in USD.
    pub cost: Option<Decimal>,
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Reads a `usage` object; `None` if absent or not an object.
pub fn parse_usage(usage: &Value) -> Option<ReportedUsage> {
    let u = usage.as_object()?;
    let prompt_details = &usage["prompt_tokens_details"];
    let cost = match u.get("cost") {
        Some(Value::Number(n)) => Decimal::from_str(&n.to_string())
            .or_else(|_| Decimal::from_scientific(&n.to_string()))
            .ok(),
        Some(Value::String(s)) => Decimal::from_str(s).ok(),
        _ => None,
    };
    let cache_write = prompt_details
        .get("cache_write_tokens")
        .or_else(|| u.get("cache_write_tokens"))
        .map_or(0, count);
    Some(ReportedUsage {
        prompt: count(&usage["prompt_tokens"]),
        completion: count(&usage["completion_tokens"]),
        cached: count(&prompt_details["cached_tokens"]),
        cache_write,
        reasoning: count(&usage["completion_tokens_details"]["reasoning_tokens"]),
        cost,
    })
}

/// One SSE event's `data:` payload, or a comment, as framed by [`SseSplitter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The raw bytes of the whole event, including its terminating blank line.
    pub raw: Vec<u8>,
    /// The joined `data:` lines, if any.
    pub data: Option<String>,
}

/// Splits a byte stream into SSE events (separated by a blank line), across chunk
/// boundaries. Bounded: an event larger than `max_event` bytes is passed through as raw
/// bytes without parsing.
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for an event's end (so that a large event arriving
    /// in many pieces is scanned once, not once per piece).
    scanned: usize,
}

/// Largest SSE event parsed for usage (bigger ones pass through unparsed).
pub const MAX_SSE_EVENT: usize = 4 * 1024 * 1024;

impl SseSplitter {
    /// Feeds bytes; returns the complete events found.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        // Start of the first unconsumed byte; the consumed prefix is removed once, at the end.
        let mut start = 0;
        loop {
            let from = self.scanned.max(start);
            let Some(end) = find_event_end(&self.buf, from) else {
                // A terminator may straddle this feed and the next: its first bytes (at
                // most 3) are searched again then.
                self.scanned = self.buf.len().saturating_sub(3).max(start);
                break;
            };
            let raw = self.buf[start..end].to_vec();
            let data = data_of(&raw);
            out.push(SseEvent { raw, data });
            start = end;
        }
        self.buf.drain(..start);
        self.scanned -= start;
        if self.buf.len() > MAX_SSE_EVENT {
            self.scanned = 0;
            out.push(SseEvent {
                raw: std::mem::take(&mut self.buf),
                data: None,
            });
        }
        out
    }

    /// Whatever is left at the end of the stream (an unterminated event).
    pub fn finish(&mut self) -> Option<SseEvent> {
        self.scanned = 0;
        if self.buf.is_empty() {
            return None;
        }
        let raw = std::mem::take(&mut self.buf);
        let data = data_of(&raw);
        Some(SseEvent { raw, data })
    }
}

/// The end (exclusive) of the first event terminator (`\n\n` or `\r\n\r\n`) that
/// starts at or after `from`.
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if buf[i] == b'\r' && i + 3 < buf.len() && &buf[i..i + 4] == b"\r\n\r\n" {
            return Some(i + 4);
        }
        i += 1;
    }
    None
}

fn data_of(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

/// What one SSE event of a chat-completions stream means for metering.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A comment or non-data event (e.g. `: OPENROUTER PROCESSING`).
    Other,
    /// `data: [DONE]`.
    Done,
    /// A mid-stream error event.
    Error,
    /// A chunk; `usage` when it carries usage, `usage_only` when it has no choices (the
    /// extra chunk `include_usage` adds), `model` as reported, `content` text delta.
    Chunk {
        /// Usage on this chunk.
        usage: Option<ReportedUsage>,
        /// No choices: only usage.
        usage_only: bool,
        /// Reported model.
        model: Option<String>,
        /// Content delta text.
        content: String,
    },
}

/// Classifies an SSE data payload.
pub fn classify(data: Option<&str>) -> StreamItem {
    let Some(data) = data else {
        return StreamItem::Other;
    };
    let data = data.trim();
    if data == "[DONE]" {
        return StreamItem::Done;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return StreamItem::Other;
    };
    if v.get("error").is_some() {
        return StreamItem::Error;
    }
    let choices = v["choices"].as_array();
    let content = choices
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["delta"]["content"].as_str())
                .collect::<String>()
        })
        .unwrap_or_default();
    StreamItem::Chunk {
        usage: v.get("usage").and_then(parse_usage),
        usage_only: choices.is_none_or(|c| c.is_empty()),
        model: v["model"].as_str().map(str::to_string),
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_openai_and_openrouter_usage() {
        let u = parse_usage(&json!({"prompt_tokens": 100, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 10},
            "completion_tokens_details": {"reasoning_tokens": 5}, "cost": 0.00012}))
        .unwrap_or_default();
        assert_eq!(
            (u.prompt, u.completion, u.cached, u.cache_write, u.reasoning),
            (100, 20, 40, 10, 5)
        );
        assert_eq!(u.cost.map(|c| c.to_string()), Some("0.00012".into()));
        assert_eq!(parse_usage(&json!(null)), None);
    }

    #[test]
    fn splits_sse_across_chunk_boundaries_and_keeps_comments() {
        let mut s = SseSplitter::default();
        let mut events = s.feed(b": OPENROUTER PROCESSING\n\ndata: {\"a\"");
        events.extend(s.feed(b":1}\n\ndata: [DONE]\n"));
        events.extend(s.feed(b"\n"));
        let data: Vec<Option<String>> = events.iter().map(|e| e.data.clone()).collect();
        assert_eq!(
            data,
            vec![None, Some("{\"a\":1}".into()), Some("[DONE]".into())]
        );
        let raw: Vec<u8> = events.iter().flat_map(|e| e.raw.clone()).collect();
        assert_eq!(
            raw,
            b": OPENROUTER PROCESSING\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n".to_vec()
        );
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn splitting_does_not_depend_on_how_the_bytes_arrive() {
        let body: &[u8] =
            b": OPENROUTER PROCESSING\r\n\r\ndata: {\"a\":1}\n\ndata: x\ndata: y\r\n\r\n\
            data: {\"b\":2}\n\n\ndata: [DONE]\n\ntrailing";
        let mut whole = SseSplitter::default();
        let mut at_once = whole.feed(body);
        at_once.extend(whole.finish());
        assert_eq!(at_once.len(), 6);
        assert_eq!(at_once[2].data.as_deref(), Some("x\ny"));
        for piece in 1..=7 {
            let mut s = SseSplitter::default();
            let mut events = Vec::new();
            for chunk in body.chunks(piece) {
                events.extend(s.feed(chunk));
            }
            events.extend(s.finish());
            assert_eq!(events, at_once, "pieces of {piece} bytes");
        }
        let passed: Vec<u8> = at_once.iter().flat_map(|e| e.raw.clone()).collect();
        assert_eq!(passed, body);
    }

    #[test]
    fn classifies_stream_items() {
        assert_eq!(classify(Some("[DONE]")), StreamItem::Done);
        assert_eq!(
            classify(Some("{\"error\": {\"message\": \"x\"}}")),
            StreamItem::Error
        );
        assert_eq!(classify(None), StreamItem::Other);
        match classify(Some(
            "{\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}",
        )) {
            StreamItem::Chunk {
                usage: Some(u),
                usage_only: true,
                model: Some(m),
                ..
            } => {
                assert_eq!((u.prompt, u.completion, m.as_str()), (3, 2, "m"));
            }
            other => unreachable!("{other:?}"),
        }
    }
}
