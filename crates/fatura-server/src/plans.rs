//! The plan document: the JSON shape of a plan (`PlanBody` in, `PlanOut` out) that both
//! the API (`/v1/plans`) and the CLI's plan files (`fatura plans create|update FILE`) speak,
//! and the two operations on it. Not handlers: the CLI and the demo call these directly,
//! so both accept exactly what the API accepts.

use chrono::{DateTime, Utc};
use fatura_core::Currency;
use fatura_core::rating::{
    ListPrice, ModelMargin, PlanKind, PlanTerms, Tier, TierMetric, TierMode, Tiers,
};
use fatura_store::PlanVersionRecord;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::ToSchema;

use crate::api::prices::instant;
use crate::error::ApiError;
use crate::service::{Fatura, PlanInput, PlanView};

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable("invalid_request", message, Vec::new())
}

pub(crate) fn decimal(field: &str, s: &str) -> Result<Decimal, ApiError> {
    Decimal::from_str(s.trim())
        .map_err(|_| invalid(format!("{field}: must be a decimal string such as \"0.9\"")))
}

pub(crate) fn opt_decimal(field: &str, s: Option<&str>) -> Result<Option<Decimal>, ApiError> {
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

pub(crate) fn parse_currency(s: &str) -> Result<Currency, ApiError> {
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
