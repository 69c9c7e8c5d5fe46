//! Who is calling: the operator (admin key) or a customer (customer API key).
//!
//! Keys arrive as `Authorization: Bearer <key>`. The admin key is compared in constant
//! time on SHA-256 digests (so neither content nor length leaks through timing). Customer
//! keys are looked up by their SHA-256; only the hash is stored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// How long a verified customer key is trusted without asking the database again.
/// Revocation through this instance takes effect at once (the entry is dropped).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(30);

/// Verified customer keys, by key hash: keeps the database off the hot path of the gateway
/// (and lets authenticated calls go on during a short database outage).
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl KeyCache {
    fn get(&self, hash: &str) -> Option<Caller> {
        let map = self.entries.lock().ok()?;
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(c, _)| c.clone())
    }

    fn put(&self, hash: String, caller: Caller) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > 100_000 {
                map.retain(|_, (_, at)| at.elapsed() < KEY_CACHE_TTL);
            }
            map.insert(hash, (caller, Instant::now()));
        }
    }

    /// Forgets a key (after revocation) or every key of a customer (after a change).
    pub fn forget(&self, key_id: Option<&str>, customer: Option<&str>) {
        if let Ok(mut map) = self.entries.lock() {
            map.retain(|_, (c, _)| match c {
                Caller::Customer {
                    key_id: k,
                    customer_id: cu,
                    ..
                } => key_id.is_none_or(|id| id != k) && customer.is_none_or(|id| id != cu),
                Caller::Admin => true,
            });
        }
    }
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
        if let Some(caller) = state.keys.get(&digest) {
            return Ok(caller);
        }
        let store = state.fatura.store();
        let key = match store.find_active_api_key(&digest).await {
            Ok(Some(key)) => key,
            Ok(None) => return Err(ApiError::unauthenticated()),
            Err(e) => return Err(crate::api::events::service_error(e.into())),
        };
        let customer = match store.get_customer(&key.customer_id).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err(ApiError::unauthenticated()),
            Err(e) => return Err(crate::api::events::service_error(e.into())),
        };
        let caller = Caller::Customer {
            customer_id: key.customer_id,
            key_id: key.id,
            prepaid: customer.prepaid,
            spend_limit: customer.monthly_spend_limit,
            suspended: (customer.status == "suspended").then(|| {
                customer
                    .status_reason
                    .unwrap_or_else(|| "the account is suspended".into())
            }),
        };
        state.keys.put(digest, caller.clone());
        Ok(caller)
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
