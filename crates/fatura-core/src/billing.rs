//! Billing cycles and invoice totals.
//!
//! A customer's cycle is monthly, starting on its anchor day (1–28) at midnight in its time
//! zone. An invoice adds tax to the rated total, then takes off what prepaid customers
//! already paid from their wallet for the same usage. Every amount is in minor units
//! (rounded once, half to even), so the parts add up to the total exactly.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;

use crate::money::{Currency, Money};

/// How a customer's cycles fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleSpec {
    /// Day of the month the cycle starts (1–28, so every month has it).
    pub anchor_day: u32,
    /// Time zone whose midnight starts the cycle.
    pub tz: Tz,
}

impl Default for CycleSpec {
    fn default() -> Self {
        CycleSpec {
            anchor_day: 1,
            tz: Tz::UTC,
        }
    }
}

/// Why a billing setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingError {
    /// Field.
    pub field: &'static str,
    /// Problem.
    pub message: String,
}

impl CycleSpec {
    /// Validates an anchor day and an IANA time zone name.
    pub fn new(anchor_day: u32, tz: &str) -> Result<Self, SettingError> {
        if !(1..=28).contains(&anchor_day) {
            return Err(SettingError {
                field: "billing_anchor_day",
                message: "must be 1 to 28 (a day every month has)".into(),
            });
        }
        let tz: Tz = tz.parse().map_err(|_| SettingError {
            field: "timezone",
            message: format!("unknown IANA time zone {tz:?} (e.g. America/Sao_Paulo, UTC)"),
        })?;
        Ok(CycleSpec { anchor_day, tz })
    }

    /// The UTC instant of local midnight on `(year, month, anchor_day)`. Where midnight
    /// does not exist (a DST gap) the first instant after the gap is used; where it occurs
    /// twice, the first.
    fn start_of(&self, year: i32, month: u32) -> DateTime<Utc> {
        let date = NaiveDate::from_ymd_opt(year, month, self.anchor_day).unwrap_or(NaiveDate::MIN);
        let mut naive = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        for _ in 0..4 {
            match self.tz.from_local_datetime(&naive) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                    return t.with_timezone(&Utc);
                }
                LocalResult::None => naive += chrono::Duration::hours(1),
            }
        }
        Utc.from_utc_datetime(&naive)
    }

    /// The cycle `[start, end)` containing `at`.
    pub fn cycle_containing(&self, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let local = at.with_timezone(&self.tz);
        let (mut y, mut m) = (local.year(), local.month());
        if self.start_of(y, m) > at {
            (y, m) = prev_month(y, m);
        }
        let (ny, nm) = next_month(y, m);
        (self.start_of(y, m), self.start_of(ny, nm))
    }

    /// The cycle after the one starting at `start`.
    pub fn next(&self, start: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let (_, end) = self.cycle_containing(start);
        self.cycle_containing(end)
    }

    /// Every complete cycle that starts at or after the cycle containing `from` and ends at
    /// or before `until`, oldest first (at most `limit`).
    pub fn closed_cycles(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        let mut cycle = self.cycle_containing(from);
        while cycle.1 <= until && out.len() < limit {
            out.push(cycle);
            cycle = self.next(cycle.0);
        }
        out
    }
}

fn prev_month(y: i32, m: u32) -> (i32, u32) {
    if m == 1 { (y - 1, 12) } else { (y, m - 1) }
}

fn next_month(y: i32, m: u32) -> (i32, u32) {
    if m == 12 { (y + 1, 1) } else { (y, m + 1) }
}

/// The money side of an invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceTotals {
    /// Sum of the rated totals (lines, credits, minimums, adjustments).
    pub subtotal: Decimal,
    /// `subtotal × tax_rate`, rounded once.
    pub tax: Decimal,
    /// `subtotal + tax`.
    pub total: Decimal,
    /// What the customer's wallet already paid for this usage, up to the total.
    pub prepaid_applied: Decimal,
    /// What the wallet paid beyond the total (volume discounts known only now): credited
    /// back to the wallet.
    pub prepaid_excess: Decimal,
    /// `total − prepaid_applied`: what is collected.
    pub amount_due: Decimal,
}

fn minor(amount: Decimal, currency: Currency) -> Decimal {
    Money::new(amount, currency).round_to_minor().amount()
}

/// Totals of an invoice whose rated parts (already in minor units) are `parts`, with an
/// optional tax rate (a fraction, e.g. 0.05) and what the wallet was charged for the usage.
pub fn invoice_totals(
    currency: Currency,
    parts: &[Decimal],
    tax_rate: Option<Decimal>,
    prepaid_charged: Decimal,
) -> InvoiceTotals {
    let subtotal = minor(parts.iter().copied().sum(), currency);
    let tax = minor(subtotal * tax_rate.unwrap_or(Decimal::ZERO), currency);
    let total = subtotal + tax;
    let charged = minor(prepaid_charged, currency);
    let prepaid_applied = charged.min(total).max(minor(Decimal::ZERO, currency));
    InvoiceTotals {
        subtotal,
        tax,
        total,
        prepaid_applied,
        prepaid_excess: minor(charged - prepaid_applied, currency),
        amount_due: total - prepaid_applied,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cycles_start_at_local_midnight_on_the_anchor_day() {
        let sp = CycleSpec::new(15, "America/Sao_Paulo").unwrap();
        // São Paulo is UTC−3: the cycle starts at 03:00 UTC on the 15th.
        let (s, e) = sp.cycle_containing(t("2026-11-24T12:00:00Z"));
        assert_eq!(s, t("2026-11-15T03:00:00Z"));
        assert_eq!(e, t("2026-12-15T03:00:00Z"));
        // 02:59 UTC on the 15th is still the 14th in São Paulo: the previous cycle.
        let (s, _) = sp.cycle_containing(t("2026-11-15T02:59:59Z"));
        assert_eq!(s, t("2026-10-15T03:00:00Z"));
        // January wraps the year.
        let (s, e) = CycleSpec::default().cycle_containing(t("2026-12-31T23:59:59Z"));
        assert_eq!(
            (s, e),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
        assert!(CycleSpec::new(29, "UTC").is_err());
        assert!(CycleSpec::new(1, "Mars/Olympus").is_err());
    }

    #[test]
    fn closed_cycles_are_the_complete_ones() {
        let sp = CycleSpec::default();
        let c = sp.closed_cycles(t("2026-09-10T00:00:00Z"), t("2026-11-24T00:00:00Z"), 100);
        assert_eq!(
            c,
            vec![
                (t("2026-09-01T00:00:00Z"), t("2026-10-01T00:00:00Z")),
                (t("2026-10-01T00:00:00Z"), t("2026-11-01T00:00:00Z")),
            ]
        );
    }

    #[test]
    fn totals_by_hand() {
        // 100.00 + 5.55 = 105.55; 5% tax = 5.2775 → 5.28; total 110.83.
        let t = invoice_totals(
            Currency::Brl,
            &[Decimal::new(10000, 2), Decimal::new(555, 2)],
            Some(Decimal::new(5, 2)),
            Decimal::ZERO,
        );
        assert_eq!(t.tax, Decimal::new(528, 2));
        assert_eq!(t.total, Decimal::new(11083, 2));
        assert_eq!(t.amount_due, t.total);
        // A prepaid wallet that paid 120.00 for it: 110.83 applied, 9.17 back.
        let t = invoice_totals(
            Currency::Usd,
            &[Decimal::new(11083, 2)],
            None,
            Decimal::new(120, 0),
        );
        assert_eq!(t.prepaid_applied, Decimal::new(11083, 2));
        assert_eq!(t.prepaid_excess, Decimal::new(917, 2));
        assert_eq!(t.amount_due, Decimal::new(0, 2));
    }

    proptest! {
        #[test]
        fn totals_add_up_exactly(parts in prop::collection::vec(0i64..10_000_000, 0..20),
                                 tax_bp in prop::option::of(0i64..3000),
                                 charged in 0i64..100_000_000_000) {
            let parts: Vec<Decimal> = parts.into_iter().map(|c| Decimal::new(c, 2)).collect();
            let t = invoice_totals(Currency::Usd, &parts, tax_bp.map(|b| Decimal::new(b, 4)),
                                   Decimal::new(charged, 6));
            prop_assert_eq!(t.subtotal, parts.iter().copied().sum::<Decimal>());
            prop_assert_eq!(t.subtotal + t.tax, t.total);
            prop_assert_eq!(t.prepaid_applied + t.amount_due, t.total);
            prop_assert!(t.amount_due >= Decimal::ZERO);
            for v in [t.subtotal, t.tax, t.total, t.prepaid_applied, t.prepaid_excess, t.amount_due] {
                prop_assert!(v.scale() == 2, "{} has scale {}", v, v.scale());
            }
        }

        #[test]
        fn consecutive_cycles_tile_time(day in 1u32..=28, offset_days in 0i64..2000) {
            let sp = CycleSpec::new(day, "America/Sao_Paulo").unwrap();
            let at = t("2025-01-01T00:00:00Z") + chrono::Duration::hours(offset_days * 24 + 7);
            let (s, e) = sp.cycle_containing(at);
            prop_assert!(s <= at && at < e);
            let (s2, _) = sp.next(s);
            prop_assert_eq!(s2, e);
        }
    }
}
