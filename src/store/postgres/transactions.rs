//! Running one account's batch in a transaction: lock, load, apply, write, commit.

use super::*;

impl PostgresLedger {
    /// Runs the account's queued operations, a transaction at a time, until none is left.
    /// Made before the task is spawned, `abandon` goes wherever the task goes: should it end
    /// early or never run (a panic, a runtime shutting down), the account's queue goes with
    /// it, its callers get an error, and the next operation starts anew.
    pub(super) async fn drain(self, mut abandon: Abandon) {
        while let Some(batch) = self.queues.next(&abandon.account) {
            self.run_batch(&abandon.account, batch).await;
        }
        // `next` removed the queue when it found it empty.
        abandon.armed = false;
    }

    /// One transaction for `batch`, and its answers. Should a result be impossible to store
    /// (an amount beyond the table's range, data the server refuses), the operations run
    /// again one per transaction, so that only the one at fault fails.
    pub(super) async fn run_batch(&self, account: &AccountId, batch: Vec<Queued>) {
        let n = batch.len();
        let mut needs = Vec::with_capacity(n);
        let mut ops = Vec::with_capacity(n);
        for q in batch {
            needs.push((q.need, q.now));
            ops.push(q.op);
        }
        let result = self.transaction(account, &needs, &mut ops).await;
        if n > 1 {
            tracing::debug!(
                target: "tower_402::store::postgres",
                account = account.as_str(),
                operations = n,
                "operations batched in one transaction"
            );
        }
        match result {
            Ok(Ok(())) => ops.into_iter().for_each(|op| op.answer(Ok(()))),
            Err(e) if n == 1 || !refused_data(&e) => {
                let e = Arc::new(e);
                ops.into_iter().for_each(|op| op.answer(Err(&e)));
            }
            Ok(Err(e)) if n == 1 => {
                if let Some(op) = ops.pop() {
                    op.fail(e);
                }
            }
            // Something one of them did cannot be stored, or the server refused the data:
            // run each alone, so that only the one at fault fails.
            Ok(Err(_)) | Err(_) => {
                for (mut op, need) in ops.into_iter().zip(&needs) {
                    op.reset();
                    let alone = std::slice::from_ref(need);
                    match self
                        .transaction(account, alone, std::slice::from_mut(&mut op))
                        .await
                    {
                        Ok(Ok(())) => op.answer(Ok(())),
                        Ok(Err(e)) => op.fail(e),
                        Err(e) => op.answer(Err(&Arc::new(e))),
                    }
                }
            }
        }
    }

    /// One transaction running `ops` in order; `Ok(Err)` if what they did cannot be stored.
    pub(super) async fn transaction(
        &self,
        account: &AccountId,
        needs: &[(OwnedNeed, Timestamp)],
        ops: &mut [Box<dyn Pending>],
    ) -> Result<Result<(), LedgerError>, StoreError> {
        // Due reservations are loaded as of the latest `now`: a superset of what each
        // operation, at its own time, expires.
        let now = needs.iter().map(|(_, at)| *at).max().unwrap_or_default();
        let need = Need::of(needs.iter().map(|(n, _)| n));
        self.counts.transactions.fetch_add(1, Ordering::Relaxed);
        let carried = ops.len() as u64;
        self.counts.operations.fetch_add(carried, Ordering::Relaxed);
        let run = |book: &mut AccountBook| {
            ops.iter_mut().for_each(|op| op.apply(book));
            Ok(())
        };
        timed(
            self.config.op_timeout,
            self.locked(account, now, &need, run),
        )
        .await
    }

    /// Runs a read (`op` changes nothing unless records are due to expire or be forgotten).
    /// On a busy account it joins the account's next transaction. Otherwise it reads without
    /// the lock: on one consistent snapshot of the account, which is as good as reading under
    /// the lock at that instant. Only if the book would change does it run again under the
    /// lock, like any other operation.
    pub(super) async fn read_book<T, F>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: OwnedNeed,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&mut AccountBook) -> Result<T, LedgerError> + Send + Sync + 'static,
    {
        if self.queues.busy(account) {
            return self.with_book(account, now, need, op).await;
        }
        let need = Need::of(std::iter::once(&need));
        let run = async {
            if let Some(out) = self.peek(account, now, &need, &op).await? {
                return Ok(out);
            }
            self.locked(account, now, &need, &op).await
        };
        timed(self.config.op_timeout, run).await?
    }

    /// `op` on a snapshot read in one statement, without a transaction; `None` if it would
    /// change the book.
    pub(super) async fn peek<T>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: &Need<'_>,
        op: impl FnOnce(&mut AccountBook) -> Result<T, LedgerError>,
    ) -> Result<Option<Result<T, LedgerError>>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let peek = client
            .prepare_cached(&self.sql.peek)
            .await
            .map_err(pg_error)?;
        let acct = account.as_str();
        let windows = need.windows();
        let rows = client
            .query(&peek, &need.params(&acct, &ts_to_sql(now), &windows))
            .await
            .map_err(pg_error)?;
        // An account without a row has a zero balance, as the lock would create it.
        let mut parts = Parts::default();
        add_rows(&mut parts, &rows)?;
        let mut book = AccountBook::from_parts(self.config.retention_secs, parts.clone());
        let out = op(&mut book);
        let after = book.into_parts();
        match Changes::between(&parts, &after) {
            Ok(c) if c.is_empty() && after.journal.is_empty() => Ok(Some(out)),
            Ok(_) => Ok(None),
            Err(LedgerError::Store(e)) => Err(e),
            Err(e) => Ok(Some(Err(e))),
        }
    }

    /// `op` in a transaction holding the account's row lock, in two round trips: BEGIN, the
    /// lock and the load pipelined; then the write and COMMIT pipelined (or a ROLLBACK when
    /// nothing changed, which spares the commit's WAL flush). The lock is held for one round
    /// trip plus the commit.
    pub(super) async fn locked<T>(
        &self,
        account: &AccountId,
        now: Timestamp,
        need: &Need<'_>,
        op: impl FnOnce(&mut AccountBook) -> Result<T, LedgerError>,
    ) -> Result<Result<T, LedgerError>, StoreError> {
        let sql = &self.sql;
        let tx = OpenTx(Some(self.pool.get().await.map_err(pool_error)?));
        let client = tx.client();
        // All prepared before anything is sent: the pipelines below rely on their order.
        let lock = client.prepare_cached(&sql.lock).await.map_err(pg_error)?;
        let load = client.prepare_cached(&sql.load).await.map_err(pg_error)?;
        let write = client.prepare_cached(&sql.write).await.map_err(pg_error)?;
        let acct = account.as_str();
        let windows = need.windows();
        // Pipelined: tokio-postgres sends a query on its future's first poll and `try_join3`
        // polls in argument order, so BEGIN, `lock` and `load` go out in that order without
        // waiting for answers, and the server runs them in that order. Under read committed,
        // `load` takes its snapshot when it starts, after the lock is granted, so it sees
        // everything the lock's previous holder committed. (One statement doing both would
        // read from a snapshot taken before waiting for the lock.)
        let (_, balance, rows) = try_join3(
            client.batch_execute(&sql.begin),
            client.query_one(&lock, &[&acct]),
            client.query(&load, &need.params(&acct, &ts_to_sql(now), &windows)),
        )
        .await
        .map_err(pg_error)?;
        let mut loaded = Parts {
            balance: balance_from_row(&balance, 0, balance.get(4))?,
            ..Parts::default()
        };
        add_rows(&mut loaded, &rows)?;
        let mut book = AccountBook::from_parts(self.config.retention_secs, loaded.clone());
        let out = op(&mut book);
        let after = book.into_parts();
        let changes = match (&out, Changes::between(&loaded, &after)) {
            (Ok(_), Ok(c)) if !c.is_empty() => c,
            // A refused operation or one that changed nothing: nothing to write.
            (_, Ok(_)) => {
                client.batch_execute("ROLLBACK").await.map_err(pg_error)?;
                tx.close();
                return Ok(out);
            }
            (_, Err(LedgerError::Store(e))) => return Err(e),
            (_, Err(e)) => return Ok(Err(e)),
        };
        // Pipelined the same way: the write, then COMMIT. Should the write fail, the server
        // has aborted the transaction and turns the COMMIT into a rollback; `try_join`
        // reports the write's error. If the write never went out (an encoding error on
        // its first poll), `try_join` returns before polling COMMIT and `tx` closes the
        // connection: the transaction is rolled back either way.
        if after.journal.is_empty() {
            try_join(
                client.execute(&write, &changes.params(&acct)),
                client.batch_execute("COMMIT"),
            )
            .await
            .map_err(pg_error)?;
        } else {
            // The journal entries and their trim go in the same pipeline and transaction.
            let journal_write = client
                .prepare_cached(&sql.journal_write)
                .await
                .map_err(pg_error)?;
            let journal_trim = client
                .prepare_cached(&sql.journal_trim)
                .await
                .map_err(pg_error)?;
            // Dropping `tx` on an error closes the connection: the transaction rolls back.
            let entries = match JournalColumns::of(&after.journal) {
                Ok(entries) => entries,
                Err(LedgerError::Store(e)) => return Err(e),
                Err(e) => return Ok(Err(e)),
            };
            let keep = i64::try_from(self.config.journal.max_entries).unwrap_or(i64::MAX);
            try_join4(
                client.execute(&write, &changes.params(&acct)),
                client.execute(&journal_write, &entries.params(&acct)),
                client.execute(&journal_trim, &[&acct, &keep]),
                client.batch_execute("COMMIT"),
            )
            .await
            .map_err(pg_error)?;
        }
        tx.close();
        Ok(out)
    }
}

/// A pooled connection inside a transaction. [`OpenTx::close`] hands it back to the pool
/// once the transaction has ended (committed or rolled back). Dropped without that (an
/// error, the operation's timeout, a caller dropping the future), it takes the connection
/// out of the pool and closes it, so the server rolls the transaction back: a connection
/// never goes back to the pool inside a transaction.
pub(super) struct OpenTx(Option<Object>);

impl OpenTx {
    /// `client`, about to begin a transaction.
    pub(super) fn new(client: Object) -> Self {
        OpenTx(Some(client))
    }

    pub(super) fn client(&self) -> &Object {
        self.0
            .as_ref()
            .expect("an open transaction has its connection")
    }

    pub(super) fn close(mut self) {
        // Back to the pool.
        drop(self.0.take());
    }
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

/// What an operation changed, as the parameters of the write statement: the balance if it
/// changed, then per table the keys of the rows to delete and the columns of the rows to
/// insert or update.
#[derive(Default)]
pub(super) struct Changes<'a> {
    pub(super) balance_changed: bool,
    pub(super) balance: [i64; 5],
    pub(super) reservations_gone: Vec<&'a str>,
    pub(super) reservations: ReservationColumns<'a>,
    pub(super) allowances_gone: (Vec<&'a str>, Vec<i64>),
    pub(super) allowances: AllowanceColumns<'a>,
    pub(super) deposits_gone: Vec<&'a str>,
    pub(super) deposits: (Vec<&'a str>, Vec<i64>, Vec<i64>),
    pub(super) adjustments_gone: Vec<&'a str>,
    pub(super) adjustments: (Vec<&'a str>, Vec<&'static str>, Vec<i64>, Vec<i64>),
}

#[derive(Default)]
pub(super) struct ReservationColumns<'a> {
    pub(super) key: Vec<&'a str>,
    pub(super) state: Vec<&'static str>,
    pub(super) fingerprint: Vec<i64>,
    pub(super) credits: Vec<i64>,
    pub(super) allowance_units: Vec<serde_json::Value>,
    pub(super) charges: Vec<serde_json::Value>,
    pub(super) settlement: Vec<Option<serde_json::Value>>,
    pub(super) expires_at: Vec<i64>,
    pub(super) touched_at: Vec<i64>,
    pub(super) retain: Vec<bool>,
    pub(super) charge_on_expiry: Vec<bool>,
    pub(super) attempt: Vec<i64>,
}

#[derive(Default)]
pub(super) struct AllowanceColumns<'a> {
    pub(super) meter: Vec<&'a str>,
    pub(super) window_start: Vec<i64>,
    pub(super) used: Vec<i64>,
    pub(super) held: Vec<i64>,
    pub(super) resets_at: Vec<i64>,
}

impl<'a> Changes<'a> {
    pub(super) fn between(before: &'a Parts, after: &'a Parts) -> Result<Self, LedgerError> {
        let mut c = Changes::default();
        let b = &after.balance;
        if *b != before.balance {
            c.balance_changed = true;
            c.balance = [
                u64_to_sql(b.available.get())?,
                u64_to_sql(b.held.get())?,
                u64_to_sql(b.settled.get())?,
                u64_to_sql(b.deposited.get())?,
                u64_to_sql(b.overdrawn.get())?,
            ];
        }
        for key in before.reservations.keys() {
            if !after.reservations.contains_key(key) {
                c.reservations_gone.push(key);
            }
        }
        for (key, rec) in &after.reservations {
            if before.reservations.get(key) == Some(rec) {
                continue;
            }
            let r = &mut c.reservations;
            r.key.push(key);
            r.state.push(state_name(rec.state));
            r.fingerprint
                .push(i64::from_be_bytes(rec.fingerprint.to_be_bytes()));
            r.credits.push(u64_to_sql(rec.credits.get())?);
            r.allowance_units
                .push(serde_json::to_value(&rec.allowance_units).map_err(StoreError::corrupt)?);
            r.charges
                .push(serde_json::to_value(&rec.charges).map_err(StoreError::corrupt)?);
            r.settlement.push(
                rec.settlement
                    .as_ref()
                    .map(serde_json::to_value)
                    .transpose()
                    .map_err(StoreError::corrupt)?,
            );
            r.expires_at.push(ts_to_sql(rec.expires_at));
            r.touched_at.push(ts_to_sql(rec.touched_at));
            r.retain.push(rec.retain);
            r.charge_on_expiry.push(rec.charge_on_expiry);
            r.attempt
                .push(i64::from_be_bytes(rec.attempt.to_be_bytes()));
        }
        for (meter, start) in before.allowances.keys() {
            if !after.allowances.contains_key(&(meter.clone(), *start)) {
                c.allowances_gone.0.push(meter.as_str());
                c.allowances_gone.1.push(ts_to_sql(*start));
            }
        }
        for ((meter, start), counter) in &after.allowances {
            if before.allowances.get(&(meter.clone(), *start)) == Some(counter) {
                continue;
            }
            let a = &mut c.allowances;
            a.meter.push(meter.as_str());
            a.window_start.push(ts_to_sql(*start));
            a.used.push(u64_to_sql(counter.used)?);
            a.held.push(u64_to_sql(counter.held)?);
            a.resets_at.push(ts_to_sql(counter.resets_at));
        }
        for key in before.deposits.keys() {
            if !after.deposits.contains_key(key) {
                c.deposits_gone.push(key);
            }
        }
        for (key, (amount, at)) in &after.deposits {
            if before.deposits.get(key) == Some(&(*amount, *at)) {
                continue;
            }
            c.deposits.0.push(key);
            c.deposits.1.push(u64_to_sql(amount.get())?);
            c.deposits.2.push(ts_to_sql(*at));
        }
        for key in before.adjustments.keys() {
            if !after.adjustments.contains_key(key) {
                c.adjustments_gone.push(key);
            }
        }
        for (key, adj) in &after.adjustments {
            if before.adjustments.get(key) == Some(adj) {
                continue;
            }
            let (direction, amount, at) = adj;
            c.adjustments.0.push(key);
            c.adjustments.1.push(direction_name(*direction));
            c.adjustments.2.push(u64_to_sql(amount.get())?);
            c.adjustments.3.push(ts_to_sql(*at));
        }
        Ok(c)
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.balance_changed
            && self.reservations_gone.is_empty()
            && self.reservations.key.is_empty()
            && self.allowances_gone.0.is_empty()
            && self.allowances.meter.is_empty()
            && self.deposits_gone.is_empty()
            && self.deposits.0.is_empty()
            && self.adjustments_gone.is_empty()
            && self.adjustments.0.is_empty()
    }

    /// The parameters of [`LedgerSql::write`], in order.
    pub(super) fn params<'p>(&'p self, account: &'p &'p str) -> [&'p (dyn ToSql + Sync); 36] {
        let (b, r, a) = (&self.balance, &self.reservations, &self.allowances);
        [
            account,
            &b[0],
            &b[1],
            &b[2],
            &b[3],
            &self.balance_changed,
            &self.reservations_gone,
            &r.key,
            &r.state,
            &r.fingerprint,
            &r.credits,
            &r.allowance_units,
            &r.charges,
            &r.settlement,
            &r.expires_at,
            &r.touched_at,
            &self.allowances_gone.0,
            &self.allowances_gone.1,
            &a.meter,
            &a.window_start,
            &a.used,
            &a.held,
            &a.resets_at,
            &self.deposits_gone,
            &self.deposits.0,
            &self.deposits.1,
            &self.deposits.2,
            &r.retain,
            &self.adjustments_gone,
            &self.adjustments.0,
            &self.adjustments.1,
            &self.adjustments.2,
            &self.adjustments.3,
            &r.charge_on_expiry,
            &b[4],
            &r.attempt,
        ]
    }
}

/// Journal entries as the columns of [`LedgerSql::journal_write`].
#[derive(Default)]
pub(super) struct JournalColumns<'a> {
    at: Vec<i64>,
    kind: Vec<&'static str>,
    credits: Vec<i64>,
    direction: Vec<Option<&'static str>>,
    available_after: Vec<i64>,
    reference: Vec<Option<&'a str>>,
    reason: Vec<Option<&'a str>>,
}

impl<'a> JournalColumns<'a> {
    pub(super) fn of(entries: &'a [JournalEntry]) -> Result<Self, LedgerError> {
        let mut c = JournalColumns::default();
        for e in entries {
            c.at.push(ts_to_sql(e.at));
            c.kind.push(kind_name(e.kind));
            c.credits.push(u64_to_sql(e.credits.get())?);
            c.direction.push(e.direction.map(direction_name));
            c.available_after.push(u64_to_sql(e.available_after.get())?);
            c.reference.push(e.reference.as_deref());
            c.reason.push(e.reason.as_deref());
        }
        Ok(c)
    }

    pub(super) fn params<'p>(&'p self, account: &'p &'p str) -> [&'p (dyn ToSql + Sync); 8] {
        [
            account,
            &self.at,
            &self.kind,
            &self.credits,
            &self.direction,
            &self.available_after,
            &self.reference,
            &self.reason,
        ]
    }
}

pub(super) fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Credit => "credit",
        Direction::Debit => "debit",
    }
}

pub(super) fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Deposit => "deposit",
        EntryKind::Settle => "settle",
        EntryKind::Release => "release",
        EntryKind::Expiry => "expiry",
        EntryKind::Shortfall => "shortfall",
        EntryKind::Adjustment => "adjustment",
        // `EntryKind` is non-exhaustive only for other crates.
    }
}
