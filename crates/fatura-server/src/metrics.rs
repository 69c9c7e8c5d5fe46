//! Prometheus metrics, one registry per server instance (no process-global state).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of HTTP metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Route template (`/v1/customers/{id}`), never the raw path.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// Labels of the request-duration histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route template.
    pub route: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Request latency by route, seconds.
    pub http_duration: Family<RouteLabels, Histogram>,
    /// Events newly recorded.
    pub events_accepted: Counter<u64, AtomicU64>,
    /// Events acknowledged as duplicates.
    pub events_duplicate: Counter<u64, AtomicU64>,
    /// Events recorded without a catalog price.
    pub events_unpriced: Counter<u64, AtomicU64>,
    /// Events in rejected requests.
    pub events_rejected: Counter<u64, AtomicU64>,
    /// Gateway events written to the spill file (database unavailable).
    pub events_spilled: Counter<u64, AtomicU64>,
    /// Gateway calls by upstream and outcome.
    pub gateway_requests: Family<GatewayLabels, Counter>,
    /// Gateway tokens by kind (`input`, `output`).
    pub gateway_tokens: Family<TokenLabels, Counter>,
    /// Upstream cost of gateway calls, USD (a float for monitoring; the ledger is exact).
    pub gateway_cost_usd: Counter<f64, AtomicU64>,
    /// Time from sending to the upstream to its response headers, seconds.
    pub upstream_latency: Histogram,
    /// Time the gateway adds before forwarding and after the upstream's headers, seconds.
    pub gateway_overhead: Histogram,
    /// Events queued for the metering writer.
    pub meter_queue_depth: Gauge,
    /// Transactions the metering writer committed (events accepted / this = batch size).
    pub meter_commits: Counter<u64, AtomicU64>,
}

/// Labels of gateway call counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// Upstream name (or `none`).
    pub upstream: String,
    /// `ok`, `upstream_error`, `insufficient_credits`, `fallback`, …
    pub outcome: String,
}

/// Labels of token counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `input` or `output`.
    pub kind: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fatura");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let events_accepted = Counter::default();
        let events_duplicate = Counter::default();
        let events_unpriced = Counter::default();
        let events_rejected = Counter::default();
        let events_spilled = Counter::default();
        let gateway_requests = Family::<GatewayLabels, Counter>::default();
        let gateway_tokens = Family::<TokenLabels, Counter>::default();
        let gateway_cost_usd = Counter::<f64, AtomicU64>::default();
        let upstream_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let gateway_overhead = Histogram::new(exponential_buckets(0.000_01, 2.0, 18));
        let meter_queue_depth = Gauge::default();
        let meter_commits = Counter::<u64, AtomicU64>::default();
        registry.register(
            "http_requests",
            "HTTP requests served",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            http_duration.clone(),
        );
        registry.register(
            "events_accepted",
            "Usage events newly recorded",
            events_accepted.clone(),
        );
        registry.register(
            "events_duplicate",
            "Usage events acknowledged as duplicates",
            events_duplicate.clone(),
        );
        registry.register(
            "events_unpriced",
            "Usage events recorded without a catalog price",
            events_unpriced.clone(),
        );
        registry.register(
            "events_rejected",
            "Usage events in rejected requests",
            events_rejected.clone(),
        );
        registry.register(
            "events_spilled",
            "Gateway events spilled to the local file",
            events_spilled.clone(),
        );
        registry.register(
            "gateway_requests",
            "Gateway calls by upstream and outcome",
            gateway_requests.clone(),
        );
        registry.register(
            "gateway_tokens",
            "Gateway tokens by kind",
            gateway_tokens.clone(),
        );
        registry.register(
            "gateway_cost_usd",
            "Upstream cost of gateway calls (USD)",
            gateway_cost_usd.clone(),
        );
        registry.register(
            "gateway_upstream_latency_seconds",
            "Upstream time to response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "gateway_overhead_seconds",
            "Time added by the gateway",
            gateway_overhead.clone(),
        );
        registry.register(
            "meter_queue_depth",
            "Events waiting for the metering writer",
            meter_queue_depth.clone(),
        );
        registry.register(
            "meter_commits",
            "Group commits of the metering writer",
            meter_commits.clone(),
        );
        Metrics {
            registry,
            http_requests,
            http_duration,
            events_accepted,
            events_duplicate,
            events_unpriced,
            events_rejected,
            events_spilled,
            gateway_requests,
            gateway_tokens,
            gateway_cost_usd,
            upstream_latency,
            gateway_overhead,
            meter_queue_depth,
            meter_commits,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
