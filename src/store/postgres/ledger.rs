//! [`PostgresLedger`]: its public API and the [`Ledger`] implementation.

use super::*;

/// The PostgreSQL ledger. Clones share the pool.
#[derive(Clone)]
pub struct PostgresLedger {
    pub(super) pool: Pool,
    pub(super) config: PostgresConfig,
    pub(super) sql: Arc<LedgerSql>,
    pub(super) queues: Queues,
    pub(super) counts: Arc<Counts>,
}

/// The atomics behind [`TransactionCounts`].
#[derive(Default)]
pub(super) struct Counts {
    pub(super) transactions: AtomicU64,
    pub(super) operations: AtomicU64,
}

/// How many transactions a [`PostgresLedger`] and its clones have run for `reserve`,
/// `settle`, `release` and `deposit` (and for `balance` and `allowance_usage` on a busy
/// account), and how many of those operations they carried: on a busy account one
/// transaction carries many (see the module docs). For metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransactionCounts {
    /// Transactions run, committed or not.
    pub transactions: u64,
    /// Operations they carried; an operation run again alone after its batch failed to
    /// store counts twice.
    pub operations: u64,
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresLedger {
    /// A ledger on `pool` (usually [`PostgresConfig::pool`]) with the tables of `config`.
    pub fn new(pool: Pool, config: PostgresConfig) -> Self {
        let sql = Arc::new(LedgerSql::new(&config));
        PostgresLedger {
            pool,
            config,
            sql,
            queues: Queues::default(),
            counts: Arc::default(),
        }
    }

    /// Creates the schema and tables if missing (idempotent, transactional).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate(&self.pool, &self.config).await
    }

    /// The pool, e.g. to share it with a [`PostgresPlanStore`].
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The transactions run so far for this ledger's operations, and the operations they
    /// carried.
    pub fn transaction_counts(&self) -> TransactionCounts {
        TransactionCounts {
            transactions: self.counts.transactions.load(Ordering::Relaxed),
            operations: self.counts.operations.load(Ordering::Relaxed),
        }
    }

    /// Releases the due reservations of up to `limit` accounts and deletes up to `limit`
    /// finished reservations, deposit keys and allowance counters older than the retention
    /// time. Returns how many rows it handled. Not needed for correctness (every operation
    /// expires its account's holds first); run it now and then to keep `held` accurate on
    /// idle accounts and the tables small.
    pub async fn sweep(&self, now: Timestamp, limit: u32) -> Result<u64, LedgerError> {
        let res = self.config.table("reservations");
        let dep = self.config.table("deposits");
        let allow = self.config.table("allowances");
        let adj = self.config.table("adjustments");
        let jrn = self.config.table("journal");
        let journal_horizon = ts_to_sql(Timestamp::from_unix(
            now.unix()
                .saturating_sub(self.config.journal.retention_secs),
        ));
        let now_sql = ts_to_sql(now);
        let horizon = ts_to_sql(Timestamp::from_unix(
            now.unix().saturating_sub(self.config.retention_secs),
        ));
        let limit = i64::from(limit);
        let accounts: Vec<String> = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT DISTINCT account FROM {res} \
                         WHERE state = 'open' AND expires_at <= $1 LIMIT $2"
                    ),
                    &[&now_sql, &limit],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await?;
        let mut handled = 0u64;
        for account in &accounts {
            self.balance(&AccountId::new(account), now).await?;
            handled = handled.saturating_add(1);
        }
        // Forgetting a record past its retention is what every operation would do on reading
        // it, so these deletes need no account lock.
        let deletes = [
            (
                format!(
                    "DELETE FROM {res} WHERE (account, key) IN (SELECT account, key FROM {res} \
                     WHERE state <> 'open' AND touched_at <= $1 LIMIT $2)"
                ),
                horizon,
            ),
            (
                format!(
                    "DELETE FROM {dep} WHERE (account, key) IN (SELECT account, key FROM {dep} \
                     WHERE at <= $1 LIMIT $2)"
                ),
                horizon,
            ),
            (
                format!(
                    "DELETE FROM {adj} WHERE (account, key) IN (SELECT account, key FROM {adj} \
                     WHERE at <= $1 LIMIT $2)"
                ),
                horizon,
            ),
            (
                format!(
                    "DELETE FROM {jrn} WHERE seq IN (SELECT seq FROM {jrn} \
                     WHERE at <= $1 LIMIT $2)"
                ),
                journal_horizon,
            ),
            (
                format!(
                    "DELETE FROM {allow} WHERE (account, meter, window_start) IN \
                     (SELECT account, meter, window_start FROM {allow} \
                     WHERE resets_at <= $1 AND held = 0 LIMIT $2)"
                ),
                now_sql,
            ),
        ];
        let deleted = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let mut n = 0u64;
            for (sql, at) in &deletes {
                let d = client
                    .execute(sql.as_str(), &[at, &limit])
                    .await
                    .map_err(pg_error)?;
                n = n.saturating_add(d);
            }
            Ok(n)
        })
        .await?;
        Ok(handled.saturating_add(deleted))
    }

    /// Open reservations of an account after expiring the due ones (for tests and
    /// diagnostics).
    pub async fn open_reservations(
        &self,
        account: &AccountId,
        now: Timestamp,
    ) -> Result<u64, LedgerError> {
        self.balance(account, now).await?;
        let res = self.config.table("reservations");
        let n: i64 = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one(
                    &format!("SELECT count(*) FROM {res} WHERE account = $1 AND state = 'open'"),
                    &[&account.as_str()],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.get(0))
        })
        .await?;
        Ok(from_sql(n)?)
    }

    /// Runs `op` on the account's book inside a transaction holding the account's row lock:
    /// the next one of its account, together with the operations queued with it.
    pub(super) async fn with_book<T, F>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: OwnedNeed,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&mut AccountBook) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = Queued {
            need,
            now,
            op: Box::new(Op {
                run: op,
                out: None,
                reply,
            }),
        };
        if self.queues.push(account, queued) {
            // The account had no transaction under way: start them. On a task of its own, so
            // a caller that stops waiting cannot abandon the operations queued behind it.
            let abandon = Abandon {
                queues: self.queues.clone(),
                account: account.clone(),
                armed: true,
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(self.clone().drain(abandon))),
                // Dropping `abandon` drops the queue: its callers get an error.
                Err(_) => {
                    drop(abandon);
                    return Err(
                        StoreError::unavailable("no Tokio runtime to run the ledger on").into(),
                    );
                }
            }
        }
        let answer = async {
            answer.await.unwrap_or_else(|_| {
                Err(StoreError::unavailable(
                    "the account's transaction ended without answering",
                ))
            })
        };
        timed(self.config.op_timeout, answer).await?
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    fn records(&self) -> Option<&dyn crate::ledger::ResponseRecords> {
        Some(self)
    }

    fn journal(&self) -> Option<&dyn Journal> {
        Some(self)
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, LedgerError> {
        let need = OwnedNeed {
            reservation: Some(req.key.clone()),
            allowances: req
                .charges
                .iter()
                .filter_map(|c| c.allowance.map(|w| (c.meter.clone(), w.start)))
                .collect(),
            deposit: None,
            adjustment: None,
        };
        let owned = req.clone();
        self.with_book(&req.account, req.now, need, move |b| b.reserve(&owned))
            .await
    }

    async fn settle(
        &self,
        id: &ReservationId,
        usage: &[Usage],
        policy: OverEstimate,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let key = id.key.clone();
        let need = OwnedNeed {
            reservation: Some(key.clone()),
            ..OwnedNeed::default()
        };
        let usage = usage.to_vec();
        self.with_book(&id.account, now, need, move |b| {
            b.settle(&key, &usage, policy, now)
        })
        .await
    }

    async fn release(&self, id: &ReservationId, now: Timestamp) -> Result<(), LedgerError> {
        let key = id.key.clone();
        let need = OwnedNeed {
            reservation: Some(key.clone()),
            ..OwnedNeed::default()
        };
        self.with_book(&id.account, now, need, move |b| b.release(&key, now))
            .await
    }

    async fn deposit(
        &self,
        account: &AccountId,
        amount: Credits,
        key: &str,
        now: Timestamp,
    ) -> Result<Deposit, LedgerError> {
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        let key = key.to_owned();
        let need = OwnedNeed {
            deposit: Some(key.clone()),
            ..OwnedNeed::default()
        };
        self.with_book(account, now, need, move |b| b.deposit(amount, &key, now))
            .await
    }

    async fn balance(&self, account: &AccountId, now: Timestamp) -> Result<Balance, LedgerError> {
        self.read_book(account, now, OwnedNeed::default(), move |b| {
            Ok(b.balance(now))
        })
        .await
    }

    async fn allowance_usage(
        &self,
        account: &AccountId,
        meter: &Meter,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<AllowanceUsage, LedgerError> {
        let need = OwnedNeed {
            allowances: vec![(meter.clone(), window_start)],
            ..OwnedNeed::default()
        };
        let meter = meter.clone();
        self.read_book(account, now, need, move |b| {
            Ok(b.allowance_usage(&meter, window_start, now))
        })
        .await
    }
}

#[async_trait]
impl Journal for PostgresLedger {
    async fn entries(
        &self,
        account: &AccountId,
        query: &JournalQuery,
        now: Timestamp,
    ) -> Result<Vec<JournalEntry>, LedgerError> {
        let horizon = ts_to_sql(Timestamp::from_unix(
            now.unix()
                .saturating_sub(self.config.journal.retention_secs),
        ));
        let since = query.since.map_or(i64::MIN, ts_to_sql);
        let until = query.until.map_or(i64::MAX, ts_to_sql);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let acct = account.as_str();
        let rows = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let read = client
                .prepare_cached(&self.sql.journal_read)
                .await
                .map_err(pg_error)?;
            client
                .query(&read, &[&acct, &horizon, &since, &until, &limit])
                .await
                .map_err(pg_error)
        })
        .await?;
        rows.iter()
            .map(|row| journal_from_row(row).map_err(LedgerError::from))
            .collect()
    }

    async fn adjust(
        &self,
        account: &AccountId,
        adjustment: &Adjustment,
        now: Timestamp,
    ) -> Result<Adjusted, LedgerError> {
        let amount = adjustment.credits;
        if amount.is_zero() || amount > Credits::MAX_EXACT {
            return Err(LedgerError::AmountOutOfRange);
        }
        let need = OwnedNeed {
            adjustment: Some(adjustment.key.clone()),
            ..OwnedNeed::default()
        };
        let adjustment = adjustment.clone();
        self.with_book(account, now, need, move |b| b.adjust(&adjustment, now))
            .await
    }
}
