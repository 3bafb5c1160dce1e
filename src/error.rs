//! Errors of the stores and the ledger.
//!
//! Refusals are not errors: a request that is not paid for gets a [`Denial`](crate::Denial), a
//! normal outcome. The types here describe things that went *wrong*: a backend that cannot be
//! reached, an idempotency key reused for something else, an amount out of range.

use std::error::Error as StdError;

/// A boxed error from a backend driver, kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A plan store, identity resolver or ledger backend failed.
///
/// The layers answer these with `503 Service Unavailable` (fail-closed, the default) or let the
/// request through (fail-open), and log the cause; the client never sees its text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or failed while answering.
    #[error("backend unavailable")]
    Unavailable(#[source] BoxError),
    /// The backend did not answer within the configured time.
    #[error("backend timed out")]
    Timeout,
    /// The backend answered with data this crate cannot read.
    #[error("backend returned unreadable data")]
    Corrupt(#[source] BoxError),
}

impl StoreError {
    /// Wraps a driver error as [`StoreError::Unavailable`].
    pub fn unavailable(err: impl Into<BoxError>) -> Self {
        StoreError::Unavailable(err.into())
    }

    /// Wraps a decoding error as [`StoreError::Corrupt`].
    pub fn corrupt(err: impl Into<BoxError>) -> Self {
        StoreError::Corrupt(err.into())
    }
}

/// A ledger operation could not be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The idempotency key was used before for a different operation (another amount, another
    /// request fingerprint).
    #[error("idempotency key reused for a different operation")]
    KeyConflict,
    /// No reservation with this id (never made, or forgotten after its retention time).
    #[error("unknown reservation")]
    UnknownReservation,
    /// The reservation was already settled; settling twice is refused.
    #[error("reservation already settled")]
    AlreadySettled,
    /// The reservation was already released and cannot be settled any more.
    #[error("reservation already released")]
    AlreadyReleased,
    /// An amount is zero where that makes no sense, or exceeds
    /// [`Credits::MAX_EXACT`](crate::Credits::MAX_EXACT), or a total would overflow.
    #[error("amount out of range")]
    AmountOutOfRange,
    /// Two charges of one reservation count the same meter: usage could not be told apart.
    #[error("two charges on the meter `{0}`")]
    DuplicateMeter(crate::plan::Meter),
    /// The backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
