//! What a payment processor's webhook tells us, in this crate's terms, and the [`Processor`]
//! trait that turns a signed request into it.

use std::borrow::Cow;

use http::HeaderMap;

use crate::account::AccountId;
use crate::credits::Credits;
use crate::plan::{PlanId, SubscriptionStatus};
use crate::time::Timestamp;
use crate::webhook::SignatureError;

/// A payment processor behind a [`WebhookService`](crate::webhook::WebhookService): checks
/// a delivery's signature, then reads its event.
///
/// [`Stripe`](crate::webhook::Stripe) is the one this crate ships. Another processor
/// implements these two methods; the service does the rest (body limits, answers, ordering,
/// idempotency, the stores).
pub trait Processor: Send + Sync + 'static {
    /// Checks the signature of the raw `body` delivered with `headers`, at `now`.
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: Timestamp,
    ) -> Result<(), SignatureError>;

    /// Reads the (verified) body.
    fn parse(&self, body: &[u8]) -> Result<Event, EventError>;
}

/// One event from a processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The processor's event id (`evt_...`): the unit of idempotency.
    pub id: String,
    /// The processor's event type (`customer.subscription.updated`), for logs.
    pub kind: String,
    /// When the processor created the event: events are ordered by this, then by id.
    pub created: Timestamp,
    /// What it changes.
    pub change: Change,
}

/// What an event changes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The processor's subscription as it stands after the event (created, updated,
    /// deleted, paused, resumed): replaces the account's subscription.
    Subscription(SubscriptionState),
    /// A payment of the subscription `source` failed: past due, with the plan's grace period.
    PaymentFailed {
        /// Whose.
        account: AccountId,
        /// The processor's subscription (`stripe:sub_...`).
        source: String,
    },
    /// An invoice of the subscription `source` was paid: a past-due subscription is active
    /// again.
    PaymentSucceeded {
        /// Whose.
        account: AccountId,
        /// The processor's subscription (`stripe:sub_...`).
        source: String,
    },
    /// Prepaid credit was bought: a deposit, once per `payment`.
    Credits {
        /// Whose.
        account: AccountId,
        /// How much.
        credits: Credits,
        /// The deposit's idempotency key: the payment's own id when the processor has one
        /// (so two events about one payment deposit once), else the event's.
        payment: String,
    },
    /// Nothing for us to do (an event type not handled, an object without an account): why.
    Ignored(Cow<'static, str>),
}

/// A processor's subscription, as this crate stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionState {
    /// Whose.
    pub account: AccountId,
    /// The processor's subscription (`stripe:sub_...`).
    pub source: String,
    /// The plan; `None` when the processor's object names none the catalog could know.
    pub plan: Option<PlanId>,
    /// Where it stands.
    pub status: SubscriptionStatus,
    /// Start of the current period.
    pub current_period_start: Option<Timestamp>,
    /// End of the current period.
    pub current_period_end: Option<Timestamp>,
    /// End of the trial.
    pub trial_end: Option<Timestamp>,
    /// When cancellation was requested.
    pub canceled_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

/// A signed body that is not an event this crate can read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// Not JSON, or not the shape of an event.
    #[error("the body is not an event")]
    Malformed(#[source] serde_json::Error),
    /// An event, with a field this crate needs that is out of range or of the wrong type.
    #[error("{0}")]
    Invalid(Cow<'static, str>),
}
