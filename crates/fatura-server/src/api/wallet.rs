//! Prepaid wallets: credits and the real-time balance.

use std::str::FromStr;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use fatura_core::Currency;
use fatura_store::WalletTransaction;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::service::{CreditKind, CreditRequest, ServiceError};

pub use crate::service::wallets::{DEFAULT_PAGE, MAX_PAGE};

/// A credit to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditIn {
    /// Decimal string, positive, at most the currency's minor units (e.g. `"100.00"`).
    pub amount: String,
    /// Must be the customer's currency.
    pub currency: String,
    /// `purchased` or `granted`.
    pub kind: String,
    /// RFC 3339 instant after which the unused rest of this credit is forfeited.
    pub expires_at: Option<String>,
}

/// A wallet movement.
#[derive(Debug, Serialize, ToSchema)]
pub struct WalletTransactionOut {
    /// Id.
    pub id: String,
    /// `purchased`, `granted` or `charge`.
    pub kind: String,
    /// Decimal string: positive for credits, negative for charges.
    pub amount: String,
    /// Currency.
    pub currency: String,
    /// The usage event of a charge.
    pub event_id: Option<String>,
    /// Expiry of a credit.
    pub expires_at: Option<DateTime<Utc>>,
    /// When recorded.
    pub created_at: DateTime<Utc>,
}

impl From<WalletTransaction> for WalletTransactionOut {
    fn from(t: WalletTransaction) -> Self {
        WalletTransactionOut {
            id: t.id,
            kind: t.kind.as_str().into(),
            amount: t.amount.normalize().to_string(),
            currency: t.currency.code().to_string(),
            event_id: t.event_id,
            expires_at: t.expires_at,
            created_at: t.created_at,
        }
    }
}

/// A wallet, in real time.
#[derive(Debug, Serialize, ToSchema)]
pub struct WalletOut {
    /// Customer.
    pub customer_id: String,
    /// `prepaid` or `postpaid`.
    pub billing_mode: String,
    /// Currency.
    pub currency: String,
    /// Credits minus charges (including calls settled but not yet committed).
    pub balance: String,
    /// Open reservations of calls in flight.
    pub reserved: String,
    /// Balance minus reservations.
    pub available: String,
    /// Committed movements, oldest first: at most `limit`, starting after `after`.
    pub transactions: Vec<WalletTransactionOut>,
    /// When more movements follow: pass it as `after` for the next page (the id of the last
    /// movement above); `null` on the last page.
    pub next_after: Option<String>,
}

/// Paging of `GET /v1/customers/{id}/wallet`'s movements.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WalletQuery {
    /// Movements per page, 1 to 10,000 (default 1,000).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
    /// Start after this movement (a transaction id, the previous page's `next_after`).
    pub after: Option<String>,
}

/// Adds prepaid credit to a customer's wallet.
#[utoipa::path(post, path = "/v1/customers/{id}/wallet/credits", tag = "wallets", request_body = CreditIn,
    params(("id" = String, Path, description = "Customer id")),
    responses((status = 201, body = WalletTransactionOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_credit(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreditIn>,
) -> Result<(StatusCode, ApiJson<WalletTransactionOut>), ApiError> {
    let invalid = |field: &str, message: String| {
        ApiError::from(ServiceError::InvalidField {
            code: "invalid_credit",
            field: field.into(),
            message,
        })
    };
    let currency =
        Currency::from_str(&req.currency).map_err(|e| invalid("currency", e.to_string()))?;
    let amount = Decimal::from_str(req.amount.trim()).map_err(|_| {
        invalid(
            "amount",
            "must be a decimal string such as \"100.00\"".into(),
        )
    })?;
    let kind = CreditKind::from_str(&req.kind)?;
    let expires_at = crate::api::prices::instant("expires_at", req.expires_at.as_deref())?;
    let tx = state
        .fatura
        .add_wallet_credit(
            &id,
            CreditRequest {
                amount,
                currency,
                kind,
                expires_at,
            },
            state.fatura.now(),
        )
        .await?;
    Ok((StatusCode::CREATED, ApiJson(tx.into())))
}

/// A customer's wallet: balance, reservations, available, movements. Admin, or the
/// customer's own key.
#[utoipa::path(get, path = "/v1/customers/{id}/wallet", tag = "wallets",
    params(("id" = String, Path, description = "Customer id"), WalletQuery),
    responses((status = 200, body = WalletOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_wallet(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<WalletQuery>, QueryRejection>,
) -> Result<ApiJson<WalletOut>, ApiError> {
    caller.scope_customer(Some(id.clone()))?;
    let Query(q) = query?;
    let page = state
        .fatura
        .wallet(&id, q.after.as_deref(), q.limit.unwrap_or(DEFAULT_PAGE))
        .await?;
    let (customer, view) = (page.customer, page.view);
    Ok(ApiJson(WalletOut {
        customer_id: id,
        billing_mode: if customer.prepaid {
            "prepaid"
        } else {
            "postpaid"
        }
        .into(),
        currency: customer.currency.code().into(),
        balance: view.balance.to_string(),
        reserved: view.reserved.to_string(),
        available: view.available().normalize().to_string(),
        transactions: page.transactions.into_iter().map(Into::into).collect(),
        next_after: page.next_after,
    }))
}
