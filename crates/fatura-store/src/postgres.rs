//! PostgreSQL store: for several fatura instances sharing one ledger.
//!
//! Money columns are NUMERIC (exact). Catalog consistency across instances uses a
//! transaction-scoped advisory lock: event inserts and pricing take it shared, price
//! imports take it exclusive, so an import never interleaves with events costed against
//! the revision it replaces. Events are inserted in id order so that concurrent batches
//! sharing ids lock rows in the same order and cannot deadlock.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fatura_core::catalog::{PriceComponents, PriceVersion, UnitPrice};
use fatura_core::usage::{UsageAggregator, UsageRecord};
use fatura_core::{Currency, TokenUsage};
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};

use crate::{
    AlertRecord, ApiKeyRecord, Customer, EventPricing, FxRate, INSERT_CHUNK, InsertOutcome,
    PlanAssignment, PlanVersionRecord, PreparedEvent, PriceImport, PricingChange, PricingData,
    Store, StoreError, StoreResult, StoredEvent, UnpricedEvent, UnpricedModel, UsageFilter,
    WalletTransaction, count, from_micros, micros, parse_terms, terms_json,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Advisory lock key guarding the price catalog ("fatura" + 1).
const CATALOG_LOCK: i64 = 0x6661_7475_7261_0001;

/// The PostgreSQL implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn price(d: Decimal) -> StoreResult<UnitPrice> {
    UnitPrice::new(d)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("bad price in database: {e}")))
}

fn opt_price(d: Option<Decimal>) -> StoreResult<Option<UnitPrice>> {
    d.map(price).transpose()
}

fn u(v: u64) -> i64 {
    // Counts are bounded by fatura_core::event::MAX_COUNT (10^12), far below i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn customer_from_row(r: &PgRow) -> StoreResult<Customer> {
    let currency: String = r.try_get("currency")?;
    Ok(Customer {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        currency: Currency::from_str(&currency)
            .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
        prepaid: r.try_get::<String, _>("billing_mode")? == "prepaid",
        monthly_spend_limit: r.try_get("monthly_spend_limit")?,
        created_at: from_micros(r.try_get("created_at_us")?)?,
    })
}

fn key_from_row(r: &PgRow) -> StoreResult<ApiKeyRecord> {
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

fn version_from_row(r: &PgRow) -> StoreResult<PriceVersion> {
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

fn opt_value(p: Option<UnitPrice>) -> Option<Decimal> {
    p.map(UnitPrice::value)
}

impl PgStore {
    /// Connects to `url` (`postgres://…`) with a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(PgStore { pool })
    }

    async fn lock_catalog_shared(conn: &mut sqlx::PgConnection) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(CATALOG_LOCK)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn revision_in(conn: &mut sqlx::PgConnection) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM catalog_meta WHERE id = 1")
                .fetch_one(conn)
                .await?,
        )
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_customer(&self, c: &Customer) -> StoreResult<()> {
        let res = sqlx::query(
            "INSERT INTO customers (id, name, currency, created_at_us, billing_mode, monthly_spend_limit) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(c.currency.code())
        .bind(micros(c.created_at))
        .bind(if c.prepaid { "prepaid" } else { "postpaid" })
        .bind(c.monthly_spend_limit)
        .execute(&self.pool)
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
            .bind(limit)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn get_customer(&self, id: &str) -> StoreResult<Option<Customer>> {
        sqlx::query("SELECT * FROM customers WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(customer_from_row)
            .transpose()
    }

    async fn list_customers(&self) -> StoreResult<Vec<Customer>> {
        sqlx::query("SELECT * FROM customers ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(customer_from_row)
            .collect()
    }

    async fn existing_customer_ids(&self, ids: &[String]) -> StoreResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in ids.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Postgres>::new("SELECT id FROM customers WHERE id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id);
            }
            qb.push(")");
            let rows: Vec<String> = qb.build_query_scalar().fetch_all(&self.pool).await?;
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
        .bind(&c.kind)
        .bind(c.amount)
        .bind(c.currency.code())
        .bind(c.event_id.as_deref())
        .bind(c.expires_at.map(micros))
        .bind(micros(c.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn wallet_transactions(&self, customer_id: &str) -> StoreResult<Vec<WalletTransaction>> {
        let rows = sqlx::query(
            "SELECT * FROM wallet_transactions WHERE customer_id = $1 ORDER BY created_at_us, id",
        )
        .bind(customer_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let currency: String = r.try_get("currency")?;
                Ok(WalletTransaction {
                    id: r.try_get("id")?,
                    customer_id: r.try_get("customer_id")?,
                    kind: r.try_get("kind")?,
                    amount: r.try_get("amount")?,
                    currency: Currency::from_str(&currency)
                        .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
                    event_id: r.try_get("event_id")?,
                    expires_at: r
                        .try_get::<Option<i64>, _>("expires_at_us")?
                        .map(from_micros)
                        .transpose()?,
                    created_at: from_micros(r.try_get("created_at_us")?)?,
                })
            })
            .collect()
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn find_active_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        sqlx::query("SELECT * FROM api_keys WHERE key_hash = $1 AND revoked_at_us IS NULL")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn list_api_keys(&self, customer_id: &str) -> StoreResult<Vec<ApiKeyRecord>> {
        sqlx::query("SELECT * FROM api_keys WHERE customer_id = $1 ORDER BY created_at_us, id")
            .bind(customer_id)
            .fetch_all(&self.pool)
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
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn catalog_revision(&self) -> StoreResult<i64> {
        let mut conn = self.pool.acquire().await?;
        Self::revision_in(&mut conn).await
    }

    async fn load_catalog(&self) -> StoreResult<(i64, Vec<PriceVersion>)> {
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CATALOG_LOCK)
            .execute(&mut *tx)
            .await?;
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
        for chunk in import.create.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO price_versions (provider, model, effective_from_us, prompt, completion, cache_read, \
                 cache_write, reasoning, per_request, per_image, web_search, source, imported_at_us) ",
            );
            qb.push_values(chunk, |mut b, (item, _)| {
                let p = &item.prices;
                b.push_bind(&item.provider)
                    .push_bind(&item.model)
                    .push_bind(from)
                    .push_bind(p.prompt.value())
                    .push_bind(p.completion.value())
                    .push_bind(opt_value(p.cache_read))
                    .push_bind(opt_value(p.cache_write))
                    .push_bind(opt_value(p.reasoning))
                    .push_bind(p.per_request.value())
                    .push_bind(p.per_image.value())
                    .push_bind(p.web_search.value())
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
        let mut tx = self.pool.begin().await?;
        Self::lock_catalog_shared(&mut tx).await?;
        if Self::revision_in(&mut tx).await? != catalog_revision {
            return Err(StoreError::CatalogChanged);
        }
        let mut inserted: HashSet<String> = HashSet::with_capacity(events.len());
        for chunk in events.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Postgres>::new(
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
                    .push_unseparated("::jsonb")
                    .push_bind(e.upstream_cost)
                    .push_bind(p.pricing.as_ref().map(|x| x.price_version_id))
                    .push_bind(p.pricing.as_ref().map(|x| x.cost))
                    .push_bind(p.pricing.as_ref().map(|x| x.revenue))
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
        for chunk in leftovers.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Postgres>::new(
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
        for chunk in charged.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO wallet_transactions (id, customer_id, kind, amount, currency, event_id, expires_at_us, created_at_us) \
                 SELECT column1, column2, 'charge', column3, (SELECT currency FROM customers WHERE id = column2), \
                 column4, NULL, column5 FROM (",
            );
            qb.push_values(chunk, |mut b, p| {
                let c = p.event.prepaid_charge.unwrap_or_default();
                b.push_bind(format!("charge:{}", p.event.id))
                    .push_bind(p.event.customer_id.as_str())
                    .push_bind(-c)
                    .push_bind(p.event.id.as_str())
                    .push_bind(micros(p.ingested_at));
            });
            qb.push(") AS v");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let unpriced = events
            .iter()
            .filter(|p| p.pricing.is_none() && inserted.contains(p.event.id.as_str()))
            .count();
        Ok(InsertOutcome {
            accepted: inserted.len() as u64,
            duplicates: leftovers.len() as u64,
            unpriced: unpriced as u64,
        })
    }

    async fn aggregate_usage(
        &self,
        filter: &UsageFilter,
        agg: &mut UsageAggregator,
    ) -> StoreResult<()> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT customer_id, provider, model, ts_us, requests, input_tokens, output_tokens, cached_input_tokens, \
             cache_write_tokens, reasoning_tokens, cost, revenue, estimated FROM usage_events WHERE 1 = 1",
        );
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
            qb.push(" AND tags ->> ")
                .push_bind(k)
                .push(" = ")
                .push_bind(v);
        }
        let query = qb.build();
        let mut rows = query.fetch(&self.pool);
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
                cost: r.try_get("cost")?,
                revenue: r.try_get("revenue")?,
                estimated: r.try_get("estimated")?,
            };
            agg.add(&record)
                .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?;
        }
        Ok(())
    }

    async fn unpriced_models(&self, customer_id: Option<&str>) -> StoreResult<Vec<UnpricedModel>> {
        let rows = sqlx::query(
            "SELECT provider, model, COUNT(*) AS events, SUM(requests)::BIGINT AS requests, SUM(input_tokens)::BIGINT AS input_tokens, \
             SUM(output_tokens)::BIGINT AS output_tokens, MIN(ts_us) AS first_us, MAX(ts_us) AS last_us \
             FROM usage_events WHERE cost IS NULL AND ($1::text IS NULL OR customer_id = $1) \
             GROUP BY provider, model ORDER BY provider, model",
        )
        .bind(customer_id)
        .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        Self::lock_catalog_shared(&mut tx).await?;
        if Self::revision_in(&mut tx).await? != catalog_revision {
            return Err(StoreError::CatalogChanged);
        }
        let mut priced = 0;
        for (id, p) in pricing {
            let res = sqlx::query(
                "UPDATE usage_events SET price_version_id = $1, cost = $2, revenue = $3 WHERE id = $4 AND cost IS NULL",
            )
            .bind(p.price_version_id)
            .bind(p.cost)
            .bind(p.revenue)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            priced += res.rows_affected();
        }
        tx.commit().await?;
        Ok(priced)
    }

    async fn count_events(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
            .fetch_one(&self.pool)
            .await?;
        count(n)
    }

    async fn apply_pricing_change(&self, change: &PricingChange) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CATALOG_LOCK)
            .execute(&mut *tx)
            .await?;
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
                let existing: Option<Decimal> = sqlx::query_scalar(
                    "SELECT rate FROM fx_rates WHERE currency = $1 AND rate_date = $2",
                )
                .bind(r.currency.code())
                .bind(r.date)
                .fetch_optional(&mut *tx)
                .await?;
                match existing {
                    Some(old) if old == r.rate => {
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
                    "INSERT INTO fx_rates (currency, rate_date, rate, created_at_us) VALUES ($1, $2, $3, $4)",
                )
                .bind(r.currency.code())
                .bind(r.date)
                .bind(r.rate)
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
        let mut tx = self.pool.begin().await?;
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
                Ok(FxRate {
                    currency: Currency::from_str(&currency)
                        .map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))?,
                    date: r.try_get("rate_date")?,
                    rate: r.try_get("rate")?,
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
             message, first_seen_us, last_seen_us, occurrences) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1) \
             ON CONFLICT (dedupe_key) DO UPDATE SET last_seen_us = GREATEST(alerts.last_seen_us, excluded.last_seen_us), \
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_alerts(&self) -> StoreResult<Vec<AlertRecord>> {
        sqlx::query("SELECT * FROM alerts ORDER BY last_seen_us DESC, id")
            .fetch_all(&self.pool)
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
             cache_write_tokens, reasoning_tokens, requests, price_version_id, cost FROM usage_events \
             WHERE customer_id = $1 AND ts_us >= $2 AND ts_us < $3",
        )
        .bind(customer_id)
        .bind(micros(from))
        .bind(micros(to))
        .fetch(&self.pool);
        let mut out = Vec::new();
        while let Some(r) = rows.try_next().await? {
            out.push(StoredEvent {
                id: r.try_get("id")?,
                timestamp: from_micros(r.try_get("ts_us")?)?,
                provider: r.try_get("provider")?,
                model: r.try_get("model")?,
                usage: usage_from_row(&r)?,
                price_version_id: r.try_get("price_version_id")?,
                cost: r.try_get("cost")?,
            });
        }
        Ok(out)
    }

    async fn versions_imported_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM price_versions WHERE imported_at_us >= $1 ORDER BY id",
        )
        .bind(micros(since))
        .fetch_all(&self.pool)
        .await?)
    }
}

async fn insert_plan_version(
    tx: &mut sqlx::PgConnection,
    v: &PlanVersionRecord,
) -> StoreResult<()> {
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

fn usage_from_row(r: &PgRow) -> StoreResult<TokenUsage> {
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
