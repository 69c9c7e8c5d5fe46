//! The Stripe fake the payment tests run against: `localstripe` (PyPI), a real process on
//! loopback.

use std::time::{Duration, Instant};

use serde_json::Value;

/// A `localstripe` process (the Stripe fake from PyPI) on a free loopback port, killed on
/// drop. localstripe keeps its state in one fixed file (`/tmp/localstripe.pickle`), so two
/// at once would corrupt each other: tests using it hold `LOCALSTRIPE` and start it from
/// scratch.
pub struct LocalStripe {
    child: std::process::Child,
    pub base: String,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static LOCALSTRIPE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn localstripe() -> LocalStripe {
    let turn = LOCALSTRIPE.lock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("localstripe-{port}.log"));
    let mut child = std::process::Command::new("python3")
        .args([
            "-m",
            "localstripe",
            "--port",
            &port.to_string(),
            "--from-scratch",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("localstripe is installed (scripts/test installs it)");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client
            .get(format!("{base}/v1/customers"))
            .basic_auth(STRIPE_KEY, Some(""))
            .send()
            .await
            && r.status().is_success()
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "localstripe exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "localstripe did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    LocalStripe {
        child,
        base,
        _turn: turn,
    }
}

pub const STRIPE_KEY: &str = "sk_test_fatura";
pub const WEBHOOK_SECRET: &str = "whsec_fatura_test";

pub async fn stripe_post(ls: &LocalStripe, path: &str, form: &[(&str, &str)]) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", ls.base))
        .basic_auth(STRIPE_KEY, Some(""))
        .form(form)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null)
}

pub async fn stripe_get(ls: &LocalStripe, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}{path}", ls.base))
        .basic_auth(STRIPE_KEY, Some(""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn card(ls: &LocalStripe, number: &str) -> String {
    let pm = stripe_post(
        ls,
        "/v1/payment_methods",
        &[
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2030"),
            ("card[cvc]", "123"),
        ],
    )
    .await;
    pm["id"].as_str().unwrap().to_string()
}
