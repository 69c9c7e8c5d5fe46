//! Invoices and credit notes: listing, JSON/HTML/CSV renderings, finalise, void, credit
//! notes, and the billing run.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use fatura_core::status::InvoiceStatus;
use fatura_store::InvoiceRecord;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};

use super::prices::instant;
use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::render::{invoice_csv, invoice_html};
use crate::service::{InvoiceDocument, document_of};

/// An invoice or credit note. Money is decimal strings in `currency`.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceOut {
    /// Id.
    pub id: String,
    /// `invoice` or `credit_note`.
    pub kind: String,
    /// Gapless number, once finalised (`FAT-2026-000123`, `FAT-CN-2026-000001`).
    pub number: Option<String>,
    /// `draft`, `open`, `paid` or `void`.
    pub status: String,
    /// Customer.
    pub customer_id: String,
    /// Cycle start.
    pub period_start: DateTime<Utc>,
    /// Cycle end (exclusive).
    pub period_end: DateTime<Utc>,
    /// Currency.
    pub currency: String,
    /// Rated total before tax.
    pub subtotal: String,
    /// Tax.
    pub tax: String,
    /// subtotal + tax.
    pub total: String,
    /// Paid from the prepaid wallet.
    pub prepaid_applied: String,
    /// Wallet payments beyond the total, credited back to the wallet.
    pub prepaid_excess: String,
    /// What is collected: total − prepaid_applied.
    pub amount_due: String,
    /// Events billed.
    pub events: i64,
    /// For a credit note: the invoice it corrects.
    pub corrects_invoice_id: Option<String>,
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
    /// Last collection failure.
    pub last_payment_error: Option<String>,
    /// The processor's reference of the payment that paid it (PaymentIntent id).
    pub payment_reference: Option<String>,
    /// The breakdown: sections (per plan version; `adjustment` sections bill late usage of
    /// earlier periods) with lines per model, quantities, unit prices, discounts, floor
    /// adjustments; tiers; credits; minimum. Upstream cost (`cost_usd`) only for operators.
    #[schema(value_type = Object)]
    pub document: serde_json::Value,
}

fn invoice_out(inv: InvoiceRecord, operator: bool) -> Result<InvoiceOut, ApiError> {
    let doc = document_of(&inv)?;
    let mut document = serde_json::to_value(&doc).map_err(|e| ApiError::internal(&e))?;
    if !operator {
        strip_operator_fields(&mut document);
    }
    Ok(InvoiceOut {
        id: inv.id,
        kind: inv.kind.as_str().into(),
        number: inv.number,
        status: inv.status.as_str().into(),
        customer_id: inv.customer_id,
        period_start: inv.period_start,
        period_end: inv.period_end,
        currency: inv.currency.code().into(),
        subtotal: inv.subtotal.to_string(),
        tax: inv.tax.to_string(),
        total: inv.total.to_string(),
        prepaid_applied: inv.prepaid_applied.to_string(),
        prepaid_excess: inv.prepaid_excess.to_string(),
        amount_due: inv.amount_due.to_string(),
        events: inv.events,
        corrects_invoice_id: inv.corrects_invoice_id,
        created_at: inv.created_at,
        finalized_at: inv.finalized_at,
        due_at: inv.due_at,
        paid_at: inv.paid_at,
        voided_at: inv.voided_at,
        payment_attempts: inv.payment_attempts,
        last_payment_error: inv.last_payment_error,
        payment_reference: inv.payment_reference,
        document,
    })
}

/// Removes upstream cost from every line: customers never see it.
fn strip_operator_fields(doc: &mut serde_json::Value) {
    if let Some(sections) = doc.get_mut("sections").and_then(|s| s.as_array_mut()) {
        for s in sections {
            if let Some(lines) = s.get_mut("lines").and_then(|l| l.as_array_mut()) {
                for l in lines {
                    if let Some(o) = l.as_object_mut() {
                        o.remove("cost_usd");
                    }
                }
            }
        }
    }
}

/// Invoice list.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceList {
    /// Newest period first.
    pub data: Vec<InvoiceOut>,
}

/// Query of `GET /v1/invoices`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InvoicesQuery {
    /// Only this customer (a customer key sees only its own).
    pub customer_id: Option<String>,
    /// `draft`, `open`, `paid` or `void`.
    pub status: Option<String>,
}

/// Lists invoices and credit notes.
#[utoipa::path(get, path = "/v1/invoices", tag = "billing", params(InvoicesQuery),
    responses((status = 200, body = InvoiceList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_invoices(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<InvoicesQuery>, QueryRejection>,
) -> Result<ApiJson<InvoiceList>, ApiError> {
    let Query(q) = query?;
    let customer = caller.scope_customer(q.customer_id)?;
    let list = state
        .fatura
        .invoices(
            customer.as_deref(),
            crate::service::parse_invoice_status(q.status.as_deref())?,
        )
        .await?;
    let operator = matches!(caller, Caller::Admin);
    let mut data = Vec::with_capacity(list.len());
    for inv in list {
        // Customers do not see drafts: they are not invoices yet.
        if operator || inv.status != InvoiceStatus::Draft {
            data.push(invoice_out(inv, operator)?);
        }
    }
    Ok(ApiJson(InvoiceList { data }))
}

/// One invoice as JSON; `{id}.html` is the printable invoice in the customer's language
/// (en or pt-BR) and `{id}.csv` its line items. Operator-only detail (upstream cost) is in
/// the admin's JSON only.
#[utoipa::path(get, path = "/v1/invoices/{id}", tag = "billing",
    params(("id" = String, Path, description = "Invoice id, optionally with .html or .csv")),
    responses((status = 200, body = InvoiceOut), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_invoice(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (id, format) = match id.rsplit_once('.') {
        Some((id, "html")) => (id.to_string(), "html"),
        Some((id, "csv")) => (id.to_string(), "csv"),
        _ => (id, "json"),
    };
    let inv = state.fatura.invoice(&id).await?;
    caller.scope_customer(Some(inv.customer_id.clone()))?;
    let operator = matches!(caller, Caller::Admin);
    if !operator && inv.status == InvoiceStatus::Draft {
        return Err(ApiError::not_found(format!("no invoice {id:?}")));
    }
    let doc: InvoiceDocument = document_of(&inv)?;
    Ok(match format {
        "html" => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            invoice_html(&inv, &doc),
        )
            .into_response(),
        "csv" => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"{}.csv\"",
                        inv.number.clone().unwrap_or_else(|| inv.id.clone())
                    ),
                ),
            ],
            invoice_csv(&inv, &doc),
        )
            .into_response(),
        _ => ApiJson(invoice_out(inv, operator)?).into_response(),
    })
}

/// Finalises a draft now: re-rated from the ledger, numbered, immutable from then on.
#[utoipa::path(post, path = "/v1/invoices/{id}/finalize", tag = "billing",
    params(("id" = String, Path, description = "Invoice id")),
    responses((status = 200, body = InvoiceOut), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn finalize_invoice(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<ApiJson<InvoiceOut>, ApiError> {
    let inv = state
        .fatura
        .finalize_invoice(&id, state.fatura.now())
        .await?;
    Ok(ApiJson(invoice_out(inv, true)?))
}

/// Voids a draft or an unpaid invoice. Its usage is billed again by the cycle's next run
/// (void + reissue); a paid invoice is corrected with a credit note instead (409).
#[utoipa::path(post, path = "/v1/invoices/{id}/void", tag = "billing",
    params(("id" = String, Path, description = "Invoice id")),
    responses((status = 200, body = InvoiceOut), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn void_invoice(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<ApiJson<InvoiceOut>, ApiError> {
    let inv = state.fatura.void_invoice(&id, state.fatura.now()).await?;
    Ok(ApiJson(invoice_out(inv, true)?))
}

/// A credit note to issue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditNoteBody {
    /// Amount credited (decimal string in the invoice currency, at most what is left of the
    /// invoice's total after earlier credit notes).
    pub amount: String,
    /// Why.
    pub reason: String,
}

/// Issues a credit note against a finalised invoice.
#[utoipa::path(post, path = "/v1/invoices/{id}/credit-notes", tag = "billing", request_body = CreditNoteBody,
    params(("id" = String, Path, description = "Invoice id")),
    responses((status = 201, body = InvoiceOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_credit_note(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreditNoteBody>,
) -> Result<(StatusCode, ApiJson<InvoiceOut>), ApiError> {
    let amount = Decimal::from_str(body.amount.trim()).map_err(|_| {
        ApiError::unprocessable(
            "invalid_request",
            "amount: must be a decimal string such as \"10.00\"",
            Vec::new(),
        )
    })?;
    let note = state
        .fatura
        .credit_note(&id, amount, &body.reason, state.fatura.now())
        .await?;
    // Money already collected goes back.
    if let Some(c) = &state.payments {
        c.refund_credit_note(&note, state.fatura.now()).await?;
    }
    Ok((StatusCode::CREATED, ApiJson(invoice_out(note, true)?)))
}

/// Query of `POST /v1/billing/run`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    /// RFC 3339 instant to run at (default now): cycles ended by then are closed.
    pub at: Option<String>,
}

/// What a billing run did.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunOut {
    /// Drafts created for closed cycles.
    pub drafted: u64,
    /// Drafts re-rated during their grace period.
    pub refreshed: u64,
    /// Invoices finalised.
    pub finalized: Vec<InvoiceOut>,
    /// Customers that could not be billed, each with why; every other customer was billed.
    pub failed: Vec<BillingFailureOut>,
}

/// A customer a billing run could not bill.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingFailureOut {
    /// The customer.
    pub customer_id: String,
    /// Kind of error: `conflict`, `invalid_request` or `not_found`.
    pub code: String,
    /// What is wrong (an operator alert `billing_failed` says the same).
    pub message: String,
}

/// Runs billing now (what the scheduler does): closes due cycles into drafts and finalises
/// drafts past their grace period. Running it twice changes nothing the second time.
#[utoipa::path(post, path = "/v1/billing/run", tag = "billing", params(RunQuery),
    responses((status = 200, body = RunOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn run_billing(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<RunQuery>, QueryRejection>,
) -> Result<ApiJson<RunOut>, ApiError> {
    let Query(q) = query?;
    let at = instant("at", q.at.as_deref())?.unwrap_or_else(|| state.fatura.now());
    let report = state.scheduler().run_billing(at).await?;
    let finalized = report
        .finalized
        .into_iter()
        .map(|inv| invoice_out(inv, true))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ApiJson(RunOut {
        drafted: report.drafted,
        refreshed: report.refreshed,
        finalized,
        failed: report
            .failed
            .into_iter()
            .map(|f| BillingFailureOut {
                customer_id: f.customer_id,
                code: f.code.into(),
                message: f.message,
            })
            .collect(),
    }))
}

fn collector(state: &AppState) -> Result<&std::sync::Arc<crate::payments::Collector>, ApiError> {
    state.payments.as_ref().ok_or_else(|| {
        ApiError::not_found(
            "no payment processor is configured (set FATURA_STRIPE_API_KEY and FATURA_STRIPE_WEBHOOK_SECRET)",
        )
    })
}

/// What a webhook did.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookOut {
    /// `applied`, `duplicate` (event id seen before) or `ignored`.
    pub result: String,
}

/// Stripe's webhooks: verified (`Stripe-Signature`, HMAC-SHA256, 300 s tolerance, constant
/// time), deduplicated by event id; `payment_intent.succeeded` marks the invoice paid (or
/// credits a top-up), `payment_intent.payment_failed` records the failure.
#[utoipa::path(post, path = "/v1/webhooks/stripe", tag = "billing", request_body(content = String, content_type = "application/json"),
    responses((status = 200, body = WebhookOut), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn stripe_webhook(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<ApiJson<WebhookOut>, ApiError> {
    let collector = collector(&state)?;
    let now = state.fatura.now();
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let event = collector
        .processor()
        .verify_webhook(signature, &body, now)
        .map_err(|m| ApiError::bad_request("invalid_signature", m))?;
    let result = collector.handle_webhook(&event, now).await?;
    Ok(ApiJson(WebhookOut {
        result: result.to_string(),
    }))
}

/// A payment method to save.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentMethodBody {
    /// The processor's payment method id (`pm_…`), e.g. from a SetupIntent.
    pub payment_method: String,
}

/// Saves the customer's payment method: the processor customer is created on first need,
/// the method attached and made the default; invoices and top-ups are charged to it.
#[utoipa::path(post, path = "/v1/customers/{id}/payment-methods", tag = "billing", request_body = PaymentMethodBody,
    params(("id" = String, Path, description = "Customer id")),
    responses((status = 200, body = crate::api::customers::CustomerOut), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn save_payment_method(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PaymentMethodBody>,
) -> Result<ApiJson<crate::api::customers::CustomerOut>, ApiError> {
    let c = collector(&state)?
        .save_payment_method(&id, body.payment_method.trim())
        .await?;
    Ok(ApiJson(c.into()))
}

/// A top-up to charge.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUpBody {
    /// Amount (decimal string in the customer's currency).
    pub amount: String,
}

/// A payment attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentOut {
    /// Id (the idempotency key sent to the processor).
    pub id: String,
    /// `invoice`, `top_up` or `refund`.
    pub kind: String,
    /// Amount.
    pub amount: String,
    /// Currency.
    pub currency: String,
    /// `pending` (confirmation comes by webhook), `succeeded` or `failed`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// Charges a prepaid customer's saved payment method; the wallet is credited when the
/// processor confirms the payment (webhook).
#[utoipa::path(post, path = "/v1/customers/{id}/wallet/top-ups", tag = "billing", request_body = TopUpBody,
    params(("id" = String, Path, description = "Customer id")),
    responses((status = 202, body = PaymentOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn top_up(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TopUpBody>,
) -> Result<(StatusCode, ApiJson<PaymentOut>), ApiError> {
    let amount = Decimal::from_str(body.amount.trim()).map_err(|_| {
        ApiError::unprocessable(
            "invalid_request",
            "amount: must be a decimal string such as \"50.00\"",
            Vec::new(),
        )
    })?;
    let p = collector(&state)?
        .top_up(&id, amount, state.fatura.now())
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(PaymentOut {
            id: p.id,
            kind: p.kind.as_str().into(),
            amount: p.amount.to_string(),
            currency: p.currency.code().into(),
            status: p.status.as_str().into(),
            error: p.error,
        }),
    ))
}
