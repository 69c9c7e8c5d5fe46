//! The dashboard and the portal in a real browser: headless Chromium driven through
//! chromedriver (WebDriver) against a server started by the test, with the gateway in
//! front of a mock upstream. Screenshots of every page go to `target/screenshots/` (not
//! committed) so that a person can look at them.
//!
//! Needs `chromium` and `chromedriver` (Debian packages; `./scripts/test` installs them
//! when missing). Override with `FATURA_CHROMIUM` / `FATURA_CHROMEDRIVER`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{Datelike, TimeZone, Utc};
use common::{ADMIN_KEY, Backend, TestApp, UPSTREAM_KEY};
use fantoccini::{Client, ClientBuilder, Locator};
use fatura_server::mock::{MockConfig, serve_mock};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(20);

struct Driver {
    child: tokio::process::Child,
    url: String,
    _profile: tempfile::TempDir,
}

fn binary(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_string())
}

async fn start_chromedriver() -> Driver {
    let path = binary("FATURA_CHROMEDRIVER", "/usr/bin/chromedriver");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: install Debian's chromium and chromium-driver (./scripts/test does)"
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(&path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/status")).await
            && r.status().is_success()
        {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver {
        child,
        url,
        _profile: tempfile::tempdir().unwrap(),
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": binary("FATURA_CHROMIUM", "/usr/bin/chromium"),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1280,1000",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// Waits until `f` holds (polling the page), or fails with `what`.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

async fn sign_in(c: &Client, base: &str, login: &str, key: &str) {
    c.goto(&format!("{base}{login}")).await.unwrap();
    c.find(Locator::Css("#key"))
        .await
        .unwrap()
        .send_keys(key)
        .await
        .unwrap();
    c.find(Locator::Css("#sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The app with a gateway in front of a mock upstream, two customers (USD prepaid, BRL
/// postpaid) with usage this month, a USD→BRL rate, and an invoice of the BRL customer.
async fn setup() -> (TestApp, String, String, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        serve_mock(
            listener,
            MockConfig {
                api_key: Some(UPSTREAM_KEY.into()),
                ..MockConfig::default()
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    let config: fatura_server::gateway::GatewayConfig = toml::from_str(&format!(
        r#"
        [[upstreams]]
        name = "primary"
        kind = "openai"
        base_url = "{mock}"
        api_key_env = "FATURA_TEST_UPSTREAM_KEY"

        [[routes]]
        models = ["*"]
        upstreams = ["primary"]
        "#
    ))
    .unwrap();
    let app = TestApp::start_full(Backend::Sqlite, Some(config), None).await;
    let catalog = json!({"data": [
        {"id": "gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}},
    ]});
    let (s, body) = app
        .post_bytes(
            "/v1/prices/import?format=openrouter&provider=openai&effective_from=2020-01-01T00:00:00Z",
            serde_json::to_vec(&catalog).unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = app
        .post(
            "/v1/customers",
            &json!({"id": "acme", "name": "Acme Inc", "billing_mode": "prepaid"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = app
        .post(
            "/v1/customers/acme/wallet/credits",
            &json!({"amount": "500", "currency": "USD", "kind": "purchased"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = app
        .post(
            "/v1/customers",
            &json!({"id": "brasa", "name": "Brasa Ltda", "currency": "BRL"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = app
        .post(
            "/v1/customers",
            &json!({"id": "evil", "name": "Evil <b>Co</b>"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) = app
        .post(
            "/v1/fx-rates",
            &json!({"currency": "BRL", "date": "2020-01-01", "rate": "5.3337"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // Usage this month (1M in + 100k out of gpt-4o: cost 3.50 each) and last month.
    let now = Utc::now();
    let month = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let last_month = month - chrono::Duration::days(10);
    let mut events = Vec::new();
    for (i, (c, at)) in [
        ("acme", month),
        ("acme", month),
        ("brasa", month),
        ("brasa", last_month),
    ]
    .iter()
    .enumerate()
    {
        events.push(json!({
            "id": format!("seed-{i}"), "customer_id": c, "timestamp": at.to_rfc3339(),
            "provider": "openai", "model": "gpt-4o", "input_tokens": 1_000_000,
            "output_tokens": 100_000, "tags": {"agent": if i % 2 == 0 { "sdr-bot" } else { "support" }},
        }));
    }
    let (s, body) = app.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Close this month as if it were over (two hours into the next: past the grace
    // period): brasa gets a finalised invoice.
    let next = Utc
        .with_ymd_and_hms(
            if now.month() == 12 {
                now.year() + 1
            } else {
                now.year()
            },
            now.month() % 12 + 1,
            1,
            2,
            0,
            0,
        )
        .unwrap();
    let (s, body) = app
        .post(
            &format!("/v1/billing/run?at={}", next.format("%Y-%m-%dT%H:%M:%SZ")),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, list) = app.get("/v1/invoices?customer_id=brasa").await;
    let brasa_invoice = list["data"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["status"] != "draft"))
        .map(|i| i["id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("brasa has a finalised invoice: {list}"));
    let acme_key = app.key_for("acme").await;
    let brasa_key = app.key_for("brasa").await;
    (app, acme_key, brasa_key, brasa_invoice)
}

async fn api_summary(app: &TestApp) -> Value {
    let now = Utc::now();
    let month = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let to = now + chrono::Duration::minutes(1);
    let (s, sum) = app
        .get(&format!(
            "/v1/analytics/summary?from={}&to={}",
            month.format("%Y-%m-%dT%H:%M:00Z"),
            to.format("%Y-%m-%dT%H:%M:00Z")
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{sum}");
    sum
}

/// `1234.5` → `$1,234.50`.
fn usd_en(s: &str) -> String {
    let d: rust_decimal::Decimal = s.parse().unwrap();
    fatura_server::render::format_money(
        d,
        fatura_core::Currency::Usd,
        fatura_server::render::Locale::En,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_portal_in_a_browser() {
    let (app, acme_key, brasa_key, brasa_invoice) = setup().await;
    let mut driver = start_chromedriver().await;
    let c = browser(&driver).await;
    let base = app.base.clone();

    // Not signed in: the dashboard sends to the sign-in page; a wrong key is refused.
    c.goto(&format!("{base}/dashboard")).await.unwrap();
    assert_eq!(path(&c).await, "/login");
    sign_in(&c, &base, "/login", "not-the-admin-key").await;
    until("the sign-in error", || async {
        c.find(Locator::Css("#error")).await.is_ok()
    })
    .await;
    assert!(text(&c, "#error").await.contains("Wrong admin key"));
    sign_in(&c, &base, "/login", ADMIN_KEY).await;
    until("the overview", || async { path(&c).await == "/dashboard" }).await;

    // The overview's figures are the API's.
    let sum = api_summary(&app).await;
    assert_eq!(
        text(&c, "#revenue [data-value]").await,
        usd_en(sum["revenue"].as_str().unwrap())
    );
    assert_eq!(
        text(&c, "#cost [data-value]").await,
        usd_en(sum["cost"].as_str().unwrap())
    );
    assert_eq!(
        text(&c, "#cost [data-value]").await,
        "$10.50",
        "three calls at 3.50"
    );
    assert_eq!(
        text(&c, "#requests [data-value]").await,
        sum["requests"].to_string()
    );
    assert_eq!(text(&c, "#margin [data-value]").await, "87.0%");
    assert!(
        c.find(Locator::Css("#chart-daily svg")).await.is_ok(),
        "the chart is drawn"
    );
    shot(&c, "01-overview").await;

    // The session cookie is HttpOnly and SameSite=Strict.
    let cookie = c.get_named_cookie("fatura_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    let session = cookie.value().to_string();

    // Live: a call through the gateway appears in the feed with its cost and price.
    c.goto(&format!("{base}/dashboard/live")).await.unwrap();
    until("the live stream to open", || async {
        c.find(Locator::Css("body[data-live=open]")).await.is_ok()
    })
    .await;
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&acme_key)
        .header("x-fatura-tag-agent", "live-check")
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    until("the call in the live feed", || async {
        match c
            .find(Locator::Css("#live-feed tbody tr td[data-k=customer]"))
            .await
        {
            Ok(td) => td.text().await.unwrap() == "acme",
            Err(_) => false,
        }
    })
    .await;
    let cost = text(&c, "#live-feed tbody tr td[data-k=cost]").await;
    assert!(cost.starts_with('$'), "{cost}");
    assert_eq!(
        text(&c, "#live-feed tbody tr td[data-k=margin]").await,
        "87.0%"
    );
    shot(&c, "02-live").await;

    // Every other page renders; screenshots in English.
    for (n, p, css) in [
        ("03-customers", "/dashboard/customers", "#customers"),
        (
            "04-customer",
            "/dashboard/customers/acme",
            "#usage-by-model",
        ),
        ("05-models", "/dashboard/models", "#models"),
        ("06-invoices", "/dashboard/invoices", "#invoices"),
        ("08-pricing", "/dashboard/pricing", "#catalog"),
    ] {
        c.goto(&format!("{base}{p}")).await.unwrap();
        assert!(c.find(Locator::Css(css)).await.is_ok(), "{p} shows {css}");
        shot(&c, n).await;
    }
    let body = c.source().await.unwrap();
    assert!(!body.contains(&acme_key) && !body.contains(&brasa_key));
    // The catalog's versions of one model.
    c.find(Locator::Css("#catalog a[href*='model=gpt-4o']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until("the model's versions", || async {
        c.find(Locator::Css("#model-versions")).await.is_ok()
    })
    .await;
    assert!(
        text(&c, "#model-versions").await.contains("$2.50"),
        "2.5e-6 × 1M"
    );
    c.goto(&format!("{base}/dashboard/customers/acme"))
        .await
        .unwrap();
    let page = c.source().await.unwrap();
    assert!(
        !page.contains(&acme_key),
        "a key is never rendered after creation"
    );
    assert!(page.contains(&acme_key[..8]), "its prefix is");
    c.goto(&format!("{base}/dashboard/invoices/{brasa_invoice}"))
        .await
        .unwrap();
    assert!(c.find(Locator::Css("#invoice-total")).await.is_ok());
    shot(&c, "07-invoice").await;

    // Switching to Portuguese: money as R$ 1.234,56 (USD figures at the recorded rate).
    c.goto(&format!("{base}/dashboard")).await.unwrap();
    c.find(Locator::Css("#lang option[value=pt-BR]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until("the page in Portuguese", || async {
        c.find(Locator::Css("html[lang=pt-BR]")).await.is_ok()
    })
    .await;
    let cost = text(&c, "#cost [data-value]").await;
    assert_eq!(cost, "R$ 56,00", "10.50 USD × 5.3337 = 56.00385 → R$ 56,00");
    assert_eq!(text(&c, "#margin [data-value]").await, "87,0%");
    assert!(text(&c, "[data-nav=customers]").await.contains("Clientes"));
    shot(&c, "09-overview-pt-BR").await;

    // Behind a TLS proxy the session cookie is also Secure.
    let raw_tls = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = raw_tls.get(format!("{base}/login")).send().await.unwrap();
    let token = login
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string();
    let r = raw_tls
        .post(format!("{base}/login"))
        .header("cookie", format!("fatura_login_csrf={token}"))
        .header("x-forwarded-proto", "https")
        .form(&[("key", ADMIN_KEY), ("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with("fatura_session="))
        .unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(attr), "{cookie}");
    }

    // Names are text, never markup.
    c.goto(&format!("{base}/dashboard/customers"))
        .await
        .unwrap();
    let page = c.source().await.unwrap();
    assert!(page.contains("Evil &lt;b&gt;Co&lt;/b&gt;") && !page.contains("<b>Co</b>"));
    c.goto(&format!("{base}/dashboard")).await.unwrap();

    // Forms without their CSRF token are refused and change nothing.
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let with_session =
        |req: reqwest::RequestBuilder| req.header("cookie", format!("fatura_session={session}"));
    let r = with_session(raw.post(format!("{base}/lang")))
        .form(&[("lang", "en"), ("back", "/dashboard")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = with_session(raw.post(format!("{base}/logout")))
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = raw
        .post(format!("{base}/login"))
        .form(&[("key", ADMIN_KEY)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "sign-in without its token"
    );
    c.refresh().await.unwrap();
    assert_eq!(path(&c).await, "/dashboard", "still signed in");
    assert!(
        c.find(Locator::Css("html[lang=pt-BR]")).await.is_ok(),
        "still in Portuguese"
    );

    // Sign out: the session is gone.
    c.find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until("the sign-in page", || async { path(&c).await == "/login" }).await;
    let r = with_session(raw.get(format!("{base}/dashboard")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "the old cookie no longer works"
    );

    // The portal: acme sees its own figures, and cannot reach brasa's data by URL.
    sign_in(&c, &base, "/portal/login", &acme_key).await;
    until("the portal", || async { path(&c).await == "/portal" }).await;
    assert!(text(&c, "h1").await.contains("Acme Inc"));
    assert!(
        c.find(Locator::Css("#balance")).await.is_ok(),
        "a prepaid balance"
    );
    let page = c.source().await.unwrap();
    assert!(!page.contains("brasa") && !page.contains("Brasa"));
    assert!(
        c.find(Locator::Css("#customer-margin")).await.is_err(),
        "no upstream cost or margin for customers"
    );
    shot(&c, "10-portal").await;
    c.goto(&format!("{base}/portal/invoices/{brasa_invoice}"))
        .await
        .unwrap();
    assert!(
        c.source().await.unwrap().contains("404") || text(&c, "body").await.contains("no invoice")
    );
    assert!(!c.source().await.unwrap().contains("Brasa"));
    c.goto(&format!("{base}/dashboard/customers/brasa"))
        .await
        .unwrap();
    assert_eq!(
        path(&c).await,
        "/login",
        "a customer session is not an operator's"
    );

    // Brasa, in Portuguese by its billing settings, sees its invoice.
    c.goto(&format!("{base}/portal")).await.unwrap();
    c.find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until("the portal sign-in", || async {
        path(&c).await == "/portal/login"
    })
    .await;
    sign_in(&c, &base, "/portal/login", &brasa_key).await;
    until("brasa's portal", || async { path(&c).await == "/portal" }).await;
    c.find(Locator::Css(&format!(
        "a[href='/portal/invoices/{brasa_invoice}']"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    until("brasa's invoice", || async {
        c.source().await.is_ok_and(|s| s.contains("Brasa Ltda"))
    })
    .await;
    assert!(c.source().await.unwrap().contains("R$ "));
    shot(&c, "11-portal-invoice").await;

    c.close().await.unwrap();
    driver.child.kill().await.unwrap();
}
