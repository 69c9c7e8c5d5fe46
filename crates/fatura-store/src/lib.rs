//! # fatura-store
//!
//! The storage adapters of fatura. [`Store`] is the one interface the rest of fatura uses;
//! [`sqlite::SqliteStore`] (the embedded default) and [`postgres::PgStore`] (for fleets of
//! instances) implement it, each with its own migrations.
//!
//! Every statement is written once, in `shared.rs`, which both database modules compile as
//! their own (`sqlite::shared`, `postgres::shared`); `sqlite.rs` and `postgres.rs` keep only
//! what differs (pools, migrations, locks, rollup arithmetic, fleet features).
//!
//! Architecture Invariant: one SQL text per statement — no statement is written in both
//! `sqlite.rs` and `postgres.rs` (`tests/one_sql_text.rs`).
//!
//! Architecture Invariant: only this crate speaks SQL. All SQL uses bind parameters (or
//! `QueryBuilder::push_bind`); nothing is built with `format!` from input.
//!
//! Architecture Invariant: the store decides nothing about money. It inserts the costs it
//! is given and checks, inside the same transaction, that the catalog revision they were
//! computed from is still current (see [`Store::insert_events`]).

use fatura_core::status::{
    CustomerStatus, InvoiceKind, InvoiceStatus, MovementKind, PaymentKind, PaymentStatus,
};
use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use fatura_core::catalog::PriceVersion;
use fatura_core::import::ImportedPrice;
use fatura_core::rating::PlanTerms;
use fatura_core::usage::UsageAggregator;
use fatura_core::{Currency, UsageEvent};
use rust_decimal::Decimal;

pub mod postgres;
pub mod sqlite;
mod types;

/// Errors of the storage layer. The first variants are expected outcomes the API maps to
/// 4xx answers; `Internal` is anything unexpected.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An event id already exists with different content.
    #[error("event id {id:?} was already recorded with different content")]
    EventConflict {
        /// The conflicting id.
        id: String,
    },
    /// The price catalog changed after the caller costed its events; cost again and retry.
    #[error("the price catalog changed while the events were being costed")]
    CatalogChanged,
    /// A uniqueness or consistency rule would be broken (message explains which).
    #[error("{0}")]
    Conflict(String),
    /// Anything else (connection lost, corrupt data, …).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Internal(anyhow::Error::new(e))
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Internal(anyhow::Error::new(e))
    }
}

/// Whether an error is the database being out of reach (connection refused or lost, pool
/// exhausted or closed): callers answer 503 and may retry, rather than 500.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            // PostgreSQL shutting down or starting (SQLSTATE class 57: 57P01 admin shutdown,
            // 57P02 crash shutdown, 57P03 cannot connect now) or a connection exception (08).
            Some(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
            _ => false,
        })
}

/// Result alias.
pub type StoreResult<T> = Result<T, StoreError>;

/// A customer of the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    /// Id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Billing currency.
    pub currency: Currency,
    /// Prepaid customers' calls are reserved against and charged to their wallet.
    pub prepaid: bool,
    /// For postpaid customers: the most their calls may cost per UTC month (USD).
    pub monthly_spend_limit: Option<Decimal>,
    /// Billing cycle, tax and invoice language.
    pub billing: BillingSettings,
    /// The Stripe customer, created on first need.
    pub stripe_customer_id: Option<String>,
    /// Active, or suspended (unpaid invoices: the gateway refuses calls).
    pub status: CustomerStatus,
    /// Why suspended.
    pub status_reason: Option<String>,
    /// The saved payment method collections are charged to.
    pub payment_method_id: Option<String>,
    /// Prepaid: `(threshold, amount)` — when the balance drops under the threshold, the
    /// amount is charged.
    pub auto_top_up: Option<(Decimal, Decimal)>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A wallet movement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletTransaction {
    /// Id (`wtx_…`, or `charge:<event id>`).
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// A credit (purchased, granted) or a charge.
    pub kind: MovementKind,
    /// Positive for credits, negative for charges.
    pub amount: Decimal,
    /// Wallet currency.
    pub currency: Currency,
    /// The usage event a charge belongs to.
    pub event_id: Option<String>,
    /// When a credit expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// A stored API key. The key itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Key id (`key_…`), used to revoke it.
    pub id: String,
    /// Owner.
    pub customer_id: String,
    /// Hex SHA-256 of the key.
    pub key_hash: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Revocation time.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// An event ready to be written: validated, hashed and costed by the caller.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    /// The event.
    pub event: UsageEvent,
    /// Its content hash.
    pub content_hash: String,
    /// Pricing, or `None` when no catalog price applies (the event is unpriced).
    pub pricing: Option<EventPricing>,
    /// When fatura received it.
    pub ingested_at: DateTime<Utc>,
}

/// The catalog cost and provisional price of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPricing {
    /// The catalog version used.
    pub price_version_id: i64,
    /// Upstream cost, USD.
    pub cost: Decimal,
    /// Provisional price, USD.
    pub revenue: Decimal,
}

/// A newly recorded event as live views show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveEvent {
    /// Event id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// When the call happened.
    pub timestamp: DateTime<Utc>,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// The `agent` tag.
    pub agent: Option<String>,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Upstream cost, USD (`None`: unpriced).
    pub cost: Option<Decimal>,
    /// Provisional price, USD.
    pub price: Option<Decimal>,
}

impl LiveEvent {
    /// The live view of a prepared event.
    pub fn of(p: &PreparedEvent) -> LiveEvent {
        let e = &p.event;
        LiveEvent {
            id: e.id.to_string(),
            customer_id: e.customer_id.to_string(),
            timestamp: e.timestamp,
            provider: e.provider.clone(),
            model: e.model.clone(),
            agent: e.tags.get("agent").cloned(),
            input_tokens: e.usage.input(),
            output_tokens: e.usage.output(),
            cost: p.pricing.as_ref().map(|x| x.cost),
            price: p.pricing.as_ref().map(|x| x.revenue),
        }
    }

    /// Gross margin of the call, (price − cost) / price.
    pub fn margin(&self) -> Option<Decimal> {
        match (self.cost, self.price) {
            (Some(c), Some(p)) if !p.is_zero() => Some(((p - c) / p).round_dp(4)),
            _ => None,
        }
    }
}

/// Events recorded by any instance, as the database publishes them.
pub type LiveStream = futures_util::stream::BoxStream<'static, StoreResult<Vec<LiveEvent>>>;

/// What an insert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Newly recorded events.
    pub accepted: u64,
    /// Events already recorded with identical content.
    pub duplicates: u64,
    /// Of the newly recorded events, those without a catalog price.
    pub unpriced: u64,
    /// Ids of the newly recorded events.
    pub inserted: HashSet<String>,
}

/// A price import to store, already planned against the catalog at `expected_revision`.
#[derive(Debug, Clone)]
pub struct PriceImport {
    /// First instant the prices apply.
    pub effective_from: DateTime<Utc>,
    /// Where the prices came from (`openrouter`, `litellm`).
    pub source: String,
    /// When the import happened.
    pub imported_at: DateTime<Utc>,
    /// Versions to create, with the start of the next version of the same model.
    pub create: Vec<(ImportedPrice, Option<DateTime<Utc>>)>,
    /// The catalog revision the plan was made against.
    pub expected_revision: i64,
}

/// Filters of a usage query.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Events at or after.
    pub from: Option<DateTime<Utc>>,
    /// Events strictly before.
    pub to: Option<DateTime<Utc>>,
    /// Only this provider.
    pub provider: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// Tag equality filters (`tag.agent=sdr-bot`); keys are validated tag names.
    pub tags: Vec<(String, String)>,
}

/// Unpriced usage of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpricedModel {
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Events.
    pub events: u64,
    /// Requests.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Earliest event.
    pub first_timestamp: DateTime<Utc>,
    /// Latest event.
    pub last_timestamp: DateTime<Utc>,
}

/// An unpriced event that may now be priced.
#[derive(Debug, Clone)]
pub struct UnpricedEvent {
    /// Event id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Timestamp.
    pub timestamp: DateTime<Utc>,
    /// Counts.
    pub usage: fatura_core::TokenUsage,
}

/// How and when a customer is billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingSettings {
    /// Day of the month cycles start (1–28).
    pub anchor_day: u32,
    /// IANA time zone whose midnight starts a cycle.
    pub timezone: String,
    /// Days from finalisation to the due date.
    pub payment_terms_days: u32,
    /// Tax as a fraction of the subtotal (e.g. 0.05), if any.
    pub tax_rate: Option<Decimal>,
    /// Language of the invoice: `en` or `pt-BR`.
    pub locale: String,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            anchor_day: 1,
            timezone: "UTC".into(),
            payment_terms_days: 30,
            tax_rate: None,
            locale: "en".into(),
        }
    }
}

/// An invoice or a credit note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRecord {
    /// Id (`inv_…`, `cn_…`).
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// Invoice or credit note.
    pub kind: InvoiceKind,
    /// Gapless number, set at finalisation (`FAT-2026-000123`).
    pub number: Option<String>,
    /// Draft, open, paid or void.
    pub status: InvoiceStatus,
    /// Cycle start.
    pub period_start: DateTime<Utc>,
    /// Cycle end (exclusive).
    pub period_end: DateTime<Utc>,
    /// Currency.
    pub currency: Currency,
    /// Rated total before tax.
    pub subtotal: Decimal,
    /// Tax.
    pub tax: Decimal,
    /// subtotal + tax.
    pub total: Decimal,
    /// Paid from the prepaid wallet.
    pub prepaid_applied: Decimal,
    /// Wallet payments beyond the total, credited back.
    pub prepaid_excess: Decimal,
    /// total − prepaid_applied.
    pub amount_due: Decimal,
    /// The full breakdown, JSON.
    pub document: String,
    /// For credit notes: the invoice corrected.
    pub corrects_invoice_id: Option<String>,
    /// Events billed (for an invoice).
    pub events: i64,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Finalised.
    pub finalized_at: Option<DateTime<Utc>>,
    /// Due.
    pub due_at: Option<DateTime<Utc>>,
    /// Paid.
    pub paid_at: Option<DateTime<Utc>>,
    /// Voided.
    pub voided_at: Option<DateTime<Utc>>,
    /// Collection attempts.
    pub payment_attempts: i64,
    /// Processor reference (PaymentIntent or refund id).
    pub payment_reference: Option<String>,
    /// Last collection failure.
    pub last_payment_error: Option<String>,
}

/// One attempt to collect (or return) money through the payment processor. Its id is the
/// idempotency key sent with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    /// Id and idempotency key (`fatura-inv_…-attempt-2`, `fatura-topup-…`, `fatura-refund-…`).
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// Invoice (or credit note, for a refund).
    pub invoice_id: Option<String>,
    /// Invoice, top-up or refund.
    pub kind: PaymentKind,
    /// Amount.
    pub amount: Decimal,
    /// Currency.
    pub currency: Currency,
    /// Pending, succeeded or failed.
    pub status: PaymentStatus,
    /// Processor reference (PaymentIntent or refund id).
    pub reference: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// An outcome: value an agent generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeRecord {
    /// Id (idempotency key).
    pub id: String,
    /// Hash of the content (a replay with other content is a conflict).
    pub content_hash: String,
    /// Customer.
    pub customer_id: String,
    /// When.
    pub timestamp: DateTime<Utc>,
    /// The `agent` tag (empty when absent).
    pub agent: String,
    /// Kind (`conversion`, …).
    pub kind: String,
    /// Value.
    pub value: Decimal,
    /// Currency of the value.
    pub currency: Currency,
    /// All tags, JSON.
    pub tags: String,
    /// Recorded.
    pub created_at: DateTime<Utc>,
}

/// One event as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    /// Id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// Timestamp.
    pub timestamp: DateTime<Utc>,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Counts.
    pub usage: fatura_core::TokenUsage,
    /// Cost, USD (`None`: unpriced).
    pub cost: Option<Decimal>,
    /// Provisional revenue, USD.
    pub revenue: Option<Decimal>,
    /// Tags, JSON.
    pub tags: String,
    /// Upstream that served it (gateway).
    pub upstream: Option<String>,
}

/// A plan version: the plan's name and terms from `effective_from` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanVersionRecord {
    /// Plan id.
    pub plan_id: String,
    /// 1, 2, …
    pub version: i64,
    /// Display name.
    pub name: String,
    /// First instant the version applies.
    pub effective_from: DateTime<Utc>,
    /// The terms.
    pub terms: PlanTerms,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// From `effective_from` on, the customer is on `plan_id` (`None`: the default plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanAssignment {
    /// Customer.
    pub customer_id: String,
    /// First instant.
    pub effective_from: DateTime<Utc>,
    /// Plan.
    pub plan_id: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// An exchange rate: `rate` units of `currency` per 1 USD, published for `date`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FxRate {
    /// Target currency (not USD).
    pub currency: Currency,
    /// The day it applies from.
    pub date: NaiveDate,
    /// Units of `currency` per USD.
    pub rate: Decimal,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// A change to the pricing inputs. Each is written in one transaction that also bumps the
/// catalog revision, so that events being costed and rated meanwhile are rated again.
#[derive(Debug, Clone)]
pub enum PricingChange {
    /// A new plan with its first version; `Conflict` if the id exists.
    CreatePlan(PlanVersionRecord),
    /// A new version of an existing plan; `Conflict` if that version number exists.
    AddPlanVersion(PlanVersionRecord),
    /// A plan assignment; `Conflict` if the customer already has one at that instant.
    AssignPlan(PlanAssignment),
    /// An exchange rate; the same rate again is a no-op, another rate for the same day is a
    /// `Conflict` (rates, once used, are history).
    PutFxRate(FxRate),
}

/// Every pricing input.
#[derive(Debug, Clone, Default)]
pub struct PricingData {
    /// Every version of every plan, by plan id then version.
    pub versions: Vec<PlanVersionRecord>,
    /// Every assignment, by customer then time.
    pub assignments: Vec<PlanAssignment>,
    /// Every rate, by currency then date.
    pub fx_rates: Vec<FxRate>,
}

/// An operator alert, deduplicated by `dedupe_key`: raising it again bumps `occurrences`
/// and `last_seen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRecord {
    /// Id (`alr_…`).
    pub id: String,
    /// What makes two alerts the same.
    pub dedupe_key: String,
    /// `floor_applied`, …
    pub kind: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// Customer concerned.
    pub customer_id: Option<String>,
    /// Plan concerned.
    pub plan_id: Option<String>,
    /// Provider concerned.
    pub provider: Option<String>,
    /// Model concerned.
    pub model: Option<String>,
    /// Machine-readable reason.
    pub reason: Option<String>,
    /// For people.
    pub message: String,
    /// First raised.
    pub first_seen: DateTime<Utc>,
    /// Last raised.
    pub last_seen: DateTime<Utc>,
    /// Times raised.
    pub occurrences: i64,
}

/// A stored event as rating reads it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Id.
    pub id: String,
    /// Timestamp.
    pub timestamp: DateTime<Utc>,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Counts.
    pub usage: fatura_core::TokenUsage,
    /// Catalog version it was costed with (`None`: unpriced).
    pub price_version_id: Option<i64>,
    /// Its cost, USD.
    pub cost: Option<Decimal>,
    /// Its provisional price, USD (what a prepaid wallet was charged).
    pub revenue: Option<Decimal>,
}

/// What a budget share (see [`Store::grant_hold`]) is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldBasis {
    /// A prepaid wallet: the credits still valid minus every charge (a lower bound of the
    /// balance, equal to it unless a credit expired after being partly spent).
    Wallet,
    /// A postpaid monthly spend limit: the limit minus the month's committed revenue.
    MonthlyLimit {
        /// The limit (USD).
        limit: Decimal,
        /// The first instant of the UTC month.
        month_start: DateTime<Utc>,
    },
}

/// A request to grow one instance's share of a customer's budget.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    /// Whose budget.
    pub customer_id: &'a str,
    /// The instance asking.
    pub instance_id: &'a str,
    /// What the budget is.
    pub basis: HoldBasis,
    /// The least the share must grow by (may be zero: a renewal that re-checks the share).
    pub need: Decimal,
    /// How much more the instance would like (room for its next calls).
    pub spare: Decimal,
    /// Now.
    pub now: DateTime<Utc>,
    /// Until when the share is live.
    pub until: DateTime<Utc>,
}

/// The answer to a [`HoldRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldGrant {
    /// The share grew by this much (at least `need`).
    Granted(Decimal),
    /// Not enough is left: what this instance could still have been granted.
    Short(Decimal),
}

/// One instance's share of a customer's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRow {
    /// The instance.
    pub instance_id: String,
    /// Budget set aside by it (open reservations and prices not yet written).
    pub amount: Decimal,
    /// Whether the share is live (renewed in time).
    pub live: bool,
}

/// The storage interface of fatura.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;
    /// Checks the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a customer; `Conflict` if the id exists.
    async fn create_customer(&self, customer: &Customer) -> StoreResult<()>;
    /// Sets (or clears) a customer's monthly spend limit; false if no such customer.
    async fn set_spend_limit(&self, id: &str, limit: Option<Decimal>) -> StoreResult<bool>;
    /// One customer.
    async fn get_customer(&self, id: &str) -> StoreResult<Option<Customer>>;
    /// All customers, by id.
    async fn list_customers(&self) -> StoreResult<Vec<Customer>>;
    /// Which of `ids` exist.
    async fn existing_customer_ids(&self, ids: &[String]) -> StoreResult<HashSet<String>>;

    /// Records a wallet credit.
    async fn add_wallet_credit(&self, credit: &WalletTransaction) -> StoreResult<()>;
    /// Every movement of a customer's wallet, oldest first.
    async fn wallet_transactions(&self, customer_id: &str) -> StoreResult<Vec<WalletTransaction>>;
    /// Up to `limit` movements of a customer's wallet, oldest first, starting after the
    /// movement `after` (from the first without it); `None` when `after` is not a movement of
    /// this customer's wallet.
    async fn wallet_transactions_page(
        &self,
        customer_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Option<Vec<WalletTransaction>>>;

    /// Stores a new API key.
    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    /// The active (not revoked) key with this hash.
    async fn find_active_api_key(&self, key_hash: &str) -> StoreResult<Option<ApiKeyRecord>>;
    /// Keys of a customer.
    async fn list_api_keys(&self, customer_id: &str) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes a key; false if no such active key.
    async fn revoke_api_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<bool>;

    /// The catalog revision: a counter bumped by every import that creates versions.
    async fn catalog_revision(&self) -> StoreResult<i64>;
    /// Every price version with the revision they belong to, read consistently.
    async fn load_catalog(&self) -> StoreResult<(i64, Vec<PriceVersion>)>;
    /// Creates the planned versions in one transaction. Fails with `CatalogChanged` if the
    /// revision moved since planning, and with `Conflict` if a new version would start
    /// before events that are already costed with another version.
    async fn import_prices(&self, import: &PriceImport) -> StoreResult<i64>;

    /// Writes events atomically: all or nothing. Events are unique by id within the call.
    /// An id already stored with the same content hash counts as a duplicate; with another
    /// hash the whole call fails with `EventConflict`. Fails with `CatalogChanged` if the
    /// catalog revision is no longer `catalog_revision`. A newly recorded event with a
    /// `prepaid_charge` gets its wallet charge in the same transaction (`currency` of the
    /// customer). Returns after commit.
    async fn insert_events(
        &self,
        events: &[PreparedEvent],
        catalog_revision: i64,
    ) -> StoreResult<InsertOutcome>;
    /// Feeds every event matching `filter` to `agg`.
    async fn aggregate_usage(
        &self,
        filter: &UsageFilter,
        agg: &mut UsageAggregator,
    ) -> StoreResult<()>;
    /// Unpriced usage grouped by model.
    async fn unpriced_models(&self, customer_id: Option<&str>) -> StoreResult<Vec<UnpricedModel>>;
    /// Up to `limit` unpriced events with id greater than `after`, by id.
    async fn unpriced_events(&self, after: &str, limit: u32) -> StoreResult<Vec<UnpricedEvent>>;
    /// Prices previously unpriced events (skips any that got priced meanwhile). Fails with
    /// `CatalogChanged` if the revision moved.
    async fn price_events(
        &self,
        pricing: &[(String, EventPricing)],
        catalog_revision: i64,
    ) -> StoreResult<u64>;
    /// Number of stored events (for tests and metrics).
    async fn count_events(&self) -> StoreResult<u64>;

    /// Applies a pricing change and bumps the catalog revision (see [`PricingChange`]).
    /// Returns the new revision.
    async fn apply_pricing_change(&self, change: &PricingChange) -> StoreResult<i64>;
    /// Every plan version, assignment and exchange rate. Read after the catalog revision
    /// (`load_catalog`), so that a snapshot is never newer than the revision it is labelled
    /// with.
    async fn load_pricing(&self) -> StoreResult<PricingData>;
    /// Raises an alert (insert, or bump the one with the same `dedupe_key`).
    async fn raise_alert(&self, alert: &AlertRecord) -> StoreResult<()>;
    /// Alerts, most recently seen first.
    async fn list_alerts(&self) -> StoreResult<Vec<AlertRecord>>;
    /// A customer's events with `from <= timestamp < to`.
    async fn customer_events(
        &self,
        customer_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Ids of the price versions imported at or after `since`.
    async fn versions_imported_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<i64>>;

    /// Sets a customer's billing settings; false if no such customer.
    async fn update_billing_settings(&self, id: &str, s: &BillingSettings) -> StoreResult<bool>;
    /// Sets a customer's status and its reason.
    async fn set_customer_status(
        &self,
        id: &str,
        status: CustomerStatus,
        reason: Option<&str>,
    ) -> StoreResult<bool>;
    /// Records the customer's Stripe id (only if it has none yet); returns the id it has.
    async fn set_stripe_customer_id(&self, id: &str, stripe_id: &str) -> StoreResult<String>;
    /// A customer's events before `before` not billed by any invoice yet.
    async fn uninvoiced_events(
        &self,
        customer_id: &str,
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Inserts a draft invoice; false when the cycle already has a live invoice.
    async fn create_invoice(&self, invoice: &InvoiceRecord) -> StoreResult<bool>;
    /// Replaces a draft's figures; false if it is no longer a draft.
    async fn update_draft(&self, invoice: &InvoiceRecord) -> StoreResult<bool>;
    /// Finalises a draft in one transaction: claims it (`Conflict` if it is not a draft),
    /// links every unbilled *priced* event of its customer before `period_end` to it (an
    /// unpriced event stays unbilled until priced) — failing with `Ok(None)` (nothing
    /// written) unless they are exactly `invoice.events`, i.e. exactly the events rated — gives it the next number of `series` (`FAT-2026` →
    /// `FAT-2026-000001`), stores its figures, and records `rebate` (a wallet credit).
    async fn finalize_invoice(
        &self,
        invoice: &InvoiceRecord,
        series: &str,
        rebate: Option<&WalletTransaction>,
    ) -> StoreResult<Option<InvoiceRecord>>;
    /// Issues a credit note (numbered in `series`) against its invoice; `Conflict` when the
    /// invoice is not finalised or the notes would exceed its total.
    async fn issue_credit_note(
        &self,
        note: &InvoiceRecord,
        series: &str,
    ) -> StoreResult<InvoiceRecord>;
    /// Voids a draft or unpaid invoice and releases its events for a reissue; `Conflict`
    /// for a paid invoice or a credit note.
    async fn void_invoice(&self, id: &str, at: DateTime<Utc>) -> StoreResult<InvoiceRecord>;
    /// One invoice or credit note.
    async fn get_invoice(&self, id: &str) -> StoreResult<Option<InvoiceRecord>>;
    /// Invoices and credit notes, newest period first.
    async fn list_invoices(
        &self,
        customer_id: Option<&str>,
        status: Option<InvoiceStatus>,
    ) -> StoreResult<Vec<InvoiceRecord>>;
    /// Sets (or clears) a customer's automatic top-up `(threshold, amount)`.
    async fn set_auto_top_up(
        &self,
        id: &str,
        rule: Option<(Decimal, Decimal)>,
    ) -> StoreResult<bool>;
    /// Records the customer's saved payment method (and its processor customer id).
    async fn set_payment_method(&self, id: &str, payment_method: &str) -> StoreResult<bool>;
    /// Inserts a payment attempt; false if its id exists.
    async fn insert_payment(&self, p: &PaymentRecord) -> StoreResult<bool>;
    /// Claims the right to push again a pending payment that has no processor reference
    /// (its pusher may have died): true for exactly one caller that saw it last updated at
    /// `seen`; the payment's `updated_at` becomes `now`.
    async fn claim_payment_push(
        &self,
        id: &str,
        seen: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Moves a pending payment to `succeeded` or `failed` (or records its reference);
    /// returns it, or `None` if there is no such payment. A payment already settled keeps
    /// its status (a repeated outcome changes nothing).
    async fn settle_payment(
        &self,
        id: &str,
        status: PaymentStatus,
        reference: Option<&str>,
        error: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<(PaymentRecord, bool)>>;
    /// One payment.
    async fn get_payment(&self, id: &str) -> StoreResult<Option<PaymentRecord>>;
    /// Payments of a customer, oldest first (optionally of one invoice).
    async fn list_payments(
        &self,
        customer_id: &str,
        invoice_id: Option<&str>,
    ) -> StoreResult<Vec<PaymentRecord>>;
    /// Takes or renews the lease `name` for `owner` until `until`: true when `owner` holds
    /// it now (it was free, had run out before `now`, or was already `owner`'s).
    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Gives the lease up if `owner` holds it.
    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<()>;
    /// Subscribes to the events every instance records, when the database publishes them
    /// (PostgreSQL: `LISTEN`, sent by the inserting transaction on commit); `None` when each
    /// process publishes its own (SQLite: one process per file).
    async fn listen_live(&self) -> StoreResult<Option<LiveStream>> {
        Ok(None)
    }
    /// Whether [`Store::listen_live`] delivers the events this process records too (then the
    /// process must not also publish them itself).
    fn publishes_live(&self) -> bool {
        false
    }
    /// Whether several processes may share this database (PostgreSQL). Budgets and rate
    /// limits are then kept in it ([`Store::grant_hold`], [`Store::count_rate`]); otherwise
    /// the one process keeps them in memory.
    fn shared(&self) -> bool {
        false
    }
    /// Grows `instance_id`'s share of a customer's budget, under a per-customer lock, by
    /// `need` plus up to `spare` (at most a quarter of what would be left), only if every
    /// live share of other instances plus this instance's whole share (live or not) stays
    /// within the budget; the share is live until `until`.
    async fn grant_hold(&self, _req: &HoldRequest<'_>) -> StoreResult<HoldGrant> {
        Err(needs_shared_database("budget shares"))
    }
    /// Shrinks `instance_id`'s share by `release` and, if it is still live at `now`, extends
    /// it to `until`. Returns whether it is live.
    async fn trim_hold(
        &self,
        _customer_id: &str,
        _instance_id: &str,
        _release: Decimal,
        _now: DateTime<Utc>,
        _until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        Ok(false)
    }
    /// Gives up every share of `instance_id` (a clean stop, after its events are written).
    async fn release_holds(&self, _instance_id: &str) -> StoreResult<()> {
        Ok(())
    }
    /// Every instance's share of a customer's budget.
    async fn holds(&self, _customer_id: &str, _now: DateTime<Utc>) -> StoreResult<Vec<HoldRow>> {
        Ok(Vec::new())
    }
    /// Counts a call of `tokens` for `key_id` in the minute window starting at `window_us`
    /// unless it would pass `rpm` requests or `tpm` tokens (0: no limit; a call larger than
    /// `tpm` on its own is admitted into an empty window). Returns whether it was admitted.
    async fn count_rate(
        &self,
        _key_id: &str,
        _window_us: i64,
        _tokens: u64,
        _rpm: u64,
        _tpm: u64,
    ) -> StoreResult<bool> {
        Err(needs_shared_database("shared rate limits"))
    }
    /// Deletes rate-limit windows that started before `before_us`.
    async fn prune_rate_windows(&self, _before_us: i64) -> StoreResult<()> {
        Ok(())
    }
    /// Remembers a webhook event id; false if it was seen before.
    async fn record_webhook(&self, id: &str, kind: &str, at: DateTime<Utc>) -> StoreResult<bool>;

    /// A counter that changes whenever another process commits to the database (SQLite:
    /// `PRAGMA data_version` of the write connection), so that a process keeping state in
    /// memory can tell when to refresh it. `None` where that is not needed (PostgreSQL:
    /// shared state is read from the database).
    async fn external_writes(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }
    /// Rollup rows of `grain` with `from <= bucket < to`, summed in the database over the
    /// dimensions `by` does not keep: of one customer; or of every customer when `by` keeps
    /// the customer or the agent; else the fleet rows (`customer_id` = [`fatura_core::rollup::FLEET`]).
    async fn query_rollups(
        &self,
        grain: fatura_core::rollup::Grain,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
        by: fatura_core::rollup::Dims,
    ) -> StoreResult<
        Vec<(
            fatura_core::rollup::RollupKey,
            fatura_core::rollup::RollupTotals,
        )>,
    >;
    /// Recounts every rollup row from the raw events (for checks and backfills); minute rows
    /// only from the current [`fatura_core::rollup::minute_cutoff`] on.
    async fn recount_rollups(&self) -> StoreResult<fatura_core::rollup::RollupDelta>;
    /// Deletes minute-grain rollup rows of buckets before `before`; returns how many.
    async fn prune_minute_rollups(&self, before: DateTime<Utc>) -> StoreResult<u64>;
    /// Records outcomes atomically; returns (accepted, duplicates). An id stored with other
    /// content fails the whole call with `EventConflict`.
    async fn insert_outcomes(&self, outcomes: &[OutcomeRecord]) -> StoreResult<(u64, u64)>;
    /// Outcomes with `from <= timestamp < to`, optionally of one customer.
    async fn query_outcomes(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        customer_id: Option<&str>,
    ) -> StoreResult<Vec<OutcomeRecord>>;
    /// Up to `limit` events matching `filter`, in `(timestamp, id)` order, after `after`
    /// (keyset pagination for streaming exports).
    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> StoreResult<Vec<ExportRow>>;
    /// Records a collection attempt's outcome: `paid_at` set → paid; else the failure.
    async fn record_payment(
        &self,
        id: &str,
        reference: Option<&str>,
        paid_at: Option<DateTime<Utc>>,
        error: Option<&str>,
    ) -> StoreResult<Option<InvoiceRecord>>;
}

/// Opens the store for a database URL: `sqlite://path` (created if missing) or
/// `postgres://…`.
pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(
            postgres::PgStore::connect(url, max_connections).await?,
        ))
    } else {
        Err(StoreError::Internal(anyhow::anyhow!(
            "unsupported database URL (expected sqlite://PATH or postgres://…)"
        )))
    }
}

/// The answer of a store that one process owns to a method that needs a database shared by
/// a fleet (the defaults of [`Store::grant_hold`] and [`Store::count_rate`]).
pub(crate) fn needs_shared_database(what: &str) -> StoreError {
    StoreError::Internal(anyhow::anyhow!(
        "{what} need a shared database (PostgreSQL)"
    ))
}

pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("timestamp out of range: {us}")))
}

pub(crate) fn count(v: i64) -> StoreResult<u64> {
    u64::try_from(v)
        .map_err(|_| StoreError::Internal(anyhow::anyhow!("negative count in database: {v}")))
}

pub(crate) fn terms_json(terms: &PlanTerms) -> StoreResult<String> {
    serde_json::to_string(terms).map_err(|e| StoreError::Internal(anyhow::anyhow!(e)))
}

pub(crate) fn parse_terms(json: &str) -> StoreResult<PlanTerms> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Internal(anyhow::anyhow!("bad plan terms in database: {e}")))
}

/// Chunk sizes of multi-row statements (INSERT … VALUES and IN lists), largest first. A batch
/// is cut greedily into chunks of these sizes, so each statement has at most five shapes:
/// each is prepared once per connection and then reused from the connection's statement
/// cache. Cut to the batch's own size instead, every batch size was a new statement text:
/// prepared again on a cache miss, and the cache (100 per connection) slowly filled with
/// ever larger programs as the batches of a growing ledger grew — a gateway's memory went
/// up ~0.2 MiB a minute under steady load. 256 rows × 20 binds stays well under both
/// databases' limits.
pub(crate) const CHUNK_LADDER: [usize; 5] = [256, 64, 16, 4, 1];

/// `items` in chunks whose sizes are from [`CHUNK_LADDER`], in order.
pub(crate) fn ladder_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = CHUNK_LADDER
            .iter()
            .copied()
            .find(|&s| s <= rest.len())
            .unwrap_or(1);
        let (head, tail) = rest.split_at(size);
        rest = tail;
        Some(head)
    })
}

/// The `agent` tag of an event's stored tags (JSON object text).
pub(crate) fn agent_of(tags_json: &str) -> Option<String> {
    serde_json::from_str::<std::collections::BTreeMap<String, String>>(tags_json)
        .ok()
        .and_then(|m| m.get("agent").cloned())
}

/// The rollup delta of newly inserted events.
pub(crate) fn delta_of_inserted(
    events: &[PreparedEvent],
    inserted: &HashSet<String>,
) -> fatura_core::rollup::RollupDelta {
    let mut delta = fatura_core::rollup::RollupDelta::new();
    let minute_since = fatura_core::rollup::minute_cutoff(chrono::Utc::now());
    for p in events
        .iter()
        .filter(|p| inserted.contains(p.event.id.as_str()))
    {
        let e = &p.event;
        let t = fatura_core::rollup::RollupTotals::of_event(
            &e.usage,
            p.pricing.as_ref().map(|x| (x.cost, x.revenue)),
        );
        fatura_core::rollup::add_event(
            &mut delta,
            e.customer_id.as_str(),
            &e.provider,
            &e.model,
            e.tags.get("agent").map(String::as_str),
            e.timestamp,
            &t,
            minute_since,
        );
    }
    delta
}

/// The grouping part of a rollup query: the select list of the key columns (a dimension not
/// kept reads as empty, the bucket as `from_us`) and the `GROUP BY` list.
pub(crate) fn rollup_group(by: fatura_core::rollup::Dims, from_us: i64) -> (String, String) {
    let mut select = String::from("grain, ");
    let mut group = String::from("grain");
    if by.bucket {
        select.push_str("bucket_us");
        group.push_str(", bucket_us");
    } else {
        select.push_str(&format!("CAST({from_us} AS BIGINT) AS bucket_us"));
    }
    for (keep, col) in [
        (by.customer, "customer_id"),
        (by.provider, "provider"),
        (by.model, "model"),
        (by.agent, "agent"),
    ] {
        if keep {
            select.push_str(&format!(", {col}"));
            group.push_str(&format!(", {col}"));
        } else {
            select.push_str(&format!(", '' AS {col}"));
        }
    }
    (select, group)
}

/// The summed counters of a rollup query (cast: PostgreSQL sums BIGINT as NUMERIC).
pub(crate) fn rollup_count_sums() -> String {
    [
        "events",
        "requests",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "unpriced_events",
    ]
    .iter()
    .map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}"))
    .collect::<Vec<_>>()
    .join(", ")
}

pub(crate) fn grain_of(s: &str) -> StoreResult<fatura_core::rollup::Grain> {
    fatura_core::rollup::Grain::parse(s)
        .ok_or_else(|| StoreError::Internal(anyhow::anyhow!("bad grain {s:?} in database")))
}

#[cfg(test)]
mod chunk_tests {
    use super::{CHUNK_LADDER, ladder_chunks};

    #[test]
    fn ladder_chunks_cover_every_item_once_in_order_with_few_shapes() {
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0..2_000usize {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = ladder_chunks(&items).collect();
            assert_eq!(chunks.concat(), items, "n = {n}");
            for c in &chunks {
                assert!(
                    CHUNK_LADDER.contains(&c.len()),
                    "n = {n}: chunk of {}",
                    c.len()
                );
                shapes.insert(c.len());
            }
            // Greedy: never more than three chunks of a size below the largest.
            for &size in &CHUNK_LADDER[1..] {
                assert!(
                    chunks.iter().filter(|c| c.len() == size).count() <= 3,
                    "n = {n}"
                );
            }
        }
        assert_eq!(shapes.len(), CHUNK_LADDER.len());
    }
}
