//! The gateway's SSE reading: any bytes, fed in arbitrary chunks, split into events,
//! classified, and their usage extracted. Never panics.
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
    for e in &events {
        let _ = classify(e.data.as_deref());
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = parse_usage(&v);
    }
});
