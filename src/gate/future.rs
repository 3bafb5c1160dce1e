use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::denial::{log_denial, Denial};
use crate::entitlement::Admission;
use crate::gate::check::Checked;
use crate::gate::GateConfig;
use crate::metering::{self, MeteredBody, Metering, RequestBody};
use crate::problem::{denial_response, is_grpc};
use crate::time::Timestamp;

type CheckFuture = Pin<Box<dyn Future<Output = Checked> + Send>>;

pin_project! {
    /// Response future of [`PaymentGate`](crate::gate::PaymentGate).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        #[pin]
        state: State<S, ReqBody>,
        // The request's span, entered while the future is polled.
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        Checking {
            check: CheckFuture,
            pending: Option<(Metering<S>, Request<ReqBody>)>,
            config: Arc<GateConfig>,
            now: Timestamp,
        },
        Metered {
            #[pin]
            fut: metering::ResponseFuture<S, ReqBody>,
        },
        Refused {
            denial: Option<Denial>,
            config: Arc<GateConfig>,
            now: Timestamp,
            grpc: bool,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>> + Clone + Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
{
    /// A public route's: no span, nothing billed.
    pub(crate) fn metered(fut: metering::ResponseFuture<S, ReqBody>) -> Self {
        ResponseFuture {
            state: State::Metered { fut },
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn refused(
        denial: Denial,
        config: Arc<GateConfig>,
        now: Timestamp,
        grpc: bool,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Refused {
                denial: Some(denial),
                config,
                now,
                grpc,
            },
            span,
        }
    }

    pub(crate) fn checking(
        check: CheckFuture,
        inner: Metering<S>,
        req: Request<ReqBody>,
        config: Arc<GateConfig>,
        now: Timestamp,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Checking {
                check,
                pending: Some((inner, req)),
                config,
                now,
            },
            span,
        }
    }

    /// A check that finished without I/O.
    pub(crate) fn checked(
        checked: Checked,
        inner: &mut Metering<S>,
        req: Request<ReqBody>,
        config: &Arc<GateConfig>,
        now: Timestamp,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: after_check(checked, inner, req, config, now),
            span,
        }
    }
}

/// What follows a finished check: hand the request to the metering layer, or refuse.
fn after_check<S, ReqBody>(
    checked: Checked,
    inner: &mut Metering<S>,
    req: Request<ReqBody>,
    config: &Arc<GateConfig>,
    now: Timestamp,
) -> State<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>> + Clone + Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
{
    let admission = match checked {
        Checked::Allow(entitlement, charge) => Admission::Entitled(entitlement, charge),
        Checked::FailOpen => Admission::FailedOpen,
        Checked::Deny(denial, account) => {
            log_denial(account.as_ref(), &denial);
            return State::Refused {
                denial: Some(denial),
                config: config.clone(),
                now,
                // Read only for a refusal: an allowed request never needs it.
                grpc: is_grpc(req.headers()),
            };
        }
    };
    State::Metered {
        fut: inner.call_admitted(req, admission, now),
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
{
    type Output = Result<Response<MeteredBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let _entered = this.span.enter();
            let next = match this.state.as_mut().project() {
                StateProj::Checking {
                    check,
                    pending,
                    config,
                    now,
                } => {
                    let checked = ready!(check.as_mut().poll(cx));
                    let Some((mut inner, req)) = pending.take() else {
                        panic!("gate future polled after completion");
                    };
                    after_check(checked, &mut inner, req, config, *now)
                }
                StateProj::Metered { fut } => return fut.poll(cx),
                StateProj::Refused {
                    denial,
                    config,
                    now,
                    grpc,
                } => {
                    let Some(denial) = denial.take() else {
                        panic!("gate future polled after completion");
                    };
                    let res = denial_response(denial, &config.problems, *now, *grpc);
                    return Poll::Ready(Ok(res.map(MeteredBody::plain)));
                }
            };
            this.state.set(next);
        }
    }
}
