//! Verified customer keys: who a key belongs to, cached so that the gateway's hot path does
//! not ask the database (and authenticated calls go on during a short database outage).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

/// How long a verified customer key is trusted without asking the database again.
/// Changes made through this process (revocation, a new spend limit, suspension) drop the
/// entries they affect at once; changes another process wrote to the same SQLite file drop
/// the whole cache within a second (`Fatura::sync_external_writes`).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(30);

/// What a valid customer key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    /// The customer.
    pub customer_id: String,
    /// The key.
    pub key_id: String,
    /// Whether the customer is prepaid (its gateway calls reserve against its wallet).
    pub prepaid: bool,
    /// A postpaid customer's monthly spend limit (USD).
    pub spend_limit: Option<Decimal>,
    /// Why the customer is suspended (unpaid invoices), if it is.
    pub suspended: Option<String>,
}

/// Verified customer keys, by key hash.
#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<String, (VerifiedKey, Instant)>>,
}

impl KeyCache {
    pub(crate) fn get(&self, hash: &str) -> Option<VerifiedKey> {
        let map = self.entries.lock().ok()?;
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(c, _)| c.clone())
    }

    pub(crate) fn put(&self, hash: String, key: VerifiedKey) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() > 100_000 {
                map.retain(|_, (_, at)| at.elapsed() < KEY_CACHE_TTL);
            }
            map.insert(hash, (key, Instant::now()));
        }
    }

    /// Forgets a key (after revocation) or every key of a customer (after a change).
    pub(crate) fn forget(&self, key_id: Option<&str>, customer: Option<&str>) {
        if let Ok(mut map) = self.entries.lock() {
            map.retain(|_, (k, _)| {
                key_id.is_none_or(|id| id != k.key_id)
                    && customer.is_none_or(|id| id != k.customer_id)
            });
        }
    }

    /// Forgets every key (another process changed the database).
    pub(crate) fn clear(&self) {
        if let Ok(mut map) = self.entries.lock() {
            map.clear();
        }
    }
}
