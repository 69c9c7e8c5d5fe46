#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::service::InvoiceDocument;
use crate::service::{DocLine, DocSection, DocTier};
use chrono::TimeZone;
use fatura_core::status::{InvoiceKind, InvoiceStatus};
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[test]
fn money_is_formatted_per_locale() {
    assert_eq!(
        format_money(d("1234.56"), Currency::Brl, Locale::PtBr),
        "R$ 1.234,56"
    );
    assert_eq!(
        format_money(d("1234.56"), Currency::Brl, Locale::En),
        "R$ 1,234.56"
    );
    assert_eq!(
        format_money(d("1234567.5"), Currency::Usd, Locale::En),
        "$1,234,567.50"
    );
    assert_eq!(
        format_money(d("-0.5"), Currency::Eur, Locale::PtBr),
        "-€ 0,50"
    );
    assert_eq!(
        format_money(d("0"), Currency::Usd, Locale::PtBr),
        "US$ 0,00"
    );
    assert_eq!(format_decimal(d("999"), Locale::PtBr), "999");
    assert_eq!(format_decimal(d("1000.125"), Locale::PtBr), "1.000,125");
    let t = Utc.with_ymd_and_hms(2026, 11, 1, 2, 0, 0).unwrap();
    assert_eq!(
        format_date(t, "America/Sao_Paulo", Locale::PtBr),
        "31/10/2026"
    );
    assert_eq!(format_date(t, "UTC", Locale::En), "2026-11-01");
    assert_eq!(
        esc("<a href=\"x\">&'"),
        "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
    );
}

fn sample(locale: &str, currency: Currency) -> (InvoiceRecord, InvoiceDocument) {
    let from = Utc.with_ymd_and_hms(2026, 10, 1, 3, 0, 0).unwrap();
    let to = Utc.with_ymd_and_hms(2026, 11, 1, 3, 0, 0).unwrap();
    let line =
        |model: &str, amount: &str, discount: &str, floor: &str, reason: Option<&str>| DocLine {
            provider: "openrouter".into(),
            model: model.into(),
            events: 1200,
            quantities: crate::service::DocQuantities {
                prompt_tokens: 2_500_000,
                cached_tokens: 500_000,
                completion_tokens: 400_000,
                reasoning_tokens: 0,
                requests: 1200,
            },
            unit_prices: crate::service::DocUnitPrices {
                prompt: Some(d("13.5")),
                cached: Some(d("6.75")),
                completion: Some(d("54")),
                reasoning: None,
                request: None,
            },
            subtotal: d("1234.56"),
            discount: d(discount),
            floor_adjustment: d(floor),
            amount: d(amount),
            floor_applied: reason.map(String::from),
            cost_usd: d("9.87654321"),
        };
    let doc = InvoiceDocument {
        customer_name: "Acme <Ltda> & Cia".into(),
        locale: locale.into(),
        timezone: "America/Sao_Paulo".into(),
        sections: vec![
            DocSection {
                kind: "adjustment".into(),
                from: Utc.with_ymd_and_hms(2026, 9, 1, 3, 0, 0).unwrap(),
                to: from,
                plan_id: Some("growth".into()),
                plan_version: Some(1),
                fx_rate: d("5.3337"),
                lines: vec![line("openai/gpt-4o-mini", "12.34", "0.00", "0.00", None)],
                tiers: vec![],
                usage_total: d("12.34"),
                included_credits_applied: d("0.00"),
                minimum_adjustment: d("0.00"),
                total: d("12.34"),
            },
            DocSection {
                kind: "usage".into(),
                from,
                to,
                plan_id: Some("growth".into()),
                plan_version: Some(2),
                fx_rate: d("5.3337"),
                lines: vec![
                    line("openai/gpt-4o", "1172.33", "62.23", "0.00", None),
                    line(
                        "google/gemini-2.5-flash",
                        "1500.00",
                        "0.00",
                        "265.44",
                        Some("list_price_below_floor"),
                    ),
                ],
                tiers: vec![
                    DocTier {
                        up_to: Some(d("1000000")),
                        discount: d("0"),
                        units: d("1000000"),
                        discount_amount: d("0"),
                    },
                    DocTier {
                        up_to: None,
                        discount: d("0.05"),
                        units: d("2400000"),
                        discount_amount: d("62.23"),
                    },
                ],
                usage_total: d("2672.33"),
                included_credits_applied: d("50.00"),
                minimum_adjustment: d("0.00"),
                total: d("2622.33"),
            },
        ],
        tax_rate: Some(d("0.05")),
        unpriced_events: 3,
        reason: None,
        corrects_number: None,
    };
    let inv = InvoiceRecord {
        id: "inv_0123456789".into(),
        customer_id: "acme".into(),
        kind: InvoiceKind::Invoice,
        number: Some("FAT-2026-000042".into()),
        status: InvoiceStatus::Open,
        period_start: from,
        period_end: to,
        currency,
        subtotal: d("2634.67"),
        tax: d("131.73"),
        total: d("2766.40"),
        prepaid_applied: d("0.00"),
        prepaid_excess: d("0.00"),
        amount_due: d("2766.40"),
        document: String::new(),
        corrects_invoice_id: None,
        events: 3600,
        created_at: to,
        finalized_at: Some(to + chrono::Duration::hours(1)),
        due_at: Some(to + chrono::Duration::days(30)),
        paid_at: None,
        voided_at: None,
        payment_attempts: 0,
        payment_reference: None,
        last_payment_error: None,
    };
    (inv, doc)
}

fn snapshot(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/render/snapshots")
        .join(name);
    if std::env::var("UPDATE_SNAPSHOTS").is_ok() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "snapshot {name} differs (UPDATE_SNAPSHOTS=1 to accept)"
    );
}

#[test]
fn html_invoice_snapshots_en_and_pt_br() {
    let (inv, doc) = sample("en", Currency::Usd);
    let en = invoice_html(&inv, &doc);
    snapshot("invoice.en.html", &en);
    let (inv, doc) = sample("pt-BR", Currency::Brl);
    let pt = invoice_html(&inv, &doc);
    snapshot("invoice.pt-BR.html", &pt);
    assert!(pt.contains("R$ 2.766,40"), "{pt}");
    assert!(pt.contains("Vencimento"));
    assert!(en.contains("$2,766.40"));
    // Operator-only figures never appear; customer text is escaped.
    for html in [&en, &pt] {
        assert!(!html.contains("9.87654321") && !html.contains("9,87654321"));
        assert!(html.contains("Acme &lt;Ltda&gt; &amp; Cia"));
        assert!(!html.contains("<Ltda>"));
    }
}

#[test]
fn csv_invoice_snapshot() {
    let (inv, doc) = sample("pt-BR", Currency::Brl);
    let csv = invoice_csv(&inv, &doc);
    snapshot("invoice.csv", &csv);
    assert_eq!(csv.lines().count(), 4, "a header and three lines");
    assert!(!csv.contains("9.87654321"));
    // The line amounts add up to the sections' usage totals.
    let sum: Decimal = csv
        .lines()
        .skip(1)
        .map(|l| d(l.rsplit(',').next().unwrap()))
        .sum();
    assert_eq!(sum, d("12.34") + d("2672.33"));
}
