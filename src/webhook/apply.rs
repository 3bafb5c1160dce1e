//! The pure part of applying an event: from the stored subscription and the event, what to
//! write (or why nothing). No I/O, no clock.

use std::borrow::Cow;

use crate::plan::{Catalog, PlanId, Subscription, SubscriptionStatus, SyncMark};
use crate::webhook::{Change, Event, SubscriptionState};

/// What became of an event, as the webhook answers it (`"outcome"` in the 200 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Written to the plan store or the ledger.
    Applied,
    /// This event was applied before: no second effect.
    Duplicate,
    /// An event about this account that comes later (by `created`, then id) was applied
    /// already: this one is out of date and ignored.
    Stale,
    /// Nothing for us to do (an event type not handled, no account, another subscription's
    /// cancellation while this one is live).
    Ignored,
}

impl Outcome {
    /// The outcome as the webhook writes it: `applied`, `duplicate`, `stale`, `ignored`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
        }
    }
}

/// The result of [`next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write this (over the mark that was read).
    Write(Subscription),
    /// Write nothing.
    Skip(Outcome, Cow<'static, str>),
}

/// A subscription event names a plan the catalog does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnknownPlan(pub Option<PlanId>);

fn live(status: SubscriptionStatus) -> bool {
    matches!(
        status,
        SubscriptionStatus::Active | SubscriptionStatus::Trialing | SubscriptionStatus::PastDue
    )
}

/// What to write for a subscription or payment event, given what is stored.
///
/// - Events of one account are applied in order of `(created, id)`: one that is not after
///   the stored mark is a duplicate (same id) or stale.
/// - A subscription event replaces the whole subscription, in one write: an upgrade,
///   downgrade or renewal never passes through a state that refuses a paying caller. A
///   canceled or expired subscription does not replace another processor subscription of
///   the account that is live (an upgrade made as "create the new, cancel the old").
/// - A failed payment makes the subscription past due from the first failure (the plan's
///   grace period counts from there); a paid invoice makes a past-due, unpaid or incomplete
///   subscription active. Both only apply to the subscription they are about, and move the
///   mark even when nothing else changes, so an older failure delivered after a newer
///   payment is stale.
pub(crate) fn next(
    current: Option<&Subscription>,
    event: &Event,
    catalog: &Catalog,
) -> Result<Step, UnknownPlan> {
    let source = match &event.change {
        Change::Subscription(s) => s.source.as_str(),
        Change::PaymentFailed { source, .. } | Change::PaymentSucceeded { source, .. } => source,
        Change::Credits { .. } | Change::Ignored(_) => {
            return Ok(Step::Skip(
                Outcome::Ignored,
                "not a subscription change".into(),
            ))
        }
    };
    let mark = SyncMark::new(source, event.created, event.id.as_str());
    let stored = current.and_then(|c| c.synced.as_ref());
    if let Some(stored) = stored {
        if stored.event_id == mark.event_id {
            return Ok(Step::Skip(Outcome::Duplicate, "applied before".into()));
        }
        if !mark.is_after(stored) {
            return Ok(Step::Skip(
                Outcome::Stale,
                "a later event about this account was applied".into(),
            ));
        }
    }
    let other_source = stored.is_some_and(|m| m.source != mark.source);
    match &event.change {
        Change::Subscription(state) => {
            if other_source && !live(state.status) && current.is_some_and(|c| live(c.status)) {
                return Ok(Step::Skip(
                    Outcome::Ignored,
                    "another subscription of this account is live".into(),
                ));
            }
            replace(current, state, mark, catalog).map(Step::Write)
        }
        Change::PaymentFailed { .. } | Change::PaymentSucceeded { .. } => {
            let Some(current) = current else {
                return Ok(Step::Skip(
                    Outcome::Ignored,
                    "no subscription on file".into(),
                ));
            };
            if other_source {
                return Ok(Step::Skip(
                    Outcome::Ignored,
                    "the invoice is another subscription's".into(),
                ));
            }
            let mut next = current.clone();
            let failed = matches!(event.change, Change::PaymentFailed { .. });
            match (failed, current.status) {
                (true, SubscriptionStatus::Active | SubscriptionStatus::Trialing) => {
                    next.status = SubscriptionStatus::PastDue;
                    next.past_due_since = Some(event.created);
                    next.grace_until = None;
                }
                (true, SubscriptionStatus::PastDue) => {
                    next.past_due_since = current.past_due_since.or(Some(event.created));
                }
                (
                    false,
                    SubscriptionStatus::PastDue
                    | SubscriptionStatus::Unpaid
                    | SubscriptionStatus::Incomplete,
                ) => {
                    next.status = SubscriptionStatus::Active;
                    next.past_due_since = None;
                    next.grace_until = None;
                }
                // A trial's $0 invoice is paid at its start: it stays a trial. A payment
                // failing on an ended subscription changes nothing.
                _ => {}
            }
            next.synced = Some(mark);
            Ok(Step::Write(next))
        }
        Change::Credits { .. } | Change::Ignored(_) => unreachable!("returned above"),
    }
}

fn replace(
    current: Option<&Subscription>,
    state: &SubscriptionState,
    mark: SyncMark,
    catalog: &Catalog,
) -> Result<Subscription, UnknownPlan> {
    let plan = match &state.plan {
        Some(p) if catalog.get(p.as_str()).is_some() => p.clone(),
        // An ended subscription may name a price that is no longer on offer: keep the plan
        // it had, which only shows in the `SUBSCRIPTION_EXPIRED` problem.
        _ if !live(state.status) && current.is_some() => {
            current.map(|c| c.plan.clone()).expect("checked")
        }
        other => return Err(UnknownPlan(other.clone())),
    };
    let was_past_due = current.filter(|c| {
        matches!(
            c.status,
            SubscriptionStatus::PastDue | SubscriptionStatus::Unpaid
        )
    });
    let past_due = matches!(
        state.status,
        SubscriptionStatus::PastDue | SubscriptionStatus::Unpaid
    );
    Ok(Subscription {
        account: state.account.clone(),
        plan,
        status: state.status,
        current_period_start: state.current_period_start,
        current_period_end: state.current_period_end,
        trial_end: state.trial_end,
        canceled_at: state.canceled_at,
        ended_at: state.ended_at,
        // Past due since the first failure we saw, not since the latest update.
        past_due_since: past_due.then(|| {
            was_past_due
                .and_then(|c| c.past_due_since)
                .unwrap_or(mark.event_created)
        }),
        grace_until: None,
        synced: Some(mark),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use crate::time::Timestamp;

    fn catalog() -> Catalog {
        Catalog::new()
            .with_plan(Plan::new("basic", "Basic", 1))
            .with_plan(Plan::new("pro", "Pro", 2))
    }

    fn state(source: &str, plan: &str, status: SubscriptionStatus) -> SubscriptionState {
        SubscriptionState {
            account: "acct".into(),
            source: format!("stripe:{source}"),
            plan: Some(PlanId::new(plan)),
            status,
            current_period_start: Some(Timestamp::from_unix(100)),
            current_period_end: Some(Timestamp::from_unix(200)),
            trial_end: None,
            canceled_at: None,
            ended_at: None,
        }
    }

    fn ev(id: &str, created: u64, change: Change) -> Event {
        Event {
            id: id.into(),
            kind: "test".into(),
            created: Timestamp::from_unix(created),
            change,
        }
    }

    fn sub_event(id: &str, created: u64, s: SubscriptionState) -> Event {
        ev(id, created, Change::Subscription(s))
    }

    fn write(step: Result<Step, UnknownPlan>) -> Subscription {
        match step {
            Ok(Step::Write(s)) => s,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    fn skipped(step: Result<Step, UnknownPlan>) -> Outcome {
        match step {
            Ok(Step::Skip(o, _)) => o,
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    use SubscriptionStatus::*;

    #[test]
    fn order_by_created_then_id() {
        let c = catalog();
        let first = write(next(
            None,
            &sub_event("evt_b", 10, state("sub_1", "pro", Active)),
            &c,
        ));
        assert_eq!(first.synced.as_ref().unwrap().event_id, "evt_b");
        let dup = sub_event("evt_b", 10, state("sub_1", "pro", Active));
        assert_eq!(skipped(next(Some(&first), &dup, &c)), Outcome::Duplicate);
        let older = sub_event("evt_z", 9, state("sub_1", "basic", PastDue));
        assert_eq!(skipped(next(Some(&first), &older, &c)), Outcome::Stale);
        let same_second_lower_id = sub_event("evt_a", 10, state("sub_1", "basic", Active));
        assert_eq!(
            skipped(next(Some(&first), &same_second_lower_id, &c)),
            Outcome::Stale
        );
        let same_second_higher_id = sub_event("evt_c", 10, state("sub_1", "basic", Active));
        assert_eq!(
            write(next(Some(&first), &same_second_higher_id, &c))
                .plan
                .as_str(),
            "basic"
        );
    }

    #[test]
    fn an_unmarked_subscription_takes_any_event() {
        let c = catalog();
        let mut app = Subscription::new("acct", "basic", Canceled);
        app.ended_at = Some(Timestamp::from_unix(5));
        let s = write(next(
            Some(&app),
            &sub_event("e", 1, state("sub_1", "basic", Active)),
            &c,
        ));
        assert_eq!((s.status, s.ended_at), (Active, None));
    }

    #[test]
    fn unknown_plans() {
        let c = catalog();
        let live = sub_event("e", 1, state("sub_1", "gold", Active));
        assert_eq!(
            next(None, &live, &c),
            Err(UnknownPlan(Some(PlanId::new("gold"))))
        );
        // Ended: keeps the plan it had.
        let before = Subscription::active("acct", "pro");
        let ended = sub_event("e", 1, state("sub_1", "gold", Canceled));
        assert_eq!(write(next(Some(&before), &ended, &c)).plan.as_str(), "pro");
        assert!(next(None, &ended, &c).is_err());
    }

    #[test]
    fn a_dead_subscription_does_not_replace_a_live_one() {
        let c = catalog();
        // Upgrade as create-new-then-cancel-old: the old one's deletion comes last.
        let new = write(next(
            None,
            &sub_event("e1", 10, state("sub_new", "pro", Active)),
            &c,
        ));
        let old_deleted = sub_event("e2", 11, state("sub_old", "basic", Canceled));
        assert_eq!(
            skipped(next(Some(&new), &old_deleted, &c)),
            Outcome::Ignored
        );
        // The same subscription's own cancellation applies.
        let own = sub_event("e3", 12, state("sub_new", "pro", Canceled));
        assert_eq!(write(next(Some(&new), &own, &c)).status, Canceled);
        // A live other subscription replaces a dead one.
        let mut dead = new.clone();
        dead.status = Canceled;
        let other = sub_event("e4", 13, state("sub_other", "basic", Active));
        assert_eq!(write(next(Some(&dead), &other, &c)).plan.as_str(), "basic");
    }

    #[test]
    fn payments() {
        let c = catalog();
        let account = || "acct".into();
        let failed = |id: &str, t: u64| {
            ev(
                id,
                t,
                Change::PaymentFailed {
                    account: account(),
                    source: "stripe:sub_1".into(),
                },
            )
        };
        let paid = |id: &str, t: u64| {
            ev(
                id,
                t,
                Change::PaymentSucceeded {
                    account: account(),
                    source: "stripe:sub_1".into(),
                },
            )
        };
        assert_eq!(skipped(next(None, &failed("f0", 5), &c)), Outcome::Ignored);
        let active = write(next(
            None,
            &sub_event("s", 10, state("sub_1", "pro", Active)),
            &c,
        ));
        let due = write(next(Some(&active), &failed("f1", 20), &c));
        assert_eq!(
            (due.status, due.past_due_since),
            (PastDue, Some(Timestamp::from_unix(20)))
        );
        // A retry that fails again: past due since the first failure.
        let again = write(next(Some(&due), &failed("f2", 30), &c));
        assert_eq!(again.past_due_since, Some(Timestamp::from_unix(20)));
        // An update of the subscription while past due keeps it, too.
        let updated = write(next(
            Some(&again),
            &sub_event("s2", 31, state("sub_1", "pro", PastDue)),
            &c,
        ));
        assert_eq!(updated.past_due_since, Some(Timestamp::from_unix(20)));
        let back = write(next(Some(&updated), &paid("p1", 40), &c));
        assert_eq!(
            (back.status, back.past_due_since, back.plan.as_str()),
            (Active, None, "pro")
        );
        // The older failure delivered late is stale: the mark moved with the payment.
        assert_eq!(
            skipped(next(Some(&back), &failed("f1", 20), &c)),
            Outcome::Stale
        );
        // Paid while active: nothing changes but the mark.
        let still = write(next(Some(&back), &paid("p2", 50), &c));
        assert_eq!(still.status, Active);
        assert_eq!(
            skipped(next(Some(&still), &failed("f3", 45), &c)),
            Outcome::Stale
        );
        // A trial's $0 invoice does not end the trial.
        let trial = write(next(
            None,
            &sub_event("t", 1, state("sub_1", "pro", Trialing)),
            &c,
        ));
        assert_eq!(
            write(next(Some(&trial), &paid("p0", 2), &c)).status,
            Trialing
        );
        // Another subscription's invoice is not this one's.
        let other = ev(
            "o",
            60,
            Change::PaymentFailed {
                account: account(),
                source: "stripe:sub_9".into(),
            },
        );
        assert_eq!(skipped(next(Some(&still), &other, &c)), Outcome::Ignored);
    }
}
