use crate::FastMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;

use crate::account::AccountId;
use crate::error::StoreError;
use crate::in_process::InProcessPlanStore;
use crate::plan::{PlanStore, Subscription, SyncMark};
use crate::time::{Clock, SystemClock, Timestamp};

struct Entry {
    subscription: Option<Arc<Subscription>>,
    fetched_at: Timestamp,
}

struct Shared {
    entries: RwLock<FastMap<AccountId, Entry>>,
    /// Bumped by every invalidation, so a read that started before one does not store what
    /// it fetched.
    generation: AtomicU64,
}

/// A read-through cache in front of any [`PlanStore`].
///
/// Answers (including "no subscription") are kept for `ttl_secs` of the injected
/// [`Clock`]; [`invalidate`](Self::invalidate) and [`invalidate_all`](Self::invalidate_all)
/// drop them earlier (call them from the webhook that changes a subscription in another
/// process). [`put_subscription`](PlanStore::put_subscription) writes through to the inner
/// store and then drops the cached entry. Errors of the inner store are passed on and never
/// cached. Clones share the cache.
///
/// No lock is held across an `.await`: the inner store is called with the cache unlocked, and
/// an answer fetched while an invalidation happened is not stored.
///
/// # Examples
///
/// ```
/// use tower_402::plan::{PlanStore, Subscription};
/// use tower_402::store::CachingPlanStore;
/// use tower_402::{ManualClock, MemoryPlanStore, Timestamp};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_402::StoreError> {
/// let store = MemoryPlanStore::new().with(Subscription::active("acme", "pro"));
/// let clock = ManualClock::new(Timestamp::EPOCH);
/// let plans = CachingPlanStore::new(store, 60).clock(clock.clone());
/// let sub = plans.subscription(&"acme".into()).await?;
/// assert_eq!(sub.map(|s| s.plan.as_str().to_owned()).as_deref(), Some("pro"));
/// plans.invalidate(&"acme".into());
/// # Ok(())
/// # }
/// ```
pub struct CachingPlanStore<S, C = SystemClock> {
    inner: S,
    clock: C,
    ttl_secs: u64,
    shared: Arc<Shared>,
}

impl<S: Clone, C: Clone> Clone for CachingPlanStore<S, C> {
    fn clone(&self) -> Self {
        CachingPlanStore {
            inner: self.inner.clone(),
            clock: self.clock.clone(),
            ttl_secs: self.ttl_secs,
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CachingPlanStore<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingPlanStore")
            .field("inner", &self.inner)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl<S> CachingPlanStore<S> {
    /// Caches `inner`'s answers for `ttl_secs` of wall-clock time.
    pub fn new(inner: S, ttl_secs: u64) -> Self {
        CachingPlanStore {
            inner,
            clock: SystemClock,
            ttl_secs,
            shared: Arc::new(Shared {
                entries: RwLock::new(FastMap::default()),
                generation: AtomicU64::new(0),
            }),
        }
    }
}

impl<S, C> CachingPlanStore<S, C> {
    /// Measures the TTL on `clock` instead of the wall clock.
    pub fn clock<C2: Clock>(self, clock: C2) -> CachingPlanStore<S, C2> {
        CachingPlanStore {
            inner: self.inner,
            clock,
            ttl_secs: self.ttl_secs,
            shared: self.shared,
        }
    }

    /// Forgets the cached answer for `account`.
    pub fn invalidate(&self, account: &AccountId) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.entries_mut().remove(account);
    }

    /// Forgets every cached answer.
    pub fn invalidate_all(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.entries_mut().clear();
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn entries_mut(&self) -> std::sync::RwLockWriteGuard<'_, FastMap<AccountId, Entry>> {
        // Every update is a single insert or remove: a poisoned lock holds a consistent map.
        self.shared
            .entries
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: PlanStore, C: Clock> CachingPlanStore<S, C> {
    /// The cached answer for `account`, if it is still fresh at `now`.
    fn fresh(&self, account: &AccountId, now: Timestamp) -> Option<Option<Arc<Subscription>>> {
        let entries = self
            .shared
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        entries
            .get(account)
            .filter(|e| e.fetched_at.plus_secs(self.ttl_secs) > now && e.fetched_at <= now)
            .map(|e| e.subscription.clone())
    }
}

#[async_trait]
impl<S: PlanStore, C: Clock> PlanStore for CachingPlanStore<S, C> {
    async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError> {
        let now = self.clock.now();
        if let Some(hit) = self.fresh(account, now) {
            return Ok(hit.map(Arc::unwrap_or_clone));
        }
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let fetched = self.inner.subscription(account).await?;
        let mut entries = self.entries_mut();
        if self.shared.generation.load(Ordering::SeqCst) == generation {
            entries.insert(
                account.clone(),
                Entry {
                    subscription: fetched.clone().map(Arc::new),
                    fetched_at: now,
                },
            );
        }
        Ok(fetched)
    }

    async fn put_subscription(&self, subscription: Subscription) -> Result<(), StoreError> {
        let account = subscription.account.clone();
        let written = self.inner.put_subscription(subscription).await;
        // Invalidate even on error: the write may have landed before the failure.
        self.invalidate(&account);
        written
    }

    /// Writes through the inner store's own compare-and-write, then drops the cached entry
    /// whatever the answer: written, the entry is old; refused, it was stale (another process
    /// wrote), and the caller is about to read again.
    async fn put_subscription_if(
        &self,
        subscription: Subscription,
        expected: Option<&SyncMark>,
    ) -> Result<bool, StoreError> {
        let account = subscription.account.clone();
        let written = self.inner.put_subscription_if(subscription, expected).await;
        self.invalidate(&account);
        written
    }

    /// A fresh cache hit answers without a future (the gate's fast path); a miss takes the
    /// async path.
    fn in_process(&self) -> Option<&dyn InProcessPlanStore> {
        Some(self)
    }
}

impl<S: PlanStore, C: Clock> InProcessPlanStore for CachingPlanStore<S, C> {
    fn lookup(&self, account: &AccountId) -> Option<Result<Option<Arc<Subscription>>, StoreError>> {
        self.fresh(account, self.clock.now()).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::plan::SubscriptionStatus;
    use crate::store::MemoryPlanStore;
    use crate::time::ManualClock;

    /// Counts reads of the inner store.
    #[derive(Clone, Default)]
    struct Counting {
        store: MemoryPlanStore,
        reads: Arc<AtomicUsize>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    #[async_trait]
    impl PlanStore for Counting {
        async fn subscription(&self, a: &AccountId) -> Result<Option<Subscription>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Timeout);
            }
            self.store.subscription(a).await
        }
        async fn put_subscription(&self, s: Subscription) -> Result<(), StoreError> {
            self.store.put_subscription(s).await
        }
        async fn put_subscription_if(
            &self,
            s: Subscription,
            expected: Option<&SyncMark>,
        ) -> Result<bool, StoreError> {
            self.store.put_subscription_if(s, expected).await
        }
    }

    fn setup() -> (
        Counting,
        ManualClock,
        CachingPlanStore<Counting, ManualClock>,
    ) {
        let inner = Counting::default();
        let clock = ManualClock::new(Timestamp::from_unix(1_000));
        let cache = CachingPlanStore::new(inner.clone(), 30).clock(clock.clone());
        (inner, clock, cache)
    }

    fn reads(c: &Counting) -> usize {
        c.reads.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn serves_from_cache_until_the_ttl_passes() {
        let (inner, clock, cache) = setup();
        let acme = AccountId::new("acme");
        inner
            .store
            .put_subscription(Subscription::active("acme", "pro"))
            .await
            .unwrap();
        for _ in 0..3 {
            let s = cache.subscription(&acme).await.unwrap().unwrap();
            assert_eq!(s.plan.as_str(), "pro");
        }
        assert_eq!(reads(&inner), 1);
        // Changed behind the cache's back: still the cached answer within the TTL.
        inner
            .store
            .put_subscription(Subscription::active("acme", "basic"))
            .await
            .unwrap();
        clock.advance(29);
        assert_eq!(
            cache
                .subscription(&acme)
                .await
                .unwrap()
                .unwrap()
                .plan
                .as_str(),
            "pro"
        );
        clock.advance(1);
        assert_eq!(
            cache
                .subscription(&acme)
                .await
                .unwrap()
                .unwrap()
                .plan
                .as_str(),
            "basic"
        );
        assert_eq!(reads(&inner), 2);
    }

    #[tokio::test]
    async fn caches_absence_and_invalidates() {
        let (inner, _clock, cache) = setup();
        let acme = AccountId::new("acme");
        assert!(cache.subscription(&acme).await.unwrap().is_none());
        assert!(cache.subscription(&acme).await.unwrap().is_none());
        assert_eq!(reads(&inner), 1);
        inner
            .store
            .put_subscription(Subscription::active("acme", "pro"))
            .await
            .unwrap();
        cache.invalidate(&acme);
        assert!(cache.subscription(&acme).await.unwrap().is_some());
        assert_eq!(reads(&inner), 2);
        cache.invalidate_all();
        assert!(cache.subscription(&acme).await.unwrap().is_some());
        assert_eq!(reads(&inner), 3);
    }

    #[tokio::test]
    async fn put_writes_through_and_invalidates() {
        let (inner, _clock, cache) = setup();
        let acme = AccountId::new("acme");
        cache
            .put_subscription(Subscription::active("acme", "pro"))
            .await
            .unwrap();
        assert_eq!(
            cache
                .subscription(&acme)
                .await
                .unwrap()
                .unwrap()
                .plan
                .as_str(),
            "pro"
        );
        let mut past_due = Subscription::new("acme", "pro", SubscriptionStatus::PastDue);
        past_due.past_due_since = Some(Timestamp::from_unix(900));
        cache.put_subscription(past_due.clone()).await.unwrap();
        assert_eq!(cache.subscription(&acme).await.unwrap(), Some(past_due));
        assert_eq!(reads(&inner), 2);
        assert_eq!(
            inner
                .store
                .subscription(&acme)
                .await
                .unwrap()
                .unwrap()
                .status,
            SubscriptionStatus::PastDue
        );
    }

    #[tokio::test]
    async fn a_conditional_put_drops_the_entry_written_or_not() {
        let (inner, _clock, cache) = setup();
        let acme = AccountId::new("acme");
        let first = SyncMark::new("stripe:sub_1", Timestamp::from_unix(10), "evt_a");
        let mut pro = Subscription::active("acme", "pro");
        pro.synced = Some(first.clone());
        assert!(cache.put_subscription_if(pro, None).await.unwrap());
        // Cached now: the gate reads it.
        assert_eq!(
            cache
                .subscription(&acme)
                .await
                .unwrap()
                .unwrap()
                .plan
                .as_str(),
            "pro"
        );
        let mut basic = Subscription::active("acme", "basic");
        basic.synced = Some(SyncMark::new(
            "stripe:sub_1",
            Timestamp::from_unix(20),
            "evt_b",
        ));
        assert!(cache
            .put_subscription_if(basic.clone(), Some(&first))
            .await
            .unwrap());
        assert_eq!(
            cache.subscription(&acme).await.unwrap(),
            Some(basic.clone())
        );
        assert_eq!(reads(&inner), 2, "the write dropped the cached pro");
        // Changed behind the cache's back (another process): a refused write drops the
        // stale entry too, so the caller's next read sees the store.
        let mut other = basic.clone();
        other.synced = Some(SyncMark::new(
            "stripe:sub_1",
            Timestamp::from_unix(30),
            "evt_c",
        ));
        inner.store.put_subscription(other.clone()).await.unwrap();
        let seen = basic.synced.clone();
        assert!(!cache
            .put_subscription_if(basic, seen.as_ref())
            .await
            .unwrap());
        assert_eq!(cache.subscription(&acme).await.unwrap(), Some(other));
        assert_eq!(reads(&inner), 3);
    }

    #[tokio::test]
    async fn errors_are_passed_on_and_not_cached() {
        let (inner, _clock, cache) = setup();
        let acme = AccountId::new("acme");
        inner.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            cache.subscription(&acme).await,
            Err(StoreError::Timeout)
        ));
        inner.fail.store(false, Ordering::SeqCst);
        assert!(cache.subscription(&acme).await.unwrap().is_none());
        assert_eq!(reads(&inner), 2);
    }

    #[tokio::test]
    async fn clones_share_the_cache() {
        let (inner, _clock, cache) = setup();
        let other = cache.clone();
        let acme = AccountId::new("acme");
        cache.subscription(&acme).await.unwrap();
        other.subscription(&acme).await.unwrap();
        assert_eq!(reads(&inner), 1);
        other.invalidate(&acme);
        cache.subscription(&acme).await.unwrap();
        assert_eq!(reads(&inner), 2);
    }

    #[tokio::test]
    async fn a_fresh_hit_answers_without_a_future() {
        let (inner, clock, cache) = setup();
        let acme = AccountId::new("acme");
        inner
            .store
            .put_subscription(Subscription::active("acme", "pro"))
            .await
            .unwrap();
        assert!(cache.lookup(&acme).is_none(), "a miss needs the store");
        cache.subscription(&acme).await.unwrap();
        let hit = cache.lookup(&acme).unwrap().unwrap().unwrap();
        assert_eq!(hit.plan.as_str(), "pro");
        clock.advance(30);
        assert!(cache.lookup(&acme).is_none(), "expired");
        assert_eq!(reads(&inner), 1);
    }
}
