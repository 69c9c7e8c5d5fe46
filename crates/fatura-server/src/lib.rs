//! # fatura-server
//!
//! The HTTP layer of fatura and the business layer ([`service::Fatura`]) it shares with
//! the CLI.
//!
//! Architecture Invariant: only this crate derives wire serialization (JSON shapes of
//! the API); the domain and store crates know nothing of HTTP.

pub mod api;
pub mod auth;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod mock;
pub mod plans;
pub mod render;
pub mod web;

/// The business layer (crate `fatura-service`), under the paths it had when it lived here.
pub use fatura_service as service;
pub use fatura_service::{payments, wallet};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::error::ApiError;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};
use crate::service::{Fatura, hash_api_key};

/// Largest body of `POST /v1/events` (10,000 events fit comfortably).
pub const EVENTS_BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Largest catalog file accepted by `POST /v1/prices/import`.
pub const IMPORT_BODY_LIMIT: usize = 64 * 1024 * 1024;
/// Largest body of any other request.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Shared state of the HTTP layer.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The business layer.
    pub fatura: Arc<Fatura>,
    /// SHA-256 (hex) of the admin key; the key itself is not kept.
    pub admin_key_hash: Arc<str>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The gateway, when configured.
    pub gateway: Option<Arc<gateway::Gateway>>,
    /// Billing policy (grace period).
    pub billing: service::BillingPolicy,
    /// Payment collection, when a processor is configured.
    pub payments: Option<Arc<payments::Collector>>,
    /// Signed-in browsers (dashboard and portal).
    pub sessions: Arc<web::Sessions>,
    /// Turns true when the server starts shutting down (ends long-lived streams).
    pub closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AppState {
    /// State for a service and an admin key.
    pub fn new(fatura: Arc<Fatura>, admin_key: &str) -> Self {
        AppState {
            fatura,
            admin_key_hash: Arc::from(hash_api_key(admin_key)),
            metrics: Arc::new(Metrics::default()),
            gateway: None,
            billing: service::BillingPolicy::default(),
            payments: None,
            sessions: Arc::new(web::Sessions::default()),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Adds payment collection through `processor`.
    pub fn with_payments(
        mut self,
        processor: Arc<dyn payments::PaymentProcessor>,
        policy: payments::CollectionPolicy,
    ) -> Self {
        self.payments = Some(Arc::new(payments::Collector::new(
            self.fatura.clone(),
            processor,
            policy,
        )));
        self
    }

    /// Sets the billing policy.
    pub fn with_billing(mut self, billing: service::BillingPolicy) -> Self {
        self.billing = billing;
        self
    }

    /// Billing runs and the background work, under this state's policy and collector.
    pub fn scheduler(&self) -> service::scheduler::Scheduler {
        service::scheduler::Scheduler::new(self.fatura.clone(), self.payments.clone(), self.billing)
    }

    /// Adds the gateway (its meter must have been started with this state's metrics).
    pub fn with_gateway(mut self, gateway: Arc<gateway::Gateway>) -> Self {
        self.gateway = Some(gateway);
        self
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "fatura", description = "Metering, pricing and billing for AI platforms."),
    paths(
        api::events::post_events,
        api::customers::create_customer,
        api::customers::list_customers,
        api::customers::get_customer,
        api::customers::update_customer,
        api::customers::create_key,
        api::customers::list_keys,
        api::customers::revoke_key,
        api::wallet::get_wallet,
        api::wallet::add_credit,
        api::prices::import_prices,
        api::prices::list_prices,
        api::usage::get_usage,
        api::usage::get_unpriced,
        api::pricing::create_plan,
        api::pricing::list_plans,
        api::pricing::get_plan,
        api::pricing::update_plan,
        api::pricing::post_fx_rate,
        api::pricing::list_fx_rates,
        api::pricing::list_alerts,
        api::pricing::get_upcoming,
        api::pricing::get_price_changes,
        api::invoices::list_invoices,
        api::invoices::get_invoice,
        api::invoices::finalize_invoice,
        api::invoices::void_invoice,
        api::invoices::create_credit_note,
        api::invoices::run_billing,
        api::invoices::stripe_webhook,
        api::invoices::save_payment_method,
        api::invoices::top_up,
        api::analytics::timeseries,
        api::analytics::summary,
        api::analytics::post_outcomes,
        api::analytics::roi,
        api::analytics::forecast,
        api::analytics::provider_comparison,
        api::export::usage_csv,
        api::export::invoices_csv,
        api::healthz,
        api::readyz,
        api::metrics,
        api::openapi,
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn track_requests(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: route.clone(),
            method,
            status,
        })
        .inc();
    state
        .metrics
        .http_duration
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The application's router.
pub fn router(state: AppState) -> Router {
    let events = Router::new()
        .route("/v1/events", post(api::events::post_events))
        .layer(DefaultBodyLimit::max(EVENTS_BODY_LIMIT));
    let import = Router::new()
        .route("/v1/prices/import", post(api::prices::import_prices))
        .layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT));
    let gateway = Router::new()
        .route(
            "/v1/chat/completions",
            post(gateway::proxy::chat_completions),
        )
        .route("/v1/embeddings", post(gateway::proxy::embeddings))
        .route("/v1/models", get(gateway::proxy::list_models))
        .layer(DefaultBodyLimit::max(EVENTS_BODY_LIMIT));
    let rest = Router::new()
        .route(
            "/v1/customers",
            post(api::customers::create_customer).get(api::customers::list_customers),
        )
        .route(
            "/v1/customers/{id}",
            get(api::customers::get_customer).patch(api::customers::update_customer),
        )
        .route(
            "/v1/customers/{id}/keys",
            post(api::customers::create_key).get(api::customers::list_keys),
        )
        .route("/v1/keys/{id}", delete(api::customers::revoke_key))
        .route("/v1/customers/{id}/wallet", get(api::wallet::get_wallet))
        .route(
            "/v1/customers/{id}/wallet/credits",
            post(api::wallet::add_credit),
        )
        .route("/v1/prices", get(api::prices::list_prices))
        .route("/v1/prices/changes", get(api::pricing::get_price_changes))
        .route(
            "/v1/plans",
            post(api::pricing::create_plan).get(api::pricing::list_plans),
        )
        .route(
            "/v1/plans/{id}",
            get(api::pricing::get_plan).patch(api::pricing::update_plan),
        )
        .route(
            "/v1/fx-rates",
            post(api::pricing::post_fx_rate).get(api::pricing::list_fx_rates),
        )
        .route("/v1/alerts", get(api::pricing::list_alerts))
        .route("/v1/invoices", get(api::invoices::list_invoices))
        .route("/v1/invoices/{id}", get(api::invoices::get_invoice))
        .route(
            "/v1/invoices/{id}/finalize",
            post(api::invoices::finalize_invoice),
        )
        .route("/v1/invoices/{id}/void", post(api::invoices::void_invoice))
        .route(
            "/v1/invoices/{id}/credit-notes",
            post(api::invoices::create_credit_note),
        )
        .route("/v1/billing/run", post(api::invoices::run_billing))
        .route("/v1/analytics/timeseries", get(api::analytics::timeseries))
        .route("/v1/analytics/summary", get(api::analytics::summary))
        .route("/v1/analytics/roi", get(api::analytics::roi))
        .route("/v1/analytics/forecast", get(api::analytics::forecast))
        .route("/v1/export/usage.csv", get(api::export::usage_csv))
        .route("/v1/export/invoices.csv", get(api::export::invoices_csv))
        .route(
            "/v1/analytics/provider-comparison",
            get(api::analytics::provider_comparison),
        )
        .route("/v1/outcomes", post(api::analytics::post_outcomes))
        .route("/v1/webhooks/stripe", post(api::invoices::stripe_webhook))
        .route(
            "/v1/customers/{id}/payment-methods",
            post(api::invoices::save_payment_method),
        )
        .route(
            "/v1/customers/{id}/wallet/top-ups",
            post(api::invoices::top_up),
        )
        .route(
            "/v1/customers/{id}/upcoming",
            get(api::pricing::get_upcoming),
        )
        .route("/v1/usage", get(api::usage::get_usage))
        .route("/v1/usage/unpriced", get(api::usage::get_unpriced))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(api::openapi))
        .layer(DefaultBodyLimit::max(DEFAULT_BODY_LIMIT));
    let api = Router::new()
        .merge(events)
        .merge(import)
        .merge(gateway)
        .merge(rest)
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(120),
        ));
    // The web pages have no request timeout: the live feed is a long-lived stream (it ends
    // when the server shuts down).
    let web = web::router().layer(DefaultBodyLimit::max(DEFAULT_BODY_LIMIT));
    Router::new()
        .merge(api)
        .merge(web)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            track_requests,
        ))
        // A 5xx is logged where it is made (an unexpected error with its cause); the trace
        // layer's own line per failed response is debug only, so that shedding load (503
        // by the thousand) does not also flood the log.
        .layer(
            TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests
/// (every acknowledged event is already committed) and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    state.fatura.start_background();
    let closing = state.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    let app = router(state);
    // Small writes (SSE chunks, short JSON answers) go out at once, not after Nagle's delay.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
