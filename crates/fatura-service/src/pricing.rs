//! The pricing engine's operations: plans, plan assignments, exchange rates, alerts, the
//! upcoming-invoice preview and catalog change reports. The arithmetic is in
//! `fatura_core::rating`; this module gathers its inputs and records its outcomes.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use fatura_core::catalog::{PriceComponents, PriceVersion};
use fatura_core::rating::{
    Assignment, FloorReason, PlanKind, PlanTerms, PlanVersionTerms, RatableEvent, RatedSegment,
    RatingError, fx_rate_on, plan_segments, quote_usage, rate_segment, segment_rate_date,
};
use fatura_core::{CostBreakdown, Currency, CustomerId, MarginRate, TokenUsage, cost_usage};
use fatura_store::{
    AlertRecord, FxRate, PlanAssignment, PlanVersionRecord, PricingChange, PricingData,
};
use rust_decimal::Decimal;

use super::{CatalogSnapshot, Fatura, ServiceError, ServiceResult, random_hex};

/// Where a provisional price was raised to the margin floor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FloorHit {
    pub plan_id: Option<String>,
    pub customer_id: String,
    pub provider: String,
    pub model: String,
    pub reason: FloorReason,
}

impl From<RatingError> for ServiceError {
    fn from(e: RatingError) -> Self {
        match e {
            RatingError::NoFxRate { .. } => ServiceError::Conflict(e.to_string()),
            RatingError::Overflow => ServiceError::Internal(anyhow::anyhow!(e)),
        }
    }
}

/// Plans, assignments and exchange rates, indexed for rating.
#[derive(Debug, Default)]
pub(crate) struct PricingBook {
    /// Versions per plan, by `(effective_from, version)`.
    versions: HashMap<String, Vec<PlanVersionRecord>>,
    /// Assignments per customer, by time.
    assignments: HashMap<String, Vec<PlanAssignment>>,
    /// Rates per currency, by date.
    fx: HashMap<Currency, Vec<(NaiveDate, Decimal)>>,
}

impl PricingBook {
    pub(crate) fn new(data: PricingData) -> Self {
        let mut book = PricingBook::default();
        for v in data.versions {
            book.versions.entry(v.plan_id.clone()).or_default().push(v);
        }
        for list in book.versions.values_mut() {
            list.sort_by_key(|v| (v.effective_from, v.version));
        }
        for a in data.assignments {
            book.assignments
                .entry(a.customer_id.clone())
                .or_default()
                .push(a);
        }
        for list in book.assignments.values_mut() {
            list.sort_by_key(|a| a.effective_from);
        }
        for r in data.fx_rates {
            book.fx
                .entry(r.currency)
                .or_default()
                .push((r.date, r.rate));
        }
        for list in book.fx.values_mut() {
            list.sort();
        }
        book
    }

    /// The USD→`currency` rate in force on `at`'s day (UTC).
    pub(crate) fn fx_rate_at(
        &self,
        currency: Currency,
        at: DateTime<Utc>,
    ) -> ServiceResult<Decimal> {
        Ok(fx_rate_on(
            currency,
            self.fx_rates(currency),
            at.date_naive(),
        )?)
    }

    fn fx_rates(&self, currency: Currency) -> &[(NaiveDate, Decimal)] {
        self.fx.get(&currency).map_or(&[], Vec::as_slice)
    }

    fn assignments_of(&self, customer_id: &str) -> &[PlanAssignment] {
        self.assignments.get(customer_id).map_or(&[], Vec::as_slice)
    }

    fn versions_of(&self, plan_id: &str) -> &[PlanVersionRecord] {
        self.versions.get(plan_id).map_or(&[], Vec::as_slice)
    }

    /// The plan id the customer is on at `at` (`None`: the default plan).
    fn plan_id_at(&self, customer_id: &str, at: DateTime<Utc>) -> Option<&str> {
        let list = self.assignments_of(customer_id);
        let i = list.partition_point(|a| a.effective_from <= at);
        i.checked_sub(1)
            .and_then(|i| list.get(i))
            .and_then(|a| a.plan_id.as_deref())
    }

    /// The version of `plan_id` in force at `at`.
    fn version_at(&self, plan_id: &str, at: DateTime<Utc>) -> Option<&PlanVersionRecord> {
        let list = self.versions_of(plan_id);
        let i = list.partition_point(|v| v.effective_from <= at);
        i.checked_sub(1).and_then(|i| list.get(i))
    }

    /// The customer's plan version in force at `at`; `None` for the default plan.
    fn plan_at(&self, customer_id: &str, at: DateTime<Utc>) -> Option<&PlanVersionRecord> {
        self.plan_id_at(customer_id, at)
            .and_then(|id| self.version_at(id, at))
    }

    /// The provisional price, USD, of one event on its own: its plan's price (no volume
    /// discount, which only the cycle's rating knows), raised to the floor if under it.
    /// Cost-plus plans are priced in USD directly (cost / (1 − margin) needs no rate); list
    /// plans in another currency are converted back at the event date's rate, or priced at
    /// the floor when no rate is known yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn provisional_price(
        &self,
        default_margin: MarginRate,
        customer_id: &str,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        usage: &TokenUsage,
        cost: &CostBreakdown,
    ) -> Result<(Decimal, Option<FloorHit>), RatingError> {
        let Some(plan) = self.plan_at(customer_id, at) else {
            let price = default_margin
                .price_for_cost(cost.total())
                .map_err(|_| RatingError::Overflow)?;
            return Ok((price, None));
        };
        let terms = &plan.terms;
        let fx = if terms.kind == PlanKind::CostPlus || terms.currency == Currency::Usd {
            Decimal::ONE
        } else {
            match fx_rate_on(
                terms.currency,
                self.fx_rates(terms.currency),
                at.date_naive(),
            ) {
                Ok(r) => r,
                Err(_) => {
                    let floor = MarginRate::new(terms.margin_floor)
                        .and_then(|m| m.price_for_cost(cost.total()))
                        .map_err(|_| RatingError::Overflow)?;
                    return Ok((floor, None));
                }
            }
        };
        let q = quote_usage(terms, model, usage, cost, fx)?;
        let amount = if fx == Decimal::ONE {
            q.amount
        } else {
            fatura_core::round_ledger(q.amount.checked_div(fx).ok_or(RatingError::Overflow)?)
        };
        let hit = q.floor_applied.map(|reason| FloorHit {
            plan_id: Some(plan.plan_id.clone()),
            customer_id: customer_id.to_string(),
            provider: provider.to_string(),
            model: model.to_string(),
            reason,
        });
        Ok((amount, hit))
    }
}

/// A plan with its version history.
#[derive(Debug, Clone)]
pub struct PlanView {
    /// The version in force now (the first one if none is yet).
    pub current: PlanVersionRecord,
    /// Every version, oldest first.
    pub versions: Vec<PlanVersionRecord>,
}

/// A new plan or plan version.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// Display name.
    pub name: String,
    /// Terms.
    pub terms: PlanTerms,
    /// First instant it applies.
    pub effective_from: DateTime<Utc>,
}

/// The preview of a customer's current cycle.
#[derive(Debug, Clone)]
pub struct Upcoming {
    /// Customer.
    pub customer_id: String,
    /// Billing currency.
    pub currency: Currency,
    /// Cycle start (inclusive).
    pub period_start: DateTime<Utc>,
    /// Cycle end (exclusive).
    pub period_end: DateTime<Utc>,
    /// Events up to this instant are included.
    pub as_of: DateTime<Utc>,
    /// Rated segments (one per plan version in force during the cycle).
    pub segments: Vec<RatedSegment>,
    /// Sum of segment totals.
    pub total: Decimal,
}

/// Prices per unit of one model for one customer: per token for tokens, per request.
#[derive(Debug, Clone)]
pub struct UnitPrices {
    /// Currency of the prices.
    pub currency: Currency,
    /// Per prompt token.
    pub prompt: Decimal,
    /// Per completion token.
    pub completion: Decimal,
    /// Per cached prompt token read.
    pub cache_read: Decimal,
    /// Per cache-write token.
    pub cache_write: Decimal,
    /// Per reasoning token.
    pub reasoning: Decimal,
    /// Per request.
    pub request: Decimal,
}

/// One catalog change.
#[derive(Debug, Clone)]
pub struct PriceChange {
    /// The new version.
    pub new: PriceVersion,
    /// The version it replaces, if any.
    pub old: Option<PriceVersion>,
}

/// A plan's unprotected margin on one token kind of a model.
#[derive(Debug, Clone)]
pub struct KindMargin {
    /// `prompt`, `completion`, `cache_read`, `cache_write`, `reasoning`, `request`.
    pub kind: &'static str,
    /// Upstream cost of 1M units, plan currency.
    pub cost_per_million: Decimal,
    /// Plan price of 1M units before the floor.
    pub price_per_million: Decimal,
    /// Margin at that price (`None`: priced at zero).
    pub margin: Option<Decimal>,
    /// Margin at the deepest tier discount.
    pub margin_at_deepest_tier: Option<Decimal>,
}

/// A plan's margin on one model, per token kind, at the latest catalog prices.
#[derive(Debug, Clone)]
pub struct MarginImpact {
    /// Plan.
    pub plan_id: String,
    /// Plan version.
    pub plan_version: i64,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// The plan's floor.
    pub margin_floor: Decimal,
    /// Per token kind.
    pub kinds: Vec<KindMargin>,
    /// Lowest unprotected margin (at the deepest tier).
    pub worst_margin: Option<Decimal>,
    /// True when some kind would be under the floor without protection.
    pub below_floor: bool,
    /// Why, when below the floor.
    pub reason: Option<FloorReason>,
}

/// What `GET /v1/prices/changes` answers.
#[derive(Debug, Clone)]
pub struct PriceChanges {
    /// Catalog changes, by provider and model.
    pub changes: Vec<PriceChange>,
    /// Margin impact per plan and changed model.
    pub impact: Vec<MarginImpact>,
    /// Plans that could not be assessed (no exchange rate), with why.
    pub skipped_plans: Vec<(String, String)>,
}

/// Usage of one million units of one kind, for per-unit prices.
fn unit_usage(kind: &str) -> TokenUsage {
    const M: u64 = 1_000_000;
    let r = match kind {
        "prompt" => TokenUsage::new(M, 0, 0, 0, 0, 0),
        "completion" => TokenUsage::new(0, M, 0, 0, 0, 0),
        "cache_read" => TokenUsage::new(M, 0, M, 0, 0, 0),
        "cache_write" => TokenUsage::new(M, 0, 0, M, 0, 0),
        "reasoning" => TokenUsage::new(0, M, 0, 0, M, 0),
        _ => TokenUsage::new(0, 0, 0, 0, 0, M),
    };
    r.unwrap_or_default()
}

const KINDS: [&str; 6] = [
    "prompt",
    "completion",
    "cache_read",
    "cache_write",
    "reasoning",
    "request",
];

fn invalid(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Invalid(e.to_string())
}

impl Fatura {
    // ---- alerts -------------------------------------------------------------------------

    /// Raises one floor alert per (plan, model, reason) not yet raised by this process.
    pub(crate) async fn raise_floor_alerts(&self, hits: Vec<FloorHit>, now: DateTime<Utc>) {
        for hit in hits {
            let plan = hit.plan_id.as_deref().unwrap_or("default");
            let key = format!(
                "floor_applied:{plan}:{}:{}:{}",
                hit.provider,
                hit.model,
                hit.reason.as_str()
            );
            let fresh = self
                .raised_alerts
                .lock()
                .map(|mut set| set.insert(key.clone()))
                .unwrap_or(true);
            if !fresh {
                continue;
            }
            let alert = AlertRecord {
                id: format!("alr_{}", random_hex(8)),
                dedupe_key: key,
                kind: "floor_applied".into(),
                severity: "warning".into(),
                customer_id: Some(hit.customer_id.clone()),
                plan_id: hit.plan_id.clone(),
                provider: Some(hit.provider.clone()),
                model: Some(hit.model.clone()),
                reason: Some(hit.reason.as_str().into()),
                message: format!(
                    "plan {plan}: {}/{} priced at the margin floor: {}",
                    hit.provider,
                    hit.model,
                    hit.reason.describe()
                ),
                first_seen: now,
                last_seen: now,
                occurrences: 1,
            };
            if let Err(e) = self.store.raise_alert(&alert).await {
                tracing::warn!(error = %e, "could not record an alert");
                if let Ok(mut set) = self.raised_alerts.lock() {
                    set.remove(&alert.dedupe_key);
                }
            }
        }
    }

    /// Raises an operator alert (deduplicated by `key`; repeats bump its count). Failing to
    /// record it is logged, never fatal.
    pub async fn alert(
        &self,
        kind: &str,
        severity: &str,
        customer_id: Option<&str>,
        key: &str,
        message: String,
        now: DateTime<Utc>,
    ) {
        let alert = AlertRecord {
            id: format!("alr_{}", random_hex(8)),
            dedupe_key: format!("{kind}:{key}"),
            kind: kind.into(),
            severity: severity.into(),
            customer_id: customer_id.map(str::to_string),
            plan_id: None,
            provider: None,
            model: None,
            reason: None,
            message,
            first_seen: now,
            last_seen: now,
            occurrences: 1,
        };
        if let Err(e) = self.store.raise_alert(&alert).await {
            tracing::warn!(error = %e, "could not record an alert");
        }
    }

    /// Every alert, most recent first.
    pub async fn alerts(&self) -> ServiceResult<Vec<AlertRecord>> {
        Ok(self.store.list_alerts().await?)
    }

    // ---- plans --------------------------------------------------------------------------

    async fn apply(&self, change: PricingChange) -> ServiceResult<()> {
        self.store.apply_pricing_change(&change).await?;
        // This process rates with the change at once; other instances see the revision move
        // at their next write and reload.
        self.reload_catalog().await?;
        Ok(())
    }

    fn check_plan(input: &PlanInput) -> ServiceResult<()> {
        let name = input.name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(ServiceError::Invalid(
                "name: must be 1 to 200 characters without control characters".into(),
            ));
        }
        input.terms.validate().map_err(invalid)
    }

    /// Creates a plan (id `plan_…` when none is given) with its first version.
    pub async fn create_plan(
        &self,
        id: Option<&str>,
        input: PlanInput,
        now: DateTime<Utc>,
    ) -> ServiceResult<PlanView> {
        Self::check_plan(&input)?;
        let id = match id {
            Some(id) => CustomerId::parse(id)
                .map_err(|e| ServiceError::Invalid(format!("id: {e}")))?
                .to_string(),
            None => format!("plan_{}", random_hex(8)),
        };
        let record = PlanVersionRecord {
            plan_id: id.clone(),
            version: 1,
            name: input.name.trim().to_string(),
            effective_from: input.effective_from,
            terms: input.terms,
            created_at: now,
        };
        self.apply(PricingChange::CreatePlan(record)).await?;
        self.plan(&id, now).await
    }

    /// Adds a version to a plan, effective from `input.effective_from` (not before the
    /// latest version's start). The currency cannot change.
    pub async fn update_plan(
        &self,
        id: &str,
        input: PlanInput,
        now: DateTime<Utc>,
    ) -> ServiceResult<PlanView> {
        Self::check_plan(&input)?;
        let view = self.plan(id, now).await?;
        let Some(latest) = view.versions.iter().max_by_key(|v| v.version) else {
            return Err(ServiceError::NotFound(format!("no plan {id:?}")));
        };
        if input.terms.currency != latest.terms.currency {
            return Err(ServiceError::Invalid(format!(
                "currency: a plan's currency cannot change (it is {}; customers on it are billed in it); create another plan",
                latest.terms.currency
            )));
        }
        let latest_start = view
            .versions
            .iter()
            .map(|v| v.effective_from)
            .max()
            .unwrap_or(latest.effective_from);
        if input.effective_from < latest_start {
            return Err(ServiceError::Invalid(format!(
                "effective_from: must not be before the latest version's start ({}); past periods keep the terms they were rated with",
                latest_start.to_rfc3339()
            )));
        }
        let record = PlanVersionRecord {
            plan_id: id.to_string(),
            version: latest.version + 1,
            name: input.name.trim().to_string(),
            effective_from: input.effective_from,
            terms: input.terms,
            created_at: now,
        };
        self.apply(PricingChange::AddPlanVersion(record)).await?;
        self.plan(id, now).await
    }

    fn view_of(versions: &[PlanVersionRecord], now: DateTime<Utc>) -> Option<PlanView> {
        let first = versions.first()?;
        let current = versions
            .iter()
            .rev()
            .find(|v| v.effective_from <= now)
            .unwrap_or(first);
        Some(PlanView {
            current: current.clone(),
            versions: versions.to_vec(),
        })
    }

    /// One plan, or `NotFound`.
    pub async fn plan(&self, id: &str, now: DateTime<Utc>) -> ServiceResult<PlanView> {
        let snapshot = self.snapshot().await?;
        Self::view_of(snapshot.book.versions_of(id), now)
            .ok_or_else(|| ServiceError::NotFound(format!("no plan {id:?}")))
    }

    /// Every plan, by id.
    pub async fn plans(&self, now: DateTime<Utc>) -> ServiceResult<Vec<PlanView>> {
        let snapshot = self.snapshot().await?;
        let mut ids: Vec<&String> = snapshot.book.versions.keys().collect();
        ids.sort();
        Ok(ids
            .into_iter()
            .filter_map(|id| Self::view_of(snapshot.book.versions_of(id), now))
            .collect())
    }

    /// Puts the customer on `plan_id` (`None`: back to the default plan) from
    /// `effective_from`, which must not be before its latest assignment. The plan must bill
    /// in the customer's currency.
    pub async fn assign_plan(
        &self,
        customer_id: &str,
        plan_id: Option<&str>,
        effective_from: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> ServiceResult<()> {
        let customer = self.customer(customer_id).await?;
        let snapshot = self.reload_catalog().await?;
        if let Some(plan_id) = plan_id {
            let versions = snapshot.book.versions_of(plan_id);
            let Some(first) = versions.first() else {
                return Err(ServiceError::Invalid(format!(
                    "plan_id: no plan {plan_id:?}"
                )));
            };
            if first.terms.currency != customer.currency {
                return Err(ServiceError::Invalid(format!(
                    "plan_id: plan {plan_id:?} bills in {} but the customer is billed in {}",
                    first.terms.currency, customer.currency
                )));
            }
        }
        if let Some(last) = snapshot.book.assignments_of(customer_id).last()
            && effective_from < last.effective_from
        {
            return Err(ServiceError::Invalid(format!(
                "plan_effective_from: must not be before the customer's latest plan change ({})",
                last.effective_from.to_rfc3339()
            )));
        }
        self.apply(PricingChange::AssignPlan(PlanAssignment {
            customer_id: customer_id.to_string(),
            effective_from,
            plan_id: plan_id.map(str::to_string),
            created_at: now,
        }))
        .await
    }

    /// The plan a customer is on at `at` (`None`: the default plan) and its history.
    pub async fn customer_plan(
        &self,
        customer_id: &str,
        at: DateTime<Utc>,
    ) -> ServiceResult<(Option<String>, Vec<PlanAssignment>)> {
        let snapshot = self.snapshot().await?;
        Ok((
            snapshot
                .book
                .plan_id_at(customer_id, at)
                .map(str::to_string),
            snapshot.book.assignments_of(customer_id).to_vec(),
        ))
    }

    // ---- exchange rates -----------------------------------------------------------------

    /// Records the USD→`currency` rate for `date`.
    pub async fn put_fx_rate(
        &self,
        currency: Currency,
        date: NaiveDate,
        rate: Decimal,
        now: DateTime<Utc>,
    ) -> ServiceResult<FxRate> {
        if currency == Currency::Usd {
            return Err(ServiceError::Invalid(
                "currency: rates are from USD to another currency; USD is always 1".into(),
            ));
        }
        if rate <= Decimal::ZERO || rate.normalize().scale() > 12 || rate > Decimal::from(1_000_000)
        {
            return Err(ServiceError::Invalid(
                "rate: must be a positive decimal up to 1000000 with at most 12 decimal places"
                    .into(),
            ));
        }
        let record = FxRate {
            currency,
            date,
            rate: rate.normalize(),
            created_at: now,
        };
        self.apply(PricingChange::PutFxRate(record.clone())).await?;
        Ok(record)
    }

    /// Stored rates, optionally of one currency, by currency and date.
    pub async fn fx_rates(&self, currency: Option<Currency>) -> ServiceResult<Vec<FxRate>> {
        let data = self.store.load_pricing().await?;
        Ok(data
            .fx_rates
            .into_iter()
            .filter(|r| currency.is_none_or(|c| c == r.currency))
            .collect())
    }

    // ---- rating -------------------------------------------------------------------------

    /// Rates a customer's events in `[from, to)` (segments span the whole cycle
    /// `[cycle_start, cycle_end)`, so credits and minimums are prorated on it).
    pub async fn rate_customer(
        &self,
        customer_id: &str,
        cycle_start: DateTime<Utc>,
        cycle_end: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> ServiceResult<Vec<RatedSegment>> {
        let customer = self.customer(customer_id).await?;
        let snapshot = self.snapshot().await?;
        let stored = self
            .store
            .customer_events(customer_id, cycle_start, until.min(cycle_end))
            .await?;
        let (segments, hits) = rate_events(
            &snapshot,
            self.margin,
            &customer.id,
            customer.currency,
            cycle_start,
            cycle_end,
            stored,
            true,
        )?;
        self.raise_floor_alerts(hits, now).await;
        Ok(segments)
    }

    /// The preview of the customer's current cycle (the one containing `at`, by its billing
    /// settings), with the events recorded before `at`.
    pub async fn upcoming(&self, customer_id: &str, at: DateTime<Utc>) -> ServiceResult<Upcoming> {
        let customer = self.customer(customer_id).await?;
        let (period_start, period_end) =
            super::billing::cycle_spec(&customer)?.cycle_containing(at);
        let segments = self
            .rate_customer(customer_id, period_start, period_end, at, at)
            .await?;
        let total = segments.iter().map(|s| s.total).sum();
        Ok(Upcoming {
            customer_id: customer.id,
            currency: customer.currency,
            period_start,
            period_end,
            as_of: at,
            segments,
            total,
        })
    }

    /// The customer's per-unit prices for a catalog version, under its plan at `at`, in the
    /// plan currency (`None` if the plan bills in a currency with no rate yet).
    pub async fn unit_prices(
        &self,
        customer_id: &str,
        version: &PriceVersion,
        at: DateTime<Utc>,
    ) -> ServiceResult<Option<UnitPrices>> {
        let snapshot = self.snapshot().await?;
        let default = PlanTerms::default_for(Currency::Usd, self.margin);
        let terms = snapshot
            .book
            .plan_at(customer_id, at)
            .map_or(&default, |v| &v.terms);
        let Ok(fx) = fx_rate_on(
            terms.currency,
            snapshot.book.fx_rates(terms.currency),
            at.date_naive(),
        ) else {
            return Ok(None);
        };
        let mut per = [Decimal::ZERO; 6];
        for (slot, kind) in per.iter_mut().zip(KINDS) {
            let usage = unit_usage(kind);
            let cost = cost_usage(&usage, &version.prices).map_err(invalid)?;
            let q = quote_usage(terms, &version.model, &usage, &cost, fx)?;
            *slot = fatura_core::round_ledger(q.amount / Decimal::from(1_000_000));
        }
        Ok(Some(UnitPrices {
            currency: terms.currency,
            prompt: per[0],
            completion: per[1],
            cache_read: per[2],
            cache_write: per[3],
            reasoning: per[4],
            request: per[5],
        }))
    }

    // ---- catalog changes ----------------------------------------------------------------

    /// Catalog versions imported at or after `since`, each with the version it replaces,
    /// and each plan's unprotected margin on the changed models.
    pub async fn price_changes(
        &self,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> ServiceResult<PriceChanges> {
        let ids: std::collections::HashSet<i64> = self
            .store
            .versions_imported_since(since)
            .await?
            .into_iter()
            .collect();
        let snapshot = self.reload_catalog().await?;
        let mut changes: Vec<PriceChange> = Vec::new();
        for v in snapshot.catalog.versions().filter(|v| ids.contains(&v.id)) {
            let list = snapshot.catalog.versions_of(&v.provider, &v.model);
            let pos = list.iter().position(|x| x.id == v.id).unwrap_or(0);
            let old = pos.checked_sub(1).and_then(|i| list.get(i)).cloned();
            changes.push(PriceChange {
                new: v.clone(),
                old,
            });
        }
        changes.sort_by(|a, b| {
            (&a.new.provider, &a.new.model, a.new.effective_from).cmp(&(
                &b.new.provider,
                &b.new.model,
                b.new.effective_from,
            ))
        });
        let mut impact = Vec::new();
        let mut skipped_plans = Vec::new();
        let mut plan_ids: Vec<&String> = snapshot.book.versions.keys().collect();
        plan_ids.sort();
        for plan_id in plan_ids {
            let Some(view) = Self::view_of(snapshot.book.versions_of(plan_id), now) else {
                continue;
            };
            let plan = &view.current;
            let terms = &plan.terms;
            let fx = match fx_rate_on(
                terms.currency,
                snapshot.book.fx_rates(terms.currency),
                now.date_naive(),
            ) {
                Ok(fx) => fx,
                Err(e) => {
                    skipped_plans.push((plan_id.clone(), e.to_string()));
                    continue;
                }
            };
            for change in &changes {
                if let Some(row) = margin_impact(plan, &change.new, fx)? {
                    impact.push(row);
                }
            }
        }
        // Say it where operators look: one alert per plan and model now under its floor.
        for row in impact.iter().filter(|r| r.below_floor) {
            let key = format!("margin_risk:{}:{}:{}", row.plan_id, row.provider, row.model);
            let alert = AlertRecord {
                id: format!("alr_{}", random_hex(8)),
                dedupe_key: key,
                kind: "margin_risk".into(),
                severity: "warning".into(),
                customer_id: None,
                plan_id: Some(row.plan_id.clone()),
                provider: Some(row.provider.clone()),
                model: Some(row.model.clone()),
                reason: row.reason.map(|r| r.as_str().to_string()),
                message: format!(
                    "plan {}: at the new catalog prices {}/{} would earn a margin of {} (floor {}); the floor will be applied",
                    row.plan_id,
                    row.provider,
                    row.model,
                    row.worst_margin
                        .map_or("n/a".into(), |m| m.round_dp(4).to_string()),
                    row.margin_floor
                ),
                first_seen: now,
                last_seen: now,
                occurrences: 1,
            };
            if let Err(e) = self.store.raise_alert(&alert).await {
                tracing::warn!(error = %e, "could not record an alert");
            }
        }
        Ok(PriceChanges {
            changes,
            impact,
            skipped_plans,
        })
    }
}

/// A plan's unprotected margin per token kind on one catalog version; `None` when the plan
/// does not price the model in a way that could cross its floor (a cost-plus plan without
/// tiers deep enough to matter is reported only if under the floor).
fn margin_impact(
    plan: &PlanVersionRecord,
    version: &PriceVersion,
    fx: Decimal,
) -> ServiceResult<Option<MarginImpact>> {
    let terms = &plan.terms;
    let max_discount = terms
        .tiers
        .as_ref()
        .and_then(|t| t.tiers.iter().map(|t| t.discount).max())
        .unwrap_or(Decimal::ZERO);
    let is_list = terms.kind == PlanKind::List;
    let has_list_price = terms
        .list_prices
        .iter()
        .any(|p| fatura_core::rating::pattern_matches(&p.pattern, &version.model));
    let mut kinds = Vec::new();
    let mut worst: Option<Decimal> = None;
    let mut below_base = false;
    let mut below_tiers = false;
    // The plan's price before the floor: rate 1M units at a zero floor.
    let mut unprotected = terms.clone();
    unprotected.margin_floor = Decimal::ZERO;
    for kind in KINDS {
        let usage = unit_usage(kind);
        let cost: CostBreakdown = cost_usage(&usage, &version.prices).map_err(invalid)?;
        let cost_ccy = cost.total() * fx;
        if cost_ccy.is_zero() {
            continue;
        }
        let price = if is_list && !has_list_price {
            Decimal::ZERO
        } else {
            quote_usage(&unprotected, &version.model, &usage, &cost, fx)?.amount
        };
        let margin = |p: Decimal| (!p.is_zero()).then(|| Decimal::ONE - cost_ccy / p);
        let at_base = margin(price);
        let at_tier = margin(price * (Decimal::ONE - max_discount));
        if at_base.is_none_or(|m| m < terms.margin_floor) {
            below_base = true;
        }
        if at_tier.is_none_or(|m| m < terms.margin_floor) {
            below_tiers = true;
        }
        let w = at_tier.unwrap_or(Decimal::MIN);
        worst = Some(worst.map_or(w, |x: Decimal| x.min(w)));
        kinds.push(KindMargin {
            kind,
            cost_per_million: cost_ccy,
            price_per_million: price,
            margin: at_base,
            margin_at_deepest_tier: at_tier,
        });
    }
    if kinds.is_empty() || (!is_list && !below_tiers) || (is_list && !has_list_price && !below_base)
    {
        return Ok(None);
    }
    let reason = if is_list && !has_list_price {
        Some(FloorReason::NoListPrice)
    } else if below_base {
        Some(FloorReason::ListPriceBelowFloor)
    } else if below_tiers {
        Some(FloorReason::TierDiscount)
    } else {
        None
    };
    Ok(Some(MarginImpact {
        plan_id: plan.plan_id.clone(),
        plan_version: plan.version,
        provider: version.provider.clone(),
        model: version.model.clone(),
        margin_floor: terms.margin_floor,
        kinds,
        worst_margin: worst.filter(|w| *w != Decimal::MIN),
        below_floor: below_base || below_tiers,
        reason,
    }))
}

/// Rates stored events for one customer: splits the cycle into plan segments, looks up each
/// event's cost breakdown from its catalog version, rates each segment at its rate date's
/// exchange rate. Returns the rated segments and where the floor was applied.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rate_events(
    snapshot: &CatalogSnapshot,
    margin: MarginRate,
    customer_id: &str,
    currency: Currency,
    cycle_start: DateTime<Utc>,
    cycle_end: DateTime<Utc>,
    stored: Vec<fatura_store::StoredEvent>,
    allowances: bool,
) -> ServiceResult<(Vec<RatedSegment>, Vec<FloorHit>)> {
    let book = &snapshot.book;
    let assignments: Vec<Assignment> = book
        .assignments_of(customer_id)
        .iter()
        .map(|a| Assignment {
            effective_from: a.effective_from,
            plan_id: a.plan_id.clone(),
        })
        .collect();
    let mut versions: Vec<PlanVersionTerms> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for a in &assignments {
        if let Some(id) = &a.plan_id
            && seen.insert(id.clone())
        {
            versions.extend(book.versions_of(id).iter().map(|v| PlanVersionTerms {
                plan_id: v.plan_id.clone(),
                version: v.version,
                effective_from: v.effective_from,
                terms: v.terms.clone(),
            }));
        }
    }
    let default = PlanTerms::default_for(currency, margin);
    let mut segments = plan_segments(cycle_start, cycle_end, &assignments, &versions, &default);
    if !allowances {
        // Late usage of a period already invoiced: its credits and minimum were applied then.
        for s in &mut segments {
            s.cycle_fraction = Decimal::ZERO;
        }
    }
    let by_id: HashMap<i64, &PriceComponents> = snapshot
        .catalog
        .versions()
        .map(|v| (v.id, &v.prices))
        .collect();
    let mut events: Vec<RatableEvent> = Vec::with_capacity(stored.len());
    for e in stored {
        let cost = match e.price_version_id.and_then(|id| by_id.get(&id)) {
            Some(prices) => Some(cost_usage(&e.usage, prices).map_err(invalid)?),
            None => None,
        };
        events.push(RatableEvent {
            id: e.id,
            timestamp: e.timestamp,
            provider: e.provider,
            model: e.model,
            usage: e.usage,
            cost,
        });
    }
    // Segments are sorted and cover the cycle: each event goes to the last one starting at
    // or before it.
    let mut per_segment: Vec<Vec<RatableEvent>> = vec![Vec::new(); segments.len()];
    for e in events {
        let i = segments.partition_point(|s| s.from <= e.timestamp);
        if let Some(bucket) = i.checked_sub(1).and_then(|i| per_segment.get_mut(i)) {
            bucket.push(e);
        }
    }
    let mut rated = Vec::with_capacity(segments.len());
    let mut hits = Vec::new();
    for (segment, inside) in segments.into_iter().zip(per_segment) {
        let fx = fx_rate_on(
            segment.terms.currency,
            book.fx_rates(segment.terms.currency),
            segment_rate_date(&segment),
        )?;
        let r = rate_segment(&segment, fx, &inside)?;
        for line in &r.lines {
            if let Some(reason) = line.floor_applied {
                hits.push(FloorHit {
                    plan_id: segment.plan_id.clone(),
                    customer_id: customer_id.to_string(),
                    provider: line.provider.clone(),
                    model: line.model.clone(),
                    reason,
                });
            }
        }
        rated.push(r);
    }
    Ok((rated, hits))
}
