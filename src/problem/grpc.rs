//! gRPC rendering of problems: status codes, a trailers-only response, and a hand-written
//! protobuf encoding of `google.rpc.Status` with its standard details.
//!
//! The messages are tiny (varints and length-delimited fields), so the encoder lives here
//! instead of a protobuf dependency: every build answers gRPC requests properly.

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;

use crate::body::ResponseBody;
use crate::decision::Denial;
use crate::problem::rpc;
use crate::problem::{ProblemConfig, ProblemDetails};

/// Whether a request is a gRPC call: its `content-type` is `application/grpc` or starts with
/// `application/grpc+` / `application/grpc;` (`application/grpc+proto`, ...).
///
/// ```
/// use http::HeaderMap;
/// use tower_402::problem::is_grpc;
///
/// let mut headers = HeaderMap::new();
/// assert!(!is_grpc(&headers));
/// headers.insert("content-type", "application/grpc+proto".parse().unwrap());
/// assert!(is_grpc(&headers));
/// headers.insert("content-type", "application/grpc-web".parse().unwrap());
/// assert!(!is_grpc(&headers));
/// ```
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    ct.len() >= GRPC.len()
        && ct[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(ct.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// A gRPC status code (`google.rpc.Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GrpcCode {
    /// 0: not an error.
    Ok = 0,
    /// 1: the operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// 2: an error with no better code.
    Unknown = 2,
    /// 3: the client sent an invalid argument.
    InvalidArgument = 3,
    /// 4: the deadline expired before the operation completed.
    DeadlineExceeded = 4,
    /// 5: something requested was not found.
    NotFound = 5,
    /// 6: something the client tried to create already exists.
    AlreadyExists = 6,
    /// 7: the caller may not do this, and money would not change that.
    PermissionDenied = 7,
    /// 8: a resource (credit, quota) is exhausted.
    ResourceExhausted = 8,
    /// 9: the system is not in a state required for the operation (subscription, plan).
    FailedPrecondition = 9,
    /// 10: the operation was aborted (a concurrency conflict); retry at a higher level.
    Aborted = 10,
    /// 11: out of the valid range.
    OutOfRange = 11,
    /// 12: not implemented.
    Unimplemented = 12,
    /// 13: an internal error.
    Internal = 13,
    /// 14: the service is unavailable; retry with backoff.
    Unavailable = 14,
    /// 15: unrecoverable data loss.
    DataLoss = 15,
    /// 16: no valid credential.
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The code a denial is answered with (the table in the [module docs](crate::problem)).
    pub fn for_denial(denial: &Denial) -> Self {
        match denial {
            Denial::Unauthenticated(_) => GrpcCode::Unauthenticated,
            Denial::InsufficientCredits { .. }
            | Denial::QuotaExceeded { .. }
            | Denial::BudgetExhausted(_) => GrpcCode::ResourceExhausted,
            Denial::PlanUpgradeRequired { .. }
            | Denial::SubscriptionExpired { .. }
            | Denial::SubscriptionPastDue { .. }
            | Denial::TrialExpired { .. }
            | Denial::SubscriptionPending { .. }
            | Denial::PaymentDeclined { .. } => GrpcCode::FailedPrecondition,
            Denial::BadRequest { .. } => GrpcCode::InvalidArgument,
            // The key belongs to another request: retrying with it can never succeed.
            Denial::IdempotencyConflict { in_progress: false } => GrpcCode::AlreadyExists,
            // The first attempt is still running: retry the whole call later.
            Denial::IdempotencyConflict { in_progress: true } => GrpcCode::Aborted,
            // Served and charged once; running it again would charge twice.
            Denial::IdempotencyResponseNotRecorded => GrpcCode::FailedPrecondition,
            Denial::Unavailable { .. } => GrpcCode::Unavailable,
            Denial::Custom(c) => GrpcCode::for_http_status(c.status),
        }
    }

    /// The code for an HTTP error status (custom denials, an inner service's bare errors).
    pub fn for_http_status(status: StatusCode) -> Self {
        match status.as_u16() {
            200..=299 => GrpcCode::Ok,
            400 => GrpcCode::InvalidArgument,
            401 => GrpcCode::Unauthenticated,
            402 | 412 => GrpcCode::FailedPrecondition,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::NotFound,
            408 | 504 => GrpcCode::DeadlineExceeded,
            409 => GrpcCode::Aborted,
            413 | 429 => GrpcCode::ResourceExhausted,
            499 => GrpcCode::Cancelled,
            500 => GrpcCode::Internal,
            501 => GrpcCode::Unimplemented,
            502 | 503 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }

    /// The numeric code, as sent in `grpc-status`.
    pub fn as_i32(self) -> i32 {
        self as i32
    }
}

/// Percent-encodes a `grpc-message`: bytes outside 0x20–0x7E, and `%`, become `%XX`.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Base64, standard alphabet, without padding (gRPC binary headers).
pub(crate) fn base64_unpadded(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let idx = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[idx as usize]));
        }
    }
    out
}

/// A member's value as an `ErrorInfo` metadata string: strings as they are, anything else as
/// JSON text.
fn member_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The serialized `google.rpc.Status { code, message, details }` for a problem: an
/// `ErrorInfo` (reason = code, the configured domain, metadata = extension members), then a
/// `QuotaFailure` or `PreconditionFailure` where the denial is one, a `RetryInfo` when a retry
/// delay is known, and a `Help` with the problem's links.
pub(crate) fn status_details(
    code: GrpcCode,
    problem: &ProblemDetails,
    denial: Option<&Denial>,
    config: &ProblemConfig,
    retry_after: Option<u64>,
) -> Vec<u8> {
    let info = rpc::ErrorInfo {
        reason: problem.code.clone(),
        domain: config.get_grpc_domain().to_owned(),
        // `error` (the OpenAI-shaped copy of code and detail) says nothing the status does not.
        metadata: problem
            .members
            .iter()
            .filter(|(k, _)| *k != "error")
            .map(|(k, v)| (k.clone(), member_string(v)))
            .collect(),
    };
    let mut details = vec![rpc::Any::pack("ErrorInfo", &info)];
    if let Some(failure) = denial.and_then(|d| failure_detail(d, &problem.detail)) {
        details.push(failure);
    }
    if let Some(secs) = retry_after {
        let retry = rpc::RetryInfo {
            retry_delay: Some(rpc::Duration {
                seconds: i64::try_from(secs).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        };
        details.push(rpc::Any::pack("RetryInfo", &retry));
    }
    let links: Vec<rpc::HelpLink> = problem
        .members
        .iter()
        .filter_map(|(k, v)| match (k.strip_suffix("_url"), v) {
            (Some(what), Value::String(url)) => Some(rpc::HelpLink {
                description: what.to_owned(),
                url: url.clone(),
            }),
            _ => None,
        })
        .collect();
    if !links.is_empty() {
        details.push(rpc::Any::pack("Help", &rpc::Help { links }));
    }
    let status = rpc::Status {
        code: code.as_i32(),
        message: problem.detail.clone(),
        details,
    };
    prost::Message::encode_to_vec(&status)
}

/// A `QuotaFailure` for exhausted credit or allowance, a `PreconditionFailure` for
/// subscription, plan and payment conditions.
fn failure_detail(denial: &Denial, description: &str) -> Option<rpc::Any> {
    let quota = |subject: &str| {
        let failure = rpc::QuotaFailure {
            violations: vec![rpc::QuotaViolation {
                subject: subject.to_owned(),
                description: description.to_owned(),
            }],
        };
        Some(rpc::Any::pack("QuotaFailure", &failure))
    };
    let precondition = |subject: &str| {
        let failure = rpc::PreconditionFailure {
            violations: vec![rpc::PreconditionViolation {
                r#type: denial.code().to_owned(),
                subject: subject.to_owned(),
                description: description.to_owned(),
            }],
        };
        Some(rpc::Any::pack("PreconditionFailure", &failure))
    };
    match denial {
        Denial::InsufficientCredits { .. } => quota("credits"),
        Denial::QuotaExceeded { meter, .. } => quota(&format!("allowance:{}", meter.as_str())),
        Denial::BudgetExhausted(b) => quota(&format!("budget:{}:{}", b.level, b.owner)),
        Denial::PlanUpgradeRequired {
            required_plan,
            required_feature,
            ..
        } => match (required_feature, required_plan) {
            (Some(f), _) => precondition(&format!("feature:{f}")),
            (None, Some(p)) => precondition(&format!("plan:{}", p.as_str())),
            (None, None) => precondition("plan"),
        },
        Denial::SubscriptionExpired { .. }
        | Denial::SubscriptionPastDue { .. }
        | Denial::TrialExpired { .. }
        | Denial::SubscriptionPending { .. } => precondition("subscription"),
        Denial::PaymentDeclined { .. } => precondition("payment"),
        _ => None,
    }
}

/// A trailers-only gRPC response (HTTP 200, everything in the headers, empty body) for a
/// problem. `extra` headers (`www-authenticate`, `retry-after`, rate-limit fields) are kept
/// as response metadata.
pub(crate) fn grpc_response<B>(
    problem: &ProblemDetails,
    denial: Option<&Denial>,
    config: &ProblemConfig,
    extra: HeaderMap,
) -> Response<ResponseBody<B>> {
    let code = match denial {
        Some(d) => GrpcCode::for_denial(d),
        None => GrpcCode::for_http_status(problem.status),
    };
    let retry_after = extra
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let details = status_details(code, problem, denial, config, retry_after);
    let mut res = Response::new(ResponseBody::full(bytes::Bytes::new()));
    let h = res.headers_mut();
    *h = extra;
    h.remove(http::header::CONTENT_LENGTH);
    h.remove(http::header::CACHE_CONTROL);
    // gRPC clients decide retries from the status code, not from this HTTP hint.
    h.remove(&crate::problem::details::X_SHOULD_RETRY);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code.as_i32()));
    if let Ok(v) = HeaderValue::try_from(percent_encode(&problem.detail)) {
        h.insert("grpc-message", v);
    }
    if let Ok(v) = HeaderValue::try_from(base64_unpadded(&details)) {
        h.insert("grpc-status-details-bin", v);
    }
    res
}

/// The `grpc-status` of a response head or trailers; `None` when absent or unreadable.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(feature = "grpc")]
mod tonic_impl {
    use http::header::RETRY_AFTER;
    use http::HeaderMap;

    use super::{status_details, GrpcCode};
    use crate::decision::Denial;
    use crate::problem::details::{denial_headers, X_SHOULD_RETRY};
    use crate::problem::{ProblemConfig, ProblemDetails};
    use crate::time::Timestamp;

    impl ProblemDetails {
        /// This problem as a [`tonic::Status`] with the same code, message and details as
        /// the layers' own gRPC answers, for a tonic handler that refuses in-band. Pass the
        /// denial behind it, if any, for its code and failure details.
        ///
        /// A problem alone knows no retry delay and no headers: prefer
        /// [`Denial::to_tonic_status`], which adds the `RetryInfo` and the metadata.
        pub fn to_tonic_status(
            &self,
            denial: Option<&Denial>,
            config: &ProblemConfig,
        ) -> tonic::Status {
            status_with(self, denial, config, HeaderMap::new())
        }
    }

    fn status_with(
        problem: &ProblemDetails,
        denial: Option<&Denial>,
        config: &ProblemConfig,
        mut metadata: HeaderMap,
    ) -> tonic::Status {
        let code = denial.map_or_else(
            || GrpcCode::for_http_status(problem.status),
            GrpcCode::for_denial,
        );
        metadata.remove(&X_SHOULD_RETRY);
        let retry_after = metadata
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let details = status_details(code, problem, denial, config, retry_after);
        tonic::Status::with_details_and_metadata(
            tonic::Code::from_i32(code.as_i32()),
            problem.detail.clone(),
            details.into(),
            tonic::metadata::MetadataMap::from_headers(metadata),
        )
    }

    impl Denial {
        /// This denial as a [`tonic::Status`], rendered with `config` at the current time:
        /// see [`to_tonic_status_at`](Self::to_tonic_status_at).
        ///
        /// ```
        /// use tower_402::problem::ProblemConfig;
        /// use tower_402::{Credits, Denial};
        ///
        /// let denial = Denial::InsufficientCredits { balance: Credits::new(3), required: Credits::new(10) };
        /// let status = denial.to_tonic_status(&ProblemConfig::new());
        /// assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        /// ```
        pub fn to_tonic_status(&self, config: &ProblemConfig) -> tonic::Status {
            self.to_tonic_status_at(config, Timestamp::now())
        }

        /// This denial as a [`tonic::Status`], identical to the layers' gRPC answer at `now`:
        /// the code of the [mapping](crate::problem#grpc), the detail as message, a
        /// `google.rpc.Status` with `ErrorInfo`, the failure details, a `RetryInfo` when a
        /// retry delay is known (`QUOTA_EXCEEDED` until its reset, `SERVICE_UNAVAILABLE`) and
        /// `Help`, and as metadata the headers the layers send (`retry-after`,
        /// `www-authenticate`, `ratelimit`, `ratelimit-policy`).
        ///
        /// One difference: the [`ProblemDetailsLayer`](crate::ProblemDetailsLayer) adds what
        /// only the request knows (`request_id` from `x-request-id`, `trace_id` from
        /// `traceparent`) to the `ErrorInfo` metadata; a handler has them in its request.
        ///
        /// ```
        /// use tower_402::problem::ProblemConfig;
        /// use tower_402::{Denial, Timestamp};
        ///
        /// let denial = Denial::Unavailable { retry_after_secs: 5 };
        /// let status = denial.to_tonic_status_at(&ProblemConfig::new(), Timestamp::from_unix(0));
        /// assert_eq!(status.code(), tonic::Code::Unavailable);
        /// assert_eq!(status.metadata().get("retry-after").unwrap(), "5");
        /// ```
        pub fn to_tonic_status_at(&self, config: &ProblemConfig, now: Timestamp) -> tonic::Status {
            let problem = ProblemDetails::from_denial(self, config);
            status_with(
                &problem,
                Some(self),
                config,
                denial_headers(self, config, now),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        for (ct, yes) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC+json", true),
            ("application/grpc; charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("application/json", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), yes, "{ct}");
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("costs 10 credits"), "costs 10 credits");
        assert_eq!(percent_encode("80% used"), "80%25 used");
        assert_eq!(percent_encode("21°C\n"), "21%C2%B0C%0A");
    }

    #[test]
    fn base64_without_padding() {
        assert_eq!(base64_unpadded(b""), "");
        assert_eq!(base64_unpadded(b"f"), "Zg");
        assert_eq!(base64_unpadded(b"fo"), "Zm8");
        assert_eq!(base64_unpadded(b"foo"), "Zm9v");
        assert_eq!(base64_unpadded(b"foob"), "Zm9vYg");
        assert_eq!(base64_unpadded(&[0xfb, 0xff]), "+/8");
    }

    fn decode(details: &[u8]) -> tonic_types::Status {
        prost::Message::decode(details).expect("a valid google.rpc.Status")
    }

    #[test]
    fn status_details_decode_with_prost() {
        use crate::problem::Links;
        use crate::Credits;
        use tonic_types::RpcStatusExt;

        let config = ProblemConfig::new()
            .grpc_domain("api.example.com")
            .links(Links::new().top_up("https://example.com/top-up"));
        let denial = Denial::InsufficientCredits {
            balance: Credits::new(3),
            required: Credits::new(10),
        };
        let problem = ProblemDetails::from_denial(&denial, &config);
        let code = GrpcCode::for_denial(&denial);
        assert_eq!(code, GrpcCode::ResourceExhausted);
        let status = decode(&status_details(
            code,
            &problem,
            Some(&denial),
            &config,
            Some(7),
        ));
        assert_eq!(status.code, 8);
        assert_eq!(status.message, problem.detail);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
        assert_eq!(info.domain, "api.example.com");
        assert_eq!(info.metadata["balance"], "3");
        assert_eq!(info.metadata["required"], "10");
        assert_eq!(info.metadata["top_up_url"], "https://example.com/top-up");
        let quota = status.get_details_quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations[0].subject, "credits");
        assert_eq!(quota.violations[0].description, problem.detail);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(7)));
        let help = status.get_details_help().expect("Help");
        assert_eq!(help.links[0].description, "top_up");
        assert_eq!(help.links[0].url, "https://example.com/top-up");
    }

    #[test]
    fn precondition_failure_for_plan_conditions() {
        use crate::plan::PlanId;
        use tonic_types::RpcStatusExt;

        let config = ProblemConfig::new();
        let denial = Denial::PlanUpgradeRequired {
            current_plan: PlanId::new("basic"),
            required_plan: Some(PlanId::new("pro")),
            required_feature: None,
            model: None,
        };
        let problem = ProblemDetails::from_denial(&denial, &config);
        let status = decode(&status_details(
            GrpcCode::for_denial(&denial),
            &problem,
            Some(&denial),
            &config,
            None,
        ));
        assert_eq!(status.code, 9);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.domain, "tower-402");
        assert_eq!(info.metadata["current_plan"], "basic");
        let failure = status
            .get_details_precondition_failure()
            .expect("PreconditionFailure");
        assert_eq!(failure.violations[0].r#type, "PLAN_UPGRADE_REQUIRED");
        assert_eq!(failure.violations[0].subject, "plan:pro");
        assert!(status.get_details_retry_info().is_none());
        assert!(status.get_details_help().is_none());
    }

    #[test]
    fn codes_for_every_denial() {
        use crate::decision::AuthFailure;
        use crate::plan::PlanId;
        let cases = [
            (Denial::Unauthenticated(AuthFailure::Missing), 16),
            (
                Denial::SubscriptionExpired {
                    plan: PlanId::new("basic"),
                    ended_at: None,
                },
                9,
            ),
            (
                Denial::PaymentDeclined {
                    decline_code: "card_declined".into(),
                },
                9,
            ),
            (
                Denial::BadRequest {
                    code: "INVALID_IDEMPOTENCY_KEY",
                    detail: "x".into(),
                },
                3,
            ),
            (Denial::IdempotencyConflict { in_progress: false }, 6),
            (Denial::IdempotencyConflict { in_progress: true }, 10),
            (
                Denial::Unavailable {
                    retry_after_secs: 5,
                },
                14,
            ),
        ];
        for (denial, code) in cases {
            assert_eq!(GrpcCode::for_denial(&denial).as_i32(), code, "{denial:?}");
        }
        assert_eq!(
            GrpcCode::for_http_status(StatusCode::PAYLOAD_TOO_LARGE),
            GrpcCode::ResourceExhausted
        );
        assert_eq!(
            GrpcCode::for_http_status(StatusCode::IM_A_TEAPOT),
            GrpcCode::Unknown
        );
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn to_tonic_status_answers_what_the_layers_answer() {
        use crate::plan::Meter;
        use crate::problem::details::denial_response;
        use crate::time::Timestamp;
        use tonic_types::StatusExt;

        let now = Timestamp::from_unix(1_000_000);
        let config = ProblemConfig::new()
            .links(crate::problem::Links::new().upgrade("https://example.com/upgrade"));
        let denials = [
            Denial::QuotaExceeded {
                meter: Meter::new("requests"),
                limit: 5,
                used: 5,
                resets_at: Some(Timestamp::from_unix(1_000_090)),
                window_secs: Some(3600),
            },
            Denial::Unavailable {
                retry_after_secs: 5,
            },
            Denial::Unauthenticated(crate::decision::AuthFailure::Missing),
        ];
        for denial in denials {
            let status = denial.to_tonic_status_at(&config, now);
            let res = denial_response::<http_body_util::Empty<bytes::Bytes>>(
                denial.clone(),
                &config,
                now,
                true,
            );
            let h = res.headers();
            assert_eq!(
                h["grpc-status"],
                (status.code() as i32).to_string().as_str(),
                "{denial:?}"
            );
            assert_eq!(
                h["grpc-status-details-bin"].to_str().unwrap(),
                base64_unpadded(status.details()),
                "{denial:?}"
            );
            // Every header the layers send as metadata, the status carries too.
            for (name, value) in h {
                if name.as_str().starts_with("grpc-") || name == CONTENT_TYPE {
                    continue;
                }
                assert_eq!(
                    status.metadata().get(name.as_str()).map(|v| v.as_bytes()),
                    Some(value.as_bytes()),
                    "{name}"
                );
            }
            assert_eq!(status.metadata().len(), h.len() - 4, "{denial:?}: {h:?}");
            let retry = status.get_details_retry_info().map(|r| r.retry_delay);
            match denial {
                Denial::QuotaExceeded { .. } => {
                    assert_eq!(retry, Some(Some(std::time::Duration::from_secs(90))));
                    assert_eq!(status.metadata().get("retry-after").unwrap(), "90");
                }
                Denial::Unavailable { .. } => {
                    assert_eq!(retry, Some(Some(std::time::Duration::from_secs(5))))
                }
                _ => {
                    assert_eq!(retry, None);
                    assert!(status.metadata().get("www-authenticate").is_some());
                }
            }
        }
    }
}
