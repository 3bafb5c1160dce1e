//! Card declines: a processor's decline code as a `PAYMENT_DECLINED` problem that says what
//! to do next and whether retrying can help.
//!
//! For APIs that charge a card inside a request (pay-per-call with a saved card, a top-up
//! endpoint): when the processor declines, answer 402 with the reason in terms the caller
//! can act on. [`Decline::from_code`] knows Stripe's decline codes (the issuer's reasons, as
//! in `error.decline_code`) and the card error codes Stripe uses in their place
//! (`card_declined`, `expired_card`, `incorrect_cvc`, `processing_error`, ...).
//!
//! ```
//! use tower_402::decline::{Decline, DeclineKind, NextStep};
//! use tower_402::problem::ProblemConfig;
//!
//! let d = Decline::from_code("insufficient_funds");
//! assert_eq!(d.kind(), DeclineKind::Soft);
//! assert_eq!(d.next_step(), NextStep::UseAnotherPaymentMethod);
//! assert!(!d.should_retry()); // not the same request, unchanged
//! let problem = d.problem(&ProblemConfig::new());
//! assert_eq!(problem.status, 402);
//! assert_eq!(problem.code, "PAYMENT_DECLINED");
//! assert_eq!(problem.members["decline_code"], "insufficient_funds");
//!
//! // Fraud-related reasons are not shown to the caller (Stripe's advice): a generic decline.
//! let stolen = Decline::from_code("stolen_card");
//! assert_eq!(stolen.code(), "generic_decline");
//! assert_eq!(stolen.processor_code(), "stolen_card");
//! assert_eq!(stolen.kind(), DeclineKind::Hard);
//! ```
//!
//! The problem carries `decline_code`, `decline_type` (`soft`: the same card may work
//! later or after the customer acts; `hard`: it will not), `next_step` (see [`NextStep`]) and
//! `billing_url` when configured; [`Decline::into_response`] adds `x-should-retry: true`
//! only when retrying the same request unchanged can succeed (a processing error at the
//! issuer), `false` otherwise, which the OpenAI and Anthropic SDKs obey.

use std::borrow::Cow;

use http::header::HeaderValue;
use http::Response;
use serde_json::Value;

use crate::body::ResponseBody;
use crate::decision::Denial;
use crate::problem::{ProblemConfig, ProblemDetails};

/// Whether the same card can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeclineKind {
    /// The card may work later, or after the customer acts (authenticates, adds funds).
    Soft,
    /// This card will not work: do not retry it.
    Hard,
}

impl DeclineKind {
    /// `soft` or `hard`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeclineKind::Soft => "soft",
            DeclineKind::Hard => "hard",
        }
    }
}

/// What the caller should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NextStep {
    /// Retry the same request: the failure was at the processor or issuer (`retry`).
    Retry,
    /// The customer must authenticate the payment (3-D Secure), then retry
    /// (`authenticate`).
    Authenticate,
    /// The card details were wrong (number, CVC, expiry, postal code): correct them and
    /// retry (`update_payment_details`).
    UpdatePaymentDetails,
    /// Use another card or payment method, or add funds (`use_another_payment_method`).
    UseAnotherPaymentMethod,
    /// The customer should contact their card issuer (`contact_issuer`).
    ContactIssuer,
}

impl NextStep {
    /// The step as written in the problem's `next_step`.
    pub fn as_str(self) -> &'static str {
        match self {
            NextStep::Retry => "retry",
            NextStep::Authenticate => "authenticate",
            NextStep::UpdatePaymentDetails => "update_payment_details",
            NextStep::UseAnotherPaymentMethod => "use_another_payment_method",
            NextStep::ContactIssuer => "contact_issuer",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            NextStep::Retry => "This is usually temporary: retry the request.",
            NextStep::Authenticate => {
                "The card issuer requires the customer to authenticate this payment; \
                 complete authentication, then retry."
            }
            NextStep::UpdatePaymentDetails => {
                "Correct the card details in the billing portal, then retry."
            }
            NextStep::UseAnotherPaymentMethod => {
                "Use another card or payment method in the billing portal."
            }
            NextStep::ContactIssuer => {
                "The customer should contact their card issuer, or use another card."
            }
        }
    }
}

use DeclineKind::{Hard, Soft};
use NextStep::*;

/// `(code, kind, next step, why, shown as generic_decline)`, after Stripe's decline-code
/// reference.
const CODES: &[(&str, DeclineKind, NextStep, &str, bool)] = &[
    (
        "approve_with_id",
        Soft,
        Retry,
        "The payment could not be authorized",
        false,
    ),
    (
        "authentication_required",
        Soft,
        Authenticate,
        "The payment requires authentication",
        false,
    ),
    (
        "call_issuer",
        Soft,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "card_declined",
        Soft,
        UseAnotherPaymentMethod,
        "The card was declined",
        false,
    ),
    (
        "card_not_supported",
        Hard,
        UseAnotherPaymentMethod,
        "The card does not support this kind of purchase",
        false,
    ),
    (
        "card_velocity_exceeded",
        Soft,
        ContactIssuer,
        "The card's balance or credit limit was exceeded",
        false,
    ),
    (
        "currency_not_supported",
        Hard,
        UseAnotherPaymentMethod,
        "The card does not support this currency",
        false,
    ),
    (
        "do_not_honor",
        Soft,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "do_not_try_again",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "duplicate_transaction",
        Hard,
        UseAnotherPaymentMethod,
        "An identical payment was made very recently",
        false,
    ),
    (
        "expired_card",
        Hard,
        UpdatePaymentDetails,
        "The card has expired",
        false,
    ),
    (
        "fraudulent",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "generic_decline",
        Soft,
        UseAnotherPaymentMethod,
        "The card was declined",
        false,
    ),
    (
        "incorrect_cvc",
        Soft,
        UpdatePaymentDetails,
        "The card's security code is incorrect",
        false,
    ),
    (
        "incorrect_number",
        Hard,
        UpdatePaymentDetails,
        "The card number is incorrect",
        false,
    ),
    (
        "incorrect_pin",
        Soft,
        UpdatePaymentDetails,
        "The PIN is incorrect",
        false,
    ),
    (
        "incorrect_zip",
        Soft,
        UpdatePaymentDetails,
        "The postal code is incorrect",
        false,
    ),
    (
        "insufficient_funds",
        Soft,
        UseAnotherPaymentMethod,
        "The card has insufficient funds",
        false,
    ),
    (
        "invalid_account",
        Hard,
        UseAnotherPaymentMethod,
        "The card or its account is invalid",
        false,
    ),
    (
        "invalid_amount",
        Hard,
        ContactIssuer,
        "The amount is invalid or above what the card allows",
        false,
    ),
    (
        "invalid_cvc",
        Soft,
        UpdatePaymentDetails,
        "The card's security code is invalid",
        false,
    ),
    (
        "invalid_expiry_month",
        Soft,
        UpdatePaymentDetails,
        "The card's expiration month is invalid",
        false,
    ),
    (
        "invalid_expiry_year",
        Soft,
        UpdatePaymentDetails,
        "The card's expiration year is invalid",
        false,
    ),
    (
        "invalid_number",
        Hard,
        UpdatePaymentDetails,
        "The card number is invalid",
        false,
    ),
    (
        "issuer_not_available",
        Soft,
        Retry,
        "The card issuer could not be reached",
        false,
    ),
    (
        "lost_card",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "merchant_blacklist",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "new_account_information_available",
        Hard,
        UpdatePaymentDetails,
        "The card or its account is invalid",
        false,
    ),
    (
        "no_action_taken",
        Hard,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "not_permitted",
        Hard,
        ContactIssuer,
        "The payment is not permitted",
        false,
    ),
    (
        "offline_pin_required",
        Soft,
        UseAnotherPaymentMethod,
        "The card requires a PIN",
        false,
    ),
    (
        "online_or_offline_pin_required",
        Soft,
        UseAnotherPaymentMethod,
        "The card requires a PIN",
        false,
    ),
    (
        "pickup_card",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "pin_try_exceeded",
        Hard,
        UseAnotherPaymentMethod,
        "Too many PIN attempts",
        false,
    ),
    (
        "processing_error",
        Soft,
        Retry,
        "An error occurred while processing the card",
        false,
    ),
    (
        "reenter_transaction",
        Soft,
        Retry,
        "The issuer could not process the payment",
        false,
    ),
    (
        "restricted_card",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "revocation_of_all_authorizations",
        Hard,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "revocation_of_authorization",
        Hard,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "security_violation",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "service_not_allowed",
        Hard,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "stolen_card",
        Hard,
        UseAnotherPaymentMethod,
        "The card was declined",
        true,
    ),
    (
        "stop_payment_order",
        Hard,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "testmode_decline",
        Hard,
        UseAnotherPaymentMethod,
        "A test card was used",
        false,
    ),
    (
        "transaction_not_allowed",
        Hard,
        ContactIssuer,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "try_again_later",
        Soft,
        Retry,
        "The card was declined for an unknown reason",
        false,
    ),
    (
        "withdrawal_count_limit_exceeded",
        Soft,
        UseAnotherPaymentMethod,
        "The card's balance or credit limit was exceeded",
        false,
    ),
];

/// A declined payment: the processor's code, and what it means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decline {
    processor_code: Cow<'static, str>,
    code: Cow<'static, str>,
    kind: DeclineKind,
    next_step: NextStep,
    why: &'static str,
}

impl Decline {
    /// The decline for a processor's code. A code not in the table is a soft decline
    /// that asks for another payment method (Stripe's advice for unknown codes: treat as
    /// `generic_decline`); it is shown as it came if it looks like a code (lowercase
    /// letters, digits, `_`, at most 64), else as `generic_decline`.
    pub fn from_code(code: &str) -> Self {
        if let Some(&(c, kind, next_step, why, hidden)) = CODES.iter().find(|e| e.0 == code) {
            return Decline {
                processor_code: Cow::Borrowed(c),
                code: Cow::Borrowed(if hidden { "generic_decline" } else { c }),
                kind,
                next_step,
                why,
            };
        }
        let well_formed = !code.is_empty()
            && code.len() <= 64
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let shown = if well_formed {
            Cow::Owned(code.to_owned())
        } else {
            Cow::Borrowed("generic_decline")
        };
        Decline {
            processor_code: shown.clone(),
            code: shown,
            kind: Soft,
            next_step: UseAnotherPaymentMethod,
            why: "The card was declined",
        }
    }

    /// The decline in a Stripe API error body (`{"error": {"type": "card_error", "code":
    /// "card_declined", "decline_code": "insufficient_funds"}}`): the `decline_code` if
    /// present, else the card error's `code`. `None` for an error that is not a card error.
    pub fn from_stripe_error(body: &Value) -> Option<Self> {
        let error = body.get("error").unwrap_or(body);
        if error.get("type").and_then(Value::as_str) != Some("card_error") {
            return None;
        }
        let code = error
            .get("decline_code")
            .and_then(Value::as_str)
            .or_else(|| error.get("code").and_then(Value::as_str))
            .unwrap_or("card_declined");
        Some(Decline::from_code(code))
    }

    /// The code shown to the caller (`decline_code`).
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The processor's own code: log it, do not show it (it may say `stolen_card`).
    pub fn processor_code(&self) -> &str {
        &self.processor_code
    }

    /// Soft or hard.
    pub fn kind(&self) -> DeclineKind {
        self.kind
    }

    /// What the caller should do.
    pub fn next_step(&self) -> NextStep {
        self.next_step
    }

    /// Whether retrying the same request, unchanged, can succeed.
    pub fn should_retry(&self) -> bool {
        self.next_step == Retry
    }

    /// The `PAYMENT_DECLINED` denial (with the code shown to the caller).
    pub fn denial(&self) -> Denial {
        Denial::PaymentDeclined {
            decline_code: self.code.to_string(),
        }
    }

    /// The problem document: `PAYMENT_DECLINED` with `decline_code`, `decline_type`,
    /// `next_step`, and a `detail` that says what to do.
    pub fn problem(&self, config: &ProblemConfig) -> ProblemDetails {
        let mut p = ProblemDetails::from_denial(&self.denial(), config);
        p.detail = format!("{} ({}). {}", self.why, self.code, self.next_step.advice());
        p.members
            .insert("decline_type".into(), self.kind.as_str().into());
        p.members
            .insert("next_step".into(), self.next_step.as_str().into());
        p
    }

    /// The complete 402 response: the problem, `Cache-Control: no-store`, and
    /// `x-should-retry`.
    pub fn into_response<B>(self, config: &ProblemConfig) -> Response<ResponseBody<B>> {
        let mut res = self.problem(config).into_response();
        res.headers_mut().insert(
            "x-should-retry",
            HeaderValue::from_static(if self.should_retry() { "true" } else { "false" }),
        );
        res
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for Decline {
    /// With the default [`ProblemConfig`]; a
    /// [`ProblemDetailsLayer`](crate::ProblemDetailsLayer) outside adds your links.
    fn into_response(self) -> axum_core::response::Response {
        Decline::into_response::<axum_core::body::Body>(self, &ProblemConfig::default())
            .map(axum_core::body::Body::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Links;

    #[test]
    fn the_issue_s_codes() {
        for (code, kind, step, retry) in [
            ("card_declined", Soft, UseAnotherPaymentMethod, false),
            ("insufficient_funds", Soft, UseAnotherPaymentMethod, false),
            ("expired_card", Hard, UpdatePaymentDetails, false),
            ("incorrect_cvc", Soft, UpdatePaymentDetails, false),
            ("authentication_required", Soft, Authenticate, false),
            ("processing_error", Soft, Retry, true),
            ("try_again_later", Soft, Retry, true),
            ("stolen_card", Hard, UseAnotherPaymentMethod, false),
        ] {
            let d = Decline::from_code(code);
            assert_eq!(
                (d.kind(), d.next_step(), d.should_retry()),
                (kind, step, retry),
                "{code}"
            );
        }
    }

    #[test]
    fn the_table_is_sorted_and_unique() {
        assert!(CODES.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn the_problem_says_what_to_do() {
        let config = ProblemConfig::new().links(Links::new().billing("https://b.example/portal"));
        let p = Decline::from_code("expired_card").problem(&config);
        assert_eq!(p.status, 402);
        assert_eq!(p.title, "Payment declined");
        assert_eq!(p.type_uri, "urn:tower-402:problem:payment-declined");
        assert_eq!(
            p.detail,
            "The card has expired (expired_card). Correct the card details in the billing \
             portal, then retry."
        );
        let json = p.to_json();
        assert_eq!(json["decline_code"], "expired_card");
        assert_eq!(json["decline_type"], "hard");
        assert_eq!(json["next_step"], "update_payment_details");
        assert_eq!(json["billing_url"], "https://b.example/portal");
    }

    #[test]
    fn fraud_reasons_are_not_shown() {
        for code in [
            "stolen_card",
            "lost_card",
            "pickup_card",
            "fraudulent",
            "merchant_blacklist",
        ] {
            let d = Decline::from_code(code);
            let json = d.problem(&ProblemConfig::new()).to_json().to_string();
            assert!(!json.contains(code), "{json}");
            assert!(json.contains("generic_decline"));
            assert_eq!(d.processor_code(), code);
        }
    }

    #[test]
    fn unknown_codes() {
        let d = Decline::from_code("new_reason_2030");
        assert_eq!(
            (d.code(), d.kind(), d.should_retry()),
            ("new_reason_2030", Soft, false)
        );
        for odd in ["", "Robert'); DROP", "x".repeat(65).as_str(), "tab\tcode"] {
            assert_eq!(Decline::from_code(odd).code(), "generic_decline", "{odd:?}");
        }
    }

    #[test]
    fn from_stripe_errors() {
        let body = serde_json::json!({ "error": { "type": "card_error", "code": "card_declined",
                                                  "decline_code": "insufficient_funds" } });
        assert_eq!(
            Decline::from_stripe_error(&body).unwrap().code(),
            "insufficient_funds"
        );
        let body = serde_json::json!({ "error": { "type": "card_error", "code": "expired_card" } });
        assert_eq!(
            Decline::from_stripe_error(&body).unwrap().code(),
            "expired_card"
        );
        let body = serde_json::json!({ "error": { "type": "api_error" } });
        assert!(Decline::from_stripe_error(&body).is_none());
    }

    #[test]
    fn the_response_says_whether_to_retry() {
        let res = Decline::from_code("processing_error").into_response::<()>(&ProblemConfig::new());
        assert_eq!(res.status(), 402);
        assert_eq!(res.headers()["x-should-retry"], "true");
        assert_eq!(res.headers()["cache-control"], "no-store");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let res =
            Decline::from_code("insufficient_funds").into_response::<()>(&ProblemConfig::new());
        assert_eq!(res.headers()["x-should-retry"], "false");
    }
}
