//! SQLite store: the embedded default.
//!
//! Writes go through a pool of exactly one connection, so write transactions are
//! serialised inside the process and never meet `SQLITE_BUSY`; reads use a separate pool
//! and, thanks to WAL, never block on writes. `synchronous=FULL` makes every commit
//! durable before it returns. One SQLite file serves one fatura process; fleets use
//! PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fatura_core::catalog::{PriceComponents, PriceVersion, UnitPrice};
use fatura_core::rollup::{
    Dims, Grain, RollupDelta, RollupKey, RollupTotals, add_event, minute_cutoff,
};
use fatura_core::usage::{UsageAggregator, UsageRecord};
use fatura_core::{Currency, TokenUsage};
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::{
    AlertRecord, ApiKeyRecord, BillingSettings, Customer, EventPricing, ExportRow, FxRate,
    InsertOutcome, InvoiceRecord, OutcomeRecord, PaymentRecord, PlanAssignment, PlanVersionRecord,
    PreparedEvent, PriceImport, PricingChange, PricingData, Store, StoreError, StoreResult,
    StoredEvent, UnpricedEvent, UnpricedModel, UsageFilter, WalletTransaction, count, from_micros,
    micros, parse_terms, terms_json,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
}

fn dec(s: &str) -> StoreResult<Decimal> {
    Decimal::from_str(s)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("bad decimal {s:?} in database: {e}")))
}

fn opt_dec(s: Option<String>) -> StoreResult<Option<Decimal>> {
    s.as_deref().map(dec).transpose()
}

fn price(s: &str) -> StoreResult<UnitPrice> {
    UnitPrice::new(dec(s)?)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("bad price in database: {e}")))
}

fn opt_price(s: Option<String>) -> StoreResult<Option<UnitPrice>> {
    s.as_deref().map(price).transpose()
}

fn u(v: u64) -> i64 {
    // Counts are bounded by fatura_core::event::MAX_COUNT (10^12), far below i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn customer_from_row(r: &SqliteRow) -> StoreResult<Customer> {
    let currency: String = r.try_get("currency")?;
    Ok(Customer {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        currency: Currency::from_str(&currency)
            .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
        prepaid: r.try_get::<String, _>("billing_mode")? == "prepaid",
        monthly_spend_limit: opt_dec(r.try_get("monthly_spend_limit")?)?,
        billing: BillingSettings {
            anchor_day: u32::try_from(r.try_get::<i64, _>("billing_anchor_day")?).unwrap_or(1),
            timezone: r.try_get("timezone")?,
            payment_terms_days: u32::try_from(r.try_get::<i64, _>("payment_terms_days")?)
                .unwrap_or(30),
            tax_rate: opt_dec(r.try_get("tax_rate")?)?,
            locale: r.try_get("locale")?,
        },
        stripe_customer_id: r.try_get("stripe_customer_id")?,
        status: r.try_get("status")?,
        status_reason: r.try_get("status_reason")?,
        payment_method_id: r.try_get("payment_method_id")?,
        auto_top_up: match (
            opt_dec(r.try_get("auto_top_up_threshold")?)?,
            opt_dec(r.try_get("auto_top_up_amount")?)?,
        ) {
            (Some(t), Some(a)) => Some((t, a)),
            _ => None,
        },
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn key_from_row(r: &SqliteRow) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        key_hash: r.try_get("key_hash")?,
        prefix: r.try_get("prefix")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
        revoked_at: r
            .try_get::<Option<i64>, _>("revoked_at_us")?
            .map(from_micros)
            .transpose()?,
    })
}

fn version_from_row(r: &SqliteRow) -> StoreResult<PriceVersion> {
    Ok(PriceVersion {
        id: r.try_get("id")?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        effective_from: from_micros(r.try_get("effective_from_us")?)?,
        prices: PriceComponents {
            prompt: price(r.try_get("prompt")?)?,
            completion: price(r.try_get("completion")?)?,
            cache_read: opt_price(r.try_get("cache_read")?)?,
            cache_write: opt_price(r.try_get("cache_write")?)?,
            reasoning: opt_price(r.try_get("reasoning")?)?,
            per_request: price(r.try_get("per_request")?)?,
            per_image: price(r.try_get("per_image")?)?,
            web_search: price(r.try_get("web_search")?)?,
        },
    })
}

fn opt_text(p: Option<UnitPrice>) -> Option<String> {
    p.map(|p| p.value().to_string())
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by `url` (`sqlite://path`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // Connections are opened once and kept: reopening needs file descriptors, which an
        // overloaded process may not have.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        // Read connections open on first use, that is after `migrate`: a connection that
        // prepared `SELECT *` statements against an older schema (or held a snapshot of it)
        // would describe rows with the old column count.
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.read_only(false))
            .await?;
        Ok(SqliteStore { write, read })
    }

    async fn revision_in(conn: &mut sqlx::SqliteConnection) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM catalog_meta WHERE id = 1")
                .fetch_one(conn)
                .await?,
        )
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.write).await?;
        // Events recorded before rollups existed: count them once.
        let rollups: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rollups")
            .fetch_one(&self.write)
            .await?;
        if rollups == 0 && self.count_events().await? > 0 {
            let delta = self.recount_rollups().await?;
            let mut tx = self.write.begin().await?;
            apply_rollups(&mut tx, &delta).await?;
            tx.commit().await?;
        }
        Ok(())
    }

    async fn external_writes(&self) -> StoreResult<Option<i64>> {
        // Per connection: it changes when any other connection (another process: the
        // CLI beside `fatura serve`) commits. The write pool's single connection is the
        // only one this process commits through, so its own writes never change it.
        let v: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&self.write)
            .await?;
        Ok(Some(v))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn create_customer(&self, c: &Customer) -> StoreResult<()> {
        let res = sqlx::query(
            "INSERT INTO customers (id, name, currency, created_at_us, billing_mode, monthly_spend_limit, billing_anchor_day, \
             timezone, payment_terms_days, tax_rate, locale) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(c.currency.code())
        .bind(micros(c.created_at))
        .bind(if c.prepaid { "prepaid" } else { "postpaid" })
        .bind(c.monthly_spend_limit.map(|d| d.to_string()))
        .bind(i64::from(c.billing.anchor_day))
        .bind(&c.billing.timezone)
        .bind(i64::from(c.billing.payment_terms_days))
        .bind(c.billing.tax_rate.map(|d| d.to_string()))
        .bind(&c.billing.locale)
        .execute(&self.write)
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
        let res = sqlx::query("UPDATE customers SET monthly_spend_limit = ? WHERE id = ?")
            .bind(limit.map(|d| d.to_string()))
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn get_customer(&self, id: &str) -> StoreResult<Option<Customer>> {
        sqlx::query("SELECT * FROM customers WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(customer_from_row)
            .transpose()
    }

    async fn list_customers(&self) -> StoreResult<Vec<Customer>> {
        sqlx::query("SELECT * FROM customers ORDER BY id")
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(customer_from_row)
            .collect()
    }

    async fn existing_customer_ids(&self, ids: &[String]) -> StoreResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in crate::ladder_chunks(ids) {
            let mut qb = QueryBuilder::<Sqlite>::new("SELECT id FROM customers WHERE id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id);
            }
            qb.push(")");
            let rows: Vec<String> = qb.build_query_scalar().fetch_all(&self.read).await?;
            found.extend(rows);
        }
        Ok(found)
    }

    async fn add_wallet_credit(&self, c: &WalletTransaction) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.id)
        .bind(&c.customer_id)
        .bind(&c.kind)
        .bind(c.amount.to_string())
        .bind(c.currency.code())
        .bind(c.event_id.as_deref())
        .bind(c.expires_at.map(micros))
        .bind(micros(c.created_at))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn wallet_transactions(&self, customer_id: &str) -> StoreResult<Vec<WalletTransaction>> {
        let rows = sqlx::query(
            "SELECT * FROM wallet_transactions WHERE customer_id = ? ORDER BY created_at_us, id",
        )
        .bind(customer_id)
        .fetch_all(&self.read)
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
                sqlx::query("SELECT * FROM wallet_transactions WHERE customer_id = ? ORDER BY created_at_us, id LIMIT ?")
                    .bind(customer_id)
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
                    .await?
            }
            Some(after) => {
                let Some(at): Option<i64> = sqlx::query_scalar("SELECT created_at_us FROM wallet_transactions WHERE id = ? AND customer_id = ?")
                    .bind(after)
                    .bind(customer_id)
                    .fetch_optional(&self.read)
                    .await?
                else {
                    return Ok(None);
                };
                sqlx::query("SELECT * FROM wallet_transactions WHERE customer_id = ? AND (created_at_us, id) > (?, ?) ORDER BY created_at_us, id LIMIT ?")
                    .bind(customer_id)
                    .bind(at)
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.read)
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
            "INSERT INTO api_keys (id, customer_id, key_hash, prefix, created_at_us, revoked_at_us) VALUES (?, ?, ?, ?, ?, NULL)",
        )
        .bind(&k.id)
        .bind(&k.customer_id)
        .bind(&k.key_hash)
        .bind(&k.prefix)
        .bind(micros(k.created_at))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn find_active_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        sqlx::query("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at_us IS NULL")
            .bind(key_hash)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn list_api_keys(&self, customer_id: &str) -> StoreResult<Vec<ApiKeyRecord>> {
        sqlx::query("SELECT * FROM api_keys WHERE customer_id = ? ORDER BY created_at_us, id")
            .bind(customer_id)
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE api_keys SET revoked_at_us = ? WHERE id = ? AND revoked_at_us IS NULL",
        )
        .bind(micros(at))
        .bind(id)
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn catalog_revision(&self) -> StoreResult<i64> {
        let mut conn = self.read.acquire().await?;
        Self::revision_in(&mut conn).await
    }

    async fn load_catalog(&self) -> StoreResult<(i64, Vec<PriceVersion>)> {
        let mut tx = self.read.begin().await?;
        let revision = Self::revision_in(&mut tx).await?;
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
        let mut tx = self.write.begin().await?;
        let revision = Self::revision_in(&mut tx).await?;
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
                "SELECT COUNT(*) FROM usage_events WHERE provider = ? AND model = ? AND ts_us >= ? AND ts_us < ? AND cost IS NOT NULL",
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
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO price_versions (provider, model, effective_from_us, prompt, completion, cache_read, \
                 cache_write, reasoning, per_request, per_image, web_search, source, imported_at_us) ",
            );
            qb.push_values(chunk, |mut b, (item, _)| {
                let p = &item.prices;
                b.push_bind(&item.provider)
                    .push_bind(&item.model)
                    .push_bind(from)
                    .push_bind(p.prompt.value().to_string())
                    .push_bind(p.completion.value().to_string())
                    .push_bind(opt_text(p.cache_read))
                    .push_bind(opt_text(p.cache_write))
                    .push_bind(opt_text(p.reasoning))
                    .push_bind(p.per_request.value().to_string())
                    .push_bind(p.per_image.value().to_string())
                    .push_bind(p.web_search.value().to_string())
                    .push_bind(&import.source)
                    .push_bind(micros(import.imported_at));
            });
            qb.build().execute(&mut *tx).await?;
        }
        let new_revision: i64 = sqlx::query_scalar(
            "UPDATE catalog_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(new_revision)
    }

    async fn insert_events(
        &self,
        events: &[PreparedEvent],
        catalog_revision: i64,
    ) -> StoreResult<InsertOutcome> {
        let mut tx = self.write.begin().await?;
        if Self::revision_in(&mut tx).await? != catalog_revision {
            return Err(StoreError::CatalogChanged);
        }
        let mut inserted: HashSet<String> = HashSet::with_capacity(events.len());
        for chunk in crate::ladder_chunks(events) {
            let mut qb = QueryBuilder::<Sqlite>::new(
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
                    .push_bind(tags)
                    .push_bind(e.upstream_cost.map(|c| c.to_string()))
                    .push_bind(p.pricing.as_ref().map(|x| x.price_version_id))
                    .push_bind(p.pricing.as_ref().map(|x| x.cost.to_string()))
                    .push_bind(p.pricing.as_ref().map(|x| x.revenue.to_string()))
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
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT id, content_hash FROM usage_events WHERE id IN (",
            );
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
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
                 SELECT column1, column2, 'charge', column3, (SELECT currency FROM customers WHERE id = column2), \
                 column4, NULL, column5 FROM (",
            );
            qb.push_values(chunk, |mut b, p| {
                let c = p.event.prepaid_charge.unwrap_or_default();
                b.push_bind(format!("charge:{}", p.event.id))
                    .push_bind(p.event.customer_id.as_str())
                    .push_bind((-c).to_string())
                    .push_bind(p.event.id.as_str())
                    .push_bind(micros(p.ingested_at));
            });
            qb.push(") AS v");
            qb.build().execute(&mut *tx).await?;
        }
        apply_rollups(&mut tx, &crate::delta_of_inserted(events, &inserted)).await?;
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
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT customer_id, provider, model, ts_us, requests, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, cost, revenue, estimated FROM usage_events WHERE 1 = 1",
        );
        push_usage_filter(&mut qb, filter);
        let query = qb.build();
        let mut rows = query.fetch(&self.read);
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
                cost: opt_dec(r.try_get("cost")?)?,
                revenue: opt_dec(r.try_get("revenue")?)?,
                estimated: r.try_get("estimated")?,
            };
            agg.add(&record)
                .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?;
        }
        Ok(())
    }

    async fn unpriced_models(&self, customer_id: Option<&str>) -> StoreResult<Vec<UnpricedModel>> {
        let rows = sqlx::query(
            "SELECT provider, model, COUNT(*) AS events, SUM(requests) AS requests, SUM(input_tokens) AS input_tokens, \
             SUM(output_tokens) AS output_tokens, MIN(ts_us) AS first_us, MAX(ts_us) AS last_us \
             FROM usage_events WHERE cost IS NULL AND (?1 IS NULL OR customer_id = ?1) \
             GROUP BY provider, model ORDER BY provider, model",
        )
        .bind(customer_id)
        .fetch_all(&self.read)
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
             reasoning_tokens, requests FROM usage_events WHERE cost IS NULL AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
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
        let mut tx = self.write.begin().await?;
        if Self::revision_in(&mut tx).await? != catalog_revision {
            return Err(StoreError::CatalogChanged);
        }
        let mut priced = 0;
        let mut delta = RollupDelta::new();
        let minute_since = minute_cutoff(Utc::now());
        for (id, p) in pricing {
            let res = sqlx::query(
                "UPDATE usage_events SET price_version_id = ?, cost = ?, revenue = ? WHERE id = ? AND cost IS NULL",
            )
            .bind(p.price_version_id)
            .bind(p.cost.to_string())
            .bind(p.revenue.to_string())
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 1 {
                let r = sqlx::query(
                    "SELECT customer_id, ts_us, provider, model, tags FROM usage_events WHERE id = ?",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
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
            }
            priced += res.rows_affected();
        }
        apply_rollups(&mut tx, &delta).await?;
        tx.commit().await?;
        Ok(priced)
    }

    async fn count_events(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
            .fetch_one(&self.read)
            .await?;
        count(n)
    }

    async fn apply_pricing_change(&self, change: &PricingChange) -> StoreResult<i64> {
        let mut tx = self.write.begin().await?;
        match change {
            PricingChange::CreatePlan(v) => {
                let res = sqlx::query(
                    "INSERT INTO plans (id, created_at_us) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
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
                     VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                let existing: Option<String> = sqlx::query_scalar(
                    "SELECT rate FROM fx_rates WHERE currency = ? AND rate_date = ?",
                )
                .bind(r.currency.code())
                .bind(r.date.to_string())
                .fetch_optional(&mut *tx)
                .await?;
                match existing {
                    Some(old) if dec(&old)? == r.rate => {
                        return Self::revision_in(&mut tx).await;
                    }
                    Some(old) => {
                        return Err(StoreError::Conflict(format!(
                            "the USD→{} rate for {} is already {old}; rates are history and are not replaced",
                            r.currency, r.date
                        )));
                    }
                    None => {}
                }
                sqlx::query(
                    "INSERT INTO fx_rates (currency, rate_date, rate, created_at_us) VALUES (?, ?, ?, ?)",
                )
                .bind(r.currency.code())
                .bind(r.date.to_string())
                .bind(r.rate.to_string())
                .bind(micros(r.created_at))
                .execute(&mut *tx)
                .await?;
            }
        }
        let revision: i64 = sqlx::query_scalar(
            "UPDATE catalog_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(revision)
    }

    async fn load_pricing(&self) -> StoreResult<PricingData> {
        let mut tx = self.read.begin().await?;
        let versions = sqlx::query("SELECT * FROM plan_versions ORDER BY plan_id, version")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                let terms: String = r.try_get("terms")?;
                Ok(PlanVersionRecord {
                    plan_id: r.try_get("plan_id")?,
                    version: r.try_get("version")?,
                    name: r.try_get("name")?,
                    effective_from: from_micros(r.try_get("effective_from_us")?)?,
                    terms: parse_terms(&terms)?,
                    created_at: from_micros(r.try_get("created_at_us")?)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let assignments =
            sqlx::query("SELECT * FROM customer_plans ORDER BY customer_id, effective_from_us")
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| {
                    Ok(PlanAssignment {
                        customer_id: r.try_get("customer_id")?,
                        effective_from: from_micros(r.try_get("effective_from_us")?)?,
                        plan_id: r.try_get("plan_id")?,
                        created_at: from_micros(r.try_get("created_at_us")?)?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
        let fx_rates = sqlx::query("SELECT * FROM fx_rates ORDER BY currency, rate_date")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                let currency: String = r.try_get("currency")?;
                let date: String = r.try_get("rate_date")?;
                Ok(FxRate {
                    currency: Currency::from_str(&currency)
                        .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
                    date: chrono::NaiveDate::from_str(&date)
                        .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
                    rate: dec(r.try_get("rate")?)?,
                    created_at: from_micros(r.try_get("created_at_us")?)?,
                })
            })
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
             message, first_seen_us, last_seen_us, occurrences) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) \
             ON CONFLICT (dedupe_key) DO UPDATE SET last_seen_us = MAX(alerts.last_seen_us, excluded.last_seen_us), \
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
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn list_alerts(&self) -> StoreResult<Vec<AlertRecord>> {
        sqlx::query("SELECT * FROM alerts ORDER BY last_seen_us DESC, id")
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(|r| {
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
            })
            .collect()
    }

    async fn customer_events(
        &self,
        customer_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut rows = sqlx::query(
            "SELECT id, ts_us, provider, model, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, requests, price_version_id, cost, revenue FROM usage_events \
             WHERE customer_id = ? AND ts_us >= ? AND ts_us < ?",
        )
        .bind(customer_id)
        .bind(micros(from))
        .bind(micros(to))
        .fetch(&self.read);
        let mut out = Vec::new();
        while let Some(r) = rows.try_next().await? {
            out.push(stored_event_from_row(&r)?);
        }
        Ok(out)
    }

    async fn versions_imported_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM price_versions WHERE imported_at_us >= ? ORDER BY id",
        )
        .bind(micros(since))
        .fetch_all(&self.read)
        .await?)
    }

    async fn update_billing_settings(&self, id: &str, s: &BillingSettings) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE customers SET billing_anchor_day = ?, timezone = ?, payment_terms_days = ?, tax_rate = ?, \
             locale = ? WHERE id = ?",
        )
        .bind(i64::from(s.anchor_day))
        .bind(&s.timezone)
        .bind(i64::from(s.payment_terms_days))
        .bind(s.tax_rate.map(|d| d.to_string()))
        .bind(&s.locale)
        .bind(id)
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn set_customer_status(
        &self,
        id: &str,
        status: &str,
        reason: Option<&str>,
    ) -> StoreResult<bool> {
        let res = sqlx::query("UPDATE customers SET status = ?, status_reason = ? WHERE id = ?")
            .bind(status)
            .bind(reason)
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn set_stripe_customer_id(&self, id: &str, stripe_id: &str) -> StoreResult<String> {
        let mut tx = self.write.begin().await?;
        sqlx::query(
            "UPDATE customers SET stripe_customer_id = ? WHERE id = ? AND stripe_customer_id IS NULL",
        )
        .bind(stripe_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = ?")
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
        let mut rows = sqlx::query(
            "SELECT id, ts_us, provider, model, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, requests, price_version_id, cost, revenue FROM usage_events \
             WHERE customer_id = ? AND ts_us < ? AND invoice_id IS NULL",
        )
        .bind(customer_id)
        .bind(micros(before))
        .fetch(&self.read);
        let mut out = Vec::new();
        while let Some(r) = rows.try_next().await? {
            out.push(stored_event_from_row(&r)?);
        }
        Ok(out)
    }

    async fn create_invoice(&self, inv: &InvoiceRecord) -> StoreResult<bool> {
        let res = bind_invoice(sqlx::query(INSERT_INVOICE), inv)
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn update_draft(&self, inv: &InvoiceRecord) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE invoices SET subtotal = ?, tax = ?, total = ?, prepaid_applied = ?, prepaid_excess = ?, \
             amount_due = ?, document = ?, events = ? WHERE id = ? AND status = 'draft'",
        )
        .bind(inv.subtotal.to_string())
        .bind(inv.tax.to_string())
        .bind(inv.total.to_string())
        .bind(inv.prepaid_applied.to_string())
        .bind(inv.prepaid_excess.to_string())
        .bind(inv.amount_due.to_string())
        .bind(&inv.document)
        .bind(inv.events)
        .bind(&inv.id)
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn finalize_invoice(
        &self,
        inv: &InvoiceRecord,
        series: &str,
        rebate: Option<&WalletTransaction>,
    ) -> StoreResult<Option<InvoiceRecord>> {
        let mut tx = self.write.begin().await?;
        let finalized_at = inv.finalized_at.unwrap_or(inv.created_at);
        let claimed = sqlx::query(
            "UPDATE invoices SET status = 'open', subtotal = ?, tax = ?, total = ?, prepaid_applied = ?, \
             prepaid_excess = ?, amount_due = ?, document = ?, events = ?, finalized_at_us = ?, due_at_us = ?, \
             number = 'pending:' || id WHERE id = ? AND status = 'draft'",
        )
        .bind(inv.subtotal.to_string())
        .bind(inv.tax.to_string())
        .bind(inv.total.to_string())
        .bind(inv.prepaid_applied.to_string())
        .bind(inv.prepaid_excess.to_string())
        .bind(inv.amount_due.to_string())
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
            "UPDATE usage_events SET invoice_id = ? WHERE customer_id = ? AND ts_us < ? AND invoice_id IS NULL",
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
        sqlx::query("UPDATE invoices SET number = ? WHERE id = ?")
            .bind(&number)
            .bind(&inv.id)
            .execute(&mut *tx)
            .await?;
        if let Some(c) = rebate {
            insert_wallet_tx(&mut tx, c).await?;
        }
        let row = sqlx::query("SELECT * FROM invoices WHERE id = ?")
            .bind(&inv.id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(invoice_from_row(&row)?))
    }

    async fn issue_credit_note(
        &self,
        note: &InvoiceRecord,
        series: &str,
    ) -> StoreResult<InvoiceRecord> {
        let mut tx = self.write.begin().await?;
        let Some(original) = note.corrects_invoice_id.as_deref() else {
            return Err(StoreError::Conflict(
                "a credit note needs an invoice".into(),
            ));
        };
        let row = sqlx::query("SELECT * FROM invoices WHERE id = ?")
            .bind(original)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::Conflict(format!("no invoice {original:?}")));
        };
        let inv = invoice_from_row(&row)?;
        if inv.kind != "invoice" || !(inv.status == "open" || inv.status == "paid") {
            return Err(StoreError::Conflict(format!(
                "credit notes correct finalised invoices; {original:?} is {} {}",
                inv.status, inv.kind
            )));
        }
        let notes: Vec<String> = sqlx::query_scalar(
            "SELECT total FROM invoices WHERE corrects_invoice_id = ? AND kind = 'credit_note' AND status <> 'void'",
        )
        .bind(original)
        .fetch_all(&mut *tx)
        .await?;
        let mut credited = Decimal::ZERO;
        for n in &notes {
            credited += dec(n)?;
        }
        if credited + note.total > inv.total {
            return Err(StoreError::Conflict(format!(
                "credit notes would exceed the invoice: {} already credited of {}",
                credited, inv.total
            )));
        }
        bind_invoice(sqlx::query(INSERT_INVOICE), note)
            .execute(&mut *tx)
            .await?;
        let number = next_number(&mut tx, series).await?;
        sqlx::query("UPDATE invoices SET number = ? WHERE id = ?")
            .bind(&number)
            .bind(&note.id)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT * FROM invoices WHERE id = ?")
            .bind(&note.id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        invoice_from_row(&row)
    }

    async fn void_invoice(&self, id: &str, at: DateTime<Utc>) -> StoreResult<InvoiceRecord> {
        let mut tx = self.write.begin().await?;
        let res = sqlx::query(
            "UPDATE invoices SET status = 'void', voided_at_us = ? WHERE id = ? AND kind = 'invoice' \
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
        sqlx::query("UPDATE usage_events SET invoice_id = NULL WHERE invoice_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT * FROM invoices WHERE id = ?")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        invoice_from_row(&row)
    }

    async fn get_invoice(&self, id: &str) -> StoreResult<Option<InvoiceRecord>> {
        sqlx::query("SELECT * FROM invoices WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(invoice_from_row)
            .transpose()
    }

    async fn list_invoices(
        &self,
        customer_id: Option<&str>,
        status: Option<&str>,
    ) -> StoreResult<Vec<InvoiceRecord>> {
        sqlx::query(
            "SELECT * FROM invoices WHERE (? IS NULL OR customer_id = ?) AND (? IS NULL OR status = ?) \
             ORDER BY period_start_us DESC, created_at_us DESC, id",
        )
        .bind(customer_id)
        .bind(customer_id)
        .bind(status)
        .bind(status)
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(invoice_from_row)
        .collect()
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
        // Attounits are summed as two halves of 9 digits each, which cannot overflow.
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {select}, {}, SUM(cost_units) AS cost_units, SUM(cost_atto / 1000000000) AS cost_hi, SUM(cost_atto % 1000000000) AS cost_lo, SUM(revenue_units) AS revenue_units, SUM(revenue_atto / 1000000000) AS revenue_hi, SUM(revenue_atto % 1000000000) AS revenue_lo FROM rollups WHERE grain = ",
            crate::rollup_count_sums("")
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
        let mut rows = qb.build().fetch(&self.read);
        let mut out = Vec::new();
        while let Some(r) = rows.try_next().await? {
            out.push(rollup_from_row(&r)?);
        }
        Ok(out)
    }

    async fn prune_minute_rollups(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let res = sqlx::query("DELETE FROM rollups WHERE grain = 'minute' AND bucket_us < ?")
            .bind(micros(before))
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected())
    }

    async fn recount_rollups(&self) -> StoreResult<RollupDelta> {
        let mut rows = sqlx::query(
            "SELECT customer_id, ts_us, provider, model, tags, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, requests, cost, revenue FROM usage_events",
        )
        .fetch(&self.read);
        let mut delta = RollupDelta::new();
        let minute_since = minute_cutoff(Utc::now());
        while let Some(r) = rows.try_next().await? {
            let tags: String = r.try_get("tags")?;
            let pricing = match (
                opt_dec(r.try_get("cost")?)?,
                opt_dec(r.try_get("revenue")?)?,
            ) {
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

    async fn insert_outcomes(&self, outcomes: &[OutcomeRecord]) -> StoreResult<(u64, u64)> {
        let mut tx = self.write.begin().await?;
        let (mut accepted, mut duplicates) = (0, 0);
        for o in outcomes {
            let res = sqlx::query(
                "INSERT INTO outcomes (id, content_hash, customer_id, ts_us, agent, kind, value, currency, tags, \
                 created_at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&o.id)
            .bind(&o.content_hash)
            .bind(&o.customer_id)
            .bind(micros(o.timestamp))
            .bind(&o.agent)
            .bind(&o.kind)
            .bind(o.value.to_string())
            .bind(o.currency.code())
            .bind(&o.tags)
            .bind(micros(o.created_at))
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 1 {
                accepted += 1;
                continue;
            }
            let hash: String = sqlx::query_scalar("SELECT content_hash FROM outcomes WHERE id = ?")
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
            "SELECT * FROM outcomes WHERE ts_us >= ? AND ts_us < ? AND (? IS NULL OR customer_id = ?) ORDER BY ts_us, id",
        )
        .bind(micros(from))
        .bind(micros(to))
        .bind(customer_id)
        .bind(customer_id)
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(|r| {
            let currency: String = r.try_get("currency")?;
            Ok(OutcomeRecord {
                id: r.try_get("id")?,
                content_hash: r.try_get("content_hash")?,
                customer_id: r.try_get("customer_id")?,
                timestamp: from_micros(r.try_get("ts_us")?)?,
                agent: r.try_get("agent")?,
                kind: r.try_get("kind")?,
                value: dec(r.try_get("value")?)?,
                currency: Currency::from_str(&currency)
                    .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
                tags: r.try_get("tags")?,
                created_at: from_micros(r.try_get("created_at_us")?)?,
            })
        })
        .collect()
    }

    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> StoreResult<Vec<ExportRow>> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT id, customer_id, ts_us, provider, model, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, requests, cost, revenue, tags, upstream FROM usage_events WHERE 1 = 1",
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
        let rows = qb.build().fetch_all(&self.read).await?;
        rows.iter()
            .map(|r| {
                Ok(ExportRow {
                    id: r.try_get("id")?,
                    customer_id: r.try_get("customer_id")?,
                    timestamp: from_micros(r.try_get("ts_us")?)?,
                    provider: r.try_get("provider")?,
                    model: r.try_get("model")?,
                    usage: usage_from_row(r)?,
                    cost: opt_dec(r.try_get("cost")?)?,
                    revenue: opt_dec(r.try_get("revenue")?)?,
                    tags: r.try_get("tags")?,
                    upstream: r.try_get("upstream")?,
                })
            })
            .collect()
    }

    async fn record_payment(
        &self,
        id: &str,
        reference: Option<&str>,
        paid_at: Option<DateTime<Utc>>,
        error: Option<&str>,
    ) -> StoreResult<Option<InvoiceRecord>> {
        let mut tx = self.write.begin().await?;
        match paid_at {
            Some(at) => {
                sqlx::query(
                    "UPDATE invoices SET status = 'paid', paid_at_us = ?, payment_reference = COALESCE(?, payment_reference), \
                     last_payment_error = NULL WHERE id = ? AND status = 'open'",
                )
                .bind(micros(at))
                .bind(reference)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "UPDATE invoices SET payment_attempts = payment_attempts + 1, last_payment_error = ?, \
                     payment_reference = COALESCE(?, payment_reference) WHERE id = ? AND status = 'open'",
                )
                .bind(error)
                .bind(reference)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        let row = sqlx::query("SELECT * FROM invoices WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref().map(invoice_from_row).transpose()
    }
    async fn set_auto_top_up(
        &self,
        id: &str,
        rule: Option<(Decimal, Decimal)>,
    ) -> StoreResult<bool> {
        let res = sqlx::query(
            "UPDATE customers SET auto_top_up_threshold = ?, auto_top_up_amount = ? WHERE id = ?",
        )
        .bind(rule.map(|r| r.0.to_string()))
        .bind(rule.map(|r| r.1.to_string()))
        .bind(id)
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn set_payment_method(&self, id: &str, payment_method: &str) -> StoreResult<bool> {
        let res = sqlx::query("UPDATE customers SET payment_method_id = ? WHERE id = ?")
            .bind(payment_method)
            .bind(id)
            .execute(&self.write)
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
            "UPDATE payments SET updated_at_us = ?3 WHERE id = ?1 AND status = 'pending' \
             AND reference IS NULL AND updated_at_us = ?2",
        )
        .bind(id)
        .bind(micros(seen))
        .bind(micros(now))
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn insert_payment(&self, p: &PaymentRecord) -> StoreResult<bool> {
        let res = sqlx::query(
            "INSERT INTO payments (id, customer_id, invoice_id, kind, amount, currency, status, reference, error, \
             created_at_us, updated_at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&p.id)
        .bind(&p.customer_id)
        .bind(&p.invoice_id)
        .bind(&p.kind)
        .bind(p.amount.to_string())
        .bind(p.currency.code())
        .bind(&p.status)
        .bind(&p.reference)
        .bind(&p.error)
        .bind(micros(p.created_at))
        .bind(micros(p.updated_at))
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn settle_payment(
        &self,
        id: &str,
        status: &str,
        reference: Option<&str>,
        error: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<(PaymentRecord, bool)>> {
        let mut tx = self.write.begin().await?;
        let res = sqlx::query(
            "UPDATE payments SET status = ?, reference = COALESCE(?, reference), error = ?, updated_at_us = ? \
             WHERE id = ? AND status = 'pending'",
        )
        .bind(status)
        .bind(reference)
        .bind(error)
        .bind(micros(at))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT * FROM payments WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref()
            .map(|r| Ok((payment_from_row(r)?, res.rows_affected() == 1)))
            .transpose()
    }

    async fn get_payment(&self, id: &str) -> StoreResult<Option<PaymentRecord>> {
        sqlx::query("SELECT * FROM payments WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
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
            "SELECT * FROM payments WHERE customer_id = ? AND (? IS NULL OR invoice_id = ?) \
             ORDER BY created_at_us, id",
        )
        .bind(customer_id)
        .bind(invoice_id)
        .bind(invoice_id)
        .fetch_all(&self.read)
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
            "INSERT INTO job_leases (name, owner, lease_until_us) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until_us = excluded.lease_until_us WHERE job_leases.owner = excluded.owner OR job_leases.lease_until_us < ?",
        )
        .bind(name)
        .bind(owner)
        .bind(micros(until))
        .bind(micros(now))
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<()> {
        sqlx::query("UPDATE job_leases SET lease_until_us = 0 WHERE name = ? AND owner = ?")
            .bind(name)
            .bind(owner)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn record_webhook(&self, id: &str, kind: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let res = sqlx::query(
            "INSERT INTO webhook_events (id, type, received_at_us) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(kind)
        .bind(micros(at))
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }
}

fn payment_from_row(r: &SqliteRow) -> StoreResult<PaymentRecord> {
    let currency: String = r.try_get("currency")?;
    Ok(PaymentRecord {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        invoice_id: r.try_get("invoice_id")?,
        kind: r.try_get("kind")?,
        amount: dec(r.try_get("amount")?)?,
        currency: Currency::from_str(&currency)
            .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
        status: r.try_get("status")?,
        reference: r.try_get("reference")?,
        error: r.try_get("error")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
        updated_at: from_micros(r.try_get("updated_at_us")?)?,
    })
}

const INSERT_INVOICE: &str = "INSERT INTO invoices (id, customer_id, kind, number, status, period_start_us, period_end_us, \
     currency, subtotal, tax, total, prepaid_applied, prepaid_excess, amount_due, document, corrects_invoice_id, events, \
     created_at_us, finalized_at_us, due_at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT DO NOTHING";

fn bind_invoice<'q>(
    q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    inv: &'q InvoiceRecord,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    q.bind(&inv.id)
        .bind(&inv.customer_id)
        .bind(&inv.kind)
        // A credit note is finalised at once: its number is set in the same transaction.
        .bind(inv.finalized_at.map(|_| format!("pending:{}", inv.id)))
        .bind(&inv.status)
        .bind(micros(inv.period_start))
        .bind(micros(inv.period_end))
        .bind(inv.currency.code())
        .bind(inv.subtotal.to_string())
        .bind(inv.tax.to_string())
        .bind(inv.total.to_string())
        .bind(inv.prepaid_applied.to_string())
        .bind(inv.prepaid_excess.to_string())
        .bind(inv.amount_due.to_string())
        .bind(&inv.document)
        .bind(&inv.corrects_invoice_id)
        .bind(inv.events)
        .bind(micros(inv.created_at))
        .bind(inv.finalized_at.map(micros))
        .bind(inv.due_at.map(micros))
}

async fn next_number(tx: &mut sqlx::SqliteConnection, series: &str) -> StoreResult<String> {
    sqlx::query("INSERT INTO invoice_numbers (series, last) VALUES (?, 0) ON CONFLICT DO NOTHING")
        .bind(series)
        .execute(&mut *tx)
        .await?;
    let n: i64 = sqlx::query_scalar(
        "UPDATE invoice_numbers SET last = last + 1 WHERE series = ? RETURNING last",
    )
    .bind(series)
    .fetch_one(&mut *tx)
    .await?;
    Ok(format!("{series}-{n:06}"))
}

async fn insert_wallet_tx(
    tx: &mut sqlx::SqliteConnection,
    c: &WalletTransaction,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
         VALUES (?, ?, ?, ?, ?, NULL, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&c.id)
    .bind(&c.customer_id)
    .bind(&c.kind)
    .bind(c.amount.to_string())
    .bind(c.currency.code())
    .bind(c.expires_at.map(micros))
    .bind(micros(c.created_at))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn opt_time(r: &SqliteRow, col: &str) -> StoreResult<Option<DateTime<Utc>>> {
    r.try_get::<Option<i64>, _>(col)?
        .map(from_micros)
        .transpose()
}

fn invoice_from_row(r: &SqliteRow) -> StoreResult<InvoiceRecord> {
    let currency: String = r.try_get("currency")?;
    Ok(InvoiceRecord {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        kind: r.try_get("kind")?,
        number: r.try_get("number")?,
        status: r.try_get("status")?,
        period_start: from_micros(r.try_get("period_start_us")?)?,
        period_end: from_micros(r.try_get("period_end_us")?)?,
        currency: Currency::from_str(&currency)
            .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
        subtotal: dec(r.try_get("subtotal")?)?,
        tax: dec(r.try_get("tax")?)?,
        total: dec(r.try_get("total")?)?,
        prepaid_applied: dec(r.try_get("prepaid_applied")?)?,
        prepaid_excess: dec(r.try_get("prepaid_excess")?)?,
        amount_due: dec(r.try_get("amount_due")?)?,
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

fn stored_event_from_row(r: &SqliteRow) -> StoreResult<StoredEvent> {
    Ok(StoredEvent {
        id: r.try_get("id")?,
        timestamp: from_micros(r.try_get("ts_us")?)?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        usage: usage_from_row(r)?,
        price_version_id: r.try_get("price_version_id")?,
        cost: opt_dec(r.try_get("cost")?)?,
        revenue: opt_dec(r.try_get("revenue")?)?,
    })
}

async fn insert_plan_version(
    tx: &mut sqlx::SqliteConnection,
    v: &PlanVersionRecord,
) -> StoreResult<()> {
    let res = sqlx::query(
        "INSERT INTO plan_versions (plan_id, version, name, effective_from_us, terms, created_at_us) \
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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

fn usage_from_row(r: &SqliteRow) -> StoreResult<TokenUsage> {
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

fn rollup_from_row(r: &SqliteRow) -> StoreResult<(RollupKey, RollupTotals)> {
    let grain: String = r.try_get("grain")?;
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
            cost: join_atto(r, "cost")?,
            revenue: join_atto(r, "revenue")?,
        },
    ))
}

/// 10^18: attounits per unit.
const ATTO: i64 = 1_000_000_000_000_000_000;

/// A non-negative decimal with at most 18 places as (units, attounits).
fn split_atto(d: Decimal) -> StoreResult<(i64, i64)> {
    let units = d.trunc();
    let atto = ((d - units) * Decimal::from(ATTO)).trunc();
    match (i64::try_from(units), i64::try_from(atto)) {
        (Ok(u), Ok(a)) if (d - units) * Decimal::from(ATTO) == atto && a >= 0 => Ok((u, a)),
        _ => Err(StoreError::Internal(anyhow::anyhow!(
            "rollup amount {d} is negative or has more than 18 decimal places"
        ))),
    }
}

/// A summed amount: `{name}_units` + `{name}_hi` × 10^-9 + `{name}_lo` × 10^-18.
fn join_atto(r: &SqliteRow, name: &str) -> StoreResult<Decimal> {
    let units: i64 = r.try_get(format!("{name}_units").as_str())?;
    let hi: i64 = r.try_get(format!("{name}_hi").as_str())?;
    let lo: i64 = r.try_get(format!("{name}_lo").as_str())?;
    Ok((Decimal::from(units) + Decimal::new(hi, 9) + Decimal::new(lo, 18)).normalize())
}

/// Adds `delta` to the rollup rows: multi-row upserts whose integer arithmetic is exact.
async fn apply_rollups(tx: &mut sqlx::SqliteConnection, delta: &RollupDelta) -> StoreResult<()> {
    let mut rows = Vec::with_capacity(delta.len());
    for (k, t) in delta {
        rows.push((k, t, split_atto(t.cost)?, split_atto(t.revenue)?));
    }
    for chunk in crate::ladder_chunks(&rows) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO rollups (grain, bucket_us, customer_id, provider, model, agent, events, requests, \
             input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, unpriced_events, \
             cost_units, cost_atto, revenue_units, revenue_atto) ",
        );
        qb.push_values(chunk, |mut b, (k, t, cost, revenue)| {
            b.push_bind(k.grain.as_str())
                .push_bind(micros(k.bucket))
                .push_bind(&k.customer_id)
                .push_bind(&k.provider)
                .push_bind(&k.model)
                .push_bind(&k.agent)
                .push_bind(t.events)
                .push_bind(t.requests)
                .push_bind(t.input_tokens)
                .push_bind(t.output_tokens)
                .push_bind(t.cached_input_tokens)
                .push_bind(t.cache_write_tokens)
                .push_bind(t.reasoning_tokens)
                .push_bind(t.unpriced_events)
                .push_bind(cost.0)
                .push_bind(cost.1)
                .push_bind(revenue.0)
                .push_bind(revenue.1);
        });
        // SET expressions see the old row; attounits carry into units.
        qb.push(
            " ON CONFLICT (grain, bucket_us, customer_id, provider, model, agent) DO UPDATE SET \
             events = events + excluded.events, requests = requests + excluded.requests, \
             input_tokens = input_tokens + excluded.input_tokens, \
             output_tokens = output_tokens + excluded.output_tokens, \
             cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens, \
             cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens, \
             reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens, \
             unpriced_events = unpriced_events + excluded.unpriced_events, \
             cost_units = cost_units + excluded.cost_units + (cost_atto + excluded.cost_atto) / 1000000000000000000, \
             cost_atto = (cost_atto + excluded.cost_atto) % 1000000000000000000, \
             revenue_units = revenue_units + excluded.revenue_units + (revenue_atto + excluded.revenue_atto) / 1000000000000000000, \
             revenue_atto = (revenue_atto + excluded.revenue_atto) % 1000000000000000000",
        );
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Appends the conditions of a usage filter (the query so far ends in `WHERE 1 = 1`).
fn push_usage_filter<'a>(qb: &mut QueryBuilder<'a, Sqlite>, filter: &'a UsageFilter) {
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
        // Tag names are validated to [A-Za-z0-9_.-]; quoting makes '.' literal in the path.
        qb.push(" AND json_extract(tags, ")
            .push_bind(format!("$.\"{k}\""))
            .push(") = ")
            .push_bind(v);
    }
}

fn wallet_tx_from_row(r: &SqliteRow) -> StoreResult<WalletTransaction> {
    let currency: String = r.try_get("currency")?;
    Ok(WalletTransaction {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        kind: r.try_get("kind")?,
        amount: dec(&r.try_get::<String, _>("amount")?)?,
        currency: Currency::from_str(&currency)
            .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
        event_id: r.try_get("event_id")?,
        expires_at: r
            .try_get::<Option<i64>, _>("expires_at_us")?
            .map(from_micros)
            .transpose()?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}
