//! Idempotency keys: reading the `Idempotency-Key` header, the reservation key it becomes, and
//! the fingerprint that tells a retry from another request reusing the key.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::HeaderMap;

use crate::charge::Charge;
use crate::denial::Denial;
use crate::ledger::ReservationKey;
use crate::metering::StackText;

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
pub(crate) fn idempotent_key(key: &str) -> ReservationKey {
    let mut text = StackText::<320>::new();
    if text.push("idem:") && text.push(key) {
        ReservationKey::from(text.as_str())
    } else {
        ReservationKey::from(format!("idem:{key}"))
    }
}

/// A key unique to this request, for requests without an `Idempotency-Key`: a random
/// per-process prefix (instances of a fleet share one ledger) and a counter.
/// A number unique to one reservation attempt ([`ReserveRequest::attempt`](crate::ledger::ReserveRequest::attempt)):
/// a random per-process base plus a counter, never `0`.
pub(crate) fn attempt_id() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| RandomState::new().hash_one((std::process::id(), "attempt")));
    base.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed))
        .max(1)
}

pub(crate) fn unique_key() -> ReservationKey {
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

/// The fingerprint of a request reserved under an idempotency key: method, path, query, the
/// priced charges and, when the pricing read it, the body.
pub(crate) fn fingerprint(
    parts: &http::request::Parts,
    charges: &[Charge],
    body: Option<&[u8]>,
) -> u64 {
    let mut fp = Fnv::new();
    fp.write(parts.method.as_str().as_bytes())
        .write(parts.uri.path().as_bytes())
        .write(parts.uri.query().unwrap_or("").as_bytes());
    for c in charges {
        fp.write(c.meter.as_str().as_bytes())
            .write(&c.units.to_le_bytes())
            .write(&c.unit_price.get().to_le_bytes())
            .write(&c.price_per.to_le_bytes());
    }
    if let Some(body) = body {
        fp.write(body);
    }
    fp.finish()
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
