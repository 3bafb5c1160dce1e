//! The tables, their migration, and the statements run on them.

use super::*;

impl PostgresConfig {
    pub(super) fn migration(&self) -> String {
        let p = &self.prefix;
        let bal = self.table("balances");
        let res = self.table("reservations");
        let allow = self.table("allowances");
        let dep = self.table("deposits");
        let subs = self.table("subscriptions");
        let adj = self.table("adjustments");
        let jrn = self.table("journal");
        format!(
            r#"
CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS {bal} (
    account   text PRIMARY KEY,
    available bigint NOT NULL DEFAULT 0 CHECK (available >= 0),
    held      bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    settled   bigint NOT NULL DEFAULT 0 CHECK (settled >= 0),
    deposited bigint NOT NULL DEFAULT 0 CHECK (deposited >= 0),
    overdrawn bigint NOT NULL DEFAULT 0 CHECK (overdrawn >= 0),
    CONSTRAINT "{p}balances_conserved" CHECK (deposited + overdrawn = available + held + settled)
);
-- Tables from before the overdraft: add the column, and swap the conservation check for the
-- one that counts it. Altered only when missing, as below.
DO $$
DECLARE old_check text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}balances'
                   AND column_name = 'overdrawn') THEN
    ALTER TABLE {bal} ADD COLUMN overdrawn bigint NOT NULL DEFAULT 0 CHECK (overdrawn >= 0);
    FOR old_check IN
      SELECT conname FROM pg_constraint
       WHERE conrelid = '{bal}'::regclass AND contype = 'c'
         AND pg_get_constraintdef(oid) LIKE '%deposited = ((available + held) + settled)%'
    LOOP
      EXECUTE format('ALTER TABLE {bal} DROP CONSTRAINT %I', old_check);
    END LOOP;
    ALTER TABLE {bal} ADD CONSTRAINT "{p}balances_conserved"
      CHECK (deposited + overdrawn = available + held + settled);
  END IF;
END $$;
CREATE TABLE IF NOT EXISTS {res} (
    account         text   NOT NULL,
    key             text   NOT NULL,
    state           text   NOT NULL CHECK (state IN ('open', 'settled', 'released', 'expired')),
    fingerprint     bigint NOT NULL,
    credits         bigint NOT NULL CHECK (credits >= 0),
    allowance_units jsonb  NOT NULL,
    charges         jsonb  NOT NULL,
    settlement      jsonb,
    expires_at      bigint NOT NULL,
    touched_at      bigint NOT NULL,
    PRIMARY KEY (account, key)
);
-- Whether a finished reservation is kept for the retention time (made under an idempotency
-- key) or deleted when settled or released (a key unique to one request). Rows from before
-- the column existed are kept, as they always were. Altered only when missing: ALTER TABLE
-- locks the table even when it has nothing to do.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}reservations'
                   AND column_name = 'retain') THEN
    ALTER TABLE {res} ADD COLUMN retain boolean NOT NULL DEFAULT true;
  END IF;
END $$;
-- Whether an open reservation's hold is charged when it expires (`OnExpiry::Charge`: the work
-- ran on its reply) or given back. Rows from before the column existed are given back, as
-- they always were.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}reservations'
                   AND column_name = 'charge_on_expiry') THEN
    ALTER TABLE {res} ADD COLUMN charge_on_expiry boolean NOT NULL DEFAULT false;
  END IF;
END $$;
-- The attempt that made an open reservation (`ReserveRequest::attempt`): a retry of it after
-- a lost reply gets the reservation back. 0 (none) for rows from before the column.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}reservations'
                   AND column_name = 'attempt') THEN
    ALTER TABLE {res} ADD COLUMN attempt bigint NOT NULL DEFAULT 0;
  END IF;
END $$;
CREATE INDEX IF NOT EXISTS "{p}reservations_due" ON {res} (expires_at) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS "{p}reservations_done" ON {res} (touched_at) WHERE state <> 'open';
CREATE TABLE IF NOT EXISTS {allow} (
    account      text   NOT NULL,
    meter        text   NOT NULL,
    window_start bigint NOT NULL,
    used         bigint NOT NULL CHECK (used >= 0),
    held         bigint NOT NULL CHECK (held >= 0),
    resets_at    bigint NOT NULL,
    PRIMARY KEY (account, meter, window_start)
);
CREATE TABLE IF NOT EXISTS {dep} (
    account text   NOT NULL,
    key     text   NOT NULL,
    amount  bigint NOT NULL CHECK (amount > 0),
    at      bigint NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX IF NOT EXISTS "{p}deposits_at" ON {dep} (at);
-- Adjustment keys, for idempotency, kept for the retention time like deposit keys.
CREATE TABLE IF NOT EXISTS {adj} (
    account   text   NOT NULL,
    key       text   NOT NULL,
    direction text   NOT NULL CHECK (direction IN ('credit', 'debit')),
    amount    bigint NOT NULL CHECK (amount > 0),
    at        bigint NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX IF NOT EXISTS "{p}adjustments_at" ON {adj} (at);
-- The spend history: one row per ledger entry that moved credit.
CREATE TABLE IF NOT EXISTS {jrn} (
    seq             bigserial PRIMARY KEY,
    account         text   NOT NULL,
    at              bigint NOT NULL,
    kind            text   NOT NULL CHECK (kind IN ('deposit', 'settle', 'release', 'expiry',
                                                    'shortfall', 'adjustment')),
    credits         bigint NOT NULL CHECK (credits > 0),
    direction       text   CHECK (direction IN ('credit', 'debit')),
    available_after bigint NOT NULL CHECK (available_after >= 0),
    reference       text,
    reason          text
);
CREATE INDEX IF NOT EXISTS "{p}journal_account" ON {jrn} (account, seq);
CREATE INDEX IF NOT EXISTS "{p}journal_at" ON {jrn} (at);
CREATE TABLE IF NOT EXISTS {subs} (
    account              text PRIMARY KEY,
    plan                 text NOT NULL,
    status               text NOT NULL,
    current_period_start bigint,
    current_period_end   bigint,
    trial_end            bigint,
    canceled_at          bigint,
    ended_at             bigint,
    past_due_since       bigint,
    grace_until          bigint,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
-- The payment-processor event a subscription was last written from (webhooks compare it to
-- apply events once and in order). Altered only when missing, as above.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{p}subscriptions'
                   AND column_name = 'synced') THEN
    ALTER TABLE {subs} ADD COLUMN synced jsonb;
  END IF;
END $$;
"#,
            schema = self.schema,
        )
    }
}

/// Creates the schema and tables if missing, in one transaction, serialized with other
/// instances migrating at the same time by an advisory lock.
pub(super) async fn migrate(pool: &Pool, config: &PostgresConfig) -> Result<(), StoreError> {
    let sql = config.migration();
    timed(config.op_timeout, async {
        let mut client = pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tower402-migrate'))",
            &[],
        )
        .await
        .map_err(pg_error)?;
        tx.batch_execute(&sql).await.map_err(pg_error)?;
        tx.batch_execute(&records::migration(config))
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    })
    .await
}

/// The statements of the ledger's operations, built once from the configured table names.
/// Each connection prepares them once (deadpool's statement cache), so running one costs a
/// single round trip instead of a Parse/Describe round trip plus an execute round trip.
pub(super) struct LedgerSql {
    /// `BEGIN`, with the operation's timeout as the transaction's lock and statement
    /// timeouts: an operation that gave up (and closed its connection) must not leave a server
    /// process waiting on the row lock, which it would otherwise do until it got it.
    pub(super) begin: String,
    pub(super) lock: String,
    pub(super) load: String,
    pub(super) peek: String,
    pub(super) write: String,
    /// Appends the journal entries of a transaction's operations.
    pub(super) journal_write: String,
    /// Keeps the newest `max_entries` of an account's journal.
    pub(super) journal_trim: String,
    /// An account's entries, newest first, in a time range and the retention time.
    pub(super) journal_read: String,
}

impl LedgerSql {
    pub(super) fn new(config: &PostgresConfig) -> Self {
        let bal = config.table("balances");
        let res = config.table("reservations");
        let allow = config.table("allowances");
        let dep = config.table("deposits");
        let adj = config.table("adjustments");
        let jrn = config.table("journal");
        // Everything the operations of a transaction read besides the balance, as one row
        // per record, tagged by its kind (see `add_rows`): the reservations under their keys
        // and the due open ones ('r'); the allowance counters of the windows the requests
        // name and of the charges of those reservations ('a'); the deposits under their keys
        // ('d'). Sent right behind `lock` on the same connection, so it runs once the
        // lock is held, with a snapshot taken then.
        let load = format!(
            "WITH r AS ( \
                 SELECT key, state, fingerprint, credits, expires_at, touched_at, \
                        allowance_units, charges, settlement, retain, charge_on_expiry, \
                        attempt \
                   FROM {res} \
                  WHERE account = $1 \
                    AND ((state = 'open' AND expires_at <= $2) OR key = ANY($3::text[])) \
             ), w (meter, window_start) AS ( \
                 SELECT * FROM unnest($4::text[], $5::bigint[]) \
                 UNION \
                 SELECT c ->> 'meter', (c -> 'allowance' ->> 'start')::bigint \
                   FROM r, jsonb_array_elements(r.charges) AS c \
                  WHERE jsonb_typeof(c -> 'allowance') = 'object' \
             ) \
             SELECT 'r', key, state, fingerprint, credits, expires_at, touched_at, \
                    allowance_units, charges, settlement, retain, charge_on_expiry, attempt \
               FROM r \
             UNION ALL \
             SELECT 'a', a.meter, NULL, a.window_start, a.used, a.held, a.resets_at, \
                    NULL, NULL, NULL, NULL, NULL, NULL \
               FROM {allow} a JOIN w ON a.meter = w.meter AND a.window_start = w.window_start \
              WHERE a.account = $1 \
             UNION ALL \
             SELECT 'd', key, NULL, amount, at, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                    NULL \
               FROM {dep} WHERE account = $1 AND key = ANY($6::text[]) \
             UNION ALL \
             SELECT 'x', key, direction, amount, at, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                    NULL \
               FROM {adj} WHERE account = $1 AND key = ANY($7::text[])"
        );
        // The same plus the balance row ('b'), for a read on one snapshot without the lock.
        let peek = format!(
            "{load} UNION ALL \
             SELECT 'b', overdrawn::text, NULL, available, held, settled, deposited, NULL, NULL, \
                    NULL, NULL, NULL, NULL \
               FROM {bal} WHERE account = $1"
        );
        // A little longer than the client's own timer, which normally fires first: this is
        // the backstop for a server process the client has stopped waiting for.
        let timeout_ms = config.op_timeout.as_millis().saturating_add(1000);
        LedgerSql {
            begin: format!(
                "BEGIN; SET LOCAL lock_timeout = {timeout_ms}; \
                 SET LOCAL statement_timeout = {timeout_ms}"
            ),
            load,
            peek,
            lock: format!(
                "INSERT INTO {bal} (account) VALUES ($1) \
                 ON CONFLICT (account) DO UPDATE SET account = EXCLUDED.account \
                 RETURNING available, held, settled, deposited, overdrawn"
            ),
            // Every write of an operation in one statement, each table's rows passed as
            // column arrays (empty when nothing changed there). Rows deleted and rows
            // upserted are disjoint, so no row is touched twice. A deposit key forgotten after
            // the retention time may still have its old row (the sweep deletes it later): the
            // upsert replaces it. The account's row lock makes all of this exclusive.
            write: format!(
                "WITH balance AS ( \
                     UPDATE {bal} SET available = $2, held = $3, settled = $4, deposited = $5, \
                            overdrawn = $35 \
                      WHERE account = $1 AND $6::boolean \
                 ), reservations_gone AS ( \
                     DELETE FROM {res} WHERE account = $1 AND key = ANY($7::text[]) \
                 ), reservations AS ( \
                     INSERT INTO {res} (account, key, state, fingerprint, credits, \
                         allowance_units, charges, settlement, expires_at, touched_at, retain, \
                         charge_on_expiry, attempt) \
                     SELECT $1::text, * FROM unnest($8::text[], $9::text[], $10::bigint[], \
                         $11::bigint[], $12::jsonb[], $13::jsonb[], $14::jsonb[], \
                         $15::bigint[], $16::bigint[], $28::boolean[], $34::boolean[], \
                         $36::bigint[]) \
                     ON CONFLICT (account, key) DO UPDATE SET state = EXCLUDED.state, \
                         fingerprint = EXCLUDED.fingerprint, credits = EXCLUDED.credits, \
                         allowance_units = EXCLUDED.allowance_units, \
                         charges = EXCLUDED.charges, settlement = EXCLUDED.settlement, \
                         expires_at = EXCLUDED.expires_at, touched_at = EXCLUDED.touched_at, \
                         retain = EXCLUDED.retain, \
                         charge_on_expiry = EXCLUDED.charge_on_expiry, \
                         attempt = EXCLUDED.attempt \
                 ), allowances_gone AS ( \
                     DELETE FROM {allow} WHERE account = $1 AND (meter, window_start) IN \
                         (SELECT * FROM unnest($17::text[], $18::bigint[])) \
                 ), allowances AS ( \
                     INSERT INTO {allow} (account, meter, window_start, used, held, resets_at) \
                     SELECT $1::text, * FROM unnest($19::text[], $20::bigint[], \
                         $21::bigint[], $22::bigint[], $23::bigint[]) \
                     ON CONFLICT (account, meter, window_start) DO UPDATE \
                         SET used = EXCLUDED.used, held = EXCLUDED.held, \
                         resets_at = EXCLUDED.resets_at \
                 ), deposits_gone AS ( \
                     DELETE FROM {dep} WHERE account = $1 AND key = ANY($24::text[]) \
                 ), deposits AS ( \
                     INSERT INTO {dep} (account, key, amount, at) \
                     SELECT $1::text, * FROM unnest($25::text[], $26::bigint[], $27::bigint[]) \
                     ON CONFLICT (account, key) DO UPDATE \
                         SET amount = EXCLUDED.amount, at = EXCLUDED.at \
                 ), adjustments_gone AS ( \
                     DELETE FROM {adj} WHERE account = $1 AND key = ANY($29::text[]) \
                 ), adjustments AS ( \
                     INSERT INTO {adj} (account, key, direction, amount, at) \
                     SELECT $1::text, * FROM unnest($30::text[], $31::text[], $32::bigint[], \
                         $33::bigint[]) \
                     ON CONFLICT (account, key) DO UPDATE SET direction = EXCLUDED.direction, \
                         amount = EXCLUDED.amount, at = EXCLUDED.at \
                 ) SELECT 1"
            ),
            journal_write: format!(
                "INSERT INTO {jrn} (account, at, kind, credits, direction, available_after, \
                     reference, reason) \
                 SELECT $1::text, at, kind, credits, direction, available_after, reference, \
                        reason \
                   FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[], \
                        $6::bigint[], $7::text[], $8::text[]) WITH ORDINALITY \
                        AS e (at, kind, credits, direction, available_after, reference, \
                              reason, n) \
                  ORDER BY n"
            ),
            journal_trim: format!(
                "DELETE FROM {jrn} WHERE account = $1 AND seq <= ( \
                     SELECT seq FROM {jrn} WHERE account = $1 \
                      ORDER BY seq DESC OFFSET $2 LIMIT 1)"
            ),
            journal_read: format!(
                "SELECT seq, at, kind, credits, direction, available_after, reference, reason \
                   FROM {jrn} \
                  WHERE account = $1 AND at > $2 AND at >= $3 AND at < $4 \
                  ORDER BY seq DESC LIMIT $5"
            ),
        }
    }
}

/// The plan store's statements, built once from the configured table name (prepared once per
/// connection, like [`LedgerSql`]).
pub(super) struct PlanSql {
    pub(super) get: String,
    pub(super) put: String,
    /// `put` only where no subscription, or one without a mark, is stored.
    pub(super) put_if_unmarked: String,
    /// An update only where the stored mark equals `$11`.
    pub(super) put_if_marked: String,
}

impl PlanSql {
    pub(super) fn new(config: &PostgresConfig) -> Self {
        let subs = config.table("subscriptions");
        let upsert = format!(
            "INSERT INTO {subs} (account, plan, status, current_period_start, \
             current_period_end, trial_end, canceled_at, ended_at, past_due_since, \
             grace_until, synced) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (account) DO UPDATE SET plan = $2, status = $3, \
             current_period_start = $4, current_period_end = $5, trial_end = $6, \
             canceled_at = $7, ended_at = $8, past_due_since = $9, \
             grace_until = $10, synced = $11, updated_at = now()"
        );
        PlanSql {
            get: format!(
                "SELECT plan, status, current_period_start, current_period_end, \
                 trial_end, canceled_at, ended_at, past_due_since, grace_until, synced \
                 FROM {subs} WHERE account = $1"
            ),
            put_if_unmarked: format!("{upsert} WHERE {subs}.synced IS NULL"),
            put: upsert,
            put_if_marked: format!(
                "UPDATE {subs} SET plan = $2, status = $3, current_period_start = $4, \
                 current_period_end = $5, trial_end = $6, canceled_at = $7, ended_at = $8, \
                 past_due_since = $9, grace_until = $10, synced = $11, updated_at = now() \
                 WHERE account = $1 AND synced = $12::jsonb"
            ),
        }
    }
}
