//! The metering gateway: an OpenAI-compatible proxy in front of OpenRouter, OpenAI and any
//! OpenAI-compatible upstream. Every call is metered (streams, cancellations and failures
//! included) through the batching [`meter::Meter`].

pub mod config;
pub mod estimate;
pub mod meter;
pub mod proxy;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;

pub use config::GatewayConfig;
pub use meter::{Meter, MeterWriter};

/// The configured gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Configuration.
    pub config: GatewayConfig,
    /// The metering queue.
    pub meter: Meter,
    client: reqwest::Client,
    /// Upstream name → provider key, read from the environment at start.
    keys: HashMap<String, String>,
    /// Permits for calls in flight (`max_in_flight`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Per-key request and token counts of the current minute.
    limits: RateLimiter,
}

/// Per-key fixed one-minute windows (UTC minutes) of requests and tokens.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: std::sync::Mutex<HashMap<String, (i64, u64, u64)>>,
}

impl RateLimiter {
    /// Admits a call of `tokens` for `key` at `now_secs` (Unix seconds) under `rpm` requests
    /// and `tpm` tokens per minute (0: unlimited), counting it; or the seconds until the
    /// window ends. A call larger than `tpm` on its own is admitted into an empty window
    /// (it could never run otherwise).
    pub fn admit(
        &self,
        key: &str,
        tokens: u64,
        now_secs: i64,
        rpm: u64,
        tpm: u64,
    ) -> Result<(), u64> {
        let minute = now_secs.div_euclid(60);
        let retry = u64::try_from(60 - now_secs.rem_euclid(60)).unwrap_or(60);
        let Ok(mut windows) = self.windows.lock() else {
            return Ok(());
        };
        if windows.len() > 100_000 {
            windows.retain(|_, w| w.0 == minute);
        }
        let w = windows.entry(key.to_string()).or_insert((minute, 0, 0));
        if w.0 != minute {
            *w = (minute, 0, 0);
        }
        if rpm > 0 && w.1 >= rpm {
            return Err(retry);
        }
        if tpm > 0 && w.2 > 0 && w.2.saturating_add(tokens) > tpm {
            return Err(retry);
        }
        w.1 += 1;
        w.2 = w.2.saturating_add(tokens);
        Ok(())
    }
}

impl Gateway {
    /// Admits a call of `tokens` for `key` under the configured per-key limits, or returns
    /// the seconds until the window ends. With a shared database (a fleet), every instance
    /// counts in it (one conditional upsert per call, so N instances admit no more than one
    /// would); if that database cannot be reached, this instance counts alone meanwhile.
    pub async fn admit(
        &self,
        fatura: &crate::service::Fatura,
        key: &str,
        tokens: u64,
        now_secs: i64,
    ) -> Result<(), u64> {
        let (rpm, tpm) = (
            self.config.requests_per_minute,
            self.config.tokens_per_minute,
        );
        let minute = now_secs.div_euclid(60);
        match fatura
            .count_shared_rate(key, minute * 60_000_000, tokens, rpm, tpm)
            .await
        {
            Ok(Some(true)) => return Ok(()),
            Ok(Some(false)) => {
                return Err(u64::try_from(60 - now_secs.rem_euclid(60)).unwrap_or(60));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "shared rate limits unavailable: counting on this instance");
            }
        }
        self.limits.admit(key, tokens, now_secs, rpm, tpm)
    }

    /// Builds the gateway, reading provider keys through `env` (the process environment in
    /// production). Every upstream's `api_key_env` must be set.
    pub fn new(
        config: GatewayConfig,
        meter: Meter,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        config.validate()?;
        let mut keys = HashMap::new();
        for u in &config.upstreams {
            if let Some(var) = &u.api_key_env {
                match env(var) {
                    Some(k) if !k.is_empty() => {
                        keys.insert(u.name.clone(), k);
                    }
                    _ => {
                        return Err(format!(
                            "gateway upstream {:?}: environment variable {var} is not set",
                            u.name
                        ));
                    }
                }
            }
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        // Load the tokenizer now rather than on the first call (it takes ~100 ms).
        std::thread::spawn(|| estimate::count_text("warm up"));
        let slots = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight));
        Ok(Gateway {
            config,
            meter,
            client,
            keys,
            slots,
            limits: RateLimiter::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;

    #[test]
    fn windows_count_requests_and_tokens_per_key_and_minute() {
        let l = RateLimiter::default();
        let t = 1_790_000_080; // 20 s before a minute ends
        assert_eq!(l.admit("k", 10, t, 2, 0), Ok(()));
        assert_eq!(l.admit("k", 10, t + 1, 2, 0), Ok(()));
        assert_eq!(
            l.admit("k", 10, t + 2, 2, 0),
            Err(18),
            "third request in the minute"
        );
        assert_eq!(l.admit("other", 10, t + 2, 2, 0), Ok(()), "per key");
        assert_eq!(l.admit("k", 10, t + 20, 2, 0), Ok(()), "a new minute");
        // Tokens: refused when the window would exceed the limit; a call larger than the
        // limit alone runs in an empty window.
        assert_eq!(l.admit("t", 60, t, 0, 100), Ok(()));
        assert_eq!(l.admit("t", 50, t, 0, 100), Err(20));
        assert_eq!(l.admit("t", 40, t, 0, 100), Ok(()));
        assert_eq!(l.admit("big", 500, t, 0, 100), Ok(()));
        assert_eq!(l.admit("big", 1, t, 0, 100), Err(20));
        // Unlimited.
        for _ in 0..1000 {
            assert_eq!(l.admit("free", 1_000_000, t, 0, 0), Ok(()));
        }
    }
}
