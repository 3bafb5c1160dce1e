use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::backend::bounded;
use crate::body::ResponseBody;
use crate::error::LedgerError;
use crate::ledger::{ReservationId, Usage};
use crate::metering::MeterConfig;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What must still happen to a reservation.
pub(crate) enum Action {
    Release,
    Settle(Vec<Usage>),
}

/// Owns an open reservation until it is settled or released. Dropped without being finished
/// (a cancelled request, a body dropped mid-stream), it finishes the reservation on a spawned
/// task; where no Tokio runtime is around, the reservation is left to expire.
pub(crate) struct Guard {
    pub(crate) config: Arc<MeterConfig>,
    pub(crate) id: ReservationId,
    pub(crate) on_drop: Action,
    pub(crate) done: bool,
}

impl Guard {
    /// The future that carries out `action`; the guard is finished from here on.
    pub(crate) fn finish(&mut self, action: Action) -> BoxFuture {
        self.done = true;
        let config = self.config.clone();
        let id = self.id.clone();
        Box::pin(async move { run(config, id, action).await })
    }
}

async fn run(config: Arc<MeterConfig>, id: ReservationId, action: Action) {
    let now = config.clock.now();
    let account = id.account.as_str();
    match action {
        Action::Release => {
            match bounded::<_, LedgerError>(config.timeout, config.ledger.release(&id, now)).await {
                Ok(()) => {
                    tracing::debug!(target: "tower_402::metering", account, "reservation released")
                }
                Err(e) => tracing::error!(
                    target: "tower_402::metering",
                    account,
                    error = %e,
                    "release failed; the hold comes back when the reservation expires"
                ),
            }
        }
        Action::Settle(usage) => {
            let settled = bounded::<_, LedgerError>(
                config.timeout,
                config.ledger.settle(&id, &usage, config.over_estimate, now),
            )
            .await;
            match settled {
                Ok(s) if s.shortfall.is_empty() => tracing::info!(
                    target: "tower_402::metering",
                    account,
                    charged = s.charged.get(),
                    available = s.available_after.get(),
                    "request settled"
                ),
                Ok(s) => tracing::warn!(
                    target: "tower_402::metering",
                    account,
                    charged = s.charged.get(),
                    shortfall_credits = s.shortfall.credits.get(),
                    shortfall_units = ?s.shortfall.units,
                    "request settled with a shortfall: usage exceeded what could be charged"
                ),
                Err(e) => tracing::error!(
                    target: "tower_402::metering",
                    account,
                    error = %e,
                    "settlement failed; the hold comes back when the reservation expires"
                ),
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let action = std::mem::replace(&mut self.on_drop, Action::Release);
        let fut = self.finish(action);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(fut);
            }
            Err(_) => tracing::warn!(
                target: "tower_402::metering",
                account = self.id.account.as_str(),
                "no Tokio runtime to finish a dropped reservation; it will expire"
            ),
        }
    }
}

pub(crate) enum Finish {
    Open(Guard),
    Running {
        fut: BoxFuture,
        last: Option<Frame<Bytes>>,
    },
    Done,
}

pin_project! {
    /// Response body of [`Metering`](crate::metering::Metering): the inner body, settled
    /// with the ledger when it ends (before its last frame is handed out).
    pub struct MeteredBody<B> {
        #[pin]
        body: ResponseBody<B>,
        finish: Finish,
    }
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("open", &matches!(self.finish, Finish::Open(_)))
            .finish_non_exhaustive()
    }
}

impl<B> MeteredBody<B> {
    pub(crate) fn plain(body: ResponseBody<B>) -> Self {
        MeteredBody {
            body,
            finish: Finish::Done,
        }
    }

    pub(crate) fn metered(body: ResponseBody<B>, guard: Guard) -> Self {
        MeteredBody {
            body,
            finish: Finish::Open(guard),
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            match this.finish {
                Finish::Done => return this.body.as_mut().poll_frame(cx),
                Finish::Running { fut, last } => {
                    ready!(fut.as_mut().poll(cx));
                    let last = last.take();
                    *this.finish = Finish::Done;
                    return Poll::Ready(last.map(Ok));
                }
                Finish::Open(guard) => {
                    let frame = ready!(this.body.as_mut().poll_frame(cx));
                    match frame {
                        Some(Ok(frame)) if !this.body.is_end_stream() => {
                            return Poll::Ready(Some(Ok(frame)))
                        }
                        Some(Ok(frame)) => {
                            // The last frame: settle before handing it out, so a client that
                            // has the whole body knows the ledger is up to date.
                            let action = std::mem::replace(&mut guard.on_drop, Action::Release);
                            let fut = guard.finish(action);
                            *this.finish = Finish::Running {
                                fut,
                                last: Some(frame),
                            };
                        }
                        None => {
                            let action = std::mem::replace(&mut guard.on_drop, Action::Release);
                            let fut = guard.finish(action);
                            *this.finish = Finish::Running { fut, last: None };
                        }
                        Some(Err(e)) => {
                            tracing::warn!(
                                target: "tower_402::metering",
                                account = guard.id.account.as_str(),
                                "response body failed mid-stream; releasing the reservation"
                            );
                            let fut = guard.finish(Action::Release);
                            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                                handle.spawn(fut);
                            }
                            *this.finish = Finish::Done;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.finish, Finish::Done) && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
