//! Exact money.
//!
//! Amounts are [`rust_decimal::Decimal`]s (96-bit mantissa, up to 28 decimal places),
//! never binary floats. Two precisions exist and each has exactly one rounding function:
//!
//! * **Ledger precision** ([`LEDGER_SCALE`] = 18 decimal places): per-event costs and
//!   provisional prices. Costs are exact products of integer token counts and per-token
//!   prices (which have at most 18 decimal places), so they are never rounded; a price
//!   derived by division (cost-plus) is rounded once, by [`round_ledger`].
//! * **Minor units** (cents for USD/BRL/EUR): what is invoiced and paid. The only
//!   function that rounds to minor units is [`Money::round_to_minor`].
//!
//! Rule, for both: **round half to even** (banker's rounding, IEEE 754
//! `roundTiesToEven`), so that rounding errors do not drift in one direction when many
//! amounts are summed.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// Decimal places kept for per-event ledger amounts and per-token prices.
pub const LEDGER_SCALE: u32 = 18;

/// The single rounding rule of fatura: half to even.
pub const ROUNDING: RoundingStrategy = RoundingStrategy::MidpointNearestEven;

/// Rounds a ledger amount (cost, provisional price) to [`LEDGER_SCALE`] places, half to even,
/// and drops trailing zeros so equal amounts have one textual form.
pub fn round_ledger(amount: Decimal) -> Decimal {
    amount
        .round_dp_with_strategy(LEDGER_SCALE, ROUNDING)
        .normalize()
}

/// Errors from money arithmetic and parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Two amounts of different currencies were combined.
    #[error("currency mismatch: {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    /// The currency code is not one fatura supports.
    #[error("unsupported currency {0:?}: expected one of USD, BRL, EUR")]
    UnknownCurrency(String),
    /// An arithmetic result does not fit a decimal.
    #[error("amount overflow")]
    Overflow,
    /// An exact result would need more than 28 significant digits, so it would have been
    /// rounded silently; fatura refuses instead.
    #[error("amount cannot be represented exactly (more than 28 significant digits)")]
    Inexact,
    /// A margin rate outside `[0, 1)`.
    #[error("margin must be at least 0 and less than 1, got {0}")]
    BadMargin(Decimal),
}

/// Adds two decimals, failing instead of rounding when the exact sum does not fit in 28
/// significant digits (`rust_decimal` would otherwise round silently). Amounts below
/// 10^10 with at most 18 decimal places always add exactly.
pub fn exact_add(a: Decimal, b: Decimal) -> Result<Decimal, MoneyError> {
    let sum = a.checked_add(b).ok_or(MoneyError::Overflow)?;
    // rust_decimal keeps the larger scale of its operands unless the mantissa overflows, in
    // which case it drops (rounds away) trailing digits: a smaller scale means digits lost.
    if sum.scale() < a.normalize().scale().max(b.normalize().scale()) {
        return Err(MoneyError::Inexact);
    }
    Ok(sum)
}

/// An ISO 4217 currency fatura can bill in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Currency {
    /// US dollar; upstream costs are always in USD.
    Usd,
    /// Brazilian real.
    Brl,
    /// Euro.
    Eur,
}

impl Currency {
    /// All supported currencies.
    pub const ALL: [Currency; 3] = [Currency::Usd, Currency::Brl, Currency::Eur];

    /// The ISO 4217 alphabetic code.
    pub fn code(self) -> &'static str {
        match self {
            Currency::Usd => "USD",
            Currency::Brl => "BRL",
            Currency::Eur => "EUR",
        }
    }

    /// Number of decimal places of the currency's minor unit (ISO 4217 exponent).
    pub fn minor_units(self) -> u32 {
        match self {
            Currency::Usd | Currency::Brl | Currency::Eur => 2,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "USD" => Ok(Currency::Usd),
            "BRL" => Ok(Currency::Brl),
            "EUR" => Ok(Currency::Eur),
            other => Err(MoneyError::UnknownCurrency(other.to_string())),
        }
    }
}

/// An amount in one currency. Fields are private: arithmetic across currencies returns
/// an error instead of silently mixing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// An amount in `currency`, kept at the precision given (not rounded).
    pub fn new(amount: Decimal, currency: Currency) -> Self {
        Money { amount, currency }
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Money::new(Decimal::ZERO, currency)
    }

    /// The amount.
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// Sum of two amounts of the same currency.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount = exact_add(self.amount, other.amount)?;
        Ok(Money::new(amount, self.currency))
    }

    /// Difference of two amounts of the same currency.
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount = exact_add(self.amount, -other.amount)?;
        Ok(Money::new(amount, self.currency))
    }

    /// The amount multiplied by a plain quantity (no currency).
    pub fn checked_mul(self, factor: Decimal) -> Result<Money, MoneyError> {
        let amount = self
            .amount
            .checked_mul(factor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// Rounds to the currency's minor unit, **half to even**. This is the only place in
    /// fatura where amounts are rounded to minor units.
    pub fn round_to_minor(self) -> Money {
        let mut amount = self
            .amount
            .round_dp_with_strategy(self.currency.minor_units(), ROUNDING);
        // Pad to the minor unit's decimals (`10` → `10.00`): one textual form per amount.
        amount.rescale(self.currency.minor_units());
        Money::new(amount, self.currency)
    }

    /// The amount as an integer count of minor units (cents), after rounding.
    pub fn to_minor_units(self) -> Result<i64, MoneyError> {
        let rounded = self.round_to_minor().amount;
        let scaled = rounded
            .checked_mul(Decimal::from(10_i64.pow(self.currency.minor_units())))
            .ok_or(MoneyError::Overflow)?;
        i64::try_from(scaled).map_err(|_| MoneyError::Overflow)
    }

    fn same_currency(&self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(self.currency, other.currency))
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// A gross margin rate `m` in `[0, 1)`: price = cost / (1 − m).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MarginRate(Decimal);

impl MarginRate {
    /// fatura's default margin floor: 87% gross margin.
    pub fn default_floor() -> Self {
        MarginRate(Decimal::new(87, 2))
    }

    /// Parses a margin, rejecting values outside `[0, 1)`.
    pub fn new(rate: Decimal) -> Result<Self, MoneyError> {
        if rate >= Decimal::ZERO && rate < Decimal::ONE {
            Ok(MarginRate(rate))
        } else {
            Err(MoneyError::BadMargin(rate))
        }
    }

    /// The rate as a decimal fraction.
    pub fn value(self) -> Decimal {
        self.0
    }

    /// The cost-plus price that yields exactly this gross margin on `cost`, rounded to
    /// ledger precision: `cost / (1 − m)`.
    pub fn price_for_cost(self, cost: Decimal) -> Result<Decimal, MoneyError> {
        let divisor = Decimal::ONE - self.0;
        cost.checked_div(divisor)
            .map(round_ledger)
            .ok_or(MoneyError::Overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_default()
    }

    #[test]
    fn rounds_half_to_even_at_minor_units() {
        let cases = [
            ("0.125", "0.12"),
            ("0.135", "0.14"),
            ("0.145", "0.14"),
            ("-0.125", "-0.12"),
            ("2.5051", "2.51"),
        ];
        for (input, want) in cases {
            let got = Money::new(d(input), Currency::Brl).round_to_minor();
            assert_eq!(got.amount(), d(want), "{input}");
        }
    }

    #[test]
    fn adding_different_currencies_is_an_error() {
        let a = Money::new(d("1"), Currency::Usd);
        let b = Money::new(d("1"), Currency::Brl);
        assert_eq!(
            a.checked_add(b),
            Err(MoneyError::CurrencyMismatch(Currency::Usd, Currency::Brl))
        );
    }

    #[test]
    fn currency_codes_round_trip_and_reject_unknown() {
        for c in Currency::ALL {
            assert_eq!(Currency::from_str(c.code()), Ok(c));
        }
        assert!(Currency::from_str("usd").is_err());
        assert!(Currency::from_str("JPY").is_err());
    }

    #[test]
    fn default_margin_price_is_cost_over_point_thirteen() {
        let m = MarginRate::default_floor();
        assert_eq!(m.price_for_cost(d("0.13")).ok(), Some(d("1")));
        // 1/0.13 = 7.692307692307692307692..., kept to 18 places, half even.
        assert_eq!(
            m.price_for_cost(d("1")).ok(),
            Some(d("7.692307692307692308"))
        );
    }

    #[test]
    fn margin_outside_unit_interval_is_rejected() {
        assert!(MarginRate::new(d("1")).is_err());
        assert!(MarginRate::new(d("-0.1")).is_err());
        assert!(MarginRate::new(d("0")).is_ok());
    }

    /// Amounts in the exact domain: below 10^10, up to 18 decimals, signed.
    fn amount() -> impl Strategy<Value = Decimal> {
        (any::<i64>(), 0u32..=18).prop_map(|(m, s)| {
            let bound = 10_i64.checked_pow(10 + s).unwrap_or(i64::MAX);
            Decimal::new(m % bound, s)
        })
    }

    #[test]
    fn sums_that_would_be_rounded_are_refused() {
        let big = Money::new(d("792281625142644"), Currency::Usd);
        let tiny = Money::new(d("-0.00000000000000001"), Currency::Usd);
        assert_eq!(big.checked_add(tiny), Err(MoneyError::Inexact));
    }

    proptest! {
        #[test]
        fn minor_rounding_is_within_half_a_cent(a in amount()) {
            let m = Money::new(a, Currency::Usd);
            let r = m.round_to_minor();
            prop_assert!((r.amount() - a).abs() <= d("0.005"));
            prop_assert!(r.amount().scale() <= 2);
            // Idempotent.
            prop_assert_eq!(r.round_to_minor(), r);
        }

        #[test]
        fn addition_is_exact_and_commutative(a in amount(), b in amount()) {
            let x = Money::new(a, Currency::Eur);
            let y = Money::new(b, Currency::Eur);
            let s1 = x.checked_add(y);
            let s2 = y.checked_add(x);
            prop_assert_eq!(s1.clone(), s2);
            if let Ok(s) = s1 {
                prop_assert_eq!(s.checked_sub(y).map(|v| v.amount()), Ok(a));
            }
        }

        #[test]
        fn cost_plus_price_keeps_the_margin(cost in (0i64..1_000_000_000_000, 0u32..=12).prop_map(|(m, s)| Decimal::new(m, s)),
                                            pct in 0u32..99) {
            let margin = MarginRate::new(Decimal::new(i64::from(pct), 2)).unwrap_or_else(|_| MarginRate::default_floor());
            let price = margin.price_for_cost(cost);
            prop_assert!(price.is_ok());
            let price = price.unwrap_or_default();
            prop_assert!(price >= cost);
            // The realised margin differs from the target only by the rounding of the
            // price's last digit (18 places, fewer when 28 significant digits bind).
            let implied_cost = price * (Decimal::ONE - margin.value());
            prop_assert!(price.scale() <= LEDGER_SCALE);
            prop_assert!((implied_cost - cost).abs() <= Decimal::new(1, price.scale()));
        }

        #[test]
        fn minor_units_of_rounded_amount_match(a in amount()) {
            let m = Money::new(a, Currency::Brl);
            if let Ok(cents) = m.to_minor_units() {
                prop_assert_eq!(Decimal::new(cents, 2), m.round_to_minor().amount());
            }
        }
    }
}
