//! Price catalog importers: OpenRouter's `/api/v1/models` JSON and LiteLLM's price map.
//!
//! Both produce a [`ParsedCatalog`]: one [`PriceComponents`] per `(provider, model)` and a
//! list of entries skipped with the reason. Parsing is pure; storing versions is the
//! store's job.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use crate::catalog::{PriceComponents, UnitPrice};
use crate::event::check_name;
use crate::money::{LEDGER_SCALE, ROUNDING};

/// A catalog file that cannot be imported at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// Not JSON.
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// JSON of the wrong shape.
    #[error("{0}")]
    Shape(String),
    /// Nothing importable.
    #[error("the file has no model with usable prices")]
    Empty,
}

/// The catalog formats fatura imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogFormat {
    /// OpenRouter `GET /api/v1/models`.
    OpenRouter,
    /// LiteLLM `model_prices_and_context_window.json`.
    LiteLlm,
}

impl std::str::FromStr for CatalogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openrouter" => Ok(CatalogFormat::OpenRouter),
            "litellm" => Ok(CatalogFormat::LiteLlm),
            other => Err(format!(
                "unknown catalog format {other:?}: expected openrouter or litellm"
            )),
        }
    }
}

/// Prices of one model read from a catalog file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedPrice {
    /// Provider name.
    pub provider: String,
    /// Model name.
    pub model: String,
    /// Prices.
    pub prices: PriceComponents,
}

/// An entry left out of an import, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's key or id in the file.
    pub entry: String,
    /// Why it was left out.
    pub reason: String,
}

/// The result of parsing a catalog file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedCatalog {
    /// Prices, sorted by (provider, model).
    pub prices: Vec<ImportedPrice>,
    /// Entries left out.
    pub skipped: Vec<Skipped>,
}

/// Parses a catalog file. `provider` is the provider name recorded for OpenRouter
/// (default `openrouter`) and, for LiteLLM, a filter: only entries whose
/// `litellm_provider` equals it are imported.
pub fn parse_catalog(
    format: CatalogFormat,
    bytes: &[u8],
    provider: Option<&str>,
) -> Result<ParsedCatalog, ImportError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ImportError::NotJson(e.to_string()))?;
    let parsed = match format {
        CatalogFormat::OpenRouter => parse_openrouter(&value, provider.unwrap_or("openrouter"))?,
        CatalogFormat::LiteLlm => parse_litellm(&value, provider)?,
    };
    if parsed.prices.is_empty() {
        return Err(ImportError::Empty);
    }
    Ok(parsed)
}

/// OpenRouter prices are decimal strings. `"-1"` marks variable pricing (e.g. the
/// `openrouter/auto` router) and cannot be imported.
fn openrouter_price(pricing: &Map<String, Value>, key: &str) -> Result<Option<UnitPrice>, String> {
    match pricing.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let p = UnitPrice::parse(s).map_err(|e| format!("pricing.{key}: {e}"))?;
            Ok(Some(p))
        }
        Some(Value::Number(n)) => {
            let p = UnitPrice::parse(&n.to_string()).map_err(|e| format!("pricing.{key}: {e}"))?;
            Ok(Some(p))
        }
        Some(other) => Err(format!(
            "pricing.{key}: expected a decimal string, got {other}"
        )),
    }
}

fn parse_openrouter(value: &Value, provider: &str) -> Result<ParsedCatalog, ImportError> {
    check_name("provider", provider).map_err(|e| ImportError::Shape(e.to_string()))?;
    let data = value.get("data").and_then(Value::as_array).ok_or_else(|| {
        ImportError::Shape(
            "expected an object with a \"data\" array (OpenRouter /api/v1/models)".into(),
        )
    })?;
    let mut out: BTreeMap<String, PriceComponents> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (i, entry) in data.iter().enumerate() {
        let Some(id) = entry.get("id").and_then(Value::as_str) else {
            skipped.push(Skipped {
                entry: format!("data[{i}]"),
                reason: "no string id".into(),
            });
            continue;
        };
        let result = (|| -> Result<PriceComponents, String> {
            check_name("model", id).map_err(|e| e.to_string())?;
            let pricing = entry
                .get("pricing")
                .and_then(Value::as_object)
                .ok_or("no pricing object")?;
            let get = |k| openrouter_price(pricing, k);
            let prompt = get("prompt")?.ok_or("no prompt price")?;
            let completion = get("completion")?.ok_or("no completion price")?;
            // OpenRouter's "0" for these means "no separate price": fall back to the base price.
            let separate = |p: Option<UnitPrice>| p.filter(|p| !p.is_zero());
            Ok(PriceComponents {
                prompt,
                completion,
                cache_read: separate(get("input_cache_read")?),
                cache_write: separate(get("input_cache_write")?),
                reasoning: separate(get("internal_reasoning")?),
                per_request: get("request")?.unwrap_or_default(),
                per_image: get("image")?.unwrap_or_default(),
                web_search: get("web_search")?.unwrap_or_default(),
            })
        })();
        match result {
            Ok(prices) => {
                if out.contains_key(id) {
                    skipped.push(Skipped {
                        entry: id.to_string(),
                        reason: "duplicate id".into(),
                    });
                } else {
                    out.insert(id.to_string(), prices);
                }
            }
            Err(reason) => {
                // A negative price is OpenRouter's marker for variable pricing.
                let reason = if reason.contains("negative") {
                    format!("variable pricing ({reason})")
                } else {
                    reason
                };
                skipped.push(Skipped {
                    entry: id.to_string(),
                    reason,
                });
            }
        }
    }
    Ok(ParsedCatalog {
        prices: out
            .into_iter()
            .map(|(model, prices)| ImportedPrice {
                provider: provider.to_string(),
                model,
                prices,
            })
            .collect(),
        skipped,
    })
}

/// Converts a JSON number from LiteLLM's file to a decimal without binary noise.
///
/// The file's numbers are Python floats. A binary double holds 15 significant decimal
/// digits faithfully; the 16th and 17th digits of a shortest round-trip representation
/// (`1.0000000000000001e-07`) are artefacts of float arithmetic upstream. So the value is
/// rounded to 15 significant digits, then to the ledger's 18 decimal places (half to even),
/// and trailing zeros are dropped: `2.5e-06` becomes exactly `0.0000025` and
/// `1.0000000000000001e-07` becomes `0.0000001`.
pub fn float_to_price(x: f64) -> Result<UnitPrice, String> {
    if !x.is_finite() {
        return Err(format!("not a finite number: {x}"));
    }
    let text = format!("{x:.14e}");
    let d = Decimal::from_scientific(&text).map_err(|e| format!("cannot convert {x}: {e}"))?;
    let d = d.round_dp_with_strategy(LEDGER_SCALE, ROUNDING).normalize();
    UnitPrice::new(d).map_err(|e| e.to_string())
}

fn litellm_price(entry: &Map<String, Value>, key: &str) -> Result<Option<UnitPrice>, String> {
    match entry.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let f = n.as_f64().ok_or_else(|| format!("{key}: not a number"))?;
            float_to_price(f)
                .map(Some)
                .map_err(|e| format!("{key}: {e}"))
        }
        Some(Value::String(s)) => UnitPrice::parse(s)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
        Some(other) => Err(format!("{key}: expected a number, got {other}")),
    }
}

fn parse_litellm(value: &Value, only_provider: Option<&str>) -> Result<ParsedCatalog, ImportError> {
    let map = value.as_object().ok_or_else(|| {
        ImportError::Shape("expected a JSON object keyed by model name (LiteLLM price map)".into())
    })?;
    // (provider, model) -> (had_prefix, key, prices). Keys without a provider prefix win
    // over prefixed aliases of the same model.
    let mut out: BTreeMap<(String, String), (bool, String, PriceComponents)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (key, entry) in map {
        if key == "sample_spec" {
            continue;
        }
        let Some(entry) = entry.as_object() else {
            skipped.push(Skipped {
                entry: key.clone(),
                reason: "not an object".into(),
            });
            continue;
        };
        let Some(provider) = entry.get("litellm_provider").and_then(Value::as_str) else {
            skipped.push(Skipped {
                entry: key.clone(),
                reason: "no litellm_provider".into(),
            });
            continue;
        };
        if only_provider.is_some_and(|p| p != provider) {
            continue;
        }
        let prefix = format!("{provider}/");
        let (had_prefix, model) = match key.strip_prefix(&prefix) {
            Some(rest) if !rest.is_empty() => (true, rest.to_string()),
            _ => (false, key.clone()),
        };
        let result = (|| -> Result<PriceComponents, String> {
            check_name("provider", provider).map_err(|e| e.to_string())?;
            check_name("model", &model).map_err(|e| e.to_string())?;
            let get = |k| litellm_price(entry, k);
            let prompt = get("input_cost_per_token")?;
            let completion = get("output_cost_per_token")?;
            if prompt.is_none() && completion.is_none() {
                return Err(
                    "no per-token prices (input_cost_per_token / output_cost_per_token)".into(),
                );
            }
            Ok(PriceComponents {
                prompt: prompt.unwrap_or_default(),
                completion: completion.unwrap_or_default(),
                cache_read: get("cache_read_input_token_cost")?,
                cache_write: get("cache_creation_input_token_cost")?,
                reasoning: get("output_cost_per_reasoning_token")?,
                per_request: get("input_cost_per_request")?.unwrap_or_default(),
                per_image: get("input_cost_per_image")?.unwrap_or_default(),
                web_search: UnitPrice::ZERO,
            })
        })();
        let prices = match result {
            Ok(p) => p,
            Err(reason) => {
                skipped.push(Skipped {
                    entry: key.clone(),
                    reason,
                });
                continue;
            }
        };
        let slot = (provider.to_string(), model);
        match out.get(&slot) {
            None => {
                out.insert(slot, (had_prefix, key.clone(), prices));
            }
            Some((existing_prefixed, existing_key, _)) => {
                if *existing_prefixed && !had_prefix {
                    let reason = format!("alias of {key}");
                    skipped.push(Skipped {
                        entry: existing_key.clone(),
                        reason,
                    });
                    out.insert(slot, (had_prefix, key.clone(), prices));
                } else {
                    skipped.push(Skipped {
                        entry: key.clone(),
                        reason: format!("alias of {existing_key}"),
                    });
                }
            }
        }
    }
    Ok(ParsedCatalog {
        prices: out
            .into_iter()
            .map(|((provider, model), (_, _, prices))| ImportedPrice {
                provider,
                model,
                prices,
            })
            .collect(),
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn floats_convert_without_binary_noise() {
        let cases = [
            (2.5e-06, "0.0000025"),
            (1e-05, "0.00001"),
            (1.0000000000000001e-07, "0.0000001"),
            (9.499999999999999e-07, "0.00000095"),
            (3.0001999999999996e-07, "0.00000030002"),
            (0.0, "0"),
            (1.41953125e-07, "0.000000141953125"),
        ];
        for (f, want) in cases {
            assert_eq!(
                float_to_price(f).map(|p| p.value().to_string()),
                Ok(price(want)),
                "{f:e}"
            );
        }
    }

    #[test]
    fn openrouter_zero_cache_and_reasoning_prices_mean_no_separate_price() {
        let body = br#"{"data":[
            {"id":"anthropic/claude-sonnet-4","pricing":{"prompt":"0.000003","completion":"0.000015","request":"0","image":"0.0048","web_search":"0","internal_reasoning":"0","input_cache_read":"0.0000003","input_cache_write":"0.00000375"}},
            {"id":"openrouter/auto","pricing":{"prompt":"-1","completion":"-1"}},
            {"id":"broken","pricing":{"prompt":12}}
        ]}"#;
        let parsed = parse_catalog(CatalogFormat::OpenRouter, body, None).unwrap_or_default();
        assert_eq!(parsed.prices.len(), 1);
        let p = &parsed.prices[0];
        assert_eq!(
            (p.provider.as_str(), p.model.as_str()),
            ("openrouter", "anthropic/claude-sonnet-4")
        );
        assert_eq!(p.prices.reasoning, None);
        assert_eq!(
            p.prices.cache_read.map(|x| x.value().to_string()),
            Some(price("0.0000003"))
        );
        assert_eq!(p.prices.per_image.value().to_string(), "0.0048");
        assert_eq!(parsed.skipped.len(), 2);
        assert!(parsed.skipped[0].reason.starts_with("variable pricing"));
    }

    #[test]
    fn litellm_prefixed_aliases_yield_to_plain_keys() {
        let body = br#"{
            "sample_spec": {"input_cost_per_token": 0.0},
            "openai/gpt-4o": {"litellm_provider":"openai","input_cost_per_token":9e-06,"output_cost_per_token":1e-05},
            "gpt-4o": {"litellm_provider":"openai","input_cost_per_token":2.5e-06,"output_cost_per_token":1e-05,"cache_read_input_token_cost":1.25e-06},
            "openrouter/openai/gpt-4o": {"litellm_provider":"openrouter","input_cost_per_token":2.5e-06,"output_cost_per_token":1e-05},
            "dall-e-3": {"litellm_provider":"openai","mode":"image_generation"}
        }"#;
        let parsed = parse_catalog(CatalogFormat::LiteLlm, body, None).unwrap_or_default();
        let names: Vec<_> = parsed
            .prices
            .iter()
            .map(|p| format!("{}|{}", p.provider, p.model))
            .collect();
        assert_eq!(names, vec!["openai|gpt-4o", "openrouter|openai/gpt-4o"]);
        assert_eq!(
            parsed.prices[0].prices.prompt.value().to_string(),
            "0.0000025"
        );
        let only =
            parse_catalog(CatalogFormat::LiteLlm, body, Some("openrouter")).unwrap_or_default();
        assert_eq!(only.prices.len(), 1);
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        assert!(matches!(
            parse_catalog(CatalogFormat::OpenRouter, b"{", None),
            Err(ImportError::NotJson(_))
        ));
        assert!(matches!(
            parse_catalog(CatalogFormat::OpenRouter, b"[]", None),
            Err(ImportError::Shape(_))
        ));
        assert!(matches!(
            parse_catalog(CatalogFormat::LiteLlm, b"[]", None),
            Err(ImportError::Shape(_))
        ));
        assert_eq!(
            parse_catalog(CatalogFormat::LiteLlm, b"{}", None),
            Err(ImportError::Empty)
        );
    }
}
