//! Prepaid wallets: credits and the real-time balance.

use std::str::FromStr;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use fatura_core::{Currency, Money};
use fatura_store::WalletTransaction;
use rand::RngCore;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::events::service_error;
use crate::AppState;
use crate::auth::{Admin, Caller};
use crate::error::{ApiError, ApiJson, ErrorBody};

/// Movements per page of `GET /v1/customers/{id}/wallet` unless `limit` says otherwise.
pub const DEFAULT_PAGE: u32 = 1_000;
/// Largest `limit`.
pub const MAX_PAGE: u32 = 10_000;

/// Largest single credit.
const MAX_CREDIT: i64 = 1_000_000_000;

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
            kind: t.kind,
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

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
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
    let customer = state.fatura.customer(&id).await.map_err(service_error)?;
    let invalid = |field: &str, message: String| {
        ApiError::unprocessable(
            "invalid_credit",
            format!("{field}: {message}"),
            vec![crate::error::ErrorDetail {
                index: None,
                id: None,
                field: field.into(),
                message,
            }],
        )
    };
    let currency =
        Currency::from_str(&req.currency).map_err(|e| invalid("currency", e.to_string()))?;
    if currency != customer.currency {
        return Err(invalid(
            "currency",
            format!(
                "the wallet of {id:?} is in {}, not {currency}",
                customer.currency
            ),
        ));
    }
    let amount = Decimal::from_str(req.amount.trim()).map_err(|_| {
        invalid(
            "amount",
            "must be a decimal string such as \"100.00\"".into(),
        )
    })?;
    if amount <= Decimal::ZERO || amount > Decimal::from(MAX_CREDIT) {
        return Err(invalid(
            "amount",
            format!("must be positive and at most {MAX_CREDIT}"),
        ));
    }
    if Money::new(amount, currency).round_to_minor().amount() != amount {
        return Err(invalid(
            "amount",
            format!(
                "{currency} amounts have at most {} decimal places",
                currency.minor_units()
            ),
        ));
    }
    if !matches!(req.kind.as_str(), "purchased" | "granted") {
        return Err(invalid("kind", "must be purchased or granted".into()));
    }
    let now = Utc::now();
    let expires_at = crate::api::prices::instant("expires_at", req.expires_at.as_deref())?;
    if expires_at.is_some_and(|e| e <= now) {
        return Err(invalid("expires_at", "must be in the future".into()));
    }
    let tx = WalletTransaction {
        id: format!("wtx_{}", random_hex(10)),
        customer_id: id.clone(),
        kind: req.kind,
        amount: amount.normalize(),
        currency,
        event_id: None,
        expires_at,
        created_at: now,
    };
    state
        .wallets
        .add_credit(&tx)
        .await
        .map_err(|e| ApiError::internal(&e))?;
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
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit: from 1 to {MAX_PAGE}"),
        ));
    }
    let customer = state.fatura.customer(&id).await.map_err(service_error)?;
    let view = state
        .wallets
        .view(&id)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    // One more than asked for tells whether another page follows.
    let mut txs = state
        .fatura
        .store()
        .wallet_transactions_page(&id, q.after.as_deref(), limit + 1)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("after: {id:?}'s wallet has no movement with this id"),
            )
        })?;
    let next_after = if txs.len() > limit as usize {
        txs.truncate(limit as usize);
        txs.last().map(|t| t.id.clone())
    } else {
        None
    };
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
        transactions: txs.into_iter().map(Into::into).collect(),
        next_after,
    }))
}
