use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::account::AccountId;
use crate::body::ResponseBody;
use crate::decision::{Denial, Warning};
use crate::gate::service::log_denial;
use crate::gate::{Entitlement, FailedOpen, GateConfig};
use crate::problem::{denial_response, is_grpc};
use crate::time::Timestamp;

pub(crate) enum Checked {
    Allow(Entitlement),
    FailOpen(Option<AccountId>),
    Deny(Denial, Option<AccountId>),
    /// Only from a check run without I/O: a store needs a round trip, run the async check.
    NeedsAsync,
}

type CheckFuture = Pin<Box<dyn Future<Output = Checked> + Send>>;

pin_project! {
    /// Response future of [`PaymentGate`](crate::gate::PaymentGate).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Checking {
            check: CheckFuture,
            pending: Option<(S, Request<ReqBody>)>,
            config: Arc<GateConfig>,
            now: Timestamp,
        },
        Calling {
            #[pin]
            fut: S::Future,
            warnings: Vec<Warning>,
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
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn call(fut: S::Future, warnings: Vec<Warning>) -> Self {
        ResponseFuture {
            state: State::Calling { fut, warnings },
        }
    }

    pub(crate) fn refused(
        denial: Denial,
        config: Arc<GateConfig>,
        now: Timestamp,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Refused {
                denial: Some(denial),
                config,
                now,
                grpc,
            },
        }
    }

    pub(crate) fn checking(
        check: CheckFuture,
        inner: S,
        req: Request<ReqBody>,
        config: Arc<GateConfig>,
        now: Timestamp,
    ) -> Self {
        ResponseFuture {
            state: State::Checking {
                check,
                pending: Some((inner, req)),
                config,
                now,
            },
        }
    }
}

fn warning_header(w: &Warning) -> Option<HeaderValue> {
    let text = match w {
        Warning::GracePeriod { until } => format!("past-due; grace-until=\"{until}\""),
        Warning::SoftLimit { meter, used, limit } => {
            let meter = crate::problem::sf_key(meter.as_str());
            format!("soft-limit; meter=\"{meter}\"; used={used}; limit={limit}")
        }
    };
    HeaderValue::try_from(text).ok()
}

/// What follows a finished check: call the inner service, or refuse.
fn return_state<S, ReqBody>(
    checked: Checked,
    mut inner: S,
    mut req: Request<ReqBody>,
    config: &Arc<GateConfig>,
    now: Timestamp,
) -> State<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    match checked {
        Checked::Allow(entitlement) => {
            let warnings = entitlement.warnings.clone();
            req.extensions_mut().insert(entitlement);
            State::Calling {
                fut: inner.call(req),
                warnings,
            }
        }
        Checked::FailOpen(account) => {
            if let Some(a) = account {
                req.extensions_mut().insert(a);
            }
            req.extensions_mut().insert(FailedOpen);
            State::Calling {
                fut: inner.call(req),
                warnings: Vec::new(),
            }
        }
        Checked::Deny(denial, account) => {
            log_denial(account.as_ref(), &denial);
            State::Refused {
                denial: Some(denial),
                config: config.clone(),
                now,
                // Read only for a refusal: an allowed request never needs it.
                grpc: is_grpc(req.headers()),
            }
        }
        Checked::NeedsAsync => unreachable!("only a check run without I/O answers NeedsAsync"),
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// A check that finished without I/O.
    pub(crate) fn checked(
        checked: Checked,
        inner: S,
        req: Request<ReqBody>,
        config: &Arc<GateConfig>,
        now: Timestamp,
    ) -> Self {
        ResponseFuture {
            state: return_state(checked, inner, req, config, now),
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Checking {
                    check,
                    pending,
                    config,
                    now,
                } => {
                    let checked = ready!(check.as_mut().poll(cx));
                    let Some((inner, req)) = pending.take() else {
                        panic!("gate future polled after completion");
                    };
                    return_state(checked, inner, req, config, *now)
                }
                StateProj::Calling { fut, warnings } => {
                    let mut res = ready!(fut.poll(cx))?;
                    for w in warnings.iter() {
                        if let Some(v) = warning_header(w) {
                            res.headers_mut().append("x-payment-warning", v);
                        }
                    }
                    return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                }
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
                    return Poll::Ready(Ok(res));
                }
            };
            this.state.set(next);
        }
    }
}
