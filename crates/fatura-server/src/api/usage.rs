//! Usage queries.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use fatura_core::event::check_tag;
use fatura_core::usage::GroupBy;
use fatura_store::UsageFilter;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::prices::instant;
use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};

/// Parameters of `GET /v1/usage` (plus any number of `tag.NAME=value` filters).
#[allow(dead_code)]
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Only this customer (customer keys: their own, the default).
    customer_id: Option<String>,
    /// Events at or after this RFC 3339 instant.
    from: Option<String>,
    /// Events before this RFC 3339 instant.
    to: Option<String>,
    /// Comma-separated dimensions: `customer`, `model`, `provider`, `day`, `hour` (UTC).
    group_by: Option<String>,
    /// Only this provider.
    provider: Option<String>,
    /// Only this model.
    model: Option<String>,
}

/// One group of usage. Money is USD, as decimal strings.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRowOut {
    /// Customer (when grouped by customer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Model (when grouped by model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Provider (when grouped by provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// UTC day `YYYY-MM-DD` (when grouped by day).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// UTC hour `YYYY-MM-DDTHH:00:00Z` (when grouped by hour).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hour: Option<String>,
    /// Events.
    pub events: u64,
    /// Events without a catalog price (not in cost or revenue).
    pub unpriced_events: u64,
    /// Gateway events whose tokens were estimated with a tokenizer (no usage reported).
    pub estimated_events: u64,
    /// Requests.
    pub requests: u64,
    /// Input tokens (including cached and cache-write).
    pub input_tokens: u64,
    /// Output tokens (including reasoning).
    pub output_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Upstream cost.
    pub cost: String,
    /// Provisional revenue (default cost-plus rating).
    pub revenue: String,
    /// Revenue minus cost.
    pub margin: String,
    /// Margin over revenue (e.g. `"0.87"`); null without revenue.
    pub margin_rate: Option<String>,
}

/// Usage answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    /// Currency of every amount.
    pub currency: String,
    /// Dimensions grouped by.
    pub group_by: Vec<String>,
    /// Groups, sorted by their dimension values.
    pub data: Vec<UsageRowOut>,
}

/// A parsed usage query.
pub(crate) struct ParsedUsageQuery {
    pub(crate) customer: Option<String>,
    pub(crate) filter: UsageFilter,
    pub(crate) group_by: Vec<GroupBy>,
    pub(crate) group_names: Vec<String>,
}

pub(crate) fn parse_usage_query(
    pairs: Vec<(String, String)>,
) -> Result<ParsedUsageQuery, ApiError> {
    let mut customer = None;
    let mut filter = UsageFilter::default();
    let mut from: Option<DateTime<Utc>> = None;
    let mut to: Option<DateTime<Utc>> = None;
    let mut group_by = Vec::new();
    let mut names = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "customer_id" => customer = Some(v),
            "from" => from = instant("from", Some(&v))?,
            "to" => to = instant("to", Some(&v))?,
            "provider" => filter.provider = Some(v),
            "model" => filter.model = Some(v),
            "group_by" => {
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let g: GroupBy = part
                        .parse()
                        .map_err(|e: String| ApiError::bad_request("invalid_query", e))?;
                    if !group_by.contains(&g) {
                        group_by.push(g);
                        names.push(part.to_string());
                    }
                }
            }
            other => match other.strip_prefix("tag.") {
                Some(tag) => {
                    check_tag(tag, &v)
                        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
                    filter.tags.push((tag.to_string(), v));
                }
                None => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!(
                            "unknown parameter {other:?}: expected customer_id, from, to, group_by, provider, model or tag.NAME"
                        ),
                    ));
                }
            },
        }
    }
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "from must not be after to",
        ));
    }
    filter.from = from;
    filter.to = to;
    Ok(ParsedUsageQuery {
        customer,
        filter,
        group_by,
        group_names: names,
    })
}

/// Usage grouped by customer, model, provider, day or hour, with cost, revenue and margin.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageQuery),
    responses((status = 200, body = UsageResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, description = "A customer key asked for another customer", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_usage(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<ApiJson<UsageResponse>, ApiError> {
    let Query(pairs) = query?;
    let ParsedUsageQuery {
        customer,
        mut filter,
        group_by,
        group_names: names,
    } = parse_usage_query(pairs)?;
    filter.customer_id = caller.scope_customer(customer)?;
    let rows = state.fatura.usage(&filter, group_by).await?;
    let data = rows
        .into_iter()
        .map(|(k, t)| UsageRowOut {
            customer_id: k.customer_id,
            model: k.model,
            provider: k.provider,
            day: k.day,
            hour: k.hour,
            events: t.events,
            unpriced_events: t.unpriced_events,
            estimated_events: t.estimated_events,
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cached_input_tokens: t.cached_input_tokens,
            cache_write_tokens: t.cache_write_tokens,
            reasoning_tokens: t.reasoning_tokens,
            cost: t.cost.to_string(),
            revenue: t.revenue.to_string(),
            margin: t.margin().to_string(),
            margin_rate: t.margin_rate().map(|r| r.to_string()),
        })
        .collect();
    Ok(ApiJson(UsageResponse {
        currency: "USD".into(),
        group_by: names,
        data,
    }))
}

/// Query of `GET /v1/usage/unpriced`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UnpricedQuery {
    /// Only this customer.
    pub customer_id: Option<String>,
}

/// Unpriced usage of one model.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnpricedOut {
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Events without a price.
    pub events: u64,
    /// Their requests.
    pub requests: u64,
    /// Their input tokens.
    pub input_tokens: u64,
    /// Their output tokens.
    pub output_tokens: u64,
    /// Earliest.
    pub first_timestamp: DateTime<Utc>,
    /// Latest.
    pub last_timestamp: DateTime<Utc>,
}

/// Unpriced usage list.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnpricedList {
    /// Models with unpriced events.
    pub data: Vec<UnpricedOut>,
}

/// Events whose model had no catalog price: accepted, never costed at zero, listed here
/// until a price import covers them.
#[utoipa::path(get, path = "/v1/usage/unpriced", tag = "usage", params(UnpricedQuery),
    responses((status = 200, body = UnpricedList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_unpriced(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<UnpricedQuery>, QueryRejection>,
) -> Result<ApiJson<UnpricedList>, ApiError> {
    let Query(q) = query?;
    let models = state.fatura.unpriced(q.customer_id.as_deref()).await?;
    Ok(ApiJson(UnpricedList {
        data: models
            .into_iter()
            .map(|m| UnpricedOut {
                provider: m.provider,
                model: m.model,
                events: m.events,
                requests: m.requests,
                input_tokens: m.input_tokens,
                output_tokens: m.output_tokens,
                first_timestamp: m.first_timestamp,
                last_timestamp: m.last_timestamp,
            })
            .collect(),
    }))
}
