#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::catalog::{PriceComponents, UnitPrice};
use crate::costing::cost_usage;
use chrono::TimeZone;
use proptest::prelude::*;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn t(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
}

/// Catalog prices per token: (model, prompt, completion, cache read).
const MODELS: [(&str, &str, &str, &str); 3] = [
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
];

fn prices(model: &str) -> PriceComponents {
    let (_, p, c, r) = MODELS.iter().find(|m| m.0 == model).unwrap();
    PriceComponents {
        prompt: UnitPrice::parse(p).unwrap(),
        completion: UnitPrice::parse(c).unwrap(),
        cache_read: Some(UnitPrice::parse(r).unwrap()),
        ..Default::default()
    }
}

fn ev(
    id: &str,
    at: DateTime<Utc>,
    model: &str,
    input: u64,
    output: u64,
    cached: u64,
) -> RatableEvent {
    let usage = TokenUsage::new(input, output, cached, 0, 0, 1).unwrap();
    RatableEvent {
        id: id.into(),
        timestamp: at,
        provider: "openrouter".into(),
        model: model.into(),
        usage,
        cost: Some(cost_usage(&usage, &prices(model)).unwrap()),
    }
}

fn cost_plus(margin: &str) -> PlanTerms {
    PlanTerms {
        margin: Some(d(margin)),
        ..PlanTerms::default_for(Currency::Usd, MarginRate::default_floor())
    }
}

fn list(prompt: &str, completion: &str) -> PlanTerms {
    PlanTerms {
        kind: PlanKind::List,
        margin: None,
        list_prices: vec![ListPrice {
            pattern: "*".into(),
            prompt: d(prompt),
            completion: d(completion),
            cached: None,
            reasoning: None,
            per_request: Decimal::ZERO,
        }],
        ..PlanTerms::default_for(Currency::Usd, MarginRate::default_floor())
    }
}

fn segment(terms: PlanTerms) -> Segment {
    Segment {
        from: t(1, 0),
        to: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        plan_id: Some("plan_x".into()),
        plan_version: Some(1),
        terms,
        cycle_fraction: Decimal::ONE,
    }
}

#[test]
fn patterns_match_with_stars_only() {
    assert!(pattern_matches("*", "anything"));
    assert!(pattern_matches("openai/*", "openai/gpt-4o"));
    assert!(!pattern_matches("openai/*", "anthropic/claude"));
    assert!(pattern_matches("*claude*", "anthropic/claude-sonnet-4"));
    assert!(pattern_matches("openai/gpt-4o", "openai/gpt-4o"));
    assert!(!pattern_matches("openai/gpt-4o", "openai/gpt-4o-mini"));
    assert!(pattern_matches("a*b*c", "aXbYc"));
    assert!(!pattern_matches("a*b*c", "aXcYb"));
    assert!(!pattern_matches("ab*ba", "aba")); // prefix and suffix must not overlap
    assert!(pattern_matches("*-mini", "openai/gpt-4o-mini"));
}

#[test]
fn validation_rejects_incoherent_plans() {
    let bad = |f: &dyn Fn(&mut PlanTerms), field: &str| {
        let mut p = cost_plus("0.9");
        f(&mut p);
        let e = p.validate().unwrap_err();
        assert!(e.field.starts_with(field), "{e}");
    };
    bad(&|p| p.margin = Some(d("0.5")), "margin");
    bad(&|p| p.margin = Some(d("1")), "margin");
    bad(&|p| p.margin = None, "margin");
    bad(&|p| p.margin_floor = d("1.2"), "margin_floor");
    bad(&|p| p.included_credits = d("-1"), "included_credits");
    bad(&|p| p.monthly_minimum = d("0.001"), "monthly_minimum");
    bad(
        &|p| {
            p.model_margins = vec![ModelMargin {
                pattern: "x*".into(),
                margin: d("0.8"),
            }]
        },
        "model_margins[0].margin",
    );
    let tiers = |v: Vec<(Option<&str>, &str)>| Tiers {
        metric: TierMetric::Tokens,
        mode: TierMode::Graduated,
        tiers: v
            .into_iter()
            .map(|(u, dd)| Tier {
                up_to: u.map(d),
                discount: d(dd),
            })
            .collect(),
    };
    bad(
        &|p| p.tiers = Some(tiers(vec![(Some("10"), "0")])),
        "tiers.tiers[0].up_to",
    );
    bad(
        &|p| p.tiers = Some(tiers(vec![(Some("10"), "0.1"), (None, "0.05")])),
        "tiers.tiers[1].discount",
    );
    bad(
        &|p| {
            p.tiers = Some(tiers(vec![
                (Some("10"), "0"),
                (Some("5"), "0.1"),
                (None, "0.2"),
            ]))
        },
        "tiers.tiers[1].up_to",
    );
    bad(
        &|p| p.tiers = Some(tiers(vec![(None, "1")])),
        "tiers.tiers[0].discount",
    );
    let mut l = list("1", "2");
    l.list_prices[0].pattern = String::new();
    assert_eq!(l.validate().unwrap_err().field, "list_prices[0].pattern");
    let mut l = list("1", "2");
    l.margin = Some(d("0.9"));
    assert_eq!(l.validate().unwrap_err().field, "margin");
    assert!(list("1", "2").validate().is_ok());
    assert!(cost_plus("0.9").validate().is_ok());
}

#[test]
fn cost_plus_line_by_hand() {
    // 1,000,000 prompt tokens of gpt-4o at $2.50/M = $2.50 and 100,000 completion tokens
    // at $10/M = $1.00: cost $3.50. Margin 0.9: price = 3.50 / 0.1 = $35.00.
    let s = rate_segment(
        &segment(cost_plus("0.9")),
        Decimal::ONE,
        &[ev("e1", t(2, 0), "openai/gpt-4o", 1_000_000, 100_000, 0)],
    )
    .unwrap();
    let l = &s.lines[0];
    assert_eq!(l.cost_usd, d("3.5"));
    assert_eq!(l.amount, d("35.00"));
    assert_eq!(l.floor_applied, None);
    assert_eq!(s.total, d("35.00"));
}

#[test]
fn list_price_under_floor_is_raised() {
    // List: $20/M prompt, $80/M completion. 1M prompt + 100k completion = 20 + 8 = $28.
    // Cost $3.50; floor 0.87: 3.50 / 0.13 = 26.923076923…: the list price is above it.
    let events = [ev("e1", t(2, 0), "openai/gpt-4o", 1_000_000, 100_000, 0)];
    let s = rate_segment(&segment(list("20", "80")), Decimal::ONE, &events).unwrap();
    assert_eq!(s.lines[0].amount, d("28.00"));
    assert_eq!(s.lines[0].floor_applied, None);
    // List: $15/M and $60/M → 15 + 6 = $21 < 26.92: raised to the floor, $26.92.
    let s = rate_segment(&segment(list("15", "60")), Decimal::ONE, &events).unwrap();
    let l = &s.lines[0];
    assert_eq!(l.floor_applied, Some(FloorReason::ListPriceBelowFloor));
    assert_eq!(l.subtotal, d("21.00"));
    assert_eq!(l.amount, d("26.92"));
    assert_eq!(l.floor_adjustment, d("5.92"));
}

#[test]
fn graduated_token_tiers_by_hand() {
    // Tiers on tokens: first 1M at full price, next 1M 10% off, beyond 20% off.
    let mut terms = cost_plus("0.9");
    terms.tiers = Some(Tiers {
        metric: TierMetric::Tokens,
        mode: TierMode::Graduated,
        tiers: vec![
            Tier {
                up_to: Some(d("1000000")),
                discount: d("0"),
            },
            Tier {
                up_to: Some(d("2000000")),
                discount: d("0.1"),
            },
            Tier {
                up_to: None,
                discount: d("0.2"),
            },
        ],
    });
    // 2.5M prompt tokens of gpt-4o-mini: cost 2.5M × 0.00000015 = $0.375, price /0.1 = $3.75,
    // i.e. $1.50 per 1M tokens. Tier 1: 1M → 0 off; tier 2: 1M → 0.15 off; tier 3: 0.5M →
    // 0.75 × 0.2 = 0.15 off. Discount 0.30, amount 3.45. Floor: 0.375 / 0.13 = 2.8846…
    let s = rate_segment(
        &segment(terms),
        Decimal::ONE,
        &[ev("e1", t(2, 0), "openai/gpt-4o-mini", 2_500_000, 0, 0)],
    )
    .unwrap();
    assert_eq!(s.lines[0].tier_discount_exact, d("0.3"));
    assert_eq!(s.lines[0].amount, d("3.45"));
    assert_eq!(s.tiers[1].units, d("1000000"));
    assert_eq!(s.tiers[2].units, d("500000"));
}

#[test]
fn volume_mode_applies_reached_tier_to_all_units_but_never_crosses_floor() {
    let mut terms = cost_plus("0.9");
    terms.tiers = Some(Tiers {
        metric: TierMetric::Spend,
        mode: TierMode::Volume,
        tiers: vec![
            Tier {
                up_to: Some(d("10")),
                discount: d("0"),
            },
            Tier {
                up_to: None,
                discount: d("0.5"),
            },
        ],
    });
    // Spend $35 (see cost_plus_line_by_hand) reaches tier 2: 50% off → 17.50, but the
    // floor is 3.50 / 0.13 = 26.923…: the line stays at the floor, $26.92.
    let s = rate_segment(
        &segment(terms),
        Decimal::ONE,
        &[ev("e1", t(2, 0), "openai/gpt-4o", 1_000_000, 100_000, 0)],
    )
    .unwrap();
    let l = &s.lines[0];
    assert_eq!(l.floor_applied, Some(FloorReason::TierDiscount));
    assert_eq!(l.amount, d("26.92"));
    assert_eq!(l.discount, d("8.08"));
}

#[test]
fn credits_and_minimum() {
    let mut terms = cost_plus("0.9");
    terms.included_credits = d("10");
    terms.monthly_minimum = d("50");
    let events = [ev("e1", t(2, 0), "openai/gpt-4o", 1_000_000, 100_000, 0)];
    let s = rate_segment(&segment(terms.clone()), Decimal::ONE, &events).unwrap();
    // 35 − 10 credits = 25, raised to the 50 minimum.
    assert_eq!(s.included_credits_applied, d("10"));
    assert_eq!(s.minimum_adjustment, d("25"));
    assert_eq!(s.total, d("50"));
    // Half a cycle: credits 5, minimum 25 → 35 − 5 = 30 ≥ 25.
    let mut half = segment(terms);
    half.cycle_fraction = d("0.5");
    let s = rate_segment(&half, Decimal::ONE, &events).unwrap();
    assert_eq!(s.total, d("30.00"));
}

#[test]
fn brl_converts_exact_usd_once() {
    // cost 3.50 USD, margin 0.9 → 35 USD exactly; at 5.3337 BRL/USD → 186.6795 → R$ 186.68.
    let mut terms = cost_plus("0.9");
    terms.currency = Currency::Brl;
    let s = rate_segment(
        &segment(terms),
        d("5.3337"),
        &[ev("e1", t(2, 0), "openai/gpt-4o", 1_000_000, 100_000, 0)],
    )
    .unwrap();
    assert_eq!(s.lines[0].amount_exact, d("186.6795"));
    assert_eq!(s.lines[0].amount, d("186.68"));
}

#[test]
fn segments_split_at_assignment_and_version_changes() {
    let default = PlanTerms::default_for(Currency::Usd, MarginRate::default_floor());
    let from = t(1, 0);
    let to = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let assignments = vec![Assignment {
        effective_from: t(16, 0),
        plan_id: Some("p".into()),
    }];
    let versions = vec![
        PlanVersionTerms {
            plan_id: "p".into(),
            version: 1,
            effective_from: t(1, 0),
            terms: cost_plus("0.9"),
        },
        PlanVersionTerms {
            plan_id: "p".into(),
            version: 2,
            effective_from: t(21, 0),
            terms: cost_plus("0.95"),
        },
    ];
    let s = plan_segments(from, to, &assignments, &versions, &default);
    assert_eq!(s.len(), 3);
    assert_eq!((s[0].plan_id.as_deref(), s[0].to), (None, t(16, 0)));
    assert_eq!((s[1].plan_version, s[1].to), (Some(1), t(21, 0)));
    assert_eq!((s[2].plan_version, s[2].to), (Some(2), to));
    // 15 of 30 days, 5 days, 10 days.
    assert_eq!(s[0].cycle_fraction, d("0.5"));
    assert_eq!(
        s.iter().map(|s| s.cycle_fraction).sum::<Decimal>(),
        Decimal::ONE
    );
}

#[test]
fn fx_rate_is_latest_on_or_before() {
    let rates = vec![
        (NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(), d("5.1")),
        (NaiveDate::from_ymd_opt(2026, 11, 10).unwrap(), d("5.2")),
    ];
    let day = |n| NaiveDate::from_ymd_opt(2026, 11, n).unwrap();
    assert_eq!(fx_rate_on(Currency::Brl, &rates, day(9)).unwrap(), d("5.1"));
    assert_eq!(
        fx_rate_on(Currency::Brl, &rates, day(10)).unwrap(),
        d("5.2")
    );
    assert!(
        fx_rate_on(
            Currency::Brl,
            &rates,
            NaiveDate::from_ymd_opt(2026, 10, 31).unwrap()
        )
        .is_err()
    );
    assert_eq!(
        fx_rate_on(Currency::Usd, &[], day(1)).unwrap(),
        Decimal::ONE
    );
}

// ---- properties ---------------------------------------------------------------------------

fn arb_event() -> impl Strategy<Value = (usize, u64, u64, u64, u32)> {
    (
        0..MODELS.len(),
        0u64..3_000_000,
        0u64..500_000,
        0u64..100,
        0u32..720,
    )
}

fn build(spec: &[(usize, u64, u64, u64, u32)]) -> Vec<RatableEvent> {
    spec.iter()
        .enumerate()
        .map(|(i, (m, input, output, cached_pct, minute))| {
            let cached = input * cached_pct / 100;
            ev(
                &format!("e{i:05}"),
                t(2, 0) + chrono::Duration::minutes(i64::from(*minute)),
                MODELS[*m].0,
                *input,
                *output,
                cached,
            )
        })
        .collect()
}

fn arb_terms() -> impl Strategy<Value = PlanTerms> {
    let tiers = prop_oneof![
        Just(None),
        (
            any::<bool>(),
            any::<bool>(),
            1u64..5_000_000,
            1u64..5_000_000,
            0u32..30,
            0u32..40
        )
            .prop_map(|(tokens, graduated, a, b, d1, d2)| {
                let (lo, hi) = (a.min(b), a.max(b) + 1);
                let scale = if tokens {
                    Decimal::ONE
                } else {
                    Decimal::new(1, 4)
                };
                Some(Tiers {
                    metric: if tokens {
                        TierMetric::Tokens
                    } else {
                        TierMetric::Spend
                    },
                    mode: if graduated {
                        TierMode::Graduated
                    } else {
                        TierMode::Volume
                    },
                    tiers: vec![
                        Tier {
                            up_to: Some((Decimal::from(lo) * scale).round_dp(2)),
                            discount: Decimal::ZERO,
                        },
                        Tier {
                            up_to: Some((Decimal::from(hi) * scale).round_dp(2) + Decimal::ONE),
                            discount: Decimal::new(i64::from(d1), 2),
                        },
                        Tier {
                            up_to: None,
                            discount: Decimal::new(i64::from(d1 + d2), 2),
                        },
                    ],
                })
            }),
    ];
    let kind = prop_oneof![
        (87u32..99).prop_map(|m| cost_plus(&format!("0.{m}"))),
        (1u32..40, 1u32..100).prop_map(|(p, c)| list(&p.to_string(), &c.to_string())),
    ];
    (kind, tiers, 0u32..3000, 0u32..3000, any::<bool>()).prop_map(
        |(mut k, tiers, credits, minimum, brl)| {
            k.tiers = tiers;
            k.included_credits = Decimal::new(i64::from(credits), 2);
            k.monthly_minimum = Decimal::new(i64::from(minimum), 2);
            if brl {
                k.currency = Currency::Brl;
            }
            k
        },
    )
}

fn fx_for(terms: &PlanTerms) -> Decimal {
    if terms.currency == Currency::Usd {
        Decimal::ONE
    } else {
        d("5.4321")
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn lines_add_up_and_no_line_is_under_its_floor(
        terms in arb_terms(),
        spec in prop::collection::vec(arb_event(), 0..40),
    ) {
        prop_assert!(terms.validate().is_ok());
        let fx = fx_for(&terms);
        let s = rate_segment(&segment(terms.clone()), fx, &build(&spec)).unwrap();
        let sum: Decimal = s.lines.iter().map(|l| l.amount).sum();
        prop_assert_eq!(sum, s.usage_total);
        prop_assert_eq!(s.total, s.usage_total - s.included_credits_applied + s.minimum_adjustment);
        for l in &s.lines {
            prop_assert!(l.amount_exact >= l.floor_exact);
            prop_assert!(l.amount >= round_minor(l.floor_exact, terms.currency));
            prop_assert_eq!(l.amount, round_minor(l.amount_exact, terms.currency));
            prop_assert_eq!(l.subtotal - l.discount + l.floor_adjustment, l.amount);
            prop_assert_eq!(l.amount.scale() <= 2, true);
            // The margin on the exact amount is at least the floor.
            if !l.amount_exact.is_zero() {
                let margin = Decimal::ONE - l.cost_usd * fx / l.amount_exact;
                prop_assert!(margin >= terms.margin_floor - Decimal::new(1, 15), "margin {}", margin);
            }
        }
    }

    #[test]
    fn rating_is_deterministic_and_order_independent(
        terms in arb_terms(),
        spec in prop::collection::vec(arb_event(), 0..40),
        seed in any::<u64>(),
    ) {
        let events = build(&spec);
        let mut shuffled = events.clone();
        // A seeded Fisher-Yates shuffle.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let fx = fx_for(&terms);
        let a = rate_segment(&segment(terms.clone()), fx, &events).unwrap();
        let b = rate_segment(&segment(terms.clone()), fx, &shuffled).unwrap();
        let c = rate_segment(&segment(terms), fx, &events).unwrap();
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&a, &c);
    }

    #[test]
    fn graduated_total_is_monotone_in_usage(
        terms in arb_terms(),
        spec in prop::collection::vec(arb_event(), 1..40),
        extra in prop::collection::vec(arb_event(), 1..10),
    ) {
        let mut terms = terms;
        if let Some(t) = &mut terms.tiers {
            t.mode = TierMode::Graduated;
        }
        let fx = fx_for(&terms);
        let fewer = build(&spec);
        let mut all = spec.clone();
        all.extend(extra);
        let more = build(&all);
        let a = rate_segment(&segment(terms.clone()), fx, &fewer).unwrap();
        let b = rate_segment(&segment(terms), fx, &more).unwrap();
        prop_assert!(b.total >= a.total, "fewer units charged {} > more units {}", a.total, b.total);
        prop_assert!(b.usage_total >= a.usage_total);
    }

    #[test]
    fn conversion_rounds_once(cents in 1i64..10_000_000, rate_e4 in 10_000i64..100_000) {
        // A cost-plus line whose exact USD price is `cents`/100 × k: converting it must
        // give round(usd_exact × rate), never round(round(usd) × rate).
        let rate = Decimal::new(rate_e4, 4);
        let usage = TokenUsage::new(0, 0, 0, 0, 0, 1).unwrap();
        let cost = CostBreakdown { requests: Decimal::new(cents, 5), ..Default::default() };
        let e = RatableEvent { id: "e".into(), timestamp: t(2, 0), provider: "p".into(), model: "m".into(), usage, cost: Some(cost.clone()) };
        let mut brl = cost_plus("0.9");
        brl.currency = Currency::Brl;
        let s = rate_segment(&segment(brl), rate, &[e]).unwrap();
        let usd_exact = cost.total() / d("0.1");
        prop_assert_eq!(s.lines[0].amount, round_minor(usd_exact * rate, Currency::Brl));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// An invoice of random usage: its line amounts, credits, minimum and tax add up to its
    /// total exactly, and what is due plus what the wallet paid is the total.
    #[test]
    fn invoice_lines_sum_to_the_total(
        terms in arb_terms(),
        spec in prop::collection::vec(arb_event(), 0..40),
        tax_bp in prop::option::of(0i64..3000),
        charged_cents in 0i64..1_000_000,
    ) {
        let fx = fx_for(&terms);
        let s = rate_segment(&segment(terms.clone()), fx, &build(&spec)).unwrap();
        let t = crate::billing::invoice_totals(
            terms.currency,
            &[s.total],
            tax_bp.map(|b| Decimal::new(b, 4)),
            Decimal::new(charged_cents, 2),
        );
        let lines: Decimal = s.lines.iter().map(|l| l.amount).sum();
        prop_assert_eq!(
            lines - s.included_credits_applied + s.minimum_adjustment + t.tax,
            t.total
        );
        prop_assert_eq!(t.amount_due + t.prepaid_applied, t.total);
        prop_assert_eq!(t.total.scale(), 2);
    }
}
