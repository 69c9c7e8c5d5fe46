//! Test harness: the real application on 127.0.0.1:0 with a fresh database (a temporary
//! SQLite file, or a new PostgreSQL database per test), spoken to over HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod serve;
pub mod stripe;

use std::path::PathBuf;
use std::sync::Arc;

use fatura_core::MarginRate;
use fatura_server::AppState;
use fatura_server::service::Fatura;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::sync::oneshot;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
/// The provider key the gateway under test sends upstream.
pub const UPSTREAM_KEY: &str = "sk-upstream-test-key";
/// Environment the gateway under test sees (besides the process environment).
const TEST_ENV: [(&str, &str); 1] = [("FATURA_TEST_UPSTREAM_KEY", UPSTREAM_KEY)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Connection URL of a PostgreSQL database the tests may create databases from.
pub fn postgres_admin_url() -> String {
    std::env::var("FATURA_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) => format!("{}/{db}", &url[..i]),
        None => panic!("bad postgres url {url}"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

pub struct TestApp {
    pub base: String,
    writer: Option<fatura_server::gateway::MeterWriter>,
    pub client: reqwest::Client,
    pub fatura: Arc<Fatura>,
    pub database_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    /// The per-test PostgreSQL database, if any.
    pub pg_database: Option<String>,
}

impl TestApp {
    pub async fn start(backend: Backend) -> TestApp {
        Self::start_with(backend, None).await
    }

    /// Starts the app with the gateway configured (`spill_path` is put in the test's
    /// temporary directory when left relative).
    pub async fn start_with(
        backend: Backend,
        gateway: Option<fatura_server::gateway::GatewayConfig>,
    ) -> TestApp {
        Self::start_full(backend, gateway, None).await
    }

    /// Starts the app with the gateway and payment collection configured.
    pub async fn start_full(
        backend: Backend,
        gateway: Option<fatura_server::gateway::GatewayConfig>,
        payments: Option<(
            Arc<dyn fatura_server::payments::PaymentProcessor>,
            fatura_server::payments::CollectionPolicy,
        )>,
    ) -> TestApp {
        // Server logs go to the test's output (shown for failing tests); RUST_LOG filters.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let (database_url, pg_database) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("fatura.db").display()),
                None,
            ),
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("fatura_t_{}", hex_id());
                let mut conn = pg_admin_connection(&admin).await;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                (with_database(&admin, &name), Some(name))
            }
        };
        let store = fatura_store::connect(&database_url, 8).await.unwrap();
        store.migrate().await.unwrap();
        let fatura = Arc::new(Fatura::new(store, MarginRate::default_floor()));
        let mut state = AppState::new(fatura.clone(), ADMIN_KEY);
        if let Some((processor, policy)) = payments {
            state = state.with_payments(processor, policy);
        }
        let mut writer = None;
        if let Some(mut gw) = gateway {
            if !gw.spill_path.starts_with('/') {
                gw.spill_path = dir.path().join(&gw.spill_path).display().to_string();
            }
            let (meter, w) =
                fatura_server::gateway::Meter::start(fatura.clone(), &gw, state.metrics.clone());
            let gateway = fatura_server::gateway::Gateway::new(gw, meter, |var| {
                std::env::var(var).ok().or_else(|| {
                    TEST_ENV
                        .iter()
                        .find(|(k, _)| *k == var)
                        .map(|(_, v)| v.to_string())
                })
            })
            .unwrap();
            state = state.with_gateway(Arc::new(gateway));
            writer = Some(w);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            fatura_server::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestApp {
            base,
            writer,
            client: reqwest::Client::new(),
            fatura,
            database_url,
            shutdown: Some(tx),
            server: Some(server),
            _dir: dir,
            pg_database,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn post_as(
        &self,
        key: Option<&str>,
        path: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        self.send(req).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_as(Some(ADMIN_KEY), path, body).await
    }

    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let req = self
            .client
            .post(self.url(path))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body);
        self.send(req).await
    }

    pub async fn get_as(&self, key: Option<&str>, path: &str) -> (StatusCode, Value) {
        let mut req = self.client.get(self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        self.send(req).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.get_as(Some(ADMIN_KEY), path).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(
            self.client
                .patch(self.url(path))
                .bearer_auth(ADMIN_KEY)
                .json(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.delete(self.url(path)).bearer_auth(ADMIN_KEY))
            .await
    }

    pub async fn customer(&self, id: &str) {
        let (s, body) = self
            .post(
                "/v1/customers",
                &json!({"id": id, "name": format!("Customer {id}")}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }

    /// Moves a customer's creation back to `at` (RFC 3339), straight in the database: a
    /// customer is billed from its creation, so tests that bill fixed past months create
    /// their customers "before" them whatever the wall clock says.
    pub async fn backdate_customer(&self, customer: &str, at: &str) {
        let us = at
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
            .timestamp_micros();
        let sql = "UPDATE customers SET created_at_us = $1 WHERE id = $2";
        let updated = if self.database_url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(&self.database_url)
                .await
                .unwrap();
            sqlx::query(sql)
                .bind(us)
                .bind(customer)
                .execute(&mut conn)
                .await
                .unwrap()
                .rows_affected()
        } else {
            let mut conn = sqlx::PgConnection::connect(&self.database_url)
                .await
                .unwrap();
            sqlx::query(sql)
                .bind(us)
                .bind(customer)
                .execute(&mut conn)
                .await
                .unwrap()
                .rows_affected()
        };
        assert_eq!(updated, 1, "no customer {customer}");
    }

    pub async fn key_for(&self, customer: &str) -> String {
        let (s, body) = self
            .post(&format!("/v1/customers/{customer}/keys"), &json!({}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        body["key"].as_str().unwrap().to_string()
    }

    pub async fn import(&self, format: &str, file: &str, query: &str) -> (StatusCode, Value) {
        let bytes = std::fs::read(fixture(file)).unwrap();
        self.post_bytes(&format!("/v1/prices/import?format={format}{query}"), bytes)
            .await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn event_count(&self) -> u64 {
        self.fatura.count_events().await.unwrap()
    }

    /// Stops the server gracefully and waits for it (and for the metering queue to drain).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.server.take() {
            task.await.unwrap();
        }
        if let Some(w) = self.writer.take() {
            tokio::time::timeout(std::time::Duration::from_secs(30), w.finish())
                .await
                .expect("the meter drains");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(name) = self.pg_database.take() {
            // Drop the per-test database from a separate runtime (Drop cannot be async).
            let admin = postgres_admin_url();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn hex_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An event with sensible defaults; `extra` fields override.
pub fn event(id: &str, customer: &str, extra: Value) -> Value {
    let mut e = json!({
        "id": id,
        "customer_id": customer,
        "timestamp": "2026-03-01T12:00:00Z",
        "provider": "openrouter",
        "model": "openai/gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 100,
    });
    if let (Some(obj), Some(extra)) = (e.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            obj.insert(k.clone(), v.clone());
        }
    }
    e
}

/// Generates one `#[tokio::test]` per backend for each listed async fn(Backend).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::common::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::common::Backend::Postgres).await } )*
        }
    };
}

/// Imports an OpenRouter-format catalog of `(model, prompt, completion)` per-token prices
/// effective from `from`.
pub async fn catalog(app: &TestApp, from: &str, models: &[(&str, &str, &str)]) {
    let data: Vec<Value> = models
        .iter()
        .map(|(id, p, c)| json!({"id": id, "pricing": {"prompt": p, "completion": c}}))
        .collect();
    let (s, body) = app
        .post_bytes(
            &format!("/v1/prices/import?format=openrouter&effective_from={from}"),
            serde_json::to_vec(&json!({ "data": data })).unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

/// A connection to the PostgreSQL the tests share, waiting up to 30 s for it: a test that
/// stops and starts the cluster (crash.rs) may leave it still recovering when the next test
/// binary starts.
async fn pg_admin_connection(admin: &str) -> sqlx::PgConnection {
    let started = std::time::Instant::now();
    loop {
        match sqlx::PgConnection::connect(admin).await {
            Ok(conn) => return conn,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(30) => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => {
                panic!("PostgreSQL must run on 127.0.0.1:5432 (the test command starts it): {e}")
            }
        }
    }
}
