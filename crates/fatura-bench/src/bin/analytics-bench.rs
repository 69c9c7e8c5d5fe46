//! Analytics query latency over rollups, on SQLite and PostgreSQL.
//!
//! Records `--events` events (default 10M) in arrival order over the 30 days to now, across
//! `--customers` customers, 4 models and 3 agents, through `record_events` (which maintains
//! the rollups), then measures, `--reps` times each: the month-so-far summary (all
//! customers, what the dashboard's overview asks), the 30-day summary, the 30-day daily
//! revenue series by model (all customers), one customer's 30-day hourly series, and the
//! dashboard's pages over HTTP. The baseline, in the same run, is the 30 days' usage computed
//! by scanning the raw events (`GET /v1/usage`'s path); the bench fails if it disagrees with
//! the rollup summary.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use chrono::{DateTime, TimeZone, Timelike, Utc};
use clap::Parser;
use fatura_bench::{fixtures, quantile};
use fatura_core::import::CatalogFormat;
use fatura_core::rollup::Grain;
use fatura_core::{Currency, CustomerId, EventId, MarginRate, TokenUsage, UsageEvent};
use fatura_server::service::Fatura;
use fatura_server::service::analytics::{Dimension, Metric};
use sqlx::Connection;

const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini"];
const AGENTS: [&str; 3] = ["sdr-bot", "support", "qualifier"];

#[derive(Debug, Parser)]
#[command(about = "Analytics query latency over rollups (p50/p99)")]
struct Args {
    /// Events to record.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Customers.
    #[arg(long, default_value_t = 100)]
    customers: u64,
    /// Repetitions of each query.
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Backends (comma separated).
    #[arg(long, default_value = "sqlite,postgres")]
    backends: String,
    /// PostgreSQL URL used to create a scratch database.
    #[arg(
        long,
        env = "FATURA_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
}

/// The 30 days to the end of the current minute: `[start, end)` (whole hours at the start).
fn window() -> (DateTime<Utc>, DateTime<Utc>) {
    let end = Grain::Minute.next(Utc::now());
    (Grain::Hour.bucket(end) - chrono::Duration::days(30), end)
}

fn batch(start: u64, len: u64, customers: u64, total: u64) -> Vec<(usize, UsageEvent)> {
    let (month, end) = window();
    let span = (end - month).num_seconds() as u64;
    (0..len)
        .map(|i| {
            let n = start + i;
            let c = n % customers;
            let input = 200 + (n * 7919) % 8000;
            let output = 20 + (n * 104_729) % 1500;
            // In arrival order over the month, as a gateway records them (a few late ones).
            let late = if n.is_multiple_of(50) { 3_600 } else { 0 };
            let at =
                month + chrono::Duration::seconds(((n * span) / total).saturating_sub(late) as i64);
            let e = UsageEvent::new(
                EventId::parse(&format!("a-{n}")).unwrap(),
                CustomerId::parse(&format!("cus-{c}")).unwrap(),
                at,
                "openai".into(),
                MODELS[(n / 3 % 4) as usize].into(),
                TokenUsage::new(input, output, input / 4 * (n % 2), 0, 0, 1).unwrap(),
                BTreeMap::from([(
                    "agent".to_string(),
                    AGENTS[(n / 7 % 3) as usize].to_string(),
                )]),
                None,
            )
            .unwrap();
            (i as usize, e)
        })
        .collect()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

const ADMIN_KEY: &str = "analytics-bench-admin-key";

/// The dashboard pages measured.
const PAGES: [&str; 6] = [
    "/dashboard",
    "/dashboard/customers",
    "/dashboard/customers/cus-1",
    "/dashboard/models",
    "/dashboard/invoices",
    "/dashboard/pricing",
];

/// The web dashboard on loopback, with an operator session.
struct Pages {
    base: String,
    cookie: String,
    client: reqwest::Client,
    _server: tokio::task::JoinHandle<()>,
}

impl Pages {
    async fn start(fatura: Arc<Fatura>) -> anyhow::Result<Pages> {
        let state = fatura_server::AppState::new(fatura, ADMIN_KEY);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = fatura_server::serve(listener, state, std::future::pending()).await;
        });
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        // Sign in as a browser does: the form's token is also in a cookie.
        let login = client.get(format!("{base}/login")).send().await?;
        let csrf = set_cookie(&login, "fatura_login_csrf").context("no sign-in token")?;
        let signed = client
            .post(format!("{base}/login"))
            .header("cookie", format!("fatura_login_csrf={csrf}"))
            .form(&[("key", ADMIN_KEY), ("csrf", csrf.as_str())])
            .send()
            .await?;
        let session = set_cookie(&signed, "fatura_session").context("sign-in failed")?;
        Ok(Pages {
            base,
            cookie: format!("fatura_session={session}"),
            client,
            _server: server,
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<()> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("{path}: {}", r.status());
        }
        r.bytes().await?;
        Ok(())
    }
}

fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

fn ms(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    (quantile(samples, 0.5), quantile(samples, 0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut table, mut pages_table) = (Vec::new(), Vec::new());
    for backend in args.backends.split(',').map(str::trim) {
        let dir = tempfile::tempdir()?;
        let (url, pg) = match backend {
            "sqlite" => (
                format!("sqlite://{}", dir.path().join("a.db").display()),
                None,
            ),
            "postgres" => {
                let name = format!("fatura_bench_a_{}", std::process::id());
                let mut conn = sqlx::PgConnection::connect(&args.postgres_url).await?;
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
        let store = fatura_store::connect(&url, 8).await?;
        store.migrate().await?;
        let fatura = Arc::new(Fatura::new(store, MarginRate::default_floor()));
        let catalog = std::fs::read(fixtures().join("litellm_model_prices.json"))?;
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        fatura
            .import_prices(
                CatalogFormat::LiteLlm,
                &catalog,
                Some("openai"),
                t0,
                Utc::now(),
            )
            .await?;
        for c in 0..args.customers {
            fatura
                .create_customer(
                    Some(&format!("cus-{c}")),
                    &format!("Customer {c}"),
                    Currency::Usd,
                    Default::default(),
                    Utc::now(),
                )
                .await?;
        }
        eprintln!("== {backend}: recording {} events", args.events);
        let t = Instant::now();
        let size = 5_000u64;
        let mut start = 0;
        while start < args.events {
            let len = size.min(args.events - start);
            let (a, b) = (
                fatura.record_events(
                    batch(start, len / 2, args.customers, args.events),
                    Utc::now(),
                ),
                fatura.record_events(
                    batch(start + len / 2, len - len / 2, args.customers, args.events),
                    Utc::now(),
                ),
            );
            let (a, b) = tokio::join!(a, b);
            a?;
            b?;
            start += len;
        }
        let ingest = t.elapsed().as_secs_f64();
        if let Some(name) = &pg {
            // Rollup rows are updated in place by every batch: right after a bulk load the
            // table carries dead row versions that autovacuum would have cleared in steady
            // state. Clear them now, so that the queries below do not race autovacuum.
            let base = &args.postgres_url[..args.postgres_url.rfind('/').context("bad url")?];
            let mut conn = sqlx::PgConnection::connect(&format!("{base}/{name}")).await?;
            sqlx::query("VACUUM ANALYZE").execute(&mut conn).await?;
        }
        let (from, to) = window();
        let month = Grain::Month.bucket(Utc::now());
        // Baseline: the window's totals by scanning the raw events.
        let t = Instant::now();
        let filter = fatura_store::UsageFilter {
            from: Some(from),
            to: Some(to),
            ..Default::default()
        };
        let raw = fatura.usage(&filter, Vec::new()).await?;
        let scan_ms = t.elapsed().as_secs_f64() * 1000.0;
        // The dashboard, served by the same binary, signed in as the operator.
        let pages = Pages::start(fatura.clone()).await?;
        let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut summary = None;
        for _ in 0..args.reps {
            let t = Instant::now();
            fatura.summary(month, to, None).await?;
            samples.entry("mtd").or_default().push(ms_since(t));
            let t = Instant::now();
            summary = Some(fatura.summary(from, to, None).await?);
            samples.entry("window").or_default().push(ms_since(t));
            let t = Instant::now();
            fatura
                .timeseries(
                    Metric::Revenue,
                    Grain::Day,
                    from - chrono::Duration::hours(i64::from(from.hour())),
                    Grain::Day.next(to),
                    Some(Dimension::Model),
                    None,
                )
                .await?;
            samples.entry("daily").or_default().push(ms_since(t));
            let t = Instant::now();
            fatura
                .timeseries(
                    Metric::Revenue,
                    Grain::Hour,
                    from,
                    Grain::Hour.next(to),
                    None,
                    Some("cus-1"),
                )
                .await?;
            samples.entry("hourly").or_default().push(ms_since(t));
            for page in PAGES {
                let t = Instant::now();
                pages.get(page).await?;
                samples.entry(page).or_default().push(ms_since(t));
            }
        }
        // Rollups and the raw scan must agree.
        let s = summary.unwrap();
        let r = raw.first().map(|(_, t)| t.clone()).unwrap_or_default();
        if s.totals.revenue != r.revenue || s.totals.events != r.events as i64 {
            bail!(
                "{backend}: rollup summary {:?} disagrees with the raw scan {:?}",
                s.totals,
                r
            );
        }
        let cell = |k: &str, samples: &mut BTreeMap<&str, Vec<f64>>| {
            let (p50, p99) = ms(samples
                .get_mut(k)
                .map(Vec::as_mut_slice)
                .unwrap_or_default());
            format!("{p50:.1} / {p99:.1}")
        };
        let window_p50 = {
            let v = samples.get_mut("window").unwrap();
            ms(v).0
        };
        table.push(format!(
            "| {backend} | {} | {:.0} | {scan_ms:.0} | {} | {} | {} | {} | {:.0}× |",
            args.events,
            args.events as f64 / ingest,
            cell("mtd", &mut samples),
            cell("window", &mut samples),
            cell("daily", &mut samples),
            cell("hourly", &mut samples),
            scan_ms / window_p50
        ));
        for page in PAGES {
            pages_table.push(format!(
                "| {backend} | {} | `{page}` | {} |",
                args.events,
                cell(page, &mut samples)
            ));
        }
        drop(fatura);
        if let Some(name) = pg {
            let mut conn = sqlx::PgConnection::connect(&args.postgres_url).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await?;
        }
    }
    println!(
        "{} customers, 4 models, 3 agents, events spread over the 30 days to now; {} repetitions per query",
        args.customers, args.reps
    );
    println!(
        "| backend | events | ingest events/s | baseline: 30-day scan of raw events, ms | month-so-far summary p50 / p99 ms | 30-day summary p50 / p99 ms | 30-day daily series by model p50 / p99 ms | one customer's 30-day hourly series p50 / p99 ms | scan / 30-day summary p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in table {
        println!("{r}");
    }
    println!();
    println!("Dashboard pages over HTTP (server render + loopback), signed in as the operator:");
    println!("| backend | events | page | p50 / p99 ms |");
    println!("|---|---|---|---|");
    for r in pages_table {
        println!("{r}");
    }
    Ok(())
}
