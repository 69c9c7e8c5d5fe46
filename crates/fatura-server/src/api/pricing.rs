//! The pricing engine over HTTP: plans, exchange rates, alerts, the upcoming-invoice preview
//! and catalog change reports. Money and rates are decimal strings.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use fatura_core::Currency;
use fatura_core::rating::{
    ListPrice, ModelMargin, PlanKind, PlanTerms, RatedLine, RatedSegment, Tier, TierMetric,
    TierMode, Tiers,
};
use fatura_store::{AlertRecord, FxRate, PlanVersionRecord};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};

use super::prices::{PriceOut, instant};
use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::service::{Fatura, MarginImpact, PlanInput, PlanView, PriceChanges, Upcoming};

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message, Vec::new())
}

fn decimal(field: &str, s: &str) -> Result<Decimal, ApiError> {
    Decimal::from_str(s.trim())
        .map_err(|_| invalid(format!("{field}: must be a decimal string such as \"0.9\"")))
}

fn opt_decimal(field: &str, s: Option<&str>) -> Result<Option<Decimal>, ApiError> {
    s.map(|s| decimal(field, s)).transpose()
}

/// A cost-plus margin for model names matching `pattern` (`*` matches anything).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelMarginBody {
    /// Model name pattern, e.g. `anthropic/*`.
    pub pattern: String,
    /// Gross margin (decimal string, e.g. `"0.92"`).
    pub margin: String,
}

/// List prices, in the plan currency, per 1M tokens of each kind and per request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListPriceBody {
    /// Model name pattern, e.g. `openai/gpt-4o*` (first match wins).
    pub pattern: String,
    /// Per 1M uncached prompt (and cache-write) tokens.
    pub prompt: String,
    /// Per 1M completion tokens.
    pub completion: String,
    /// Per 1M cached prompt tokens (default: the prompt price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<String>,
    /// Per 1M reasoning tokens (default: the completion price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Per request (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_request: Option<String>,
}

/// One volume tier.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierBody {
    /// Upper bound in units (tokens, or spend in the plan currency), inclusive; null for the
    /// last tier.
    pub up_to: Option<String>,
    /// Fraction off the price of the units in this tier (e.g. `"0.10"`).
    pub discount: String,
}

/// Volume tiers over the cycle's usage.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TiersBody {
    /// `tokens` or `spend`.
    pub metric: String,
    /// `graduated` (each tier's discount on the units inside it) or `volume` (the reached
    /// tier's discount on all units).
    pub mode: String,
    /// Tiers in ascending order; the last one unbounded.
    pub tiers: Vec<TierBody>,
}

/// A plan to create, or the fields of a plan to change (absent fields keep their value; a
/// change creates a new version effective from `effective_from`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    /// Create only: id (1–64 of `[A-Za-z0-9-_.:/@]`), generated as `plan_…` when absent.
    pub id: Option<String>,
    /// Display name (required on create).
    pub name: Option<String>,
    /// RFC 3339 instant the (new version of the) plan applies from; default now.
    pub effective_from: Option<String>,
    /// `USD`, `BRL` or `EUR` (required on create; cannot change).
    pub currency: Option<String>,
    /// `cost_plus` or `list` (required on create).
    pub kind: Option<String>,
    /// `cost_plus`: gross margin, e.g. `"0.9"`; null to remove.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub margin: Option<Option<String>>,
    /// `cost_plus`: margins for model patterns.
    pub model_margins: Option<Vec<ModelMarginBody>>,
    /// `list`: prices per model pattern.
    pub list_prices: Option<Vec<ListPriceBody>>,
    /// Optional volume tiers; null to remove.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<TiersBody>)]
    pub tiers: Option<Option<TiersBody>>,
    /// Credit included each cycle (plan currency).
    pub included_credits: Option<String>,
    /// Minimum charge each cycle (plan currency).
    pub monthly_minimum: Option<String>,
    /// No line is priced under this gross margin (default 0.87).
    pub margin_floor: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

fn parse_kind(s: &str) -> Result<PlanKind, ApiError> {
    match s {
        "cost_plus" => Ok(PlanKind::CostPlus),
        "list" => Ok(PlanKind::List),
        _ => Err(invalid("kind: must be \"cost_plus\" or \"list\"")),
    }
}

fn parse_currency(s: &str) -> Result<Currency, ApiError> {
    Currency::from_str(s).map_err(|e| invalid(format!("currency: {e}")))
}

fn parse_tiers(t: &TiersBody) -> Result<Tiers, ApiError> {
    let metric = match t.metric.as_str() {
        "tokens" => TierMetric::Tokens,
        "spend" => TierMetric::Spend,
        _ => return Err(invalid("tiers.metric: must be \"tokens\" or \"spend\"")),
    };
    let mode = match t.mode.as_str() {
        "graduated" => TierMode::Graduated,
        "volume" => TierMode::Volume,
        _ => return Err(invalid("tiers.mode: must be \"graduated\" or \"volume\"")),
    };
    let tiers = t
        .tiers
        .iter()
        .enumerate()
        .map(|(i, tier)| {
            Ok(Tier {
                up_to: opt_decimal(&format!("tiers.tiers[{i}].up_to"), tier.up_to.as_deref())?,
                discount: decimal(&format!("tiers.tiers[{i}].discount"), &tier.discount)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Tiers {
        metric,
        mode,
        tiers,
    })
}

impl PlanBody {
    /// Applies the body's fields over `base`.
    fn apply(&self, mut t: PlanTerms) -> Result<PlanTerms, ApiError> {
        if let Some(c) = &self.currency {
            t.currency = parse_currency(c)?;
        }
        if let Some(k) = &self.kind {
            t.kind = parse_kind(k)?;
        }
        if let Some(m) = &self.margin {
            t.margin = opt_decimal("margin", m.as_deref())?;
        }
        if let Some(list) = &self.model_margins {
            t.model_margins = list
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    Ok(ModelMargin {
                        pattern: m.pattern.clone(),
                        margin: decimal(&format!("model_margins[{i}].margin"), &m.margin)?,
                    })
                })
                .collect::<Result<_, ApiError>>()?;
        }
        if let Some(list) = &self.list_prices {
            t.list_prices = list
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let f = |n: &str| format!("list_prices[{i}].{n}");
                    Ok(ListPrice {
                        pattern: p.pattern.clone(),
                        prompt: decimal(&f("prompt"), &p.prompt)?,
                        completion: decimal(&f("completion"), &p.completion)?,
                        cached: opt_decimal(&f("cached"), p.cached.as_deref())?,
                        reasoning: opt_decimal(&f("reasoning"), p.reasoning.as_deref())?,
                        per_request: opt_decimal(&f("per_request"), p.per_request.as_deref())?
                            .unwrap_or(Decimal::ZERO),
                    })
                })
                .collect::<Result<_, ApiError>>()?;
        }
        if let Some(tiers) = &self.tiers {
            t.tiers = tiers.as_ref().map(parse_tiers).transpose()?;
        }
        if let Some(v) = &self.included_credits {
            t.included_credits = decimal("included_credits", v)?;
        }
        if let Some(v) = &self.monthly_minimum {
            t.monthly_minimum = decimal("monthly_minimum", v)?;
        }
        if let Some(v) = &self.margin_floor {
            t.margin_floor = decimal("margin_floor", v)?;
        }
        Ok(t)
    }
}

/// A version of a plan, as listed in its history.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanVersionOut {
    /// 1, 2, …
    pub version: i64,
    /// Name of that version.
    pub name: String,
    /// First instant it applies.
    pub effective_from: DateTime<Utc>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A plan: the version in force now, and its history.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanOut {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The version shown.
    pub version: i64,
    /// It applies from.
    pub effective_from: DateTime<Utc>,
    /// Currency.
    pub currency: String,
    /// `cost_plus` or `list`.
    pub kind: String,
    /// Cost-plus margin.
    pub margin: Option<String>,
    /// Cost-plus margins per model pattern.
    pub model_margins: Vec<ModelMarginBody>,
    /// List prices per model pattern (per 1M tokens).
    pub list_prices: Vec<ListPriceBody>,
    /// Volume tiers.
    pub tiers: Option<TiersBody>,
    /// Included credit per cycle.
    pub included_credits: String,
    /// Minimum per cycle.
    pub monthly_minimum: String,
    /// Margin floor.
    pub margin_floor: String,
    /// Every version, oldest first.
    pub versions: Vec<PlanVersionOut>,
}

/// The API shape of a plan.
pub fn plan_out(view: PlanView) -> PlanOut {
    let v = view.current;
    let t = v.terms;
    PlanOut {
        id: v.plan_id,
        name: v.name,
        version: v.version,
        effective_from: v.effective_from,
        currency: t.currency.code().into(),
        kind: match t.kind {
            PlanKind::CostPlus => "cost_plus",
            PlanKind::List => "list",
        }
        .into(),
        margin: t.margin.map(|m| m.to_string()),
        model_margins: t
            .model_margins
            .into_iter()
            .map(|m| ModelMarginBody {
                pattern: m.pattern,
                margin: m.margin.to_string(),
            })
            .collect(),
        list_prices: t
            .list_prices
            .into_iter()
            .map(|p| ListPriceBody {
                pattern: p.pattern,
                prompt: p.prompt.to_string(),
                completion: p.completion.to_string(),
                cached: p.cached.map(|d| d.to_string()),
                reasoning: p.reasoning.map(|d| d.to_string()),
                per_request: Some(p.per_request.to_string()),
            })
            .collect(),
        tiers: t.tiers.map(|t| TiersBody {
            metric: match t.metric {
                TierMetric::Tokens => "tokens",
                TierMetric::Spend => "spend",
            }
            .into(),
            mode: match t.mode {
                TierMode::Graduated => "graduated",
                TierMode::Volume => "volume",
            }
            .into(),
            tiers: t
                .tiers
                .into_iter()
                .map(|t| TierBody {
                    up_to: t.up_to.map(|d| d.to_string()),
                    discount: t.discount.to_string(),
                })
                .collect(),
        }),
        included_credits: t.included_credits.to_string(),
        monthly_minimum: t.monthly_minimum.to_string(),
        margin_floor: t.margin_floor.to_string(),
        versions: view
            .versions
            .into_iter()
            .map(|v: PlanVersionRecord| PlanVersionOut {
                version: v.version,
                name: v.name,
                effective_from: v.effective_from,
                created_at: v.created_at,
            })
            .collect(),
    }
}

/// Plan list.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    /// Plans by id.
    pub data: Vec<PlanOut>,
}

/// Creates a plan.
#[utoipa::path(post, path = "/v1/plans", tag = "pricing", request_body = PlanBody,
    responses((status = 201, body = PlanOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_plan(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(body): ApiJson<PlanBody>,
) -> Result<(StatusCode, ApiJson<PlanOut>), ApiError> {
    let out = create_plan_with(&state.fatura, body, state.fatura.now()).await?;
    Ok((StatusCode::CREATED, ApiJson(out)))
}

/// Creates a plan from a request body (shared by the API and the CLI).
pub async fn create_plan_with(
    fatura: &Fatura,
    body: PlanBody,
    now: DateTime<Utc>,
) -> Result<PlanOut, ApiError> {
    let name = body.name.clone().ok_or_else(|| invalid("name: required"))?;
    let currency = parse_currency(
        body.currency
            .as_deref()
            .ok_or_else(|| invalid("currency: required"))?,
    )?;
    let kind = parse_kind(
        body.kind
            .as_deref()
            .ok_or_else(|| invalid("kind: required"))?,
    )?;
    let mut base = PlanTerms::default_for(currency, fatura.margin());
    base.kind = kind;
    base.margin = None;
    let terms = body.apply(base)?;
    let effective_from = instant("effective_from", body.effective_from.as_deref())?.unwrap_or(now);
    let view = fatura
        .create_plan(
            body.id.as_deref(),
            PlanInput {
                name,
                terms,
                effective_from,
            },
            now,
        )
        .await?;
    Ok(plan_out(view))
}

/// Lists plans (each as the version in force now).
#[utoipa::path(get, path = "/v1/plans", tag = "pricing",
    responses((status = 200, body = PlanList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_plans(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<ApiJson<PlanList>, ApiError> {
    let plans = state.fatura.plans(state.fatura.now()).await?;
    Ok(ApiJson(PlanList {
        data: plans.into_iter().map(plan_out).collect(),
    }))
}

/// One plan.
#[utoipa::path(get, path = "/v1/plans/{id}", tag = "pricing", params(("id" = String, Path, description = "Plan id")),
    responses((status = 200, body = PlanOut), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_plan(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<ApiJson<PlanOut>, ApiError> {
    let view = state.fatura.plan(&id, state.fatura.now()).await?;
    Ok(ApiJson(plan_out(view)))
}

/// Changes a plan: a new version with the given fields changed, effective from
/// `effective_from` (default now). Earlier periods keep the earlier version.
#[utoipa::path(patch, path = "/v1/plans/{id}", tag = "pricing", request_body = PlanBody,
    params(("id" = String, Path, description = "Plan id")),
    responses((status = 200, body = PlanOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_plan(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PlanBody>,
) -> Result<ApiJson<PlanOut>, ApiError> {
    Ok(ApiJson(
        update_plan_with(&state.fatura, &id, body, state.fatura.now()).await?,
    ))
}

/// Adds a plan version from a request body (shared by the API and the CLI).
pub async fn update_plan_with(
    fatura: &Fatura,
    id: &str,
    body: PlanBody,
    now: DateTime<Utc>,
) -> Result<PlanOut, ApiError> {
    if body.id.is_some() {
        return Err(invalid("id: a plan's id cannot change"));
    }
    let view = fatura.plan(id, now).await?;
    let latest = view
        .versions
        .iter()
        .max_by_key(|v| v.version)
        .unwrap_or(&view.current)
        .clone();
    let terms = body.apply(latest.terms.clone())?;
    let effective_from = instant("effective_from", body.effective_from.as_deref())?.unwrap_or(now);
    let view = fatura
        .update_plan(
            id,
            PlanInput {
                name: body.name.clone().unwrap_or(latest.name),
                terms,
                effective_from,
            },
            now,
        )
        .await?;
    Ok(plan_out(view))
}

// ---- exchange rates -----------------------------------------------------------------------

/// An exchange rate to record.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FxRateBody {
    /// `BRL` or `EUR`.
    pub currency: String,
    /// The day the rate applies from (`YYYY-MM-DD`).
    pub date: String,
    /// Units of `currency` per 1 USD (decimal string, e.g. `"5.4321"`).
    pub rate: String,
}

/// A stored exchange rate.
#[derive(Debug, Serialize, ToSchema)]
pub struct FxRateOut {
    /// Currency.
    pub currency: String,
    /// Day it applies from.
    pub date: NaiveDate,
    /// Units of `currency` per USD.
    pub rate: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

fn fx_out(r: FxRate) -> FxRateOut {
    FxRateOut {
        currency: r.currency.code().into(),
        date: r.date,
        rate: r.rate.to_string(),
        created_at: r.created_at,
    }
}

/// Rate list.
#[derive(Debug, Serialize, ToSchema)]
pub struct FxRateList {
    /// By currency and date.
    pub data: Vec<FxRateOut>,
}

/// Records the USD→currency rate of a day. Recording the same rate again is harmless;
/// another rate for a day that has one is refused (409): rates are history.
#[utoipa::path(post, path = "/v1/fx-rates", tag = "pricing", request_body = FxRateBody,
    responses((status = 201, body = FxRateOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn post_fx_rate(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(body): ApiJson<FxRateBody>,
) -> Result<(StatusCode, ApiJson<FxRateOut>), ApiError> {
    let currency = parse_currency(&body.currency)?;
    let date = NaiveDate::from_str(body.date.trim())
        .map_err(|_| invalid("date: must be a date such as \"2026-11-24\""))?;
    let rate = decimal("rate", &body.rate)?;
    let r = state
        .fatura
        .put_fx_rate(currency, date, rate, state.fatura.now())
        .await?;
    Ok((StatusCode::CREATED, ApiJson(fx_out(r))))
}

/// Query of `GET /v1/fx-rates`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FxQuery {
    /// Only this currency.
    pub currency: Option<String>,
}

/// Lists exchange rates.
#[utoipa::path(get, path = "/v1/fx-rates", tag = "pricing", params(FxQuery),
    responses((status = 200, body = FxRateList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_fx_rates(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<FxQuery>, QueryRejection>,
) -> Result<ApiJson<FxRateList>, ApiError> {
    let Query(q) = query?;
    let currency = q.currency.as_deref().map(parse_currency).transpose()?;
    let rates = state.fatura.fx_rates(currency).await?;
    Ok(ApiJson(FxRateList {
        data: rates.into_iter().map(fx_out).collect(),
    }))
}

// ---- alerts -------------------------------------------------------------------------------

/// An operator alert.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertOut {
    /// Id.
    pub id: String,
    /// `floor_applied` (a price was raised to the margin floor) or `margin_risk` (new
    /// catalog prices put a plan's price under its floor).
    pub kind: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// Customer concerned (the first one seen).
    pub customer_id: Option<String>,
    /// Plan concerned (`null`: the default plan).
    pub plan_id: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// `list_price_below_floor`, `no_list_price` or `tier_discount`.
    pub reason: Option<String>,
    /// For people.
    pub message: String,
    /// First raised.
    pub first_seen_at: DateTime<Utc>,
    /// Last raised.
    pub last_seen_at: DateTime<Utc>,
    /// Times raised.
    pub occurrences: i64,
}

/// Alert list.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    /// Most recently seen first.
    pub data: Vec<AlertOut>,
}

/// Operator alerts.
#[utoipa::path(get, path = "/v1/alerts", tag = "pricing",
    responses((status = 200, body = AlertList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_alerts(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<ApiJson<AlertList>, ApiError> {
    let alerts = state.fatura.alerts().await?;
    Ok(ApiJson(AlertList {
        data: alerts
            .into_iter()
            .map(|a: AlertRecord| AlertOut {
                id: a.id,
                kind: a.kind,
                severity: a.severity,
                customer_id: a.customer_id,
                plan_id: a.plan_id,
                provider: a.provider,
                model: a.model,
                reason: a.reason,
                message: a.message,
                first_seen_at: a.first_seen,
                last_seen_at: a.last_seen,
                occurrences: a.occurrences,
            })
            .collect(),
    }))
}

// ---- upcoming -----------------------------------------------------------------------------

/// Quantities of a line.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuantitiesOut {
    /// Uncached prompt tokens plus cache writes.
    pub prompt_tokens: u64,
    /// Cached prompt tokens read.
    pub cached_tokens: u64,
    /// Non-reasoning completion tokens.
    pub completion_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Requests.
    pub requests: u64,
}

/// One rated line: one model at one provider.
#[derive(Debug, Serialize, ToSchema)]
pub struct LineOut {
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Events on the line.
    pub events: u64,
    /// Quantities per token kind.
    pub quantities: QuantitiesOut,
    /// Amounts per token kind at the plan's prices (full precision).
    pub amounts_by_kind: std::collections::BTreeMap<String, String>,
    /// Usage at the plan's prices, rounded to minor units.
    pub subtotal: String,
    /// Volume discount taken off.
    pub discount: String,
    /// Raise to the margin floor.
    pub floor_adjustment: String,
    /// The line amount (minor units, half-even).
    pub amount: String,
    /// Why the floor was applied, if it was.
    pub floor_applied: Option<String>,
    /// USD→currency rate used.
    pub fx_rate: String,
    /// Operator only: upstream cost, USD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<String>,
    /// Operator only: gross margin of the line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin: Option<String>,
}

/// What one volume tier covered.
#[derive(Debug, Serialize, ToSchema)]
pub struct TierUsageOut {
    /// Upper bound.
    pub up_to: Option<String>,
    /// Discount rate.
    pub discount: String,
    /// Units in the tier.
    pub units: String,
    /// Discount the tier gave before floor caps.
    pub discount_amount: String,
}

/// A span of the cycle under one plan version.
#[derive(Debug, Serialize, ToSchema)]
pub struct SegmentOut {
    /// Start.
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Plan (`null`: the default plan).
    pub plan_id: Option<String>,
    /// Plan version.
    pub plan_version: Option<i64>,
    /// Share of the cycle (prorates credits and minimum).
    pub cycle_fraction: String,
    /// USD→currency rate used on every line.
    pub fx_rate: String,
    /// Lines by provider and model.
    pub lines: Vec<LineOut>,
    /// Volume tiers.
    pub tiers: Vec<TierUsageOut>,
    /// Sum of line amounts.
    pub usage_total: String,
    /// Included credits applied.
    pub included_credits_applied: String,
    /// Raise to the prorated monthly minimum.
    pub minimum_adjustment: String,
    /// Segment total.
    pub total: String,
    /// Events without a catalog price (not rated; see `/v1/usage/unpriced`).
    pub unpriced_events: u64,
}

/// The invoice the customer's current cycle would produce now.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpcomingOut {
    /// Customer.
    pub customer_id: String,
    /// Currency.
    pub currency: String,
    /// Cycle start.
    pub period_start: DateTime<Utc>,
    /// Cycle end (exclusive).
    pub period_end: DateTime<Utc>,
    /// Events recorded before this instant are included.
    pub as_of: DateTime<Utc>,
    /// One per plan version in force during the cycle.
    pub segments: Vec<SegmentOut>,
    /// Total so far.
    pub total: String,
}

fn line_out(l: RatedLine, fx: Decimal, operator: bool) -> LineOut {
    let margin = (operator && !l.amount_exact.is_zero()).then(|| {
        (Decimal::ONE - l.cost_usd * fx / l.amount_exact)
            .round_dp(6)
            .to_string()
    });
    let k = l.by_kind;
    let amounts_by_kind = [
        ("prompt", k.prompt),
        ("cached", k.cached),
        ("completion", k.completion),
        ("reasoning", k.reasoning),
        ("requests", k.requests),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v.normalize().to_string()))
    .collect();
    LineOut {
        provider: l.provider,
        model: l.model,
        events: l.events,
        quantities: QuantitiesOut {
            prompt_tokens: l.quantities.prompt_tokens,
            cached_tokens: l.quantities.cached_tokens,
            completion_tokens: l.quantities.completion_tokens,
            reasoning_tokens: l.quantities.reasoning_tokens,
            requests: l.quantities.requests,
        },
        amounts_by_kind,
        subtotal: l.subtotal.to_string(),
        discount: l.discount.to_string(),
        floor_adjustment: l.floor_adjustment.to_string(),
        amount: l.amount.to_string(),
        floor_applied: l.floor_applied.map(|r| r.as_str().into()),
        fx_rate: fx.to_string(),
        cost_usd: operator.then(|| l.cost_usd.normalize().to_string()),
        margin,
    }
}

fn segment_out(s: RatedSegment, operator: bool) -> SegmentOut {
    let fx = s.fx_rate;
    SegmentOut {
        from: s.segment.from,
        to: s.segment.to,
        plan_id: s.segment.plan_id,
        plan_version: s.segment.plan_version,
        cycle_fraction: s
            .segment
            .cycle_fraction
            .round_dp(12)
            .normalize()
            .to_string(),
        fx_rate: fx.to_string(),
        lines: s
            .lines
            .into_iter()
            .map(|l| line_out(l, fx, operator))
            .collect(),
        tiers: s
            .tiers
            .into_iter()
            .map(|t| TierUsageOut {
                up_to: t.up_to.map(|d| d.to_string()),
                discount: t.discount.to_string(),
                units: t.units.normalize().to_string(),
                discount_amount: t.discount_amount.normalize().to_string(),
            })
            .collect(),
        usage_total: s.usage_total.to_string(),
        included_credits_applied: s.included_credits_applied.to_string(),
        minimum_adjustment: s.minimum_adjustment.to_string(),
        total: s.total.to_string(),
        unpriced_events: s.unpriced_events,
    }
}

fn upcoming_out(u: Upcoming, operator: bool) -> UpcomingOut {
    UpcomingOut {
        customer_id: u.customer_id,
        currency: u.currency.code().into(),
        period_start: u.period_start,
        period_end: u.period_end,
        as_of: u.as_of,
        segments: u
            .segments
            .into_iter()
            .map(|s| segment_out(s, operator))
            .collect(),
        total: u.total.to_string(),
    }
}

/// Query of `GET /v1/customers/{id}/upcoming`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UpcomingQuery {
    /// RFC 3339 instant to preview at (default now): the cycle containing it, with the
    /// events recorded before it.
    pub at: Option<String>,
}

/// The invoice the customer's current cycle would produce now. A customer key may read its
/// own; operator-only detail (cost, margin) is shown to the admin only.
#[utoipa::path(get, path = "/v1/customers/{id}/upcoming", tag = "pricing", params(("id" = String, Path, description = "Customer id"), UpcomingQuery),
    responses((status = 200, body = UpcomingOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_upcoming(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<UpcomingQuery>, QueryRejection>,
) -> Result<ApiJson<UpcomingOut>, ApiError> {
    let Query(q) = query?;
    caller.scope_customer(Some(id.clone()))?;
    let at = instant("at", q.at.as_deref())?.unwrap_or_else(Utc::now);
    let u = state.fatura.upcoming(&id, at).await?;
    Ok(ApiJson(upcoming_out(u, matches!(caller, Caller::Admin))))
}

// ---- catalog changes ----------------------------------------------------------------------

/// Query of `GET /v1/prices/changes`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    /// RFC 3339: versions imported at or after this instant (default: all).
    pub since: Option<String>,
}

/// One catalog change: the new version and the one it follows (null for a new model).
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceChangeOut {
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// `new_model` or `price_change`.
    pub change: String,
    /// The previous version.
    pub old: Option<PriceOut>,
    /// The new version.
    pub new: PriceOut,
}

/// A plan's margin on one token kind of a changed model.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindMarginOut {
    /// `prompt`, `completion`, `cache_read`, `cache_write`, `reasoning` or `request`.
    pub kind: String,
    /// Upstream cost per 1M units, plan currency.
    pub cost_per_million: String,
    /// Plan price per 1M units before the floor.
    pub price_per_million: String,
    /// Gross margin at that price (null: priced at zero).
    pub margin: Option<String>,
    /// Gross margin at the deepest volume tier discount.
    pub margin_at_deepest_tier: Option<String>,
}

/// What a changed model does to one plan's margin, without floor protection.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarginImpactOut {
    /// Plan.
    pub plan_id: String,
    /// Its version in force now.
    pub plan_version: i64,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// The plan's floor.
    pub margin_floor: String,
    /// Lowest margin over the kinds, at the deepest tier.
    pub worst_margin: Option<String>,
    /// True when a line would fall under the floor without protection (the engine raises it
    /// to the floor and alerts).
    pub below_floor: bool,
    /// Why: `list_price_below_floor`, `no_list_price` or `tier_discount`.
    pub reason: Option<String>,
    /// Per token kind.
    pub kinds: Vec<KindMarginOut>,
}

/// A plan that could not be assessed.
#[derive(Debug, Serialize, ToSchema)]
pub struct SkippedPlanOut {
    /// Plan.
    pub plan_id: String,
    /// Why.
    pub reason: String,
}

/// Catalog changes and their margin impact.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceChangesOut {
    /// The `since` used.
    pub since: Option<DateTime<Utc>>,
    /// Changes by provider and model.
    pub changes: Vec<PriceChangeOut>,
    /// Plans × changed models whose margin the change affects (list plans: every model they
    /// price; cost-plus plans: where a tier discount would cross the floor).
    pub margin_impact: Vec<MarginImpactOut>,
    /// Plans not assessed.
    pub skipped_plans: Vec<SkippedPlanOut>,
}

fn pct(d: Decimal) -> String {
    d.round_dp(6).normalize().to_string()
}

fn impact_out(m: MarginImpact) -> MarginImpactOut {
    MarginImpactOut {
        plan_id: m.plan_id,
        plan_version: m.plan_version,
        provider: m.provider,
        model: m.model,
        margin_floor: m.margin_floor.to_string(),
        worst_margin: m.worst_margin.map(pct),
        below_floor: m.below_floor,
        reason: m.reason.map(|r| r.as_str().into()),
        kinds: m
            .kinds
            .into_iter()
            .map(|k| KindMarginOut {
                kind: k.kind.into(),
                cost_per_million: k.cost_per_million.normalize().to_string(),
                price_per_million: k.price_per_million.normalize().to_string(),
                margin: k.margin.map(pct),
                margin_at_deepest_tier: k.margin_at_deepest_tier.map(pct),
            })
            .collect(),
    }
}

/// What changed in the catalog (model, old and new prices), and which plans' lines would now
/// fall under their margin floor without protection. Each plan and model under its floor
/// also raises a `margin_risk` alert.
#[utoipa::path(get, path = "/v1/prices/changes", tag = "prices", params(ChangesQuery),
    responses((status = 200, body = PriceChangesOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_price_changes(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<ApiJson<PriceChangesOut>, ApiError> {
    let Query(q) = query?;
    let since = instant("since", q.since.as_deref())?;
    let PriceChanges {
        changes,
        impact,
        skipped_plans,
    } = state
        .fatura
        .price_changes(
            since.unwrap_or(DateTime::<Utc>::MIN_UTC),
            state.fatura.now(),
        )
        .await?;
    Ok(ApiJson(PriceChangesOut {
        since,
        changes: changes
            .into_iter()
            .map(|c| PriceChangeOut {
                provider: c.new.provider.clone(),
                model: c.new.model.clone(),
                change: if c.old.is_some() {
                    "price_change"
                } else {
                    "new_model"
                }
                .into(),
                old: c.old.map(Into::into),
                new: c.new.into(),
            })
            .collect(),
        margin_impact: impact.into_iter().map(impact_out).collect(),
        skipped_plans: skipped_plans
            .into_iter()
            .map(|(plan_id, reason)| SkippedPlanOut { plan_id, reason })
            .collect(),
    }))
}
