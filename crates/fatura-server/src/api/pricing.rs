//! The pricing engine over HTTP: plans, exchange rates, alerts, the upcoming-invoice preview
//! and catalog change reports. Money and rates are decimal strings.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use fatura_core::rating::{RatedLine, RatedSegment};
use fatura_store::{AlertRecord, FxRate};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};

use super::prices::{PriceOut, instant};
use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};
pub use crate::plans::{
    ListPriceBody, ModelMarginBody, PlanBody, PlanList, PlanOut, PlanVersionOut, TierBody,
    TiersBody, create_plan_with, plan_out, update_plan_with,
};
use crate::plans::{decimal, invalid, parse_currency};
use crate::service::{MarginImpact, PriceChanges, Upcoming};

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
