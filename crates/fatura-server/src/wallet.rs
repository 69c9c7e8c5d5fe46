//! Real-time prepaid balances and reservations.
//!
//! The durable record is the database (`wallet_transactions`: credits, and one charge per
//! usage event written in the event's transaction). On top of it this process keeps, per
//! prepaid customer, the balance and the sum of open reservations. A call **reserves** its
//! maximum price under the wallet's lock before it is forwarded (refused when the
//! available balance is short), and **settles** to its actual price when metered (the
//! charge goes to the ledger with the event), releasing the rest; a failed call releases
//! everything. With one process per database (SQLite, or one PostgreSQL instance), no
//! number of concurrent calls can reserve more than the balance. Sharing a wallet across
//! several instances needs reservations in PostgreSQL itself (the fleet issue).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use fatura_core::wallet::{WalletMovement, wallet_balance};
use fatura_store::{Store, StoreError};
use rust_decimal::Decimal;
use tokio::sync::Mutex;

#[derive(Debug, Default)]
struct WalletState {
    loaded: bool,
    balance: Decimal,
    reserved: Decimal,
    /// Postpaid spend limits: the UTC month `spent` belongs to, and the provisional price
    /// of the customer's calls in it.
    month: Option<(i32, u32)>,
    spent: Decimal,
}

/// An open reservation; settle or release it exactly once.
#[derive(Debug)]
pub struct Reservation {
    customer_id: String,
    amount: Decimal,
}

impl Reservation {
    /// The reserved amount.
    pub fn amount(&self) -> Decimal {
        self.amount
    }
}

/// A balance view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceView {
    /// Credits minus charges (including charges not yet committed).
    pub balance: Decimal,
    /// Open reservations.
    pub reserved: Decimal,
}

impl BalanceView {
    /// Balance minus reservations.
    pub fn available(&self) -> Decimal {
        self.balance - self.reserved
    }
}

/// The reservation book of this process.
pub struct WalletBook {
    store: Arc<dyn Store>,
    wallets: std::sync::Mutex<HashMap<String, Arc<Mutex<WalletState>>>>,
}

impl std::fmt::Debug for WalletBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WalletBook")
    }
}

/// The balance of a customer's wallet from its stored movements.
pub async fn stored_balance(
    store: &dyn Store,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Decimal, StoreError> {
    let txs = store.wallet_transactions(customer_id).await?;
    let movements: Vec<WalletMovement> = txs
        .iter()
        .map(|t| WalletMovement {
            at: t.created_at,
            amount: t.amount,
            expires_at: t.expires_at,
        })
        .collect();
    Ok(wallet_balance(&movements, now))
}

impl WalletBook {
    /// An empty book over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        WalletBook {
            store,
            wallets: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, customer_id: &str) -> Arc<Mutex<WalletState>> {
        match self.wallets.lock() {
            Ok(mut map) => map.entry(customer_id.to_string()).or_default().clone(),
            // A poisoned map only means another thread panicked while inserting: start afresh.
            Err(poisoned) => poisoned
                .into_inner()
                .entry(customer_id.to_string())
                .or_default()
                .clone(),
        }
    }

    async fn load(&self, state: &mut WalletState, customer_id: &str) -> Result<(), StoreError> {
        if !state.loaded {
            state.balance = stored_balance(self.store.as_ref(), customer_id, Utc::now()).await?;
            state.loaded = true;
        }
        Ok(())
    }

    /// Reserves `amount`, or returns the available balance when it is short.
    pub async fn reserve(
        &self,
        customer_id: &str,
        amount: Decimal,
    ) -> Result<Result<Reservation, Decimal>, StoreError> {
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        self.load(&mut state, customer_id).await?;
        let available = state.balance - state.reserved;
        if available >= amount {
            state.reserved += amount;
            Ok(Ok(Reservation {
                customer_id: customer_id.to_string(),
                amount,
            }))
        } else {
            Ok(Err(available))
        }
    }

    /// Reserves `amount` of a postpaid customer's monthly spend `limit`, or returns what is
    /// left of it. The month's spend is read from the ledger when the process first needs
    /// it (and again each new UTC month), then kept in memory.
    pub async fn reserve_within_limit(
        &self,
        customer_id: &str,
        limit: Decimal,
        amount: Decimal,
        now: DateTime<Utc>,
    ) -> Result<Result<Reservation, Decimal>, StoreError> {
        use chrono::Datelike;
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        let month = (now.year(), now.month());
        if state.month != Some(month) {
            let start = chrono::NaiveDate::from_ymd_opt(month.0, month.1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc())
                .unwrap_or(now);
            let filter = fatura_store::UsageFilter {
                customer_id: Some(customer_id.to_string()),
                from: Some(start),
                ..Default::default()
            };
            let mut agg = fatura_core::usage::UsageAggregator::new(Vec::new());
            self.store.aggregate_usage(&filter, &mut agg).await?;
            state.spent = agg
                .finish()
                .first()
                .map_or(Decimal::ZERO, |(_, t)| t.revenue);
            state.month = Some(month);
        }
        let left = limit - state.spent - state.reserved;
        if left >= amount {
            state.reserved += amount;
            Ok(Ok(Reservation {
                customer_id: customer_id.to_string(),
                amount,
            }))
        } else {
            Ok(Err(left))
        }
    }

    /// Settles a reservation to `actual` (charged) and releases the rest.
    pub async fn settle(&self, reservation: Reservation, actual: Decimal) {
        let entry = self.entry(&reservation.customer_id);
        let mut state = entry.lock().await;
        state.reserved -= reservation.amount;
        // A customer is either prepaid (balance) or postpaid (spent); the other is unused.
        state.balance -= actual;
        state.spent += actual;
    }

    /// Releases a reservation entirely (the call failed without usage).
    pub async fn release(&self, reservation: Reservation) {
        self.settle(reservation, Decimal::ZERO).await;
    }

    /// Records a credit and adds it to the wallet, under the wallet's lock: a concurrent
    /// first load can neither miss it nor count it twice.
    pub async fn add_credit(
        &self,
        credit: &fatura_store::WalletTransaction,
    ) -> Result<(), StoreError> {
        let entry = self.entry(&credit.customer_id);
        let mut state = entry.lock().await;
        self.store.add_wallet_credit(credit).await?;
        if state.loaded {
            state.balance += credit.amount;
        }
        Ok(())
    }

    /// Adds a credit the store already recorded (e.g. an invoice's prepaid rebate, written
    /// in the invoice's transaction) to a loaded wallet.
    pub async fn credited(&self, customer_id: &str, amount: Decimal) {
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        if state.loaded {
            state.balance += amount;
        }
    }

    /// The current view (loads the wallet if needed).
    pub async fn view(&self, customer_id: &str) -> Result<BalanceView, StoreError> {
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        self.load(&mut state, customer_id).await?;
        Ok(BalanceView {
            balance: state.balance.normalize(),
            reserved: state.reserved.normalize(),
        })
    }
}
