//! Cost semantics: what one usage event cost upstream.
//!
//! Token fields follow OpenAI and OpenRouter: `input_tokens` *includes* the cached and
//! cache-write tokens, and `output_tokens` *includes* the reasoning tokens. So
//!
//! ```text
//! cost = (input − cached − cache_write) × prompt
//!      + cached × cache_read            (prompt price when there is no cache-read price)
//!      + cache_write × cache_write      (prompt price when there is no cache-write price)
//!      + (output − reasoning) × completion
//!      + reasoning × reasoning          (completion price when there is no reasoning price)
//!      + requests × per_request
//! ```
//!
//! The products of integer counts and prices with at most 18 decimals are exact: a cost is
//! never rounded. Events whose parts exceed their totals are rejected before costing
//! ([`crate::event::TokenUsage::new`]).

use rust_decimal::Decimal;

use crate::catalog::PriceComponents;
use crate::event::TokenUsage;
use crate::money::MoneyError;

/// A cost split by what was billed, in USD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CostBreakdown {
    /// Uncached prompt tokens.
    pub prompt: Decimal,
    /// Cached prompt tokens read.
    pub cache_read: Decimal,
    /// Prompt tokens written to the cache.
    pub cache_write: Decimal,
    /// Non-reasoning completion tokens.
    pub completion: Decimal,
    /// Reasoning tokens.
    pub reasoning: Decimal,
    /// Per-request fees.
    pub requests: Decimal,
}

impl CostBreakdown {
    /// The total cost.
    pub fn total(&self) -> Decimal {
        (self.prompt
            + self.cache_read
            + self.cache_write
            + self.completion
            + self.reasoning
            + self.requests)
            .normalize()
    }
}

fn times(count: u64, price: Decimal) -> Result<Decimal, MoneyError> {
    Decimal::from(count)
        .checked_mul(price)
        .ok_or(MoneyError::Overflow)
}

/// Costs `usage` at `prices` (see the module documentation for the formula).
pub fn cost_usage(
    usage: &TokenUsage,
    prices: &PriceComponents,
) -> Result<CostBreakdown, MoneyError> {
    let prompt = prices.prompt.value();
    let completion = prices.completion.value();
    let cache_read = prices.cache_read.map_or(prompt, |p| p.value());
    let cache_write = prices.cache_write.map_or(prompt, |p| p.value());
    let reasoning = prices.reasoning.map_or(completion, |p| p.value());
    let breakdown = CostBreakdown {
        prompt: times(usage.uncached_input(), prompt)?,
        cache_read: times(usage.cached_input(), cache_read)?,
        cache_write: times(usage.cache_write(), cache_write)?,
        completion: times(usage.non_reasoning_output(), completion)?,
        reasoning: times(usage.reasoning(), reasoning)?,
        requests: times(usage.requests(), prices.per_request.value())?,
    };
    // Validate the sum fits too.
    breakdown
        .prompt
        .checked_add(breakdown.cache_read)
        .and_then(|s| s.checked_add(breakdown.cache_write))
        .and_then(|s| s.checked_add(breakdown.completion))
        .and_then(|s| s.checked_add(breakdown.reasoning))
        .and_then(|s| s.checked_add(breakdown.requests))
        .ok_or(MoneyError::Overflow)?;
    Ok(breakdown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::UnitPrice;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn p(s: &str) -> UnitPrice {
        UnitPrice::parse(s).unwrap_or_default()
    }
    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap_or_default()
    }

    fn sonnet() -> PriceComponents {
        PriceComponents {
            prompt: p("0.000003"),
            completion: p("0.000015"),
            cache_read: Some(p("0.0000003")),
            cache_write: Some(p("0.00000375")),
            reasoning: None,
            per_request: p("0.001"),
            ..Default::default()
        }
    }

    #[test]
    fn cached_and_cache_write_tokens_are_carved_out_of_input() {
        let usage = TokenUsage::new(10_000, 2_000, 6_000, 1_000, 500, 1).unwrap_or_default();
        let c = cost_usage(&usage, &sonnet()).unwrap_or_default();
        assert_eq!(c.prompt, d("0.009")); // 3,000 × 0.000003
        assert_eq!(c.cache_read, d("0.0018")); // 6,000 × 0.0000003
        assert_eq!(c.cache_write, d("0.00375")); // 1,000 × 0.00000375
        assert_eq!(c.completion, d("0.0225")); // 1,500 × 0.000015
        assert_eq!(c.reasoning, d("0.0075")); // 500 × completion price (no reasoning price)
        assert_eq!(c.requests, d("0.001"));
        assert_eq!(c.total(), d("0.04555"));
    }

    #[test]
    fn missing_cache_prices_fall_back_to_prompt_price() {
        let prices = PriceComponents {
            prompt: p("0.000001"),
            completion: p("0.000002"),
            reasoning: Some(p("0.000004")),
            ..Default::default()
        };
        let usage = TokenUsage::new(100, 10, 40, 20, 10, 1).unwrap_or_default();
        let c = cost_usage(&usage, &prices).unwrap_or_default();
        // All 100 input tokens at the prompt price; 10 reasoning at its own price.
        assert_eq!(c.prompt + c.cache_read + c.cache_write, d("0.0001"));
        assert_eq!(c.reasoning, d("0.00004"));
        assert_eq!(c.total(), d("0.00014"));
    }

    proptest! {
        #[test]
        fn more_tokens_never_cost_less(input in 0u64..1_000_000, output in 0u64..1_000_000,
                                       extra_in in 0u64..1000, extra_out in 0u64..1000) {
            let a = TokenUsage::new(input, output, 0, 0, 0, 1).unwrap_or_default();
            let b = TokenUsage::new(input + extra_in, output + extra_out, 0, 0, 0, 1).unwrap_or_default();
            let ca = cost_usage(&a, &sonnet()).map(|c| c.total()).unwrap_or_default();
            let cb = cost_usage(&b, &sonnet()).map(|c| c.total()).unwrap_or_default();
            prop_assert!(cb >= ca);
        }

        #[test]
        fn cost_is_additive_over_split_events(i1 in 0u64..1_000_000, o1 in 0u64..1_000_000,
                                              i2 in 0u64..1_000_000, o2 in 0u64..1_000_000) {
            let a = TokenUsage::new(i1, o1, i1 / 3, i1 / 5, o1 / 2, 1).unwrap_or_default();
            let b = TokenUsage::new(i2, o2, i2 / 3, i2 / 5, o2 / 2, 1).unwrap_or_default();
            let sum = TokenUsage::new(i1 + i2, o1 + o2, i1 / 3 + i2 / 3, i1 / 5 + i2 / 5, o1 / 2 + o2 / 2, 2).unwrap_or_default();
            let ca = cost_usage(&a, &sonnet()).map(|c| c.total()).unwrap_or_default();
            let cb = cost_usage(&b, &sonnet()).map(|c| c.total()).unwrap_or_default();
            let cs = cost_usage(&sum, &sonnet()).map(|c| c.total()).unwrap_or_default();
            prop_assert_eq!(ca + cb, cs);
        }
    }
}
