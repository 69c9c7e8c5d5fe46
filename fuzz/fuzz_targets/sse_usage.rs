//! The gateway's SSE reading: any bytes, fed in arbitrary chunks, split into events,
//! classified, and their usage extracted. Never panics; the events' bytes are the input,
//! byte for byte, and how the input was cut does not change the events.
#![no_main]

use fatura_server::gateway::wire::{SseSplitter, classify, parse_usage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = data.split_at(data.len().min(4));
    let mut splitter = SseSplitter::default();
    let mut events = Vec::new();
    let mut rest = body;
    for c in cuts {
        let n = (*c as usize).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        events.extend(splitter.feed(chunk));
        rest = tail;
    }
    events.extend(splitter.feed(rest));
    events.extend(splitter.finish());
    let passed: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
    assert_eq!(passed, body, "the events' bytes are not the input");
    let mut whole = SseSplitter::default();
    let mut at_once = whole.feed(body);
    at_once.extend(whole.finish());
    assert_eq!(events, at_once, "the events depend on how the input was cut");
    for e in &events {
        let _ = classify(e.data.as_deref());
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = parse_usage(&v);
    }
});
