//! The headers a metered response carries: what the hold left, allowance and its reset,
//! payment warnings, and the replay mark.

use std::cell::RefCell;
use std::fmt::Write as _;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::decision::Warning;
use crate::metering::future::Ticket;
use crate::metering::{MeterConfig, StackText};

/// Parsed once: inserting by `&str` would copy a custom name on every response.
static X_CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
static X_ALLOWANCE_REMAINING: HeaderName = HeaderName::from_static("x-allowance-remaining");
static X_ALLOWANCE_RESET: HeaderName = HeaderName::from_static("x-allowance-reset");
static X_PAYMENT_WARNING: HeaderName = HeaderName::from_static("x-payment-warning");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Bytes of header values written per block of [`text_value`]'s arena.
const VALUE_BLOCK: usize = 2048;

std::thread_local! {
    /// What is left of this thread's current block for header values.
    static VALUES: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value for `text`, written into a per-thread block that the values share.
///
/// `http` allocates every header value that is not `'static` (`HeaderValue::from(u64)` twice,
/// `from_str` once), and `x-credits-remaining` is on every metered response: one allocation
/// per request. Values cut from a shared block of [`VALUE_BLOCK`] bytes cost two allocations
/// per block instead (the block and its reference count), a few hundred responses apart. A
/// block is freed when the last value cut from it is dropped, so a value kept beyond its
/// response (a cache of response headers) keeps the block it was cut from alive.
fn text_value(text: &str) -> Option<HeaderValue> {
    let shared = VALUES.try_with(|block| {
        let mut block = block.try_borrow_mut().ok()?;
        if block.capacity() - block.len() < text.len() {
            *block = BytesMut::with_capacity(VALUE_BLOCK.max(text.len()));
        }
        block.extend_from_slice(text.as_bytes());
        Some(block.split().freeze())
    });
    match shared {
        Ok(Some(bytes)) => HeaderValue::from_maybe_shared(bytes).ok(),
        // The thread is being torn down (or the block is borrowed): write it on its own.
        _ => HeaderValue::from_str(text).ok(),
    }
}

/// `x-credits-remaining`, and `x-allowance-remaining` / `x-allowance-reset` for a meter with
/// an allowance.
pub(crate) fn add_headers(h: &mut HeaderMap, ticket: &Ticket) {
    let mut int = itoa::Buffer::new();
    if let Some(v) = text_value(int.format(ticket.available_after.get())) {
        h.insert(&X_CREDITS_REMAINING, v);
    }
    for (charge, left) in ticket.guard.charges().iter().zip(&ticket.allowance_left) {
        if let (Some(left), Some(w)) = (left, charge.allowance) {
            if let Some(v) = text_value(int.format(*left)) {
                h.insert(&X_ALLOWANCE_REMAINING, v);
            }
            let mut reset = StackText::<32>::new();
            if write!(reset, "{}", w.resets_at).is_ok() {
                if let Some(v) = text_value(reset.as_str()) {
                    h.insert(&X_ALLOWANCE_RESET, v);
                }
            }
        }
    }
}

/// `idempotent-replayed: true` on a retry that was not charged again.
pub(crate) fn mark_replayed(h: &mut HeaderMap) {
    h.insert(&IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
}

/// One `x-payment-warning` per warning.
pub(crate) fn add_warnings(h: &mut HeaderMap, warnings: &[Warning]) {
    for w in warnings {
        if let Some(v) = warning_header(w) {
            h.append(&X_PAYMENT_WARNING, v);
        }
    }
}

fn warning_header(w: &Warning) -> Option<HeaderValue> {
    let text = match w {
        Warning::GracePeriod { until } => format!("past-due; grace-until=\"{until}\""),
        Warning::SoftLimit { meter, used, limit } => {
            let meter = crate::problem::sf_key(meter.as_str());
            format!("soft-limit; meter=\"{meter}\"; used={used}; limit={limit}")
        }
    };
    HeaderValue::try_from(text).ok()
}

/// The soft-limit warning for a request whose hold took an allowance to the configured
/// percentage, read from the hold itself (the credit and allowance are checked once, there).
pub(crate) fn soft_limit(config: &MeterConfig, ticket: &Ticket) -> Option<Warning> {
    let pct = config.soft_limit_percent?;
    let charges = ticket.guard.charges();
    for ((charge, took), left) in charges
        .iter()
        .zip(&ticket.allowance_units)
        .zip(&ticket.allowance_left)
    {
        let (Some(w), Some(left)) = (charge.allowance, left) else {
            continue;
        };
        let used = w.limit.saturating_sub(*left);
        if w.limit > 0
            && *took > 0
            && u128::from(used) * 100 >= u128::from(w.limit) * u128::from(pct)
        {
            tracing::info!(
                target: "tower_402::metering",
                account = ticket.guard.account(),
                meter = charge.meter.as_str(),
                used,
                limit = w.limit,
                "allowance past the soft limit; served with a warning"
            );
            crate::observe::threshold("soft_limit");
            return Some(Warning::SoftLimit {
                meter: charge.meter.clone(),
                used,
                limit: w.limit,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values cut from a shared block stay what they were written as, across block changes
    /// and for a value longer than a block.
    #[test]
    fn values_cut_from_a_block_keep_their_text() {
        let long = "9".repeat(VALUE_BLOCK + 1);
        let mut kept = Vec::new();
        for i in 0..3 * VALUE_BLOCK as u64 {
            let mut int = itoa::Buffer::new();
            let text = int.format(i * 7919).to_owned();
            kept.push((text.clone(), text_value(&text).unwrap()));
            if i == 100 {
                kept.push((long.clone(), text_value(&long).unwrap()));
            }
        }
        for (text, value) in &kept {
            assert_eq!(value.to_str().unwrap(), text);
        }
        // Not a valid header value: refused, as `from_str` refuses it, and nothing is kept.
        assert!(text_value("a\nb").is_none());
        assert_eq!(text_value("17").unwrap(), "17");
    }
}
