//! Checks tower-402's Stripe webhook against signatures made by Stripe's own library; run by
//! `scripts/stripe-check.sh`, which makes the cases with the npm `stripe` package.
//!
//! ```sh
//! bash scripts/stripe-check.sh        # installs stripe (pinned) into target/stripe-node
//! cargo run --example stripe_verify -- CASES.json OURS.json   # what the script runs
//! ```
//!
//! Each case is posted to a `WebhookService` on in-memory stores, as Stripe would post it:
//! `accept` cases must be applied (200), `reject` cases refused with 400
//! `INVALID_SIGNATURE`, and the ledger must hold exactly the accepted deposits. Then it
//! writes OURS.json, an event signed by `tower_402::webhook::sign_stripe`, for the script to
//! verify with Stripe's `constructEvent`.

use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use tower_402::plan::Catalog;
use tower_402::webhook::{sign_stripe, Stripe, WebhookService};
use tower_402::{Ledger, MemoryLedger, MemoryPlanStore, Timestamp};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cases, ours] = args.as_slice() else {
        eprintln!("usage: stripe_verify CASES.json OURS.json");
        std::process::exit(2);
    };
    let input: Value = serde_json::from_str(&std::fs::read_to_string(cases).expect("cases file"))
        .expect("cases are JSON");
    let secrets: Vec<&str> = input["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .map(|s| s.as_str().expect("a secret"))
        .collect();
    let ledger = MemoryLedger::new();
    let stripe = Stripe::new(secrets[0]).also_accept(secrets[1]);
    let webhook = WebhookService::new(
        stripe,
        MemoryPlanStore::new(),
        ledger.clone(),
        Catalog::new(),
    );
    let mut failed = 0;
    let mut expected_credits = 0;
    for case in input["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let payload = case["payload"].as_str().expect("payload");
        let req = http::Request::post("/webhooks/stripe")
            .header("stripe-signature", case["header"].as_str().expect("header"))
            .body(payload.to_owned())
            .expect("request");
        let res = webhook.clone().oneshot(req).await.expect("infallible");
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        let doc: Value = serde_json::from_slice(&body).expect("JSON answer");
        let ok = match case["expect"].as_str() {
            Some("accept") => {
                let event: Value = serde_json::from_str(payload).expect("event");
                expected_credits += event["data"]["object"]["metadata"]["credits"]
                    .as_str()
                    .and_then(|c| c.parse::<u64>().ok())
                    .expect("credits");
                status == 200 && doc["outcome"] == "applied"
            }
            Some("reject") => status == 400 && doc["code"] == "INVALID_SIGNATURE",
            other => panic!("unknown expectation {other:?}"),
        };
        println!(
            "{} {name}: {status} {doc}",
            if ok { "ok:  " } else { "FAIL:" }
        );
        failed += usize::from(!ok);
    }
    let balance = ledger
        .balance(&"acct_sdk".into(), Timestamp::now())
        .await
        .expect("memory ledger")
        .available
        .get();
    if balance != expected_credits {
        println!("FAIL: the ledger holds {balance} credits, the accepted cases {expected_credits}");
        failed += 1;
    }
    let payload = json!({ "id": "evt_ours", "object": "event", "type": "ping",
                          "created": Timestamp::now().unix(), "data": { "object": {} } })
    .to_string();
    let header = sign_stripe(secrets[0], Timestamp::now(), payload.as_bytes());
    let out =
        json!({ "id": "evt_ours", "payload": payload, "header": header, "secret": secrets[0] });
    std::fs::write(ours, out.to_string()).expect("write OURS.json");
    if failed > 0 {
        eprintln!("{failed} check(s) failed");
        std::process::exit(1);
    }
}
