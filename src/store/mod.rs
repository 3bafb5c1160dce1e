//! Backends for the [`Ledger`](crate::Ledger) and the [`PlanStore`](crate::plan::PlanStore).
//!
//! | backend | feature | for |
//! |---|---|---|
//! | [`MemoryLedger`], [`MemoryPlanStore`] | always | one process; the embedded default; tests |

mod memory;

pub use memory::{MemoryLedger, MemoryPlanStore};
