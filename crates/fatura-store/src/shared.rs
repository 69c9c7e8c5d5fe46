//! The [`Store`] implementation both databases share: every statement is written here once.
//!
//! This file is compiled twice, as `sqlite::shared` and as `postgres::shared`
//! (`#[path = "shared.rs"] mod shared;` in each): every `super::` below is the database's
//! own module, so each copy is plain, concrete sqlx code for one database — no generics over
//! `sqlx::Database`, no macro. What a database does differently is asked of its module,
//! which provides:
//!
//! - `Db`, `DbRow`, `Conn` (the sqlx database, its row and connection types) and `Impl`
//!   (the store type this file implements [`Store`] for);
//! - on `Impl`:
//!   - `BACKEND`, `SHARED`, `PUBLISHES_LIVE`: what [`Store`] reports;
//!   - `reader()`, `writer()`: the pools reads and writes use;
//!   - `lock_catalog`, `lock_catalog_shared`: the catalog lock of a transaction;
//!   - `events_recorded`: what else an event insert writes in its transaction;
//!   - `apply_rollups`, `ROLLUP_MONEY_SUMS`, `rollup_money`: how rollup amounts are kept;
//!   - `push_tag_filter`: the condition on one tag;
//!   - `invoice_amount`, `outcome_value`: how amounts read back;
//!   - `live_feed`, `fleet_*`: what only a database shared by a fleet has;
//! - `MIGRATOR`.
//!
//! Placeholders are `$1`, `$2`, …: PostgreSQL's own, and SQLite takes them as numbered
//! parameters (sqlx binds `$N` to the N-th argument). Money binds and reads as
//! [`crate::types::Dec`], event tags bind as [`crate::types::JsonText`].
//!
//! Architecture Invariant: no statement is written in both `sqlite.rs` and `postgres.rs`;
//! a statement both databases run lives here (checked by `tests/one_sql_text.rs`).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use fatura_core::catalog::{PriceComponents, PriceVersion, UnitPrice};
use fatura_core::rollup::{
    Dims, Grain, RollupDelta, RollupKey, RollupTotals, add_event, minute_cutoff,
};
use fatura_core::usage::{UsageAggregator, UsageRecord};
use fatura_core::{Currency, TokenUsage};
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::{QueryBuilder, Row};

use super::{Conn, Db, DbRow, Impl};
use crate::types::{Dec, JsonText};
use crate::{
    AlertRecord, ApiKeyRecord, BillingSettings, Customer, EventPricing, ExportRow, FxRate,
    HoldGrant, HoldRequest, HoldRow, InsertOutcome, InvoiceRecord, LiveStream, OutcomeRecord,
    PaymentRecord, PlanAssignment, PlanVersionRecord, PreparedEvent, PriceImport, PricingChange,
    PricingData, Store, StoreError, StoreResult, StoredEvent, UnpricedEvent, UnpricedModel,
    UsageFilter, WalletTransaction, count, from_micros, micros, parse_terms, terms_json,
};
use fatura_core::status::InvoiceKind;

/// A decimal column.
fn dec(r: &DbRow, col: &str) -> StoreResult<Decimal> {
    Ok(r.try_get::<Dec, _>(col)?.0)
}

/// A column holding the name of a member of a closed set (a status, a kind).
fn named<T>(r: &DbRow, col: &str) -> StoreResult<T>
where
    T: FromStr<Err = fatura_core::status::UnknownName>,
{
    let text: String = r.try_get(col)?;
    text.parse()
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("in column {col}: {e}")))
}

/// A nullable decimal column.
fn opt_dec(r: &DbRow, col: &str) -> StoreResult<Option<Decimal>> {
    Ok(r.try_get::<Option<Dec>, _>(col)?.map(|d| d.0))
}

fn opt_time(r: &DbRow, col: &str) -> StoreResult<Option<DateTime<Utc>>> {
    r.try_get::<Option<i64>, _>(col)?
        .map(from_micros)
        .transpose()
}

fn currency(r: &DbRow) -> StoreResult<Currency> {
    let code: String = r.try_get("currency")?;
    Currency::from_str(&code).map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))
}

fn price(d: Decimal) -> StoreResult<UnitPrice> {
    UnitPrice::new(d)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("bad price in database: {e}")))
}

fn opt_price(d: Option<Decimal>) -> StoreResult<Option<UnitPrice>> {
    d.map(price).transpose()
}

fn opt_value(p: Option<UnitPrice>) -> Option<Dec> {
    p.map(|p| Dec(p.value()))
}

pub(super) fn u(v: u64) -> i64 {
    // Counts are bounded by fatura_core::event::MAX_COUNT (10^12), far below i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn customer_from_row(r: &DbRow) -> StoreResult<Customer> {
    Ok(Customer {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        currency: currency(r)?,
        prepaid: r.try_get::<String, _>("billing_mode")? == "prepaid",
        monthly_spend_limit: opt_dec(r, "monthly_spend_limit")?,
        billing: BillingSettings {
            anchor_day: u32::try_from(r.try_get::<i64, _>("billing_anchor_day")?).unwrap_or(1),
            timezone: r.try_get("timezone")?,
            payment_terms_days: u32::try_from(r.try_get::<i64, _>("payment_terms_days")?)
                .unwrap_or(30),
            tax_rate: opt_dec(r, "tax_rate")?,
            locale: r.try_get("locale")?,
        },
        stripe_customer_id: r.try_get("stripe_customer_id")?,
        status: named(r, "status")?,
        status_reason: r.try_get("status_reason")?,
        payment_method_id: r.try_get("payment_method_id")?,
        auto_top_up: match (
            opt_dec(r, "auto_top_up_threshold")?,
            opt_dec(r, "auto_top_up_amount")?,
        ) {
            (Some(t), Some(a)) => Some((t, a)),
            _ => None,
        },
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn key_from_row(r: &DbRow) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        key_hash: r.try_get("key_hash")?,
        prefix: r.try_get("prefix")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
        revoked_at: opt_time(r, "revoked_at_us")?,
    })
}

fn version_from_row(r: &DbRow) -> StoreResult<PriceVersion> {
    Ok(PriceVersion {
        id: r.try_get("id")?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        effective_from: from_micros(r.try_get("effective_from_us")?)?,
        prices: PriceComponents {
            prompt: price(dec(r, "prompt")?)?,
            completion: price(dec(r, "completion")?)?,
            cache_read: opt_price(opt_dec(r, "cache_read")?)?,
            cache_write: opt_price(opt_dec(r, "cache_write")?)?,
            reasoning: opt_price(opt_dec(r, "reasoning")?)?,
            per_request: price(dec(r, "per_request")?)?,
            per_image: price(dec(r, "per_image")?)?,
            web_search: price(dec(r, "web_search")?)?,
        },
    })
}

fn wallet_tx_from_row(r: &DbRow) -> StoreResult<WalletTransaction> {
    Ok(WalletTransaction {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        kind: named(r, "kind")?,
        amount: dec(r, "amount")?,
        currency: currency(r)?,
        event_id: r.try_get("event_id")?,
        expires_at: opt_time(r, "expires_at_us")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn payment_from_row(r: &DbRow) -> StoreResult<PaymentRecord> {
    Ok(PaymentRecord {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        invoice_id: r.try_get("invoice_id")?,
        kind: named(r, "kind")?,
        amount: dec(r, "amount")?,
        currency: currency(r)?,
        status: named(r, "status")?,
        reference: r.try_get("reference")?,
        error: r.try_get("error")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
        updated_at: from_micros(r.try_get("updated_at_us")?)?,
    })
}

fn invoice_from_row(r: &DbRow) -> StoreResult<InvoiceRecord> {
    let currency = currency(r)?;
    let amount =
        |col: &str| -> StoreResult<Decimal> { Ok(Impl::invoice_amount(dec(r, col)?, currency)) };
    Ok(InvoiceRecord {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        kind: named(r, "kind")?,
        number: r.try_get("number")?,
        status: named(r, "status")?,
        period_start: from_micros(r.try_get("period_start_us")?)?,
        period_end: from_micros(r.try_get("period_end_us")?)?,
        currency,
        subtotal: amount("subtotal")?,
        tax: amount("tax")?,
        total: amount("total")?,
        prepaid_applied: amount("prepaid_applied")?,
        prepaid_excess: amount("prepaid_excess")?,
        amount_due: amount("amount_due")?,
        document: r.try_get("document")?,
        corrects_invoice_id: r.try_get("corrects_invoice_id")?,
        events: r.try_get("events")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
        finalized_at: opt_time(r, "finalized_at_us")?,
        due_at: opt_time(r, "due_at_us")?,
        paid_at: opt_time(r, "paid_at_us")?,
        voided_at: opt_time(r, "voided_at_us")?,
        payment_attempts: r.try_get("payment_attempts")?,
        payment_reference: r.try_get("payment_reference")?,
        last_payment_error: r.try_get("last_payment_error")?,
    })
}

fn outcome_from_row(r: &DbRow) -> StoreResult<OutcomeRecord> {
    Ok(OutcomeRecord {
        id: r.try_get("id")?,
        content_hash: r.try_get("content_hash")?,
        customer_id: r.try_get("customer_id")?,
        timestamp: from_micros(r.try_get("ts_us")?)?,
        agent: r.try_get("agent")?,
        kind: r.try_get("kind")?,
        value: Impl::outcome_value(dec(r, "value")?),
        currency: currency(r)?,
        tags: r.try_get("tags")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn alert_from_row(r: &DbRow) -> StoreResult<AlertRecord> {
    Ok(AlertRecord {
        id: r.try_get("id")?,
        dedupe_key: r.try_get("dedupe_key")?,
        kind: r.try_get("kind")?,
        severity: r.try_get("severity")?,
        customer_id: r.try_get("customer_id")?,
        plan_id: r.try_get("plan_id")?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        reason: r.try_get("reason")?,
        message: r.try_get("message")?,
        first_seen: from_micros(r.try_get("first_seen_us")?)?,
        last_seen: from_micros(r.try_get("last_seen_us")?)?,
        occurrences: r.try_get("occurrences")?,
    })
}

fn plan_version_from_row(r: &DbRow) -> StoreResult<PlanVersionRecord> {
    let terms: String = r.try_get("terms")?;
    Ok(PlanVersionRecord {
        plan_id: r.try_get("plan_id")?,
        version: r.try_get("version")?,
        name: r.try_get("name")?,
        effective_from: from_micros(r.try_get("effective_from_us")?)?,
        terms: parse_terms(&terms)?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn assignment_from_row(r: &DbRow) -> StoreResult<PlanAssignment> {
    Ok(PlanAssignment {
        customer_id: r.try_get("customer_id")?,
        effective_from: from_micros(r.try_get("effective_from_us")?)?,
        plan_id: r.try_get("plan_id")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn fx_rate_from_row(r: &DbRow) -> StoreResult<FxRate> {
    Ok(FxRate {
        currency: currency(r)?,
        date: r.try_get::<NaiveDate, _>("rate_date")?,
        rate: dec(r, "rate")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn usage_from_row(r: &DbRow) -> StoreResult<TokenUsage> {
    TokenUsage::new(
        count(r.try_get("input_tokens")?)?,
        count(r.try_get("output_tokens")?)?,
        count(r.try_get("cached_input_tokens")?)?,
        count(r.try_get("cache_write_tokens")?)?,
        count(r.try_get("reasoning_tokens")?)?,
        count(r.try_get("requests")?)?,
    )
    .map_err(|e| StoreError::Internal(anyhow::anyhow!("stored event is invalid: {e}")))
}

fn stored_event_from_row(r: &DbRow) -> StoreResult<StoredEvent> {
    Ok(StoredEvent {
        id: r.try_get("id")?,
        timestamp: from_micros(r.try_get("ts_us")?)?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        usage: usage_from_row(r)?,
        price_version_id: r.try_get("price_version_id")?,
        cost: opt_dec(r, "cost")?,
        revenue: opt_dec(r, "revenue")?,
    })
}

fn export_row_from_row(r: &DbRow) -> StoreResult<ExportRow> {
    Ok(ExportRow {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        timestamp: from_micros(r.try_get("ts_us")?)?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        usage: usage_from_row(r)?,
        cost: opt_dec(r, "cost")?,
        revenue: opt_dec(r, "revenue")?,
        tags: r.try_get("tags")?,
        upstream: r.try_get("upstream")?,
    })
}

fn rollup_from_row(r: &DbRow) -> StoreResult<(RollupKey, RollupTotals)> {
    let grain: String = r.try_get("grain")?;
    let (cost, revenue) = Impl::rollup_money(r)?;
    Ok((
        RollupKey {
            grain: crate::grain_of(&grain)?,
            bucket: from_micros(r.try_get("bucket_us")?)?,
            customer_id: r.try_get("customer_id")?,
            provider: r.try_get("provider")?,
            model: r.try_get("model")?,
            agent: r.try_get("agent")?,
        },
        RollupTotals {
            events: r.try_get("events")?,
            requests: r.try_get("requests")?,
            input_tokens: r.try_get("input_tokens")?,
            output_tokens: r.try_get("output_tokens")?,
            cached_input_tokens: r.try_get("cached_input_tokens")?,
            cache_write_tokens: r.try_get("cache_write_tokens")?,
            reasoning_tokens: r.try_get("reasoning_tokens")?,
            unpriced_events: r.try_get("unpriced_events")?,
            cost,
            revenue,
        },
    ))
}

async fn revision_in(conn: &mut Conn) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT revision FROM catalog_meta WHERE id = 1")
            .fetch_one(conn)
            .await?,
    )
}

async fn bump_revision(conn: &mut Conn) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "UPDATE catalog_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(conn)
    .await?)
}

async fn invoice_in(conn: &mut Conn, id: &str) -> StoreResult<Option<InvoiceRecord>> {
    sqlx::query("SELECT * FROM invoices WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(invoice_from_row)
        .transpose()
}

async fn existing_invoice_in(conn: &mut Conn, id: &str) -> StoreResult<InvoiceRecord> {
    invoice_in(conn, id)
        .await?
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("invoice {id:?} vanished")))
}

const INSERT_INVOICE: &str = "INSERT INTO invoices (id, customer_id, kind, number, status, period_start_us, period_end_us, \
     currency, subtotal, tax, total, prepaid_applied, prepaid_excess, amount_due, document, corrects_invoice_id, events, \
     created_at_us, finalized_at_us, due_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
     ON CONFLICT DO NOTHING";

fn bind_invoice<'q>(
    q: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>,
    inv: &'q InvoiceRecord,
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>> {
    q.bind(&inv.id)
        .bind(&inv.customer_id)
        .bind(inv.kind.as_str())
        // A credit note is finalised at once: its number is set in the same transaction.
        .bind(inv.finalized_at.map(|_| format!("pending:{}", inv.id)))
        .bind(inv.status.as_str())
        .bind(micros(inv.period_start))
        .bind(micros(inv.period_end))
        .bind(inv.currency.code())
        .bind(Dec(inv.subtotal))
        .bind(Dec(inv.tax))
        .bind(Dec(inv.total))
        .bind(Dec(inv.prepaid_applied))
        .bind(Dec(inv.prepaid_excess))
        .bind(Dec(inv.amount_due))
        .bind(&inv.document)
        .bind(&inv.corrects_invoice_id)
        .bind(inv.events)
        .bind(micros(inv.created_at))
        .bind(inv.finalized_at.map(micros))
        .bind(inv.due_at.map(micros))
}

/// The next gapless number of `series` (`FAT-2026` → `FAT-2026-000001`), in the caller's
/// transaction: the row lock on the series serialises concurrent finalisations.
async fn next_number(tx: &mut Conn, series: &str) -> StoreResult<String> {
    sqlx::query("INSERT INTO invoice_numbers (series, last) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(series)
        .execute(&mut *tx)
        .await?;
    let n: i64 = sqlx::query_scalar(
        "UPDATE invoice_numbers SET last = last + 1 WHERE series = $1 RETURNING last",
    )
    .bind(series)
    .fetch_one(&mut *tx)
    .await?;
    Ok(format!("{series}-{n:06}"))
}

async fn set_number(tx: &mut Conn, id: &str, number: &str) -> StoreResult<()> {
    sqlx::query("UPDATE invoices SET number = $1 WHERE id = $2")
        .bind(number)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn insert_wallet_tx(tx: &mut Conn, c: &WalletTransaction) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, NULL, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(&c.id)
    .bind(&c.customer_id)
    .bind(c.kind.as_str())
    .bind(Dec(c.amount))
    .bind(c.currency.code())
    .bind(c.expires_at.map(micros))
    .bind(micros(c.created_at))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_plan_version(tx: &mut Conn, v: &PlanVersionRecord) -> StoreResult<()> {
    let res = sqlx::query(
        "INSERT INTO plan_versions (plan_id, version, name, effective_from_us, terms, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(&v.plan_id)
    .bind(v.version)
    .bind(&v.name)
    .bind(micros(v.effective_from))
    .bind(terms_json(&v.terms)?)
    .bind(micros(v.created_at))
    .execute(&mut *tx)
    .await?;
    if res.rows_affected() == 0 {
        return Err(StoreError::Conflict(format!(
            "plan {:?} changed meanwhile (version {} exists); retry",
            v.plan_id, v.version
        )));
    }
    Ok(())
}

/// Business rule: the credit notes of an invoice (those not void) never add up to more than
/// its total, and only a finalised invoice (open or paid) is corrected.
async fn check_credit_note(tx: &mut Conn, note: &InvoiceRecord) -> StoreResult<()> {
    let Some(original) = note.corrects_invoice_id.as_deref() else {
        return Err(StoreError::Conflict(
            "a credit note needs an invoice".into(),
        ));
    };
    let Some(inv) = invoice_in(&mut *tx, original).await? else {
        return Err(StoreError::Conflict(format!("no invoice {original:?}")));
    };
    if inv.kind != InvoiceKind::Invoice || !inv.status.is_final() {
        return Err(StoreError::Conflict(format!(
            "credit notes correct finalised invoices; {original:?} is {} {}",
            inv.status, inv.kind
        )));
    }
    let notes: Vec<Dec> = sqlx::query_scalar(
        "SELECT total FROM invoices WHERE corrects_invoice_id = $1 AND kind = 'credit_note' AND status <> 'void'",
    )
    .bind(original)
    .fetch_all(&mut *tx)
    .await?;
    let credited: Decimal = notes.iter().map(|n| n.0).sum();
    if credited + note.total > inv.total {
        return Err(StoreError::Conflict(format!(
            "credit notes would exceed the invoice: {} already credited of {}",
            credited, inv.total
        )));
    }
    Ok(())
}

/// Appends the conditions of a usage filter (the query so far ends in `WHERE 1 = 1`).
fn push_usage_filter<'a>(qb: &mut QueryBuilder<'a, Db>, filter: &'a UsageFilter) {
    if let Some(c) = &filter.customer_id {
        qb.push(" AND customer_id = ").push_bind(c);
    }
    if let Some(t) = filter.from {
        qb.push(" AND ts_us >= ").push_bind(micros(t));
    }
    if let Some(t) = filter.to {
        qb.push(" AND ts_us < ").push_bind(micros(t));
    }
    if let Some(p) = &filter.provider {
        qb.push(" AND provider = ").push_bind(p);
    }
    if let Some(m) = &filter.model {
        qb.push(" AND model = ").push_bind(m);
    }
    for (k, v) in &filter.tags {
        Impl::push_tag_filter(qb, k, v);
    }
}

/// The columns of an event that [`stored_event_from_row`] reads.
const STORED_EVENT_COLUMNS: &str = "id, ts_us, provider, model, input_tokens, output_tokens, cached_input_tokens, \
     cache_write_tokens, reasoning_tokens, requests, price_version_id, cost, revenue";

impl Impl {
    /// Counts the events recorded before rollups existed, once (in `tx`, which holds the
    /// catalog lock, so that two instances migrating at once do not both count).
    async fn backfill_rollups(&self, tx: &mut Conn) -> StoreResult<()> {
        let rollups: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rollups")
            .fetch_one(&mut *tx)
            .await?;
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
            .fetch_one(&mut *tx)
            .await?;
        if rollups == 0 && events > 0 {
            let delta = self.recount_rollups().await?;
            Impl::apply_rollups(tx, &delta).await?;
        }
        Ok(())
    }

    async fn stored_events(
        &self,
        sql: String,
        customer_id: &str,
        from: Option<i64>,
        to: i64,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut q = sqlx::query(&sql).bind(customer_id);
        if let Some(from) = from {
            q = q.bind(from);
        }
        let mut rows = q.bind(to).fetch(self.reader());
        let mut out = Vec::new();
        while let Some(r) = rows.try_next().await? {
            out.push(stored_event_from_row(&r)?);
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for Impl {
    fn backend(&self) -> &'static str {
        Impl::BACKEND
    }

    async fn migrate(&self) -> StoreResult<()> {
        super::MIGRATOR.run(self.writer()).await?;
        let mut tx = self.writer().begin().await?;
        Impl::lock_catalog(&mut tx).await?;
        self.backfill_rollups(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(self.reader()).await?;
        Ok(())
    }

    async fn create_customer(&self, c: &Customer) -> StoreResult<()> {
        let res = sqlx::query(
            "INSERT INTO customers (id, name, currency, created_at_us, billing_mode, monthly_spend_limit, billing_anchor_day, \
             timezone, payment_terms_days, tax_rate, locale) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(c.currency.code())
        .bind(micros(c.created_at))
        .bind(if c.prepaid { "prepaid" } else { "postpaid" })
        .bind(c.monthly_spend_limit.map(Dec))
        .bind(i64::from(c.billing.anchor_day))
        .bind(&c.billing.timezone)
        .bind(i64::from(c.billing.payment_terms_days))
        .bind(c.billing.tax_rate.map(Dec))
        .bind(&c.billing.locale)
        .execute(self.writer())
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "customer {:?} already exists",
                c.id
            )));
        }
        Ok(())
    }

    async fn set_spend_limit(&self, id: &str, limit: Option<Decimal>) -> StoreResult<bool> {
        let res = sqlx::query("UPDATE customers SET monthly_spend_limit = $1 WHERE id = $2")
            .bind(limit.map(Dec))
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn get_customer(&self, id: &str) -> StoreResult<Option<Customer>> {
        sqlx::query("SELECT * FROM customers WHERE id = $1")
            .bind(id)
            .fetch_optional(self.reader())
            .await?
            .as_ref()
            .map(customer_from_row)
            .transpose()
    }

    async fn list_customers(&self) -> StoreResult<Vec<Customer>> {
        sqlx::query("SELECT * FROM customers ORDER BY id")
            .fetch_all(self.reader())
            .await?
            .iter()
            .map(customer_from_row)
            .collect()
    }

    async fn existing_customer_ids(&self, ids: &[String]) -> StoreResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in crate::ladder_chunks(ids) {
            let mut qb = QueryBuilder::<Db>::new("SELECT id FROM customers WHERE id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id);
            }
            qb.push(")");
            let rows: Vec<String> = qb.build_query_scalar().fetch_all(self.reader()).await?;
            found.extend(rows);
        }
        Ok(found)
    }

    async fn add_wallet_credit(&self, c: &WalletTransaction) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.id)
        .bind(&c.customer_id)
        .bind(c.kind.as_str())
        .bind(Dec(c.amount))
        .bind(c.currency.code())
        .bind(c.event_id.as_deref())
        .bind(c.expires_at.map(micros))
        .bind(micros(c.created_at))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn wallet_transactions(&self, customer_id: &str) -> StoreResult<Vec<WalletTransaction>> {
        let rows = sqlx::query(
            "SELECT * FROM wallet_transactions WHERE customer_id = $1 ORDER BY created_at_us, id",
        )
        .bind(customer_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter().map(wallet_tx_from_row).collect()
    }

    async fn wallet_transactions_page(
        &self,
        customer_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Option<Vec<WalletTransaction>>> {
        let rows = match after {
            None => {
                sqlx::query("SELECT * FROM wallet_transactions WHERE customer_id = $1 ORDER BY created_at_us, id LIMIT $2")
                    .bind(customer_id)
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
            }
            Some(after) => {
                let Some(at): Option<i64> = sqlx::query_scalar("SELECT created_at_us FROM wallet_transactions WHERE id = $1 AND customer_id = $2")
                    .bind(after)
                    .bind(customer_id)
                    .fetch_optional(self.reader())
                    .await?
                else {
                    return Ok(None);
                };
                sqlx::query("SELECT * FROM wallet_transactions WHERE customer_id = $1 AND (created_at_us, id) > ($2, $3) ORDER BY created_at_us, id LIMIT $4")
                    .bind(customer_id)
                    .bind(at)
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
            }
        };
        rows.iter()
            .map(wallet_tx_from_row)
            .collect::<StoreResult<Vec<_>>>()
            .map(Some)
    }

    async fn create_api_key(&self, k: &ApiKeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, customer_id, key_hash, prefix, created_at_us, revoked_at_us) VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&k.id)
        .bind(&k.customer_id)
        .bind(&k.key_hash)
        .bind(&k.prefix)
        .bind(micros(k.created_at))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn find_active_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        sqlx::query("SELECT * FROM api_keys WHERE key_hash = $1 AND revoked_at_us IS NULL")
            .bind(key_hash)
            .fetch_optional(self.reader())
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn list_api_keys(&self, customer_id: &str) -> StoreResult<Vec<ApiKeyRecord>> {
        sqlx::query("SELECT * FROM api_keys WHERE customer_id = $1 ORDER BY created_at_us, id")
            .bind(customer_id)
            .fetch_all(self.reader())
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE api_keys SET revoked_at_us = $1 WHERE id = $2 AND revoked_at_us IS NULL",
        )
        .bind(micros(at))
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn catalog_revision(&self) -> StoreResult<i64> {
        let mut conn = self.reader().acquire().await?;
        revision_in(&mut conn).await
    }

    async fn load_catalog(&self) -> StoreResult<(i64, Vec<PriceVersion>)> {
        let mut tx = self.reader().begin().await?;
        let revision = revision_in(&mut tx).await?;
        let rows =
            sqlx::query("SELECT * FROM price_versions ORDER BY provider, model, effective_from_us")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let versions = rows
            .iter()
            .map(version_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((revision, versions))
    }

    async fn import_prices(&self, import: &PriceImport) -> StoreResult<i64> {
        let mut tx = self.writer().begin().await?;
        Impl::lock_catalog(&mut tx).await?;
        let revision = revision_in(&mut tx).await?;
        if revision != import.expected_revision {
            return Err(StoreError::CatalogChanged);
        }
        if import.create.is_empty() {
            return Ok(revision);
        }
        let from = micros(import.effective_from);
        for (item, next) in &import.create {
            let until = next.map(micros).unwrap_or(i64::MAX);
            let costed: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM usage_events WHERE provider = $1 AND model = $2 AND ts_us >= $3 AND ts_us < $4 AND cost IS NOT NULL",
            )
            .bind(&item.provider)
            .bind(&item.model)
            .bind(from)
            .bind(until)
            .fetch_one(&mut *tx)
            .await?;
            if costed > 0 {
                return Err(StoreError::Conflict(format!(
                    "{costed} events of {}/{} at or after {} are already costed with another price version; \
                     choose a later effective_from",
                    item.provider,
                    item.model,
                    import.effective_from.to_rfc3339()
                )));
            }
        }
        for chunk in crate::ladder_chunks(&import.create) {
            let mut qb = QueryBuilder::<Db>::new(
                "INSERT INTO price_versions (provider, model, effective_from_us, prompt, completion, cache_read, \
                 cache_write, reasoning, per_request, per_image, web_search, source, imported_at_us) ",
            );
            qb.push_values(chunk, |mut b, (item, _)| {
                let p = &item.prices;
                b.push_bind(&item.provider)
                    .push_bind(&item.model)
                    .push_bind(from)
                    .push_bind(Dec(p.prompt.value()))
                    .push_bind(Dec(p.completion.value()))
                    .push_bind(opt_value(p.cache_read))
                    .push_bind(opt_value(p.cache_write))
                    .push_bind(opt_value(p.reasoning))
                    .push_bind(Dec(p.per_request.value()))
                    .push_bind(Dec(p.per_image.value()))
                    .push_bind(Dec(p.web_search.value()))
                    .push_bind(&import.source)
                    .push_bind(micros(import.imported_at));
            });
            qb.build().execute(&mut *tx).await?;
        }
        let new_revision = bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(new_revision)
    }

    async fn insert_events(
        &self,
        events: &[PreparedEvent],
        catalog_revision: i64,
    ) -> StoreResult<InsertOutcome> {
        let mut tx = self.writer().begin().await?;
        Impl::lock_catalog_shared(&mut tx).await?;
        if revision_in(&mut tx).await? != catalog_revision {
            return Err(StoreError::CatalogChanged);
        }
        let mut inserted: HashSet<String> = HashSet::with_capacity(events.len());
        for chunk in crate::ladder_chunks(events) {
            let mut qb = QueryBuilder::<Db>::new(
                "INSERT INTO usage_events (id, content_hash, customer_id, ts_us, provider, model, input_tokens, \
                 output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, requests, tags, \
                 upstream_cost, price_version_id, cost, revenue, ingested_at_us, upstream, estimated) ",
            );
            qb.push_values(chunk, |mut b, p| {
                let e = &p.event;
                let tags = serde_json::to_string(&e.tags).unwrap_or_else(|_| "{}".into());
                b.push_bind(e.id.as_str())
                    .push_bind(&p.content_hash)
                    .push_bind(e.customer_id.as_str())
                    .push_bind(micros(e.timestamp))
                    .push_bind(&e.provider)
                    .push_bind(&e.model)
                    .push_bind(u(e.usage.input()))
                    .push_bind(u(e.usage.output()))
                    .push_bind(u(e.usage.cached_input()))
                    .push_bind(u(e.usage.cache_write()))
                    .push_bind(u(e.usage.reasoning()))
                    .push_bind(u(e.usage.requests()))
                    .push_bind(JsonText(tags))
                    .push_bind(e.upstream_cost.map(Dec))
                    .push_bind(p.pricing.as_ref().map(|x| x.price_version_id))
                    .push_bind(p.pricing.as_ref().map(|x| Dec(x.cost)))
                    .push_bind(p.pricing.as_ref().map(|x| Dec(x.revenue)))
                    .push_bind(micros(p.ingested_at))
                    .push_bind(e.upstream.as_deref())
                    .push_bind(e.estimated);
            });
            qb.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
            let ids: Vec<String> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
            inserted.extend(ids);
        }
        let leftovers: Vec<&PreparedEvent> = events
            .iter()
            .filter(|p| !inserted.contains(p.event.id.as_str()))
            .collect();
        for chunk in crate::ladder_chunks(&leftovers) {
            let mut qb =
                QueryBuilder::<Db>::new("SELECT id, content_hash FROM usage_events WHERE id IN (");
            let mut sep = qb.separated(", ");
            for p in chunk {
                sep.push_bind(p.event.id.as_str());
            }
            qb.push(")");
            let stored: HashMap<String, String> = qb
                .build_query_as::<(String, String)>()
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            for p in chunk {
                if stored.get(p.event.id.as_str()) != Some(&p.content_hash) {
                    return Err(StoreError::EventConflict {
                        id: p.event.id.to_string(),
                    });
                }
            }
        }
        // Wallet charges of the newly recorded prepaid events, in the same transaction.
        let charged: Vec<&PreparedEvent> = events
            .iter()
            .filter(|p| p.event.prepaid_charge.is_some() && inserted.contains(p.event.id.as_str()))
            .collect();
        for chunk in crate::ladder_chunks(&charged) {
            let mut qb = QueryBuilder::<Db>::new(
                "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
                 SELECT column1, column2, 'charge', column3, (SELECT currency FROM customers WHERE id = column2), \
                 column4, NULL, column5 FROM (",
            );
            qb.push_values(chunk, |mut b, p| {
                let c = p.event.prepaid_charge.unwrap_or_default();
                b.push_bind(format!("charge:{}", p.event.id))
                    .push_bind(p.event.customer_id.as_str())
                    .push_bind(Dec(-c))
                    .push_bind(p.event.id.as_str())
                    .push_bind(micros(p.ingested_at));
            });
            qb.push(") AS v");
            qb.build().execute(&mut *tx).await?;
        }
        Impl::events_recorded(&mut tx, events, &inserted).await?;
        Impl::apply_rollups(&mut tx, &crate::delta_of_inserted(events, &inserted)).await?;
        tx.commit().await?;
        let unpriced = events
            .iter()
            .filter(|p| p.pricing.is_none() && inserted.contains(p.event.id.as_str()))
            .count();
        Ok(InsertOutcome {
            accepted: inserted.len() as u64,
            duplicates: leftovers.len() as u64,
            unpriced: unpriced as u64,
            inserted,
        })
    }

    async fn aggregate_usage(
        &self,
        filter: &UsageFilter,
        agg: &mut UsageAggregator,
    ) -> StoreResult<()> {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT customer_id, provider, model, ts_us, requests, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, cost, revenue, estimated FROM usage_events WHERE 1 = 1",
        );
        push_usage_filter(&mut qb, filter);
        let query = qb.build();
        let mut rows = query.fetch(self.reader());
        while let Some(r) = rows.try_next().await? {
            let record = UsageRecord {
                customer_id: r.try_get("customer_id")?,
                provider: r.try_get("provider")?,
                model: r.try_get("model")?,
                timestamp: from_micros(r.try_get("ts_us")?)?,
                requests: count(r.try_get("requests")?)?,
                input_tokens: count(r.try_get("input_tokens")?)?,
                output_tokens: count(r.try_get("output_tokens")?)?,
                cached_input_tokens: count(r.try_get("cached_input_tokens")?)?,
                cache_write_tokens: count(r.try_get("cache_write_tokens")?)?,
                reasoning_tokens: count(r.try_get("reasoning_tokens")?)?,
                cost: opt_dec(&r, "cost")?,
                revenue: opt_dec(&r, "revenue")?,
                estimated: r.try_get("estimated")?,
            };
            agg.add(&record)
                .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?;
        }
        Ok(())
    }

    async fn unpriced_models(&self, customer_id: Option<&str>) -> StoreResult<Vec<UnpricedModel>> {
        let rows = sqlx::query(
            "SELECT provider, model, COUNT(*) AS events, CAST(SUM(requests) AS BIGINT) AS requests, \
             CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, \
             MIN(ts_us) AS first_us, MAX(ts_us) AS last_us \
             FROM usage_events WHERE cost IS NULL AND (CAST($1 AS TEXT) IS NULL OR customer_id = $1) \
             GROUP BY provider, model ORDER BY provider, model",
        )
        .bind(customer_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UnpricedModel {
                    provider: r.try_get("provider")?,
                    model: r.try_get("model")?,
                    events: count(r.try_get("events")?)?,
                    requests: count(r.try_get("requests")?)?,
                    input_tokens: count(r.try_get("input_tokens")?)?,
                    output_tokens: count(r.try_get("output_tokens")?)?,
                    first_timestamp: from_micros(r.try_get("first_us")?)?,
                    last_timestamp: from_micros(r.try_get("last_us")?)?,
                })
            })
            .collect()
    }

    async fn unpriced_events(&self, after: &str, limit: u32) -> StoreResult<Vec<UnpricedEvent>> {
        let rows = sqlx::query(
            "SELECT id, customer_id, provider, model, ts_us, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, \
             reasoning_tokens, requests FROM usage_events WHERE cost IS NULL AND id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UnpricedEvent {
                    id: r.try_get("id")?,
                    customer_id: r.try_get("customer_id")?,
                    provider: r.try_get("provider")?,
                    model: r.try_get("model")?,
                    timestamp: from_micros(r.try_get("ts_us")?)?,
                    usage: usage_from_row(r)?,
                })
            })
            .collect()
    }

    async fn price_events(
        &self,
        pricing: &[(String, EventPricing)],
        catalog_revision: i64,
    ) -> StoreResult<u64> {
        let mut tx = self.writer().begin().await?;
        Impl::lock_catalog_shared(&mut tx).await?;
        if revision_in(&mut tx).await? != catalog_revision {
            return Err(StoreError::CatalogChanged);
        }
        let mut priced = 0;
        let mut delta = RollupDelta::new();
        let minute_since = minute_cutoff(Utc::now());
        for (id, p) in pricing {
            let row = sqlx::query(
                "UPDATE usage_events SET price_version_id = $1, cost = $2, revenue = $3 WHERE id = $4 AND cost IS NULL \
                 RETURNING customer_id, ts_us, provider, model, CAST(tags AS TEXT) AS tags",
            )
            .bind(p.price_version_id)
            .bind(Dec(p.cost))
            .bind(Dec(p.revenue))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = row {
                let (customer, provider, model, tags): (String, String, String, String) = (
                    r.try_get("customer_id")?,
                    r.try_get("provider")?,
                    r.try_get("model")?,
                    r.try_get("tags")?,
                );
                add_event(
                    &mut delta,
                    &customer,
                    &provider,
                    &model,
                    crate::agent_of(&tags).as_deref(),
                    from_micros(r.try_get("ts_us")?)?,
                    &RollupTotals::of_pricing(p.cost, p.revenue),
                    minute_since,
                );
                priced += 1;
            }
        }
        Impl::apply_rollups(&mut tx, &delta).await?;
        tx.commit().await?;
        Ok(priced)
    }

    async fn count_events(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
            .fetch_one(self.reader())
            .await?;
        count(n)
    }

    async fn apply_pricing_change(&self, change: &PricingChange) -> StoreResult<i64> {
        let mut tx = self.writer().begin().await?;
        Impl::lock_catalog(&mut tx).await?;
        match change {
            PricingChange::CreatePlan(v) => {
                let res = sqlx::query(
                    "INSERT INTO plans (id, created_at_us) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&v.plan_id)
                .bind(micros(v.created_at))
                .execute(&mut *tx)
                .await?;
                if res.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "plan {:?} already exists",
                        v.plan_id
                    )));
                }
                insert_plan_version(&mut tx, v).await?;
            }
            PricingChange::AddPlanVersion(v) => insert_plan_version(&mut tx, v).await?,
            PricingChange::AssignPlan(a) => {
                let res = sqlx::query(
                    "INSERT INTO customer_plans (customer_id, effective_from_us, plan_id, created_at_us) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(&a.customer_id)
                .bind(micros(a.effective_from))
                .bind(&a.plan_id)
                .bind(micros(a.created_at))
                .execute(&mut *tx)
                .await?;
                if res.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "customer {:?} already has a plan assignment at {}",
                        a.customer_id,
                        a.effective_from.to_rfc3339()
                    )));
                }
            }
            PricingChange::PutFxRate(r) => {
                let existing: Option<Dec> = sqlx::query_scalar(
                    "SELECT rate FROM fx_rates WHERE currency = $1 AND rate_date = $2",
                )
                .bind(r.currency.code())
                .bind(r.date)
                .fetch_optional(&mut *tx)
                .await?;
                match existing {
                    Some(Dec(old)) if old == r.rate => {
                        return revision_in(&mut tx).await;
                    }
                    Some(Dec(old)) => {
                        return Err(StoreError::Conflict(format!(
                            "the USD→{} rate for {} is already {old}; rates are history and are not replaced",
                            r.currency, r.date
                        )));
                    }
                    None => {}
                }
                sqlx::query(
                    "INSERT INTO fx_rates (currency, rate_date, rate, created_at_us) VALUES ($1, $2, $3, $4)",
                )
                .bind(r.currency.code())
                .bind(r.date)
                .bind(Dec(r.rate))
                .bind(micros(r.created_at))
                .execute(&mut *tx)
                .await?;
            }
        }
        let revision = bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(revision)
    }

    async fn load_pricing(&self) -> StoreResult<PricingData> {
        let mut tx = self.reader().begin().await?;
        let versions = sqlx::query("SELECT * FROM plan_versions ORDER BY plan_id, version")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(plan_version_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let assignments =
            sqlx::query("SELECT * FROM customer_plans ORDER BY customer_id, effective_from_us")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(assignment_from_row)
                .collect::<StoreResult<Vec<_>>>()?;
        let fx_rates = sqlx::query("SELECT * FROM fx_rates ORDER BY currency, rate_date")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(fx_rate_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        tx.commit().await?;
        Ok(PricingData {
            versions,
            assignments,
            fx_rates,
        })
    }

    async fn raise_alert(&self, a: &AlertRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO alerts (id, dedupe_key, kind, severity, customer_id, plan_id, provider, model, reason, \
             message, first_seen_us, last_seen_us, occurrences) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1) \
             ON CONFLICT (dedupe_key) DO UPDATE SET last_seen_us = CASE WHEN excluded.last_seen_us > alerts.last_seen_us \
             THEN excluded.last_seen_us ELSE alerts.last_seen_us END, \
             occurrences = alerts.occurrences + 1, message = excluded.message",
        )
        .bind(&a.id)
        .bind(&a.dedupe_key)
        .bind(&a.kind)
        .bind(&a.severity)
        .bind(&a.customer_id)
        .bind(&a.plan_id)
        .bind(&a.provider)
        .bind(&a.model)
        .bind(&a.reason)
        .bind(&a.message)
        .bind(micros(a.first_seen))
        .bind(micros(a.last_seen))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn list_alerts(&self) -> StoreResult<Vec<AlertRecord>> {
        sqlx::query("SELECT * FROM alerts ORDER BY last_seen_us DESC, id")
            .fetch_all(self.reader())
            .await?
            .iter()
            .map(alert_from_row)
            .collect()
    }

    async fn customer_events(
        &self,
        customer_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let sql = format!(
            "SELECT {STORED_EVENT_COLUMNS} FROM usage_events WHERE customer_id = $1 AND ts_us >= $2 AND ts_us < $3"
        );
        self.stored_events(sql, customer_id, Some(micros(from)), micros(to))
            .await
    }

    async fn versions_imported_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM price_versions WHERE imported_at_us >= $1 ORDER BY id",
        )
        .bind(micros(since))
        .fetch_all(self.reader())
        .await?)
    }

    async fn update_billing_settings(&self, id: &str, s: &BillingSettings) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE customers SET billing_anchor_day = $1, timezone = $2, payment_terms_days = $3, tax_rate = $4, \
             locale = $5 WHERE id = $6",
        )
        .bind(i64::from(s.anchor_day))
        .bind(&s.timezone)
        .bind(i64::from(s.payment_terms_days))
        .bind(s.tax_rate.map(Dec))
        .bind(&s.locale)
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn set_customer_status(
        &self,
        id: &str,
        status: fatura_core::status::CustomerStatus,
        reason: Option<&str>,
    ) -> StoreResult<bool> {
        let res = sqlx::query("UPDATE customers SET status = $1, status_reason = $2 WHERE id = $3")
            .bind(status.as_str())
            .bind(reason)
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn set_stripe_customer_id(&self, id: &str, stripe_id: &str) -> StoreResult<String> {
        let mut tx = self.writer().begin().await?;
        sqlx::query(
            "UPDATE customers SET stripe_customer_id = $1 WHERE id = $2 AND stripe_customer_id IS NULL",
        )
        .bind(stripe_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        current.ok_or_else(|| StoreError::Internal(anyhow::anyhow!("no Stripe id stored")))
    }

    async fn uninvoiced_events(
        &self,
        customer_id: &str,
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let sql = format!(
            "SELECT {STORED_EVENT_COLUMNS} FROM usage_events WHERE customer_id = $1 AND ts_us < $2 AND invoice_id IS NULL"
        );
        self.stored_events(sql, customer_id, None, micros(before))
            .await
    }

    async fn create_invoice(&self, inv: &InvoiceRecord) -> StoreResult<bool> {
        let res = bind_invoice(sqlx::query(INSERT_INVOICE), inv)
            .execute(self.writer())
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn update_draft(&self, inv: &InvoiceRecord) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE invoices SET subtotal = $1, tax = $2, total = $3, prepaid_applied = $4, prepaid_excess = $5, \
             amount_due = $6, document = $7, events = $8 WHERE id = $9 AND status = 'draft'",
        )
        .bind(Dec(inv.subtotal))
        .bind(Dec(inv.tax))
        .bind(Dec(inv.total))
        .bind(Dec(inv.prepaid_applied))
        .bind(Dec(inv.prepaid_excess))
        .bind(Dec(inv.amount_due))
        .bind(&inv.document)
        .bind(inv.events)
        .bind(&inv.id)
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn finalize_invoice(
        &self,
        inv: &InvoiceRecord,
        series: &str,
        rebate: Option<&WalletTransaction>,
    ) -> StoreResult<Option<InvoiceRecord>> {
        let mut tx = self.writer().begin().await?;
        let finalized_at = inv.finalized_at.unwrap_or(inv.created_at);
        let claimed = sqlx::query(
            "UPDATE invoices SET status = 'open', subtotal = $1, tax = $2, total = $3, prepaid_applied = $4, \
             prepaid_excess = $5, amount_due = $6, document = $7, events = $8, finalized_at_us = $9, due_at_us = $10, \
             number = 'pending:' || id WHERE id = $11 AND status = 'draft'",
        )
        .bind(Dec(inv.subtotal))
        .bind(Dec(inv.tax))
        .bind(Dec(inv.total))
        .bind(Dec(inv.prepaid_applied))
        .bind(Dec(inv.prepaid_excess))
        .bind(Dec(inv.amount_due))
        .bind(&inv.document)
        .bind(inv.events)
        .bind(micros(finalized_at))
        .bind(inv.due_at.map(micros))
        .bind(&inv.id)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "invoice {:?} is not a draft (already finalised or void)",
                inv.id
            )));
        }
        let linked = sqlx::query(
            // Priced events only: an unpriced one stays unbilled until a price import prices
            // it, and the next invoice bills it then.
            "UPDATE usage_events SET invoice_id = $1 WHERE customer_id = $2 AND ts_us < $3 AND invoice_id IS NULL \
             AND cost IS NOT NULL",
        )
        .bind(&inv.id)
        .bind(&inv.customer_id)
        .bind(micros(inv.period_end))
        .execute(&mut *tx)
        .await?;
        if i64::try_from(linked.rows_affected()).unwrap_or(-1) != inv.events {
            // Events arrived after rating: rate again (the transaction rolls back on drop).
            return Ok(None);
        }
        let number = next_number(&mut tx, series).await?;
        set_number(&mut tx, &inv.id, &number).await?;
        if let Some(c) = rebate {
            insert_wallet_tx(&mut tx, c).await?;
        }
        let done = existing_invoice_in(&mut tx, &inv.id).await?;
        tx.commit().await?;
        Ok(Some(done))
    }

    async fn issue_credit_note(
        &self,
        note: &InvoiceRecord,
        series: &str,
    ) -> StoreResult<InvoiceRecord> {
        let mut tx = self.writer().begin().await?;
        check_credit_note(&mut tx, note).await?;
        bind_invoice(sqlx::query(INSERT_INVOICE), note)
            .execute(&mut *tx)
            .await?;
        let number = next_number(&mut tx, series).await?;
        set_number(&mut tx, &note.id, &number).await?;
        let done = existing_invoice_in(&mut tx, &note.id).await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn void_invoice(&self, id: &str, at: DateTime<Utc>) -> StoreResult<InvoiceRecord> {
        let mut tx = self.writer().begin().await?;
        let res = sqlx::query(
            "UPDATE invoices SET status = 'void', voided_at_us = $1 WHERE id = $2 AND kind = 'invoice' \
             AND status IN ('draft', 'open')",
        )
        .bind(micros(at))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "invoice {id:?} cannot be voided: only drafts and unpaid invoices can (correct a paid one with a credit note)"
            )));
        }
        sqlx::query("UPDATE usage_events SET invoice_id = NULL WHERE invoice_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = existing_invoice_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn get_invoice(&self, id: &str) -> StoreResult<Option<InvoiceRecord>> {
        let mut conn = self.reader().acquire().await?;
        invoice_in(&mut conn, id).await
    }

    async fn list_invoices(
        &self,
        customer_id: Option<&str>,
        status: Option<fatura_core::status::InvoiceStatus>,
    ) -> StoreResult<Vec<InvoiceRecord>> {
        sqlx::query(
            "SELECT * FROM invoices WHERE (CAST($1 AS TEXT) IS NULL OR customer_id = $1) \
             AND (CAST($2 AS TEXT) IS NULL OR status = $2) \
             ORDER BY period_start_us DESC, created_at_us DESC, id",
        )
        .bind(customer_id)
        .bind(status.map(|s| s.as_str()))
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(invoice_from_row)
        .collect()
    }

    async fn set_auto_top_up(
        &self,
        id: &str,
        rule: Option<(Decimal, Decimal)>,
    ) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE customers SET auto_top_up_threshold = $1, auto_top_up_amount = $2 WHERE id = $3",
        )
        .bind(rule.map(|r| Dec(r.0)))
        .bind(rule.map(|r| Dec(r.1)))
        .bind(id)
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn set_payment_method(&self, id: &str, payment_method: &str) -> StoreResult<bool> {
        let res = sqlx::query("UPDATE customers SET payment_method_id = $1 WHERE id = $2")
            .bind(payment_method)
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn insert_payment(&self, p: &PaymentRecord) -> StoreResult<bool> {
        let res = sqlx::query(
            "INSERT INTO payments (id, customer_id, invoice_id, kind, amount, currency, status, reference, error, \
             created_at_us, updated_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&p.id)
        .bind(&p.customer_id)
        .bind(&p.invoice_id)
        .bind(p.kind.as_str())
        .bind(Dec(p.amount))
        .bind(p.currency.code())
        .bind(p.status.as_str())
        .bind(&p.reference)
        .bind(&p.error)
        .bind(micros(p.created_at))
        .bind(micros(p.updated_at))
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn claim_payment_push(
        &self,
        id: &str,
        seen: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE payments SET updated_at_us = $3 WHERE id = $1 AND status = 'pending' \
             AND reference IS NULL AND updated_at_us = $2",
        )
        .bind(id)
        .bind(micros(seen))
        .bind(micros(now))
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn settle_payment(
        &self,
        id: &str,
        status: fatura_core::status::PaymentStatus,
        reference: Option<&str>,
        error: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<(PaymentRecord, bool)>> {
        let mut tx = self.writer().begin().await?;
        let res = sqlx::query(
            "UPDATE payments SET status = $1, reference = COALESCE($2, reference), error = $3, updated_at_us = $4 \
             WHERE id = $5 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(reference)
        .bind(error)
        .bind(micros(at))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT * FROM payments WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref()
            .map(|r| Ok((payment_from_row(r)?, res.rows_affected() == 1)))
            .transpose()
    }

    async fn get_payment(&self, id: &str) -> StoreResult<Option<PaymentRecord>> {
        sqlx::query("SELECT * FROM payments WHERE id = $1")
            .bind(id)
            .fetch_optional(self.reader())
            .await?
            .as_ref()
            .map(payment_from_row)
            .transpose()
    }

    async fn list_payments(
        &self,
        customer_id: &str,
        invoice_id: Option<&str>,
    ) -> StoreResult<Vec<PaymentRecord>> {
        sqlx::query(
            "SELECT * FROM payments WHERE customer_id = $1 AND (CAST($2 AS TEXT) IS NULL OR invoice_id = $2) \
             ORDER BY created_at_us, id",
        )
        .bind(customer_id)
        .bind(invoice_id)
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(payment_from_row)
        .collect()
    }

    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        // One statement: taken when free, run out, or already ours; else nothing changes.
        let res = sqlx::query(
            "INSERT INTO job_leases (name, owner, lease_until_us) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until_us = excluded.lease_until_us WHERE job_leases.owner = excluded.owner OR job_leases.lease_until_us < $4",
        )
        .bind(name)
        .bind(owner)
        .bind(micros(until))
        .bind(micros(now))
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<()> {
        sqlx::query("UPDATE job_leases SET lease_until_us = 0 WHERE name = $1 AND owner = $2")
            .bind(name)
            .bind(owner)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    async fn listen_live(&self) -> StoreResult<Option<LiveStream>> {
        self.live_feed().await
    }

    fn publishes_live(&self) -> bool {
        Impl::PUBLISHES_LIVE
    }

    async fn external_writes(&self) -> StoreResult<Option<i64>> {
        self.external_writes_counter().await
    }

    fn shared(&self) -> bool {
        Impl::SHARED
    }

    async fn grant_hold(&self, req: &HoldRequest<'_>) -> StoreResult<HoldGrant> {
        self.fleet_grant_hold(req).await
    }

    async fn trim_hold(
        &self,
        customer_id: &str,
        instance_id: &str,
        release: Decimal,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.fleet_trim_hold(customer_id, instance_id, release, now, until)
            .await
    }

    async fn release_holds(&self, instance_id: &str) -> StoreResult<()> {
        self.fleet_release_holds(instance_id).await
    }

    async fn holds(&self, customer_id: &str, now: DateTime<Utc>) -> StoreResult<Vec<HoldRow>> {
        self.fleet_holds(customer_id, now).await
    }

    async fn count_rate(
        &self,
        key_id: &str,
        window_us: i64,
        tokens: u64,
        rpm: u64,
        tpm: u64,
    ) -> StoreResult<bool> {
        self.fleet_count_rate(key_id, window_us, tokens, rpm, tpm)
            .await
    }

    async fn prune_rate_windows(&self, before_us: i64) -> StoreResult<()> {
        self.fleet_prune_rate_windows(before_us).await
    }

    async fn record_webhook(&self, id: &str, kind: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let res = sqlx::query(
            "INSERT INTO webhook_events (id, type, received_at_us) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(kind)
        .bind(micros(at))
        .execute(self.writer())
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn query_rollups(
        &self,
        grain: Grain,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
        by: Dims,
    ) -> StoreResult<Vec<(RollupKey, RollupTotals)>> {
        let (select, group) = crate::rollup_group(by, micros(from));
        let mut qb = QueryBuilder::<Db>::new(format!(
            "SELECT {select}, {}, {} FROM rollups WHERE grain = ",
            crate::rollup_count_sums(),
            Impl::ROLLUP_MONEY_SUMS,
        ));
        qb.push_bind(grain.as_str());
        // One customer's rows; or, for all customers, the fleet rows when the answer keeps
        // neither customer nor agent, else every customer's rows. Each shape can use the
        // (grain, customer_id, bucket) index.
        match customer_id {
            Some("") => return Ok(Vec::new()),
            Some(c) => {
                qb.push(" AND customer_id = ").push_bind(c);
            }
            None if !by.customer && !by.agent => {
                qb.push(" AND customer_id = ''");
            }
            None => {
                qb.push(" AND customer_id <> ''");
            }
        }
        qb.push(" AND bucket_us >= ")
            .push_bind(micros(from))
            .push(" AND bucket_us < ")
            .push_bind(micros(to))
            .push(" GROUP BY ")
            .push(group);
        let mut rows = qb.build().fetch(self.reader());
        let mut out = Vec::new();
        while let Some(r) = rows.try_next().await? {
            out.push(rollup_from_row(&r)?);
        }
        Ok(out)
    }

    async fn recount_rollups(&self) -> StoreResult<RollupDelta> {
        let mut rows = sqlx::query(
            "SELECT customer_id, ts_us, provider, model, CAST(tags AS TEXT) AS tags, input_tokens, output_tokens, \
             cached_input_tokens, cache_write_tokens, reasoning_tokens, requests, cost, revenue FROM usage_events",
        )
        .fetch(self.reader());
        let mut delta = RollupDelta::new();
        let minute_since = minute_cutoff(Utc::now());
        while let Some(r) = rows.try_next().await? {
            let tags: String = r.try_get("tags")?;
            let pricing = match (opt_dec(&r, "cost")?, opt_dec(&r, "revenue")?) {
                (Some(c), Some(v)) => Some((c, v)),
                _ => None,
            };
            let customer: String = r.try_get("customer_id")?;
            let provider: String = r.try_get("provider")?;
            let model: String = r.try_get("model")?;
            add_event(
                &mut delta,
                &customer,
                &provider,
                &model,
                crate::agent_of(&tags).as_deref(),
                from_micros(r.try_get("ts_us")?)?,
                &RollupTotals::of_event(&usage_from_row(&r)?, pricing),
                minute_since,
            );
        }
        Ok(delta)
    }

    async fn prune_minute_rollups(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let res = sqlx::query("DELETE FROM rollups WHERE grain = 'minute' AND bucket_us < $1")
            .bind(micros(before))
            .execute(self.writer())
            .await?;
        Ok(res.rows_affected())
    }

    async fn insert_outcomes(&self, outcomes: &[OutcomeRecord]) -> StoreResult<(u64, u64)> {
        let mut tx = self.writer().begin().await?;
        let (mut accepted, mut duplicates) = (0, 0);
        for o in outcomes {
            let res = sqlx::query(
                "INSERT INTO outcomes (id, content_hash, customer_id, ts_us, agent, kind, value, currency, tags, \
                 created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&o.id)
            .bind(&o.content_hash)
            .bind(&o.customer_id)
            .bind(micros(o.timestamp))
            .bind(&o.agent)
            .bind(&o.kind)
            .bind(Dec(o.value))
            .bind(o.currency.code())
            .bind(&o.tags)
            .bind(micros(o.created_at))
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 1 {
                accepted += 1;
                continue;
            }
            let hash: String =
                sqlx::query_scalar("SELECT content_hash FROM outcomes WHERE id = $1")
                    .bind(&o.id)
                    .fetch_one(&mut *tx)
                    .await?;
            if hash != o.content_hash {
                return Err(StoreError::EventConflict { id: o.id.clone() });
            }
            duplicates += 1;
        }
        tx.commit().await?;
        Ok((accepted, duplicates))
    }

    async fn query_outcomes(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
    ) -> StoreResult<Vec<OutcomeRecord>> {
        sqlx::query(
            "SELECT * FROM outcomes WHERE ts_us >= $1 AND ts_us < $2 AND (CAST($3 AS TEXT) IS NULL OR customer_id = $3) \
             ORDER BY ts_us, id",
        )
        .bind(micros(from))
        .bind(micros(to))
        .bind(customer_id)
        .fetch_all(self.reader())
        .await?
        .iter()
        .map(outcome_from_row)
        .collect()
    }

    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> StoreResult<Vec<ExportRow>> {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT id, customer_id, ts_us, provider, model, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, requests, cost, revenue, CAST(tags AS TEXT) AS tags, upstream \
             FROM usage_events WHERE 1 = 1",
        );
        push_usage_filter(&mut qb, filter);
        if let Some((ts, id)) = &after {
            qb.push(" AND (ts_us, id) > (")
                .push_bind(micros(*ts))
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        qb.push(" ORDER BY ts_us, id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(self.reader()).await?;
        rows.iter().map(export_row_from_row).collect()
    }

    async fn record_payment(
        &self,
        id: &str,
        reference: Option<&str>,
        paid_at: Option<DateTime<Utc>>,
        error: Option<&str>,
    ) -> StoreResult<Option<InvoiceRecord>> {
        let mut tx = self.writer().begin().await?;
        match paid_at {
            Some(at) => {
                sqlx::query(
                    "UPDATE invoices SET status = 'paid', paid_at_us = $1, payment_reference = COALESCE($2, payment_reference), \
                     last_payment_error = NULL WHERE id = $3 AND status = 'open'",
                )
                .bind(micros(at))
                .bind(reference)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "UPDATE invoices SET payment_attempts = payment_attempts + 1, last_payment_error = $1, \
                     payment_reference = COALESCE($2, payment_reference) WHERE id = $3 AND status = 'open'",
                )
                .bind(error)
                .bind(reference)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        let row = invoice_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(row)
    }
}
