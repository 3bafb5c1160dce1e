//! API keys kept as digests: many keys per account, added, rotated and revoked at run time.
//!
//! [`StaticKeys`](crate::StaticKeys) is a fixed table of raw keys, fine for a demo or a
//! handful of internal callers. A paid API that hands keys to customers wants more: several keys
//! per account, a key rotated without an outage, a leaked key revoked now, and a database that
//! never holds a usable secret. [`Keys`] gives that over any [`KeyStore`]:
//!
//! - Only a **digest** of each key is stored: HMAC-SHA256 under a server secret
//!   ([`KeyHasher::hmac`], the recommended choice: a stolen table cannot even be brute-forced
//!   without the secret) or plain SHA-256 ([`KeyHasher::sha256`], for keys that are already
//!   long random strings). The raw key exists only in the request and in the caller's hands.
//! - A presented key is digested and looked up by digest; the stored digest is then compared
//!   with the presented one in **constant time** ([`KeyDigest::ct_eq`]), so the lookup does not
//!   leak, byte by byte, how close a guess came.
//! - [`Keys::add`], [`Keys::rotate`] (the old and the new key both valid for an overlap, then
//!   only the new one) and [`Keys::revoke`] change the table **at run time**: the next request
//!   sees the change. A revoked or expired key answers **exactly like an unknown one** (401,
//!   the same body): a caller cannot tell a revoked key from a typo.
//!
//! Stores: [`MemoryKeyStore`] (one process; the gate's in-process fast path),
//! `RedisKeyStore` and `PostgresKeyStore` (fleets; behind the `redis` and `postgres`
//! features), or any [`KeyStore`] you implement.
//!
//! # Example
//!
//! ```
//! use tower_402::keys::{KeyHasher, Keys, MemoryKeyStore};
//! use tower_402::{ApiKey, IdentityResolver, ManualClock, Timestamp};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let clock = ManualClock::new(Timestamp::from_unix(1_000));
//! let keys = Keys::new(KeyHasher::hmac(b"server secret from your vault"), MemoryKeyStore::new())
//!     .with_clock(clock.clone());
//! keys.add("key_1", "sk_live_old", "acme").await?;
//!
//! // Rotate: the new key works at once, the old one for one more hour.
//! keys.rotate("key_1", "key_2", "sk_live_new", 3_600).await?;
//! let old = ApiKey::parse("sk_live_old")?;
//! let new = ApiKey::parse("sk_live_new")?;
//! assert_eq!(keys.resolve(&old).await?, Some("acme".into()));
//! assert_eq!(keys.resolve(&new).await?, Some("acme".into()));
//! clock.advance(3_600);
//! assert_eq!(keys.resolve(&old).await?, None); // now a 401, like any unknown key
//!
//! keys.revoke("key_2").await?;
//! assert_eq!(keys.resolve(&new).await?, None);
//! # Ok(())
//! # }
//! ```
//!
//! Hand `keys` to [`Billing::new`](crate::Billing::new) where a
//! [`StaticKeys`](crate::StaticKeys) would go: it is an [`IdentityResolver`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::account::{AccountId, ApiKey, IdentityResolver};
use crate::error::StoreError;
use crate::in_process::InProcessResolver;
use crate::time::{Clock, SystemClock, Timestamp};

/// The SHA-256 or HMAC-SHA256 digest of an API key: what a [`KeyStore`] keeps instead of the
/// key. Its [`Debug`](fmt::Debug) output shows only the first four bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Wraps 32 bytes read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyDigest(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters (how the Redis store names its keys).
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Parses [`to_hex`](Self::to_hex)'s output; `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(KeyDigest(out))
    }

    /// Compares two digests in constant time: how long it takes does not depend on where they
    /// first differ.
    pub fn ct_eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, ..] = self.0;
        write!(f, "KeyDigest({a:02x}{b:02x}{c:02x}{d:02x}…)")
    }
}

/// How raw keys become [`KeyDigest`]s. Every instance of a fleet must use the same hasher
/// (and secret) as the instance that added the keys.
#[derive(Clone)]
pub struct KeyHasher(Hasher);

#[derive(Clone)]
enum Hasher {
    Sha256,
    Hmac(Box<Hmac<Sha256>>),
}

impl KeyHasher {
    /// HMAC-SHA256 under a server secret (recommended): without the secret, a copy of the
    /// store is useless, even to a brute force over short keys. Keep the secret out of the
    /// store (a vault, an environment variable); rotating it means re-adding every key.
    pub fn hmac(secret: impl AsRef<[u8]>) -> Self {
        // HMAC accepts a key of any length: `new_from_slice` cannot fail for it.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_ref())
            .expect("HMAC takes keys of any length");
        KeyHasher(Hasher::Hmac(Box::new(mac)))
    }

    /// Plain SHA-256: enough when keys are long random strings (32 random bytes or more),
    /// which a digest cannot be reversed to.
    pub fn sha256() -> Self {
        KeyHasher(Hasher::Sha256)
    }

    /// The digest of `key`.
    pub fn digest(&self, key: &str) -> KeyDigest {
        let bytes: [u8; 32] = match &self.0 {
            Hasher::Sha256 => Sha256::digest(key.as_bytes()).into(),
            Hasher::Hmac(mac) => {
                let mut mac = (**mac).clone();
                mac.update(key.as_bytes());
                mac.finalize().into_bytes().into()
            }
        };
        KeyDigest(bytes)
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Hasher::Sha256 => f.write_str("KeyHasher::Sha256"),
            Hasher::Hmac(_) => f.write_str("KeyHasher::Hmac(<secret redacted>)"),
        }
    }
}

/// One stored key: its id (how operators name it; never secret), its digest, the account it
/// pays from, and until when it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The key's id (`key_2024_q3`, a database id, …): what [`Keys::revoke`] and
    /// [`Keys::rotate`] take. Ids are unique in a store.
    pub id: String,
    /// The digest of the key.
    pub digest: KeyDigest,
    /// The account that pays for requests made with the key.
    pub account: AccountId,
    /// The key is valid while the clock is before this time; `None`: until revoked. Set by
    /// [`Keys::rotate`] on the old key.
    pub not_after: Option<Timestamp>,
}

impl StoredKey {
    /// Whether the key is valid at `now`.
    pub fn valid_at(&self, now: Timestamp) -> bool {
        self.not_after.is_none_or(|end| now < end)
    }
}

/// Why a key could not be added or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Another key already has this id, or another id already has this key.
    #[error("a different key already exists with this id or this secret")]
    Conflict,
    /// No key has this id.
    #[error("no key with this id")]
    UnknownId,
    /// The raw key is not a valid API key (see [`ApiKey::parse`]).
    #[error("invalid API key: {0}")]
    Invalid(#[from] crate::account::CredentialError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where key digests live. Implemented by [`MemoryKeyStore`], `RedisKeyStore` and
/// `PostgresKeyStore`; implement it for your own database.
///
/// Every method must be atomic on its own: [`insert`](Self::insert) writes the digest and the
/// id together or not at all.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The key with this digest, if any (valid or not: [`Keys`] checks `not_after`).
    async fn find(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError>;

    /// The key with this id, if any.
    async fn by_id(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;

    /// Adds a key. Adding exactly the same key again is a success (a retried call); a key
    /// whose id or digest is taken by a different key is [`KeyError::Conflict`].
    async fn insert(&self, key: StoredKey) -> Result<(), KeyError>;

    /// Makes the key with this id invalid from `at` on (or earlier, if it already ends
    /// sooner). `now` is the caller's clock, for stores that forget invalid keys after a
    /// while. `false` if there is no such key.
    async fn expire(&self, id: &str, at: Timestamp, now: Timestamp) -> Result<bool, StoreError>;

    /// Deletes the key with this id. `false` if there was none.
    async fn remove(&self, id: &str) -> Result<bool, StoreError>;

    /// The keys of `account`, in no particular order (for an admin page).
    async fn keys_of(&self, account: &AccountId) -> Result<Vec<StoredKey>, StoreError>;

    /// A synchronous [`find`](Self::find) for stores that need no I/O (the
    /// [in-process fast path](crate::in_process)); `None` (the default) for the others.
    fn find_in_process(&self, digest: &KeyDigest) -> Option<Result<Option<StoredKey>, StoreError>> {
        let _ = digest;
        None
    }
}

#[async_trait]
impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    async fn find(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError> {
        (**self).find(digest).await
    }
    async fn by_id(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        (**self).by_id(id).await
    }
    async fn insert(&self, key: StoredKey) -> Result<(), KeyError> {
        (**self).insert(key).await
    }
    async fn expire(&self, id: &str, at: Timestamp, now: Timestamp) -> Result<bool, StoreError> {
        (**self).expire(id, at, now).await
    }
    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        (**self).remove(id).await
    }
    async fn keys_of(&self, account: &AccountId) -> Result<Vec<StoredKey>, StoreError> {
        (**self).keys_of(account).await
    }
    fn find_in_process(&self, digest: &KeyDigest) -> Option<Result<Option<StoredKey>, StoreError>> {
        (**self).find_in_process(digest)
    }
}

/// API keys as digests in a [`KeyStore`], with a clock for rotation overlaps. An
/// [`IdentityResolver`]. Clones share the store. See the [module docs](self).
#[derive(Clone)]
pub struct Keys<S> {
    hasher: KeyHasher,
    store: Arc<S>,
    clock: Arc<dyn Clock>,
}

impl<S: fmt::Debug> fmt::Debug for Keys<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("hasher", &self.hasher)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<S: KeyStore> Keys<S> {
    /// Keys digested by `hasher`, kept in `store`, on the system clock.
    pub fn new(hasher: KeyHasher, store: S) -> Self {
        Keys {
            hasher,
            store: Arc::new(store),
            clock: Arc::new(SystemClock),
        }
    }

    /// Reads the time (for rotation overlaps) from `clock`.
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Adds `key` (the raw secret, which is digested and dropped) under `id` for `account`.
    pub async fn add(
        &self,
        id: impl Into<String>,
        key: &str,
        account: impl Into<AccountId>,
    ) -> Result<(), KeyError> {
        let key = ApiKey::parse(key)?;
        let stored = StoredKey {
            id: id.into(),
            digest: self.hasher.digest(key.expose()),
            account: account.into(),
            not_after: None,
        };
        let id = stored.id.clone();
        self.store.insert(stored).await?;
        tracing::info!(key_id = %id, "API key added");
        Ok(())
    }

    /// Replaces key `old_id` by `new_key` under `new_id`, for the same account: the new key
    /// is valid at once, the old one for `overlap_secs` more seconds (0: not at all). Safe to
    /// retry: adding the same new key again succeeds, and the old key's end only moves earlier.
    pub async fn rotate(
        &self,
        old_id: &str,
        new_id: impl Into<String>,
        new_key: &str,
        overlap_secs: u64,
    ) -> Result<(), KeyError> {
        let old = self.store.by_id(old_id).await?.ok_or(KeyError::UnknownId)?;
        let new_id = new_id.into();
        self.add(new_id.clone(), new_key, old.account).await?;
        let now = self.clock.now();
        let end = now.plus_secs(overlap_secs);
        self.store.expire(old_id, end, now).await?;
        tracing::info!(old_key_id = old_id, new_key_id = %new_id, ends_at = %end, "API key rotated");
        Ok(())
    }

    /// Revokes key `id` now: from the next request on, it answers like an unknown key.
    /// `false` if there was no such key.
    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let removed = self.store.remove(id).await?;
        tracing::info!(key_id = id, removed, "API key revoked");
        Ok(removed)
    }

    /// The account of a presented key, if it is known and valid now.
    fn check(&self, digest: &KeyDigest, found: Option<StoredKey>) -> Option<AccountId> {
        let key = found?;
        // The store found it by digest; compare again in constant time, so a store that
        // matched on a prefix or a hash bucket cannot let a near miss through.
        if !key.digest.ct_eq(digest) || !key.valid_at(self.clock.now()) {
            return None;
        }
        Some(key.account)
    }
}

#[async_trait]
impl<S: KeyStore> IdentityResolver for Keys<S> {
    async fn resolve(&self, key: &ApiKey) -> Result<Option<AccountId>, StoreError> {
        let digest = self.hasher.digest(key.expose());
        let found = self.store.find(&digest).await?;
        Ok(self.check(&digest, found))
    }

    fn in_process(&self) -> Option<&dyn InProcessResolver> {
        // Probe with a digest no key has: a store that answers synchronously answers this too.
        self.store
            .find_in_process(&KeyDigest([0; 32]))
            .map(|_| self as &dyn InProcessResolver)
    }
}

impl<S: KeyStore> InProcessResolver for Keys<S> {
    fn resolve(&self, key: &str) -> Result<Option<AccountId>, StoreError> {
        let digest = self.hasher.digest(key);
        match self.store.find_in_process(&digest) {
            Some(found) => Ok(self.check(&digest, found?)),
            // `in_process` only hands out this resolver for stores that answer in process.
            None => Err(StoreError::unavailable(
                "key store has no in-process lookup",
            )),
        }
    }
}

/// Keys in this process's memory: for one instance, tests and demos. Clones share the table.
#[derive(Debug, Clone, Default)]
pub struct MemoryKeyStore {
    inner: Arc<RwLock<MemoryKeys>>,
}

#[derive(Debug, Default)]
struct MemoryKeys {
    by_digest: HashMap<KeyDigest, StoredKey>,
    by_id: HashMap<String, KeyDigest>,
}

impl MemoryKeyStore {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, MemoryKeys> {
        // A panic while holding the lock cannot leave the two maps inconsistent (every
        // write checks first, then inserts both), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MemoryKeys> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn find(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError> {
        Ok(self.read().by_digest.get(digest).cloned())
    }

    async fn by_id(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let t = self.read();
        Ok(t.by_id.get(id).and_then(|d| t.by_digest.get(d)).cloned())
    }

    async fn insert(&self, key: StoredKey) -> Result<(), KeyError> {
        let mut t = self.write();
        let same_id = t.by_id.get(&key.id);
        let same_digest = t.by_digest.get(&key.digest);
        match (same_id, same_digest) {
            (None, None) => {
                t.by_id.insert(key.id.clone(), key.digest);
                t.by_digest.insert(key.digest, key);
                Ok(())
            }
            (Some(d), Some(k))
                if *d == key.digest && k.id == key.id && k.account == key.account =>
            {
                Ok(())
            }
            _ => Err(KeyError::Conflict),
        }
    }

    async fn expire(&self, id: &str, at: Timestamp, _: Timestamp) -> Result<bool, StoreError> {
        let mut t = self.write();
        let Some(d) = t.by_id.get(id).copied() else {
            return Ok(false);
        };
        if let Some(k) = t.by_digest.get_mut(&d) {
            k.not_after = Some(k.not_after.map_or(at, |end| end.min(at)));
        }
        Ok(true)
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let mut t = self.write();
        let Some(d) = t.by_id.remove(id) else {
            return Ok(false);
        };
        t.by_digest.remove(&d);
        Ok(true)
    }

    async fn keys_of(&self, account: &AccountId) -> Result<Vec<StoredKey>, StoreError> {
        Ok(self
            .read()
            .by_digest
            .values()
            .filter(|k| &k.account == account)
            .cloned()
            .collect())
    }

    fn find_in_process(&self, digest: &KeyDigest) -> Option<Result<Option<StoredKey>, StoreError>> {
        Some(Ok(self.read().by_digest.get(digest).cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_depend_on_the_secret() {
        let a = KeyHasher::hmac(b"one").digest("sk_1");
        let b = KeyHasher::hmac(b"two").digest("sk_1");
        let c = KeyHasher::sha256().digest("sk_1");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, KeyHasher::hmac(b"one").digest("sk_1"));
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            KeyHasher::sha256().digest("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_garbage() {
        let d = KeyHasher::sha256().digest("k");
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(KeyDigest::from_hex("zz"), None);
        assert_eq!(KeyDigest::from_hex(&"g".repeat(64)), None);
        assert_eq!(KeyDigest::from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let h = KeyHasher::hmac(b"hunter2");
        assert!(!format!("{h:?}").contains("hunter2"));
        let d = h.digest("sk_live");
        assert_eq!(format!("{d:?}").len(), "KeyDigest(01234567…)".len());
    }
}
