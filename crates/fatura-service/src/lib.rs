//! # fatura-service
//!
//! The business layer: what fatura does, independent of HTTP or the CLI. It creates ids
//! and timestamps, validates, costs and rates, and hands the store finished records.

use fatura_core::status::CustomerStatus;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use fatura_core::catalog::{Catalog, PriceVersion, plan_import, version_at};
use fatura_core::import::{CatalogFormat, ParsedCatalog, Skipped, parse_catalog};
use fatura_core::usage::{GroupBy, GroupKey, UsageAggregator, UsageTotals};
use fatura_core::{Currency, CustomerId, MarginRate, UsageEvent, cost_usage};
use rand::RngCore;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use fatura_store::{
    ApiKeyRecord, Customer, EventPricing, InsertOutcome, PreparedEvent, PriceImport, Store,
    StoreError, UnpricedModel, UsageFilter,
};

/// How many times an operation is retried when the catalog changes under it.
const CATALOG_RETRIES: usize = 5;

/// Errors of the business layer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Input rejected; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// Events rejected with per-index reasons; nothing was written.
    #[error("{} invalid events", .0.len())]
    InvalidEvents(Vec<(usize, Option<String>, String, String)>),
    /// One field of the input rejected (422 with the field named); nothing was written.
    #[error("{field}: {message}")]
    InvalidField {
        /// The error code of the kind of input (`invalid_credit`, …).
        code: &'static str,
        /// The field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A bad query parameter (400); nothing was read or written.
    #[error("{0}")]
    BadQuery(String),
    /// Something does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An event id was already recorded with different content.
    #[error("event id {0:?} was already recorded with different content")]
    EventConflict(String),
    /// A uniqueness or consistency rule.
    #[error("{0}")]
    Conflict(String),
    /// Unexpected failure.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl ServiceError {
    /// A short name of the kind of error, as the API's error codes name it.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::Invalid(_) => "invalid_request",
            ServiceError::InvalidEvents(_) => "invalid_events",
            ServiceError::InvalidField { code, .. } => code,
            ServiceError::BadQuery(_) => "invalid_query",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::EventConflict(_) => "event_id_conflict",
            ServiceError::Conflict(_) => "conflict",
            ServiceError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::EventConflict { id } => ServiceError::EventConflict(id),
            StoreError::Conflict(m) => ServiceError::Conflict(m),
            StoreError::CatalogChanged => ServiceError::Internal(anyhow::anyhow!(
                "the price catalog kept changing; retry the request"
            )),
            StoreError::Internal(e) => ServiceError::Internal(e),
        }
    }
}

/// Result alias.
pub type ServiceResult<T> = Result<T, ServiceError>;

pub mod analytics;
mod billing;
mod keys;
pub mod payments;
mod pricing;
pub mod scheduler;
pub mod wallet;
pub mod wallets;

pub use wallets::{CreditKind, CreditRequest, WalletPage};

pub use keys::{KEY_CACHE_TTL, VerifiedKey};

pub use billing::{
    BillingFailure, BillingPolicy, DocLine, DocQuantities, DocSection, DocTier, DocUnitPrices,
    InvoiceDocument, RunReport, cycle_spec, document_of, parse_invoice_status,
};

use pricing::{FloorHit, PricingBook};
pub use pricing::{
    KindMargin, MarginImpact, PlanInput, PlanView, PriceChange, PriceChanges, UnitPrices, Upcoming,
};

/// The pricing inputs (catalog, plans, assignments, exchange rates) as of one revision.
#[derive(Debug, Default)]
struct CatalogSnapshot {
    revision: i64,
    catalog: Catalog,
    book: PricingBook,
}

/// What an ingestion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// New events recorded.
    pub accepted: u64,
    /// Events acknowledged as replays (already stored, or repeated within the batch).
    pub duplicates: u64,
    /// Of the accepted events, those with no catalog price.
    pub unpriced: u64,
    /// Ids of the newly recorded events.
    pub inserted: std::collections::HashSet<String>,
}

/// What a price import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Prices apply from this instant.
    pub effective_from: DateTime<Utc>,
    /// Models with usable prices in the file.
    pub models: usize,
    /// New versions created.
    pub created: usize,
    /// Models whose prices did not change.
    pub unchanged: usize,
    /// Entries left out, and why.
    pub skipped: Vec<Skipped>,
    /// Catalog revision after the import.
    pub catalog_revision: i64,
    /// Previously unpriced events that the new prices now cover.
    pub events_priced: u64,
}

/// How a customer pays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Billing {
    /// Prepaid (wallet) rather than postpaid.
    pub prepaid: bool,
    /// Postpaid only: the most the customer's calls may cost per UTC month, USD.
    pub monthly_spend_limit: Option<Decimal>,
    /// Cycle, time zone, payment terms, tax, invoice language.
    pub settings: fatura_store::BillingSettings,
}

/// Checks billing settings without writing anything.
pub fn check_billing_settings(s: &fatura_store::BillingSettings) -> ServiceResult<()> {
    fatura_core::billing::CycleSpec::new(s.anchor_day, &s.timezone)
        .map_err(|e| ServiceError::Invalid(e.to_string()))?;
    if s.payment_terms_days > 365 {
        return Err(ServiceError::Invalid("payment_terms_days: 0 to 365".into()));
    }
    if let Some(t) = s.tax_rate
        && (t.is_sign_negative() || t >= Decimal::ONE || t.normalize().scale() > 6)
    {
        return Err(ServiceError::Invalid(
            "tax_rate: a fraction from 0 to below 1 with at most 6 decimal places (e.g. \"0.05\")"
                .into(),
        ));
    }
    if s.locale != "en" && s.locale != "pt-BR" {
        return Err(ServiceError::Invalid("locale: en or pt-BR".into()));
    }
    Ok(())
}

/// Checks a monthly spend limit for a customer (prepaid or not) without writing anything.
pub fn check_spend_limit(prepaid: bool, limit: Option<Decimal>) -> ServiceResult<()> {
    match limit {
        None => Ok(()),
        Some(_) if prepaid => Err(ServiceError::Invalid(
            "monthly_spend_limit: applies to postpaid customers (prepaid ones are bounded by their wallet)".into(),
        )),
        Some(l) if l <= Decimal::ZERO || l.normalize().scale() > 2 || l > Decimal::from(1_000_000_000_i64) => {
            Err(ServiceError::Invalid(
                "monthly_spend_limit: must be a positive USD amount with at most 2 decimal places".into(),
            ))
        }
        Some(_) => Ok(()),
    }
}

/// A new API key: the secret is in `key`, shown once.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Stored record (hash only).
    pub record: ApiKeyRecord,
    /// The key itself.
    pub key: String,
}

/// fatura's operations over one store.
pub struct Fatura {
    store: Arc<dyn Store>,
    margin: MarginRate,
    catalog: RwLock<Arc<CatalogSnapshot>>,
    /// Floor alerts this process already raised (raising is idempotent; this only spares
    /// the database a write per batch).
    raised_alerts: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Newly recorded events, for the dashboard's live feed (sent only while someone
    /// listens; a slow listener misses events rather than slowing ingestion).
    live: tokio::sync::broadcast::Sender<LiveCall>,
    /// Whether the relay of database-published events runs.
    relay_started: std::sync::atomic::AtomicBool,
    /// This process's name among instances sharing a database (random per start).
    instance_id: Arc<str>,
    /// Prepaid balances and reservations of this process.
    wallets: Arc<crate::wallet::WalletBook>,
    /// Verified customer keys.
    keys: keys::KeyCache,
    /// The time.
    clock: Arc<dyn Clock>,
    /// The database's change counter as last seen (SQLite: `PRAGMA data_version`), to tell
    /// when another process wrote to it.
    external_writes: tokio::sync::Mutex<Option<i64>>,
}

/// Where the service reads the time. Handlers, the gateway and the scheduler take "now"
/// from [`Fatura::now`], never from the system clock themselves, so that one clock governs
/// a process (and a test or a simulation can set it).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A newly recorded event as the live feed shows it.
pub use fatura_store::LiveEvent as LiveCall;

impl std::fmt::Debug for Fatura {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fatura")
            .field("backend", &self.store.backend())
            .finish()
    }
}

/// A batch's events by id, each with its batch index and content hash, sorted by id (a
/// fixed order keeps concurrent batches that share ids from deadlocking), and the count of
/// replays inside the batch. The same id with other content is a conflict.
type UniqueEvents = Vec<(usize, UsageEvent, String)>;

fn dedupe_batch(events: Vec<(usize, UsageEvent)>) -> ServiceResult<(UniqueEvents, u64)> {
    let mut by_id: HashMap<String, (usize, UsageEvent, String)> =
        HashMap::with_capacity(events.len());
    let mut in_batch_duplicates = 0;
    for (index, event) in events {
        let hash = event.content_hash();
        match by_id.get(event.id.as_str()) {
            Some((_, _, h)) if *h == hash => in_batch_duplicates += 1,
            Some(_) => return Err(ServiceError::EventConflict(event.id.to_string())),
            None => {
                by_id.insert(event.id.to_string(), (index, event, hash));
            }
        }
    }
    let mut unique: UniqueEvents = by_id.into_values().collect();
    unique.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    Ok((unique, in_batch_duplicates))
}

/// Costs (at the version in force) and rates every event; per-event errors are collected.
/// Also returns where the margin floor was applied.
fn prepare_batch(
    snapshot: &CatalogSnapshot,
    margin: MarginRate,
    unique: &UniqueEvents,
    now: DateTime<Utc>,
) -> ServiceResult<(Vec<PreparedEvent>, Vec<FloorHit>)> {
    let mut prepared = Vec::with_capacity(unique.len());
    let mut errors = Vec::new();
    let mut hits = Vec::new();
    for (index, event, hash) in unique {
        match price_with(
            snapshot,
            margin,
            event.customer_id.as_str(),
            &event.provider,
            &event.model,
            event.timestamp,
            &event.usage,
        ) {
            Ok(priced) => prepared.push(PreparedEvent {
                event: event.clone(),
                content_hash: hash.clone(),
                pricing: priced.map(|(pricing, hit)| {
                    if let Some(hit) = hit
                        && !hits.contains(&hit)
                    {
                        hits.push(hit);
                    }
                    pricing
                }),
                ingested_at: now,
            }),
            Err(msg) => errors.push((
                *index,
                Some(event.id.to_string()),
                "input_tokens".to_string(),
                msg,
            )),
        }
    }
    if errors.is_empty() {
        Ok((prepared, hits))
    } else {
        errors.sort_by_key(|e| e.0);
        Err(ServiceError::InvalidEvents(errors))
    }
}

/// Costs an event at the catalog version in force at its timestamp and prices it on its own
/// under the customer's plan then (see [`PricingBook::provisional_price`]): the provisional
/// price, USD. `None` when no catalog price applies.
fn price_with(
    snapshot: &CatalogSnapshot,
    margin: MarginRate,
    customer_id: &str,
    provider: &str,
    model: &str,
    at: DateTime<Utc>,
    usage: &fatura_core::TokenUsage,
) -> Result<Option<(EventPricing, Option<FloorHit>)>, String> {
    let Some(version) = snapshot.catalog.price_at(provider, model, at) else {
        return Ok(None);
    };
    let breakdown = cost_usage(usage, &version.prices).map_err(|e| e.to_string())?;
    let (revenue, hit) = snapshot
        .book
        .provisional_price(margin, customer_id, provider, model, at, usage, &breakdown)
        .map_err(|e| e.to_string())?;
    Ok(Some((
        EventPricing {
            price_version_id: version.id,
            cost: breakdown.total(),
            revenue,
        },
        hit,
    )))
}

/// The SHA-256 of an API key, hex encoded: how keys are stored and looked up.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random id suffix (20 hex characters).
pub fn new_id() -> String {
    random_hex(10)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

impl Fatura {
    /// Wraps a store; `margin` is the default cost-plus margin (87%).
    pub fn new(store: Arc<dyn Store>, margin: MarginRate) -> Self {
        let instance_id: Arc<str> = Arc::from(format!("fatura-{:016x}", rand::random::<u64>()));
        let wallets = Arc::new(crate::wallet::WalletBook::new(store.clone(), &instance_id));
        Fatura {
            instance_id,
            wallets,
            keys: keys::KeyCache::default(),
            clock: Arc::new(SystemClock),
            external_writes: tokio::sync::Mutex::new(None),
            store,
            margin,
            catalog: RwLock::new(Arc::new(CatalogSnapshot {
                revision: -1,
                ..Default::default()
            })),
            raised_alerts: Default::default(),
            live: tokio::sync::broadcast::channel(1024).0,
            relay_started: Default::default(),
        }
    }

    /// Relays the events every instance records (when the database publishes them) into
    /// this process's live feed, reconnecting after a failure; at most one relay per
    /// process. Call from inside the runtime (`serve` does).
    pub fn start_live_relay(self: &Arc<Self>) {
        if !self.store.publishes_live()
            || self
                .relay_started
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            loop {
                let Some(fatura) = me.upgrade() else { return };
                match fatura.store.listen_live().await {
                    Ok(Some(mut stream)) => {
                        drop(fatura);
                        while let Some(batch) = stream.next().await {
                            let Some(fatura) = me.upgrade() else { return };
                            match batch {
                                // Sent only when someone listens; nothing to do otherwise.
                                Ok(events) => {
                                    for e in events {
                                        let _ = fatura.live.send(e);
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "live relay: bad notification")
                                }
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(e) => tracing::warn!(error = %e, "live relay: cannot listen; retrying"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    /// Subscribes to newly recorded events (the live feed).
    pub fn subscribe_live(&self) -> tokio::sync::broadcast::Receiver<LiveCall> {
        self.live.subscribe()
    }

    fn publish_live(
        &self,
        prepared: &[PreparedEvent],
        inserted: &std::collections::HashSet<String>,
    ) {
        // A database that publishes (PostgreSQL) delivers them through the relay instead, to
        // every instance including this one.
        if self.live.receiver_count() == 0 || self.store.publishes_live() {
            return;
        }
        for p in prepared
            .iter()
            .filter(|p| inserted.contains(p.event.id.as_str()))
        {
            // A send fails only when every listener has gone: nothing to do.
            let _ = self.live.send(LiveCall::of(p));
        }
    }

    /// The store: for the service's own modules only (handlers and the CLI go through the
    /// service's methods).
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The current instant, by the service's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// This process's name among instances sharing a database.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The prepaid balances and reservations of this process.
    pub fn wallets(&self) -> &Arc<crate::wallet::WalletBook> {
        &self.wallets
    }

    /// Which customer a key (its SHA-256, hex) belongs to, if it is an active key: from the
    /// cache of verified keys, else the database.
    pub async fn verify_key(&self, key_hash: &str) -> ServiceResult<Option<VerifiedKey>> {
        if let Some(k) = self.keys.get(key_hash) {
            return Ok(Some(k));
        }
        let Some(key) = self.store.find_active_api_key(key_hash).await? else {
            return Ok(None);
        };
        let Some(customer) = self.store.get_customer(&key.customer_id).await? else {
            return Ok(None);
        };
        let verified = VerifiedKey {
            customer_id: key.customer_id,
            key_id: key.id,
            prepaid: customer.prepaid,
            spend_limit: customer.monthly_spend_limit,
            suspended: (customer.status == CustomerStatus::Suspended).then(|| {
                customer
                    .status_reason
                    .unwrap_or_else(|| "the account is suspended".into())
            }),
        };
        self.keys.put(key_hash.to_string(), verified.clone());
        Ok(Some(verified))
    }

    /// Drops cached keys of a customer whose status, limits or keys changed, so the change
    /// applies to its next call.
    pub(crate) fn forget_customer_keys(&self, customer_id: &str) {
        self.keys.forget(None, Some(customer_id));
    }

    /// Picks up what other processes wrote to the database since the last call (SQLite: a
    /// `fatura invoices run` or `fatura keys revoke` from the CLI beside `fatura serve`):
    /// credits this process's wallets do not know yet (rebates of invoices finalised
    /// elsewhere, grants) are added to them, and verified keys are dropped. A no-op on
    /// PostgreSQL, where budgets are read from the database itself. Returns whether
    /// anything had changed.
    pub async fn sync_external_writes(&self) -> ServiceResult<bool> {
        let mut seen = self.external_writes.lock().await;
        let Some(version) = self.store.external_writes().await? else {
            return Ok(false);
        };
        // The first look counts as a change: what was loaded before it may already be
        // behind (syncing is idempotent, by credit id).
        let changed = *seen != Some(version);
        *seen = Some(version);
        if changed {
            self.keys.clear();
            self.wallets.sync_credits().await?;
        }
        Ok(changed)
    }

    /// Starts this process's background upkeep: the live relay (PostgreSQL), budget-share
    /// renewals (fleet mode) and, every second, [`Fatura::sync_external_writes`]. Call from
    /// inside the runtime (`serve` does).
    pub fn start_background(self: &Arc<Self>) {
        self.start_live_relay();
        self.wallets.start_renewals();
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(fatura) = me.upgrade() else { return };
                if let Err(e) = fatura.sync_external_writes().await {
                    tracing::warn!(error = %e, "cannot check the database for other writers");
                }
            }
        });
    }

    /// The default margin.
    pub fn margin(&self) -> MarginRate {
        self.margin
    }

    // ---- customers and keys -------------------------------------------------------------

    /// Creates a customer, generating an id (`cus_…`) when none is given.
    pub async fn create_customer(
        &self,
        id: Option<&str>,
        name: &str,
        currency: Currency,
        billing: Billing,
        now: DateTime<Utc>,
    ) -> ServiceResult<Customer> {
        let prepaid = billing.prepaid;
        check_spend_limit(prepaid, billing.monthly_spend_limit)?;
        check_billing_settings(&billing.settings)?;
        let id = match id {
            Some(id) => {
                CustomerId::parse(id).map_err(|e| ServiceError::Invalid(format!("id: {e}")))?
            }
            None => CustomerId::parse(&format!("cus_{}", random_hex(10)))
                .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))?,
        };
        let name = name.trim();
        if prepaid && currency != Currency::Usd {
            return Err(ServiceError::Invalid(
                "currency: prepaid wallets are in USD until exchange rates are supported; create the customer in USD or postpaid"
                    .into(),
            ));
        }
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(ServiceError::Invalid(
                "name: must be 1 to 200 characters without control characters".into(),
            ));
        }
        let customer = Customer {
            id: id.to_string(),
            name: name.to_string(),
            currency,
            prepaid,
            monthly_spend_limit: billing.monthly_spend_limit.map(|d| d.normalize()),
            billing: billing.settings.clone(),
            stripe_customer_id: None,
            status: CustomerStatus::Active,
            status_reason: None,
            payment_method_id: None,
            auto_top_up: None,
            created_at: now,
        };
        self.store.create_customer(&customer).await?;
        Ok(customer)
    }

    /// Sets or clears a prepaid customer's automatic top-up: when its balance drops under
    /// `threshold`, `amount` is charged to its saved payment method.
    pub async fn set_auto_top_up(
        &self,
        id: &str,
        rule: Option<(Decimal, Decimal)>,
    ) -> ServiceResult<Customer> {
        let c = self.customer(id).await?;
        if let Some((threshold, amount)) = rule {
            if !c.prepaid {
                return Err(ServiceError::Invalid(
                    "auto_top_up: for prepaid customers".into(),
                ));
            }
            let minor = c.currency.minor_units();
            let ok = |d: Decimal, min: Decimal| {
                d >= min && d.normalize().scale() <= minor && d <= Decimal::from(1_000_000)
            };
            if !ok(threshold, Decimal::ZERO) || !ok(amount, Decimal::new(1, minor)) {
                return Err(ServiceError::Invalid(format!(
                    "auto_top_up: threshold and amount are amounts in {} (amount positive) with at most {minor} decimal places",
                    c.currency
                )));
            }
        }
        self.store.set_auto_top_up(id, rule).await?;
        self.customer(id).await
    }

    /// Changes a customer's billing settings.
    pub async fn set_billing_settings(
        &self,
        id: &str,
        settings: &fatura_store::BillingSettings,
    ) -> ServiceResult<Customer> {
        check_billing_settings(settings)?;
        if !self.store.update_billing_settings(id, settings).await? {
            return Err(ServiceError::NotFound(format!("no customer {id:?}")));
        }
        self.customer(id).await
    }

    /// Sets or clears a postpaid customer's monthly spend limit.
    pub async fn set_spend_limit(
        &self,
        id: &str,
        limit: Option<Decimal>,
    ) -> ServiceResult<Customer> {
        let customer = self.customer(id).await?;
        check_spend_limit(customer.prepaid, limit)?;
        self.store
            .set_spend_limit(id, limit.map(|d| d.normalize()))
            .await?;
        // Cached keys carry the limit: drop them so the change applies at once.
        self.keys.forget(None, Some(id));
        self.customer(id).await
    }

    /// Every customer, by id.
    pub async fn customers(&self) -> ServiceResult<Vec<Customer>> {
        Ok(self.store.list_customers().await?)
    }

    /// A customer, if it exists.
    pub async fn find_customer(&self, id: &str) -> ServiceResult<Option<Customer>> {
        Ok(self.store.get_customer(id).await?)
    }

    /// A customer's keys (hashes only; revoked ones included).
    pub async fn api_keys(&self, customer_id: &str) -> ServiceResult<Vec<ApiKeyRecord>> {
        self.customer(customer_id).await?;
        Ok(self.store.list_api_keys(customer_id).await?)
    }

    /// A customer's payment attempts, of one invoice when given.
    pub async fn payments(
        &self,
        customer_id: &str,
        invoice_id: Option<&str>,
    ) -> ServiceResult<Vec<fatura_store::PaymentRecord>> {
        Ok(self.store.list_payments(customer_id, invoice_id).await?)
    }

    /// Whether the database answers, and which one it is.
    pub async fn ping(&self) -> ServiceResult<&'static str> {
        self.store.ping().await?;
        Ok(self.store.backend())
    }

    /// Counts a call in the shared per-key rate windows of a fleet (the window starting at
    /// `window_start_us`): whether it is admitted, or `None` when the database is not
    /// shared (each process counts alone).
    pub async fn count_shared_rate(
        &self,
        key_id: &str,
        window_start_us: i64,
        tokens: u64,
        requests_per_minute: u64,
        tokens_per_minute: u64,
    ) -> ServiceResult<Option<bool>> {
        if !self.store.shared() {
            return Ok(None);
        }
        Ok(Some(
            self.store
                .count_rate(
                    key_id,
                    window_start_us,
                    tokens,
                    requests_per_minute,
                    tokens_per_minute,
                )
                .await?,
        ))
    }

    /// One page of the ledger's events matching `filter`, in `(timestamp, id)` order after
    /// the cursor `after` (for exports).
    pub async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> ServiceResult<Vec<fatura_store::ExportRow>> {
        Ok(self.store.usage_page(filter, after, limit).await?)
    }

    /// Every movement of a customer's wallet, oldest first.
    pub async fn wallet_movements(
        &self,
        customer_id: &str,
    ) -> ServiceResult<Vec<fatura_store::WalletTransaction>> {
        Ok(self.store.wallet_transactions(customer_id).await?)
    }

    /// Events in the ledger.
    pub async fn count_events(&self) -> ServiceResult<u64> {
        Ok(self.store.count_events().await?)
    }

    /// The rollups recounted from the raw events (an audit: they must equal the stored
    /// rollups).
    pub async fn recount_rollups(&self) -> ServiceResult<fatura_core::rollup::RollupDelta> {
        Ok(self.store.recount_rollups().await?)
    }

    /// The stored rollups of `[from, to)` at one grain, grouped by `dims`.
    pub async fn stored_rollups(
        &self,
        grain: fatura_core::rollup::Grain,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        dims: fatura_core::rollup::Dims,
    ) -> ServiceResult<
        Vec<(
            fatura_core::rollup::RollupKey,
            fatura_core::rollup::RollupTotals,
        )>,
    > {
        Ok(self
            .store
            .query_rollups(grain, from, to, None, dims)
            .await?)
    }

    /// A customer, or `NotFound`.
    pub async fn customer(&self, id: &str) -> ServiceResult<Customer> {
        self.store
            .get_customer(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no customer {id:?}")))
    }

    /// Creates an API key for a customer. The key is returned once and stored hashed.
    pub async fn create_api_key(
        &self,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> ServiceResult<NewApiKey> {
        self.customer(customer_id).await?;
        let key = format!("fk_{}", random_hex(24));
        let record = ApiKeyRecord {
            id: format!("key_{}", random_hex(8)),
            customer_id: customer_id.to_string(),
            key_hash: hash_api_key(&key),
            prefix: key.chars().take(10).collect(),
            created_at: now,
            revoked_at: None,
        };
        self.store.create_api_key(&record).await?;
        Ok(NewApiKey { record, key })
    }

    /// Revokes a key.
    pub async fn revoke_api_key(&self, id: &str, now: DateTime<Utc>) -> ServiceResult<()> {
        if self.store.revoke_api_key(id, now).await? {
            // The revoked key stops working on this instance at once.
            self.keys.forget(Some(id), None);
            Ok(())
        } else {
            Err(ServiceError::NotFound(format!("no active key {id:?}")))
        }
    }

    // ---- catalog ------------------------------------------------------------------------

    async fn reload_catalog(&self) -> ServiceResult<Arc<CatalogSnapshot>> {
        // The revision is read first: a snapshot may be newer than its label (then the
        // insert's revision check fails and it is reloaded), never older.
        let (revision, versions) = self.store.load_catalog().await?;
        let pricing = self.store.load_pricing().await?;
        let snapshot = Arc::new(CatalogSnapshot {
            revision,
            catalog: Catalog::new(versions),
            book: PricingBook::new(pricing),
        });
        if let Ok(mut guard) = self.catalog.write()
            && guard.revision < revision
        {
            *guard = snapshot.clone();
        }
        Ok(snapshot)
    }

    fn cached_catalog(&self) -> Arc<CatalogSnapshot> {
        self.catalog.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// The current snapshot, loading it on first use.
    async fn snapshot(&self) -> ServiceResult<Arc<CatalogSnapshot>> {
        let snapshot = self.cached_catalog();
        if snapshot.revision < 0 {
            return self.reload_catalog().await;
        }
        Ok(snapshot)
    }

    /// The catalog cost and the customer's provisional price (USD, its plan's price of this
    /// usage on its own) of `usage` on `(provider, model)` at `at`, from the cached
    /// snapshot; `None` when no catalog price applies.
    pub async fn quote(
        &self,
        customer_id: &str,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        usage: &fatura_core::TokenUsage,
    ) -> ServiceResult<Option<EventPricing>> {
        let snapshot = self.snapshot().await?;
        price_with(
            &snapshot,
            self.margin,
            customer_id,
            provider,
            model,
            at,
            usage,
        )
        .map(|p| p.map(|(pricing, _)| pricing))
        .map_err(ServiceError::Invalid)
    }

    /// Imports a catalog file as new price versions effective from `effective_from`, then
    /// prices any unpriced events the new versions cover.
    pub async fn import_prices(
        &self,
        format: CatalogFormat,
        bytes: &[u8],
        provider: Option<&str>,
        effective_from: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> ServiceResult<ImportReport> {
        let ParsedCatalog { prices, skipped } = parse_catalog(format, bytes, provider)
            .map_err(|e| ServiceError::Invalid(e.to_string()))?;
        let models = prices.len();
        let source = match format {
            CatalogFormat::OpenRouter => "openrouter",
            CatalogFormat::LiteLlm => "litellm",
        };
        for _ in 0..CATALOG_RETRIES {
            let snapshot = self.reload_catalog().await?;
            let plan = plan_import(&snapshot.catalog, prices.clone(), effective_from);
            if !plan.conflicts.is_empty() {
                return Err(ServiceError::Conflict(format!(
                    "a price version at exactly {} already exists with different prices for: {}; \
                     import with another effective_from",
                    effective_from.to_rfc3339(),
                    plan.conflicts.join(", ")
                )));
            }
            let created = plan.create.len();
            let import = PriceImport {
                effective_from,
                source: source.to_string(),
                imported_at: now,
                create: plan.create,
                expected_revision: snapshot.revision,
            };
            match self.store.import_prices(&import).await {
                Ok(revision) => {
                    let events_priced = if created > 0 {
                        self.price_unpriced_events().await?
                    } else {
                        0
                    };
                    // Quotes (gateway reservations, /v1/models) see the new prices at once.
                    self.reload_catalog().await?;
                    return Ok(ImportReport {
                        effective_from,
                        models,
                        created,
                        unchanged: plan.unchanged,
                        skipped,
                        catalog_revision: revision,
                        events_priced,
                    });
                }
                Err(StoreError::CatalogChanged) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::CatalogChanged.into())
    }

    /// Prices every unpriced event that the catalog now covers. Returns how many.
    pub async fn price_unpriced_events(&self) -> ServiceResult<u64> {
        let mut total = 0;
        let mut after = String::new();
        let mut attempts = 0;
        loop {
            let page = self.store.unpriced_events(&after, 1000).await?;
            let Some(last) = page.last() else { break };
            let last_id = last.id.clone();
            let snapshot = self.reload_catalog().await?;
            let mut pricing = Vec::new();
            for e in &page {
                match price_with(
                    &snapshot,
                    self.margin,
                    &e.customer_id,
                    &e.provider,
                    &e.model,
                    e.timestamp,
                    &e.usage,
                ) {
                    Ok(Some((p, _))) => pricing.push((e.id.clone(), p)),
                    Ok(None) => {}
                    Err(err) => tracing::warn!(event = %e.id, error = %err, "cannot price event"),
                }
            }
            if !pricing.is_empty() {
                match self.store.price_events(&pricing, snapshot.revision).await {
                    Ok(n) => total += n,
                    Err(StoreError::CatalogChanged) if attempts < CATALOG_RETRIES => {
                        attempts += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            after = last_id;
        }
        Ok(total)
    }

    /// Price versions, optionally filtered; with `at`, only the version in force then.
    pub async fn prices(
        &self,
        provider: Option<&str>,
        model: Option<&str>,
        at: Option<DateTime<Utc>>,
    ) -> ServiceResult<Vec<PriceVersion>> {
        let (_, versions) = self.store.load_catalog().await?;
        let matching = versions.into_iter().filter(|v| {
            provider.is_none_or(|p| v.provider == p) && model.is_none_or(|m| v.model == m)
        });
        let Some(at) = at else {
            return Ok(matching.collect());
        };
        // Versions come sorted by (provider, model, effective_from).
        let mut by_pair: std::collections::BTreeMap<(String, String), Vec<PriceVersion>> =
            Default::default();
        for v in matching {
            by_pair
                .entry((v.provider.clone(), v.model.clone()))
                .or_default()
                .push(v);
        }
        Ok(by_pair
            .values()
            .filter_map(|versions| version_at(versions, at).cloned())
            .collect())
    }

    // ---- events ---------------------------------------------------------------------------

    /// Indexes of events whose customer does not exist.
    pub async fn unknown_customers(
        &self,
        events: &[(usize, UsageEvent)],
    ) -> ServiceResult<Vec<usize>> {
        let mut ids: Vec<String> = events
            .iter()
            .map(|(_, e)| e.customer_id.to_string())
            .collect();
        ids.sort();
        ids.dedup();
        let known = self.store.existing_customer_ids(&ids).await?;
        Ok(events
            .iter()
            .filter(|(_, e)| !known.contains(e.customer_id.as_str()))
            .map(|(i, _)| *i)
            .collect())
    }

    /// Records validated events (with their batch indexes) atomically, after checking for
    /// in-batch conflicts; returns after commit.
    pub async fn record_events(
        &self,
        events: Vec<(usize, UsageEvent)>,
        now: DateTime<Utc>,
    ) -> ServiceResult<IngestOutcome> {
        // Hashing and costing thousands of events is CPU work: it runs on the blocking pool
        // so that the async workers keep answering requests (gateway latency) meanwhile.
        let (mut unique, in_batch_duplicates) =
            tokio::task::spawn_blocking(move || dedupe_batch(events))
                .await
                .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))??;
        let mut snapshot = self.snapshot().await?;
        for _ in 0..CATALOG_RETRIES {
            let (snap, margin) = (snapshot.clone(), self.margin);
            let (returned, prepared) = tokio::task::spawn_blocking(move || {
                let prepared = prepare_batch(&snap, margin, &unique, now);
                (unique, prepared)
            })
            .await
            .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))?;
            unique = returned;
            let (prepared, hits) = prepared?;
            match self.store.insert_events(&prepared, snapshot.revision).await {
                Ok(InsertOutcome {
                    accepted,
                    duplicates,
                    unpriced,
                    inserted,
                }) => {
                    self.publish_live(&prepared, &inserted);
                    self.raise_floor_alerts(hits, now).await;
                    return Ok(IngestOutcome {
                        accepted,
                        duplicates: duplicates + in_batch_duplicates,
                        unpriced,
                        inserted,
                    });
                }
                Err(StoreError::CatalogChanged) => {
                    snapshot = self.reload_catalog().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::CatalogChanged.into())
    }

    // ---- usage ----------------------------------------------------------------------------

    /// Usage grouped by `group_by` over the events matching `filter`.
    pub async fn usage(
        &self,
        filter: &UsageFilter,
        group_by: Vec<GroupBy>,
    ) -> ServiceResult<Vec<(GroupKey, UsageTotals)>> {
        let mut agg = UsageAggregator::new(group_by);
        self.store.aggregate_usage(filter, &mut agg).await?;
        Ok(agg.finish())
    }

    /// Unpriced usage by model.
    pub async fn unpriced(&self, customer_id: Option<&str>) -> ServiceResult<Vec<UnpricedModel>> {
        Ok(self.store.unpriced_models(customer_id).await?)
    }
}
