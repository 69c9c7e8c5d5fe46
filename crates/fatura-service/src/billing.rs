//! Billing: customers' cycles close into draft invoices, drafts are finalised after a grace
//! period with gapless numbers, and finalised invoices are immutable (corrected by credit
//! notes, or voided and reissued). An invoice is rated from the ledger by the pricing
//! engine; every event is billed by exactly one invoice (the `invoice_id` link), and events
//! that arrive after their period was finalised are billed by the next invoice as a labelled
//! adjustment.

use fatura_core::status::{InvoiceKind, InvoiceStatus, MovementKind};
use std::collections::HashSet;

use chrono::{DateTime, Datelike, Duration, Utc};
use fatura_core::billing::{CycleSpec, invoice_totals};
use fatura_core::rating::RatedSegment;
use fatura_core::{Currency, Money};
use fatura_store::{Customer, InvoiceRecord, StoredEvent, WalletTransaction};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::pricing::rate_events;
use super::{Fatura, ServiceError, ServiceResult, random_hex};

/// An invoice status given as text (a query parameter, when present), or `Invalid`.
pub fn parse_invoice_status(s: Option<&str>) -> ServiceResult<Option<InvoiceStatus>> {
    s.map(|s| {
        s.parse()
            .map_err(|_| ServiceError::Invalid("status: must be draft, open, paid or void".into()))
    })
    .transpose()
}

/// Billing settings of a customer as a cycle specification.
pub fn cycle_spec(c: &Customer) -> ServiceResult<CycleSpec> {
    CycleSpec::new(c.billing.anchor_day, &c.billing.timezone)
        .map_err(|e| ServiceError::Internal(anyhow::anyhow!("stored billing settings: {e}")))
}

/// How long a closed cycle waits for late events before it is finalised, and how many
/// failed collection attempts suspend a customer.
#[derive(Debug, Clone, Copy)]
pub struct BillingPolicy {
    /// Grace period after the cycle end.
    pub grace: Duration,
}

impl Default for BillingPolicy {
    fn default() -> Self {
        BillingPolicy {
            grace: Duration::hours(1),
        }
    }
}

/// Quantities of an invoice line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocQuantities {
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

/// Average unit prices of a line, per 1M tokens (per request for requests), in the
/// invoice currency; `None` where the quantity is zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocUnitPrices {
    /// Per 1M prompt tokens.
    pub prompt: Option<Decimal>,
    /// Per 1M cached tokens.
    pub cached: Option<Decimal>,
    /// Per 1M completion tokens.
    pub completion: Option<Decimal>,
    /// Per 1M reasoning tokens.
    pub reasoning: Option<Decimal>,
    /// Per request.
    pub request: Option<Decimal>,
}

/// One invoice line: a model at a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocLine {
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Events.
    pub events: u64,
    /// Quantities.
    pub quantities: DocQuantities,
    /// Unit prices.
    pub unit_prices: DocUnitPrices,
    /// At the plan's prices.
    pub subtotal: Decimal,
    /// Volume discount.
    pub discount: Decimal,
    /// Raise to the margin floor.
    pub floor_adjustment: Decimal,
    /// Line amount.
    pub amount: Decimal,
    /// Why the floor applied.
    pub floor_applied: Option<String>,
    /// Operator only: upstream cost, USD.
    pub cost_usd: Decimal,
}

/// What a volume tier covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocTier {
    /// Upper bound.
    pub up_to: Option<Decimal>,
    /// Discount rate.
    pub discount: Decimal,
    /// Units in it.
    pub units: Decimal,
    /// Discount given (before floor caps), invoice currency.
    pub discount_amount: Decimal,
}

/// A part of the invoice rated under one plan version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSection {
    /// `usage` (the cycle) or `adjustment` (late usage of an earlier, invoiced period).
    pub kind: String,
    /// Start.
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Plan (`None`: default).
    pub plan_id: Option<String>,
    /// Plan version.
    pub plan_version: Option<i64>,
    /// USD → currency rate used.
    pub fx_rate: Decimal,
    /// Lines.
    pub lines: Vec<DocLine>,
    /// Volume tiers.
    pub tiers: Vec<DocTier>,
    /// Sum of lines.
    pub usage_total: Decimal,
    /// Included credits applied.
    pub included_credits_applied: Decimal,
    /// Raise to the minimum.
    pub minimum_adjustment: Decimal,
    /// Section total.
    pub total: Decimal,
}

/// The full breakdown of an invoice, stored with it (immutable once finalised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceDocument {
    /// Customer name at the time.
    pub customer_name: String,
    /// `en` or `pt-BR`.
    pub locale: String,
    /// Time zone of the cycle.
    pub timezone: String,
    /// Sections.
    pub sections: Vec<DocSection>,
    /// Tax rate applied.
    pub tax_rate: Option<Decimal>,
    /// Events without a catalog price in the period (not billed until priced).
    pub unpriced_events: u64,
    /// For credit notes: the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For credit notes: the number of the invoice corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrects_number: Option<String>,
}

fn section(kind: &str, s: RatedSegment) -> DocSection {
    let per_million = |amount: Decimal, qty: u64| {
        (qty > 0).then(|| (amount * Decimal::from(1_000_000) / Decimal::from(qty)).round_dp(6))
    };
    DocSection {
        kind: kind.into(),
        from: s.segment.from,
        to: s.segment.to,
        plan_id: s.segment.plan_id,
        plan_version: s.segment.plan_version,
        fx_rate: s.fx_rate,
        lines: s
            .lines
            .into_iter()
            .map(|l| {
                let q = l.quantities;
                let k = l.by_kind;
                DocLine {
                    provider: l.provider,
                    model: l.model,
                    events: l.events,
                    unit_prices: DocUnitPrices {
                        prompt: per_million(k.prompt, q.prompt_tokens),
                        cached: per_million(k.cached, q.cached_tokens),
                        completion: per_million(k.completion, q.completion_tokens),
                        reasoning: per_million(k.reasoning, q.reasoning_tokens),
                        request: (q.requests > 0 && !k.requests.is_zero())
                            .then(|| (k.requests / Decimal::from(q.requests)).round_dp(6)),
                    },
                    quantities: DocQuantities {
                        prompt_tokens: q.prompt_tokens,
                        cached_tokens: q.cached_tokens,
                        completion_tokens: q.completion_tokens,
                        reasoning_tokens: q.reasoning_tokens,
                        requests: q.requests,
                    },
                    subtotal: l.subtotal,
                    discount: l.discount,
                    floor_adjustment: l.floor_adjustment,
                    amount: l.amount,
                    floor_applied: l.floor_applied.map(|r| r.as_str().to_string()),
                    cost_usd: l.cost_usd.normalize(),
                }
            })
            .collect(),
        tiers: s
            .tiers
            .into_iter()
            .map(|t| DocTier {
                up_to: t.up_to,
                discount: t.discount,
                units: t.units.normalize(),
                discount_amount: t.discount_amount.normalize(),
            })
            .collect(),
        usage_total: s.usage_total,
        included_credits_applied: s.included_credits_applied,
        minimum_adjustment: s.minimum_adjustment,
        total: s.total,
    }
}

/// What a billing run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Drafts created for closed cycles.
    pub drafted: u64,
    /// Drafts re-rated (still in their grace period).
    pub refreshed: u64,
    /// Invoices finalised.
    pub finalized: Vec<InvoiceRecord>,
    /// Customers that could not be billed (each billed in isolation: the others were).
    pub failed: Vec<BillingFailure>,
}

/// A customer a billing run could not bill, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingFailure {
    /// The customer.
    pub customer_id: String,
    /// The kind of error (`conflict`, `invalid_request`, `not_found`).
    pub code: &'static str,
    /// What is wrong, for the operator.
    pub message: String,
}

/// A draft's rating: its document, totals and the number of events it bills.
struct Rated {
    doc: InvoiceDocument,
    totals: fatura_core::billing::InvoiceTotals,
    events: i64,
}

fn minor(amount: Decimal, currency: Currency) -> Decimal {
    Money::new(amount, currency).round_to_minor().amount()
}

impl Fatura {
    /// Rates what a draft for the cycle `[start, end)` of `customer` bills now: the cycle's
    /// unbilled events, plus unbilled events of earlier periods (late events) except those
    /// of periods that have their own draft.
    async fn rate_draft(
        &self,
        customer: &Customer,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        other_drafts: &[(DateTime<Utc>, DateTime<Utc>)],
    ) -> ServiceResult<Rated> {
        let spec = cycle_spec(customer)?;
        let snapshot = self.snapshot().await?;
        let events = self.store.uninvoiced_events(&customer.id, end).await?;
        let events: Vec<StoredEvent> = events
            .into_iter()
            .filter(|e| {
                e.timestamp >= start
                    || !other_drafts
                        .iter()
                        .any(|(s, en)| e.timestamp >= *s && e.timestamp < *en)
            })
            .collect();
        // What the invoice bills: the priced events. Unpriced ones are rated only to be
        // reported (`unpriced_events`); they stay unbilled — not linked at finalisation, their
        // wallet charges not applied — until a price import prices them, and the next
        // invoice then bills them as an adjustment of their period.
        let billed = events.iter().filter(|e| e.cost.is_some());
        let count = i64::try_from(billed.clone().count()).unwrap_or(i64::MAX);
        let charged_ids: HashSet<&str> = billed.map(|e| e.id.as_str()).collect();
        let prepaid_charged = if customer.prepaid {
            let txs = self.store.wallet_transactions(&customer.id).await?;
            -txs.iter()
                .filter(|t| {
                    t.kind == MovementKind::Charge
                        && t.event_id
                            .as_deref()
                            .is_some_and(|id| charged_ids.contains(id))
                })
                .map(|t| t.amount)
                .sum::<Decimal>()
        } else {
            Decimal::ZERO
        };
        // Late events, by the cycle they belong to.
        let mut current = Vec::new();
        let mut late: std::collections::BTreeMap<DateTime<Utc>, Vec<StoredEvent>> =
            Default::default();
        for e in events {
            if e.timestamp >= start {
                current.push(e);
            } else {
                late.entry(spec.cycle_containing(e.timestamp).0)
                    .or_default()
                    .push(e);
            }
        }
        let mut sections = Vec::new();
        let mut parts = Vec::new();
        let mut unpriced = 0;
        let mut hits = Vec::new();
        for (cycle_start, evs) in late {
            let (_, cycle_end) = spec.cycle_containing(cycle_start);
            let (segs, h) = rate_events(
                &snapshot,
                self.margin,
                &customer.id,
                customer.currency,
                cycle_start,
                cycle_end,
                evs,
                false,
            )?;
            hits.extend(h);
            for s in segs
                .into_iter()
                .filter(|s| !s.lines.is_empty() || s.unpriced_events > 0)
            {
                unpriced += s.unpriced_events;
                parts.push(s.total);
                sections.push(section("adjustment", s));
            }
        }
        let (segs, h) = rate_events(
            &snapshot,
            self.margin,
            &customer.id,
            customer.currency,
            start,
            end,
            current,
            true,
        )?;
        hits.extend(h);
        for s in segs {
            unpriced += s.unpriced_events;
            parts.push(s.total);
            sections.push(section("usage", s));
        }
        self.raise_floor_alerts(hits, Utc::now()).await;
        let totals = invoice_totals(
            customer.currency,
            &parts,
            customer.billing.tax_rate,
            prepaid_charged,
        );
        let doc = InvoiceDocument {
            customer_name: customer.name.clone(),
            locale: customer.billing.locale.clone(),
            timezone: customer.billing.timezone.clone(),
            sections,
            tax_rate: customer.billing.tax_rate,
            unpriced_events: unpriced,
            reason: None,
            corrects_number: None,
        };
        Ok(Rated {
            doc,
            totals,
            events: count,
        })
    }

    fn record_for(
        customer: &Customer,
        id: String,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        rated: &Rated,
        now: DateTime<Utc>,
    ) -> ServiceResult<InvoiceRecord> {
        let (doc, totals, events) = (&rated.doc, &rated.totals, rated.events);
        Ok(InvoiceRecord {
            id,
            customer_id: customer.id.clone(),
            kind: InvoiceKind::Invoice,
            number: None,
            status: InvoiceStatus::Draft,
            period_start: start,
            period_end: end,
            currency: customer.currency,
            subtotal: totals.subtotal,
            tax: totals.tax,
            total: totals.total,
            prepaid_applied: totals.prepaid_applied,
            prepaid_excess: totals.prepaid_excess,
            amount_due: totals.amount_due,
            document: serde_json::to_string(doc)
                .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))?,
            corrects_invoice_id: None,
            events,
            created_at: now,
            finalized_at: None,
            due_at: None,
            paid_at: None,
            voided_at: None,
            payment_attempts: 0,
            payment_reference: None,
            last_payment_error: None,
        })
    }

    /// Closes every customer's cycles that ended by `at`: a draft per closed cycle without a
    /// live invoice, re-rated on every run; finalised once `at` is past its end plus the
    /// grace period. Safe to run twice or on two instances at once: the database allows one
    /// live invoice per cycle and one finalisation per draft.
    pub async fn run_billing(
        &self,
        at: DateTime<Utc>,
        policy: BillingPolicy,
    ) -> ServiceResult<RunReport> {
        let mut report = RunReport::default();
        for customer in self.store.list_customers().await? {
            // Each customer in isolation: one that cannot be rated (no exchange rate for its
            // currency, say) is reported and alerted, and the run goes on with the others. An
            // unexpected error (the database unreachable) stops the run: it would fail them all.
            match self.bill_customer(&customer, at, policy, &mut report).await {
                Ok(()) => {}
                Err(e @ ServiceError::Internal(_)) => return Err(e),
                Err(e) => {
                    let failure = BillingFailure {
                        customer_id: customer.id.clone(),
                        code: e.code(),
                        message: e.to_string(),
                    };
                    self.alert(
                        "billing_failed",
                        "error",
                        Some(&customer.id),
                        &customer.id,
                        format!("billing {} failed: {}", customer.id, failure.message),
                        self.now(),
                    )
                    .await;
                    report.failed.push(failure);
                }
            }
        }
        Ok(report)
    }

    async fn bill_customer(
        &self,
        customer: &Customer,
        at: DateTime<Utc>,
        policy: BillingPolicy,
        report: &mut RunReport,
    ) -> ServiceResult<()> {
        let spec = cycle_spec(customer)?;
        let invoices = self.store.list_invoices(Some(&customer.id), None).await?;
        let live: HashSet<DateTime<Utc>> = invoices
            .iter()
            .filter(|i| i.kind == InvoiceKind::Invoice && i.status != InvoiceStatus::Void)
            .map(|i| i.period_start)
            .collect();
        let mut drafts: Vec<(DateTime<Utc>, DateTime<Utc>, String)> = invoices
            .iter()
            .filter(|i| i.kind == InvoiceKind::Invoice && i.status == InvoiceStatus::Draft)
            .map(|i| (i.period_start, i.period_end, i.id.clone()))
            .collect();
        for (start, end) in spec.closed_cycles(customer.created_at, at, 240) {
            if live.contains(&start) {
                continue;
            }
            let id = format!("inv_{}", random_hex(10));
            let others: Vec<_> = drafts.iter().map(|d| (d.0, d.1)).collect();
            let rated = self.rate_draft(customer, start, end, &others).await?;
            let record = Self::record_for(customer, id.clone(), (start, end), &rated, at)?;
            if self.store.create_invoice(&record).await? {
                report.drafted += 1;
                drafts.push((start, end, id));
            }
        }
        drafts.sort();
        for i in 0..drafts.len() {
            let (start, end, id) = drafts[i].clone();
            let others: Vec<_> = drafts
                .iter()
                .enumerate()
                .filter(|(j, _)| *j > i)
                .map(|(_, d)| (d.0, d.1))
                .collect();
            if at >= end + policy.grace {
                if let Some(inv) = self
                    .finalize_draft(customer, &id, start, end, &others, at)
                    .await?
                {
                    report.finalized.push(inv);
                }
            } else {
                let rated = self.rate_draft(customer, start, end, &others).await?;
                let record = Self::record_for(customer, id, (start, end), &rated, at)?;
                if self.store.update_draft(&record).await? {
                    report.refreshed += 1;
                }
            }
        }
        Ok(())
    }

    /// Re-rates and finalises a draft (retrying while events keep arriving for it). `None`
    /// when another run finalised or voided it first.
    async fn finalize_draft(
        &self,
        customer: &Customer,
        id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        other_drafts: &[(DateTime<Utc>, DateTime<Utc>)],
        now: DateTime<Utc>,
    ) -> ServiceResult<Option<InvoiceRecord>> {
        for _ in 0..5 {
            let rated = self.rate_draft(customer, start, end, other_drafts).await?;
            let mut record = Self::record_for(customer, id.to_string(), (start, end), &rated, now)?;
            let totals = &rated.totals;
            record.finalized_at = Some(now);
            record.due_at =
                Some(now + Duration::days(i64::from(customer.billing.payment_terms_days)));
            let rebate = (totals.prepaid_excess > Decimal::ZERO).then(|| WalletTransaction {
                id: format!("rebate:{id}"),
                customer_id: customer.id.clone(),
                kind: MovementKind::Granted,
                amount: totals.prepaid_excess,
                currency: customer.currency,
                event_id: None,
                expires_at: None,
                // A run may be dated ahead (`fatura invoices run --at`); a credit dated in
                // the future would not count in the wallet until then.
                created_at: now.min(Utc::now()),
            });
            match self
                .store
                .finalize_invoice(&record, &format!("FAT-{}", now.year()), rebate.as_ref())
                .await
            {
                Ok(Some(inv)) => {
                    // The rebate was recorded in the invoice's transaction; this process's
                    // wallet book counts it now (other processes pick it up from the
                    // database: `Fatura::sync_external_writes`).
                    if let Some(r) = &rebate {
                        self.wallets()
                            .credited(&r.customer_id, &r.id, r.amount)
                            .await;
                    }
                    // Nothing to collect (zero usage, or paid from the wallet): paid now.
                    let inv = if inv.amount_due.is_zero() {
                        self.store
                            .record_payment(&inv.id, None, Some(now), None)
                            .await?
                            .unwrap_or(inv)
                    } else {
                        inv
                    };
                    self.alert(
                        "invoice_finalized",
                        "info",
                        Some(&inv.customer_id),
                        &inv.id,
                        format!(
                            "invoice {} for {}: {} {} due {}",
                            inv.number.clone().unwrap_or_default(),
                            inv.customer_id,
                            inv.amount_due,
                            inv.currency,
                            inv.due_at.map(|d| d.to_rfc3339()).unwrap_or_default()
                        ),
                        now,
                    )
                    .await;
                    return Ok(Some(inv));
                }
                Ok(None) => continue,
                Err(fatura_store::StoreError::Conflict(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Conflict(format!(
            "invoice {id} could not be finalised: events kept arriving for its period; run again"
        )))
    }

    /// Finalises one draft now (whatever its grace period).
    pub async fn finalize_invoice(
        &self,
        id: &str,
        now: DateTime<Utc>,
    ) -> ServiceResult<InvoiceRecord> {
        let inv = self.invoice(id).await?;
        if inv.kind != InvoiceKind::Invoice || inv.status != InvoiceStatus::Draft {
            return Err(ServiceError::Conflict(format!(
                "invoice {id} is {}; only drafts can be finalised",
                inv.status
            )));
        }
        let customer = self.customer(&inv.customer_id).await?;
        let others: Vec<_> = self
            .store
            .list_invoices(Some(&customer.id), Some(InvoiceStatus::Draft))
            .await?
            .into_iter()
            .filter(|i| i.period_start > inv.period_start)
            .map(|i| (i.period_start, i.period_end))
            .collect();
        self.finalize_draft(
            &customer,
            id,
            inv.period_start,
            inv.period_end,
            &others,
            now,
        )
        .await?
        .ok_or_else(|| ServiceError::Conflict(format!("invoice {id} is no longer a draft")))
    }

    /// One invoice or credit note, or `NotFound`.
    pub async fn invoice(&self, id: &str) -> ServiceResult<InvoiceRecord> {
        self.store
            .get_invoice(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no invoice {id:?}")))
    }

    /// Invoices and credit notes, optionally of one customer and one status.
    pub async fn invoices(
        &self,
        customer_id: Option<&str>,
        status: Option<InvoiceStatus>,
    ) -> ServiceResult<Vec<InvoiceRecord>> {
        Ok(self.store.list_invoices(customer_id, status).await?)
    }

    /// Voids a draft or unpaid invoice; its events are billed again by the cycle's next
    /// run (a reissue).
    pub async fn void_invoice(&self, id: &str, now: DateTime<Utc>) -> ServiceResult<InvoiceRecord> {
        self.invoice(id).await?;
        Ok(self.store.void_invoice(id, now).await?)
    }

    /// Issues a credit note of `amount` (at most what is left of the invoice's total).
    pub async fn credit_note(
        &self,
        invoice_id: &str,
        amount: Decimal,
        reason: &str,
        now: DateTime<Utc>,
    ) -> ServiceResult<InvoiceRecord> {
        let inv = self.invoice(invoice_id).await?;
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 500 {
            return Err(ServiceError::Invalid("reason: 1 to 500 characters".into()));
        }
        if amount <= Decimal::ZERO || amount.normalize().scale() > inv.currency.minor_units() {
            return Err(ServiceError::Invalid(format!(
                "amount: a positive amount in {} with at most {} decimal places",
                inv.currency,
                inv.currency.minor_units()
            )));
        }
        let amount = minor(amount, inv.currency);
        let customer = self.customer(&inv.customer_id).await?;
        let doc = InvoiceDocument {
            customer_name: customer.name.clone(),
            locale: customer.billing.locale.clone(),
            timezone: customer.billing.timezone.clone(),
            sections: Vec::new(),
            tax_rate: None,
            unpriced_events: 0,
            reason: Some(reason.to_string()),
            corrects_number: inv.number.clone(),
        };
        let zero = minor(Decimal::ZERO, inv.currency);
        let note = InvoiceRecord {
            id: format!("cn_{}", random_hex(10)),
            customer_id: inv.customer_id.clone(),
            kind: InvoiceKind::CreditNote,
            number: None,
            status: InvoiceStatus::Open,
            period_start: inv.period_start,
            period_end: inv.period_end,
            currency: inv.currency,
            subtotal: amount,
            tax: zero,
            total: amount,
            prepaid_applied: zero,
            prepaid_excess: zero,
            amount_due: zero,
            document: serde_json::to_string(&doc)
                .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))?,
            corrects_invoice_id: Some(inv.id.clone()),
            events: 0,
            created_at: now,
            finalized_at: Some(now),
            due_at: None,
            paid_at: None,
            voided_at: None,
            payment_attempts: 0,
            payment_reference: None,
            last_payment_error: None,
        };
        Ok(self
            .store
            .issue_credit_note(&note, &format!("FAT-CN-{}", now.year()))
            .await?)
    }
}

/// Parses a stored invoice document.
pub fn document_of(inv: &InvoiceRecord) -> ServiceResult<InvoiceDocument> {
    serde_json::from_str(&inv.document)
        .map_err(|e| ServiceError::Internal(anyhow::anyhow!("bad invoice document: {e}")))
}
