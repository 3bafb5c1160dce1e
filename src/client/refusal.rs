use std::fmt;
use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value};

use super::rpc;
use crate::problem::{GrpcCode, ProblemDetails};
use crate::time::Timestamp;
use crate::Credits;

/// The stable machine code of a refusal (the `code` member of a problem, the `reason` of a
/// gRPC `ErrorInfo`). Codes this version does not know are kept in [`Other`](Self::Other).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalCode {
    /// 401: no, unknown or malformed credential.
    Unauthenticated,
    /// 402: the balance is below the cost of the request.
    InsufficientCredits,
    /// 402: the plan's allowance for this period is used up.
    QuotaExceeded,
    /// 402: the route needs a higher plan or a feature the plan lacks.
    PlanUpgradeRequired,
    /// 402: the subscription has ended.
    SubscriptionExpired,
    /// 402: the renewal payment failed and the grace period is over.
    SubscriptionPastDue,
    /// 402: the trial ended without a paid plan.
    TrialExpired,
    /// 402: the subscription is not active yet.
    SubscriptionPending,
    /// 402: a direct charge was declined.
    PaymentDeclined,
    /// 402: a key's, team's or organisation's budget for the period is spent.
    BudgetExhausted,
    /// 400: the `Idempotency-Key` is malformed.
    InvalidIdempotencyKey,
    /// 400: billing input the server needs could not be read.
    InvalidRequest,
    /// 409: the `Idempotency-Key` was used for a different request: never retry with it.
    IdempotencyKeyReused,
    /// 409: the first request with this key is still running: retry later.
    IdempotencyKeyInUse,
    /// 409: the request with this `Idempotency-Key` was served and charged, but its response
    /// was not recorded (too large), so it cannot be replayed: use a new key.
    IdempotencyResponseNotRecorded,
    /// 503: billing is unavailable.
    ServiceUnavailable,
    /// Any other code, as sent.
    Other(String),
}

impl RefusalCode {
    /// The code as sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            RefusalCode::Unauthenticated => "UNAUTHENTICATED",
            RefusalCode::InsufficientCredits => "INSUFFICIENT_CREDITS",
            RefusalCode::QuotaExceeded => "QUOTA_EXCEEDED",
            RefusalCode::PlanUpgradeRequired => "PLAN_UPGRADE_REQUIRED",
            RefusalCode::SubscriptionExpired => "SUBSCRIPTION_EXPIRED",
            RefusalCode::SubscriptionPastDue => "SUBSCRIPTION_PAST_DUE",
            RefusalCode::TrialExpired => "TRIAL_EXPIRED",
            RefusalCode::SubscriptionPending => "SUBSCRIPTION_PENDING",
            RefusalCode::PaymentDeclined => "PAYMENT_DECLINED",
            RefusalCode::BudgetExhausted => "BUDGET_EXHAUSTED",
            RefusalCode::InvalidIdempotencyKey => "INVALID_IDEMPOTENCY_KEY",
            RefusalCode::InvalidRequest => "INVALID_REQUEST",
            RefusalCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            RefusalCode::IdempotencyKeyInUse => "IDEMPOTENCY_KEY_IN_USE",
            RefusalCode::IdempotencyResponseNotRecorded => "IDEMPOTENCY_RESPONSE_NOT_RECORDED",
            RefusalCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            RefusalCode::Other(code) => code,
        }
    }

    /// Whether paying (topping up, upgrading, fixing the payment method) is what it takes.
    pub fn is_payment_condition(&self) -> bool {
        matches!(
            self,
            RefusalCode::InsufficientCredits
                | RefusalCode::QuotaExceeded
                | RefusalCode::PlanUpgradeRequired
                | RefusalCode::SubscriptionExpired
                | RefusalCode::SubscriptionPastDue
                | RefusalCode::TrialExpired
                | RefusalCode::SubscriptionPending
                | RefusalCode::PaymentDeclined
                | RefusalCode::BudgetExhausted
        )
    }
}

impl From<&str> for RefusalCode {
    fn from(code: &str) -> Self {
        match code {
            "UNAUTHENTICATED" => RefusalCode::Unauthenticated,
            "INSUFFICIENT_CREDITS" => RefusalCode::InsufficientCredits,
            "QUOTA_EXCEEDED" => RefusalCode::QuotaExceeded,
            "PLAN_UPGRADE_REQUIRED" => RefusalCode::PlanUpgradeRequired,
            "SUBSCRIPTION_EXPIRED" => RefusalCode::SubscriptionExpired,
            "SUBSCRIPTION_PAST_DUE" => RefusalCode::SubscriptionPastDue,
            "TRIAL_EXPIRED" => RefusalCode::TrialExpired,
            "SUBSCRIPTION_PENDING" => RefusalCode::SubscriptionPending,
            "PAYMENT_DECLINED" => RefusalCode::PaymentDeclined,
            "BUDGET_EXHAUSTED" => RefusalCode::BudgetExhausted,
            "INVALID_IDEMPOTENCY_KEY" => RefusalCode::InvalidIdempotencyKey,
            "INVALID_REQUEST" => RefusalCode::InvalidRequest,
            "IDEMPOTENCY_KEY_REUSED" => RefusalCode::IdempotencyKeyReused,
            "IDEMPOTENCY_KEY_IN_USE" => RefusalCode::IdempotencyKeyInUse,
            "IDEMPOTENCY_RESPONSE_NOT_RECORDED" => RefusalCode::IdempotencyResponseNotRecorded,
            "SERVICE_UNAVAILABLE" => RefusalCode::ServiceUnavailable,
            other => RefusalCode::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a refused request can succeed if it is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryClass {
    /// Never as it is: a bad request, a missing credential, a reused `Idempotency-Key`.
    Never,
    /// Only once the payment condition is fixed (a 402): retrying blindly can never help.
    AfterPayment,
    /// Later: a rate limit, billing unavailable, the first attempt still running. Wait
    /// [`Refusal::retry_after`] when it is known.
    Later,
}

/// Where the refusal sends a person to fix it (the problem's `*_url` members, a gRPC
/// `Help`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusalLinks {
    /// Buy more credits (`top_up_url`).
    pub top_up: Option<String>,
    /// Choose a higher plan (`upgrade_url`).
    pub upgrade: Option<String>,
    /// The billing portal (`billing_url`).
    pub billing: Option<String>,
    /// Human support (`support_url`).
    pub support: Option<String>,
    /// Documentation (`docs_url`).
    pub docs: Option<String>,
}

impl RefusalLinks {
    fn set(&mut self, name: &str, url: &str) {
        let slot = match name.strip_suffix("_url").unwrap_or(name) {
            "top_up" => &mut self.top_up,
            "upgrade" => &mut self.upgrade,
            "billing" => &mut self.billing,
            "support" => &mut self.support,
            "docs" => &mut self.docs,
            _ => return,
        };
        if slot.is_none() && !url.is_empty() {
            *slot = Some(url.to_owned());
        }
    }

    /// The link that fixes a refusal with `code`, for a person: top-up for missing credit,
    /// upgrade for plan and allowance conditions, billing for subscription and payment ones.
    pub fn for_code(&self, code: &RefusalCode) -> Option<&str> {
        fn first<'a>(a: &'a Option<String>, b: &'a Option<String>) -> Option<&'a str> {
            a.as_deref().or(b.as_deref())
        }
        match code {
            RefusalCode::InsufficientCredits | RefusalCode::BudgetExhausted => {
                first(&self.top_up, &self.billing)
            }
            RefusalCode::QuotaExceeded
            | RefusalCode::PlanUpgradeRequired
            | RefusalCode::TrialExpired => first(&self.upgrade, &self.billing),
            RefusalCode::SubscriptionExpired
            | RefusalCode::SubscriptionPastDue
            | RefusalCode::SubscriptionPending
            | RefusalCode::PaymentDeclined => first(&self.billing, &self.upgrade),
            _ => first(&self.support, &self.docs),
        }
    }
}

/// A refusal, read from an HTTP response or a gRPC status: what a client needs to decide and
/// to tell its user. See the [module docs](crate::client).
///
/// The amounts are integers, as sent: a member that is not a non-negative integer (a float,
/// a string, a number above `u64::MAX`) reads as `None`, never as a rounded amount.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Refusal {
    /// The HTTP status; for a gRPC refusal, the status the code stands for (402 for payment
    /// conditions, 401, 409, 503, ...) or `None` when unknown.
    pub status: Option<StatusCode>,
    /// The gRPC status code, for a gRPC refusal.
    pub grpc_code: Option<GrpcCode>,
    /// The stable machine code.
    pub code: RefusalCode,
    /// What happened, for a person (`detail`, `grpc-message`).
    pub detail: String,
    /// Whether retrying can help.
    pub retry: RetryClass,
    /// How long to wait before retrying (`Retry-After`, a gRPC `RetryInfo`).
    pub retry_after: Option<Duration>,
    /// When the allowance resets (`resets_at`).
    pub resets_at: Option<Timestamp>,
    /// The balance (`balance`, `INSUFFICIENT_CREDITS`).
    pub balance: Option<Credits>,
    /// What the request costs (`required`, `INSUFFICIENT_CREDITS`).
    pub required: Option<Credits>,
    /// Where to fix it.
    pub links: RefusalLinks,
    /// The server's id for the request (`request_id`), to quote to support.
    pub request_id: Option<String>,
    /// The problem document, for an HTTP refusal that sent one; every member is in it.
    pub problem: Option<ProblemDetails>,
    /// The gRPC `ErrorInfo` metadata (every extension member as a string), for a gRPC
    /// refusal.
    pub metadata: Map<String, Value>,
    /// The subjects of a gRPC `QuotaFailure` (`credits`, `allowance:<meter>`).
    pub quota_subjects: Vec<String>,
}

/// The most of a refusal's body a client reads (a problem document is a few hundred bytes).
pub(crate) const MAX_BODY: usize = 64 * 1024;

impl Refusal {
    /// Reads a refused HTTP response: its status, headers and body. `None` for a success
    /// (below 400).
    ///
    /// The body is read as a problem document (`application/problem+json` or JSON with a
    /// `status` member), or as an OpenAI-shaped `{"error": {"message", "code"}}`; any other
    /// body leaves the code as the status's reason (`SERVICE_UNAVAILABLE`, ...). Whether
    /// retrying helps comes from `x-should-retry` when the server sends it, else from the
    /// status: 402 [`AfterPayment`](RetryClass::AfterPayment); 408, 429, 502, 503, 504 and
    /// `IDEMPOTENCY_KEY_IN_USE` [`Later`](RetryClass::Later); anything else
    /// [`Never`](RetryClass::Never).
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use tower_402::client::{Refusal, RefusalCode, RetryClass};
    ///
    /// let body = br#"{"type": "https://docs.example.com/problems/insufficient-credits",
    ///   "title": "Insufficient credits", "status": 402, "code": "INSUFFICIENT_CREDITS",
    ///   "detail": "This request costs 10 credits but the balance is 3.",
    ///   "balance": 3, "required": 10, "top_up_url": "https://example.com/top-up"}"#;
    /// let refusal = Refusal::from_http(StatusCode::PAYMENT_REQUIRED, &HeaderMap::new(), body).unwrap();
    /// assert_eq!(refusal.code, RefusalCode::InsufficientCredits);
    /// assert_eq!(refusal.retry, RetryClass::AfterPayment);
    /// assert_eq!(refusal.balance.map(|c| c.get()), Some(3));
    /// assert_eq!(
    ///     refusal.to_string(),
    ///     "This request costs 10 credits but the balance is 3. Fix it here: https://example.com/top-up"
    /// );
    /// ```
    pub fn from_http(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Self> {
        if status.as_u16() < 400 {
            return None;
        }
        let json = serde_json::from_slice::<Value>(body).ok();
        let is_problem = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with(crate::problem::PROBLEM_JSON)
            });
        let problem = json.as_ref().and_then(|v| {
            let mut doc = v.as_object()?.clone();
            if !is_problem && !doc.contains_key("status") {
                return None;
            }
            // The HTTP status is the authority (RFC 9457 §3.1.2).
            doc.insert("status".into(), status.as_u16().into());
            serde_json::from_value::<ProblemDetails>(Value::Object(doc)).ok()
        });
        let openai = json
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_object);
        let text =
            |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
        let code = problem
            .as_ref()
            .map(|p| p.code.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| openai.and_then(|e| text(e, "code")))
            .unwrap_or_else(|| reason_code(status));
        let detail = problem
            .as_ref()
            .map(|p| p.detail.clone())
            .filter(|d| !d.is_empty())
            .or_else(|| openai.and_then(|e| text(e, "message")))
            .unwrap_or_else(|| format!("The request failed with status {}.", status.as_u16()));
        let code = RefusalCode::from(code.as_str());
        let mut refusal = Refusal::new(Some(status), None, code, detail);
        refusal.retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, Timestamp::now()));
        if let Some(p) = &problem {
            refusal.read_members(&p.members);
        }
        let should_retry = headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        refusal.retry = match (status.as_u16(), should_retry) {
            (402, _) => RetryClass::AfterPayment,
            (_, Some("true")) => RetryClass::Later,
            (_, Some("false")) => RetryClass::Never,
            _ if refusal.code == RefusalCode::IdempotencyKeyInUse => RetryClass::Later,
            (408 | 429 | 502 | 503 | 504, _) => RetryClass::Later,
            _ => RetryClass::Never,
        };
        refusal.problem = problem;
        Some(refusal)
    }

    /// Reads a gRPC refusal from response headers or trailers: `grpc-status`,
    /// `grpc-message` and `grpc-status-details-bin` (a `google.rpc.Status` whose `ErrorInfo`,
    /// `QuotaFailure`, `RetryInfo` and `Help` are read). `None` when `grpc-status` is absent
    /// or 0 (OK).
    ///
    /// Whether retrying helps: from the `ErrorInfo` reason when there is one (payment
    /// conditions [`AfterPayment`](RetryClass::AfterPayment), `IDEMPOTENCY_KEY_IN_USE` and
    /// `SERVICE_UNAVAILABLE` [`Later`](RetryClass::Later), ...), else from the code:
    /// `UNAVAILABLE`, `ABORTED`, and `RESOURCE_EXHAUSTED` with a `RetryInfo` are `Later`.
    pub fn from_grpc_headers(headers: &HeaderMap) -> Option<Self> {
        let code = headers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()?;
        if code == 0 {
            return None;
        }
        let message = headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(rpc::percent_decode)
            .unwrap_or_default();
        let details = headers
            .get("grpc-status-details-bin")
            .and_then(|v| v.to_str().ok())
            .and_then(rpc::base64_decode)
            .unwrap_or_default();
        let mut refusal = Refusal::from_grpc_parts(code, message, &details);
        if refusal.retry_after.is_none() {
            refusal.retry_after = headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, Timestamp::now()));
        }
        Some(refusal)
    }

    /// Reads a gRPC refusal from its code, message and `grpc-status-details-bin` bytes (the
    /// serialized `google.rpc.Status`; empty or undecodable details leave only the code and
    /// message).
    pub fn from_grpc_parts(code: i32, message: String, details: &[u8]) -> Self {
        let grpc = grpc_code(code);
        let status = <rpc::Status as prost::Message>::decode(details).ok();
        let mut info = None;
        let mut retry_after = None;
        let mut help = Vec::new();
        let mut quota = Vec::new();
        for any in status.iter().flat_map(|s| &s.details) {
            if let Some(i) = any.unpack::<rpc::ErrorInfo>("ErrorInfo") {
                info.get_or_insert(i);
            } else if let Some(r) = any.unpack::<rpc::RetryInfo>("RetryInfo") {
                retry_after = r.retry_delay.and_then(|d| {
                    let secs = u64::try_from(d.seconds).ok()?;
                    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
                    Some(Duration::new(secs, nanos))
                });
            } else if let Some(h) = any.unpack::<rpc::Help>("Help") {
                help.extend(h.links);
            } else if let Some(q) = any.unpack::<rpc::QuotaFailure>("QuotaFailure") {
                quota.extend(q.violations);
            }
        }
        let code_name = match &info {
            Some(i) if !i.reason.is_empty() => i.reason.clone(),
            _ => grpc.map_or_else(|| format!("GRPC_{code}"), |g| grpc_name(g).to_owned()),
        };
        let refusal_code = RefusalCode::from(code_name.as_str());
        let detail = if message.is_empty() {
            status
                .as_ref()
                .map(|s| s.message.clone())
                .unwrap_or_default()
        } else {
            message
        };
        let http_status = match &refusal_code {
            c if c.is_payment_condition() => Some(StatusCode::PAYMENT_REQUIRED),
            RefusalCode::Unauthenticated => Some(StatusCode::UNAUTHORIZED),
            RefusalCode::IdempotencyKeyReused | RefusalCode::IdempotencyKeyInUse => {
                Some(StatusCode::CONFLICT)
            }
            RefusalCode::ServiceUnavailable => Some(StatusCode::SERVICE_UNAVAILABLE),
            RefusalCode::InvalidIdempotencyKey | RefusalCode::InvalidRequest => {
                Some(StatusCode::BAD_REQUEST)
            }
            _ => None,
        };
        let mut refusal = Refusal::new(http_status, grpc, refusal_code, detail);
        refusal.retry_after = retry_after;
        if let Some(info) = info {
            let mut keys: Vec<_> = info.metadata.into_iter().collect();
            keys.sort();
            let members: Map<String, Value> = keys
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            refusal.read_members(&members);
            refusal.metadata = members;
        }
        for link in help {
            refusal.links.set(&link.description, &link.url);
        }
        refusal.quota_subjects = quota.into_iter().map(|v| v.subject).collect();
        refusal.retry = if refusal.code.is_payment_condition() {
            RetryClass::AfterPayment
        } else {
            match (&refusal.code, grpc) {
                (RefusalCode::IdempotencyKeyInUse | RefusalCode::ServiceUnavailable, _) => {
                    RetryClass::Later
                }
                (RefusalCode::IdempotencyKeyReused, _) => RetryClass::Never,
                (_, Some(GrpcCode::Unavailable | GrpcCode::Aborted)) => RetryClass::Later,
                (_, Some(GrpcCode::ResourceExhausted)) if refusal.retry_after.is_some() => {
                    RetryClass::Later
                }
                _ => RetryClass::Never,
            }
        };
        refusal
    }

    /// Reads a [`tonic::Status`] a tonic client returned.
    #[cfg(feature = "grpc")]
    pub fn from_tonic(status: &tonic::Status) -> Option<Self> {
        if status.code() == tonic::Code::Ok {
            return None;
        }
        let mut refusal = Refusal::from_grpc_parts(
            status.code() as i32,
            status.message().to_owned(),
            status.details(),
        );
        if refusal.retry_after.is_none() {
            refusal.retry_after = status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
        }
        Some(refusal)
    }

    fn new(
        status: Option<StatusCode>,
        grpc_code: Option<GrpcCode>,
        code: RefusalCode,
        detail: String,
    ) -> Self {
        Refusal {
            status,
            grpc_code,
            code,
            detail,
            retry: RetryClass::Never,
            retry_after: None,
            resets_at: None,
            balance: None,
            required: None,
            links: RefusalLinks::default(),
            request_id: None,
            problem: None,
            metadata: Map::new(),
            quota_subjects: Vec::new(),
        }
    }

    /// Amounts, links, reset time and request id, from problem members or `ErrorInfo`
    /// metadata (where every value is a string).
    fn read_members(&mut self, m: &Map<String, Value>) {
        let amount = |k: &str| -> Option<Credits> {
            match m.get(k)? {
                Value::Number(n) => n.as_u64(),
                Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    s.parse().ok()
                }
                _ => None,
            }
            .map(Credits::new)
        };
        self.balance = amount("balance");
        self.required = amount("required");
        self.resets_at = m
            .get("resets_at")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339);
        self.request_id = m
            .get("request_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        for (k, v) in m {
            if let (true, Some(url)) = (k.ends_with("_url"), v.as_str()) {
                self.links.set(k, url);
            }
        }
    }

    /// The link that fixes this refusal, for a person ([`RefusalLinks::for_code`]).
    pub fn fix_link(&self) -> Option<&str> {
        self.links.for_code(&self.code)
    }
}

/// A message for a person: the detail, then where to fix it.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)?;
        if let Some(t) = self.resets_at {
            write!(f, " It resets at {t}.")?;
        }
        if let Some(link) = self.fix_link() {
            write!(f, " Fix it here: {link}")?;
        }
        Ok(())
    }
}

/// The code a bare HTTP error stands for: its reason in SCREAMING_SNAKE_CASE, as the server's
/// [`ProblemDetails::for_status`] names it.
fn reason_code(status: StatusCode) -> String {
    status
        .canonical_reason()
        .map(|r| r.to_ascii_uppercase().replace([' ', '-'], "_"))
        .unwrap_or_else(|| format!("HTTP_{}", status.as_u16()))
}

fn grpc_code(code: i32) -> Option<GrpcCode> {
    Some(match code {
        0 => GrpcCode::Ok,
        1 => GrpcCode::Cancelled,
        2 => GrpcCode::Unknown,
        3 => GrpcCode::InvalidArgument,
        4 => GrpcCode::DeadlineExceeded,
        5 => GrpcCode::NotFound,
        6 => GrpcCode::AlreadyExists,
        7 => GrpcCode::PermissionDenied,
        8 => GrpcCode::ResourceExhausted,
        9 => GrpcCode::FailedPrecondition,
        10 => GrpcCode::Aborted,
        11 => GrpcCode::OutOfRange,
        12 => GrpcCode::Unimplemented,
        13 => GrpcCode::Internal,
        14 => GrpcCode::Unavailable,
        15 => GrpcCode::DataLoss,
        16 => GrpcCode::Unauthenticated,
        _ => return None,
    })
}

fn grpc_name(code: GrpcCode) -> &'static str {
    match code {
        GrpcCode::Ok => "OK",
        GrpcCode::Cancelled => "CANCELLED",
        GrpcCode::Unknown => "UNKNOWN",
        GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
        GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
        GrpcCode::NotFound => "NOT_FOUND",
        GrpcCode::AlreadyExists => "ALREADY_EXISTS",
        GrpcCode::PermissionDenied => "PERMISSION_DENIED",
        GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
        GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
        GrpcCode::Aborted => "ABORTED",
        GrpcCode::OutOfRange => "OUT_OF_RANGE",
        GrpcCode::Unimplemented => "UNIMPLEMENTED",
        GrpcCode::Internal => "INTERNAL",
        GrpcCode::Unavailable => "UNAVAILABLE",
        GrpcCode::DataLoss => "DATA_LOSS",
        GrpcCode::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as the server writes times; `None` for anything else.
fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let year = i32::try_from(num(0..4)?).ok()?;
    Timestamp::from_utc(
        year,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    )
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay seconds, or an HTTP date (IMF-fixdate,
/// `Sun, 06 Nov 1994 08:49:37 GMT`) turned into the wait from `now` (zero when it is past).
/// `None` for anything else.
pub(crate) fn retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let rest = value.split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i32 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let (h, m, sec) = (
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
    );
    if parts.next()? != "GMT" || parts.next().is_some() || hms.next().is_some() {
        return None;
    }
    let at = Timestamp::from_utc(year, month, day, h, m, sec)?;
    Some(Duration::from_secs(at.unix().saturating_sub(now.unix())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_or_http_date() {
        let now = Timestamp::from_utc(1994, 11, 6, 8, 49, 0).unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(37))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: retry now"
        );
        for bad in [
            "",
            "-1",
            "soon",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Feb 1994 08:49:37 GMT",
        ] {
            assert_eq!(retry_after(bad, now), None, "{bad}");
        }
    }
    use crate::decision::Denial;
    use crate::problem::{Links, ProblemConfig};

    #[test]
    fn times_read_back_what_the_server_writes() {
        let t = Timestamp::from_utc(2026, 12, 1, 0, 0, 0).unwrap();
        assert_eq!(parse_rfc3339(&t.to_string()), Some(t));
        for bad in [
            "",
            "2026-12-01",
            "2026-13-01T00:00:00Z",
            "2026-12-01T00:00:00+01:00",
            "+026-12-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn amounts_are_integers_or_nothing() {
        let headers = HeaderMap::new();
        for (members, balance) in [
            (r#""balance": 3"#, Some(3)),
            (r#""balance": 18446744073709551615"#, Some(u64::MAX)),
            (r#""balance": 18446744073709551616"#, None),
            (r#""balance": 2.5"#, None),
            (r#""balance": -1"#, None),
            (r#""balance": "3""#, Some(3)),
            (r#""balance": "-3""#, None),
            (r#""balance": null"#, None),
        ] {
            let body = format!(r#"{{"status": 402, "code": "INSUFFICIENT_CREDITS", {members}}}"#);
            let r = Refusal::from_http(StatusCode::PAYMENT_REQUIRED, &headers, body.as_bytes())
                .unwrap();
            assert_eq!(r.balance.map(Credits::get), balance, "{members}");
        }
    }

    #[test]
    fn any_body_gives_a_refusal_and_never_a_panic() {
        let headers = HeaderMap::new();
        for body in [
            &b""[..],
            b"not json",
            b"[]",
            b"{\"status\": \"x\"}",
            &[0xff, 0xfe],
            b"{\"error\": 3}",
        ] {
            let r = Refusal::from_http(StatusCode::SERVICE_UNAVAILABLE, &headers, body).unwrap();
            assert_eq!(r.code, RefusalCode::ServiceUnavailable);
            assert_eq!(r.retry, RetryClass::Later);
        }
        assert!(Refusal::from_http(StatusCode::OK, &headers, b"").is_none());
        let r = Refusal::from_http(StatusCode::IM_A_TEAPOT, &headers, b"").unwrap();
        assert_eq!(r.code, RefusalCode::Other("I'M_A_TEAPOT".into()));
        assert_eq!(r.retry, RetryClass::Never);
    }

    #[test]
    fn an_openai_error_body_is_read_too() {
        let body = br#"{"error": {"message": "You exceeded your quota", "type": "insufficient_quota", "code": "insufficient_quota"}}"#;
        let r = Refusal::from_http(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), body).unwrap();
        assert_eq!(r.code, RefusalCode::Other("insufficient_quota".into()));
        assert_eq!(r.detail, "You exceeded your quota");
        assert!(r.problem.is_none());
    }

    #[test]
    fn x_should_retry_wins_over_the_status_but_not_over_402() {
        let mut h = HeaderMap::new();
        h.insert("x-should-retry", "false".parse().unwrap());
        let r = Refusal::from_http(StatusCode::SERVICE_UNAVAILABLE, &h, b"").unwrap();
        assert_eq!(r.retry, RetryClass::Never);
        h.insert("x-should-retry", "true".parse().unwrap());
        let r = Refusal::from_http(StatusCode::BAD_REQUEST, &h, b"").unwrap();
        assert_eq!(r.retry, RetryClass::Later);
        let r = Refusal::from_http(StatusCode::PAYMENT_REQUIRED, &h, b"").unwrap();
        assert_eq!(r.retry, RetryClass::AfterPayment);
    }

    #[test]
    fn every_code_reads_back() {
        for code in [
            "UNAUTHENTICATED",
            "INSUFFICIENT_CREDITS",
            "QUOTA_EXCEEDED",
            "PLAN_UPGRADE_REQUIRED",
            "SUBSCRIPTION_EXPIRED",
            "SUBSCRIPTION_PAST_DUE",
            "TRIAL_EXPIRED",
            "SUBSCRIPTION_PENDING",
            "PAYMENT_DECLINED",
            "BUDGET_EXHAUSTED",
            "INVALID_IDEMPOTENCY_KEY",
            "INVALID_REQUEST",
            "IDEMPOTENCY_KEY_REUSED",
            "IDEMPOTENCY_KEY_IN_USE",
            "SERVICE_UNAVAILABLE",
            "DEPT_BUDGET",
        ] {
            let c = RefusalCode::from(code);
            assert_eq!(c.as_str(), code);
            assert_eq!(matches!(c, RefusalCode::Other(_)), code == "DEPT_BUDGET");
        }
    }

    /// The server's own gRPC rendering, decoded: what the layers send is what a client reads.
    #[test]
    fn grpc_details_of_the_server_decode() {
        use crate::plan::Meter;
        let config = ProblemConfig::new().links(Links::new().upgrade("https://example.com/up"));
        let now = Timestamp::from_unix(1_000_000);
        let denial = Denial::QuotaExceeded {
            meter: Meter::new("requests"),
            limit: 5,
            used: 5,
            resets_at: Some(now.plus_secs(90)),
            window_secs: None,
        };
        let res = crate::problem::denial_response::<http_body_util::Empty<bytes::Bytes>>(
            denial, &config, now, true,
        );
        let r = Refusal::from_grpc_headers(res.headers()).unwrap();
        assert_eq!(r.grpc_code, Some(GrpcCode::ResourceExhausted));
        assert_eq!(r.status, Some(StatusCode::PAYMENT_REQUIRED));
        assert_eq!(r.code, RefusalCode::QuotaExceeded);
        assert_eq!(r.retry, RetryClass::AfterPayment);
        assert_eq!(r.retry_after, Some(Duration::from_secs(90)));
        assert_eq!(r.resets_at, Some(now.plus_secs(90)));
        assert_eq!(r.links.upgrade.as_deref(), Some("https://example.com/up"));
        assert_eq!(r.metadata["limit"], "5");
        assert_eq!(r.quota_subjects, ["allowance:requests"]);
        assert!(r.detail.contains("allowance of 5 requests"), "{}", r.detail);

        let res = crate::problem::denial_response::<http_body_util::Empty<bytes::Bytes>>(
            Denial::Unavailable {
                retry_after_secs: 4,
            },
            &config,
            now,
            true,
        );
        let r = Refusal::from_grpc_headers(res.headers()).unwrap();
        assert_eq!(
            (r.code.clone(), r.retry),
            (RefusalCode::ServiceUnavailable, RetryClass::Later)
        );
        assert_eq!(r.retry_after, Some(Duration::from_secs(4)));
    }

    #[test]
    fn grpc_without_details_reads_the_code() {
        let mut h = HeaderMap::new();
        assert!(Refusal::from_grpc_headers(&h).is_none());
        h.insert("grpc-status", "0".parse().unwrap());
        assert!(Refusal::from_grpc_headers(&h).is_none());
        h.insert("grpc-status", "14".parse().unwrap());
        h.insert("grpc-message", "down%20for%20a%20bit".parse().unwrap());
        h.insert("grpc-status-details-bin", "!!!".parse().unwrap());
        let r = Refusal::from_grpc_headers(&h).unwrap();
        assert_eq!(r.code, RefusalCode::Other("UNAVAILABLE".into()));
        assert_eq!(r.detail, "down for a bit");
        assert_eq!(r.retry, RetryClass::Later);
        h.insert("grpc-status", "99".parse().unwrap());
        let r = Refusal::from_grpc_headers(&h).unwrap();
        assert_eq!(
            (r.grpc_code, r.code),
            (None, RefusalCode::Other("GRPC_99".into()))
        );
    }
}
