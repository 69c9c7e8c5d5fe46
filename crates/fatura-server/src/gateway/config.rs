//! Gateway configuration (the `[gateway]` table of `fatura.toml`).

use std::time::Duration;

use serde::Deserialize;

/// How a gateway call's usage event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Through the batching writer, off the request path (default).
    #[default]
    Async,
    /// The response waits until the event is committed.
    Sync,
}

/// Kind of an upstream. All speak OpenAI's chat-completions wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// OpenRouter: usage accounting is requested with `"usage": {"include": true}`.
    Openrouter,
    /// OpenAI.
    Openai,
    /// Any other OpenAI-compatible server.
    OpenaiCompatible,
}

/// One upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name used in routes and recorded on events.
    pub name: String,
    /// Kind.
    pub kind: UpstreamKind,
    /// Base URL up to and including `/v1` (e.g. `https://openrouter.ai/api/v1`).
    pub base_url: String,
    /// Name of the environment variable holding the provider key (never the key itself).
    pub api_key_env: Option<String>,
    /// Provider name in the price catalog (default: `openrouter` / `openai` / the name).
    pub provider: Option<String>,
    /// Strip a `vendor/` prefix from the model before sending (e.g. `openai/gpt-4o` →
    /// `gpt-4o` when falling back from OpenRouter to OpenAI directly).
    #[serde(default)]
    pub strip_model_prefix: bool,
}

impl UpstreamConfig {
    /// The catalog provider name.
    pub fn catalog_provider(&self) -> String {
        self.provider.clone().unwrap_or_else(|| match self.kind {
            UpstreamKind::Openrouter => "openrouter".into(),
            UpstreamKind::Openai => "openai".into(),
            UpstreamKind::OpenaiCompatible => self.name.clone(),
        })
    }
}

/// A route: models matching any pattern go to the upstreams in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Model names or glob patterns (`*` matches any run of characters).
    pub models: Vec<String>,
    /// Upstream names, tried in order.
    pub upstreams: Vec<String>,
}

fn default_queue() -> usize {
    50_000
}
fn default_batch() -> usize {
    1_000
}
/// Upper bound of `commit_delay_ms`: the async crash window stays a matter of milliseconds.
pub const MAX_COMMIT_DELAY_MS: u64 = 1_000;

fn default_commit_delay_ms() -> u64 {
    5
}
fn default_first_byte_timeout_ms() -> u64 {
    60_000
}
fn default_spill() -> String {
    "fatura-spill.jsonl".into()
}

/// The `[gateway]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Upstreams.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// `async` (default) or `sync`.
    #[serde(default)]
    pub durability: Durability,
    /// Capacity of the metering queue (events).
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Most events per group commit.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// How long the writer waits, after the first event of a batch, for more events to
    /// share its commit (milliseconds; 0: commit whatever is queued at once). A batch is
    /// committed sooner when `max_batch` events are queued or the server stops. Fewer,
    /// larger commits cost far less CPU per call (the request path's latency), at the
    /// price of a crash window (async) or a wait (sync) that much longer.
    #[serde(default = "default_commit_delay_ms")]
    pub commit_delay_ms: u64,
    /// Timeout until the upstream's first byte, in milliseconds.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// File where events are appended while the database is unreachable.
    #[serde(default = "default_spill")]
    pub spill_path: String,
    /// Output tokens reserved for a prepaid call that sets no `max_tokens` (the catalog
    /// has no per-model output cap yet).
    #[serde(default = "default_max_output")]
    pub default_max_output_tokens: u64,
    /// Most gateway calls in flight at once; beyond it calls are refused at once with 503
    /// and `Retry-After` (load shedding keeps an overloaded instance answering and metering).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// A stream whose upstream sends nothing for this long (milliseconds) is ended and
    /// metered with what it delivered; its reservation and in-flight slot are freed.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Most calls per customer key per minute (UTC minute windows); beyond it 429 with
    /// `Retry-After`. 0: no limit.
    #[serde(default)]
    pub requests_per_minute: u64,
    /// Most tokens per customer key per minute, counted when a call is admitted as its prompt
    /// tokens plus its output cap (`max_tokens`, or `default_max_output_tokens`), as Azure
    /// OpenAI counts them. 0: no limit.
    #[serde(default)]
    pub tokens_per_minute: u64,
}

fn default_stream_idle_timeout_ms() -> u64 {
    120_000
}

fn default_max_in_flight() -> usize {
    4_096
}

fn default_max_output() -> u64 {
    4_096
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            upstreams: Vec::new(),
            routes: Vec::new(),
            durability: Durability::Async,
            queue_capacity: default_queue(),
            max_batch: default_batch(),
            commit_delay_ms: default_commit_delay_ms(),
            first_byte_timeout_ms: default_first_byte_timeout_ms(),
            spill_path: default_spill(),
            default_max_output_tokens: default_max_output(),
            max_in_flight: default_max_in_flight(),
            stream_idle_timeout_ms: default_stream_idle_timeout_ms(),
            requests_per_minute: 0,
            tokens_per_minute: 0,
        }
    }
}

/// Glob match with `*` only.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

impl GatewayConfig {
    /// Checks names and references; returns a message naming the first problem.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for u in &self.upstreams {
            if !names.insert(u.name.as_str()) {
                return Err(format!("gateway upstream {:?} is defined twice", u.name));
            }
            if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
                return Err(format!(
                    "gateway upstream {:?}: base_url must start with http:// or https://",
                    u.name
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.models.is_empty() || r.upstreams.is_empty() {
                return Err(format!(
                    "gateway route {i}: needs at least one model pattern and one upstream"
                ));
            }
            for name in &r.upstreams {
                if !names.contains(name.as_str()) {
                    return Err(format!("gateway route {i}: unknown upstream {name:?}"));
                }
            }
        }
        if self.queue_capacity == 0 || self.max_batch == 0 || self.max_in_flight == 0 {
            return Err(
                "gateway queue_capacity, max_batch and max_in_flight must be positive".into(),
            );
        }
        if self.commit_delay_ms > MAX_COMMIT_DELAY_MS {
            return Err(format!(
                "gateway commit_delay_ms must be at most {MAX_COMMIT_DELAY_MS} (it is how long answered calls may wait, unwritten, for a commit)"
            ));
        }
        Ok(())
    }

    /// The upstream chain for `model`, or `None` when no route matches.
    pub fn chain_for(&self, model: &str) -> Option<Vec<&UpstreamConfig>> {
        let route = self
            .routes
            .iter()
            .find(|r| r.models.iter().any(|p| glob_match(p, model)))?;
        Some(
            route
                .upstreams
                .iter()
                .filter_map(|n| self.upstreams.iter().find(|u| &u.name == n))
                .collect(),
        )
    }

    /// First-byte timeout.
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::{GatewayConfig, MAX_COMMIT_DELAY_MS, glob_match};

    #[test]
    fn the_commit_delay_is_bounded() {
        let parsed: GatewayConfig =
            serde_json::from_str(r#"{"commit_delay_ms": 0}"#).unwrap_or_default();
        assert_eq!(parsed.commit_delay_ms, 0);
        assert_eq!(parsed.validate(), Ok(()));
        let unset: Result<GatewayConfig, _> = serde_json::from_str("{}");
        assert!(unset.is_ok_and(|c| c.commit_delay_ms == 5));
        let too_long = GatewayConfig {
            commit_delay_ms: MAX_COMMIT_DELAY_MS + 1,
            ..GatewayConfig::default()
        };
        assert!(
            too_long
                .validate()
                .is_err_and(|e| e.contains("commit_delay_ms must be at most 1000"))
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("openai/*", "openai/gpt-4o"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("gpt-4o", "gpt-4o"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
        assert!(glob_match("*mini", "gpt-4o-mini"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXcYb"));
    }
}
