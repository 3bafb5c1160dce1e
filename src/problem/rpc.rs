//! The `google.rpc` messages of gRPC's rich error model, as `prost` messages (what
//! `prost-build` generates from `google/rpc/status.proto` and `error_details.proto`, the same
//! field numbers `tonic-types` uses): the layers encode `grpc-status-details-bin` with them, and
//! the client side decodes it with them. Declared here rather than taken from `tonic-types` so
//! that gRPC answers need neither tonic nor the `grpc` feature.
#![allow(dead_code)]

use std::collections::BTreeMap;

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.ErrorInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ErrorInfo {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(string, tag = "2")]
    pub domain: String,
    // Ordered, so the encoding is the same bytes every time.
    #[prost(btree_map = "string, string", tag = "3")]
    pub metadata: BTreeMap<String, String>,
}

/// `google.rpc.QuotaFailure`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct QuotaFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<QuotaViolation>,
}

/// `google.rpc.QuotaFailure.Violation`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct QuotaViolation {
    #[prost(string, tag = "1")]
    pub subject: String,
    #[prost(string, tag = "2")]
    pub description: String,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<Duration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `google.rpc.PreconditionFailure`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<PreconditionViolation>,
}

/// `google.rpc.PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PreconditionViolation {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub description: String,
}

/// `google.rpc.Help`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Help {
    #[prost(message, repeated, tag = "1")]
    pub links: Vec<HelpLink>,
}

/// `google.rpc.Help.Link`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelpLink {
    #[prost(string, tag = "1")]
    pub description: String,
    #[prost(string, tag = "2")]
    pub url: String,
}

impl Any {
    /// `message` packed as a `google.rpc.<name>`.
    pub(crate) fn pack(name: &str, message: &impl prost::Message) -> Self {
        Any {
            type_url: format!("type.googleapis.com/google.rpc.{name}"),
            value: message.encode_to_vec(),
        }
    }

    /// The message inside when it is a `google.rpc.<name>`; `None` for another type or bytes
    /// that do not decode.
    pub(crate) fn unpack<M: prost::Message + Default>(&self, name: &str) -> Option<M> {
        let type_name = self.type_url.rsplit('/').next()?;
        if type_name.strip_prefix("google.rpc.")? != name {
            return None;
        }
        M::decode(self.value.as_slice()).ok()
    }
}
