//! Shared plumbing for calls to stores: timeouts and failure logging.

use std::future::Future;
use std::time::Duration;

use crate::error::{LedgerError, StoreError};

/// Runs a store call with an optional timeout.
pub(crate) async fn bounded<T, E>(
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    match timeout {
        None => fut.await,
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout.into()),
        },
    }
}

/// Whether a ledger error means the backend is unreachable (as opposed to a logic error).
pub(crate) fn is_outage(err: &LedgerError) -> bool {
    matches!(err, LedgerError::Store(_))
}
