//! PostgreSQL store: for several fatura instances sharing one ledger.
//!
//! Money columns are NUMERIC (exact). Catalog consistency across instances uses a
//! transaction-scoped advisory lock: event inserts and pricing take it shared, price
//! imports take it exclusive, so an import never interleaves with events costed against
//! the revision it replaces. Events are inserted in id order so that concurrent batches
//! sharing ids lock rows in the same order and cannot deadlock.
//!
//! The statements are in `shared.rs` (compiled here as the module `shared`); this file
//! holds only what PostgreSQL does differently: its pool, its migrations, the advisory
//! locks, rollup amounts summed as NUMERIC, the JSONB tag filter, and what only a database
//! shared by a fleet has: the live feed (`LISTEN/NOTIFY`), budget shares and rate-limit
//! windows.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fatura_core::Currency;
use fatura_core::rollup::{RollupDelta, RollupKey, RollupTotals};
use futures_util::StreamExt;
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{QueryBuilder, Row};

use self::shared::u;
use crate::{
    HoldBasis, HoldGrant, HoldRequest, HoldRow, LiveStream, PreparedEvent, StoreError, StoreResult,
    micros,
};

// Deliberately compiled once per database (see shared.rs).
#[allow(clippy::duplicate_mod)]
#[path = "shared.rs"]
mod shared;

type Db = sqlx::Postgres;
type DbRow = PgRow;
type Conn = sqlx::PgConnection;
type Impl = PgStore;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Advisory lock key guarding the price catalog ("fatura" + 1).
const CATALOG_LOCK: i64 = 0x6661_7475_7261_0001;

/// The PostgreSQL implementation of [`crate::Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
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

    // What `shared.rs` asks of a database (see there).

    const BACKEND: &'static str = "postgres";
    const PUBLISHES_LIVE: bool = true;
    const SHARED: bool = true;

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    /// The catalog lock, exclusive: price imports and pricing changes.
    async fn lock_catalog(tx: &mut Conn) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CATALOG_LOCK)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// The catalog lock, shared: event inserts and pricing.
    async fn lock_catalog_shared(tx: &mut Conn) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(CATALOG_LOCK)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// In the events' transaction: moves their prices out of the budget shares, and
    /// publishes them to every instance's live views (delivered when, and only if, the
    /// transaction commits).
    async fn events_recorded(
        tx: &mut Conn,
        events: &[PreparedEvent],
        inserted: &HashSet<String>,
    ) -> StoreResult<()> {
        apply_holds(tx, events, inserted).await?;
        let payloads = live_payloads(events, inserted);
        if !payloads.is_empty() {
            sqlx::query("SELECT pg_notify('fatura_live', p) FROM unnest($1::text[]) AS p")
                .bind(payloads)
                .execute(tx)
                .await?;
        }
        Ok(())
    }

    async fn apply_rollups(tx: &mut Conn, delta: &RollupDelta) -> StoreResult<()> {
        upsert_rollups(tx, delta).await
    }

    const ROLLUP_MONEY_SUMS: &'static str = "SUM(cost) AS cost, SUM(revenue) AS revenue";

    fn rollup_money(r: &PgRow) -> StoreResult<(Decimal, Decimal)> {
        Ok((
            r.try_get::<Decimal, _>("cost")?.normalize(),
            r.try_get::<Decimal, _>("revenue")?.normalize(),
        ))
    }

    fn push_tag_filter<'a>(qb: &mut QueryBuilder<'a, Db>, key: &'a str, value: &'a str) {
        qb.push(" AND tags ->> ")
            .push_bind(key)
            .push(" = ")
            .push_bind(value);
    }

    fn invoice_amount(d: Decimal, currency: Currency) -> Decimal {
        minor_scale(d, currency)
    }

    /// NUMERIC keeps the scale it was given: values read back normalised.
    fn outcome_value(d: Decimal) -> Decimal {
        d.normalize()
    }

    /// Not needed: a fleet reads shared state from the database itself.
    async fn external_writes_counter(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }

    async fn live_feed(&self) -> StoreResult<Option<LiveStream>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(LIVE_CHANNEL).await?;
        let stream = listener.into_stream().map(|n| {
            let n = n?;
            serde_json::from_str::<Vec<crate::LiveEvent>>(n.payload())
                .map_err(|e| StoreError::Internal(anyhow::anyhow!("bad live notification: {e}")))
        });
        Ok(Some(Box::pin(stream)))
    }

    async fn fleet_grant_hold(&self, req: &HoldRequest<'_>) -> StoreResult<HoldGrant> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('fatura-budget:' || $1, 0))")
            .bind(req.customer_id)
            .execute(&mut *tx)
            .await?;
        let now = micros(req.now);
        // One statement, so one snapshot: a writer's commit moves a price from a share into
        // the ledger atomically, and is seen entirely or not at all.
        let (base_sql, month) = match req.basis {
            HoldBasis::Wallet => (
                "(SELECT COALESCE(SUM(amount), 0) FROM wallet_transactions WHERE customer_id = $1 \
                 AND kind <> 'charge' AND (expires_at_us IS NULL OR expires_at_us > $3)) \
                 - (SELECT COALESCE(SUM(charged), 0) FROM wallet_holds WHERE customer_id = $1)",
                0,
            ),
            HoldBasis::MonthlyLimit { month_start, .. } => (
                "-(SELECT COALESCE(SUM(revenue), 0) FROM rollups WHERE grain = 'month' \
                 AND bucket_us = $4 AND customer_id = $1)",
                micros(month_start),
            ),
        };
        let sql = format!(
            "SELECT ({base_sql})::NUMERIC AS base, \
             (SELECT COALESCE(SUM(amount), 0) FROM wallet_holds WHERE customer_id = $1 \
              AND instance_id <> $2 AND expires_at_us > $3)::NUMERIC AS others, \
             (SELECT COALESCE(SUM(amount), 0) FROM wallet_holds WHERE customer_id = $1 \
              AND instance_id = $2)::NUMERIC AS mine"
        );
        let row = sqlx::query(&sql)
            .bind(req.customer_id)
            .bind(req.instance_id)
            .bind(now)
            .bind(month)
            .fetch_one(&mut *tx)
            .await?;
        let mut base: Decimal = row.try_get("base")?;
        if let HoldBasis::MonthlyLimit { limit, .. } = req.basis {
            base += limit;
        }
        let others: Decimal = row.try_get("others")?;
        let mine: Decimal = row.try_get("mine")?;
        let free = base - others - mine.max(Decimal::ZERO);
        if free < req.need {
            tx.rollback().await?;
            return Ok(HoldGrant::Short(free.max(Decimal::ZERO)));
        }
        let extra = req
            .spare
            .max(Decimal::ZERO)
            .min(((free - req.need) / Decimal::from(4)).max(Decimal::ZERO));
        let delta = req.need + extra;
        sqlx::query(
            "INSERT INTO wallet_holds (customer_id, instance_id, amount, charged, expires_at_us) \
             VALUES ($1, $2, $3, 0, $4) ON CONFLICT (customer_id, instance_id) DO UPDATE \
             SET amount = wallet_holds.amount + EXCLUDED.amount, expires_at_us = EXCLUDED.expires_at_us",
        )
        .bind(req.customer_id)
        .bind(req.instance_id)
        .bind(delta)
        .bind(micros(req.until))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(HoldGrant::Granted(delta))
    }

    async fn fleet_trim_hold(
        &self,
        customer_id: &str,
        instance_id: &str,
        release: Decimal,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let live: Option<bool> = sqlx::query_scalar(
            "UPDATE wallet_holds SET amount = amount - $3, \
             expires_at_us = CASE WHEN expires_at_us > $4 THEN $5 ELSE expires_at_us END \
             WHERE customer_id = $1 AND instance_id = $2 RETURNING expires_at_us > $4",
        )
        .bind(customer_id)
        .bind(instance_id)
        .bind(release)
        .bind(micros(now))
        .bind(micros(until))
        .fetch_optional(&self.pool)
        .await?;
        Ok(live.unwrap_or(false))
    }

    async fn fleet_release_holds(&self, instance_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE wallet_holds SET amount = 0, expires_at_us = 0 WHERE instance_id = $1")
            .bind(instance_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn fleet_holds(
        &self,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<HoldRow>> {
        let rows = sqlx::query(
            "SELECT instance_id, amount, expires_at_us > $2 AS live FROM wallet_holds \
             WHERE customer_id = $1 AND instance_id <> '' ORDER BY instance_id",
        )
        .bind(customer_id)
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HoldRow {
                    instance_id: r.try_get("instance_id")?,
                    amount: r.try_get("amount")?,
                    live: r.try_get("live")?,
                })
            })
            .collect()
    }

    async fn fleet_count_rate(
        &self,
        key_id: &str,
        window_us: i64,
        tokens: u64,
        rpm: u64,
        tpm: u64,
    ) -> StoreResult<bool> {
        let admitted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO rate_windows (key_id, window_us, requests, tokens) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (key_id, window_us) DO UPDATE SET requests = rate_windows.requests + 1, \
             tokens = rate_windows.tokens + EXCLUDED.tokens \
             WHERE ($4 = 0 OR rate_windows.requests < $4) \
             AND ($5 = 0 OR rate_windows.tokens = 0 OR rate_windows.tokens + EXCLUDED.tokens <= $5) \
             RETURNING requests",
        )
        .bind(key_id)
        .bind(window_us)
        .bind(u(tokens))
        .bind(u(rpm))
        .bind(u(tpm))
        .fetch_optional(&self.pool)
        .await?;
        Ok(admitted.is_some())
    }

    async fn fleet_prune_rate_windows(&self, before_us: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM rate_windows WHERE window_us < $1")
            .bind(before_us)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// NUMERIC keeps no trailing zeros for zero: amounts come back with the currency's decimals.
fn minor_scale(mut d: Decimal, currency: Currency) -> Decimal {
    d.rescale(currency.minor_units());
    d
}

/// Moves the prices of newly recorded gateway calls out of their instances' budget shares
/// and adds wallet charges to the charged totals, in the events' transaction. Rows are
/// touched in key order, so concurrent writers cannot deadlock.
async fn apply_holds(
    tx: &mut Conn,
    events: &[PreparedEvent],
    inserted: &HashSet<String>,
) -> StoreResult<()> {
    let mut sums: std::collections::BTreeMap<(&str, &str), (Decimal, Decimal)> =
        std::collections::BTreeMap::new();
    for p in events {
        let e = &p.event;
        if !inserted.contains(e.id.as_str())
            || (e.budget_hold.is_none() && e.prepaid_charge.is_none())
        {
            continue;
        }
        let instance = e.budget_hold.as_ref().map_or("", |h| h.instance.as_str());
        let entry = sums.entry((e.customer_id.as_str(), instance)).or_default();
        entry.0 += e.budget_hold.as_ref().map_or(Decimal::ZERO, |h| h.amount);
        entry.1 += e.prepaid_charge.unwrap_or_default();
    }
    let rows: Vec<_> = sums.into_iter().collect();
    for chunk in crate::ladder_chunks(&rows) {
        let mut qb = QueryBuilder::<Db>::new(
            "INSERT INTO wallet_holds (customer_id, instance_id, amount, charged, expires_at_us) ",
        );
        qb.push_values(
            chunk,
            |mut b, ((customer, instance), (released, charged))| {
                b.push_bind(*customer)
                    .push_bind(*instance)
                    .push_bind(-*released)
                    .push_bind(*charged)
                    .push_bind(0_i64);
            },
        );
        qb.push(
            " ON CONFLICT (customer_id, instance_id) DO UPDATE SET \
             amount = wallet_holds.amount + EXCLUDED.amount, charged = wallet_holds.charged + EXCLUDED.charged",
        );
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Adds `delta` to the rollup rows, exactly (NUMERIC arithmetic in the upsert).
async fn upsert_rollups(tx: &mut Conn, delta: &RollupDelta) -> StoreResult<()> {
    let rows: Vec<(&RollupKey, &RollupTotals)> = delta.iter().collect();
    for chunk in crate::ladder_chunks(&rows) {
        let mut qb = QueryBuilder::<Db>::new(
            "INSERT INTO rollups (grain, bucket_us, customer_id, provider, model, agent, events, requests, \
             input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, unpriced_events, \
             cost, revenue) ",
        );
        qb.push_values(chunk, |mut b, (k, t)| {
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
                .push_bind(t.cost)
                .push_bind(t.revenue);
        });
        qb.push(
            " ON CONFLICT (grain, bucket_us, customer_id, provider, model, agent) DO UPDATE SET \
             events = rollups.events + excluded.events, requests = rollups.requests + excluded.requests, \
             input_tokens = rollups.input_tokens + excluded.input_tokens, \
             output_tokens = rollups.output_tokens + excluded.output_tokens, \
             cached_input_tokens = rollups.cached_input_tokens + excluded.cached_input_tokens, \
             cache_write_tokens = rollups.cache_write_tokens + excluded.cache_write_tokens, \
             reasoning_tokens = rollups.reasoning_tokens + excluded.reasoning_tokens, \
             unpriced_events = rollups.unpriced_events + excluded.unpriced_events, \
             cost = rollups.cost + excluded.cost, revenue = rollups.revenue + excluded.revenue",
        );
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// The notification channel of newly recorded events.
const LIVE_CHANNEL: &str = "fatura_live";

/// PostgreSQL's limit on a notification payload is 8,000 bytes: the batch's new events go
/// out as JSON arrays of at most this many bytes (an event alone is far smaller).
const LIVE_PAYLOAD_BYTES: usize = 7_000;

/// The newly inserted events of a batch as notification payloads.
fn live_payloads(events: &[PreparedEvent], inserted: &HashSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut size = 2;
    for p in events
        .iter()
        .filter(|p| inserted.contains(p.event.id.as_str()))
    {
        let Ok(one) = serde_json::to_string(&crate::LiveEvent::of(p)) else {
            continue;
        };
        if !current.is_empty() && size + one.len() + 1 > LIVE_PAYLOAD_BYTES {
            out.push(format!("[{}]", current.join(",")));
            current.clear();
            size = 2;
        }
        size += one.len() + 1;
        current.push(one);
    }
    if !current.is_empty() {
        out.push(format!("[{}]", current.join(",")));
    }
    out
}
