//! Gateway overhead: calls direct to the mock upstream vs through `fatura serve`'s gateway,
//! in one run, on this machine.
//!
//! Starts three processes — `fatura mock-upstream`, `fatura serve` (SQLite, gateway
//! configured, a prepaid customer so every call is reserved against a wallet and
//! metered) — and drives them from this process:
//!
//! * **fixed offered rates** (open loop: requests are fired on schedule whether or not
//!   earlier ones finished), non-streaming and streaming, direct and through the gateway;
//!   p50/p99 latency of each, and the *added* latency (gateway − direct);
//! * **max throughput**: closed loop with `--connections` concurrent callers;
//! * the gateway's resident memory after each phase;
//! * a check that the ledger holds exactly one event per successful gateway call.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fatura_bench::quantile;
use serde_json::{Value, json};

const ADMIN: &str = "bench-admin-key-0123456789";

#[derive(Debug, Parser)]
#[command(about = "Gateway added latency and throughput vs direct calls to the mock upstream")]
struct Args {
    /// Offered rates (requests/s), comma separated.
    #[arg(long, default_value = "500,2000,5000")]
    rates: String,
    /// Seconds per fixed-rate phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent callers in the max-throughput phase.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of the max-throughput phase.
    #[arg(long, default_value_t = 10)]
    throughput_seconds: u64,
    /// Completion tokens per call (stream chunks).
    #[arg(long, default_value_t = 20)]
    completion_tokens: u64,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fatura_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FATURA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("no parent")?.join("fatura");
    if !bin.exists() {
        bail!(
            "{} not found: build it with the same profile (cargo build -p fatura)",
            bin.display()
        );
    }
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

struct Env {
    _mock: Proc,
    gateway: Proc,
    direct: String,
    through: String,
    key: String,
    admin_base: String,
    _dir: tempfile::TempDir,
}

async fn start(args: &Args) -> anyhow::Result<Env> {
    let bin = fatura_bin()?;
    let dir = tempfile::tempdir()?;
    let mock_port = free_port()?;
    let mock = Proc(
        Command::new(&bin)
            .args([
                "mock-upstream",
                "--listen",
                &format!("127.0.0.1:{mock_port}"),
            ])
            .args([
                "--completion-tokens",
                &args.completion_tokens.to_string(),
                "--api-key",
                "sk-bench-upstream",
            ])
            .env("FATURA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let direct = format!("http://127.0.0.1:{mock_port}/v1");
    wait_ready(&format!("{direct}/models")).await?;
    let port = free_port()?;
    let config = format!(
        r#"
        listen = "127.0.0.1:{port}"
        database_url = "sqlite://{db}"
        [gateway]
        spill_path = "{spill}"
        [[gateway.upstreams]]
        name = "mock"
        kind = "openai"
        base_url = "{direct}"
        api_key_env = "BENCH_UPSTREAM_KEY"
        [[gateway.routes]]
        models = ["*"]
        upstreams = ["mock"]
        "#,
        db = dir.path().join("gw.db").display(),
        spill = dir.path().join("spill.jsonl").display(),
    );
    let config_path = dir.path().join("fatura.toml");
    std::fs::write(&config_path, config)?;
    let gateway = Proc(
        Command::new(&bin)
            .args(["--config", config_path.to_str().context("path")?, "serve"])
            .env("FATURA_ADMIN_KEY", ADMIN)
            .env("BENCH_UPSTREAM_KEY", "sk-bench-upstream")
            .env("FATURA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let admin_base = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{admin_base}/readyz")).await?;
    let client = reqwest::Client::new();
    let admin = |path: &str| {
        client
            .post(format!("{admin_base}{path}"))
            .bearer_auth(ADMIN)
    };
    admin("/v1/customers")
        .json(&json!({"id": "bench", "name": "Bench", "billing_mode": "prepaid"}))
        .send()
        .await?
        .error_for_status()?;
    admin("/v1/customers/bench/wallet/credits")
        .json(&json!({"amount": "100000000", "currency": "USD", "kind": "purchased"}))
        .send()
        .await?
        .error_for_status()?;
    let catalog = json!({"data": [{"id": "gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}}]});
    admin(
        "/v1/prices/import?format=openrouter&provider=openai&effective_from=2020-01-01T00:00:00Z",
    )
    .json(&catalog)
    .send()
    .await?
    .error_for_status()?;
    let key: Value = admin("/v1/customers/bench/keys")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(Env {
        _mock: mock,
        gateway,
        direct,
        through: format!("{admin_base}/v1"),
        key: key["key"].as_str().context("key")?.to_string(),
        admin_base,
        _dir: dir,
    })
}

fn body(stream: bool, n: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "gpt-4o",
        "stream": stream,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("benchmark call number {n}, please answer briefly")}],
    }))
    .unwrap_or_default()
}

/// One call; returns its latency to the last byte, or None on failure.
async fn one(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    stream: bool,
    n: u64,
) -> Option<Duration> {
    let t = Instant::now();
    let res = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body(stream, n))
        .send()
        .await
        .ok()?;
    if !res.status().is_success() {
        return None;
    }
    res.bytes().await.ok()?;
    Some(t.elapsed())
}

struct Phase {
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    achieved: f64,
}

/// Open loop: fires `rate` requests per second for `seconds`, on schedule.
async fn fixed_rate(base: &str, key: &str, stream: bool, rate: u64, seconds: u64) -> Phase {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = Arc::new(format!("{base}/chat/completions"));
    let key = Arc::new(key.to_string());
    let total = rate * seconds;
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let counter = Arc::new(AtomicU64::new(0));
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        let now = Instant::now();
        if due > now + Duration::from_micros(500) {
            tokio::time::sleep_until(due.into()).await;
        }
        let (client, url, key, tx, counter) = (
            client.clone(),
            url.clone(),
            key.clone(),
            tx.clone(),
            counter.clone(),
        );
        tokio::spawn(async move {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(one(&client, &url, &key, stream, n).await);
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut failed = 0;
    while let Some(r) = rx.recv().await {
        match r {
            Some(d) => lat.push(d.as_secs_f64() * 1000.0),
            None => failed += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Phase {
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        failed,
        achieved: lat.len() as f64 / elapsed,
    }
}

/// Closed loop: `connections` callers back to back for `seconds`.
async fn max_throughput(
    base: &str,
    key: &str,
    stream: bool,
    connections: usize,
    seconds: u64,
) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = Arc::new(format!("{base}/chat/completions"));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, url, key, done) = (client.clone(), url.clone(), key.to_string(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = c as u64 * 1_000_000;
            while Instant::now() < deadline {
                if one(&client, &url, &key, stream, n).await.is_some() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn ledger_events(admin_base: &str, expected: u64) -> anyhow::Result<u64> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = client
            .get(format!("{admin_base}/v1/usage"))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        let n = v["data"][0]["events"].as_u64().unwrap_or(0);
        if n >= expected || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = start(&args).await?;
    let pid = env.gateway.0.id();
    let rates: Vec<u64> = args
        .rates
        .split(',')
        .map(|r| r.trim().parse())
        .collect::<Result<_, _>>()?;
    // Warm-up, not measured: connection pools, the key cache, the wallet and the catalog.
    for stream in [false, true] {
        fixed_rate(&env.direct, "sk-bench-upstream", stream, 200, 1).await;
        fixed_rate(&env.through, &env.key, stream, 200, 1).await;
    }
    println!(
        "| mode | offered req/s | direct p50 ms | direct p99 ms | gateway p50 ms | gateway p99 ms | added p50 ms | added p99 ms | fatura's own p50 ≤ ms | fatura's own p99 ≤ ms | gateway achieved req/s | failed (direct/gateway) | gateway RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for stream in [false, true] {
        for &rate in &rates {
            let d = fixed_rate(&env.direct, "sk-bench-upstream", stream, rate, args.seconds).await;
            let before = overhead_histogram(&env.admin_base).await?;
            let g = fixed_rate(&env.through, &env.key, stream, rate, args.seconds).await;
            let (own50, own99) =
                overhead_between(&before, &overhead_histogram(&env.admin_base).await?);
            println!(
                "| {} | {rate} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {own50:.3} | {own99:.3} | {:.0} | {}/{} | {:.1} |",
                if stream { "stream" } else { "json" },
                d.p50_ms,
                d.p99_ms,
                g.p50_ms,
                g.p99_ms,
                g.p50_ms - d.p50_ms,
                g.p99_ms - d.p99_ms,
                g.achieved,
                d.failed,
                g.failed,
                rss_mib(pid),
            );
        }
    }
    println!();
    println!(
        "| mode | connections | direct max req/s | gateway max req/s | gateway / direct | gateway RSS MiB |"
    );
    println!("|---|---|---|---|---|---|");
    for stream in [false, true] {
        let d = max_throughput(
            &env.direct,
            "sk-bench-upstream",
            stream,
            args.connections,
            args.throughput_seconds,
        )
        .await;
        let g = max_throughput(
            &env.through,
            &env.key,
            stream,
            args.connections,
            args.throughput_seconds,
        )
        .await;
        println!(
            "| {} | {} | {d:.0} | {g:.0} | {:.2} | {:.1} |",
            if stream { "stream" } else { "json" },
            args.connections,
            g / d,
            rss_mib(pid)
        );
    }
    // Once the meter has drained, the ledger holds one event and one wallet charge per
    // metered call.
    drained(&env.admin_base).await?;
    let events = ledger_events(&env.admin_base, 1).await?;
    println!();
    println!("gateway calls metered (events in the ledger): {events}");
    check_wallet(&env.admin_base, events).await?;
    Ok(())
}

/// The gateway's overhead histogram (time in the handler minus time waiting on the
/// upstream): cumulative counts by upper bound (seconds), from `/metrics`.
async fn overhead_histogram(admin_base: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = reqwest::get(format!("{admin_base}/metrics"))
        .await?
        .text()
        .await?;
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("fatura_gateway_overhead_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// p50 and p99 upper bounds (ms) of the calls observed between two histogram snapshots.
fn overhead_between(before: &[(f64, f64)], after: &[(f64, f64)]) -> (f64, f64) {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, b)| *b),
            )
        })
        .collect();
    let total = diff.last().map_or(0.0, |d| d.1);
    let at = |q: f64| {
        diff.iter()
            .find(|(_, c)| *c >= q * total)
            .map_or(f64::NAN, |(le, _)| le * 1000.0)
    };
    (at(0.5), at(0.99))
}

/// Waits until the gateway's metering queue is empty.
async fn drained(admin_base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = reqwest::get(format!("{admin_base}/metrics"))
            .await?
            .text()
            .await?;
        if text.lines().any(|l| l == "fatura_meter_queue_depth 0") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the metering queue never drained");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The prepaid wallet has exactly one charge per metered event.
async fn check_wallet(admin_base: &str, events: u64) -> anyhow::Result<()> {
    let v: Value = reqwest::Client::new()
        .get(format!("{admin_base}/v1/customers/bench/wallet"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let charges = v["transactions"]
        .as_array()
        .map_or(0, |t| t.iter().filter(|t| t["kind"] == "charge").count()) as u64;
    println!("wallet charges: {charges}, reserved now: {}", v["reserved"]);
    if charges != events {
        bail!("{charges} wallet charges for {events} metered calls");
    }
    Ok(())
}
