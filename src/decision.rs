//! The decision: a pure function from (subscription, plan, requirement, balances, now) to
//! allow or deny, and the typed [`Denial`]s it produces.
//!
//! [`decide`] performs no I/O and reads no clock; the gate gathers its inputs and renders its
//! output. Checks run in this order, and the first that fails decides:
//!
//! 1. **status**, with the grace period for `past_due` (see
//!    [`SubscriptionStatus`] for the table);
//! 2. **entitlement**: the plan's tier against the route's minimum, then the route's feature;
//! 3. **allowance, then credit** for the route's fixed cost, if it has one.
//!
//! ```
//! use tower_402::decision::{decide, Cost, Decision, DecisionInput, Requirement};
//! use tower_402::plan::{Catalog, Plan, Period, Subscription};
//! use tower_402::{Credits, Timestamp};
//!
//! let catalog = Catalog::new()
//!     .with_plan(Plan::new("free", "Free", 0).allowance("requests", 5, Period::CalendarMonth))
//!     .with_plan(Plan::new("pro", "Pro", 2).overage(true));
//! let sub = Subscription::active("acme", "free");
//! let requirement = Requirement::new().cost(Cost::new("requests", 1, Credits::new(1)));
//! let decision = decide(&DecisionInput {
//!     subscription: &sub,
//!     plan: catalog.get("free").unwrap(),
//!     catalog: &catalog,
//!     requirement: &requirement,
//!     available: Credits::ZERO,
//!     allowance_taken: 5,
//!     grace_secs: 0,
//!     soft_limit_percent: None,
//!     now: Timestamp::from_unix(1_800_000_000),
//! });
//! assert_eq!(decision.denial().unwrap().code(), "QUOTA_EXCEEDED");
//! ```

use std::borrow::Cow;

use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::credits::Credits;
use crate::ledger::Charge;
use crate::plan::{Catalog, Meter, Plan, PlanId, Subscription, SubscriptionStatus};
use crate::time::Timestamp;

/// What a route demands of the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Minimum plan tier.
    #[serde(default)]
    pub min_tier: Option<u32>,
    /// A feature the plan must include.
    #[serde(default)]
    pub feature: Option<String>,
    /// The fixed cost of one request, checked by the gate and reserved by the metering layer.
    #[serde(default)]
    pub cost: Option<Cost>,
    /// Skip the status, entitlement and cost checks: only identify the caller (for routes such
    /// as "my balance" or "top up" that an expired or broke account must still reach).
    #[serde(default)]
    pub identify_only: bool,
    /// No credential needed at all: the gate lets the request through untouched.
    #[serde(default)]
    pub public: bool,
}

impl Requirement {
    /// Any plan in good standing, no cost.
    pub fn new() -> Self {
        Self::default()
    }

    /// No credential needed.
    pub fn public() -> Self {
        Requirement {
            public: true,
            ..Self::default()
        }
    }

    /// Identify the caller only.
    pub fn identify_only() -> Self {
        Requirement {
            identify_only: true,
            ..Self::default()
        }
    }

    /// Requires a plan of at least this tier.
    pub fn min_tier(mut self, tier: u32) -> Self {
        self.min_tier = Some(tier);
        self
    }

    /// Requires a plan with this feature.
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        self.feature = Some(feature.into());
        self
    }

    /// Sets the fixed cost per request.
    pub fn cost(mut self, cost: Cost) -> Self {
        self.cost = Some(cost);
        self
    }
}

/// A fixed cost: `units` of `meter`, each `unit_price` credits beyond the plan's allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// What is counted.
    pub meter: Meter,
    /// Units per request.
    pub units: u64,
    /// Credits per `price_per` units when paid from credit.
    pub unit_price: Credits,
    /// How many units `unit_price` buys (default 1).
    #[serde(default = "one")]
    pub price_per: u64,
}

fn one() -> u64 {
    1
}

impl Cost {
    /// `units` of `meter` at `unit_price` each.
    pub fn new(meter: impl AsRef<str>, units: u64, unit_price: Credits) -> Self {
        Cost {
            meter: Meter::new(meter),
            units,
            unit_price,
            price_per: 1,
        }
    }

    /// Prices per `n` units instead of per unit: `Cost::new("tokens", 500, Credits::new(150))
    /// .per(1_000_000)` is 500 tokens at 150 credits per million, rounded up to whole credits.
    pub fn per(mut self, n: u64) -> Self {
        self.price_per = n.max(1);
        self
    }

    /// The ledger charge for this cost under `plan` at `now`.
    pub fn charge(&self, plan: &Plan, now: Timestamp) -> Charge {
        Charge {
            meter: self.meter.clone(),
            units: self.units,
            unit_price: self.unit_price,
            price_per: self.price_per,
            allowance: plan.allowance_for(&self.meter).map(|a| a.window(now)),
            overage: plan.overage,
        }
    }
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct DecisionInput<'a> {
    /// The caller's subscription.
    pub subscription: &'a Subscription,
    /// Its plan.
    pub plan: &'a Plan,
    /// All plans (to name the plan an upgrade needs).
    pub catalog: &'a Catalog,
    /// What the route demands.
    pub requirement: &'a Requirement,
    /// Credit available to the account.
    pub available: Credits,
    /// Allowance units of the cost's meter already used or held in the current window.
    pub allowance_taken: u64,
    /// Default grace period for `past_due`, when the plan sets none.
    pub grace_secs: u64,
    /// Warn when an allowance is this many percent used.
    pub soft_limit_percent: Option<u8>,
    /// The current time.
    pub now: Timestamp,
}

/// A condition worth telling the caller about on a request that is served.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// Past due, served until the grace period ends.
    GracePeriod {
        /// When service stops unless the payment succeeds.
        until: Timestamp,
    },
    /// An allowance crossed the soft limit.
    SoftLimit {
        /// Which meter.
        meter: Meter,
        /// Units used, including this request.
        used: u64,
        /// The hard limit.
        limit: u64,
    },
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve the request, with these warnings.
    Allow(Vec<Warning>),
    /// Refuse it.
    Deny(Denial),
}

impl Decision {
    /// The denial, if refused.
    pub fn denial(&self) -> Option<&Denial> {
        match self {
            Decision::Deny(d) => Some(d),
            Decision::Allow(_) => None,
        }
    }
}

/// Decides whether to serve a request. Pure: see the [module docs](self).
pub fn decide(input: &DecisionInput<'_>) -> Decision {
    decide_with(input, true)
}

/// [`decide`], optionally without step 3 (allowance and credit): for a gate that leaves that
/// check to the metering layer's reservation, or has no ledger to read balances from.
pub(crate) fn decide_with(input: &DecisionInput<'_>, check_cost: bool) -> Decision {
    let sub = input.subscription;
    let plan = input.plan;
    let now = input.now;
    let mut warnings = Vec::new();

    // 1. status
    let grace = plan.grace_period_secs.unwrap_or(input.grace_secs);
    match sub.status {
        SubscriptionStatus::Active => {}
        SubscriptionStatus::Trialing => {
            if sub.trial_end.is_some_and(|end| end <= now) {
                return Decision::Deny(Denial::TrialExpired {
                    trial_ended_at: sub.trial_end,
                });
            }
        }
        SubscriptionStatus::PastDue => match sub.grace_end(grace) {
            Some(until) if until > now => warnings.push(Warning::GracePeriod { until }),
            grace_until => return Decision::Deny(Denial::SubscriptionPastDue { grace_until }),
        },
        SubscriptionStatus::Unpaid => {
            return Decision::Deny(Denial::SubscriptionPastDue {
                grace_until: sub.grace_end(grace),
            })
        }
        SubscriptionStatus::Canceled | SubscriptionStatus::Expired => {
            return Decision::Deny(Denial::SubscriptionExpired {
                plan: sub.plan.clone(),
                ended_at: sub.ended_at.or(sub.canceled_at).or(sub.current_period_end),
            })
        }
        SubscriptionStatus::Paused if sub.trial_end.is_some() => {
            return Decision::Deny(Denial::TrialExpired {
                trial_ended_at: sub.trial_end,
            })
        }
        SubscriptionStatus::Paused | SubscriptionStatus::Incomplete => {
            return Decision::Deny(Denial::SubscriptionPending {
                plan: Some(sub.plan.clone()),
            })
        }
    }

    // 2. entitlement
    let req = input.requirement;
    let tier_ok = req.min_tier.is_none_or(|t| plan.tier >= t);
    let feature_ok = req.feature.as_deref().is_none_or(|f| plan.has_feature(f));
    if !tier_ok || !feature_ok {
        let suggestion = input
            .catalog
            .cheapest_satisfying(req.min_tier.unwrap_or(0), req.feature.as_deref())
            .map(|p| p.id.clone());
        return Decision::Deny(Denial::PlanUpgradeRequired {
            current_plan: plan.id.clone(),
            required_plan: suggestion,
            required_feature: if feature_ok {
                None
            } else {
                req.feature.clone()
            },
        });
    }

    // 3. allowance, then credit
    if let Some(cost) = req.cost.as_ref().filter(|_| check_cost) {
        let charge = cost.charge(plan, now);
        match charge.split(cost.units, input.allowance_taken) {
            Ok(split) if split.credits > input.available => {
                return Decision::Deny(Denial::InsufficientCredits {
                    balance: input.available,
                    required: split.credits,
                })
            }
            Ok(split) => {
                if let (Some(w), Some(pct)) = (charge.allowance, input.soft_limit_percent) {
                    let used = input.allowance_taken.saturating_add(split.allowance_units);
                    if w.limit > 0
                        && split.allowance_units > 0
                        && u128::from(used) * 100 >= u128::from(w.limit) * u128::from(pct)
                    {
                        warnings.push(Warning::SoftLimit {
                            meter: cost.meter.clone(),
                            used,
                            limit: w.limit,
                        });
                    }
                }
            }
            Err(Denial::InsufficientCredits { required, .. }) => {
                return Decision::Deny(Denial::InsufficientCredits {
                    balance: input.available,
                    required,
                })
            }
            Err(d) => return Decision::Deny(d),
        }
    }
    Decision::Allow(warnings)
}

/// Why an unauthenticated request was refused. All three answer 401 with the same code; none
/// says anything about whether an account exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    /// No credential was sent.
    Missing,
    /// The credential is not one we know.
    Unknown,
    /// The credential could not be read (the text says why, never what it was).
    Malformed(&'static str),
}

/// An application-defined refusal, rendered like the built-in ones.
///
/// ```
/// use http::StatusCode;
/// use tower_402::decision::CustomDenial;
///
/// let denial = CustomDenial::new(
///     StatusCode::PAYMENT_REQUIRED,
///     "BUDGET_EXHAUSTED",
///     "Department budget exhausted",
///     "the research department has spent its Q3 budget",
/// )
/// .member("budget_resets_at", "2026-10-01T00:00:00Z");
/// assert_eq!(denial.code, "BUDGET_EXHAUSTED");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomDenial {
    /// The HTTP status (402 when money would fix it).
    pub status: StatusCode,
    /// Stable machine code, SCREAMING_SNAKE_CASE.
    pub code: Cow<'static, str>,
    /// Fixed title for this code.
    pub title: Cow<'static, str>,
    /// This occurrence, for humans.
    pub detail: String,
    /// Extension members.
    pub members: Map<String, Value>,
}

impl CustomDenial {
    /// A custom denial with no extra members.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        title: impl Into<Cow<'static, str>>,
        detail: impl Into<String>,
    ) -> Self {
        CustomDenial {
            status,
            code: code.into(),
            title: title.into(),
            detail: detail.into(),
            members: Map::new(),
        }
    }

    /// Adds an extension member.
    pub fn member(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.members.insert(name.into(), value.into());
        self
    }
}

/// A typed reason a request is refused, with a stable machine [`code`](Denial::code) and an
/// HTTP [`status`](Denial::status).
///
/// Denials are normal outcomes, not errors. They render as RFC 9457 problem documents (see
/// [`problem`](crate::problem)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    /// 401 `UNAUTHENTICATED`.
    Unauthenticated(AuthFailure),
    /// 402 `INSUFFICIENT_CREDITS`: balance below the cost of this request.
    InsufficientCredits {
        /// Credit available.
        balance: Credits,
        /// Credit this request needs.
        required: Credits,
    },
    /// 402 `QUOTA_EXCEEDED`: the plan's allowance is used up and it has no paid overage.
    QuotaExceeded {
        /// Which meter.
        meter: Meter,
        /// Units included per period.
        limit: u64,
        /// Units used or held this period.
        used: u64,
        /// When the allowance resets.
        resets_at: Option<Timestamp>,
        /// Length of the allowance period, in seconds.
        window_secs: Option<u64>,
    },
    /// 402 `PLAN_UPGRADE_REQUIRED`: a higher tier or a missing feature.
    PlanUpgradeRequired {
        /// The caller's plan.
        current_plan: PlanId,
        /// The cheapest plan that would do, if the catalog has one.
        required_plan: Option<PlanId>,
        /// The feature that is missing, if that is the reason.
        required_feature: Option<String>,
    },
    /// 402 `SUBSCRIPTION_EXPIRED`: canceled or ended.
    SubscriptionExpired {
        /// The plan it was on.
        plan: PlanId,
        /// When it ended.
        ended_at: Option<Timestamp>,
    },
    /// 402 `SUBSCRIPTION_PAST_DUE`: renewal failed and the grace period is over.
    SubscriptionPastDue {
        /// When the grace period ended.
        grace_until: Option<Timestamp>,
    },
    /// 402 `TRIAL_EXPIRED`: the trial ended without a paid plan.
    TrialExpired {
        /// When the trial ended.
        trial_ended_at: Option<Timestamp>,
    },
    /// 402 `SUBSCRIPTION_PENDING`: not active yet (awaiting first payment), paused, or no
    /// subscription on file.
    SubscriptionPending {
        /// The plan, if there is a subscription.
        plan: Option<PlanId>,
    },
    /// 402 `PAYMENT_DECLINED`: a direct charge failed at the processor.
    PaymentDeclined {
        /// The processor's decline code (`card_declined`, `insufficient_funds`).
        decline_code: String,
    },
    /// 400 with a code naming the bad input (`INVALID_IDEMPOTENCY_KEY`, `INVALID_REQUEST`).
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// What is wrong, without echoing secrets.
        detail: Cow<'static, str>,
    },
    /// 409 `IDEMPOTENCY_KEY_REUSED` (`in_progress == false`: the key was used for another
    /// request) or `IDEMPOTENCY_KEY_IN_USE` (the first request with this key is still running).
    IdempotencyConflict {
        /// Whether the earlier request is still running.
        in_progress: bool,
    },
    /// 503 `SERVICE_UNAVAILABLE`: the ledger or plan store cannot be reached.
    Unavailable {
        /// Seconds after which a retry may succeed.
        retry_after_secs: u64,
    },
    /// An application-defined refusal.
    Custom(Box<CustomDenial>),
}

impl Denial {
    /// The stable machine code.
    pub fn code(&self) -> &str {
        match self {
            Denial::Unauthenticated(_) => "UNAUTHENTICATED",
            Denial::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
            Denial::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Denial::PlanUpgradeRequired { .. } => "PLAN_UPGRADE_REQUIRED",
            Denial::SubscriptionExpired { .. } => "SUBSCRIPTION_EXPIRED",
            Denial::SubscriptionPastDue { .. } => "SUBSCRIPTION_PAST_DUE",
            Denial::TrialExpired { .. } => "TRIAL_EXPIRED",
            Denial::SubscriptionPending { .. } => "SUBSCRIPTION_PENDING",
            Denial::PaymentDeclined { .. } => "PAYMENT_DECLINED",
            Denial::BadRequest { code, .. } => code,
            Denial::IdempotencyConflict { in_progress: false } => "IDEMPOTENCY_KEY_REUSED",
            Denial::IdempotencyConflict { in_progress: true } => "IDEMPOTENCY_KEY_IN_USE",
            Denial::Unavailable { .. } => "SERVICE_UNAVAILABLE",
            Denial::Custom(c) => &c.code,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Denial::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Denial::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Denial::IdempotencyConflict { .. } => StatusCode::CONFLICT,
            Denial::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Denial::Custom(c) => c.status,
            _ => StatusCode::PAYMENT_REQUIRED,
        }
    }

    /// The fixed title of this kind of problem.
    pub fn title(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Denial::Unauthenticated(_) => "Authentication required",
            Denial::InsufficientCredits { .. } => "Insufficient credits",
            Denial::QuotaExceeded { .. } => "Quota exceeded",
            Denial::PlanUpgradeRequired { .. } => "Plan upgrade required",
            Denial::SubscriptionExpired { .. } => "Subscription expired",
            Denial::SubscriptionPastDue { .. } => "Subscription past due",
            Denial::TrialExpired { .. } => "Trial expired",
            Denial::SubscriptionPending { .. } => "Subscription pending",
            Denial::PaymentDeclined { .. } => "Payment declined",
            Denial::BadRequest { .. } => "Bad request",
            Denial::IdempotencyConflict { in_progress: false } => "Idempotency key reused",
            Denial::IdempotencyConflict { in_progress: true } => "Request already in progress",
            Denial::Unavailable { .. } => "Service unavailable",
            Denial::Custom(c) => return c.title.clone(),
        })
    }

    /// Whether this is a business condition about payment (as opposed to identity, bad input
    /// or an outage).
    pub fn is_payment_required(&self) -> bool {
        self.status() == StatusCode::PAYMENT_REQUIRED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Period;

    const NOW: Timestamp = Timestamp::from_unix(1_800_000_000);
    const DAY: u64 = 86_400;

    fn catalog() -> Catalog {
        Catalog::new()
            .with_plan(Plan::new("free", "Free", 0).allowance("requests", 5, Period::CalendarMonth))
            .with_plan(Plan::new("basic", "Basic", 1).overage(true))
            .with_plan(
                Plan::new("pro", "Pro", 2)
                    .overage(true)
                    .feature("premium-models")
                    .grace_period_secs(7 * DAY),
            )
            .with_plan(
                Plan::new("hybrid", "Hybrid", 1)
                    .allowance("requests", 2, Period::Day)
                    .overage(true),
            )
    }

    struct Case {
        sub: Subscription,
        requirement: Requirement,
        available: u64,
        taken: u64,
    }

    impl Case {
        fn new(sub: Subscription) -> Self {
            Case {
                sub,
                requirement: Requirement::new(),
                available: 0,
                taken: 0,
            }
        }
        fn req(mut self, r: Requirement) -> Self {
            self.requirement = r;
            self
        }
        fn available(mut self, c: u64) -> Self {
            self.available = c;
            self
        }
        fn taken(mut self, t: u64) -> Self {
            self.taken = t;
            self
        }
        fn run(&self) -> Decision {
            let catalog = catalog();
            let plan = catalog.get(self.sub.plan.as_str()).unwrap().clone();
            decide(&DecisionInput {
                subscription: &self.sub,
                plan: &plan,
                catalog: &catalog,
                requirement: &self.requirement,
                available: Credits::new(self.available),
                allowance_taken: self.taken,
                grace_secs: 3 * DAY,
                soft_limit_percent: Some(80),
                now: NOW,
            })
        }
        fn code(&self) -> Option<String> {
            self.run().denial().map(|d| d.code().to_owned())
        }
    }

    fn sub(plan: &str, status: SubscriptionStatus) -> Subscription {
        Subscription::new("acme", plan, status)
    }

    fn one_credit() -> Requirement {
        Requirement::new().cost(Cost::new("requests", 1, Credits::new(1)))
    }

    fn ago(days: u64) -> Option<Timestamp> {
        Some(Timestamp::from_unix(NOW.unix() - days * DAY))
    }

    fn ahead(days: u64) -> Option<Timestamp> {
        Some(NOW.plus_secs(days * DAY))
    }

    #[test]
    fn active_is_allowed() {
        assert_eq!(
            Case::new(Subscription::active("a", "basic")).run(),
            Decision::Allow(vec![])
        );
    }

    #[test]
    fn trialing_until_trial_end() {
        let mut s = sub("basic", SubscriptionStatus::Trialing);
        s.trial_end = ahead(1);
        assert_eq!(Case::new(s.clone()).code(), None);
        s.trial_end = Some(NOW);
        assert_eq!(Case::new(s).code().as_deref(), Some("TRIAL_EXPIRED"));
    }

    #[test]
    fn past_due_inside_grace_is_served_with_a_warning() {
        let mut s = sub("basic", SubscriptionStatus::PastDue);
        s.past_due_since = ago(1);
        let until = NOW.plus_secs(2 * DAY);
        assert_eq!(
            Case::new(s).run(),
            Decision::Allow(vec![Warning::GracePeriod { until }])
        );
    }

    #[test]
    fn past_due_after_grace_is_denied() {
        let mut s = sub("basic", SubscriptionStatus::PastDue);
        s.past_due_since = ago(4);
        match Case::new(s).run() {
            Decision::Deny(Denial::SubscriptionPastDue { grace_until }) => {
                assert_eq!(grace_until, ago(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plan_grace_overrides_default_and_explicit_grace_overrides_both() {
        let mut s = sub("pro", SubscriptionStatus::PastDue);
        s.past_due_since = ago(5); // 7-day grace on pro
        assert_eq!(Case::new(s.clone()).code(), None);
        s.grace_until = ago(1);
        assert_eq!(
            Case::new(s).code().as_deref(),
            Some("SUBSCRIPTION_PAST_DUE")
        );
    }

    #[test]
    fn past_due_without_any_date_has_no_grace() {
        let s = sub("basic", SubscriptionStatus::PastDue);
        assert_eq!(
            Case::new(s).code().as_deref(),
            Some("SUBSCRIPTION_PAST_DUE")
        );
    }

    #[test]
    fn unpaid_canceled_expired_paused_incomplete() {
        let cases = [
            (SubscriptionStatus::Unpaid, "SUBSCRIPTION_PAST_DUE"),
            (SubscriptionStatus::Canceled, "SUBSCRIPTION_EXPIRED"),
            (SubscriptionStatus::Expired, "SUBSCRIPTION_EXPIRED"),
            (SubscriptionStatus::Paused, "SUBSCRIPTION_PENDING"),
            (SubscriptionStatus::Incomplete, "SUBSCRIPTION_PENDING"),
        ];
        for (status, code) in cases {
            assert_eq!(
                Case::new(sub("basic", status)).code().as_deref(),
                Some(code),
                "{status:?}"
            );
        }
        let mut paused_trial = sub("basic", SubscriptionStatus::Paused);
        paused_trial.trial_end = ago(2);
        assert_eq!(
            Case::new(paused_trial).code().as_deref(),
            Some("TRIAL_EXPIRED")
        );
    }

    #[test]
    fn expired_reports_when_it_ended() {
        let mut s = sub("basic", SubscriptionStatus::Canceled);
        s.ended_at = ago(3);
        assert_eq!(
            Case::new(s).run(),
            Decision::Deny(Denial::SubscriptionExpired {
                plan: PlanId::new("basic"),
                ended_at: ago(3)
            })
        );
    }

    #[test]
    fn status_is_checked_before_entitlement_and_credit() {
        let s = sub("free", SubscriptionStatus::Canceled);
        let c = Case::new(s).req(one_credit().min_tier(2));
        assert_eq!(c.code().as_deref(), Some("SUBSCRIPTION_EXPIRED"));
    }

    #[test]
    fn tier_requirement_names_the_cheapest_plan_that_satisfies_it() {
        let c = Case::new(Subscription::active("a", "basic")).req(Requirement::new().min_tier(2));
        assert_eq!(
            c.run(),
            Decision::Deny(Denial::PlanUpgradeRequired {
                current_plan: PlanId::new("basic"),
                required_plan: Some(PlanId::new("pro")),
                required_feature: None,
            })
        );
        let c = Case::new(Subscription::active("a", "pro")).req(Requirement::new().min_tier(2));
        assert_eq!(c.code(), None);
    }

    #[test]
    fn feature_requirement() {
        let req = Requirement::new().feature("premium-models");
        let c = Case::new(Subscription::active("a", "basic")).req(req.clone());
        match c.run() {
            Decision::Deny(Denial::PlanUpgradeRequired {
                required_feature,
                required_plan,
                ..
            }) => {
                assert_eq!(required_feature.as_deref(), Some("premium-models"));
                assert_eq!(required_plan, Some(PlanId::new("pro")));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Case::new(Subscription::active("a", "pro")).req(req).code(),
            None
        );
    }

    #[test]
    fn allowance_then_quota() {
        let free = || Case::new(Subscription::active("a", "free")).req(one_credit());
        assert_eq!(free().taken(0).code(), None);
        assert_eq!(free().taken(4).code(), None);
        match free().taken(5).run() {
            Decision::Deny(Denial::QuotaExceeded {
                limit,
                used,
                resets_at,
                ..
            }) => {
                assert_eq!((limit, used), (5, 5));
                assert_eq!(resets_at, Some(NOW.start_of_next_month()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn soft_limit_warns_at_80_percent() {
        let c = Case::new(Subscription::active("a", "free")).req(one_credit());
        assert_eq!(c.taken(2).run(), Decision::Allow(vec![]));
        let c = Case::new(Subscription::active("a", "free")).req(one_credit());
        assert_eq!(
            c.taken(3).run(),
            Decision::Allow(vec![Warning::SoftLimit {
                meter: Meter::new("requests"),
                used: 4,
                limit: 5
            }])
        );
    }

    #[test]
    fn credit_checks() {
        let basic = || Case::new(Subscription::active("a", "basic")).req(one_credit());
        assert_eq!(basic().available(1).code(), None);
        assert_eq!(
            basic().available(0).run(),
            Decision::Deny(Denial::InsufficientCredits {
                balance: Credits::ZERO,
                required: Credits::new(1)
            })
        );
    }

    #[test]
    fn allowance_is_consumed_before_credit() {
        let hybrid = || Case::new(Subscription::active("a", "hybrid")).req(one_credit());
        assert_eq!(hybrid().taken(1).available(0).code(), None);
        assert_eq!(
            hybrid().taken(2).available(0).code().as_deref(),
            Some("INSUFFICIENT_CREDITS")
        );
        assert_eq!(hybrid().taken(2).available(1).code(), None);
    }

    #[test]
    fn absurd_prices_are_refused_not_wrapped() {
        let req = Requirement::new().cost(Cost::new("requests", u64::MAX, Credits::new(u64::MAX)));
        let c = Case::new(Subscription::active("a", "basic"))
            .req(req)
            .available(u64::MAX);
        assert_eq!(c.code().as_deref(), Some("INSUFFICIENT_CREDITS"));
    }

    #[test]
    fn codes_and_statuses_are_stable() {
        let all = [
            (
                Denial::Unauthenticated(AuthFailure::Missing),
                401,
                "UNAUTHENTICATED",
            ),
            (
                Denial::IdempotencyConflict { in_progress: false },
                409,
                "IDEMPOTENCY_KEY_REUSED",
            ),
            (
                Denial::IdempotencyConflict { in_progress: true },
                409,
                "IDEMPOTENCY_KEY_IN_USE",
            ),
            (
                Denial::Unavailable {
                    retry_after_secs: 1,
                },
                503,
                "SERVICE_UNAVAILABLE",
            ),
            (
                Denial::PaymentDeclined {
                    decline_code: "card_declined".into(),
                },
                402,
                "PAYMENT_DECLINED",
            ),
            (
                Denial::SubscriptionPending { plan: None },
                402,
                "SUBSCRIPTION_PENDING",
            ),
        ];
        for (d, status, code) in all {
            assert_eq!(d.status().as_u16(), status);
            assert_eq!(d.code(), code);
        }
    }
}
