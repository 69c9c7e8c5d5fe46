//! Payment collection. fatura is the system of record for invoices; a payment processor
//! (Stripe, behind [`PaymentProcessor`]) moves the money. Every attempt is a row in the
//! `payments` table whose id is the idempotency key sent to the processor, written before
//! the push: a push retried after a crash or a timeout reuses the key, so the processor
//! charges once. Outcomes arrive synchronously and through signed webhooks; both settle the
//! same row, and only its first settlement counts.
//!
//! The Stripe client is a thin typed client over reqwest rather than `async-stripe`: fatura
//! needs five endpoints, and the crate's generated client pins API versions and shapes that
//! the Stripe fake used in tests (localstripe, API 2017-08-15) does not serve.

use fatura_core::status::{
    CustomerStatus, InvoiceKind, InvoiceStatus, MovementKind, PaymentKind, PaymentStatus,
};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fatura_core::{Currency, Money};
use fatura_store::{Customer, InvoiceRecord, PaymentRecord, WalletTransaction};
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::{Fatura, ServiceError, ServiceResult};

/// A processor failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProcessorError {
    /// The processor could not be reached or answered 5xx: retry later with the same key.
    #[error("payment processor unavailable: {0}")]
    Unavailable(String),
    /// The processor refused the request (not a card decline).
    #[error("payment processor refused the request: {0}")]
    Rejected(String),
}

/// What a charge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Collected (or accepted for collection); the webhook confirms it.
    Accepted {
        /// Processor reference (PaymentIntent id).
        reference: String,
    },
    /// The card was declined.
    Declined {
        /// Why.
        message: String,
    },
}

/// A charge to make.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    /// The processor's customer.
    pub processor_customer: String,
    /// Saved payment method.
    pub payment_method: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: Currency,
    /// Idempotency key (fatura's payment id).
    pub idempotency_key: String,
    /// Metadata attached to the charge (the fatura ids).
    pub metadata: Vec<(String, String)>,
}

/// A verified webhook event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// Event id (repeats are ignored).
    pub id: String,
    /// Event type, e.g. `payment_intent.succeeded`.
    pub kind: String,
    /// `fatura_payment_id` from the object's metadata.
    pub payment_id: Option<String>,
    /// The object's id (PaymentIntent id).
    pub reference: Option<String>,
    /// The failure message, for failures.
    pub error: Option<String>,
}

/// The payment processor interface (Stripe today; PayPal or another tomorrow).
#[async_trait]
pub trait PaymentProcessor: Send + Sync + 'static {
    /// `stripe`, …
    fn name(&self) -> &'static str;
    /// Creates the processor-side customer; returns its id.
    async fn create_customer(&self, c: &Customer) -> Result<String, ProcessorError>;
    /// Attaches a payment method to the processor customer and makes it the default.
    async fn attach_payment_method(
        &self,
        processor_customer: &str,
        payment_method: &str,
    ) -> Result<(), ProcessorError>;
    /// Charges off-session.
    async fn charge(&self, req: &ChargeRequest) -> Result<ChargeOutcome, ProcessorError>;
    /// Refunds part of a charge; returns the refund's id.
    async fn refund(
        &self,
        reference: &str,
        amount_minor: i64,
        idempotency_key: &str,
    ) -> Result<String, ProcessorError>;
    /// Verifies a webhook's signature and parses it.
    fn verify_webhook(
        &self,
        signature: Option<&str>,
        payload: &[u8],
        now: DateTime<Utc>,
    ) -> Result<WebhookEvent, String>;
}

/// Seconds a webhook's timestamp may differ from now.
pub const WEBHOOK_TOLERANCE_SECS: i64 = 300;

/// Verifies a `Stripe-Signature` header (`t=<unix>,v1=<hex>[,v1=…]`): an HMAC-SHA256 of
/// `"{t}.{payload}"` with `secret`, compared in constant time, and `t` within
/// [`WEBHOOK_TOLERANCE_SECS`] of `now`.
pub fn verify_stripe_signature(
    header: Option<&str>,
    payload: &[u8],
    secret: &str,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let header = header.ok_or("missing Stripe-Signature header")?;
    let mut t: Option<i64> = None;
    let mut sigs: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse().ok(),
            Some(("v1", v)) => {
                if let Ok(bytes) = hex::decode(v) {
                    sigs.push(bytes);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or("Stripe-Signature has no timestamp")?;
    if (now.timestamp() - t).abs() > WEBHOOK_TOLERANCE_SECS {
        return Err("Stripe-Signature timestamp is outside the tolerance".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| "bad webhook secret".to_string())?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    let expected = mac.finalize().into_bytes();
    if sigs
        .iter()
        .any(|s| bool::from(s.as_slice().ct_eq(expected.as_slice())))
    {
        Ok(())
    } else {
        Err("Stripe-Signature does not match".into())
    }
}

/// Stripe (or a Stripe-compatible fake) over its REST API.
pub struct StripeProcessor {
    client: reqwest::Client,
    base: String,
    api_key: String,
    webhook_secret: String,
}

impl std::fmt::Debug for StripeProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are never printed.
        f.debug_struct("StripeProcessor")
            .field("base", &self.base)
            .finish()
    }
}

impl StripeProcessor {
    /// A client of `base` (e.g. `https://api.stripe.com`).
    pub fn new(base: &str, api_key: &str, webhook_secret: &str) -> Self {
        StripeProcessor {
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            webhook_secret: webhook_secret.to_string(),
        }
    }

    async fn post(
        &self,
        path: &str,
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<(u16, Value), ProcessorError> {
        let mut req = self
            .client
            .post(format!("{}{}", self.base, path))
            .basic_auth(&self.api_key, Some(""))
            .form(form);
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let res = req
            .send()
            .await
            .map_err(|e| ProcessorError::Unavailable(e.without_url().to_string()))?;
        let status = res.status().as_u16();
        let body: Value = res
            .json()
            .await
            .map_err(|e| ProcessorError::Unavailable(e.without_url().to_string()))?;
        if status >= 500 || status == 429 {
            return Err(ProcessorError::Unavailable(format!("HTTP {status}")));
        }
        Ok((status, body))
    }

    fn ok(status: u16, body: &Value) -> Result<(), ProcessorError> {
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ProcessorError::Rejected(
                body["error"]["message"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_string(),
            ))
        }
    }
}

fn kv(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}

#[async_trait]
impl PaymentProcessor for StripeProcessor {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn create_customer(&self, c: &Customer) -> Result<String, ProcessorError> {
        let (status, body) = self
            .post(
                "/v1/customers",
                &[
                    kv("name", c.name.clone()),
                    kv("metadata[fatura_customer_id]", c.id.clone()),
                ],
                Some(&format!("fatura-customer-{}", c.id)),
            )
            .await?;
        Self::ok(status, &body)?;
        body["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ProcessorError::Rejected("no customer id in the answer".into()))
    }

    async fn attach_payment_method(
        &self,
        processor_customer: &str,
        payment_method: &str,
    ) -> Result<(), ProcessorError> {
        let (status, body) = self
            .post(
                &format!("/v1/payment_methods/{payment_method}/attach"),
                &[kv("customer", processor_customer)],
                None,
            )
            .await?;
        Self::ok(status, &body)?;
        let (status, body) = self
            .post(
                &format!("/v1/customers/{processor_customer}"),
                &[kv(
                    "invoice_settings[default_payment_method]",
                    payment_method,
                )],
                None,
            )
            .await?;
        Self::ok(status, &body)
    }

    async fn charge(&self, req: &ChargeRequest) -> Result<ChargeOutcome, ProcessorError> {
        let mut form = vec![
            kv("amount", req.amount_minor.to_string()),
            kv("currency", req.currency.code().to_ascii_lowercase()),
            kv("customer", req.processor_customer.clone()),
            kv("payment_method", req.payment_method.clone()),
            kv("confirm", "true"),
            kv("off_session", "true"),
        ];
        for (k, v) in &req.metadata {
            form.push(kv(&format!("metadata[{k}]"), v.clone()));
        }
        let (status, body) = self
            .post("/v1/payment_intents", &form, Some(&req.idempotency_key))
            .await?;
        if (200..300).contains(&status) {
            let reference = body["id"].as_str().unwrap_or_default().to_string();
            return Ok(match body["status"].as_str() {
                Some("succeeded") | Some("processing") => ChargeOutcome::Accepted { reference },
                other => ChargeOutcome::Declined {
                    message: format!("payment intent is {}", other.unwrap_or("unknown")),
                },
            });
        }
        if status == 402 || body["error"]["code"].as_str() == Some("card_declined") {
            return Ok(ChargeOutcome::Declined {
                message: body["error"]["message"]
                    .as_str()
                    .unwrap_or("card declined")
                    .to_string(),
            });
        }
        Err(ProcessorError::Rejected(
            body["error"]["message"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }

    async fn refund(
        &self,
        reference: &str,
        amount_minor: i64,
        idempotency_key: &str,
    ) -> Result<String, ProcessorError> {
        let (status, body) = self
            .post(
                "/v1/refunds",
                &[
                    kv("payment_intent", reference),
                    kv("amount", amount_minor.to_string()),
                ],
                Some(idempotency_key),
            )
            .await?;
        Self::ok(status, &body)?;
        Ok(body["id"].as_str().unwrap_or_default().to_string())
    }

    fn verify_webhook(
        &self,
        signature: Option<&str>,
        payload: &[u8],
        now: DateTime<Utc>,
    ) -> Result<WebhookEvent, String> {
        verify_stripe_signature(signature, payload, &self.webhook_secret, now)?;
        let v: Value = serde_json::from_slice(payload)
            .map_err(|e| format!("webhook body is not JSON: {e}"))?;
        let id = v["id"]
            .as_str()
            .filter(|s| !s.is_empty() && s.len() <= 255)
            .ok_or("webhook event has no id")?
            .to_string();
        let kind = v["type"]
            .as_str()
            .ok_or("webhook event has no type")?
            .to_string();
        let object = &v["data"]["object"];
        Ok(WebhookEvent {
            id,
            kind,
            payment_id: object["metadata"]["fatura_payment_id"]
                .as_str()
                .map(str::to_string),
            reference: object["id"].as_str().map(str::to_string),
            error: object["last_payment_error"]["message"]
                .as_str()
                .map(str::to_string),
        })
    }
}

/// How long a pending payment without a processor reference must have been quiet before
/// another collector pushes it again (its pusher is presumed dead).
pub const PUSH_STALE: chrono::Duration = chrono::Duration::seconds(60);

/// Collection policy.
#[derive(Debug, Clone, Copy)]
pub struct CollectionPolicy {
    /// Failed attempts on one invoice before the customer is suspended.
    pub max_attempts: i64,
    /// Wait between attempts.
    pub retry_after: chrono::Duration,
}

impl Default for CollectionPolicy {
    fn default() -> Self {
        CollectionPolicy {
            max_attempts: 3,
            retry_after: chrono::Duration::hours(24),
        }
    }
}

/// Collects invoices and top-ups through a processor and applies webhook outcomes.
pub struct Collector {
    fatura: Arc<Fatura>,
    processor: Arc<dyn PaymentProcessor>,
    policy: CollectionPolicy,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("processor", &self.processor.name())
            .finish()
    }
}

fn minor_units(amount: Decimal, currency: Currency) -> ServiceResult<i64> {
    Money::new(amount, currency)
        .to_minor_units()
        .map_err(|e| ServiceError::Internal(anyhow::anyhow!(e)))
}

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(anyhow::anyhow!("{e}"))
}

impl Collector {
    /// A collector.
    pub fn new(
        fatura: Arc<Fatura>,
        processor: Arc<dyn PaymentProcessor>,
        policy: CollectionPolicy,
    ) -> Self {
        Collector {
            fatura,
            processor,
            policy,
        }
    }

    /// The processor.
    pub fn processor(&self) -> &Arc<dyn PaymentProcessor> {
        &self.processor
    }

    /// The customer's processor id, creating the processor customer on first need.
    async fn processor_customer(&self, c: &Customer) -> ServiceResult<String> {
        if let Some(id) = &c.stripe_customer_id {
            return Ok(id.clone());
        }
        let id = self.processor.create_customer(c).await.map_err(internal)?;
        Ok(self
            .fatura
            .store()
            .set_stripe_customer_id(&c.id, &id)
            .await?)
    }

    /// Saves a payment method for the customer (attached at the processor, made default).
    pub async fn save_payment_method(
        &self,
        customer_id: &str,
        payment_method: &str,
    ) -> ServiceResult<Customer> {
        if payment_method.is_empty()
            || payment_method.len() > 255
            || !payment_method
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ServiceError::Invalid(
                "payment_method: a processor payment method id such as pm_…".into(),
            ));
        }
        let c = self.fatura.customer(customer_id).await?;
        let pc = self.processor_customer(&c).await?;
        self.processor
            .attach_payment_method(&pc, payment_method)
            .await
            .map_err(|e| match e {
                ProcessorError::Rejected(m) => {
                    ServiceError::Invalid(format!("payment_method: {m}"))
                }
                e => internal(e),
            })?;
        self.fatura
            .store()
            .set_payment_method(customer_id, payment_method)
            .await?;
        // A new card is tried at once on what is owed (whatever the retry schedule).
        for inv in self
            .fatura
            .invoices(Some(customer_id), Some(InvoiceStatus::Open))
            .await?
        {
            if inv.kind == InvoiceKind::Invoice {
                self.collect_invoice(&inv, Utc::now(), true).await?;
            }
        }
        self.fatura.customer(customer_id).await
    }

    async fn push(
        &self,
        c: &Customer,
        p: &PaymentRecord,
        metadata: Vec<(String, String)>,
        now: DateTime<Utc>,
    ) -> ServiceResult<PaymentRecord> {
        let Some(pm) = c.payment_method_id.clone() else {
            let (p, _) = self
                .fatura
                .store()
                .settle_payment(
                    &p.id,
                    PaymentStatus::Failed,
                    None,
                    Some("no saved payment method"),
                    now,
                )
                .await?
                .ok_or_else(|| internal("payment vanished"))?;
            return Ok(p);
        };
        let pc = self.processor_customer(c).await?;
        let mut meta = vec![("fatura_payment_id".to_string(), p.id.clone())];
        meta.extend(metadata);
        let outcome = self
            .processor
            .charge(&ChargeRequest {
                processor_customer: pc,
                payment_method: pm,
                amount_minor: minor_units(p.amount, p.currency)?,
                currency: p.currency,
                idempotency_key: p.id.clone(),
                metadata: meta,
            })
            .await;
        let store = self.fatura.store();
        let settled = match outcome {
            // Accepted: the webhook settles it (the reference is recorded now).
            Ok(ChargeOutcome::Accepted { reference }) => {
                store
                    .settle_payment(&p.id, PaymentStatus::Pending, Some(&reference), None, now)
                    .await?
            }
            Ok(ChargeOutcome::Declined { message }) => {
                store
                    .settle_payment(&p.id, PaymentStatus::Failed, None, Some(&message), now)
                    .await?
            }
            // Unreachable or refused: stays pending, pushed again with the same key later.
            Err(e) => {
                tracing::warn!(payment = %p.id, error = %e, "payment push failed; will retry");
                return Ok(p.clone());
            }
        };
        let (p, changed) = settled.ok_or_else(|| internal("payment vanished"))?;
        if changed && p.status == PaymentStatus::Failed {
            self.on_failure(&p, now).await?;
        }
        Ok(p)
    }

    /// Collects what is due on every open invoice, retrying failed ones after the policy's
    /// wait; suspends customers after too many failures.
    pub async fn collect_due(&self, now: DateTime<Utc>) -> ServiceResult<()> {
        self.auto_top_ups(now).await?;
        let open = self
            .fatura
            .invoices(None, Some(InvoiceStatus::Open))
            .await?;
        for inv in open.into_iter().filter(|i| i.kind == InvoiceKind::Invoice) {
            if let Err(e) = self.collect_invoice(&inv, now, false).await {
                tracing::warn!(invoice = %inv.id, error = %e, "collection failed");
            }
        }
        Ok(())
    }

    /// Tops up prepaid wallets under their threshold (one top-up in flight at a time) and
    /// raises a low-balance alert.
    async fn auto_top_ups(&self, now: DateTime<Utc>) -> ServiceResult<()> {
        let store = self.fatura.store();
        for c in store.list_customers().await? {
            let Some((threshold, amount)) = c.auto_top_up else {
                continue;
            };
            let balance = self.fatura.wallets().view(&c.id).await?.available();
            if balance >= threshold {
                continue;
            }
            let pending = store
                .list_payments(&c.id, None)
                .await?
                .iter()
                .any(|p| p.kind == PaymentKind::TopUp && p.status == PaymentStatus::Pending);
            self.fatura
                .alert(
                    "low_balance",
                    "warning",
                    Some(&c.id),
                    &c.id,
                    format!(
                        "customer {}: balance {} {} is under its top-up threshold {}",
                        c.id, balance, c.currency, threshold
                    ),
                    now,
                )
                .await;
            if !pending && c.payment_method_id.is_some() {
                self.top_up(&c.id, amount, now).await?;
            }
        }
        Ok(())
    }

    /// What is still owed on an invoice: its amount due less its credit notes.
    async fn owed(&self, inv: &InvoiceRecord) -> ServiceResult<Decimal> {
        let notes: Decimal = self
            .fatura
            .invoices(Some(&inv.customer_id), None)
            .await?
            .iter()
            .filter(|n| {
                n.kind == InvoiceKind::CreditNote
                    && n.corrects_invoice_id.as_deref() == Some(inv.id.as_str())
                    && n.status != InvoiceStatus::Void
            })
            .map(|n| n.total)
            .sum();
        Ok((inv.amount_due - notes).max(Decimal::ZERO))
    }

    /// One collection step for one open invoice; `force` ignores the retry schedule and the
    /// attempt limit (a new payment method).
    pub async fn collect_invoice(
        &self,
        inv: &InvoiceRecord,
        now: DateTime<Utc>,
        force: bool,
    ) -> ServiceResult<()> {
        let store = self.fatura.store();
        let owed = self.owed(inv).await?;
        if owed.is_zero() {
            store.record_payment(&inv.id, None, Some(now), None).await?;
            return Ok(());
        }
        let c = self.fatura.customer(&inv.customer_id).await?;
        let attempts = store.list_payments(&c.id, Some(&inv.id)).await?;
        if attempts
            .iter()
            .any(|p| p.status == PaymentStatus::Succeeded)
        {
            return Ok(()); // paid; the webhook (or its replay) marks the invoice
        }
        if let Some(p) = attempts.iter().find(|p| p.status == PaymentStatus::Pending) {
            // Pushed (or about to be) by an instance that may have died: once it has been
            // quiet for `PUSH_STALE` by the wall clock (not the run's `now`, which may be a
            // simulated instant), exactly one collector claims it and pushes it again with
            // the same idempotency key. A concurrent pusher is not stale, so two instances
            // collecting at once never both push.
            let wall = Utc::now();
            if p.reference.is_none()
                && wall >= p.updated_at + PUSH_STALE
                && store.claim_payment_push(&p.id, p.updated_at, wall).await?
            {
                self.push(
                    &c,
                    p,
                    vec![("fatura_invoice_id".into(), inv.id.clone())],
                    now,
                )
                .await?;
            }
            return Ok(());
        }
        let failed = i64::try_from(attempts.len()).unwrap_or(i64::MAX);
        if !force && failed >= self.policy.max_attempts {
            return Ok(()); // suspended already; waits for a new payment method
        }
        if !force
            && let Some(last) = attempts.last()
            && now < last.updated_at + self.policy.retry_after
        {
            return Ok(());
        }
        let p = PaymentRecord {
            id: format!("fatura-{}-attempt-{}", inv.id, failed + 1),
            customer_id: c.id.clone(),
            invoice_id: Some(inv.id.clone()),
            kind: PaymentKind::Invoice,
            amount: owed,
            currency: inv.currency,
            status: PaymentStatus::Pending,
            reference: None,
            error: None,
            created_at: now,
            updated_at: now,
        };
        if store.insert_payment(&p).await? {
            self.push(
                &c,
                &p,
                vec![("fatura_invoice_id".into(), inv.id.clone())],
                now,
            )
            .await?;
        }
        Ok(())
    }

    async fn on_failure(&self, p: &PaymentRecord, now: DateTime<Utc>) -> ServiceResult<()> {
        let store = self.fatura.store();
        let Some(invoice_id) = &p.invoice_id else {
            self.fatura
                .alert(
                    "payment_failed",
                    "warning",
                    Some(&p.customer_id),
                    &p.id,
                    format!(
                        "top-up of {} {} for {} failed: {}",
                        p.amount,
                        p.currency,
                        p.customer_id,
                        p.error.clone().unwrap_or_default()
                    ),
                    now,
                )
                .await;
            return Ok(());
        };
        let inv = store
            .record_payment(invoice_id, None, None, p.error.as_deref())
            .await?
            .ok_or_else(|| internal("invoice vanished"))?;
        self.fatura
            .alert(
                "payment_failed",
                "warning",
                Some(&p.customer_id),
                &p.id,
                format!(
                    "invoice {} of {}: payment attempt failed: {}",
                    inv.number.clone().unwrap_or_default(),
                    p.customer_id,
                    p.error.clone().unwrap_or_default()
                ),
                now,
            )
            .await;
        if inv.payment_attempts >= self.policy.max_attempts {
            let reason = format!(
                "invoice {} is unpaid after {} failed payment attempts",
                inv.number.clone().unwrap_or_default(),
                inv.payment_attempts
            );
            store
                .set_customer_status(&p.customer_id, CustomerStatus::Suspended, Some(&reason))
                .await?;
            self.fatura.forget_customer_keys(&p.customer_id);
            self.fatura
                .alert(
                    "customer_suspended",
                    "critical",
                    Some(&p.customer_id),
                    &p.customer_id,
                    format!("customer {} suspended: {reason}", p.customer_id),
                    now,
                )
                .await;
        }
        Ok(())
    }

    /// Charges a wallet top-up; the wallet is credited when the processor confirms it.
    pub async fn top_up(
        &self,
        customer_id: &str,
        amount: Decimal,
        now: DateTime<Utc>,
    ) -> ServiceResult<PaymentRecord> {
        let c = self.fatura.customer(customer_id).await?;
        if !c.prepaid {
            return Err(ServiceError::Invalid(
                "customer: top-ups are for prepaid customers".into(),
            ));
        }
        if amount <= Decimal::ZERO
            || amount.normalize().scale() > c.currency.minor_units()
            || amount > Decimal::from(1_000_000)
        {
            return Err(ServiceError::Invalid(format!(
                "amount: a positive amount up to 1000000 {} with at most {} decimal places",
                c.currency,
                c.currency.minor_units()
            )));
        }
        let p = PaymentRecord {
            id: format!("fatura-topup-{}", crate::new_id()),
            customer_id: c.id.clone(),
            invoice_id: None,
            kind: PaymentKind::TopUp,
            amount,
            currency: c.currency,
            status: PaymentStatus::Pending,
            reference: None,
            error: None,
            created_at: now,
            updated_at: now,
        };
        self.fatura.store().insert_payment(&p).await?;
        self.push(&c, &p, vec![("fatura_top_up".into(), "true".into())], now)
            .await
    }

    /// Refunds a credit note of a paid invoice (through the invoice's payment).
    pub async fn refund_credit_note(
        &self,
        note: &InvoiceRecord,
        now: DateTime<Utc>,
    ) -> ServiceResult<Option<PaymentRecord>> {
        let store = self.fatura.store();
        let Some(invoice_id) = &note.corrects_invoice_id else {
            return Ok(None);
        };
        let inv = self.fatura.invoice(invoice_id).await?;
        if inv.status != InvoiceStatus::Paid {
            return Ok(None); // nothing collected: the note reduces what is owed
        }
        let Some(paid) = store
            .list_payments(&inv.customer_id, Some(&inv.id))
            .await?
            .into_iter()
            .find(|p| p.status == PaymentStatus::Succeeded && p.reference.is_some())
        else {
            return Ok(None);
        };
        let p = PaymentRecord {
            id: format!("fatura-refund-{}", note.id),
            customer_id: note.customer_id.clone(),
            invoice_id: Some(note.id.clone()),
            kind: PaymentKind::Refund,
            amount: note.total,
            currency: note.currency,
            status: PaymentStatus::Pending,
            reference: None,
            error: None,
            created_at: now,
            updated_at: now,
        };
        store.insert_payment(&p).await?;
        let reference = paid.reference.unwrap_or_default();
        match self
            .processor
            .refund(&reference, minor_units(note.total, note.currency)?, &p.id)
            .await
        {
            Ok(refund) => Ok(store
                .settle_payment(&p.id, PaymentStatus::Succeeded, Some(&refund), None, now)
                .await?
                .map(|(p, _)| p)),
            Err(e) => {
                tracing::warn!(refund = %p.id, error = %e, "refund failed; retry with the same key");
                Ok(Some(p))
            }
        }
    }

    /// Applies a verified webhook event. Repeated event ids change nothing.
    pub async fn handle_webhook(
        &self,
        ev: &WebhookEvent,
        now: DateTime<Utc>,
    ) -> ServiceResult<&'static str> {
        let store = self.fatura.store();
        if !store.record_webhook(&ev.id, &ev.kind, now).await? {
            return Ok("duplicate");
        }
        let status = match ev.kind.as_str() {
            "payment_intent.succeeded" => PaymentStatus::Succeeded,
            "payment_intent.payment_failed" => PaymentStatus::Failed,
            _ => return Ok("ignored"),
        };
        let Some(payment_id) = &ev.payment_id else {
            return Ok("ignored");
        };
        let Some((p, changed)) = store
            .settle_payment(
                payment_id,
                status,
                ev.reference.as_deref(),
                ev.error.as_deref(),
                now,
            )
            .await?
        else {
            return Ok("ignored");
        };
        match (p.status, p.kind) {
            (PaymentStatus::Succeeded, PaymentKind::Invoice) => {
                if let Some(invoice_id) = &p.invoice_id {
                    store
                        .record_payment(invoice_id, p.reference.as_deref(), Some(now), None)
                        .await?;
                    self.reactivate_if_settled(&p.customer_id).await?;
                }
            }
            (PaymentStatus::Succeeded, PaymentKind::TopUp)
                if changed || status == PaymentStatus::Succeeded =>
            {
                let credit = WalletTransaction {
                    id: format!("topup:{}", p.id),
                    customer_id: p.customer_id.clone(),
                    kind: MovementKind::Purchased,
                    amount: p.amount,
                    currency: p.currency,
                    event_id: None,
                    expires_at: None,
                    created_at: now,
                };
                // Idempotent by id: a replayed confirmation credits once.
                if store
                    .wallet_transactions(&p.customer_id)
                    .await?
                    .iter()
                    .all(|t| t.id != credit.id)
                {
                    self.fatura.wallets().add_credit(&credit).await?;
                }
            }
            (PaymentStatus::Failed, _) if changed => self.on_failure(&p, now).await?,
            _ => {}
        }
        Ok("applied")
    }

    async fn reactivate_if_settled(&self, customer_id: &str) -> ServiceResult<()> {
        let c = self.fatura.customer(customer_id).await?;
        if c.status != CustomerStatus::Suspended {
            return Ok(());
        }
        let still_overdue = self
            .fatura
            .invoices(Some(customer_id), Some(InvoiceStatus::Open))
            .await?
            .iter()
            .any(|i| {
                i.kind == InvoiceKind::Invoice && i.payment_attempts >= self.policy.max_attempts
            });
        if !still_overdue {
            self.fatura
                .store()
                .set_customer_status(customer_id, CustomerStatus::Active, None)
                .await?;
            self.fatura.forget_customer_keys(customer_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sign(secret: &str, t: i64, payload: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(payload);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn stripe_signatures_are_verified() {
        let now = Utc::now();
        let t = now.timestamp();
        let body = br#"{"id":"evt_1"}"#;
        let good = sign("whsec_x", t, body);
        assert!(verify_stripe_signature(Some(&good), body, "whsec_x", now).is_ok());
        // Another secret, another body, a stale or future timestamp, garbage, none.
        assert!(verify_stripe_signature(Some(&good), body, "whsec_y", now).is_err());
        assert!(
            verify_stripe_signature(Some(&good), br#"{"id":"evt_2"}"#, "whsec_x", now).is_err()
        );
        let stale = sign("whsec_x", t - 301, body);
        assert!(verify_stripe_signature(Some(&stale), body, "whsec_x", now).is_err());
        let future = sign("whsec_x", t + 301, body);
        assert!(verify_stripe_signature(Some(&future), body, "whsec_x", now).is_err());
        assert!(verify_stripe_signature(Some("t=abc,v1=zz"), body, "whsec_x", now).is_err());
        assert!(verify_stripe_signature(None, body, "whsec_x", now).is_err());
        // Several v1 signatures (secret rotation): one matching is enough.
        let both = format!("{good},v1={}", "00".repeat(32));
        assert!(verify_stripe_signature(Some(&both), body, "whsec_x", now).is_ok());
    }
}
