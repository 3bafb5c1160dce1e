//! Settlements and releases that did not land: retried in the background until they do.
//!
//! A settle or release that fails because the ledger is unreachable (or timed out) is handed
//! to one bounded queue per [`Billing`](crate::Billing) and retried with exponential backoff
//! (50 ms doubling to 5 s) until the ledger answers. The request never waits for it. What the
//! ledger answers then is final:
//!
//! - the operation lands: it is logged, counted and exported like one that landed at once;
//! - `AlreadySettled` (a settle), `Ok` (a release), or `UnknownReservation` for a request
//!   without an `Idempotency-Key` (its record is forgotten once finished): the first attempt
//!   had landed and only its reply was lost; nothing more is done;
//! - a hold that expired meanwhile was charged its estimate
//!   ([`OnExpiry::Charge`](crate::ledger::OnExpiry)); the late settlement charges the actual
//!   usage instead, a late release gives it back.
//!
//! When the queue is full (see [`Billing::settlement_retries`](crate::Billing)), the newest
//! operation is dropped with an error log and the `tower402_settlement_retries_total
//! {result="dropped"}` counter: its hold is still charged its estimate when it expires, so
//! served work is not free, but a refund that was due is not made. The queue lives in the
//! process; an instance that dies with operations queued leaves them to the same expiry.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::backend::{bounded, is_outage};
use crate::charge::Charge;
use crate::credits::Credits;
use crate::error::LedgerError;
use crate::ledger::{ReservationId, Usage};
use crate::metering::guard::{report, Export, Outcome};
use crate::metering::MeterConfig;

/// The first wait before a retry; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The default number of operations waiting at once.
pub(crate) const DEFAULT_RETRY_CAPACITY: usize = 10_000;

/// A settle (`usage`) or release (`None`) waiting to land.
pub(crate) struct Pending {
    pub(crate) config: Arc<MeterConfig>,
    pub(crate) id: ReservationId,
    pub(crate) held: Credits,
    pub(crate) charges: Arc<[Charge]>,
    pub(crate) usage: Option<Vec<Usage>>,
    /// The settlement's policy, as the first attempt had it.
    pub(crate) policy: crate::ledger::OverEstimate,
    pub(crate) export: Export,
}

/// The queue: a bounded channel to one worker task, started when the first operation is
/// queued (and again if the runtime it ran on has gone).
pub(crate) struct Retries {
    capacity: usize,
    tx: Mutex<Option<mpsc::Sender<Pending>>>,
}

impl std::fmt::Debug for Retries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retries")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Retries {
    pub(crate) fn new(capacity: usize) -> Self {
        Retries {
            capacity: capacity.max(1),
            tx: Mutex::new(None),
        }
    }

    /// Queues `p`, never waiting: dropped (and logged) when the queue is full or there is no
    /// runtime to retry on.
    pub(crate) fn push(&self, p: Pending) {
        let account = p.id.account.clone();
        let mut tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let mut p = p;
        for _ in 0..2 {
            let sender = match &*tx {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let Ok(handle) = tokio::runtime::Handle::try_current() else {
                        break;
                    };
                    let (s, rx) = mpsc::channel(self.capacity);
                    handle.spawn(work(rx));
                    *tx = Some(s.clone());
                    s
                }
            };
            match sender.try_send(p) {
                Ok(()) => {
                    counted("queued");
                    return;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    counted("dropped");
                    tracing::error!(
                        target: "tower_402::metering",
                        account = account.as_str(),
                        capacity = self.capacity,
                        "settlement retry queue full; dropped: the hold is charged its \
                         estimate when it expires, and no refund is made"
                    );
                    return;
                }
                // The worker's runtime is gone: start another on this one.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    p = back;
                    *tx = None;
                }
            }
        }
        counted("dropped");
        tracing::error!(
            target: "tower_402::metering",
            account = account.as_str(),
            "no Tokio runtime to retry a settlement on; the hold is charged its estimate when \
             it expires"
        );
    }
}

fn counted(result: &'static str) {
    crate::observe::settlement_retry(result);
}

/// The worker: one operation at a time, in the order they failed (an outage holds them all
/// up alike), each retried until the ledger answers.
async fn work(mut rx: mpsc::Receiver<Pending>) {
    while let Some(p) = rx.recv().await {
        let mut wait = FIRST_BACKOFF;
        loop {
            tokio::time::sleep(wait).await;
            match attempt(&p).await {
                Some(outcome) => {
                    land(p, outcome);
                    break;
                }
                None => wait = (wait * 2).min(MAX_BACKOFF),
            }
        }
    }
}

/// One try: `None` while the ledger is still unreachable.
async fn attempt(p: &Pending) -> Option<Outcome> {
    let config = &p.config;
    let now = config.clock.now();
    let outcome = match &p.usage {
        None => Outcome::Released(
            bounded::<_, LedgerError>(
                "ledger.release",
                config.timeout,
                config.ledger.release(&p.id, now),
            )
            .await,
        ),
        Some(usage) => Outcome::Settled(
            bounded::<_, LedgerError>(
                "ledger.settle",
                config.timeout,
                config.ledger.settle(&p.id, usage, p.policy, now),
            )
            .await,
        ),
    };
    match &outcome {
        Outcome::Released(Err(e)) | Outcome::Settled(Err(e)) if is_outage(e) => {
            tracing::debug!(
                target: "tower_402::metering",
                account = p.id.account.as_str(),
                error = %e,
                "ledger still unreachable; settlement retried later"
            );
            None
        }
        _ => Some(outcome),
    }
}

/// The ledger answered a queued operation.
fn land(p: Pending, outcome: Outcome) {
    let account = p.id.account.as_str();
    // A key unique to one request (not a client's idempotency key).
    let unique = p.id.key.starts_with("req:");
    match &outcome {
        // The first attempt had landed; its reply was lost.
        Outcome::Settled(Err(LedgerError::AlreadySettled)) => {
            counted("landed");
            tracing::info!(
                target: "tower_402::metering",
                account,
                "queued settlement: the first attempt had landed"
            );
            return;
        }
        Outcome::Settled(Err(LedgerError::UnknownReservation))
        | Outcome::Released(Err(LedgerError::UnknownReservation))
            if unique =>
        {
            counted("landed");
            tracing::info!(
                target: "tower_402::metering",
                account,
                "queued settlement: the first attempt had landed (its record is forgotten)"
            );
            return;
        }
        Outcome::Settled(Ok(_)) | Outcome::Released(Ok(())) => {
            counted("landed");
            tracing::info!(
                target: "tower_402::metering",
                account,
                "queued settlement landed"
            );
        }
        _ => counted("failed"),
    }
    report(
        &p.config,
        &p.id.account,
        p.held,
        &p.charges,
        outcome,
        p.usage.as_deref(),
        p.export,
    );
}
