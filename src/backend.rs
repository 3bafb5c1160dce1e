//! Shared plumbing for calls to stores: timeouts, outages and the [`FailureMode`].

use std::future::{poll_fn, Future};
use std::task::Poll;
use std::time::Duration;

use crate::error::{LedgerError, StoreError};

/// Runs a store call with an optional timeout, and times it (`call` names it in the
/// `tower402_store_call_seconds` histogram and the outage counter).
///
/// The call is polled once before any timer is armed: an in-process store answers on that
/// first poll, and arming a Tokio timer per store call would cost more than the call itself.
/// Such an answer is not timed either: it is not a call to a store.
pub(crate) async fn bounded<T, E>(
    call: &'static str,
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<StoreError> + Outage,
{
    let mut fut = std::pin::pin!(fut);
    let started = std::time::Instant::now();
    if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return r;
    }
    let r = match timeout {
        None => fut.await,
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout.into()),
        },
    };
    // Without the `metrics` feature this compiles to nothing.
    crate::observe::store_call(
        call,
        started.elapsed(),
        r.as_ref().err().is_some_and(Outage::is_outage),
    );
    r
}

/// Errors that can say whether the store was unreachable.
pub(crate) trait Outage {
    /// The store could not be reached or timed out (not a logic error).
    fn is_outage(&self) -> bool;
}

impl Outage for StoreError {
    fn is_outage(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout)
    }
}

impl Outage for LedgerError {
    fn is_outage(&self) -> bool {
        is_outage(self)
    }
}

/// Whether a ledger error means the backend is unreachable (as opposed to a logic error).
pub(crate) fn is_outage(err: &LedgerError) -> bool {
    matches!(err, LedgerError::Store(_))
}

/// What to do when a store cannot be reached or times out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureMode {
    /// Refuse with 503 and `Retry-After`. The default: unpaid work is never done by accident.
    #[default]
    Closed,
    /// Serve the request anyway and log a warning: availability over revenue.
    Open,
}
