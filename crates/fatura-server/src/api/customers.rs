//! Customers and their API keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use fatura_core::Currency;
use fatura_store::{ApiKeyRecord, Customer};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::service::Billing;
use rust_decimal::Decimal;
use std::str::FromStr;

/// A customer.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerOut {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Billing currency (ISO 4217).
    pub currency: String,
    /// `prepaid` or `postpaid`.
    pub billing_mode: String,
    /// Postpaid monthly spend limit (USD), if any.
    pub monthly_spend_limit: Option<String>,
    /// The plan in force now (`null`: the default plan, cost-plus at the default margin).
    pub plan_id: Option<String>,
    /// Day of the month cycles start (1–28).
    pub billing_anchor_day: u32,
    /// IANA time zone whose midnight starts a cycle.
    pub timezone: String,
    /// Days from finalisation to the due date.
    pub payment_terms_days: u32,
    /// Tax rate (fraction), if any.
    pub tax_rate: Option<String>,
    /// Invoice language: `en` or `pt-BR`.
    pub locale: String,
    /// `active` or `suspended` (unpaid invoices).
    pub status: String,
    /// Why suspended.
    pub status_reason: Option<String>,
    /// The saved payment method (`pm_…`), if any.
    pub payment_method_id: Option<String>,
    /// Prepaid: top up when the balance drops under this.
    pub auto_top_up_threshold: Option<String>,
    /// Prepaid: the amount of an automatic top-up.
    pub auto_top_up_amount: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl From<Customer> for CustomerOut {
    fn from(c: Customer) -> Self {
        CustomerOut {
            id: c.id,
            name: c.name,
            currency: c.currency.code().to_string(),
            billing_mode: if c.prepaid { "prepaid" } else { "postpaid" }.to_string(),
            monthly_spend_limit: c.monthly_spend_limit.map(|d| d.to_string()),
            plan_id: None,
            billing_anchor_day: c.billing.anchor_day,
            timezone: c.billing.timezone,
            payment_terms_days: c.billing.payment_terms_days,
            tax_rate: c.billing.tax_rate.map(|d| d.to_string()),
            locale: c.billing.locale,
            status: c.status.as_str().into(),
            status_reason: c.status_reason,
            payment_method_id: c.payment_method_id,
            auto_top_up_threshold: c.auto_top_up.map(|r| r.0.to_string()),
            auto_top_up_amount: c.auto_top_up.map(|r| r.1.to_string()),
            created_at: c.created_at,
        }
    }
}

/// Request to create a customer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    /// Optional id (1–64 of `[A-Za-z0-9-_.:/@]`); generated as `cus_…` when absent.
    pub id: Option<String>,
    /// Display name.
    pub name: String,
    /// `USD` (default), `BRL` or `EUR`.
    pub currency: Option<String>,
    /// `postpaid` (default) or `prepaid` (gateway calls reserve against the wallet).
    pub billing_mode: Option<String>,
    /// Postpaid only: decimal string, the most the customer's calls may cost per UTC month
    /// (USD); calls that could exceed it get 402.
    pub monthly_spend_limit: Option<String>,
    /// Day of the month billing cycles start, 1–28 (default 1).
    pub billing_anchor_day: Option<u32>,
    /// IANA time zone whose midnight starts a cycle (default UTC).
    pub timezone: Option<String>,
    /// Days from finalisation to the due date (default 30).
    pub payment_terms_days: Option<u32>,
    /// Tax as a fraction of the subtotal, decimal string (e.g. "0.05"); null for none.
    #[serde(default, deserialize_with = "present")]
    pub tax_rate: Option<Option<String>>,
    /// Invoice language: `en` (default) or `pt-BR`.
    pub locale: Option<String>,
}

/// Applies the billing-setting fields of a request over `s`.
fn apply_settings(
    mut s: fatura_store::BillingSettings,
    anchor: Option<u32>,
    timezone: Option<&String>,
    terms: Option<u32>,
    tax: Option<&Option<String>>,
    locale: Option<&String>,
) -> Result<fatura_store::BillingSettings, ApiError> {
    if let Some(a) = anchor {
        s.anchor_day = a;
    }
    if let Some(t) = timezone {
        s.timezone = t.clone();
    }
    if let Some(t) = terms {
        s.payment_terms_days = t;
    }
    if let Some(t) = tax {
        s.tax_rate = t
            .as_deref()
            .map(|v| {
                Decimal::from_str(v.trim()).map_err(|_| {
                    ApiError::unprocessable(
                        "invalid_request",
                        "tax_rate: must be a decimal string such as \"0.05\"",
                        Vec::new(),
                    )
                })
            })
            .transpose()?;
    }
    if let Some(l) = locale {
        s.locale = l.clone();
    }
    Ok(s)
}

/// Changes to a customer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCustomer {
    /// Postpaid only: the monthly spend limit (decimal string, USD), or null to remove it.
    #[serde(default, deserialize_with = "present")]
    pub monthly_spend_limit: Option<Option<String>>,
    /// The plan to put the customer on (null: back to the default plan), from
    /// `plan_effective_from`. The plan must bill in the customer's currency.
    #[serde(default, deserialize_with = "present")]
    pub plan_id: Option<Option<String>>,
    /// RFC 3339 instant the plan applies from (default now; not before the customer's
    /// latest plan change). Within a cycle, each plan rates its own part of the cycle.
    pub plan_effective_from: Option<String>,
    /// Day of the month billing cycles start, 1–28 (default 1).
    pub billing_anchor_day: Option<u32>,
    /// IANA time zone whose midnight starts a cycle (default UTC).
    pub timezone: Option<String>,
    /// Days from finalisation to the due date (default 30).
    pub payment_terms_days: Option<u32>,
    /// Tax as a fraction of the subtotal, decimal string (e.g. "0.05"); null for none.
    #[serde(default, deserialize_with = "present")]
    pub tax_rate: Option<Option<String>>,
    /// Invoice language: `en` (default) or `pt-BR`.
    pub locale: Option<String>,
    /// Prepaid: top up automatically when the balance drops under this amount (decimal
    /// string; with `auto_top_up_amount`; null clears both).
    #[serde(default, deserialize_with = "present")]
    pub auto_top_up_threshold: Option<Option<String>>,
    /// Prepaid: the amount charged by an automatic top-up.
    #[serde(default, deserialize_with = "present")]
    pub auto_top_up_amount: Option<Option<String>>,
}

/// Fills in the plan in force now.
async fn with_plan(state: &AppState, c: Customer) -> Result<CustomerOut, ApiError> {
    let (plan_id, _) = state
        .fatura
        .customer_plan(&c.id, state.fatura.now())
        .await?;
    let mut out = CustomerOut::from(c);
    out.plan_id = plan_id;
    Ok(out)
}

/// Distinguishes an absent field (`None`) from an explicit null (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

fn parse_limit(v: Option<&str>) -> Result<Option<Decimal>, ApiError> {
    v.map(|s| {
        Decimal::from_str(s.trim()).map_err(|_| {
            ApiError::unprocessable(
                "invalid_request",
                "monthly_spend_limit: must be a decimal string such as \"500.00\"",
                Vec::new(),
            )
        })
    })
    .transpose()
}

/// Customer list.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerList {
    /// Customers by id.
    pub data: Vec<CustomerOut>,
}

/// An API key as listed (never the secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyOut {
    /// Key id, used to revoke it.
    pub id: String,
    /// Owner.
    pub customer_id: String,
    /// First characters of the key.
    pub prefix: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKeyOut {
    fn from(k: ApiKeyRecord) -> Self {
        ApiKeyOut {
            id: k.id,
            customer_id: k.customer_id,
            prefix: k.prefix,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A newly created key: `key` is shown here once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// Key id.
    pub id: String,
    /// Owner.
    pub customer_id: String,
    /// The secret key. Store it now: fatura keeps only its hash.
    pub key: String,
    /// First characters of the key.
    pub prefix: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Key list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    /// Keys, oldest first.
    pub data: Vec<ApiKeyOut>,
}

/// Creates a customer.
#[utoipa::path(post, path = "/v1/customers", tag = "customers", request_body = CreateCustomer,
    responses((status = 201, body = CustomerOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, description = "Id taken", body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_customer(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<CreateCustomer>,
) -> Result<(StatusCode, ApiJson<CustomerOut>), ApiError> {
    let currency = match req.currency.as_deref() {
        None => Currency::Usd,
        Some(c) => c
            .parse::<Currency>()
            .map_err(|e| ApiError::unprocessable("invalid_currency", e.to_string(), Vec::new()))?,
    };
    let prepaid = match req.billing_mode.as_deref() {
        None | Some("postpaid") => false,
        Some("prepaid") => true,
        Some(other) => {
            return Err(ApiError::unprocessable(
                "invalid_billing_mode",
                format!("billing_mode must be prepaid or postpaid, got {other:?}"),
                Vec::new(),
            ));
        }
    };
    let customer = state
        .fatura
        .create_customer(
            req.id.as_deref(),
            &req.name,
            currency,
            Billing {
                prepaid,
                monthly_spend_limit: parse_limit(req.monthly_spend_limit.as_deref())?,
                settings: apply_settings(
                    Default::default(),
                    req.billing_anchor_day,
                    req.timezone.as_ref(),
                    req.payment_terms_days,
                    req.tax_rate.as_ref(),
                    req.locale.as_ref(),
                )?,
            },
            state.fatura.now(),
        )
        .await?;
    Ok((StatusCode::CREATED, ApiJson(customer.into())))
}

/// Lists customers.
#[utoipa::path(get, path = "/v1/customers", tag = "customers",
    responses((status = 200, body = CustomerList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_customers(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<ApiJson<CustomerList>, ApiError> {
    let list = state.fatura.customers().await?;
    Ok(ApiJson(CustomerList {
        data: {
            let mut out = Vec::with_capacity(list.len());
            for c in list {
                out.push(with_plan(&state, c).await?);
            }
            out
        },
    }))
}

/// Changes a customer (for now: the monthly spend limit).
#[utoipa::path(patch, path = "/v1/customers/{id}", tag = "customers", request_body = UpdateCustomer,
    params(("id" = String, Path, description = "Customer id")),
    responses((status = 200, body = CustomerOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_customer(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateCustomer>,
) -> Result<ApiJson<CustomerOut>, ApiError> {
    let mut customer = state.fatura.customer(&id).await?;
    // Everything is checked before anything is written.
    let limit = req
        .monthly_spend_limit
        .as_ref()
        .map(|l| parse_limit(l.as_deref()))
        .transpose()?;
    if let Some(limit) = limit {
        crate::service::check_spend_limit(customer.prepaid, limit)?;
    }
    let settings_changed = req.billing_anchor_day.is_some()
        || req.timezone.is_some()
        || req.payment_terms_days.is_some()
        || req.tax_rate.is_some()
        || req.locale.is_some();
    let settings = apply_settings(
        customer.billing.clone(),
        req.billing_anchor_day,
        req.timezone.as_ref(),
        req.payment_terms_days,
        req.tax_rate.as_ref(),
        req.locale.as_ref(),
    )?;
    if settings_changed {
        crate::service::check_billing_settings(&settings)?;
    }
    let effective_from =
        super::prices::instant("plan_effective_from", req.plan_effective_from.as_deref())?;
    if effective_from.is_some() && req.plan_id.is_none() {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "plan_effective_from: only with plan_id",
            Vec::new(),
        ));
    }
    if let Some(plan_id) = &req.plan_id {
        let now = state.fatura.now();
        state
            .fatura
            .assign_plan(&id, plan_id.as_deref(), effective_from.unwrap_or(now), now)
            .await?;
    }
    let auto_top_up = match (&req.auto_top_up_threshold, &req.auto_top_up_amount) {
        (None, None) => None,
        (Some(None), Some(None)) | (Some(None), None) | (None, Some(None)) => Some(None),
        (Some(Some(t)), Some(Some(a))) => {
            let parse = |v: &str| {
                Decimal::from_str(v.trim()).map_err(|_| {
                    ApiError::unprocessable(
                        "invalid_request",
                        "auto_top_up: threshold and amount must be decimal strings",
                        Vec::new(),
                    )
                })
            };
            Some(Some((parse(t)?, parse(a)?)))
        }
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_request",
                "auto_top_up: give both auto_top_up_threshold and auto_top_up_amount (or null to clear)",
                Vec::new(),
            ));
        }
    };
    if let Some(Some((t, a))) = auto_top_up {
        // Checked before anything is written (prepaid only, amounts).
        if !customer.prepaid || t.is_sign_negative() || a <= Decimal::ZERO {
            return Err(ApiError::from(crate::service::ServiceError::Invalid(
                "auto_top_up: for prepaid customers, with a threshold ≥ 0 and a positive amount"
                    .into(),
            )));
        }
    }
    if settings_changed {
        customer = state.fatura.set_billing_settings(&id, &settings).await?;
    }
    if let Some(rule) = auto_top_up {
        customer = state.fatura.set_auto_top_up(&id, rule).await?;
    }
    if let Some(limit) = limit {
        customer = state.fatura.set_spend_limit(&id, limit).await?;
    }
    Ok(ApiJson(with_plan(&state, customer).await?))
}

/// One customer.
#[utoipa::path(get, path = "/v1/customers/{id}", tag = "customers", params(("id" = String, Path, description = "Customer id")),
    responses((status = 200, body = CustomerOut), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_customer(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<ApiJson<CustomerOut>, ApiError> {
    let c = state.fatura.customer(&id).await?;
    Ok(ApiJson(with_plan(&state, c).await?))
}

/// Creates an API key for a customer; the key is in this response only.
#[utoipa::path(post, path = "/v1/customers/{id}/keys", tag = "customers", params(("id" = String, Path, description = "Customer id")),
    responses((status = 201, body = CreatedApiKey), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<(StatusCode, ApiJson<CreatedApiKey>), ApiError> {
    let k = state.fatura.create_api_key(&id, state.fatura.now()).await?;
    Ok((
        StatusCode::CREATED,
        ApiJson(CreatedApiKey {
            id: k.record.id,
            customer_id: k.record.customer_id,
            key: k.key,
            prefix: k.record.prefix,
            created_at: k.record.created_at,
        }),
    ))
}

/// Lists a customer's keys (without secrets).
#[utoipa::path(get, path = "/v1/customers/{id}/keys", tag = "customers", params(("id" = String, Path, description = "Customer id")),
    responses((status = 200, body = ApiKeyList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<ApiJson<ApiKeyList>, ApiError> {
    let keys = state.fatura.api_keys(&id).await?;
    Ok(ApiJson(ApiKeyList {
        data: keys.into_iter().map(Into::into).collect(),
    }))
}

/// Revokes a key.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "customers", params(("id" = String, Path, description = "Key id")),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.fatura.revoke_api_key(&id, state.fatura.now()).await?;
    Ok(StatusCode::NO_CONTENT)
}
