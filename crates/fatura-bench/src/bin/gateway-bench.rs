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
//! * with `--litellm PATH` (the `litellm` executable of a `litellm[proxy]` install), the
//!   LiteLLM proxy in front of the same mock upstream, measured in the same phases;
//! * with `--memory-minutes M`, a long phase at `--memory-rate` req/s through the gateway,
//!   sampling its resident memory every 10 s (flat, not growing);
//! * a check that the ledger holds exactly one event per successful gateway call.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fatura_bench::{
    ADMIN, Proc, bench_customer, cpu_seconds, fatura_bin, free_port, group_pids, quantile,
    rss_kinds_mib, rss_mib, wait_ready,
};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Gateway added latency and throughput vs direct calls to the mock upstream")]
struct Args {
    /// Offered rates (requests/s), comma separated.
    #[arg(long, default_value = "500,2000,5000")]
    rates: String,
    /// Modes measured, comma separated: `json`, `stream`.
    #[arg(long, default_value = "json,stream")]
    modes: String,
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
    /// The `litellm` executable (from `pip install 'litellm[proxy]'`): measure the LiteLLM
    /// proxy on the same mock upstream in the same run.
    #[arg(long, env = "LITELLM_BIN")]
    litellm: Option<PathBuf>,
    /// LiteLLM proxy worker processes (`--num_workers`; fatura runs on 2 threads).
    #[arg(long, default_value_t = 2)]
    litellm_workers: u32,
    /// The gateway's `commit_delay_ms` (default: the server's default).
    #[arg(long)]
    commit_delay_ms: Option<u64>,
    /// Minutes of the memory phase (0: skipped).
    #[arg(long, default_value_t = 0)]
    memory_minutes: u64,
    /// Offered rate of the memory phase (requests/s, non-streaming).
    #[arg(long, default_value_t = 2000)]
    memory_rate: u64,
}

/// The LiteLLM proxy's master key (it refuses to start with a weak one).
const LITELLM_KEY: &str = "sk-litellm-bench-master-key-0123456789abcdef";

/// Starts the LiteLLM proxy in front of the mock upstream; returns it and its base URL.
async fn start_litellm(
    bin: &std::path::Path,
    workers: u32,
    direct: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let cfg = dir.join("litellm.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_list:\n  - model_name: gpt-4o\n    litellm_params:\n      model: openai/gpt-4o\n      api_base: {direct}\n      api_key: sk-bench-upstream\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("litellm.log"))?;
    let proc = Proc(
        Command::new(bin)
            // Its own process group, so that its worker processes stop with it.
            .process_group(0)
            .args([
                "--config",
                cfg.to_str().context("path")?,
                "--host",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .args(["--num_workers", &workers.to_string()])
            .env("LITELLM_MASTER_KEY", LITELLM_KEY)
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_LOG", "ERROR")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting litellm")?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client
            .get(format!("{base}/v1/models"))
            .bearer_auth(LITELLM_KEY)
            .send()
            .await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "litellm never became ready (see {})",
                dir.join("litellm.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok((proc, format!("{base}/v1")))
}

struct Env {
    _mock: Proc,
    gateway: Proc,
    direct: String,
    through: String,
    key: String,
    admin_base: String,
    dir: tempfile::TempDir,
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
        {commit_delay}
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
        commit_delay = args
            .commit_delay_ms
            .map(|ms| format!("commit_delay_ms = {ms}"))
            .unwrap_or_default(),
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
    let key = bench_customer(&admin_base, true).await?;
    Ok(Env {
        _mock: mock,
        gateway,
        direct,
        through: format!("{admin_base}/v1"),
        key,
        admin_base,
        dir,
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

/// A successful call's latencies: to the first byte of the body (for a stream, its first
/// chunk) and to the last.
#[derive(Debug, Clone, Copy)]
struct Timing {
    first: Duration,
    last: Duration,
}

/// One call; returns its latencies, or None on failure.
async fn one(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    stream: bool,
    n: u64,
) -> Option<Timing> {
    let t = Instant::now();
    let mut res = client
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
    let mut first = None;
    while res.chunk().await.ok()?.is_some() {
        first.get_or_insert_with(|| t.elapsed());
    }
    let last = t.elapsed();
    Some(Timing {
        first: first.unwrap_or(last),
        last,
    })
}

struct Phase {
    p50_ms: f64,
    p99_ms: f64,
    /// To the first byte of the body.
    first_p50_ms: f64,
    first_p99_ms: f64,
    failed: u64,
    achieved: f64,
}

/// Open loop: fires `rate` requests per second for `seconds`, on schedule.
async fn fixed_rate(base: &str, key: &str, stream: bool, rate: u64, seconds: u64) -> Phase {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        // A peer that cannot keep up fails its calls rather than hold the phase forever.
        .timeout(Duration::from_secs(30))
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
            let sent = started.elapsed();
            let _ = tx.send((sent, one(&client, &url, &key, stream, n).await));
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut first = Vec::new();
    let mut failed = 0;
    // GATEWAY_BENCH_DUMP=FILE: every call's send offset and latency (ms), appended, for
    // studying when slow calls happen.
    let mut dump = std::env::var_os("GATEWAY_BENCH_DUMP").map(|_| String::new());
    while let Some((sent, r)) = rx.recv().await {
        match r {
            Some(Timing { first: f, last: d }) => {
                lat.push(d.as_secs_f64() * 1000.0);
                first.push(f.as_secs_f64() * 1000.0);
                if let Some(out) = dump.as_mut() {
                    use std::fmt::Write as _;
                    let _ = writeln!(
                        out,
                        "{base} {stream} {rate} {:.3} {:.3}",
                        sent.as_secs_f64() * 1000.0,
                        d.as_secs_f64() * 1000.0
                    );
                }
            }
            None => failed += 1,
        }
    }
    if let (Some(out), Some(path)) = (dump, std::env::var_os("GATEWAY_BENCH_DUMP")) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(out.as_bytes());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    Phase {
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        first_p50_ms: quantile(&first, 0.5),
        first_p99_ms: quantile(&first, 0.99),
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
    let mut modes = Vec::new();
    for m in args.modes.split(',').map(str::trim) {
        match m {
            "json" => modes.push(false),
            "stream" => modes.push(true),
            other => bail!("unknown mode {other:?}: json or stream"),
        }
    }
    let litellm = match &args.litellm {
        Some(bin) => {
            Some(start_litellm(bin, args.litellm_workers, &env.direct, env.dir.path()).await?)
        }
        None => None,
    };
    // Warm-up, not measured: connection pools, the key cache, the wallet and the catalog.
    for stream in [false, true] {
        fixed_rate(&env.direct, "sk-bench-upstream", stream, 200, 1).await;
        fixed_rate(&env.through, &env.key, stream, 200, 1).await;
        if let Some((_, base)) = &litellm {
            fixed_rate(base, LITELLM_KEY, stream, 50, 2).await;
        }
    }
    let mut fatura_rows = Vec::new();
    let mut first_chunk_rows = Vec::new();
    println!(
        "| mode | offered req/s | direct p50 ms | direct p99 ms | gateway p50 ms | gateway p99 ms | added p50 ms | added p99 ms | fatura's own p50 ≤ ms | fatura's own p99 ≤ ms | gateway achieved req/s | failed (direct/gateway) | gateway CPU µs per call | gateway RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &stream in &modes {
        for &rate in &rates {
            let d = fixed_rate(&env.direct, "sk-bench-upstream", stream, rate, args.seconds).await;
            let before = overhead_histogram(&env.admin_base).await?;
            let cpu_before = cpu_seconds(pid);
            let g = fixed_rate(&env.through, &env.key, stream, rate, args.seconds).await;
            // Includes the metering writer's commits of the phase (most of them: the
            // last batch commits within `commit_delay_ms` of the last call).
            let cpu_per_call = (cpu_seconds(pid) - cpu_before) * 1e6 / (rate * args.seconds) as f64;
            let (own50, own99) =
                overhead_between(&before, &overhead_histogram(&env.admin_base).await?);
            fatura_rows.push((
                stream,
                rate,
                g.p50_ms - d.p50_ms,
                g.p99_ms - d.p99_ms,
                g.achieved,
            ));
            println!(
                "| {} | {rate} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {own50:.3} | {own99:.3} | {:.0} | {}/{} | {cpu_per_call:.0} | {:.1} |",
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
            if stream {
                first_chunk_rows.push((rate, d, g));
            }
        }
    }
    if !first_chunk_rows.is_empty() {
        // What a streaming client waits for before the answer starts to appear.
        println!();
        println!(
            "| streams: time to the first chunk | offered req/s | direct p50 ms | direct p99 ms | gateway p50 ms | gateway p99 ms | added p50 ms | added p99 ms |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (rate, d, g) in &first_chunk_rows {
            println!(
                "| stream | {rate} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                d.first_p50_ms,
                d.first_p99_ms,
                g.first_p50_ms,
                g.first_p99_ms,
                g.first_p50_ms - d.first_p50_ms,
                g.first_p99_ms - d.first_p99_ms,
            );
        }
    }
    println!();
    println!(
        "| mode | connections | direct max req/s | gateway max req/s | gateway / direct | gateway RSS MiB |"
    );
    println!("|---|---|---|---|---|---|");
    for &stream in &modes {
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
    if let Some((proc, base)) = &litellm {
        // The peer after fatura's phases, each preceded by its own direct baseline and
        // followed by a wait until the proxy has worked off any backlog (a proxy that
        // cannot keep up goes on processing queued calls after the client gave up on them,
        // which would otherwise load the next phase).
        let pgid = proc.0.id();
        quiesce(pgid).await;
        println!();
        println!(
            "The LiteLLM proxy (`litellm[proxy]`, {} workers) on the same mock upstream, in the same run; fatura's figures from the table above:",
            args.litellm_workers
        );
        println!();
        println!(
            "| mode | offered req/s | direct p50 ms | direct p99 ms | LiteLLM p50 ms | LiteLLM p99 ms | LiteLLM added p50 ms | LiteLLM added p99 ms | fatura added p50 ms | fatura added p99 ms | LiteLLM achieved req/s | fatura achieved req/s | LiteLLM failed | LiteLLM RSS MiB (all workers) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for &(stream, rate, f50, f99, fachieved) in &fatura_rows {
            let d = fixed_rate(&env.direct, "sk-bench-upstream", stream, rate, args.seconds).await;
            let l = fixed_rate(base, LITELLM_KEY, stream, rate, args.seconds).await;
            let rss = group_rss_mib(pgid);
            quiesce(pgid).await;
            println!(
                "| {} | {rate} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {f50:.3} | {f99:.3} | {:.0} | {fachieved:.0} | {} | {rss:.0} |",
                if stream { "stream" } else { "json" },
                d.p50_ms,
                d.p99_ms,
                l.p50_ms,
                l.p99_ms,
                l.p50_ms - d.p50_ms,
                l.p99_ms - d.p99_ms,
                l.achieved,
                l.failed,
            );
        }
        println!();
        println!(
            "| mode | connections | direct max req/s | LiteLLM max req/s | LiteLLM / direct |"
        );
        println!("|---|---|---|---|---|");
        for &stream in &modes {
            let d = max_throughput(
                &env.direct,
                "sk-bench-upstream",
                stream,
                args.connections,
                args.throughput_seconds,
            )
            .await;
            let l = max_throughput(
                base,
                LITELLM_KEY,
                stream,
                args.connections,
                args.throughput_seconds,
            )
            .await;
            quiesce(pgid).await;
            println!(
                "| {} | {} | {d:.0} | {l:.0} | {:.4} |",
                if stream { "stream" } else { "json" },
                args.connections,
                l / d
            );
        }
    }
    drop(litellm);

    if args.memory_minutes > 0 {
        memory_phase(&env, args.memory_rate, args.memory_minutes, pid).await;
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

/// CPU seconds used so far by the process group `pgid` (utime + stime).
fn group_cpu_seconds(pgid: u32) -> f64 {
    group_pids(pgid)
        .iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .sum()
}

/// Resident memory of the process group `pgid`.
fn group_rss_mib(pgid: u32) -> f64 {
    group_pids(pgid).into_iter().map(rss_mib).sum()
}

/// Waits until the process group `pgid` is idle (under 5% of a core over a second).
async fn quiesce(pgid: u32) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = group_cpu_seconds(pgid);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = group_cpu_seconds(pgid);
        if now - last < 0.05 || Instant::now() > deadline {
            return;
        }
        last = now;
    }
}

/// The gateway under a steady `rate` for `minutes`: its resident memory every 10 s, and the
/// slope of a least-squares line through the samples after the first minute (warm-up).
async fn memory_phase(env: &Env, rate: u64, minutes: u64, pid: u32) {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let db = env.dir.path().join("gw.db");
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = vec![(0.0, rss_mib(pid))];
            let mut kinds = vec![breakdown(pid, &db)];
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = started.elapsed().as_secs_f64() / 60.0;
                samples.push((t, rss_mib(pid)));
                // The breakdown once a minute.
                if samples.len() % 6 == 1 {
                    kinds.push(breakdown(pid, &db));
                }
            }
            kinds.push(breakdown(pid, &db));
            (samples, kinds)
        })
    };
    let phase = fixed_rate(&env.through, &env.key, false, rate, minutes * 60).await;
    done.store(true, Ordering::Relaxed);
    let (samples, kinds) = sampler.await.unwrap_or_default();
    let warm: Vec<(f64, f64)> = samples.iter().copied().filter(|(t, _)| *t >= 1.0).collect();
    let n = warm.len() as f64;
    let (mt, mr) = (
        warm.iter().map(|s| s.0).sum::<f64>() / n,
        warm.iter().map(|s| s.1).sum::<f64>() / n,
    );
    let slope = warm.iter().map(|(t, r)| (t - mt) * (r - mr)).sum::<f64>()
        / warm.iter().map(|(t, _)| (t - mt).powi(2)).sum::<f64>();
    let max = samples.iter().map(|s| s.1).fold(f64::MIN, f64::max);
    println!();
    println!(
        "memory phase: {rate} req/s for {minutes} min (json), achieved {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, failed {}",
        phase.achieved, phase.p50_ms, phase.p99_ms, phase.failed
    );
    println!(
        "gateway RSS MiB: start {:.1}, after 1 min {:.1}, max {max:.1}, end {:.1}; slope after the first minute {slope:+.3} MiB/min",
        samples.first().map_or(f64::NAN, |s| s.1),
        warm.first().map_or(f64::NAN, |s| s.1),
        samples.last().map_or(f64::NAN, |s| s.1),
    );
    println!(
        "by kind, once a minute (RSS anon/file/shmem MiB; database/WAL/WAL-index file MiB): {}",
        kinds.join(" | ")
    );
    println!(
        "samples (min, MiB): {}",
        samples
            .iter()
            .map(|(t, r)| format!("{t:.1}:{r:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// The gateway's resident memory by kind and its database files' sizes, as one line.
fn breakdown(pid: u32, db: &std::path::Path) -> String {
    let (anon, file, shmem) = rss_kinds_mib(pid);
    let size = |suffix: &str| {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / (1024.0 * 1024.0))
    };
    format!(
        "{anon:.1}/{file:.1}/{shmem:.1}; {:.0}/{:.1}/{:.2}",
        size(""),
        size("-wal"),
        size("-shm")
    )
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
    let client = reqwest::Client::new();
    let mut charges = 0u64;
    let mut after: Option<String> = None;
    let reserved = loop {
        let mut url = format!("{admin_base}/v1/customers/bench/wallet?limit=10000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let v: Value = client
            .get(url)
            .bearer_auth(ADMIN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        charges += v["transactions"]
            .as_array()
            .map_or(0, |t| t.iter().filter(|t| t["kind"] == "charge").count())
            as u64;
        match v["next_after"].as_str() {
            Some(a) => after = Some(a.to_string()),
            None => break v["reserved"].clone(),
        }
    };
    println!("wallet charges: {charges}, reserved now: {reserved}");
    if charges != events {
        bail!("{charges} wallet charges for {events} metered calls");
    }
    Ok(())
}
