//! Rollups: usage and money per time bucket (minute, hour, day, UTC) × customer × provider ×
//! model × agent, maintained as events are written so that analytics never scan raw
//! events. The `agent` dimension is the event's `agent` tag (empty when it has none).
//!
//! Rollups are exact sums: counts are integers, cost and revenue decimals. A batch of new
//! events becomes one [`RollupDelta`] per key, added to the stored rows in the events'
//! transaction, so a rollup always equals a recount of the events it covers.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;

use crate::event::TokenUsage;

/// A bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grain {
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
}

impl Grain {
    /// All grains, finest first.
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    /// `minute`, `hour` or `day`.
    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Minute => "minute",
            Grain::Hour => "hour",
            Grain::Day => "day",
        }
    }

    /// Parses `minute`, `hour` or `day`.
    pub fn parse(s: &str) -> Option<Grain> {
        match s {
            "minute" => Some(Grain::Minute),
            "hour" => Some(Grain::Hour),
            "day" => Some(Grain::Day),
            _ => None,
        }
    }

    /// The bucket length.
    pub fn span(self) -> TimeDelta {
        match self {
            Grain::Minute => TimeDelta::minutes(1),
            Grain::Hour => TimeDelta::hours(1),
            Grain::Day => TimeDelta::days(1),
        }
    }

    /// The start of the bucket containing `t`.
    pub fn bucket(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.span()).unwrap_or(t)
    }

    /// True when `t` is the start of a bucket.
    pub fn aligned(self, t: DateTime<Utc>) -> bool {
        self.bucket(t) == t
    }

    /// The coarsest grain whose buckets start exactly at `from` and `to` (so a range query
    /// on it counts exactly the events in `[from, to)`).
    pub fn coarsest_aligned(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<Grain> {
        Grain::ALL
            .iter()
            .rev()
            .copied()
            .find(|g| g.aligned(from) && g.aligned(to))
    }
}

/// What a rollup row is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey {
    /// Grain.
    pub grain: Grain,
    /// Bucket start.
    pub bucket: DateTime<Utc>,
    /// Customer.
    pub customer_id: String,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// The `agent` tag, empty when absent.
    pub agent: String,
}

/// Sums of a rollup row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RollupTotals {
    /// Events.
    pub events: i64,
    /// Requests.
    pub requests: i64,
    /// Input tokens.
    pub input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Cached input tokens.
    pub cached_input_tokens: i64,
    /// Cache-write tokens.
    pub cache_write_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Events without a price.
    pub unpriced_events: i64,
    /// Upstream cost, USD.
    pub cost: Decimal,
    /// Provisional revenue, USD.
    pub revenue: Decimal,
}

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl RollupTotals {
    /// One event's contribution (`pricing` = `(cost, revenue)`, `None` when unpriced).
    pub fn of_event(usage: &TokenUsage, pricing: Option<(Decimal, Decimal)>) -> Self {
        RollupTotals {
            events: 1,
            requests: n(usage.requests()),
            input_tokens: n(usage.input()),
            output_tokens: n(usage.output()),
            cached_input_tokens: n(usage.cached_input()),
            cache_write_tokens: n(usage.cache_write()),
            reasoning_tokens: n(usage.reasoning()),
            unpriced_events: i64::from(pricing.is_none()),
            cost: pricing.map_or(Decimal::ZERO, |p| p.0),
            revenue: pricing.map_or(Decimal::ZERO, |p| p.1),
        }
    }

    /// The change when an unpriced event gets priced.
    pub fn of_pricing(cost: Decimal, revenue: Decimal) -> Self {
        RollupTotals {
            unpriced_events: -1,
            cost,
            revenue,
            ..Default::default()
        }
    }

    /// Adds `o`.
    pub fn add(&mut self, o: &RollupTotals) {
        self.events += o.events;
        self.requests += o.requests;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cached_input_tokens += o.cached_input_tokens;
        self.cache_write_tokens += o.cache_write_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.unpriced_events += o.unpriced_events;
        self.cost += o.cost;
        self.revenue += o.revenue;
    }

    /// Input + output tokens.
    pub fn tokens(&self) -> i64 {
        self.input_tokens + self.output_tokens
    }
}

/// Changes to apply to the rollup rows, one per key.
pub type RollupDelta = BTreeMap<RollupKey, RollupTotals>;

/// Adds one event's contribution `t` to `delta` at every grain.
#[allow(clippy::too_many_arguments)]
pub fn add_event(
    delta: &mut RollupDelta,
    customer_id: &str,
    provider: &str,
    model: &str,
    agent: Option<&str>,
    at: DateTime<Utc>,
    t: &RollupTotals,
) {
    for grain in Grain::ALL {
        let key = RollupKey {
            grain,
            bucket: grain.bucket(at),
            customer_id: customer_id.to_string(),
            provider: provider.to_string(),
            model: model.to_string(),
            agent: agent.unwrap_or_default().to_string(),
        };
        delta.entry(key).or_default().add(t);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn buckets_and_alignment() {
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 13, 47, 12).unwrap();
        assert_eq!(
            Grain::Hour.bucket(t),
            Utc.with_ymd_and_hms(2026, 11, 24, 13, 0, 0).unwrap()
        );
        assert_eq!(
            Grain::Day.bucket(t),
            Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap()
        );
        let day = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        assert_eq!(
            Grain::coarsest_aligned(day, day + TimeDelta::days(30)),
            Some(Grain::Day)
        );
        assert_eq!(
            Grain::coarsest_aligned(day, t),
            None,
            "seconds are finer than any grain"
        );
        assert_eq!(
            Grain::coarsest_aligned(day + TimeDelta::hours(5), day + TimeDelta::days(2)),
            Some(Grain::Hour)
        );
    }

    #[test]
    fn one_event_feeds_every_grain() {
        let mut d = RollupDelta::new();
        let u = TokenUsage::new(10, 5, 2, 0, 1, 1).unwrap();
        let t = RollupTotals::of_event(&u, Some((Decimal::new(3, 2), Decimal::new(30, 2))));
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 13, 47, 12).unwrap();
        add_event(&mut d, "c", "p", "m", Some("bot"), at, &t);
        add_event(&mut d, "c", "p", "m", Some("bot"), at, &t);
        assert_eq!(d.len(), 3);
        for v in d.values() {
            assert_eq!(v.events, 2);
            assert_eq!(v.tokens(), 30);
            assert_eq!(v.cost, Decimal::new(6, 2));
        }
    }
}
