//! The price catalog: import and lookup.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use fatura_core::catalog::{PriceVersion, UnitPrice};
use fatura_core::import::CatalogFormat;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};

/// Query of `POST /v1/prices/import`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// `openrouter` (the `/api/v1/models` JSON) or `litellm` (LiteLLM's price map).
    pub format: String,
    /// For `openrouter`, the provider name to record (default `openrouter`); for `litellm`,
    /// import only entries whose `litellm_provider` is this.
    pub provider: Option<String>,
    /// RFC 3339 instant from which the prices apply (default: now).
    pub effective_from: Option<String>,
}

/// An entry left out of an import.
#[derive(Debug, Serialize, ToSchema)]
pub struct SkippedOut {
    /// Key or id in the file.
    pub entry: String,
    /// Why.
    pub reason: String,
}

/// What an import did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportResponse {
    /// Prices apply from this instant.
    pub effective_from: DateTime<Utc>,
    /// Models with usable prices in the file.
    pub models: usize,
    /// New price versions created.
    pub created: usize,
    /// Models whose prices were unchanged (no new version).
    pub unchanged: usize,
    /// Entries left out, with the reason.
    pub skipped: Vec<SkippedOut>,
    /// Catalog revision after the import.
    pub catalog_revision: i64,
    /// Previously unpriced events now priced by the new versions.
    pub events_priced: u64,
}

/// Query of `GET /v1/prices`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PricesQuery {
    /// Only this provider.
    pub provider: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// RFC 3339 instant: only the version in force then, per model. Without it, every version.
    pub at: Option<String>,
}

/// One price version. Prices are USD decimal strings per unit: per token for `prompt`,
/// `completion`, `cache_read`, `cache_write` and `reasoning`; per request, image and web
/// search for the others. `null` cache/reasoning prices mean "no separate price": those
/// tokens are billed at the prompt (cache) or completion (reasoning) price.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceOut {
    /// Version id (recorded on every event costed with it).
    pub version_id: i64,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// First instant these prices apply.
    pub effective_from: DateTime<Utc>,
    /// Per prompt token.
    pub prompt: String,
    /// Per completion token.
    pub completion: String,
    /// Per cached prompt token read.
    pub cache_read: Option<String>,
    /// Per cache-write token.
    pub cache_write: Option<String>,
    /// Per reasoning token.
    pub reasoning: Option<String>,
    /// Per request.
    pub request: String,
    /// Per image.
    pub image: String,
    /// Per web search.
    pub web_search: String,
}

fn s(p: UnitPrice) -> String {
    p.value().to_string()
}

impl From<PriceVersion> for PriceOut {
    fn from(v: PriceVersion) -> Self {
        let p = v.prices;
        PriceOut {
            version_id: v.id,
            provider: v.provider,
            model: v.model,
            effective_from: v.effective_from,
            prompt: s(p.prompt),
            completion: s(p.completion),
            cache_read: p.cache_read.map(s),
            cache_write: p.cache_write.map(s),
            reasoning: p.reasoning.map(s),
            request: s(p.per_request),
            image: s(p.per_image),
            web_search: s(p.web_search),
        }
    }
}

/// Price list.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceList {
    /// Versions, by provider, model and effective_from.
    pub data: Vec<PriceOut>,
}

/// Parses an optional RFC 3339 query parameter.
pub fn instant(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("{name}: must be an RFC 3339 instant: {e}"),
                    )
                })
        })
        .transpose()
}

/// Imports a catalog file (the request body) as new price versions.
#[utoipa::path(post, path = "/v1/prices/import", tag = "prices", params(ImportQuery),
    request_body(content = String, description = "The catalog file (JSON)", content_type = "application/json"),
    responses((status = 200, body = ImportResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody),
              (status = 409, description = "A version at that instant differs, or costed events would be re-priced", body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, description = "Not a catalog of that format", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_prices(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<ImportQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<ApiJson<ImportResponse>, ApiError> {
    let Query(q) = query?;
    let body = body?;
    let format: CatalogFormat = q
        .format
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid_query", e))?;
    let now = state.fatura.now();
    let effective_from = instant("effective_from", q.effective_from.as_deref())?.unwrap_or(now);
    let r = state
        .fatura
        .import_prices(format, &body, q.provider.as_deref(), effective_from, now)
        .await?;
    Ok(ApiJson(ImportResponse {
        effective_from: r.effective_from,
        models: r.models,
        created: r.created,
        unchanged: r.unchanged,
        skipped: r
            .skipped
            .into_iter()
            .map(|s| SkippedOut {
                entry: s.entry,
                reason: s.reason,
            })
            .collect(),
        catalog_revision: r.catalog_revision,
        events_priced: r.events_priced,
    }))
}

/// Lists price versions.
#[utoipa::path(get, path = "/v1/prices", tag = "prices", params(PricesQuery),
    responses((status = 200, body = PriceList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_prices(
    State(state): State<AppState>,
    _caller: Caller,
    query: Result<Query<PricesQuery>, QueryRejection>,
) -> Result<ApiJson<PriceList>, ApiError> {
    let Query(q) = query?;
    let at = instant("at", q.at.as_deref())?;
    let versions = state
        .fatura
        .prices(q.provider.as_deref(), q.model.as_deref(), at)
        .await?;
    Ok(ApiJson(PriceList {
        data: versions.into_iter().map(Into::into).collect(),
    }))
}
