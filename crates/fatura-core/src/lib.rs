//! # fatura-core
//!
//! The pure domain of fatura: exact money, identifiers, usage events, the versioned
//! price catalog, costing, the default cost-plus rating, catalog importers and usage
//! aggregation.
//!
//! Architecture Invariant: this crate does no IO, has no async code and never reads a
//! clock. Everything it needs (timestamps, catalog versions, margins) is passed in, so
//! every function here is deterministic and property-testable.

pub mod billing;
pub mod catalog;
pub mod costing;
pub mod event;
pub mod forecast;
pub mod ids;
pub mod import;
pub mod money;
pub mod rating;
pub mod rollup;
pub mod status;
pub mod usage;
pub mod wallet;

pub use catalog::{Catalog, PriceComponents, PriceVersion, UnitPrice};
pub use costing::{CostBreakdown, cost_usage};
pub use event::{BudgetHold, EventError, TokenUsage, UsageEvent};
pub use ids::{CustomerId, EventId, IdError};
pub use money::{Currency, LEDGER_SCALE, MarginRate, Money, MoneyError, exact_add, round_ledger};
