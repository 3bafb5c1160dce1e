//! The gate's check: who is calling, their subscription, then the pure decision.

use std::sync::Arc;

use crate::account::{AccountId, ApiKey};
use crate::backend::{bounded, FailureMode};
use crate::charge::Charge;
use crate::decision::{decide, Decision, DecisionInput, Requirement};
use crate::denial::{AuthFailure, Denial};
use crate::entitlement::Entitlement;
use crate::error::StoreError;
use crate::gate::GateConfig;
use crate::plan::Subscription;
use crate::time::Timestamp;

/// The outcome of the check.
pub(crate) enum Checked {
    /// Serve, with who pays and the route's cost priced under their plan.
    Allow(Entitlement, Option<Charge>),
    /// A store is down and the gate fails open.
    FailOpen,
    /// Refuse.
    Deny(Denial, Option<AccountId>),
}

/// Who the request says it is, borrowed from the request.
pub(crate) enum IdentityRef<'a> {
    /// An account an earlier authentication layer put in the extensions.
    Account(&'a AccountId),
    /// An API key, validated, borrowed from the headers.
    Key(&'a str),
}

/// [`IdentityRef`], owned, for a check that waits on a store.
pub(crate) enum Identity {
    Account(AccountId),
    Key(ApiKey),
}

impl IdentityRef<'_> {
    pub(crate) fn to_owned(&self) -> Identity {
        match self {
            IdentityRef::Account(a) => Identity::Account((*a).clone()),
            IdentityRef::Key(k) => Identity::Key(ApiKey::validated(k)),
        }
    }
}

/// The whole check without I/O, with in-process stores; `None` when a store needs a round
/// trip (then [`check_later`] runs).
pub(crate) fn check_now(
    config: &GateConfig,
    requirement: &Requirement,
    identity: &IdentityRef<'_>,
    now: Timestamp,
) -> Option<Checked> {
    let account = match identity {
        IdentityRef::Account(a) => (*a).clone(),
        IdentityRef::Key(key) => match config.resolver.in_process()?.resolve(key) {
            Ok(Some(a)) => a,
            Ok(None) => return Some(unknown_key()),
            Err(e) => return Some(outage(config, None, "identity resolver", &e)),
        },
    };
    let sub = match config.plans.in_process()?.lookup(&account)? {
        Ok(s) => s,
        Err(e) => return Some(outage(config, Some(&account), "plan store", &e)),
    };
    Some(admit(config, requirement, account, sub, now))
}

/// The whole check, waiting on the stores (each call bounded by the timeout).
pub(crate) async fn check_later(
    config: Arc<GateConfig>,
    requirement: Arc<Requirement>,
    identity: Identity,
    now: Timestamp,
) -> Checked {
    let account = match identity {
        Identity::Account(a) => a,
        Identity::Key(key) => match bounded(
            "identity.resolve",
            config.timeout,
            config.resolver.resolve(&key),
        )
        .await
        {
            Ok(Some(a)) => a,
            Ok(None) => return unknown_key(),
            Err(e) => return outage(&config, None, "identity resolver", &e),
        },
    };
    let sub: Result<_, StoreError> = bounded(
        "plans.subscription",
        config.timeout,
        config.plans.subscription(&account),
    )
    .await;
    match sub {
        Ok(sub) => admit(&config, &requirement, account, sub.map(Arc::new), now),
        Err(e) => outage(&config, Some(&account), "plan store", &e),
    }
}

fn unknown_key() -> Checked {
    Checked::Deny(Denial::Unauthenticated(AuthFailure::Unknown), None)
}

/// The subscription's plan, then the pure decision. Allowance and credit are left to the
/// metering layer's reservation: checked once, atomically.
fn admit(
    config: &GateConfig,
    requirement: &Requirement,
    account: AccountId,
    sub: Option<Arc<Subscription>>,
    now: Timestamp,
) -> Checked {
    let Some(sub) = sub else {
        if requirement.identify_only {
            return Checked::Allow(Entitlement::new(account), None);
        }
        return Checked::Deny(Denial::SubscriptionPending { plan: None }, Some(account));
    };
    let Some(plan) = config.catalog.get(sub.plan.as_str()) else {
        tracing::error!(
            target: "tower_402::gate",
            account = account.as_str(),
            plan = sub.plan.as_str(),
            "subscription names a plan that is not in the catalog"
        );
        return Checked::Deny(
            Denial::Unavailable {
                retry_after_secs: config.retry_after_secs,
            },
            Some(account),
        );
    };
    let mut entitlement = Entitlement {
        account,
        subscription: None,
        plan: Some(plan.clone()),
        cost: requirement.cost.clone(),
        available: None,
        warnings: Vec::new(),
        lowered: Vec::new(),
    };
    // Moved in, not cloned; the decision reads it from there.
    let sub = &**entitlement.subscription.insert(sub);
    if requirement.identify_only {
        return Checked::Allow(entitlement, None);
    }
    let decision = decide(&DecisionInput {
        subscription: sub,
        plan,
        catalog: &config.catalog,
        requirement,
        balances: None,
        grace_secs: config.grace_secs,
        soft_limit_percent: None,
        now,
    });
    match decision {
        Decision::Allow(warnings) => {
            for w in &warnings {
                tracing::info!(
                    target: "tower_402::gate",
                    account = entitlement.account.as_str(),
                    warning = ?w,
                    "request served with a warning"
                );
            }
            tracing::debug!(
                target: "tower_402::gate",
                account = entitlement.account.as_str(),
                plan = plan.id.as_str(),
                "request allowed"
            );
            entitlement.warnings = warnings;
            // Priced here, once; a pricing rule prices from the body instead.
            let charge = match &config.meter.pricing {
                None => requirement.cost.as_ref().map(|c| c.charge(plan, now)),
                Some(_) => None,
            };
            Checked::Allow(entitlement, charge)
        }
        Decision::Deny(d) => Checked::Deny(d, Some(entitlement.account)),
    }
}

/// A store could not be reached: 503 (closed) or serve unmetered (open), logged either way.
fn outage(
    config: &GateConfig,
    account: Option<&AccountId>,
    what: &str,
    err: &dyn std::error::Error,
) -> Checked {
    let account_str = account.map_or("-", AccountId::as_str);
    match config.failure {
        FailureMode::Closed => {
            tracing::error!(
                target: "tower_402::gate",
                account = account_str,
                rule = "backend",
                code = "SERVICE_UNAVAILABLE",
                error = %err,
                "{what} unreachable; failing closed"
            );
            Checked::Deny(
                Denial::Unavailable {
                    retry_after_secs: config.retry_after_secs,
                },
                account.cloned(),
            )
        }
        FailureMode::Open => {
            tracing::warn!(
                target: "tower_402::gate",
                account = account_str,
                rule = "backend",
                error = %err,
                "{what} unreachable; failing open, request served unchecked"
            );
            Checked::FailOpen
        }
    }
}
