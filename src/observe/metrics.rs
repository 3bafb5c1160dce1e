//! The metrics billing records, through the `metrics` facade (feature `metrics`). Without the
//! feature every function here is empty and inlined away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::account::AccountId;
use crate::credits::Credits;
use crate::denial::Denial;
use crate::ledger::Settlement;

static ACCOUNT_LABELS: AtomicBool = AtomicBool::new(false);

/// Adds an `account` label to the decision and credit counters, for this process (metrics
/// recorders are process-wide too). Off by default: every account becomes a series of its
/// own, so turn it on only where the number of accounts is small and known.
pub fn label_accounts(on: bool) {
    ACCOUNT_LABELS.store(on, Ordering::Relaxed);
}

/// How a metered request's decision came out (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Served and metered.
    Allowed,
    /// Refused.
    Denied,
    /// A store was down and the request was served unmetered.
    FailedOpen,
    /// An idempotent retry answered from its recorded response.
    Replayed,
}

#[cfg(feature = "metrics")]
mod imp {
    use super::*;
    use metrics::{counter, gauge, histogram, Label, SharedString};

    fn account_label(account: Option<&AccountId>) -> Option<Label> {
        if !ACCOUNT_LABELS.load(Ordering::Relaxed) {
            return None;
        }
        account.map(|a| Label::new("account", a.as_str().to_owned()))
    }

    /// Adds `value` to the counter `name`, a literal: without an account label its `Key` is
    /// a `static` built at compile time (a name passed as a value would be hashed on every
    /// call, recorder or not).
    macro_rules! add {
        ($name:literal, $value:expr, $account:expr $(,)?) => {{
            let value: u64 = $value;
            if value != 0 {
                match account_label($account) {
                    None => counter!($name).increment(value),
                    Some(l) => counter!($name, vec![l]).increment(value),
                }
            }
        }};
    }

    pub(crate) fn decision(outcome: Outcome, denial: Option<&Denial>, account: Option<&AccountId>) {
        const NAME: &str = "tower402_decisions_total";
        let account = account_label(account);
        let Some(d) = denial else {
            let outcome = match outcome {
                Outcome::Allowed => "allowed",
                Outcome::Denied => "denied",
                Outcome::FailedOpen => "failed_open",
                Outcome::Replayed => "replayed",
            };
            if account.is_none() {
                // A literal name and static labels, one set per outcome: the key is a
                // `static` built at compile time, so nothing is allocated or hashed here.
                macro_rules! served {
                    ($outcome:literal) => {
                        counter!("tower402_decisions_total", "outcome" => $outcome, "code" => "OK", "rule" => "none")
                            .increment(1)
                    };
                }
                match outcome {
                    "allowed" => served!("allowed"),
                    "replayed" => served!("replayed"),
                    _ => served!("failed_open"),
                }
                return;
            }
            let labels = vec![
                Label::from_static_parts("outcome", outcome),
                Label::from_static_parts("code", "OK"),
                Label::from_static_parts("rule", "none"),
            ];
            counter!(NAME, labels.into_iter().chain(account).collect::<Vec<_>>()).increment(1);
            return;
        };
        let code = match d.static_code() {
            Some(c) => SharedString::const_str(c),
            None => SharedString::from(d.code().to_owned()),
        };
        let mut labels = vec![
            Label::from_static_parts("outcome", "denied"),
            Label::new("code", code),
            Label::from_static_parts("rule", crate::denial::rule_of(d)),
        ];
        labels.extend(account);
        counter!(NAME, labels).increment(1);
    }

    pub(crate) fn held_reserved(credits: Credits, account: Option<&AccountId>) {
        add!("tower402_credits_reserved_total", credits.get(), account);
        if !credits.is_zero() {
            // Exact: credits are at most 2^53 - 1.
            gauge!("tower402_credits_held").increment(credits.get() as f64);
        }
    }

    pub(crate) fn held_released(held: Credits, account: Option<&AccountId>) {
        add!("tower402_credits_released_total", held.get(), account);
        if !held.is_zero() {
            gauge!("tower402_credits_held").decrement(held.get() as f64);
        }
    }

    pub(crate) fn settled(held: Credits, s: Option<&Settlement>, account: Option<&AccountId>) {
        let Some(s) = s else {
            // The ledger refused or could not take the settlement: the hold lapses there.
            counter!("tower402_settlement_failures_total").increment(1);
            if !held.is_zero() {
                gauge!("tower402_credits_held").decrement(held.get() as f64);
            }
            return;
        };
        add!("tower402_credits_settled_total", s.charged.get(), account);
        add!(
            "tower402_credits_released_total",
            held.saturating_sub(s.charged).get(),
            account,
        );
        if !held.is_zero() {
            gauge!("tower402_credits_held").decrement(held.get() as f64);
        }
        if !s.shortfall.is_empty() {
            counter!("tower402_shortfalls_total").increment(1);
            add!(
                "tower402_shortfall_credits_total",
                s.shortfall.credits.get(),
                account,
            );
        }
    }

    pub(crate) fn leased(taken: Credits, closed: Credits) {
        // Exact: credits are at most 2^53 - 1.
        if !taken.is_zero() {
            gauge!("tower402_credits_leased").increment(taken.get() as f64);
        }
        if !closed.is_zero() {
            gauge!("tower402_credits_leased").decrement(closed.get() as f64);
        }
    }

    pub(crate) fn settlement_retry(result: &'static str) {
        counter!("tower402_settlement_retries_total", "result" => result).increment(1);
    }

    pub(crate) fn store_call(call: &'static str, elapsed: Duration, outage: bool) {
        histogram!("tower402_store_call_seconds", "call" => call).record(elapsed.as_secs_f64());
        if outage {
            counter!("tower402_store_outages_total", "call" => call).increment(1);
        }
    }

    #[cfg_attr(not(feature = "usage"), allow(dead_code))]
    pub(crate) fn usage_events(what: &'static str, n: u64) {
        let name = match what {
            "dropped" => "tower402_usage_events_dropped_total",
            "delivered" => "tower402_usage_events_delivered_total",
            "rejected" => "tower402_usage_events_rejected_total",
            _ => "tower402_usage_sink_retries_total",
        };
        counter!(name).increment(n);
    }

    pub(crate) fn threshold(kind: &'static str) {
        counter!("tower402_threshold_events_total", "kind" => kind).increment(1);
    }

    pub(crate) fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            "tower402_decisions_total",
            "Metered requests by decision: outcome, denial code and rule"
        );
        describe_counter!(
            "tower402_credits_reserved_total",
            "Credits held by reservations"
        );
        describe_counter!(
            "tower402_credits_settled_total",
            "Credits charged by settlements"
        );
        describe_counter!(
            "tower402_credits_released_total",
            "Credits given back: released holds and the unused part of settled ones"
        );
        describe_counter!(
            "tower402_shortfalls_total",
            "Settlements that could not charge everything used"
        );
        describe_counter!(
            "tower402_shortfall_credits_total",
            "Credits used beyond what could be charged"
        );
        describe_gauge!(
            "tower402_credits_held",
            "Credits held by this instance's requests in flight"
        );
        describe_gauge!(
            "tower402_credits_leased",
            "Credits held for this instance by its open leases (LeasedLedger)"
        );
        describe_counter!(
            "tower402_settlement_retries_total",
            "Settlements and releases queued for retry after an outage, by result"
        );
        describe_histogram!(
            "tower402_store_call_seconds",
            Unit::Seconds,
            "Latency of calls to remote stores"
        );
        describe_counter!(
            "tower402_store_outages_total",
            "Store calls that failed: store unreachable or timed out"
        );
        describe_counter!(
            "tower402_settlement_failures_total",
            "Settlements or releases the ledger refused or could not take"
        );
        describe_counter!(
            "tower402_usage_events_dropped_total",
            "Usage events dropped because the outbox was full"
        );
        describe_counter!(
            "tower402_usage_events_delivered_total",
            "Usage events delivered to the sink"
        );
        describe_counter!(
            "tower402_usage_events_rejected_total",
            "Usage events the sink refused for good"
        );
        describe_counter!(
            "tower402_usage_sink_retries_total",
            "Usage batch deliveries that failed and were retried"
        );
        describe_counter!(
            "tower402_threshold_events_total",
            "Soft-limit crossings reported to on_threshold"
        );
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::*;

    #[inline(always)]
    pub(crate) fn decision(_: Outcome, _: Option<&Denial>, _: Option<&AccountId>) {}
    #[inline(always)]
    pub(crate) fn held_reserved(_: Credits, _: Option<&AccountId>) {}
    #[inline(always)]
    pub(crate) fn held_released(_: Credits, _: Option<&AccountId>) {}
    #[inline(always)]
    pub(crate) fn settled(_: Credits, _: Option<&Settlement>, _: Option<&AccountId>) {}
    #[inline(always)]
    pub(crate) fn leased(_: Credits, _: Credits) {}
    #[inline(always)]
    pub(crate) fn settlement_retry(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn store_call(_: &'static str, _: Duration, _: bool) {}
    #[inline(always)]
    pub(crate) fn threshold(_: &'static str) {}
    #[inline(always)]
    #[cfg_attr(not(feature = "usage"), allow(dead_code))]
    pub(crate) fn usage_events(_: &'static str, _: u64) {}
    pub(crate) fn describe() {}
}

#[cfg(feature = "usage")]
pub(crate) use imp::usage_events;
pub(crate) use imp::{
    decision, held_released, held_reserved, leased, settled, settlement_retry, store_call,
    threshold,
};

/// Gives every tower-402 metric its help text and unit in the installed recorder. Call it
/// once, after installing the recorder. Does nothing without the `metrics` feature.
pub fn describe() {
    imp::describe();
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;

    /// The counters on the served path keep their names and labels (their keys are statics
    /// now), and the account label is still added when it is turned on.
    #[test]
    fn served_path_counters_keep_their_names_and_labels() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let acme = AccountId::from("acme");
        metrics::with_local_recorder(&recorder, || {
            decision(Outcome::Allowed, None, Some(&acme));
            decision(Outcome::Replayed, None, None);
            held_reserved(Credits::new(5), Some(&acme));
            held_reserved(Credits::ZERO, Some(&acme));
            held_released(Credits::new(2), None);
            label_accounts(true);
            held_reserved(Credits::new(7), Some(&acme));
            label_accounts(false);
        });
        let text = handle.render();
        let line = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line(r#"tower402_decisions_total{outcome="allowed",code="OK",rule="none"}"#),
            "1"
        );
        assert_eq!(
            line(r#"tower402_decisions_total{outcome="replayed",code="OK",rule="none"}"#),
            "1"
        );
        assert_eq!(line("tower402_credits_reserved_total "), "5");
        assert_eq!(
            line(r#"tower402_credits_reserved_total{account="acme"}"#),
            "7"
        );
        assert_eq!(line("tower402_credits_released_total "), "2");
        assert_eq!(line("tower402_credits_held "), "10");
    }
}
