use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Map, Value};

use crate::body::ResponseBody;
use crate::decision::{AuthFailure, Denial};
use crate::time::Timestamp;

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where to send a caller to fix a refusal. Each link is included in the problems it helps
/// with; unset links are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    /// Billing portal: payment method, invoices (`billing_url`).
    pub billing: Option<String>,
    /// Plan comparison and upgrade (`upgrade_url`).
    pub upgrade: Option<String>,
    /// Buy more credits (`top_up_url`).
    pub top_up: Option<String>,
    /// Human support (`support_url`, on every problem).
    pub support: Option<String>,
    /// Documentation (`docs_url`, on every problem).
    pub docs: Option<String>,
}

impl Links {
    /// No links.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the billing portal link.
    pub fn billing(mut self, url: impl Into<String>) -> Self {
        self.billing = Some(url.into());
        self
    }
    /// Sets the upgrade link.
    pub fn upgrade(mut self, url: impl Into<String>) -> Self {
        self.upgrade = Some(url.into());
        self
    }
    /// Sets the top-up link.
    pub fn top_up(mut self, url: impl Into<String>) -> Self {
        self.top_up = Some(url.into());
        self
    }
    /// Sets the support link.
    pub fn support(mut self, url: impl Into<String>) -> Self {
        self.support = Some(url.into());
        self
    }
    /// Sets the documentation link.
    pub fn docs(mut self, url: impl Into<String>) -> Self {
        self.docs = Some(url.into());
        self
    }
}

/// How problems are rendered: type URI base, links, authentication realm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemConfig {
    type_base: Cow<'static, str>,
    instance_base: Cow<'static, str>,
    realm: Cow<'static, str>,
    grpc_domain: Cow<'static, str>,
    links: Links,
    openai_errors: bool,
}

impl Default for ProblemConfig {
    fn default() -> Self {
        ProblemConfig {
            type_base: Cow::Borrowed("urn:tower-402:problem:"),
            instance_base: Cow::Borrowed("urn:request:"),
            realm: Cow::Borrowed("api"),
            grpc_domain: Cow::Borrowed("tower-402"),
            links: Links::default(),
            openai_errors: false,
        }
    }
}

impl ProblemConfig {
    /// The defaults: URN type base, no links, realm `api`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The base of every `type` URI; the code in kebab case is appended
    /// (`https://docs.example.com/problems/` → `.../problems/quota-exceeded`).
    pub fn type_base(mut self, base: impl Into<Cow<'static, str>>) -> Self {
        self.type_base = base.into();
        self
    }

    /// The base of `instance` URIs; the request id is appended. Default `urn:request:`.
    pub fn instance_base(mut self, base: impl Into<Cow<'static, str>>) -> Self {
        self.instance_base = base.into();
        self
    }

    /// The realm in `WWW-Authenticate`.
    pub fn realm(mut self, realm: impl Into<Cow<'static, str>>) -> Self {
        self.realm = realm.into();
        self
    }

    /// The `domain` of the `google.rpc.ErrorInfo` in gRPC answers (default `tower-402`):
    /// name your service, e.g. `api.example.com`.
    pub fn grpc_domain(mut self, domain: impl Into<Cow<'static, str>>) -> Self {
        self.grpc_domain = domain.into();
        self
    }

    /// The configured gRPC error domain.
    pub fn get_grpc_domain(&self) -> &str {
        &self.grpc_domain
    }

    /// The links to include.
    pub fn links(mut self, links: Links) -> Self {
        self.links = links;
        self
    }

    /// The configured links.
    pub fn get_links(&self) -> &Links {
        &self.links
    }

    /// Whether problems also carry an OpenAI-shaped `error` member (default off): turn it on
    /// for an OpenAI-compatible API, so the OpenAI SDKs show the problem.
    ///
    /// The OpenAI SDKs read only `error` from an error body: without it the Node SDK reports
    /// `402 status code (no body)`. With it, every problem also has
    ///
    /// ```json
    /// "error": { "message": "<detail>", "type": "insufficient_quota", "code": "INSUFFICIENT_CREDITS", "param": null }
    /// ```
    ///
    /// and stays a valid RFC 9457 document (`error` is an extension member). `type` is
    /// `invalid_request_error` (400, 404, 409, 413, 422), `authentication_error` (401),
    /// `insufficient_quota` (402 for credit, allowance and budget), `billing_error` (the other
    /// 402s), `permission_error` (403), `rate_limit_error` (429), `server_error` (5xx).
    ///
    /// ```
    /// use tower_402::problem::{ProblemConfig, ProblemDetails};
    /// use tower_402::{Credits, Denial};
    ///
    /// let config = ProblemConfig::new().openai_errors(true);
    /// let denial = Denial::InsufficientCredits { balance: Credits::new(0), required: Credits::new(5) };
    /// let doc = ProblemDetails::from_denial(&denial, &config).to_json();
    /// assert_eq!(doc["error"]["code"], "INSUFFICIENT_CREDITS");
    /// assert_eq!(doc["error"]["message"], doc["detail"]);
    /// ```
    pub fn openai_errors(mut self, on: bool) -> Self {
        self.openai_errors = on;
        self
    }

    /// Whether problems carry an OpenAI-shaped `error` member.
    pub fn get_openai_errors(&self) -> bool {
        self.openai_errors
    }

    /// The `type` URI for a code.
    pub fn type_uri(&self, code: &str) -> String {
        let mut uri = String::with_capacity(self.type_base.len() + code.len());
        uri.push_str(&self.type_base);
        uri.extend(code.chars().map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        }));
        uri
    }

    pub(crate) fn instance_uri(&self, request_id: &str) -> String {
        format!("{}{}", self.instance_base, request_id)
    }
}

/// An RFC 9457 problem document.
///
/// Serializes with the standard members first, then `code` and the extension members.
///
/// It also deserializes, so a client can read a refusal into it (the
/// [`client`](crate::client) module does, with the `client` feature). Members this crate does
/// not know are kept in [`members`](Self::members). As RFC 9457 §3.1 allows, every member is
/// optional except `status`: a missing `type` is `about:blank`, a missing `title`, `detail` or
/// `code` is empty. A `status` that is not a valid HTTP status, or a standard member of the
/// wrong JSON type, is an error.
///
/// ```
/// use tower_402::problem::ProblemDetails;
///
/// let p: ProblemDetails = serde_json::from_str(r#"{
///     "type": "https://docs.example.com/problems/insufficient-credits",
///     "title": "Insufficient credits", "status": 402, "detail": "This request costs 10 credits but the balance is 3.",
///     "code": "INSUFFICIENT_CREDITS", "balance": 3, "required": 10, "colour": "blue"
/// }"#).unwrap();
/// assert_eq!(p.status, 402);
/// assert_eq!(p.members["balance"], 3);
/// assert_eq!(p.members["colour"], "blue");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ProblemDetails {
    /// `type`: a URI identifying the kind of problem.
    pub type_uri: String,
    /// `title`: fixed per type.
    pub title: Cow<'static, str>,
    /// `status`: the HTTP status.
    pub status: StatusCode,
    /// `detail`: this occurrence, for humans.
    pub detail: String,
    /// `instance`: this occurrence, as a URI.
    pub instance: Option<String>,
    /// `code`: the stable machine code.
    pub code: String,
    /// Extension members.
    pub members: Map<String, Value>,
}

impl<'de> serde::Deserialize<'de> for ProblemDetails {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut members = Map::<String, Value>::deserialize(deserializer)?;
        let mut text = |name: &str| -> Result<Option<String>, D::Error> {
            match members.remove(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(D::Error::custom(format_args!("`{name}` must be a string"))),
            }
        };
        let type_uri = text("type")?.unwrap_or_else(|| "about:blank".to_owned());
        let title = text("title")?.unwrap_or_default();
        let detail = text("detail")?.unwrap_or_default();
        let instance = text("instance")?;
        let code = text("code")?.unwrap_or_default();
        let status = match members.remove("status") {
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .and_then(|n| StatusCode::from_u16(n).ok())
                .ok_or_else(|| {
                    D::Error::custom(format_args!("`status` {n} is not an HTTP status"))
                })?,
            Some(_) => return Err(D::Error::custom("`status` must be a number")),
            None => return Err(D::Error::missing_field("status")),
        };
        Ok(ProblemDetails {
            type_uri,
            title: Cow::Owned(title),
            status,
            detail,
            instance,
            code,
            members,
        })
    }
}

impl ProblemDetails {
    /// A problem for a status with no denial behind it (an inner service's bare error).
    pub fn for_status(status: StatusCode, config: &ProblemConfig) -> Self {
        let title = status.canonical_reason().unwrap_or("Error");
        let code = title.to_ascii_uppercase().replace([' ', '-'], "_");
        let detail = if status.is_server_error() {
            "The server could not complete the request. Retry later or contact support.".into()
        } else {
            format!("The request failed with status {}.", status.as_u16())
        };
        let mut p = ProblemDetails {
            type_uri: config.type_uri(&code),
            title: Cow::Owned(title.to_owned()),
            status,
            detail,
            instance: None,
            code,
            members: Map::new(),
        };
        p.add_common_members(config);
        p
    }

    /// Renders a denial. `now` is used only for relative times in `detail`.
    pub fn from_denial(denial: &Denial, config: &ProblemConfig) -> Self {
        let links = &config.links;
        let mut m = Map::new();
        let detail = match denial {
            Denial::Unauthenticated(AuthFailure::Missing) => {
                "This API requires an API key: send it in the x-api-key header or as \
                 `Authorization: Bearer <key>`."
                    .to_owned()
            }
            Denial::Unauthenticated(AuthFailure::Unknown) => "The API key is not valid.".into(),
            Denial::Unauthenticated(AuthFailure::Malformed(why)) => {
                format!("The credential could not be read: {why}.")
            }
            Denial::InsufficientCredits { balance, required } => {
                m.insert("balance".into(), balance.get().into());
                m.insert("required".into(), required.get().into());
                link(&mut m, "top_up_url", &links.top_up);
                let unit = if required.get() == 1 {
                    "credit"
                } else {
                    "credits"
                };
                format!("This request costs {required} {unit} but the balance is {balance}.")
            }
            Denial::QuotaExceeded {
                meter,
                limit,
                used,
                resets_at,
                ..
            } => {
                m.insert("meter".into(), meter.as_str().into());
                m.insert("limit".into(), (*limit).into());
                m.insert("used".into(), (*used).into());
                if let Some(t) = resets_at {
                    m.insert("resets_at".into(), t.to_string().into());
                }
                link(&mut m, "upgrade_url", &links.upgrade);
                match resets_at {
                    Some(t) => format!(
                        "The plan's allowance of {limit} {meter} for this period is used up; it resets at {t}."
                    ),
                    None => format!("The plan includes no {meter}."),
                }
            }
            Denial::PlanUpgradeRequired {
                current_plan,
                required_plan,
                required_feature,
                model,
            } => {
                let what = match model {
                    Some(model) => {
                        m.insert("model".into(), model.as_str().into());
                        format!("The model `{model}`")
                    }
                    None => "This route".to_owned(),
                };
                m.insert("current_plan".into(), current_plan.as_str().into());
                if let Some(p) = required_plan {
                    m.insert("required_plan".into(), p.as_str().into());
                }
                if let Some(f) = required_feature {
                    m.insert("required_feature".into(), f.as_str().into());
                }
                link(&mut m, "upgrade_url", &links.upgrade);
                match (required_feature, required_plan) {
                    (Some(f), _) => format!(
                        "{what} requires the `{f}` feature, which the {current_plan} plan does not include."
                    ),
                    (None, Some(p)) => format!(
                        "{what} requires the {p} plan or higher; the account is on {current_plan}."
                    ),
                    (None, None) => format!(
                        "{what} requires a higher plan than {current_plan}."
                    ),
                }
            }
            Denial::SubscriptionExpired { plan, ended_at } => {
                m.insert("plan".into(), plan.as_str().into());
                opt_time(&mut m, "ended_at", *ended_at);
                link(&mut m, "billing_url", &links.billing);
                match ended_at {
                    Some(t) => format!("The subscription to the {plan} plan ended at {t}."),
                    None => format!("The subscription to the {plan} plan has ended."),
                }
            }
            Denial::SubscriptionPastDue { grace_until } => {
                opt_time(&mut m, "grace_until", *grace_until);
                link(&mut m, "billing_url", &links.billing);
                "The renewal payment failed and the grace period is over; update the payment \
                 method to continue."
                    .to_owned()
            }
            Denial::TrialExpired { trial_ended_at } => {
                opt_time(&mut m, "trial_ended_at", *trial_ended_at);
                link(&mut m, "upgrade_url", &links.upgrade);
                "The free trial has ended; choose a paid plan to continue.".to_owned()
            }
            Denial::SubscriptionPending { plan } => {
                if let Some(p) = plan {
                    m.insert("plan".into(), p.as_str().into());
                }
                link(&mut m, "billing_url", &links.billing);
                match plan {
                    Some(_) => "The subscription is not active yet: it awaits its first payment \
                                or an approval."
                        .to_owned(),
                    None => "The account has no subscription.".to_owned(),
                }
            }
            Denial::PaymentDeclined { decline_code } => {
                m.insert("decline_code".into(), decline_code.as_str().into());
                link(&mut m, "billing_url", &links.billing);
                format!("The payment was declined ({decline_code}).")
            }
            Denial::BudgetExhausted(b) => {
                m.insert("level".into(), b.level.as_str().into());
                m.insert("owner".into(), b.owner.as_str().into());
                m.insert("budget".into(), b.budget.into());
                m.insert("used".into(), b.used.into());
                m.insert("period".into(), b.period.name().into());
                m.insert("resets_at".into(), b.resets_at.to_string().into());
                let unit = match &b.meter {
                    Some(meter) => {
                        m.insert("meter".into(), meter.as_str().into());
                        meter.as_str()
                    }
                    None if b.budget == 1 => "credit",
                    None => "credits",
                };
                if let Some(url) = &b.manage_url {
                    m.insert("manage_url".into(), url.as_str().into());
                }
                let who = match (&b.manager, &b.manage_url) {
                    (Some(name), Some(url)) => format!("{name} can raise it at {url}"),
                    (Some(name), None) => format!("{name} can raise it"),
                    (None, Some(url)) => format!("it can be raised at {url}"),
                    (None, None) => format!("whoever manages the {} budget can raise it", b.level),
                };
                format!(
                    "The {level} budget of {budget} {unit} per {period} for {owner} is used up \
                     ({used} used); it resets at {resets}. This is a spending limit set for the \
                     {level}, not the account's balance: {who}.",
                    level = b.level,
                    budget = b.budget,
                    period = b.period.name().replace('_', " "),
                    owner = b.owner,
                    used = b.used,
                    resets = b.resets_at,
                )
            }
            Denial::BadRequest { detail, .. } => detail.to_string(),
            Denial::IdempotencyConflict { in_progress: false } => {
                "This Idempotency-Key was already used for a different request.".to_owned()
            }
            Denial::IdempotencyConflict { in_progress: true } => {
                "A request with this Idempotency-Key is still being processed; retry once it \
                 has completed."
                    .to_owned()
            }
            Denial::IdempotencyResponseNotRecorded => {
                "The request with this Idempotency-Key was served and charged, but its response \
                 was not recorded (too large, or no longer kept), so it cannot be replayed. Send \
                 a new request with a new key."
                    .to_owned()
            }
            Denial::Unavailable { retry_after_secs } => {
                format!("Billing is temporarily unavailable; retry in {retry_after_secs} seconds.")
            }
            Denial::Custom(c) => {
                m.extend(c.members.iter().map(|(k, v)| (k.clone(), v.clone())));
                c.detail.clone()
            }
        };
        let code = denial.code().to_owned();
        let mut p = ProblemDetails {
            type_uri: config.type_uri(&code),
            title: denial.title(),
            status: denial.status(),
            detail,
            instance: None,
            code,
            members: m,
        };
        p.add_common_members(config);
        p
    }

    fn add_common_members(&mut self, config: &ProblemConfig) {
        link(&mut self.members, "support_url", &config.links.support);
        link(&mut self.members, "docs_url", &config.links.docs);
        if config.openai_errors {
            let error = serde_json::json!({
                "message": self.detail,
                "type": openai_error_type(self.status, &self.code),
                "code": self.code,
                "param": null,
            });
            self.members.insert("error".into(), error);
        }
    }

    /// The document as JSON.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("type".into(), self.type_uri.clone().into());
        o.insert("title".into(), self.title.as_ref().into());
        o.insert("status".into(), self.status.as_u16().into());
        o.insert("detail".into(), self.detail.clone().into());
        if let Some(i) = &self.instance {
            o.insert("instance".into(), i.clone().into());
        }
        o.insert("code".into(), self.code.clone().into());
        for (k, v) in &self.members {
            // The standard members cannot be overridden by an extension.
            if !matches!(
                k.as_str(),
                "type" | "title" | "status" | "detail" | "instance" | "code"
            ) {
                o.insert(k.clone(), v.clone());
            }
        }
        Value::Object(o)
    }

    /// The document serialized.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(self.to_json().to_string())
    }

    /// A complete response: status, `content-type: application/problem+json`,
    /// `cache-control: no-store`, the body.
    pub fn into_response<B>(self) -> Response<ResponseBody<B>> {
        let mut res = Response::new(ResponseBody::full(self.to_bytes()));
        *res.status_mut() = self.status;
        set_problem_headers(res.headers_mut());
        res
    }
}

/// The `type` of the OpenAI-shaped `error` member ([`ProblemConfig::openai_errors`]).
fn openai_error_type(status: StatusCode, code: &str) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => match code {
            "INSUFFICIENT_CREDITS" | "QUOTA_EXCEEDED" | "BUDGET_EXHAUSTED" => "insufficient_quota",
            _ => "billing_error",
        },
        403 => "permission_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// Whether retrying the same request can succeed, as `x-should-retry` says it: `false` on 402
/// (until the payment condition is fixed), on a reused `Idempotency-Key` and on the other 4xx;
/// `true` on 408, 429, 5xx, and on `IDEMPOTENCY_KEY_IN_USE` (the first attempt is still
/// running: its retry gets the recorded answer).
pub(crate) fn retry_can_help(denial: &Denial) -> bool {
    match denial {
        Denial::IdempotencyConflict { in_progress } => *in_progress,
        d => matches!(d.status().as_u16(), 408 | 429 | 500..=599),
    }
}

/// The header the OpenAI and Anthropic SDKs obey over their own retry rules.
pub(crate) static X_SHOULD_RETRY: http::HeaderName =
    http::HeaderName::from_static("x-should-retry");

pub(crate) fn set_problem_headers(h: &mut HeaderMap) {
    h.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.remove(http::header::CONTENT_LENGTH);
}

fn link(m: &mut Map<String, Value>, name: &str, url: &Option<String>) {
    if let Some(u) = url {
        m.insert(name.into(), u.clone().into());
    }
}

fn opt_time(m: &mut Map<String, Value>, name: &str, t: Option<Timestamp>) {
    if let Some(t) = t {
        m.insert(name.into(), t.to_string().into());
    }
}

/// A structured-field token safe to put in a header: meter names are configuration, but a
/// header must never be malformed because of one.
pub(crate) fn sf_key(meter: &str) -> String {
    meter
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
        .collect()
}

/// The full response for a denial: the problem document, the headers that go with it, and
/// the denial itself in the response extensions for outer layers. A gRPC request (`grpc`)
/// gets the trailers-only gRPC rendering of the same problem instead.
pub(crate) fn denial_response<B>(
    denial: Denial,
    config: &ProblemConfig,
    now: Timestamp,
    grpc: bool,
) -> Response<ResponseBody<B>> {
    let problem = ProblemDetails::from_denial(&denial, config);
    let extra = denial_headers(&denial, config, now);
    let mut res = if grpc {
        super::grpc::grpc_response(&problem, Some(&denial), config, extra)
    } else {
        let mut res = problem.into_response();
        res.headers_mut().extend(extra);
        res
    };
    res.extensions_mut().insert(Arc::new(denial));
    res
}

/// `Retry-After` on `409 IDEMPOTENCY_KEY_IN_USE`: most paid requests finish within a second.
const IN_USE_RETRY_AFTER_SECS: u64 = 1;

/// The headers a denial adds to its problem: `x-should-retry`, `WWW-Authenticate`,
/// `Retry-After`, rate limits.
pub(crate) fn denial_headers(denial: &Denial, config: &ProblemConfig, now: Timestamp) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        X_SHOULD_RETRY.clone(),
        HeaderValue::from_static(if retry_can_help(denial) {
            "true"
        } else {
            "false"
        }),
    );
    match denial {
        Denial::Unauthenticated(why) => {
            let realm = sf_key(&config.realm);
            let v = match why {
                AuthFailure::Missing => format!("Bearer realm=\"{realm}\""),
                _ => format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
            };
            if let Ok(v) = HeaderValue::try_from(v) {
                h.insert(WWW_AUTHENTICATE, v);
            }
        }
        Denial::QuotaExceeded {
            meter,
            limit,
            resets_at: Some(resets_at),
            window_secs,
            ..
        } => {
            let secs = now.secs_until(*resets_at);
            let key = sf_key(meter.as_str());
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
            // `qu` names the quota unit when it is not requests (the draft's default).
            let unit = if meter.as_str() == "requests" {
                String::new()
            } else {
                format!(";qu=\"{key}\"")
            };
            let policy = match window_secs {
                Some(w) => format!("\"{key}\";q={limit}{unit};w={w}"),
                None => format!("\"{key}\";q={limit}{unit}"),
            };
            if let Ok(v) = HeaderValue::try_from(policy) {
                h.insert("ratelimit-policy", v);
            }
            if let Ok(v) = HeaderValue::try_from(format!("\"{key}\";r=0;t={secs}")) {
                h.insert("ratelimit", v);
            }
        }
        Denial::Unavailable { retry_after_secs } => {
            h.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        Denial::BudgetExhausted(b) => {
            h.insert(RETRY_AFTER, HeaderValue::from(now.secs_until(b.resets_at)));
        }
        // The first attempt is still running: its answer is recorded when it ends.
        Denial::IdempotencyConflict { in_progress: true } => {
            h.insert(RETRY_AFTER, HeaderValue::from(IN_USE_RETRY_AFTER_SECS));
        }
        _ => {}
    }
    h
}

#[cfg(feature = "axum")]
mod axum_impl {
    use axum_core::body::Body;
    use axum_core::response::{IntoResponse, Response};

    use super::{ProblemConfig, ProblemDetails};
    use crate::decision::Denial;
    use crate::time::Timestamp;

    impl IntoResponse for ProblemDetails {
        fn into_response(self) -> Response {
            ProblemDetails::into_response::<Body>(self).map(Body::new)
        }
    }

    /// Renders with the default [`ProblemConfig`]; put a
    /// [`ProblemDetailsLayer`](crate::ProblemDetailsLayer) outside to add your links.
    impl IntoResponse for Denial {
        fn into_response(self) -> Response {
            super::denial_response::<Body>(self, &ProblemConfig::default(), Timestamp::now(), false)
                .map(Body::new)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::CustomDenial;
    use crate::plan::PlanId;
    use crate::Credits;

    fn denials() -> Vec<Denial> {
        vec![
            Denial::Unauthenticated(AuthFailure::Missing),
            Denial::InsufficientCredits {
                balance: Credits::new(3),
                required: Credits::new(10),
            },
            Denial::PlanUpgradeRequired {
                current_plan: PlanId::new("basic"),
                required_plan: Some(PlanId::new("pro")),
                required_feature: None,
                model: None,
            },
            Denial::PaymentDeclined {
                decline_code: "card_declined".into(),
            },
            Denial::IdempotencyConflict { in_progress: false },
            Denial::IdempotencyConflict { in_progress: true },
            Denial::Unavailable {
                retry_after_secs: 5,
            },
            Denial::Custom(Box::new(CustomDenial::new(
                StatusCode::TOO_MANY_REQUESTS,
                "SLOW_DOWN",
                "Slow down",
                "too many requests this second",
            ))),
        ]
    }

    #[test]
    fn every_rendered_problem_reads_back_the_same() {
        let config = ProblemConfig::new().openai_errors(true).links(
            Links::new()
                .top_up("https://example.com/top-up")
                .docs("https://d"),
        );
        for denial in denials() {
            let mut p = ProblemDetails::from_denial(&denial, &config);
            p.instance = Some("urn:request:abc".into());
            let back: ProblemDetails = serde_json::from_slice(&p.to_bytes()).unwrap();
            assert_eq!(back, p, "{denial:?}");
        }
    }

    #[test]
    fn reading_keeps_unknown_members_and_fills_optional_ones() {
        let p: ProblemDetails =
            serde_json::from_str(r#"{"status": 503, "retry_hint": {"a": [1, 2]}}"#).unwrap();
        assert_eq!(p.type_uri, "about:blank");
        assert_eq!(p.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            (p.title.as_ref(), p.detail.as_str(), p.code.as_str()),
            ("", "", "")
        );
        assert_eq!(p.instance, None);
        assert_eq!(p.members["retry_hint"]["a"][1], 2);
    }

    #[test]
    fn reading_refuses_what_is_not_a_problem() {
        for (doc, why) in [
            (r#"{"title": "x"}"#, "missing field `status`"),
            (r#"{"status": 99}"#, "not an HTTP status"),
            (r#"{"status": 70000}"#, "not an HTTP status"),
            (r#"{"status": -1}"#, "not an HTTP status"),
            (r#"{"status": "402"}"#, "`status` must be a number"),
            (
                r#"{"status": 402, "detail": 7}"#,
                "`detail` must be a string",
            ),
            (r#"[1, 2]"#, "map"),
        ] {
            let err = serde_json::from_str::<ProblemDetails>(doc).unwrap_err();
            assert!(err.to_string().contains(why), "{doc}: {err}");
        }
    }

    #[test]
    fn x_should_retry_says_whether_a_retry_can_help() {
        let config = ProblemConfig::new();
        let expect = [
            ("UNAUTHENTICATED", "false"),
            ("INSUFFICIENT_CREDITS", "false"),
            ("PLAN_UPGRADE_REQUIRED", "false"),
            ("PAYMENT_DECLINED", "false"),
            ("IDEMPOTENCY_KEY_REUSED", "false"),
            ("IDEMPOTENCY_KEY_IN_USE", "true"),
            ("SERVICE_UNAVAILABLE", "true"),
            ("SLOW_DOWN", "true"),
        ];
        for (denial, (code, retry)) in denials().into_iter().zip(expect) {
            assert_eq!(denial.code(), code);
            let res = denial_response::<http_body_util::Empty<Bytes>>(
                denial,
                &config,
                Timestamp::from_unix(0),
                false,
            );
            assert_eq!(res.headers()["x-should-retry"], retry, "{code}");
        }
    }

    #[test]
    fn grpc_answers_carry_no_x_should_retry() {
        let res = denial_response::<http_body_util::Empty<Bytes>>(
            Denial::Unavailable {
                retry_after_secs: 5,
            },
            &ProblemConfig::new(),
            Timestamp::from_unix(0),
            true,
        );
        assert_eq!(res.headers()["grpc-status"], "14");
        assert!(res.headers().get("x-should-retry").is_none());
    }

    #[test]
    fn openai_error_member_only_when_asked() {
        let denial = Denial::InsufficientCredits {
            balance: Credits::new(0),
            required: Credits::new(5),
        };
        let plain = ProblemDetails::from_denial(&denial, &ProblemConfig::new()).to_json();
        assert!(plain.get("error").is_none());
        let config = ProblemConfig::new().openai_errors(true);
        let doc = ProblemDetails::from_denial(&denial, &config).to_json();
        assert_eq!(
            doc["error"],
            serde_json::json!({
                "message": "This request costs 5 credits but the balance is 0.",
                "type": "insufficient_quota",
                "code": "INSUFFICIENT_CREDITS",
                "param": null,
            })
        );
        // Still a problem document: the standard members are untouched.
        assert_eq!(doc["status"], 402);
        assert_eq!(doc["code"], "INSUFFICIENT_CREDITS");
        let types: Vec<_> = [
            (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            (StatusCode::PAYMENT_REQUIRED, "PLAN_UPGRADE_REQUIRED"),
            (StatusCode::CONFLICT, "IDEMPOTENCY_KEY_REUSED"),
            (StatusCode::TOO_MANY_REQUESTS, "X"),
            (StatusCode::BAD_GATEWAY, "X"),
        ]
        .into_iter()
        .map(|(s, c)| openai_error_type(s, c))
        .collect();
        assert_eq!(
            types,
            [
                "authentication_error",
                "billing_error",
                "invalid_request_error",
                "rate_limit_error",
                "server_error"
            ]
        );
        let bare = ProblemDetails::for_status(StatusCode::NOT_FOUND, &config).to_json();
        assert_eq!(bare["error"]["code"], "NOT_FOUND");
    }
}
