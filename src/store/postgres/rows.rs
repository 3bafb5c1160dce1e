//! Conversions between rows and the ledger's types.

use super::*;

// Amounts are at most `Credits::MAX_EXACT` and timestamps fit easily; anything beyond `i64`
// is clamped for timestamps (a hold that never expires) and refused for amounts.
pub(super) fn ts_to_sql(t: Timestamp) -> i64 {
    i64::try_from(t.unix()).unwrap_or(i64::MAX)
}

pub(super) fn u64_to_sql(v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::AmountOutOfRange)
}

pub(super) fn from_sql(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt("negative value in a ledger table"))
}

pub(super) fn state_name(s: State) -> &'static str {
    match s {
        State::Open => "open",
        State::Settled => "settled",
        State::Released => "released",
        State::Expired => "expired",
    }
}

pub(super) fn state_from(s: &str) -> Result<State, StoreError> {
    Ok(match s {
        "open" => State::Open,
        "settled" => State::Settled,
        "released" => State::Released,
        "expired" => State::Expired,
        _ => return Err(corrupt("unknown reservation state")),
    })
}

/// The balance in columns `first..first + 4` (available, held, settled, deposited), and
/// `overdrawn` as `overdrawn`.
pub(super) fn balance_from_row(
    row: &Row,
    first: usize,
    overdrawn: i64,
) -> Result<Balance, StoreError> {
    Ok(Balance {
        available: Credits::new(from_sql(row.get(first))?),
        held: Credits::new(from_sql(row.get(first + 1))?),
        settled: Credits::new(from_sql(row.get(first + 2))?),
        deposited: Credits::new(from_sql(row.get(first + 3))?),
        overdrawn: Credits::new(from_sql(overdrawn)?),
    })
}

/// Adds the rows of [`LedgerSql::load`] to `parts`. Columns: the kind, a key, a state, four
/// integers, three JSON values; which of them a kind uses is in the statement.
pub(super) fn add_rows(parts: &mut Parts, rows: &[Row]) -> Result<(), StoreError> {
    for row in rows {
        let kind: &str = row.get(0);
        let key: String = row.get(1);
        match kind {
            "r" => {
                let rec = record_from_row(row)?;
                parts.reservations.insert(key.into(), rec);
            }
            "a" => {
                parts.allowances.insert(
                    (Meter::new(key), Timestamp::from_unix(from_sql(row.get(3))?)),
                    Counter {
                        used: from_sql(row.get(4))?,
                        held: from_sql(row.get(5))?,
                        resets_at: Timestamp::from_unix(from_sql(row.get(6))?),
                    },
                );
            }
            // `overdrawn` rides in the key column, as text: the union has no integer column
            // left for it.
            "b" => {
                let overdrawn = key
                    .parse()
                    .map_err(|_| corrupt("overdrawn is not an integer"))?;
                parts.balance = balance_from_row(row, 3, overdrawn)?
            }
            "d" => {
                let amount = Credits::new(from_sql(row.get(3))?);
                let at = Timestamp::from_unix(from_sql(row.get(4))?);
                parts.deposits.insert(key, (amount, at));
            }
            "x" => {
                let direction = match row.get::<_, &str>(2) {
                    "credit" => Direction::Credit,
                    "debit" => Direction::Debit,
                    _ => return Err(corrupt("unknown adjustment direction")),
                };
                let amount = Credits::new(from_sql(row.get(3))?);
                let at = Timestamp::from_unix(from_sql(row.get(4))?);
                parts.adjustments.insert(key, (direction, amount, at));
            }
            _ => return Err(corrupt("unknown row kind in the ledger load")),
        }
    }
    Ok(())
}

pub(super) fn record_from_row(row: &Row) -> Result<Record, StoreError> {
    let state: &str = row.get(2);
    let fingerprint: i64 = row.get(3);
    let units: serde_json::Value = row.get(7);
    let charges: serde_json::Value = row.get(8);
    let settlement: Option<serde_json::Value> = row.get(9);
    Ok(Record {
        fingerprint: u64::from_be_bytes(fingerprint.to_be_bytes()),
        charges: serde_json::from_value(charges).map_err(StoreError::corrupt)?,
        credits: Credits::new(from_sql(row.get(4))?),
        allowance_units: serde_json::from_value(units).map_err(StoreError::corrupt)?,
        expires_at: Timestamp::from_unix(from_sql(row.get(5))?),
        state: state_from(state)?,
        touched_at: Timestamp::from_unix(from_sql(row.get(6))?),
        settlement: settlement
            .map(serde_json::from_value)
            .transpose()
            .map_err(StoreError::corrupt)?,
        retain: row.get(10),
        charge_on_expiry: row.get(11),
        attempt: u64::from_be_bytes(row.get::<_, i64>(12).to_be_bytes()),
    })
}

pub(super) fn opt_ts(t: Option<Timestamp>) -> Option<i64> {
    t.map(ts_to_sql)
}

pub(super) fn ts_col(row: &Row, i: usize) -> Result<Option<Timestamp>, StoreError> {
    row.get::<_, Option<i64>>(i)
        .map(|v| from_sql(v).map(Timestamp::from_unix))
        .transpose()
}

/// A row of [`LedgerSql::journal_read`].
pub(super) fn journal_from_row(row: &Row) -> Result<JournalEntry, StoreError> {
    let kind = match row.get::<_, &str>(2) {
        "deposit" => EntryKind::Deposit,
        "settle" => EntryKind::Settle,
        "release" => EntryKind::Release,
        "expiry" => EntryKind::Expiry,
        "shortfall" => EntryKind::Shortfall,
        "adjustment" => EntryKind::Adjustment,
        _ => return Err(corrupt("unknown journal entry kind")),
    };
    let direction = match row.get::<_, Option<&str>>(4) {
        None => None,
        Some("credit") => Some(Direction::Credit),
        Some("debit") => Some(Direction::Debit),
        Some(_) => return Err(corrupt("unknown adjustment direction")),
    };
    Ok(JournalEntry {
        seq: from_sql(row.get(0))?,
        at: Timestamp::from_unix(from_sql(row.get(1))?),
        kind,
        credits: Credits::new(from_sql(row.get(3))?),
        direction,
        available_after: Credits::new(from_sql(row.get(5))?),
        reference: row.get(6),
        reason: row.get(7),
    })
}
