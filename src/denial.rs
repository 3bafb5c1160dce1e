//! [`Denial`]: the typed reasons a request is refused, shared by the decision, the ledger,
//! both layers and the problem renderer.
//!
//! Denials are normal outcomes, not errors: a refused request is answered with a problem
//! document whose `code` and status come from here.

use std::borrow::Cow;

use http::StatusCode;
use serde_json::{Map, Value};

use crate::account::AccountId;
use crate::credits::Credits;
use crate::plan::{Meter, Period, PlanId};
use crate::time::Timestamp;

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

/// What a [`Denial::BudgetExhausted`] says: which level of the account's chain is out of
/// budget, how much, and who can raise it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExhausted {
    /// The level of the chain (`"key"`, `"team"`, `"organisation"`, or your own).
    pub level: String,
    /// Which one at that level (`"research"`).
    pub owner: String,
    /// The meter the budget caps, or `None` for a budget in credits.
    pub meter: Option<Meter>,
    /// The budget for the period (credits, or units of `meter`).
    pub budget: u64,
    /// Used or held this period, this request not included.
    pub used: u64,
    /// The period the budget is for.
    pub period: Period,
    /// When the period ends and the budget is whole again.
    pub resets_at: Timestamp,
    /// Who manages the budget (`"Research's budget holder"`), for the detail.
    pub manager: Option<String>,
    /// Where they raise it, rendered as `manage_url`.
    pub manage_url: Option<String>,
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
        /// The model asked for, when the plan lacks a model (a [`PriceTable`] entry's
        /// `required_tier` or `required_feature`) rather than a route.
        ///
        /// [`PriceTable`]: crate::metering::PriceTable
        model: Option<String>,
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
    /// 409 `IDEMPOTENCY_RESPONSE_NOT_RECORDED`: the request with this `Idempotency-Key` was
    /// served and charged, but its response was not recorded (larger than the recording
    /// limit, or its record expired or was dropped), so it cannot be replayed. Running it
    /// again would be a second charge: the client must use a new key.
    IdempotencyResponseNotRecorded,
    /// 503 `SERVICE_UNAVAILABLE`: the ledger or plan store cannot be reached.
    Unavailable {
        /// Seconds after which a retry may succeed.
        retry_after_secs: u64,
    },
    /// 402 `BUDGET_EXHAUSTED`: a budget on the account's chain (its key, team,
    /// organisation) is spent for the period; the balance may still have credit.
    BudgetExhausted(Box<BudgetExhausted>),
    /// An application-defined refusal.
    Custom(Box<CustomDenial>),
}

impl Denial {
    /// The stable machine code.
    pub fn code(&self) -> &str {
        match self {
            Denial::Custom(c) => &c.code,
            _ => self.static_code().unwrap_or_default(),
        }
    }

    /// The code of a built-in denial, `None` for a custom one (whose code is the
    /// application's): a metric label without a copy.
    pub(crate) fn static_code(&self) -> Option<&'static str> {
        Some(match self {
            Denial::Unauthenticated(_) => "UNAUTHENTICATED",
            Denial::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
            Denial::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Denial::PlanUpgradeRequired { .. } => "PLAN_UPGRADE_REQUIRED",
            Denial::SubscriptionExpired { .. } => "SUBSCRIPTION_EXPIRED",
            Denial::SubscriptionPastDue { .. } => "SUBSCRIPTION_PAST_DUE",
            Denial::TrialExpired { .. } => "TRIAL_EXPIRED",
            Denial::SubscriptionPending { .. } => "SUBSCRIPTION_PENDING",
            Denial::PaymentDeclined { .. } => "PAYMENT_DECLINED",
            Denial::BudgetExhausted(_) => "BUDGET_EXHAUSTED",
            Denial::BadRequest { code, .. } => code,
            Denial::IdempotencyConflict { in_progress: false } => "IDEMPOTENCY_KEY_REUSED",
            Denial::IdempotencyConflict { in_progress: true } => "IDEMPOTENCY_KEY_IN_USE",
            Denial::IdempotencyResponseNotRecorded => "IDEMPOTENCY_RESPONSE_NOT_RECORDED",
            Denial::Unavailable { .. } => "SERVICE_UNAVAILABLE",
            Denial::Custom(_) => return None,
        })
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Denial::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Denial::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Denial::IdempotencyConflict { .. } | Denial::IdempotencyResponseNotRecorded => {
                StatusCode::CONFLICT
            }
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
            Denial::BudgetExhausted(_) => "Budget exhausted",
            Denial::BadRequest { .. } => "Bad request",
            Denial::IdempotencyConflict { in_progress: false } => "Idempotency key reused",
            Denial::IdempotencyConflict { in_progress: true } => "Request already in progress",
            Denial::IdempotencyResponseNotRecorded => "Response not recorded",
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

/// The rule a denial comes from, for logs.
pub(crate) fn rule_of(denial: &Denial) -> &'static str {
    match denial {
        Denial::Unauthenticated(_) => "identity",
        Denial::SubscriptionExpired { .. }
        | Denial::SubscriptionPastDue { .. }
        | Denial::TrialExpired { .. }
        | Denial::SubscriptionPending { .. } => "subscription_status",
        Denial::PlanUpgradeRequired { .. } => "entitlement",
        Denial::QuotaExceeded { .. } => "allowance",
        Denial::InsufficientCredits { .. } => "credit",
        Denial::BudgetExhausted(_) => "budget",
        Denial::Unavailable { .. } => "backend",
        Denial::IdempotencyConflict { .. } | Denial::IdempotencyResponseNotRecorded => {
            "idempotency"
        }
        _ => "request",
    }
}

/// Logs a refusal (who, which rule, which code; never a key or a secret) and counts it.
pub(crate) fn log_denial(account_id: Option<&AccountId>, denial: &Denial) {
    crate::observe::decision(crate::observe::Outcome::Denied, Some(denial), account_id);
    let account = account_id.map_or("-", AccountId::as_str);
    tracing::info!(
        target: "tower_402::gate",
        account,
        rule = rule_of(denial),
        code = denial.code(),
        status = denial.status().as_u16(),
        "request denied"
    );
}
