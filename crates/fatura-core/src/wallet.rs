//! Prepaid wallets: the balance left from credits and charges.
//!
//! Credits may expire. Charges consume the credit that expires soonest among those still
//! valid at the charge's time (credits without expiry last); what an expired credit still
//! held is forfeited. Charges beyond the available credit are a debt (negative balance),
//! repaid by the next credits. Pure: the caller passes every transaction and "now".

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// One wallet movement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletMovement {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Positive for credits, negative for charges.
    pub amount: Decimal,
    /// When a credit expires.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Balance of a wallet at `now`.
pub fn wallet_balance(movements: &[WalletMovement], now: DateTime<Utc>) -> Decimal {
    let mut sorted: Vec<&WalletMovement> = movements.iter().filter(|m| m.at <= now).collect();
    // Credits before charges at the same instant.
    sorted.sort_by(|a, b| a.at.cmp(&b.at).then(b.amount.cmp(&a.amount)));
    // Open credit buckets: (expires_at, remaining).
    let mut buckets: Vec<(Option<DateTime<Utc>>, Decimal)> = Vec::new();
    let mut debt = Decimal::ZERO;
    for m in sorted {
        buckets.retain(|(exp, rest)| exp.is_none_or(|e| e > m.at) && !rest.is_zero());
        if m.amount.is_sign_positive() {
            // New credit first repays debt.
            let repay = debt.min(m.amount);
            debt -= repay;
            let rest = m.amount - repay;
            if !rest.is_zero() {
                buckets.push((m.expires_at, rest));
            }
        } else {
            let mut due = -m.amount;
            buckets.sort_by(|a, b| match (a.0, b.0) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            });
            for b in buckets.iter_mut() {
                if due.is_zero() {
                    break;
                }
                let take = b.1.min(due);
                b.1 -= take;
                due -= take;
            }
            debt += due;
        }
    }
    let live: Decimal = buckets
        .iter()
        .filter(|(exp, _)| exp.is_none_or(|e| e > now))
        .map(|(_, r)| *r)
        .sum();
    (live - debt).normalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, day, 0, 0, 0)
            .single()
            .unwrap_or_default()
    }
    fn m(day: u32, amount: i64, expires: Option<u32>) -> WalletMovement {
        WalletMovement {
            at: t(day),
            amount: Decimal::new(amount, 2),
            expires_at: expires.map(t),
        }
    }

    #[test]
    fn charges_use_the_soonest_expiring_credit_and_expired_rest_is_forfeited() {
        let moves = vec![
            m(1, 10_000, None),
            m(1, 5_000, Some(10)),
            m(5, -3_000, None),
        ];
        // The 30.00 charge came out of the expiring grant: 20.00 of it is forfeited on day 10.
        assert_eq!(wallet_balance(&moves, t(9)), Decimal::new(12_000, 2));
        assert_eq!(wallet_balance(&moves, t(11)), Decimal::new(10_000, 2));
    }

    #[test]
    fn overdraft_is_debt_repaid_by_the_next_credit() {
        let moves = vec![m(1, 1_000, None), m(2, -1_500, None), m(3, 2_000, Some(20))];
        assert_eq!(wallet_balance(&moves, t(2)), Decimal::new(-500, 2));
        assert_eq!(wallet_balance(&moves, t(4)), Decimal::new(1_500, 2));
    }

    proptest! {
        #[test]
        fn without_expiry_the_balance_is_the_plain_sum(amounts in proptest::collection::vec(-10_000i64..10_000, 0..40)) {
            let moves: Vec<_> = amounts.iter().enumerate().map(|(i, a)| WalletMovement {
                at: t(1) + chrono::Duration::minutes(i as i64), amount: Decimal::new(*a, 2), expires_at: None }).collect();
            let sum: Decimal = moves.iter().map(|m| m.amount).sum();
            prop_assert_eq!(wallet_balance(&moves, t(2)), sum.normalize());
        }

        #[test]
        fn expiry_never_raises_the_balance(amounts in proptest::collection::vec((-5_000i64..10_000, proptest::option::of(2u32..20)), 0..30)) {
            let with: Vec<_> = amounts.iter().enumerate().map(|(i, (a, e))| WalletMovement {
                at: t(1) + chrono::Duration::minutes(i as i64), amount: Decimal::new(*a, 2), expires_at: if *a > 0 { e.map(t) } else { None } }).collect();
            let without: Vec<_> = with.iter().cloned().map(|mut m| { m.expires_at = None; m }).collect();
            prop_assert!(wallet_balance(&with, t(25)) <= wallet_balance(&without, t(25)));
        }
    }
}
