//! [`Stripe`]: Stripe's events read into [`Change`]s, with pluggable account and plan lookup.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::account::AccountId;
use crate::credits::Credits;
use crate::plan::{PlanId, SubscriptionStatus};
use crate::time::Timestamp;
use crate::webhook::{
    Change, Event, EventError, Processor, SignatureError, StripeSignature, SubscriptionState,
};

/// A Stripe object's `metadata`: strings to strings, as Stripe sends them.
pub type Metadata = HashMap<String, String>;

/// The object an event is about, as the account and plan strategies see it.
#[derive(Debug, Clone, Copy)]
pub struct StripeObject<'a> {
    /// `subscription`, `invoice`, `checkout.session` or `payment_intent`.
    pub kind: &'a str,
    /// The metadata that names the account: the object's own, or for an invoice its
    /// subscription's (`parent.subscription_details.metadata`, or
    /// `subscription_details.metadata` in API versions before 2025-03-31) over its own.
    pub metadata: &'a Metadata,
    /// The Stripe customer (`cus_...`), if the object names one.
    pub customer: Option<&'a str>,
    /// The whole object, for anything else.
    pub raw: &'a Value,
}

/// Which account an object belongs to.
pub trait AccountOf: Send + Sync + 'static {
    /// The account, or `None` when the object is not one of ours (the event is ignored).
    fn account(&self, object: &StripeObject<'_>) -> Option<AccountId>;
}

impl<F> AccountOf for F
where
    F: Fn(&StripeObject<'_>) -> Option<AccountId> + Send + Sync + 'static,
{
    fn account(&self, object: &StripeObject<'_>) -> Option<AccountId> {
        self(object)
    }
}

/// The default [`AccountOf`]: a metadata key, `account_id` unless told otherwise. Set it
/// when creating the Checkout Session or Subscription (`metadata[account_id]=acct_42`).
#[derive(Debug, Clone)]
pub struct MetadataAccount(Cow<'static, str>);

impl MetadataAccount {
    /// Reads the account from `metadata[key]`.
    pub fn key(key: impl Into<Cow<'static, str>>) -> Self {
        MetadataAccount(key.into())
    }
}

impl Default for MetadataAccount {
    fn default() -> Self {
        MetadataAccount(Cow::Borrowed("account_id"))
    }
}

impl AccountOf for MetadataAccount {
    fn account(&self, object: &StripeObject<'_>) -> Option<AccountId> {
        object
            .metadata
            .get(self.0.as_ref())
            .filter(|a| !a.is_empty())
            .map(AccountId::new)
    }
}

/// Which plan a subscription is on.
pub trait PlanOf: Send + Sync + 'static {
    /// The plan id, or `None` when the subscription names none.
    fn plan(&self, subscription: &StripeObject<'_>) -> Option<PlanId>;
}

impl<F> PlanOf for F
where
    F: Fn(&StripeObject<'_>) -> Option<PlanId> + Send + Sync + 'static,
{
    fn plan(&self, subscription: &StripeObject<'_>) -> Option<PlanId> {
        self(subscription)
    }
}

/// The default [`PlanOf`]: the first item's `price.lookup_key`. Give each Price the
/// lookup key of its plan in the catalog (`basic`, `pro`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LookupKey;

impl PlanOf for LookupKey {
    fn plan(&self, subscription: &StripeObject<'_>) -> Option<PlanId> {
        subscription.raw["items"]["data"][0]["price"]["lookup_key"]
            .as_str()
            .filter(|k| !k.is_empty())
            .map(PlanId::new)
    }
}

/// Stripe as a [`Processor`]: verifies `Stripe-Signature` and reads these events.
///
/// | event | change |
/// |---|---|
/// | `customer.subscription.created`, `.updated`, `.deleted`, `.paused`, `.resumed` | the subscription as the object stands: status, plan ([`PlanOf`]), period, trial end, cancel and end times |
/// | `invoice.payment_failed` | past due, with the plan's grace period |
/// | `invoice.paid` | a past-due, unpaid or incomplete subscription is active again |
/// | `checkout.session.completed` (paid), `checkout.session.async_payment_succeeded`, `payment_intent.succeeded` | with `metadata.credits`: a deposit, once per payment |
/// | anything else | ignored (200, and a log line) |
///
/// The account is [`AccountOf`] of the object (by default `metadata.account_id`); an
/// object without one is ignored. Fields this crate does not read are ignored, so every
/// API version works; where versions differ (the period moved to the subscription items in
/// 2025-03-31, an invoice's subscription to `parent.subscription_details`), both places
/// are read.
#[derive(Clone)]
pub struct Stripe {
    signature: StripeSignature,
    account_of: Arc<dyn AccountOf>,
    plan_of: Arc<dyn PlanOf>,
}

impl fmt::Debug for Stripe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stripe")
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

impl Stripe {
    /// Stripe with the endpoint's signing secret (`whsec_...`), the default tolerance
    /// (300 s), accounts from `metadata.account_id` and plans from `price.lookup_key`.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Stripe {
            signature: StripeSignature::new(secret),
            account_of: Arc::new(MetadataAccount::default()),
            plan_of: Arc::new(LookupKey),
        }
    }

    /// Also accepts signatures made with `secret`, while rolling the endpoint's secret.
    pub fn also_accept(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.signature = self.signature.also_accept(secret);
        self
    }

    /// How far (in seconds) a signature's timestamp may be from now (default 300).
    pub fn tolerance_secs(mut self, secs: u64) -> Self {
        self.signature = self.signature.tolerance_secs(secs);
        self
    }

    /// How objects map to accounts.
    pub fn account_of(mut self, strategy: impl AccountOf) -> Self {
        self.account_of = Arc::new(strategy);
        self
    }

    /// How subscriptions map to plans.
    pub fn plan_of(mut self, strategy: impl PlanOf) -> Self {
        self.plan_of = Arc::new(strategy);
        self
    }
}

impl Processor for Stripe {
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: Timestamp,
    ) -> Result<(), SignatureError> {
        let header = headers
            .get("stripe-signature")
            .ok_or(SignatureError::Missing)?;
        self.signature.verify(header.as_bytes(), body, now)
    }

    fn parse(&self, body: &[u8]) -> Result<Event, EventError> {
        #[derive(Deserialize)]
        struct Envelope {
            id: String,
            #[serde(rename = "type")]
            kind: String,
            created: u64,
            data: Data,
        }
        #[derive(Deserialize)]
        struct Data {
            object: Value,
        }
        let e: Envelope = serde_json::from_slice(body).map_err(EventError::Malformed)?;
        if e.id.is_empty() {
            return Err(invalid("the event has an empty id"));
        }
        let created = timestamp(e.created)?;
        let object = &e.data.object;
        let change = match e.kind.as_str() {
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => self.subscription(object)?,
            "invoice.payment_failed" | "invoice.paid" => {
                self.invoice(object, e.kind == "invoice.paid")?
            }
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                let status = object.get("payment_status").and_then(Value::as_str);
                if e.kind == "checkout.session.completed" && status.is_some_and(|s| s != "paid") {
                    Change::Ignored("the checkout session is not paid yet".into())
                } else {
                    let payment = opt_str(object, "payment_intent")?;
                    self.credits(object, "checkout.session", payment, &e.id)?
                }
            }
            "payment_intent.succeeded" => {
                let payment = opt_str(object, "id")?;
                self.credits(object, "payment_intent", payment, &e.id)?
            }
            _ => Change::Ignored("event type not handled".into()),
        };
        Ok(Event {
            id: e.id,
            kind: e.kind,
            created,
            change,
        })
    }
}

impl Stripe {
    fn subscription(&self, object: &Value) -> Result<Change, EventError> {
        let metadata = metadata(object, &["metadata"])?;
        let view = StripeObject {
            kind: "subscription",
            metadata: &metadata,
            customer: customer(object),
            raw: object,
        };
        let Some(account) = self.account_of.account(&view) else {
            return Ok(Change::Ignored("the subscription names no account".into()));
        };
        let id = opt_str(object, "id")?.ok_or_else(|| invalid("the subscription has no id"))?;
        let status = object
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("the subscription has no status"))?;
        let status: SubscriptionStatus =
            serde_json::from_value(Value::String(status.to_owned()))
                .map_err(|_| invalid("the subscription's status is not one Stripe documents"))?;
        // Since API version 2025-03-31 the period is per item.
        let item = &object["items"]["data"][0];
        let period = |key: &str| -> Result<Option<Timestamp>, EventError> {
            Ok(opt_ts(object, key)?.or(opt_ts(item, key)?))
        };
        Ok(Change::Subscription(SubscriptionState {
            account,
            source: format!("stripe:{id}"),
            plan: self.plan_of.plan(&view),
            status,
            current_period_start: period("current_period_start")?,
            current_period_end: period("current_period_end")?,
            trial_end: opt_ts(object, "trial_end")?,
            canceled_at: opt_ts(object, "canceled_at")?,
            ended_at: opt_ts(object, "ended_at")?,
        }))
    }

    fn invoice(&self, object: &Value, paid: bool) -> Result<Change, EventError> {
        let details = &object["parent"]["subscription_details"];
        let subscription = match opt_str(details, "subscription")? {
            Some(s) => Some(s),
            None => opt_str(object, "subscription")?,
        };
        let Some(subscription) = subscription else {
            return Ok(Change::Ignored(
                "the invoice is not a subscription's".into(),
            ));
        };
        // The subscription's metadata first (where the account is set), then the invoice's.
        let metadata = metadata(
            object,
            &[
                "metadata",
                "/subscription_details/metadata",
                "/parent/subscription_details/metadata",
            ],
        )?;
        let view = StripeObject {
            kind: "invoice",
            metadata: &metadata,
            customer: customer(object),
            raw: object,
        };
        let Some(account) = self.account_of.account(&view) else {
            return Ok(Change::Ignored("the invoice names no account".into()));
        };
        let source = format!("stripe:{subscription}");
        Ok(if paid {
            Change::PaymentSucceeded { account, source }
        } else {
            Change::PaymentFailed { account, source }
        })
    }

    fn credits(
        &self,
        object: &Value,
        kind: &str,
        payment: Option<&str>,
        event_id: &str,
    ) -> Result<Change, EventError> {
        let metadata = metadata(object, &["metadata"])?;
        let Some(credits) = metadata.get("credits") else {
            return Ok(Change::Ignored(
                "no metadata.credits: not a credit purchase".into(),
            ));
        };
        let credits = parse_credits(credits)?;
        let view = StripeObject {
            kind,
            metadata: &metadata,
            customer: customer(object),
            raw: object,
        };
        let Some(account) = self.account_of.account(&view) else {
            return Ok(Change::Ignored("the payment names no account".into()));
        };
        let payment = match payment {
            Some(p) => format!("stripe:{p}"),
            None => format!("stripe:{event_id}"),
        };
        Ok(Change::Credits {
            account,
            credits,
            payment,
        })
    }
}

fn invalid(why: &'static str) -> EventError {
    EventError::Invalid(Cow::Borrowed(why))
}

fn timestamp(secs: u64) -> Result<Timestamp, EventError> {
    if secs > Credits::MAX_EXACT.get() {
        return Err(invalid("a timestamp is out of range"));
    }
    Ok(Timestamp::from_unix(secs))
}

/// `object[key]` as unix seconds: absent or `null` is `None`, anything but a non-negative
/// integer is an error.
fn opt_ts(object: &Value, key: &str) -> Result<Option<Timestamp>, EventError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| invalid("a timestamp is not unix seconds"))
            .and_then(timestamp)
            .map(Some),
    }
}

/// `object[key]` as a string id: absent or `null` is `None`; an expanded object gives its
/// `id`.
fn opt_str<'a>(object: &'a Value, key: &str) -> Result<Option<&'a str>, EventError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(Value::Object(o)) => match o.get("id") {
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
            _ => Err(invalid("an expanded object has no id")),
        },
        Some(_) => Err(invalid("an id is not a string")),
    }
}

fn customer(object: &Value) -> Option<&str> {
    opt_str(object, "customer").ok().flatten()
}

/// The metadata maps at `paths` (a key, or a JSON pointer), later ones overriding earlier
/// ones. A map whose values are not all strings is an error: Stripe sends strings.
fn metadata(object: &Value, paths: &[&str]) -> Result<Metadata, EventError> {
    let mut out = Metadata::new();
    for path in paths {
        let v = if path.starts_with('/') {
            object.pointer(path)
        } else {
            object.get(*path)
        };
        match v {
            None | Some(Value::Null) => {}
            Some(v) => {
                let m = Metadata::deserialize(v)
                    .map_err(|_| invalid("metadata values must be strings"))?;
                out.extend(m);
            }
        }
    }
    Ok(out)
}

/// `metadata.credits`: a whole number of credits from 1 to [`Credits::MAX_EXACT`], in
/// decimal digits only.
fn parse_credits(s: &str) -> Result<Credits, EventError> {
    let bad = || invalid("metadata.credits must be a whole number from 1 to 9007199254740991");
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = s.parse().map_err(|_| bad())?;
    if n == 0 || n > Credits::MAX_EXACT.get() {
        return Err(bad());
    }
    Ok(Credits::new(n))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(event: Value) -> Result<Event, EventError> {
        Stripe::new("whsec_x").parse(event.to_string().as_bytes())
    }

    fn event(kind: &str, object: Value) -> Value {
        json!({
            "id": "evt_1", "object": "event", "api_version": "2024-06-20", "created": 1_700_000_000,
            "livemode": false, "pending_webhooks": 1, "type": kind, "data": { "object": object }
        })
    }

    fn sub_object() -> Value {
        json!({
            "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
            "metadata": { "account_id": "acct_1" },
            "current_period_start": 1_700_000_000, "current_period_end": 1_702_592_000,
            "trial_end": null, "canceled_at": null, "ended_at": null,
            "items": { "object": "list", "data": [
                { "id": "si_1", "price": { "id": "price_1", "lookup_key": "pro" } },
                { "id": "si_2", "price": { "id": "price_2", "lookup_key": "addon" } }
            ] }
        })
    }

    #[test]
    fn a_subscription_event() {
        let e = parse(event("customer.subscription.updated", sub_object())).unwrap();
        assert_eq!(e.id, "evt_1");
        assert_eq!(e.created, Timestamp::from_unix(1_700_000_000));
        assert_eq!(
            e.change,
            Change::Subscription(SubscriptionState {
                account: "acct_1".into(),
                source: "stripe:sub_1".into(),
                plan: Some(PlanId::new("pro")),
                status: SubscriptionStatus::Active,
                current_period_start: Some(Timestamp::from_unix(1_700_000_000)),
                current_period_end: Some(Timestamp::from_unix(1_702_592_000)),
                trial_end: None,
                canceled_at: None,
                ended_at: None,
            })
        );
    }

    #[test]
    fn every_subscription_event_type_and_status() {
        for (kind, status, ours) in [
            (
                "customer.subscription.created",
                "incomplete",
                SubscriptionStatus::Incomplete,
            ),
            (
                "customer.subscription.created",
                "trialing",
                SubscriptionStatus::Trialing,
            ),
            (
                "customer.subscription.updated",
                "past_due",
                SubscriptionStatus::PastDue,
            ),
            (
                "customer.subscription.updated",
                "unpaid",
                SubscriptionStatus::Unpaid,
            ),
            (
                "customer.subscription.deleted",
                "canceled",
                SubscriptionStatus::Canceled,
            ),
            (
                "customer.subscription.deleted",
                "incomplete_expired",
                SubscriptionStatus::Expired,
            ),
            (
                "customer.subscription.paused",
                "paused",
                SubscriptionStatus::Paused,
            ),
            (
                "customer.subscription.resumed",
                "active",
                SubscriptionStatus::Active,
            ),
        ] {
            let mut o = sub_object();
            o["status"] = json!(status);
            let e = parse(event(kind, o)).unwrap();
            let Change::Subscription(s) = e.change else {
                panic!("{kind}: {:?}", e.change)
            };
            assert_eq!(s.status, ours, "{kind} {status}");
        }
        let mut o = sub_object();
        o["status"] = json!("sleeping");
        assert!(matches!(
            parse(event("customer.subscription.updated", o)),
            Err(EventError::Invalid(_))
        ));
    }

    #[test]
    fn the_period_of_api_versions_since_2025_03_31_is_on_the_item() {
        let mut o = sub_object();
        let m = o.as_object_mut().unwrap();
        m.remove("current_period_start");
        m.remove("current_period_end");
        o["items"]["data"][0]["current_period_end"] = json!(1_705_000_000);
        o["canceled_at"] = json!(1_701_000_000);
        let Change::Subscription(s) = parse(event("customer.subscription.updated", o))
            .unwrap()
            .change
        else {
            panic!()
        };
        assert_eq!(
            s.current_period_end,
            Some(Timestamp::from_unix(1_705_000_000))
        );
        assert_eq!(s.current_period_start, None);
        assert_eq!(s.canceled_at, Some(Timestamp::from_unix(1_701_000_000)));
    }

    #[test]
    fn strategies_are_pluggable() {
        let stripe = Stripe::new("whsec_x")
            .account_of(|o: &StripeObject<'_>| {
                o.customer.map(|c| AccountId::new(format!("by-{c}")))
            })
            .plan_of(|o: &StripeObject<'_>| {
                o.raw["items"]["data"][0]["price"]["id"]
                    .as_str()
                    .map(PlanId::new)
            });
        let body = event("customer.subscription.updated", sub_object()).to_string();
        let Change::Subscription(s) = stripe.parse(body.as_bytes()).unwrap().change else {
            panic!()
        };
        assert_eq!(s.account.as_str(), "by-cus_1");
        assert_eq!(s.plan, Some(PlanId::new("price_1")));
        let tenant = Stripe::new("whsec_x").account_of(MetadataAccount::key("tenant"));
        let e = tenant.parse(body.as_bytes()).unwrap();
        assert_eq!(
            e.change,
            Change::Ignored("the subscription names no account".into())
        );
    }

    #[test]
    fn invoices_in_old_and_new_api_shapes() {
        let old = json!({
            "id": "in_1", "object": "invoice", "customer": "cus_1", "subscription": "sub_1",
            "subscription_details": { "metadata": { "account_id": "acct_1" } }, "metadata": {}
        });
        let new = json!({
            "id": "in_2", "object": "invoice", "customer": "cus_1",
            "parent": { "type": "subscription_details",
                        "subscription_details": { "subscription": "sub_1",
                                                  "metadata": { "account_id": "acct_1" } } }
        });
        for (object, paid) in [(old.clone(), true), (new, false)] {
            let kind = if paid {
                "invoice.paid"
            } else {
                "invoice.payment_failed"
            };
            let e = parse(event(kind, object)).unwrap();
            let (account, source) = match e.change {
                Change::PaymentSucceeded { account, source } if paid => (account, source),
                Change::PaymentFailed { account, source } if !paid => (account, source),
                other => panic!("{kind}: {other:?}"),
            };
            assert_eq!(
                (account.as_str(), source.as_str()),
                ("acct_1", "stripe:sub_1")
            );
        }
        let mut one_off = old;
        one_off.as_object_mut().unwrap().remove("subscription");
        assert!(matches!(
            parse(event("invoice.paid", one_off)).unwrap().change,
            Change::Ignored(_)
        ));
    }

    #[test]
    fn credit_purchases() {
        let session = json!({
            "id": "cs_1", "object": "checkout.session", "payment_status": "paid",
            "payment_intent": "pi_1", "metadata": { "account_id": "acct_1", "credits": "25" }
        });
        let want = Change::Credits {
            account: "acct_1".into(),
            credits: Credits::new(25),
            payment: "stripe:pi_1".into(),
        };
        assert_eq!(
            parse(event("checkout.session.completed", session.clone()))
                .unwrap()
                .change,
            want
        );
        // The payment intent of the same payment deposits under the same key.
        let intent = json!({ "id": "pi_1", "object": "payment_intent",
                             "metadata": { "account_id": "acct_1", "credits": "25" } });
        assert_eq!(
            parse(event("payment_intent.succeeded", intent))
                .unwrap()
                .change,
            want
        );
        // Without a payment id, the event's.
        let mut no_pi = session.clone();
        no_pi["payment_intent"] = Value::Null;
        let Change::Credits { payment, .. } = parse(event("checkout.session.completed", no_pi))
            .unwrap()
            .change
        else {
            panic!()
        };
        assert_eq!(payment, "stripe:evt_1");
        // Not paid yet (a delayed payment method): nothing until async_payment_succeeded.
        let mut unpaid = session.clone();
        unpaid["payment_status"] = json!("unpaid");
        assert!(matches!(
            parse(event("checkout.session.completed", unpaid.clone()))
                .unwrap()
                .change,
            Change::Ignored(_)
        ));
        assert!(matches!(
            parse(event("checkout.session.async_payment_succeeded", unpaid))
                .unwrap()
                .change,
            Change::Credits { .. }
        ));
        // No credits: a checkout for something else.
        let mut plain = session.clone();
        plain["metadata"] = json!({ "account_id": "acct_1" });
        assert!(matches!(
            parse(event("checkout.session.completed", plain))
                .unwrap()
                .change,
            Change::Ignored(_)
        ));
        for bad in [
            "",
            "0",
            "-5",
            "+5",
            "2.5",
            "1e3",
            " 5",
            "9007199254740992",
            "99999999999999999999",
        ] {
            let mut s = session.clone();
            s["metadata"]["credits"] = json!(bad);
            assert!(
                matches!(
                    parse(event("checkout.session.completed", s)),
                    Err(EventError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        let mut number = session;
        number["metadata"]["credits"] = json!(25);
        assert!(matches!(
            parse(event("checkout.session.completed", number)),
            Err(EventError::Invalid(_))
        ));
    }

    #[test]
    fn malformed_and_unknown() {
        assert!(matches!(
            Stripe::new("x").parse(b"not json"),
            Err(EventError::Malformed(_))
        ));
        assert!(matches!(
            parse(json!({ "id": "evt_1" })),
            Err(EventError::Malformed(_))
        ));
        assert!(matches!(
            parse(json!({ "id": "evt_1", "type": "x", "created": -1, "data": { "object": {} } })),
            Err(EventError::Malformed(_))
        ));
        let e = parse(event("customer.created", json!({ "id": "cus_1" }))).unwrap();
        assert_eq!(e.change, Change::Ignored("event type not handled".into()));
        let mut o = sub_object();
        o["current_period_end"] = json!("soon");
        assert!(matches!(
            parse(event("customer.subscription.updated", o)),
            Err(EventError::Invalid(_))
        ));
    }
}
