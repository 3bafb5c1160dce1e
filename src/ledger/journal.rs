//! The spend history: each account's ledger entries, newest last, bounded by a retention.

use std::collections::VecDeque;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::account::AccountId;
use crate::credits::Credits;
use crate::error::LedgerError;
use crate::time::Timestamp;

/// How long journal entries are kept by default: 90 days, a quarter of invoices.
pub const DEFAULT_JOURNAL_RETENTION_SECS: u64 = 90 * 24 * 3600;

/// How many journal entries an account keeps at most by default (the oldest go first).
pub const DEFAULT_JOURNAL_MAX_ENTRIES: usize = 1000;

/// What a journal entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryKind {
    /// Credit added (a top-up): `credits` added.
    Deposit,
    /// A request settled: `credits` charged.
    Settle,
    /// A hold given back unused: `credits` that were held.
    Release,
    /// A hold that lapsed before it was settled or released: `credits` that were held.
    Expiry,
    /// A settlement that could not charge everything used: `credits` owed but not charged.
    Shortfall,
    /// An operator's correction: `credits` added or taken, see [`JournalEntry::direction`].
    Adjustment,
}

/// Which way an [`Adjustment`] moves credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Adds credit (a goodwill credit, a refund).
    Credit,
    /// Takes credit (a chargeback, a correction), never more than is available.
    Debit,
}

/// One line of an account's spend history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Position in the account's journal: increasing, never reused.
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: EntryKind,
    /// How much (always positive; see [`EntryKind`] for what it counts).
    pub credits: Credits,
    /// For an adjustment, which way it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `available` right after it.
    pub available_after: Credits,
    /// The deposit's or adjustment's idempotency key. Never a request's `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The operator's reason, for an adjustment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How much of the journal to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// Entries older than this are forgotten.
    pub retention_secs: u64,
    /// Entries beyond this many per account are forgotten, oldest first. `0` keeps no journal.
    pub max_entries: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        JournalLimits {
            retention_secs: DEFAULT_JOURNAL_RETENTION_SECS,
            max_entries: DEFAULT_JOURNAL_MAX_ENTRIES,
        }
    }
}

/// Which entries to read: newest first, at or after `since`, before `until`, `limit` at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalQuery {
    /// The earliest time included.
    pub since: Option<Timestamp>,
    /// The first time excluded.
    pub until: Option<Timestamp>,
    /// How many entries at most.
    pub limit: usize,
}

impl Default for JournalQuery {
    fn default() -> Self {
        JournalQuery {
            since: None,
            until: None,
            limit: 100,
        }
    }
}

impl JournalQuery {
    /// Whether `entry` is in the time range.
    pub fn covers(&self, at: Timestamp) -> bool {
        self.since.is_none_or(|s| at >= s) && self.until.is_none_or(|u| at < u)
    }
}

/// An operator's correction of an account's credit, with its reason, once per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    /// Idempotency key: the same key again changes nothing; with another amount or direction
    /// it is [`LedgerError::KeyConflict`].
    pub key: String,
    /// Credit or debit.
    pub direction: Direction,
    /// How much (positive, at most [`Credits::MAX_EXACT`]).
    pub credits: Credits,
    /// Why, for the journal.
    pub reason: String,
}

/// The answer to an adjustment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjusted {
    /// `false` when the key was seen before and nothing changed this time.
    pub applied: bool,
    /// `available` afterwards.
    pub available_after: Credits,
}

/// Where a ledger keeps its spend history (see [`Ledger::journal`](crate::Ledger::journal)).
///
/// Every credit-moving operation of the ledger writes its entry in the same atomic step as
/// the operation: the journal never disagrees with the balance.
#[async_trait]
pub trait Journal: Send + Sync {
    /// The account's entries matching `query`, newest first.
    async fn entries(
        &self,
        account: &AccountId,
        query: &JournalQuery,
        now: Timestamp,
    ) -> Result<Vec<JournalEntry>, LedgerError>;

    /// Credits or debits the account once per key, with a journal entry. A debit of more
    /// than is available is [`LedgerError::AmountOutOfRange`], and changes nothing.
    async fn adjust(
        &self,
        account: &AccountId,
        adjustment: &Adjustment,
        now: Timestamp,
    ) -> Result<Adjusted, LedgerError>;
}

/// An account's journal in memory: what [`AccountBook`](crate::ledger::AccountBook) keeps.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entries {
    pub(crate) limits: JournalLimits,
    pub(crate) entries: VecDeque<JournalEntry>,
    pub(crate) next_seq: u64,
    /// When the oldest entry passes its retention (`None` when there is none): read by
    /// [`expire`](Self::expire) on every ledger operation instead of the oldest entry itself,
    /// which is cold in the cache on a busy account (measured: the single largest cost of the
    /// in-memory ledger under load, before this field).
    forget_at: Option<Timestamp>,
    /// Each entry's `at`, in the same order: the next oldest's time is read from here when
    /// the oldest goes (eight to a cache line, where an entry takes 88 bytes).
    times: VecDeque<Timestamp>,
}

impl Entries {
    pub(crate) fn new(limits: JournalLimits) -> Self {
        Entries {
            limits,
            entries: VecDeque::new(),
            next_seq: 0,
            forget_at: None,
            times: VecDeque::new(),
        }
    }

    /// Appends an entry (nothing when the journal is off), dropping the oldest past the cap.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        at: Timestamp,
        kind: EntryKind,
        credits: Credits,
        direction: Option<Direction>,
        available_after: Credits,
        reference: Option<&str>,
        reason: Option<&str>,
    ) {
        if self.limits.max_entries == 0 {
            return;
        }
        let full = self.entries.len() >= self.limits.max_entries;
        while self.entries.len() >= self.limits.max_entries {
            self.pop_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(JournalEntry {
            seq,
            at,
            kind,
            credits,
            direction,
            available_after,
            reference: reference.map(str::to_owned),
            reason: reason.map(str::to_owned),
        });
        self.times.push_back(at);
        if full || self.forget_at.is_none() {
            self.forget_at = self.oldest_forgotten_at();
        }
    }

    /// Another bound, for the entries kept from now on.
    pub(crate) fn set_limits(&mut self, limits: JournalLimits) {
        self.limits = limits;
        self.forget_at = self.oldest_forgotten_at();
    }

    fn oldest_forgotten_at(&self) -> Option<Timestamp> {
        let retention = self.limits.retention_secs;
        self.times.front().map(|at| at.plus_secs(retention))
    }

    fn pop_oldest(&mut self) {
        self.entries.pop_front();
        self.times.pop_front();
    }

    /// Forgets entries past the retention time.
    pub(crate) fn expire(&mut self, now: Timestamp) {
        if self.forget_at.is_none_or(|at| at > now) {
            return;
        }
        let retention = self.limits.retention_secs;
        while self
            .times
            .front()
            .is_some_and(|at| at.plus_secs(retention) <= now)
        {
            self.pop_oldest();
        }
        self.forget_at = self.oldest_forgotten_at();
    }

    /// Newest first.
    pub(crate) fn read(&self, query: &JournalQuery) -> Vec<JournalEntry> {
        self.entries
            .iter()
            .rev()
            .filter(|e| query.covers(e.at))
            .take(query.limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The entries a journal keeps, computed the slow way: every entry pushed, then the cap
    /// and the retention applied to the oldest first, as `push` and `expire` do.
    fn model(limits: JournalLimits, ops: &[(bool, u64)]) -> Vec<u64> {
        let mut kept: VecDeque<(u64, u64)> = VecDeque::new();
        let mut seq = 0;
        for &(push, at) in ops {
            if push {
                if limits.max_entries == 0 {
                    continue;
                }
                while kept.len() >= limits.max_entries {
                    kept.pop_front();
                }
                kept.push_back((seq, at));
                seq += 1;
            } else {
                while kept
                    .front()
                    .is_some_and(|(_, t)| t + limits.retention_secs <= at)
                {
                    kept.pop_front();
                }
            }
        }
        kept.into_iter().map(|(s, _)| s).collect()
    }

    proptest! {
        // The cached deadline in `forget_at` forgets exactly what reading the oldest entry
        // on every call would.
        #[test]
        fn expiry_matches_the_model(
            retention in 0u64..20,
            max_entries in 0usize..6,
            ops in proptest::collection::vec((any::<bool>(), 0u64..60), 0..80),
        ) {
            let limits = JournalLimits { retention_secs: retention, max_entries };
            let mut entries = Entries::new(limits);
            for &(push, at) in &ops {
                let at = Timestamp::from_unix(at);
                if push {
                    entries.push(at, EntryKind::Deposit, Credits::new(1), None, Credits::ZERO, None, None);
                } else {
                    entries.expire(at);
                }
            }
            let seqs: Vec<u64> = entries.entries.iter().map(|e| e.seq).collect();
            prop_assert_eq!(seqs, model(limits, &ops));
            let times: Vec<Timestamp> = entries.entries.iter().map(|e| e.at).collect();
            prop_assert_eq!(Vec::from(entries.times.clone()), times);
        }
    }
}
