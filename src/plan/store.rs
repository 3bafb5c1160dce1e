use std::sync::Arc;

use async_trait::async_trait;

use crate::account::AccountId;
use crate::error::StoreError;
use crate::in_process::InProcessPlanStore;
use crate::plan::Subscription;

/// Where subscriptions live.
///
/// Two methods: the gate reads with [`subscription`](Self::subscription) on every request; the
/// application (or a payment processor's webhook) writes with
/// [`put_subscription`](Self::put_subscription). [`MemoryPlanStore`](crate::MemoryPlanStore) is
/// the in-process default.
///
/// # Implementing your own
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::RwLock;
/// use async_trait::async_trait;
/// use tower_402::{AccountId, StoreError};
/// use tower_402::plan::{PlanStore, Subscription};
///
/// #[derive(Default)]
/// struct MyStore(RwLock<HashMap<AccountId, Subscription>>);
///
/// #[async_trait]
/// impl PlanStore for MyStore {
///     async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError> {
///         // Never hold a lock across an `.await`: this one is released before returning.
///         Ok(self.0.read().unwrap().get(account).cloned())
///     }
///
///     async fn put_subscription(&self, sub: Subscription) -> Result<(), StoreError> {
///         self.0.write().unwrap().insert(sub.account.clone(), sub);
///         Ok(())
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MyStore::default();
/// store.put_subscription(Subscription::active("acme", "pro")).await.unwrap();
/// let sub = store.subscription(&AccountId::new("acme")).await.unwrap().unwrap();
/// assert_eq!(sub.plan.as_str(), "pro");
/// # }
/// ```
#[async_trait]
pub trait PlanStore: Send + Sync + 'static {
    /// The account's subscription, or `None` if it has none.
    async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError>;

    /// Creates or replaces the account's subscription.
    async fn put_subscription(&self, subscription: Subscription) -> Result<(), StoreError>;

    /// The store's [in-process fast path](crate::in_process), if it needs no I/O (the
    /// in-memory store): `None` (the default) has the gate call
    /// [`subscription`](Self::subscription).
    fn in_process(&self) -> Option<&dyn InProcessPlanStore> {
        None
    }
}

#[async_trait]
impl<T: PlanStore + ?Sized> PlanStore for Arc<T> {
    async fn subscription(&self, account: &AccountId) -> Result<Option<Subscription>, StoreError> {
        (**self).subscription(account).await
    }

    async fn put_subscription(&self, subscription: Subscription) -> Result<(), StoreError> {
        (**self).put_subscription(subscription).await
    }

    fn in_process(&self) -> Option<&dyn InProcessPlanStore> {
        (**self).in_process()
    }
}
