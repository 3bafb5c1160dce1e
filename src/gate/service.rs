use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::account::{key_in_headers, AccountId, CredentialError};
use crate::denial::{log_denial, AuthFailure, Denial};
use crate::entitlement::Admission;
use crate::gate::check::{check_later, check_now, IdentityRef};
use crate::gate::future::ResponseFuture;
use crate::gate::{GateConfig, PaymentGateLayer};
use crate::metering::{MeteredBody, Metering, RequestBody};
use crate::problem::is_grpc;

/// The service made by [`PaymentGateLayer`]: the gate, around the metering service of the same
/// [`Billing`](crate::Billing), around yours. See the [module docs](crate::gate).
#[derive(Clone)]
pub struct PaymentGate<S> {
    pub(crate) inner: Metering<S>,
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
    ///
    /// # Panics
    ///
    /// When `inner` comes from another [`Billing`](crate::Billing) (see
    /// [`PaymentGateLayer`]).
    pub fn new(inner: Metering<S>, layer: &PaymentGateLayer) -> Self {
        tower_layer::Layer::layer(layer, inner)
    }

    /// Returns `layer` itself: take the layer from [`Billing::gate`](crate::Billing::gate).
    pub fn layer(layer: PaymentGateLayer) -> PaymentGateLayer {
        layer
    }

    /// The metering service inside.
    pub fn get_ref(&self) -> &Metering<S> {
        &self.inner
    }

    /// The metering service inside, mutably.
    pub fn get_mut(&mut self) -> &mut Metering<S> {
        &mut self.inner
    }

    /// Unwraps the metering service inside.
    pub fn into_inner(self) -> Metering<S> {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PaymentGate<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        // Borrowed: cloning the rule's `Arc` would write to a counter every worker shares.
        let requirement = config.rules.requirement(req.method(), req.uri().path());
        let now = config.clock.now();
        if requirement.public {
            return ResponseFuture::metered(self.inner.call_admitted(req, Admission::Public, now));
        }
        // One span per billed request, entered whenever its work runs.
        let span = crate::observe::request_span(req.method(), req.uri().path());
        let _entered = span.enter();
        let identity = match req.extensions().get::<AccountId>() {
            Some(account) => IdentityRef::Account(account),
            None => match key_in_headers(req.headers()) {
                Ok(Some(key)) => IdentityRef::Key(key),
                Ok(None) => {
                    let denial = Denial::Unauthenticated(AuthFailure::Missing);
                    log_denial(None, &denial);
                    return ResponseFuture::refused(
                        denial,
                        config.clone(),
                        now,
                        is_grpc(req.headers()),
                        span.clone(),
                    );
                }
                Err(CredentialError::Malformed(why)) => {
                    let denial = Denial::Unauthenticated(AuthFailure::Malformed(why));
                    log_denial(None, &denial);
                    return ResponseFuture::refused(
                        denial,
                        config.clone(),
                        now,
                        is_grpc(req.headers()),
                        span.clone(),
                    );
                }
            },
        };
        // First without I/O: with in-process stores the whole check finishes here, with no
        // future to allocate.
        if let Some(checked) = check_now(config, requirement, &identity, now) {
            return ResponseFuture::checked(
                checked,
                &mut self.inner,
                req,
                config,
                now,
                span.clone(),
            );
        }
        let check = check_later(
            config.clone(),
            requirement.clone(),
            identity.to_owned(),
            now,
        );
        // Keep the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::checking(
            Box::pin(check),
            inner,
            req,
            config.clone(),
            now,
            span.clone(),
        )
    }
}
