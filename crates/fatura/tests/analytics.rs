//! Analytics over rollups: the rollups equal a raw-event recount after random streams with
//! replays, late events and late pricing; timeseries and summary answers, hand-checked; tenant
//! isolation. Run on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use chrono::{DateTime, TimeZone, Utc};
use common::{Backend, TestApp, catalog, event};
use fatura_core::rollup::{Grain, RollupDelta};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    rollups_equal_a_recount_after_random_streams,
    timeseries_and_summary_by_hand,
    minute_rollups_are_kept_for_recent_events_only,
    outcomes_are_idempotent_and_roi_is_value_over_spend,
    forecast_projects_the_cycle_and_when_the_balance_runs_out,
    provider_comparison_costs_the_same_usage_at_other_providers,
    usage_exports_stream_every_matching_event_once,
);

async fn stored_rollups(app: &TestApp) -> RollupDelta {
    let mut all = RollupDelta::new();
    let (from, to) = (
        Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0).unwrap(),
    );
    // Every customer's rows, and the fleet rows.
    let fleet = fatura_core::rollup::Dims {
        bucket: true,
        provider: true,
        model: true,
        ..Default::default()
    };
    for g in Grain::ALL {
        for by in [fatura_core::rollup::Dims::ALL, fleet] {
            for (k, t) in app.fatura.stored_rollups(g, from, to, by).await.unwrap() {
                assert!(all.insert(k, t).is_none());
            }
        }
    }
    all
}

async fn rollups_equal_a_recount_after_random_streams(backend: Backend) {
    for seed in 0..3u64 {
        let app = TestApp::start(backend).await;
        catalog(
            &app,
            "2026-01-01T00:00:00Z",
            &[
                ("openai/gpt-4o", "0.0000025", "0.00001"),
                ("openai/gpt-4o-mini", "0.00000015", "0.0000006"),
            ],
        )
        .await;
        for c in ["c1", "c2", "c3"] {
            app.customer(c).await;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let base: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let mut sent: Vec<Value> = Vec::new();
        for batch in 0..8 {
            let mut events = Vec::new();
            for i in 0..rng.random_range(20..80) {
                // Replays of earlier events (same id, same content) count once.
                if !sent.is_empty() && rng.random_bool(0.15) {
                    events.push(sent[rng.random_range(0..sent.len())].clone());
                    continue;
                }
                let model = ["openai/gpt-4o", "openai/gpt-4o-mini", "acme/unpriced"]
                    [rng.random_range(0..3)];
                // Late events: up to 20 days before the batch's "now".
                let ts = base + chrono::Duration::hours(batch * 24)
                    - chrono::Duration::minutes(rng.random_range(0..20 * 24 * 60));
                let mut extra = json!({
                    "timestamp": ts.to_rfc3339(),
                    "model": model,
                    "input_tokens": rng.random_range(0..100_000),
                    "output_tokens": rng.random_range(0..10_000),
                });
                if rng.random_bool(0.7) {
                    let agent = ["sdr", "support"][rng.random_range(0..2)];
                    extra["tags"] = json!({ "agent": agent });
                }
                let e = event(
                    &format!("s{seed}-b{batch}-{i}"),
                    ["c1", "c2", "c3"][rng.random_range(0..3)],
                    extra,
                );
                sent.push(e.clone());
                events.push(e);
            }
            let (s, body) = app.post("/v1/events", &json!({ "events": events })).await;
            assert_eq!(s, StatusCode::OK, "{body}");
        }
        let before = app.fatura.recount_rollups().await.unwrap();
        assert_eq!(stored_rollups(&app).await, before, "seed {seed}");
        // A late price for the unpriced model prices its events: rollups follow.
        catalog(
            &app,
            "2026-01-01T00:00:00Z",
            &[("acme/unpriced", "0.000001", "0.000002")],
        )
        .await;
        let after = app.fatura.recount_rollups().await.unwrap();
        assert_ne!(before, after, "the backfill changed costs");
        assert!(after.values().all(|t| t.unpriced_events == 0));
        assert_eq!(
            stored_rollups(&app).await,
            after,
            "seed {seed} after pricing"
        );
    }
}

async fn timeseries_and_summary_by_hand(backend: Backend) {
    let app = TestApp::start(backend).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("c1").await;
    app.customer("c2").await;
    // Each call: 1M prompt + 100k completion → cost 3.50, revenue 3.50 / 0.13 = 26.923…
    let call = |id: &str, c: &str, ts: &str, agent: &str| {
        event(
            id,
            c,
            json!({"timestamp": ts, "input_tokens": 1_000_000, "output_tokens": 100_000,
                   "tags": {"agent": agent}}),
        )
    };
    let (s, body) = app
        .post(
            "/v1/events",
            &json!({"events": [
                call("a", "c1", "2026-11-02T10:15:00Z", "sdr"),
                call("b", "c1", "2026-11-02T11:45:00Z", "sdr"),
                call("c", "c1", "2026-11-03T09:00:00Z", "support"),
                call("d", "c2", "2026-11-03T09:30:00Z", "sdr"),
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Cost per day: Nov 2 → 7.00 (two calls), Nov 3 → 7.00.
    let (s, ts) = app
        .get("/v1/analytics/timeseries?metric=cost&grain=day&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::OK, "{ts}");
    let points = ts["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{ts}");
    assert_eq!(points[0]["bucket"], "2026-11-02T00:00:00Z");
    assert_eq!(points[0]["value"], "7");
    assert_eq!(points[1]["value"], "7");
    // Requests per hour for c1 grouped by agent.
    let (_, ts) = app
        .get("/v1/analytics/timeseries?metric=requests&grain=hour&from=2026-11-02T00:00:00Z&to=2026-11-04T00:00:00Z&customer_id=c1&group_by=agent")
        .await;
    let points = ts["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "{ts}");
    assert_eq!(
        (points[0]["group"].clone(), points[0]["value"].clone()),
        (json!("sdr"), json!("1"))
    );
    assert_eq!(points[2]["group"], "support");
    // The same series as CSV.
    let csv = app
        .client
        .get(app.url("/v1/analytics/timeseries?metric=requests&grain=hour&from=2026-11-02T00:00:00Z&to=2026-11-04T00:00:00Z&customer_id=c1&group_by=agent&format=csv"))
        .bearer_auth(common::ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        csv,
        "bucket,group,value\r\n2026-11-02T10:00:00+00:00,sdr,1\r\n2026-11-02T11:00:00+00:00,sdr,1\r\n2026-11-03T09:00:00+00:00,support,1\r\n"
    );
    // Margin per day: (revenue − cost) / revenue; revenue 2 × 26.923076923076923077.
    let (_, ts) = app
        .get("/v1/analytics/timeseries?metric=margin&grain=day&from=2026-11-02T00:00:00Z&to=2026-11-03T00:00:00Z")
        .await;
    assert_eq!(ts["points"][0]["value"], "0.87", "{ts}");
    // Summary of the month: totals, margin vs the 87% target, top lists.
    let (s, sum) = app
        .get("/v1/analytics/summary?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::OK, "{sum}");
    assert_eq!(sum["cost"], "14");
    assert_eq!(sum["requests"], 4);
    assert_eq!(sum["tokens"], 4_400_000);
    assert_eq!(sum["gross_margin"], "0.87");
    assert_eq!(sum["margin_target"], "0.87");
    assert_eq!(sum["top_customers"][0]["name"], "c1");
    assert_eq!(sum["top_customers"][0]["requests"], 3);
    assert_eq!(sum["top_agents"][0]["name"], "sdr");
    assert_eq!(sum["top_models"][0]["name"], "openai/gpt-4o");
    // A ragged range is tiled by hours, days and a month: from 11:00 on Nov 2 (calls b, c,
    // d) and from mid-October to the end of the year (all four).
    let (s, sum) = app
        .get("/v1/analytics/summary?from=2026-11-02T11:00:00Z&to=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::OK, "{sum}");
    assert_eq!(sum["cost"], "10.5");
    assert_eq!(sum["requests"], 3);
    let (_, sum) = app
        .get("/v1/analytics/summary?from=2026-10-15T00:00:00Z&to=2027-01-01T00:00:00Z")
        .await;
    assert_eq!(sum["cost"], "14", "{sum}");
    assert_eq!(sum["top_customers"][1]["name"], "c2");
    // Monthly series.
    let (s, ts) = app
        .get("/v1/analytics/timeseries?metric=cost&grain=month&from=2026-10-01T00:00:00Z&to=2027-01-01T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::OK, "{ts}");
    assert_eq!(
        ts["points"],
        json!([{"bucket": "2026-11-01T00:00:00Z", "value": "14"}])
    );
    // Minute precision is kept for recent events only: an old ragged range is refused.
    let (s, body) = app
        .get("/v1/analytics/summary?from=2026-11-02T10:30:00Z&to=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("minute-grain rollups are kept for the last 48 hours"),
        "{body}"
    );
    // Tenant isolation: a customer key sees only its own; asking for another is refused.
    let key = app.key_for("c2").await;
    let (s, mine) = app
        .get_as(
            Some(&key),
            "/v1/analytics/summary?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(mine["requests"], 1);
    assert!(
        mine.get("cost").is_none() || mine["cost"].is_null(),
        "customers do not see cost: {mine}"
    );
    let (s, _) = app
        .get_as(Some(&key), "/v1/analytics/timeseries?metric=revenue&grain=day&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z&customer_id=c1")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app
        .get_as(Some(&key), "/v1/analytics/timeseries?metric=cost&grain=day&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "cost is operator-only");
    // Bad queries.
    for q in [
        "metric=profit&grain=day&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z",
        "metric=cost&grain=week&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z",
        "metric=cost&grain=day&from=2026-11-05T00:00:00Z&to=2026-11-01T00:00:00Z",
        "metric=cost&grain=day&from=2026-11-01T00:30:00Z&to=2026-11-05T00:00:00Z",
        "metric=cost&grain=minute&from=2026-01-01T00:00:00Z&to=2026-12-01T00:00:00Z",
        "metric=cost&grain=minute&from=2026-11-02T10:00:00Z&to=2026-11-02T11:00:00Z",
        "metric=cost&grain=month&from=2026-11-02T00:00:00Z&to=2026-12-01T00:00:00Z",
        "metric=cost&grain=day&from=2026-11-01T00:00:00Z&to=2026-11-05T00:00:00Z&group_by=color",
    ] {
        let (s, body) = app.get(&format!("/v1/analytics/timeseries?{q}")).await;
        assert!(s.is_client_error(), "{q}: {s} {body}");
    }
}

async fn minute_rollups_are_kept_for_recent_events_only(backend: Backend) {
    let app = TestApp::start(backend).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("c1").await;
    let now = Utc::now();
    let minute = |t: DateTime<Utc>| Grain::Minute.bucket(t);
    let recent = minute(now) - chrono::Duration::minutes(10);
    let old = minute(now) - chrono::Duration::days(3);
    let call = |id: &str, ts: DateTime<Utc>| {
        event(
            id,
            "c1",
            json!({"timestamp": ts.to_rfc3339(), "input_tokens": 1_000_000, "output_tokens": 100_000}),
        )
    };
    let (s, body) = app
        .post(
            "/v1/events",
            &json!({"events": [call("recent", recent), call("old", old)]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let rows = stored_rollups(&app).await;
    let customer = |k: &&fatura_core::rollup::RollupKey| k.customer_id == "c1";
    let minutes: Vec<_> = rows
        .keys()
        .filter(|k| k.grain == Grain::Minute)
        .filter(customer)
        .collect();
    assert_eq!(minutes.len(), 1, "only the recent event has a minute row");
    assert_eq!(minutes[0].bucket, recent);
    assert_eq!(
        rows.keys()
            .filter(|k| k.grain == Grain::Hour)
            .filter(customer)
            .count(),
        2,
        "both have hour rows"
    );
    // The recent minute answers a minute-grain series over the last hour.
    let (from, to) = (
        Grain::Hour.bucket(recent),
        Grain::Hour.bucket(recent) + chrono::Duration::hours(1),
    );
    let (s, ts) = app
        .get(&format!(
            "/v1/analytics/timeseries?metric=cost&grain=minute&from={}&to={}",
            from.format("%Y-%m-%dT%H:%M:%SZ"),
            to.format("%Y-%m-%dT%H:%M:%SZ")
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{ts}");
    assert_eq!(ts["points"][0]["value"], "3.5", "{ts}");
    // The month so far is read as the month's rows minus the rest of the month: an event
    // dated later this month (a clock ahead) is subtracted exactly.
    let month = Grain::Month.bucket(now);
    let to = Grain::Minute.next(now);
    let later = (to + chrono::Duration::hours(1))
        .min(Grain::Month.next(now) - chrono::Duration::minutes(1));
    let (s, body) = app
        .post("/v1/events", &json!({"events": [call("later", later)]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let expected = [recent, old, later]
        .iter()
        .filter(|t| **t >= month && **t < to)
        .count();
    let (s, sum) = app
        .get(&format!(
            "/v1/analytics/summary?from={}&to={}",
            month.format("%Y-%m-%dT%H:%M:%SZ"),
            to.format("%Y-%m-%dT%H:%M:%SZ")
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{sum}");
    assert_eq!(sum["requests"], expected, "{sum}");
    assert_eq!(
        sum["cost"],
        (rust_decimal::Decimal::new(35, 1) * rust_decimal::Decimal::from(expected))
            .normalize()
            .to_string(),
        "{sum}"
    );
    // Two days later the minute row is past its retention and pruned; the hour, day and
    // month rows stay, and still equal a recount.
    let pruned = app
        .fatura
        .prune_minute_rollups(now + chrono::Duration::days(3))
        .await
        .unwrap();
    assert_eq!(
        pruned, 4,
        "the customer's and the fleet's minute rows of two events"
    );
    let rows = stored_rollups(&app).await;
    assert!(rows.keys().all(|k| k.grain != Grain::Minute));
    let recount = app.fatura.recount_rollups().await.unwrap();
    let without_minutes = |d: &RollupDelta| -> RollupDelta {
        d.iter()
            .filter(|(k, _)| k.grain != Grain::Minute)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(without_minutes(&recount), rows);
}

async fn outcomes_are_idempotent_and_roi_is_value_over_spend(backend: Backend) {
    let app = TestApp::start(backend).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("c1").await;
    // Calls: cost 3.50 each, revenue 3.50 / 0.13 = 26.923076923076923077 each.
    let call = |id: &str, agent: &str| {
        event(
            id,
            "c1",
            json!({"timestamp": "2026-11-02T10:00:00Z", "input_tokens": 1_000_000,
                   "output_tokens": 100_000, "tags": {"agent": agent}}),
        )
    };
    let (s, body) = app
        .post(
            "/v1/events",
            &json!({"events": [call("a", "sdr"), call("b", "sdr"), call("c", "support")]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let outcome = |id: &str, agent: &str, value: &str, currency: &str| {
        json!({"id": id, "customer_id": "c1", "timestamp": "2026-11-03T00:00:00Z",
               "tags": {"agent": agent}, "value": value, "currency": currency, "kind": "conversion"})
    };
    let batch = json!({"outcomes": [
        outcome("o1", "sdr", "100.00", "USD"),
        outcome("o2", "sdr", "500", "BRL"),
        outcome("o3", "support", "50", "USD"),
    ]});
    let (s, r) = app.post("/v1/outcomes", &batch).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["accepted"].clone(), r["duplicates"].clone()),
        (json!(3), json!(0))
    );
    let (s, r) = app.post("/v1/outcomes", &batch).await;
    assert_eq!(
        (s, r["duplicates"].clone()),
        (StatusCode::OK, json!(3)),
        "{r}"
    );
    let (s, _) = app
        .post(
            "/v1/outcomes",
            &json!({"outcomes": [outcome("o1", "sdr", "101", "USD")]}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "same id, other content");
    for bad in [
        outcome("o9", "sdr", "-1", "USD"),
        outcome("o9", "sdr", "abc", "USD"),
        outcome("o9", "sdr", "1", "XYZ"),
        json!({"id": "o9", "customer_id": "nobody", "timestamp": "2026-11-03T00:00:00Z", "value": "1", "currency": "USD", "kind": "x"}),
    ] {
        let (s, body) = app
            .post("/v1/outcomes", &json!({"outcomes": [bad.clone()]}))
            .await;
        assert!(s.is_client_error(), "{bad}: {body}");
    }
    let q = "/v1/analytics/roi?group_by=agent&from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z";
    // The BRL outcome needs a rate.
    let (s, body) = app.get(q).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (s, _) = app
        .post(
            "/v1/fx-rates",
            &json!({"currency": "BRL", "date": "2026-11-01", "rate": "5"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, roi) = app.get(q).await;
    assert_eq!(s, StatusCode::OK, "{roi}");
    // sdr: value 100 + 500 / 5 = 200; spend 2 × 26.923076923076923077 = 53.846153846153846154;
    // ROI 200 / 53.846… = 3.7143; cost per outcome 26.923077.
    let sdr = &roi["data"][0];
    assert_eq!(sdr["name"], "sdr", "{roi}");
    assert_eq!(sdr["outcomes"], 2);
    assert_eq!(sdr["value"], "200");
    assert_eq!(sdr["spend"], "53.846153846153846154");
    assert_eq!(sdr["roi"], "3.7143");
    assert_eq!(sdr["cost_per_outcome"], "26.923077");
    // support: 50 / 26.923076923076923077 = 1.8571.
    assert_eq!(roi["data"][1]["roi"], "1.8571");
    let (s, _) = app
        .get("/v1/analytics/roi?group_by=model&from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn forecast_projects_the_cycle_and_when_the_balance_runs_out(backend: Backend) {
    use chrono::Datelike;
    use rust_decimal::Decimal;
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
            &json!({"id": "p", "name": "P", "billing_mode": "prepaid"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, body) = app
        .post(
            "/v1/customers/p/wallet/credits",
            &json!({"amount": "100", "currency": "USD", "kind": "purchased"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // A weekly pattern of 100k-token days: cost W × 0.25, revenue W × 0.25 / 0.13.
    let weekly = [10i64, 12, 14, 13, 11, 6, 5];
    let w = |d: DateTime<Utc>| weekly[d.weekday().num_days_from_monday() as usize];
    let revenue =
        |d: DateTime<Utc>| Decimal::from(w(d)) * Decimal::new(25, 2) / Decimal::new(13, 2);
    // Anchored on the wall clock: the credit is granted now, so the forecast is asked for
    // now (a balance is read as of `at`), and the history is the 35 days before today.
    let at = Utc::now();
    let today = Grain::Day.bucket(at);
    let month_start = Utc
        .with_ymd_and_hms(today.year(), today.month(), 1, 0, 0, 0)
        .unwrap();
    let month_end = if today.month() == 12 {
        Utc.with_ymd_and_hms(today.year() + 1, 1, 1, 0, 0, 0)
            .unwrap()
    } else {
        Utc.with_ymd_and_hms(today.year(), today.month() + 1, 1, 0, 0, 0)
            .unwrap()
    };
    let mut events = Vec::new();
    for back in 1..=35 {
        let day = today - chrono::Duration::days(back);
        events.push(event(
            &format!("f{back}"),
            "p",
            json!({"timestamp": (day + chrono::Duration::hours(12)).to_rfc3339(),
                   "input_tokens": w(day) * 100_000, "output_tokens": 0}),
        ));
    }
    let (s, body) = app.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let at_param = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (s, f) = app
        .get(&format!(
            "/v1/analytics/forecast?customer_id=p&at={at_param}"
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{f}");
    assert_eq!(
        f["horizon_days"],
        (month_end - today).num_days(),
        "today to the month's end: {f}"
    );
    let dec = |v: &Value| v.as_str().unwrap().parse::<Decimal>().unwrap();
    // The whole month at the pattern's pace.
    let expected: Decimal = (0..(month_end - month_start).num_days())
        .map(|i| revenue(month_start + chrono::Duration::days(i)))
        .sum();
    let projected = dec(&f["revenue"]["projected"]);
    let err = ((projected - expected) / expected).abs();
    assert!(
        err < Decimal::new(2, 2),
        "projected {projected}, expected {expected}: {f}"
    );
    assert!(dec(&f["revenue"]["lower"]) <= projected && projected <= dec(&f["revenue"]["upper"]));
    assert_eq!(f["anomaly"], false);
    // The balance (100.00) runs out on the day the cumulative forecast reaches it.
    let mut left = Decimal::from(100);
    let mut day = today;
    loop {
        left -= revenue(day);
        if left <= Decimal::ZERO {
            break;
        }
        day += chrono::Duration::days(1);
    }
    // Over a fixed two-week horizon, so the day falls inside it whatever today is.
    let (s, f) = app
        .get(&format!(
            "/v1/analytics/forecast?customer_id=p&at={at_param}&horizon=14"
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{f}");
    assert_eq!(f["horizon_days"], 14, "{f}");
    assert_eq!(f["balance"], "100");
    assert_eq!(
        f["balance_runs_out_on"],
        json!(day.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        "{f}"
    );
    let (_, alerts) = app.get("/v1/alerts").await;
    assert!(
        alerts["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "balance_runs_out"),
        "{alerts}"
    );
    // A customer key sees its own forecast without cost; others' are refused.
    let key = app.key_for("p").await;
    let (s, mine) = app
        .get_as(Some(&key), &format!("/v1/analytics/forecast?at={at_param}"))
        .await;
    assert_eq!(s, StatusCode::OK, "{mine}");
    assert!(mine.get("cost").is_none());
    app.customer("other").await;
    let (s, _) = app
        .get_as(Some(&key), "/v1/analytics/forecast?customer_id=other")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app
        .get("/v1/analytics/forecast?customer_id=p&horizon=1000")
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = app.get("/v1/analytics/forecast").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn provider_comparison_costs_the_same_usage_at_other_providers(backend: Backend) {
    let app = TestApp::start(backend).await;
    // gpt-4o through OpenRouter at 2.50 / 10.00 per 1M; OpenAI direct at 2.00 / 8.00; Azure
    // at 2.75 / 11.00; an unrelated model.
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    for (provider, id, p, c) in [
        ("openai", "gpt-4o", "0.000002", "0.000008"),
        ("azure", "azure/gpt-4o", "0.00000275", "0.000011"),
        ("openai", "gpt-4.1", "0.000001", "0.000001"),
    ] {
        let (s, body) = app
            .post_bytes(
                &format!("/v1/prices/import?format=openrouter&provider={provider}&effective_from=2026-01-01T00:00:00Z"),
                serde_json::to_vec(&json!({"data": [{"id": id, "pricing": {"prompt": p, "completion": c}}]})).unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    app.customer("c1").await;
    let (s, body) = app
        .post(
            "/v1/events",
            &json!({"events": [event("x", "c1", json!({"timestamp": "2026-11-02T10:00:00Z",
                "input_tokens": 1_000_000, "output_tokens": 100_000}))]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, cmp) = app
        .get("/v1/analytics/provider-comparison?customer_id=c1&from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(s, StatusCode::OK, "{cmp}");
    let row = &cmp["data"][0];
    // Actual: 2.50 + 1.00 = 3.50. OpenAI: 2.00 + 0.80 = 2.80 (−0.70). Azure: 2.75 + 1.10 =
    // 3.85 (+0.35).
    assert_eq!(row["canonical_model"], "gpt-4o");
    assert_eq!(row["actual_cost"], "3.5");
    let alts = row["alternatives"].as_array().unwrap();
    assert_eq!(alts.len(), 2, "{cmp}");
    assert_eq!(
        (alts[0]["provider"].clone(), alts[0]["cost"].clone()),
        (json!("openai"), json!("2.8"))
    );
    assert_eq!(alts[0]["difference"], "-0.7");
    assert_eq!(
        (alts[1]["provider"].clone(), alts[1]["difference"].clone()),
        (json!("azure"), json!("0.35"))
    );
    assert_eq!(row["best_saving"], "0.7");
    assert_eq!(cmp["cheapest_cost"], "2.8");
    let key = app.key_for("c1").await;
    let (s, _) = app
        .get_as(
            Some(&key),
            "/v1/analytics/provider-comparison?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z",
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "operators only");
}

async fn usage_exports_stream_every_matching_event_once(backend: Backend) {
    let app = TestApp::start(backend).await;
    catalog(
        &app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("c1").await;
    app.customer("c2").await;
    // Billed from their creation: created at the start of the month this test bills.
    app.backdate_customer("c1", "2026-11-01T00:00:00Z").await;
    app.backdate_customer("c2", "2026-11-01T00:00:00Z").await;
    // 4,500 events for c1 (more than two pages of 2,000), some tagged; 10 for c2.
    for batch in 0..3 {
        let events: Vec<Value> = (0..1500)
            .map(|i| {
                let n = batch * 1500 + i;
                let mut extra = json!({"timestamp": format!("2026-11-0{}T{:02}:{:02}:00Z", 1 + n % 9, n % 24, n % 60),
                                       "input_tokens": 10 + n, "output_tokens": 1});
                if n % 3 == 0 {
                    extra["tags"] = json!({"agent": "sdr, \"the\" bot"});
                }
                event(&format!("e{n:05}"), "c1", extra)
            })
            .collect();
        let (s, body) = app.post("/v1/events", &json!({ "events": events })).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let (s, body) = app
        .post(
            "/v1/events",
            &json!({"events": (0..10).map(|i| event(&format!("x{i}"), "c2", json!({}))).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let text = |r: reqwest::Response| async move {
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv")
        );
        r.text().await.unwrap()
    };
    let csv = text(
        app.client
            .get(app.url("/v1/export/usage.csv?customer_id=c1"))
            .bearer_auth(common::ADMIN_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].contains(",cost,upstream,"), "{}", lines[0]);
    assert_eq!(lines.len(), 1 + 4500);
    let ids: std::collections::BTreeSet<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ids.len(), 4500, "each event exactly once");
    // Ordered by timestamp; quoting keeps commas and quotes inside tags intact.
    let ts: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(2).unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]));
    assert!(csv.contains(r#"sdr, \""the\"" bot""}""#), "{}", lines[1]);
    // Filters: a tag and a time range.
    let csv = text(
        app.client
            .get(app.url("/v1/export/usage.csv?customer_id=c1&from=2026-11-02T00:00:00Z&to=2026-11-03T00:00:00Z"))
            .bearer_auth(common::ADMIN_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(csv.lines().count(), 1 + 500);
    // A customer exports its own usage, without cost; another's is refused.
    let key = app.key_for("c2").await;
    let csv = text(
        app.client
            .get(app.url("/v1/export/usage.csv"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(csv.lines().count(), 11);
    assert!(!csv.lines().next().unwrap().contains("cost"));
    let (s, _) = app
        .get_as(Some(&key), "/v1/export/usage.csv?customer_id=c1")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = app.get("/v1/export/usage.csv?group_by=model").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Invoices export.
    let (s, _) = app
        .post("/v1/billing/run?at=2026-12-01T02:00:00Z", &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let csv = text(
        app.client
            .get(app.url("/v1/export/invoices.csv?customer_id=c1"))
            .bearer_auth(common::ADMIN_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().contains(",FAT-2026-"), "{csv}");
}
