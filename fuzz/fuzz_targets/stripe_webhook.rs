//! Stripe webhooks: any `Stripe-Signature` header and body. Never panics, and never
//! accepts a body not signed with the secret.
#![no_main]

use chrono::TimeZone;
use fatura_server::payments::verify_stripe_signature;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (header, body) = data.split_at(split);
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    let now = chrono::Utc.timestamp_opt(1_790_000_000, 0).single().unwrap_or_default();
    let verdict = verify_stripe_signature(Some(header), body, "whsec_fuzz_secret", now);
    // Forging an HMAC-SHA256 by chance is not a thing a fuzzer does.
    assert!(verdict.is_err(), "accepted a forged signature: {header:?}");
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = v.get("type").and_then(|t| t.as_str());
    }
});
