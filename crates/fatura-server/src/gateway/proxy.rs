//! The gateway's handlers: `POST /v1/chat/completions`, `POST /v1/embeddings`,
//! `GET /v1/models`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use fatura_core::event::check_tag;
use fatura_core::{CustomerId, EventId, TokenUsage, UsageEvent};
use futures_util::Stream;
use rand::RngCore;
use serde_json::{Map, Value, json};
use std::future::Future;

use super::Gateway;
use super::config::{UpstreamConfig, UpstreamKind};
use super::estimate::{count_chat_prompt, count_embedding_input, count_text};
use super::wire::{ReportedUsage, SseSplitter, StreamItem, classify, parse_usage};
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::metrics::{GatewayLabels, Metrics, TokenLabels};
use crate::service::Fatura;
use crate::wallet::{Reservation, WalletBook};
use rust_decimal::Decimal;

/// Header prefix of analytics tags; never forwarded upstream.
pub const TAG_HEADER_PREFIX: &str = "x-fatura-tag-";
/// Response header carrying the gateway's request id (the usage event id).
pub const REQUEST_ID_HEADER: &str = "x-fatura-request-id";
/// Most bytes kept per stream for token estimation (beyond it, estimates undercount).
const MAX_ESTIMATE_TEXT: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// Prompt tokens of a request to this endpoint, counted with the tokenizer.
    fn prompt_tokens(self, request: &Map<String, Value>) -> u64 {
        match self {
            Endpoint::Chat => count_chat_prompt(request),
            Endpoint::Embeddings => count_embedding_input(request),
        }
    }
}

/// What a budgeted call reserves against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// A prepaid customer's wallet (charged with the event).
    Wallet,
    /// A postpaid customer's monthly spend limit (USD).
    MonthlyLimit(Decimal),
}

/// A reservation that is released if the call ends without being settled.
#[derive(Debug)]
struct ReservationGuard {
    book: Arc<WalletBook>,
    reservation: Option<Reservation>,
    /// Prepaid: the settled price is charged to the wallet with the event.
    charge_wallet: bool,
}

impl ReservationGuard {
    async fn settle(mut self, actual: Decimal) {
        if let Some(r) = self.reservation.take() {
            self.book.settle(r, actual).await;
        }
    }

    fn amount(&self) -> Decimal {
        self.reservation
            .as_ref()
            .map_or(Decimal::ZERO, Reservation::amount)
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let book = self.book.clone();
            tokio::spawn(async move { book.release(r).await });
        }
    }
}

/// Everything needed to write the usage event of one call.
#[derive(Debug)]
struct CallContext {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    request_id: String,
    customer_id: String,
    timestamp: DateTime<Utc>,
    upstream: String,
    provider: String,
    requested_model: String,
    tags: BTreeMap<String, String>,
    /// The client's request (shared, never copied): prompt tokens are counted from it when
    /// the upstream reports no usage.
    request: Arc<Map<String, Value>>,
    endpoint: Endpoint,
    fatura: Arc<Fatura>,
    reservation: Option<ReservationGuard>,
}

impl CallContext {
    /// Builds and queues the usage event (settling a prepaid reservation to the call's
    /// price). Without reported usage, counts are estimated.
    async fn meter(
        mut self,
        usage: Option<ReportedUsage>,
        model: Option<String>,
        completion_text: String,
    ) {
        let estimated = usage.is_none();
        let usage = match usage {
            Some(u) => u,
            // Tokenizing can take milliseconds (a long prompt, a long stream): off the
            // async workers.
            None => {
                let (request, endpoint) = (self.request.clone(), self.endpoint);
                tokio::task::spawn_blocking(move || ReportedUsage {
                    prompt: endpoint.prompt_tokens(&request),
                    completion: count_text(&completion_text),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(request_id = %self.request_id, error = %e, "token estimation failed");
                    ReportedUsage::default()
                })
            }
        };
        let Some(mut event) = self.event(usage, estimated, model) else {
            return;
        };
        if let Some(guard) = self.reservation.take() {
            let actual = self
                .price_of(&event)
                .await
                .unwrap_or_else(|| guard.amount());
            if guard.charge_wallet {
                event.prepaid_charge = Some(actual);
            }
            event.budget_hold = guard.book.hold_of(actual);
            guard.settle(actual).await;
        }
        self.gateway.meter.record(event).await;
    }

    fn meter_detached(
        self,
        usage: Option<ReportedUsage>,
        model: Option<String>,
        completion_text: String,
    ) {
        tokio::spawn(self.meter(usage, model, completion_text));
    }

    /// The customer's price of the call: at the reported model's price, else at the
    /// requested model's.
    async fn price_of(&self, event: &UsageEvent) -> Option<Decimal> {
        for model in [&event.model, &self.requested_model] {
            if let Ok(Some(p)) = self
                .fatura
                .quote(
                    &self.customer_id,
                    &event.provider,
                    model,
                    event.timestamp,
                    &event.usage,
                )
                .await
            {
                return Some(p.revenue);
            }
        }
        None
    }

    fn event(
        &self,
        u: ReportedUsage,
        estimated: bool,
        model: Option<String>,
    ) -> Option<UsageEvent> {
        // Upstreams are outside input: clamp parts to totals rather than lose the call.
        let cached = u.cached.min(u.prompt);
        let cache_write = u.cache_write.min(u.prompt - cached);
        let reasoning = u.reasoning.min(u.completion);
        let built = (|| -> Result<UsageEvent, String> {
            let usage = TokenUsage::new(u.prompt, u.completion, cached, cache_write, reasoning, 1)
                .map_err(|e| e.to_string())?;
            let model = model
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| self.requested_model.clone());
            UsageEvent::new(
                EventId::parse(&self.request_id).map_err(|e| e.to_string())?,
                CustomerId::parse(&self.customer_id).map_err(|e| e.to_string())?,
                self.timestamp,
                self.provider.clone(),
                model,
                usage,
                self.tags.clone(),
                u.cost.filter(|c| !c.is_sign_negative()),
            )
            .and_then(|e| e.served_by(&self.upstream, estimated))
            .map_err(|e| e.to_string())
        })();
        match built {
            Ok(e) => {
                let m = &self.metrics;
                m.gateway_tokens
                    .get_or_create(&TokenLabels {
                        kind: "input".into(),
                    })
                    .inc_by(u.prompt);
                m.gateway_tokens
                    .get_or_create(&TokenLabels {
                        kind: "output".into(),
                    })
                    .inc_by(u.completion);
                if let Some(c) = u.cost.and_then(|c| c.to_string().parse::<f64>().ok()) {
                    m.gateway_cost_usd.inc_by(c);
                }
                Some(e)
            }
            Err(err) => {
                tracing::error!(request_id = %self.request_id, error = %err, "cannot build the usage event");
                None
            }
        }
    }
}

/// A gateway request id (the usage event's id): `gw_`, the time in microseconds (14 hex
/// digits) and 64 random bits. Ids made later sort later, so the ledger's id indexes grow
/// at their end — a commit dirties a few pages, not one per event as random ids would.
fn request_id_at(at: DateTime<Utc>) -> String {
    let micros = u64::try_from(at.timestamp_micros()).unwrap_or(0);
    format!("gw_{micros:014x}{}", random_hex(8))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn tags_from(
    headers: &HeaderMap,
    request: &Map<String, Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut tags = BTreeMap::new();
    for (name, value) in headers {
        if let Some(tag) = name.as_str().strip_prefix(TAG_HEADER_PREFIX) {
            let value = value.to_str().map_err(|_| {
                ApiError::bad_request("invalid_tag", format!("tag header {name} is not text"))
            })?;
            tags.insert(tag.to_string(), value.to_string());
        }
    }
    if let Some(user) = request.get("user").and_then(Value::as_str) {
        tags.insert("user".to_string(), user.to_string());
    }
    for (k, v) in &tags {
        check_tag(k, v).map_err(|e| ApiError::bad_request("invalid_tag", e.to_string()))?;
    }
    Ok(tags)
}

fn outcome(metrics: &Metrics, upstream: &str, outcome: &str) {
    metrics
        .gateway_requests
        .get_or_create(&GatewayLabels {
            upstream: upstream.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

fn upstream_body(
    request: &Map<String, Value>,
    upstream: &UpstreamConfig,
    stream: bool,
    inject_usage: bool,
) -> Result<Bytes, ApiError> {
    let mut body = request.clone();
    if inject_usage {
        let opts = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Some(o) = opts.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    if stream && upstream.kind == UpstreamKind::Openrouter && !body.contains_key("usage") {
        // OpenRouter's usage accounting: reports `cost` in the final usage chunk.
        body.insert("usage".into(), json!({"include": true}));
    }
    if upstream.strip_model_prefix
        && let Some(Value::String(m)) = body.get_mut("model")
        && let Some((_, rest)) = m.split_once('/')
    {
        *m = rest.to_string();
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| ApiError::internal(&e))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match proxy(state, caller, headers, body, Endpoint::Chat).await {
        Ok(r) | Err(r) => r,
    }
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match proxy(state, caller, headers, body, Endpoint::Embeddings).await {
        Ok(r) | Err(r) => r,
    }
}

fn passthrough(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    request_id: &str,
    body: Body,
) -> Response {
    let mut builder = Response::builder().status(status);
    if let Some(ct) = content_type {
        builder = builder.header(header::CONTENT_TYPE, ct);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        builder = builder.header(REQUEST_ID_HEADER, v);
    }
    builder
        .body(body)
        .unwrap_or_else(|e| ApiError::internal(&e).into_response())
}

async fn proxy(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, Response> {
    let started = Instant::now();
    let gateway = state.gateway.clone().ok_or_else(|| {
        ApiError::not_found("the gateway is not configured on this server").into_response()
    })?;
    let (customer_id, key_id, budget) = match caller {
        Caller::Customer {
            suspended: Some(reason),
            ..
        } => {
            outcome(&state.metrics, "none", "suspended");
            return Err(ApiError::insufficient_credits(format!(
                "the account is suspended: {reason}; calls resume once it is paid"
            ))
            .with_code("account_suspended")
            .into_response());
        }
        Caller::Customer {
            customer_id,
            key_id,
            prepaid,
            spend_limit,
            ..
        } => (
            customer_id,
            key_id,
            match (prepaid, spend_limit) {
                (true, _) => Some(Budget::Wallet),
                (false, Some(limit)) => Some(Budget::MonthlyLimit(limit)),
                (false, None) => None,
            },
        ),
        Caller::Admin => {
            return Err(ApiError::forbidden(
                "the gateway is called with a customer API key, not the admin key",
            )
            .into_response());
        }
    };
    // Load shedding: held until the answer (or the stream) ends.
    let Ok(permit) = gateway.slots.clone().try_acquire_owned() else {
        outcome(&state.metrics, "none", "overloaded");
        return Err(ApiError::overloaded(
            "the gateway is at its limit of calls in flight; retry shortly",
        ));
    };
    let body = body.map_err(|e| ApiError::from(e).into_response())?;
    let request: Arc<Map<String, Value>> =
        serde_json::from_slice(&body).map(Arc::new).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("request body must be a JSON object: {e}"),
            )
            .into_response()
        })?;
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("missing_model", "\"model\" is required").into_response()
        })?
        .to_string();
    let limits = &gateway.config;
    // Prompt tokens and output cap, counted once if a token limit or a budget needs them.
    let tokens = if limits.tokens_per_minute > 0 || budget.is_some() {
        Some(
            call_tokens(
                &request,
                endpoint,
                limits.default_max_output_tokens,
                body.len(),
            )
            .await
            .map_err(IntoResponse::into_response)?,
        )
    } else {
        None
    };
    if limits.requests_per_minute > 0 || limits.tokens_per_minute > 0 {
        let tokens = match tokens {
            Some((prompt, output)) if limits.tokens_per_minute > 0 => prompt.saturating_add(output),
            _ => 0,
        };
        if let Err(retry) = gateway
            .admit(
                &state.fatura,
                &key_id,
                tokens,
                state.fatura.now().timestamp(),
            )
            .await
        {
            outcome(&state.metrics, "none", "rate_limited");
            return Err(ApiError::rate_limited(
                format!(
                    "rate limit reached for this key ({} requests, {} tokens per minute; 0 = none); retry in {retry} s",
                    limits.requests_per_minute, limits.tokens_per_minute
                ),
                retry,
            ));
        }
    }
    let stream =
        endpoint == Endpoint::Chat && request.get("stream").and_then(Value::as_bool) == Some(true);
    let client_wants_usage = request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let inject_usage = stream && !client_wants_usage;
    let tags = tags_from(&headers, &request).map_err(IntoResponse::into_response)?;
    let chain: Vec<UpstreamConfig> = gateway
        .config
        .chain_for(&model)
        .ok_or_else(|| {
            ApiError::not_found(format!("no route for model {model:?}"))
                .with_code("model_not_found")
                .into_response()
        })?
        .into_iter()
        .cloned()
        .collect();
    let timestamp = state.fatura.now();
    let request_id = request_id_at(timestamp);
    let metrics = state.metrics.clone();
    let mut reservation = match (budget, tokens) {
        (Some(budget), Some(tokens)) => Some(
            reserve(
                &state,
                &customer_id,
                budget,
                tokens,
                &model,
                &chain,
                timestamp,
            )
            .await?,
        ),
        _ => None,
    };

    let mut last_failure: Option<Response> = None;
    // Time spent waiting on upstreams (to their headers, and for a JSON body); the rest of
    // the handler's time is the overhead the gateway adds.
    let mut upstream_wait = Duration::ZERO;
    for (i, upstream) in chain.iter().enumerate() {
        let is_last = i + 1 == chain.len();
        let bytes = upstream_body(&request, upstream, stream, inject_usage)
            .map_err(IntoResponse::into_response)?;
        let url = format!(
            "{}{}",
            upstream.base_url.trim_end_matches('/'),
            endpoint.path()
        );
        let mut req = gateway
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some(key) = gateway.keys.get(&upstream.name) {
            req = req.bearer_auth(key);
        }
        let sent = Instant::now();
        let result = tokio::time::timeout(gateway.config.first_byte_timeout(), req.send()).await;
        let waited = sent.elapsed();
        metrics.upstream_latency.observe(waited.as_secs_f64());
        upstream_wait += waited;
        let response = match result {
            Err(_) => {
                tracing::warn!(upstream = %upstream.name, "upstream timed out before the first byte");
                outcome(&metrics, &upstream.name, "timeout");
                last_failure = Some(
                    ApiError::gateway_timeout(format!("upstream {} timed out", upstream.name))
                        .into_response(),
                );
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %upstream.name, error = %e, "upstream connection failed");
                outcome(&metrics, &upstream.name, "connection_error");
                last_failure = Some(
                    ApiError::bad_gateway(format!("upstream {} is unreachable", upstream.name))
                        .into_response(),
                );
                continue;
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if (status.as_u16() == 429 || status.is_server_error()) && !is_last {
            outcome(&metrics, &upstream.name, "fallback");
            continue;
        }
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        if !status.is_success() {
            // Passed through as the upstream sent it; no usage to meter.
            outcome(&metrics, &upstream.name, "upstream_error");
            let bytes = response.bytes().await.unwrap_or_default();
            return Ok(passthrough(
                status,
                content_type,
                &request_id,
                Body::from(bytes),
            ));
        }
        let ctx = CallContext {
            gateway: gateway.clone(),
            metrics: metrics.clone(),
            request_id: request_id.clone(),
            customer_id: customer_id.clone(),
            timestamp,
            upstream: upstream.name.clone(),
            provider: upstream.catalog_provider(),
            requested_model: model.clone(),
            tags: tags.clone(),
            request: request.clone(),
            endpoint,
            fatura: state.fatura.clone(),
            reservation: reservation.take(),
        };
        outcome(&metrics, &upstream.name, "ok");
        if stream {
            let idle_after = Duration::from_millis(gateway.config.stream_idle_timeout_ms);
            metrics.gateway_overhead.observe(
                started
                    .elapsed()
                    .saturating_sub(upstream_wait)
                    .as_secs_f64(),
            );
            let metered = MeteredStream::new(
                Box::pin(response.bytes_stream()),
                ctx,
                inject_usage,
                permit,
                idle_after,
            );
            return Ok(passthrough(
                status,
                content_type,
                &request_id,
                Body::from_stream(metered),
            ));
        }
        // The upstream has answered (and will bill us): reading the body and metering run
        // in their own task, which completes even if this handler is cancelled (the client
        // hung up, a timeout fired).
        let upstream_name = upstream.name.clone();
        let metering = tokio::spawn(async move {
            let body_started = Instant::now();
            let body = response.bytes().await;
            let waited = body_started.elapsed();
            match body {
                Ok(bytes) => {
                    let (usage, reported_model, text) = read_reply(&bytes);
                    ctx.meter(usage, reported_model, text).await;
                    Ok((bytes, waited))
                }
                Err(e) => {
                    tracing::warn!(upstream = %upstream_name, error = %e, "upstream body failed");
                    ctx.meter(None, None, String::new()).await;
                    Err(upstream_name)
                }
            }
        });
        let bytes = match metering.await {
            Ok(Ok((bytes, waited))) => {
                upstream_wait += waited;
                bytes
            }
            Ok(Err(name)) => {
                return Err(
                    ApiError::bad_gateway(format!("upstream {name} failed mid-response"))
                        .into_response(),
                );
            }
            Err(e) => return Err(ApiError::internal(&e).into_response()),
        };
        metrics.gateway_overhead.observe(
            started
                .elapsed()
                .saturating_sub(upstream_wait)
                .as_secs_f64(),
        );
        return Ok(passthrough(
            status,
            content_type,
            &request_id,
            Body::from(bytes),
        ));
    }
    outcome(&metrics, "none", "all_upstreams_failed");
    Err(last_failure
        .unwrap_or_else(|| ApiError::bad_gateway("every upstream failed").into_response()))
}

/// The parts of a JSON reply metering reads (the rest is skipped, not built).
#[derive(serde::Deserialize)]
struct Reply<'a> {
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    model: Option<Value>,
    #[serde(default, borrow)]
    choices: Option<&'a serde_json::value::RawValue>,
}

/// A JSON reply's usage, reported model, and — only when it reports no usage, for the
/// estimate — its text.
fn read_reply(bytes: &[u8]) -> (Option<ReportedUsage>, Option<String>, String) {
    let Ok(reply) = serde_json::from_slice::<Reply<'_>>(bytes) else {
        return (None, None, String::new());
    };
    let usage = reply.usage.as_ref().and_then(parse_usage);
    let model = reply
        .model
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_string);
    let text = match (&usage, reply.choices) {
        (None, Some(raw)) => serde_json::from_str::<Value>(raw.get())
            .ok()
            .as_ref()
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c["message"]["content"].as_str())
                    .collect()
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    (usage, model, text)
}

/// Requests larger than this (bytes) are tokenized on the blocking pool, so that counting a
/// long prompt does not hold up the other calls on this worker.
const TOKENIZE_INLINE_MAX_BYTES: usize = 16 * 1024;

/// A call's prompt tokens (counted from the request) and its output cap (`max_tokens`, or
/// `default_max_output`).
async fn call_tokens(
    request: &Arc<Map<String, Value>>,
    endpoint: Endpoint,
    default_max_output: u64,
    body_bytes: usize,
) -> Result<(u64, u64), ApiError> {
    let output = match endpoint {
        Endpoint::Chat => request
            .get("max_completion_tokens")
            .or_else(|| request.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(default_max_output),
        Endpoint::Embeddings => 0,
    };
    let prompt = if body_bytes <= TOKENIZE_INLINE_MAX_BYTES {
        endpoint.prompt_tokens(request)
    } else {
        let request = request.clone();
        tokio::task::spawn_blocking(move || endpoint.prompt_tokens(&request))
            .await
            .map_err(|e| ApiError::internal(&e))?
    };
    Ok((prompt, output))
}

/// Reserves the call's maximum price on the customer's wallet: prompt tokens counted from
/// the request plus `max_tokens` (or the configured output cap), at the dearest upstream
/// of the chain. Answers 402 when the available balance is short, 403 when the model has
/// no price (a prepaid call cannot be charged otherwise).
async fn reserve(
    state: &AppState,
    customer_id: &str,
    budget: Budget,
    (prompt, output): (u64, u64),
    model: &str,
    chain: &[UpstreamConfig],
    at: DateTime<Utc>,
) -> Result<ReservationGuard, Response> {
    let usage = TokenUsage::new(prompt, output, 0, 0, 0, 1)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()).into_response())?;
    let mut amount: Option<Decimal> = None;
    for upstream in chain {
        let upstream_model = match (upstream.strip_model_prefix, model.split_once('/')) {
            (true, Some((_, rest))) => rest,
            _ => model,
        };
        let quote = state
            .fatura
            .quote(
                customer_id,
                &upstream.catalog_provider(),
                upstream_model,
                at,
                &usage,
            )
            .await
            .map_err(|e| ApiError::internal(&e).into_response())?;
        if let Some(q) = quote {
            amount = Some(amount.map_or(q.revenue, |a| a.max(q.revenue)));
        }
    }
    let Some(amount) = amount else {
        outcome(&state.metrics, "none", "model_not_priced");
        return Err(ApiError::forbidden(format!(
            "model {model:?} has no price in the catalog; calls of prepaid or spend-limited customers need a priced model"
        ))
        .with_code("model_not_priced")
        .into_response());
    };
    let reserved = match budget {
        Budget::Wallet => state.fatura.wallets().reserve(customer_id, amount).await,
        Budget::MonthlyLimit(limit) => {
            state
                .fatura
                .wallets()
                .reserve_within_limit(customer_id, limit, amount, at)
                .await
        }
    };
    match reserved {
        Ok(Ok(r)) => Ok(ReservationGuard {
            book: state.fatura.wallets().clone(),
            reservation: Some(r),
            charge_wallet: budget == Budget::Wallet,
        }),
        Ok(Err(available)) if budget == Budget::Wallet => {
            outcome(&state.metrics, "none", "insufficient_credits");
            Err(ApiError::insufficient_credits(format!(
                "insufficient credits: this call may cost up to {} USD and the available balance is {} USD",
                amount.round_dp(6).normalize(),
                available.round_dp(6).normalize()
            ))
            .into_response())
        }
        Ok(Err(left)) => {
            outcome(&state.metrics, "none", "spend_limit_reached");
            Err(ApiError::insufficient_credits(format!(
                "monthly spend limit reached: this call may cost up to {} USD and {} USD of this month's limit is left",
                amount.round_dp(6).normalize(),
                left.max(Decimal::ZERO).round_dp(6).normalize()
            ))
            .with_code("spend_limit_reached")
            .into_response())
        }
        // The budget is in the database (a share must grow) and it cannot be reached: no
        // call may run unreserved; the caller may retry.
        Err(e) => {
            tracing::warn!(error = %e, customer_id, "cannot reserve the call's price");
            outcome(&state.metrics, "none", "budget_unavailable");
            Err(ApiError::unavailable(
                "cannot reserve this call's price right now (the database is unavailable); retry shortly",
            )
            .into_response())
        }
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Passes an upstream SSE stream through to the client while metering it: captures usage
/// (stripping the usage-only chunk the gateway asked for), the reported model and the text
/// (for estimation). Metered exactly once: at the end of the stream, or when dropped
/// early (client disconnected, upstream failed).
struct MeteredStream {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Fires when the upstream has sent nothing for `idle_after`.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_after: Duration,
    /// The stream has ended (polling again yields nothing).
    done: bool,
    /// The upstream failed after bytes still to be forwarded: the error comes next.
    failed: Option<&'static str>,
    inner: ByteStream,
    splitter: SseSplitter,
    ctx: Option<CallContext>,
    strip_usage_chunk: bool,
    usage: Option<ReportedUsage>,
    model: Option<String>,
    text: String,
    /// Chunk payloads not parsed yet (for estimation only), and the bytes kept so far.
    kept_payloads: Vec<String>,
    kept_bytes: usize,
}

impl MeteredStream {
    fn new(
        inner: ByteStream,
        ctx: CallContext,
        strip_usage_chunk: bool,
        permit: tokio::sync::OwnedSemaphorePermit,
        idle_after: Duration,
    ) -> Self {
        MeteredStream {
            _permit: permit,
            idle: Box::pin(tokio::time::sleep(idle_after)),
            idle_after,
            done: false,
            failed: None,
            inner,
            splitter: SseSplitter::default(),
            ctx: Some(ctx),
            strip_usage_chunk,
            usage: None,
            model: None,
            text: String::new(),
            kept_payloads: Vec::new(),
            kept_bytes: 0,
        }
    }

    /// Forwards SSE events, parsing only what metering needs: the first chunk (model),
    /// chunks that mention usage or an error. Other chunks' payloads are kept (bounded)
    /// and parsed only if the stream ends without usage, to estimate its tokens.
    fn process(&mut self, events: Vec<super::wire::SseEvent>, out: &mut Vec<u8>) {
        for e in events {
            let mut forward = true;
            if let Some(data) = e.data.as_deref() {
                let needs_parse = self.model.is_none()
                    || data.contains("\"usage\"")
                    || data.contains("\"error\"");
                if needs_parse {
                    if let StreamItem::Chunk {
                        usage,
                        usage_only,
                        model,
                        content,
                    } = classify(Some(data))
                    {
                        if model.is_some() {
                            self.model = model;
                        }
                        self.keep_text(content);
                        let has_usage = usage.is_some();
                        if has_usage {
                            self.usage = usage;
                        }
                        forward = !(has_usage && usage_only && self.strip_usage_chunk);
                    }
                } else if self.kept_bytes < MAX_ESTIMATE_TEXT {
                    self.kept_bytes += data.len();
                    self.kept_payloads.push(data.to_string());
                }
            }
            if forward {
                out.extend_from_slice(&e.raw);
            }
        }
    }

    fn keep_text(&mut self, content: String) {
        if self.kept_bytes < MAX_ESTIMATE_TEXT {
            self.kept_bytes += content.len();
            self.text.push_str(&content);
        }
    }

    fn finish(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            if self.usage.is_none() {
                // Estimation needs the text: parse the payloads kept for that.
                for payload in std::mem::take(&mut self.kept_payloads) {
                    if let StreamItem::Chunk { content, .. } = classify(Some(&payload)) {
                        self.text.push_str(&content);
                    }
                }
            }
            ctx.meter_detached(
                self.usage.take(),
                self.model.take(),
                std::mem::take(&mut self.text),
            );
        }
    }
}

/// Most bytes a stream item gathers from upstream chunks that are already available.
const MAX_STREAM_ITEM: usize = 64 * 1024;

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    /// Forwards what the upstream has sent, gathering every chunk already available into
    /// one item (the client gets the same bytes in fewer writes; nothing waits for more).
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(message) = self.failed.take() {
            self.done = true;
            return Poll::Ready(Some(Err(std::io::Error::other(message))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let mut out: Vec<u8> = Vec::new();
        loop {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => {
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Bytes::from(out))));
                    }
                    if self.idle.as_mut().poll(cx).is_ready() {
                        tracing::warn!(idle = ?self.idle_after, "upstream stream went silent: ending it");
                        self.done = true;
                        self.finish();
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "upstream stream went silent",
                        ))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(bytes))) => {
                    let deadline = tokio::time::Instant::now() + self.idle_after;
                    self.idle.as_mut().reset(deadline);
                    let events = self.splitter.feed(&bytes);
                    self.process(events, &mut out);
                    if out.len() >= MAX_STREAM_ITEM {
                        return Poll::Ready(Some(Ok(Bytes::from(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream failed");
                    self.finish();
                    const FAILED: &str = "upstream stream failed";
                    if out.is_empty() {
                        self.done = true;
                        return Poll::Ready(Some(Err(std::io::Error::other(FAILED))));
                    }
                    // What arrived before the failure first, then the failure.
                    self.failed = Some(FAILED);
                    return Poll::Ready(Some(Ok(Bytes::from(out))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    if let Some(e) = self.splitter.finish() {
                        self.process(vec![e], &mut out);
                    }
                    self.finish();
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Bytes::from(out))));
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // The client went away (or the server stopped) before the end: meter what we know.
        self.finish();
    }
}

/// `GET /v1/models`: the models this customer can call, with its prices per unit under its
/// plan (the same engine that rates its invoices: plan price, raised to the margin floor),
/// in the plan's currency.
pub async fn list_models(State(state): State<AppState>, caller: Caller) -> Response {
    let Some(gateway) = state.gateway.clone() else {
        return ApiError::not_found("the gateway is not configured on this server").into_response();
    };
    let Caller::Customer { customer_id, .. } = caller else {
        return ApiError::forbidden(
            "the gateway is called with a customer API key, not the admin key",
        )
        .into_response();
    };
    let now = state.fatura.now();
    let versions = match state.fatura.prices(None, None, Some(now)).await {
        Ok(v) => v,
        Err(e) => return ApiError::internal(&e).into_response(),
    };
    let mut data: Vec<Value> = Vec::new();
    for v in versions.into_iter().filter(|v| {
        gateway
            .config
            .chain_for(&v.model)
            .and_then(|c| c.first().map(|u| u.catalog_provider() == v.provider))
            .unwrap_or(false)
    }) {
        let pricing = match state.fatura.unit_prices(&customer_id, &v, now).await {
            Ok(Some(p)) => json!({
                "currency": p.currency.code(),
                "prompt": p.prompt.to_string(), "completion": p.completion.to_string(),
                "cache_read": p.cache_read.to_string(), "cache_write": p.cache_write.to_string(),
                "reasoning": p.reasoning.to_string(), "request": p.request.to_string(),
            }),
            Ok(None) => Value::Null,
            Err(e) => return ApiError::internal(&e).into_response(),
        };
        data.push(json!({
            "id": v.model, "object": "model", "created": v.effective_from.timestamp(),
            "owned_by": v.provider, "pricing": pricing,
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
