//! The whole route table, walked from the server's own OpenAPI document: every route except
//! the public ones refuses anonymous calls and bad keys (401); every operator route refuses
//! customer keys (403); the routes a customer may call never reach another customer's data
//! (403 or 404 for its id, 403 for `customer_id=` of another).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Routes without authentication: health, metrics, the API document, and Stripe's webhook
/// (authenticated by its signature instead).
const PUBLIC: [&str; 5] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/v1/webhooks/stripe",
];

/// Operations a customer key may call (scoped to its own customer).
const CUSTOMER: [(&str, &str); 12] = [
    ("GET", "/v1/usage"),
    ("GET", "/v1/prices"),
    ("GET", "/v1/customers/{id}/wallet"),
    ("GET", "/v1/customers/{id}/upcoming"),
    ("GET", "/v1/invoices"),
    ("GET", "/v1/invoices/{id}"),
    ("GET", "/v1/analytics/timeseries"),
    ("GET", "/v1/analytics/summary"),
    ("GET", "/v1/analytics/roi"),
    ("GET", "/v1/analytics/forecast"),
    ("GET", "/v1/export/usage.csv"),
    ("GET", "/v1/export/invoices.csv"),
];

async fn call(
    app: &TestApp,
    method: &Method,
    path: &str,
    key: Option<&str>,
) -> (StatusCode, String) {
    let mut req = app.client.request(method.clone(), app.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if matches!(*method, Method::POST | Method::PATCH) {
        req = req.json(&json!({}));
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_who_is_calling() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.customer("acme").await;
    app.customer("other").await;
    let key = app.key_for("acme").await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let (mut walked, mut scoped) = (0, 0);
    for (template, item) in paths {
        for (m, op) in item.as_object().unwrap() {
            let Ok(method) = m.to_uppercase().parse::<Method>() else {
                continue;
            };
            if !["GET", "POST", "PATCH", "PUT", "DELETE"].contains(&method.as_str()) {
                continue;
            }
            walked += 1;
            // Ids name the other customer (or things that are not acme's).
            let path = template.replace("{id}", "other");
            let what = format!("{method} {template}");
            if PUBLIC.contains(&template.as_str()) {
                continue;
            }
            for bad in [None, Some("fk_not-a-real-key-0000000000000000")] {
                let (s, body) = call(&app, &method, &path, bad).await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{what} with {bad:?}: {body}");
            }
            let (s, body) = call(&app, &method, &path, Some(&key)).await;
            let allowed = CUSTOMER.contains(&(method.as_str(), template.as_str()));
            if !allowed {
                assert_eq!(
                    s,
                    StatusCode::FORBIDDEN,
                    "{what} is for the operator: {body}"
                );
                continue;
            }
            if template.contains("{id}") {
                assert!(
                    s == StatusCode::FORBIDDEN || s == StatusCode::NOT_FOUND,
                    "{what} of another customer: {s} {body}"
                );
            } else {
                // Another customer asked for by name is refused (the other parameters the
                // route declares get valid values, so only the customer can be wrong).
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter(|p| p["in"] == "query")
                            .filter_map(|p| p["name"].as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                if !declared.contains(&"customer_id") {
                    continue;
                }
                let mut query = vec!["customer_id=other".to_string()];
                for name in declared {
                    let value = match name {
                        "from" => "2026-11-01T00:00:00Z",
                        "to" => "2026-12-01T00:00:00Z",
                        "metric" => "revenue",
                        "grain" => "day",
                        "group_by" if template == "/v1/usage" => "model",
                        "group_by" => "agent",
                        _ => continue,
                    };
                    query.push(format!("{name}={value}"));
                }
                let (s, body) = call(
                    &app,
                    &method,
                    &format!("{path}?{}", query.join("&")),
                    Some(&key),
                )
                .await;
                assert_eq!(s, StatusCode::FORBIDDEN, "{what}?customer_id=other: {body}");
                scoped += 1;
            }
        }
    }
    assert!(walked >= 40, "the route table has {walked} operations");
    assert!(scoped >= 6, "{scoped} routes take a customer_id");
}
