//! Keeping subscriptions and credit in sync with the payment processor (feature `stripe`).
//!
//! A 402 is only as right as the subscription behind it, and subscriptions are paid, fail,
//! renew and end at the payment processor. [`WebhookService`] is the processor's webhook
//! endpoint as a tower service: it verifies the delivery's signature, reads the event, and
//! writes the change into the [`PlanStore`](crate::plan::PlanStore) and the
//! [`Ledger`](crate::Ledger) the gate reads. [`Stripe`] is the processor this crate ships;
//! another one implements [`Processor`] (verify, parse) and reuses the rest.
//!
//! # Examples
//!
//! ## Mounting the Stripe webhook on axum
//!
//! ```
//! use axum::Router;
//! use tower_402::plan::{Catalog, Plan};
//! use tower_402::webhook::{Stripe, WebhookService};
//! use tower_402::{MemoryLedger, MemoryPlanStore};
//!
//! let catalog = Catalog::new().with_plan(Plan::new("pro", "Pro", 2).overage(true));
//! let (plans, ledger) = (MemoryPlanStore::new(), MemoryLedger::new());
//! // The same stores (and catalog) as the PaymentGateLayer's.
//! let webhook = WebhookService::new(
//!     Stripe::new("whsec_from_the_dashboard"),
//!     plans.clone(),
//!     ledger.clone(),
//!     catalog.clone(),
//! );
//! let app: Router = Router::new().route_service("/webhooks/stripe", webhook);
//! ```
//!
//! Mount it outside the [`PaymentGateLayer`](crate::PaymentGateLayer) (Stripe has no API
//! key) and outside anything that reads or rewrites the body: the signature is over the raw
//! bytes.
//!
//! ## What it does with each event
//!
//! | Stripe event | effect |
//! |---|---|
//! | `customer.subscription.created`, `.updated`, `.deleted`, `.paused`, `.resumed` | the account's subscription becomes the object's: status, plan (first item's `price.lookup_key`), period, trial end, cancel and end times |
//! | `invoice.payment_failed` | past due from the first failure: served through the plan's grace period, with a warning header, then `SUBSCRIPTION_PAST_DUE` |
//! | `invoice.paid` | a past-due, unpaid or incomplete subscription is active again |
//! | `checkout.session.completed` (paid), `checkout.session.async_payment_succeeded`, `payment_intent.succeeded` with `metadata.credits` | a deposit of that many credits, once per payment |
//! | any other | nothing (200, and a log line) |
//!
//! The account is the object's `metadata.account_id` (set it when you create the Checkout
//! Session or Subscription), and the plan the first item's `price.lookup_key`; both are
//! pluggable ([`Stripe::account_of`], [`Stripe::plan_of`]).
//!
//! ## Answers
//!
//! | case | answer |
//! |---|---|
//! | applied | 200 `{"received": true, "id", "type", "outcome": "applied"}` |
//! | the same event again | 200, `"outcome": "duplicate"`, no second effect |
//! | older (by `created`, then id) than the event applied last for that account | 200, `"outcome": "stale"`, ignored |
//! | an event type not handled, an object without an account | 200, `"outcome": "ignored"` |
//! | bad, missing or stale signature (tolerance 300 s) | 400 problem `INVALID_SIGNATURE` |
//! | signed, but not a readable event (`metadata.credits` not a whole number...) | 400 problem `INVALID_EVENT` |
//! | body over the limit (256 KiB) | 413 problem `PAYLOAD_TOO_LARGE` |
//! | a live subscription on a plan the catalog lacks | 422 problem `UNKNOWN_PLAN` (Stripe retries; fix the catalog) |
//! | the plan store or ledger unreachable | 503 problem `SERVICE_UNAVAILABLE`, so that Stripe delivers again |
//!
//! Logs (target `tower_402::webhook`) name the event, its type and the outcome; never the
//! secret, the signature or the body.
//!
//! ## Once, and in order
//!
//! Stripe delivers at least once, and not in order. Each subscription written from an event
//! carries a [`SyncMark`](crate::plan::SyncMark): the Stripe subscription and the
//! `(created, id)` of the event. An event not after the stored mark is a duplicate or
//! stale. The write is a compare-and-write on the mark
//! ([`PlanStore::put_subscription_if`](crate::plan::PlanStore::put_subscription_if),
//! atomic on the memory, Redis and PostgreSQL stores), so two instances receiving two
//! deliveries at once cannot interleave. A deposit is keyed by the payment intent
//! (`stripe:pi_...`; the event id when there is none), so the same payment reported by a
//! Checkout Session and by its payment intent is deposited once.
//!
//! ## Plan changes without a gap
//!
//! An upgrade, downgrade or renewal is one write of the whole subscription: a request sees
//! the old plan or the new one, never no subscription. An `active` subscription is served
//! whatever its `current_period_end`, so a renewal whose events are late refuses no one; a
//! failed renewal is past due, served through the grace period. A cancellation of another
//! Stripe subscription of the account (an upgrade made as "create the new one, cancel the
//! old") does not replace the live one. A [`CachingPlanStore`](crate::store::CachingPlanStore)
//! drops the entry written through it, so the next request on that instance sees the
//! change; other instances see it within their TTL, or at once if they
//! [`invalidate`](crate::store::CachingPlanStore::invalidate).
//!
//! Allowances are counted per meter and calendar window in the ledger, not per plan: a plan
//! change inside a window carries the units used over to the new plan's limit (5 used of a
//! free plan's 5 is 5 used of pro's 1,000), and every allowance resets at its period
//! boundary.
//!
//! ## Testing your endpoint
//!
//! [`sign_stripe`] makes the header Stripe would send:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_402::plan::{Catalog, Plan};
//! use tower_402::webhook::{sign_stripe, WebhookService};
//! use tower_402::{AccountId, Ledger, MemoryLedger, MemoryPlanStore, Timestamp};
//!
//! let ledger = MemoryLedger::new();
//! let webhook = WebhookService::stripe("whsec_test", MemoryPlanStore::new(), ledger.clone(),
//!                                      Catalog::new());
//! let body = r#"{"id": "evt_1", "type": "checkout.session.completed", "created": 1700000000,
//!   "data": {"object": {"payment_status": "paid", "payment_intent": "pi_1",
//!   "metadata": {"account_id": "acme", "credits": "500"}}}}"#;
//! let req = Request::post("/webhooks/stripe")
//!     .header("stripe-signature", sign_stripe("whsec_test", Timestamp::now(), body.as_bytes()))
//!     .body(body.to_owned())
//!     .unwrap();
//! let res = webhook.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let acme = AccountId::new("acme");
//! assert_eq!(ledger.balance(&acme, Timestamp::now()).await.unwrap().available.get(), 500);
//! # }
//! ```

mod apply;
mod event;
mod service;
mod signature;
mod stripe;

pub use apply::Outcome;
pub use event::{Change, Event, EventError, Processor, SubscriptionState};
pub use service::{
    ApplyError, ResponseFuture, WebhookBody, WebhookService, DEFAULT_MAX_BODY_BYTES,
};
pub use signature::{sign_stripe, Secret, SignatureError, StripeSignature, DEFAULT_TOLERANCE_SECS};
pub use stripe::{AccountOf, LookupKey, Metadata, MetadataAccount, PlanOf, Stripe, StripeObject};
