//! The HTTP sink: batches of CloudEvents POSTed to a collector (OpenMeter's ingest endpoint).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::usage::{CloudEvent, SinkError, UsageSink};

/// The content type of a JSON array of CloudEvents (CloudEvents batched mode).
pub const CLOUDEVENTS_BATCH: &str = "application/cloudevents-batch+json";

/// POSTs each batch as one JSON array of CloudEvents (`content-type:
/// application/cloudevents-batch+json`), the form OpenMeter's `POST /api/v1/events` takes.
///
/// A 2xx answer delivers the batch; 408, 429 and 5xx, a connection error or a timeout are
/// retried by the [`Outbox`](crate::usage::Outbox) with backoff; any other status rejects the
/// batch. The bearer token, if any, is sent in `Authorization` and never logged.
///
/// Plain `http://` out of the box; for `https://` pass a TLS connector (hyper-rustls's, for
/// one) to [`with_connector`](Self::with_connector).
#[derive(Clone)]
pub struct HttpSink<C = HttpConnector> {
    client: Client<C, Full<Bytes>>,
    uri: Uri,
    token: Option<HeaderValue>,
    timeout: Duration,
}

impl<C> fmt::Debug for HttpSink<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("uri", &self.uri)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpSink {
    /// A sink POSTing to `uri` over plain HTTP.
    pub fn new(uri: Uri) -> Self {
        HttpSink::with_connector(uri, HttpConnector::new())
    }
}

impl<C: Connect + Clone + Send + Sync + 'static> HttpSink<C> {
    /// A sink POSTing to `uri` through `connector` (a TLS connector for `https://`).
    pub fn with_connector(uri: Uri, connector: C) -> Self {
        HttpSink {
            client: Client::builder(TokioExecutor::new()).build(connector),
            uri,
            token: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// Sends `Authorization: Bearer <token>` (marked sensitive: never logged).
    /// A token that is not a valid header value is refused.
    pub fn bearer_token(mut self, token: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))?;
        value.set_sensitive(true);
        self.token = Some(value);
        Ok(self)
    }

    /// How long one POST may take before it counts as failed (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

#[async_trait]
impl<C: Connect + Clone + Send + Sync + 'static> UsageSink for HttpSink<C> {
    async fn send(&self, batch: &[CloudEvent]) -> Result<(), SinkError> {
        let body = serde_json::to_vec(batch).map_err(SinkError::rejected)?;
        let mut req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, CLOUDEVENTS_BATCH)
            .body(Full::new(Bytes::from(body)))
            .map_err(SinkError::rejected)?;
        if let Some(token) = &self.token {
            req.headers_mut()
                .insert(header::AUTHORIZATION, token.clone());
        }
        let res = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => return Err(SinkError::Unavailable(Box::new(e))),
            Err(_) => return Err(SinkError::unavailable("usage sink timed out")),
        };
        let status = res.status();
        // Read the answer to the end, so the connection can be reused.
        let _ = res.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(SinkError::unavailable(format_args!(
                "collector answered {status}"
            )))
        } else {
            Err(SinkError::rejected(format_args!(
                "collector answered {status}"
            )))
        }
    }
}
