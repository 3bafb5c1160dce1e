//! Busy accounts: operations queued per account and carried by one transaction.

use super::*;

/// What operations need loaded besides the buckets and the due reservations.
pub(super) struct Need<'a> {
    pub(super) reservations: Vec<&'a str>,
    pub(super) allowances: Vec<(Meter, Timestamp)>,
    pub(super) deposits: Vec<&'a str>,
    pub(super) adjustments: Vec<&'a str>,
}

impl<'a> Need<'a> {
    /// What all of `needs` need.
    pub(super) fn of(needs: impl Iterator<Item = &'a OwnedNeed> + Clone) -> Self {
        Need {
            reservations: needs
                .clone()
                .filter_map(|n| n.reservation.as_deref())
                .collect(),
            allowances: needs
                .clone()
                .flat_map(|n| n.allowances.iter().cloned())
                .collect(),
            deposits: needs.clone().filter_map(|n| n.deposit.as_deref()).collect(),
            adjustments: needs.filter_map(|n| n.adjustment.as_deref()).collect(),
        }
    }

    /// The allowance windows, as the meter and start columns of the load statement.
    pub(super) fn windows(&self) -> (Vec<&str>, Vec<i64>) {
        self.allowances
            .iter()
            .map(|(m, s)| (m.as_str(), ts_to_sql(*s)))
            .unzip()
    }

    /// The parameters of [`LedgerSql::load`] and [`LedgerSql::peek`], in order.
    pub(super) fn params<'p>(
        &'p self,
        account: &'p &'p str,
        now: &'p i64,
        windows: &'p (Vec<&'p str>, Vec<i64>),
    ) -> [&'p (dyn ToSql + Sync); 7] {
        [
            account,
            now,
            &self.reservations,
            &windows.0,
            &windows.1,
            &self.deposits,
            &self.adjustments,
        ]
    }
}

/// What one queued operation needs loaded (see [`Need`]).
#[derive(Default)]
pub(super) struct OwnedNeed {
    pub(super) reservation: Option<ReservationKey>,
    pub(super) allowances: Vec<(Meter, Timestamp)>,
    pub(super) deposit: Option<String>,
    pub(super) adjustment: Option<String>,
}

/// Operations on one account wait here for the account's next transaction, so that a busy
/// account takes its row lock, and flushes the WAL, once for many operations instead of once
/// each. Operations on other accounts run in parallel, as before; other instances sharing
/// the database still take turns on the row lock.
#[derive(Clone, Default)]
pub(super) struct Queues(Arc<Mutex<FastMap<AccountId, Vec<Queued>>>>);

/// The most operations one transaction runs.
pub(super) const MAX_BATCH: usize = 64;

impl Queues {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<AccountId, Vec<Queued>>> {
        // Nothing is left half-done under this lock: a poisoned one is safe to keep using.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `op`. True if the account had no transaction under way: the caller starts
    /// [`PostgresLedger::drain`].
    pub(super) fn push(&self, account: &AccountId, op: Queued) -> bool {
        let mut queues = self.lock();
        if let Some(queue) = queues.get_mut(account) {
            queue.push(op);
            return false;
        }
        queues.insert(account.clone(), vec![op]);
        true
    }

    /// The account's next operations, at most [`MAX_BATCH`]; `None`, and the account's
    /// queue gone, when there are none.
    pub(super) fn next(&self, account: &AccountId) -> Option<Vec<Queued>> {
        let mut queues = self.lock();
        let queue = queues.get_mut(account)?;
        // Operations whose callers stopped waiting take no place in a transaction.
        queue.retain(|q| !q.op.abandoned());
        if queue.is_empty() {
            queues.remove(account);
            return None;
        }
        if queue.len() <= MAX_BATCH {
            return Some(std::mem::take(queue));
        }
        Some(queue.drain(..MAX_BATCH).collect())
    }

    /// Whether the account has a transaction under way: a read then joins the next one
    /// rather than reading beside it.
    pub(super) fn busy(&self, account: &AccountId) -> bool {
        self.lock().contains_key(account)
    }

    pub(super) fn abandon(&self, account: &AccountId) {
        self.lock().remove(account);
    }
}

/// Drops an account's queue when dropped: see [`PostgresLedger::drain`].
pub(super) struct Abandon {
    pub(super) queues: Queues,
    pub(super) account: AccountId,
    pub(super) armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            self.queues.abandon(&self.account);
        }
    }
}

/// An operation waiting for its account's transaction.
pub(super) struct Queued {
    pub(super) need: OwnedNeed,
    pub(super) now: Timestamp,
    pub(super) op: Box<dyn Pending>,
}

/// A queued operation, whatever it answers.
pub(super) trait Pending: Send {
    /// Whether its caller has stopped waiting.
    fn abandoned(&self) -> bool;
    /// Runs the operation on the book, unless its caller has stopped waiting.
    fn apply(&mut self, book: &mut AccountBook);
    /// Forgets the result of [`Pending::apply`], to run it again in another transaction.
    fn reset(&mut self);
    /// Answers once the transaction has ended: committed (or had nothing to write), or
    /// failed, in which case nothing the operation did was kept.
    fn answer(self: Box<Self>, ended: Result<(), &Arc<StoreError>>);
    /// Answers that what the operation did could not be stored.
    fn fail(self: Box<Self>, error: LedgerError);
}

pub(super) struct Op<T, F> {
    pub(super) run: F,
    pub(super) out: Option<Result<T, LedgerError>>,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<Result<T, LedgerError>, StoreError>>,
}

impl<T, F> Pending for Op<T, F>
where
    T: Send,
    F: Fn(&mut AccountBook) -> Result<T, LedgerError> + Send,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn apply(&mut self, book: &mut AccountBook) {
        if !self.abandoned() {
            self.out = Some((self.run)(book));
        }
    }

    fn reset(&mut self) {
        self.out = None;
    }

    fn answer(self: Box<Self>, ended: Result<(), &Arc<StoreError>>) {
        let answer = match (ended, self.out) {
            (Ok(()), Some(out)) => Ok(out),
            // Not run: its caller had stopped waiting.
            (Ok(()), None) => return,
            (Err(e), _) => Err(shared(e)),
        };
        // The caller may have stopped waiting since: then nobody needs the answer.
        let _ = self.reply.send(answer);
    }

    fn fail(self: Box<Self>, error: LedgerError) {
        let _ = self.reply.send(Ok(Err(error)));
    }
}

/// Whether the server refused the data of a statement (SQLSTATE classes 22, data exception,
/// and 23, integrity constraint violation): the fault of one operation's input, not of the
/// connection or the server.
pub(super) fn refused_data(e: &StoreError) -> bool {
    let StoreError::Unavailable(source) = e else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|code| matches!(code.code().get(..2), Some("22" | "23")))
}

/// The error of a transaction, for each of its operations.
pub(super) fn shared(e: &Arc<StoreError>) -> StoreError {
    #[derive(Debug)]
    pub(super) struct Shared(Arc<StoreError>);
    impl fmt::Display for Shared {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(&self.0, f)
        }
    }
    impl std::error::Error for Shared {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            std::error::Error::source(&*self.0)
        }
    }
    match **e {
        StoreError::Timeout => StoreError::Timeout,
        StoreError::Unavailable(_) => StoreError::Unavailable(Box::new(Shared(e.clone()))),
        StoreError::Corrupt(_) => StoreError::Corrupt(Box::new(Shared(e.clone()))),
    }
}
