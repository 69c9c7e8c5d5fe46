//! Fleet throughput: the aggregate gateway and ingestion throughput of 1, 2 and 3
//! `fatura serve` processes sharing one PostgreSQL database, measured in one run on this
//! machine, with where the CPU went (to name the bottleneck).
//!
//! For each fleet size: a fresh database, N processes (the first migrates; the others start
//! once it is ready), one prepaid customer whose wallet every gateway call reserves from
//! (budget shares in PostgreSQL), and a shared `fatura mock-upstream`. Then, closed loop:
//!
//! * **gateway**: `--connections` callers round-robin over the instances for `--seconds`;
//! * **ingestion**: `--connections / 4` callers posting batches of `--batch` events.
//!
//! CPU seconds are read from `/proc` for the fatura processes, PostgreSQL's processes and
//! the whole machine. At the end every instance is stopped with SIGTERM (the metering queue
//! drains) and the ledger must hold exactly one event per acknowledged call and event.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fatura_bench::{
    ADMIN, Proc, bench_customer, cpu_seconds, drop_database, fatura_bin, free_port,
    scratch_database, wait_ready,
};
use serde_json::{Value, json};
use sqlx::Connection;

#[derive(Debug, Parser)]
#[command(
    about = "Aggregate gateway and ingestion throughput of 1, 2, 3 instances on one PostgreSQL"
)]
struct Args {
    /// Fleet sizes to measure, comma separated.
    #[arg(long, default_value = "1,2,3")]
    instances: String,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent gateway callers (ingestion uses a quarter of them).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Events per ingestion request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Billing mode of the gateway's customer: `prepaid` (every call reserves from a wallet
    /// shared by the fleet) or `postpaid` (no budget: shows what the shared wallet costs).
    #[arg(long, default_value = "prepaid")]
    billing_mode: String,
    /// PostgreSQL URL used to create scratch databases.
    #[arg(
        long,
        env = "FATURA_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
}

/// CPU seconds of every process named `postgres`.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

/// Busy and total CPU seconds of the whole machine, from `/proc/stat`.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

struct Cpu {
    fatura: f64,
    postgres: f64,
    busy: f64,
    total: f64,
}

fn cpu_now(pids: &[u32]) -> Cpu {
    let (busy, total) = machine_cpu();
    Cpu {
        fatura: pids.iter().map(|p| cpu_seconds(*p)).sum(),
        postgres: postgres_cpu_seconds(),
        busy,
        total,
    }
}

/// Per cent of one phase's CPU time: fatura, PostgreSQL, everything else (load generator,
/// mock upstream), and the machine's utilisation.
fn cpu_split(a: &Cpu, b: &Cpu) -> String {
    let busy = (b.busy - a.busy).max(1e-9);
    let fatura = b.fatura - a.fatura;
    let pg = b.postgres - a.postgres;
    format!(
        "{:.0}% / {:.0}% / {:.0}% (machine {:.0}% busy)",
        100.0 * fatura / busy,
        100.0 * pg / busy,
        100.0 * (busy - fatura - pg).max(0.0) / busy,
        100.0 * busy / (b.total - a.total).max(1e-9)
    )
}

struct Row {
    instances: usize,
    gateway_rps: f64,
    gateway_cpu: String,
    ingest_eps: f64,
    ingest_cpu: String,
}

async fn measure(args: &Args, n: usize, mock: &str) -> anyhow::Result<Row> {
    let bin = fatura_bin()?;
    let dir = tempfile::tempdir()?;
    let name = format!("fatura_bench_fleet_{}_{n}", std::process::id());
    let db_url = scratch_database(&args.postgres_url, &name).await?;
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for i in 0..n {
        let port = free_port()?;
        let config = format!(
            r#"
            listen = "127.0.0.1:{port}"
            database_url = "{db_url}"
            [gateway]
            spill_path = "{spill}"
            [[gateway.upstreams]]
            name = "mock"
            kind = "openai"
            base_url = "{mock}"
            api_key_env = "BENCH_UPSTREAM_KEY"
            [[gateway.routes]]
            models = ["*"]
            upstreams = ["mock"]
            "#,
            spill = dir.path().join(format!("spill-{i}.jsonl")).display(),
        );
        let path = dir.path().join(format!("fatura-{i}.toml"));
        std::fs::write(&path, config)?;
        procs.push(Proc(
            Command::new(&bin)
                .args(["--config", path.to_str().context("path")?, "serve"])
                .env("FATURA_ADMIN_KEY", ADMIN)
                .env("BENCH_UPSTREAM_KEY", "sk-bench-upstream")
                .env("FATURA_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()?,
        ));
        let base = format!("http://127.0.0.1:{port}");
        // The first instance migrates the database; the others start on it afterwards.
        wait_ready(&format!("{base}/readyz")).await?;
        bases.push(base);
    }
    let pids: Vec<u32> = procs.iter().map(|p| p.0.id()).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;
    let key = bench_customer(&bases[0], args.billing_mode == "prepaid").await?;
    let bases = Arc::new(bases);

    // Gateway phase.
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let before = cpu_now(&pids);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (client, bases, key, ok, failed, stop) = (
            client.clone(),
            bases.clone(),
            key.clone(),
            ok.clone(),
            failed.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let url = format!("{}/v1/chat/completions", bases[i % bases.len()]);
                let body = json!({"model": "gpt-4o", "max_tokens": 64,
                    "messages": [{"role": "user", "content": format!("fleet call {i}")}]});
                let good = match client.post(url).bearer_auth(&key).json(&body).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let gateway_secs = started.elapsed().as_secs_f64();
    let after = cpu_now(&pids);
    let calls = ok.load(Ordering::Relaxed);
    if failed.load(Ordering::Relaxed) > 0 {
        bail!(
            "{} gateway calls failed with {n} instances",
            failed.load(Ordering::Relaxed)
        );
    }
    let gateway_cpu = cpu_split(&before, &after);

    // Ingestion phase.
    let accepted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let before = cpu_now(&pids);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let now = chrono::Utc::now().to_rfc3339();
    for c in 0..(args.connections / 4).max(1) {
        let (client, bases, accepted, stop, now, batch) = (
            client.clone(),
            bases.clone(),
            accepted.clone(),
            stop.clone(),
            now.clone(),
            args.batch,
        );
        tasks.push(tokio::spawn(async move {
            let mut r = 0usize;
            while !stop.load(Ordering::Relaxed) {
                r += 1;
                let events: Vec<Value> = (0..batch)
                    .map(|k| {
                        json!({"id": format!("fleet-{c}-{r}-{k}"), "customer_id": "bench",
                               "timestamp": now, "provider": "openai", "model": "gpt-4o",
                               "input_tokens": 1000, "output_tokens": 100,
                               "tags": {"agent": format!("agent-{}", k % 4)}})
                    })
                    .collect();
                let url = format!("{}/v1/events", bases[(c + r) % bases.len()]);
                let res = client
                    .post(url)
                    .bearer_auth(ADMIN)
                    .json(&json!({ "events": events }))
                    .send()
                    .await;
                if let Ok(res) = res
                    && res.status().is_success()
                    && let Ok(v) = res.json::<Value>().await
                {
                    accepted.fetch_add(v["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let ingest_secs = started.elapsed().as_secs_f64();
    let after = cpu_now(&pids);
    let ingested = accepted.load(Ordering::Relaxed);
    let ingest_cpu = cpu_split(&before, &after);

    // Stop the fleet cleanly; the ledger holds every acknowledged call and event once.
    for p in procs {
        p.terminate()?;
    }
    let mut db = sqlx::PgConnection::connect(&db_url).await?;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(&mut db)
        .await?;
    if u64::try_from(stored)? != calls + ingested {
        bail!(
            "{n} instances: the ledger holds {stored} events, expected {calls} calls + {ingested} events"
        );
    }
    drop(db);
    drop_database(&args.postgres_url, &name).await?;
    Ok(Row {
        instances: n,
        gateway_rps: calls as f64 / gateway_secs,
        gateway_cpu,
        ingest_eps: ingested as f64 / ingest_secs,
        ingest_cpu,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = fatura_bin()?;
    let mock_port = free_port()?;
    let _mock = Proc(
        Command::new(&bin)
            .args([
                "mock-upstream",
                "--listen",
                &format!("127.0.0.1:{mock_port}"),
                "--api-key",
                "sk-bench-upstream",
            ])
            .env("FATURA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let mock = format!("http://127.0.0.1:{mock_port}/v1");
    wait_ready(&format!("{mock}/models")).await?;
    let mut rows = Vec::new();
    for n in args.instances.split(',') {
        let n: usize = n.trim().parse().context("--instances")?;
        rows.push(measure(&args, n, &mock).await?);
    }
    println!(
        "{} s per phase, {} gateway callers ({} customer), {} ingestion callers × {} events; CPU split = fatura / PostgreSQL / load generator + mock",
        args.seconds,
        args.connections,
        args.billing_mode,
        (args.connections / 4).max(1),
        args.batch
    );
    println!(
        "| instances | gateway calls/s | vs 1 | CPU split (gateway) | ingested events/s | vs 1 | CPU split (ingestion) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (g1, i1) = rows
        .first()
        .map_or((1.0, 1.0), |r| (r.gateway_rps, r.ingest_eps));
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2}× | {} | {:.0} | {:.2}× | {} |",
            r.instances,
            r.gateway_rps,
            r.gateway_rps / g1,
            r.gateway_cpu,
            r.ingest_eps,
            r.ingest_eps / i1,
            r.ingest_cpu
        );
    }
    Ok(())
}
