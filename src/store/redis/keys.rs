//! [`RedisKeyStore`]: API key digests on Redis, for [`Keys`](crate::keys::Keys).

use super::*;
use crate::keys::{KeyDigest, KeyError, KeyStore, StoredKey};

const INSERT: &str = include_str!("keys_insert.lua");
const EXPIRE: &str = include_str!("keys_expire.lua");
const REMOVE: &str = include_str!("keys_remove.lua");

/// How long Redis keeps a key's entries after it stopped being valid (for an audit, and so a
/// late `rotate` retry still finds the old key).
const KEEP_INVALID_SECS: u64 = 86_400;

/// API key digests in Redis. Clones share the connection.
///
/// Every key lives in one hash slot (the `{keys}` tag), so the scripts that touch several of
/// them run on a Redis Cluster too:
///
/// | key | type | holds |
/// |---|---|---|
/// | `{prefix}{keys}:d:<digest hex>` | hash | `id`, `account`, `not_after` (unix seconds, once rotated) |
/// | `{prefix}{keys}:i:<len>:<id>` | string | the digest hex |
/// | `{prefix}{keys}:a:<len>:<account>` | set | the account's key ids |
///
/// No raw key is ever written. A rotated key's entries expire a day after its end (a TTL
/// counted from the caller's clock, not Redis's).
#[derive(Clone)]
pub struct RedisKeyStore {
    conn: Conn,
    prefix: String,
    scripts: Arc<[Script; 3]>,
}

impl fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKeyStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisKeyStore {
    /// A key store with its own connection, opened on first use.
    pub fn new(config: &RedisConfig) -> Self {
        RedisKeyStore {
            conn: config.connection(),
            prefix: config.prefix.clone(),
            scripts: Arc::new([
                Script::new(INSERT),
                Script::new(EXPIRE),
                Script::new(REMOVE),
            ]),
        }
    }

    fn digest_prefix(&self) -> String {
        format!("{}{{keys}}:d:", self.prefix)
    }

    fn account_prefix(&self) -> String {
        format!("{}{{keys}}:a:", self.prefix)
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}{{keys}}:i:{}:{id}", self.prefix, id.len())
    }

    fn account_key(&self, account: &AccountId) -> String {
        let a = account.as_str();
        format!("{}{}:{a}", self.account_prefix(), a.len())
    }

    async fn read(&self, hex: &str) -> Result<Option<StoredKey>, StoreError> {
        let Some(digest) = KeyDigest::from_hex(hex) else {
            return Err(StoreError::corrupt("unreadable key digest"));
        };
        let mut conn = self.conn.get().await?;
        let (id, account, not_after): (Option<String>, Option<String>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(format!("{}{hex}", self.digest_prefix()))
                .arg("id")
                .arg("account")
                .arg("not_after")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
        let (Some(id), Some(account)) = (id, account) else {
            return Ok(None);
        };
        Ok(Some(StoredKey {
            id,
            digest,
            account: account.into(),
            not_after: not_after.map(Timestamp::from_unix),
        }))
    }
}

#[async_trait]
impl KeyStore for RedisKeyStore {
    async fn find(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError> {
        self.read(&digest.to_hex()).await
    }

    async fn by_id(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let mut conn = self.conn.get().await?;
        let hex: Option<String> = redis::cmd("GET")
            .arg(self.id_key(id))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        match hex {
            Some(hex) => self.read(&hex).await,
            None => Ok(None),
        }
    }

    async fn insert(&self, key: StoredKey) -> Result<(), KeyError> {
        let hex = key.digest.to_hex();
        let mut conn = self.conn.get().await?;
        let mut inv = self.scripts[0].key(format!("{}{hex}", self.digest_prefix()));
        inv.key(self.id_key(&key.id))
            .key(self.account_key(&key.account))
            .arg(&key.id)
            .arg(key.account.as_str())
            .arg(&hex);
        let added: i64 = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        if added != 1 {
            return Err(KeyError::Conflict);
        }
        if let Some(end) = key.not_after {
            self.expire(&key.id, end, end).await?;
        }
        Ok(())
    }

    async fn expire(&self, id: &str, at: Timestamp, now: Timestamp) -> Result<bool, StoreError> {
        let mut conn = self.conn.get().await?;
        let mut inv = self.scripts[1].key(self.id_key(id));
        inv.arg(self.digest_prefix())
            .arg(at.unix())
            .arg(now.unix())
            .arg(KEEP_INVALID_SECS);
        let found: i64 = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(found == 1)
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.get().await?;
        let mut inv = self.scripts[2].key(self.id_key(id));
        inv.arg(self.digest_prefix())
            .arg(self.account_prefix())
            .arg(id);
        let removed: i64 = inv.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(removed == 1)
    }

    async fn keys_of(&self, account: &AccountId) -> Result<Vec<StoredKey>, StoreError> {
        let mut conn = self.conn.get().await?;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.account_key(account))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            // An id whose entries Redis already forgot (rotated out a day ago) is skipped.
            if let Some(k) = self.by_id(&id).await? {
                keys.push(k);
            }
        }
        Ok(keys)
    }
}
