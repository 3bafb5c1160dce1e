//! The quickstart's Stripe webhook, `POST /webhooks/stripe`, on the demo's stores. Not an
//! example of its own: the quickstart merges [`stripe_webhook`] into its router.
//!
//! Try it (with the quickstart running; any HMAC tool signs like Stripe does):
//!
//! ```sh
//! body='{"id":"evt_1","type":"checkout.session.completed","created":1700000000,
//!   "data":{"object":{"payment_status":"paid","payment_intent":"pi_1",
//!   "metadata":{"account_id":"acct_broke","credits":"25"}}}}'
//! t=$(date +%s)
//! sig=$(printf '%s' "$t.$body" | openssl dgst -sha256 -hmac whsec_tower402_quickstart | sed 's/.* //')
//! curl -i localhost:3000/webhooks/stripe -H "stripe-signature: t=$t,v1=$sig" -d "$body"
//! curl -i localhost:3000/v1/balance -H 'x-api-key: demo-broke'     # balance 25
//! ```
//!
//! Or with the Stripe CLI: `stripe listen --forward-to localhost:3000/webhooks/stripe` and
//! `STRIPE_WEBHOOK_SECRET` set to the secret it prints.
#![allow(dead_code)]

use axum::Router;
use tower_402::plan::Catalog;
use tower_402::webhook::{Stripe, WebhookService};
use tower_402::{Clock, MemoryLedger, MemoryPlanStore, SystemClock};

/// The signing secret when `STRIPE_WEBHOOK_SECRET` is not set.
pub const DEFAULT_SECRET: &str = "whsec_tower402_quickstart";

/// The route the webhook is served on.
pub const PATH: &str = "/webhooks/stripe";

/// `STRIPE_WEBHOOK_SECRET`, or [`DEFAULT_SECRET`].
pub fn secret() -> String {
    std::env::var("STRIPE_WEBHOOK_SECRET").unwrap_or_else(|_| DEFAULT_SECRET.to_owned())
}

/// `POST /webhooks/stripe` on the demo's stores, with the secret from
/// `STRIPE_WEBHOOK_SECRET` (default [`DEFAULT_SECRET`]) and the wall clock. Mount it next
/// to the paid routes, outside the payment layers: `router.merge(stripe_webhook(...))`.
pub fn stripe_webhook(plans: MemoryPlanStore, ledger: MemoryLedger, catalog: Catalog) -> Router {
    stripe_webhook_with(plans, ledger, catalog, SystemClock, &secret())
}

/// [`stripe_webhook`] with a given clock and secret (for tests).
pub fn stripe_webhook_with<C: Clock>(
    plans: MemoryPlanStore,
    ledger: MemoryLedger,
    catalog: Catalog,
    clock: C,
    secret: &str,
) -> Router {
    let webhook = WebhookService::new(Stripe::new(secret), plans, ledger, catalog)
        .clock(clock)
        .problems(super::plain::problems());
    Router::new().route_service(PATH, webhook)
}

/// The start-up line: where the webhook is and which secret signs for it (the secret only
/// when it is the public demo default).
pub fn announce() -> String {
    match std::env::var("STRIPE_WEBHOOK_SECRET") {
        Ok(_) => format!("Stripe webhook: POST {PATH} (secret from STRIPE_WEBHOOK_SECRET)"),
        Err(_) => format!(
            "Stripe webhook: POST {PATH} (signing secret {DEFAULT_SECRET}: a public demo \
             secret anyone can sign with; set STRIPE_WEBHOOK_SECRET before this serves anyone \
             but you)"
        ),
    }
}
