//! Recorded responses: what a request with an `Idempotency-Key` answered, kept so its retry
//! gets the same answer without running the handler again.
//!
//! The metering layer writes one [`ResponseRecord`] when a keyed request's response body has
//! ended and its reservation was settled, and reads it back when the ledger says a retry's
//! reservation was already settled ([`Replay::Completed`](crate::ledger::Replay::Completed)).
//! The records live in the ledger's own backend, behind [`ResponseRecords`], which a
//! [`Ledger`](crate::Ledger) exposes with [`Ledger::records`](crate::Ledger::records).
//!
//! A record holds the digest of the request body (SHA-256, computed as the handler read the
//! body), so a retry with another body is told apart, and either the response (status,
//! headers, body, trailers) or the fact that it was too large to record.
//!
//! Records are bounded: each one expires after [`RecordLimits::retention_secs`], and an
//! account keeps at most [`RecordLimits::per_account`] (the oldest are dropped first). A retry
//! whose record is gone is refused (`409 IDEMPOTENCY_RESPONSE_NOT_RECORDED`), never run again.

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::{LedgerError, StoreError};
use crate::ledger::ReservationId;
use crate::time::Timestamp;

/// The digest of a request body: SHA-256 of the bytes the handler read, how many, and whether
/// that was the whole body.
///
/// SHA-256, not a fast 64-bit hash: the digest decides whether a request gets another
/// request's recorded response, so a client must not be able to craft a second body with the
/// same digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyDigest {
    /// SHA-256 of the bytes read.
    pub sha256: [u8; 32],
    /// How many bytes were read.
    pub len: u64,
    /// Whether they were the whole body. A handler that stopped reading early is
    /// fingerprinted by the bytes it read: a retry matches when it starts with them.
    pub complete: bool,
}

impl BodyDigest {
    /// The digest of a whole body.
    pub fn of(body: &[u8]) -> Self {
        BodyDigest {
            sha256: Sha256::digest(body).into(),
            len: body.len() as u64,
            complete: true,
        }
    }

    /// Whether a retry whose whole body is `body` is the request this digest was taken of.
    pub fn matches(&self, body: &[u8]) -> bool {
        let Ok(len) = usize::try_from(self.len) else {
            return false;
        };
        if self.complete {
            body.len() == len && BodyDigest::of(body).sha256 == self.sha256
        } else {
            body.get(..len)
                .is_some_and(|prefix| BodyDigest::of(prefix).sha256 == self.sha256)
        }
    }
}

/// A response as it was sent, to be sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lowercase) and values, in order, without hop-by-hop and per-request
    /// headers (see the [metering docs](crate::metering#idempotency)).
    pub headers: Vec<(String, Bytes)>,
    /// The whole body.
    pub body: Bytes,
    /// Trailers (a gRPC status), if the response had any.
    pub trailers: Vec<(String, Bytes)>,
}

/// What was recorded of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recording {
    /// The response itself.
    Response(RecordedResponse),
    /// The response was larger than the configured limit and was not kept.
    TooLarge,
}

/// One recorded answer, under its reservation's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRecord {
    /// The digest of the request body.
    pub body: BodyDigest,
    /// The response, or why it is missing.
    pub recording: Recording,
}

/// How long records live and how many an account keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Seconds a record is kept after it was written.
    pub retention_secs: u64,
    /// The most records one account keeps; writing one more drops the oldest.
    pub per_account: u64,
}

/// Where recorded responses live: a small store in the ledger's backend.
///
/// `put` replaces any record under the id; `get` answers `None` for an id never recorded,
/// expired (`now` at or past its write time plus the retention) or dropped for the
/// per-account cap.
///
/// ```
/// use tower_402::ledger::*;
/// use tower_402::{Ledger, MemoryLedger, Timestamp};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ledger = MemoryLedger::new();
/// let records = ledger.records().expect("the in-memory ledger keeps records");
/// let id = ReservationId { account: "acme".into(), key: "idem:order-42".into() };
/// let record = ResponseRecord { body: BodyDigest::of(b"{}"), recording: Recording::TooLarge };
/// let limits = RecordLimits { retention_secs: 60, per_account: 10 };
/// records.put(&id, &record, limits, Timestamp::EPOCH).await.unwrap();
/// assert_eq!(records.get(&id, Timestamp::from_unix(59)).await.unwrap(), Some(record));
/// assert_eq!(records.get(&id, Timestamp::from_unix(60)).await.unwrap(), None);
/// # }
/// ```
#[async_trait]
pub trait ResponseRecords: Send + Sync {
    /// Records `record` under `id`, expiring after `limits.retention_secs`, and drops the
    /// account's oldest records beyond `limits.per_account`.
    async fn put(
        &self,
        id: &ReservationId,
        record: &ResponseRecord,
        limits: RecordLimits,
        now: Timestamp,
    ) -> Result<(), LedgerError>;

    /// The record under `id`, if it is still kept.
    async fn get(
        &self,
        id: &ReservationId,
        now: Timestamp,
    ) -> Result<Option<ResponseRecord>, LedgerError>;
}

/// Format version of [`ResponseRecord::to_bytes`].
const VERSION: u8 = 1;

impl ResponseRecord {
    /// A compact, versioned binary form, for backends that store bytes (Redis, PostgreSQL).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(VERSION);
        out.extend_from_slice(&self.body.sha256);
        out.extend_from_slice(&self.body.len.to_be_bytes());
        out.push(u8::from(self.body.complete));
        match &self.recording {
            Recording::TooLarge => out.push(0),
            Recording::Response(r) => {
                out.push(1);
                out.extend_from_slice(&r.status.to_be_bytes());
                put_fields(&mut out, &r.headers);
                put_fields(&mut out, &r.trailers);
                put_bytes(&mut out, &r.body);
            }
        }
        out
    }

    /// Reads [`to_bytes`](Self::to_bytes)' form back; unreadable bytes are
    /// [`StoreError::Corrupt`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        let corrupt = || LedgerError::Store(StoreError::corrupt("unreadable response record"));
        let mut r = Reader(bytes);
        if r.u8().ok_or_else(corrupt)? != VERSION {
            return Err(corrupt());
        }
        let sha256: [u8; 32] = r
            .take(32)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(corrupt)?;
        let len = r.u64().ok_or_else(corrupt)?;
        let complete = r.u8().ok_or_else(corrupt)? != 0;
        let body = BodyDigest {
            sha256,
            len,
            complete,
        };
        let recording = match r.u8().ok_or_else(corrupt)? {
            0 => Recording::TooLarge,
            1 => {
                let status = r.u16().ok_or_else(corrupt)?;
                let headers = r.fields().ok_or_else(corrupt)?;
                let trailers = r.fields().ok_or_else(corrupt)?;
                let body = Bytes::copy_from_slice(r.bytes().ok_or_else(corrupt)?);
                Recording::Response(RecordedResponse {
                    status,
                    headers,
                    body,
                    trailers,
                })
            }
            _ => return Err(corrupt()),
        };
        if !r.0.is_empty() {
            return Err(corrupt());
        }
        Ok(ResponseRecord { body, recording })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_fields(out: &mut Vec<u8>, fields: &[(String, Bytes)]) {
    out.extend_from_slice(&(fields.len() as u64).to_be_bytes());
    for (name, value) in fields {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    fn fields(&mut self) -> Option<Vec<(String, Bytes)>> {
        let n = self.u64()?;
        // Each field takes at least 16 bytes: a corrupt count cannot allocate much.
        let mut fields = Vec::with_capacity(usize::try_from(n.min(self.0.len() as u64 / 16)).ok()?);
        for _ in 0..n {
            let name = std::str::from_utf8(self.bytes()?).ok()?.to_owned();
            let value = Bytes::copy_from_slice(self.bytes()?);
            fields.push((name, value));
        }
        Some(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let record = ResponseRecord {
            body: BodyDigest::of(b"hello"),
            recording: Recording::Response(RecordedResponse {
                status: 200,
                headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
                body: Bytes::from_static(b"world"),
                trailers: vec![("grpc-status".into(), Bytes::from_static(b"0"))],
            }),
        };
        let bytes = record.to_bytes();
        assert_eq!(ResponseRecord::from_bytes(&bytes).unwrap(), record);
        for cut in 0..bytes.len() {
            assert!(ResponseRecord::from_bytes(&bytes[..cut]).is_err(), "{cut}");
        }
        let too_large = ResponseRecord {
            body: BodyDigest::of(b""),
            recording: Recording::TooLarge,
        };
        assert_eq!(
            ResponseRecord::from_bytes(&too_large.to_bytes()).unwrap(),
            too_large
        );
    }

    #[test]
    fn digests_match_whole_bodies_and_read_prefixes() {
        let d = BodyDigest::of(b"abc");
        assert!(d.matches(b"abc"));
        assert!(!d.matches(b"abd"));
        assert!(!d.matches(b"abcd"));
        let partial = BodyDigest {
            complete: false,
            ..BodyDigest::of(b"ab")
        };
        assert!(partial.matches(b"abz"));
        assert!(!partial.matches(b"a"));
        assert!(!partial.matches(b"xbz"));
    }
}
