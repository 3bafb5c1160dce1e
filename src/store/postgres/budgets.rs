//! [`PostgresBudgetStore`]: budget counters in PostgreSQL, for
//! [`BudgetedLedger`](crate::budget::BudgetedLedger).

use std::collections::BTreeMap;

use super::transactions::OpenTx;
use super::*;
use crate::budget::{BudgetLine, BudgetStore, CounterUsage, HoldOutcome, BUDGET_RETENTION_SECS};

/// How many forgotten holds and counters a hold deletes on its way (they are already
/// invisible; this only keeps the tables small).
const CLEANUP: i64 = 8;

/// Budget counters in PostgreSQL, shared by every instance. Clones share the pool.
///
/// Each operation is **one transaction** that gives the same answers as
/// [`BudgetBook`](crate::budget::BudgetBook) (the property test in `tests/budgets.rs` checks
/// it on random sequences of calls):
///
/// - **Row locks in one order.** An operation first locks the row of its hold (`hold`
///   creates it with `INSERT … ON CONFLICT DO UPDATE`, which locks an existing row), then
///   the counter rows of its lines, sorted by (owner, meter, window), each created if
///   missing and locked the same way. Every operation takes its locks in that order and
///   waits for no other row, so two operations never deadlock, and two holds on one level
///   take turns: concurrent holds can never take a level past its budget. A hold with no
///   room rolls back: nothing is held on any line.
/// - **Held amounts are counted, not kept.** What a counter holds is the sum of the lines
///   of the holds on it that have not expired at the operation's `now`, read after its row
///   lock is granted. So a hold lapses at its expiry without anyone writing anything, a
///   lapsed hold is forgotten [`BUDGET_RETENTION_SECS`] after its expiry (a settlement
///   until then still counts what was charged), and a counter a retention time after its
///   window ended, with nothing held, counts as empty; each `hold` deletes a few such rows.
///   As on the ledger, pass non-decreasing times: the time an operation acts at is the `now`
///   it is given, never the server's clock.
/// - **Exact over all of `u64`.** Amounts and times are `numeric(20, 0)`; sums saturate at
///   `u64::MAX` exactly where the book's do.
///
/// # Tables
///
/// [`PostgresBudgetStore::migrate`] creates, in one transaction and only if missing, in the
/// configured schema and with the configured table prefix (default `tower402_`):
///
/// | table | one row per | columns |
/// |---|---|---|
/// | `budget_counters` | counter: a node's budget for one window | `owner`, `units` (false: credits), `meter` (`''` for credits), `window_start`, `resets_at`, `used` |
/// | `budget_holds` | hold not settled or released (open, or lapsed and remembered) | `account`, `key` (the ledger's reservation id), `expires_at` |
/// | `budget_hold_lines` | line of a hold (deleted with it) | `account`, `key`, `line`, the counter's columns, `amount`, `expires_at` |
///
/// No API key is ever written: only budget node ids and the ledger's reservation ids.
///
/// # Examples
///
/// ```no_run
/// use tower_402::budget::{Budget, BudgetNode, Budgets, BudgetedLedger};
/// use tower_402::plan::Period;
/// use tower_402::store::{PostgresBudgetStore, PostgresConfig, PostgresLedger};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = PostgresConfig::new("postgres://postgres@127.0.0.1:5432/app")?.schema("billing")?;
/// let pool = config.pool()?;
/// let ledger = PostgresLedger::new(pool.clone(), config.clone());
/// ledger.migrate().await?;
/// let store = PostgresBudgetStore::new(pool, config);
/// store.migrate().await?;
/// let budgets = Budgets::new()
///     .node(BudgetNode::new("acme", "organisation").budget(Budget::credits(10_000, Period::Year)))
///     .member("acct_research", "acme");
/// let ledger = BudgetedLedger::new(ledger, store, budgets)?;
/// // Hand `ledger` to `Billing::new`: every instance shares the counters.
/// # let _ = ledger;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresBudgetStore {
    pool: Pool,
    config: PostgresConfig,
    sql: Arc<BudgetSql>,
}

impl fmt::Debug for PostgresBudgetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBudgetStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct BudgetSql {
    create: String,
    begin: String,
    insert_hold: String,
    lock_hold: String,
    renew_hold: String,
    delete_hold: String,
    lock_counter: String,
    held: String,
    write_counter: String,
    lines: String,
    delete_lines: String,
    insert_line: String,
    usage: String,
    gone_holds: String,
    old_counters: String,
    gone_counter: String,
}

/// A u64 as a statement parameter: text, cast to `numeric` in the SQL.
fn n(v: u64) -> String {
    v.to_string()
}

fn u64_col(row: &Row, i: usize) -> Result<u64, StoreError> {
    row.get::<_, String>(i)
        .parse()
        .map_err(|_| corrupt("budget amount is not a u64"))
}

/// A sum of amounts, saturating at `u64::MAX` as the book's `held` does.
fn sum_col(row: &Row, i: usize) -> Result<u64, StoreError> {
    let s: String = row.get(i);
    match s.parse::<u64>() {
        Ok(v) => Ok(v),
        Err(_) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Ok(u64::MAX),
        Err(_) => Err(corrupt("budget sum is not a number")),
    }
}

/// A counter's primary key. The order of this type is the order counter rows are locked in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CounterKey {
    owner: String,
    meter: Option<Meter>,
    window_start: u64,
}

impl CounterKey {
    fn of(line: &BudgetLine) -> Self {
        CounterKey {
            owner: line.owner.clone(),
            meter: line.meter.clone(),
            window_start: line.window_start.unix(),
        }
    }

    fn units(&self) -> bool {
        self.meter.is_some()
    }

    fn meter(&self) -> &str {
        self.meter.as_ref().map_or("", |m| m.as_str())
    }
}

/// A locked counter as the book would see it now.
struct Locked {
    used: u64,
    held: u64,
    resets_at: u64,
    /// Forgotten by the book (or new): to be written with `used` from zero and the
    /// `resets_at` of its first line.
    fresh: bool,
}

fn forgotten(resets_at: u64, held: u64, now: Timestamp) -> bool {
    held == 0 && Timestamp::from_unix(resets_at).plus_secs(BUDGET_RETENTION_SECS) <= now
}

impl PostgresBudgetStore {
    /// A budget store on `pool`, in the schema and with the table prefix of `config`.
    pub fn new(pool: Pool, config: PostgresConfig) -> Self {
        let c = config.table("budget_counters");
        let h = config.table("budget_holds");
        let l = config.table("budget_hold_lines");
        let p = config.table_prefix_name();
        let u64_check = "BETWEEN 0 AND 18446744073709551615";
        let counter = "owner = $1 AND units = $2 AND meter = $3 \
                       AND window_start = CAST($4::text AS numeric)";
        let timeout_ms = config.op_timeout.as_millis().saturating_add(1000);
        let sql = BudgetSql {
            create: format!(
                r#"CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS {c} (
    owner        text           NOT NULL,
    units        boolean        NOT NULL,
    meter        text           NOT NULL,
    window_start numeric(20, 0) NOT NULL CHECK (window_start {u64_check}),
    resets_at    numeric(20, 0) NOT NULL CHECK (resets_at {u64_check}),
    used         numeric(20, 0) NOT NULL CHECK (used {u64_check}),
    PRIMARY KEY (owner, units, meter, window_start),
    CHECK (units OR meter = '')
);
CREATE INDEX IF NOT EXISTS "{p}budget_counters_resets" ON {c} (resets_at);
CREATE TABLE IF NOT EXISTS {h} (
    account    text           NOT NULL,
    key        text           NOT NULL,
    expires_at numeric(20, 0) NOT NULL CHECK (expires_at {u64_check}),
    PRIMARY KEY (account, key)
);
CREATE INDEX IF NOT EXISTS "{p}budget_holds_expiry" ON {h} (expires_at);
CREATE TABLE IF NOT EXISTS {l} (
    account      text           NOT NULL,
    key          text           NOT NULL,
    line         integer        NOT NULL,
    owner        text           NOT NULL,
    units        boolean        NOT NULL,
    meter        text           NOT NULL,
    window_start numeric(20, 0) NOT NULL,
    resets_at    numeric(20, 0) NOT NULL,
    amount       numeric(20, 0) NOT NULL CHECK (amount {u64_check}),
    expires_at   numeric(20, 0) NOT NULL,
    PRIMARY KEY (account, key, line),
    FOREIGN KEY (account, key) REFERENCES {h} (account, key) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS "{p}budget_hold_lines_counter"
    ON {l} (owner, units, meter, window_start, expires_at);"#,
                schema = config.schema_name()
            ),
            begin: format!(
                "BEGIN; SET LOCAL lock_timeout = {timeout_ms}; \
                 SET LOCAL statement_timeout = {timeout_ms}"
            ),
            // The no-op update locks an existing row and returns it unchanged; `xmax = 0`
            // tells a row just inserted.
            insert_hold: format!(
                "INSERT INTO {h} AS h (account, key, expires_at) \
                 VALUES ($1, $2, CAST($3::text AS numeric)) \
                 ON CONFLICT (account, key) DO UPDATE SET key = h.key \
                 RETURNING expires_at::text, xmax::text = '0'"
            ),
            lock_hold: format!(
                "SELECT expires_at::text FROM {h} WHERE account = $1 AND key = $2 FOR UPDATE"
            ),
            renew_hold: format!(
                "UPDATE {h} SET expires_at = CAST($3::text AS numeric) \
                 WHERE account = $1 AND key = $2"
            ),
            delete_hold: format!("DELETE FROM {h} WHERE account = $1 AND key = $2"),
            lock_counter: format!(
                "INSERT INTO {c} AS c (owner, units, meter, window_start, resets_at, used) \
                 VALUES ($1, $2, $3, CAST($4::text AS numeric), CAST($5::text AS numeric), 0) \
                 ON CONFLICT (owner, units, meter, window_start) DO UPDATE SET owner = c.owner \
                 RETURNING used::text, resets_at::text, xmax::text = '0'"
            ),
            // Run after the counter's lock is granted: under read committed its snapshot
            // holds every line committed by the lock's previous holders.
            held: format!(
                "SELECT COALESCE(SUM(amount), 0)::text FROM {l} \
                 WHERE {counter} AND expires_at > CAST($5::text AS numeric)"
            ),
            write_counter: format!(
                "UPDATE {c} SET used = CAST($5::text AS numeric), \
                 resets_at = CAST($6::text AS numeric) WHERE {counter}"
            ),
            lines: format!(
                "SELECT owner, units, meter, window_start::text, resets_at::text, amount::text \
                 FROM {l} WHERE account = $1 AND key = $2 ORDER BY line"
            ),
            delete_lines: format!("DELETE FROM {l} WHERE account = $1 AND key = $2"),
            insert_line: format!(
                "INSERT INTO {l} (account, key, line, owner, units, meter, window_start, \
                 resets_at, amount, expires_at) VALUES ($1, $2, $3, $4, $5, $6, \
                 CAST($7::text AS numeric), CAST($8::text AS numeric), \
                 CAST($9::text AS numeric), CAST($10::text AS numeric))"
            ),
            // One statement, one snapshot.
            usage: format!(
                "SELECT c.used::text, c.resets_at::text, \
                 (SELECT COALESCE(SUM(l.amount), 0)::text FROM {l} l \
                  WHERE l.owner = c.owner AND l.units = c.units AND l.meter = c.meter \
                    AND l.window_start = c.window_start \
                    AND l.expires_at > CAST($5::text AS numeric)) \
                 FROM {c} c WHERE c.owner = $1 AND c.units = $2 AND c.meter = $3 \
                   AND c.window_start = CAST($4::text AS numeric)"
            ),
            // Rows locked by others are skipped, never waited for.
            gone_holds: format!(
                "DELETE FROM {h} WHERE (account, key) IN (SELECT account, key FROM {h} \
                 WHERE expires_at <= CAST($1::text AS numeric) ORDER BY expires_at \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
            old_counters: format!(
                "SELECT owner, units, meter, window_start::text FROM {c} \
                 WHERE resets_at <= CAST($1::text AS numeric) ORDER BY resets_at \
                 LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            // Under the row lock, in a snapshot of its own: no line holding on it is missed.
            gone_counter: format!(
                "DELETE FROM {c} c WHERE {counter} AND NOT EXISTS (SELECT 1 FROM {l} l \
                 WHERE l.owner = c.owner AND l.units = c.units AND l.meter = c.meter \
                   AND l.window_start = c.window_start AND l.amount > 0 \
                   AND l.expires_at > CAST($5::text AS numeric))"
            ),
        };
        PostgresBudgetStore {
            pool,
            config,
            sql: Arc::new(sql),
        }
    }

    /// Creates the schema and the three tables if missing (idempotent, transactional). It is
    /// separate from the ledger's migration: a deployment without budgets never gets them.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        timed(self.config.op_timeout, async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg_error)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tower402-migrate'))",
                &[],
            )
            .await
            .map_err(pg_error)?;
            tx.batch_execute(&self.sql.create).await.map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)
        })
        .await
    }

    async fn begin(&self) -> Result<OpenTx, StoreError> {
        let tx = OpenTx::new(self.pool.get().await.map_err(pool_error)?);
        tx.client()
            .batch_execute(&self.sql.begin)
            .await
            .map_err(pg_error)?;
        Ok(tx)
    }

    async fn query(
        tx: &OpenTx,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = tx.client();
        let st = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&st, params).await.map_err(pg_error)
    }

    async fn execute(
        tx: &OpenTx,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let client = tx.client();
        let st = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.execute(&st, params).await.map_err(pg_error)
    }

    async fn end(tx: OpenTx, commit: bool) -> Result<(), StoreError> {
        tx.client()
            .batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
            .await
            .map_err(pg_error)?;
        tx.close();
        Ok(())
    }

    /// Locks (creating if missing) each counter of `wanted` (key → the `resets_at` a new one
    /// gets), in key order, and reads it as the book would see it at `now`.
    async fn lock_counters(
        &self,
        tx: &OpenTx,
        wanted: &BTreeMap<CounterKey, u64>,
        now: Timestamp,
    ) -> Result<BTreeMap<CounterKey, Locked>, StoreError> {
        let mut out = BTreeMap::new();
        let at = n(now.unix());
        for (k, resets_at) in wanted {
            let (units, meter, ws) = (k.units(), k.meter(), n(k.window_start));
            let row = Self::query(
                tx,
                &self.sql.lock_counter,
                &[&k.owner, &units, &meter, &ws, &n(*resets_at)],
            )
            .await?;
            let row = row.first().ok_or_else(|| corrupt("no counter row"))?;
            let (used, stored_resets, inserted): (u64, u64, bool) =
                (u64_col(row, 0)?, u64_col(row, 1)?, row.get(2));
            let held =
                Self::query(tx, &self.sql.held, &[&k.owner, &units, &meter, &ws, &at]).await?;
            let held = sum_col(held.first().ok_or_else(|| corrupt("no sum"))?, 0)?;
            let fresh = inserted || forgotten(stored_resets, held, now);
            out.insert(
                k.clone(),
                Locked {
                    used: if fresh { 0 } else { used },
                    held,
                    resets_at: if fresh { *resets_at } else { stored_resets },
                    fresh,
                },
            );
        }
        Ok(out)
    }

    /// Deletes a few holds and counters the book has forgotten at `now`.
    async fn cleanup(&self, tx: &OpenTx, now: Timestamp) -> Result<(), StoreError> {
        let Some(before) = now.unix().checked_sub(BUDGET_RETENTION_SECS) else {
            return Ok(());
        };
        let before = n(before);
        Self::execute(tx, &self.sql.gone_holds, &[&before, &CLEANUP]).await?;
        let old = Self::query(tx, &self.sql.old_counters, &[&before, &CLEANUP]).await?;
        let at = n(now.unix());
        for row in old {
            let (owner, units, meter, ws): (String, bool, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            Self::execute(
                tx,
                &self.sql.gone_counter,
                &[&owner, &units, &meter, &ws, &at],
            )
            .await?;
        }
        Ok(())
    }

    async fn hold_tx(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<HoldOutcome, StoreError> {
        let (acct, rkey) = (key.account.as_str(), key.key.as_str());
        let ex = n(expires_at.unix());
        let tx = self.begin().await?;
        let row = Self::query(&tx, &self.sql.insert_hold, &[&acct, &rkey, &ex]).await?;
        let row = row.first().ok_or_else(|| corrupt("no hold row"))?;
        let (old_expiry, inserted): (u64, bool) = (u64_col(row, 0)?, row.get(1));
        if !inserted && Timestamp::from_unix(old_expiry) > now {
            Self::end(tx, false).await?;
            return Ok(HoldOutcome::AlreadyHeld);
        }
        let mut wanted = BTreeMap::new();
        for l in lines {
            wanted
                .entry(CounterKey::of(l))
                .or_insert(l.resets_at.unix());
        }
        let counters = self.lock_counters(&tx, &wanted, now).await?;
        for (i, l) in lines.iter().enumerate() {
            let c = &counters[&CounterKey::of(l)];
            let taken = c.used.saturating_add(c.held);
            let fits = taken.checked_add(l.amount).is_some_and(|t| t <= l.limit);
            if !fits {
                // Nothing held on any line (and no row created).
                Self::end(tx, false).await?;
                return Ok(HoldOutcome::NoRoom {
                    line: i,
                    used: taken,
                });
            }
        }
        for (k, c) in &counters {
            if c.fresh {
                self.write_counter(&tx, k, c.used, c.resets_at).await?;
            }
        }
        if !inserted {
            // A lapsed hold under this key is replaced by the new one.
            Self::execute(&tx, &self.sql.delete_lines, &[&acct, &rkey]).await?;
            Self::execute(&tx, &self.sql.renew_hold, &[&acct, &rkey, &ex]).await?;
        }
        for (i, l) in lines.iter().enumerate() {
            let k = CounterKey::of(l);
            let line = i32::try_from(i).map_err(|_| corrupt("too many budget lines"))?;
            Self::execute(
                &tx,
                &self.sql.insert_line,
                &[
                    &acct,
                    &rkey,
                    &line,
                    &k.owner,
                    &k.units(),
                    &k.meter(),
                    &n(k.window_start),
                    &n(l.resets_at.unix()),
                    &n(l.amount),
                    &ex,
                ],
            )
            .await?;
        }
        self.cleanup(&tx, now).await?;
        Self::end(tx, true).await?;
        Ok(HoldOutcome::Held)
    }

    async fn write_counter(
        &self,
        tx: &OpenTx,
        k: &CounterKey,
        used: u64,
        resets_at: u64,
    ) -> Result<(), StoreError> {
        Self::execute(
            tx,
            &self.sql.write_counter,
            &[
                &k.owner,
                &k.units(),
                &k.meter(),
                &n(k.window_start),
                &n(used),
                &n(resets_at),
            ],
        )
        .await
        .map(drop)
    }

    /// Locks the hold under `key`: its expiry, or `None` if the book has no record of it
    /// (a forgotten one is deleted on the way).
    async fn lock_hold(
        &self,
        tx: &OpenTx,
        key: &ReservationId,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, StoreError> {
        let (acct, rkey) = (key.account.as_str(), key.key.as_str());
        let rows = Self::query(tx, &self.sql.lock_hold, &[&acct, &rkey]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let expires_at = Timestamp::from_unix(u64_col(row, 0)?);
        if expires_at.plus_secs(BUDGET_RETENTION_SECS) <= now {
            Self::execute(tx, &self.sql.delete_hold, &[&acct, &rkey]).await?;
            return Ok(None);
        }
        Ok(Some(expires_at))
    }

    async fn settle_tx(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let (acct, rkey) = (key.account.as_str(), key.key.as_str());
        let tx = self.begin().await?;
        if self.lock_hold(&tx, key, now).await?.is_none() {
            Self::end(tx, true).await?;
            return Ok(false);
        }
        let mut lines = Vec::new();
        for row in Self::query(&tx, &self.sql.lines, &[&acct, &rkey]).await? {
            let units: bool = row.get(1);
            lines.push(BudgetLine {
                owner: row.get(0),
                meter: units.then(|| Meter::new(row.get::<_, String>(2))),
                window_start: Timestamp::from_unix(u64_col(&row, 3)?),
                resets_at: Timestamp::from_unix(u64_col(&row, 4)?),
                limit: 0,
                amount: u64_col(&row, 5)?,
            });
        }
        let mut wanted = BTreeMap::new();
        for l in &lines {
            wanted
                .entry(CounterKey::of(l))
                .or_insert(l.resets_at.unix());
        }
        let mut counters = self.lock_counters(&tx, &wanted, now).await?;
        Self::execute(&tx, &self.sql.delete_hold, &[&acct, &rkey]).await?;
        for l in &lines {
            if let Some(c) = counters.get_mut(&CounterKey::of(l)) {
                // Charged work counts in full, even past the budget.
                c.used = c.used.saturating_add(l.used_by(charged, usage));
            }
        }
        for (k, c) in &counters {
            self.write_counter(&tx, k, c.used, c.resets_at).await?;
        }
        Self::end(tx, true).await?;
        Ok(true)
    }

    async fn release_tx(&self, key: &ReservationId, now: Timestamp) -> Result<bool, StoreError> {
        let (acct, rkey) = (key.account.as_str(), key.key.as_str());
        let tx = self.begin().await?;
        match self.lock_hold(&tx, key, now).await? {
            Some(expires_at) if expires_at > now => {
                Self::execute(&tx, &self.sql.delete_hold, &[&acct, &rkey]).await?;
                Self::end(tx, true).await?;
                Ok(true)
            }
            // Lapsed (kept for a late settlement), or none.
            _ => {
                Self::end(tx, true).await?;
                Ok(false)
            }
        }
    }
}

#[async_trait]
impl BudgetStore for PostgresBudgetStore {
    async fn hold(
        &self,
        key: &ReservationId,
        lines: &[BudgetLine],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<HoldOutcome, StoreError> {
        timed(
            self.config.op_timeout,
            self.hold_tx(key, lines, expires_at, now),
        )
        .await
    }

    async fn settle(
        &self,
        key: &ReservationId,
        charged: u64,
        usage: &[Usage],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        timed(
            self.config.op_timeout,
            self.settle_tx(key, charged, usage, now),
        )
        .await
    }

    async fn release(&self, key: &ReservationId, now: Timestamp) -> Result<bool, StoreError> {
        timed(self.config.op_timeout, self.release_tx(key, now)).await
    }

    async fn usage(
        &self,
        owner: &str,
        meter: Option<&Meter>,
        window_start: Timestamp,
        now: Timestamp,
    ) -> Result<CounterUsage, StoreError> {
        timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let st = client
                .prepare_cached(&self.sql.usage)
                .await
                .map_err(pg_error)?;
            let units = meter.is_some();
            let meter = meter.map_or("", |m| m.as_str());
            let row = client
                .query_opt(
                    &st,
                    &[
                        &owner,
                        &units,
                        &meter,
                        &n(window_start.unix()),
                        &n(now.unix()),
                    ],
                )
                .await
                .map_err(pg_error)?;
            let Some(row) = row else {
                return Ok(CounterUsage::default());
            };
            let (used, resets_at, held) = (u64_col(&row, 0)?, u64_col(&row, 1)?, sum_col(&row, 2)?);
            if forgotten(resets_at, held, now) {
                return Ok(CounterUsage::default());
            }
            Ok(CounterUsage { used, held })
        })
        .await
    }
}
