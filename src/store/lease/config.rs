use std::time::Duration;

use crate::credits::Credits;

/// How a [`LeasedLedger`](super::LeasedLedger) sizes, renews and gives back its leases.
///
/// The defaults suit an API of a few hundred requests per second per account on a handful of
/// instances; every bound below is a bound on credit *parked* (held for an instance, not yet
/// spent), never on accuracy: no request is ever served from credit the shared ledger did not
/// hold for it.
///
/// ```
/// use std::time::Duration;
/// use tower_402::store::LeaseConfig;
/// use tower_402::Credits;
///
/// let config = LeaseConfig::new()
///     .ttl_secs(30)                 // a dead instance's lease is back after at most 30 s
///     .share_percent(10)            // a lease takes at most 10 % of what is available
///     .threshold(Credits::new(200)) // below 200 credits available: direct reservations
///     .max_lease(Credits::new(5_000))
///     .idle_secs(5)
///     .recall_wait(Duration::from_secs(2));
/// assert_eq!(config.get_ttl_secs(), 30);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub(super) ttl_secs: u64,
    pub(super) idle_secs: u64,
    pub(super) share_percent: u64,
    pub(super) threshold: Credits,
    pub(super) min_lease: Credits,
    pub(super) max_lease: Credits,
    pub(super) recall_wait: Duration,
    pub(super) recall_poll: Duration,
    pub(super) background: bool,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl_secs: 30,
            idle_secs: 5,
            share_percent: 10,
            threshold: Credits::new(100),
            min_lease: Credits::new(10),
            max_lease: Credits::new(100_000),
            recall_wait: Duration::from_secs(2),
            recall_poll: Duration::from_millis(25),
            background: true,
        }
    }
}

impl LeaseConfig {
    /// The defaults: 30 s leases, 10 % share, direct below 100 credits, leases of 10 to
    /// 100,000 credits, returned after 5 s idle, a refused request waits up to 2 s for credit
    /// parked elsewhere.
    pub fn new() -> Self {
        LeaseConfig::default()
    }

    /// How long a lease's hold lives in the shared ledger (at least 4 s). This is how long
    /// the lease of an instance that died stays parked before it expires back to the account.
    /// A lease is settled and renewed after half of it, and settled at the latest a quarter
    /// of it (at least 1 s) before it expires, whatever is in flight.
    pub fn ttl_secs(mut self, secs: u64) -> Self {
        self.ttl_secs = secs.max(4);
        self
    }

    /// The lease TTL.
    pub fn get_ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// An account with no request for this long has its lease given back.
    pub fn idle_secs(mut self, secs: u64) -> Self {
        self.idle_secs = secs;
        self
    }

    /// The largest share of the account's available credit one lease may take, in percent
    /// (1 to 100).
    pub fn share_percent(mut self, percent: u64) -> Self {
        self.share_percent = percent.clamp(1, 100);
        self
    }

    /// Below this much available credit no lease is taken: every request is a direct
    /// reservation in the shared ledger, so a small balance is served exactly as without
    /// leases.
    pub fn threshold(mut self, credits: Credits) -> Self {
        self.threshold = credits;
        self
    }

    /// The smallest lease worth taking (at least 1).
    pub fn min_lease(mut self, credits: Credits) -> Self {
        self.min_lease = credits.max(Credits::new(1));
        self
    }

    /// The largest lease, whatever the rate.
    pub fn max_lease(mut self, credits: Credits) -> Self {
        self.max_lease = credits.max(Credits::new(1));
        self
    }

    /// How long a request the shared ledger refuses for credit waits for credit parked in
    /// other instances' leases to come back (they give it back when idle, or spend it), before
    /// its 402. Zero: refuse at once.
    pub fn recall_wait(mut self, wait: Duration) -> Self {
        self.recall_wait = wait;
        self
    }

    /// Whether the request path starts refills and settlements in the background (the
    /// default). Off, nothing happens until [`LeasedLedger::tick`](super::LeasedLedger::tick)
    /// is called: for tests on a manual clock.
    pub fn background(mut self, on: bool) -> Self {
        self.background = on;
        self
    }

    /// Seconds after it was taken that a lease stops taking requests and is renewed.
    pub(super) fn renew_after(&self) -> u64 {
        self.ttl_secs / 2
    }

    /// Seconds after it was taken that a lease must be settled, whatever is in flight.
    pub(super) fn settle_by(&self) -> u64 {
        self.ttl_secs - (self.ttl_secs / 4).max(1)
    }
}
