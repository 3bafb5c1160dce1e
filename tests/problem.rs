//! ProblemDetailsLayer normalizes the inner service's own errors.

mod common;

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use common::{request, send};
use http::Method;
use tower_402::problem::{Links, ProblemConfig};
use tower_402::ProblemDetailsLayer;

fn app() -> Router {
    Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/boom",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "panic at db.rs:42: password authentication failed for user admin",
                )
            }),
        )
        .route(
            "/boom-json",
            get(|| async {
                (
                    StatusCode::BAD_GATEWAY,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"error":"upstream 10.1.2.3 refused"}"#,
                )
            }),
        )
        .route(
            "/teapot-json",
            get(|| async {
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"field":"name"}"#,
                )
            }),
        )
        .route(
            "/pay",
            get(|| async { (StatusCode::PAYMENT_REQUIRED, "pay up") }),
        )
        .layer(ProblemDetailsLayer::new(
            ProblemConfig::new()
                .type_base("https://docs.example.com/problems/")
                .links(Links::new().support("https://example.com/support")),
        ))
}

#[tokio::test]
async fn success_is_untouched() {
    let a = send(&app(), request(Method::GET, "/ok", &[], "")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "fine");
    assert_eq!(a.header("cache-control"), None);
}

#[tokio::test]
async fn a_bare_404_becomes_a_problem() {
    let a = send(&app(), request(Method::GET, "/missing", &[], "")).await;
    let doc = a.problem(404, "NOT_FOUND");
    assert_eq!(doc["type"], "https://docs.example.com/problems/not-found");
    assert_eq!(doc["support_url"], "https://example.com/support");
}

#[tokio::test]
async fn server_error_text_never_reaches_the_client() {
    for uri in ["/boom", "/boom-json"] {
        let a = send(&app(), request(Method::GET, uri, &[], "")).await;
        let body = String::from_utf8_lossy(&a.body).to_string();
        assert!(
            !body.contains("password") && !body.contains("10.1.2.3"),
            "{body}"
        );
        a.json();
        // A browser asking for HTML gets a plain reason phrase, still without the text.
        let a = send(
            &app(),
            request(Method::GET, uri, &[("accept", "text/html")], ""),
        )
        .await;
        assert!(a.status.is_server_error());
        let body = String::from_utf8_lossy(&a.body).to_string();
        assert!(
            !body.contains("password") && !body.contains("10.1.2.3"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn an_inner_json_client_error_is_left_alone() {
    let a = send(&app(), request(Method::GET, "/teapot-json", &[], "")).await;
    assert_eq!(a.status, 422);
    assert_eq!(a.body, r#"{"field":"name"}"#);
}

#[tokio::test]
async fn a_client_that_does_not_accept_json_keeps_the_plain_4xx() {
    let a = send(
        &app(),
        request(Method::GET, "/missing", &[("accept", "text/html")], ""),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_ne!(a.header("content-type"), Some("application/problem+json"));
}

#[tokio::test]
async fn an_inner_402_gets_no_store_and_a_problem_body() {
    let a = send(&app(), request(Method::GET, "/pay", &[], "")).await;
    a.problem(402, "PAYMENT_REQUIRED");
}
