use std::time::Duration;

use super::refusal::{Refusal, RetryClass};

/// When and how long to wait before retrying: capped exponential backoff with jitter,
/// `Retry-After` honoured. See the [module docs](crate::client).
///
/// ```
/// use std::time::Duration;
/// use tower_402::client::RetryPolicy;
///
/// let policy = RetryPolicy::new()
///     .max_retries(4)
///     .base_delay(Duration::from_millis(200))
///     .max_delay(Duration::from_secs(10))
///     .max_retry_after(Duration::from_secs(60));
/// assert_eq!(policy.backoff(0, 1.0), Duration::from_millis(200));
/// assert_eq!(policy.backoff(3, 1.0), Duration::from_millis(1600));
/// assert_eq!(policy.backoff(20, 1.0), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_retries: u32,
    base_delay: Duration,
    max_delay: Duration,
    max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// What to do with an attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Hand the response (or error) to the caller.
    Return,
    /// Ask the payment hook, then retry once if it fixed the condition.
    AskPayment,
    /// Wait, then retry.
    RetryAfter(Duration),
}

impl RetryPolicy {
    /// The defaults: 3 retries, 250 ms doubling to at most 8 s, `Retry-After` honoured up to
    /// 60 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times a request is sent again after its first attempt (default 3; 0 turns
    /// retries off).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The first backoff delay, doubled on each retry (default 250 ms).
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base_delay = d;
        self
    }

    /// The cap on a backoff delay (default 8 s).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// The longest `Retry-After` (or gRPC `RetryInfo`) waited for (default 60 s): a refusal
    /// asking for longer is handed to the caller at once, to decide.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }

    /// The backoff before retry number `retry` (0 for the first retry):
    /// `min(max_delay, base_delay × 2^retry)`, scaled by `jitter` (clamped to 0.0–1.0).
    /// The layer draws `jitter` uniformly from 0.5–1.0 ("equal jitter"), so that clients
    /// refused together do not come back together.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        let full = self
            .base_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        full.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// What to do after retry number `retries` was refused with `refusal`.
    pub(crate) fn next(&self, refusal: &Refusal, retries: u32, jitter: f64) -> Next {
        match refusal.retry {
            RetryClass::Never => Next::Return,
            RetryClass::AfterPayment => Next::AskPayment,
            RetryClass::Later if retries >= self.max_retries => Next::Return,
            RetryClass::Later => match refusal.retry_after {
                Some(d) if d > self.max_retry_after => Next::Return,
                Some(d) => Next::RetryAfter(d),
                None => Next::RetryAfter(self.backoff(retries, jitter)),
            },
        }
    }

    /// What to do after a transport error (no response at all) on retry number `retries`,
    /// when the request is safe to send again.
    pub(crate) fn next_after_error(&self, retries: u32, jitter: f64) -> Next {
        if retries >= self.max_retries {
            Next::Return
        } else {
            Next::RetryAfter(self.backoff(retries, jitter))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};

    fn refusal(status: u16, retry_after: Option<&str>) -> Refusal {
        let mut h = HeaderMap::new();
        if let Some(r) = retry_after {
            h.insert("retry-after", r.parse().unwrap());
        }
        Refusal::from_http(StatusCode::from_u16(status).unwrap(), &h, b"").unwrap()
    }

    #[test]
    fn what_happens_next() {
        let p = RetryPolicy::new();
        assert_eq!(p.next(&refusal(402, None), 0, 1.0), Next::AskPayment);
        assert_eq!(p.next(&refusal(400, None), 0, 1.0), Next::Return);
        assert_eq!(
            p.next(&refusal(503, Some("7")), 0, 1.0),
            Next::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(p.next(&refusal(503, Some("61")), 0, 1.0), Next::Return);
        assert_eq!(
            p.next(&refusal(429, None), 1, 1.0),
            Next::RetryAfter(Duration::from_millis(500))
        );
        assert_eq!(p.next(&refusal(429, None), 3, 1.0), Next::Return);
        assert_eq!(
            p.next_after_error(2, 0.5),
            Next::RetryAfter(Duration::from_millis(500))
        );
        assert_eq!(p.next_after_error(3, 0.5), Next::Return);
    }

    #[test]
    fn backoff_is_capped_and_never_overflows() {
        let p = RetryPolicy::new().base_delay(Duration::from_secs(u64::MAX / 2));
        assert_eq!(p.backoff(40, 1.0), Duration::from_secs(8));
        assert_eq!(p.backoff(0, 7.0), Duration::from_secs(8), "jitter clamped");
        assert_eq!(
            RetryPolicy::new().backoff(2, 0.5),
            Duration::from_millis(500)
        );
        assert_eq!(RetryPolicy::new().backoff(2, -1.0), Duration::ZERO);
    }
}
