//! Rating throughput: `--customers` customers × `--events-per-customer` events (default
//! 1,000 × 1,000 = 1M) rated for one monthly cycle under tiered plans.
//!
//! Every customer is on one of four plans (cost-plus with graduated token tiers, cost-plus
//! with volume spend tiers, list with graduated spend tiers, list with volume token tiers),
//! so every event goes through tier allocation and the margin-floor check. Measured in the
//! same run:
//!
//! 1. **baseline (costing)**: each event costed from the catalog (`cost_usage`) and summed —
//!    the work any meter does, without plans;
//! 2. **rating (engine)**: `rate_segment` of each customer's cycle from the same events:
//!    lines, tiers, floor, credits, minimum, rounding;
//! 3. **rating (from the ledger)** with `--store`: the events are first recorded in a fresh
//!    SQLite ledger through `record_events`, then each customer's cycle is read back and
//!    rated by `Fatura::rate_customer` (what `/v1/customers/{id}/upcoming` and invoices do).
//!
//! It checks that the ledger path and the engine path give the same totals.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use clap::Parser;
use fatura_core::catalog::{PriceComponents, UnitPrice};
use fatura_core::rating::{
    ListPrice, PlanKind, PlanTerms, RatableEvent, Segment, Tier, TierMetric, TierMode, Tiers,
    rate_segment,
};
use fatura_core::{Currency, CustomerId, EventId, MarginRate, TokenUsage, UsageEvent, cost_usage};
use fatura_server::service::{Fatura, PlanInput};
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

#[derive(Debug, Parser)]
#[command(about = "Rating throughput (events/s) under tiered plans")]
struct Args {
    /// Customers.
    #[arg(long, default_value_t = 1000)]
    customers: usize,
    /// Events per customer in the cycle.
    #[arg(long, default_value_t = 1000)]
    events_per_customer: usize,
    /// Also record the events in a SQLite ledger and rate them from it.
    #[arg(long)]
    store: bool,
}

/// (model, prompt, completion, cache read) per token, USD.
const MODELS: [(&str, &str, &str, &str); 4] = [
    ("openai/gpt-4o", "0.0000025", "0.00001", "0.00000125"),
    (
        "openai/gpt-4o-mini",
        "0.00000015",
        "0.0000006",
        "0.000000075",
    ),
    (
        "anthropic/claude-sonnet-4",
        "0.000003",
        "0.000015",
        "0.0000003",
    ),
    (
        "google/gemini-2.5-flash",
        "0.0000003",
        "0.0000025",
        "0.000000075",
    ),
];

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn prices(i: usize) -> PriceComponents {
    let (_, p, c, r) = MODELS[i];
    PriceComponents {
        prompt: UnitPrice::parse(p).unwrap(),
        completion: UnitPrice::parse(c).unwrap(),
        cache_read: Some(UnitPrice::parse(r).unwrap()),
        ..Default::default()
    }
}

fn tiers(metric: TierMetric, mode: TierMode) -> Option<Tiers> {
    let (a, b) = match metric {
        TierMetric::Tokens => (d("5000000"), d("50000000")),
        TierMetric::Spend => (d("100"), d("1000")),
    };
    Some(Tiers {
        metric,
        mode,
        tiers: vec![
            Tier {
                up_to: Some(a),
                discount: Decimal::ZERO,
            },
            Tier {
                up_to: Some(b),
                discount: d("0.05"),
            },
            Tier {
                up_to: None,
                discount: d("0.10"),
            },
        ],
    })
}

fn plans() -> Vec<PlanTerms> {
    let base = PlanTerms::default_for(Currency::Usd, MarginRate::default_floor());
    let cost_plus = PlanTerms {
        margin: Some(d("0.9")),
        included_credits: d("5.00"),
        ..base.clone()
    };
    let list = PlanTerms {
        kind: PlanKind::List,
        margin: None,
        list_prices: vec![
            ListPrice {
                pattern: "openai/*".into(),
                prompt: d("20"),
                completion: d("80"),
                cached: Some(d("10")),
                reasoning: None,
                per_request: Decimal::ZERO,
            },
            ListPrice {
                pattern: "anthropic/*".into(),
                prompt: d("25"),
                completion: d("120"),
                cached: None,
                reasoning: None,
                per_request: Decimal::ZERO,
            },
            // Gemini is priced too low on purpose: its lines hit the floor.
            ListPrice {
                pattern: "*".into(),
                prompt: d("1"),
                completion: d("10"),
                cached: None,
                reasoning: None,
                per_request: Decimal::ZERO,
            },
        ],
        monthly_minimum: d("50.00"),
        ..base
    };
    vec![
        PlanTerms {
            tiers: tiers(TierMetric::Tokens, TierMode::Graduated),
            ..cost_plus.clone()
        },
        PlanTerms {
            tiers: tiers(TierMetric::Spend, TierMode::Volume),
            ..cost_plus
        },
        PlanTerms {
            tiers: tiers(TierMetric::Spend, TierMode::Graduated),
            ..list.clone()
        },
        PlanTerms {
            tiers: tiers(TierMetric::Tokens, TierMode::Volume),
            ..list
        },
    ]
}

/// One generated event: usage, model index, timestamp, id.
type GenEvent = (TokenUsage, usize, DateTime<Utc>, String);

struct Generated {
    /// Per customer.
    events: Vec<Vec<GenEvent>>,
}

fn generate(args: &Args, start: DateTime<Utc>) -> Generated {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let span = (cycle_end(start) - start).num_seconds();
    let events = (0..args.customers)
        .map(|c| {
            (0..args.events_per_customer)
                .map(|i| {
                    let input = rng.random_range(100..20_000u64);
                    let cached = input * rng.random_range(0..60u64) / 100;
                    let output = rng.random_range(10..4_000u64);
                    let usage = TokenUsage::new(input, output, cached, 0, 0, 1).unwrap();
                    let at = start + chrono::Duration::seconds(rng.random_range(0..span));
                    (
                        usage,
                        rng.random_range(0..MODELS.len()),
                        at,
                        format!("c{c:04}-e{i:06}"),
                    )
                })
                .collect()
        })
        .collect();
    Generated { events }
}

/// The end of the monthly cycle that starts at `start` (a first of the month, UTC).
fn cycle_end(start: DateTime<Utc>) -> DateTime<Utc> {
    start
        .checked_add_months(chrono::Months::new(1))
        .expect("a month after a calendar date exists")
}

/// The cycle rated and closed: the last whole UTC calendar month that ended at least four
/// hours before `now`, so that the billing runs at its end plus two and three hours are in
/// the past on any date (a run dated in the future bills cycles that have not ended).
fn closed_cycle(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let reference = now - chrono::Duration::hours(4);
    let to = Utc
        .with_ymd_and_hms(reference.year(), reference.month(), 1, 0, 0, 0)
        .single()
        .expect("the first of a month at midnight UTC exists");
    let from = to
        .checked_sub_months(chrono::Months::new(1))
        .expect("a month before a calendar date exists");
    (from, to)
}

fn segment(terms: &PlanTerms, from: DateTime<Utc>, to: DateTime<Utc>) -> Segment {
    Segment {
        from,
        to,
        plan_id: Some("bench".into()),
        plan_version: Some(1),
        terms: terms.clone(),
        cycle_fraction: Decimal::ONE,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (from, to) = closed_cycle(Utc::now());
    let plans = plans();
    let total_events = args.customers * args.events_per_customer;
    eprintln!(
        "generating {total_events} events for {} customers",
        args.customers
    );
    let g = generate(&args, from);
    let catalog: Vec<PriceComponents> = (0..MODELS.len()).map(prices).collect();

    // 1. Baseline: costing only.
    let t = Instant::now();
    let mut cost_sum = Decimal::ZERO;
    for events in &g.events {
        for (usage, m, _, _) in events {
            cost_sum += cost_usage(usage, &catalog[*m])?.total();
        }
    }
    let baseline = t.elapsed();

    // 2. The rating engine (events built as the ledger path builds them: costed by kind).
    let ratable: Vec<Vec<RatableEvent>> = g
        .events
        .iter()
        .map(|events| {
            events
                .iter()
                .map(|(usage, m, at, id)| RatableEvent {
                    id: id.clone(),
                    timestamp: *at,
                    provider: "openrouter".into(),
                    model: MODELS[*m].0.into(),
                    usage: *usage,
                    cost: Some(cost_usage(usage, &catalog[*m]).unwrap()),
                })
                .collect()
        })
        .collect();
    let t = Instant::now();
    let mut engine_totals = Vec::with_capacity(args.customers);
    let mut floored_lines = 0usize;
    for (c, events) in ratable.iter().enumerate() {
        let s = rate_segment(
            &segment(&plans[c % plans.len()], from, to),
            Decimal::ONE,
            events,
        )?;
        floored_lines += s.lines.iter().filter(|l| l.floor_applied.is_some()).count();
        engine_totals.push(s.total);
    }
    let engine = t.elapsed();

    let rate = |n: usize, dur: std::time::Duration| n as f64 / dur.as_secs_f64();
    println!(
        "{} customers × {} events = {} events, 4 tiered plans, one monthly cycle",
        args.customers, args.events_per_customer, total_events
    );
    println!("| path | events/s | seconds | vs baseline |");
    println!("|---|---|---|---|");
    let base_rate = rate(total_events, baseline);
    println!(
        "| baseline: costing only (cost_usage + sum) | {:.0} | {:.3} | 1.00 |",
        base_rate,
        baseline.as_secs_f64()
    );
    println!(
        "| rating engine (rate_segment per customer) | {:.0} | {:.3} | {:.2} |",
        rate(total_events, engine),
        engine.as_secs_f64(),
        rate(total_events, engine) / base_rate
    );

    if args.store {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("rating.db").display());
        let store = fatura_store::connect(&url, 4).await?;
        store.migrate().await?;
        let fatura = Arc::new(Fatura::new(store, MarginRate::default_floor()));
        let catalog_json = serde_json::json!({"data": MODELS.iter().map(|(id, p, c, r)| serde_json::json!({
            "id": id, "pricing": {"prompt": p, "completion": c, "input_cache_read": r}})).collect::<Vec<_>>()});
        // Prices and plans in force well before the cycle.
        let t0 = from - chrono::Duration::days(365);
        fatura
            .import_prices(
                fatura_core::import::CatalogFormat::OpenRouter,
                &serde_json::to_vec(&catalog_json)?,
                None,
                t0,
                Utc::now(),
            )
            .await?;
        let now = Utc::now();
        for (i, terms) in plans.iter().enumerate() {
            fatura
                .create_plan(
                    Some(&format!("plan-{i}")),
                    PlanInput {
                        name: format!("Plan {i}"),
                        terms: terms.clone(),
                        effective_from: t0,
                    },
                    now,
                )
                .await?;
        }
        eprintln!("recording {total_events} events in a SQLite ledger");
        for (c, events) in g.events.iter().enumerate() {
            let id = format!("cust-{c:04}");
            fatura
                // Created at the cycle's start: a customer's cycles begin at its creation.
                .create_customer(Some(&id), &id, Currency::Usd, Default::default(), from)
                .await?;
            fatura
                .assign_plan(&id, Some(&format!("plan-{}", c % plans.len())), t0, now)
                .await?;
            let batch: Vec<(usize, UsageEvent)> = events
                .iter()
                .enumerate()
                .map(|(i, (usage, m, at, eid))| {
                    let e = UsageEvent::new(
                        EventId::parse(eid).unwrap(),
                        CustomerId::parse(&id).unwrap(),
                        *at,
                        "openrouter".into(),
                        MODELS[*m].0.into(),
                        *usage,
                        Default::default(),
                        None,
                    )
                    .unwrap();
                    (i, e)
                })
                .collect();
            for chunk in batch.chunks(1000) {
                fatura.record_events(chunk.to_vec(), now).await?;
            }
        }
        let t = Instant::now();
        let mut store_totals: HashMap<usize, Decimal> = HashMap::new();
        for c in 0..args.customers {
            let segs = fatura
                .rate_customer(&format!("cust-{c:04}"), from, to, to, now)
                .await?;
            store_totals.insert(c, segs.iter().map(|s| s.total).sum());
        }
        let from_ledger = t.elapsed();
        println!(
            "| rating from the SQLite ledger (read + cost by kind + rate) | {:.0} | {:.3} | {:.2} |",
            rate(total_events, from_ledger),
            from_ledger.as_secs_f64(),
            rate(total_events, from_ledger) / base_rate
        );
        for (c, total) in engine_totals.iter().enumerate() {
            if store_totals.get(&c) != Some(total) {
                bail!(
                    "customer {c}: ledger rating {:?} != engine rating {total}",
                    store_totals.get(&c)
                );
            }
        }
        // 4. Closing the cycle: one billing run after the grace period drafts and finalises
        //    an invoice per customer (rating each twice, linking every event, numbering).
        let t = Instant::now();
        let report = fatura
            .run_billing(
                to + chrono::Duration::hours(2),
                fatura_server::service::BillingPolicy::default(),
            )
            .await?;
        let close = t.elapsed();
        let invoiced_events: i64 = report.finalized.iter().map(|i| i.events).sum();
        println!(
            "| close cycles: {} invoices drafted + finalised, {} events linked | {:.0} | {:.3} | {:.2} |",
            report.finalized.len(),
            invoiced_events,
            rate(total_events, close),
            close.as_secs_f64(),
            rate(total_events, close) / base_rate
        );
        if report.finalized.len() != args.customers
            || usize::try_from(invoiced_events).unwrap_or(0) != total_events
        {
            bail!(
                "closing billed {invoiced_events} events in {} invoices",
                report.finalized.len()
            );
        }
        let again = fatura
            .run_billing(
                to + chrono::Duration::hours(3),
                fatura_server::service::BillingPolicy::default(),
            )
            .await?;
        if again.drafted != 0 || !again.finalized.is_empty() {
            bail!("a second run billed again");
        }
    }
    let invoiced: Decimal = engine_totals.iter().sum();
    println!(
        "upstream cost {} USD, invoiced {} USD, {} lines raised to the floor",
        cost_sum.round_dp(2),
        invoiced,
        floored_lines
    );
    Ok(())
}
