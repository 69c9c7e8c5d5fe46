//! Analytics over rollups: time series and summaries. Customer keys see only their own
//! customer and never cost or margin.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use fatura_core::rollup::{Grain, RollupTotals};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::prices::instant;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::service::analytics::{Dimension, Metric, margin};

fn invalid(m: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", m, Vec::new())
}

fn range(from: Option<&str>, to: Option<&str>) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let from = instant("from", from)?.ok_or_else(|| invalid("from: required (RFC 3339)"))?;
    let to = instant("to", to)?.ok_or_else(|| invalid("to: required (RFC 3339)"))?;
    Ok((from, to))
}

/// Query of `GET /v1/analytics/timeseries`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TimeseriesQuery {
    /// `revenue`, `cost`, `margin`, `requests` or `tokens` (cost and margin: operators only).
    pub metric: String,
    /// `minute`, `hour` or `day` (UTC buckets).
    pub grain: String,
    /// RFC 3339, a bucket start.
    pub from: Option<String>,
    /// RFC 3339, a bucket start (exclusive).
    pub to: Option<String>,
    /// `customer`, `model`, `provider` or `agent`.
    pub group_by: Option<String>,
    /// Only this customer (a customer key: only its own).
    pub customer_id: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// One point.
#[derive(Debug, Serialize, ToSchema)]
pub struct PointOut {
    /// Bucket start.
    pub bucket: DateTime<Utc>,
    /// Group value, with `group_by`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The metric, a decimal string (money in USD).
    pub value: String,
}

/// A time series.
#[derive(Debug, Serialize, ToSchema)]
pub struct TimeseriesOut {
    /// Metric.
    pub metric: String,
    /// Grain.
    pub grain: String,
    /// Points by bucket then group; buckets without usage are absent.
    pub points: Vec<PointOut>,
}

/// A time series of revenue, cost, margin, requests or tokens from the rollups.
#[utoipa::path(get, path = "/v1/analytics/timeseries", tag = "analytics", params(TimeseriesQuery),
    responses((status = 200, body = TimeseriesOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn timeseries(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<TimeseriesQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Query(q) = query?;
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(invalid("format: json or csv")),
    };
    let metric = Metric::parse(&q.metric)
        .ok_or_else(|| invalid("metric: revenue, cost, margin, requests or tokens"))?;
    let grain = Grain::parse(&q.grain).ok_or_else(|| invalid("grain: minute, hour or day"))?;
    let group_by = q
        .group_by
        .as_deref()
        .map(|g| {
            Dimension::parse(g)
                .ok_or_else(|| invalid("group_by: customer, model, provider or agent"))
        })
        .transpose()?;
    let customer = caller.scope_customer(q.customer_id)?;
    if metric.operator_only() && !matches!(caller, Caller::Admin) {
        return Err(ApiError::forbidden("cost and margin are for operators"));
    }
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let points = state
        .fatura
        .timeseries(metric, grain, from, to, group_by, customer.as_deref())
        .await?;
    if csv {
        let mut out = String::from("bucket,group,value\r\n");
        for p in &points {
            let group = p.group.clone().unwrap_or_default();
            let group = if group.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", group.replace('"', "\"\""))
            } else {
                group
            };
            out.push_str(&format!(
                "{},{},{}\r\n",
                p.bucket.to_rfc3339(),
                group,
                p.value
            ));
        }
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            out,
        )
            .into_response());
    }
    Ok(ApiJson(TimeseriesOut {
        metric: q.metric,
        grain: q.grain,
        points: points
            .into_iter()
            .map(|p| PointOut {
                bucket: p.bucket,
                group: p.group,
                value: p.value.to_string(),
            })
            .collect(),
    })
    .into_response())
}

/// Query of `GET /v1/analytics/summary`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SummaryQuery {
    /// RFC 3339, whole minute.
    pub from: Option<String>,
    /// RFC 3339, whole minute (exclusive).
    pub to: Option<String>,
    /// Only this customer (a customer key: only its own).
    pub customer_id: Option<String>,
}

/// A ranked group.
#[derive(Debug, Serialize, ToSchema)]
pub struct RankedOut {
    /// Model, provider, customer or agent.
    pub name: String,
    /// Revenue, USD.
    pub revenue: String,
    /// Cost, USD (operators only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
    /// Gross margin (operators only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin: Option<String>,
    /// Requests.
    pub requests: i64,
    /// Input + output tokens.
    pub tokens: i64,
}

/// Totals of a period and the top groups.
#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryOut {
    /// Period start.
    pub from: DateTime<Utc>,
    /// Period end.
    pub to: DateTime<Utc>,
    /// Revenue (provisional, per event), USD.
    pub revenue: String,
    /// Upstream cost, USD (operators only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
    /// Gross margin (operators only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gross_margin: Option<String>,
    /// The margin target (the default floor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin_target: Option<String>,
    /// Events.
    pub events: i64,
    /// Requests.
    pub requests: i64,
    /// Input + output tokens.
    pub tokens: i64,
    /// Events without a price yet.
    pub unpriced_events: i64,
    /// Top 5 by revenue.
    pub top_models: Vec<RankedOut>,
    /// Top 5 by revenue.
    pub top_providers: Vec<RankedOut>,
    /// Top 5 by revenue (operators only; a customer sees itself).
    pub top_customers: Vec<RankedOut>,
    /// Top 5 agents (`agent` tag) by revenue.
    pub top_agents: Vec<RankedOut>,
}

fn ranked(name: String, t: &RollupTotals, operator: bool) -> RankedOut {
    RankedOut {
        name,
        revenue: t.revenue.normalize().to_string(),
        cost: operator.then(|| t.cost.normalize().to_string()),
        margin: if operator {
            margin(t).map(|m| m.to_string())
        } else {
            None
        },
        requests: t.requests,
        tokens: t.tokens(),
    }
}

/// Totals of a period (revenue, cost, gross margin against the target, usage) and the top
/// models, providers, customers and agents, from the rollups.
#[utoipa::path(get, path = "/v1/analytics/summary", tag = "analytics", params(SummaryQuery),
    responses((status = 200, body = SummaryOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn summary(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<SummaryQuery>, QueryRejection>,
) -> Result<ApiJson<SummaryOut>, ApiError> {
    let Query(q) = query?;
    let customer = caller.scope_customer(q.customer_id)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let s = state.fatura.summary(from, to, customer.as_deref()).await?;
    let operator = matches!(caller, Caller::Admin);
    let [models, providers, customers, agents] = s.top;
    let list = |v: Vec<crate::service::analytics::Ranked>| {
        v.into_iter()
            .map(|r| ranked(r.name, &r.totals, operator))
            .collect::<Vec<_>>()
    };
    let t = s.totals;
    Ok(ApiJson(SummaryOut {
        from,
        to,
        revenue: t.revenue.normalize().to_string(),
        cost: operator.then(|| t.cost.normalize().to_string()),
        gross_margin: if operator {
            margin(&t).map(|m| m.to_string())
        } else {
            None
        },
        margin_target: operator.then(|| state.fatura.margin().value().to_string()),
        events: t.events,
        requests: t.requests,
        tokens: t.tokens(),
        unpriced_events: t.unpriced_events,
        top_models: list(models.1),
        top_providers: list(providers.1),
        top_customers: list(customers.1),
        top_agents: list(agents.1),
    }))
}

/// An outcome: value an agent generated.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutcomeBody {
    /// Idempotency key (1–128 of `[A-Za-z0-9-_.:/@]`).
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// RFC 3339.
    pub timestamp: String,
    /// Tags, e.g. `{"agent": "sdr-bot"}`.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// Value, decimal string.
    pub value: String,
    /// `USD`, `BRL` or `EUR`.
    pub currency: String,
    /// e.g. `conversion`.
    pub kind: String,
}

/// A batch of outcomes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutcomeBatch {
    /// Up to 10,000 outcomes.
    pub outcomes: Vec<OutcomeBody>,
}

/// What a batch did.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutcomesOut {
    /// New outcomes.
    pub accepted: u64,
    /// Replays of recorded outcomes.
    pub duplicates: u64,
}

/// Records outcomes (idempotent by id, all or nothing).
#[utoipa::path(post, path = "/v1/outcomes", tag = "analytics", request_body = OutcomeBatch,
    responses((status = 200, body = OutcomesOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn post_outcomes(
    State(state): State<AppState>,
    _admin: crate::auth::Admin,
    ApiJson(batch): ApiJson<OutcomeBatch>,
) -> Result<ApiJson<OutcomesOut>, ApiError> {
    if batch.outcomes.is_empty() || batch.outcomes.len() > 10_000 {
        return Err(invalid("outcomes: 1 to 10000"));
    }
    let mut inputs = Vec::with_capacity(batch.outcomes.len());
    for (i, o) in batch.outcomes.into_iter().enumerate() {
        let timestamp = instant(&format!("outcomes[{i}].timestamp"), Some(&o.timestamp))?
            .ok_or_else(|| invalid("timestamp: required"))?;
        let value = o
            .value
            .trim()
            .parse()
            .map_err(|_| invalid(format!("outcomes[{i}].value: a decimal string")))?;
        let currency = o
            .currency
            .parse()
            .map_err(|e| invalid(format!("outcomes[{i}].currency: {e}")))?;
        inputs.push(crate::service::analytics::OutcomeInput {
            id: o.id,
            customer_id: o.customer_id,
            timestamp,
            tags: o.tags,
            value,
            currency,
            kind: o.kind,
        });
    }
    let (accepted, duplicates) = state
        .fatura
        .record_outcomes(inputs, state.fatura.now())
        .await?;
    Ok(ApiJson(OutcomesOut {
        accepted,
        duplicates,
    }))
}

/// Query of `GET /v1/analytics/roi`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RoiQuery {
    /// `agent` or `customer`.
    pub group_by: String,
    /// RFC 3339, whole minute.
    pub from: Option<String>,
    /// RFC 3339, whole minute (exclusive).
    pub to: Option<String>,
    /// Only this customer (a customer key: only its own).
    pub customer_id: Option<String>,
}

/// ROI of one group.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoiOut {
    /// Agent or customer.
    pub name: String,
    /// Outcomes.
    pub outcomes: i64,
    /// Their value, USD.
    pub value: String,
    /// AI spend, USD.
    pub spend: String,
    /// value / spend.
    pub roi: Option<String>,
    /// spend / outcomes.
    pub cost_per_outcome: Option<String>,
}

/// ROI list.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoiList {
    /// By name.
    pub data: Vec<RoiOut>,
}

/// Value generated against AI spend, per agent or customer.
#[utoipa::path(get, path = "/v1/analytics/roi", tag = "analytics", params(RoiQuery),
    responses((status = 200, body = RoiList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn roi(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<RoiQuery>, QueryRejection>,
) -> Result<ApiJson<RoiList>, ApiError> {
    let Query(q) = query?;
    let group_by = match q.group_by.as_str() {
        "agent" => Dimension::Agent,
        "customer" => Dimension::Customer,
        _ => return Err(invalid("group_by: agent or customer")),
    };
    let customer = caller.scope_customer(q.customer_id)?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let rows = state
        .fatura
        .roi(group_by, from, to, customer.as_deref())
        .await?;
    Ok(ApiJson(RoiList {
        data: rows
            .into_iter()
            .map(|r| RoiOut {
                name: r.name,
                outcomes: r.outcomes,
                value: r.value.to_string(),
                spend: r.spend.to_string(),
                roi: r.roi.map(|d| d.to_string()),
                cost_per_outcome: r.cost_per_outcome.map(|d| d.to_string()),
            })
            .collect(),
    }))
}

/// Query of `GET /v1/analytics/forecast`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ForecastQuery {
    /// Customer (a customer key: only its own).
    pub customer_id: Option<String>,
    /// Days to forecast from today (default: to the end of the current cycle; at most 366).
    pub horizon: Option<usize>,
    /// RFC 3339 instant to forecast at (default now).
    pub at: Option<String>,
}

/// A projected total with its 80% interval.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionOut {
    /// Actual in the cycle so far (to the start of today, UTC).
    pub actual: String,
    /// Actual + forecast.
    pub projected: String,
    /// 80% lower bound.
    pub lower: String,
    /// 80% upper bound.
    pub upper: String,
}

/// One forecast day.
#[derive(Debug, Serialize, ToSchema)]
pub struct DayOut {
    /// Day (UTC).
    pub day: DateTime<Utc>,
    /// Revenue forecast.
    pub value: String,
    /// 80% lower bound.
    pub lower: String,
    /// 80% upper bound.
    pub upper: String,
}

/// A customer's forecast.
#[derive(Debug, Serialize, ToSchema)]
pub struct ForecastOut {
    /// Customer.
    pub customer_id: String,
    /// Current cycle start.
    pub period_start: DateTime<Utc>,
    /// Current cycle end.
    pub period_end: DateTime<Utc>,
    /// Days forecast, from today.
    pub horizon_days: usize,
    /// Days of history the model was fitted on.
    pub history_days: usize,
    /// Revenue (what the customer pays), USD.
    pub revenue: ProjectionOut,
    /// Upstream cost, USD (operators only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<ProjectionOut>,
    /// Daily revenue forecast.
    pub daily: Vec<DayOut>,
    /// Prepaid: the balance now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    /// Prepaid: the day the balance runs out at the forecast pace (null: not within the
    /// horizon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_runs_out_on: Option<Option<DateTime<Utc>>>,
    /// Yesterday's revenue ran above its forecast's 80% bound.
    pub anomaly: bool,
}

fn projection(p: crate::service::analytics::Projection) -> ProjectionOut {
    ProjectionOut {
        actual: p.actual.to_string(),
        projected: p.projected.to_string(),
        lower: p.lower.to_string(),
        upper: p.upper.to_string(),
    }
}

/// Projected spend and revenue to the end of the customer's current cycle with an 80%
/// interval (additive Holt-Winters with a weekly season over up to 56 days of daily
/// rollups), and for prepaid customers the day the balance runs out.
#[utoipa::path(get, path = "/v1/analytics/forecast", tag = "analytics", params(ForecastQuery),
    responses((status = 200, body = ForecastOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn forecast(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ForecastQuery>, QueryRejection>,
) -> Result<ApiJson<ForecastOut>, ApiError> {
    let Query(q) = query?;
    let customer = caller
        .scope_customer(q.customer_id)?
        .ok_or_else(|| invalid("customer_id: required"))?;
    let at = instant("at", q.at.as_deref())?.unwrap_or_else(Utc::now);
    let f = state.fatura.forecast(&customer, at, q.horizon).await?;
    let operator = matches!(caller, Caller::Admin);
    Ok(ApiJson(ForecastOut {
        customer_id: customer,
        period_start: f.period_start,
        period_end: f.period_end,
        horizon_days: f.horizon_days,
        history_days: f.history_days,
        revenue: projection(f.revenue),
        cost: operator.then(|| projection(f.cost)),
        daily: f
            .daily
            .into_iter()
            .map(|(day, v, l, u)| DayOut {
                day,
                value: v.to_string(),
                lower: l.to_string(),
                upper: u.to_string(),
            })
            .collect(),
        balance: f.balance.as_ref().map(|b| b.0.to_string()),
        balance_runs_out_on: f.balance.map(|b| b.1),
        anomaly: f.anomaly,
    }))
}

/// Query of `GET /v1/analytics/provider-comparison`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ComparisonQuery {
    /// Only this customer.
    pub customer_id: Option<String>,
    /// RFC 3339, whole minute.
    pub from: Option<String>,
    /// RFC 3339, whole minute (exclusive).
    pub to: Option<String>,
}

/// Another provider's price for the same usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlternativeOut {
    /// Provider.
    pub provider: String,
    /// Its model name.
    pub model: String,
    /// Cost of the same usage there, USD.
    pub cost: String,
    /// cost − actual cost (negative: a saving).
    pub difference: String,
}

/// One model's comparison.
#[derive(Debug, Serialize, ToSchema)]
pub struct ComparisonOut {
    /// Provider that served it.
    pub provider: String,
    /// Model as served.
    pub model: String,
    /// Canonical model name (the equivalence key).
    pub canonical_model: String,
    /// Requests.
    pub requests: i64,
    /// Input + output tokens.
    pub tokens: i64,
    /// What it cost, USD.
    pub actual_cost: String,
    /// Other providers, cheapest first.
    pub alternatives: Vec<AlternativeOut>,
    /// Saving with the cheapest alternative (negative or zero: none cheaper).
    pub best_saving: String,
}

/// Comparison list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ComparisonList {
    /// By provider and model.
    pub data: Vec<ComparisonOut>,
    /// Total actual cost, USD.
    pub actual_cost: String,
    /// Total cost at the cheapest provider of each model, USD.
    pub cheapest_cost: String,
}

/// For the actual usage mix, the cost through the providers that served it versus every
/// other provider in the catalog offering the same model (operators only).
#[utoipa::path(get, path = "/v1/analytics/provider-comparison", tag = "analytics", params(ComparisonQuery),
    responses((status = 200, body = ComparisonList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn provider_comparison(
    State(state): State<AppState>,
    _admin: crate::auth::Admin,
    query: Result<Query<ComparisonQuery>, QueryRejection>,
) -> Result<ApiJson<ComparisonList>, ApiError> {
    let Query(q) = query?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let rows = state
        .fatura
        .provider_comparison(from, to, q.customer_id.as_deref())
        .await?;
    let mut actual = rust_decimal::Decimal::ZERO;
    let mut cheapest = rust_decimal::Decimal::ZERO;
    let data = rows
        .into_iter()
        .map(|c| {
            let best = c
                .alternatives
                .first()
                .map_or(c.actual_cost, |a| a.cost.min(c.actual_cost));
            actual += c.actual_cost;
            cheapest += best;
            ComparisonOut {
                best_saving: (c.actual_cost - best).normalize().to_string(),
                provider: c.provider,
                model: c.model,
                canonical_model: c.canonical,
                requests: c.totals.requests,
                tokens: c.totals.tokens(),
                actual_cost: c.actual_cost.to_string(),
                alternatives: c
                    .alternatives
                    .into_iter()
                    .map(|a| AlternativeOut {
                        provider: a.provider,
                        model: a.model,
                        cost: a.cost.normalize().to_string(),
                        difference: a.difference.to_string(),
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(ApiJson(ComparisonList {
        data,
        actual_cost: actual.normalize().to_string(),
        cheapest_cost: cheapest.normalize().to_string(),
    }))
}
