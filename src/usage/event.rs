//! One usage event per settled request, and its CloudEvents envelope.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::account::AccountId;
use crate::credits::Credits;
use crate::time::Timestamp;

/// What one settled request used and was charged: the `data` of its [`CloudEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageData {
    /// Who paid.
    pub account: AccountId,
    /// Units used, per meter (`{"requests": 1}`, `{"input_tokens": 12, "output_tokens": 40}`).
    pub meters: BTreeMap<String, u64>,
    /// Credits actually charged.
    pub credits: Credits,
    /// Method and path (`GET /v1/forecast`).
    pub route: String,
    /// The model an LLM request named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The request's `x-request-id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// SHA-256 (hex) of the request's `Idempotency-Key`: retries can be matched, the key
    /// itself is never exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key_sha256: Option<String>,
    /// When the request was admitted (RFC 3339).
    pub started_at: String,
    /// When it was settled (RFC 3339).
    pub ended_at: String,
}

/// A usage event as a CloudEvent 1.0 (structured JSON mode), the shape OpenMeter ingests:
/// `subject` is the account, `type` the event type its meters select, `data` the
/// [`UsageData`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Stable: derived from the account and the request's reservation, the same on every
    /// delivery attempt, so a receiver drops duplicates by it.
    pub id: String,
    /// Who produced it ([`OutboxConfig::source`](crate::usage::OutboxConfig::source)).
    pub source: String,
    /// The event type ([`OutboxConfig::event_type`](crate::usage::OutboxConfig::event_type)).
    #[serde(rename = "type")]
    pub kind: String,
    /// The account.
    pub subject: String,
    /// When the request was settled (RFC 3339).
    pub time: String,
    /// `application/json`.
    pub datacontenttype: String,
    /// What was used and charged.
    pub data: UsageData,
}

/// What the metering layer knows of a request by the time it settles.
#[derive(Debug, Clone)]
pub(crate) struct UsageContext {
    /// Unique to this request's reservation (the reservation key, or one made for it).
    pub(crate) reservation: String,
    pub(crate) route: String,
    pub(crate) model: Option<String>,
    pub(crate) request_id: Option<String>,
    pub(crate) idempotency_key_sha256: Option<String>,
    pub(crate) started_at: Timestamp,
}

/// SHA-256 of `parts`, hex; each part but a lone one is length-prefixed, so no two lists
/// of parts hash alike.
pub(crate) fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    match parts {
        [one] => h.update(one),
        _ => {
            for p in parts {
                h.update((p.len() as u64).to_be_bytes());
                h.update(p);
            }
        }
    }
    // One allocation, not one per byte: this runs for every settled request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in h.finalize() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

impl UsageContext {
    /// The event of this request's settlement.
    pub(crate) fn event(
        self,
        source: &str,
        kind: &str,
        account: &AccountId,
        meters: BTreeMap<String, u64>,
        credits: Credits,
        ended_at: Timestamp,
    ) -> CloudEvent {
        let mut id = sha256_hex(&[account.as_str().as_bytes(), self.reservation.as_bytes()]);
        id.truncate(32);
        let ended = ended_at.to_string();
        CloudEvent {
            specversion: "1.0".into(),
            id,
            source: source.to_owned(),
            kind: kind.to_owned(),
            subject: account.as_str().to_owned(),
            time: ended.clone(),
            datacontenttype: "application/json".into(),
            data: UsageData {
                account: account.clone(),
                meters,
                credits,
                route: self.route,
                model: self.model,
                request_id: self.request_id,
                idempotency_key_sha256: self.idempotency_key_sha256,
                started_at: self.started_at.to_string(),
                ended_at: ended,
            },
        }
    }
}
