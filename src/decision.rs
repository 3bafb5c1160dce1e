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
//! use tower_402::decision::{decide, Balances, Cost, Decision, DecisionInput, Requirement};
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
//!     balances: Some(Balances { available: Credits::ZERO, allowance_taken: 5 }),
//!     grace_secs: 0,
//!     soft_limit_percent: None,
//!     now: Timestamp::from_unix(1_800_000_000),
//! });
//! assert_eq!(decision.denial().unwrap().code(), "QUOTA_EXCEEDED");
//! ```

use serde::{Deserialize, Serialize};

use crate::credits::Credits;
use crate::plan::{Catalog, Meter, Plan, Subscription, SubscriptionStatus};
use crate::time::Timestamp;

pub use crate::charge::Cost;
pub use crate::denial::{AuthFailure, BudgetExhausted, CustomDenial, Denial};

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
    /// What the account can pay with, when it is known. `None` skips step 3: the layers leave
    /// allowance and credit to the ledger's reservation, which checks them atomically, once.
    pub balances: Option<Balances>,
    /// Default grace period for `past_due`, when the plan sets none.
    pub grace_secs: u64,
    /// Warn when an allowance is this many percent used.
    pub soft_limit_percent: Option<u8>,
    /// The current time.
    pub now: Timestamp,
}

/// What an account can pay with, for step 3 of [`decide`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balances {
    /// Credit available to the account.
    pub available: Credits,
    /// Allowance units of the cost's meter already used or held in the current window.
    pub allowance_taken: u64,
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
            model: None,
        });
    }

    // 3. allowance, then credit
    if let (Some(cost), Some(balances)) = (&req.cost, input.balances) {
        let charge = cost.charge(plan, now);
        match charge.split(cost.units, balances.allowance_taken) {
            Ok(split) if split.credits > balances.available => {
                return Decision::Deny(Denial::InsufficientCredits {
                    balance: balances.available,
                    required: split.credits,
                })
            }
            Ok(split) => {
                if let (Some(w), Some(pct)) = (charge.allowance, input.soft_limit_percent) {
                    let used = balances
                        .allowance_taken
                        .saturating_add(split.allowance_units);
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
                    balance: balances.available,
                    required,
                })
            }
            Err(d) => return Decision::Deny(d),
        }
    }
    Decision::Allow(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Period;
    use crate::plan::PlanId;

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
                balances: Some(Balances {
                    available: Credits::new(self.available),
                    allowance_taken: self.taken,
                }),
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
                model: None,
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
