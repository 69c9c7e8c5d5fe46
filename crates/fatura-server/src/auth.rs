//! Who is calling: the operator (admin key) or a customer (customer API key).
//!
//! Keys arrive as `Authorization: Bearer <key>`. The admin key is compared in constant
//! time on SHA-256 digests (so neither content nor length leaks through timing). Customer
//! keys are looked up by their SHA-256; only the hash is stored.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;
use crate::service::hash_api_key;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator.
    Admin,
    /// A customer, through one of its keys.
    Customer {
        /// The customer.
        customer_id: String,
        /// The key used.
        key_id: String,
        /// Whether the customer is prepaid (its gateway calls reserve against its wallet).
        prepaid: bool,
        /// A postpaid customer's monthly spend limit (USD).
        spend_limit: Option<rust_decimal::Decimal>,
        /// Why the customer is suspended (unpaid invoices), if it is.
        suspended: Option<String>,
    },
}

impl Caller {
    /// The customer a usage read must be restricted to: the caller's own customer for
    /// customer keys (a different `requested` one is refused), `requested` for the admin.
    pub fn scope_customer(&self, requested: Option<String>) -> Result<Option<String>, ApiError> {
        match self {
            Caller::Admin => Ok(requested),
            Caller::Customer { customer_id, .. } => match requested {
                Some(r) if r != *customer_id => Err(ApiError::forbidden(
                    "a customer key can only read its own customer's data",
                )),
                _ => Ok(Some(customer_id.clone())),
            },
        }
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(ApiError::unauthenticated)?;
        let digest = hash_api_key(token);
        if bool::from(digest.as_bytes().ct_eq(state.admin_key_hash.as_bytes())) {
            return Ok(Caller::Admin);
        }
        let key = state
            .fatura
            .verify_key(&digest)
            .await?
            .ok_or_else(ApiError::unauthenticated)?;
        Ok(Caller::Customer {
            customer_id: key.customer_id,
            key_id: key.key_id,
            prepaid: key.prepaid,
            spend_limit: key.spend_limit,
            suspended: key.suspended,
        })
    }
}

/// The operator; any other caller is refused (401 anonymous, 403 customer key).
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Customer { .. } => {
                Err(ApiError::forbidden("this operation needs the admin key"))
            }
        }
    }
}
