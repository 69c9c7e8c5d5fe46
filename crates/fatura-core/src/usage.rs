//! Usage aggregation: group ledger rows by customer, model, provider, day or hour and sum
//! requests, tokens, cost and revenue exactly.
//!
//! Aggregation is done here, in decimal arithmetic, rather than with SQL `SUM` so that
//! SQLite (whose `SUM` over decimal text would go through binary floats) and PostgreSQL
//! give identical, exact results.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::money::{MoneyError, exact_add};

/// A dimension usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupBy {
    /// Customer id.
    Customer,
    /// Model.
    Model,
    /// Provider.
    Provider,
    /// UTC calendar day.
    Day,
    /// UTC hour.
    Hour,
}

impl FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(GroupBy::Customer),
            "model" => Ok(GroupBy::Model),
            "provider" => Ok(GroupBy::Provider),
            "day" => Ok(GroupBy::Day),
            "hour" => Ok(GroupBy::Hour),
            other => Err(format!(
                "cannot group by {other:?}: expected any of customer, model, provider, day, hour"
            )),
        }
    }
}

/// One ledger row as read for aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Customer id.
    pub customer_id: String,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Event time.
    pub timestamp: DateTime<Utc>,
    /// Requests.
    pub requests: u64,
    /// Input tokens (including cached and cache-write).
    pub input_tokens: u64,
    /// Output tokens (including reasoning).
    pub output_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Catalog cost in USD; `None` when the event is unpriced.
    pub cost: Option<Decimal>,
    /// Provisional price in USD; `None` when the event is unpriced.
    pub revenue: Option<Decimal>,
    /// Token counts estimated with a tokenizer (no usage reported upstream).
    pub estimated: bool,
}

/// The values of the grouping dimensions of one output row (unset dimensions are `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    /// Customer, when grouped by customer.
    pub customer_id: Option<String>,
    /// Model, when grouped by model.
    pub model: Option<String>,
    /// Provider, when grouped by provider.
    pub provider: Option<String>,
    /// `YYYY-MM-DD`, when grouped by day.
    pub day: Option<String>,
    /// `YYYY-MM-DDTHH:00:00Z`, when grouped by hour.
    pub hour: Option<String>,
}

/// Summed usage of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Number of events.
    pub events: u64,
    /// Events without a catalog price (excluded from cost and revenue).
    pub unpriced_events: u64,
    /// Events whose token counts were estimated.
    pub estimated_events: u64,
    /// Requests.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Cost, USD.
    pub cost: Decimal,
    /// Revenue, USD.
    pub revenue: Decimal,
}

impl UsageTotals {
    /// Revenue minus cost.
    pub fn margin(&self) -> Decimal {
        (self.revenue - self.cost).normalize()
    }

    /// Gross margin as a fraction of revenue, rounded to 4 places; `None` without revenue.
    pub fn margin_rate(&self) -> Option<Decimal> {
        if self.revenue.is_zero() {
            None
        } else {
            self.margin().checked_div(self.revenue).map(|r| {
                r.round_dp_with_strategy(4, crate::money::ROUNDING)
                    .normalize()
            })
        }
    }
}

/// Accumulates records into groups.
#[derive(Debug, Clone)]
pub struct UsageAggregator {
    group_by: Vec<GroupBy>,
    groups: BTreeMap<GroupKey, UsageTotals>,
}

impl UsageAggregator {
    /// An empty aggregator grouping by `group_by` (empty: one total row).
    pub fn new(group_by: Vec<GroupBy>) -> Self {
        UsageAggregator {
            group_by,
            groups: BTreeMap::new(),
        }
    }

    fn key_of(&self, r: &UsageRecord) -> GroupKey {
        let mut k = GroupKey::default();
        for g in &self.group_by {
            match g {
                GroupBy::Customer => k.customer_id = Some(r.customer_id.clone()),
                GroupBy::Model => k.model = Some(r.model.clone()),
                GroupBy::Provider => k.provider = Some(r.provider.clone()),
                GroupBy::Day => k.day = Some(r.timestamp.format("%Y-%m-%d").to_string()),
                GroupBy::Hour => {
                    k.hour = Some(r.timestamp.format("%Y-%m-%dT%H:00:00Z").to_string())
                }
            }
        }
        k
    }

    /// Adds one record. Fails only if an exact sum would exceed 28 significant digits.
    pub fn add(&mut self, r: &UsageRecord) -> Result<(), MoneyError> {
        let key = self.key_of(r);
        let t = self.groups.entry(key).or_default();
        t.events += 1;
        t.estimated_events += u64::from(r.estimated);
        t.requests += r.requests;
        t.input_tokens += r.input_tokens;
        t.output_tokens += r.output_tokens;
        t.cached_input_tokens += r.cached_input_tokens;
        t.cache_write_tokens += r.cache_write_tokens;
        t.reasoning_tokens += r.reasoning_tokens;
        match (r.cost, r.revenue) {
            (Some(c), Some(v)) => {
                t.cost = exact_add(t.cost, c)?;
                t.revenue = exact_add(t.revenue, v)?;
            }
            _ => t.unpriced_events += 1,
        }
        Ok(())
    }

    /// The groups, sorted by key.
    pub fn finish(self) -> Vec<(GroupKey, UsageTotals)> {
        self.groups
            .into_iter()
            .map(|(k, mut t)| {
                t.cost = t.cost.normalize();
                t.revenue = t.revenue.normalize();
                (k, t)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn rec(customer: &str, model: &str, hour: u32, cost: Option<i64>) -> UsageRecord {
        UsageRecord {
            customer_id: customer.into(),
            provider: "openai".into(),
            model: model.into(),
            timestamp: Utc
                .with_ymd_and_hms(2026, 5, 1, hour, 30, 0)
                .single()
                .unwrap_or_default(),
            requests: 1,
            input_tokens: 10,
            output_tokens: 5,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            cost: cost.map(|c| Decimal::new(c, 9)),
            revenue: cost.map(|c| Decimal::new(c * 10, 9)),
            estimated: false,
        }
    }

    #[test]
    fn groups_by_customer_and_hour() {
        let mut agg = UsageAggregator::new(vec![GroupBy::Customer, GroupBy::Hour]);
        for r in [
            rec("a", "m", 1, Some(3)),
            rec("a", "m", 1, None),
            rec("b", "m", 2, Some(1)),
        ] {
            agg.add(&r).unwrap_or_default();
        }
        let rows = agg.finish();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0.customer_id.as_deref(), Some("a"));
        assert_eq!(rows[0].0.hour.as_deref(), Some("2026-05-01T01:00:00Z"));
        assert_eq!(rows[0].1.events, 2);
        assert_eq!(rows[0].1.unpriced_events, 1);
        assert_eq!(rows[0].1.cost, Decimal::new(3, 9));
        assert_eq!(rows[0].1.margin_rate(), Some(Decimal::new(9, 1)));
    }

    proptest! {
        #[test]
        fn totals_do_not_depend_on_order_or_grouping(costs in proptest::collection::vec((0u32..24, 0i64..1_000_000_000), 0..50)) {
            let records: Vec<_> = costs.iter().map(|(h, c)| rec("a", if h % 2 == 0 { "x" } else { "y" }, *h, Some(*c))).collect();
            let mut by_hour = UsageAggregator::new(vec![GroupBy::Hour, GroupBy::Model]);
            let mut total = UsageAggregator::new(vec![]);
            for r in records.iter().rev() { by_hour.add(r).unwrap_or_default(); }
            for r in &records { total.add(r).unwrap_or_default(); }
            let sum: Decimal = by_hour.finish().iter().map(|(_, t)| t.cost).sum();
            let total = total.finish();
            let expected: Decimal = costs.iter().map(|(_, c)| Decimal::new(*c, 9)).sum();
            prop_assert_eq!(sum.normalize(), expected.normalize());
            if !records.is_empty() {
                prop_assert_eq!(total[0].1.cost, expected.normalize());
            }
        }
    }
}
