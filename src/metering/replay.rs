//! Recorded replays: the digest of a keyed request's body as the handler reads it, the
//! recording of its response as it streams, and the answer a retry gets.
//!
//! Only requests with an `Idempotency-Key` come here; the others take no lock, hash nothing
//! and record nothing.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::backend::bounded;
use crate::body::ResponseBody;
use crate::error::LedgerError;
use crate::ledger::{BodyDigest, RecordedResponse, Recording, ReservationId, ResponseRecord};
use crate::metering::headers::mark_replayed;
use crate::metering::MeterConfig;

/// The digest of a request body, fed by [`RequestBody`](crate::metering::RequestBody) as the
/// handler reads it: bounded memory whatever the body's length.
pub(crate) struct Tap {
    hasher: Sha256,
    len: u64,
    complete: bool,
}

/// Shared between the request body (which feeds it) and the response's recorder (which reads
/// it when the response ends). Locked for one update at a time, never across an `.await`.
pub(crate) type SharedTap = Arc<Mutex<Tap>>;

impl Tap {
    /// A tap for a body still to be read; `ended`: the body is already known to be empty.
    pub(crate) fn new(ended: bool) -> SharedTap {
        Arc::new(Mutex::new(Tap {
            hasher: Sha256::new(),
            len: 0,
            complete: ended,
        }))
    }

    /// The digest of a body the layer read whole (to price it).
    pub(crate) fn whole(body: &[u8]) -> SharedTap {
        let tap = Tap::new(true);
        lock(&tap).feed(body);
        tap
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len = self.len.saturating_add(data.len() as u64);
    }

    pub(crate) fn end(&mut self) {
        self.complete = true;
    }

    fn digest(&self) -> BodyDigest {
        BodyDigest {
            sha256: self.hasher.clone().finalize().into(),
            len: self.len,
            complete: self.complete,
        }
    }
}

pub(crate) fn lock(tap: &SharedTap) -> std::sync::MutexGuard<'_, Tap> {
    // Every update is whole before the lock is released: a poisoned lock is safe to use.
    tap.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Headers never recorded: hop-by-hop ones (RFC 9110 §7.6.1), those the server writes per
/// response (`content-length`, `date`), and the metering layer's per-request ones, which
/// describe the balance at the first attempt, not at the replay.
fn recorded_header(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "date"
            | "x-credits-remaining"
            | "x-allowance-remaining"
            | "x-allowance-reset"
            | "x-payment-warning"
            | "idempotent-replayed"
    )
}

fn fields(headers: &HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .filter(|(name, _)| recorded_header(name))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// Records a keyed request's response as it streams, up to the configured size.
pub(crate) struct Recorder {
    id: ReservationId,
    tap: SharedTap,
    limit: usize,
    status: u16,
    headers: Vec<(String, Bytes)>,
    /// Frames as they went out (reference counted, not copied), while within the limit.
    frames: Vec<Bytes>,
    size: usize,
    trailers: Vec<(String, Bytes)>,
    too_large: bool,
}

impl Recorder {
    pub(crate) fn new(id: ReservationId, tap: SharedTap, limit: usize) -> Self {
        Recorder {
            id,
            tap,
            limit,
            status: 0,
            headers: Vec::new(),
            frames: Vec::new(),
            size: 0,
            trailers: Vec::new(),
            too_large: false,
        }
    }

    /// The response head, after the layer took out what it reads (a usage header).
    pub(crate) fn head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.status = status.as_u16();
        self.headers = fields(headers);
    }

    fn over(&mut self) {
        if !self.too_large {
            tracing::info!(
                target: "tower_402::metering",
                account = self.id.account.as_str(),
                limit = self.limit,
                "response larger than the recording limit; a retry with its key will be refused"
            );
        }
        self.too_large = true;
        self.frames = Vec::new();
    }

    pub(crate) fn data(&mut self, chunk: &Bytes) {
        if self.too_large {
            return;
        }
        self.size = self.size.saturating_add(chunk.len());
        if self.size > self.limit {
            self.over();
        } else if !chunk.is_empty() {
            self.frames.push(chunk.clone());
        }
    }

    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        self.trailers = fields(trailers);
    }

    fn into_record(self) -> (ReservationId, ResponseRecord) {
        let body = lock(&self.tap).digest();
        let recording = if self.too_large {
            Recording::TooLarge
        } else {
            let body = match self.frames.as_slice() {
                [] => Bytes::new(),
                [one] => one.clone(),
                many => {
                    let mut all = BytesMut::with_capacity(self.size);
                    for f in many {
                        all.extend_from_slice(f);
                    }
                    all.freeze()
                }
            };
            Recording::Response(RecordedResponse {
                status: self.status,
                headers: self.headers,
                body,
                trailers: self.trailers,
            })
        };
        (self.id, ResponseRecord { body, recording })
    }

    /// Writes the record (the body ended and the request was settled). A failure is logged:
    /// the retry then finds no record and is refused, never run again.
    pub(crate) async fn write(self, config: &MeterConfig) {
        let (id, record) = self.into_record();
        let Some(records) = config.ledger.records() else {
            tracing::warn!(
                target: "tower_402::metering",
                account = id.account.as_str(),
                "the ledger keeps no recorded responses; a retry with this key will be refused"
            );
            return;
        };
        let now = config.clock.now();
        let put = records.put(&id, &record, config.records, now);
        match bounded::<_, LedgerError>("records.put", config.timeout, put).await {
            Ok(()) => tracing::debug!(
                target: "tower_402::metering",
                account = id.account.as_str(),
                too_large = matches!(record.recording, Recording::TooLarge),
                "response recorded for idempotent retries"
            ),
            Err(e) => tracing::error!(
                target: "tower_402::metering",
                account = id.account.as_str(),
                error = %e,
                "could not record the response; a retry with this key will be refused"
            ),
        }
    }
}

/// The recorded response, sent again with `idempotent-replayed: true`.
pub(crate) fn replayed<B>(r: RecordedResponse) -> Response<ResponseBody<B>> {
    let to_map = |fields: Vec<(String, Bytes)>| {
        let mut map = HeaderMap::with_capacity(fields.len());
        for (name, value) in fields {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_maybe_shared(value),
            ) {
                map.append(n, v);
            }
        }
        map
    };
    let trailers = (!r.trailers.is_empty()).then(|| to_map(r.trailers));
    let mut res = Response::new(ResponseBody::recorded(r.body, trailers));
    *res.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
    *res.headers_mut() = to_map(r.headers);
    mark_replayed(res.headers_mut());
    res
}
