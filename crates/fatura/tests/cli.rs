//! Black-box tests of the `fatura` binary: every command, its errors, and `serve` with a
//! graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_fatura");
const ADMIN: &str = "cli-admin-key-0123456789";

fn fatura(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("FATURA_DATABASE_URL")
        .env_remove("FATURA_LISTEN")
        .env("FATURA_ADMIN_KEY", ADMIN)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["demo", "--help"],
        vec!["migrate", "--help"],
        vec!["customers", "--help"],
        vec!["customers", "create", "--help"],
        vec!["customers", "list", "--help"],
        vec!["keys", "create", "--help"],
        vec!["keys", "revoke", "--help"],
        vec!["prices", "import", "--help"],
        vec!["plans", "--help"],
        vec!["plans", "create", "--help"],
        vec!["plans", "list", "--help"],
        vec!["plans", "show", "--help"],
        vec!["plans", "update", "--help"],
        vec!["plans", "assign", "--help"],
        vec!["fx-rates", "set", "--help"],
        vec!["fx-rates", "list", "--help"],
        vec!["invoices", "run", "--help"],
        vec!["invoices", "list", "--help"],
    ] {
        let o = fatura(dir.path(), &args);
        assert!(o.status.success(), "{args:?}");
        assert!(
            stdout(&o).contains("Usage: fatura"),
            "{args:?}: {}",
            stdout(&o)
        );
    }
    let o = fatura(dir.path(), &["frobnicate"]);
    assert!(!o.status.success());
}

#[test]
fn admin_commands_work_on_the_default_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = fatura(d, &["migrate"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        d.join("fatura.db").exists(),
        "the default database is ./fatura.db"
    );

    let o = fatura(
        d,
        &[
            "customers",
            "create",
            "--name",
            "Acme Ltda",
            "--currency",
            "BRL",
            "--id",
            "acme",
        ],
    );
    assert_eq!(stdout(&o), "acme", "{}", stderr(&o));
    let o = fatura(d, &["customers", "create", "--name", "Other"]);
    assert!(stdout(&o).starts_with("cus_"));
    let o = fatura(d, &["customers", "list"]);
    let list = stdout(&o);
    assert_eq!(list.lines().count(), 2);
    assert!(
        list.lines()
            .any(|l| l.starts_with("acme\tBRL\t") && l.ends_with("\tAcme Ltda")),
        "{list}"
    );

    // Errors: one clear line and a non-zero exit, nothing written.
    for (args, needle) in [
        (
            vec!["customers", "create", "--name", "Again", "--id", "acme"],
            "already exists",
        ),
        (
            vec!["customers", "create", "--name", "X", "--currency", "JPY"],
            "unsupported currency",
        ),
        (
            vec!["keys", "create", "--customer", "nobody"],
            "no customer",
        ),
        (
            vec!["prices", "import", "--format", "csv", "x.json"],
            "unknown catalog format",
        ),
        (
            vec!["prices", "import", "--format", "litellm", "missing.json"],
            "cannot read missing.json",
        ),
        (
            vec![
                "prices",
                "import",
                "--format",
                "litellm",
                "x.json",
                "--effective-from",
                "soon",
            ],
            "RFC 3339",
        ),
        (
            vec!["--database", "mysql://x", "customers", "list"],
            "unsupported database URL",
        ),
    ] {
        let o = fatura(d, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        stdout(&fatura(d, &["customers", "list"])).lines().count(),
        2
    );

    let o = fatura(d, &["keys", "create", "--customer", "acme"]);
    let key = stdout(&o);
    assert!(key.starts_with("fk_") && key.len() > 40, "{key}");
    assert!(stderr(&o).contains("shown once"));

    let litellm = common::fixture("litellm_model_prices.json");
    let o = fatura(
        d,
        &[
            "prices",
            "import",
            "--format",
            "litellm",
            litellm.to_str().unwrap(),
            "--effective-from",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("new versions"), "{}", stdout(&o));
    let o = fatura(
        d,
        &[
            "prices",
            "import",
            "--format",
            "litellm",
            litellm.to_str().unwrap(),
            "--effective-from",
            "2026-01-01T00:00:00Z",
        ],
    );
    assert!(stdout(&o).contains(": 0 new versions"), "{}", stdout(&o));
    let openrouter = common::fixture("openrouter_models.json");
    let o = fatura(
        d,
        &[
            "prices",
            "import",
            "--format",
            "openrouter",
            openrouter.to_str().unwrap(),
        ],
    );
    assert!(stdout(&o).contains("imported 14 models"), "{}", stdout(&o));
}

#[test]
fn a_config_file_is_read_and_env_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fatura.toml"),
        "database_url = \"sqlite://from-file.db\"\n",
    )
    .unwrap();
    let o = fatura(d, &["--config", "fatura.toml", "migrate"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("from-file.db").exists());
    let o = Command::new(BIN)
        .args(["--config", "fatura.toml", "migrate"])
        .current_dir(d)
        .env("FATURA_DATABASE_URL", "sqlite://from-env.db")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(d.join("from-env.db").exists());
    std::fs::write(d.join("bad.toml"), "databse_url = 3\n").unwrap();
    let o = fatura(d, &["--config", "bad.toml", "migrate"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid config file"), "{}", stderr(&o));
}

#[test]
fn serve_refuses_to_start_without_an_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("FATURA_ADMIN_KEY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no admin key"), "{}", stderr(&o));
}

#[test]
fn serve_refuses_a_gateway_commit_delay_beyond_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fatura.toml"),
        "listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite://gw.db\"\n[gateway]\ncommit_delay_ms = 5000\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["--config", "fatura.toml", "serve"])
        .current_dir(d)
        .env("FATURA_ADMIN_KEY", "sk-admin-cli-test-key")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("commit_delay_ms must be at most 1000"),
        "{}",
        stderr(&o)
    );
    assert!(!d.join("gw.db").exists(), "nothing written");
}

/// A server process, killed and reaped if a test fails before it stops on its own.
struct ServerProcess(std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fatura serve` on a free port and returns the process and its address, read
/// from the "fatura listening" log line.
fn spawn_server(
    dir: &Path,
    database: &str,
) -> (ServerProcess, String, std::sync::mpsc::Receiver<String>) {
    spawn_server_with(
        dir,
        &["serve", "--listen", "127.0.0.1:0", "--database", database],
    )
}

/// Starts `fatura` with `args` (a `serve`) and returns as [`spawn_server`] does.
fn spawn_server_with(
    dir: &Path,
    args: &[&str],
) -> (ServerProcess, String, std::sync::mpsc::Receiver<String>) {
    let child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env(common::serve::UPSTREAM_KEY_ENV, common::UPSTREAM_KEY)
        .env("FATURA_ADMIN_KEY", ADMIN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ServerProcess(child);
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server did not start");
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            return (child, addr, rx);
        }
    }
}

fn serve_ingest_and_stop(database: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, logs) = spawn_server(dir.path(), database);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let base = format!("http://{addr}");
        let r = client.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .post(format!("{base}/v1/customers"))
            .bearer_auth(ADMIN)
            .json(&json!({"id": "bb", "name": "Black Box"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let key: Value = client
            .post(format!("{base}/v1/customers/bb/keys"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let r = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(ADMIN)
            .json(&common::event("bb-1", "bb", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let usage: Value = client
            .get(format!("{base}/v1/usage"))
            .bearer_auth(key["key"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(usage["data"][0]["events"], 1);
    });
    // Graceful shutdown on SIGTERM.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    let log: Vec<String> = logs.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
    // No secret reaches the log.
    assert!(!log.iter().any(|l| l.contains(ADMIN)));
}

#[test]
fn serve_on_sqlite_answers_and_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    serve_ingest_and_stop(&format!("sqlite://{}", dir.path().join("bb.db").display()));
}

#[test]
fn serve_on_postgres_answers_and_stops_gracefully_on_sigterm() {
    let admin = common::postgres_admin_url();
    let name = format!("fatura_cli_{}", common::hex_id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL must be running");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        format!("{}/{name}", &admin[..admin.rfind('/').unwrap()])
    });
    serve_ingest_and_stop(&url);
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    });
}

#[test]
fn plans_and_rates_are_managed_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, v: Value| {
        let p = d.join(name);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        p.display().to_string()
    };
    let plan = write(
        "plan.json",
        json!({"id": "growth", "name": "Growth", "currency": "USD", "kind": "cost_plus", "margin": "0.9",
               "tiers": {"metric": "spend", "mode": "graduated",
                         "tiers": [{"up_to": "1000", "discount": "0"}, {"up_to": null, "discount": "0.05"}]}}),
    );
    let o = fatura(d, &["plans", "create", "--file", &plan]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(out["id"], "growth");
    assert_eq!(out["margin_floor"], "0.87");
    // A bad plan: one line, non-zero, nothing created.
    let bad = write(
        "bad.json",
        json!({"id": "bad", "name": "Bad", "currency": "USD", "kind": "cost_plus", "margin": "0.5"}),
    );
    let o = fatura(d, &["plans", "create", "--file", &bad]);
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("margin"), "{}", stderr(&o));
    let o = fatura(d, &["plans", "create", "--file", "/nonexistent.json"]);
    assert!(!o.status.success());
    let change = write(
        "change.json",
        json!({"margin": "0.92", "effective_from": "2030-01-01T00:00:00Z"}),
    );
    let o = fatura(d, &["plans", "update", "growth", "--file", &change]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = fatura(d, &["plans", "show", "growth"]);
    let out: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(out["versions"].as_array().unwrap().len(), 2);
    assert_eq!(out["margin"], "0.9", "version 2 starts in 2030");
    let o = fatura(d, &["plans", "list"]);
    assert_eq!(stdout(&o), "growth\t1\tUSD\tcost_plus\tGrowth");
    let o = fatura(
        d,
        &["customers", "create", "--name", "Acme", "--id", "acme"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = fatura(
        d,
        &["plans", "assign", "--customer", "acme", "--plan", "growth"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = fatura(
        d,
        &["plans", "assign", "--customer", "acme", "--plan", "nope"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no plan"), "{}", stderr(&o));
    let o = fatura(
        d,
        &[
            "fx-rates",
            "set",
            "--currency",
            "BRL",
            "--date",
            "2026-11-01",
            "--rate",
            "5.4321",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = fatura(
        d,
        &[
            "fx-rates",
            "set",
            "--currency",
            "BRL",
            "--date",
            "2026-11-01",
            "--rate",
            "6",
        ],
    );
    assert!(!o.status.success(), "a day's rate is not replaced");
    let o = fatura(
        d,
        &[
            "fx-rates",
            "set",
            "--currency",
            "BRL",
            "--date",
            "yesterday",
            "--rate",
            "6",
        ],
    );
    assert!(!o.status.success());
    let o = fatura(d, &["fx-rates", "list"]);
    assert_eq!(stdout(&o), "BRL\t2026-11-01\t5.4321");
    // Billing on demand: acme (created now, no usage) gets a zero invoice for each closed
    // cycle, paid at once; a second run changes nothing. The run is dated past the end of
    // the current cycle (whatever today is) and its grace period.
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(chrono::Utc::now());
    let at = (end + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let o = fatura(d, &["invoices", "run", "--at", &at]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).ends_with("invoices finalised"), "{}", stdout(&o));
    let first = stdout(&o);
    let o = fatura(d, &["invoices", "run", "--at", &at]);
    assert_eq!(
        stdout(&o),
        "0 drafts created, 0 drafts refreshed, 0 invoices finalised",
        "{first}"
    );
    let o = fatura(d, &["invoices", "list", "--customer", "acme"]);
    let lines: Vec<String> = stdout(&o).lines().map(String::from).collect();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| l.contains("\tpaid\tacme\t")),
        "{lines:?}"
    );
    let o = fatura(d, &["invoices", "run", "--at", "soon"]);
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

/// `fatura invoices run` and `fatura keys revoke` from the CLI while `fatura serve` runs on
/// the same SQLite file: the server's real-time wallet (what its gateway reserves against)
/// counts the volume-discount rebate the CLI's run credited, and the revoked key stops
/// working on the server. (Before, the server's in-memory balance never saw the rebate.)
#[test]
fn a_cli_billing_run_beside_serve_leaves_the_servers_wallets_right() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mock = rt.block_on(common::serve::mock_upstream());
    std::fs::write(
        d.join("fatura.toml"),
        format!(
            "database_url = \"sqlite://fatura.db\"\n{}",
            common::serve::gateway_config(&mock, "", "[billing]\nrun_every_seconds = 0")
        ),
    )
    .unwrap();
    let (_server, addr, _logs) = spawn_server_with(
        d,
        &[
            "--config",
            "fatura.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let admin = |m: reqwest::Method, path: &str| {
        client
            .request(m, format!("{base}{path}"))
            .bearer_auth(ADMIN)
    };
    let key: Value = rt.block_on(async {
        let catalog =
            json!({"data": [{"id": "flat", "pricing": {"prompt": "0", "completion": "0.0013"}}]});
        let r = admin(
            reqwest::Method::POST,
            "/v1/prices/import?format=openrouter&effective_from=2020-01-01T00:00:00Z",
        )
        .body(catalog.to_string())
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        // "flat" at 0.02 per completion token (list), 25% off beyond 0.10 of spend.
        for (path, body) in [
            (
                "/v1/plans",
                json!({"id": "tiered", "name": "Tiered", "currency": "USD", "kind": "list",
                    "list_prices": [{"pattern": "flat", "prompt": "0", "completion": "20000"}],
                    "tiers": {"metric": "spend", "mode": "graduated", "tiers": [
                        {"up_to": "0.10", "discount": "0"}, {"up_to": null, "discount": "0.25"}]},
                    "effective_from": "2020-01-01T00:00:00Z"}),
            ),
            (
                "/v1/customers",
                json!({"id": "pre", "name": "Prepaid", "billing_mode": "prepaid"}),
            ),
            (
                "/v1/customers/pre/wallet/credits",
                json!({"amount": "1.00", "currency": "USD", "kind": "purchased"}),
            ),
        ] {
            let r = admin(reqwest::Method::POST, path)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{path}: {}", r.text().await.unwrap());
        }
        let r = admin(reqwest::Method::PATCH, "/v1/customers/pre")
            .json(&json!({"plan_id": "tiered", "plan_effective_from": "2020-01-01T00:00:00Z"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        admin(reqwest::Method::POST, "/v1/customers/pre/keys")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let secret = key["key"].as_str().unwrap().to_string();
    let call = |max_tokens: u64| {
        let (client, url, secret) = (
            client.clone(),
            format!("{base}/v1/chat/completions"),
            secret.clone(),
        );
        async move {
            client
                .post(url)
                .bearer_auth(secret)
                .json(&json!({"model": "flat", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "hi"}],
                    "mock": {"completion_tokens": 10}}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let wallet = || async {
        let w: Value = admin(reqwest::Method::GET, "/v1/customers/pre/wallet")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        w
    };
    rt.block_on(async {
        // Four calls of 10 tokens, each 0.20 from the wallet: 0.20 left once all are written.
        for _ in 0..4 {
            assert_eq!(call(10).await, 200);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = wallet().await;
            if w["transactions"].as_array().unwrap().len() == 5 {
                assert_eq!(w["balance"], "0.2", "{w}");
                break;
            }
            assert!(Instant::now() < deadline, "the calls were not written: {w}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 0.30 (15 tokens) is more than is left.
        assert_eq!(call(15).await, 402);
    });
    // The cycle's run, from the CLI: 0.62 billed (0.10 + 0.70 at 25% off), paid from the
    // 0.80 the wallet paid; 0.18 credited back to the wallet.
    let (_, end) = fatura_core::billing::CycleSpec::default().cycle_containing(chrono::Utc::now());
    let at = (end + chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let o = fatura(
        d,
        &["--config", "fatura.toml", "invoices", "run", "--at", &at],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("\tpre\t0.62 USD"), "{}", stdout(&o));
    rt.block_on(async {
        let w = wallet().await;
        assert_eq!(w["balance"], "0.38", "the rebate counts on the server: {w}");
        assert_eq!(w["available"], "0.38", "{w}");
        // And the gateway reserves against it: 0.30 now fits.
        assert_eq!(call(15).await, 200);
    });
    // A key revoked from the CLI stops working on the server (its cache is dropped).
    let o = fatura(
        d,
        &[
            "--config",
            "fatura.toml",
            "keys",
            "revoke",
            key["id"].as_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = call(1).await;
            if status == 401 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the revoked key still works on the server: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
