//! Accounts and identity: who is calling and who pays.
//!
//! A request is mapped to an [`AccountId`] in one of two ways:
//!
//! - an **API key**, read from `x-api-key` or `Authorization: Bearer <key>` (see
//!   [`ApiKey::from_headers`]) and resolved by an [`IdentityResolver`]: a static table
//!   ([`StaticKeys`]), a closure, or your own async implementation backed by a database;
//! - an **`AccountId` already in the request extensions**, put there by an authentication layer
//!   that runs earlier (sessions, OAuth, mTLS). The gate trusts it and skips the key.
//!
//! # A resolver of your own
//!
//! ```
//! use async_trait::async_trait;
//! use tower_402::{AccountId, ApiKey, IdentityResolver, StoreError};
//!
//! struct KeysInMyDatabase;
//!
//! #[async_trait]
//! impl IdentityResolver for KeysInMyDatabase {
//!     async fn resolve(&self, key: &ApiKey) -> Result<Option<AccountId>, StoreError> {
//!         // SELECT account FROM api_keys WHERE key_hash = $1 ...
//!         Ok(key.expose().strip_prefix("acct_").map(AccountId::new))
//!     }
//! }
//! ```

use crate::FastMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::in_process::InProcessResolver;

/// Who pays: an opaque account identifier.
///
/// Cheap to clone (reference counted).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(Arc<str>);

impl AccountId {
    /// An account id from any string.
    pub fn new(id: impl AsRef<str>) -> Self {
        AccountId(Arc::from(id.as_ref()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for AccountId {
    fn from(s: &str) -> Self {
        AccountId::new(s)
    }
}

impl From<String> for AccountId {
    fn from(s: String) -> Self {
        AccountId(Arc::from(s))
    }
}

/// Parsed once: a lookup by `&str` would parse the name on every request.
static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// The longest API key accepted, in bytes. Longer keys are refused before any lookup.
pub const MAX_API_KEY_LEN: usize = 256;

/// An API key taken from a request.
///
/// Its [`Debug`](fmt::Debug) output is redacted, so a key never reaches a log line by accident.
/// Only [`ApiKey::expose`] gives the secret back.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKey(Box<str>);

impl ApiKey {
    /// Validates a key: 1 to [`MAX_API_KEY_LEN`] bytes of visible ASCII (no spaces, no control
    /// characters).
    pub fn parse(key: &str) -> Result<Self, CredentialError> {
        validate(key).map(|k| ApiKey(k.into()))
    }

    /// Reads the key from `x-api-key`, or else from `Authorization: Bearer <key>`.
    ///
    /// Returns `Ok(None)` when neither header is present. A header that is present but
    /// malformed (not UTF-8, another auth scheme, an empty or oversized key, two different keys)
    /// is an error: guessing would be worse.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, CredentialError> {
        Ok(key_in_headers(headers)?.map(|k| ApiKey(k.into())))
    }

    /// A key [`key_in_headers`] already validated.
    pub(crate) fn validated(key: &str) -> Self {
        ApiKey(key.into())
    }

    /// The secret itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Checks a key: 1 to [`MAX_API_KEY_LEN`] bytes of visible ASCII.
fn validate(key: &str) -> Result<&str, CredentialError> {
    if key.is_empty() {
        return Err(CredentialError::Malformed("empty API key"));
    }
    if key.len() > MAX_API_KEY_LEN {
        return Err(CredentialError::Malformed("API key too long"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CredentialError::Malformed(
            "API key contains characters outside visible ASCII",
        ));
    }
    Ok(key)
}

/// [`ApiKey::from_headers`] without the copy: the validated key, borrowed from the headers.
pub(crate) fn key_in_headers(headers: &HeaderMap) -> Result<Option<&str>, CredentialError> {
    let mut found: Option<&str> = None;
    let mut x_api_key = headers.get_all(&X_API_KEY).iter();
    if let Some(value) = x_api_key.next() {
        if x_api_key.next().is_some() {
            return Err(CredentialError::Malformed("more than one x-api-key header"));
        }
        let s = value
            .to_str()
            .map_err(|_| CredentialError::Malformed("x-api-key is not visible ASCII"))?;
        found = Some(validate(s.trim())?);
    }
    let mut auth = headers.get_all(http::header::AUTHORIZATION).iter();
    if let Some(value) = auth.next() {
        if auth.next().is_some() {
            return Err(CredentialError::Malformed(
                "more than one Authorization header",
            ));
        }
        let s = value
            .to_str()
            .map_err(|_| CredentialError::Malformed("Authorization is not visible ASCII"))?;
        let (scheme, rest) = s.trim().split_once(' ').unwrap_or((s.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(CredentialError::Malformed(
                "Authorization scheme must be Bearer",
            ));
        }
        let key = validate(rest.trim())?;
        match &found {
            Some(k) if *k != key => {
                return Err(CredentialError::Malformed(
                    "x-api-key and Authorization carry different keys",
                ))
            }
            _ => found = Some(key),
        }
    }
    Ok(found)
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why a credential could not even be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The header is present but unusable; the text says how, without repeating the key.
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
}

/// Maps an API key to the account that pays for its requests.
///
/// Returning `Ok(None)` means "no such key" and produces a 401. An `Err` means the lookup
/// itself failed (a database down) and produces a 503, or a pass-through when the gate is
/// configured to fail open.
///
/// Implemented for [`StaticKeys`], for `Arc<T>` of any resolver, and for closures
/// `Fn(&ApiKey) -> Option<AccountId>` (synchronous lookups).
#[async_trait]
pub trait IdentityResolver: Send + Sync + 'static {
    /// Looks the key up.
    async fn resolve(&self, key: &ApiKey) -> Result<Option<AccountId>, StoreError>;

    /// The resolver's [in-process fast path](crate::in_process), if it needs no I/O (a table
    /// in memory): `None` (the default) has the gate call [`resolve`](Self::resolve).
    fn in_process(&self) -> Option<&dyn InProcessResolver> {
        None
    }
}

#[async_trait]
impl<T: IdentityResolver + ?Sized> IdentityResolver for Arc<T> {
    async fn resolve(&self, key: &ApiKey) -> Result<Option<AccountId>, StoreError> {
        (**self).resolve(key).await
    }

    fn in_process(&self) -> Option<&dyn InProcessResolver> {
        (**self).in_process()
    }
}

#[async_trait]
impl<F> IdentityResolver for F
where
    F: Fn(&ApiKey) -> Option<AccountId> + Send + Sync + 'static,
{
    async fn resolve(&self, key: &ApiKey) -> Result<Option<AccountId>, StoreError> {
        Ok(self(key))
    }

    fn in_process(&self) -> Option<&dyn InProcessResolver> {
        Some(self)
    }
}

impl<F> InProcessResolver for F
where
    F: Fn(&ApiKey) -> Option<AccountId> + Send + Sync + 'static,
{
    fn resolve(&self, key: &str) -> Result<Option<AccountId>, StoreError> {
        Ok(self(&ApiKey(key.into())))
    }
}

/// A fixed table of API keys, held in memory.
///
/// ```
/// use tower_402::{AccountId, StaticKeys};
///
/// let keys = StaticKeys::new()
///     .with_key("sk_live_abc", "acme")
///     .with_key("sk_live_def", "globex");
/// assert_eq!(keys.len(), 2);
/// ```
#[derive(Clone, Default)]
pub struct StaticKeys {
    keys: Arc<FastMap<Box<str>, AccountId>>,
}

impl StaticKeys {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key for an account.
    pub fn with_key(mut self, key: impl Into<String>, account: impl Into<AccountId>) -> Self {
        Arc::make_mut(&mut self.keys).insert(key.into().into_boxed_str(), account.into());
        self
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

#[async_trait]
impl IdentityResolver for StaticKeys {
    async fn resolve(&self, key: &ApiKey) -> Result<Option<AccountId>, StoreError> {
        Ok(self.keys.get(key.expose()).cloned())
    }

    fn in_process(&self) -> Option<&dyn InProcessResolver> {
        Some(self)
    }
}

impl InProcessResolver for StaticKeys {
    fn resolve(&self, key: &str) -> Result<Option<AccountId>, StoreError> {
        Ok(self.keys.get(key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_either_header() {
        let k = ApiKey::from_headers(&headers(&[("x-api-key", b"abc")])).unwrap();
        assert_eq!(k.unwrap().expose(), "abc");
        let k = ApiKey::from_headers(&headers(&[("authorization", b"Bearer abc")])).unwrap();
        assert_eq!(k.unwrap().expose(), "abc");
        let k = ApiKey::from_headers(&headers(&[("authorization", b"bearer   abc ")])).unwrap();
        assert_eq!(k.unwrap().expose(), "abc");
        assert!(ApiKey::from_headers(&HeaderMap::new()).unwrap().is_none());
    }

    #[test]
    fn refuses_malformed_keys() {
        let long = vec![b'a'; MAX_API_KEY_LEN + 1];
        for bad in [
            headers(&[("x-api-key", b"")]),
            headers(&[("x-api-key", &long)]),
            headers(&[("x-api-key", b"caf\xc3\xa9")]),
            headers(&[("x-api-key", b"a"), ("x-api-key", b"b")]),
            headers(&[("authorization", b"Basic dXNlcjpwYXNz")]),
            headers(&[("authorization", b"Bearer")]),
            headers(&[("authorization", b"Bearer a b")]),
            headers(&[("x-api-key", b"a"), ("authorization", b"Bearer b")]),
        ] {
            assert!(ApiKey::from_headers(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = ApiKey::parse("sk_live_secret").unwrap();
        assert!(!format!("{k:?}").contains("secret"));
    }
}
