use std::borrow::Borrow;
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use http::{Request, Response};
use tower_service::Service;

use crate::account::{AccountId, ApiKey, CredentialError};
use crate::backend::bounded;
use crate::decision::{decide_with, AuthFailure, Decision, DecisionInput, Denial, Requirement};
use crate::error::{LedgerError, StoreError};
use crate::gate::future::{Checked, ResponseFuture};
use crate::gate::{Entitlement, FailureMode, GateConfig, PaymentGateLayer, PublicRoute};
use crate::problem::is_grpc;
use crate::time::Timestamp;

/// The service made by [`PaymentGateLayer`]. See the [module docs](crate::gate).
#[derive(Clone)]
pub struct PaymentGate<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<GateConfig>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for PaymentGate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentGate")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> PaymentGate<S> {
    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &PaymentGateLayer) -> Self {
        PaymentGate {
            inner,
            config: layer.config.clone(),
        }
    }

    /// Returns `layer` itself: build the layer with [`PaymentGateLayer::new`].
    pub fn layer(layer: PaymentGateLayer) -> PaymentGateLayer {
        layer
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pub(crate) enum Identity {
    Account(AccountId),
    Key(ApiKey),
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PaymentGate<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<crate::body::ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Borrowed: cloning the route's `Arc` would write to a counter every worker shares.
        let requirement = self.config.requirement(req.method(), req.uri().path());
        if requirement.public {
            let mut req = req;
            req.extensions_mut().insert(PublicRoute);
            return ResponseFuture::call(self.inner.call(req), Vec::new());
        }
        let now = self.config.clock.now();
        let identity = match req.extensions().get::<AccountId>() {
            Some(account) => Identity::Account(account.clone()),
            None => match ApiKey::from_headers(req.headers()) {
                Ok(Some(key)) => Identity::Key(key),
                Ok(None) => {
                    let denial = Denial::Unauthenticated(AuthFailure::Missing);
                    log_denial(None, &denial);
                    let grpc = is_grpc(req.headers());
                    return ResponseFuture::refused(denial, self.config.clone(), now, grpc);
                }
                Err(CredentialError::Malformed(why)) => {
                    let denial = Denial::Unauthenticated(AuthFailure::Malformed(why));
                    log_denial(None, &denial);
                    let grpc = is_grpc(req.headers());
                    return ResponseFuture::refused(denial, self.config.clone(), now, grpc);
                }
            },
        };
        // Keep the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // First without I/O: with in-process stores the whole check finishes here, with no
        // future to allocate. The check only reads, so trying it costs nothing else.
        let sync = {
            let fut = std::pin::pin!(check(&*self.config, &**requirement, &identity, now, true));
            match fut.poll(&mut Context::from_waker(noop_waker())) {
                Poll::Ready(Checked::NeedsAsync) | Poll::Pending => None,
                Poll::Ready(checked) => Some(checked),
            }
        };
        if let Some(checked) = sync {
            return ResponseFuture::checked(checked, inner, req, &self.config, now);
        }
        let check = check(
            self.config.clone(),
            requirement.clone(),
            identity,
            now,
            false,
        );
        ResponseFuture::checking(Box::pin(check), inner, req, self.config.clone(), now)
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
        Denial::Unavailable { .. } => "backend",
        _ => "request",
    }
}

pub(crate) fn log_denial(account: Option<&AccountId>, denial: &Denial) {
    let account = account.map_or("-", AccountId::as_str);
    tracing::info!(
        target: "tower_402::gate",
        account,
        rule = rule_of(denial),
        code = denial.code(),
        status = denial.status().as_u16(),
        "request denied"
    );
}

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
            Checked::FailOpen(account.cloned())
        }
    }
}

/// A waker that does nothing: for polling a check that must not wait.
pub(crate) fn noop_waker() -> &'static Waker {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(Noop)))
}

/// Answers `$now` when the store answers without I/O; otherwise, in a check that must not
/// wait, gives up with `NeedsAsync`, else awaits `$later` (bounded by the timeout).
macro_rules! now_or_later {
    ($sync_only:expr, $timeout:expr, $now:expr, $later:expr) => {
        match $now {
            Some(r) => r,
            None if $sync_only => return Checked::NeedsAsync,
            None => bounded($timeout, $later).await,
        }
    };
}

/// The gate's check. Generic over owned or borrowed inputs: run once without I/O on
/// borrowed ones (`sync_only`), and boxed with owned ones when a store needs a round trip.
async fn check<C, R, I>(
    config: C,
    requirement: R,
    identity: I,
    now: Timestamp,
    sync_only: bool,
) -> Checked
where
    C: Deref<Target = GateConfig>,
    R: Deref<Target = Requirement>,
    I: Borrow<Identity>,
{
    let account = match identity.borrow() {
        Identity::Account(a) => a.clone(),
        Identity::Key(key) => {
            let resolved: Result<_, StoreError> = now_or_later!(
                sync_only,
                config.timeout,
                config.resolver.resolve_now(key),
                config.resolver.resolve(key)
            );
            match resolved {
                Ok(Some(a)) => a,
                Ok(None) => {
                    return Checked::Deny(Denial::Unauthenticated(AuthFailure::Unknown), None)
                }
                Err(e) => return outage(&config, None, "identity resolver", &e),
            }
        }
    };
    let sub: Result<_, StoreError> = now_or_later!(
        sync_only,
        config.timeout,
        config.plans.subscription_now(&account),
        async {
            let sub = config.plans.subscription(&account).await;
            sub.map(|s| s.map(Arc::new))
        }
    );
    let sub = match sub {
        Ok(s) => s,
        Err(e) => return outage(&config, Some(&account), "plan store", &e),
    };
    let Some(sub) = sub else {
        if requirement.identify_only {
            return Checked::Allow(Entitlement::new(account));
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
    };
    // Moved in, not cloned; the decision reads it from there.
    let sub = &**entitlement.subscription.insert(sub);
    if requirement.identify_only {
        return Checked::Allow(entitlement);
    }
    let mut available = crate::Credits::ZERO;
    let mut allowance_taken = 0;
    // Without a ledger, or when the metering layer's reservation makes the same check
    // (`PaymentGateLayer::and_metering`), the gate does not read balances.
    let ledger = config
        .ledger
        .as_ref()
        .filter(|_| !config.credit_at_reservation);
    if let (Some(cost), Some(ledger)) = (&requirement.cost, ledger) {
        let account = &entitlement.account;
        let sync = ledger.now_or_later();
        let balance: Result<_, LedgerError> = now_or_later!(
            sync_only,
            config.timeout,
            sync.map(|l| l.balance(account, now)),
            ledger.balance(account, now)
        );
        match balance {
            Ok(b) => available = b.available,
            Err(e) => return outage(&config, Some(account), "ledger", &e),
        }
        if let Some(a) = plan.allowance_for(&cost.meter) {
            let window = a.window(now);
            let usage: Result<_, LedgerError> = now_or_later!(
                sync_only,
                config.timeout,
                sync.map(|l| l.allowance_usage(account, &cost.meter, window.start, now)),
                ledger.allowance_usage(account, &cost.meter, window.start, now)
            );
            match usage {
                Ok(u) => allowance_taken = u.taken(),
                Err(e) => return outage(&config, Some(account), "ledger", &e),
            }
        }
        entitlement.available = Some(available);
    }
    let decision = decide_with(
        &DecisionInput {
            subscription: sub,
            plan,
            catalog: &config.catalog,
            requirement: &requirement,
            available,
            allowance_taken,
            grace_secs: config.grace_secs,
            soft_limit_percent: config.soft_limit_percent,
            now,
        },
        ledger.is_some(),
    );
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
            Checked::Allow(entitlement)
        }
        Decision::Deny(d) => Checked::Deny(d, Some(entitlement.account)),
    }
}
