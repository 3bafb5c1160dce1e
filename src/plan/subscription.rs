use serde::{Deserialize, Serialize};

use crate::account::AccountId;
use crate::plan::PlanId;
use crate::time::Timestamp;

/// Where a subscription stands, as payment processors report it.
///
/// The names and meanings follow Stripe's subscription statuses, so a webhook handler can copy
/// the status across (`incomplete_expired` is accepted as [`Expired`](Self::Expired)).
///
/// | status | served? | refusal |
/// |---|---|---|
/// | `trialing` | until `trial_end` | `TRIAL_EXPIRED` after it |
/// | `active` | yes | |
/// | `past_due` | inside the grace period, with a warning header | `SUBSCRIPTION_PAST_DUE` after it |
/// | `unpaid` | no (retries exhausted) | `SUBSCRIPTION_PAST_DUE` |
/// | `canceled`, `expired` | no | `SUBSCRIPTION_EXPIRED` |
/// | `paused` | no | `TRIAL_EXPIRED` if it has a `trial_end`, else `SUBSCRIPTION_PENDING` |
/// | `incomplete` | no (awaiting first payment) | `SUBSCRIPTION_PENDING` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SubscriptionStatus {
    /// In a free trial until `trial_end`.
    Trialing,
    /// Paid and in good standing.
    Active,
    /// The renewal payment failed; served during the grace period.
    PastDue,
    /// Payment retries are exhausted; invoices remain open.
    Unpaid,
    /// Canceled and ended.
    Canceled,
    /// Paused (Stripe pauses a trial that ends without a payment method).
    Paused,
    /// Created, awaiting its first payment or an approval.
    Incomplete,
    /// Ended without ever becoming active, or otherwise over.
    #[serde(alias = "incomplete_expired")]
    Expired,
}

impl SubscriptionStatus {
    /// The status as written in JSON (`"past_due"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Unpaid => "unpaid",
            SubscriptionStatus::Canceled => "canceled",
            SubscriptionStatus::Paused => "paused",
            SubscriptionStatus::Incomplete => "incomplete",
            SubscriptionStatus::Expired => "expired",
        }
    }
}

/// An account's link to a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Who pays.
    pub account: AccountId,
    /// Which plan.
    pub plan: PlanId,
    /// Where it stands.
    pub status: SubscriptionStatus,
    /// Start of the current billing period.
    #[serde(default)]
    pub current_period_start: Option<Timestamp>,
    /// End of the current billing period.
    #[serde(default)]
    pub current_period_end: Option<Timestamp>,
    /// End of the trial, for `trialing` (and `paused`) subscriptions.
    #[serde(default)]
    pub trial_end: Option<Timestamp>,
    /// When cancellation was requested.
    #[serde(default)]
    pub canceled_at: Option<Timestamp>,
    /// When the subscription ended.
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    /// When a renewal payment first failed; the grace period counts from here.
    #[serde(default)]
    pub past_due_since: Option<Timestamp>,
    /// An explicit end of the grace period, overriding the computed one.
    #[serde(default)]
    pub grace_until: Option<Timestamp>,
    /// The payment processor's object and event this state was last written from, for
    /// webhooks that must apply events once and in order; `None` when the application wrote
    /// it. See [`PlanStore::put_subscription_if`](crate::plan::PlanStore::put_subscription_if).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced: Option<SyncMark>,
}

/// Where a subscription's state came from: the processor's object and the last event applied.
///
/// Events are ordered by `(event_created, event_id)`, as Stripe recommends (a webhook may
/// deliver them late, twice, or out of order).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SyncMark {
    /// The processor's object, namespaced by processor: `stripe:sub_1Nx...`.
    pub source: String,
    /// When the processor created the last event applied.
    pub event_created: Timestamp,
    /// That event's id (`evt_...`); it breaks ties between events of the same second.
    pub event_id: String,
}

impl SyncMark {
    /// A mark for the event `event_id` created at `event_created` about `source`.
    pub fn new(
        source: impl Into<String>,
        event_created: Timestamp,
        event_id: impl Into<String>,
    ) -> Self {
        SyncMark {
            source: source.into(),
            event_created,
            event_id: event_id.into(),
        }
    }

    /// Whether this mark's event comes after `other`'s: a later `created`, or the same second
    /// and a greater id.
    pub fn is_after(&self, other: &SyncMark) -> bool {
        (self.event_created, self.event_id.as_str())
            > (other.event_created, other.event_id.as_str())
    }
}

impl Subscription {
    /// A subscription with only account, plan and status set.
    pub fn new(account: impl Into<AccountId>, plan: &str, status: SubscriptionStatus) -> Self {
        Subscription {
            account: account.into(),
            plan: PlanId::new(plan),
            status,
            current_period_start: None,
            current_period_end: None,
            trial_end: None,
            canceled_at: None,
            ended_at: None,
            past_due_since: None,
            grace_until: None,
            synced: None,
        }
    }

    /// An `active` subscription.
    pub fn active(account: impl Into<AccountId>, plan: &str) -> Self {
        Self::new(account, plan, SubscriptionStatus::Active)
    }

    /// The end of the grace period of a past-due subscription: `grace_until` if set, else
    /// `past_due_since` (or the period end) plus `grace_secs`.
    pub fn grace_end(&self, grace_secs: u64) -> Option<Timestamp> {
        self.grace_until.or_else(|| {
            self.past_due_since
                .or(self.current_period_end)
                .map(|t| t.plus_secs(grace_secs))
        })
    }
}
