//! [`PostgresKeyStore`]: API key digests in PostgreSQL, for [`Keys`](crate::keys::Keys).

use super::*;
use crate::keys::{KeyDigest, KeyError, KeyStore, StoredKey};

/// API key digests in PostgreSQL. Clones share the pool.
///
/// One table, `{prefix}api_keys`: the digest (`bytea`, the primary key), the key's id (unique),
/// the account and, once rotated, `not_after` (unix seconds). No raw key is ever written.
/// [`PostgresKeyStore::migrate`] creates it; it is separate from the ledger's migration, so a
/// deployment that resolves keys elsewhere never gets the table.
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: Pool,
    config: PostgresConfig,
    sql: Arc<KeySql>,
}

struct KeySql {
    create: String,
    find: String,
    by_id: String,
    insert: String,
    existing: String,
    expire: String,
    remove: String,
    of_account: String,
}

impl fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresKeyStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresKeyStore {
    /// A key store on `pool`, in the schema and with the table prefix of `config`.
    pub fn new(pool: Pool, config: PostgresConfig) -> Self {
        let t = config.table("api_keys");
        let p = config.table_prefix_name();
        let sql = KeySql {
            create: format!(
                r#"CREATE SCHEMA IF NOT EXISTS "{schema}";
CREATE TABLE IF NOT EXISTS {t} (
    digest    bytea  PRIMARY KEY CHECK (octet_length(digest) = 32),
    id        text   NOT NULL UNIQUE,
    account   text   NOT NULL,
    not_after bigint
);
CREATE INDEX IF NOT EXISTS "{p}api_keys_account" ON {t} (account);"#,
                schema = config.schema_name()
            ),
            find: format!("SELECT id, account, not_after FROM {t} WHERE digest = $1"),
            by_id: format!("SELECT digest, account, not_after FROM {t} WHERE id = $1"),
            insert: format!(
                "INSERT INTO {t} (digest, id, account, not_after) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING"
            ),
            existing: format!(
                "SELECT count(*) FROM {t} WHERE digest = $1 AND id = $2 AND account = $3"
            ),
            expire: format!(
                "UPDATE {t} SET not_after = LEAST(COALESCE(not_after, $2), $2) WHERE id = $1"
            ),
            remove: format!("DELETE FROM {t} WHERE id = $1"),
            of_account: format!("SELECT digest, id, not_after FROM {t} WHERE account = $1"),
        };
        PostgresKeyStore {
            pool,
            config,
            sql: Arc::new(sql),
        }
    }

    /// Creates the schema and the table if missing. Idempotent.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            client
                .batch_execute(&self.sql.create)
                .await
                .map_err(pg_error)
        })
        .await
    }

    async fn one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let st = client.prepare_cached(sql).await.map_err(pg_error)?;
            client.query_opt(&st, params).await.map_err(pg_error)
        })
        .await
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let st = client.prepare_cached(sql).await.map_err(pg_error)?;
            client.execute(&st, params).await.map_err(pg_error)
        })
        .await
    }
}

fn digest_col(row: &tokio_postgres::Row, i: usize) -> Result<KeyDigest, StoreError> {
    let bytes: Vec<u8> = row.get(i);
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| corrupt("key digest is not 32 bytes"))?;
    Ok(KeyDigest::from_bytes(bytes))
}

fn end_col(row: &tokio_postgres::Row, i: usize) -> Result<Option<Timestamp>, StoreError> {
    row.get::<_, Option<i64>>(i)
        .map(|v| u64::try_from(v).map(Timestamp::from_unix))
        .transpose()
        .map_err(|_| corrupt("negative key end"))
}

fn secs(at: Timestamp) -> Result<i64, StoreError> {
    i64::try_from(at.unix()).map_err(|_| corrupt("key end beyond bigint"))
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    async fn find(&self, digest: &KeyDigest) -> Result<Option<StoredKey>, StoreError> {
        let d: &[u8] = digest.as_bytes();
        let Some(row) = self.one(&self.sql.find, &[&d]).await? else {
            return Ok(None);
        };
        Ok(Some(StoredKey {
            id: row.get(0),
            digest: *digest,
            account: row.get::<_, String>(1).into(),
            not_after: end_col(&row, 2)?,
        }))
    }

    async fn by_id(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let Some(row) = self.one(&self.sql.by_id, &[&id]).await? else {
            return Ok(None);
        };
        Ok(Some(StoredKey {
            id: id.to_owned(),
            digest: digest_col(&row, 0)?,
            account: row.get::<_, String>(1).into(),
            not_after: end_col(&row, 2)?,
        }))
    }

    async fn insert(&self, key: StoredKey) -> Result<(), KeyError> {
        let d: &[u8] = key.digest.as_bytes();
        let end = key.not_after.map(secs).transpose()?;
        let account = key.account.as_str();
        let added = self
            .execute(&self.sql.insert, &[&d, &key.id, &account, &end])
            .await?;
        if added == 1 {
            return Ok(());
        }
        // Either exactly this key is already there (a retried call), or a different key holds
        // the id or the digest.
        let row = self
            .one(&self.sql.existing, &[&d, &key.id, &account])
            .await?;
        match row.map(|r| r.get::<_, i64>(0)) {
            Some(1) => {
                if let Some(end) = key.not_after {
                    self.expire(&key.id, end, end).await?;
                }
                Ok(())
            }
            _ => Err(KeyError::Conflict),
        }
    }

    async fn expire(&self, id: &str, at: Timestamp, _: Timestamp) -> Result<bool, StoreError> {
        let at = secs(at)?;
        Ok(self.execute(&self.sql.expire, &[&id, &at]).await? == 1)
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.execute(&self.sql.remove, &[&id]).await? == 1)
    }

    async fn keys_of(&self, account: &AccountId) -> Result<Vec<StoredKey>, StoreError> {
        let rows = timed(self.config.op_timeout, async {
            let client = self.pool.get().await.map_err(pool_error)?;
            let st = client
                .prepare_cached(&self.sql.of_account)
                .await
                .map_err(pg_error)?;
            client
                .query(&st, &[&account.as_str()])
                .await
                .map_err(pg_error)
        })
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredKey {
                    id: row.get(1),
                    digest: digest_col(row, 0)?,
                    account: account.clone(),
                    not_after: end_col(row, 2)?,
                })
            })
            .collect()
    }
}
