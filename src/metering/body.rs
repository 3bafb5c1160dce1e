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
use crate::ledger::{Charge, ReservationId, Settlement, SyncLedger, Usage};
use crate::metering::layer::{DisconnectPolicy, StreamErrorPolicy};
use crate::metering::{MeterConfig, UsageError, UsageScanner};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What must still happen to a reservation.
pub(crate) enum Action {
    Release,
    Settle(Vec<Usage>),
    /// Settle the estimate: the units reserved (built where it is settled, not allocated).
    SettleEstimate,
}

/// Owns an open reservation until it is settled or released.
///
/// Dropped without being finished (a cancelled request, a body dropped mid-stream) it
/// finishes the reservation on a spawned Tokio task; where there is no runtime, the
/// reservation is left to expire (and says so in the log). A reservation is never leaked.
pub(crate) struct Guard {
    config: Arc<MeterConfig>,
    id: ReservationId,
    charges: Arc<[Charge]>,
    known: Option<Vec<Usage>>,
    scanner: Option<Box<dyn UsageScanner>>,
    responded: bool,
    release_on_grpc_error: bool,
    grpc_failed: bool,
    done: bool,
}

impl Guard {
    /// Takes the reservation's id and the request's charges over.
    pub(crate) fn new(config: Arc<MeterConfig>, id: ReservationId, charges: Arc<[Charge]>) -> Self {
        Guard {
            config,
            id,
            charges,
            known: None,
            scanner: None,
            responded: false,
            release_on_grpc_error: false,
            grpc_failed: false,
            done: false,
        }
    }

    /// The charges this request reserved.
    pub(crate) fn charges(&self) -> &[Charge] {
        &self.charges
    }

    fn estimate(&self) -> Vec<Usage> {
        estimate(&self.charges)
    }

    pub(crate) fn config(&self) -> Arc<MeterConfig> {
        self.config.clone()
    }

    pub(crate) fn account(&self) -> &str {
        self.id.account.as_str()
    }

    /// The response head arrived: usage is either known now or read from the body.
    pub(crate) fn responded(
        &mut self,
        known: Option<Vec<Usage>>,
        scanner: Option<Box<dyn UsageScanner>>,
    ) {
        self.responded = true;
        self.known = known;
        self.scanner = scanner;
    }

    /// A gRPC call: a non-zero `grpc-status` in the trailers releases instead of settling.
    pub(crate) fn release_on_grpc_error(&mut self) {
        self.release_on_grpc_error = true;
    }

    fn data(&mut self, chunk: &[u8]) {
        if let Some(s) = &mut self.scanner {
            s.data(chunk);
        }
    }

    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if self.release_on_grpc_error
            && crate::problem::grpc_status(trailers).is_some_and(|code| code != 0)
        {
            tracing::info!(
                target: "tower_402::metering",
                account = self.account(),
                grpc_status = crate::problem::grpc_status(trailers),
                "gRPC call failed; releasing the reservation"
            );
            self.grpc_failed = true;
        }
        if let Some(s) = &mut self.scanner {
            s.trailers(trailers);
        }
    }

    fn checked(&self, usage: Result<Vec<Usage>, UsageError>) -> Vec<Usage> {
        let usage = usage.and_then(
            |u| match u.iter().find(|u| u.units > self.config.max_units) {
                Some(big) => Err(UsageError::Invalid(format!(
                    "{} {} is above the limit of {}",
                    big.units, big.meter, self.config.max_units
                ))),
                None => Ok(u),
            },
        );
        match usage {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(
                    target: "tower_402::metering",
                    account = self.account(),
                    error = %e,
                    "no usable usage figure; charging the estimate"
                );
                self.estimate()
            }
        }
    }

    /// The body ended: what to settle.
    fn at_end(&mut self) -> Action {
        if self.grpc_failed {
            return Action::Release;
        }
        if let Some(known) = self.known.take() {
            return Action::Settle(self.checked(Ok(known)));
        }
        match self.scanner.as_mut().map(|s| s.finish()) {
            Some(usage) => Action::Settle(self.checked(usage)),
            None => Action::SettleEstimate,
        }
    }

    fn so_far(&mut self) -> Option<Vec<Usage>> {
        let seen = self.scanner.as_mut().and_then(|s| s.so_far())?;
        Some(self.checked(Ok(seen)))
    }

    /// The body failed mid-stream.
    fn at_error(&mut self) -> Action {
        match self.config.on_stream_error {
            StreamErrorPolicy::Release => Action::Release,
            StreamErrorPolicy::ChargeUsageSoFar => match self.so_far() {
                Some(u) => Action::Settle(u),
                None => Action::Release,
            },
        }
    }

    /// Dropped unfinished.
    fn at_drop(&mut self) -> Action {
        if !self.responded {
            // Cancelled before the response: the handler's future was dropped with it.
            return Action::Release;
        }
        if let Some(known) = self.known.take() {
            return Action::Settle(self.checked(Ok(known)));
        }
        match self.config.on_disconnect {
            DisconnectPolicy::ChargeEstimate => Action::SettleEstimate,
            DisconnectPolicy::ChargeUsageSoFar => {
                Action::Settle(self.so_far().unwrap_or_else(|| self.estimate()))
            }
        }
    }

    /// Carries out `action`: right here with a ledger that needs no I/O (`None`), else the
    /// future that does. The guard is finished from here on.
    pub(crate) fn finish(&mut self, action: Action) -> Option<BoxFuture> {
        self.done = true;
        if let Some(ledger) = self.config.ledger.now_or_later() {
            run_now(ledger, &self.config, &self.id, &self.charges, action);
            return None;
        }
        let config = self.config.clone();
        // Reference counts, not copies.
        let (id, charges) = (self.id.clone(), self.charges.clone());
        Some(Box::pin(run(config, id, charges, action)))
    }

    pub(crate) fn release(&mut self) -> Option<BoxFuture> {
        self.finish(Action::Release)
    }
}

/// The units a charge reserved, as usage.
fn reserved(c: &Charge) -> Usage {
    Usage {
        meter: c.meter.clone(),
        units: c.units,
    }
}

/// The units reserved, as usage: what settling the estimate charges.
fn estimate(charges: &[Charge]) -> Vec<Usage> {
    charges.iter().map(reserved).collect()
}

/// What a ledger call to finish a reservation answered.
enum Outcome {
    Released(Result<(), LedgerError>),
    Settled(Result<Settlement, LedgerError>),
}

async fn run(config: Arc<MeterConfig>, id: ReservationId, charges: Arc<[Charge]>, action: Action) {
    let now = config.clock.now();
    // This path allocates its future anyway: the estimate is simply a usage list here.
    let usage = match action {
        Action::Release => None,
        Action::Settle(usage) => Some(usage),
        Action::SettleEstimate => Some(estimate(&charges)),
    };
    let outcome = match usage {
        None => Outcome::Released(
            bounded::<_, LedgerError>(config.timeout, config.ledger.release(&id, now)).await,
        ),
        Some(usage) => Outcome::Settled(
            bounded::<_, LedgerError>(
                config.timeout,
                config.ledger.settle(&id, &usage, config.over_estimate, now),
            )
            .await,
        ),
    };
    report(&config, &id, &charges, outcome);
}

/// The same as [`run`] on a ledger that answers without I/O.
fn run_now(
    ledger: &dyn SyncLedger,
    config: &MeterConfig,
    id: &ReservationId,
    charges: &[Charge],
    action: Action,
) {
    let now = config.clock.now();
    let outcome = match &action {
        Action::Release => Outcome::Released(ledger.release(id, now)),
        Action::Settle(usage) => {
            Outcome::Settled(ledger.settle(id, usage, config.over_estimate, now))
        }
        Action::SettleEstimate => {
            let settle = |usage: &[Usage]| ledger.settle(id, usage, config.over_estimate, now);
            // The common one or two charges settle from the stack.
            Outcome::Settled(match charges {
                [a] => settle(&[reserved(a)]),
                [a, b] => settle(&[reserved(a), reserved(b)]),
                _ => settle(&estimate(charges)),
            })
        }
    };
    report(config, id, charges, outcome);
}

/// Logs how a reservation ended and reports threshold crossings.
fn report(config: &MeterConfig, id: &ReservationId, charges: &[Charge], outcome: Outcome) {
    let account = id.account.as_str();
    match outcome {
        Outcome::Released(Ok(())) => tracing::debug!(
            target: "tower_402::metering",
            account,
            "reservation released"
        ),
        Outcome::Released(Err(e)) => tracing::error!(
            target: "tower_402::metering",
            account,
            error = %e,
            "release failed; the hold comes back when the reservation expires"
        ),
        Outcome::Settled(Ok(s)) => {
            if s.shortfall.is_empty() {
                tracing::info!(
                    target: "tower_402::metering",
                    account,
                    charged = s.charged.get(),
                    available = s.available_after.get(),
                    "request settled"
                );
            } else {
                tracing::warn!(
                    target: "tower_402::metering",
                    account,
                    charged = s.charged.get(),
                    shortfall_credits = s.shortfall.credits.get(),
                    shortfall_units = ?s.shortfall.units,
                    "request settled with a shortfall: usage exceeded what could be charged"
                );
            }
            if let Some(t) = &config.thresholds {
                t.after_settle(&id.account, charges, &s);
            }
        }
        Outcome::Settled(Err(e)) => tracing::error!(
            target: "tower_402::metering",
            account,
            error = %e,
            "settlement failed; the hold comes back when the reservation expires"
        ),
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let action = self.at_drop();
        if let Some(fut) = self.finish(action) {
            spawn_or_expire(fut, self.account());
        }
    }
}

fn spawn_or_expire(fut: BoxFuture, account: &str) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(fut);
        }
        Err(_) => tracing::warn!(
            target: "tower_402::metering",
            account,
            "no Tokio runtime to finish a reservation; it will expire"
        ),
    }
}

/// A settlement under way. If the body is dropped before it completes (the client went away
/// while the last frame was held back), it goes on in a task instead of being lost.
pub(crate) struct Unfinished {
    fut: Option<BoxFuture>,
    account: crate::account::AccountId,
}

impl Unfinished {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(fut) = &mut self.fut {
            ready!(fut.as_mut().poll(cx));
            self.fut = None;
        }
        Poll::Ready(())
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            spawn_or_expire(fut, self.account.as_str());
        }
    }
}

pub(crate) enum Finish {
    Open(Guard),
    Running {
        fut: Unfinished,
        last: Option<Frame<Bytes>>,
    },
    Done,
}

pin_project! {
    /// Response body of [`Metering`](crate::metering::Metering): the inner body, fed to the
    /// usage extractor as it streams, and settled with the ledger when it ends (before its
    /// last frame is handed out, so a client holding the whole body sees a settled ledger).
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
                    ready!(fut.poll(cx));
                    let last = last.take();
                    *this.finish = Finish::Done;
                    return Poll::Ready(last.map(Ok));
                }
                Finish::Open(guard) => {
                    let frame = ready!(this.body.as_mut().poll_frame(cx));
                    match frame {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                guard.data(data);
                            } else if let Some(trailers) = frame.trailers_ref() {
                                guard.trailers(trailers);
                            }
                            // Trailers are always the last frame (a server may not poll the
                            // body again after them).
                            if !frame.is_trailers() && !this.body.is_end_stream() {
                                return Poll::Ready(Some(Ok(frame)));
                            }
                            // The last frame: settle before handing it out.
                            let action = guard.at_end();
                            match guard.finish(action) {
                                Some(fut) => {
                                    *this.finish = Finish::Running {
                                        fut: Unfinished {
                                            fut: Some(fut),
                                            account: guard.id.account.clone(),
                                        },
                                        last: Some(frame),
                                    }
                                }
                                None => {
                                    *this.finish = Finish::Done;
                                    return Poll::Ready(Some(Ok(frame)));
                                }
                            }
                        }
                        None => {
                            let action = guard.at_end();
                            match guard.finish(action) {
                                Some(fut) => {
                                    *this.finish = Finish::Running {
                                        fut: Unfinished {
                                            fut: Some(fut),
                                            account: guard.id.account.clone(),
                                        },
                                        last: None,
                                    }
                                }
                                None => {
                                    *this.finish = Finish::Done;
                                    return Poll::Ready(None);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(
                                target: "tower_402::metering",
                                account = guard.account(),
                                "response body failed mid-stream"
                            );
                            let action = guard.at_error();
                            if let Some(fut) = guard.finish(action) {
                                spawn_or_expire(fut, guard.account());
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
