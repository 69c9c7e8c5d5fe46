//! The gateway, end to end: the official `openai` Python package as the client, fatura's
//! gateway, and mock upstreams speaking OpenAI's and OpenRouter's wire formats on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::stripe::{STRIPE_KEY, WEBHOOK_SECRET, card, localstripe, stripe_get, stripe_post};
use common::{ADMIN_KEY, Backend, TestApp, UPSTREAM_KEY};
use fatura_server::gateway::GatewayConfig;
use fatura_server::mock::{Flavor, MockConfig, serve_mock};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    non_streaming_calls_are_metered_exactly_and_pass_through_unchanged,
    streams_are_metered_and_the_injected_usage_chunk_is_stripped,
    a_client_that_disconnects_mid_stream_is_still_metered,
    mid_stream_errors_reach_the_client_and_the_call_is_metered,
    fallback_tries_the_next_upstream_before_the_first_byte,
    openrouter_cost_and_cache_writes_are_recorded,
    embeddings_and_models_are_served,
    shutdown_drains_every_pending_event,
    prepaid_calls_settle_to_their_price_and_get_402_when_short,
    reservations_charges_and_model_prices_follow_the_customers_plan,
    prepaid_usage_is_invoiced_as_paid_from_the_wallet_with_the_volume_discount_credited_back,
    invoices_are_collected_through_stripe_end_to_end,
    concurrent_calls_cannot_overspend_a_prepaid_balance,
    wallet_credits_are_validated_and_wallets_isolated,
    sync_durability_answers_after_the_commit,
    postpaid_spend_limits_stop_calls_that_could_exceed_them,
    calls_beyond_max_in_flight_are_shed_with_503,
    bad_gateway_requests_get_clear_errors_and_forward_nothing,
    a_silent_upstream_stream_is_ended_metered_and_its_reservation_freed,
    per_key_rate_limits_answer_429_with_retry_after,
    calls_share_a_group_commit_and_their_request_ids_sort_in_time,
);

async fn a_silent_upstream_stream_is_ended_metered_and_its_reservation_freed(backend: Backend) {
    let s = setup(
        backend,
        MockConfig {
            chunk_delay: Duration::from_secs(5),
            ..MockConfig::default()
        },
        "stream_idle_timeout_ms = 300",
    )
    .await;
    let key = prepaid_customer(&s.app, "pre", "5").await;
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "hello there world"}]});
    let started = Instant::now();
    let res = s
        .app
        .client
        .post(s.app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The upstream sent its first chunk, then nothing for 5 s: the gateway ends the stream.
    let _ = res.bytes().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "ended by the idle timeout, not by the upstream"
    );
    let usage = usage_when(&s.app, 1, "").await;
    assert_eq!(usage["data"][0]["estimated_events"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = wallet(&s.app, "pre").await;
        if w["reserved"] == "0" {
            assert_eq!(
                w["transactions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|t| t["kind"] == "charge")
                    .count(),
                1
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reservation was never settled: {w}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Body, extra headers, key, expected status, expected error code ("" = any).
type BadCase = (
    Vec<u8>,
    Vec<(&'static str, &'static str)>,
    Option<String>,
    StatusCode,
    &'static str,
);

async fn bad_gateway_requests_get_clear_errors_and_forward_nothing(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let url = s.app.url("/v1/chat/completions");
    let send = |body: Vec<u8>, headers: Vec<(&'static str, &'static str)>, key: Option<String>| {
        let mut req = s
            .app
            .client
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let key = Some(s.key.clone());
    let cases: Vec<BadCase> = vec![
        (
            b"{not json".to_vec(),
            vec![],
            key.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            b"[1]".to_vec(),
            vec![],
            key.clone(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            br#"{"messages": []}"#.to_vec(),
            vec![],
            key.clone(),
            StatusCode::BAD_REQUEST,
            "missing_model",
        ),
        (
            br#"{"model": "gpt-4o", "messages": []}"#.to_vec(),
            vec![("X-Fatura-Tag-agent!x", "x")],
            key.clone(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            br#"{"model": "gpt-4o", "messages": []}"#.to_vec(),
            vec![(
                "X-Fatura-Tag-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "too long a tag name",
            )],
            key.clone(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            br#"{"model": "gpt-4o", "messages": []}"#.to_vec(),
            vec![],
            None,
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
        ),
        (
            br#"{"model": "gpt-4o", "messages": []}"#.to_vec(),
            vec![],
            Some(ADMIN_KEY.to_string()),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
    ];
    for (body, headers, key, want, code) in cases {
        let (st, v) = send(body.clone(), headers, key).await;
        assert_eq!(st, want, "{}: {v}", String::from_utf8_lossy(&body));
        assert!(v["error"]["message"].is_string(), "{v}");
        if !code.is_empty() {
            assert_eq!(v["error"]["code"], code, "{v}");
        }
    }
    assert!(
        mock_requests(&s.mock).await.is_empty(),
        "nothing reached the upstream"
    );
    assert_eq!(s.app.event_count().await, 0);
}

async fn calls_beyond_max_in_flight_are_shed_with_503(backend: Backend) {
    let s = setup(
        backend,
        MockConfig {
            latency: Duration::from_millis(400),
            ..MockConfig::default()
        },
        "max_in_flight = 3",
    )
    .await;
    let mut ok = 0;
    let mut shed = 0;
    for (status, retry, body) in concurrent_calls(&s.app, &s.key, 12, json!({})).await {
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                shed += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "overloaded");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(
        (ok, shed),
        (3, 9),
        "three calls in flight at most; the rest refused at once"
    );
    usage_when(&s.app, 3, "").await;
    assert_eq!(mock_requests(&s.mock).await.len(), 3);
}

async fn postpaid_spend_limits_stop_calls_that_could_exceed_them(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let (st, c) = s
        .app
        .post(
            "/v1/customers",
            &json!({"id": "post", "name": "Postpaid", "monthly_spend_limit": "0.30"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{c}");
    assert_eq!(
        (c["billing_mode"].clone(), c["monthly_spend_limit"].clone()),
        (json!("postpaid"), json!("0.3"))
    );
    let key = s.app.key_for("post").await;
    let gw = s.app.url("/v1");
    // "flat" costs 0.01 per completion token: max_tokens 10 reserves 0.10, 4 tokens cost 0.04.
    for _ in 0..5 {
        let out = python(
            &gw,
            &key,
            "chat",
            json!({"model": "flat", "max_tokens": 10, "mock": {"completion_tokens": 4}}),
        )
        .await;
        assert!(out.get("response").is_some(), "{out}");
    }
    // 0.20 spent, 0.10 left: a call that may cost 0.11 is refused.
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 11}),
    )
    .await;
    assert_eq!(out["status_error"], 402, "{out}");
    assert_eq!(out["body"]["code"], "spend_limit_reached");
    usage_when(&s.app, 5, "").await;
    // Postpaid calls are not charged to a wallet.
    assert_eq!(wallet(&s.app, "post").await["transactions"], json!([]));
    // Raising the limit applies at once; clearing it removes it.
    let (st, c) = s
        .app
        .patch(
            "/v1/customers/post",
            &json!({"monthly_spend_limit": "1.00"}),
        )
        .await;
    assert_eq!(
        (st, c["monthly_spend_limit"].clone()),
        (StatusCode::OK, json!("1"))
    );
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 11}),
    )
    .await;
    assert!(out.get("response").is_some(), "{out}");
    let (st, c) = s
        .app
        .patch("/v1/customers/post", &json!({"monthly_spend_limit": null}))
        .await;
    assert_eq!(
        (st, c["monthly_spend_limit"].clone()),
        (StatusCode::OK, Value::Null)
    );
    for bad in [
        json!({"monthly_spend_limit": "-5"}),
        json!({"monthly_spend_limit": "1.234"}),
        json!({"plan": "x"}),
    ] {
        let (st, body) = s.app.patch("/v1/customers/post", &bad).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let (st, _) = s
        .app
        .post(
            "/v1/customers",
            &json!({"name": "Both", "billing_mode": "prepaid", "monthly_spend_limit": "5"}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (st, _) = s
        .app
        .patch("/v1/customers/nobody", &json!({"monthly_spend_limit": "5"}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// The answer of one concurrent call: status, `Retry-After`, body.
type Answer = (StatusCode, Option<String>, Value);

/// Fires `n` chat calls at once (extra fields merged into each body) and collects answers.
async fn concurrent_calls(app: &TestApp, key: &str, n: usize, extra: Value) -> Vec<Answer> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, url, key) = (
            app.client.clone(),
            app.url("/v1/chat/completions"),
            key.to_string(),
        );
        let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("call {i}")}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status(), retry, r.json::<Value>().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

async fn call(app: &TestApp, key: &str, n: usize) -> StatusCode {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("call number {n}")}]});
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.metrics_text().await;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// With `commit_delay_ms`, calls answered one after another within the delay are committed
/// together (one transaction, not one each); request ids (the events' ids) sort in the order
/// the calls were made, so the ledger's id index grows at its end.
async fn calls_share_a_group_commit_and_their_request_ids_sort_in_time(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "commit_delay_ms = 1000").await;
    let mut ids = Vec::new();
    let mut first_answered = None;
    for n in 0..5 {
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("call number {n}")}]});
        let r = s
            .app
            .client
            .post(s.app.url("/v1/chat/completions"))
            .bearer_auth(&s.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        first_answered.get_or_insert_with(Instant::now);
        let id = r.headers()["x-fatura-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        ids.push(id);
    }
    // Every event was queued before its answer: all five within this span of the first.
    let span = first_answered.map(|t| t.elapsed()).unwrap_or_default();
    usage_when(&s.app, 5, "").await;
    let commits = metric(&s.app, "fatura_meter_commits_total").await;
    if span < Duration::from_millis(900) {
        assert_eq!(commits, 1.0, "five calls within the delay share one commit");
    } else {
        // A very slow machine: the delay may have closed the batch early, still not one each.
        assert!(commits < 5.0, "{commits} commits for five calls");
    }
    for id in &ids {
        let hex = id.strip_prefix("gw_").unwrap_or_else(|| panic!("{id}"));
        assert!(
            hex.len() == 30 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, ids, "request ids sort in the order of the calls");
}

async fn sync_durability_answers_after_the_commit(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "durability = \"sync\"").await;
    for n in 0..5 {
        assert_eq!(call(&s.app, &s.key, n).await, StatusCode::OK);
        // No waiting: the answer came after the commit.
        assert_eq!(s.app.event_count().await, n as u64 + 1);
    }
}

/// PostgreSQL refuses every connection to the test database for a while; calls go on, their
/// events are spilled to the local file and replayed, exactly once, when it is back — and
/// prepaid calls keep their wallet charge through the spill (a regression: the spill file
/// once dropped it, so spilled prepaid calls were never charged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_and_doubles_nothing() {
    use sqlx::Connection;
    let s = setup(Backend::Postgres, MockConfig::default(), "").await;
    let db = s.app.pg_database.clone().unwrap();
    assert_eq!(call(&s.app, &s.key, 0).await, StatusCode::OK);
    let prepaid_key = prepaid_customer(&s.app, "pre", "10").await;
    assert_eq!(call(&s.app, &prepaid_key, 0).await, StatusCode::OK);
    usage_when(&s.app, 2, "").await;
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .unwrap();
    sqlx::query(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&mut admin)
        .await
        .unwrap();
    let (st, _) = s.app.get_as(None, "/readyz").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "the outage is real");
    for n in 1..=20 {
        // Half the calls are prepaid: their wallet charges must survive the spill too.
        let key = if n % 2 == 0 { &prepaid_key } else { &s.key };
        assert_eq!(
            call(&s.app, key, n).await,
            StatusCode::OK,
            "calls go on during the outage"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(25);
    while metric(&s.app, "fatura_events_spilled_total").await < 20.0 {
        if Instant::now() > deadline {
            let text = s.app.metrics_text().await;
            panic!(
                "events were never spilled: {}",
                text.lines()
                    .filter(|l| l.contains("events") || l.contains("queue"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
    let usage = usage_when(&s.app, 22, "").await;
    assert_eq!(usage["data"][0]["events"], 22);
    assert_eq!(usage["data"][0]["requests"], 22);
    // 1 + 10 prepaid calls, each with its charge, and the stored balance equals the live one.
    let w = wallet(&s.app, "pre").await;
    let charges = w["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "charge")
        .count();
    let (_, by_customer) = s.app.get("/v1/usage?group_by=customer").await;
    assert_eq!(charges, 11, "{w}\n{by_customer}");
    let stored = s
        .app
        .fatura
        .stored_wallet_balance("pre", chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(
        stored.normalize().to_string(),
        w["balance"].as_str().unwrap(),
        "{w}"
    );
    // Replays are idempotent: nothing more arrives.
    let mut s = s;
    s.app.stop().await;
    assert_eq!(s.app.event_count().await, 22);
}

async fn start_mock(config: MockConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        serve_mock(listener, config, std::future::pending())
            .await
            .unwrap();
    });
    format!("http://{addr}/v1")
}

/// A loopback address nothing listens on.
async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

struct Setup {
    app: TestApp,
    key: String,
    mock: String,
}

async fn setup(backend: Backend, mock: MockConfig, extra: &str) -> Setup {
    setup_full(backend, mock, extra, None).await
}

async fn setup_full(
    backend: Backend,
    mock: MockConfig,
    extra: &str,
    payments: Option<(
        std::sync::Arc<dyn fatura_server::payments::PaymentProcessor>,
        fatura_server::payments::CollectionPolicy,
    )>,
) -> Setup {
    let flavor = mock.flavor;
    let mock_url = start_mock(MockConfig {
        api_key: Some(UPSTREAM_KEY.into()),
        ..mock
    })
    .await;
    let kind = if flavor == Flavor::OpenRouter {
        "openrouter"
    } else {
        "openai"
    };
    let toml_text = format!(
        r#"
        {extra}
        [[upstreams]]
        name = "primary"
        kind = "{kind}"
        base_url = "{mock_url}"
        api_key_env = "FATURA_TEST_UPSTREAM_KEY"

        [[routes]]
        models = ["*"]
        upstreams = ["primary"]
        "#
    );
    let config: GatewayConfig = toml::from_str(&toml_text).unwrap();
    let app = TestApp::start_full(backend, Some(config), payments).await;
    app.customer("acme").await;
    let key = app.key_for("acme").await;
    // Prices of the mock's models, as the provider the upstream kind implies.
    let catalog = json!({"data": [
        {"id": "gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001", "input_cache_read": "0.00000125"}},
        {"id": "openai/gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001", "input_cache_read": "0.00000125", "input_cache_write": "0.000003"}},
        {"id": "text-embedding-3-small", "pricing": {"prompt": "0.00000002", "completion": "0"}},
        {"id": "flat", "pricing": {"prompt": "0", "completion": "0.0013"}},
    ]});
    let (s, body) = app
        .post_bytes(
            &format!("/v1/prices/import?format=openrouter&provider={kind}&effective_from=2020-01-01T00:00:00Z"),
            serde_json::to_vec(&catalog).unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    Setup {
        app,
        key,
        mock: mock_url,
    }
}

fn gateway_config(toml_text: &str) -> GatewayConfig {
    toml::from_str(toml_text).unwrap()
}

async fn python(base: &str, key: &str, scenario: &str, args: Value) -> Value {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/gateway_client.py");
    let (base, key, scenario) = (base.to_string(), key.to_string(), scenario.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args([&base, &key, &scenario, &args.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Waits (bounded) until the ledger holds `n` events, then returns usage by model.
async fn usage_when(app: &TestApp, n: u64, query: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if app.event_count().await >= n {
            let (s, body) = app.get(&format!("/v1/usage{query}")).await;
            assert_eq!(s, StatusCode::OK);
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger never reached {n} events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mock_requests(mock: &str) -> Vec<Value> {
    let url = format!("{}/_mock/requests", mock.trim_end_matches("/v1"));
    let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    v["requests"].as_array().unwrap().clone()
}

async fn non_streaming_calls_are_metered_exactly_and_pass_through_unchanged(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let gw = s.app.url("/v1");
    let args = json!({"headers": {"X-Fatura-Tag-Agent": "sdr-bot"}, "user": "u-42",
                      "mock": {"cached_tokens": 2, "reasoning_tokens": 5}});
    let via_gateway = python(&gw, &s.key, "chat", args.clone()).await;
    let direct = python(&s.mock, UPSTREAM_KEY, "chat", args).await;
    assert!(via_gateway.get("response").is_some(), "{via_gateway}");
    assert_eq!(
        via_gateway, direct,
        "the client sees what the upstream sent"
    );
    // prompt = 3 words + 3 = 6 tokens (2 cached); completion = 20 (5 reasoning).
    // cost = 4 × 0.0000025 + 2 × 0.00000125 + 20 × 0.00001 = 0.0002125
    let usage = usage_when(
        &s.app,
        1,
        "?group_by=model,customer&tag.agent=sdr-bot&tag.user=u-42",
    )
    .await;
    let row = &usage["data"][0];
    assert_eq!(row["model"], "gpt-4o");
    assert_eq!(
        (
            row["input_tokens"].clone(),
            row["cached_input_tokens"].clone()
        ),
        (json!(6), json!(2))
    );
    assert_eq!(
        (
            row["output_tokens"].clone(),
            row["reasoning_tokens"].clone()
        ),
        (json!(20), json!(5))
    );
    assert_eq!(row["cost"], "0.0002125");
    assert_eq!(row["estimated_events"], 0);
    // The upstream got the platform's key, never the customer's key or the tag headers.
    let seen = mock_requests(&s.mock).await;
    let through_gateway = &seen[0];
    assert_eq!(
        through_gateway["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    let names: Vec<&str> = through_gateway["header_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(
        !names.iter().any(|h| h.starts_with("x-fatura")),
        "{names:?}"
    );
    assert!(!seen.iter().any(|r| r.to_string().contains(&s.key)));
    // Per-request metrics.
    let text = s.app.metrics_text().await;
    for needle in [
        "fatura_gateway_requests_total{upstream=\"primary\",outcome=\"ok\"} 1",
        "fatura_gateway_tokens_total{kind=\"input\"} 6",
        "fatura_gateway_tokens_total{kind=\"output\"} 20",
        "fatura_gateway_upstream_latency_seconds_count 1",
        "fatura_gateway_overhead_seconds_count 1",
        "fatura_meter_queue_depth 0",
        "fatura_events_spilled_total 0",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
}

fn has_usage(chunks: &Value) -> bool {
    chunks
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.get("usage").is_some())
}

async fn streams_are_metered_and_the_injected_usage_chunk_is_stripped(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let gw = s.app.url("/v1");
    let via = python(
        &gw,
        &s.key,
        "stream",
        json!({"mock": {"completion_tokens": 12}}),
    )
    .await;
    let direct = python(
        &s.mock,
        UPSTREAM_KEY,
        "stream",
        json!({"mock": {"completion_tokens": 12}}),
    )
    .await;
    assert_eq!(
        via, direct,
        "identical chunks, minus the usage chunk the gateway added"
    );
    assert!(!has_usage(&via["chunks"]));
    assert_eq!(
        via["chunks"].as_array().unwrap().len(),
        14,
        "role chunk + 12 words + finish"
    );
    let usage = usage_when(&s.app, 1, "").await;
    assert_eq!(
        (
            usage["data"][0]["input_tokens"].clone(),
            usage["data"][0]["output_tokens"].clone()
        ),
        (json!(6), json!(12))
    );
    // 6 × 0.0000025 + 12 × 0.00001 = 0.000135
    assert_eq!(usage["data"][0]["cost"], "0.000135");
    // A client that asks for usage itself gets the usage chunk, as from the upstream.
    let via = python(&gw, &s.key, "stream_usage", json!({})).await;
    let direct = python(&s.mock, UPSTREAM_KEY, "stream_usage", json!({})).await;
    assert_eq!(via, direct);
    assert!(has_usage(&via["chunks"]));
    let usage = usage_when(&s.app, 2, "").await;
    assert_eq!(usage["data"][0]["output_tokens"], 32);
    assert_eq!(usage["data"][0]["estimated_events"], 0);
}

async fn a_client_that_disconnects_mid_stream_is_still_metered(backend: Backend) {
    let s = setup(
        backend,
        MockConfig {
            chunk_delay: Duration::from_millis(25),
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let out = python(
        &s.app.url("/v1"),
        &s.key,
        "disconnect",
        json!({"after": 4, "mock": {"completion_tokens": 200}}),
    )
    .await;
    assert_eq!(out["chunks"].as_array().unwrap().len(), 4, "{out}");
    let usage = usage_when(&s.app, 1, "").await;
    let row = &usage["data"][0];
    assert_eq!(row["estimated_events"], 1, "{usage}");
    // Counted with the tokenizer: the prompt, and the words streamed before the disconnect.
    // o200k tokens of the message, 3 per message and 3 to prime the reply.
    assert_eq!(row["input_tokens"], count_tokens("hello there world") + 6);
    let out_tokens = row["output_tokens"].as_u64().unwrap();
    assert!((3..200).contains(&out_tokens), "{out_tokens}");
    assert_ne!(row["cost"], "0");
}

async fn mid_stream_errors_reach_the_client_and_the_call_is_metered(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let out = python(
        &s.app.url("/v1"),
        &s.key,
        "stream",
        json!({"mock": {"error_after_chunks": 3}}),
    )
    .await;
    assert!(out.get("api_error").is_some(), "{out}");
    let usage = usage_when(&s.app, 1, "").await;
    assert_eq!(usage["data"][0]["estimated_events"], 1);
    // "tok0 tok1 tok2" streamed before the error.
    assert_eq!(
        usage["data"][0]["output_tokens"],
        count_tokens("tok0 tok1 tok2")
    );
}

fn count_tokens(s: &str) -> u64 {
    fatura_server::gateway::estimate::count_text(s)
}

async fn fallback_tries_the_next_upstream_before_the_first_byte(backend: Backend) {
    let failing = start_mock(MockConfig {
        fail_status: Some(503),
        ..MockConfig::default()
    })
    .await;
    let limited = start_mock(MockConfig {
        fail_status: Some(429),
        ..MockConfig::default()
    })
    .await;
    let good = start_mock(MockConfig::default()).await;
    let slow = start_mock(MockConfig {
        latency: Duration::from_secs(5),
        ..MockConfig::default()
    })
    .await;
    let dead = dead_address().await;
    let config = gateway_config(&format!(
        r#"
        first_byte_timeout_ms = 300
        [[upstreams]]
        name = "slow"
        kind = "openai"
        base_url = "{slow}"
        [[upstreams]]
        name = "dead"
        kind = "openai_compatible"
        provider = "openai"
        base_url = "{dead}"
        [[upstreams]]
        name = "overloaded"
        kind = "openai"
        base_url = "{failing}"
        [[upstreams]]
        name = "limited"
        kind = "openai"
        base_url = "{limited}"
        [[upstreams]]
        name = "good"
        kind = "openai"
        base_url = "{good}"
        api_key_env = "FATURA_TEST_UPSTREAM_KEY"
        [[routes]]
        models = ["gpt-4o"]
        upstreams = ["slow", "dead", "overloaded", "limited", "good"]
        [[routes]]
        models = ["broken-*"]
        upstreams = ["overloaded", "limited"]
        "#
    ));
    let app = TestApp::start_with(backend, Some(config)).await;
    app.customer("acme").await;
    let key = app.key_for("acme").await;
    let out = python(&app.url("/v1"), &key, "stream", json!({})).await;
    assert_eq!(out["chunks"].as_array().unwrap().len(), 22, "{out}");
    let out = python(&app.url("/v1"), &key, "chat", json!({})).await;
    assert!(out.get("response").is_some(), "{out}");
    usage_when(&app, 2, "").await;
    let (_, by_provider) = app.get("/v1/usage?group_by=provider").await;
    assert_eq!(by_provider["data"][0]["provider"], "openai");
    // Each call fell through a timeout, a refused connection, a 503 and a 429.
    let text = app.metrics_text().await;
    for needle in [
        "fatura_gateway_requests_total{upstream=\"slow\",outcome=\"timeout\"} 2",
        "fatura_gateway_requests_total{upstream=\"dead\",outcome=\"connection_error\"} 2",
        "fatura_gateway_requests_total{upstream=\"good\",outcome=\"ok\"} 2",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    assert_eq!(by_provider["data"][0]["events"], 2);
    // Every upstream failing: the client gets the last upstream's answer.
    let out = python(
        &app.url("/v1"),
        &key,
        "chat",
        json!({"model": "broken-model"}),
    )
    .await;
    assert_eq!(out["status_error"], 429, "{out}");
    // No route.
    let out = python(&app.url("/v1"), &key, "chat", json!({"model": "unrouted"})).await;
    assert_eq!(out["status_error"], 404, "{out}");
    assert_eq!(out["body"]["code"], "model_not_found");
    assert_eq!(app.event_count().await, 2, "failed calls carry no usage");
}

async fn openrouter_cost_and_cache_writes_are_recorded(backend: Backend) {
    let s = setup(
        backend,
        MockConfig {
            flavor: Flavor::OpenRouter,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let gw = s.app.url("/v1");
    let args =
        json!({"model": "openai/gpt-4o", "mock": {"cached_tokens": 1, "cache_write_tokens": 2}});
    let via = python(&gw, &s.key, "stream", args.clone()).await;
    let direct = python(&s.mock, UPSTREAM_KEY, "stream", args).await;
    assert_eq!(
        via, direct,
        "SSE comment lines pass through; the usage chunk is stripped"
    );
    let usage = usage_when(&s.app, 1, "?group_by=provider,model").await;
    let row = &usage["data"][0];
    assert_eq!(
        (row["provider"].clone(), row["model"].clone()),
        (json!("openrouter"), json!("openai/gpt-4o"))
    );
    // 3 uncached × 0.0000025 + 1 cached × 0.00000125 + 2 cache-write × 0.000003 + 20 × 0.00001
    assert_eq!(row["cost"], "0.00021475");
    assert_eq!(row["cache_write_tokens"], 2);
    let requests = mock_requests(&s.mock).await;
    assert_eq!(
        requests[0]["body"]["usage"],
        json!({"include": true}),
        "OpenRouter usage accounting requested"
    );
    assert_eq!(
        requests[0]["body"]["stream_options"],
        json!({"include_usage": true})
    );
}

async fn embeddings_and_models_are_served(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let out = python(
        &s.app.url("/v1"),
        &s.key,
        "embeddings",
        json!({"model": "text-embedding-3-small"}),
    )
    .await;
    assert_eq!(out["count"], 2, "{out}");
    let usage = usage_when(&s.app, 1, "?group_by=model").await;
    assert_eq!(usage["data"][0]["input_tokens"], 5);
    assert_eq!(usage["data"][0]["cost"], "0.0000001");
    let (st, models) = s.app.get_as(Some(&s.key), "/v1/models").await;
    assert_eq!(st, StatusCode::OK);
    let gpt = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-4o")
        .unwrap();
    // The customer's price per token: 0.0000025 / 0.13, half-even to 18 places.
    assert_eq!(gpt["pricing"]["prompt"], "0.000019230769230769");
    let (st, _) = s.app.get_as(Some(ADMIN_KEY), "/v1/models").await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = s.app.get_as(None, "/v1/models").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

async fn shutdown_drains_every_pending_event(backend: Backend) {
    let mut s = setup(backend, MockConfig::default(), "").await;
    for (status, _, body) in concurrent_calls(&s.app, &s.key, 100, json!({})).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Every call was answered; stop at once and let the meter drain.
    s.app.stop().await;
    assert_eq!(s.app.event_count().await, 100);
}

async fn prepaid_customer(app: &TestApp, id: &str, credit: &str) -> String {
    let (st, body) = app
        .post(
            "/v1/customers",
            &json!({"id": id, "name": "Prepaid", "billing_mode": "prepaid"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["billing_mode"], "prepaid");
    let (st, body) = app
        .post(
            &format!("/v1/customers/{id}/wallet/credits"),
            &json!({"amount": credit, "currency": "USD", "kind": "purchased"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    app.key_for(id).await
}

async fn wallet(app: &TestApp, id: &str) -> Value {
    let (st, body) = app.get(&format!("/v1/customers/{id}/wallet")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    body
}

async fn prepaid_calls_settle_to_their_price_and_get_402_when_short(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let key = prepaid_customer(&s.app, "pre", "0.25").await;
    let gw = s.app.url("/v1");
    // "flat": completion 0.0013/token → price 0.01 per token. max_tokens 10 reserves 0.10;
    // the mock answers 4 tokens, so the call settles at 0.04.
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 10, "mock": {"completion_tokens": 4}}),
    )
    .await;
    assert!(out.get("response").is_some(), "{out}");
    usage_when(&s.app, 1, "").await;
    let w = wallet(&s.app, "pre").await;
    assert_eq!(
        (
            w["balance"].clone(),
            w["reserved"].clone(),
            w["available"].clone()
        ),
        (json!("0.21"), json!("0"), json!("0.21"))
    );
    let charge = w["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "charge")
        .unwrap()
        .clone();
    assert_eq!(charge["amount"], "-0.04");
    // 0.21 left: a call that may cost up to 0.30 is refused before reaching the upstream.
    let before = mock_requests(&s.mock).await.len();
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 30}),
    )
    .await;
    assert_eq!(out["status_error"], 402, "{out}");
    assert_eq!(out["body"]["code"], "insufficient_credits");
    assert!(
        out["body"]["message"].as_str().unwrap().contains("0.3"),
        "{out}"
    );
    assert_eq!(
        mock_requests(&s.mock).await.len(),
        before,
        "nothing forwarded"
    );
    // A failed upstream call releases its reservation entirely.
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 10, "mock": {"status": 500}}),
    )
    .await;
    assert_eq!(out["status_error"], 500, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while wallet(&s.app, "pre").await["reserved"] != "0" {
        assert!(
            Instant::now() < deadline,
            "the reservation was never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(wallet(&s.app, "pre").await["balance"], "0.21");
    // A model without a price cannot be charged: refused.
    let out = python(&gw, &key, "chat", json!({"model": "unpriced-model"})).await;
    assert_eq!(out["status_error"], 403, "{out}");
    assert_eq!(out["body"]["code"], "model_not_priced");
}

async fn concurrent_calls_cannot_overspend_a_prepaid_balance(backend: Backend) {
    let s = setup(
        backend,
        MockConfig {
            latency: Duration::from_millis(300),
            ..MockConfig::default()
        },
        "",
    )
    .await;
    // Each call reserves (and, answering 10 tokens, costs) exactly 0.10: 1.00 pays for 10.
    let key = prepaid_customer(&s.app, "pre", "1.00").await;
    let mut statuses = std::collections::BTreeMap::new();
    for (status, _, _) in concurrent_calls(
        &s.app,
        &key,
        200,
        json!({"model": "flat", "max_tokens": 10}),
    )
    .await
    {
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
    assert_eq!(statuses.get(&402), Some(&190), "{statuses:?}");
    assert_eq!(
        mock_requests(&s.mock).await.len(),
        10,
        "only reserved calls reached the upstream"
    );
    usage_when(&s.app, 10, "").await;
    let w = wallet(&s.app, "pre").await;
    assert_eq!(
        (w["balance"].clone(), w["reserved"].clone()),
        (json!("0"), json!("0")),
        "{w}"
    );
    let charges: Vec<&Value> = w["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "charge")
        .collect();
    assert_eq!(charges.len(), 10);
    assert!(charges.iter().all(|c| c["amount"] == "-0.1"), "{charges:?}");
}

async fn wallet_credits_are_validated_and_wallets_isolated(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let key = prepaid_customer(&s.app, "pre", "5").await;
    for bad in [
        json!({"amount": "-1", "currency": "USD", "kind": "purchased"}),
        json!({"amount": "0", "currency": "USD", "kind": "purchased"}),
        json!({"amount": "1.001", "currency": "USD", "kind": "purchased"}),
        json!({"amount": "ten", "currency": "USD", "kind": "purchased"}),
        json!({"amount": "1", "currency": "BRL", "kind": "purchased"}),
        json!({"amount": "1", "currency": "USD", "kind": "gift"}),
        json!({"amount": "1", "currency": "USD", "kind": "granted", "expires_at": "2000-01-01T00:00:00Z"}),
        json!({"amount": 1, "currency": "USD", "kind": "granted"}),
    ] {
        let (st, body) = s.app.post("/v1/customers/pre/wallet/credits", &bad).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let (st, _) = s
        .app
        .post(
            "/v1/customers/nobody/wallet/credits",
            &json!({"amount": "1", "currency": "USD", "kind": "granted"}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = s
        .app
        .post_as(
            Some(&key),
            "/v1/customers/pre/wallet/credits",
            &json!({"amount": "1", "currency": "USD", "kind": "granted"}),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "customers cannot credit themselves"
    );
    let w = wallet(&s.app, "pre").await;
    assert_eq!(w["balance"], "5");
    assert_eq!(
        w["transactions"].as_array().unwrap().len(),
        1,
        "rejected credits wrote nothing"
    );
    let (st, own) = s.app.get_as(Some(&key), "/v1/customers/pre/wallet").await;
    assert_eq!((st, own["available"].clone()), (StatusCode::OK, json!("5")));
    let (st, _) = s.app.get_as(Some(&key), "/v1/customers/acme/wallet").await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // Movements come in pages, oldest first: five credits in pages of two.
    for n in 1..=4 {
        let (st, body) = s
            .app
            .post(
                "/v1/customers/pre/wallet/credits",
                &json!({"amount": format!("{n}"), "currency": "USD", "kind": "granted"}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
    }
    let all = wallet(&s.app, "pre").await;
    assert_eq!(all["next_after"], Value::Null, "{all}");
    let all: Vec<Value> = all["transactions"].as_array().unwrap().clone();
    assert_eq!(all.len(), 5);
    let mut paged = Vec::new();
    let mut pages = 0;
    let mut path = "/v1/customers/pre/wallet?limit=2".to_string();
    loop {
        let (st, page) = s.app.get_as(Some(&key), &path).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        pages += 1;
        let txs = page["transactions"].as_array().unwrap();
        assert!(txs.len() <= 2, "{page}");
        paged.extend(txs.iter().cloned());
        match page["next_after"].as_str() {
            Some(after) => {
                assert_eq!(txs.last().unwrap()["id"], after);
                path = format!("/v1/customers/pre/wallet?limit=2&after={after}");
            }
            None => break,
        }
    }
    assert_eq!((pages, paged), (3, all.clone()));
    let first = all[0]["id"].as_str().unwrap();
    for bad in [
        "limit=0".to_string(),
        "limit=10001".into(),
        "limit=two".into(),
        "after=wtx_nope".into(),
        "cursor=1".into(),
    ] {
        let (st, body) = s.app.get(&format!("/v1/customers/pre/wallet?{bad}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // Another wallet's movement is no cursor here.
    let (st, body) = s
        .app
        .get(&format!("/v1/customers/acme/wallet?after={first}"))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    // Prepaid wallets are USD until exchange rates exist.
    let (st, body) = s
        .app
        .post(
            "/v1/customers",
            &json!({"name": "BR", "currency": "BRL", "billing_mode": "prepaid"}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

async fn reservations_charges_and_model_prices_follow_the_customers_plan(backend: Backend) {
    let s = setup(backend, MockConfig::default(), "").await;
    let key = prepaid_customer(&s.app, "pre", "1.00").await;
    // A list plan: "flat" at 20,000 per 1M completion tokens = 0.02 per token, twice the
    // default cost-plus price (0.0013 / 0.13 = 0.01).
    let (st, body) = s
        .app
        .post(
            "/v1/plans",
            &json!({"id": "dear", "name": "Dear", "currency": "USD", "kind": "list",
                    "list_prices": [{"pattern": "flat", "prompt": "0", "completion": "20000"}],
                    "effective_from": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, body) = s
        .app
        .patch(
            "/v1/customers/pre",
            &json!({"plan_id": "dear", "plan_effective_from": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, models) = s.app.get_as(Some(&key), "/v1/models").await;
    assert_eq!(st, StatusCode::OK);
    let flat = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "flat")
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(flat["pricing"]["completion"], "0.02", "{flat}");
    assert_eq!(flat["pricing"]["currency"], "USD");
    // max_tokens 60 reserves 60 × 0.02 = 1.20 > 1.00: refused (it would pass at the
    // default price, 0.60).
    let gw = s.app.url("/v1");
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 60}),
    )
    .await;
    assert_eq!(out["status_error"], 402, "{out}");
    // 4 completion tokens settle at 4 × 0.02 = 0.08.
    let out = python(
        &gw,
        &key,
        "chat",
        json!({"model": "flat", "max_tokens": 10, "mock": {"completion_tokens": 4}}),
    )
    .await;
    assert!(out.get("response").is_some(), "{out}");
    usage_when(&s.app, 1, "").await;
    let w = wallet(&s.app, "pre").await;
    assert_eq!(w["balance"], "0.92", "{w}");
}

/// Polls `GET path` until `pred` holds (webhooks arrive about a second after the charge).
async fn eventually(app: &TestApp, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = app.get(path).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{path} never got there: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sign(secret: &str, t: i64, payload: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{payload}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn invoices_are_collected_through_stripe_end_to_end(backend: Backend) {
    let ls = localstripe().await;
    let processor = std::sync::Arc::new(fatura_server::payments::StripeProcessor::new(
        &ls.base,
        STRIPE_KEY,
        WEBHOOK_SECRET,
    ));
    let policy = fatura_server::payments::CollectionPolicy {
        max_attempts: 2,
        retry_after: chrono::Duration::zero(),
    };
    let s = setup_full(
        backend,
        MockConfig::default(),
        "",
        Some((processor, policy)),
    )
    .await;
    let app = &s.app;
    let gw = app.url("/v1");
    let hook = stripe_post(
        &ls,
        "/_config/webhooks/fatura",
        &[
            ("url", &app.url("/v1/webhooks/stripe")),
            ("secret", WEBHOOK_SECRET),
        ],
    )
    .await;
    let _ = hook;
    // acme pays by a working card; "bad" by one that attaches but declines.
    let good = card(&ls, "4242424242424242").await;
    let (st, c) = app
        .post(
            "/v1/customers/acme/payment-methods",
            &json!({"payment_method": good}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    app.customer("bad").await;
    let bad_key = app.key_for("bad").await;
    let declining = card(&ls, "4000000000000341").await;
    let (st, c) = app
        .post(
            "/v1/customers/bad/payment-methods",
            &json!({"payment_method": declining}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    // Usage through the gateway: "flat" at 0.01 per completion token (default plan), 100
    // tokens → 1.00 each.
    for key in [&s.key, &bad_key] {
        let out = python(
            &gw,
            key,
            "chat",
            json!({"model": "flat", "max_tokens": 200, "mock": {"completion_tokens": 100}}),
        )
        .await;
        assert!(out.get("response").is_some(), "{out}");
    }
    usage_when(app, 2, "").await;
    // The cycle closes: run after its end plus the grace period.
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(chrono::Utc::now());
    let at = (end + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (st, r) = app
        .post(&format!("/v1/billing/run?at={at}"), &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let acme_inv = r["finalized"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["customer_id"] == "acme")
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    assert_eq!(acme_inv["total"], "1.00");
    let id = acme_inv["id"].as_str().unwrap();
    // Charged in localstripe for exactly its total; the signed webhook marks it paid.
    let paid = eventually(app, &format!("/v1/invoices/{id}"), |v| {
        v["status"] == "paid"
    })
    .await;
    let pi = paid["payment_reference"].as_str().unwrap();
    let intent = stripe_get(&ls, &format!("/v1/payment_intents/{pi}")).await;
    assert_eq!(intent["amount"], 100, "{intent}");
    assert_eq!(intent["currency"], "usd");
    assert_eq!(intent["status"], "succeeded");
    assert_eq!(intent["metadata"]["fatura_invoice_id"], id);
    // A credit note on a paid invoice refunds the money through the same payment.
    let (st, cn) = app
        .post(
            &format!("/v1/invoices/{id}/credit-notes"),
            &json!({"amount": "0.40", "reason": "service credit"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{cn}");
    let intent = stripe_get(&ls, &format!("/v1/payment_intents/{pi}")).await;
    assert_eq!(
        intent["charges"]["data"][0]["amount_refunded"], 40,
        "{intent}"
    );
    // The declining card: attempt 1 failed at finalisation; a second run retries; after 2
    // failures the customer is suspended and the gateway answers 402 with the reason.
    let bad_inv = r["finalized"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["customer_id"] == "bad")
        .unwrap()
        .clone();
    let bad_id = bad_inv["id"].as_str().unwrap().to_string();
    let (st, _) = app
        .post(&format!("/v1/billing/run?at={at}"), &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let failed = eventually(app, &format!("/v1/invoices/{bad_id}"), |v| {
        v["payment_attempts"] == 2
    })
    .await;
    assert_eq!(failed["status"], "open");
    assert!(
        failed["last_payment_error"]
            .as_str()
            .unwrap()
            .contains("declined"),
        "{failed}"
    );
    let (_, c) = app.get("/v1/customers/bad").await;
    assert_eq!(c["status"], "suspended", "{c}");
    let out = python(
        &gw,
        &bad_key,
        "chat",
        json!({"model": "flat", "max_tokens": 5}),
    )
    .await;
    assert_eq!(out["status_error"], 402, "{out}");
    assert_eq!(out["body"]["code"], "account_suspended");
    let (_, alerts) = app.get("/v1/alerts").await;
    let kinds: Vec<&str> = alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"payment_failed") && kinds.contains(&"customer_suspended"),
        "{kinds:?}"
    );
    // A working card is tried at once; once paid, the customer is active again.
    let good2 = card(&ls, "4242424242424242").await;
    let (st, _) = app
        .post(
            "/v1/customers/bad/payment-methods",
            &json!({"payment_method": good2}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    eventually(app, &format!("/v1/invoices/{bad_id}"), |v| {
        v["status"] == "paid"
    })
    .await;
    eventually(app, "/v1/customers/bad", |v| v["status"] == "active").await;
    let out = python(
        &gw,
        &bad_key,
        "chat",
        json!({"model": "flat", "max_tokens": 5}),
    )
    .await;
    assert!(out.get("response").is_some(), "{out}");
    // A wallet top-up goes the same way: charged, confirmed by webhook, credited once.
    let (st, _) = app
        .post(
            "/v1/customers",
            &json!({"id": "pre", "name": "Prepaid", "billing_mode": "prepaid"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = app
        .post(
            "/v1/customers/pre/payment-methods",
            &json!({"payment_method": card(&ls, "4242424242424242").await}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, p) = app
        .post(
            "/v1/customers/pre/wallet/top-ups",
            &json!({"amount": "25.00"}),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{p}");
    eventually(app, "/v1/customers/pre/wallet", |w| w["balance"] == "25").await;
    // Automatic top-up: under a 30.00 threshold, 20.00 is charged on the next run, once.
    let (st, c) = app
        .patch(
            "/v1/customers/pre",
            &json!({"auto_top_up_threshold": "30.00", "auto_top_up_amount": "20.00"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_eq!(c["auto_top_up_amount"], "20.00");
    for _ in 0..2 {
        let (st, _) = app
            .post(&format!("/v1/billing/run?at={at}"), &json!({}))
            .await;
        assert_eq!(st, StatusCode::OK);
    }
    eventually(app, "/v1/customers/pre/wallet", |w| w["balance"] == "45").await;
    let (st, _) = app
        .patch(
            "/v1/customers/acme",
            &json!({"auto_top_up_threshold": "1", "auto_top_up_amount": "5"}),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::UNPROCESSABLE_ENTITY,
        "postpaid customers have no wallet to top up"
    );
    // Webhooks: a bad signature, a stale one, a repeated event id change nothing.
    let payload = json!({"id": "evt_test_1", "type": "payment_intent.succeeded",
        "data": {"object": {"id": "pi_x", "metadata": {"fatura_payment_id": p["id"]}}}})
    .to_string();
    let post_hook = |sig: String, body: String| {
        let client = app.client.clone();
        let url = app.url("/v1/webhooks/stripe");
        async move {
            let r = client
                .post(url)
                .header("Stripe-Signature", sig)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status();
            (st, r.json::<Value>().await.unwrap())
        }
    };
    let now = chrono::Utc::now().timestamp();
    let (st, _) = post_hook(sign("whsec_wrong", now, &payload), payload.clone()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = post_hook(sign(WEBHOOK_SECRET, now - 301, &payload), payload.clone()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, body) = post_hook(sign(WEBHOOK_SECRET, now, &payload), payload.clone()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = post_hook(sign(WEBHOOK_SECRET, now, &payload), payload.clone()).await;
    assert_eq!(
        (st, body["result"].clone()),
        (StatusCode::OK, json!("duplicate"))
    );
    let (_, w) = app.get("/v1/customers/pre/wallet").await;
    assert_eq!(
        w["balance"], "45",
        "a replayed confirmation credits nothing more"
    );
    let (_, alerts) = app.get("/v1/alerts").await;
    for kind in ["invoice_finalized", "low_balance"] {
        assert!(
            alerts["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["kind"] == kind),
            "{kind}: {alerts}"
        );
    }
}

async fn prepaid_usage_is_invoiced_as_paid_from_the_wallet_with_the_volume_discount_credited_back(
    backend: Backend,
) {
    let s = setup(backend, MockConfig::default(), "").await;
    let key = prepaid_customer(&s.app, "pre", "1.00").await;
    // "flat" at 0.02 per completion token (list), 25% off beyond 0.10 of spend (graduated).
    // The floor is 0.0013 / 0.13 = 0.01 per token: the discount stays above it.
    let (st, body) = s
        .app
        .post(
            "/v1/plans",
            &json!({"id": "tiered", "name": "Tiered", "currency": "USD", "kind": "list",
                    "list_prices": [{"pattern": "flat", "prompt": "0", "completion": "20000"}],
                    "tiers": {"metric": "spend", "mode": "graduated", "tiers": [
                        {"up_to": "0.10", "discount": "0"}, {"up_to": null, "discount": "0.25"}]},
                    "effective_from": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, _) = s
        .app
        .patch(
            "/v1/customers/pre",
            &json!({"plan_id": "tiered", "plan_effective_from": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // Four calls of 10 tokens: each charged 10 × 0.02 = 0.20 to the wallet (no discount is
    // known per call): 0.80 in all, 0.20 left.
    for _ in 0..4 {
        let out = python(
            &s.app.url("/v1"),
            &key,
            "chat",
            json!({"model": "flat", "max_tokens": 10, "mock": {"completion_tokens": 10}}),
        )
        .await;
        assert!(out.get("response").is_some(), "{out}");
    }
    usage_when(&s.app, 4, "").await;
    assert_eq!(wallet(&s.app, "pre").await["balance"], "0.2");
    // The cycle's rating: 0.10 at full price + 0.70 at 25% off (0.525) = 0.625 → 0.62
    // (half-even). The wallet paid 0.80: 0.62 applied, 0.18 credited back; nothing is due.
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(chrono::Utc::now());
    let at = (end + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (st, r) = s
        .app
        .post(&format!("/v1/billing/run?at={at}"), &json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let inv = r["finalized"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["customer_id"] == "pre")
        .unwrap()
        .clone();
    assert_eq!(inv["total"], "0.62", "{inv}");
    assert_eq!(inv["prepaid_applied"], "0.62");
    assert_eq!(inv["prepaid_excess"], "0.18");
    assert_eq!(inv["amount_due"], "0.00");
    assert_eq!(inv["status"], "paid", "nothing to collect");
    assert_eq!(wallet(&s.app, "pre").await["balance"], "0.38");
    let w = wallet(&s.app, "pre").await;
    let stored = s
        .app
        .fatura
        .stored_wallet_balance("pre", chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(
        w["balance"].as_str().unwrap(),
        stored.normalize().to_string()
    );
}

/// Waits, if needed, until at least `secs` seconds remain in the current UTC minute (the
/// limits count per minute): the calls below then fall in one window.
async fn within_one_minute(secs: i64) {
    let left = 60 - chrono::Utc::now().timestamp().rem_euclid(60);
    if left < secs {
        tokio::time::sleep(Duration::from_secs(u64::try_from(left).unwrap() + 1)).await;
    }
}

async fn per_key_rate_limits_answer_429_with_retry_after(backend: Backend) {
    let s = setup(
        backend,
        MockConfig::default(),
        "requests_per_minute = 2\ntokens_per_minute = 1000",
    )
    .await;
    let other_key = s.app.key_for("acme").await;
    let chat = |max_tokens: u64| {
        json!({"model": "gpt-4o", "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": "hello there"}]})
    };
    let post = |key: String, body: Value| {
        let app = &s.app;
        async move {
            app.client
                .post(app.url("/v1/chat/completions"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    within_one_minute(15).await;
    // Requests: two per key per minute; the third is refused and forwards nothing.
    for _ in 0..2 {
        assert_eq!(post(s.key.clone(), chat(10)).await.status(), StatusCode::OK);
    }
    let r = post(s.key.clone(), chat(10)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        mock_requests(&s.mock).await.len(),
        2,
        "the refused call was not forwarded"
    );
    // Tokens: counted at admission as prompt + max_tokens; another key has its own window.
    assert_eq!(
        post(other_key.clone(), chat(900)).await.status(),
        StatusCode::OK
    );
    let r = post(other_key.clone(), chat(900)).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "1,800+ tokens > 1,000"
    );
    assert_eq!(mock_requests(&s.mock).await.len(), 3);
}
