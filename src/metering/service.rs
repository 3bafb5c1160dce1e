use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::account::AccountId;
use crate::backend::{bounded, is_outage};
use crate::decision::{Cost, Denial};
use crate::error::LedgerError;
use crate::gate::{Entitlement, FailedOpen, FailureMode, PublicRoute};
use crate::ledger::{Charge, Replay, ReservationKey, ReserveOutcome, ReserveRequest, Usage};
use crate::metering::future::{Prepared, ResponseFuture};
use crate::metering::request_body::{peek, PeekError};
use crate::metering::{MeterConfig, MeteringLayer, PricingRequest, RequestBody, StackText};
use crate::problem::is_grpc;
use crate::time::Timestamp;

/// The service made by [`MeteringLayer`]. See the [module docs](crate::metering).
#[derive(Clone)]
pub struct Metering<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<MeterConfig>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Metering<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metering")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Metering<S> {
    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &MeteringLayer) -> Self {
        Metering {
            inner,
            config: layer.config.clone(),
        }
    }

    /// Returns `layer` itself: build the layer with [`MeteringLayer::new`].
    pub fn layer(layer: MeteringLayer) -> MeteringLayer {
        layer
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Usage the handler reports, in the response extensions; settled instead of the estimate.
///
/// Units of meters the request did not reserve are ignored (and logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedUsage(pub Vec<Usage>);

impl ReportedUsage {
    /// `units` of one meter.
    pub fn units(meter: impl AsRef<str>, units: u64) -> Self {
        ReportedUsage(vec![Usage::new(meter, units)])
    }
}

/// Parsed once: a lookup by `&str` would parse the name on every request.
static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Reads and validates the `Idempotency-Key` header.
///
/// `Ok(None)` when absent; `Ok(Some(key))` for 1 to 255 characters of visible ASCII (spaces
/// allowed inside, surrounding quotes of the structured-field form removed); otherwise the
/// `400 INVALID_IDEMPOTENCY_KEY` denial to answer with. Use it in your own handlers (a top-up
/// endpoint) to validate keys exactly as the metering layer does.
///
/// ```
/// use http::HeaderMap;
/// use tower_402::metering::idempotency_key;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("idempotency-key", "order-42".parse().unwrap());
/// assert_eq!(idempotency_key(&headers).unwrap(), Some("order-42"));
/// headers.insert("idempotency-key", "".parse().unwrap());
/// assert_eq!(idempotency_key(&headers).unwrap_err().code(), "INVALID_IDEMPOTENCY_KEY");
/// ```
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Denial> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = |detail: &'static str| Denial::BadRequest {
        code: "INVALID_IDEMPOTENCY_KEY",
        detail: detail.into(),
    };
    if values.next().is_some() {
        return Err(bad("Send exactly one Idempotency-Key header."));
    }
    let raw = value
        .to_str()
        .map_err(|_| bad("The Idempotency-Key must be visible ASCII."))?;
    // The IETF draft writes the key as a structured-field string: accept it quoted or bare.
    let key = raw
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(raw);
    if key.is_empty() {
        return Err(bad("The Idempotency-Key is empty."));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(bad("The Idempotency-Key is longer than 255 characters."));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(bad("The Idempotency-Key must be visible ASCII."));
    }
    Ok(Some(key))
}

/// A stable 64-bit FNV-1a digest: the same on every instance and every Rust version, so a
/// retry reaching another instance of a fleet has the same fingerprint.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub(crate) fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        self
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

/// The reservation key for a request's `Idempotency-Key` (at most
/// [`MAX_IDEMPOTENCY_KEY_LEN`] characters, so it fits the stack buffer).
fn idempotent_key(key: &str) -> ReservationKey {
    let mut text = StackText::<320>::new();
    if text.push("idem:") && text.push(key) {
        ReservationKey::from(text.as_str())
    } else {
        ReservationKey::from(format!("idem:{key}"))
    }
}

/// A key unique to this request, for requests without an `Idempotency-Key`: a random
/// per-process prefix (instances of a fleet share one ledger) and a counter.
fn unique_key() -> ReservationKey {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let nonce = RandomState::new().hash_one(std::process::id());
        format!("req:{nonce:016x}:")
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = StackText::<64>::new();
    text.push(prefix);
    text.push(itoa::Buffer::new().format(n));
    ReservationKey::from(text.as_str())
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metering<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<crate::metering::MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let now = config.clock.now();
        // A gRPC request gets gRPC answers, and its errors are not billed.
        let grpc = is_grpc(req.headers());
        let ext = req.extensions();
        if ext.get::<PublicRoute>().is_some() {
            return ResponseFuture::unmetered(self.inner.call(req.map(RequestBody::passthrough)));
        }
        let payer = match (ext.get::<Entitlement>(), ext.get::<AccountId>()) {
            (Some(_), _) => Payer::InRequest,
            _ if ext.get::<FailedOpen>().is_some() => {
                tracing::warn!(
                    target: "tower_402::metering",
                    "gate failed open; request served unmetered"
                );
                return ResponseFuture::unmetered(
                    self.inner.call(req.map(RequestBody::passthrough)),
                );
            }
            (None, Some(a)) => Payer::Account(Entitlement::new(a.clone())),
            (None, None) => {
                tracing::error!(
                    target: "tower_402::metering",
                    "no Entitlement or AccountId in the request: is PaymentGateLayer in front of MeteringLayer?"
                );
                let denial = Denial::Unavailable {
                    retry_after_secs: config.retry_after_secs,
                };
                return ResponseFuture::refused(denial, config.clone(), now, grpc);
            }
        };
        let idem = match idempotency_key(req.headers()) {
            Ok(k) => k.map(idempotent_key),
            Err(denial) => {
                let account = match &payer {
                    Payer::Account(e) => Some(&e.account),
                    Payer::InRequest => ext.get::<Entitlement>().map(|e| &e.account),
                };
                crate::gate::log_denial(account, &denial);
                return ResponseFuture::refused(denial, config.clone(), now, grpc);
            }
        };
        // Keep the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // With an in-process ledger and no body to read, preparing needs no I/O: run it here,
        // with no future to allocate and nothing cloned. Nothing in it waits on that path, so
        // one poll finishes it.
        let (parts, body) = req.into_parts();
        let needs_body = config
            .pricing
            .as_ref()
            .is_some_and(|p| p.needs_body(&parts));
        if !needs_body && config.ledger.now_or_later().is_some() {
            let fut = std::pin::pin!(prepare(
                &**config, parts, body, needs_body, payer, idem, now
            ));
            let prepared = match fut.poll(&mut Context::from_waker(crate::gate::noop_waker())) {
                Poll::Ready(p) => p,
                Poll::Pending => {
                    tracing::error!(
                        target: "tower_402::metering",
                        "an in-process ledger did not answer at once; refusing the request"
                    );
                    Prepared::Refuse {
                        denial: Denial::Unavailable {
                            retry_after_secs: config.retry_after_secs,
                        },
                        account: None,
                    }
                }
            };
            return ResponseFuture::prepared(prepared, inner, config, now, grpc);
        }
        let prepare = prepare(config.clone(), parts, body, needs_body, payer, idem, now);
        ResponseFuture::preparing(Box::pin(prepare), inner, config.clone(), now, grpc)
    }
}

/// Who pays for a request being prepared.
enum Payer {
    /// The gate's [`Entitlement`], read where it is, in the request extensions.
    InRequest,
    /// Made here from a bare [`AccountId`] an earlier layer put in the extensions.
    Account(Entitlement),
}

/// Everything before the inner call: read the body if the pricing needs it, estimate,
/// reserve. Generic over an owned or a borrowed configuration, like the gate's check: run
/// once in place without I/O, boxed when the ledger or the body needs waiting for.
async fn prepare<B, C>(
    config: C,
    parts: http::request::Parts,
    body: B,
    needs_body: bool,
    payer: Payer,
    idem: Option<ReservationKey>,
    now: Timestamp,
) -> Prepared<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    C: Deref<Target = MeterConfig>,
{
    let refuse = |denial: Denial, account: &AccountId| Prepared::Refuse {
        denial,
        account: Some(account.clone()),
    };
    let own;
    let entitlement = match payer {
        Payer::Account(e) => {
            own = e;
            &own
        }
        Payer::InRequest => match parts.extensions.get::<Entitlement>() {
            Some(e) => e,
            None => {
                return Prepared::Refuse {
                    denial: Denial::Unavailable {
                        retry_after_secs: config.retry_after_secs,
                    },
                    account: None,
                }
            }
        },
    };
    let (body, peeked) = if needs_body {
        match peek(body, config.max_body).await {
            Ok((bytes, rest)) => (RequestBody::peeked(bytes.clone(), rest), Some(bytes)),
            Err(PeekError::TooLarge) => {
                let denial = Denial::Custom(Box::new(crate::decision::CustomDenial::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "REQUEST_TOO_LARGE",
                    "Request too large",
                    format!(
                        "The request body is larger than the {} bytes this API prices.",
                        config.max_body
                    ),
                )));
                return refuse(denial, &entitlement.account);
            }
            Err(PeekError::Body(_)) => {
                let denial = Denial::BadRequest {
                    code: "INVALID_REQUEST",
                    detail: "The request body could not be read.".into(),
                };
                return refuse(denial, &entitlement.account);
            }
        }
    } else {
        (RequestBody::passthrough(body), None)
    };
    // The default rule (the route's cost) needs no list of its own.
    let costs: Cow<'_, [Cost]> = match &config.pricing {
        None => Cow::Borrowed(entitlement.cost.as_slice()),
        Some(pricing) => match pricing.estimate(&PricingRequest {
            parts: &parts,
            body: peeked.as_deref(),
            entitlement,
        }) {
            Ok(c) => Cow::Owned(c),
            Err(denial) => return refuse(denial, &entitlement.account),
        },
    };
    if costs.is_empty() {
        return Prepared::Call {
            req: Request::from_parts(parts, body),
            ticket: None,
            replayed: false,
        };
    }
    // One allocation, shared by the ledger's record and the guard that settles it.
    let charges: Arc<[Charge]> = costs
        .iter()
        .map(|cost| match &entitlement.plan {
            Some(plan) => cost.charge(plan, now),
            // No plan known: credit only.
            None => Charge {
                meter: cost.meter.clone(),
                units: cost.units,
                unit_price: cost.unit_price,
                price_per: cost.price_per,
                allowance: None,
                overage: true,
            },
        })
        .collect();
    // The fingerprint tells a retry from a different request reusing its key; a key unique
    // to this request never comes back, so it needs none.
    let (key, fingerprint, idempotent) = match idem {
        Some(key) => {
            let mut fp = Fnv::new();
            fp.write(parts.method.as_str().as_bytes())
                .write(parts.uri.path().as_bytes())
                .write(parts.uri.query().unwrap_or("").as_bytes());
            for c in charges.iter() {
                fp.write(c.meter.as_str().as_bytes())
                    .write(&c.units.to_le_bytes())
                    .write(&c.unit_price.get().to_le_bytes())
                    .write(&c.price_per.to_le_bytes());
            }
            if let Some(body) = &peeked {
                fp.write(body);
            }
            (key, fp.finish(), true)
        }
        None => (unique_key(), 0, false),
    };
    let request = ReserveRequest {
        account: entitlement.account.clone(),
        key,
        fingerprint,
        charges,
        ttl_secs: config.ttl_secs,
        idempotent,
        now,
    };
    let outcome = match config.ledger.now_or_later() {
        Some(ledger) => ledger.reserve(&request),
        None => bounded(config.timeout, config.ledger.reserve(&request)).await,
    };
    // Taken apart, not cloned: the guard gets the charges.
    let ReserveRequest {
        account, charges, ..
    } = request;
    let outcome = match outcome {
        Ok(ReserveOutcome::Reserved(reservation)) => Ok((Some((reservation, charges)), false)),
        Ok(ReserveOutcome::Replayed(Replay::Completed(_))) => {
            tracing::info!(
                target: "tower_402::metering",
                account = account.as_str(),
                "idempotent retry of a settled request; not charged again"
            );
            Ok((None, true))
        }
        Ok(ReserveOutcome::Replayed(_)) => Err(Denial::IdempotencyConflict { in_progress: true }),
        Ok(ReserveOutcome::Denied(denial)) => Err(denial),
        Err(LedgerError::KeyConflict) => Err(Denial::IdempotencyConflict { in_progress: false }),
        Err(e) if is_outage(&e) && config.failure == FailureMode::Open => {
            tracing::warn!(
                target: "tower_402::metering",
                account = account.as_str(),
                error = %e,
                "ledger unreachable; failing open, request served unmetered"
            );
            Ok((None, false))
        }
        Err(e) => {
            tracing::error!(
                target: "tower_402::metering",
                account = account.as_str(),
                error = %e,
                "reservation failed; failing closed"
            );
            Err(Denial::Unavailable {
                retry_after_secs: config.retry_after_secs,
            })
        }
    };
    match outcome {
        Ok((ticket, replayed)) => Prepared::Call {
            req: Request::from_parts(parts, body),
            ticket,
            replayed,
        },
        Err(denial) => refuse(denial, &account),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn idempotency_keys() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h), Ok(None));
        h.insert("idempotency-key", HeaderValue::from_static("\"abc-1\""));
        assert_eq!(idempotency_key(&h), Ok(Some("abc-1")));
        for bad in [
            HeaderValue::from_static(""),
            HeaderValue::from_static("\"\""),
            HeaderValue::from_bytes(&[b'k'; 256]).unwrap(),
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            HeaderValue::from_bytes(b"a\tb").unwrap(),
        ] {
            h.insert("idempotency-key", bad.clone());
            assert!(idempotency_key(&h).is_err(), "{bad:?}");
        }
        h.insert("idempotency-key", HeaderValue::from_static("a"));
        h.append("idempotency-key", HeaderValue::from_static("b"));
        assert!(idempotency_key(&h).is_err());
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(Fnv::new().write(b"GET").write(b"/v1").finish(), {
            let mut f = Fnv::new();
            f.write(b"GET").write(b"/v1");
            f.finish()
        });
        assert_ne!(
            Fnv::new().write(b"ab").write(b"c").finish(),
            Fnv::new().write(b"a").write(b"bc").finish()
        );
    }
}
