//! `POST /v1/events`: idempotent usage ingestion.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use chrono::{DateTime, Utc};
use fatura_core::event::EventError;
use fatura_core::{CustomerId, EventId, TokenUsage, UsageEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiError, ApiJson, ErrorBody, ErrorDetail};

/// Most events in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

/// One usage event (documentation of the wire format; parsing is field by field so that
/// every problem can be reported with its index and field).
#[allow(dead_code)]
#[derive(Debug, Deserialize, ToSchema)]
pub struct EventIn {
    /// Idempotency key, unique for all time, 1–128 characters of `[A-Za-z0-9-_.:/@]`.
    id: String,
    /// An existing customer.
    customer_id: String,
    /// RFC 3339 instant (stored at microsecond resolution).
    #[schema(value_type = String, format = DateTime)]
    timestamp: String,
    /// Model name as the provider reports it.
    model: String,
    /// Provider name as in the price catalog (`openrouter`, `openai`, …).
    provider: String,
    /// All input tokens, *including* cached and cache-write tokens. Default 0.
    input_tokens: Option<u64>,
    /// All output tokens, *including* reasoning tokens. Default 0.
    output_tokens: Option<u64>,
    /// Cached prompt tokens read. Default 0.
    cached_input_tokens: Option<u64>,
    /// Prompt tokens written to the cache. Default 0.
    cache_write_tokens: Option<u64>,
    /// Reasoning tokens. Default 0.
    reasoning_tokens: Option<u64>,
    /// Requests. Default 1.
    requests: Option<u64>,
    /// String tags (agent, project, user, …).
    tags: Option<BTreeMap<String, String>>,
    /// The upstream's reported cost in USD, as a decimal string; kept beside the catalog cost.
    upstream_cost: Option<String>,
}

/// A batch of events.
#[allow(dead_code)]
#[derive(Debug, Deserialize, ToSchema)]
pub struct EventBatchIn {
    /// Up to 10,000 events.
    events: Vec<EventIn>,
}

/// The ingestion answer, sent only after the events are committed.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestResponse {
    /// Events newly recorded.
    pub accepted: u64,
    /// Events already recorded with identical content (acknowledged, counted once).
    pub duplicates: u64,
    /// Of the accepted events, those with no catalog price (see `GET /v1/usage/unpriced`).
    pub unpriced: u64,
}

const FIELDS: [&str; 13] = [
    "id",
    "customer_id",
    "timestamp",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "requests",
    "tags",
    "upstream_cost",
];

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    errors: &mut Vec<EventError>,
) -> Option<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Some(s),
        None | Some(Value::Null) => {
            errors.push(EventError::new(key, "is required"));
            None
        }
        Some(_) => {
            errors.push(EventError::new(key, "must be a string"));
            None
        }
    }
}

fn count_field(
    obj: &Map<String, Value>,
    key: &str,
    default: u64,
    errors: &mut Vec<EventError>,
) -> u64 {
    match obj.get(key) {
        None | Some(Value::Null) => default,
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                v
            } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f < 0.0) {
                errors.push(EventError::new(key, "must not be negative"));
                0
            } else {
                errors.push(EventError::new(key, "must be an integer"));
                0
            }
        }
        Some(_) => {
            errors.push(EventError::new(key, "must be a non-negative integer"));
            0
        }
    }
}

/// Parses one event object, collecting every problem found.
pub fn parse_event(value: &Value) -> Result<UsageEvent, Vec<EventError>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![EventError::new("event", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    for key in obj.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errors.push(EventError::new(key.clone(), "unknown field"));
        }
    }
    let id = string_field(obj, "id", &mut errors).and_then(|s| {
        EventId::parse(s)
            .map_err(|e| errors.push(EventError::new("id", e.to_string())))
            .ok()
    });
    let customer_id = string_field(obj, "customer_id", &mut errors).and_then(|s| {
        CustomerId::parse(s)
            .map_err(|e| errors.push(EventError::new("customer_id", e.to_string())))
            .ok()
    });
    let timestamp = string_field(obj, "timestamp", &mut errors).and_then(|s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                errors.push(EventError::new(
                    "timestamp",
                    format!("must be an RFC 3339 instant: {e}"),
                ))
            })
            .ok()
    });
    let model = string_field(obj, "model", &mut errors).map(str::to_string);
    let provider = string_field(obj, "provider", &mut errors).map(str::to_string);
    let input = count_field(obj, "input_tokens", 0, &mut errors);
    let output = count_field(obj, "output_tokens", 0, &mut errors);
    let cached = count_field(obj, "cached_input_tokens", 0, &mut errors);
    let cache_write = count_field(obj, "cache_write_tokens", 0, &mut errors);
    let reasoning = count_field(obj, "reasoning_tokens", 0, &mut errors);
    let requests = count_field(obj, "requests", 1, &mut errors);
    let mut tags = BTreeMap::new();
    match obj.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                match v {
                    Value::String(s) => {
                        tags.insert(k.clone(), s.clone());
                    }
                    _ => errors.push(EventError::new(
                        format!("tags.{k}"),
                        "tag values must be strings",
                    )),
                }
            }
        }
        Some(_) => errors.push(EventError::new(
            "tags",
            "must be an object of string values",
        )),
    }
    let upstream_cost = match obj.get("upstream_cost") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match Decimal::from_str(s.trim()) {
            Ok(d) => Some(d),
            Err(_) => {
                errors.push(EventError::new(
                    "upstream_cost",
                    "must be a decimal string such as \"0.0125\"",
                ));
                None
            }
        },
        Some(_) => {
            errors.push(EventError::new(
                "upstream_cost",
                "must be a decimal string such as \"0.0125\" (not a number)",
            ));
            None
        }
    };
    let usage = TokenUsage::new(input, output, cached, cache_write, reasoning, requests)
        .map_err(|e| errors.push(e))
        .ok();
    match (id, customer_id, timestamp, model, provider, usage) {
        (
            Some(id),
            Some(customer_id),
            Some(timestamp),
            Some(model),
            Some(provider),
            Some(usage),
        ) if errors.is_empty() => UsageEvent::new(
            id,
            customer_id,
            timestamp,
            provider,
            model,
            usage,
            tags,
            upstream_cost,
        )
        .map_err(|e| vec![e]),
        _ => Err(errors),
    }
}

fn detail(index: usize, id: Option<String>, e: EventError) -> ErrorDetail {
    ErrorDetail {
        index: Some(index),
        id,
        field: e.field,
        message: e.message,
    }
}

/// Records usage events.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    request_body(content = EventBatchIn, description = "One event object, or `{\"events\": [...]}` with up to 10,000 events"),
    responses(
        (status = 200, description = "Committed", body = IngestResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or bad key", body = ErrorBody),
        (status = 403, description = "Not the admin key", body = ErrorBody),
        (status = 409, description = "An id was already recorded with different content", body = ErrorBody),
        (status = 413, description = "More than 10,000 events or body too large", body = ErrorBody),
        (status = 422, description = "Invalid events, with each bad index and why; nothing written", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn post_events(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<ApiJson<IngestResponse>, ApiError> {
    let body = body?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let items: Vec<Value> = match value {
        Value::Object(mut obj) if obj.contains_key("events") => {
            if obj.len() > 1 {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "a batch is {\"events\": [...]} with no other fields",
                ));
            }
            match obj.remove("events") {
                Some(Value::Array(items)) => items,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_body",
                        "\"events\" must be an array",
                    ));
                }
            }
        }
        single @ Value::Object(_) => vec![single],
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "body must be one event object or {\"events\": [...]}",
            ));
        }
    };
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::too_large(format!(
            "{} events in one request; the limit is {MAX_EVENTS_PER_REQUEST}",
            items.len()
        )));
    }
    if items.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_events",
            "the batch has no events",
            Vec::new(),
        ));
    }
    let total = items.len() as u64;
    let mut details = Vec::new();
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        match parse_event(item) {
            Ok(e) => events.push((index, e)),
            Err(errs) => {
                let id = item.get("id").and_then(Value::as_str).map(str::to_string);
                details.extend(errs.into_iter().map(|e| detail(index, id.clone(), e)));
            }
        }
    }
    let unknown = state.fatura.unknown_customers(&events).await?;
    for index in unknown {
        if let Some((_, e)) = events.iter().find(|(i, _)| *i == index) {
            details.push(detail(
                index,
                Some(e.id.to_string()),
                EventError::new(
                    "customer_id",
                    format!("unknown customer {:?}", e.customer_id.as_str()),
                ),
            ));
        }
    }
    if !details.is_empty() {
        details.sort_by_key(|d| d.index);
        state.metrics.events_rejected.inc_by(total);
        let bad: std::collections::BTreeSet<_> = details.iter().filter_map(|d| d.index).collect();
        return Err(ApiError::unprocessable(
            "invalid_events",
            format!(
                "{} of {total} events are invalid; nothing was recorded",
                bad.len()
            ),
            details,
        ));
    }
    let outcome = state
        .fatura
        .record_events(events, state.fatura.now())
        .await
        .map_err(|e| {
            state.metrics.events_rejected.inc_by(total);
            ApiError::from(e)
        })?;
    state.metrics.events_accepted.inc_by(outcome.accepted);
    state.metrics.events_duplicate.inc_by(outcome.duplicates);
    state.metrics.events_unpriced.inc_by(outcome.unpriced);
    Ok(ApiJson(IngestResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        unpriced: outcome.unpriced,
    }))
}
