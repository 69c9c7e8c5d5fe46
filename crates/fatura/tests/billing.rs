//! HTTP tests of billing: cycles closing into drafts and numbered invoices (once, even when
//! runs race), late events billed as adjustments, renderings, credit notes, void + reissue.
//! Run on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, TestApp, event};
use reqwest::StatusCode;
use serde_json::{Value, json};

on_both_backends!(
    cycles_close_once_into_numbered_invoices_and_late_events_are_never_lost,
    bad_billing_input_is_refused_and_changes_nothing,
    one_instance_at_a_time_runs_the_background_work,
    unpriced_events_are_billed_once_priced,
    a_customer_that_cannot_be_rated_does_not_stop_the_run,
);

async fn setup(backend: Backend) -> TestApp {
    let app = TestApp::start(backend).await;
    let (s, body) = app
        .post_bytes(
            "/v1/prices/import?format=openrouter&effective_from=2026-01-01T00:00:00Z",
            serde_json::to_vec(&json!({"data": [
                {"id": "openai/gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}}]}))
            .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, c) = app
        .post(
            "/v1/customers",
            &json!({"id": "c1", "name": "Acme", "tax_rate": "0.10", "locale": "pt-BR",
                    "payment_terms_days": 15}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert_eq!(c["tax_rate"], "0.10");
    assert_eq!(c["timezone"], "UTC");
    // Billed from its creation: created at the start of the fixed month these tests bill
    // (November 2026), whatever the wall clock says.
    app.backdate_customer("c1", "2026-11-01T00:00:00Z").await;
    app
}

/// 1M prompt + 100k completion tokens of gpt-4o: cost 2.50 + 1.00 = 3.50 USD.
fn call(id: &str, ts: &str) -> Value {
    event(
        id,
        "c1",
        json!({"timestamp": ts, "input_tokens": 1_000_000, "output_tokens": 100_000}),
    )
}

async fn post_events(app: &TestApp, list: Vec<Value>) {
    let (s, body) = app.post("/v1/events", &json!({ "events": list })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

async fn run(app: &TestApp, at: &str) -> Value {
    let (s, body) = app
        .post(&format!("/v1/billing/run?at={at}"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

async fn invoices(app: &TestApp, query: &str) -> Vec<Value> {
    let (s, body) = app.get(&format!("/v1/invoices{query}")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().clone()
}

async fn cycles_close_once_into_numbered_invoices_and_late_events_are_never_lost(backend: Backend) {
    let app = setup(backend).await;
    post_events(&app, vec![call("n1", "2026-11-10T12:00:00Z")]).await;
    // Within the grace period (1 hour) a closed cycle is a draft, re-rated on every run.
    let r = run(&app, "2026-12-01T00:30:00Z").await;
    assert_eq!(r["drafted"], 1, "{r}");
    assert_eq!(r["finalized"], json!([]));
    let list = invoices(&app, "?customer_id=c1").await;
    assert_eq!(list.len(), 1);
    let draft = &list[0];
    assert_eq!(draft["status"], "draft");
    assert_eq!(draft["number"], Value::Null);
    // A customer does not see drafts.
    let key = app.key_for("c1").await;
    let (s, mine) = app.get_as(Some(&key), "/v1/invoices").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(mine["data"], json!([]));
    let (s, _) = app
        .get_as(
            Some(&key),
            &format!("/v1/invoices/{}", draft["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Two runs at once past the grace period: one finalised invoice.
    let empty = json!({});
    let (a, b) = tokio::join!(
        app.post("/v1/billing/run?at=2026-12-01T02:00:00Z", &empty),
        app.post("/v1/billing/run?at=2026-12-01T02:00:00Z", &empty)
    );
    assert_eq!(
        (a.0, b.0),
        (StatusCode::OK, StatusCode::OK),
        "{} {}",
        a.1,
        b.1
    );
    let finalized =
        a.1["finalized"].as_array().unwrap().len() + b.1["finalized"].as_array().unwrap().len();
    assert_eq!(finalized, 1, "{} {}", a.1, b.1);
    let list = invoices(&app, "?customer_id=c1").await;
    assert_eq!(list.len(), 1, "one invoice per cycle");
    let nov = list[0].clone();
    // Default plan: 3.50 / 0.13 = 26.923… → 26.92; tax 10% = 2.692 → 2.69; total 29.61.
    assert_eq!(nov["status"], "open");
    assert_eq!(nov["number"], "FAT-2026-000001");
    assert_eq!(nov["subtotal"], "26.92");
    assert_eq!(nov["tax"], "2.69");
    assert_eq!(nov["total"], "29.61");
    assert_eq!(nov["amount_due"], "29.61");
    assert_eq!(nov["events"], 1);
    assert_eq!(nov["period_start"], "2026-11-01T00:00:00Z");
    assert_eq!(nov["due_at"], "2026-12-16T02:00:00Z");
    let line = &nov["document"]["sections"][0]["lines"][0];
    assert_eq!(line["amount"], "26.92");
    assert_eq!(line["cost_usd"], "3.5", "operators see the cost");
    assert_eq!(line["quantities"]["prompt_tokens"], 1_000_000);
    // Running again changes nothing.
    let r = run(&app, "2026-12-01T03:00:00Z").await;
    assert_eq!(
        (r["drafted"].clone(), r["finalized"].clone()),
        (json!(0), json!([]))
    );
    let nov_id = nov["id"].as_str().unwrap().to_string();
    let (_, again) = app.get(&format!("/v1/invoices/{nov_id}")).await;
    assert_eq!(again, nov, "a finalised invoice never changes");

    // The customer's view: JSON without cost, printable HTML in pt-BR, CSV line items.
    let (s, mine) = app
        .get_as(Some(&key), &format!("/v1/invoices/{nov_id}"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        mine["document"]["sections"][0]["lines"][0]
            .get("cost_usd")
            .is_none()
    );
    let html = app
        .client
        .get(app.url(&format!("/v1/invoices/{nov_id}.html")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), StatusCode::OK);
    assert!(
        html.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = html.text().await.unwrap();
    assert!(html.contains("Fatura FAT-2026-000001"), "{html}");
    assert!(html.contains("US$ 29,61"), "{html}");
    assert!(
        !html.contains("3.5") && !html.contains("3,5 "),
        "no cost on the customer's invoice"
    );
    let csv = app
        .client
        .get(app.url(&format!("/v1/invoices/{nov_id}.csv")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().ends_with(",26.92"), "{csv}");
    app.post("/v1/customers", &json!({"id": "c2", "name": "Other"}))
        .await;
    // Created in November too, whatever the wall clock says: its cycles below are
    // November's and December's.
    app.backdate_customer("c2", "2026-11-01T00:00:00Z").await;
    let other = app.key_for("c2").await;
    let (s, _) = app
        .get_as(Some(&other), &format!("/v1/invoices/{nov_id}.html"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // A late event for November, after November was finalised, and December's usage: both
    // on the December invoice, the late one as a labelled adjustment.
    post_events(
        &app,
        vec![
            call("late", "2026-11-20T00:00:00Z"),
            call("d1", "2026-12-05T00:00:00Z"),
        ],
    )
    .await;
    let r = run(&app, "2027-01-01T02:00:00Z").await;
    let mine = |r: &Value| -> Vec<Value> {
        r["finalized"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["customer_id"] == "c1")
            .cloned()
            .collect()
    };
    // c2 (created meanwhile, no usage) gets zero invoices for its cycles: a cycle always
    // closes.
    assert_eq!(mine(&r).len(), 1, "{r}");
    let dec = mine(&r)[0].clone();
    assert!(
        dec["number"].as_str().unwrap().starts_with("FAT-2027-"),
        "{dec}"
    );
    assert_eq!(dec["events"], 2);
    let sections = dec["document"]["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 2, "{dec}");
    assert_eq!(sections[0]["kind"], "adjustment");
    assert_eq!(sections[0]["from"], "2026-11-01T00:00:00Z");
    assert_eq!(sections[0]["total"], "26.92");
    assert_eq!(sections[1]["kind"], "usage");
    // 2 × 26.92 = 53.84; tax 5.384 → 5.38; total 59.22.
    assert_eq!(dec["total"], "59.22");
    let (_, nov_now) = app.get(&format!("/v1/invoices/{nov_id}")).await;
    assert_eq!(nov_now["events"], 1, "November stays as finalised");

    // Credit notes: up to the invoice's total, numbered in their own series.
    let (s, cn) = app
        .post(
            &format!("/v1/invoices/{nov_id}/credit-notes"),
            &json!({"amount": "5.00", "reason": "goodwill"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{cn}");
    assert_eq!(cn["kind"], "credit_note");
    assert!(
        cn["number"].as_str().unwrap().starts_with("FAT-CN-"),
        "{cn}"
    );
    assert_eq!(cn["total"], "5.00");
    assert_eq!(cn["corrects_invoice_id"], nov_id.as_str());
    let (s, _) = app
        .post(
            &format!("/v1/invoices/{nov_id}/credit-notes"),
            &json!({"amount": "24.62", "reason": "too much"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "29.61 − 5.00 = 24.61 is left");
    for bad in [
        json!({"amount": "-1", "reason": "x"}),
        json!({"amount": "1.001", "reason": "x"}),
        json!({"amount": "abc", "reason": "x"}),
        json!({"amount": "1", "reason": " "}),
    ] {
        let (s, body) = app
            .post(&format!("/v1/invoices/{nov_id}/credit-notes"), &bad)
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }

    // Void + reissue: December's usage is billed again by the next run, under a new number;
    // the voided invoice keeps its number (no gap).
    let dec_id = dec["id"].as_str().unwrap();
    let (s, v) = app
        .post(&format!("/v1/invoices/{dec_id}/void"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "void");
    assert_eq!(
        v["number"], dec["number"],
        "a voided invoice keeps its number"
    );
    let (s, _) = app
        .post(&format!("/v1/invoices/{dec_id}/void"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let r = run(&app, "2027-01-01T03:00:00Z").await;
    let reissued = &mine(&r)[0];
    assert_eq!(reissued["number"], "FAT-2027-000004", "{r}");
    assert_eq!(reissued["total"], "59.22");
    assert_eq!(reissued["events"], 2);
    let (s, _) = app
        .post(&format!("/v1/invoices/{nov_id}/finalize"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "only drafts are finalised");
    // Every event billed exactly once by a live invoice: 1 + 2 = 3 events.
    let live: i64 = invoices(&app, "?customer_id=c1")
        .await
        .iter()
        .filter(|i| i["kind"] == "invoice" && i["status"] != "void")
        .map(|i| i["events"].as_i64().unwrap())
        .sum();
    assert_eq!(live, 3);
    let open = invoices(&app, "?status=open&customer_id=c1").await;
    assert_eq!(open.len(), 3, "two invoices and a credit note: {open:?}");
}

async fn bad_billing_input_is_refused_and_changes_nothing(backend: Backend) {
    let app = setup(backend).await;
    for (bad, field) in [
        (json!({"billing_anchor_day": 29}), "billing_anchor_day"),
        (json!({"billing_anchor_day": 0}), "billing_anchor_day"),
        (json!({"timezone": "Mars/Base"}), "timezone"),
        (json!({"tax_rate": "1.5"}), "tax_rate"),
        (json!({"tax_rate": "abc"}), "tax_rate"),
        (json!({"locale": "fr"}), "locale"),
        (json!({"payment_terms_days": 400}), "payment_terms_days"),
    ] {
        let (s, body) = app.patch("/v1/customers/c1", &bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{bad}: {body}"
        );
    }
    let (_, c) = app.get("/v1/customers/c1").await;
    assert_eq!(c["billing_anchor_day"], 1);
    assert_eq!(c["tax_rate"], "0.10");
    // A good change: cycles start on the 15th in São Paulo (03:00 UTC).
    let (s, c) = app
        .patch(
            "/v1/customers/c1",
            &json!({"billing_anchor_day": 15, "timezone": "America/Sao_Paulo", "tax_rate": null}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["tax_rate"], Value::Null);
    let (_, u) = app
        .get("/v1/customers/c1/upcoming?at=2026-11-24T00:00:00Z")
        .await;
    assert_eq!(u["period_start"], "2026-11-15T03:00:00Z", "{u}");
    assert_eq!(u["period_end"], "2026-12-15T03:00:00Z");
    for (path, s_expected) in [
        ("/v1/invoices?status=late", StatusCode::UNPROCESSABLE_ENTITY),
        ("/v1/invoices/nope", StatusCode::NOT_FOUND),
        ("/v1/invoices/nope.html", StatusCode::NOT_FOUND),
        ("/v1/invoices?surprise=1", StatusCode::BAD_REQUEST),
    ] {
        let (s, body) = app.get(path).await;
        assert_eq!(s, s_expected, "{path}: {body}");
    }
    let (s, _) = app.post("/v1/billing/run?at=yesterday", &json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = app.post("/v1/invoices/nope/void", &json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let key = app.key_for("c1").await;
    for (method, path) in [
        ("POST", "/v1/billing/run"),
        ("POST", "/v1/invoices/x/void"),
        ("POST", "/v1/invoices/x/finalize"),
        ("POST", "/v1/invoices/x/credit-notes"),
    ] {
        assert_eq!(method, "POST");
        let (s, _) = app.post_as(Some(&key), path, &json!({})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
    }
    assert!(invoices(&app, "").await.is_empty());
}

/// Two instances on one database (each its own connection pool, as two processes): the
/// scheduler lease lets one run the background work at a time; when the holder stops
/// renewing (it died), the other takes over once the lease has run out; a clean stop hands
/// it over at once. The cycle is invoiced exactly once.
async fn one_instance_at_a_time_runs_the_background_work(backend: Backend) {
    async fn scheduler_tick(
        state: &fatura_server::AppState,
        now: chrono::DateTime<chrono::Utc>,
        lease: std::time::Duration,
    ) -> bool {
        state.scheduler().tick(now, lease).await
    }
    let app = setup(backend).await;
    post_events(&app, vec![call("n1", "2026-11-10T12:00:00Z")]).await;
    let other = fatura_store::connect(&app.database_url, 4).await.unwrap();
    let instances = [
        fatura_server::AppState::new(app.fatura.clone(), common::ADMIN_KEY),
        fatura_server::AppState::new(
            std::sync::Arc::new(fatura_server::service::Fatura::new(
                other,
                fatura_core::MarginRate::default_floor(),
            )),
            common::ADMIN_KEY,
        ),
    ];
    assert_ne!(
        instances[0].fatura.instance_id(),
        instances[1].fatura.instance_id()
    );
    let lease = std::time::Duration::from_secs(60);
    let t0: chrono::DateTime<chrono::Utc> = "2026-12-01T02:00:00Z".parse().unwrap();
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    // Both tick at once: exactly one runs.
    let (a, b) = tokio::join!(
        scheduler_tick(&instances[0], t0, lease),
        scheduler_tick(&instances[1], t0, lease)
    );
    assert!(a ^ b, "exactly one instance ran: {a} {b}");
    let (holder, waiter) = if a {
        (&instances[0], &instances[1])
    } else {
        (&instances[1], &instances[0])
    };
    let list = invoices(&app, "?customer_id=c1").await;
    assert_eq!(list.len(), 1, "the closed cycle was invoiced");
    assert_eq!(
        list[0]["status"], "open",
        "and finalised past its grace period"
    );
    // The holder renews; the other waits.
    assert!(!scheduler_tick(waiter, at(10), lease).await);
    assert!(
        scheduler_tick(holder, at(30), lease).await,
        "renewed until t0+90s"
    );
    // The holder dies (stops renewing): the lease runs out at t0+90s, not before.
    assert!(!scheduler_tick(waiter, at(89), lease).await);
    assert!(scheduler_tick(waiter, at(91), lease).await, "taken over");
    assert!(
        !scheduler_tick(holder, at(100), lease).await,
        "no longer the holder"
    );
    // A clean stop hands the lease over at once.
    waiter.scheduler().release_lease().await;
    assert!(scheduler_tick(holder, at(101), lease).await);
    // Whoever ran, the cycle has one invoice.
    let list = invoices(&app, "?customer_id=c1").await;
    assert_eq!(list.len(), 1, "{list:?}");
}

/// Regression: finalisation linked the period's unpriced events to its invoice, so when a
/// later import priced them no invoice ever charged them (October billed one call of two;
/// after the import the usage showed both, and November billed 0.00). Unpriced events stay
/// unbilled until priced, then the next invoice bills them as an adjustment of their period.
async fn unpriced_events_are_billed_once_priced(backend: Backend) {
    let app = setup(backend).await;
    app.backdate_customer("c1", "2026-10-01T00:00:00Z").await;
    let unpriced = event(
        "u1",
        "c1",
        json!({"timestamp": "2026-10-11T12:00:00Z", "model": "acme/new-model",
               "input_tokens": 1_000_000, "output_tokens": 100_000}),
    );
    post_events(&app, vec![call("p1", "2026-10-10T12:00:00Z"), unpriced]).await;
    let r = run(&app, "2026-11-01T02:00:00Z").await;
    let oct = &r["finalized"][0];
    // Only the priced call: 3.50 / 0.13 = 26.92.
    assert_eq!(oct["subtotal"], "26.92", "{r}");
    assert_eq!(oct["events"], 1, "the unpriced call is not billed yet: {r}");
    // The model gets its price (the same as gpt-4o's), from before October.
    let (s, body) = app
        .post_bytes(
            "/v1/prices/import?format=openrouter&effective_from=2026-01-01T00:00:00Z",
            serde_json::to_vec(&json!({"data": [
                {"id": "acme/new-model", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}}]}))
            .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["events_priced"], 1, "{body}");
    // November's invoice bills it, as an adjustment of October.
    let r = run(&app, "2026-12-01T02:00:00Z").await;
    let nov = r["finalized"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["period_start"] == "2026-11-01T00:00:00Z")
        .unwrap_or_else(|| panic!("November is invoiced: {r}"))
        .clone();
    assert_eq!(nov["subtotal"], "26.92", "{nov}");
    assert_eq!(nov["events"], 1, "{nov}");
    // Both calls are billed, each once.
    let billed: Vec<Value> = invoices(&app, "?customer_id=c1").await;
    let total_events: i64 = billed.iter().map(|i| i["events"].as_i64().unwrap()).sum();
    assert_eq!(total_events, 2, "{billed:?}");
}

/// Regression: one customer that could not be rated (BRL, no USD→BRL rate) failed the whole
/// run with 409, so every customer sorted after it went without an invoice (and the
/// scheduler failed every minute). Each customer is billed in isolation; the failure is
/// reported and alerted.
async fn a_customer_that_cannot_be_rated_does_not_stop_the_run(backend: Backend) {
    let app = setup(backend).await;
    let (s, body) = app
        .post(
            "/v1/customers",
            &json!({"id": "b0", "name": "Brasil", "currency": "BRL"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    app.backdate_customer("b0", "2026-11-01T00:00:00Z").await;
    let brl = event(
        "b1",
        "b0",
        json!({"timestamp": "2026-11-10T12:00:00Z", "input_tokens": 1_000_000, "output_tokens": 100_000}),
    );
    post_events(&app, vec![call("n1", "2026-11-10T12:00:00Z"), brl]).await;
    let r = run(&app, "2026-12-01T02:00:00Z").await;
    let finalized = r["finalized"].as_array().unwrap();
    assert_eq!(finalized.len(), 1, "{r}");
    assert_eq!(finalized[0]["customer_id"], "c1");
    assert_eq!(finalized[0]["subtotal"], "26.92");
    let failed = r["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["customer_id"], "b0");
    assert_eq!(failed[0]["code"], "conflict", "{r}");
    assert!(
        failed[0]["message"].as_str().unwrap().contains("BRL"),
        "{r}"
    );
    let (_, alerts) = app.get("/v1/alerts").await;
    assert!(
        alerts["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "billing_failed" && a["customer_id"] == "b0"),
        "{alerts}"
    );
    // Once the rate exists, the next run bills it.
    let (s, body) = app
        .post(
            "/v1/fx-rates",
            &json!({"currency": "BRL", "date": "2026-11-01", "rate": "5.0"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let r = run(&app, "2026-12-01T03:00:00Z").await;
    assert_eq!(r["failed"], json!([]), "{r}");
    assert_eq!(r["finalized"][0]["customer_id"], "b0", "{r}");
}
