//! Rating: what a customer pays for its usage under a plan.
//!
//! Rating is a pure function of the events (with their catalog cost), the plan versions in
//! force, and the exchange rate; it reads no clock and depends on no input order.
//!
//! ## Plans
//! A plan ([`PlanTerms`]) has a currency and one of two kinds:
//! * `cost_plus` — price = cost × fx / (1 − margin), with an optional margin per model pattern;
//! * `list` — a price per model pattern per 1M tokens of each kind and per request.
//!
//! plus optional volume [`Tiers`], included credits and a monthly minimum, and a margin floor
//! (0.87 by default).
//!
//! ## Lines and the margin floor
//! A period's events are grouped into one line per `(provider, model)`. A line's
//! `subtotal` is its usage at the plan's prices; the tier `discount` is taken off; the result
//! is then checked against the line's floor price, `cost × fx / (1 − floor)`. When it is
//! below, the line is raised to the floor and records why ([`FloorReason`]). Volume
//! discounts therefore never cross the floor.
//!
//! ## Volume tiers
//! Tiers count the period's units — tokens (input + output) or spend (the subtotal in the
//! plan currency). In `volume` mode the tier reached by the period's total applies to all
//! units. In `graduated` mode each tier's discount applies to the units inside it; to say
//! which units those are, events are ordered by their price per unit, **dearest first**
//! (then by timestamp and id), so the first, least discounted tiers fill with the dearest
//! units. This order makes the charge depend on the usage only (not on the order events
//! arrive in) and makes the total monotone: more usage never costs less.
//!
//! ## Rounding
//! Amounts are carried at full precision (derived ones rounded to ledger precision, 18
//! places, by [`round_ledger`]). Each line amount is rounded once to minor units, half to
//! even; included credits and the minimum are rounded once; the total is the exact sum of
//! those rounded amounts. Currency conversion multiplies the exact USD amount by the rate and
//! is rounded only with the line: it is never rounded in USD first.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::costing::CostBreakdown;
use crate::event::TokenUsage;
use crate::money::{Currency, MarginRate, Money, round_ledger};

/// Why rating failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatingError {
    /// An amount does not fit a decimal.
    #[error("amount overflow while rating")]
    Overflow,
    /// No exchange rate is known for the date.
    #[error("no USD→{currency} exchange rate on or before {date}; add one with POST /v1/fx-rates")]
    NoFxRate {
        /// Target currency.
        currency: Currency,
        /// The date a rate was needed for.
        date: NaiveDate,
    },
}

/// An invalid plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PlanError {
    /// The offending field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn plan_err(field: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError {
        field: field.into(),
        message: message.into(),
    }
}

/// How a plan prices usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// price = cost / (1 − margin).
    CostPlus,
    /// A price per model per 1M tokens.
    List,
}

/// What volume tiers count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMetric {
    /// Input + output tokens.
    Tokens,
    /// The subtotal in the plan currency.
    Spend,
}

/// How tier discounts apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// Each tier's discount applies to the units inside it.
    Graduated,
    /// The reached tier's discount applies to all units.
    Volume,
}

/// One volume tier: units up to `up_to` (inclusive; `None` = no upper bound) get `discount`
/// (a fraction of the price, 0 ≤ discount < 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// Upper bound of the tier in units, inclusive; `null` for the last tier.
    pub up_to: Option<Decimal>,
    /// Fraction taken off the price of units in this tier.
    pub discount: Decimal,
}

/// Volume tiers over a period's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiers {
    /// What is counted.
    pub metric: TierMetric,
    /// How discounts apply.
    pub mode: TierMode,
    /// Tiers in ascending order; the last has no upper bound.
    pub tiers: Vec<Tier>,
}

/// A cost-plus margin for models matching a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMargin {
    /// Model name pattern (`*` matches any run of characters).
    pub pattern: String,
    /// Gross margin for matching models.
    pub margin: Decimal,
}

/// List prices, in the plan currency, for models matching a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPrice {
    /// Model name pattern (`*` matches any run of characters).
    pub pattern: String,
    /// Per 1M uncached prompt tokens (and cache-write tokens).
    pub prompt: Decimal,
    /// Per 1M completion tokens.
    pub completion: Decimal,
    /// Per 1M cached prompt tokens; the prompt price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<Decimal>,
    /// Per 1M reasoning tokens; the completion price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Decimal>,
    /// Per request.
    #[serde(default)]
    pub per_request: Decimal,
}

/// The terms of one plan version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTerms {
    /// Currency the plan bills in.
    pub currency: Currency,
    /// `cost_plus` or `list`.
    pub kind: PlanKind,
    /// `cost_plus`: the gross margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<Decimal>,
    /// `cost_plus`: margins for model patterns (first match wins).
    #[serde(default)]
    pub model_margins: Vec<ModelMargin>,
    /// `list`: prices per model pattern (first match wins).
    #[serde(default)]
    pub list_prices: Vec<ListPrice>,
    /// Optional volume tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Tiers>,
    /// Credit included each cycle, in the plan currency.
    #[serde(default)]
    pub included_credits: Decimal,
    /// Minimum charge each cycle, in the plan currency.
    #[serde(default)]
    pub monthly_minimum: Decimal,
    /// No line is priced under this gross margin.
    pub margin_floor: Decimal,
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Largest amount (credits, minimum, tier bound) a plan accepts.
const MAX_PLAN_AMOUNT: i64 = 1_000_000_000_000;
/// Most tiers or patterns in a plan.
const MAX_PLAN_ENTRIES: usize = 200;

fn check_pattern(field: &str, p: &str) -> Result<(), PlanError> {
    if p.is_empty() || p.len() > 200 || p.chars().any(char::is_control) {
        return Err(plan_err(
            field,
            "must be 1 to 200 characters without control characters",
        ));
    }
    Ok(())
}

fn check_margin(field: &str, m: Decimal, floor: Decimal) -> Result<(), PlanError> {
    MarginRate::new(m).map_err(|e| plan_err(field, e.to_string()))?;
    if m < floor {
        return Err(plan_err(
            field,
            format!("{m} is below the plan's margin floor {floor}"),
        ));
    }
    Ok(())
}

fn check_amount(field: &str, a: Decimal, max_scale: u32) -> Result<(), PlanError> {
    if a.is_sign_negative() && !a.is_zero() {
        return Err(plan_err(field, "must not be negative"));
    }
    if a.normalize().scale() > max_scale {
        return Err(plan_err(
            field,
            format!("at most {max_scale} decimal places"),
        ));
    }
    if a > Decimal::from(MAX_PLAN_AMOUNT) {
        return Err(plan_err(
            field,
            format!("must be at most {MAX_PLAN_AMOUNT}"),
        ));
    }
    Ok(())
}

impl PlanTerms {
    /// The plan used for customers without one: cost-plus at `margin`, floor `margin`.
    pub fn default_for(currency: Currency, margin: MarginRate) -> Self {
        PlanTerms {
            currency,
            kind: PlanKind::CostPlus,
            margin: Some(margin.value()),
            model_margins: Vec::new(),
            list_prices: Vec::new(),
            tiers: None,
            included_credits: Decimal::ZERO,
            monthly_minimum: Decimal::ZERO,
            margin_floor: margin.value(),
        }
    }

    /// Checks the plan is coherent; returns the first problem.
    pub fn validate(&self) -> Result<(), PlanError> {
        let floor = self.margin_floor;
        MarginRate::new(floor).map_err(|e| plan_err("margin_floor", e.to_string()))?;
        if self.model_margins.len() > MAX_PLAN_ENTRIES || self.list_prices.len() > MAX_PLAN_ENTRIES
        {
            return Err(plan_err(
                "list_prices",
                format!("at most {MAX_PLAN_ENTRIES} entries"),
            ));
        }
        match self.kind {
            PlanKind::CostPlus => {
                let Some(m) = self.margin else {
                    return Err(plan_err("margin", "required for a cost_plus plan"));
                };
                check_margin("margin", m, floor)?;
                for (i, mm) in self.model_margins.iter().enumerate() {
                    check_pattern(&format!("model_margins[{i}].pattern"), &mm.pattern)?;
                    check_margin(&format!("model_margins[{i}].margin"), mm.margin, floor)?;
                }
                if !self.list_prices.is_empty() {
                    return Err(plan_err(
                        "list_prices",
                        "only for list plans; a cost_plus plan prices by margin",
                    ));
                }
            }
            PlanKind::List => {
                if self.margin.is_some() || !self.model_margins.is_empty() {
                    return Err(plan_err(
                        "margin",
                        "only for cost_plus plans; a list plan prices by list_prices",
                    ));
                }
                if self.list_prices.is_empty() {
                    return Err(plan_err(
                        "list_prices",
                        "a list plan needs at least one price",
                    ));
                }
                for (i, lp) in self.list_prices.iter().enumerate() {
                    let f = |name: &str| format!("list_prices[{i}].{name}");
                    check_pattern(&f("pattern"), &lp.pattern)?;
                    check_amount(&f("prompt"), lp.prompt, 12)?;
                    check_amount(&f("completion"), lp.completion, 12)?;
                    if let Some(c) = lp.cached {
                        check_amount(&f("cached"), c, 12)?;
                    }
                    if let Some(r) = lp.reasoning {
                        check_amount(&f("reasoning"), r, 12)?;
                    }
                    check_amount(&f("per_request"), lp.per_request, 12)?;
                }
            }
        }
        if let Some(t) = &self.tiers {
            if t.tiers.is_empty() || t.tiers.len() > MAX_PLAN_ENTRIES {
                return Err(plan_err(
                    "tiers.tiers",
                    format!("1 to {MAX_PLAN_ENTRIES} tiers"),
                ));
            }
            let mut prev_bound = Decimal::ZERO;
            let mut prev_discount = Decimal::ZERO;
            let last = t.tiers.len() - 1;
            for (i, tier) in t.tiers.iter().enumerate() {
                let f = |name: &str| format!("tiers.tiers[{i}].{name}");
                if tier.discount.is_sign_negative() || tier.discount >= Decimal::ONE {
                    return Err(plan_err(
                        f("discount"),
                        "must be at least 0 and less than 1",
                    ));
                }
                if tier.discount < prev_discount {
                    return Err(plan_err(
                        f("discount"),
                        "must not be smaller than the previous tier's: more volume never costs more per unit",
                    ));
                }
                prev_discount = tier.discount;
                match (tier.up_to, i == last) {
                    (None, true) => {}
                    (None, false) => {
                        return Err(plan_err(f("up_to"), "only the last tier is unbounded"));
                    }
                    (Some(_), true) => {
                        return Err(plan_err(
                            f("up_to"),
                            "the last tier must be unbounded (null) so every unit has a tier",
                        ));
                    }
                    (Some(b), false) => {
                        check_amount(&f("up_to"), b, 2)?;
                        if b <= prev_bound {
                            return Err(plan_err(
                                f("up_to"),
                                "bounds must be positive and strictly increasing",
                            ));
                        }
                        prev_bound = b;
                    }
                }
            }
        }
        let minor = self.currency.minor_units();
        check_amount("included_credits", self.included_credits, minor)?;
        check_amount("monthly_minimum", self.monthly_minimum, minor)?;
        Ok(())
    }

    fn margin_for(&self, model: &str) -> Decimal {
        self.model_margins
            .iter()
            .find(|m| pattern_matches(&m.pattern, model))
            .map(|m| m.margin)
            .or(self.margin)
            .unwrap_or(self.margin_floor)
    }

    fn list_price_for(&self, model: &str) -> Option<&ListPrice> {
        self.list_prices
            .iter()
            .find(|p| pattern_matches(&p.pattern, model))
    }
}

/// True when `model` matches `pattern`, where `*` matches any run of characters (including
/// none) and every other character matches itself.
pub fn pattern_matches(pattern: &str, model: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return model.is_empty();
    };
    let Some(mut rest) = model.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Why a line was raised to its floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FloorReason {
    /// The list price is under the floor at the current upstream cost (a list price set too
    /// low, or an upstream price rise, or a fallback to a pricier model).
    ListPriceBelowFloor,
    /// The list plan has no price for the model.
    NoListPrice,
    /// A volume tier discount would have taken the line under the floor.
    TierDiscount,
}

impl FloorReason {
    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FloorReason::ListPriceBelowFloor => "list_price_below_floor",
            FloorReason::NoListPrice => "no_list_price",
            FloorReason::TierDiscount => "tier_discount",
        }
    }

    /// A sentence for operators.
    pub fn describe(self) -> &'static str {
        match self {
            FloorReason::ListPriceBelowFloor => {
                "the list price is below the margin floor at the current upstream cost"
            }
            FloorReason::NoListPrice => "the list plan has no price for this model",
            FloorReason::TierDiscount => {
                "a volume tier discount would take the price below the margin floor"
            }
        }
    }
}

/// Usage amounts of one token kind in the plan currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindAmounts {
    /// Uncached prompt tokens and cache writes.
    pub prompt: Decimal,
    /// Cached prompt tokens read.
    pub cached: Decimal,
    /// Non-reasoning completion tokens.
    pub completion: Decimal,
    /// Reasoning tokens.
    pub reasoning: Decimal,
    /// Per-request fees.
    pub requests: Decimal,
}

impl KindAmounts {
    fn total(&self) -> Decimal {
        self.prompt + self.cached + self.completion + self.reasoning + self.requests
    }
}

fn mul(a: Decimal, b: Decimal) -> Result<Decimal, RatingError> {
    a.checked_mul(b).ok_or(RatingError::Overflow)
}

fn div(a: Decimal, b: Decimal) -> Result<Decimal, RatingError> {
    a.checked_div(b).ok_or(RatingError::Overflow)
}

fn add(a: Decimal, b: Decimal) -> Result<Decimal, RatingError> {
    a.checked_add(b).ok_or(RatingError::Overflow)
}

fn per_million(count: u64, price: Decimal) -> Result<Decimal, RatingError> {
    div(mul(Decimal::from(count), price)?, Decimal::from(1_000_000))
}

/// Base amounts (before tiers and floor) of usage on `model` with catalog cost `cost`, in
/// the plan currency, by kind; `None` for a list plan without a price for the model.
fn base_amounts(
    terms: &PlanTerms,
    model: &str,
    usage: &TokenUsage,
    cost: &CostBreakdown,
    fx: Decimal,
) -> Result<Option<KindAmounts>, RatingError> {
    match terms.kind {
        PlanKind::CostPlus => {
            let factor = div(fx, Decimal::ONE - terms.margin_for(model))?;
            let f = |c: Decimal| mul(c, factor).map(round_ledger);
            Ok(Some(KindAmounts {
                prompt: f(cost.prompt + cost.cache_write)?,
                cached: f(cost.cache_read)?,
                completion: f(cost.completion)?,
                reasoning: f(cost.reasoning)?,
                requests: f(cost.requests)?,
            }))
        }
        PlanKind::List => {
            let Some(lp) = terms.list_price_for(model) else {
                return Ok(None);
            };
            Ok(Some(KindAmounts {
                prompt: per_million(usage.uncached_input() + usage.cache_write(), lp.prompt)?,
                cached: per_million(usage.cached_input(), lp.cached.unwrap_or(lp.prompt))?,
                completion: per_million(usage.non_reasoning_output(), lp.completion)?,
                reasoning: per_million(usage.reasoning(), lp.reasoning.unwrap_or(lp.completion))?,
                requests: mul(Decimal::from(usage.requests()), lp.per_request)?,
            }))
        }
    }
}

/// The floor price of `cost` (USD) in the plan currency: `cost × fx / (1 − floor)`.
fn floor_price(terms: &PlanTerms, cost_usd: Decimal, fx: Decimal) -> Result<Decimal, RatingError> {
    div(mul(cost_usd, fx)?, Decimal::ONE - terms.margin_floor).map(round_ledger)
}

/// The price of one call or event on its own (no volume discount), as the gateway reserves
/// and charges it and `/v1/models` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuote {
    /// What the customer pays, plan currency, ledger precision.
    pub amount: Decimal,
    /// Set when the price was raised to the floor.
    pub floor_applied: Option<FloorReason>,
}

/// Prices usage on its own under `terms`: the plan price, raised to the floor if under it.
/// `fx` converts USD to the plan currency (1 for USD).
pub fn quote_usage(
    terms: &PlanTerms,
    model: &str,
    usage: &TokenUsage,
    cost: &CostBreakdown,
    fx: Decimal,
) -> Result<UsageQuote, RatingError> {
    let floor = floor_price(terms, cost.total(), fx)?;
    let (base, reason) = match base_amounts(terms, model, usage, cost, fx)? {
        Some(k) => (round_ledger(k.total()), FloorReason::ListPriceBelowFloor),
        None => (Decimal::ZERO, FloorReason::NoListPrice),
    };
    Ok(if base < floor || (reason == FloorReason::NoListPrice) {
        UsageQuote {
            amount: floor,
            floor_applied: Some(reason),
        }
    } else {
        UsageQuote {
            amount: base,
            floor_applied: None,
        }
    })
}

/// The exchange rate for `date` from `rates` (sorted by date): the latest dated on or before
/// it. USD always converts at 1.
pub fn fx_rate_on(
    currency: Currency,
    rates: &[(NaiveDate, Decimal)],
    date: NaiveDate,
) -> Result<Decimal, RatingError> {
    if currency == Currency::Usd {
        return Ok(Decimal::ONE);
    }
    let i = rates.partition_point(|(d, _)| *d <= date);
    match i.checked_sub(1).and_then(|i| rates.get(i)) {
        Some((_, r)) => Ok(*r),
        None => Err(RatingError::NoFxRate { currency, date }),
    }
}

/// One event as rating sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatableEvent {
    /// Event id (tie-breaker for a fixed order).
    pub id: String,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Counts.
    pub usage: TokenUsage,
    /// Catalog cost by kind, USD; `None` for unpriced events (not rated).
    pub cost: Option<CostBreakdown>,
}

/// Quantities of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Quantities {
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

/// One rated line: the usage of one model at one provider within a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedLine {
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Events on the line.
    pub events: u64,
    /// Quantities.
    pub quantities: Quantities,
    /// Amounts by kind at the plan's prices (plan currency, ledger precision).
    pub by_kind: KindAmounts,
    /// Usage at the plan's prices, before tiers and floor, ledger precision.
    pub subtotal_exact: Decimal,
    /// Tier discount before the floor cap, ledger precision.
    pub tier_discount_exact: Decimal,
    /// Floor price, ledger precision.
    pub floor_exact: Decimal,
    /// `max(subtotal − discount, floor)`, ledger precision.
    pub amount_exact: Decimal,
    /// Subtotal rounded to minor units.
    pub subtotal: Decimal,
    /// What the tiers took off (rounded subtotal − amount, when positive).
    pub discount: Decimal,
    /// What the floor added (amount − rounded subtotal, when positive).
    pub floor_adjustment: Decimal,
    /// The line amount, rounded once to minor units.
    pub amount: Decimal,
    /// Upstream cost, USD (operator-only).
    pub cost_usd: Decimal,
    /// Why the floor was applied.
    pub floor_applied: Option<FloorReason>,
}

/// What one tier covered in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierUsage {
    /// Tier index (0-based).
    pub index: usize,
    /// Upper bound.
    pub up_to: Option<Decimal>,
    /// Discount rate.
    pub discount: Decimal,
    /// Units in the tier.
    pub units: Decimal,
    /// Discount the tier gave before floor caps (plan currency, ledger precision).
    pub discount_amount: Decimal,
}

/// A span of the period under one plan version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Start (inclusive).
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Plan id, `None` for the default plan.
    pub plan_id: Option<String>,
    /// Plan version, `None` for the default plan.
    pub plan_version: Option<i64>,
    /// The terms.
    pub terms: PlanTerms,
    /// Share of the whole cycle this segment covers (prorates credits and minimum).
    pub cycle_fraction: Decimal,
}

/// A rated segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedSegment {
    /// The segment.
    pub segment: Segment,
    /// The USD→plan currency rate used on every line.
    pub fx_rate: Decimal,
    /// Lines by (provider, model).
    pub lines: Vec<RatedLine>,
    /// Tier usage (empty without tiers).
    pub tiers: Vec<TierUsage>,
    /// Units counted for tiers.
    pub tier_units: Decimal,
    /// Sum of line amounts.
    pub usage_total: Decimal,
    /// Included credits applied (prorated, at most the usage).
    pub included_credits_applied: Decimal,
    /// Raise to the prorated minimum.
    pub minimum_adjustment: Decimal,
    /// usage − credits + minimum adjustment.
    pub total: Decimal,
    /// Events without a catalog cost, left out.
    pub unpriced_events: u64,
}

fn round_minor(amount: Decimal, currency: Currency) -> Decimal {
    Money::new(amount, currency).round_to_minor().amount()
}

/// Writes an amount already in minor units with exactly the currency's decimals
/// (`10` → `10.00`), so that amounts have one textual form.
fn minor_scale(mut amount: Decimal, currency: Currency) -> Decimal {
    amount.rescale(currency.minor_units());
    amount
}

struct Priced<'a> {
    event: &'a RatableEvent,
    line: usize,
    value: Decimal,
    units: Decimal,
}

/// Tier discount of each priced event, plus tier usage.
fn tier_discounts(
    tiers: &Tiers,
    priced: &[Priced<'_>],
) -> Result<(Vec<Decimal>, Vec<TierUsage>, Decimal), RatingError> {
    let mut usage: Vec<TierUsage> = tiers
        .tiers
        .iter()
        .enumerate()
        .map(|(index, t)| TierUsage {
            index,
            up_to: t.up_to,
            discount: t.discount,
            units: Decimal::ZERO,
            discount_amount: Decimal::ZERO,
        })
        .collect();
    let mut total_units = Decimal::ZERO;
    for p in priced {
        total_units = add(total_units, p.units)?;
    }
    let mut discounts = vec![Decimal::ZERO; priced.len()];
    match tiers.mode {
        TierMode::Volume => {
            let reached = tiers
                .tiers
                .iter()
                .position(|t| t.up_to.is_none_or(|b| total_units <= b))
                .unwrap_or(tiers.tiers.len().saturating_sub(1));
            let rate = tiers
                .tiers
                .get(reached)
                .map_or(Decimal::ZERO, |t| t.discount);
            for (i, p) in priced.iter().enumerate() {
                discounts[i] = round_ledger(mul(p.value, rate)?);
            }
            if let Some(u) = usage.get_mut(reached) {
                u.units = total_units;
                let mut sum = Decimal::ZERO;
                for d in &discounts {
                    sum = add(sum, *d)?;
                }
                u.discount_amount = sum;
            }
        }
        TierMode::Graduated => {
            // Dearest units first (value per unit, descending), then timestamp and id.
            let mut order: Vec<usize> = (0..priced.len()).collect();
            order.sort_by(|&a, &b| {
                let (pa, pb) = (&priced[a], &priced[b]);
                // pa.value / pa.units vs pb.value / pb.units, without dividing; zero-unit
                // events (requests only) count as infinitely dear.
                let dearer = match (pa.units.is_zero(), pb.units.is_zero()) {
                    (true, true) => Ordering::Equal,
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (false, false) => (pb.value * pa.units).cmp(&(pa.value * pb.units)),
                };
                dearer
                    .then(pa.event.timestamp.cmp(&pb.event.timestamp))
                    .then(pa.event.id.cmp(&pb.event.id))
            });
            let mut cursor = Decimal::ZERO; // units consumed so far
            let mut tier = 0usize;
            for i in order {
                let p = &priced[i];
                let mut left = p.units;
                let mut discount = Decimal::ZERO;
                if left.is_zero() {
                    let rate = tiers.tiers.get(tier).map_or(Decimal::ZERO, |t| t.discount);
                    discount = mul(p.value, rate)?;
                }
                while !left.is_zero() {
                    let Some(t) = tiers.tiers.get(tier) else {
                        break;
                    };
                    let room = t.up_to.map(|b| b - cursor);
                    let take = match room {
                        Some(r) if r <= Decimal::ZERO => {
                            tier += 1;
                            continue;
                        }
                        Some(r) => r.min(left),
                        None => left,
                    };
                    // The part of the event's value these units carry.
                    let part_value = if take == p.units {
                        p.value
                    } else {
                        div(mul(p.value, take)?, p.units)?
                    };
                    let d = mul(part_value, t.discount)?;
                    discount = add(discount, d)?;
                    if let Some(u) = usage.get_mut(tier) {
                        u.units = add(u.units, take)?;
                        u.discount_amount = add(u.discount_amount, d)?;
                    }
                    cursor = add(cursor, take)?;
                    left -= take;
                }
                discounts[i] = round_ledger(discount);
            }
            for u in &mut usage {
                u.discount_amount = round_ledger(u.discount_amount);
            }
        }
    }
    Ok((discounts, usage, total_units))
}

/// Rates the events of one segment under its plan, converting at `fx` (USD → plan
/// currency). Events are rated in a fixed order whatever order they come in.
pub fn rate_segment(
    segment: &Segment,
    fx: Decimal,
    events: &[RatableEvent],
) -> Result<RatedSegment, RatingError> {
    let terms = &segment.terms;
    let currency = terms.currency;
    let mut line_index: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut lines: Vec<RatedLine> = Vec::new();
    let mut priced: Vec<Priced<'_>> = Vec::with_capacity(events.len());
    let mut unpriced_events = 0u64;
    let mut has_price: Vec<bool> = Vec::new();
    // Line keys are assigned in sorted (provider, model) order afterwards; collect first.
    for e in events {
        let Some(cost) = &e.cost else {
            unpriced_events += 1;
            continue;
        };
        let key = (e.provider.as_str(), e.model.as_str());
        let li = match line_index.get(&key) {
            Some(i) => *i,
            None => {
                let i = lines.len();
                line_index.insert(key, i);
                lines.push(RatedLine {
                    provider: e.provider.clone(),
                    model: e.model.clone(),
                    events: 0,
                    quantities: Quantities::default(),
                    by_kind: KindAmounts::default(),
                    subtotal_exact: Decimal::ZERO,
                    tier_discount_exact: Decimal::ZERO,
                    floor_exact: Decimal::ZERO,
                    amount_exact: Decimal::ZERO,
                    subtotal: Decimal::ZERO,
                    discount: Decimal::ZERO,
                    floor_adjustment: Decimal::ZERO,
                    amount: Decimal::ZERO,
                    cost_usd: Decimal::ZERO,
                    floor_applied: None,
                });
                has_price.push(true);
                i
            }
        };
        let line = &mut lines[li];
        line.events += 1;
        let u = &e.usage;
        let q = &mut line.quantities;
        q.prompt_tokens += u.uncached_input() + u.cache_write();
        q.cached_tokens += u.cached_input();
        q.completion_tokens += u.non_reasoning_output();
        q.reasoning_tokens += u.reasoning();
        q.requests += u.requests();
        line.cost_usd = add(line.cost_usd, cost.total())?;
        let value = match base_amounts(terms, &e.model, u, cost, fx)? {
            Some(k) => {
                let b = &mut line.by_kind;
                b.prompt = add(b.prompt, k.prompt)?;
                b.cached = add(b.cached, k.cached)?;
                b.completion = add(b.completion, k.completion)?;
                b.reasoning = add(b.reasoning, k.reasoning)?;
                b.requests = add(b.requests, k.requests)?;
                k.total()
            }
            None => {
                has_price[li] = false;
                Decimal::ZERO
            }
        };
        let units = match terms.tiers.as_ref().map(|t| t.metric) {
            Some(TierMetric::Tokens) => Decimal::from(u.input() + u.output()),
            _ => value,
        };
        priced.push(Priced {
            event: e,
            line: li,
            value,
            units,
        });
    }
    let (discounts, tiers, tier_units) = match &terms.tiers {
        Some(t) => tier_discounts(t, &priced)?,
        None => (vec![Decimal::ZERO; priced.len()], Vec::new(), Decimal::ZERO),
    };
    for (p, d) in priced.iter().zip(&discounts) {
        let line = &mut lines[p.line];
        line.tier_discount_exact = add(line.tier_discount_exact, *d)?;
    }
    let mut usage_total = Decimal::ZERO;
    for (li, line) in lines.iter_mut().enumerate() {
        line.subtotal_exact = round_ledger(line.by_kind.total());
        line.floor_exact = floor_price(terms, line.cost_usd, fx)?;
        let discounted = line.subtotal_exact - line.tier_discount_exact;
        (line.amount_exact, line.floor_applied) = if !has_price[li] {
            (line.floor_exact, Some(FloorReason::NoListPrice))
        } else if line.subtotal_exact < line.floor_exact {
            (line.floor_exact, Some(FloorReason::ListPriceBelowFloor))
        } else if discounted < line.floor_exact {
            (line.floor_exact, Some(FloorReason::TierDiscount))
        } else {
            (discounted, None)
        };
        line.subtotal = round_minor(line.subtotal_exact, currency);
        line.amount = round_minor(line.amount_exact, currency);
        line.discount = minor_scale((line.subtotal - line.amount).max(Decimal::ZERO), currency);
        line.floor_adjustment =
            minor_scale((line.amount - line.subtotal).max(Decimal::ZERO), currency);
        usage_total = add(usage_total, line.amount)?;
    }
    lines.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
    let included = round_minor(
        mul(terms.included_credits, segment.cycle_fraction)?,
        currency,
    );
    let minimum = round_minor(
        mul(terms.monthly_minimum, segment.cycle_fraction)?,
        currency,
    );
    let usage_total = minor_scale(usage_total, currency);
    let included_credits_applied = minor_scale(included.min(usage_total), currency);
    let after_credits = usage_total - included_credits_applied;
    let minimum_adjustment = minor_scale((minimum - after_credits).max(Decimal::ZERO), currency);
    Ok(RatedSegment {
        segment: segment.clone(),
        fx_rate: fx,
        lines,
        tiers,
        tier_units,
        usage_total,
        included_credits_applied,
        minimum_adjustment,
        total: after_credits + minimum_adjustment,
        unpriced_events,
    })
}

/// A plan version as rating needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanVersionTerms {
    /// Plan id.
    pub plan_id: String,
    /// Version number (1, 2, …).
    pub version: i64,
    /// First instant it applies.
    pub effective_from: DateTime<Utc>,
    /// Terms.
    pub terms: PlanTerms,
}

/// A customer's plan assignment: from `effective_from`, plan `plan_id` (`None` = default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// First instant.
    pub effective_from: DateTime<Utc>,
    /// Plan, or `None` for the default plan.
    pub plan_id: Option<String>,
}

/// Splits the cycle `[from, to)` into segments at every plan assignment and plan version
/// change. `assignments` are sorted by time; `versions` holds every version of every plan
/// involved, sorted by time within a plan. Instants before the first assignment (and
/// assignments to plans with no version yet in force) use `default`.
pub fn plan_segments(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    assignments: &[Assignment],
    versions: &[PlanVersionTerms],
    default: &PlanTerms,
) -> Vec<Segment> {
    // Every instant where the applicable terms may change.
    let mut cuts: Vec<DateTime<Utc>> = vec![from];
    cuts.extend(
        assignments
            .iter()
            .map(|a| a.effective_from)
            .chain(versions.iter().map(|v| v.effective_from))
            .filter(|t| *t > from && *t < to),
    );
    cuts.sort();
    cuts.dedup();
    let total = (to - from).num_microseconds().unwrap_or(i64::MAX).max(1);
    let mut segments: Vec<Segment> = Vec::new();
    for (i, start) in cuts.iter().enumerate() {
        let end = cuts.get(i + 1).copied().unwrap_or(to);
        let plan_id = assignments
            .iter()
            .rev()
            .find(|a| a.effective_from <= *start)
            .and_then(|a| a.plan_id.clone());
        let version = plan_id.as_ref().and_then(|id| {
            versions
                .iter()
                .filter(|v| &v.plan_id == id && v.effective_from <= *start)
                .max_by_key(|v| (v.effective_from, v.version))
        });
        let (plan_id, plan_version, terms) = match version {
            Some(v) => (Some(v.plan_id.clone()), Some(v.version), v.terms.clone()),
            None => (None, None, default.clone()),
        };
        // Merge with the previous segment when nothing changed.
        if let Some(prev) = segments.last_mut()
            && prev.plan_id == plan_id
            && prev.plan_version == plan_version
        {
            prev.to = end;
            continue;
        }
        segments.push(Segment {
            from: *start,
            to: end,
            plan_id,
            plan_version,
            terms,
            cycle_fraction: Decimal::ZERO,
        });
    }
    for s in &mut segments {
        let span = (s.to - s.from).num_microseconds().unwrap_or(0);
        s.cycle_fraction = Decimal::from(span) / Decimal::from(total);
    }
    segments
}

/// The rate date of a segment: the day (UTC) of its last instant.
pub fn segment_rate_date(segment: &Segment) -> NaiveDate {
    (segment.to - chrono::Duration::microseconds(1)).date_naive()
}

#[cfg(test)]
mod tests;
