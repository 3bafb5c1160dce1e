//! Helpers shared by the integration tests.
#![allow(dead_code)]

use axum::body::Body;
use axum::Router;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// A response read to its end.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    /// Asserts a problem document with this status and code, and the members every problem
    /// carries; returns the document.
    pub fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "status; body {:?}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "content-type"
        );
        assert_eq!(self.header("cache-control"), Some("no-store"));
        let doc = self.json();
        assert_eq!(doc["status"], status, "status member equals HTTP status");
        assert_eq!(doc["code"], code, "{doc}");
        for member in ["type", "title", "detail"] {
            assert!(doc[member].is_string(), "missing `{member}` in {doc}");
        }
        let type_uri = doc["type"].as_str().unwrap();
        assert!(
            type_uri.starts_with("https://") || type_uri.starts_with("urn:"),
            "type must be an absolute URI: {type_uri}"
        );
        doc
    }
}

pub fn request(method: Method, uri: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body.to_owned())).expect("request")
}

pub async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(app: &Router, uri: &str, key: &str) -> Answer {
    send(app, request(Method::GET, uri, &[("x-api-key", key)], "")).await
}
