//! SQLite store: the embedded default.
//!
//! Writes go through a pool of exactly one connection, so write transactions are
//! serialised inside the process and never meet `SQLITE_BUSY`; reads use a separate pool
//! and, thanks to WAL, never block on writes. `synchronous=FULL` makes every commit
//! durable before it returns. One SQLite file serves one fatura process; fleets use
//! PostgreSQL.
//!
//! The statements are in `shared.rs` (compiled here as the module `shared`); this file
//! holds only what SQLite does differently: its pools, its migrations, rollup amounts kept
//! as exact integer pairs (SQLite has no exact decimal arithmetic), the JSON tag filter,
//! and the answers of a database that one process owns (no catalog lock: the single writer
//! serialises; budgets, rate limits and the live feed stay in the process's memory).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fatura_core::Currency;
use fatura_core::rollup::RollupDelta;
use rust_decimal::Decimal;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use crate::{
    HoldGrant, HoldRequest, HoldRow, LiveStream, PreparedEvent, StoreError, StoreResult, micros,
};

// Deliberately compiled once per database (see shared.rs).
#[allow(clippy::duplicate_mod)]
#[path = "shared.rs"]
mod shared;

type Db = sqlx::Sqlite;
type DbRow = SqliteRow;
type Conn = sqlx::SqliteConnection;
type Impl = SqliteStore;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite implementation of [`crate::Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
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

    // What `shared.rs` asks of a database (see there).

    const BACKEND: &'static str = "sqlite";
    const PUBLISHES_LIVE: bool = false;
    const SHARED: bool = false;

    fn reader(&self) -> &SqlitePool {
        &self.read
    }

    /// The one write connection.
    fn writer(&self) -> &SqlitePool {
        &self.write
    }

    /// Nothing to lock: the one write connection serialises every write transaction.
    async fn lock_catalog(_tx: &mut Conn) -> StoreResult<()> {
        Ok(())
    }

    /// As [`SqliteStore::lock_catalog`].
    async fn lock_catalog_shared(_tx: &mut Conn) -> StoreResult<()> {
        Ok(())
    }

    /// Nothing more: the process keeps its budgets in memory and publishes its own events.
    async fn events_recorded(
        _tx: &mut Conn,
        _events: &[PreparedEvent],
        _inserted: &std::collections::HashSet<String>,
    ) -> StoreResult<()> {
        Ok(())
    }

    async fn apply_rollups(tx: &mut Conn, delta: &RollupDelta) -> StoreResult<()> {
        upsert_rollups(tx, delta).await
    }

    /// Attounits are summed as two halves of 9 digits each, which cannot overflow.
    const ROLLUP_MONEY_SUMS: &'static str = "SUM(cost_units) AS cost_units, SUM(cost_atto / 1000000000) AS cost_hi, \
         SUM(cost_atto % 1000000000) AS cost_lo, SUM(revenue_units) AS revenue_units, \
         SUM(revenue_atto / 1000000000) AS revenue_hi, SUM(revenue_atto % 1000000000) AS revenue_lo";

    fn rollup_money(r: &SqliteRow) -> StoreResult<(Decimal, Decimal)> {
        Ok((join_atto(r, "cost")?, join_atto(r, "revenue")?))
    }

    fn push_tag_filter<'a>(qb: &mut QueryBuilder<'a, Db>, key: &str, value: &'a str) {
        // Tag names are validated to [A-Za-z0-9_.-]; quoting makes '.' literal in the path.
        qb.push(" AND json_extract(tags, ")
            .push_bind(format!("$.\"{key}\""))
            .push(") = ")
            .push_bind(value);
    }

    /// Amounts read back exactly as written (TEXT).
    fn invoice_amount(d: Decimal, _currency: Currency) -> Decimal {
        d
    }

    /// Values read back exactly as written (TEXT).
    fn outcome_value(d: Decimal) -> Decimal {
        d
    }

    // One process owns the file: the answers of `Store`'s defaults.

    async fn live_feed(&self) -> StoreResult<Option<LiveStream>> {
        Ok(None)
    }

    /// `PRAGMA data_version` of the write connection: per connection, it changes when any
    /// other connection (another process: the CLI beside `fatura serve`) commits. The
    /// write pool's single connection is the only one this process commits through, so
    /// its own writes never change it.
    async fn external_writes_counter(&self) -> StoreResult<Option<i64>> {
        let v: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&self.write)
            .await?;
        Ok(Some(v))
    }

    async fn fleet_grant_hold(&self, _req: &HoldRequest<'_>) -> StoreResult<HoldGrant> {
        Err(crate::needs_shared_database("budget shares"))
    }

    async fn fleet_trim_hold(
        &self,
        _customer_id: &str,
        _instance_id: &str,
        _release: Decimal,
        _now: DateTime<Utc>,
        _until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        Ok(false)
    }

    async fn fleet_release_holds(&self, _instance_id: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn fleet_holds(
        &self,
        _customer_id: &str,
        _now: DateTime<Utc>,
    ) -> StoreResult<Vec<HoldRow>> {
        Ok(Vec::new())
    }

    async fn fleet_count_rate(
        &self,
        _key_id: &str,
        _window_us: i64,
        _tokens: u64,
        _rpm: u64,
        _tpm: u64,
    ) -> StoreResult<bool> {
        Err(crate::needs_shared_database("shared rate limits"))
    }

    async fn fleet_prune_rate_windows(&self, _before_us: i64) -> StoreResult<()> {
        Ok(())
    }
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
async fn upsert_rollups(tx: &mut Conn, delta: &RollupDelta) -> StoreResult<()> {
    let mut rows = Vec::with_capacity(delta.len());
    for (k, t) in delta {
        rows.push((k, t, split_atto(t.cost)?, split_atto(t.revenue)?));
    }
    for chunk in crate::ladder_chunks(&rows) {
        let mut qb = QueryBuilder::<Db>::new(
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
