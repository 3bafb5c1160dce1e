//! The billable-outcome rule: which responses are charged and which give their hold back.

use http::{HeaderMap, StatusCode};

use crate::metering::MeterConfig;
use crate::problem::grpc_status;

/// Whether a response is charged: not a 5xx, not a 4xx unless
/// [`bill_client_errors`](crate::Billing::bill_client_errors), and for a gRPC call (`grpc`)
/// not a non-zero `grpc-status` in the head (a trailers-only error). A gRPC error in the
/// trailers after a stream is decided when the trailers arrive (see the guard).
pub(crate) fn billable(
    config: &MeterConfig,
    status: StatusCode,
    headers: &HeaderMap,
    grpc: bool,
) -> bool {
    let grpc_error = grpc && grpc_status(headers).is_some_and(|code| code != 0);
    !(status.is_server_error()
        || (status.is_client_error() && !config.bill_client_errors)
        || grpc_error)
}
