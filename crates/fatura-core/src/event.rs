//! Usage events: one metered unit of LLM use, valid by construction.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use crate::ids::{CustomerId, EventId};

/// Largest token (or request) count accepted in one event: 10^12. Larger values are
/// certainly errors and could overflow cost arithmetic.
pub const MAX_COUNT: u64 = 1_000_000_000_000;
/// Most tags per event.
pub const MAX_TAGS: usize = 32;
/// Longest tag key.
pub const MAX_TAG_KEY: usize = 64;
/// Longest tag value.
pub const MAX_TAG_VALUE: usize = 256;
/// Longest provider or model name.
pub const MAX_NAME: usize = 256;

/// Why an event (or one of its fields) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EventError {
    /// The offending field (`input_tokens`, `tags.agent`, …).
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl EventError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        EventError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Token and request counts of one event. Totals include their parts:
/// `cached_input + cache_write ≤ input` and `reasoning ≤ output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TokenUsage {
    input: u64,
    output: u64,
    cached_input: u64,
    cache_write: u64,
    reasoning: u64,
    requests: u64,
}

impl TokenUsage {
    /// Validates counts: each at most [`MAX_COUNT`], parts not exceeding totals.
    pub fn new(
        input: u64,
        output: u64,
        cached_input: u64,
        cache_write: u64,
        reasoning: u64,
        requests: u64,
    ) -> Result<Self, EventError> {
        for (field, v) in [
            ("input_tokens", input),
            ("output_tokens", output),
            ("cached_input_tokens", cached_input),
            ("cache_write_tokens", cache_write),
            ("reasoning_tokens", reasoning),
            ("requests", requests),
        ] {
            if v > MAX_COUNT {
                return Err(EventError::new(
                    field,
                    format!("must be at most {MAX_COUNT}"),
                ));
            }
        }
        if cached_input + cache_write > input {
            return Err(EventError::new(
                "cached_input_tokens",
                format!(
                    "cached_input_tokens ({cached_input}) + cache_write_tokens ({cache_write}) exceed input_tokens ({input}); input_tokens includes both"
                ),
            ));
        }
        if reasoning > output {
            return Err(EventError::new(
                "reasoning_tokens",
                format!(
                    "reasoning_tokens ({reasoning}) exceed output_tokens ({output}); output_tokens includes them"
                ),
            ));
        }
        Ok(TokenUsage {
            input,
            output,
            cached_input,
            cache_write,
            reasoning,
            requests,
        })
    }

    /// All input tokens (including cached and cache-write).
    pub fn input(&self) -> u64 {
        self.input
    }
    /// All output tokens (including reasoning).
    pub fn output(&self) -> u64 {
        self.output
    }
    /// Cached prompt tokens read.
    pub fn cached_input(&self) -> u64 {
        self.cached_input
    }
    /// Prompt tokens written to the cache.
    pub fn cache_write(&self) -> u64 {
        self.cache_write
    }
    /// Reasoning tokens.
    pub fn reasoning(&self) -> u64 {
        self.reasoning
    }
    /// Requests.
    pub fn requests(&self) -> u64 {
        self.requests
    }
    /// Input tokens billed at the plain prompt price.
    pub fn uncached_input(&self) -> u64 {
        self.input - self.cached_input - self.cache_write
    }
    /// Output tokens billed at the plain completion price.
    pub fn non_reasoning_output(&self) -> u64 {
        self.output - self.reasoning
    }
}

/// A validated usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// Idempotency key, unique for all time.
    pub id: EventId,
    /// Who used it.
    pub customer_id: CustomerId,
    /// When it happened, in UTC, truncated to microseconds (the ledger's resolution).
    pub timestamp: DateTime<Utc>,
    /// Upstream provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Counts.
    pub usage: TokenUsage,
    /// Analytics tags (agent, project, user, …), sorted by key.
    pub tags: BTreeMap<String, String>,
    /// The upstream's own reported cost in USD, kept beside the catalog cost.
    pub upstream_cost: Option<Decimal>,
    /// The gateway upstream that served the call (`None` for ingested events).
    pub upstream: Option<String>,
    /// True when the token counts were estimated with a tokenizer because the upstream
    /// reported no usage (client disconnected mid-stream, upstream ended early).
    pub estimated: bool,
    /// For prepaid customers: the price charged to the wallet for this call, in the
    /// wallet's currency, written with the event in the same transaction.
    pub prepaid_charge: Option<Decimal>,
    /// The budget share this call was reserved from, released when the event is written
    /// (bookkeeping of a fleet of gateways; not part of the event's content).
    pub budget_hold: Option<BudgetHold>,
}

/// Which instance's budget share a gateway call was reserved from, and how much of it the
/// call used (its price): written with the event, the share shrinks by `amount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetHold {
    /// The gateway instance holding the share.
    pub instance: String,
    /// The call's price, moved from the share into the ledger.
    pub amount: Decimal,
}

/// Checks a provider or model name.
pub fn check_name(field: &str, value: &str) -> Result<(), EventError> {
    if value.is_empty() {
        return Err(EventError::new(field, "must not be empty"));
    }
    if value.chars().count() > MAX_NAME {
        return Err(EventError::new(
            field,
            format!("must be at most {MAX_NAME} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(EventError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks one tag.
pub fn check_tag(key: &str, value: &str) -> Result<(), EventError> {
    let field = format!("tags.{key}");
    if key.is_empty()
        || key.len() > MAX_TAG_KEY
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(EventError::new(
            field,
            format!("tag names are 1 to {MAX_TAG_KEY} characters of [A-Za-z0-9_.-]"),
        ));
    }
    if value.chars().count() > MAX_TAG_VALUE || value.chars().any(char::is_control) {
        return Err(EventError::new(
            field,
            format!(
                "tag values are at most {MAX_TAG_VALUE} characters, without control characters"
            ),
        ));
    }
    Ok(())
}

impl UsageEvent {
    /// Validates names, tags and the upstream cost and normalises the timestamp.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: EventId,
        customer_id: CustomerId,
        timestamp: DateTime<Utc>,
        provider: String,
        model: String,
        usage: TokenUsage,
        tags: BTreeMap<String, String>,
        upstream_cost: Option<Decimal>,
    ) -> Result<Self, EventError> {
        check_name("provider", &provider)?;
        check_name("model", &model)?;
        if tags.len() > MAX_TAGS {
            return Err(EventError::new("tags", format!("at most {MAX_TAGS} tags")));
        }
        for (k, v) in &tags {
            check_tag(k, v)?;
        }
        if let Some(c) = upstream_cost
            && c.is_sign_negative()
            && !c.is_zero()
        {
            return Err(EventError::new("upstream_cost", "must not be negative"));
        }
        Ok(UsageEvent {
            id,
            customer_id,
            timestamp: timestamp.trunc_subsecs(6),
            provider,
            model,
            usage,
            tags,
            upstream_cost: upstream_cost.map(|c| c.normalize()),
            upstream: None,
            estimated: false,
            prepaid_charge: None,
            budget_hold: None,
        })
    }

    /// Marks the event as served by gateway upstream `upstream`, with `estimated` counts.
    pub fn served_by(mut self, upstream: &str, estimated: bool) -> Result<Self, EventError> {
        check_name("upstream", upstream)?;
        self.upstream = Some(upstream.to_string());
        self.estimated = estimated;
        Ok(self)
    }

    /// SHA-256 of the event's canonical content, hex encoded. Two submissions with the same
    /// id and the same hash are a harmless replay; the same id with another hash is a
    /// conflict. Every field is length-prefixed so no two different events share an encoding.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(self.id.as_str().as_bytes());
        field(self.customer_id.as_str().as_bytes());
        field(&self.timestamp.timestamp_micros().to_le_bytes());
        field(self.provider.as_bytes());
        field(self.model.as_bytes());
        let u = &self.usage;
        for n in [
            u.input,
            u.output,
            u.cached_input,
            u.cache_write,
            u.reasoning,
            u.requests,
        ] {
            field(&n.to_le_bytes());
        }
        field(&(self.tags.len() as u64).to_le_bytes());
        for (k, v) in &self.tags {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        match &self.upstream_cost {
            Some(c) => field(c.to_string().as_bytes()),
            None => field(b"\xff"),
        }
        match &self.upstream {
            Some(u) => field(u.as_bytes()),
            None => field(b"\xff"),
        }
        field(&[u8::from(self.estimated)]);
        match &self.prepaid_charge {
            Some(c) => field(c.normalize().to_string().as_bytes()),
            None => field(b"\xff"),
        }
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event(input: u64, tags: &[(&str, &str)]) -> UsageEvent {
        UsageEvent::new(
            EventId::parse("e1").unwrap_or_else(|_| unreachable!()),
            CustomerId::parse("c1").unwrap_or_else(|_| unreachable!()),
            Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
                .single()
                .unwrap_or_default(),
            "openai".into(),
            "gpt-4o".into(),
            TokenUsage::new(input, 5, 0, 0, 0, 1).unwrap_or_default(),
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            None,
        )
        .unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn parts_exceeding_totals_are_rejected() {
        assert_eq!(
            TokenUsage::new(10, 0, 8, 3, 0, 1).map_err(|e| e.field),
            Err("cached_input_tokens".to_string())
        );
        assert_eq!(
            TokenUsage::new(10, 4, 0, 0, 5, 1).map_err(|e| e.field),
            Err("reasoning_tokens".to_string())
        );
        assert!(TokenUsage::new(10, 5, 7, 3, 5, 1).is_ok());
        assert!(TokenUsage::new(MAX_COUNT + 1, 0, 0, 0, 0, 1).is_err());
    }

    #[test]
    fn content_hash_distinguishes_content_not_tag_order() {
        let a = event(10, &[("agent", "sdr"), ("user", "u1")]);
        let b = event(10, &[("user", "u1"), ("agent", "sdr")]);
        let c = event(11, &[("agent", "sdr"), ("user", "u1")]);
        let d = event(10, &[("agent", "sdru1")]);
        assert_eq!(a.content_hash(), b.content_hash());
        assert_ne!(a.content_hash(), c.content_hash());
        assert_ne!(a.content_hash(), d.content_hash());
    }

    #[test]
    fn bad_tags_and_names_are_rejected() {
        assert!(check_tag("agent name", "x").is_err());
        assert!(check_tag("agent", "a\nb").is_err());
        assert!(check_name("model", "").is_err());
    }
}
