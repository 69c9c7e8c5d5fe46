//! HTTP tests of the pricing engine: plans of each kind and tier mode with hand-checked
//! amounts, the margin floor after a catalog price rise, BRL with recorded exchange rates,
//! plan versions and mid-cycle changes, and validation. Run on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, TestApp, catalog, event};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    cost_plus_plan_with_graduated_token_tiers,
    list_plan_is_raised_to_the_floor_after_an_upstream_price_rise,
    brl_customer_is_rated_at_the_recorded_rate,
    plan_changes_mid_cycle_are_rated_per_period,
    bad_plans_rates_and_assignments_are_refused_and_change_nothing,
);

async fn plan(app: &TestApp, body: Value) -> Value {
    let (s, out) = app.post("/v1/plans", &body).await;
    assert_eq!(s, StatusCode::CREATED, "{out}");
    out
}

async fn assign(app: &TestApp, customer: &str, plan: &str, from: &str) {
    let (s, out) = app
        .patch(
            &format!("/v1/customers/{customer}"),
            &json!({"plan_id": plan, "plan_effective_from": from}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out["id"], customer);
}

async fn events(app: &TestApp, list: Vec<Value>) {
    let (s, body) = app.post("/v1/events", &json!({ "events": list })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

async fn upcoming(app: &TestApp, customer: &str, at: &str) -> Value {
    let (s, body) = app
        .get(&format!("/v1/customers/{customer}/upcoming?at={at}"))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

async fn cost_plus_plan_with_graduated_token_tiers(backend: Backend) {
    let app = TestApp::start(backend).await;
    // gpt-4o-mini: $0.15 per 1M prompt tokens.
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o-mini", "0.00000015", "0.0000006")],
    )
    .await;
    let p = plan(
        &app,
        json!({
            "id": "growth", "name": "Growth", "currency": "USD", "kind": "cost_plus", "margin": "0.9",
            "tiers": {"metric": "tokens", "mode": "graduated", "tiers": [
                {"up_to": "1000000", "discount": "0"},
                {"up_to": "2000000", "discount": "0.1"},
                {"up_to": null, "discount": "0.2"}]},
            "included_credits": "1.00",
            "effective_from": "2026-01-01T00:00:00Z"
        }),
    )
    .await;
    assert_eq!(p["version"], 1);
    assert_eq!(p["margin_floor"], "0.87");
    app.customer("c1").await;
    assign(&app, "c1", "growth", "2026-11-01T00:00:00Z").await;
    let (_, c) = app.get("/v1/customers/c1").await;
    assert_eq!(c["plan_id"], "growth");
    events(
        &app,
        vec![
            event("t1", "c1", json!({"timestamp": "2026-11-02T10:00:00Z", "model": "openai/gpt-4o-mini", "input_tokens": 1_250_000, "output_tokens": 0})),
            event("t2", "c1", json!({"timestamp": "2026-11-03T10:00:00Z", "model": "openai/gpt-4o-mini", "input_tokens": 1_250_000, "output_tokens": 0})),
            // Another month: not in November's cycle.
            event("t0", "c1", json!({"timestamp": "2026-10-30T10:00:00Z", "model": "openai/gpt-4o-mini", "input_tokens": 1_000_000, "output_tokens": 0})),
        ],
    )
    .await;
    // Each event on its own (the provisional price the ledger and the gateway use): cost
    // 1.25M × 0.00000015 = 0.1875, at margin 0.9 → 0.1875 / 0.1 = 1.875; two → 3.75.
    let (_, usage) = app
        .get("/v1/usage?customer_id=c1&from=2026-11-01T00:00:00Z")
        .await;
    assert_eq!(usage["data"][0]["revenue"], "3.75", "{usage}");
    let u = upcoming(&app, "c1", "2026-11-20T00:00:00Z").await;
    assert_eq!(u["period_start"], "2026-11-01T00:00:00Z");
    assert_eq!(u["period_end"], "2026-12-01T00:00:00Z");
    let seg = &u["segments"][0];
    assert_eq!(seg["plan_id"], "growth");
    let line = &seg["lines"][0];
    // 2.5M tokens at $1.50 per 1M (0.375 cost / 0.1) = 3.75. Tiers: 1M at 0% (0), 1M at
    // 10% (0.15), 0.5M at 20% (0.75 × 0.2 = 0.15): discount 0.30 → 3.45. Floor:
    // 0.375 / 0.13 = 2.88, not reached.
    assert_eq!(line["subtotal"], "3.75", "{u}");
    assert_eq!(line["discount"], "0.30");
    assert_eq!(line["amount"], "3.45");
    assert_eq!(line["floor_applied"], Value::Null);
    assert_eq!(line["cost_usd"], "0.375");
    assert_eq!(line["quantities"]["prompt_tokens"], 2_500_000);
    assert_eq!(seg["tiers"][1]["units"], "1000000");
    assert_eq!(seg["tiers"][2]["units"], "500000");
    // Included credit 1.00 → total 2.45.
    assert_eq!(seg["included_credits_applied"], "1.00");
    assert_eq!(u["total"], "2.45");
    // The customer sees its own preview, without cost or margin; not another's.
    let key = app.key_for("c1").await;
    let (s, mine) = app
        .get_as(
            Some(&key),
            "/v1/customers/c1/upcoming?at=2026-11-20T00:00:00Z",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{mine}");
    assert_eq!(mine["total"], "2.45");
    assert!(mine["segments"][0]["lines"][0].get("cost_usd").is_none());
    assert!(mine["segments"][0]["lines"][0].get("margin").is_none());
    app.customer("c2").await;
    let (s, _) = app.get_as(Some(&key), "/v1/customers/c2/upcoming").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Rating is a pure function of the ledger: the same preview again is identical.
    assert_eq!(upcoming(&app, "c1", "2026-11-20T00:00:00Z").await, u);
}

async fn list_plan_is_raised_to_the_floor_after_an_upstream_price_rise(backend: Backend) {
    let app = TestApp::start(backend).await;
    // gpt-4o at $0.20 / $0.80 per 1M.
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000002", "0.0000008")],
    )
    .await;
    plan(
        &app,
        json!({
            "id": "list", "name": "List", "currency": "USD", "kind": "list",
            "list_prices": [{"pattern": "openai/*", "prompt": "2.00", "completion": "8.00"}],
            "tiers": {"metric": "spend", "mode": "volume", "tiers": [
                {"up_to": "100", "discount": "0"}, {"up_to": null, "discount": "0.05"}]},
            "effective_from": "2026-01-01T00:00:00Z"
        }),
    )
    .await;
    app.customer("c1").await;
    assign(&app, "c1", "list", "2026-11-01T00:00:00Z").await;
    let one_m = |id: &str, ts: &str| {
        event(
            id,
            "c1",
            json!({"timestamp": ts, "input_tokens": 1_000_000, "output_tokens": 1_000_000}),
        )
    };
    events(&app, vec![one_m("l1", "2026-11-02T00:00:00Z")]).await;
    // 1M prompt × $2 + 1M completion × $8 = $10.00; cost 0.20 + 0.80 = 1.00, floor
    // 1 / 0.13 = 7.69: the list price holds. Spend 10 is in the first tier (no discount).
    let u = upcoming(&app, "c1", "2026-11-05T00:00:00Z").await;
    let line = &u["segments"][0]["lines"][0];
    assert_eq!(line["amount"], "10.00", "{u}");
    assert_eq!(line["floor_applied"], Value::Null);
    let before_rise = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    // Upstream raises gpt-4o to $0.50 / $2.00 per 1M from Nov 10.
    catalog(
        &app,
        "2026-11-10T00:00:00Z",
        &[("openai/gpt-4o", "0.0000005", "0.000002")],
    )
    .await;
    events(&app, vec![one_m("l2", "2026-11-12T00:00:00Z")]).await;
    // Line: list 2 × 10 = 20.00; cost 1.00 + 2.50 = 3.50; floor 3.50 / 0.13 = 26.923… →
    // the line is raised to 26.92.
    let u = upcoming(&app, "c1", "2026-11-20T00:00:00Z").await;
    let line = &u["segments"][0]["lines"][0];
    assert_eq!(line["subtotal"], "20.00", "{u}");
    assert_eq!(line["amount"], "26.92");
    assert_eq!(line["floor_adjustment"], "6.92");
    assert_eq!(line["floor_applied"], "list_price_below_floor");
    assert_eq!(u["total"], "26.92");
    // The raise is an operator alert.
    let (_, alerts) = app.get("/v1/alerts").await;
    let floor = alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "floor_applied" && a["plan_id"] == "list")
        .unwrap_or_else(|| panic!("no floor alert: {alerts}"));
    assert_eq!(floor["model"], "openai/gpt-4o");
    assert_eq!(floor["reason"], "list_price_below_floor");
    // The catalog change report: old and new prices, and the plan's margin impact:
    // prompt 1 − 0.50 / 2.00 = 0.75 < 0.87.
    let (s, changes) = app
        .get(&format!(
            "/v1/prices/changes?since={}",
            before_rise.replace('+', "%2B")
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{changes}");
    let c = &changes["changes"][0];
    assert_eq!(changes["changes"].as_array().unwrap().len(), 1, "{changes}");
    assert_eq!(c["model"], "openai/gpt-4o");
    assert_eq!(c["change"], "price_change");
    assert_eq!(c["old"]["prompt"], "0.0000002");
    assert_eq!(c["new"]["prompt"], "0.0000005");
    let impact = &changes["margin_impact"][0];
    assert_eq!(impact["plan_id"], "list");
    assert_eq!(impact["below_floor"], true);
    assert_eq!(impact["reason"], "list_price_below_floor");
    let prompt = impact["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "prompt")
        .unwrap();
    assert_eq!(prompt["cost_per_million"], "0.5");
    assert_eq!(prompt["price_per_million"], "2");
    assert_eq!(prompt["margin"], "0.75");
    let (_, alerts) = app.get("/v1/alerts").await;
    assert!(
        alerts["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "margin_risk" && a["plan_id"] == "list"),
        "{alerts}"
    );
}

async fn brl_customer_is_rated_at_the_recorded_rate(backend: Backend) {
    let app = TestApp::start(backend).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    let (s, _) = app
        .post(
            "/v1/customers",
            &json!({"id": "br", "name": "Cliente", "currency": "BRL"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    plan(
        &app,
        json!({"id": "brl", "name": "Plano", "currency": "BRL", "kind": "cost_plus", "margin": "0.9",
               "effective_from": "2026-01-01T00:00:00Z"}),
    )
    .await;
    assign(&app, "br", "brl", "2026-11-01T00:00:00Z").await;
    // 1M prompt × 2.5/M + 100k completion × 10/M = 3.50 USD; margin 0.9 → 35 USD.
    events(
        &app,
        vec![event("r1", "br", json!({"timestamp": "2026-11-03T00:00:00Z", "input_tokens": 1_000_000, "output_tokens": 100_000}))],
    )
    .await;
    // No rate yet: the preview says what is missing.
    let (s, body) = app
        .get("/v1/customers/br/upcoming?at=2026-11-20T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("BRL"),
        "{body}"
    );
    for (date, rate) in [("2026-11-01", "5.0"), ("2026-11-15", "5.3337")] {
        let (s, r) = app
            .post(
                "/v1/fx-rates",
                &json!({"currency": "BRL", "date": date, "rate": rate}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
    }
    // The same rate again is harmless; another one for that day is refused.
    let (s, _) = app
        .post(
            "/v1/fx-rates",
            &json!({"currency": "BRL", "date": "2026-11-15", "rate": "5.3337"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = app
        .post(
            "/v1/fx-rates",
            &json!({"currency": "BRL", "date": "2026-11-15", "rate": "5.4"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, rates) = app.get("/v1/fx-rates?currency=BRL").await;
    assert_eq!(rates["data"].as_array().unwrap().len(), 2);
    assert_eq!(rates["data"][1]["rate"], "5.3337");
    // The rate of the cycle's last day (or the latest before it) applies: 5.3337.
    // 35 USD × 5.3337 = 186.6795 BRL → R$ 186.68 (half-even to centavos, rounded once).
    let u = upcoming(&app, "br", "2026-11-20T00:00:00Z").await;
    assert_eq!(u["currency"], "BRL");
    let line = &u["segments"][0]["lines"][0];
    assert_eq!(line["fx_rate"], "5.3337", "{u}");
    assert_eq!(line["amount"], "186.68");
    assert_eq!(u["total"], "186.68");
}

async fn plan_changes_mid_cycle_are_rated_per_period(backend: Backend) {
    let app = TestApp::start(backend).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    plan(
        &app,
        json!({"id": "a", "name": "A", "currency": "USD", "kind": "cost_plus", "margin": "0.9",
               "monthly_minimum": "60.00", "effective_from": "2026-01-01T00:00:00Z"}),
    )
    .await;
    plan(
        &app,
        json!({"id": "b", "name": "B", "currency": "USD", "kind": "cost_plus", "margin": "0.95",
               "effective_from": "2026-01-01T00:00:00Z"}),
    )
    .await;
    app.customer("c1").await;
    assign(&app, "c1", "a", "2026-11-01T00:00:00Z").await;
    assign(&app, "c1", "b", "2026-11-16T00:00:00Z").await;
    // An assignment before the latest one is refused.
    let (s, _) = app
        .patch(
            "/v1/customers/c1",
            &json!({"plan_id": "a", "plan_effective_from": "2026-11-10T00:00:00Z"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // One identical call (cost 3.50) in each half of November.
    let call = |id: &str, ts: &str| {
        event(
            id,
            "c1",
            json!({"timestamp": ts, "input_tokens": 1_000_000, "output_tokens": 100_000}),
        )
    };
    events(
        &app,
        vec![
            call("m1", "2026-11-05T00:00:00Z"),
            call("m2", "2026-11-20T00:00:00Z"),
        ],
    )
    .await;
    let u = upcoming(&app, "c1", "2026-11-25T00:00:00Z").await;
    let segs = u["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2, "{u}");
    // Nov 1–16 under A (15 of 30 days): 3.50 / 0.1 = 35.00; the minimum 60.00 is prorated
    // to 30.00, already exceeded.
    assert_eq!(segs[0]["plan_id"], "a");
    assert_eq!(segs[0]["cycle_fraction"], "0.5");
    assert_eq!(segs[0]["lines"][0]["amount"], "35.00");
    assert_eq!(segs[0]["minimum_adjustment"], "0.00");
    // Nov 16–Dec 1 under B: 3.50 / 0.05 = 70.00.
    assert_eq!(segs[1]["plan_id"], "b");
    assert_eq!(segs[1]["lines"][0]["amount"], "70.00");
    assert_eq!(u["total"], "105.00");
    // A new version of B from Nov 21 (margin 0.9) splits the cycle again; the past keeps
    // version 1.
    let (s, b2) = app
        .patch(
            "/v1/plans/b",
            &json!({"margin": "0.9", "effective_from": "2026-11-21T00:00:00Z"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b2}");
    assert_eq!(b2["versions"].as_array().unwrap().len(), 2);
    let u = upcoming(&app, "c1", "2026-11-25T00:00:00Z").await;
    assert_eq!(u["segments"].as_array().unwrap().len(), 3, "{u}");
    assert_eq!(u["segments"][1]["plan_version"], 1);
    assert_eq!(u["segments"][2]["plan_version"], 2);
    assert_eq!(u["total"], "105.00");
    // A version may not start before the latest one.
    let (s, _) = app
        .patch(
            "/v1/plans/b",
            &json!({"margin": "0.95", "effective_from": "2026-11-20T00:00:00Z"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn bad_plans_rates_and_assignments_are_refused_and_change_nothing(backend: Backend) {
    let app = TestApp::start(backend).await;
    let base = json!({"name": "P", "currency": "USD", "kind": "cost_plus", "margin": "0.9"});
    let with = |patch: Value| {
        let mut b = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (bad, field) in [
        (with(json!({"margin": "0.5"})), "margin"),
        (with(json!({"margin": "abc"})), "margin"),
        (with(json!({"margin": null})), "margin"),
        (with(json!({"currency": "XYZ"})), "currency"),
        (with(json!({"kind": "magic"})), "kind"),
        (with(json!({"margin_floor": "1.5"})), "margin_floor"),
        (with(json!({"included_credits": "-1"})), "included_credits"),
        (with(json!({"monthly_minimum": "1.001"})), "monthly_minimum"),
        (
            with(json!({"list_prices": [{"pattern": "*", "prompt": "1", "completion": "2"}]})),
            "list_prices",
        ),
        (with(json!({"kind": "list", "margin": null})), "list_prices"),
        (
            with(
                json!({"tiers": {"metric": "tokens", "mode": "graduated", "tiers": [{"up_to": "10", "discount": "0"}]}}),
            ),
            "tiers",
        ),
        (
            with(
                json!({"tiers": {"metric": "tokens", "mode": "graduated", "tiers": [{"up_to": "10", "discount": "0.2"}, {"up_to": null, "discount": "0.1"}]}}),
            ),
            "tiers",
        ),
        (
            with(
                json!({"tiers": {"metric": "calls", "mode": "graduated", "tiers": [{"up_to": null, "discount": "0"}]}}),
            ),
            "tiers.metric",
        ),
        (with(json!({"name": ""})), "name"),
        (with(json!({"id": "bad id!"})), "id"),
    ] {
        let (s, body) = app.post("/v1/plans", &bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad} → {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(field), "{bad}: {msg}");
    }
    let (s, body) = app.post("/v1/plans", &with(json!({"surprise": 1}))).await;
    assert!(s.is_client_error(), "{body}");
    let (_, plans) = app.get("/v1/plans").await;
    assert_eq!(plans["data"], json!([]), "nothing was created");
    // A good plan; then bad changes to it.
    plan(&app, with(json!({"id": "p"}))).await;
    let (s, _) = app.post("/v1/plans", &with(json!({"id": "p"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = app.patch("/v1/plans/p", &json!({"currency": "BRL"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = app.patch("/v1/plans/p", &json!({"margin": "0.1"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = app.patch("/v1/plans/nope", &json!({"margin": "0.9"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, p) = app.get("/v1/plans/p").await;
    assert_eq!(p["versions"].as_array().unwrap().len(), 1, "{p}");
    // Assignments: unknown plan, other currency, unknown customer.
    app.customer("c1").await;
    let (s, _) = app
        .post(
            "/v1/customers",
            &json!({"id": "br", "name": "B", "currency": "BRL"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = app
        .patch("/v1/customers/c1", &json!({"plan_id": "nope"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, body) = app
        .patch("/v1/customers/br", &json!({"plan_id": "p"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (s, _) = app
        .patch("/v1/customers/zz", &json!({"plan_id": "p"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A bad spend limit in the same request writes no assignment either.
    let (s, _) = app
        .patch(
            "/v1/customers/c1",
            &json!({"plan_id": "p", "monthly_spend_limit": "-5"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, c) = app.get("/v1/customers/c1").await;
    assert_eq!(c["plan_id"], Value::Null, "{c}");
    // Rates: USD, bad dates and rates.
    for bad in [
        json!({"currency": "USD", "date": "2026-11-01", "rate": "1"}),
        json!({"currency": "BRL", "date": "2026-13-01", "rate": "5"}),
        json!({"currency": "BRL", "date": "2026-11-01", "rate": "0"}),
        json!({"currency": "BRL", "date": "2026-11-01", "rate": "-5"}),
        json!({"currency": "BRL", "date": "2026-11-01", "rate": "five"}),
    ] {
        let (s, body) = app.post("/v1/fx-rates", &bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad} → {body}");
    }
    let (_, rates) = app.get("/v1/fx-rates").await;
    assert_eq!(rates["data"], json!([]));
    // Admin only.
    let key = app.key_for("c1").await;
    for path in [
        "/v1/plans",
        "/v1/plans/p",
        "/v1/fx-rates",
        "/v1/alerts",
        "/v1/prices/changes",
    ] {
        let (s, _) = app.get_as(Some(&key), path).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
        let (s, _) = app.get_as(None, path).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (s, _) = app
        .post_as(Some(&key), "/v1/plans", &with(json!({"id": "q"})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}
