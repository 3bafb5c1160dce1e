//! tower-402's in-memory check + hold + settle beside tollgate-admission's full admission
//! check, in one criterion run. See README.md in this folder for what each row does.
//!
//! `cargo bench --manifest-path benches/tollgate/Cargo.toml`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};

use tower_402::decision::{decide, Cost, Decision, DecisionInput, Requirement};
use tower_402::in_process::{InProcessLedger, InProcessPlanStore};
use tower_402::ledger::{OverEstimate, Usage};
use tower_402::plan::{Catalog, Period, Plan, Subscription};
use tower_402::{AccountId, Credits, Ledger, MemoryLedger, MemoryPlanStore, Timestamp};

use tollgate_admission::{
    AdmissionEngine, ArcSwapSnapshotMap, LeaseSlot, NoGate, Pending, Principal, SnapshotMap,
};
use tollgate_core::{
    AccountId as TgAccountId, AccountSnapshot, AccountStatus, CostTable, CostUnits, DenyReason,
    FencingToken, Generation, LeaseGrant, LeaseId, LocalLease, OpIndex, PermissionBits,
    PublishableSnapshot, RequestId, ResolvedLimits, UsageEvent, UsageSlot,
};

/// How many accounts (tower-402) and principals (tollgate) are resident besides the benched
/// one: tollgate's own `full_check` fixture installs 512, "the benched principal among
/// hundreds".
const WORKING_SET: u128 = 512;
/// The benched account / principal, inside the working set (tollgate's bench uses 97 too).
const BENCHED: u128 = 97;

// ---------------------------------------------------------------------------------------------
// tower-402
// ---------------------------------------------------------------------------------------------

const NOW: Timestamp = Timestamp::from_unix(1_790_000_000);

/// Polls a future that never waits (every `MemoryLedger`/`MemoryPlanStore` method is its
/// synchronous twin, already answered): setup only, so no async runtime is needed.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("in-memory stores answer without waiting"),
    }
}

struct Tower402 {
    catalog: Catalog,
    plan: Arc<Plan>,
    subscription: Subscription,
    requirement: Requirement,
    account: AccountId,
    ledger: MemoryLedger,
    plans: MemoryPlanStore,
}

fn tower402_fixture() -> Tower402 {
    // The same plans as tower-402's own benches/hot_path.rs; the benched account is on "pro":
    // overage paid from credit, no allowance, so every request is a credit debit (as every
    // tollgate request is a lease debit).
    let catalog = Catalog::new()
        .with_plan(Plan::new("free", "Free", 0).allowance("requests", 1000, Period::CalendarMonth))
        .with_plan(Plan::new("pro", "Pro", 2).overage(true));
    let plan = catalog.get("pro").expect("pro").clone();
    let ledger = MemoryLedger::new();
    let mut plans = MemoryPlanStore::new();
    for i in 0..WORKING_SET {
        let account = AccountId::from(format!("acct-{i}"));
        // A large deposit: 2^50 credits, a billion years of this loop.
        ready(Ledger::deposit(&ledger, &account, Credits::new(1 << 50), "seed", NOW))
            .expect("seed deposit");
        plans = plans.with(Subscription::active(account, "pro"));
    }
    let account = AccountId::from(format!("acct-{BENCHED}"));
    Tower402 {
        catalog,
        plan,
        subscription: Subscription::active(account.clone(), "pro"),
        requirement: Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))),
        account,
        ledger,
        plans,
    }
}

impl Tower402 {
    fn decide(&self, subscription: &Subscription, plan: &Plan) -> Decision {
        decide(&DecisionInput {
            subscription,
            plan,
            catalog: &self.catalog,
            requirement: &self.requirement,
            // The layers pass `None`: allowance and credit are checked once, atomically, by
            // the hold below.
            balances: None,
            grace_secs: 0,
            soft_limit_percent: None,
            now: NOW,
        })
    }

    /// Status + entitlement, price, hold, settle: what the gate and the metering layer do per
    /// request on the in-memory stores, without the HTTP around them.
    fn check_hold_settle(&self, subscription: &Subscription, plan: &Plan) {
        let decision = self.decide(subscription, plan);
        assert!(matches!(decision, Decision::Allow(_)));
        let cost = self.requirement.cost.as_ref().expect("priced route");
        let charge = cost.charge(plan, NOW);
        let charges = std::slice::from_ref(&charge);
        let hold = InProcessLedger::hold(&self.ledger, &self.account, charges, NOW)
            .expect("ledger")
            .expect("funded");
        let settlement = InProcessLedger::settle_hold(
            &self.ledger,
            &self.account,
            &hold,
            charges,
            &[Usage::new("requests", 1)],
            OverEstimate::DrawBalance,
            NOW,
        )
        .expect("ledger");
        black_box(settlement);
    }
}

// ---------------------------------------------------------------------------------------------
// tollgate-admission (fixtures as in its benches/admission_hot_path.rs)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct PriceOp;

impl OpIndex for PriceOp {
    fn index(&self) -> usize {
        0
    }
}

/// tollgate's `BenchUsageSlot`: the slot a cancelled admission never fills.
struct DiscardSlot;

impl UsageSlot for DiscardSlot {
    fn record(self, _event: UsageEvent) {}
}

/// tollgate's `EmissionSlot`: the committed guard's billing event is made observable.
struct EmissionSlot;

impl UsageSlot for EmissionSlot {
    fn record(self, event: UsageEvent) {
        black_box(event);
    }
}

fn tg_now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_755_600_000).unwrap()
}

fn far_future() -> jiff::Timestamp {
    jiff::Timestamp::from_second(4_102_444_800).unwrap() // 2100-01-01
}

/// tollgate's `snapshot()`: active, permission bit 0, 4096 concurrency, a weighted rate
/// limit wide enough never to deny, cost 50 fixed + 1 per item.
fn tg_snapshot() -> Arc<AccountSnapshot> {
    Arc::new(
        AccountSnapshot::builder(
            TgAccountId(1),
            Generation(1),
            AccountStatus::Active,
            far_future(),
            PermissionBits::bit(0),
            ResolvedLimits::new(4_096).with_weighted_rate(u64::from(u32::MAX), u64::from(u32::MAX)),
            Arc::new(
                CostTable::builder(CostUnits(50), CostUnits(50))
                    .weight(&PriceOp, CostUnits(1))
                    .build(),
            ),
        )
        .build(),
    )
}

/// tollgate's `big_lease`: `u64::MAX / 2` units, valid until 2100.
fn tg_lease() -> Arc<LocalLease> {
    Arc::new(LocalLease::new(
        LeaseGrant {
            lease_id: LeaseId(8),
            account_id: TgAccountId(1),
            fencing_token: FencingToken(1),
            units: CostUnits(u64::MAX / 2),
            expires_at: far_future(),
        },
        CostUnits::ZERO,
    ))
}

/// tollgate's `engine(LocalSharding::SINGLE)`: the shipped default topology, 512 principals
/// installed through the publishable (validated) path.
fn tollgate_fixture() -> AdmissionEngine<ArcSwapSnapshotMap> {
    let engine = AdmissionEngine::new(ArcSwapSnapshotMap::new());
    for i in 0..WORKING_SET {
        let slot = LeaseSlot::for_account(TgAccountId(1));
        drop(slot.replace(tg_lease()));
        engine
            .map()
            .install_publishable(
                Principal(i),
                PublishableSnapshot::try_new(tg_snapshot()).expect("valid snapshot"),
                slot,
            )
            .expect("installed");
    }
    engine
}

/// Lookup, status/staleness/permission checks, batch cap and quote (64 items: 114 units),
/// weighted rate token, concurrency slots, lease debit: tollgate's `staged_admission`.
fn tg_admit<S: UsageSlot>(
    engine: &AdmissionEngine<ArcSwapSnapshotMap>,
    principal: Principal,
    slot: S,
) -> Result<Pending<S>, DenyReason> {
    let now = tg_now();
    engine
        .begin(principal, PermissionBits::bit(0), now)
        .and_then(|context| context.admit(&[(PriceOp, 64)], slot, now))
}

// ---------------------------------------------------------------------------------------------

fn bench(c: &mut Criterion) {
    let t = tower402_fixture();
    let engine = tollgate_fixture();

    // Both fixtures must be on their allow path before anything is timed.
    t.check_hold_settle(&t.subscription, &t.plan);
    let before = ready(Ledger::balance(&t.ledger, &t.account, NOW)).unwrap();
    t.check_hold_settle(&t.subscription, &t.plan);
    let after = ready(Ledger::balance(&t.ledger, &t.account, NOW)).unwrap();
    assert_eq!(
        before.available.get() - after.available.get(),
        1,
        "one request must settle exactly one credit"
    );
    assert_eq!(after.held, Credits::ZERO, "no hold may stay open");
    tg_admit(&engine, Principal(BENCHED), DiscardSlot)
        .expect("tollgate admits the benched principal")
        .cancel();

    let mut group = c.benchmark_group("admission");

    group.bench_function("tower402/check_hold_settle", |b| {
        b.iter(|| t.check_hold_settle(black_box(&t.subscription), black_box(&t.plan)))
    });

    // tollgate's `admission/full_check`: the whole admission pipeline, then cancel (its bench
    // cancels "so the giant lease never drains"; cancelling refunds the debit).
    group.bench_function("tollgate/admission", |b| {
        b.iter(|| {
            let pending = tg_admit(&engine, black_box(Principal(BENCHED)), DiscardSlot).unwrap();
            black_box(pending.cancel())
        })
    });

    // Reference rows.

    group.bench_function("tower402/decide_only", |b| {
        b.iter(|| t.decide(black_box(&t.subscription), black_box(&t.plan)))
    });

    // tower-402 with the subscription lookup the gate does first (MemoryPlanStore's
    // in-process twin, then the plan from the catalog): the counterpart of tollgate's
    // snapshot lookup, which `tollgate/admission` includes.
    let account = t.account.clone();
    group.bench_function("tower402/lookup_check_hold_settle", |b| {
        b.iter(|| {
            let sub = InProcessPlanStore::lookup(&t.plans, black_box(&account))
                .expect("in process")
                .expect("store")
                .expect("known account");
            let plan = t.catalog.get(sub.plan.as_str()).expect("known plan");
            t.check_hold_settle(&sub, plan)
        })
    });

    // tollgate to the end of a request: admit, the (disabled) capacity gate, commit at
    // execution start, and the committed guard's drop recording the billing event. The
    // counterpart of tower-402's settle, as tollgate's `commit_usage_leased_unattributed_owned`.
    group.bench_function("tollgate/admission_commit", |b| {
        b.iter(|| {
            let ready = tg_admit(&engine, black_box(Principal(BENCHED)), EmissionSlot)
                .unwrap()
                .acquire_capacity(&NoGate)
                .unwrap();
            drop(ready.commit(RequestId(1), tg_now()).unwrap());
        })
    });

    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
