//! Rollups: usage and money per time bucket (minute, hour, day, UTC) × customer × provider ×
//! model × agent, maintained as events are written so that analytics never scan raw
//! events. The `agent` dimension is the event's `agent` tag (empty when it has none).
//!
//! Rollups are exact sums: counts are integers, cost and revenue decimals. A batch of new
//! events becomes one [`RollupDelta`] per key, added to the stored rows in the events'
//! transaction, so a rollup always equals a recount of the events it covers.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, DurationRound, Months, TimeDelta, TimeZone, Utc};
use rust_decimal::Decimal;

use crate::event::TokenUsage;

/// A bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grain {
    /// One minute (kept for [`MINUTE_RETENTION`] only).
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
    /// One calendar month (UTC).
    Month,
}

/// How long minute-grain rollups are kept: events older than this (at write time) feed the
/// hour, day and month grains only, and older minute rows are pruned. Minute buckets serve
/// the live views; a month of them would cost about one row per event.
pub const MINUTE_RETENTION: TimeDelta = TimeDelta::days(2);

/// The oldest minute bucket kept at `now`: `now - MINUTE_RETENTION`, truncated to the hour
/// (so it moves once an hour, not with every call).
pub fn minute_cutoff(now: DateTime<Utc>) -> DateTime<Utc> {
    Grain::Hour.bucket(now - MINUTE_RETENTION)
}

impl Grain {
    /// All grains, finest first.
    pub const ALL: [Grain; 4] = [Grain::Minute, Grain::Hour, Grain::Day, Grain::Month];

    /// `minute`, `hour`, `day` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Minute => "minute",
            Grain::Hour => "hour",
            Grain::Day => "day",
            Grain::Month => "month",
        }
    }

    /// Parses `minute`, `hour`, `day` or `month`.
    pub fn parse(s: &str) -> Option<Grain> {
        match s {
            "minute" => Some(Grain::Minute),
            "hour" => Some(Grain::Hour),
            "day" => Some(Grain::Day),
            "month" => Some(Grain::Month),
            _ => None,
        }
    }

    /// The start of the bucket containing `t`.
    pub fn bucket(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let span = match self {
            Grain::Minute => TimeDelta::minutes(1),
            Grain::Hour => TimeDelta::hours(1),
            Grain::Day => TimeDelta::days(1),
            Grain::Month => {
                return Utc
                    .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                    .single()
                    .unwrap_or(t);
            }
        };
        t.duration_trunc(span).unwrap_or(t)
    }

    /// The start of the bucket after the one containing `t`.
    pub fn next(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let b = self.bucket(t);
        match self {
            Grain::Minute => b + TimeDelta::minutes(1),
            Grain::Hour => b + TimeDelta::hours(1),
            Grain::Day => b + TimeDelta::days(1),
            Grain::Month => b.checked_add_months(Months::new(1)).unwrap_or(b),
        }
    }

    /// How many buckets `[from, to)` spans (both aligned).
    pub fn buckets_between(self, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
        match self {
            Grain::Month => {
                i64::from(to.year() - from.year()) * 12 + i64::from(to.month())
                    - i64::from(from.month())
            }
            Grain::Minute => (to - from).num_minutes(),
            Grain::Hour => (to - from).num_hours(),
            Grain::Day => (to - from).num_days(),
        }
    }

    /// True when `t` is the start of a bucket.
    pub fn aligned(self, t: DateTime<Utc>) -> bool {
        self.bucket(t) == t
    }

    /// Splits `[from, to)` into pieces that whole buckets cover exactly, each at the coarsest
    /// grain that fits: a month with ragged ends becomes days/hours/minutes at the edges and
    /// whole months in the middle. `None` when `from` or `to` is not a whole minute.
    pub fn cover(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<Vec<Piece>> {
        if !Grain::Minute.aligned(from) || !Grain::Minute.aligned(to) {
            return None;
        }
        let mut out = Vec::new();
        cover_into(&Grain::ALL, from, to, &mut out);
        Some(out)
    }
}

/// A piece of a range: whole buckets of one grain, `[from, to)`.
pub type Piece = (Grain, DateTime<Utc>, DateTime<Utc>);

/// Covers `[from, to)` (minute-aligned) with the coarsest of `grains` (finest first).
fn cover_into(grains: &[Grain], from: DateTime<Utc>, to: DateTime<Utc>, out: &mut Vec<Piece>) {
    if from >= to {
        return;
    }
    let Some((&g, finer)) = grains.split_last() else {
        return;
    };
    let a = if g.aligned(from) { from } else { g.next(from) };
    let b = g.bucket(to);
    if a < b {
        cover_into(finer, from, a, out);
        out.push((g, a, b));
        cover_into(finer, b, to, out);
    } else {
        cover_into(finer, from, to, out);
    }
}

/// Pieces whose rollups, added and subtracted, sum to exactly `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SignedCover {
    /// Pieces to add.
    pub add: Vec<Piece>,
    /// Pieces to subtract.
    pub sub: Vec<Piece>,
}

impl SignedCover {
    /// The cheapest way found to read `[from, to)` (whole minutes; `None` otherwise) from
    /// rollups, counting the buckets read before `now` (later buckets hold no events yet, or
    /// very few): at each grain, each edge of the range is either filled up to the next
    /// bucket boundary with finer pieces, or rounded out to the boundary before it and the
    /// excess subtracted. The month so far becomes the month's rows minus its (empty) rest;
    /// "the last 30 days" from 07:00 becomes whole days minus seven hours.
    pub fn plan(from: DateTime<Utc>, to: DateTime<Utc>, now: DateTime<Utc>) -> Option<SignedCover> {
        if !Grain::Minute.aligned(from) || !Grain::Minute.aligned(to) {
            return None;
        }
        Some(best_cover(&Grain::ALL, from, to, now).1)
    }

    fn flipped(self) -> SignedCover {
        SignedCover {
            add: self.sub,
            sub: self.add,
        }
    }

    fn join(mut self, mid: Piece, other: [SignedCover; 2]) -> SignedCover {
        self.add.push(mid);
        for o in other {
            self.add.extend(o.add);
            self.sub.extend(o.sub);
        }
        self
    }
}

/// The cost of reading a piece: buckets before `now` (about one row per series each), plus
/// one for the query.
fn piece_cost(g: Grain, a: DateTime<Utc>, b: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let end = b.min(g.next(now));
    let past = if a < end {
        g.buckets_between(a, end)
    } else {
        0
    };
    4 * past + 1
}

/// [`SignedCover::plan`] over `grains` (finest first); `(cost, cover)`.
fn best_cover(
    grains: &[Grain],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (i64, SignedCover) {
    if from >= to {
        return (0, SignedCover::default());
    }
    let Some((&g, finer)) = grains.split_last() else {
        return (0, SignedCover::default());
    };
    if finer.is_empty() {
        // The finest grain tiles any whole-minute range.
        let cover = SignedCover {
            add: vec![(g, from, to)],
            sub: Vec::new(),
        };
        return (piece_cost(g, from, to, now), cover);
    }
    let mut best = best_cover(finer, from, to, now);
    let up = |t: DateTime<Utc>| if g.aligned(t) { t } else { g.next(t) };
    let heads = [up(from), g.bucket(from)];
    let tails = [g.bucket(to), up(to)];
    for (i, &a) in heads.iter().enumerate() {
        if i == 1 && a == heads[0] {
            continue;
        }
        for (j, &b) in tails.iter().enumerate() {
            if (j == 1 && b == tails[0]) || a >= b {
                continue;
            }
            // Head: fill [from, a), or subtract [a, from) when rounded out.
            let (hc, head) = if a >= from {
                best_cover(finer, from, a, now)
            } else {
                let (c, s) = best_cover(finer, a, from, now);
                (c, s.flipped())
            };
            let (tc, tail) = if b <= to {
                best_cover(finer, b, to, now)
            } else {
                let (c, s) = best_cover(finer, to, b, now);
                (c, s.flipped())
            };
            let cost = piece_cost(g, a, b, now) + hc + tc;
            if cost < best.0 {
                best = (cost, SignedCover::default().join((g, a, b), [head, tail]));
            }
        }
    }
    best
}

/// Which dimensions a rollup query keeps; the others are summed over (and come back empty,
/// with the bucket set to the query's `from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dims {
    /// Keep the bucket.
    pub bucket: bool,
    /// Keep the customer.
    pub customer: bool,
    /// Keep the provider.
    pub provider: bool,
    /// Keep the model.
    pub model: bool,
    /// Keep the agent.
    pub agent: bool,
}

impl Dims {
    /// Every dimension: the stored rows themselves.
    pub const ALL: Dims = Dims {
        bucket: true,
        customer: true,
        provider: true,
        model: true,
        agent: true,
    };
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

    /// Subtracts `o`.
    pub fn sub(&mut self, o: &RollupTotals) {
        self.events -= o.events;
        self.requests -= o.requests;
        self.input_tokens -= o.input_tokens;
        self.output_tokens -= o.output_tokens;
        self.cached_input_tokens -= o.cached_input_tokens;
        self.cache_write_tokens -= o.cache_write_tokens;
        self.reasoning_tokens -= o.reasoning_tokens;
        self.unpriced_events -= o.unpriced_events;
        self.cost -= o.cost;
        self.revenue -= o.revenue;
    }

    /// True when every sum is zero.
    pub fn is_zero(&self) -> bool {
        self.events == 0
            && self.requests == 0
            && self.input_tokens == 0
            && self.output_tokens == 0
            && self.cached_input_tokens == 0
            && self.cache_write_tokens == 0
            && self.reasoning_tokens == 0
            && self.unpriced_events == 0
            && self.cost.is_zero()
            && self.revenue.is_zero()
    }
}

/// The `customer_id` of fleet rows: every customer and agent summed per bucket × provider ×
/// model, so that fleet-wide series read a handful of rows per bucket. Customer ids are
/// never empty, so fleet rows cannot be mistaken for a customer's.
pub const FLEET: &str = "";

/// Changes to apply to the rollup rows, one per key.
pub type RollupDelta = BTreeMap<RollupKey, RollupTotals>;

/// Adds one event's contribution `t` to `delta` at every grain (the minute grain only when
/// the event's minute is not before `minute_since`, see [`minute_cutoff`]), to the
/// customer's row and to the [`FLEET`] row.
#[allow(clippy::too_many_arguments)]
pub fn add_event(
    delta: &mut RollupDelta,
    customer_id: &str,
    provider: &str,
    model: &str,
    agent: Option<&str>,
    at: DateTime<Utc>,
    t: &RollupTotals,
    minute_since: DateTime<Utc>,
) {
    for grain in Grain::ALL {
        if grain == Grain::Minute && at < minute_since {
            continue;
        }
        let key = RollupKey {
            grain,
            bucket: grain.bucket(at),
            customer_id: customer_id.to_string(),
            provider: provider.to_string(),
            model: model.to_string(),
            agent: agent.unwrap_or_default().to_string(),
        };
        let fleet = RollupKey {
            customer_id: FLEET.to_string(),
            agent: String::new(),
            ..key.clone()
        };
        delta.entry(key).or_default().add(t);
        delta.entry(fleet).or_default().add(t);
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
    }

    #[test]
    fn months_and_covers() {
        let t = Utc.with_ymd_and_hms(2026, 12, 24, 13, 47, 0).unwrap();
        let dec = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        let jan = Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(Grain::Month.bucket(t), dec);
        assert_eq!(Grain::Month.next(t), jan);
        assert_eq!(Grain::Month.buckets_between(dec, jan), 1);
        assert_eq!(Grain::Day.buckets_between(dec, jan), 31);
        let oct = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
        assert_eq!(
            Grain::cover(oct, jan).unwrap(),
            vec![(Grain::Month, oct, jan)]
        );
        // Ragged at both ends: minutes, hours, days, months, days, hours, minutes.
        let from = Utc.with_ymd_and_hms(2026, 10, 30, 22, 58, 0).unwrap();
        let to = Utc.with_ymd_and_hms(2027, 1, 2, 1, 2, 0).unwrap();
        let h = |d, h, m| Utc.with_ymd_and_hms(2026, 10, d, h, m, 0).unwrap();
        let j = |d, h, m| Utc.with_ymd_and_hms(2027, 1, d, h, m, 0).unwrap();
        let nov = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        assert_eq!(
            Grain::cover(from, to).unwrap(),
            vec![
                (Grain::Minute, from, h(30, 23, 0)),
                (Grain::Hour, h(30, 23, 0), h(31, 0, 0)),
                (Grain::Day, h(31, 0, 0), nov),
                (Grain::Month, nov, jan),
                (Grain::Day, jan, j(2, 0, 0)),
                (Grain::Hour, j(2, 0, 0), j(2, 1, 0)),
                (Grain::Minute, j(2, 1, 0), to),
            ]
        );
        // Inside one hour: minutes only.
        assert_eq!(
            Grain::cover(h(30, 22, 58), h(30, 22, 59)).unwrap(),
            vec![(Grain::Minute, h(30, 22, 58), h(30, 22, 59))]
        );
        assert_eq!(Grain::cover(h(30, 22, 58), h(30, 22, 58)).unwrap(), vec![]);
        assert!(Grain::cover(t + TimeDelta::seconds(1), jan).is_none());
        assert_eq!(
            minute_cutoff(t),
            Utc.with_ymd_and_hms(2026, 12, 22, 13, 0, 0).unwrap()
        );
    }

    /// How many times the signed cover counts instant `t`.
    fn count(c: &SignedCover, t: DateTime<Utc>) -> i64 {
        let n = |v: &Vec<Piece>| v.iter().filter(|(_, a, b)| *a <= t && t < *b).count() as i64;
        n(&c.add) - n(&c.sub)
    }

    proptest::proptest! {
        #[test]
        fn signed_covers_count_every_instant_of_the_range_once(
            from_min in 0i64..200_000,
            len_min in 1i64..200_000,
            now_min in 0i64..300_000,
            probes in proptest::collection::vec(0i64..400_000 * 60, 50),
        ) {
            let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
            let from = base + TimeDelta::minutes(from_min);
            let to = from + TimeDelta::minutes(len_min);
            let now = base + TimeDelta::minutes(now_min);
            let c = SignedCover::plan(from, to, now).unwrap();
            let edges = [from_min * 60, (from_min + len_min) * 60 - 1, (from_min + len_min) * 60];
            for p in probes.iter().chain(&edges) {
                let t = base + TimeDelta::seconds(*p);
                let inside = i64::from(from <= t && t < to);
                proptest::prop_assert_eq!(count(&c, t), inside, "{:?} at {}", c, t);
            }
            for (g, a, b) in c.add.iter().chain(&c.sub) {
                proptest::prop_assert!(g.aligned(*a) && g.aligned(*b) && a < b);
            }
        }
    }

    #[test]
    fn signed_covers_read_few_past_buckets() {
        let now = Utc.with_ymd_and_hms(2026, 11, 24, 13, 47, 12).unwrap();
        let nov = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let dec = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
        let to = Utc.with_ymd_and_hms(2026, 11, 24, 13, 48, 0).unwrap();
        // The month so far: the month's rows, minus the rest of the month (all future).
        let c = SignedCover::plan(nov, to, now).unwrap();
        assert_eq!(c.add, vec![(Grain::Month, nov, dec)]);
        assert!(c.sub.iter().all(|(_, a, _)| *a >= to), "{c:?}");
        // 30 days from 07:00: whole days, minus the seven hours before 07:00 of the first.
        let from = Utc.with_ymd_and_hms(2026, 10, 25, 7, 0, 0).unwrap();
        let c = SignedCover::plan(from, to, now).unwrap();
        let oct25 = Utc.with_ymd_and_hms(2026, 10, 25, 0, 0, 0).unwrap();
        assert!(c.sub.contains(&(Grain::Hour, oct25, from)), "{c:?}");
        assert!(c.add.contains(&(Grain::Month, nov, dec)), "{c:?}");
        // A closed month: its one row per series.
        let oct = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
        let c = SignedCover::plan(oct, nov, now).unwrap();
        assert_eq!(c.add, vec![(Grain::Month, oct, nov)]);
        assert!(c.sub.is_empty());
        assert!(SignedCover::plan(oct + TimeDelta::seconds(1), nov, now).is_none());
    }

    #[test]
    fn one_event_feeds_every_grain() {
        let mut d = RollupDelta::new();
        let u = TokenUsage::new(10, 5, 2, 0, 1, 1).unwrap();
        let t = RollupTotals::of_event(&u, Some((Decimal::new(3, 2), Decimal::new(30, 2))));
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 13, 47, 12).unwrap();
        add_event(&mut d, "c", "p", "m", Some("bot"), at, &t, at);
        add_event(&mut d, "c", "p", "m", Some("bot"), at, &t, at);
        assert_eq!(d.len(), 8, "4 grains, customer and fleet rows");
        for v in d.values() {
            assert_eq!(v.events, 2);
            assert_eq!(v.tokens(), 30);
            assert_eq!(v.cost, Decimal::new(6, 2));
        }
        // Older than the minute cutoff: hour, day and month only.
        let mut d = RollupDelta::new();
        add_event(
            &mut d,
            "c",
            "p",
            "m",
            None,
            at,
            &t,
            at + TimeDelta::minutes(1),
        );
        assert_eq!(d.len(), 6);
        assert!(d.keys().all(|k| k.grain != Grain::Minute));
        assert_eq!(d.keys().filter(|k| k.customer_id == FLEET).count(), 3);
    }
}
