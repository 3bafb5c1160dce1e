use std::collections::BTreeSet;

use crate::FastMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::credits::Credits;
use crate::time::Timestamp;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a string.
            pub fn new(id: impl AsRef<str>) -> Self {
                $name(Arc::from(id.as_ref()))
            }

            /// The string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A plan's identifier, such as `"pro"`.
    PlanId
);
string_id!(
    /// The name of something that is counted: `"requests"`, `"tokens"`, `"bytes"`...
    Meter
);

/// How long an allowance lasts before it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Period {
    /// Clock hours.
    Hour,
    /// Calendar days: resets at midnight.
    Day,
    /// ISO weeks: resets at midnight between Sunday and Monday.
    Week,
    /// Calendar months: resets at midnight on the first.
    CalendarMonth,
    /// Calendar quarters: resets at midnight on 1 January, April, July and October.
    Quarter,
    /// Calendar years: resets at midnight on 1 January.
    Year,
    /// Months from the subscription's billing anchor (see
    /// [`Calendar::anchor`](super::Calendar::anchor)); calendar months without one.
    BillingMonth,
    /// Years from the subscription's billing anchor; calendar years without one.
    BillingYear,
}

impl Period {
    /// The window containing `now`, in UTC and without a billing anchor: its start and the
    /// moment it resets. [`window_in`](Self::window_in) counts in another
    /// [`Calendar`](super::Calendar).
    pub fn window(self, now: Timestamp) -> (Timestamp, Timestamp) {
        self.window_in(now, &super::Calendar::UTC)
    }
}

/// Units of a meter included in a plan per period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    /// What is counted.
    pub meter: Meter,
    /// How many units each period includes.
    pub limit: u64,
    /// When the count resets.
    pub period: Period,
}

impl Allowance {
    /// The allowance window that contains `now`.
    pub fn window(&self, now: Timestamp) -> AllowanceWindow {
        let (start, resets_at) = self.period.window(now);
        AllowanceWindow {
            limit: self.limit,
            start,
            resets_at,
        }
    }
}

/// One period of an allowance: the limit, when it started, when it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowanceWindow {
    /// Units included in this window.
    pub limit: u64,
    /// Start of the window (identifies it in the ledger).
    pub start: Timestamp,
    /// End of the window, when the count resets.
    pub resets_at: Timestamp,
}

/// A plan on offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Stable identifier (`"pro"`).
    pub id: PlanId,
    /// Display name (`"Pro"`).
    #[serde(default)]
    pub name: String,
    /// Tier rank: a plan includes every route that requires this tier or a lower one.
    #[serde(default)]
    pub tier: u32,
    /// Features this plan includes (`"premium-models"`).
    #[serde(default)]
    pub features: BTreeSet<String>,
    /// Units included per period, consumed before any paid credit.
    #[serde(default)]
    pub allowances: Vec<Allowance>,
    /// Whether use beyond the allowances (or of meters without one) is paid from prepaid
    /// credit. A plan without overage refuses with `QUOTA_EXCEEDED` instead.
    #[serde(default)]
    pub overage: bool,
    /// How long a `past_due` subscription on this plan is still served. Overrides the gate's
    /// default grace period.
    #[serde(default)]
    pub grace_period_secs: Option<u64>,
    /// How far a request's cost beyond its hold may take the balance below zero (see
    /// [`OverEstimate::Overdraft`](crate::ledger::OverEstimate::Overdraft)). `None` (the
    /// default): not at all; what the balance cannot pay is a shortfall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overdraft: Option<Credits>,
}

impl Plan {
    /// A plan with no features, allowances or overage; fill it in with the builder methods.
    pub fn new(id: impl AsRef<str>, name: impl Into<String>, tier: u32) -> Self {
        Plan {
            id: PlanId::new(id),
            name: name.into(),
            tier,
            features: BTreeSet::new(),
            allowances: Vec::new(),
            overage: false,
            grace_period_secs: None,
            overdraft: None,
        }
    }

    /// Adds a feature.
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        self.features.insert(feature.into());
        self
    }

    /// Adds an allowance of `limit` units of `meter` per `period`.
    pub fn allowance(mut self, meter: impl AsRef<str>, limit: u64, period: Period) -> Self {
        self.allowances.push(Allowance {
            meter: Meter::new(meter),
            limit,
            period,
        });
        self
    }

    /// Sets whether use beyond allowances is paid from credit.
    pub fn overage(mut self, paid_from_credit: bool) -> Self {
        self.overage = paid_from_credit;
        self
    }

    /// Sets this plan's grace period for past-due subscriptions.
    pub fn grace_period_secs(mut self, secs: u64) -> Self {
        self.grace_period_secs = Some(secs);
        self
    }

    /// Lets a request's cost beyond its hold (a usage-priced route that used more than its
    /// estimate) be charged into a negative balance down to `-limit` credits, instead of
    /// going unpaid as a shortfall. The debt ([`Balance::overdrawn`](crate::ledger::Balance::overdrawn))
    /// is repaid first by any credit that comes back, so nothing is served from it: the next
    /// request is refused until it is paid. Applies under the layer's default
    /// [`OverEstimate::DrawBalance`](crate::ledger::OverEstimate::DrawBalance).
    pub fn overdraft(mut self, limit: Credits) -> Self {
        self.overdraft = (!limit.is_zero()).then_some(limit);
        self
    }

    /// Whether the plan includes `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }

    /// The allowance for `meter`, if the plan has one.
    pub fn allowance_for(&self, meter: &Meter) -> Option<&Allowance> {
        self.allowances.iter().find(|a| &a.meter == meter)
    }
}

/// The plans on offer.
///
/// Deserializes from `{"plans": [...]}`; duplicate plan ids are refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(try_from = "CatalogDef", into = "CatalogDef")]
pub struct Catalog {
    plans: Vec<Arc<Plan>>,
    by_id: FastMap<PlanId, usize>,
}

#[derive(Serialize, Deserialize)]
struct CatalogDef {
    plans: Vec<Plan>,
}

/// A catalog could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Two plans share an id.
    #[error("duplicate plan id `{0}`")]
    DuplicatePlan(PlanId),
}

impl TryFrom<CatalogDef> for Catalog {
    type Error = CatalogError;

    fn try_from(def: CatalogDef) -> Result<Self, CatalogError> {
        def.plans
            .into_iter()
            .try_fold(Catalog::default(), |c, p| c.try_with_plan(p))
    }
}

impl From<Catalog> for CatalogDef {
    fn from(c: Catalog) -> Self {
        CatalogDef {
            plans: c.plans.iter().map(|p| (**p).clone()).collect(),
        }
    }
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a plan; panics on a duplicate id (configuration written in code).
    /// Use [`Catalog::try_with_plan`] for configuration read at run time.
    #[track_caller]
    pub fn with_plan(self, plan: Plan) -> Self {
        match self.try_with_plan(plan) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// Adds a plan, refusing a duplicate id.
    pub fn try_with_plan(mut self, plan: Plan) -> Result<Self, CatalogError> {
        if self.by_id.contains_key(&plan.id) {
            return Err(CatalogError::DuplicatePlan(plan.id));
        }
        self.by_id.insert(plan.id.clone(), self.plans.len());
        self.plans.push(Arc::new(plan));
        Ok(self)
    }

    /// The plan with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Plan>> {
        self.by_id.get(id).map(|&i| &self.plans[i])
    }

    /// All plans, in the order they were added.
    pub fn plans(&self) -> impl Iterator<Item = &Arc<Plan>> {
        self.plans.iter()
    }

    /// The lowest-tier plan that satisfies a minimum tier and an optional feature: what to
    /// suggest in an upgrade prompt.
    pub fn cheapest_satisfying(&self, min_tier: u32, feature: Option<&str>) -> Option<&Arc<Plan>> {
        self.plans
            .iter()
            .filter(|p| p.tier >= min_tier && feature.is_none_or(|f| p.has_feature(f)))
            .min_by_key(|p| p.tier)
    }
}
