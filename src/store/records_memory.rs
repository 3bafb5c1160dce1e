//! [`MemoryRecords`]: the in-memory ledger's recorded responses.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use crate::account::AccountId;
use crate::error::LedgerError;
use crate::ledger::{RecordLimits, ReservationId, ReservationKey, ResponseRecord, ResponseRecords};
use crate::time::Timestamp;
use crate::FastMap;

/// One account's records, and the order they were written in (for expiry and the cap).
#[derive(Default)]
struct Account {
    records: FastMap<ReservationKey, (Timestamp, Timestamp, ResponseRecord)>,
    /// `(written at, key)`, oldest first; stale entries (rewritten keys) are skipped.
    order: VecDeque<(Timestamp, ReservationKey)>,
}

impl Account {
    /// Drops expired records, then the oldest beyond `cap`.
    fn trim(&mut self, now: Timestamp, cap: u64) {
        while let Some((written, key)) = self.order.front() {
            let live = self.records.get(key).filter(|(w, ..)| w == written);
            let Some((_, expires, _)) = live else {
                self.order.pop_front();
                continue;
            };
            if *expires > now && self.records.len() as u64 <= cap {
                break;
            }
            let key = key.clone();
            self.order.pop_front();
            self.records.remove(&key);
        }
    }
}

/// Recorded responses in memory, for [`MemoryLedger`](crate::MemoryLedger): one map per
/// account behind one mutex, held for a synchronous update only. Clones share the records.
#[derive(Clone, Default)]
pub(crate) struct MemoryRecords {
    accounts: Arc<Mutex<FastMap<AccountId, Account>>>,
}

impl MemoryRecords {
    fn with<T>(&self, f: impl FnOnce(&mut FastMap<AccountId, Account>) -> T) -> T {
        // Every update is whole before the lock is released: a poisoned lock is safe to use.
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut accounts)
    }
}

#[async_trait]
impl ResponseRecords for MemoryRecords {
    async fn put(
        &self,
        id: &ReservationId,
        record: &ResponseRecord,
        limits: RecordLimits,
        now: Timestamp,
    ) -> Result<(), LedgerError> {
        let expires = now.plus_secs(limits.retention_secs);
        self.with(|accounts| {
            let account = accounts.entry(id.account.clone()).or_default();
            account
                .records
                .insert(id.key.clone(), (now, expires, record.clone()));
            account.order.push_back((now, id.key.clone()));
            account.trim(now, limits.per_account);
            if account.records.is_empty() {
                accounts.remove(&id.account);
            }
        });
        Ok(())
    }

    async fn get(
        &self,
        id: &ReservationId,
        now: Timestamp,
    ) -> Result<Option<ResponseRecord>, LedgerError> {
        Ok(self.with(|accounts| {
            let account = accounts.get_mut(&id.account)?;
            // Expired records go on reads too, so an account that stops writing is not kept.
            account.trim(now, u64::MAX);
            let found = account
                .records
                .get(&id.key)
                .and_then(|(_, expires, record)| (*expires > now).then(|| record.clone()));
            if account.records.is_empty() {
                accounts.remove(&id.account);
            }
            found
        }))
    }
}
