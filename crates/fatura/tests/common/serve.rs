//! Real `fatura serve` processes for the process-level suites (fleet, crash): started on a
//! loopback port with a config file, their output in a log file, killed when dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ADMIN_KEY, UPSTREAM_KEY};

/// The environment variable the gateway configs below name for the upstream's key.
pub const UPSTREAM_KEY_ENV: &str = "FATURA_TEST_UPSTREAM_KEY";

/// One `fatura serve` process.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub base: String,
    pub log: PathBuf,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeProcess {
    /// Starts `fatura serve` with `config` (TOML, written to `dir/<name>.toml`) on `port`
    /// and `database_url`, the admin key, the upstream key and `env`; waits until it is
    /// ready.
    pub async fn start(
        dir: &Path,
        name: &str,
        port: u16,
        database_url: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> ServeProcess {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_fatura"))
            .args(["serve", "--config"])
            .arg(&path)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database",
                database_url,
            ])
            .env("FATURA_ADMIN_KEY", ADMIN_KEY)
            .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
            .env("FATURA_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::from(
                std::fs::File::create(&log).unwrap(),
            ))
            .stderr(std::process::Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .unwrap();
        let server = ServeProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        while !client
            .get(format!("{}/readyz", server.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} did not start: {}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    /// What the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the process with SIGTERM (graceful: the metering queue drains) and waits.
    pub fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no clean stop: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mock upstream (OpenAI wire format, needing [`UPSTREAM_KEY`]) on loopback; its `/v1`
/// base URL.
pub async fn mock_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(fatura_server::mock::serve_mock(
        listener,
        fatura_server::mock::MockConfig {
            api_key: Some(UPSTREAM_KEY.into()),
            ..Default::default()
        },
        std::future::pending(),
    ));
    base
}

/// A config routing every model to `mock` (an OpenRouter-kind upstream), with `gateway`
/// lines added to `[gateway]` (durability, spill path, limits) and `rest` after it.
pub fn gateway_config(mock: &str, gateway: &str, rest: &str) -> String {
    format!(
        r#"
[gateway]
{gateway}
[[gateway.upstreams]]
name = "mock"
kind = "openrouter"
base_url = "{mock}"
api_key_env = "{UPSTREAM_KEY_ENV}"
[[gateway.routes]]
models = ["*"]
upstreams = ["mock"]
{rest}
"#
    )
}

/// POST as the operator; the answer must be 2xx.
pub async fn admin_post(base: &str, path: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

/// GET as the operator; the answer's JSON.
pub async fn admin_get(base: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
