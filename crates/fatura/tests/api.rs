//! HTTP-level tests of the ingestion, customer, key, price and usage APIs, run against both
//! SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use common::{ADMIN_KEY, Backend, TestApp, event};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    concurrent_retries_of_a_batch_count_each_event_once,
    replays_inside_one_batch_are_duplicates,
    same_id_with_other_content_is_a_conflict_and_writes_nothing,
    invalid_batches_are_rejected_whole_with_each_bad_index,
    oversized_batches_get_413,
    malformed_bodies_get_400_in_the_error_shape,
    costing_carves_cached_and_reasoning_tokens_out_of_totals,
    events_are_costed_at_the_price_version_in_force,
    backdated_imports_may_price_unpriced_events_but_never_reprice_costed_ones,
    unpriced_events_are_accepted_flagged_and_listed,
    litellm_import_of_the_real_file_is_exact_and_idempotent,
    openrouter_import_maps_every_pricing_field,
    bad_catalogs_are_rejected_and_change_nothing,
    usage_groups_and_filters_by_tags,
    customers_are_created_listed_and_validated,
    admin_routes_refuse_anonymous_and_customer_keys,
    customer_keys_read_only_their_own_usage_and_can_be_revoked,
    operations_endpoints_answer,
);

fn details_indexes(body: &Value) -> BTreeSet<u64> {
    body["error"]["details"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .filter_map(|d| d["index"].as_u64())
        .collect()
}

async fn with_openrouter_catalog(backend: Backend) -> TestApp {
    let app = TestApp::start(backend).await;
    let (s, body) = app
        .import(
            "openrouter",
            "openrouter_models.json",
            "&effective_from=2026-01-01T00:00:00Z",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    app
}

async fn total_usage(app: &TestApp, query: &str) -> Value {
    let (s, body) = app.get(&format!("/v1/usage{query}")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

async fn concurrent_retries_of_a_batch_count_each_event_once(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    let events: Vec<Value> = (0..1000)
        .map(|i| event(&format!("b-{i:04}"), "c1", json!({})))
        .collect();
    let batch = json!({ "events": events });
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = app.client.clone();
        let url = app.url("/v1/events");
        let batch = batch.clone();
        tasks.push(tokio::spawn(async move {
            let res = client
                .post(url)
                .bearer_auth(ADMIN_KEY)
                .json(&batch)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.json::<Value>().await.unwrap()
        }));
    }
    let (mut accepted, mut duplicates) = (0, 0);
    for t in tasks {
        let body = t.await.unwrap();
        accepted += body["accepted"].as_u64().unwrap();
        duplicates += body["duplicates"].as_u64().unwrap();
    }
    assert_eq!(accepted, 1000);
    assert_eq!(duplicates, 7000);
    assert_eq!(app.event_count().await, 1000);
    // Each event: 1,000 prompt tokens × 0.0000025 + 100 completion tokens × 0.00001 = 0.0035.
    let usage = total_usage(&app, "").await;
    assert_eq!(usage["data"][0]["events"], 1000);
    assert_eq!(usage["data"][0]["cost"], "3.5");
    // Each event's provisional price is 0.0035 / 0.13 rounded half-even to 18 places
    // (0.026923076923076923); usage sums those exactly.
    assert_eq!(usage["data"][0]["revenue"], "26.923076923076923");
}

async fn replays_inside_one_batch_are_duplicates(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    let e = event("r-1", "c1", json!({}));
    let (s, body) = app
        .post("/v1/events", &json!({"events": [e.clone(), e.clone()]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"accepted": 1, "duplicates": 1, "unpriced": 0}));
    // A retry of the single event, written with another time zone offset: same instant,
    // same content.
    let same = event(
        "r-1",
        "c1",
        json!({"timestamp": "2026-03-01T09:00:00-03:00"}),
    );
    let (s, body) = app.post("/v1/events", &same).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"accepted": 0, "duplicates": 1, "unpriced": 0}));
    assert_eq!(app.event_count().await, 1);
}

async fn same_id_with_other_content_is_a_conflict_and_writes_nothing(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    let (s, _) = app.post("/v1/events", &event("e-1", "c1", json!({}))).await;
    assert_eq!(s, StatusCode::OK);
    let changed = event("e-1", "c1", json!({"input_tokens": 1001}));
    let (s, body) = app.post("/v1/events", &changed).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "event_id_conflict");
    assert_eq!(body["error"]["type"], "conflict_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"e-1\""),
        "{body}"
    );
    // A batch with a new event and a conflicting one: nothing of it is written.
    let batch = json!({"events": [event("e-2", "c1", json!({})), changed]});
    let (s, _) = app.post("/v1/events", &batch).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Conflicting twins inside one batch.
    let twins = json!({"events": [event("e-3", "c1", json!({})), event("e-3", "c1", json!({"tags": {"agent": "x"}}))]});
    let (s, body) = app.post("/v1/events", &twins).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(app.event_count().await, 1);
}

async fn invalid_batches_are_rejected_whole_with_each_bad_index(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    let mut missing_id = event("x", "c1", json!({}));
    missing_id.as_object_mut().unwrap().remove("id");
    let batch = json!({"events": [
        event("ok-0", "c1", json!({})),
        event("bad-1", "c1", json!({"input_tokens": -5})),
        event("bad-2", "c1", json!({"output_tokens": 2.5})),
        event("bad-3", "nobody", json!({})),
        event("bad-4", "c1", json!({"timestamp": "2026-13-01"})),
        event("bad-5", "c1", json!({"model": 42})),
        missing_id,
        event("bad-7", "c1", json!({"input_tokens": 10, "cached_input_tokens": 8, "cache_write_tokens": 3})),
        event("bad-8", "c1", json!({"colour": "red"})),
        event("bad-9", "c1", json!({"output_tokens": 10, "reasoning_tokens": 11})),
        event(&"x".repeat(129), "c1", json!({})),
        event("bad-11", "c1", json!({"upstream_cost": 0.5})),
        event("bad-12", "c1", json!({"tags": {"agent": 7}})),
    ]});
    let (s, body) = app.post("/v1/events", &batch).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_events");
    assert_eq!(
        details_indexes(&body),
        (1..=12).collect::<BTreeSet<u64>>(),
        "{body}"
    );
    let fields: Vec<(u64, String)> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["index"].as_u64().unwrap(),
                d["field"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [
        (1, "input_tokens"),
        (2, "output_tokens"),
        (3, "customer_id"),
        (4, "timestamp"),
        (5, "model"),
        (6, "id"),
        (7, "cached_input_tokens"),
        (8, "colour"),
        (9, "reasoning_tokens"),
        (10, "id"),
        (11, "upstream_cost"),
        (12, "tags.agent"),
    ] {
        assert!(
            fields.contains(&(expected.0, expected.1.to_string())),
            "{expected:?} not in {fields:?}"
        );
    }
    assert_eq!(
        app.event_count().await,
        0,
        "nothing of a rejected batch is written"
    );
    // A single invalid event gets the same shape.
    let (s, body) = app
        .post(
            "/v1/events",
            &event("solo", "c1", json!({"requests": "one"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(details_indexes(&body), BTreeSet::from([0]));
    let (s, _) = app.post("/v1/events", &json!({"events": []})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.event_count().await, 0);
}

async fn oversized_batches_get_413(backend: Backend) {
    let app = TestApp::start(backend).await;
    app.customer("c1").await;
    let events: Vec<Value> = (0..10_001)
        .map(|i| event(&format!("o-{i}"), "c1", json!({})))
        .collect();
    let (s, body) = app.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    // Exactly 10,000 is accepted.
    let events: Vec<Value> = (0..10_000)
        .map(|i| event(&format!("o-{i}"), "c1", json!({})))
        .collect();
    let (s, body) = app.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 10_000);
    // A body over the byte limit is refused in the same error shape.
    let huge = vec![b' '; fatura_server::EVENTS_BODY_LIMIT + 1];
    let (s, body) = app.post_bytes("/v1/events", huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(app.event_count().await, 10_000);
}

async fn malformed_bodies_get_400_in_the_error_shape(backend: Backend) {
    let app = TestApp::start(backend).await;
    for body in [&b"{not json"[..], b"[1,2]", b"{\"events\": 5}", b"\"text\""] {
        let (s, v) = app.post_bytes("/v1/events", body.to_vec()).await;
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().is_some());
    }
    let (s, v) = app.post_bytes("/v1/customers", b"{".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (s, v) = app.get("/v1/nothing-here").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["type"], "not_found_error");
}

async fn costing_carves_cached_and_reasoning_tokens_out_of_totals(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    // claude-sonnet-4: prompt 0.000003, completion 0.000015, cache read 0.0000003, cache
    // write 0.00000375, internal_reasoning "0" (= billed as completion).
    let e = event(
        "cost-1",
        "c1",
        json!({"model": "anthropic/claude-sonnet-4", "input_tokens": 10000, "cached_input_tokens": 6000,
               "cache_write_tokens": 1000, "output_tokens": 2000, "reasoning_tokens": 500,
               "upstream_cost": "0.04455", "tags": {"agent": "sdr-bot"}}),
    );
    let (s, body) = app.post("/v1/events", &e).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // 3,000 × 0.000003 + 6,000 × 0.0000003 + 1,000 × 0.00000375 + 1,500 × 0.000015
    // + 500 × 0.000015 = 0.009 + 0.0018 + 0.00375 + 0.0225 + 0.0075 = 0.04455.
    let usage = total_usage(&app, "?group_by=model").await;
    let row = &usage["data"][0];
    assert_eq!(row["model"], "anthropic/claude-sonnet-4");
    assert_eq!(row["cost"], "0.04455");
    // 0.04455 / (1 − 0.87), rounded half-even to 18 places.
    assert_eq!(row["revenue"], "0.342692307692307692");
    assert_eq!(row["margin"], "0.298142307692307692");
    assert_eq!(row["margin_rate"], "0.87");
    assert_eq!(row["cached_input_tokens"], 6000);
    assert_eq!(row["reasoning_tokens"], 500);
    // deepseek-r1 has its own reasoning price; gpt-4o has cache reads but no cache-write
    // price, so cache writes fall back to the prompt price.
    let e2 = event(
        "cost-2",
        "c1",
        json!({"model": "openai/gpt-4o", "input_tokens": 1000, "cached_input_tokens": 400,
        "cache_write_tokens": 100, "output_tokens": 10}),
    );
    let (s, _) = app.post("/v1/events", &e2).await;
    assert_eq!(s, StatusCode::OK);
    // 500 × 0.0000025 + 400 × 0.00000125 + 100 × 0.0000025 + 10 × 0.00001 = 0.0021
    let usage = total_usage(&app, "?group_by=model&model=openai/gpt-4o").await;
    assert_eq!(usage["data"][0]["cost"], "0.0021");
}

fn or_body(prompt: &str, completion: &str, reasoning: Option<&str>) -> Vec<u8> {
    let mut pricing =
        json!({"prompt": prompt, "completion": completion, "request": "0", "image": "0"});
    if let Some(r) = reasoning {
        pricing["internal_reasoning"] = json!(r);
    }
    serde_json::to_vec(&json!({"data": [{"id": "acme/model", "pricing": pricing}]})).unwrap()
}

async fn events_are_costed_at_the_price_version_in_force(backend: Backend) {
    let app = TestApp::start(backend).await;
    app.customer("c1").await;
    let import = |body: Vec<u8>, at: &str| {
        let path = format!("/v1/prices/import?format=openrouter&effective_from={at}");
        let app = &app;
        async move { app.post_bytes(&path, body).await }
    };
    let v1 = or_body("0.000001", "0.000002", Some("0.000004"));
    let v2 = or_body("0.000002", "0.000003", None);
    let (s, body) = import(v1.clone(), "2026-01-01T00:00:00Z").await;
    assert_eq!(
        (s, body["created"].clone()),
        (StatusCode::OK, json!(1)),
        "{body}"
    );
    let (s, body) = import(v2.clone(), "2026-02-01T00:00:00Z").await;
    assert_eq!(
        (s, body["created"].clone()),
        (StatusCode::OK, json!(1)),
        "{body}"
    );
    // Re-importing unchanged prices creates no versions.
    let (_, body) = import(v1.clone(), "2026-01-01T00:00:00Z").await;
    assert_eq!(
        (body["created"].clone(), body["unchanged"].clone()),
        (json!(0), json!(1)),
        "{body}"
    );
    let (_, body) = import(v2.clone(), "2026-03-01T00:00:00Z").await;
    assert_eq!(
        (body["created"].clone(), body["unchanged"].clone()),
        (json!(0), json!(1)),
        "{body}"
    );

    let usage = json!({"model": "acme/model", "input_tokens": 1000, "output_tokens": 100, "reasoning_tokens": 50});
    let mut events = Vec::new();
    for (id, ts) in [
        ("v-1", "2026-01-15T10:00:00Z"),
        ("v-2", "2026-02-15T10:00:00Z"),
        ("v-edge", "2026-02-01T00:00:00Z"),
    ] {
        let mut e = event(id, "c1", usage.clone());
        e["timestamp"] = json!(ts);
        events.push(e);
    }
    let (s, body) = app.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let by_day = total_usage(&app, "?group_by=day").await;
    let cost_of = |day: &str| {
        by_day["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["day"] == day)
            .unwrap()["cost"]
            .clone()
    };
    // v1: 1,000 × 0.000001 + 50 × 0.000002 + 50 × 0.000004 (own reasoning price) = 0.0013
    assert_eq!(cost_of("2026-01-15"), "0.0013");
    // v2 (no reasoning price): 1,000 × 0.000002 + 100 × 0.000003 = 0.0023; the version
    // starts at its effective_from instant, inclusive.
    assert_eq!(cost_of("2026-02-15"), "0.0023");
    assert_eq!(cost_of("2026-02-01"), "0.0023");

    let (_, prices) = app
        .get("/v1/prices?provider=openrouter&model=acme/model")
        .await;
    assert_eq!(prices["data"].as_array().unwrap().len(), 2);
    let (_, at) = app
        .get("/v1/prices?provider=openrouter&model=acme/model&at=2026-01-31T23:59:59Z")
        .await;
    assert_eq!(at["data"][0]["prompt"], "0.000001");
    assert_eq!(at["data"][0]["reasoning"], "0.000004");
    let (_, at) = app
        .get("/v1/prices?model=acme/model&at=2026-02-01T00:00:00Z")
        .await;
    assert_eq!(at["data"][0]["prompt"], "0.000002");
    assert_eq!(at["data"][0]["reasoning"], Value::Null);
    let (_, before) = app
        .get("/v1/prices?model=acme/model&at=2025-01-01T00:00:00Z")
        .await;
    assert_eq!(before["data"], json!([]));
    let (s, _) = app.get("/v1/prices?at=yesterday").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

async fn backdated_imports_may_price_unpriced_events_but_never_reprice_costed_ones(
    backend: Backend,
) {
    let app = TestApp::start(backend).await;
    app.customer("c1").await;
    let (s, _) = app
        .post_bytes(
            "/v1/prices/import?format=openrouter&effective_from=2026-01-01T00:00:00Z",
            or_body("0.000001", "0.000002", None),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let early = event(
        "early",
        "c1",
        json!({"model": "acme/model", "timestamp": "2025-12-31T00:00:00Z"}),
    );
    let late = event(
        "late",
        "c1",
        json!({"model": "acme/model", "timestamp": "2026-01-10T00:00:00Z"}),
    );
    let (_, body) = app
        .post("/v1/events", &json!({"events": [early, late]}))
        .await;
    assert_eq!(body, json!({"accepted": 2, "duplicates": 0, "unpriced": 1}));
    // A version starting before the costed "late" event would re-price it: refused.
    let (s, body) = app
        .post_bytes(
            "/v1/prices/import?format=openrouter&effective_from=2026-01-05T00:00:00Z",
            or_body("0.000009", "0.000009", None),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("acme/model")
    );
    let (_, prices) = app.get("/v1/prices?model=acme/model").await;
    assert_eq!(
        prices["data"].as_array().unwrap().len(),
        1,
        "the refused import created nothing"
    );
    // A version governing [2025-12-01, 2026-01-01) covers only the unpriced event: it is
    // priced by the import.
    let (s, body) = app
        .post_bytes(
            "/v1/prices/import?format=openrouter&effective_from=2025-12-01T00:00:00Z",
            or_body("0.000005", "0.00001", None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["events_priced"], 1);
    let (_, unpriced) = app.get("/v1/usage/unpriced").await;
    assert_eq!(unpriced["data"], json!([]));
    let usage = total_usage(&app, "?group_by=day").await;
    // early: 1,000 × 0.000005 + 100 × 0.00001 = 0.006; late: 0.001 + 0.0002 = 0.0012.
    assert_eq!(usage["data"][0]["cost"], "0.006");
    assert_eq!(usage["data"][1]["cost"], "0.0012");
}

async fn unpriced_events_are_accepted_flagged_and_listed(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    let e = event(
        "u-1",
        "c1",
        json!({"model": "mystery/model-x", "input_tokens": 50, "output_tokens": 5}),
    );
    let (s, body) = app.post("/v1/events", &e).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["unpriced"], 1);
    let (s, list) = app.get("/v1/usage/unpriced").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["data"][0]["model"], "mystery/model-x");
    assert_eq!(list["data"][0]["events"], 1);
    assert_eq!(list["data"][0]["input_tokens"], 50);
    let usage = total_usage(&app, "").await;
    assert_eq!(usage["data"][0]["unpriced_events"], 1);
    assert_eq!(usage["data"][0]["cost"], "0");
    assert_eq!(
        usage["data"][0]["margin_rate"],
        Value::Null,
        "no revenue: no margin rate, not 0% or 100%"
    );
}

async fn litellm_import_of_the_real_file_is_exact_and_idempotent(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (s, body) = app
        .import(
            "litellm",
            "litellm_model_prices.json",
            "&effective_from=2026-01-01T00:00:00Z",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let models = body["models"].as_u64().unwrap();
    assert!(models > 3000, "{models} models");
    assert_eq!(body["created"].as_u64().unwrap(), models);
    assert!(
        !body["skipped"].as_array().unwrap().is_empty(),
        "image/audio-only entries are skipped with a reason"
    );
    let (_, p) = app.get("/v1/prices?provider=openai&model=gpt-4o").await;
    assert_eq!(p["data"][0]["prompt"], "0.0000025");
    assert_eq!(p["data"][0]["completion"], "0.00001");
    assert_eq!(p["data"][0]["cache_read"], "0.00000125");
    // 1.0000000000000001e-07 in the file is 0.0000001, without binary noise.
    let (_, p) = app
        .get("/v1/prices?provider=opencode_go&model=gpt-6-luna")
        .await;
    assert_eq!(p["data"][0]["prompt"], "0.0000001");
    let (_, p) = app
        .get("/v1/prices?provider=opencode_go&model=muse-spark-1.3-contributor")
        .await;
    assert_eq!(p["data"][0]["completion"], "0.0000002");
    // Unchanged re-import: no new versions, even at a later effective_from.
    let (s, again) = app
        .import(
            "litellm",
            "litellm_model_prices.json",
            "&effective_from=2026-06-01T00:00:00Z",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["created"], 0);
    assert_eq!(again["unchanged"].as_u64().unwrap(), models);
    assert_eq!(again["catalog_revision"], body["catalog_revision"]);
    // Provider filter.
    let (_, only) = app
        .import(
            "litellm",
            "litellm_model_prices.json",
            "&provider=anthropic",
        )
        .await;
    assert!(only["models"].as_u64().unwrap() < 200, "{}", only["models"]);
}

async fn openrouter_import_maps_every_pricing_field(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (s, body) = app.import("openrouter", "openrouter_models.json", "").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["models"], 14);
    assert_eq!(body["skipped"][0]["entry"], "openrouter/auto");
    let (_, p) = app
        .get("/v1/prices?provider=openrouter&model=anthropic/claude-sonnet-4")
        .await;
    let v = &p["data"][0];
    assert_eq!(
        (
            v["prompt"].clone(),
            v["completion"].clone(),
            v["cache_read"].clone(),
            v["cache_write"].clone(),
            v["reasoning"].clone(),
            v["image"].clone()
        ),
        (
            json!("0.000003"),
            json!("0.000015"),
            json!("0.0000003"),
            json!("0.00000375"),
            Value::Null,
            json!("0.0048")
        )
    );
    let (_, p) = app.get("/v1/prices?model=perplexity/sonar").await;
    assert_eq!(
        (
            p["data"][0]["request"].clone(),
            p["data"][0]["web_search"].clone()
        ),
        (json!("0.005"), json!("0.005"))
    );
    let (_, p) = app.get("/v1/prices?model=deepseek/deepseek-r1").await;
    assert_eq!(p["data"][0]["reasoning"], "0.000002");
    // A custom provider name.
    let (s, body) = app
        .import("openrouter", "openrouter_models.json", "&provider=or-eu")
        .await;
    assert_eq!((s, body["created"].clone()), (StatusCode::OK, json!(14)));
}

async fn bad_catalogs_are_rejected_and_change_nothing(backend: Backend) {
    let app = TestApp::start(backend).await;
    let cases: Vec<(&str, Vec<u8>, StatusCode)> = vec![
        (
            "format=openrouter",
            b"{oops".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "format=openrouter",
            b"{\"models\": []}".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "format=litellm",
            b"[]".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("format=csv", b"{}".to_vec(), StatusCode::BAD_REQUEST),
        (
            "format=openrouter&effective_from=soon",
            or_body("1", "1", None),
            StatusCode::BAD_REQUEST,
        ),
        (
            "format=openrouter&colour=red",
            or_body("1", "1", None),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (query, body, want) in cases {
        let (s, v) = app
            .post_bytes(&format!("/v1/prices/import?{query}"), body)
            .await;
        assert_eq!(s, want, "{query}: {v}");
        assert!(v["error"]["message"].is_string());
    }
    let (_, prices) = app.get("/v1/prices").await;
    assert_eq!(prices["data"], json!([]));
    // Same instant, other prices: a conflict, not an overwrite.
    let at = "&effective_from=2026-01-01T00:00:00Z";
    let (s, _) = app
        .post_bytes(
            &format!("/v1/prices/import?format=openrouter{at}"),
            or_body("0.000001", "0.000002", None),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = app
        .post_bytes(
            &format!("/v1/prices/import?format=openrouter{at}"),
            or_body("0.000003", "0.000002", None),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (_, prices) = app.get("/v1/prices").await;
    assert_eq!(prices["data"][0]["prompt"], "0.000001");
}

async fn usage_groups_and_filters_by_tags(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    app.customer("c2").await;
    let events = json!({"events": [
        event("g-1", "c1", json!({"tags": {"agent": "sdr"}, "timestamp": "2026-03-01T10:15:00Z"})),
        event("g-2", "c1", json!({"tags": {"agent": "sdr"}, "timestamp": "2026-03-01T10:45:00Z", "model": "openai/gpt-4o-mini"})),
        event("g-3", "c1", json!({"tags": {"agent": "support"}, "timestamp": "2026-03-01T11:15:00Z"})),
        event("g-4", "c2", json!({"tags": {"agent": "sdr"}, "timestamp": "2026-03-02T09:00:00Z"})),
    ]});
    let (s, _) = app.post("/v1/events", &events).await;
    assert_eq!(s, StatusCode::OK);
    let u = total_usage(&app, "?group_by=customer,hour&tag.agent=sdr").await;
    let rows: Vec<(String, String, u64)> = u["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["customer_id"].as_str().unwrap().into(),
                r["hour"].as_str().unwrap().into(),
                r["events"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("c1".into(), "2026-03-01T10:00:00Z".into(), 2),
            ("c2".into(), "2026-03-02T09:00:00Z".into(), 1)
        ]
    );
    let u = total_usage(
        &app,
        "?customer_id=c1&group_by=model,provider&from=2026-03-01T10:30:00Z&to=2026-03-01T12:00:00Z",
    )
    .await;
    assert_eq!(u["data"].as_array().unwrap().len(), 2);
    assert_eq!(u["data"][0]["provider"], "openrouter");
    // gpt-4o-mini: 1,000 × 0.00000015 + 100 × 0.0000006 = 0.00021
    assert_eq!(u["data"][1]["model"], "openai/gpt-4o-mini");
    assert_eq!(u["data"][1]["cost"], "0.00021");
    for bad in [
        "?group_by=week",
        "?colour=red",
        "?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z",
        "?tag.bad%20name=x",
        "?from=monday",
    ] {
        let (s, v) = app.get(&format!("/v1/usage{bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
}

async fn customers_are_created_listed_and_validated(backend: Backend) {
    let app = TestApp::start(backend).await;
    let (s, c) = app
        .post(
            "/v1/customers",
            &json!({"name": "Loja Exemplo", "currency": "BRL"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cus_"), "{id}");
    assert_eq!(c["currency"], "BRL");
    let (s, got) = app.get(&format!("/v1/customers/{id}")).await;
    assert_eq!(
        (s, got["name"].clone()),
        (StatusCode::OK, json!("Loja Exemplo"))
    );
    app.customer("acme").await;
    let (s, dup) = app
        .post("/v1/customers", &json!({"id": "acme", "name": "Again"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{dup}");
    let (_, list) = app.get("/v1/customers").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    let (s, _) = app.get("/v1/customers/nobody").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for bad in [
        json!({"name": "X", "currency": "JPY"}),
        json!({"name": ""}),
        json!({"currency": "USD"}),
        json!({"name": "X", "id": "has space"}),
        json!({"name": "X", "plan": "gold"}),
    ] {
        let (s, v) = app.post("/v1/customers", &bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let (_, list) = app.get("/v1/customers").await;
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        2,
        "rejected creations wrote nothing"
    );
}

async fn admin_routes_refuse_anonymous_and_customer_keys(backend: Backend) {
    let app = TestApp::start(backend).await;
    app.customer("c1").await;
    let key = app.key_for("c1").await;
    let routes: [(&str, &str); 9] = [
        ("POST", "/v1/events"),
        ("POST", "/v1/customers"),
        ("GET", "/v1/customers"),
        ("GET", "/v1/customers/c1"),
        ("POST", "/v1/customers/c1/keys"),
        ("GET", "/v1/customers/c1/keys"),
        ("DELETE", "/v1/keys/key_x"),
        ("POST", "/v1/prices/import?format=openrouter"),
        ("GET", "/v1/usage/unpriced"),
    ];
    for (method, path) in routes {
        for (who, auth) in [
            ("anonymous", None),
            ("wrong key", Some("fk_not_a_key")),
            ("customer", Some(key.as_str())),
        ] {
            let mut req = app
                .client
                .request(method.parse().unwrap(), app.url(path))
                .json(&json!({}));
            if let Some(k) = auth {
                req = req.bearer_auth(k);
            }
            let res = req.send().await.unwrap();
            let want = if who == "customer" {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(res.status(), want, "{who} {method} {path}");
            let body: Value = res.json().await.unwrap();
            assert!(body["error"]["type"].as_str().unwrap().ends_with("_error"));
        }
    }
    let (s, _) = app.get_as(None, "/v1/usage").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(app.event_count().await, 0);
}

async fn customer_keys_read_only_their_own_usage_and_can_be_revoked(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("a").await;
    app.customer("b").await;
    let (s, created) = app.post("/v1/customers/a/keys", &json!({})).await;
    assert_eq!(s, StatusCode::CREATED);
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["id"].as_str().unwrap().to_string();
    let (s, _) = app
        .post(
            "/v1/events",
            &json!({"events": [event("ia", "a", json!({})), event("ib", "b", json!({}))]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, own) = app.get_as(Some(&key), "/v1/usage?group_by=customer").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(own["data"].as_array().unwrap().len(), 1);
    assert_eq!(own["data"][0]["customer_id"], "a");
    let (s, other) = app.get_as(Some(&key), "/v1/usage?customer_id=b").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{other}");
    // Listing keys never shows the secret.
    let (_, keys) = app.get("/v1/customers/a/keys").await;
    assert_eq!(keys["data"][0]["id"], key_id.as_str());
    assert!(keys["data"][0].get("key").is_none());
    assert!(!keys.to_string().contains(&key));
    let (s, _) = app.post("/v1/customers/nobody/keys", &json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.delete(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get_as(Some(&key), "/v1/usage").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = app.delete(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn operations_endpoints_answer(backend: Backend) {
    let app = with_openrouter_catalog(backend).await;
    app.customer("c1").await;
    let (s, h) = app.get_as(None, "/healthz").await;
    assert_eq!((s, h["status"].clone()), (StatusCode::OK, json!("ok")));
    let (s, r) = app.get_as(None, "/readyz").await;
    let want = if backend == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    assert_eq!((s, r["database"].clone()), (StatusCode::OK, json!(want)));
    let (s, _) = app.post("/v1/events", &event("m-1", "c1", json!({}))).await;
    assert_eq!(s, StatusCode::OK);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("fatura_events_accepted_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("route=\"/v1/events\""), "{metrics}");
    let (s, doc) = app.get_as(None, "/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/v1/events",
        "/v1/customers",
        "/v1/customers/{id}",
        "/v1/customers/{id}/keys",
        "/v1/keys/{id}",
        "/v1/prices",
        "/v1/prices/import",
        "/v1/usage",
        "/v1/usage/unpriced",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains(p), "{p} missing from the OpenAPI document");
    }
    let mut app = app;
    app.stop().await;
}
