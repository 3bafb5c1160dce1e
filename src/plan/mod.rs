//! Plans, the catalog that lists them, subscriptions and the [`PlanStore`] that keeps them.
//!
//! The **catalog** is static configuration shared by every instance, deserializable from JSON
//! or TOML:
//!
//! ```
//! use tower_402::plan::Catalog;
//!
//! let catalog: Catalog = serde_json::from_str(r#"{
//!   "plans": [
//!     { "id": "free", "name": "Free", "tier": 0,
//!       "allowances": [{ "meter": "requests", "limit": 5, "period": "calendar_month" }] },
//!     { "id": "pro", "name": "Pro", "tier": 2, "features": ["premium-models"],
//!       "overage": true, "grace_period_secs": 259200 }
//!   ]
//! }"#).unwrap();
//! assert_eq!(catalog.get("pro").unwrap().tier, 2);
//! ```
//!
//! A **subscription** links an account to a plan with a status that mirrors what payment
//! processors report (see [`SubscriptionStatus`]); a webhook handler writes it with
//! [`PlanStore::put_subscription`].

mod catalog;
mod period;
mod store;
mod subscription;

pub use catalog::{Allowance, AllowanceWindow, Catalog, CatalogError, Meter, Period, Plan, PlanId};
pub use period::{Calendar, InvalidOffset, MAX_UTC_OFFSET_SECS};
pub use store::PlanStore;
pub use subscription::{Subscription, SubscriptionStatus, SyncMark};
