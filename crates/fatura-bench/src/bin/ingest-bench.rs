//! Sustained ingestion throughput of fatura on SQLite and PostgreSQL.
//!
//! For each backend, on a fresh database with the real LiteLLM catalog (OpenAI models)
//! imported, it measures for `--seconds` with `--concurrency` concurrent writers and
//! batches of `--batch` events:
//!
//! 1. **baseline**: the business layer's `record_events` called directly (validated
//!    events hashed, costed, rated and committed) — the same durable work without HTTP
//!    and JSON;
//! 2. **http**: `POST /v1/events` through a real server on 127.0.0.1, JSON built by the
//!    client, answered only after commit.
//!
//! It prints events/s of both and their ratio (measured in the same run, on the same
//! machine), the p50/p99 latency of one batch over HTTP, and checks that the ledger holds
//! exactly the acknowledged events.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{TimeZone, Utc};
use clap::Parser;
use fatura_bench::{fixtures, quantile};
use fatura_core::import::CatalogFormat;
use fatura_core::{Currency, CustomerId, EventId, MarginRate, TokenUsage, UsageEvent};
use fatura_server::AppState;
use fatura_server::service::Fatura;
use sqlx::Connection;

const ADMIN: &str = "bench-admin-key-0123456789";
const CUSTOMERS: usize = 8;
const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini"];
const AGENTS: [&str; 3] = ["sdr-bot", "support", "qualifier"];

#[derive(Debug, Parser)]
#[command(about = "Sustained ingestion throughput (events/s) on SQLite and PostgreSQL")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Backends to measure (comma separated).
    #[arg(long, default_value = "sqlite,postgres")]
    backends: String,
    /// PostgreSQL URL used to create a scratch database.
    #[arg(
        long,
        env = "FATURA_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Print only the result table.
    #[arg(long)]
    quiet: bool,
}

struct Setup {
    fatura: Arc<Fatura>,
    url: String,
    _dir: tempfile::TempDir,
    pg_db: Option<String>,
}

async fn setup(backend: &str, args: &Args) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let (url, pg_db) = match backend {
        "sqlite" => (
            format!("sqlite://{}", dir.path().join("bench.db").display()),
            None,
        ),
        "postgres" => {
            let name = format!("fatura_bench_{}", std::process::id());
            let mut conn = sqlx::PgConnection::connect(&args.postgres_url)
                .await
                .context("PostgreSQL")?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await?;
            let base = &args.postgres_url[..args.postgres_url.rfind('/').context("bad url")?];
            (format!("{base}/{name}"), Some(name))
        }
        other => bail!("unknown backend {other}"),
    };
    let store = fatura_store::connect(&url, 16).await?;
    store.migrate().await?;
    let fatura = Arc::new(Fatura::new(store, MarginRate::default_floor()));
    let catalog = std::fs::read(fixtures().join("litellm_model_prices.json"))?;
    let t0 = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .context("date")?;
    fatura
        .import_prices(
            CatalogFormat::LiteLlm,
            &catalog,
            Some("openai"),
            t0,
            Utc::now(),
        )
        .await?;
    for c in 0..CUSTOMERS {
        fatura
            .create_customer(
                Some(&format!("bench-{c}")),
                &format!("Bench {c}"),
                Currency::Usd,
                fatura_server::service::Billing::default(),
                Utc::now(),
            )
            .await?;
    }
    Ok(Setup {
        fatura,
        url,
        _dir: dir,
        pg_db,
    })
}

async fn teardown(s: Setup, args: &Args) -> anyhow::Result<()> {
    if let Some(name) = s.pg_db {
        drop(s.fatura);
        let mut conn = sqlx::PgConnection::connect(&args.postgres_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

/// Deterministic, varied usage for event number `n`.
fn shape(n: u64) -> (usize, &'static str, &'static str, u64, u64, u64, u64) {
    let customer = (n % CUSTOMERS as u64) as usize;
    let model = MODELS[(n / 3 % MODELS.len() as u64) as usize];
    let agent = AGENTS[(n / 7 % AGENTS.len() as u64) as usize];
    let input = 200 + (n * 7919) % 8000;
    let cached = input / 4 * (n % 2);
    let output = 20 + (n * 104_729) % 1500;
    let ts = 1_772_000_000 + (n % 86_400);
    (customer, model, agent, input, cached, output, ts)
}

fn domain_batch(prefix: &str, start: u64, len: usize) -> Vec<(usize, UsageEvent)> {
    (0..len as u64)
        .map(|i| {
            let n = start + i;
            let (c, model, agent, input, cached, output, ts) = shape(n);
            let event = UsageEvent::new(
                EventId::parse(&format!("{prefix}-{n}")).unwrap(),
                CustomerId::parse(&format!("bench-{c}")).unwrap(),
                Utc.timestamp_opt(ts as i64, 0).single().unwrap(),
                "openai".into(),
                model.into(),
                TokenUsage::new(input, output, cached, 0, 0, 1).unwrap(),
                BTreeMap::from([("agent".to_string(), agent.to_string())]),
                None,
            )
            .unwrap();
            (i as usize, event)
        })
        .collect()
}

fn json_batch(prefix: &str, start: u64, len: usize) -> String {
    let mut s = String::with_capacity(len * 260);
    s.push_str("{\"events\":[");
    for i in 0..len as u64 {
        let n = start + i;
        let (c, model, agent, input, cached, output, ts) = shape(n);
        let ts = Utc
            .timestamp_opt(ts as i64, 0)
            .single()
            .unwrap()
            .to_rfc3339();
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"id\":\"{prefix}-{n}\",\"customer_id\":\"bench-{c}\",\"timestamp\":\"{ts}\",\"provider\":\"openai\",\
             \"model\":\"{model}\",\"input_tokens\":{input},\"cached_input_tokens\":{cached},\"output_tokens\":{output},\
             \"tags\":{{\"agent\":\"{agent}\"}}}}"
        );
    }
    s.push_str("]}");
    s
}

struct Measured {
    events: u64,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// Runs `write` from `args.concurrency` tasks until the deadline. `write(start)` writes
/// the batch of events numbered from `start` and returns how many were accepted and how
/// long the write itself took.
async fn drive<F, Fut>(args: &Args, write: F) -> anyhow::Result<Measured>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<(u64, Duration)>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let batch = args.batch as u64;
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (write, next) = (write.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let (n, took) = write(next.fetch_add(batch, Ordering::Relaxed)).await?;
                accepted += n;
                lat.push(took.as_secs_f64() * 1000.0);
            }
            anyhow::Ok((accepted, lat))
        }));
    }
    let mut events = 0;
    let mut latencies_ms = Vec::new();
    for t in tasks {
        let (n, lat) = t.await??;
        events += n;
        latencies_ms.extend(lat);
    }
    Ok(Measured {
        events,
        seconds: started.elapsed().as_secs_f64(),
        latencies_ms,
    })
}

async fn run_baseline(fatura: Arc<Fatura>, args: &Args) -> anyhow::Result<Measured> {
    let batch = args.batch;
    drive(args, move |start| {
        let fatura = fatura.clone();
        async move {
            let events = domain_batch("base", start, batch);
            let t = Instant::now();
            let out = fatura.record_events(events, Utc::now()).await?;
            Ok((out.accepted, t.elapsed()))
        }
    })
    .await
}

async fn run_http(base: &str, args: &Args) -> anyhow::Result<Measured> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = Arc::new(format!("{base}/v1/events"));
    let batch = args.batch;
    drive(args, move |start| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let body = json_batch("http", start, batch);
            let t = Instant::now();
            let res = client
                .post(url.as_str())
                .bearer_auth(ADMIN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = res.status();
            let v: serde_json::Value = res.json().await?;
            let took = t.elapsed();
            if status != 200 {
                bail!("ingestion failed: {status} {v}");
            }
            Ok((v["accepted"].as_u64().unwrap_or(0), took))
        }
    })
    .await
}

fn p(m: &mut Measured, q: f64) -> f64 {
    m.latencies_ms.sort_by(f64::total_cmp);
    quantile(&m.latencies_ms, q)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for backend in args.backends.split(',').map(str::trim) {
        if !args.quiet {
            eprintln!("== {backend}: setting up");
        }
        let s = setup(backend, &args).await?;
        if !args.quiet {
            eprintln!(
                "== {backend}: baseline (record_events, no HTTP) for {}s",
                args.seconds
            );
        }
        let base = run_baseline(s.fatura.clone(), &args).await?;
        // The server runs on its own runtime with its own connection pool, as `fatura serve`
        // would: a pool's connections belong to the runtime that opened them, so sharing
        // `s.fatura` across runtimes would leave the bench holding dead connections once the
        // server's runtime shuts down.
        let url = s.url.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let store = fatura_store::connect(&url, 16).await.unwrap();
                let state = AppState::new(
                    Arc::new(Fatura::new(store.clone(), MarginRate::default_floor())),
                    ADMIN,
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                fatura_server::serve(listener, state, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv()?;
        if !args.quiet {
            eprintln!(
                "== {backend}: POST /v1/events on {addr} for {}s",
                args.seconds
            );
        }
        let mut http = run_http(&format!("http://{addr}"), &args).await?;
        let _ = tx.send(());
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
        let stored = s.fatura.count_events().await?;
        if stored != base.events + http.events {
            bail!(
                "{backend}: ledger holds {stored} events, {} were acknowledged",
                base.events + http.events
            );
        }
        rows.push(format!(
            "| {backend} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {} |",
            base.rate(),
            http.rate(),
            http.rate() / base.rate(),
            p(&mut http, 0.5),
            p(&mut http, 0.99),
            stored
        ));
        teardown(s, &args).await?;
    }
    println!(
        "batch = {} events, concurrency = {}, {} s per measurement",
        args.batch, args.concurrency, args.seconds
    );
    println!(
        "| backend | baseline events/s (record_events, no HTTP) | HTTP events/s | HTTP / baseline | HTTP batch p50 ms | HTTP batch p99 ms | events in ledger |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
