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
}

impl Gateway {
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
        })
    }
}
