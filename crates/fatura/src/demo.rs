//! `fatura demo`: fatura alive in one command, for a first look.
//!
//! It opens (or creates) a local SQLite file, seeds it once — the price catalog shipped
//! with fatura, a USD→BRL rate, plans with volume tiers, six customers (USD and BRL,
//! prepaid and postpaid) and a few months of usage history with weekly seasonality and an
//! upward trend, outcomes for ROI, and the invoices of the cycles that closed — then serves
//! exactly as `fatura serve` does, with the gateway pointed at an in-process mock upstream
//! and a traffic generator sending chat calls through it with the customers' keys.
//!
//! Payment collection is off (demo invoices never reach Stripe, whatever the environment
//! says), and only `--database` moves the demo off its own file: the database named by
//! `FATURA_DATABASE_URL` or the config file is never seeded with demo data.
//!
//! The customers' keys are created at every start and live only in this process's memory
//! (for the traffic generator); they are never printed or logged. The admin key is printed:
//! it is the operator's login to the demo.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use clap::Args;
use fatura_core::import::CatalogFormat;
use fatura_core::{Currency, CustomerId, EventId, TokenUsage, UsageEvent};
use fatura_server::gateway::GatewayConfig;
use fatura_server::gateway::config::{RouteConfig, UpstreamConfig, UpstreamKind};
use fatura_server::mock::{Flavor, MockConfig, serve_mock};
use fatura_server::service::analytics::OutcomeInput;
use fatura_server::service::{Billing, BillingPolicy, CreditKind, CreditRequest, Fatura};
use fatura_store::BillingSettings;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::{Config, MIN_ADMIN_KEY_LEN, redact_url};

/// The demo's database, unless `--database` names another.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://fatura-demo.db";

/// The price catalog shipped with fatura (OpenRouter's `GET /api/v1/models` format),
/// embedded so the binary works from any directory.
const CATALOG: &[u8] = include_bytes!("../../../fixtures/openrouter_models.json");

/// Catalog provider of every demo call (the gateway's upstream is of kind `openrouter`).
const PROVIDER: &str = "openrouter";

/// Seed of the back-filled history: the same day gives the same history.
const HISTORY_SEED: u64 = 0x00fa_7a2a;

/// Most events per `record_events` call (the ingestion API's batch limit).
const EVENT_BATCH: usize = 10_000;

/// Outcomes per `record_outcomes` call.
const OUTCOME_BATCH: usize = 1_000;

/// A prepaid wallet under this many dollars available is topped up.
const LOW_BALANCE_USD: i64 = 100;

/// A top-up of a prepaid demo wallet, USD.
const TOP_UP_USD: i64 = 500;

/// Options of `fatura demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Address to listen on (default 127.0.0.1:8080; env FATURA_LISTEN).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The admin key: the operator's login, printed at start (at least 16 characters).
    /// Default: FATURA_ADMIN_KEY, else a random key.
    #[arg(long, value_name = "KEY")]
    pub admin_key: Option<String>,
    /// Days of usage history to back-fill on the first start (0 to 730).
    #[arg(long, value_name = "DAYS", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(0..=730))]
    pub history_days: u32,
    /// Live calls per second sent through the gateway.
    #[arg(long, value_name = "CALLS", default_value_t = 2.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Send no live traffic.
    #[arg(long)]
    pub no_traffic: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1000.0 => Ok(r),
        _ => Err(format!(
            "calls per second: a number above 0 and at most 1000, got {s:?}"
        )),
    }
}

// ---- the demo's world -------------------------------------------------------------------

/// An AI agent of a customer: which models it calls, how big its calls are, and what a
/// success of it is worth.
struct Agent {
    name: &'static str,
    /// Models (catalog ids) and their weights.
    models: &'static [(&'static str, u32)],
    /// Input tokens per call of the history (inclusive range).
    input: (u64, u64),
    /// Output tokens per call of the history (inclusive range).
    output: (u64, u64),
    /// Percent of input tokens read from the prompt cache (inclusive range).
    cached_pct: (u64, u64),
    /// Outcome: kind, calls per outcome, value in US cents (inclusive range; BRL
    /// customers' outcomes are worth five times as many centavos).
    outcome: Option<(&'static str, u64, (i64, i64))>,
}

const AGENTS: &[Agent] = &[
    Agent {
        name: "sdr-bot",
        models: &[
            ("openai/gpt-4o-mini", 5),
            ("anthropic/claude-3.5-haiku", 3),
            ("openai/gpt-4o", 2),
        ],
        input: (800, 3_000),
        output: (150, 600),
        cached_pct: (0, 50),
        outcome: Some(("meeting_booked", 40, (15_000, 60_000))),
    },
    Agent {
        name: "support",
        models: &[
            ("anthropic/claude-sonnet-4", 9),
            ("openai/gpt-4o", 7),
            ("google/gemini-2.5-flash", 4),
        ],
        input: (2_000, 12_000),
        output: (200, 900),
        cached_pct: (30, 70),
        outcome: Some(("ticket_resolved", 12, (400, 1_200))),
    },
    Agent {
        name: "qualifier",
        models: &[
            ("google/gemini-2.5-flash", 5),
            ("deepseek/deepseek-chat-v3-0324", 3),
            ("meta-llama/llama-3.3-70b-instruct", 2),
        ],
        input: (500, 2_000),
        output: (20, 120),
        cached_pct: (0, 20),
        outcome: Some(("qualified_lead", 25, (2_000, 8_000))),
    },
    Agent {
        name: "researcher",
        models: &[
            ("deepseek/deepseek-r1", 7),
            ("openai/o3-mini", 7),
            ("google/gemini-2.5-pro", 6),
        ],
        input: (3_000, 20_000),
        output: (1_000, 5_000),
        cached_pct: (0, 30),
        outcome: Some(("report_delivered", 50, (5_000, 20_000))),
    },
    Agent {
        name: "summarizer",
        models: &[
            ("meta-llama/llama-3.3-70b-instruct", 4),
            ("openai/gpt-4o-mini", 4),
            ("google/gemini-2.5-flash", 2),
        ],
        input: (4_000, 16_000),
        output: (200, 500),
        cached_pct: (0, 20),
        outcome: None,
    },
];

/// Models whose catalog entry has a prompt-cache price (others get no cached tokens).
fn has_cache(model: &str) -> bool {
    model.starts_with("openai/") || model.starts_with("anthropic/") || model.starts_with("google/")
}

/// Models that bill reasoning tokens.
fn reasons(model: &str) -> bool {
    model == "openai/o3-mini" || model == "deepseek/deepseek-r1"
}

/// A seeded customer.
struct DemoCustomer {
    id: &'static str,
    name: &'static str,
    currency: Currency,
    prepaid: bool,
    /// Plan (`None`: the default cost-plus plan).
    plan: Option<&'static str>,
    anchor_day: u32,
    timezone: &'static str,
    locale: &'static str,
    payment_terms_days: u32,
    /// Tax in percent.
    tax_pct: Option<i64>,
    /// Calls per weekday at the start of the history (the trend multiplies it by 2.5 by
    /// the end).
    daily_calls: f64,
    /// Agents (names in [`AGENTS`]) and their share of the calls.
    agents: &'static [(&'static str, u32)],
    /// Share of the live traffic.
    live_weight: u32,
}

const CUSTOMERS: &[DemoCustomer] = &[
    DemoCustomer {
        id: "acme-ai",
        name: "Acme AI",
        currency: Currency::Usd,
        prepaid: true,
        plan: Some("demo-growth-usd"),
        anchor_day: 1,
        timezone: "UTC",
        locale: "en",
        payment_terms_days: 0,
        tax_pct: None,
        daily_calls: 120.0,
        agents: &[("sdr-bot", 5), ("qualifier", 3), ("support", 2)],
        live_weight: 3,
    },
    DemoCustomer {
        id: "nimbus-labs",
        name: "Nimbus Labs",
        currency: Currency::Usd,
        prepaid: true,
        plan: None,
        anchor_day: 1,
        timezone: "UTC",
        locale: "en",
        payment_terms_days: 0,
        tax_pct: None,
        daily_calls: 50.0,
        agents: &[("researcher", 6), ("summarizer", 4)],
        live_weight: 2,
    },
    DemoCustomer {
        id: "orbital-logistics",
        name: "Orbital Logistics",
        currency: Currency::Usd,
        prepaid: false,
        plan: Some("demo-list-usd"),
        anchor_day: 1,
        timezone: "America/New_York",
        locale: "en",
        payment_terms_days: 30,
        tax_pct: None,
        daily_calls: 90.0,
        agents: &[("support", 6), ("summarizer", 4)],
        live_weight: 2,
    },
    DemoCustomer {
        id: "ferrovia-pagamentos",
        name: "Ferrovia Pagamentos Ltda",
        currency: Currency::Brl,
        prepaid: false,
        plan: Some("demo-growth-brl"),
        anchor_day: 1,
        timezone: "America/Sao_Paulo",
        locale: "pt-BR",
        payment_terms_days: 15,
        tax_pct: Some(5),
        daily_calls: 110.0,
        agents: &[("sdr-bot", 4), ("qualifier", 4), ("support", 2)],
        live_weight: 3,
    },
    DemoCustomer {
        id: "casa-verde",
        name: "Casa Verde Imóveis",
        currency: Currency::Brl,
        prepaid: false,
        plan: Some("demo-list-brl"),
        anchor_day: 15,
        timezone: "America/Sao_Paulo",
        locale: "pt-BR",
        payment_terms_days: 10,
        tax_pct: Some(5),
        daily_calls: 50.0,
        agents: &[("sdr-bot", 6), ("support", 4)],
        live_weight: 1,
    },
    DemoCustomer {
        id: "lumen-health",
        name: "Lumen Health",
        currency: Currency::Usd,
        prepaid: false,
        plan: None,
        anchor_day: 1,
        timezone: "UTC",
        locale: "en",
        payment_terms_days: 30,
        tax_pct: None,
        daily_calls: 80.0,
        agents: &[("support", 5), ("researcher", 3), ("summarizer", 2)],
        live_weight: 1,
    },
];

/// Share of calls by hour of the day (UTC): the Americas' business hours.
const HOUR_WEIGHTS: [u32; 24] = [
    2, 1, 1, 1, 1, 1, 2, 3, 4, 5, 6, 8, 10, 12, 13, 13, 13, 12, 11, 10, 8, 6, 4, 3,
];

/// Calls by day of the week, Monday first (per mille of a Monday).
const WEEKDAY_PER_MILLE: [u32; 7] = [1000, 1080, 1100, 1050, 950, 450, 350];

/// USD→BRL rate of the demo (per put_fx_rate).
fn usd_brl() -> Decimal {
    Decimal::new(533, 2)
}

/// List prices per 1M tokens (prompt, completion, cached) in USD, by model pattern, first
/// match wins. All sit above the 87% floor at the catalog's prices.
const LIST_PRICES_USD: &[(&str, i64, i64, i64)] = &[
    ("openai/gpt-4o-mini", 150, 600, 75),
    ("openai/gpt-4o", 2_200, 8_500, 1_100),
    ("openai/o3-mini", 1_000, 4_000, 500),
    ("anthropic/claude-sonnet-4", 3_000, 12_000, 300),
    ("anthropic/claude-3.5-haiku", 800, 3_200, 80),
    ("google/gemini-2.5-pro", 1_000, 8_000, 250),
    ("google/*", 250, 2_000, 60),
    ("deepseek/deepseek-r1", 350, 1_600, 350),
    ("*", 200, 800, 200),
];

/// The list plan's prices in `factor` × USD cents (BRL: six times the USD figures).
fn list_prices(factor: i64) -> Vec<Value> {
    LIST_PRICES_USD
        .iter()
        .map(|(pattern, prompt, completion, cached)| {
            json!({
                "pattern": pattern,
                "prompt": Decimal::new(prompt * factor, 2).to_string(),
                "completion": Decimal::new(completion * factor, 2).to_string(),
                "cached": Decimal::new(cached * factor, 2).to_string(),
            })
        })
        .collect()
}

/// The plans (bodies of `POST /v1/plans`), effective from `from`.
fn plans(from: DateTime<Utc>) -> Vec<Value> {
    let from = from.to_rfc3339();
    let token_tiers = json!({"metric": "tokens", "mode": "graduated", "tiers": [
        {"up_to": "10000000", "discount": "0"},
        {"up_to": "50000000", "discount": "0.05"},
        {"up_to": null, "discount": "0.1"}]});
    vec![
        json!({
            "id": "demo-growth-usd", "name": "Growth", "currency": "USD", "kind": "cost_plus",
            "margin": "0.9", "model_margins": [{"pattern": "anthropic/*", "margin": "0.92"}],
            "tiers": token_tiers, "included_credits": "25.00", "effective_from": from,
        }),
        json!({
            "id": "demo-growth-brl", "name": "Crescimento", "currency": "BRL", "kind": "cost_plus",
            "margin": "0.9", "model_margins": [{"pattern": "anthropic/*", "margin": "0.92"}],
            "tiers": token_tiers, "monthly_minimum": "500.00", "effective_from": from,
        }),
        json!({
            "id": "demo-list-usd", "name": "Enterprise list", "currency": "USD", "kind": "list",
            "list_prices": list_prices(1),
            "tiers": {"metric": "spend", "mode": "volume", "tiers": [
                {"up_to": "2000", "discount": "0"}, {"up_to": null, "discount": "0.05"}]},
            "effective_from": from,
        }),
        json!({
            "id": "demo-list-brl", "name": "Tabela", "currency": "BRL", "kind": "list",
            "list_prices": list_prices(6),
            "tiers": {"metric": "spend", "mode": "volume", "tiers": [
                {"up_to": "10000", "discount": "0"}, {"up_to": null, "discount": "0.05"}]},
            "effective_from": from,
        }),
    ]
}

/// Index of a weighted choice (0 when the weights are all zero).
fn pick(rng: &mut StdRng, weights: impl Iterator<Item = u32> + Clone) -> usize {
    let total: u32 = weights.clone().sum();
    if total == 0 {
        return 0;
    }
    let mut x = rng.random_range(0..total);
    for (i, w) in weights.enumerate() {
        if x < w {
            return i;
        }
        x -= w;
    }
    0
}

fn agent(name: &str) -> Option<&'static Agent> {
    AGENTS.iter().find(|a| a.name == name)
}

/// An agent of `c` and one of its models, by weight.
fn pick_call(rng: &mut StdRng, c: &DemoCustomer) -> Option<(&'static Agent, &'static str)> {
    let a = c.agents.get(pick(rng, c.agents.iter().map(|a| a.1)))?;
    let agent = agent(a.0)?;
    let model = agent
        .models
        .get(pick(rng, agent.models.iter().map(|m| m.1)))?;
    Some((agent, model.0))
}

// ---- back-filled history ----------------------------------------------------------------

/// The back-filled history.
struct History {
    events: Vec<UsageEvent>,
    outcomes: Vec<OutcomeInput>,
}

/// A random instant of `date` (UTC) by the hourly profile, or `None` if it is not before
/// `now`.
fn instant_of(rng: &mut StdRng, date: NaiveDate, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let hour = u32::try_from(pick(rng, HOUR_WEIGHTS.iter().copied())).unwrap_or(12);
    let t = date
        .and_hms_micro_opt(
            hour,
            rng.random_range(0..60),
            rng.random_range(0..60),
            rng.random_range(0..1_000_000),
        )?
        .and_utc();
    (t < now).then_some(t)
}

fn usage_of(rng: &mut StdRng, agent: &Agent, model: &str) -> anyhow::Result<TokenUsage> {
    let input = rng.random_range(agent.input.0..=agent.input.1);
    let output = rng.random_range(agent.output.0..=agent.output.1);
    let cached = if has_cache(model) {
        input * rng.random_range(agent.cached_pct.0..=agent.cached_pct.1) / 100
    } else {
        0
    };
    // Anthropic's prompt caching writes now and then.
    let cache_write = if model.starts_with("anthropic/") && rng.random_bool(0.2) {
        ((input - cached) * rng.random_range(5..=15) / 100).min(input - cached)
    } else {
        0
    };
    let reasoning = if reasons(model) {
        output * rng.random_range(40..=80) / 100
    } else {
        0
    };
    TokenUsage::new(input, output, cached, cache_write, reasoning, 1)
        .map_err(|e| anyhow::anyhow!("demo usage: {e}"))
}

/// `days` days of history ending now (the first day is `start`): every customer's calls
/// with weekly seasonality, an upward trend and noise, and the outcomes of its agents.
/// Deterministic for a given `start`: event ids and contents are the same on the same day.
fn history(start: NaiveDate, days: u32, now: DateTime<Utc>) -> anyhow::Result<History> {
    let mut rng = StdRng::seed_from_u64(HISTORY_SEED);
    let mut events = Vec::new();
    let mut outcomes = Vec::new();
    let (mut event_no, mut outcome_no) = (0u64, 0u64);
    if days == 0 {
        return Ok(History { events, outcomes });
    }
    for c in CUSTOMERS {
        let customer = CustomerId::parse(c.id).map_err(|e| anyhow::anyhow!("{e}"))?;
        for d in 0..=days {
            let Some(date) = start.checked_add_days(chrono::Days::new(u64::from(d))) else {
                continue;
            };
            let progress = f64::from(d) / f64::from(days);
            let season = f64::from(
                WEEKDAY_PER_MILLE
                    .get(date.weekday().num_days_from_monday() as usize)
                    .copied()
                    .unwrap_or(1000),
            ) / 1000.0;
            let noise = rng.random_range(0.85..1.15);
            let calls = (c.daily_calls * (1.0 + 1.5 * progress) * season * noise).round() as u64;
            let mut by_agent: BTreeMap<&'static str, u64> = BTreeMap::new();
            for _ in 0..calls {
                let Some((agent, model)) = pick_call(&mut rng, c) else {
                    continue;
                };
                let usage = usage_of(&mut rng, agent, model)?;
                let at = instant_of(&mut rng, date, now);
                event_no += 1;
                let Some(at) = at else { continue };
                *by_agent.entry(agent.name).or_default() += 1;
                let mut tags = BTreeMap::new();
                tags.insert("agent".to_string(), agent.name.to_string());
                let event = UsageEvent::new(
                    EventId::parse(&format!("demo-{event_no:08}"))
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                    customer.clone(),
                    at,
                    PROVIDER.to_string(),
                    model.to_string(),
                    usage,
                    tags,
                    None,
                )
                .map_err(|e| anyhow::anyhow!("demo event: {e}"))?;
                events.push(event);
            }
            for (name, n) in by_agent {
                let Some((kind, per, (lo, hi))) = agent(name).and_then(|a| a.outcome) else {
                    continue;
                };
                // n / per outcomes: the whole part, and one more with the remainder's odds.
                let count = n / per + u64::from(rng.random_range(0..per) < n % per);
                for _ in 0..count {
                    let cents = rng.random_range(lo..=hi);
                    let value = match c.currency {
                        Currency::Usd => Decimal::new(cents, 2),
                        _ => Decimal::new(cents * 5, 2),
                    };
                    let at = instant_of(&mut rng, date, now);
                    outcome_no += 1;
                    let Some(at) = at else { continue };
                    outcomes.push(OutcomeInput {
                        id: format!("demo-outcome-{outcome_no:07}"),
                        customer_id: c.id.to_string(),
                        timestamp: at,
                        tags: BTreeMap::from([("agent".to_string(), name.to_string())]),
                        value,
                        currency: c.currency,
                        kind: kind.to_string(),
                    });
                }
            }
        }
    }
    Ok(History { events, outcomes })
}

// ---- seeding ----------------------------------------------------------------------------

/// What the first start wrote.
struct Seeded {
    events: usize,
    outcomes: usize,
    invoices: usize,
}

/// Whether the database already holds the demo: `true` when it has all the demo's
/// customers, `false` when none; an error when only some (an interrupted first start).
async fn demo_present(fatura: &Fatura, database: &str) -> anyhow::Result<bool> {
    let mut present = 0;
    for c in CUSTOMERS {
        if fatura.find_customer(c.id).await?.is_some() {
            present += 1;
        }
    }
    match present {
        0 => Ok(false),
        n if n == CUSTOMERS.len() => Ok(true),
        _ => bail!(
            "{database} holds only part of the demo's customers (was a first start interrupted?): \
             delete it, or start the demo with another --database"
        ),
    }
}

/// Seeds the demo: catalog, exchange rate, plans, customers, history, wallet credits,
/// outcomes, and a billing run at `now`.
async fn seed(
    fatura: &Fatura,
    history_days: u32,
    policy: BillingPolicy,
    now: DateTime<Utc>,
) -> anyhow::Result<Seeded> {
    let start_date = now
        .date_naive()
        .checked_sub_days(chrono::Days::new(u64::from(history_days)))
        .context("--history-days reaches too far back")?;
    let start = start_date
        .and_hms_opt(0, 0, 0)
        .context("midnight of the first day")?
        .and_utc();
    tracing::info!(%start, "seeding the demo: catalog, plans, customers");
    fatura
        .import_prices(CatalogFormat::OpenRouter, CATALOG, None, start, now)
        .await
        .context("cannot import the demo price catalog")?;
    // From before the cycle the history starts in: rating a cycle needs its rate even for
    // the part before the customer existed.
    let fx_from = start_date
        .checked_sub_days(chrono::Days::new(62))
        .unwrap_or(start_date);
    fatura
        .put_fx_rate(Currency::Brl, fx_from, usd_brl(), now)
        .await?;
    for body in plans(start) {
        let id = body["id"].as_str().unwrap_or_default().to_string();
        if fatura.plan(&id, now).await.is_ok() {
            continue;
        }
        fatura_server::plans::create_plan_with(fatura, serde_json::from_value(body)?, now)
            .await
            .with_context(|| format!("cannot create the demo plan {id}"))?;
    }
    for c in CUSTOMERS {
        let settings = BillingSettings {
            anchor_day: c.anchor_day,
            timezone: c.timezone.to_string(),
            payment_terms_days: c.payment_terms_days,
            tax_rate: c.tax_pct.map(|p| Decimal::new(p, 2)),
            locale: c.locale.to_string(),
        };
        // Created when the history starts, so billing closes every cycle since.
        fatura
            .create_customer(
                Some(c.id),
                c.name,
                c.currency,
                Billing {
                    prepaid: c.prepaid,
                    monthly_spend_limit: None,
                    settings,
                },
                start,
            )
            .await
            .with_context(|| format!("cannot create the demo customer {}", c.id))?;
        if let Some(plan) = c.plan {
            fatura.assign_plan(c.id, Some(plan), start, now).await?;
        }
    }

    tracing::info!(days = history_days, "seeding the demo: usage history");
    let History {
        mut events,
        outcomes,
    } = history(start_date, history_days, now)?;
    // Prepaid customers paid their history from their wallets, as through the gateway:
    // each call charged at its price, the wallet bought in monthly packs that cover it.
    let mut spent: BTreeMap<(&str, i64), Decimal> = BTreeMap::new();
    for e in &mut events {
        let Some(c) = CUSTOMERS
            .iter()
            .find(|c| c.prepaid && c.id == e.customer_id.as_str())
        else {
            continue;
        };
        if let Some(p) = fatura
            .quote(c.id, &e.provider, &e.model, e.timestamp, &e.usage)
            .await?
        {
            e.prepaid_charge = Some(p.revenue);
            let month = (e.timestamp - start).num_days() / 30;
            *spent.entry((c.id, month)).or_default() += p.revenue;
        }
    }
    for c in CUSTOMERS.iter().filter(|c| c.prepaid) {
        let mut balance = Decimal::ZERO;
        let months = i64::from(history_days) / 30;
        for month in 0..=months {
            let spend = spent.get(&(c.id, month)).copied().unwrap_or_default();
            // Packs of $100, a fifth more than the month used.
            let pack =
                ((spend * Decimal::new(12, 1)) / Decimal::from(100)).ceil() * Decimal::from(100);
            let at = start + chrono::Duration::days(month * 30);
            if pack > Decimal::ZERO && at < now {
                credit(fatura, c.id, pack, at).await?;
                balance += pack;
            }
            balance -= spend;
        }
        let floor = Decimal::from(TOP_UP_USD);
        if balance < floor {
            let top = ((floor - balance) / Decimal::from(100)).ceil() * Decimal::from(100);
            credit(fatura, c.id, top, now).await?;
        }
    }
    let total = events.len();
    let mut rest = events.into_iter().peekable();
    while rest.peek().is_some() {
        let batch: Vec<(usize, UsageEvent)> = rest.by_ref().take(EVENT_BATCH).enumerate().collect();
        fatura
            .record_events(batch, now)
            .await
            .context("cannot record the demo history")?;
    }
    let outcome_count = outcomes.len();
    for chunk in outcomes.chunks(OUTCOME_BATCH) {
        fatura.record_outcomes(chunk.to_vec(), now).await?;
    }
    tracing::info!(
        events = total,
        "seeding the demo: closing past billing cycles"
    );
    let report = fatura.run_billing(now, policy).await?;
    Ok(Seeded {
        events: total,
        outcomes: outcome_count,
        invoices: report.finalized.len(),
    })
}

/// A purchased credit of `amount` USD at `at` (through the service, as the API does).
async fn credit(
    fatura: &Fatura,
    customer_id: &str,
    amount: Decimal,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    fatura
        .add_wallet_credit(
            customer_id,
            CreditRequest {
                amount,
                currency: Currency::Usd,
                kind: CreditKind::Purchased,
                expires_at: None,
            },
            at,
        )
        .await
        .with_context(|| format!("cannot credit the wallet of {customer_id}"))?;
    Ok(())
}

/// Tops up a prepaid wallet whose available balance is low.
async fn top_up_if_low(fatura: &Fatura, customer_id: &str) -> anyhow::Result<()> {
    let view = fatura.wallet_balance(customer_id).await?;
    if view.available() < Decimal::from(LOW_BALANCE_USD) {
        credit(fatura, customer_id, Decimal::from(TOP_UP_USD), Utc::now()).await?;
        tracing::info!(
            customer = customer_id,
            amount = TOP_UP_USD,
            "demo: prepaid wallet topped up"
        );
    }
    Ok(())
}

// ---- the gateway and the live traffic ---------------------------------------------------

/// The gateway of the demo: every model through one OpenRouter-shaped upstream, the mock.
fn gateway_config(mock: SocketAddr, database_url: &str) -> GatewayConfig {
    GatewayConfig {
        upstreams: vec![UpstreamConfig {
            name: "openrouter".into(),
            kind: UpstreamKind::Openrouter,
            base_url: format!("http://{mock}/v1"),
            api_key_env: None,
            provider: None,
            strip_model_prefix: false,
        }],
        routes: vec![RouteConfig {
            models: vec!["*".into()],
            upstreams: vec!["openrouter".into()],
        }],
        spill_path: spill_path(database_url),
        ..GatewayConfig::default()
    }
}

/// The metering spill file: next to the SQLite file, else in the working directory.
fn spill_path(database_url: &str) -> String {
    let path = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .and_then(|p| p.split('?').next());
    match path {
        Some(p) if !p.is_empty() && !p.contains(":memory:") => format!("{p}-spill.jsonl"),
        _ => "fatura-demo-spill.jsonl".into(),
    }
}

/// A customer and its key, for the traffic generator only.
struct LiveCaller {
    customer: &'static DemoCustomer,
    key: String,
}

const WORDS: &[&str] = &[
    "invoice", "customer", "lead", "order", "refund", "shipping", "meeting", "pricing", "contract",
    "renewal", "ticket", "account", "report", "quarter", "pipeline", "discount", "delivery",
    "schedule", "follow", "up", "the", "a", "please", "about", "with", "our",
];

fn text(rng: &mut StdRng, words: u64) -> String {
    (0..words)
        .map(|_| {
            WORDS
                .get(rng.random_range(0..WORDS.len()))
                .copied()
                .unwrap_or("ok")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One live call: the caller's index, the agent and the request body. The mock upstream
/// answers as the body's `mock` field says: a few calls fail (429, 5xx, a stream cut short).
fn live_call(rng: &mut StdRng, callers: &[LiveCaller]) -> Option<(usize, &'static str, Value)> {
    let i = pick(rng, callers.iter().map(|c| c.customer.live_weight));
    let caller = callers.get(i)?;
    let (agent, model) = pick_call(rng, caller.customer)?;
    let stream = rng.random_bool(0.4);
    let prompt_words = rng.random_range(20..=300);
    let completion = rng.random_range(10..=200u64);
    let mut mock = json!({"completion_tokens": completion});
    if has_cache(model) && agent.cached_pct.1 > 0 {
        mock["cached_tokens"] =
            json!(prompt_words * rng.random_range(0..=agent.cached_pct.1) / 100);
    }
    if reasons(model) {
        mock["reasoning_tokens"] = json!(completion * rng.random_range(40..=80) / 100);
    }
    if rng.random_bool(0.03) {
        let statuses = [429, 500, 502, 503];
        mock["status"] = json!(statuses.get(rng.random_range(0..statuses.len())));
    } else if stream && rng.random_bool(0.03) {
        mock["error_after_chunks"] = json!(rng.random_range(1..5));
    }
    let body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": format!("You are the {} agent of {}.", agent.name, caller.customer.name)},
            {"role": "user", "content": text(rng, prompt_words)},
        ],
        "max_tokens": 256,
        "stream": stream,
        "user": format!("end-user-{}", rng.random_range(1..=40)),
        "mock": mock,
    });
    Some((i, agent.name, body))
}

/// Sends `rate` calls per second through the gateway at `base` until `stop` changes.
/// Failures (402, 429, 5xx, cut streams) are part of the show and ignored; a prepaid
/// customer refused for credits gets a top-up.
async fn traffic(
    base: String,
    callers: Vec<LiveCaller>,
    fatura: Arc<Fatura>,
    rate: f64,
    mut stop: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "demo: cannot build the traffic generator's HTTP client");
            return;
        }
    };
    let url = format!("{base}/v1/chat/completions");
    let callers: Arc<[LiveCaller]> = callers.into();
    let in_flight = Arc::new(Semaphore::new(256));
    let top_ups = Arc::new(tokio::sync::Mutex::new(()));
    let mut rng = StdRng::seed_from_u64(rand::random());
    let period = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        // At most 256 calls in flight: beyond, this tick's call is skipped.
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let Some((i, agent, body)) = live_call(&mut rng, &callers) else {
            continue;
        };
        let (client, url, callers, fatura, top_ups) = (
            client.clone(),
            url.clone(),
            callers.clone(),
            fatura.clone(),
            top_ups.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let Some(caller) = callers.get(i) else { return };
            let sent = client
                .post(&url)
                .bearer_auth(&caller.key)
                .header("x-fatura-tag-agent", agent)
                .json(&body)
                .send()
                .await;
            let Ok(response) = sent else { return };
            let status = response.status();
            // Read the whole answer (a stream to its end) as a client would.
            let _ = response.bytes().await;
            if status == reqwest::StatusCode::PAYMENT_REQUIRED && caller.customer.prepaid {
                let _guard = top_ups.lock().await;
                if let Err(e) = top_up_if_low(&fatura, caller.customer.id).await {
                    tracing::warn!(error = %e, "demo: cannot top up a prepaid wallet");
                }
            }
        });
    }
}

/// Where a browser or the traffic generator reaches a server listening on `addr`.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

// ---- the command --------------------------------------------------------------------------

/// `fatura demo`.
pub async fn run(config: &Config, args: DemoArgs) -> anyhow::Result<()> {
    let admin_key = match args.admin_key.clone().or_else(|| config.admin_key.clone()) {
        Some(k) if k.len() < MIN_ADMIN_KEY_LEN => {
            bail!("the admin key must be at least {MIN_ADMIN_KEY_LEN} characters")
        }
        Some(k) => k,
        None => format!("demo-admin-{:032x}", rand::random::<u128>()),
    };
    // Demo invoices are never collected: no payment processor, whatever the environment.
    let config = &Config {
        stripe: None,
        ..config.clone()
    };
    let database = redact_url(&config.database_url);
    let fatura = crate::open(config).await?;

    let mock_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot start the mock upstream on 127.0.0.1")?;
    let mock_addr = mock_listener.local_addr()?;
    let (stop_mock, mock_stopped) = tokio::sync::oneshot::channel::<()>();
    let mock = tokio::spawn(serve_mock(
        mock_listener,
        MockConfig {
            flavor: Flavor::OpenRouter,
            latency: Duration::from_millis(40),
            chunk_delay: Duration::from_millis(3),
            completion_tokens: 60,
            ..MockConfig::default()
        },
        async move {
            let _ = mock_stopped.await;
        },
    ));
    tracing::info!(addr = %mock_addr, "demo: mock upstream listening");

    let server = crate::build_server(
        config,
        &admin_key,
        fatura.clone(),
        Some(gateway_config(mock_addr, &config.database_url)),
    )
    .await?;
    let now = Utc::now();
    if demo_present(&fatura, &database).await? {
        println!("Reusing the demo data in {database}");
    } else {
        let policy = BillingPolicy {
            grace: config.billing_grace,
        };
        let s = seed(&fatura, args.history_days, policy, now).await?;
        println!(
            "Seeded {database}: {} customers (USD and BRL, prepaid and postpaid), {} plans, \
             {} calls over the last {} days, {} outcomes, {} invoices",
            CUSTOMERS.len(),
            plans(now).len(),
            s.events,
            args.history_days,
            s.outcomes,
            s.invoices
        );
    }
    // Fresh keys at every start, kept in memory for the traffic generator only.
    let mut callers = Vec::with_capacity(CUSTOMERS.len());
    for c in CUSTOMERS {
        if c.prepaid {
            top_up_if_low(&fatura, c.id).await?;
        }
        if !args.no_traffic {
            let key = fatura.create_api_key(c.id, now).await?;
            callers.push(LiveCaller {
                customer: c,
                key: key.key,
            });
        }
    }

    let url = reachable(server.addr);
    let (stop_tx, stop_rx) = watch::channel(false);
    let generator = (!args.no_traffic).then(|| {
        tokio::spawn(traffic(
            format!("http://{url}"),
            callers,
            fatura.clone(),
            args.rate,
            stop_rx,
        ))
    });
    println!("fatura demo is running");
    println!("Dashboard: http://{url}/dashboard");
    println!("Customer portal: http://{url}/portal");
    println!("Admin key: {admin_key}");
    if args.no_traffic {
        println!("Live traffic: off (--no-traffic)");
    } else {
        println!(
            "Live traffic: {} calls/s through the gateway to a mock upstream",
            args.rate
        );
    }
    println!("API: http://{url}/v1 (Authorization: Bearer <admin key>). Ctrl-C stops.");
    println!(
        "The portal signs in with a customer API key: create one with \
         curl -s -X POST http://{url}/v1/customers/{}/keys -H 'Authorization: Bearer <admin key>'",
        CUSTOMERS.first().map_or("acme-ai", |c| c.id)
    );

    let served = server
        .run(async move {
            crate::shutdown_signal().await;
            // The generator stops first; the server then finishes the calls in flight.
            let _ = stop_tx.send(true);
        })
        .await;
    if let Some(t) = generator
        && let Err(e) = t.await
    {
        tracing::warn!(error = %e, "demo: the traffic generator failed");
    }
    let _ = stop_mock.send(());
    match mock.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "demo: the mock upstream failed"),
        Err(e) => tracing::warn!(error = %e, "demo: the mock upstream failed"),
    }
    served
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn history_is_deterministic_and_shaped() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let start = NaiveDate::from_ymd_opt(2026, 8, 26).unwrap();
        let a = history(start, 90, now).unwrap();
        let b = history(start, 90, now).unwrap();
        assert_eq!(a.events.len(), b.events.len());
        assert!(a.events.iter().zip(&b.events).all(|(x, y)| x == y));
        assert!(a.events.iter().all(|e| e.timestamp < now));
        assert!(!a.outcomes.is_empty());
        // Every model is in the shipped catalog.
        let catalog = String::from_utf8_lossy(CATALOG);
        for e in &a.events {
            assert!(catalog.contains(&format!("\"{}\"", e.model)), "{}", e.model);
        }
        // Upward trend: the last four weeks carry more calls than the first four.
        let first = start.and_hms_opt(0, 0, 0).unwrap().and_utc() + chrono::Duration::days(28);
        let last = now - chrono::Duration::days(28);
        let early = a.events.iter().filter(|e| e.timestamp < first).count();
        let late = a.events.iter().filter(|e| e.timestamp >= last).count();
        assert!(late > early * 3 / 2, "{early} then {late}");
        // Weekly season: Sundays are quieter than Wednesdays.
        let on = |wd: chrono::Weekday| {
            a.events
                .iter()
                .filter(|e| e.timestamp.weekday() == wd)
                .count()
        };
        assert!(on(chrono::Weekday::Sun) * 2 < on(chrono::Weekday::Wed));
    }

    #[test]
    fn spill_file_sits_next_to_the_database() {
        assert_eq!(
            spill_path("sqlite:///tmp/x/d.db"),
            "/tmp/x/d.db-spill.jsonl"
        );
        assert_eq!(
            spill_path("sqlite://fatura-demo.db?mode=rwc"),
            "fatura-demo.db-spill.jsonl"
        );
        assert_eq!(spill_path("postgres://u@h/db"), "fatura-demo-spill.jsonl");
    }

    #[test]
    fn rate_must_be_positive() {
        assert!(parse_rate("2").is_ok());
        assert!(parse_rate("0.5").is_ok());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("NaN").is_err());
    }
}
