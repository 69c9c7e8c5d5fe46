//! Crash tests: `fatura serve` killed with SIGKILL at random moments while events stream in
//! through the ingestion API and calls through the gateway, restarted each time; at the
//! end every acknowledged event is in the ledger exactly once, the wallet's balance equals
//! its credits minus its charges (one per prepaid event, equal to its price), and the
//! invoices rated from the ledger bill exactly the ledger.
//!
//! `FATURA_CRASH_KILLS` sets the number of kills (20 in the test command; the long variant
//! runs more: `FATURA_CRASH_KILLS=200 cargo test -p fatura --test crash`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::serve::{
    ServeProcess, admin_get, admin_post, free_port, gateway_config, mock_upstream,
};
use common::{ADMIN_KEY, Backend, TestApp, catalog, event};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};

/// Starts `fatura serve` on `port` (the same port at every restart) with `durability`
/// metering, and waits until it is ready.
async fn start(
    dir: &Path,
    port: u16,
    database_url: &str,
    mock: &str,
    run: usize,
    durability: &str,
) -> ServeProcess {
    let spill = dir.join("spill.jsonl");
    let config = gateway_config(
        mock,
        &format!(
            "durability = \"{durability}\"\nspill_path = \"{}\"",
            spill.display()
        ),
        "[billing]\nrun_every_seconds = 0",
    );
    ServeProcess::start(dir, &format!("run-{run}"), port, database_url, &config, &[]).await
}

#[derive(Default)]
struct Acked {
    /// Event ids (ingested, or gateway request ids) whose request was answered 200.
    ids: Vec<String>,
    /// Requests cut by a kill (no answer), or refused with 503 while the database was down.
    cut: u64,
    /// Requests answered 500 (a database outage must be a 503 the client can retry).
    internal: u64,
}

/// One load worker until `stop`, by `w % 4`: 0 ingests batches of 5 events for "post", 1
/// calls the gateway for "pre" (prepaid), 2 and 3 for "post" (each kind on its own worker,
/// so a kind that waits on a missing database does not hold up the others). A 200 answer
/// acknowledges its events; a request without an answer, or answered 5xx, acknowledges
/// nothing.
fn load(
    w: usize,
    base: String,
    keys: HashMap<&'static str, String>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let now = chrono::Utc::now().to_rfc3339();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let (request, ids) = if w.is_multiple_of(4) {
                let ids: Vec<String> = (0..5).map(|k| format!("ev-{w}-{n}-{k}")).collect();
                let events: Vec<Value> = ids
                    .iter()
                    .map(|id| event(id, "post", json!({"timestamp": now})))
                    .collect();
                (
                    client
                        .post(format!("{base}/v1/events"))
                        .bearer_auth(ADMIN_KEY)
                        .json(&json!({ "events": events })),
                    ids,
                )
            } else {
                let customer = if w % 4 == 1 { "pre" } else { "post" };
                (
                    client
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&keys[customer])
                        .json(&json!({"model": "openai/gpt-4o", "max_tokens": 20,
                                      "messages": [{"role": "user", "content": "hello there"}]})),
                    Vec::new(),
                )
            };
            match request.send().await {
                Ok(r) => {
                    let status = r.status();
                    let id = r
                        .headers()
                        .get("x-fatura-request-id")
                        .map(|v| v.to_str().unwrap().to_string());
                    let complete = r.bytes().await.is_ok();
                    let mut a = acked.lock().unwrap();
                    match (status, complete) {
                        (StatusCode::OK, true) => {
                            a.ids.extend(ids);
                            a.ids.extend(id);
                        }
                        (s, true) if s.is_client_error() => panic!("answered {s}"),
                        (StatusCode::INTERNAL_SERVER_ERROR, true) => a.internal += 1,
                        _ => a.cut += 1,
                    }
                }
                Err(_) => {
                    acked.lock().unwrap().cut += 1;
                    // The server is down (killed): try again once it is back.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

/// The catalog (gpt-4o) and two customers: "post" (postpaid) and "pre" (prepaid, 1,000 USD
/// of credit); their keys.
async fn customers(app: &TestApp) -> HashMap<&'static str, String> {
    catalog(
        app,
        "2026-01-01T00:00:00Z",
        &[("openai/gpt-4o", "0.0000025", "0.00001")],
    )
    .await;
    app.customer("post").await;
    let (st, _) = app
        .post(
            "/v1/customers",
            &json!({"id": "pre", "name": "Prepaid", "billing_mode": "prepaid"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = app
        .post(
            "/v1/customers/pre/wallet/credits",
            &json!({"amount": "1000", "currency": "USD", "kind": "purchased"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    [
        ("pre", app.key_for("pre").await),
        ("post", app.key_for("post").await),
    ]
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing() {
    let kills: usize = std::env::var("FATURA_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let app = TestApp::start(Backend::Sqlite).await;
    let keys = customers(&app).await;
    let database_url = app.database_url.clone();
    // The harness's own server stops; its database file (in its directory) is served by the
    // process under test from now on.
    let mut app = app;
    app.stop().await;
    let mock = mock_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start(dir.path(), port, &database_url, &mock, 0, "sync").await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let workers: Vec<_> = (0..4usize)
        .map(|w| load(w, base.clone(), keys.clone(), stop.clone(), acked.clone()))
        .collect();
    // Kill at a random moment of each run (after it answered something), restart, repeat.
    for run in 1..=kills {
        let answered = acked.lock().unwrap().ids.len();
        let started = Instant::now();
        while acked.lock().unwrap().ids.len() == answered {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "run {run} answered nothing"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let after = rand::random_range(0..300);
        tokio::time::sleep(Duration::from_millis(after)).await;
        server.kill();
        server = start(dir.path(), port, &database_url, &mock, run, "sync").await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "{kills} kills: {} acknowledged events, {} requests cut",
        acked.ids.len(),
        acked.cut
    );
    assert!(acked.cut > 0, "no kill ever cut a request");
    assert_eq!(acked.internal, 0, "requests answered 500");

    // Every acknowledged event is in the ledger exactly once.
    let pool = sqlx::SqlitePool::connect(&database_url).await.unwrap();
    let stored: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT id, customer_id, revenue FROM usage_events")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut count: HashMap<&str, u32> = HashMap::new();
    for (id, _, _) in &stored {
        *count.entry(id.as_str()).or_default() += 1;
    }
    for id in &acked.ids {
        assert_eq!(count.get(id.as_str()), Some(&1), "acknowledged event {id}");
    }
    let revenue = |customer: &str| -> (i64, Decimal) {
        let of: Vec<Decimal> = stored
            .iter()
            .filter(|(_, c, _)| c == customer)
            .map(|(_, _, r)| r.as_deref().expect("priced").parse().unwrap())
            .collect();
        (of.len() as i64, of.iter().sum())
    };
    // The wallet: one charge per prepaid event, equal to its price; balance = credits − charges.
    let charges: Vec<(String, String)> = sqlx::query_as(
        "SELECT t.amount, e.revenue FROM wallet_transactions t JOIN usage_events e ON e.id = t.event_id \
         WHERE t.customer_id = 'pre' AND t.kind = 'charge'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let (pre_events, pre_revenue) = revenue("pre");
    assert_eq!(charges.len() as i64, pre_events);
    for (amount, price) in &charges {
        assert_eq!(
            -amount.parse::<Decimal>().unwrap(),
            price.parse::<Decimal>().unwrap()
        );
    }
    let w = admin_get(&base, "/v1/customers/pre/wallet").await;
    assert_eq!(
        w["balance"].as_str().unwrap().parse::<Decimal>().unwrap(),
        Decimal::from(1000) - pre_revenue,
        "{w}"
    );
    assert_eq!(w["reserved"], "0", "{w}");

    // Invoices rated from the ledger bill exactly the ledger: every event once, the
    // postpaid total the sum of its events' prices rounded to cents.
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(chrono::Utc::now());
    let at = (end + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let r = admin_post(&base, &format!("/v1/billing/run?at={at}"), json!({})).await;
    for (customer, events, total) in [
        ("post", revenue("post").0, revenue("post").1),
        ("pre", pre_events, pre_revenue),
    ] {
        let inv = r["finalized"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["customer_id"] == customer)
            .unwrap_or_else(|| panic!("{r}"));
        assert_eq!(inv["events"], events, "{inv}");
        assert_eq!(
            inv["subtotal"]
                .as_str()
                .unwrap()
                .parse::<Decimal>()
                .unwrap(),
            total.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven),
            "{inv}"
        );
    }
    drop(server);
}

/// Events the gateway's writer spilled to its file so far (`/metrics`).
async fn spilled(base: &str) -> f64 {
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("fatura_events_spilled_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Stops and starts the local PostgreSQL cluster (the one the test command starts); started
/// again on drop, so a failing test cannot leave it down for the tests after it.
struct PgCluster {
    version: String,
}

impl PgCluster {
    fn new() -> PgCluster {
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("a Debian PostgreSQL cluster (pg_ctlcluster) runs on this machine")
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .next()
            .unwrap();
        PgCluster { version }
    }

    fn ctl(&self, action: &str) {
        let mut cmd = std::process::Command::new("pg_ctlcluster");
        cmd.args(["--skip-systemctl-redirect", &self.version, "main", action]);
        if action == "stop" {
            cmd.args(["--", "-m", "fast"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctlcluster {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn wait_up(&self) {
        let started = Instant::now();
        while sqlx::PgPool::connect(&common::postgres_admin_url())
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "PostgreSQL did not come back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, "main", "start"])
            .output();
    }
}

/// PostgreSQL is stopped twice and started again while events and gateway calls stream in
/// (default, asynchronous metering: answered calls are spilled to the local file while the
/// database is down and replayed when it is back). Afterwards every acknowledged event is in
/// the ledger exactly once and the wallet equals its credits minus its charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_and_started_loses_nothing_and_doubles_nothing() {
    let app = TestApp::start(Backend::Postgres).await;
    let keys = customers(&app).await;
    let mut app = app;
    app.stop().await;
    let database_url = app.database_url.clone();
    let mock = mock_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = start(dir.path(), port, &database_url, &mock, 0, "async").await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let workers: Vec<_> = (0..4usize)
        .map(|w| load(w, base.clone(), keys.clone(), stop.clone(), acked.clone()))
        .collect();
    let pg = PgCluster::new();
    for outage in 0..2 {
        let answered = acked.lock().unwrap().ids.len();
        let started = Instant::now();
        while acked.lock().unwrap().ids.len() < answered + 200 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no progress before outage {outage}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let spilled_before = spilled(&base).await;
        pg.ctl("stop");
        // While the database is down the gateway keeps answering postpaid calls (and
        // prepaid ones from the wallet's share): wait until some were answered and the
        // metering writer, unable to commit, spilled them to its file.
        let answered = acked.lock().unwrap().ids.len();
        let started = Instant::now();
        while acked.lock().unwrap().ids.len() < answered + 20
            || spilled(&base).await <= spilled_before
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "nothing answered and spilled during outage {outage}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pg.ctl("start");
        pg.wait_up().await;
    }
    let answered = acked.lock().unwrap().ids.len();
    let started = Instant::now();
    while acked.lock().unwrap().ids.len() < answered + 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress after the outages"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let spilled = spilled(&base).await;
    eprintln!(
        "2 outages: {} acknowledged events, {} requests refused or cut, {spilled} events spilled",
        acked.ids.len(),
        acked.cut
    );
    assert!(spilled > 0.0, "the outages spilled nothing");
    assert_eq!(acked.internal, 0, "requests answered 500 instead of 503");
    // The spill file is replayed in the background: wait until every acknowledged event is
    // in the ledger, then check that none is there twice and the wallet is exact.
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let started = Instant::now();
    let stored = loop {
        let stored: Vec<(String, String, Option<Decimal>)> =
            sqlx::query_as("SELECT id, customer_id, revenue FROM usage_events")
                .fetch_all(&pool)
                .await
                .unwrap();
        let ids: std::collections::HashSet<&str> =
            stored.iter().map(|(i, _, _)| i.as_str()).collect();
        if acked.ids.iter().all(|i| ids.contains(i.as_str())) {
            break stored;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "acknowledged events missing from the ledger"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut count: HashMap<&str, u32> = HashMap::new();
    for (id, _, _) in &stored {
        *count.entry(id.as_str()).or_default() += 1;
    }
    assert!(count.values().all(|n| *n == 1));
    let (pre_events, pre_revenue) = stored
        .iter()
        .filter(|(_, c, _)| c == "pre")
        .fold((0i64, Decimal::ZERO), |(n, s), (_, _, r)| {
            (n + 1, s + r.expect("priced"))
        });
    let (charges, charged): (i64, Decimal) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(-SUM(amount), 0) FROM wallet_transactions WHERE customer_id = 'pre' AND kind = 'charge'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((charges, charged), (pre_events, pre_revenue));
    let w = admin_get(&base, "/v1/customers/pre/wallet").await;
    assert_eq!(
        w["balance"].as_str().unwrap().parse::<Decimal>().unwrap(),
        Decimal::from(1000) - pre_revenue,
        "{w}"
    );
    drop(server);
}
