//! The versioned price catalog.
//!
//! For each `(provider, model)` the catalog holds a list of [`PriceVersion`]s, each with an
//! `effective_from` instant. An event is costed at the version in force at its timestamp:
//! the one with the latest `effective_from` that is not after the event.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::money::LEDGER_SCALE;

/// Why a price was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// Not a decimal number.
    #[error("not a decimal number: {0:?}")]
    NotDecimal(String),
    /// Negative price.
    #[error("price must not be negative: {0}")]
    Negative(Decimal),
    /// More decimal places than the ledger keeps.
    #[error("price has more than {LEDGER_SCALE} decimal places: {0}")]
    TooPrecise(Decimal),
}

/// A non-negative price per unit (token, request or image) in USD, with at most
/// [`LEDGER_SCALE`] (18) decimal places — well above the 12 places fatura promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UnitPrice(Decimal);

impl UnitPrice {
    /// Zero.
    pub const ZERO: UnitPrice = UnitPrice(Decimal::ZERO);

    /// Accepts a decimal price, rejecting negatives and more than 18 places.
    pub fn new(value: Decimal) -> Result<Self, PriceError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(PriceError::Negative(value));
        }
        let value = value.normalize();
        if value.scale() > LEDGER_SCALE {
            return Err(PriceError::TooPrecise(value));
        }
        Ok(UnitPrice(value))
    }

    /// Parses a decimal string such as `"0.0000025"` (scientific notation accepted).
    pub fn parse(s: &str) -> Result<Self, PriceError> {
        let s = s.trim();
        let value = Decimal::from_str(s)
            .or_else(|_| Decimal::from_scientific(s))
            .map_err(|_| PriceError::NotDecimal(s.to_string()))?;
        UnitPrice::new(value)
    }

    /// The price.
    pub fn value(self) -> Decimal {
        self.0
    }

    /// True for a zero price.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

/// Per-unit prices of one model at one provider, in USD.
///
/// `cache_read`, `cache_write` and `reasoning` are optional: `None` means "no separate
/// price", and those tokens are billed at the prompt (cache) or completion (reasoning)
/// price. See [`crate::costing`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PriceComponents {
    /// Per prompt (input) token.
    pub prompt: UnitPrice,
    /// Per completion (output) token.
    pub completion: UnitPrice,
    /// Per cached prompt token read.
    pub cache_read: Option<UnitPrice>,
    /// Per prompt token written to the cache.
    pub cache_write: Option<UnitPrice>,
    /// Per reasoning token.
    pub reasoning: Option<UnitPrice>,
    /// Per request.
    pub per_request: UnitPrice,
    /// Per input image.
    pub per_image: UnitPrice,
    /// Per web search.
    pub web_search: UnitPrice,
}

/// One version of a model's prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceVersion {
    /// Store-assigned id, recorded on every event costed with this version.
    pub id: i64,
    /// Provider name (e.g. `openrouter`, `openai`).
    pub provider: String,
    /// Model name as the provider reports it (e.g. `openai/gpt-4o` at OpenRouter).
    pub model: String,
    /// First instant at which these prices apply.
    pub effective_from: DateTime<Utc>,
    /// The prices.
    pub prices: PriceComponents,
}

/// An in-memory index of price versions for fast lookups by `(provider, model, time)`.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_model: HashMap<(String, String), Vec<PriceVersion>>,
}

impl Catalog {
    /// Builds the index; versions may come in any order.
    pub fn new(versions: impl IntoIterator<Item = PriceVersion>) -> Self {
        let mut by_model: HashMap<(String, String), Vec<PriceVersion>> = HashMap::new();
        for v in versions {
            by_model
                .entry((v.provider.clone(), v.model.clone()))
                .or_default()
                .push(v);
        }
        for list in by_model.values_mut() {
            list.sort_by_key(|v| v.effective_from);
        }
        Catalog { by_model }
    }

    /// The version in force for `(provider, model)` at instant `at`, if any.
    pub fn price_at(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> Option<&PriceVersion> {
        let list = self
            .by_model
            .get(&(provider.to_string(), model.to_string()))?;
        version_at(list, at)
    }

    /// Number of `(provider, model)` pairs.
    pub fn model_count(&self) -> usize {
        self.by_model.len()
    }

    /// The versions of `(provider, model)`, oldest first.
    pub fn versions_of(&self, provider: &str, model: &str) -> &[PriceVersion] {
        self.by_model
            .get(&(provider.to_string(), model.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    /// Every version, in no particular order.
    pub fn versions(&self) -> impl Iterator<Item = &PriceVersion> {
        self.by_model.values().flatten()
    }
}

/// Picks the version in force at `at` from versions sorted by `effective_from`.
pub fn version_at(sorted: &[PriceVersion], at: DateTime<Utc>) -> Option<&PriceVersion> {
    let idx = sorted.partition_point(|v| v.effective_from <= at);
    idx.checked_sub(1).and_then(|i| sorted.get(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn version(id: i64, day: u32, prompt: &str) -> PriceVersion {
        PriceVersion {
            id,
            provider: "openai".into(),
            model: "gpt-4o".into(),
            effective_from: Utc
                .with_ymd_and_hms(2026, 1, day, 0, 0, 0)
                .single()
                .unwrap_or_default(),
            prices: PriceComponents {
                prompt: UnitPrice::parse(prompt).unwrap_or_default(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn event_is_priced_at_the_version_in_force() {
        let cat = Catalog::new(vec![
            version(2, 10, "0.2"),
            version(1, 1, "0.1"),
            version(3, 20, "0.3"),
        ]);
        let at = |d, h| {
            Utc.with_ymd_and_hms(2026, 1, d, h, 0, 0)
                .single()
                .unwrap_or_default()
        };
        let id = |t| cat.price_at("openai", "gpt-4o", t).map(|v| v.id);
        assert_eq!(
            id(Utc
                .with_ymd_and_hms(2025, 12, 31, 23, 59, 59)
                .single()
                .unwrap_or_default()),
            None
        );
        assert_eq!(id(at(1, 0)), Some(1));
        assert_eq!(id(at(9, 23)), Some(1));
        assert_eq!(id(at(10, 0)), Some(2));
        assert_eq!(id(at(31, 0)), Some(3));
        assert_eq!(cat.price_at("openai", "other", at(31, 0)), None);
    }

    #[test]
    fn unit_prices_reject_negative_and_overly_precise_values() {
        assert!(UnitPrice::parse("-0.1").is_err());
        assert!(UnitPrice::parse("abc").is_err());
        assert!(UnitPrice::parse("0.0000000000000000001").is_err());
        assert_eq!(
            UnitPrice::parse("2.5e-06").map(|p| p.value().to_string()),
            Ok("0.0000025".into())
        );
        assert_eq!(
            UnitPrice::parse("0.000000000001").map(|p| p.value().to_string()),
            Ok("0.000000000001".into())
        );
    }
}

/// What importing a set of prices at one `effective_from` would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportPlan {
    /// New versions to create, each with the `effective_from` of the next existing version
    /// of the same model (the end of the range it governs), if any.
    pub create: Vec<(crate::import::ImportedPrice, Option<DateTime<Utc>>)>,
    /// Models whose version in force at `effective_from` already has these exact prices.
    pub unchanged: usize,
    /// Models that already have a version at exactly `effective_from` with other prices.
    pub conflicts: Vec<String>,
}

/// Plans an import against the existing versions (any order). Re-importing an unchanged
/// catalog creates nothing: a model is only versioned when its prices differ from the
/// version in force at `effective_from`.
pub fn plan_import(
    existing: &Catalog,
    imported: Vec<crate::import::ImportedPrice>,
    effective_from: DateTime<Utc>,
) -> ImportPlan {
    let mut plan = ImportPlan::default();
    for item in imported {
        let versions = existing
            .by_model
            .get(&(item.provider.clone(), item.model.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        match version_at(versions, effective_from) {
            Some(v) if v.prices == item.prices => {
                plan.unchanged += 1;
                continue;
            }
            Some(v) if v.effective_from == effective_from => {
                plan.conflicts
                    .push(format!("{}/{}", item.provider, item.model));
                continue;
            }
            _ => {}
        }
        let next = versions
            .iter()
            .map(|v| v.effective_from)
            .find(|t| *t > effective_from);
        plan.create.push((item, next));
    }
    plan
}
