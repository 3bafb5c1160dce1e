use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use std::fmt::Write as _;

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::account::AccountId;
use crate::body::ResponseBody;
use crate::credits::Credits;
use crate::decision::Denial;
use crate::gate::log_denial;
use crate::ledger::{Charge, PerCharge, Reservation};
use crate::metering::body::Guard;
use crate::metering::{MeterConfig, MeteredBody, ReportedUsage, RequestBody, StackText};
use crate::problem::{denial_response, grpc_status, is_grpc};
use crate::time::Timestamp;

/// The outcome of everything before the inner call.
// Short-lived and moved once: boxing the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Prepared<B> {
    Call {
        req: Request<RequestBody<B>>,
        ticket: Option<(Reservation, Arc<[Charge]>)>,
        replayed: bool,
    },
    Refuse {
        denial: Denial,
        account: Option<AccountId>,
    },
}

type PrepareFuture<B> = Pin<Box<dyn Future<Output = Prepared<B>> + Send>>;
type UnitFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A reservation the request runs under.
struct Ticket {
    guard: Guard,
    /// What the reservation left, for the response headers. Its id and the request's
    /// charges live in the guard.
    available_after: Credits,
    allowance_left: PerCharge<Option<u64>>,
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
            replayed: bool,
            // The request was a gRPC call.
            grpc: bool,
        },
        Releasing {
            release: UnitFuture,
            response: Option<S::Response>,
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
                replayed: false,
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
    mut inner: S,
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
            replayed,
        } => {
            // The guard exists before the call: a request cancelled from here on gives its
            // hold back.
            let ticket = ticket.map(|(reservation, charges)| {
                let Reservation {
                    id,
                    available_after,
                    allowance_left,
                    ..
                } = reservation;
                Ticket {
                    guard: Guard::new(config.clone(), id, charges),
                    available_after,
                    allowance_left,
                }
            });
            State::Calling {
                fut: inner.call(req),
                ticket,
                replayed,
                grpc,
            }
        }
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
        inner: S,
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
                    let Some(inner) = inner.take() else {
                        panic!("metering future polled after completion");
                    };
                    after_prepare(prepared, inner, config, *now, *grpc)
                }
                StateProj::Calling {
                    fut,
                    ticket,
                    replayed,
                    grpc,
                } => {
                    let mut res = ready!(fut.poll(cx))?;
                    let Some(mut ticket) = ticket.take() else {
                        if *replayed {
                            res.headers_mut()
                                .insert(&IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                        }
                        return Poll::Ready(Ok(
                            res.map(|b| MeteredBody::plain(ResponseBody::inner(b)))
                        ));
                    };
                    let status = res.status();
                    let config = ticket.guard.config();
                    // A gRPC error travels in a 200: a trailers-only answer has its non-zero
                    // `grpc-status` in the head. A gRPC call, or a response in gRPC terms.
                    let grpc = !config.bill_grpc_errors && (*grpc || is_grpc(res.headers()));
                    let grpc_error =
                        grpc && grpc_status(res.headers()).is_some_and(|code| code != 0);
                    let billable = !(status.is_server_error()
                        || (status.is_client_error() && !config.bill_client_errors)
                        || grpc_error);
                    if !billable {
                        tracing::info!(
                            target: "tower_402::metering",
                            account = ticket.guard.account(),
                            status = status.as_u16(),
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

/// Parsed once: inserting by `&str` would copy a custom name on every response.
static X_CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
static X_ALLOWANCE_REMAINING: HeaderName = HeaderName::from_static("x-allowance-remaining");
static X_ALLOWANCE_RESET: HeaderName = HeaderName::from_static("x-allowance-reset");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A header value written once, from the stack (`HeaderValue::from(u64)` allocates twice).
fn text_value(text: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(text).ok()
}

fn add_headers(h: &mut http::HeaderMap, ticket: &Ticket) {
    let mut int = itoa::Buffer::new();
    if let Some(v) = text_value(int.format(ticket.available_after.get())) {
        h.insert(&X_CREDITS_REMAINING, v);
    }
    for (charge, left) in ticket.guard.charges().iter().zip(&ticket.allowance_left) {
        if let (Some(left), Some(w)) = (left, charge.allowance) {
            if let Some(v) = text_value(int.format(*left)) {
                h.insert(&X_ALLOWANCE_REMAINING, v);
            }
            let mut reset = StackText::<32>::new();
            if write!(reset, "{}", w.resets_at).is_ok() {
                if let Some(v) = text_value(reset.as_str()) {
                    h.insert(&X_ALLOWANCE_RESET, v);
                }
            }
        }
    }
}
