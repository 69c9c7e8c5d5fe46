//! Shared helpers of fatura's load benchmarks.

use std::path::PathBuf;

/// The repository's fixtures directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The `q`-quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// A child process killed when dropped — with every process of its process group when it
/// was started as a group leader (`Command::process_group(0)`: LiteLLM and its workers).
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // Each member by its own (positive) pid: a negative pid given to `kill(1)` is easy
        // to get wrong, and "every process" is one spelling away.
        for pid in group_pids(self.0.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Processes of the process group `pgid` (from `/proc`); empty when there is no such group.
pub fn group_pids(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok())
                    == Some(pgid)
            })
        })
        .collect()
}

impl Proc {
    /// SIGTERM, then waits for the process to exit (a `fatura serve` drains its metering
    /// queue first).
    pub fn terminate(mut self) -> anyhow::Result<()> {
        std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.0.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("process {} did not stop", self.0.id());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }
}

/// The `fatura` binary beside this benchmark's (same profile), or `FATURA_BIN`.
pub fn fatura_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FATURA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no parent directory"))?
        .join("fatura");
    if !bin.exists() {
        anyhow::bail!(
            "{} not found: build it with the same profile (cargo build -p fatura)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (up to 60 s) until `GET url` answers 2xx.
pub async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{url} never became ready");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Resident memory of a process (MiB), from `/proc/<pid>/status`.
pub fn rss_mib(pid: u32) -> f64 {
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

/// Resident memory of a process by kind (MiB): anonymous (the heap and stacks), file-backed
/// (the binary, shared libraries, mapped files) and shared memory (e.g. SQLite's WAL index),
/// from `/proc/<pid>/status`.
pub fn rss_kinds_mib(pid: u32) -> (f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("RssAnon:"), field("RssFile:"), field("RssShmem:"))
}

/// CPU seconds (user + system) of a process so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (in parentheses, may hold spaces): utime and stime are
    // the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// A fresh PostgreSQL database `name` next to the one `admin_url` names (dropped first if
/// it exists); returns its URL.
pub async fn scratch_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let base = admin_url
        .rfind('/')
        .map(|i| &admin_url[..i])
        .ok_or_else(|| anyhow::anyhow!("bad PostgreSQL URL"))?;
    Ok(format!("{base}/{name}"))
}

/// Drops the PostgreSQL database `name` (after [`scratch_database`]).
pub async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// The admin key the benchmarks start `fatura serve` with.
pub const ADMIN: &str = "bench-admin-key-0123456789";

/// Sets up the gateway benchmarks' customer on the server at `base`: `bench` (prepaid with
/// 100M USD of credit, or postpaid), gpt-4o priced (OpenAI's list price); returns its key.
pub async fn bench_customer(base: &str, prepaid: bool) -> anyhow::Result<String> {
    use serde_json::json;
    let client = reqwest::Client::new();
    let admin = |path: &str| client.post(format!("{base}{path}")).bearer_auth(ADMIN);
    let mode = if prepaid { "prepaid" } else { "postpaid" };
    admin("/v1/customers")
        .json(&json!({"id": "bench", "name": "Bench", "billing_mode": mode}))
        .send()
        .await?
        .error_for_status()?;
    if prepaid {
        admin("/v1/customers/bench/wallet/credits")
            .json(&json!({"amount": "100000000", "currency": "USD", "kind": "purchased"}))
            .send()
            .await?
            .error_for_status()?;
    }
    let catalog = json!({"data": [{"id": "gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}}]});
    admin(
        "/v1/prices/import?format=openrouter&provider=openai&effective_from=2020-01-01T00:00:00Z",
    )
    .json(&catalog)
    .send()
    .await?
    .error_for_status()?;
    let key: serde_json::Value = admin("/v1/customers/bench/keys")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    key["key"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no key in {key}"))
}
