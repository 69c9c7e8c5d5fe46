//! Configuration: defaults, then `fatura.toml`, then environment variables, then flags.

use std::path::Path;

use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde::Deserialize;

/// The default database: `fatura.db` in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://fatura.db";
/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Shortest admin key accepted.
pub const MIN_ADMIN_KEY_LEN: usize = 16;

/// The file format (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    database_url: Option<String>,
    admin_key: Option<String>,
    default_margin: Option<String>,
    max_connections: Option<u32>,
    gateway: Option<fatura_server::gateway::GatewayConfig>,
    billing: Option<BillingFile>,
}

/// `[billing]` in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BillingFile {
    /// Seconds a closed cycle waits for late events before it is finalised (default 3600).
    grace_seconds: Option<u64>,
    /// Seconds between billing runs inside `fatura serve` (default 60; 0 disables).
    run_every_seconds: Option<u64>,
    /// Failed payment attempts on an invoice before the customer is suspended (default 3).
    max_payment_attempts: Option<i64>,
    /// Seconds between payment attempts of one invoice (default 86400).
    payment_retry_seconds: Option<u64>,
    /// Stripe's API base URL (default https://api.stripe.com; env FATURA_STRIPE_API_BASE).
    stripe_api_base: Option<String>,
}

/// Stripe settings: the keys come from the environment only.
#[derive(Clone)]
pub struct StripeConfig {
    pub api_base: String,
    pub api_key: String,
    pub webhook_secret: String,
    pub policy: fatura_server::payments::CollectionPolicy,
}

/// Effective configuration.
#[derive(Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Operator key, if configured.
    pub admin_key: Option<String>,
    /// Default cost-plus margin.
    pub default_margin: Decimal,
    /// PostgreSQL pool size.
    pub max_connections: u32,
    /// The gateway (`[gateway]` table), if configured.
    pub gateway: Option<fatura_server::gateway::GatewayConfig>,
    /// Grace period of closed cycles.
    pub billing_grace: chrono::Duration,
    /// Interval of the billing scheduler (`None`: disabled).
    pub billing_every: Option<std::time::Duration>,
    /// Payment collection through Stripe, when its keys are set.
    pub stripe: Option<StripeConfig>,
}

impl std::fmt::Debug for Config {
    // Hand-written so the admin key and database credentials are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database", &redact_url(&self.database_url))
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .field("default_margin", &self.default_margin)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The URL without its password.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Config {
    /// Loads `path` (if given; it must exist), then applies `FATURA_LISTEN`,
    /// `FATURA_DATABASE_URL` and `FATURA_ADMIN_KEY`, then the flags.
    pub fn load(
        path: Option<&Path>,
        listen: Option<String>,
        database: Option<String>,
    ) -> anyhow::Result<Config> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid config file {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let default_margin = match file.default_margin.as_deref() {
            Some(m) => m
                .parse::<Decimal>()
                .ok()
                .filter(|d| *d >= Decimal::ZERO && *d < Decimal::ONE)
                .with_context(|| {
                    format!("default_margin must be a decimal in [0, 1), got {m:?}")
                })?,
            None => Decimal::new(87, 2),
        };
        let config = Config {
            listen: listen
                .or_else(|| env("FATURA_LISTEN"))
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.into()),
            database_url: database
                .or_else(|| env("FATURA_DATABASE_URL"))
                .or(file.database_url)
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            admin_key: env("FATURA_ADMIN_KEY").or(file.admin_key),
            default_margin,
            max_connections: file.max_connections.unwrap_or(16),
            gateway: file.gateway,
            billing_grace: chrono::Duration::seconds(
                i64::try_from(
                    env("FATURA_BILLING_GRACE_SECONDS")
                        .map(|v| v.parse::<u64>())
                        .transpose()
                        .context("FATURA_BILLING_GRACE_SECONDS must be a whole number of seconds")?
                        .or(file.billing.as_ref().and_then(|b| b.grace_seconds))
                        .unwrap_or(3600)
                        .min(90 * 86_400),
                )
                .unwrap_or(3600),
            ),
            stripe: match (
                env("FATURA_STRIPE_API_KEY"),
                env("FATURA_STRIPE_WEBHOOK_SECRET"),
            ) {
                (Some(api_key), Some(webhook_secret)) => Some(StripeConfig {
                    api_base: env("FATURA_STRIPE_API_BASE")
                        .or(file
                            .billing
                            .as_ref()
                            .and_then(|b| b.stripe_api_base.clone()))
                        .unwrap_or_else(|| "https://api.stripe.com".into()),
                    api_key,
                    webhook_secret,
                    policy: fatura_server::payments::CollectionPolicy {
                        max_attempts: file
                            .billing
                            .as_ref()
                            .and_then(|b| b.max_payment_attempts)
                            .unwrap_or(3)
                            .clamp(1, 100),
                        retry_after: chrono::Duration::seconds(
                            i64::try_from(
                                file.billing
                                    .as_ref()
                                    .and_then(|b| b.payment_retry_seconds)
                                    .unwrap_or(86_400)
                                    .min(90 * 86_400),
                            )
                            .unwrap_or(86_400),
                        ),
                    },
                }),
                (None, None) => None,
                _ => bail!(
                    "set both FATURA_STRIPE_API_KEY and FATURA_STRIPE_WEBHOOK_SECRET (or neither)"
                ),
            },
            billing_every: match file
                .billing
                .as_ref()
                .and_then(|b| b.run_every_seconds)
                .unwrap_or(60)
            {
                0 => None,
                s => Some(std::time::Duration::from_secs(s)),
            },
        };
        if let Some(g) = &config.gateway {
            g.validate().map_err(anyhow::Error::msg)?;
        }
        if !(config.database_url.starts_with("sqlite:")
            || config.database_url.starts_with("postgres://")
            || config.database_url.starts_with("postgresql://"))
        {
            bail!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST/DB",
                redact_url(&config.database_url)
            );
        }
        Ok(config)
    }

    /// The admin key, required to serve.
    pub fn require_admin_key(&self) -> anyhow::Result<&str> {
        match self.admin_key.as_deref() {
            None => bail!("no admin key: set FATURA_ADMIN_KEY (or admin_key in the config file)"),
            Some(k) if k.len() < MIN_ADMIN_KEY_LEN => {
                bail!("the admin key must be at least {MIN_ADMIN_KEY_LEN} characters")
            }
            Some(k) => Ok(k),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("sqlite://fatura.db"), "sqlite://fatura.db");
    }
}
