//! Prepaid wallets as the service offers them: credits (validated, recorded and counted
//! by this process's wallet book in one step) and the balance with its movements.

use chrono::{DateTime, Utc};
use fatura_core::{Currency, Money};
use fatura_store::WalletTransaction;
use rust_decimal::Decimal;

use super::{Fatura, ServiceError, ServiceResult, random_hex};
use crate::wallet::BalanceView;

/// Largest single credit.
const MAX_CREDIT: i64 = 1_000_000_000;

/// Movements per page of a wallet unless asked otherwise.
pub const DEFAULT_PAGE: u32 = 1_000;
/// Largest page of wallet movements.
pub const MAX_PAGE: u32 = 10_000;

/// Why money was credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditKind {
    /// Paid for by the customer.
    Purchased,
    /// Given by the operator.
    Granted,
}

impl CreditKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CreditKind::Purchased => "purchased",
            CreditKind::Granted => "granted",
        }
    }
}

impl From<CreditKind> for fatura_core::status::MovementKind {
    fn from(k: CreditKind) -> Self {
        match k {
            CreditKind::Purchased => fatura_core::status::MovementKind::Purchased,
            CreditKind::Granted => fatura_core::status::MovementKind::Granted,
        }
    }
}

impl std::str::FromStr for CreditKind {
    type Err = ServiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "purchased" => Ok(CreditKind::Purchased),
            "granted" => Ok(CreditKind::Granted),
            _ => Err(invalid("kind", "must be purchased or granted".into())),
        }
    }
}

/// A credit to add to a prepaid wallet.
#[derive(Debug, Clone)]
pub struct CreditRequest {
    /// Positive, at most the currency's minor units.
    pub amount: Decimal,
    /// Must be the customer's currency.
    pub currency: Currency,
    /// Why.
    pub kind: CreditKind,
    /// After this instant the unused rest is forfeited (must be in the future).
    pub expires_at: Option<DateTime<Utc>>,
}

/// A wallet's balance and one page of its movements.
#[derive(Debug, Clone)]
pub struct WalletPage {
    /// The customer.
    pub customer: fatura_store::Customer,
    /// Balance and reservations, in real time.
    pub view: BalanceView,
    /// Committed movements, oldest first.
    pub transactions: Vec<WalletTransaction>,
    /// The id to continue after, when more movements follow.
    pub next_after: Option<String>,
}

fn invalid(field: &str, message: String) -> ServiceError {
    ServiceError::InvalidField {
        code: "invalid_credit",
        field: field.into(),
        message,
    }
}

impl Fatura {
    /// Adds a credit to a customer's wallet: checked, recorded and counted in this process's
    /// balances under the wallet's lock. `now` is when it is recorded.
    pub async fn add_wallet_credit(
        &self,
        customer_id: &str,
        req: CreditRequest,
        now: DateTime<Utc>,
    ) -> ServiceResult<WalletTransaction> {
        let customer = self.customer(customer_id).await?;
        if req.currency != customer.currency {
            return Err(invalid(
                "currency",
                format!(
                    "the wallet of {customer_id:?} is in {}, not {}",
                    customer.currency, req.currency
                ),
            ));
        }
        if req.amount <= Decimal::ZERO || req.amount > Decimal::from(MAX_CREDIT) {
            return Err(invalid(
                "amount",
                format!("must be positive and at most {MAX_CREDIT}"),
            ));
        }
        if Money::new(req.amount, req.currency)
            .round_to_minor()
            .amount()
            != req.amount
        {
            return Err(invalid(
                "amount",
                format!(
                    "{} amounts have at most {} decimal places",
                    req.currency,
                    req.currency.minor_units()
                ),
            ));
        }
        if req.expires_at.is_some_and(|e| e <= now) {
            return Err(invalid("expires_at", "must be in the future".into()));
        }
        let tx = WalletTransaction {
            id: format!("wtx_{}", random_hex(10)),
            customer_id: customer_id.to_string(),
            kind: req.kind.into(),
            amount: req.amount.normalize(),
            currency: req.currency,
            event_id: None,
            expires_at: req.expires_at,
            created_at: now,
        };
        self.wallets().add_credit(&tx).await?;
        Ok(tx)
    }

    /// A customer's balance in real time and up to `limit` (1 to [`MAX_PAGE`]) of its
    /// movements after the movement `after`.
    pub async fn wallet(
        &self,
        customer_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> ServiceResult<WalletPage> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ServiceError::BadQuery(format!(
                "limit: from 1 to {MAX_PAGE}"
            )));
        }
        let customer = self.customer(customer_id).await?;
        // Credits another process recorded (a CLI billing run) count at once.
        self.sync_external_writes().await?;
        let view = self.wallets().view(customer_id).await?;
        // One more than asked for tells whether another page follows.
        let mut transactions = self
            .store()
            .wallet_transactions_page(customer_id, after, limit + 1)
            .await?
            .ok_or_else(|| {
                ServiceError::BadQuery(format!(
                    "after: {customer_id:?}'s wallet has no movement with this id"
                ))
            })?;
        let next_after = if transactions.len() > limit as usize {
            transactions.truncate(limit as usize);
            transactions.last().map(|t| t.id.clone())
        } else {
            None
        };
        Ok(WalletPage {
            customer,
            view,
            transactions,
            next_after,
        })
    }

    /// A wallet's balance and reservations in real time.
    pub async fn wallet_balance(&self, customer_id: &str) -> ServiceResult<BalanceView> {
        Ok(self.wallets().view(customer_id).await?)
    }

    /// A wallet's balance from its committed movements alone (what a restarted process
    /// would load).
    pub async fn stored_wallet_balance(
        &self,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> ServiceResult<Decimal> {
        Ok(crate::wallet::stored_balance(self.store().as_ref(), customer_id, now).await?)
    }
}
