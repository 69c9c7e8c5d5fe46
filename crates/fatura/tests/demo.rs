//! Black-box test of `fatura demo`: the binary starts on a fresh SQLite file, seeds it,
//! serves, sends live traffic through its gateway, prints what a new user needs and no
//! customer key, stops cleanly on SIGTERM, and a second start reuses the data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use chrono::{Duration as Days, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fatura");
const ADMIN: &str = "demo-test-admin-key-0123456789";
/// Prefix of every customer API key (`Fatura::create_api_key`).
const CUSTOMER_KEY_PREFIX: &str = "fk_";

/// The demo process, killed and reaped if the test fails before it stops.
struct Demo {
    child: Child,
    stdout: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(db: &str, dir: &std::path::Path, extra: &[&str]) -> Demo {
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--database",
            db,
            "--admin-key",
            ADMIN,
            "--history-days",
            "20",
        ])
        .args(extra)
        .current_dir(dir)
        .env_remove("FATURA_ADMIN_KEY")
        .env_remove("FATURA_DATABASE_URL")
        .env_remove("FATURA_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Demo {
        child,
        stdout: rx,
        stderr: Some(stderr),
    }
}

/// Stdout lines up to and including the admin key line (printed last of the banner), within
/// `deadline`.
fn banner(demo: &mut Demo, deadline: Instant) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match demo.stdout.recv_timeout(left) {
            Ok(line) => {
                let done = line.starts_with("Admin key:");
                lines.push(line);
                if done {
                    return lines;
                }
            }
            Err(_) => {
                // Exited, or too slow: stop it and show what it said.
                let _ = demo.child.kill();
                let status = demo.child.wait().unwrap();
                let stderr = demo.stderr.take().unwrap().join().unwrap();
                panic!(
                    "the demo did not print its banner in time ({status}); stdout: {lines:?}\nstderr:\n{stderr}"
                );
            }
        }
    }
}

/// SIGTERM, then the exit status within 30 s, and everything the process printed.
fn stop(mut demo: Demo, mut stdout: Vec<String>) -> (std::process::ExitStatus, String, String) {
    let status = Command::new("kill")
        .args(["-TERM", &demo.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = demo.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The process is gone: its pipes are closed, the reader threads end.
    let stderr = demo.stderr.take().unwrap().join().unwrap();
    stdout.extend(demo.stdout.iter());
    (exit, stdout.join("\n"), stderr)
}

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str) -> Value {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// All events in the ledger.
    async fn events(&self) -> u64 {
        let usage = self.get("/v1/usage").await;
        usage["data"][0]["events"].as_u64().unwrap_or(0)
    }
}

fn decimal(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap_or("0")).unwrap()
}

#[test]
fn demo_starts_seeded_and_alive_then_reuses_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("d.db").display());
    let mut demo = start(&db, dir.path(), &["--rate", "20"]);
    // Seeding 20 days of history (a debug build) takes seconds, not minutes.
    let lines = banner(&mut demo, Instant::now() + Duration::from_secs(180));
    let dashboard = lines
        .iter()
        .find_map(|l| l.strip_prefix("Dashboard: "))
        .unwrap_or_else(|| panic!("no dashboard URL: {lines:?}"))
        .to_string();
    assert!(dashboard.starts_with("http://127.0.0.1:"), "{dashboard}");
    assert!(dashboard.ends_with("/dashboard"), "{dashboard}");
    let base = dashboard.trim_end_matches("/dashboard").to_string();
    assert!(
        lines.iter().any(|l| l == "fatura demo is running"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| *l == format!("Customer portal: {base}/portal")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| *l == format!("Admin key: {ADMIN}")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("Seeded ")),
        "a fresh database is seeded: {lines:?}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let api = Api {
            base: base.clone(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        // Up: /healthz answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = api
                .client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "/healthz never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Customers: USD and BRL, prepaid and postpaid.
        let customers = api.get("/v1/customers").await;
        let customers = customers["data"].as_array().unwrap();
        assert!(customers.len() >= 4, "{customers:?}");
        let has = |field: &str, value: &str| customers.iter().any(|c| c[field] == value);
        assert!(
            has("currency", "USD") && has("currency", "BRL"),
            "{customers:?}"
        );
        assert!(has("billing_mode", "prepaid") && has("billing_mode", "postpaid"));
        assert!(
            customers.iter().any(|c| c["currency"] == "BRL"
                && c["locale"] == "pt-BR"
                && c["timezone"] == "America/Sao_Paulo"),
            "{customers:?}"
        );
        assert!(customers.iter().filter(|c| !c["plan_id"].is_null()).count() >= 2);

        // Plans with volume tiers, cost-plus and list.
        let plans = api.get("/v1/plans").await;
        let plans = plans["data"].as_array().unwrap();
        let tiered: Vec<&Value> = plans
            .iter()
            .filter(|p| p["tiers"]["tiers"].as_array().is_some_and(|t| t.len() >= 2))
            .collect();
        assert!(tiered.iter().any(|p| p["kind"] == "cost_plus"), "{plans:?}");
        assert!(tiered.iter().any(|p| p["kind"] == "list"), "{plans:?}");

        // The history has revenue, agents and outcomes.
        let today = Utc::now()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        let range = format!(
            "from={}&to={}",
            (today - Days::days(21)).format("%Y-%m-%dT%H:%M:%SZ"),
            (today + Days::days(1)).format("%Y-%m-%dT%H:%M:%SZ")
        );
        let summary = api.get(&format!("/v1/analytics/summary?{range}")).await;
        assert!(decimal(&summary["revenue"]) > Decimal::ZERO, "{summary}");
        assert!(decimal(&summary["cost"]) > Decimal::ZERO, "{summary}");
        assert!(summary["events"].as_i64().unwrap() > 1000, "{summary}");
        let agents: Vec<&str> = summary["top_agents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["name"].as_str())
            .collect();
        assert!(
            agents.contains(&"sdr-bot") && agents.contains(&"support"),
            "{agents:?}"
        );
        let roi = api
            .get(&format!("/v1/analytics/roi?group_by=agent&{range}"))
            .await;
        assert!(
            roi["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["outcomes"].as_i64().unwrap_or(0) > 0
                    && decimal(&r["value"]) > Decimal::ZERO),
            "{roi}"
        );

        // Live traffic: the ledger grows while the generator runs.
        let before = api.events().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = api.events().await;
            if now > before + 5 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no live traffic metered: {before} events, still {now}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Through the gateway: events tagged with agents, in the last hour's summary too.
        let hour = Utc::now() - Days::hours(1);
        let recent = api
            .get(&format!(
                "/v1/analytics/summary?from={}&to={}",
                hour.format("%Y-%m-%dT%H:%M:00Z"),
                (Utc::now() + Days::minutes(2)).format("%Y-%m-%dT%H:%M:00Z")
            ))
            .await;
        assert!(recent["events"].as_i64().unwrap() > 0, "{recent}");
    });

    let (exit, stdout, stderr) = stop(demo, lines);
    assert!(exit.success(), "{exit:?}\n{stderr}");
    assert!(
        !stdout.contains(CUSTOMER_KEY_PREFIX),
        "a customer key reached stdout:\n{stdout}"
    );
    assert!(
        !stderr.contains(CUSTOMER_KEY_PREFIX),
        "a customer key reached the log"
    );

    // A second start on the same file reuses it: no second seeding, the same customers.
    let mut again = start(&db, dir.path(), &["--no-traffic"]);
    let lines = banner(&mut again, Instant::now() + Duration::from_secs(60));
    assert!(
        lines.iter().any(|l| l.starts_with("Reusing the demo data")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("Seeded ")), "{lines:?}");
    let base = lines
        .iter()
        .find_map(|l| l.strip_prefix("Dashboard: "))
        .unwrap()
        .trim_end_matches("/dashboard")
        .to_string();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let customers: Value = client
            .get(format!("{base}/v1/customers"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(customers["data"].as_array().unwrap().len(), 6);
    });
    let (exit, stdout, _) = stop(again, lines);
    assert!(exit.success(), "{exit:?}");
    assert!(!stdout.contains(CUSTOMER_KEY_PREFIX));
}
