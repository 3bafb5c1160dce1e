use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::backend::{bounded, is_outage};
use crate::body::ResponseBody;
use crate::decision::Denial;
use crate::error::LedgerError;
use crate::gate::log_denial;
use crate::gate::FailureMode;
use crate::ledger::{Replay, Reservation, ReserveOutcome, ReserveRequest, Usage};
use crate::metering::body::{Action, Guard};
use crate::metering::{MeterConfig, MeteredBody, ReportedUsage};
use crate::problem::denial_response;
use crate::time::Timestamp;

type ReserveFuture = Pin<Box<dyn Future<Output = Result<ReserveOutcome, LedgerError>> + Send>>;
type UnitFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A reservation the request is running under.
struct Ticket {
    guard: Guard,
    reservation: Reservation,
    request: ReserveRequest,
}

pin_project! {
    /// Response future of [`Metering`](crate::metering::Metering).
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
        Reserving {
            reserve: ReserveFuture,
            pending: Option<(S, Request<ReqBody>, ReserveRequest)>,
            config: Arc<MeterConfig>,
            now: Timestamp,
        },
        Calling {
            #[pin]
            fut: S::Future,
            ticket: Option<Ticket>,
            replayed: bool,
        },
        Releasing {
            release: UnitFuture,
            response: Option<S::Response>,
        },
        Refused {
            denial: Option<Denial>,
            config: Arc<MeterConfig>,
            now: Timestamp,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn unmetered(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling {
                fut,
                ticket: None,
                replayed: false,
            },
        }
    }

    pub(crate) fn refused(denial: Denial, config: Arc<MeterConfig>, now: Timestamp) -> Self {
        ResponseFuture {
            state: State::Refused {
                denial: Some(denial),
                config,
                now,
            },
        }
    }

    pub(crate) fn reserving(
        request: ReserveRequest,
        inner: S,
        req: Request<ReqBody>,
        config: Arc<MeterConfig>,
        now: Timestamp,
    ) -> Self {
        let ledger = config.ledger.clone();
        let timeout = config.timeout;
        let to_reserve = request.clone();
        let reserve: ReserveFuture =
            Box::pin(async move { bounded(timeout, ledger.reserve(&to_reserve)).await });
        ResponseFuture {
            state: State::Reserving {
                reserve,
                pending: Some((inner, req, request)),
                config,
                now,
            },
        }
    }
}

fn header_from<T: ToString>(v: T) -> Option<HeaderValue> {
    HeaderValue::try_from(v.to_string()).ok()
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<MeteredBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Reserving {
                    reserve,
                    pending,
                    config,
                    now,
                } => {
                    let outcome = ready!(reserve.as_mut().poll(cx));
                    let Some((mut inner, req, request)) = pending.take() else {
                        panic!("metering future polled after completion");
                    };
                    let account = request.account.clone();
                    let refuse = |denial: Denial| {
                        log_denial(Some(&account), &denial);
                        State::Refused {
                            denial: Some(denial),
                            config: config.clone(),
                            now: *now,
                        }
                    };
                    match outcome {
                        Ok(ReserveOutcome::Reserved(reservation)) => {
                            // A request cancelled before its response never ran to
                            // completion: dropping the guard then gives the hold back.
                            let guard = Guard {
                                config: config.clone(),
                                id: reservation.id.clone(),
                                on_drop: Action::Release,
                                done: false,
                            };
                            State::Calling {
                                fut: inner.call(req),
                                ticket: Some(Ticket {
                                    guard,
                                    reservation,
                                    request,
                                }),
                                replayed: false,
                            }
                        }
                        Ok(ReserveOutcome::Replayed(Replay::Completed(_))) => {
                            tracing::info!(
                                target: "tower_402::metering",
                                account = account.as_str(),
                                "idempotent retry of a settled request; not charged again"
                            );
                            State::Calling {
                                fut: inner.call(req),
                                ticket: None,
                                replayed: true,
                            }
                        }
                        Ok(ReserveOutcome::Replayed(_)) => {
                            refuse(Denial::IdempotencyConflict { in_progress: true })
                        }
                        Ok(ReserveOutcome::Denied(denial)) => refuse(denial),
                        Err(LedgerError::KeyConflict) => {
                            refuse(Denial::IdempotencyConflict { in_progress: false })
                        }
                        Err(e) if is_outage(&e) && config.failure == FailureMode::Open => {
                            tracing::warn!(
                                target: "tower_402::metering",
                                account = account.as_str(),
                                error = %e,
                                "ledger unreachable; failing open, request served unmetered"
                            );
                            State::Calling {
                                fut: inner.call(req),
                                ticket: None,
                                replayed: false,
                            }
                        }
                        Err(e) => {
                            tracing::error!(
                                target: "tower_402::metering",
                                account = account.as_str(),
                                error = %e,
                                "reservation failed; failing closed"
                            );
                            refuse(Denial::Unavailable {
                                retry_after_secs: config.retry_after_secs,
                            })
                        }
                    }
                }
                StateProj::Calling {
                    fut,
                    ticket,
                    replayed,
                } => {
                    let mut res = ready!(fut.poll(cx))?;
                    let Some(mut ticket) = ticket.take() else {
                        if *replayed {
                            res.headers_mut()
                                .insert("idempotent-replayed", HeaderValue::from_static("true"));
                        }
                        return Poll::Ready(Ok(
                            res.map(|b| MeteredBody::plain(ResponseBody::inner(b)))
                        ));
                    };
                    let status = res.status();
                    let billable = !(status.is_server_error()
                        || (status.is_client_error() && !ticket.guard.config.bill_client_errors));
                    if !billable {
                        tracing::info!(
                            target: "tower_402::metering",
                            account = ticket.reservation.id.account.as_str(),
                            status = status.as_u16(),
                            "non-billable response; releasing the reservation"
                        );
                        let release = ticket.guard.finish(Action::Release);
                        State::Releasing {
                            release,
                            response: Some(res),
                        }
                    } else {
                        let usage = usage_for(&ticket, res.extensions().get::<ReportedUsage>());
                        add_headers(&mut res, &ticket);
                        ticket.guard.on_drop = Action::Settle(usage);
                        let guard = ticket.guard;
                        return Poll::Ready(Ok(
                            res.map(|b| MeteredBody::metered(ResponseBody::inner(b), guard))
                        ));
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
                } => {
                    let Some(denial) = denial.take() else {
                        panic!("metering future polled after completion");
                    };
                    let res = denial_response(denial, &config.problems, *now);
                    return Poll::Ready(Ok(res.map(MeteredBody::plain)));
                }
            };
            this.state.set(next);
        }
    }
}

/// The usage to settle: what the handler reported for the reserved meters, else the estimate.
fn usage_for(ticket: &Ticket, reported: Option<&ReportedUsage>) -> Vec<Usage> {
    let charges = &ticket.request.charges;
    match reported {
        Some(ReportedUsage(usage)) => {
            for u in usage {
                if !charges.iter().any(|c| c.meter == u.meter) {
                    tracing::warn!(
                        target: "tower_402::metering",
                        account = ticket.reservation.id.account.as_str(),
                        meter = u.meter.as_str(),
                        "reported usage for a meter this request did not reserve; ignored"
                    );
                }
            }
            charges
                .iter()
                .map(|c| Usage {
                    meter: c.meter.clone(),
                    units: usage
                        .iter()
                        .filter(|u| u.meter == c.meter)
                        .fold(0u64, |acc, u| acc.saturating_add(u.units)),
                })
                .collect()
        }
        None => charges
            .iter()
            .map(|c| Usage {
                meter: c.meter.clone(),
                units: c.units,
            })
            .collect(),
    }
}

fn add_headers<B>(res: &mut Response<B>, ticket: &Ticket) {
    let h = res.headers_mut();
    if let Some(v) = header_from(ticket.reservation.available_after) {
        h.insert("x-credits-remaining", v);
    }
    for (charge, left) in ticket
        .request
        .charges
        .iter()
        .zip(&ticket.reservation.allowance_left)
    {
        if let (Some(left), Some(w)) = (left, charge.allowance) {
            if let Some(v) = header_from(left) {
                h.insert("x-allowance-remaining", v);
            }
            if let Some(v) = header_from(w.resets_at) {
                h.insert("x-allowance-reset", v);
            }
        }
    }
}
