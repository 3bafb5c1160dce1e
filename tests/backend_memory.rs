//! The conformance suite and the fleet test on the in-memory stores.

mod conformance;

use tower_402::{MemoryLedger, MemoryPlanStore, Timestamp};

async fn ledger() -> Option<MemoryLedger> {
    Some(MemoryLedger::new())
}

async fn plans() -> Option<MemoryPlanStore> {
    Some(MemoryPlanStore::new())
}

conformance_tests!(ledger().await, plans().await);

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
