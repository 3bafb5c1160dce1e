//! [`PaymentGateLayer`]: who is calling, is their subscription in good standing, does their
//! plan include this route.
//!
//! The gate runs before the handler and never reads the body. For each request it
//!
//! 1. finds the route's [`Requirement`](crate::decision::Requirement) among the
//!    [route rules](crate::Billing::route) (the most specific match, else the default);
//! 2. identifies the caller: an [`AccountId`](crate::AccountId) already in the request
//!    extensions, else the API key from `x-api-key` or `Authorization: Bearer`, resolved by
//!    the [`IdentityResolver`](crate::IdentityResolver). Missing, unknown or malformed
//!    credentials get a 401 with `WWW-Authenticate`, never a 402;
//! 3. loads the subscription from the [`PlanStore`](crate::plan::PlanStore) and its plan from
//!    the [`Catalog`](crate::plan::Catalog);
//! 4. calls the pure [`decide`](crate::decision::decide) for status and entitlement, and
//!    prices the route's cost under the plan;
//! 5. hands the request, who pays and its price to the [metering layer](crate::metering)
//!    inside it, which checks allowance and credit once, by reserving them.
//!
//! A refusal is answered right away with a problem document (see [`problem`](crate::problem)).
//! An allowed request gets an [`Entitlement`](crate::Entitlement) in its extensions, which
//! handlers can read, and its response gets an `x-payment-warning` header when something needs
//! attention:
//!
//! | warning | header value |
//! |---|---|
//! | past due, inside the grace period | `past-due; grace-until="2026-12-01T00:00:00Z"` |
//! | allowance crossed the soft limit | `soft-limit; meter="requests"; used=4; limit=5` |
//!
//! When a store cannot be reached within the timeout (default 5 s) the gate answers 503 with
//! `Retry-After` (fail-closed, the default). With [`FailureMode::Open`](crate::FailureMode)
//! it lets the request through unmetered instead and logs a warning.
//!
//! The gate is made by [`Billing::gate`](crate::Billing::gate) and wraps only that billing's
//! metering layer ([`Metered`]); usually both come together from
//! [`Billing::layer`](crate::Billing::layer).
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_402::decision::{Cost, Requirement};
//! use tower_402::plan::{Catalog, Plan};
//! use tower_402::*;
//!
//! let catalog = Catalog::new()
//!     .with_plan(Plan::new("basic", "Basic", 1).overage(true))
//!     .with_plan(Plan::new("pro", "Pro", 2).overage(true));
//! let billing = Billing::new(StaticKeys::new(), MemoryPlanStore::new(), MemoryLedger::new(), catalog)
//!     .route("GET /health", Requirement::public())
//!     .route("GET /v1/premium", Requirement::new().min_tier(2))
//!     .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
//!
//! let app: Router = Router::new()
//!     .route("/v1/premium", get(|e: Entitlement| async move { format!("hello {}", e.account) }))
//!     .layer(billing.layer());
//! ```

mod check;
mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::{Metered, PaymentGateLayer};
pub use service::PaymentGate;

pub(crate) use layer::GateConfig;
