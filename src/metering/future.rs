use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::account::AccountId;
use crate::body::ResponseBody;
use crate::credits::Credits;
use crate::decision::Warning;
use crate::denial::{log_denial, Denial};
use crate::ledger::PerCharge;
use crate::ledger::RecordedResponse;
use crate::metering::billable::billable;
use crate::metering::guard::Guard;
use crate::metering::headers::{add_headers, add_warnings};
use crate::metering::replay::replayed;
use crate::metering::{MeterConfig, MeteredBody, ReportedUsage, RequestBody};
use crate::problem::{denial_response, grpc_status, is_grpc};
use crate::time::Timestamp;

/// The outcome of everything before the inner call.
// Short-lived and moved once: boxing the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Prepared<B> {
    Call {
        req: Request<RequestBody<B>>,
        ticket: Option<Ticket>,
        /// For `x-payment-warning` on the response.
        warnings: Vec<Warning>,
    },
    /// A retry of a request already served under its `Idempotency-Key`: its recorded
    /// response, without running the handler.
    Replay(RecordedResponse),
    Refuse {
        denial: Denial,
        account: Option<AccountId>,
    },
}

type PrepareFuture<B> = Pin<Box<dyn Future<Output = Prepared<B>> + Send>>;
type UnitFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A hold the request runs under.
pub(crate) struct Ticket {
    pub(crate) guard: Guard,
    /// What the hold left, for the entitlement and the response headers. What is held and
    /// the request's charges live in the guard.
    pub(crate) available_after: Credits,
    /// Allowance units this request took, per charge.
    pub(crate) allowance_units: PerCharge<u64>,
    pub(crate) allowance_left: PerCharge<Option<u64>>,
}

pin_project! {
    /// Response future of [`Metering`](crate::metering::Metering).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        Preparing {
            prepare: PrepareFuture<ReqBody>,
            inner: Option<S>,
            config: Arc<MeterConfig>,
            now: Timestamp,
            grpc: bool,
        },
        Calling {
            #[pin]
            fut: S::Future,
            ticket: Option<Ticket>,
            warnings: Vec<Warning>,
            // The request was a gRPC call.
            grpc: bool,
        },
        Releasing {
            release: UnitFuture,
            response: Option<S::Response>,
        },
        Replaying {
            response: Option<RecordedResponse>,
        },
        Refused {
            denial: Option<Denial>,
            config: Arc<MeterConfig>,
            now: Timestamp,
            grpc: bool,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>>,
{
    pub(crate) fn unmetered(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling {
                fut,
                ticket: None,
                warnings: Vec::new(),
                grpc: false,
            },
        }
    }

    pub(crate) fn refused(
        denial: Denial,
        config: Arc<MeterConfig>,
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

    pub(crate) fn preparing(
        prepare: PrepareFuture<ReqBody>,
        inner: S,
        config: Arc<MeterConfig>,
        now: Timestamp,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Preparing {
                prepare,
                inner: Some(inner),
                config,
                now,
                grpc,
            },
        }
    }
}

/// What follows the preparation: call the inner service under the reservation, or refuse.
fn after_prepare<S, ReqBody>(
    prepared: Prepared<ReqBody>,
    inner: &mut S,
    config: &Arc<MeterConfig>,
    now: Timestamp,
    grpc: bool,
) -> State<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>>,
{
    match prepared {
        Prepared::Call {
            req,
            ticket,
            warnings,
        } => {
            // The guard exists before the call: a request cancelled from here on gives its
            // hold back.
            State::Calling {
                fut: inner.call(req),
                ticket,
                warnings,
                grpc,
            }
        }
        Prepared::Replay(response) => State::Replaying {
            response: Some(response),
        },
        Prepared::Refuse { denial, account } => {
            log_denial(account.as_ref(), &denial);
            State::Refused {
                denial: Some(denial),
                config: config.clone(),
                now,
                grpc,
            }
        }
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>>,
{
    /// A preparation that finished without I/O.
    pub(crate) fn prepared(
        prepared: Prepared<ReqBody>,
        inner: &mut S,
        config: &Arc<MeterConfig>,
        now: Timestamp,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: after_prepare(prepared, inner, config, now, grpc),
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
{
    type Output = Result<Response<MeteredBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Preparing {
                    prepare,
                    inner,
                    config,
                    now,
                    grpc,
                } => {
                    let prepared = ready!(prepare.as_mut().poll(cx));
                    let Some(mut inner) = inner.take() else {
                        panic!("metering future polled after completion");
                    };
                    after_prepare(prepared, &mut inner, config, *now, *grpc)
                }
                StateProj::Calling {
                    fut,
                    ticket,
                    warnings,
                    grpc,
                } => {
                    let mut res = ready!(fut.poll(cx))?;
                    add_warnings(res.headers_mut(), warnings);
                    let Some(mut ticket) = ticket.take() else {
                        return Poll::Ready(Ok(
                            res.map(|b| MeteredBody::plain(ResponseBody::inner(b)))
                        ));
                    };
                    let config = ticket.guard.config();
                    // A gRPC call, or a response in gRPC terms: its errors travel in a 200.
                    let grpc = !config.bill_grpc_errors && (*grpc || is_grpc(res.headers()));
                    if !billable(config, res.status(), res.headers(), grpc) {
                        tracing::info!(
                            target: "tower_402::metering",
                            account = ticket.guard.account(),
                            status = res.status().as_u16(),
                            grpc_status = grpc_status(res.headers()),
                            "non-billable response; releasing the reservation"
                        );
                        match ticket.guard.release() {
                            Some(release) => State::Releasing {
                                release,
                                response: Some(res),
                            },
                            None => {
                                return Poll::Ready(Ok(
                                    res.map(|b| MeteredBody::plain(ResponseBody::inner(b)))
                                ))
                            }
                        }
                    } else {
                        let (mut parts, body) = res.into_parts();
                        let known = parts
                            .extensions
                            .remove::<ReportedUsage>()
                            .map(|r| ticket.keep_reserved_meters(r));
                        let scanner = match (&known, &config.usage) {
                            (None, Some(extractor)) => extractor.scanner(&mut parts),
                            _ => None,
                        };
                        ticket.guard.responded(known, scanner);
                        ticket
                            .guard
                            .watch_dry(ticket.available_after, &ticket.allowance_left);
                        if let Some(recorder) = ticket.guard.recorder() {
                            recorder.head(parts.status, &parts.headers);
                        }
                        if grpc {
                            ticket.guard.release_on_grpc_error();
                        }
                        add_headers(&mut parts.headers, &ticket);
                        let body = MeteredBody::metered(ResponseBody::inner(body), ticket.guard);
                        return Poll::Ready(Ok(Response::from_parts(parts, body)));
                    }
                }
                StateProj::Releasing { release, response } => {
                    ready!(release.as_mut().poll(cx));
                    let Some(res) = response.take() else {
                        panic!("metering future polled after completion");
                    };
                    return Poll::Ready(
                        Ok(res.map(|b| MeteredBody::plain(ResponseBody::inner(b)))),
                    );
                }
                StateProj::Replaying { response } => {
                    let Some(response) = response.take() else {
                        panic!("metering future polled after completion");
                    };
                    return Poll::Ready(Ok(replayed(response).map(MeteredBody::plain)));
                }
                StateProj::Refused {
                    denial,
                    config,
                    now,
                    grpc,
                } => {
                    let Some(denial) = denial.take() else {
                        panic!("metering future polled after completion");
                    };
                    let res = denial_response(denial, &config.problems, *now, *grpc);
                    return Poll::Ready(Ok(res.map(MeteredBody::plain)));
                }
            };
            this.state.set(next);
        }
    }
}

impl Ticket {
    /// Reported usage, limited to the meters this request reserved.
    fn keep_reserved_meters(
        &self,
        ReportedUsage(usage): ReportedUsage,
    ) -> Vec<crate::ledger::Usage> {
        let charges = self.guard.charges();
        for u in &usage {
            if !charges.iter().any(|c| c.meter == u.meter) {
                tracing::warn!(
                    target: "tower_402::metering",
                    account = self.guard.account(),
                    meter = u.meter.as_str(),
                    "reported usage for a meter this request did not reserve; ignored"
                );
            }
        }
        charges
            .iter()
            .map(|c| crate::ledger::Usage {
                meter: c.meter.clone(),
                units: usage
                    .iter()
                    .filter(|u| u.meter == c.meter)
                    .fold(0u64, |acc, u| acc.saturating_add(u.units)),
            })
            .collect()
    }
}
