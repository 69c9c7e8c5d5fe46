//! Analytics over the rollups: time series and summaries. Every answer is a sum of rollup
//! rows whose buckets tile the asked range exactly (each piece of the range at the coarsest
//! grain that fits, see [`Grain::cover`]), summed in the database over the dimensions the
//! answer does not need, so it equals a recount of the raw events without reading them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use fatura_core::rollup::{
    Dims, Grain, MINUTE_RETENTION, RollupKey, RollupTotals, SignedCover, minute_cutoff,
};
use rust_decimal::Decimal;

use super::{Fatura, ServiceError, ServiceResult};

/// What a time series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Provisional revenue, USD.
    Revenue,
    /// Upstream cost, USD.
    Cost,
    /// Gross margin (revenue − cost) / revenue.
    Margin,
    /// Requests.
    Requests,
    /// Input + output tokens.
    Tokens,
}

impl Metric {
    /// Parses a metric name.
    pub fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "revenue" => Metric::Revenue,
            "cost" => Metric::Cost,
            "margin" => Metric::Margin,
            "requests" => Metric::Requests,
            "tokens" => Metric::Tokens,
            _ => return None,
        })
    }

    /// Whether only operators may see it.
    pub fn operator_only(self) -> bool {
        matches!(self, Metric::Cost | Metric::Margin)
    }

    fn value(self, t: &RollupTotals) -> Option<Decimal> {
        Some(match self {
            Metric::Revenue => t.revenue.normalize(),
            Metric::Cost => t.cost.normalize(),
            Metric::Margin => margin(t)?,
            Metric::Requests => Decimal::from(t.requests),
            Metric::Tokens => Decimal::from(t.tokens()),
        })
    }
}

/// Gross margin of totals, 6 decimals; `None` without revenue.
pub fn margin(t: &RollupTotals) -> Option<Decimal> {
    (!t.revenue.is_zero()).then(|| ((t.revenue - t.cost) / t.revenue).round_dp(6).normalize())
}

/// A dimension to group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Customer.
    Customer,
    /// Model.
    Model,
    /// Provider.
    Provider,
    /// The `agent` tag.
    Agent,
}

impl Dimension {
    /// Parses a dimension name.
    pub fn parse(s: &str) -> Option<Dimension> {
        Some(match s {
            "customer" => Dimension::Customer,
            "model" => Dimension::Model,
            "provider" => Dimension::Provider,
            "agent" => Dimension::Agent,
            _ => return None,
        })
    }

    fn of(self, k: &RollupKey) -> &str {
        match self {
            Dimension::Customer => &k.customer_id,
            Dimension::Model => &k.model,
            Dimension::Provider => &k.provider,
            Dimension::Agent => &k.agent,
        }
    }
}

/// One point of a time series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Bucket start.
    pub bucket: DateTime<Utc>,
    /// Group value (with `group_by`).
    pub group: Option<String>,
    /// The metric.
    pub value: Decimal,
}

/// A ranked group in a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranked {
    /// Group value.
    pub name: String,
    /// Totals.
    pub totals: RollupTotals,
}

/// A summary of a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Totals.
    pub totals: RollupTotals,
    /// Top models, providers, customers and agents by revenue (5 each).
    pub top: [(Dimension, Vec<Ranked>); 4],
}

/// Most buckets one time series may span.
pub const MAX_BUCKETS: i64 = 10_000;

fn minute_retention_error() -> ServiceError {
    ServiceError::Invalid(format!(
        "from: minute-grain rollups are kept for the last {} hours only; use whole hours for older ranges",
        MINUTE_RETENTION.num_hours()
    ))
}

fn check_range(
    grain: Grain,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> ServiceResult<()> {
    if from >= to {
        return Err(ServiceError::Invalid("from: must be before to".into()));
    }
    if !grain.aligned(from) || !grain.aligned(to) {
        return Err(ServiceError::Invalid(format!(
            "from, to: must be whole {}s (UTC) for grain={}",
            grain.as_str(),
            grain.as_str()
        )));
    }
    let buckets = grain.buckets_between(from, to);
    if buckets > MAX_BUCKETS {
        return Err(ServiceError::Invalid(format!(
            "to: at most {MAX_BUCKETS} buckets per series ({buckets} asked); use a coarser grain"
        )));
    }
    if grain == Grain::Minute && from < minute_cutoff(now) {
        return Err(minute_retention_error());
    }
    Ok(())
}

/// The keys a group-by needs.
fn dims_of(group_by: Option<Dimension>) -> Dims {
    let mut d = Dims::default();
    match group_by {
        Some(Dimension::Customer) => d.customer = true,
        Some(Dimension::Model) => d.model = true,
        Some(Dimension::Provider) => d.provider = true,
        Some(Dimension::Agent) => d.agent = true,
        None => {}
    }
    d
}

impl Fatura {
    /// Deletes the minute rollups older than their retention at `now`; returns how many.
    pub async fn prune_minute_rollups(&self, now: DateTime<Utc>) -> ServiceResult<u64> {
        Ok(self.store.prune_minute_rollups(minute_cutoff(now)).await?)
    }

    /// Rollup sums over `[from, to)` (whole minutes), one per combination of the dimensions
    /// `by` keeps (the bucket is not kept), read as [`SignedCover::plan`] says.
    pub async fn rollups_over(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
        by: Dims,
    ) -> ServiceResult<Vec<(RollupKey, RollupTotals)>> {
        if from >= to {
            return Err(ServiceError::Invalid("from: must be before to".into()));
        }
        let now = Utc::now();
        let SignedCover { add, sub: subtract } = SignedCover::plan(from, to, now)
            .ok_or_else(|| ServiceError::Invalid("from, to: must be whole minutes (UTC)".into()))?;
        let cutoff = minute_cutoff(now);
        if add
            .iter()
            .chain(&subtract)
            .any(|(g, a, _)| *g == Grain::Minute && *a < cutoff)
        {
            return Err(minute_retention_error());
        }
        let by = Dims {
            bucket: false,
            ..by
        };
        let mut sums: BTreeMap<RollupKey, RollupTotals> = BTreeMap::new();
        for (g, a, b) in add {
            for (k, t) in self.store.query_rollups(g, a, b, customer_id, by).await? {
                sums.entry(k).or_default().add(&t);
            }
        }
        for (g, a, b) in subtract {
            for (k, t) in self.store.query_rollups(g, a, b, customer_id, by).await? {
                sums.entry(k).or_default().sub(&t);
            }
        }
        Ok(sums.into_iter().filter(|(_, t)| !t.is_zero()).collect())
    }
}

impl Fatura {
    /// A time series of `metric` at `grain` over `[from, to)`, optionally grouped and for
    /// one customer. Buckets without usage are absent.
    pub async fn timeseries(
        &self,
        metric: Metric,
        grain: Grain,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: Option<Dimension>,
        customer_id: Option<&str>,
    ) -> ServiceResult<Vec<Point>> {
        check_range(grain, from, to, Utc::now())?;
        let by = Dims {
            bucket: true,
            ..dims_of(group_by)
        };
        let rows = self
            .store
            .query_rollups(grain, from, to, customer_id, by)
            .await?;
        let mut sums: BTreeMap<(DateTime<Utc>, Option<String>), RollupTotals> = BTreeMap::new();
        for (k, t) in &rows {
            let group = group_by.map(|d| d.of(k).to_string());
            sums.entry((k.bucket, group)).or_default().add(t);
        }
        Ok(sums
            .into_iter()
            .filter_map(|((bucket, group), t)| {
                metric.value(&t).map(|value| Point {
                    bucket,
                    group,
                    value,
                })
            })
            .collect())
    }

    /// Totals of `[from, to)` (which must be whole minutes) and the top groups.
    pub async fn summary(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
    ) -> ServiceResult<Summary> {
        let by = Dims {
            customer: true,
            provider: true,
            model: true,
            agent: true,
            bucket: false,
        };
        let rows = self.rollups_over(from, to, customer_id, by).await?;
        let mut totals = RollupTotals::default();
        let dims = [
            Dimension::Model,
            Dimension::Provider,
            Dimension::Customer,
            Dimension::Agent,
        ];
        let mut by: [BTreeMap<String, RollupTotals>; 4] = Default::default();
        for (k, t) in &rows {
            totals.add(t);
            for (i, d) in dims.iter().enumerate() {
                let name = d.of(k);
                if *d == Dimension::Agent && name.is_empty() {
                    continue;
                }
                by[i].entry(name.to_string()).or_default().add(t);
            }
        }
        let rank = |m: &BTreeMap<String, RollupTotals>| {
            let mut v: Vec<Ranked> = m
                .iter()
                .map(|(name, totals)| Ranked {
                    name: name.clone(),
                    totals: *totals,
                })
                .collect();
            v.sort_by(|a, b| {
                b.totals
                    .revenue
                    .cmp(&a.totals.revenue)
                    .then(b.totals.requests.cmp(&a.totals.requests))
                    .then(a.name.cmp(&b.name))
            });
            v.truncate(5);
            v
        };
        Ok(Summary {
            totals,
            top: [
                (dims[0], rank(&by[0])),
                (dims[1], rank(&by[1])),
                (dims[2], rank(&by[2])),
                (dims[3], rank(&by[3])),
            ],
        })
    }
}

/// An outcome to record.
#[derive(Debug, Clone)]
pub struct OutcomeInput {
    /// Id (idempotency key).
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// When.
    pub timestamp: DateTime<Utc>,
    /// Tags (`agent`, …).
    pub tags: BTreeMap<String, String>,
    /// Value.
    pub value: Decimal,
    /// Currency of the value.
    pub currency: fatura_core::Currency,
    /// Kind (`conversion`, …).
    pub kind: String,
}

/// ROI of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoiRow {
    /// Agent or customer.
    pub name: String,
    /// Outcomes.
    pub outcomes: i64,
    /// Their value, USD.
    pub value: Decimal,
    /// AI spend (revenue billed for the usage), USD.
    pub spend: Decimal,
    /// value / spend (`None` without spend).
    pub roi: Option<Decimal>,
    /// spend / outcomes (`None` without outcomes).
    pub cost_per_outcome: Option<Decimal>,
}

impl Fatura {
    /// Records outcomes atomically (all or nothing); replays with identical content are
    /// duplicates, other content under a used id a conflict. Returns (accepted, duplicates).
    pub async fn record_outcomes(
        &self,
        outcomes: Vec<OutcomeInput>,
        now: DateTime<Utc>,
    ) -> ServiceResult<(u64, u64)> {
        use sha2::{Digest, Sha256};
        let mut ids: Vec<String> = outcomes.iter().map(|o| o.customer_id.clone()).collect();
        ids.sort();
        ids.dedup();
        let known = self.store.existing_customer_ids(&ids).await?;
        let mut records = Vec::with_capacity(outcomes.len());
        for (i, o) in outcomes.into_iter().enumerate() {
            let bad = |m: String| ServiceError::Invalid(format!("outcomes[{i}].{m}"));
            fatura_core::EventId::parse(&o.id).map_err(|e| bad(format!("id: {e}")))?;
            if !known.contains(&o.customer_id) {
                return Err(bad(format!("customer_id: no customer {:?}", o.customer_id)));
            }
            if o.value.is_sign_negative()
                || o.value > Decimal::from(1_000_000_000_000_i64)
                || o.value.normalize().scale() > 6
            {
                return Err(bad(
                    "value: a decimal from 0 to 10^12 with at most 6 decimal places".into(),
                ));
            }
            if o.kind.is_empty() || o.kind.len() > 64 || o.kind.chars().any(char::is_control) {
                return Err(bad("kind: 1 to 64 characters".into()));
            }
            for (k, v) in &o.tags {
                fatura_core::event::check_tag(k, v).map_err(|e| bad(format!("tags: {e}")))?;
            }
            let tags = serde_json::to_string(&o.tags)
                .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))?;
            let canonical = format!(
                "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
                o.id,
                o.customer_id,
                o.timestamp.timestamp_micros(),
                o.kind,
                o.value.normalize(),
                o.currency,
                tags
            );
            records.push(fatura_store::OutcomeRecord {
                content_hash: hex::encode(Sha256::digest(canonical.as_bytes())),
                agent: o.tags.get("agent").cloned().unwrap_or_default(),
                id: o.id,
                customer_id: o.customer_id,
                timestamp: o.timestamp,
                kind: o.kind,
                value: o.value.normalize(),
                currency: o.currency,
                tags,
                created_at: now,
            });
        }
        Ok(self.store.insert_outcomes(&records).await?)
    }

    /// ROI per agent or customer over `[from, to)` (whole minutes): the outcomes' value (in
    /// USD, converted at the rate of the outcome's day) against the AI spend from the
    /// rollups.
    pub async fn roi(
        &self,
        group_by: Dimension,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
    ) -> ServiceResult<Vec<RoiRow>> {
        if !matches!(group_by, Dimension::Agent | Dimension::Customer) {
            return Err(ServiceError::Invalid("group_by: agent or customer".into()));
        }
        let spend = self
            .rollups_over(from, to, customer_id, dims_of(Some(group_by)))
            .await?;
        let snapshot = self.snapshot().await?;
        let mut rows: BTreeMap<String, RoiRow> = BTreeMap::new();
        for o in self.store.query_outcomes(from, to, customer_id).await? {
            let rate = snapshot.book.fx_rate_at(o.currency, o.timestamp)?;
            let usd = o.value / rate;
            let name = match group_by {
                Dimension::Agent => o.agent.clone(),
                _ => o.customer_id.clone(),
            };
            let r = rows.entry(name.clone()).or_insert_with(|| RoiRow {
                name,
                outcomes: 0,
                value: Decimal::ZERO,
                spend: Decimal::ZERO,
                roi: None,
                cost_per_outcome: None,
            });
            r.outcomes += 1;
            r.value += usd;
        }
        for (k, t) in spend {
            let name = group_by.of(&k).to_string();
            let r = rows.entry(name.clone()).or_insert_with(|| RoiRow {
                name,
                outcomes: 0,
                value: Decimal::ZERO,
                spend: Decimal::ZERO,
                roi: None,
                cost_per_outcome: None,
            });
            r.spend += t.revenue;
        }
        Ok(rows
            .into_values()
            .map(|mut r| {
                r.value = r.value.round_dp(6).normalize();
                r.spend = r.spend.normalize();
                r.roi = (!r.spend.is_zero()).then(|| (r.value / r.spend).round_dp(4).normalize());
                r.cost_per_outcome = (r.outcomes > 0).then(|| {
                    (r.spend / Decimal::from(r.outcomes))
                        .round_dp(6)
                        .normalize()
                });
                r
            })
            .collect())
    }
}

/// History days the forecast is fitted on (at most).
pub const FORECAST_HISTORY_DAYS: i64 = 56;
/// A balance forecast to run out within this many days raises an alert.
pub const RUNS_OUT_ALERT_DAYS: i64 = 7;

/// A projected total with its 80% interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// Actual so far in the cycle (to the start of today, UTC).
    pub actual: Decimal,
    /// Actual + forecast to the end of the cycle (or the horizon).
    pub projected: Decimal,
    /// Lower bound (80%).
    pub lower: Decimal,
    /// Upper bound (80%).
    pub upper: Decimal,
}

/// A customer's forecast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forecast {
    /// Cycle start.
    pub period_start: DateTime<Utc>,
    /// Cycle end.
    pub period_end: DateTime<Utc>,
    /// First forecast day (today, UTC).
    pub from_day: DateTime<Utc>,
    /// Days forecast.
    pub horizon_days: usize,
    /// History days used.
    pub history_days: usize,
    /// Revenue (what the customer pays), USD.
    pub revenue: Projection,
    /// Upstream cost, USD.
    pub cost: Projection,
    /// Daily revenue forecast: (day, value, lower, upper).
    pub daily: Vec<(DateTime<Utc>, Decimal, Decimal, Decimal)>,
    /// Prepaid: the balance now and the day it runs out at the forecast pace (if within
    /// the horizon).
    pub balance: Option<(Decimal, Option<DateTime<Utc>>)>,
    /// Whether the last full day's revenue ran above its forecast's 80% upper bound.
    pub anomaly: bool,
}

fn project(
    actual: Decimal,
    series: &[Decimal],
    horizon: usize,
) -> (Projection, Vec<fatura_core::forecast::ForecastPoint>) {
    let points = fatura_core::forecast::fit(series)
        .map(|f| f.forecast(horizon))
        .unwrap_or_default();
    let sum = |f: fn(&fatura_core::forecast::ForecastPoint) -> Decimal| {
        points.iter().map(f).sum::<Decimal>()
    };
    let r = |d: Decimal| d.round_dp(2);
    (
        Projection {
            actual: r(actual),
            projected: r(actual + sum(|p| p.value)),
            lower: r(actual + sum(|p| p.lower)),
            upper: r(actual + sum(|p| p.upper)),
        },
        points,
    )
}

impl Fatura {
    /// Daily totals (revenue, cost) of a customer over `[from, to)` (whole days), one per day.
    async fn daily(
        &self,
        customer_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> ServiceResult<(Vec<Decimal>, Vec<Decimal>)> {
        let days = usize::try_from((to - from).num_days()).unwrap_or(0);
        let (mut rev, mut cost) = (vec![Decimal::ZERO; days], vec![Decimal::ZERO; days]);
        if days == 0 {
            return Ok((rev, cost));
        }
        for (k, t) in self
            .store
            .query_rollups(
                Grain::Day,
                from,
                to,
                Some(customer_id),
                Dims {
                    bucket: true,
                    ..Dims::default()
                },
            )
            .await?
        {
            if let Ok(i) = usize::try_from((k.bucket - from).num_days())
                && i < days
            {
                rev[i] += t.revenue;
                cost[i] += t.cost;
            }
        }
        Ok((rev, cost))
    }

    /// Sum of revenue and cost of a customer over `[from, to)` (whole minutes): from the
    /// rollups, but minutes older than the minute rollups' retention (the ragged start of a
    /// cycle in a zone with a half-hour offset) from the raw events.
    async fn totals_between(
        &self,
        customer_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> ServiceResult<RollupTotals> {
        let mut t = RollupTotals::default();
        if from >= to {
            return Ok(t);
        }
        let pieces = Grain::cover(from, to)
            .ok_or_else(|| ServiceError::Invalid("from, to: must be whole minutes (UTC)".into()))?;
        let cutoff = minute_cutoff(Utc::now());
        for (g, a, b) in pieces {
            if g == Grain::Minute && a < cutoff {
                for e in self.store.customer_events(customer_id, a, b).await? {
                    t.cost += e.cost.unwrap_or_default();
                    t.revenue += e.revenue.unwrap_or_default();
                }
                continue;
            }
            for (_, r) in self
                .store
                .query_rollups(g, a, b, Some(customer_id), Dims::default())
                .await?
            {
                t.add(&r);
            }
        }
        Ok(t)
    }

    /// Projects the customer's revenue and cost to the end of its current cycle (or over
    /// `horizon` days), with 80% intervals; for prepaid customers, when the balance runs
    /// out. Raises `spend_anomaly` and `balance_runs_out` alerts.
    pub async fn forecast(
        &self,
        customer_id: &str,
        at: DateTime<Utc>,
        horizon: Option<usize>,
    ) -> ServiceResult<Forecast> {
        let customer = self.customer(customer_id).await?;
        let (period_start, period_end) =
            super::billing::cycle_spec(&customer)?.cycle_containing(at);
        let today = Grain::Day.bucket(at);
        let history_from = today - chrono::Duration::days(FORECAST_HISTORY_DAYS);
        let (mut rev_hist, mut cost_hist) = self.daily(customer_id, history_from, today).await?;
        // Days before the first usage are not history (but keep two weeks at least).
        let first = rev_hist
            .iter()
            .zip(&cost_hist)
            .position(|(r, c)| !r.is_zero() || !c.is_zero())
            .unwrap_or(rev_hist.len())
            .min(rev_hist.len().saturating_sub(14));
        rev_hist.drain(..first);
        cost_hist.drain(..first);
        let horizon = horizon.unwrap_or_else(|| {
            usize::try_from(((period_end - today).num_hours() + 23) / 24).unwrap_or(0)
        });
        if horizon > 366 {
            return Err(ServiceError::Invalid("horizon: at most 366 days".into()));
        }
        let so_far = self
            .totals_between(customer_id, period_start.min(today), today)
            .await?;
        let (revenue, rev_points) = project(so_far.revenue, &rev_hist, horizon);
        let (cost, _) = project(so_far.cost, &cost_hist, horizon);
        let daily = rev_points
            .iter()
            .map(|p| {
                (
                    today + chrono::Duration::days(p.h as i64 - 1),
                    p.value.round_dp(2),
                    p.lower.round_dp(2),
                    p.upper.round_dp(2),
                )
            })
            .collect::<Vec<_>>();
        // Anomaly: yesterday against a forecast made without it.
        let anomaly = match rev_hist.split_last() {
            Some((last, before)) if before.len() >= 14 => fatura_core::forecast::fit(before)
                .and_then(|f| f.forecast(1).first().cloned())
                .is_some_and(|p| *last > p.upper && *last > Decimal::ZERO),
            _ => false,
        };
        if anomaly {
            self.alert(
                "spend_anomaly",
                "warning",
                Some(customer_id),
                &format!("{customer_id}:{}", today.date_naive()),
                format!(
                    "customer {customer_id}: yesterday's spend {} USD ran above its forecast's 80% bound",
                    rev_hist.last().copied().unwrap_or_default().round_dp(2)
                ),
                at,
            )
            .await;
        }
        let balance = if customer.prepaid {
            let movements: Vec<fatura_core::wallet::WalletMovement> = self
                .store
                .wallet_transactions(customer_id)
                .await?
                .iter()
                .map(|t| fatura_core::wallet::WalletMovement {
                    at: t.created_at,
                    amount: t.amount,
                    expires_at: t.expires_at,
                })
                .collect();
            let now_balance = fatura_core::wallet::wallet_balance(&movements, at);
            let mut left = now_balance;
            let mut runs_out = None;
            for (day, value, _, _) in &daily {
                left -= *value;
                if left <= Decimal::ZERO {
                    runs_out = Some(*day);
                    break;
                }
            }
            if let Some(day) = runs_out
                && (day - today).num_days() < RUNS_OUT_ALERT_DAYS
            {
                self.alert(
                    "balance_runs_out",
                    "warning",
                    Some(customer_id),
                    customer_id,
                    format!(
                        "customer {customer_id}: balance {} USD runs out around {} at the forecast pace",
                        now_balance.normalize(),
                        day.date_naive()
                    ),
                    at,
                )
                .await;
            }
            Some((now_balance.normalize(), runs_out))
        } else {
            None
        };
        Ok(Forecast {
            period_start,
            period_end,
            from_day: today,
            horizon_days: horizon,
            history_days: rev_hist.len(),
            revenue,
            cost,
            daily,
            balance,
            anomaly,
        })
    }
}

/// The canonical name of a model across providers: the name after the vendor prefix,
/// lower-cased, with the aliases of [`MODEL_ALIASES`] applied (`openai/gpt-4o`,
/// `azure/gpt-4o` and `gpt-4o` are one model).
pub fn canonical_model(model: &str) -> String {
    let base = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    MODEL_ALIASES
        .iter()
        .find(|(alias, _)| *alias == base)
        .map_or(base, |(_, canonical)| (*canonical).to_string())
}

/// Names providers give the same model under; maintained by hand as catalogs diverge.
pub const MODEL_ALIASES: &[(&str, &str)] = &[
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-2024-11-20", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("claude-3-5-sonnet-20241022", "claude-3.5-sonnet"),
    ("claude-3-5-sonnet-latest", "claude-3.5-sonnet"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("gemini-2.5-flash-preview", "gemini-2.5-flash"),
];

/// What the same usage would have cost at another provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    /// Provider.
    pub provider: String,
    /// Its name for the model.
    pub model: String,
    /// Cost of the usage at its prices, USD.
    pub cost: Decimal,
    /// `cost − actual cost` (negative: cheaper).
    pub difference: Decimal,
}

/// One model's usage, what it cost, and what it would have cost elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// Provider that served it.
    pub provider: String,
    /// Model as served.
    pub model: String,
    /// Canonical model name.
    pub canonical: String,
    /// Usage.
    pub totals: RollupTotals,
    /// Actual cost, USD.
    pub actual_cost: Decimal,
    /// Other providers offering the same model, cheapest first.
    pub alternatives: Vec<Alternative>,
}

impl Fatura {
    /// For the usage in `[from, to)` (whole minutes), per model: the actual cost and the cost
    /// at every other provider in the catalog offering the same canonical model, at the
    /// prices in force at the end of the period.
    pub async fn provider_comparison(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
    ) -> ServiceResult<Vec<Comparison>> {
        let mut usage: BTreeMap<(String, String), RollupTotals> = BTreeMap::new();
        let by = Dims {
            provider: true,
            model: true,
            ..Dims::default()
        };
        for (k, t) in self.rollups_over(from, to, customer_id, by).await? {
            usage.entry((k.provider, k.model)).or_default().add(&t);
        }
        let snapshot = self.snapshot().await?;
        let at = to - chrono::Duration::microseconds(1);
        let mut by_canonical: BTreeMap<String, Vec<&fatura_core::catalog::PriceVersion>> =
            BTreeMap::new();
        for v in snapshot.catalog.versions() {
            if snapshot
                .catalog
                .price_at(&v.provider, &v.model, at)
                .map(|x| x.id)
                == Some(v.id)
            {
                by_canonical
                    .entry(canonical_model(&v.model))
                    .or_default()
                    .push(v);
            }
        }
        let mut out = Vec::new();
        for ((provider, model), t) in usage {
            let canonical = canonical_model(&model);
            let count = |v: i64| u64::try_from(v).unwrap_or(0);
            let Ok(tokens) = fatura_core::TokenUsage::new(
                count(t.input_tokens),
                count(t.output_tokens),
                count(t.cached_input_tokens),
                count(t.cache_write_tokens),
                count(t.reasoning_tokens),
                count(t.requests),
            ) else {
                continue;
            };
            let mut alternatives = Vec::new();
            for v in by_canonical.get(&canonical).into_iter().flatten() {
                if v.provider == provider && v.model == model {
                    continue;
                }
                let cost = fatura_core::cost_usage(&tokens, &v.prices)
                    .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))?
                    .total();
                alternatives.push(Alternative {
                    provider: v.provider.clone(),
                    model: v.model.clone(),
                    cost,
                    difference: (cost - t.cost).normalize(),
                });
            }
            alternatives.sort_by(|a, b| a.cost.cmp(&b.cost).then(a.provider.cmp(&b.provider)));
            out.push(Comparison {
                actual_cost: t.cost.normalize(),
                provider,
                model,
                canonical,
                totals: t,
                alternatives,
            });
        }
        Ok(out)
    }
}

/// The operator's month at a glance: month to date and the month's projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetForecast {
    /// First instant of the month (UTC).
    pub month_start: DateTime<Utc>,
    /// First instant of the next month.
    pub month_end: DateTime<Utc>,
    /// Revenue (USD): actual before today + forecast from today to the month's end.
    pub revenue: Projection,
    /// Daily revenue of the history window (oldest first), ending yesterday.
    pub history: Vec<(DateTime<Utc>, Decimal)>,
    /// Daily revenue forecast from today: (day, value, lower, upper).
    pub daily: Vec<(DateTime<Utc>, Decimal, Decimal, Decimal)>,
}

impl Fatura {
    /// Revenue of every customer, month to date and projected to the end of the month (UTC),
    /// fitted on the fleet's daily revenue like [`Fatura::forecast`].
    pub async fn fleet_forecast(&self, now: DateTime<Utc>) -> ServiceResult<FleetForecast> {
        let today = Grain::Day.bucket(now);
        let month_start = Grain::Month.bucket(now);
        let month_end = Grain::Month.next(now);
        let history_from = today - chrono::Duration::days(FORECAST_HISTORY_DAYS);
        let days = usize::try_from(FORECAST_HISTORY_DAYS).unwrap_or(0);
        let mut series = vec![Decimal::ZERO; days];
        let by_day = Dims {
            bucket: true,
            ..Dims::default()
        };
        for (k, t) in self
            .store
            .query_rollups(Grain::Day, history_from, today, None, by_day)
            .await?
        {
            if let Ok(i) = usize::try_from((k.bucket - history_from).num_days())
                && i < days
            {
                series[i] += t.revenue;
            }
        }
        let history: Vec<(DateTime<Utc>, Decimal)> = series
            .iter()
            .enumerate()
            .map(|(i, v)| (history_from + chrono::Duration::days(i as i64), *v))
            .collect();
        let first = series
            .iter()
            .position(|v| !v.is_zero())
            .unwrap_or(series.len())
            .min(series.len().saturating_sub(14));
        let actual: Decimal = history
            .iter()
            .filter(|(d, _)| *d >= month_start)
            .map(|(_, v)| *v)
            .sum();
        let horizon = usize::try_from((month_end - today).num_days()).unwrap_or(0);
        let (revenue, points) = project(actual, &series[first..], horizon);
        let daily = points
            .iter()
            .map(|p| {
                (
                    today + chrono::Duration::days(p.h as i64 - 1),
                    p.value.round_dp(2),
                    p.lower.round_dp(2),
                    p.upper.round_dp(2),
                )
            })
            .collect();
        Ok(FleetForecast {
            month_start,
            month_end,
            revenue,
            history,
            daily,
        })
    }

    /// Each customer's current billing cycle and its usage so far (to the end of the
    /// current minute): one rollup query per distinct cycle start.
    pub async fn cycle_usage(
        &self,
        customers: &[fatura_store::Customer],
        now: DateTime<Utc>,
    ) -> ServiceResult<BTreeMap<String, (DateTime<Utc>, RollupTotals)>> {
        let to = Grain::Minute.next(now);
        let mut by_start: BTreeMap<DateTime<Utc>, Vec<&str>> = BTreeMap::new();
        for c in customers {
            let (start, _) = super::billing::cycle_spec(c)?.cycle_containing(now);
            by_start.entry(start).or_default().push(&c.id);
        }
        let mut out = BTreeMap::new();
        for (start, ids) in by_start {
            for id in &ids {
                out.insert(id.to_string(), (start, RollupTotals::default()));
            }
            if !Grain::Hour.aligned(start) {
                // A zone with a sub-hour offset: per customer, its edge from raw events.
                for id in ids {
                    let t = self.totals_between(id, start, to).await?;
                    out.insert(id.to_string(), (start, t));
                }
                continue;
            }
            let by = Dims {
                customer: true,
                ..Dims::default()
            };
            for (k, t) in self.rollups_over(start, to, None, by).await? {
                if let Some((_, sum)) = out.get_mut(&k.customer_id) {
                    sum.add(&t);
                }
            }
        }
        Ok(out)
    }
}

impl Fatura {
    /// Daily totals over `[from, to)` (whole days), of one customer or all, from the day
    /// rollups (days without usage are absent).
    pub async fn usage_by_day(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
    ) -> ServiceResult<Vec<(DateTime<Utc>, RollupTotals)>> {
        check_range(Grain::Day, from, to, Utc::now())?;
        let by = Dims {
            bucket: true,
            ..Dims::default()
        };
        Ok(self
            .store
            .query_rollups(Grain::Day, from, to, customer_id, by)
            .await?
            .into_iter()
            .map(|(k, t)| (k.bucket, t))
            .collect())
    }
}
