//! A mock LLM upstream speaking OpenAI's and OpenRouter's wire formats, streaming
//! included. Tests, the demo and the benchmarks run it as real HTTP on loopback
//! (`fatura mock-upstream`).
//!
//! Behaviour is set per instance ([`MockConfig`]) and per request through an extra body
//! field the gateway passes through untouched:
//! `"mock": {"status": 429, "completion_tokens": 12, "cached_tokens": 100,
//! "reasoning_tokens": 5, "cache_write_tokens": 7, "error_after_chunks": 3,
//! "latency_ms": 10, "chunk_delay_ms": 5, "omit_usage": true}`.
//!
//! Token counts are deterministic: prompt tokens = the number of whitespace-separated
//! words in all message contents plus 3 per message; the completion is `completion_tokens`
//! words ("tok0 tok1 …").

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Wire flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI's format.
    OpenAi,
    /// OpenRouter's: `usage.cost`, `cache_write_tokens`, SSE comment lines, `provider`.
    OpenRouter,
}

/// Per-instance behaviour.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Wire flavour.
    pub flavor: Flavor,
    /// Answer every request with this status (an OpenAI error body).
    pub fail_status: Option<u16>,
    /// Delay before the answer starts.
    pub latency: Duration,
    /// Delay between stream chunks.
    pub chunk_delay: Duration,
    /// Completion tokens when the request does not say.
    pub completion_tokens: u64,
    /// Required `Authorization: Bearer` key, if any.
    pub api_key: Option<String>,
    /// USD per prompt and per completion token for OpenRouter's `usage.cost`.
    pub cost_per_token: (f64, f64),
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            flavor: Flavor::OpenAi,
            fail_status: None,
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            completion_tokens: 20,
            api_key: None,
            cost_per_token: (0.000001, 0.000002),
        }
    }
}

/// What the mock saw of one request (for tests: which headers reached the upstream).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Header names, lower case.
    pub header_names: Vec<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The body.
    pub body: Value,
}

#[derive(Debug)]
struct MockState {
    config: MockConfig,
    requests: AtomicU64,
    seen: Mutex<Vec<SeenRequest>>,
}

/// Serves the mock on `listener` until `shutdown` resolves, with `TCP_NODELAY` so stream
/// chunks leave at once, as from a real provider.
pub async fn serve_mock(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, mock_router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The mock's router.
pub fn mock_router(config: MockConfig) -> Router {
    let state = Arc::new(MockState {
        config,
        requests: AtomicU64::new(0),
        seen: Mutex::new(Vec::new()),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/_mock/requests", get(seen))
        .with_state(state)
}

fn error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(
            json!({"error": {"message": message, "type": "upstream_error", "code": status}}),
        ),
    )
        .into_response()
}

/// Prompt tokens of a chat request, by the mock's deterministic rule.
pub fn mock_prompt_tokens(body: &Value) -> u64 {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    messages
        .iter()
        .map(|m| {
            let words = match &m["content"] {
                Value::String(s) => s.split_whitespace().count() as u64,
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .map(|s| s.split_whitespace().count() as u64)
                    .sum(),
                _ => 0,
            };
            words + 3
        })
        .sum()
}

struct Plan {
    status: Option<u16>,
    prompt: u64,
    completion: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    error_after: Option<u64>,
    latency: Duration,
    chunk_delay: Duration,
    omit_usage: bool,
}

fn plan(state: &MockState, body: &Value) -> Plan {
    let m = &body["mock"];
    let n = |k: &str| m[k].as_u64();
    let max_tokens = body["max_tokens"]
        .as_u64()
        .or_else(|| body["max_completion_tokens"].as_u64());
    let completion = n("completion_tokens")
        .unwrap_or(state.config.completion_tokens)
        .min(max_tokens.unwrap_or(u64::MAX));
    let prompt = mock_prompt_tokens(body);
    Plan {
        status: n("status").map(|s| s as u16).or(state.config.fail_status),
        prompt,
        completion,
        cached: n("cached_tokens").unwrap_or(0).min(prompt),
        cache_write: n("cache_write_tokens").unwrap_or(0),
        reasoning: n("reasoning_tokens").unwrap_or(0).min(completion),
        error_after: n("error_after_chunks"),
        latency: n("latency_ms").map_or(state.config.latency, Duration::from_millis),
        chunk_delay: n("chunk_delay_ms").map_or(state.config.chunk_delay, Duration::from_millis),
        omit_usage: m["omit_usage"].as_bool().unwrap_or(false),
    }
}

fn usage_json(state: &MockState, p: &Plan) -> Value {
    let mut usage = json!({
        "prompt_tokens": p.prompt,
        "completion_tokens": p.completion,
        "total_tokens": p.prompt + p.completion,
        "prompt_tokens_details": {"cached_tokens": p.cached},
        "completion_tokens_details": {"reasoning_tokens": p.reasoning},
    });
    if state.config.flavor == Flavor::OpenRouter {
        let (pp, cp) = state.config.cost_per_token;
        usage["cost"] = json!(p.prompt as f64 * pp + p.completion as f64 * cp);
        usage["prompt_tokens_details"]["cache_write_tokens"] = json!(p.cache_write);
    }
    usage
}

async fn record(state: &MockState, headers: &HeaderMap, body: &Value) {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let mut seen = state.seen.lock().await;
    if seen.len() >= 1000 {
        seen.remove(0);
    }
    seen.push(SeenRequest {
        header_names: headers.keys().map(|k| k.as_str().to_string()).collect(),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: body.clone(),
    });
}

fn authorised(state: &MockState, headers: &HeaderMap) -> bool {
    match &state.config.api_key {
        None => true,
        Some(k) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {k}")),
    }
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "invalid JSON");
    };
    record(&state, &headers, &body).await;
    if !authorised(&state, &headers) {
        return error(401, "bad upstream key");
    }
    let p = plan(&state, &body);
    if !p.latency.is_zero() {
        tokio::time::sleep(p.latency).await;
    }
    if let Some(status) = p.status {
        return error(status, "mock failure");
    }
    let model = body["model"].as_str().unwrap_or("mock-model").to_string();
    let id = format!("chatcmpl-mock{}", state.requests.load(Ordering::Relaxed));
    let created = 1_770_000_000u64;
    let words: Vec<String> = (0..p.completion).map(|i| format!("tok{i}")).collect();
    if !body["stream"].as_bool().unwrap_or(false) {
        let mut answer = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" ")},
                         "finish_reason": "stop", "logprobs": null}],
            "system_fingerprint": "fp_mock",
        });
        if !p.omit_usage {
            answer["usage"] = usage_json(&state, &p);
        }
        if state.config.flavor == Flavor::OpenRouter {
            answer["provider"] = json!("MockProvider");
        }
        return axum::Json(answer).into_response();
    }
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false)
        || (state.config.flavor == Flavor::OpenRouter
            && body["usage"]["include"].as_bool().unwrap_or(false));
    let usage = (include_usage && !p.omit_usage).then(|| usage_json(&state, &p));
    let flavor = state.config.flavor;
    let stream = async_stream(
        id,
        model,
        created,
        words,
        usage,
        p.error_after,
        p.chunk_delay,
        flavor,
    );
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(500, "cannot build stream"))
}

#[allow(clippy::too_many_arguments)]
fn async_stream(
    id: String,
    model: String,
    created: u64,
    words: Vec<String>,
    usage: Option<Value>,
    error_after: Option<u64>,
    delay: Duration,
    flavor: Flavor,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": "fp_mock",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]});
            Bytes::from(format!("data: {v}\n\n"))
        };
        if flavor == Flavor::OpenRouter
            && tx
                .send(Bytes::from_static(b": OPENROUTER PROCESSING\n\n"))
                .await
                .is_err()
        {
            return;
        }
        if tx
            .send(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .await
            .is_err()
        {
            return;
        }
        for (i, w) in words.iter().enumerate() {
            if error_after.is_some_and(|n| i as u64 >= n) {
                let e = json!({"error": {"message": "mock mid-stream failure", "code": 502}});
                let _ = tx.send(Bytes::from(format!("data: {e}\n\n"))).await;
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let text = if i == 0 { w.clone() } else { format!(" {w}") };
            if tx
                .send(chunk(json!({"content": text}), Value::Null))
                .await
                .is_err()
            {
                return;
            }
        }
        if tx.send(chunk(json!({}), json!("stop"))).await.is_err() {
            return;
        }
        if let Some(u) = usage {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": "fp_mock", "choices": [], "usage": u});
            if tx
                .send(Bytes::from(format!("data: {v}\n\n")))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

async fn embeddings(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "invalid JSON");
    };
    record(&state, &headers, &body).await;
    if !authorised(&state, &headers) {
        return error(401, "bad upstream key");
    }
    if let Some(status) = body["mock"]["status"]
        .as_u64()
        .map(|s| s as u16)
        .or(state.config.fail_status)
    {
        return error(status, "mock failure");
    }
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect(),
        _ => vec![],
    };
    let tokens: u64 = inputs
        .iter()
        .map(|s| s.split_whitespace().count() as u64)
        .sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, _)| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}))
        .collect();
    axum::Json(
        json!({"object": "list", "data": data, "model": body["model"],
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
    .into_response()
}

async fn models() -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "mock"}]}))
        .into_response()
}

async fn seen(State(state): State<Arc<MockState>>) -> Response {
    let seen = state.seen.lock().await;
    let list: Vec<Value> = seen
        .iter()
        .map(|s| json!({"header_names": s.header_names, "authorization": s.authorization, "body": s.body}))
        .collect();
    axum::Json(json!({"requests": list})).into_response()
}
