//! Real-time prepaid balances and reservations.
//!
//! The durable record is the database (`wallet_transactions`: credits, and one charge per
//! usage event written in the event's transaction). On top of it this process keeps, per
//! prepaid customer, the balance and the sum of open reservations. A call **reserves** its
//! maximum price under the wallet's lock before it is forwarded (refused when the
//! available balance is short), and **settles** to its actual price when metered (the
//! charge goes to the ledger with the event), releasing the rest; a failed call releases
//! everything. With one process per database (SQLite, or one PostgreSQL instance), no
//! number of concurrent calls can reserve more than the balance.
//!
//! **Fleet mode** (a shared database: PostgreSQL). Several instances may serve the same
//! customer, so no process's memory can be the source of truth. Each instance holds a
//! *share* of the customer's budget in the database (`wallet_holds`), granted under a
//! per-customer lock only while all live shares fit in the budget (a wallet's valid
//! credits minus its charges; a spend limit minus the month's revenue). Reservations are
//! taken locally from the share (the fast path: no database work) and the share is grown
//! when it runs short; a call's price leaves the share in the transaction that writes its
//! event. Every `RENEW_EVERY` the instance hands back its unused share and renews the rest
//! (live for `HOLD_TTL`); a dead instance's share runs out and returns to the budget. So
//! with N instances the charges never exceed the budget, unless an instance is cut off
//! from the database for longer than `HOLD_TTL` while it still serves calls from its share
//! (ARCHITECTURE.md: the bound).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use fatura_core::BudgetHold;
use fatura_core::wallet::{WalletMovement, wallet_balance};
use fatura_store::{HoldBasis, HoldGrant, HoldRequest, Store, StoreError};
use rust_decimal::Decimal;
use tokio::sync::Mutex;

/// How long a budget share stays live without renewal (fleet mode).
pub const HOLD_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// How often an instance hands back unused shares and renews the rest (fleet mode).
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// A share grows by the call's need plus room for this many calls like it.
const SPARE_CALLS: i64 = 64;

#[derive(Debug, Default)]
struct WalletState {
    loaded: bool,
    balance: Decimal,
    /// Ids of the credits counted in `balance` (a credit another process wrote is added
    /// once, by `sync_credits`, whichever of it and this process's own update comes first).
    credits: HashSet<String>,
    reserved: Decimal,
    /// Postpaid spend limits: the UTC month `spent` belongs to, and the provisional price
    /// of the customer's calls in it.
    month: Option<(i32, u32)>,
    spent: Decimal,
    /// Fleet mode: this instance's share as last known, and the settled prices not yet
    /// written (they leave the share when their events are).
    hold: Decimal,
    pending: Decimal,
}

impl WalletState {
    /// Fleet mode: what the share still covers.
    fn spare(&self) -> Decimal {
        self.hold - self.reserved - self.pending
    }
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
    /// Fleet mode: this instance's name in `wallet_holds`.
    fleet: Option<String>,
    wallets: std::sync::Mutex<HashMap<String, Arc<Mutex<WalletState>>>>,
    renewals_started: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for WalletBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WalletBook")
    }
}

/// The balance of a customer's wallet from its stored movements.
pub(crate) async fn stored_balance(
    store: &dyn Store,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Decimal, StoreError> {
    Ok(balance_of(
        &store.wallet_transactions(customer_id).await?,
        now,
    ))
}

fn balance_of(txs: &[fatura_store::WalletTransaction], now: DateTime<Utc>) -> Decimal {
    let movements: Vec<WalletMovement> = txs
        .iter()
        .map(|t| WalletMovement {
            at: t.created_at,
            amount: t.amount,
            expires_at: t.expires_at,
        })
        .collect();
    wallet_balance(&movements, now)
}

impl WalletBook {
    /// An empty book over `store`, for the instance `instance_id` (fleet mode when the
    /// store is shared).
    pub fn new(store: Arc<dyn Store>, instance_id: &str) -> Self {
        let fleet = store.shared().then(|| instance_id.to_string());
        WalletBook {
            store,
            fleet,
            wallets: std::sync::Mutex::new(HashMap::new()),
            renewals_started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether budgets are shared with other instances through the database.
    pub fn is_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// The budget share a settled price leaves when its event is written (fleet mode).
    pub fn hold_of(&self, actual: Decimal) -> Option<BudgetHold> {
        self.fleet.as_ref().map(|instance| BudgetHold {
            instance: instance.clone(),
            amount: actual,
        })
    }

    fn snapshot(&self) -> Vec<(String, Arc<Mutex<WalletState>>)> {
        let map = match self.wallets.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Fleet mode: takes `amount` from this instance's share, growing the share in the
    /// database when it is short; or returns what could still be had.
    async fn reserve_shared(
        &self,
        instance: &str,
        customer_id: &str,
        basis: HoldBasis,
        amount: Decimal,
    ) -> Result<Result<Reservation, Decimal>, StoreError> {
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        let spare = state.spare();
        if spare < amount {
            let now = Utc::now();
            let grant = self
                .store
                .grant_hold(&HoldRequest {
                    customer_id,
                    instance_id: instance,
                    basis,
                    // A negative spare (prices above their reservations: the upstream
                    // counted more prompt tokens than the tokenizer) is covered too, or
                    // every later call would need a grant of its own.
                    need: amount - spare,
                    spare: amount * Decimal::from(SPARE_CALLS),
                    now,
                    until: now + chrono::Duration::from_std(HOLD_TTL).unwrap_or_default(),
                })
                .await?;
            match grant {
                HoldGrant::Granted(delta) => state.hold += delta,
                HoldGrant::Short(free) => return Ok(Err(spare.max(Decimal::ZERO) + free)),
            }
        }
        state.reserved += amount;
        Ok(Ok(Reservation {
            customer_id: customer_id.to_string(),
            amount,
        }))
    }

    /// Fleet mode: the writer committed `events`; those carrying this instance's
    /// [`BudgetHold`] are no longer pending. A newly recorded one (in `inserted`) took its
    /// price out of the share in the database; a replay leaves it in the share as spare.
    pub async fn written(&self, events: &[fatura_core::UsageEvent], inserted: &HashSet<String>) {
        let Some(instance) = &self.fleet else { return };
        for e in events {
            let Some(hold) = e.budget_hold.as_ref().filter(|h| h.instance == *instance) else {
                continue;
            };
            let entry = self.entry(e.customer_id.as_str());
            let mut state = entry.lock().await;
            state.pending -= hold.amount;
            if inserted.contains(e.id.as_str()) {
                state.hold -= hold.amount;
            }
        }
    }

    /// Fleet mode: hands back every unused share and renews the others; a share that ran
    /// out while still covering calls is granted again if the budget allows (else new calls
    /// wait for room).
    pub async fn renew(&self) -> Result<(), StoreError> {
        let Some(instance) = &self.fleet else {
            return Ok(());
        };
        for (customer_id, entry) in self.snapshot() {
            let mut state = entry.lock().await;
            if state.hold.is_zero() && state.reserved.is_zero() && state.pending.is_zero() {
                continue;
            }
            let release = state.spare().max(Decimal::ZERO);
            let now = Utc::now();
            let until = now + chrono::Duration::from_std(HOLD_TTL).unwrap_or_default();
            let live = self
                .store
                .trim_hold(&customer_id, instance, release, now, until)
                .await?;
            state.hold -= release;
            if !live && (state.reserved + state.pending) > Decimal::ZERO {
                let basis = match state.month {
                    Some(_) => None,
                    None => Some(HoldBasis::Wallet),
                };
                // A spend-limit share is re-checked by its next reservation instead.
                if let Some(basis) = basis {
                    let grant = self
                        .store
                        .grant_hold(&HoldRequest {
                            customer_id: &customer_id,
                            instance_id: instance,
                            basis,
                            need: Decimal::ZERO,
                            spare: Decimal::ZERO,
                            now,
                            until,
                        })
                        .await?;
                    if let HoldGrant::Short(_) = grant {
                        tracing::warn!(
                            customer_id,
                            "a budget share ran out while covering calls and the budget has no room for it"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Fleet mode: renews shares every [`RENEW_EVERY`] for as long as the book lives (once
    /// per book, however often it is called).
    pub fn start_renewals(self: &Arc<Self>) {
        if self.fleet.is_none()
            || self
                .renewals_started
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let book = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RENEW_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(book) = book.upgrade() else { break };
                if let Err(e) = book.renew().await {
                    tracing::warn!(error = %e, "cannot renew budget shares");
                }
            }
        });
    }

    /// Fleet mode: gives every share of this instance back (a clean stop, once the metering
    /// queue is drained).
    pub async fn release_all(&self) {
        if let Some(instance) = &self.fleet
            && let Err(e) = self.store.release_holds(instance).await
        {
            tracing::warn!(error = %e, "cannot release budget shares; they run out by themselves");
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
            let txs = self.store.wallet_transactions(customer_id).await?;
            state.balance = balance_of(&txs, Utc::now());
            state.credits = txs
                .into_iter()
                .filter(|t| t.kind.is_credit())
                .map(|t| t.id)
                .collect();
            state.loaded = true;
        }
        Ok(())
    }

    /// Adds to this process's loaded wallets the credits other processes recorded since
    /// they were loaded (a rebate of an invoice finalised by `fatura invoices run`, a grant
    /// from the CLI), each once. Charges are written only by the process serving the calls,
    /// so credits are all another process can add. Not needed in fleet mode, where budgets
    /// are read from the database.
    pub async fn sync_credits(&self) -> Result<(), StoreError> {
        if self.fleet.is_some() {
            return Ok(());
        }
        for (customer_id, entry) in self.snapshot() {
            // Under the wallet's lock: this process's own credits are recorded and counted
            // under it too, so none is missed or counted twice.
            let mut state = entry.lock().await;
            if !state.loaded {
                continue;
            }
            for t in self.store.wallet_transactions(&customer_id).await? {
                if t.kind.is_credit() && !state.credits.contains(&t.id) {
                    state.balance += t.amount;
                    state.credits.insert(t.id);
                }
            }
        }
        Ok(())
    }

    /// Reserves `amount`, or returns the available balance when it is short.
    pub async fn reserve(
        &self,
        customer_id: &str,
        amount: Decimal,
    ) -> Result<Result<Reservation, Decimal>, StoreError> {
        if let Some(instance) = &self.fleet {
            return self
                .reserve_shared(instance, customer_id, HoldBasis::Wallet, amount)
                .await;
        }
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
        let month = (now.year(), now.month());
        let start = chrono::NaiveDate::from_ymd_opt(month.0, month.1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
            .unwrap_or(now);
        if let Some(instance) = &self.fleet {
            self.entry(customer_id).lock().await.month = Some(month);
            return self
                .reserve_shared(
                    instance,
                    customer_id,
                    HoldBasis::MonthlyLimit {
                        limit,
                        month_start: start,
                    },
                    amount,
                )
                .await;
        }
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        if state.month != Some(month) {
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
        if self.fleet.is_some() {
            state.pending += actual;
            return;
        }
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
        if state.loaded && state.credits.insert(credit.id.clone()) {
            state.balance += credit.amount;
        }
        Ok(())
    }

    /// Adds a credit the store already recorded (e.g. an invoice's prepaid rebate, written
    /// in the invoice's transaction) to a loaded wallet, unless it is counted already.
    pub(crate) async fn credited(&self, customer_id: &str, credit_id: &str, amount: Decimal) {
        let entry = self.entry(customer_id);
        let mut state = entry.lock().await;
        if state.loaded && state.credits.insert(credit_id.to_string()) {
            state.balance += amount;
        }
    }

    /// The current view (loads the wallet if needed). Fleet mode: the stored balance less
    /// this instance's prices not yet written; reserved = this instance's open reservations
    /// plus the live shares of the other instances.
    pub async fn view(&self, customer_id: &str) -> Result<BalanceView, StoreError> {
        let entry = self.entry(customer_id);
        if let Some(instance) = &self.fleet {
            let now = Utc::now();
            let stored = stored_balance(self.store.as_ref(), customer_id, now).await?;
            let others: Decimal = self
                .store
                .holds(customer_id, now)
                .await?
                .iter()
                .filter(|h| h.live && h.instance_id != *instance)
                .map(|h| h.amount.max(Decimal::ZERO))
                .sum();
            let state = entry.lock().await;
            return Ok(BalanceView {
                balance: (stored - state.pending).normalize(),
                reserved: (state.reserved + others).normalize(),
            });
        }
        let mut state = entry.lock().await;
        self.load(&mut state, customer_id).await?;
        Ok(BalanceView {
            balance: state.balance.normalize(),
            reserved: state.reserved.normalize(),
        })
    }
}
