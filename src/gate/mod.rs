//! [`PaymentGateLayer`]: who is calling, is their subscription in good standing, does their
//! plan include this route, is there allowance or credit left.
//!
//! The gate runs before the handler and never reads the body. For each request it
//!
//! 1. finds the route's [`Requirement`](crate::decision::Requirement) (first matching
//!    [`route`](PaymentGateLayer::route), else the default);
//! 2. identifies the caller: an [`AccountId`](crate::AccountId) already in the request
//!    extensions, else the API key from `x-api-key` or `Authorization: Bearer`, resolved by
//!    the [`IdentityResolver`](crate::IdentityResolver). Missing, unknown or malformed
//!    credentials get a 401 with `WWW-Authenticate`, never a 402;
//! 3. loads the subscription from the [`PlanStore`](crate::plan::PlanStore) and its plan from
//!    the [`Catalog`](crate::plan::Catalog);
//! 4. reads the balance and allowance used from the [`Ledger`](crate::Ledger) when the route
//!    has a cost (unless the metering layer checks them, see
//!    [`and_metering`](PaymentGateLayer::and_metering));
//! 5. calls the pure [`decide`](crate::decision::decide).
//!
//! A refusal is answered right away with a problem document (see [`problem`](crate::problem)).
//! An allowed request gets an [`Entitlement`] in its extensions, which handlers can read, and
//! its response gets an `x-payment-warning` header when something needs attention:
//!
//! | warning | header value |
//! |---|---|
//! | past due, inside the grace period | `past-due; grace-until="2026-12-01T00:00:00Z"` |
//! | allowance crossed the soft limit | `soft-limit; meter="requests"; used=4; limit=5` |
//!
//! When a store cannot be reached within the timeout (default 5 s) the gate answers 503 with
//! `Retry-After` (fail-closed, the default). With [`FailureMode::Open`] it lets the request
//! through instead and logs a warning; the request then carries a [`FailedOpen`] marker so
//! the metering layer knows not to expect an entitlement.
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router, Extension};
//! use tower_402::{PaymentGateLayer, StaticKeys, MemoryPlanStore, MemoryLedger, Entitlement, Credits};
//! use tower_402::decision::{Cost, Requirement};
//! use tower_402::plan::{Catalog, Plan};
//!
//! let catalog = Catalog::new()
//!     .with_plan(Plan::new("basic", "Basic", 1).overage(true))
//!     .with_plan(Plan::new("pro", "Pro", 2).overage(true));
//! let gate = PaymentGateLayer::new(StaticKeys::new(), MemoryPlanStore::new(), catalog)
//!     .ledger(MemoryLedger::new())
//!     .route("GET /health", Requirement::public())
//!     .route("GET /v1/premium", Requirement::new().min_tier(2))
//!     .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
//!
//! let app: Router = Router::new()
//!     .route("/v1/premium", get(|Extension(e): Extension<Entitlement>| async move {
//!         format!("hello {}", e.account)
//!     }))
//!     .layer(gate);
//! ```

mod entitlement;
mod future;
mod layer;
mod service;

pub use entitlement::{Entitlement, FailedOpen, PublicRoute};
pub use future::ResponseFuture;
pub use layer::{FailureMode, GateAndMeteringLayer, PaymentGateLayer};
pub use service::PaymentGate;

pub(crate) use layer::GateConfig;
pub(crate) use service::{log_denial, noop_waker};

#[cfg(feature = "axum")]
pub use entitlement::MissingEntitlement;
