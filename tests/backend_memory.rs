//! The conformance suite and the fleet test on the in-memory stores.

mod conformance;

use tower_402::keys::MemoryKeyStore;
use tower_402::{MemoryLedger, MemoryPlanStore, Timestamp};

async fn ledger() -> Option<MemoryLedger> {
    Some(MemoryLedger::new())
}

async fn plans() -> Option<MemoryPlanStore> {
    Some(MemoryPlanStore::new())
}

async fn keys() -> Option<(MemoryKeyStore, MemoryKeyStore)> {
    let store = MemoryKeyStore::new();
    Some((store.clone(), store))
}

/// All a memory store holds is what its `Debug` shows: ids, accounts, digests, ends.
async fn stored_keys(store: MemoryKeyStore) -> String {
    format!("{store:?}")
}

conformance_tests!(ledger().await, plans().await, keys().await, stored_keys);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_four_shares_one_balance() {
    let ledger = MemoryLedger::new();
    let plans = MemoryPlanStore::new();
    // In memory, "four instances" share one process: clones share the state.
    conformance::fleet::run((0..4).map(|_| (ledger.clone(), plans.clone())).collect()).await;
    assert_eq!(
        ledger.open_reservations(&conformance::fleet::ACCOUNT.into(), Timestamp::now()),
        0
    );
}

/// The journal keeps at most `max_entries` per account, the oldest going first, and none at
/// all with `max_entries: 0`.
#[tokio::test]
async fn the_journal_is_bounded_by_its_entry_count() {
    conformance::journal_bound(
        &MemoryLedger::new().with_journal(conformance::BOUNDED),
        &MemoryLedger::new().with_journal(conformance::OFF),
    )
    .await;
}
