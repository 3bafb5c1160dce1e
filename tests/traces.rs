//! One span per billed request (issue 16): account, route, decision and, once settled, the
//! credits; on LLM routes the OpenTelemetry GenAI names for the model and token counts.
//! Never an API key in any field.
//!
//! Alone in its own test binary: `tracing`'s per-callsite interest cache is global.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::routing::{get, post};
use axum::Router;
use common::{request, send};
use http::Method;
use tower_402::decision::{Cost, Requirement};
use tower_402::metering::{ModelPrice, OpenAiPricing, OpenAiUsage, PriceTable};
use tower_402::observe::gen_ai;
use tower_402::plan::{Catalog, Plan, Subscription};
use tower_402::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

/// Collects the fields of every `tower_402.request` span when it closes.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Fields>>>);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Collect(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(&mut Collect(fields));
            }
        }
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span.name() != "tower_402.request" {
            return;
        }
        let fields = span.extensions().get::<Fields>().cloned();
        self.0.lock().unwrap().extend(fields);
    }
}

#[tokio::test]
async fn one_span_per_request_with_account_route_decision_credits_and_gen_ai_fields() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let now = Timestamp::from_unix(1_790_000_000);
    let ledger = MemoryLedger::new();
    ledger
        .deposit(&"acme".into(), Credits::new(100_000), "seed", now)
        .await
        .unwrap();
    let keys = StaticKeys::new()
        .with_key("sk_live_TOPSECRET", "acme")
        .with_key("sk_live_BROKESECRET", "broke");
    let plans = MemoryPlanStore::new()
        .with(Subscription::active("acme", "pro"))
        .with(Subscription::active("broke", "pro"));
    let catalog = Catalog::new().with_plan(Plan::new("pro", "Pro", 1).overage(true));
    let mut table = PriceTable::new().model("m", ModelPrice::new(1, 1));
    table.per = 1;
    let billing = Billing::new(keys.clone(), plans.clone(), ledger.clone(), catalog.clone())
        .clock(ManualClock::new(now))
        .default_requirement(Requirement::new().cost(Cost::new("requests", 1, Credits::new(1))));
    let llm = Billing::new(keys, plans, ledger.clone(), catalog)
        .clock(ManualClock::new(now))
        .default_requirement(Requirement::new())
        .pricing(OpenAiPricing::new(table))
        .usage(OpenAiUsage::new());
    let ran = Arc::new(Mutex::new(0));
    let count = ran.clone();
    let app = Router::new()
        .route(
            "/v1/forecast",
            get(move || {
                *count.lock().unwrap() += 1;
                async { "sunny" }
            }),
        )
        .layer(billing.layer());
    let llm_app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async {
                (
                    [("content-type", "application/json")],
                    r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
                )
            }),
        )
        .layer(llm.layer());

    assert_eq!(
        common::get(&app, "/v1/forecast", "sk_live_TOPSECRET")
            .await
            .status,
        200
    );
    assert_eq!(
        common::get(&app, "/v1/forecast", "sk_live_BROKESECRET")
            .await
            .status,
        402
    );
    let chat = request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer sk_live_TOPSECRET"),
            ("content-type", "application/json"),
        ],
        r#"{"model":"m","max_tokens":10,"messages":[]}"#,
    );
    assert_eq!(send(&llm_app, chat).await.status, 200);
    assert_eq!(*ran.lock().unwrap(), 1, "the refused request never ran");

    let spans = spans.0.lock().unwrap().clone();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let paid = &spans[0];
    assert_eq!(paid["route"], "GET /v1/forecast");
    assert_eq!(paid["account"], "acme");
    assert_eq!(paid["decision"], "OK");
    assert_eq!(paid["credits"], "1");
    let refused = &spans[1];
    assert_eq!(refused["account"], "broke");
    assert_eq!(refused["decision"], "INSUFFICIENT_CREDITS");
    assert!(!refused.contains_key("credits"), "{refused:?}");
    let chat = &spans[2];
    assert_eq!(chat["route"], "POST /v1/chat/completions");
    assert_eq!(chat[gen_ai::REQUEST_MODEL], "m");
    assert_eq!(chat[gen_ai::USAGE_INPUT_TOKENS], "3");
    assert_eq!(chat[gen_ai::USAGE_OUTPUT_TOKENS], "4");
    assert_eq!(chat["credits"], "7");
    for s in &spans {
        assert!(
            s.values().all(|v| !v.contains("SECRET")),
            "a key reached a span: {s:?}"
        );
    }
}
