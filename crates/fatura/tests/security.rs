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

/// A full run of the real binary with debug logs — sign-in failures, keys created and used,
/// gateway calls to an upstream that needs its provider key, Stripe webhooks good and
/// forged, a dashboard sign-in — and no secret it was given or gave out appears in its
/// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    use std::io::Read;
    use std::process::{Command, Stdio};

    let admin = "log-test-admin-key-5c0f1e2d3c4b";
    let upstream_key = "sk-upstream-log-test-9f8e7d6c5b4a";
    let stripe_key = "sk_test_log_test_1a2b3c4d5e6f";
    let webhook_secret = "whsec_log_test_0a1b2c3d4e5f";
    let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = format!("http://{}/v1", mock_listener.local_addr().unwrap());
    tokio::spawn(fatura_server::mock::serve_mock(
        mock_listener,
        fatura_server::mock::MockConfig {
            api_key: Some(upstream_key.into()),
            ..Default::default()
        },
        std::future::pending(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fatura.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [gateway]
            [[gateway.upstreams]]
            name = "primary"
            kind = "openai"
            base_url = "{mock}"
            api_key_env = "LOG_TEST_UPSTREAM_KEY"
            [[gateway.routes]]
            models = ["*"]
            upstreams = ["primary"]
            "#
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = dir.path().join("out.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fatura"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--database"])
        .arg(format!("sqlite://{}", dir.path().join("f.db").display()))
        .env("FATURA_ADMIN_KEY", admin)
        .env("LOG_TEST_UPSTREAM_KEY", upstream_key)
        .env("FATURA_STRIPE_API_KEY", stripe_key)
        .env("FATURA_STRIPE_WEBHOOK_SECRET", webhook_secret)
        .env("FATURA_STRIPE_API_BASE", "http://127.0.0.1:9")
        .env("FATURA_LOG", "debug")
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&out).unwrap(),
        ))
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    while client.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let admin_post = |path: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(admin)
            .json(&body)
            .send()
    };
    // A wrong admin key, then real work.
    let r = client
        .get(format!("{base}/v1/customers"))
        .bearer_auth("not-the-admin-key-000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let catalog = json!({"data": [{"id": "gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}}]});
    let r = client
        .post(format!(
            "{base}/v1/prices/import?format=openrouter&provider=openai&effective_from=2020-01-01T00:00:00Z"
        ))
        .bearer_auth(admin)
        .body(serde_json::to_vec(&catalog).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = admin_post("/v1/customers", json!({"id": "acme", "name": "Acme"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = admin_post("/v1/customers/acme/keys", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let customer_key = created["key"].as_str().unwrap().to_string();
    for stream in [false, true] {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&customer_key)
            .json(&json!({"model": "gpt-4o", "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap();
    }
    // Stripe webhooks: one signed with the secret, one forged.
    let payload =
        json!({"id": "evt_log_1", "type": "customer.created", "data": {"object": {}}}).to_string();
    let t = chrono::Utc::now().timestamp();
    let signature = {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(webhook_secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{payload}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    for sig in [signature.as_str(), "t=1,v1=00"] {
        client
            .post(format!("{base}/v1/webhooks/stripe"))
            .header("stripe-signature", sig)
            .body(payload.clone())
            .send()
            .await
            .unwrap();
    }
    // A dashboard sign-in (its session token is a secret too).
    let login = client.get(format!("{base}/login")).send().await.unwrap();
    let csrf = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string();
    let r = client
        .post(format!("{base}/login"))
        .header("cookie", format!("fatura_login_csrf={csrf}"))
        .form(&[("key", admin), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let session = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("fatura_session="))
        .and_then(|v| v.split(';').next())
        .unwrap()
        .to_string();
    // Stop, and read everything it printed.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "clean stop: {status}");
    let mut logs = String::new();
    std::fs::File::open(&out)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.contains("fatura listening"),
        "the logs were captured: {logs}"
    );
    assert!(logs.lines().count() > 20, "debug logs: {logs}");
    for (what, secret) in [
        ("admin key", admin),
        ("customer key", customer_key.as_str()),
        ("provider key", upstream_key),
        ("Stripe API key", stripe_key),
        ("webhook secret", webhook_secret),
        ("session token", session.as_str()),
        ("CSRF token", csrf.as_str()),
    ] {
        assert!(!logs.contains(secret), "the {what} is in the logs");
    }
}
