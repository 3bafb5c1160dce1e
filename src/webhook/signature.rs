//! `Stripe-Signature`: HMAC-SHA256 over `"{t}.{raw body}"`, as Stripe documents it.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::time::Timestamp;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's default tolerance between the signature's timestamp and now: five minutes.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// A webhook signing secret (`whsec_...`). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Wraps the secret exactly as the dashboard shows it, `whsec_` included: Stripe keys
    /// the HMAC with the whole string.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Secret(secret.as_ref().into())
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length: this cannot fail.
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a webhook's signature was refused. The messages say what was wrong, never what the
/// header or secret held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No signature header.
    #[error("no signature header")]
    Missing,
    /// The header is not `t=<unix seconds>,v1=<hex>[,v1=<hex>...]`.
    #[error("malformed signature header: {0}")]
    Malformed(&'static str),
    /// No `v1` signature matches the body under any configured secret.
    #[error("no signature matches the body")]
    Mismatch,
    /// The signature matches, but its timestamp is further from now than the tolerance
    /// (a replayed or very late delivery).
    #[error(
        "signature timestamp is {age_secs} s from now, beyond the tolerance of {tolerance_secs} s"
    )]
    Stale {
        /// Seconds between the signature's timestamp and now.
        age_secs: u64,
        /// The configured tolerance.
        tolerance_secs: u64,
    },
}

/// Verifies `Stripe-Signature` headers.
///
/// The header is `t=<unix seconds>,v1=<hex>,v1=<hex>,...`: each `v1` is the hex HMAC-SHA256
/// of `"{t}.{body}"` under a signing secret. Any `v1` may match (Stripe sends one per
/// active secret while a secret is being rolled); other schemes (`v0`) are ignored. Each
/// comparison is constant-time ([`Mac::verify_slice`]). A timestamp further than the
/// tolerance from now, in either direction, is refused after the signature matched.
///
/// ```
/// use tower_402::webhook::{sign_stripe, StripeSignature};
/// use tower_402::Timestamp;
///
/// let now = Timestamp::from_unix(1_700_000_000);
/// let body = br#"{"id":"evt_1"}"#;
/// let header = sign_stripe("whsec_new", now, body);
/// // During a rotation both the old and the new secret are accepted.
/// let verifier = StripeSignature::new("whsec_old").also_accept("whsec_new");
/// assert!(verifier.verify(header.as_bytes(), body, now).is_ok());
/// assert!(verifier.verify(header.as_bytes(), br#"{"id":"evt_2"}"#, now).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct StripeSignature {
    secrets: Vec<Secret>,
    tolerance_secs: u64,
}

impl StripeSignature {
    /// Accepts signatures made with `secret`, within [`DEFAULT_TOLERANCE_SECS`].
    ///
    /// An empty secret matches nothing (every delivery is refused, and an error is logged):
    /// a signing key anyone knows would let anyone mint credit.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        if secret.as_ref().is_empty() {
            tracing::error!(
                target: "tower_402::webhook",
                "the webhook signing secret is empty: every delivery will be refused"
            );
        }
        StripeSignature {
            secrets: vec![Secret::new(secret)],
            tolerance_secs: DEFAULT_TOLERANCE_SECS,
        }
    }

    /// Also accepts signatures made with `secret`: the other one of a rotation. Remove it
    /// once the rotation is over.
    pub fn also_accept(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secrets.push(Secret::new(secret));
        self
    }

    /// How far (in seconds) the signature's timestamp may be from now.
    pub fn tolerance_secs(mut self, secs: u64) -> Self {
        self.tolerance_secs = secs;
        self
    }

    /// Checks `header` (the `Stripe-Signature` value) against the raw `body` at `now`.
    pub fn verify(&self, header: &[u8], body: &[u8], now: Timestamp) -> Result<(), SignatureError> {
        let header = std::str::from_utf8(header)
            .map_err(|_| SignatureError::Malformed("the header is not text"))?;
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for item in header.split(',') {
            let Some((key, value)) = item.trim().split_once('=') else {
                return Err(SignatureError::Malformed("an item is not key=value"));
            };
            match key {
                "t" => {
                    if timestamp.is_some() {
                        return Err(SignatureError::Malformed("more than one timestamp"));
                    }
                    timestamp = Some(parse_unix(value)?);
                }
                "v1" => signatures.push(decode_hex(value)),
                _ => {} // v0 (test mode's legacy scheme) and future schemes
            }
        }
        let t = timestamp.ok_or(SignatureError::Malformed("no timestamp"))?;
        if signatures.is_empty() {
            return Err(SignatureError::Malformed("no v1 signature"));
        }
        // An empty secret (an unset variable read as "") would let anyone sign: it never
        // matches.
        let matched = self
            .secrets
            .iter()
            .filter(|s| !s.0.is_empty())
            .any(|secret| {
                let mut mac = secret.mac();
                mac.update(t.to_string().as_bytes());
                mac.update(b".");
                mac.update(body);
                signatures
                    .iter()
                    .flatten()
                    .any(|sig| mac.clone().verify_slice(sig).is_ok())
            });
        if !matched {
            return Err(SignatureError::Mismatch);
        }
        let t = Timestamp::from_unix(t);
        let age_secs = now.secs_until(t).max(t.secs_until(now));
        if age_secs > self.tolerance_secs {
            return Err(SignatureError::Stale {
                age_secs,
                tolerance_secs: self.tolerance_secs,
            });
        }
        Ok(())
    }
}

/// A `Stripe-Signature` header for `body` at `timestamp` under `secret`: what Stripe sends,
/// for tests and for replaying a stored event to your own endpoint.
pub fn sign_stripe(secret: impl AsRef<[u8]>, timestamp: Timestamp, body: &[u8]) -> String {
    let mut mac = Secret::new(secret).mac();
    mac.update(timestamp.unix().to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut header = format!("t={},v1=", timestamp.unix());
    for b in digest.iter() {
        header.push(char::from(HEX[usize::from(b >> 4)]));
        header.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    header
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn parse_unix(value: &str) -> Result<u64, SignatureError> {
    let bad = SignatureError::Malformed("the timestamp is not unix seconds");
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    value.parse().map_err(|_| bad)
}

/// A 32-byte hex signature, or `None` for anything else (which then cannot match: a
/// malformed `v1` next to a good one does not spoil the good one).
fn decode_hex(value: &str) -> Option<[u8; 32]> {
    let bytes = value.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_unix(1_700_000_000);
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;

    fn verify(v: &StripeSignature, header: &str) -> Result<(), SignatureError> {
        v.verify(header.as_bytes(), BODY, NOW)
    }

    #[test]
    fn an_empty_secret_matches_nothing() {
        let body = br#"{"id":"evt_x","type":"payment_intent.succeeded"}"#;
        let forged = sign_stripe("", NOW, body);
        assert_eq!(
            StripeSignature::new("").verify(forged.as_bytes(), body, NOW),
            Err(SignatureError::Mismatch)
        );
        let rotated = StripeSignature::new("whsec_real").also_accept("");
        assert_eq!(
            rotated.verify(forged.as_bytes(), body, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn matches_stripes_documented_construction() {
        // HMAC-SHA256("whsec_test", "1700000000.{body}"), computed independently with
        // `printf '%s' "1700000000.$body" | openssl dgst -sha256 -hmac whsec_test`.
        let header = sign_stripe("whsec_test", NOW, b"{}");
        assert_eq!(
            header,
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
        assert!(StripeSignature::new("whsec_test")
            .verify(header.as_bytes(), b"{}", NOW)
            .is_ok());
    }

    #[test]
    fn accepts_a_good_signature_and_refuses_a_tampered_body() {
        let v = StripeSignature::new("whsec_a");
        let header = sign_stripe("whsec_a", NOW, BODY);
        assert_eq!(verify(&v, &header), Ok(()));
        assert_eq!(
            v.verify(
                header.as_bytes(),
                br#"{"id":"evt_1","type":"invoice.pai"}"#,
                NOW
            ),
            Err(SignatureError::Mismatch)
        );
        // Another secret.
        assert_eq!(
            verify(&StripeSignature::new("whsec_b"), &header),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is part of what is signed.
        let moved = header.replacen("t=1700000000", "t=1700000001", 1);
        assert_eq!(verify(&v, &moved), Err(SignatureError::Mismatch));
    }

    #[test]
    fn any_v1_may_match_and_other_schemes_are_ignored() {
        let v = StripeSignature::new("whsec_a");
        let good = sign_stripe("whsec_a", NOW, BODY);
        let good_sig = good.split_once(",v1=").unwrap().1;
        let other = sign_stripe("whsec_b", NOW, BODY);
        let other_sig = other.split_once(",v1=").unwrap().1;
        let header = format!("t=1700000000,v1={other_sig},v0=abc,v1=zz,v1={good_sig}");
        assert_eq!(verify(&v, &header), Ok(()));
        let only_v0 = format!("t=1700000000,v0={good_sig}");
        assert_eq!(
            verify(&v, &only_v0),
            Err(SignatureError::Malformed("no v1 signature"))
        );
    }

    #[test]
    fn two_secrets_during_a_rotation() {
        let v = StripeSignature::new("whsec_old").also_accept("whsec_new");
        assert_eq!(verify(&v, &sign_stripe("whsec_old", NOW, BODY)), Ok(()));
        assert_eq!(verify(&v, &sign_stripe("whsec_new", NOW, BODY)), Ok(()));
        assert_eq!(
            verify(&v, &sign_stripe("whsec_other", NOW, BODY)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn the_tolerance_bounds_both_directions() {
        let v = StripeSignature::new("whsec_a");
        for (offset_past, ok) in [(300i64, true), (301, false), (-300, true), (-301, false)] {
            let t = Timestamp::from_unix((NOW.unix() as i64 - offset_past) as u64);
            let got = verify(&v, &sign_stripe("whsec_a", t, BODY));
            assert_eq!(got.is_ok(), ok, "{offset_past}: {got:?}");
            if !ok {
                assert_eq!(
                    got,
                    Err(SignatureError::Stale {
                        age_secs: offset_past.unsigned_abs(),
                        tolerance_secs: 300
                    })
                );
            }
        }
        let ten_minutes = Timestamp::from_unix(NOW.unix() - 600);
        let header = sign_stripe("whsec_a", ten_minutes, BODY);
        assert!(verify(&v, &header).is_err());
        assert_eq!(verify(&v.clone().tolerance_secs(900), &header), Ok(()));
    }

    #[test]
    fn malformed_headers() {
        let v = StripeSignature::new("whsec_a");
        let sig = sign_stripe("whsec_a", NOW, BODY);
        let sig = sig.split_once(",v1=").unwrap().1;
        for header in [
            String::new(),
            "garbage".to_owned(),
            format!("v1={sig}"),
            format!("t=,v1={sig}"),
            format!("t=-5,v1={sig}"),
            format!("t=1e9,v1={sig}"),
            format!("t=99999999999999999999,v1={sig}"),
            format!("t=1700000000,t=1700000000,v1={sig}"),
            "t=1700000000".to_owned(),
        ] {
            assert!(
                matches!(verify(&v, &header), Err(SignatureError::Malformed(_))),
                "{header:?}"
            );
        }
        assert!(matches!(
            v.verify(&[0xff, 0xfe], BODY, NOW),
            Err(SignatureError::Malformed(_))
        ));
        // A v1 that is not 64 hex digits cannot match.
        assert_eq!(
            verify(&v, "t=1700000000,v1=00"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let v = StripeSignature::new("whsec_supersecret").also_accept("whsec_other");
        let shown = format!("{v:?}");
        assert!(
            !shown.contains("supersecret") && !shown.contains("other"),
            "{shown}"
        );
    }
}
